//! Rebuild when bpf-linker changes, and fail early with a clear message when it is missing.
//!
//! bpf-linker passes `--bpf-expand-memcpy-in-order` to LLVM unless told otherwise, which turns
//! every `memset` LLVM makes (a struct zeroed, four adjacent `u32` fields cleared) into a call
//! to a byte-loop subprogram: six calls in each connect4 run. Without it LLVM writes them as
//! plain stores, as clang does for C programs (docs/kernel.md, "Cost").
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo::rerun-if-changed={}", path.display()),
        Err(err) => panic!("bpf-linker not found on PATH ({err}); run ./dev setup"),
    }
    println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
}
