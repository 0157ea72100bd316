//! `cargo xtask package` (`./dev package`): the Debian package, built with cargo-deb.
//!
//! cargo-deb takes its assets from `[package.metadata.deb]` in `gateway-user/Cargo.toml`. The
//! man pages and completion scripts are generated from the CLI definition by the release binary
//! itself (`gateway man`, `gateway completions`) into its directory (`target/pgo/release/`:
//! the profile-guided build, [`crate::pgo`]) first, then cargo-deb packages them with the
//! stripped binary (`--no-build`: it was just built; `CARGO_TARGET_DIR=target/pgo`: the assets'
//! `target/release/` paths name that directory).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cargo, release_gateway, run, workspace_root};

/// Builds the package and returns its path (`target/debian/gateway_<version>_<arch>.deb`).
pub fn build() -> anyhow::Result<PathBuf> {
    let gateway = release_gateway(None)?;
    refuse_test_code(&gateway)?;
    let release = gateway.parent().context("the binary has a directory")?;
    generate_docs(&gateway, release)?;
    let out_dir = crate::pgo::target_dir(&workspace_root()).join("debian");
    std::fs::create_dir_all(&out_dir)?;
    // Older builds of other versions would confuse whoever globs for the package.
    for entry in std::fs::read_dir(&out_dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "deb") {
            std::fs::remove_file(&path)?;
        }
    }
    eprintln!("\x1b[1m==> cargo deb\x1b[0m");
    let out = cargo()
        .current_dir(workspace_root())
        .env("CARGO_TARGET_DIR", release.parent().context("target/pgo/")?)
        .args(["deb", "-p", "gateway-user", "--no-build", "--strip", "-o"])
        .arg(&out_dir)
        .output()
        .context("running cargo deb (./dev setup installs cargo-deb)")?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("cargo deb failed with {}", out.status);
    }
    let deb = deb_path(&String::from_utf8_lossy(&out.stdout))
        .context("cargo deb printed no .deb path")?;
    println!("{}", deb.display());
    Ok(deb)
}

/// Code that only tests should have, by a symbol it always brings: tokio's `test-util` (a
/// paused clock, behind a lock the timer takes at every operation). It reached the shipped
/// binary once, through an example built in the same cargo invocation (its dev-dependencies'
/// features are unified into everything that invocation builds; see `pgo`).
const TEST_ONLY_SYMBOLS: &[(&str, &str)] =
    &[("tokio::time::clock::Clock>::pause", "tokio's test-util")];

/// Fails when the release binary (with its symbols, before cargo-deb strips them) carries
/// [`TEST_ONLY_SYMBOLS`].
fn refuse_test_code(binary: &Path) -> anyhow::Result<()> {
    let out = crate::output(
        Command::new("nm")
            .args(["--demangle", "--defined-only"])
            .arg(binary),
        &format!("nm {} (binutils)", binary.display()),
    )?;
    let symbols = String::from_utf8_lossy(&out.stdout);
    for (symbol, what) in TEST_ONLY_SYMBOLS {
        if symbols.contains(symbol) {
            bail!(
                "{} was built with {what} ({symbol}): a test-only feature in the release build",
                binary.display()
            );
        }
    }
    eprintln!(
        "\x1b[1m==> {}: no test-only code ({})\x1b[0m",
        binary.display(),
        TEST_ONLY_SYMBOLS
            .iter()
            .map(|(_, what)| *what)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// The package's path: the last line of `output` that names a `.deb` (cargo deb's, or
/// `cargo xtask package`'s).
pub fn deb_path(output: &str) -> Option<PathBuf> {
    output
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
}

/// Man pages (gzipped, as Debian policy wants) and completion scripts for bash, zsh and fish.
fn generate_docs(gateway: &Path, release: &Path) -> anyhow::Result<()> {
    let man = release.join("man");
    let _ = std::fs::remove_dir_all(&man);
    std::fs::create_dir_all(&man)?;
    run(Command::new(gateway).arg("man").arg("--out").arg(&man))?;
    for entry in std::fs::read_dir(&man)? {
        let page = entry?.path();
        // -n: no name or time stamp inside, so the package is reproducible.
        run(Command::new("gzip").args(["-9nf"]).arg(&page))?;
    }
    let completions = release.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        ("bash", "gateway.bash"),
        ("zsh", "_gateway"),
        ("fish", "gateway.fish"),
    ] {
        let out = Command::new(gateway)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("gateway completions {shell}"))?;
        if !out.status.success() {
            bail!("gateway completions {shell} failed with {}", out.status);
        }
        std::fs::write(completions.join(file), out.stdout)?;
    }
    Ok(())
}
