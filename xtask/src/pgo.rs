//! The release build: profile-guided optimization (PGO) of the `gateway` binary, and of the
//! bare hyper proxy (`hyper_floor`, the `floor/` crate) the benchmarks measure beside it.
//!
//! Three steps, each skipped when its result is up to date:
//!
//! 1. an instrumented build (`-Cprofile-generate`) in the target directory `target/pgo-gen/`;
//! 2. training: the short runs of `bench proxy` (HTTP/1 keep-alive with the floor, HTTP/2 to
//!    an h2c upstream, WebSocket) and `bench tls` (HTTPS keep-alive and new connections, each a
//!    full handshake) drive the instrumented binaries, which write their counts when they exit
//!    on SIGTERM; `llvm-profdata` (rustup's `llvm-tools`) merges them into
//!    `target/pgo-gen/gateway.profdata`, with a stamp of the sources they were made from;
//! 3. the build the package ships and the benchmarks measure (`-Cprofile-use`) in
//!    `target/pgo/`.
//!
//! Both builds are `cargo build --release`, each in a target directory of its own: the
//! profile names functions by their symbols, which carry the cargo profile's hash and, for
//! local ones, the codegen unit, so the instrumented build must have the release profile's
//! name, LTO and codegen units (measured: an instrumented build with thin LTO and 16 units
//! under another profile name matched almost nothing, 35.6k instructions per request against
//! 36.2k without PGO). `target/release/` stays a plain release build (the demo's).
//!
//! Each build is one cargo invocation of two packages' binaries and no example or test: an
//! example would bring gateway-user's dev-dependencies, whose features cargo unifies into
//! everything that invocation builds (tokio's `test-util` was in the shipped binary that
//! way, with a lock on the timer clock at every timer operation).
//!
//! cargo does not read the profile's contents, only its path: when the sources change, the
//! profile is made again and gateway-user is rebuilt with it, while the dependencies (whose
//! code did not change) keep the counts they were built with. A change to the training alone
//! changes no source: `rm -r target/pgo-gen target/pgo` makes everything again.
//!
//! Why: instructions per proxied request (`bench instructions`, callgrind, one worker) fell by
//! about a fifth with the profile (HTTP/1 keep-alive 36.2k → 27.7k, HTTPS 44.2k → 34.9k): the
//! compiler inlines and lays out the request path by what it runs, not by guesses. A path the
//! training does not run is laid out as cold, so the training covers each protocol the
//! benchmarks measure; not yet TLS to upstreams, HTTP/2 over TLS from clients (the TLS and the
//! HTTP/2 layers are each trained, apart) or gRPC's own handling. On two cores, from cold:
//! about 5.5 minutes for step 1, 1 to 2 for step 2 and 4.5 for step 3 (the suite's package
//! build, measured).

use std::{
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cargo, run, workspace_root};

/// The two binaries of a release build.
#[derive(Clone)]
pub struct Binaries {
    pub gateway: PathBuf,
    pub floor: PathBuf,
}

/// Builds `gateway` and `hyper_floor` with the profile (steps 1 to 3 above, as needed), once
/// per xtask run: a benchmark that asks for both binaries measures the two of one build. A
/// second build in the same run would train again if a source changed meanwhile (an edit
/// while the first one built), and the training's benchmark runs use the same scratch
/// directories as the run that asked, and remove them when they end.
pub fn build() -> anyhow::Result<Binaries> {
    static BUILT: std::sync::OnceLock<Binaries> = std::sync::OnceLock::new();
    if let Some(b) = BUILT.get() {
        return Ok(b.clone());
    }
    let b = build_now()?;
    Ok(BUILT.get_or_init(|| b).clone())
}

fn build_now() -> anyhow::Result<Binaries> {
    let root = workspace_root();
    let gen_dir = target_dir(&root).join("pgo-gen");
    let use_dir = target_dir(&root).join("pgo");
    let profile = gen_dir.join("gateway.profdata");
    let stamp_file = gen_dir.join("gateway.profdata.stamp");
    let stamp = sources_stamp(&root)?;
    let host = host_triple()?;
    if std::fs::read_to_string(&stamp_file).ok().as_deref() != Some(stamp.as_str())
        || !profile.is_file()
    {
        let profdata = llvm_profdata(&host)?;
        let raw = gen_dir.join("profraw");
        eprintln!("\x1b[1m==> PGO 1/3: the instrumented build (target/pgo-gen)\x1b[0m");
        let flag = format!("-Cprofile-generate={}", raw.display());
        release_build(&root, &gen_dir, &host, &flag)?;
        // Build scripts of the instrumented build write counts too; only the training's count.
        let _ = std::fs::remove_dir_all(&raw);
        std::fs::create_dir_all(&raw)?;
        eprintln!(
            "\x1b[1m==> PGO 2/3: training (the short benchmark runs below drive the instrumented binaries; their figures are not measurements)\x1b[0m"
        );
        train(&binaries(&gen_dir))?;
        let raws: Vec<PathBuf> = std::fs::read_dir(&raw)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "profraw"))
            .collect();
        // One file per binary (the processes of one binary merge into its file).
        if raws.len() < 2 {
            bail!(
                "the instrumented binaries wrote {} profile(s) into {}, not one each (each writes its counts when it exits on SIGTERM)",
                raws.len(),
                raw.display()
            );
        }
        run(Command::new(&profdata)
            .arg("merge")
            .arg("-o")
            .arg(&profile)
            .args(&raws))?;
        std::fs::write(&stamp_file, &stamp)?;
    }
    eprintln!("\x1b[1m==> PGO 3/3: the optimized build (target/pgo)\x1b[0m");
    let flag = format!("-Cprofile-use={}", profile.display());
    release_build(&root, &use_dir, &host, &flag)?;
    Ok(binaries(&use_dir))
}

