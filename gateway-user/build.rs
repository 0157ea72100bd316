//! Builds the eBPF object (crate `gateway-ebpf`) with the pinned nightly and bpf-linker, and
//! places it in OUT_DIR where `observer::loader` embeds it with `include_bytes_aligned!`.
//!
//! The nightly is named once, in `gateway-ebpf/rust-toolchain.toml`, and read here.
//!
//! Also sets `GATEWAY_REVISION` (the git commit, or `$GATEWAY_REVISION` when building outside a
//! checkout, else `unknown`) and `GATEWAY_RUSTC_VERSION` for `gateway_build_info`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow};

/// `git` in `dir` with `args`: its trimmed stdout, or `None`.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The revision for `gateway_build_info`, with what makes cargo run this again when it moves.
fn revision(dir: &Path) -> String {
    println!("cargo::rerun-if-env-changed=GATEWAY_REVISION");
    if let Ok(r) = std::env::var("GATEWAY_REVISION") {
        return r;
    }
    let Some(rev) = git(dir, &["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".to_owned();
    };
    // HEAD, and the branch it points at (a commit moves the branch, not HEAD).
    // A path that does not exist would make cargo run this every time: a packed branch is
    // watched through `packed-refs`.
    let mut watch = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for w in watch {
        if let Some(p) = git(dir, &["rev-parse", "--git-path", &w]).map(|p| dir.join(p))
            && p.exists()
        {
            println!("cargo::rerun-if-changed={}", p.display());
        }
    }
    rev
}

/// `1.99.0` from `rustc --version`.
fn rustc_version() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    println!(
        "cargo::rustc-env=GATEWAY_REVISION={}",
        revision(&manifest_dir)
    );
    println!("cargo::rustc-env=GATEWAY_RUSTC_VERSION={}", rustc_version());
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
