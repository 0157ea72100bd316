//! The one check that a privileged test runs as root. Privileged tests (network namespaces,
//! cgroups, eBPF, setpriv, systemd-nspawn) say so in their names and call [`require_root`]
//! first: without root they fail, loudly and with the command that runs them, and never skip
//! (a skipped privileged test reads as a pass of what it claims to check).

/// Panics unless this process runs as root (euid 0).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this is a privileged test (network namespaces, cgroups, eBPF, setpriv or \
         systemd-nspawn) and needs root, but euid is {euid}: run the suite with `./dev test`, or \
         one test binary with `sudo -E cargo test -p PACKAGE --test NAME -- --test-threads=1`"
    );
}