/// The binaries of a release build in the target directory `dir`.
fn binaries(dir: &Path) -> Binaries {
    Binaries {
        gateway: dir.join("release/gateway"),
        floor: dir.join("release/hyper_floor"),
    }
}

/// The target directory (`CARGO_TARGET_DIR` or `target/`).
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// `cargo build --release` of both binaries in the target directory `dir`, with `flag` for the
/// host target only (not the eBPF object, which gateway-user's build script builds with a
/// cargo of its own).
fn release_build(root: &Path, dir: &Path, host: &str, flag: &str) -> anyhow::Result<()> {
    run(cargo()
        .current_dir(root)
        .env("CARGO_TARGET_DIR", dir)
        .args(["build", "--release"])
        .args(["-p", "gateway-user", "-p", "hyper-floor"])
        .args(["--bin", "gateway", "--bin", "hyper_floor", "--config"])
        .arg(format!("target.{host}.rustflags=[\"{flag}\"]")))
}

/// The training loads: the short runs of `bench proxy` and `bench tls` that `./dev test` makes
/// (the same arguments), so that what the benchmarks measure is what the profile was made
/// from. The instrumented binaries stop with SIGTERM (the benchmarks' `Proc`).
fn train(bins: &Binaries) -> anyhow::Result<()> {
    let binaries = [
        "--gateway-bin",
        &bins.gateway.display().to_string(),
        "--floor-bin",
        &bins.floor.display().to_string(),
    ]
    .map(str::to_owned);
    for (name, short) in crate::suite::SHORT_BENCHMARKS {
        let run = match *name {
            "proxy" => crate::bench_proxy::run,
            "tls" => crate::bench_tls::run,
            _ => continue,
        };
        // bench tls takes --floor-bin like every wrk benchmark, and has no floor to use it for.
        let mut args: Vec<String> = short.iter().map(|s| (*s).to_owned()).collect();
        args.extend_from_slice(&binaries);
        // Once again after a failure: the training runs at SCHED_IDLE beside the tests
        // (`./dev test`'s package build), where a peer can be starved for a whole short run.
        if let Err(e) = run(&args) {
            eprintln!("PGO training: bench {name} failed ({e:#}); running it once more");
            run(&args).with_context(|| format!("PGO training: bench {name}, twice"))?;
        }
    }
    Ok(())
}

/// A hash of what the binaries are built from: the workspace's crates that go into them, the
/// lock file and the toolchain file. A profile made from other sources is made again.
fn sources_stamp(root: &Path) -> anyhow::Result<String> {
    let mut files = Vec::new();
    for dir in ["gateway-user", "gateway-common", "gateway-ebpf", "floor"] {
        collect(&root.join(dir), &mut files)?;
    }
    files.extend(["Cargo.lock", "Cargo.toml", "rust-toolchain.toml"].map(|f| root.join(f)));
    files.sort();
    let mut h = std::hash::DefaultHasher::new();
    for f in &files {
        f.strip_prefix(root).unwrap_or(f).hash(&mut h);
        std::fs::read(f)
            .with_context(|| format!("reading {}", f.display()))?
            .hash(&mut h);
    }
    Ok(format!("{:016x} {} files\n", h.finish(), files.len()))
}

/// The `.rs` and `Cargo.toml` files under `dir` (tests and benches excluded: not in the binary).
fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() {
            if !matches!(name, "target" | "tests" | "benches") {
                collect(&path, out)?;
            }
        } else if name.ends_with(".rs") || name == "Cargo.toml" {
            out.push(path);
        }
    }
    Ok(())
}

/// The rustc beside the cargo that runs xtask (the pinned toolchain's).
fn rustc() -> Command {
    let cargo = PathBuf::from(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    let beside = cargo.with_file_name("rustc");
    let mut cmd = Command::new(if beside.is_file() {
        beside
    } else {
        "rustc".into()
    });
    cmd.current_dir(workspace_root());
    cmd
}

/// The host target triple, as `rustc -vV` says.
fn host_triple() -> anyhow::Result<String> {
    let out = rustc().arg("-vV").output().context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV printed no host")
}

/// rustup's `llvm-profdata` (component `llvm-tools`, the LLVM of this toolchain: its profile
/// format is the one rustc reads).
fn llvm_profdata(host: &str) -> anyhow::Result<PathBuf> {
    let out = rustc()
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let p = sysroot
        .join("lib/rustlib")
        .join(host)
        .join("bin/llvm-profdata");
    if !p.is_file() {
        bail!(
            "{} not found: install it with `rustup component add llvm-tools` (./dev does)",
            p.display()
        );
    }
    Ok(p)
}
