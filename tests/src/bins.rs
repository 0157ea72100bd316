//! The binaries an end-to-end test runs, and where their paths come from. Cargo gives a test
//! the path of a binary only of the test's own package, and only at compile time
//! (`CARGO_BIN_EXE_<name>`), so the paths are read by macros that expand in the test crate:
//!
//! - [`gateway_bin!`] in gateway-user's tests is cargo's `gateway`, built before the tests;
//!   in this crate's tests (which run `connect-probe`) it is the `gateway` built beside
//!   `connect-probe` in the same target directory, checked to exist and to be newer than every
//!   source it is built from: a missing or stale binary is a loud error, never a silent run of
//!   old code;
//! - [`connect_probe!`] is this crate's `connect-probe`, for its own tests only.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

/// The built `gateway` binary of the test's crate (see the module doc).
#[macro_export]
macro_rules! gateway_bin {
    () => {
        $crate::bins::GatewayBin::locate(
            option_env!("CARGO_BIN_EXE_gateway"),
            option_env!("CARGO_BIN_EXE_connect-probe"),
        )
    };
}

/// The built `connect-probe` binary; only in this crate's own tests.
#[macro_export]
macro_rules! connect_probe {
    () => {
        $crate::bins::ConnectProbe::at(env!("CARGO_BIN_EXE_connect-probe"))
    };
}

/// The `gateway` binary a test runs.
#[derive(Clone, Debug)]
pub struct GatewayBin(PathBuf);

impl GatewayBin {
    /// What [`gateway_bin!`] expands to: cargo's own path when the test crate builds the
    /// binary, else the one beside `connect-probe`, checked.
    /// `GATEWAY_BIN` overrides both (checked like the one beside `connect-probe`): the long
    /// runs (`cargo xtask soak`, `overload`) run the release binary under the debug tests.
    pub fn locate(cargo: Option<&str>, connect_probe: Option<&str>) -> GatewayBin {
        if let Some(bin) = std::env::var_os("GATEWAY_BIN") {
            return GatewayBin::beside(Path::new(&bin));
        }
        match (cargo, connect_probe) {
            (Some(path), _) => GatewayBin(PathBuf::from(path)),
            (None, Some(probe)) => GatewayBin::beside(Path::new(probe)),
            (None, None) => panic!(
                "gateway_bin!() is for gateway-user's integration tests (cargo builds the gateway \
                 binary before them) and gateway-testkit's (it is found beside connect-probe)"
            ),
        }
    }

    /// The `gateway` in the directory of `probe`, which must exist and be newer than every
    /// file cargo built it from: `cargo test -p gateway-testkit` builds gateway-user's library
    /// for this crate, never its binary.
    pub fn beside(probe: &Path) -> GatewayBin {
        let bin = probe.with_file_name("gateway");
        let rebuild = "build it with `cargo build --all-targets` (`./dev test` and `cargo xtask \
                       test` do that first)";
        let built = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| panic!("{} is missing ({e}): {rebuild}", bin.display()));
        if let Some((source, at)) = newest_source(&bin)
            && at > built
        {
            panic!(
                "{} is stale: {} changed (or is gone) since it was built, so this test would run old \
                 code; {rebuild}",
                bin.display(),
                source.display()
            );
        }
        GatewayBin(bin)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `gateway` with no arguments yet.
    pub fn command(&self) -> Command {
        Command::new(&self.0)
    }

    /// `gateway run --config CONFIG`, with `RUST_LOG=info` as a service manager would start it
    /// (the start-up lines [`GatewayProcess`](crate::process::GatewayProcess) reads are info).
    pub fn run(&self, config: &Path) -> Command {
        let mut cmd = self.command();
        cmd.args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info");
        cmd
    }
}

/// The newest of the files cargo built `bin` from, as its dep-info file (`BIN.d` beside it,
/// the list cargo itself checks before it rebuilds) names them; a named file that is gone
/// counts as newer than any build.
fn newest_source(bin: &Path) -> Option<(PathBuf, SystemTime)> {
    let dep_info = bin.with_file_name(format!("{}.d", bin.file_name()?.to_string_lossy()));
    let text = std::fs::read_to_string(&dep_info).unwrap_or_else(|e| {
        panic!(
            "{} is missing ({e}), so {} cannot be checked for freshness: build it with \
             `cargo build --all-targets`",
            dep_info.display(),
            bin.display()
        )
    });
    let mut newest: Option<(PathBuf, SystemTime)> = None;
    for line in text.lines() {
        let Some((_, deps)) = line.split_once(": ") else {
            continue;
        };
        // Make escapes `\ ` (a space in a path) survive the split on spaces.
        for dep in deps.replace("\\ ", "\u{0}").split_whitespace() {
            let path = PathBuf::from(dep.replace('\u{0}', " "));
            let at = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::now());
            if newest.as_ref().is_none_or(|(_, n)| at > *n) {
                newest = Some((path, at));
            }
        }
    }
    newest
}

/// The `connect-probe` binary (see `src/bin/connect-probe.rs`); its runs in the lab are in
/// [`observer`](crate::observer).
#[derive(Clone, Debug)]
pub struct ConnectProbe(pub(crate) PathBuf);

impl ConnectProbe {
    pub fn at(path: &str) -> ConnectProbe {
        ConnectProbe(PathBuf::from(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::GatewayBin;
    use crate::tempdir::TempDir;

    /// A target dir with `connect-probe`, `gateway` built at `built`, and its dep-info naming
    /// one source changed at `changed`.
    fn target(label: &str, built: SystemTime, changed: SystemTime) -> TempDir {
        let dir = TempDir::new(label);
        let source = dir.path().join("my source.rs");
        let bin = dir.path().join("gateway");
        std::fs::write(&source, "").unwrap();
        std::fs::write(dir.path().join("connect-probe"), "").unwrap();
        std::fs::write(&bin, "").unwrap();
        std::fs::write(
            dir.path().join("gateway.d"),
            format!(
                "{}: {}\n",
                bin.display(),
                source.display().to_string().replace(' ', "\\ ")
            ),
        )
        .unwrap();
        let set = |p: &std::path::Path, t| {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap()
        };
        set(&source, changed);
        set(&bin, built);
        dir
    }

    #[test]
    fn a_binary_newer_than_its_sources_is_taken() {
        let now = SystemTime::now();
        let dir = target("bin-fresh", now, now - Duration::from_secs(60));
        let bin = GatewayBin::beside(&dir.path().join("connect-probe"));
        assert_eq!(bin.path(), dir.path().join("gateway"));
    }

    #[test]
    #[should_panic(expected = "is stale: ")]
    fn a_binary_older_than_a_source_is_a_loud_error() {
        let now = SystemTime::now();
        let dir = target("bin-stale", now - Duration::from_secs(60), now);
        GatewayBin::beside(&dir.path().join("connect-probe"));
    }

    #[test]
    #[should_panic(expected = "is missing")]
    fn a_missing_binary_is_a_loud_error() {
        let dir = TempDir::new("bin-missing");
        GatewayBin::beside(&dir.path().join("connect-probe"));
    }
}
