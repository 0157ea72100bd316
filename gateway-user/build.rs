//! Builds the eBPF object (crate `gateway-ebpf`) with the pinned nightly and bpf-linker, and
//! places it in OUT_DIR where `observer::loader` embeds it with `include_bytes_aligned!`.
//!
//! The nightly is named once, in `gateway-ebpf/rust-toolchain.toml`, and read here.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("gateway-user has no parent directory"))?
        .join("gateway-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo::rerun-if-changed={}", toolchain_file.display());
    let text = fs::read_to_string(&toolchain_file)
        .with_context(|| format!("reading {}", toolchain_file.display()))?;
    let channel = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel"))
        .and_then(|rest| rest.split('"').nth(1))
        .ok_or_else(|| anyhow!("no channel = \"...\" in {}", toolchain_file.display()))?
        .to_owned();
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;

    // AYA_BUILD_SKIP=1 (honoured by aya-build) leaves no object behind; write an empty one so the
    // crate still compiles for userspace-only work. The loader refuses an empty object with a
    // clear error, and `cargo xtask test` never sets the variable.
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("gateway");
    if std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        fs::write(&out, b"")?;
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gateway-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&channel),
    )
}
