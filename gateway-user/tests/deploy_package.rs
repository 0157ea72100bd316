//! The Debian package `./dev package` builds (cargo-deb): lintian finds no error, and it holds
//! what an operator expects: the stripped binary, the commented config (a conffile that passes
//! `check-config`), both units, logrotate, man pages and shell completions. Installing it on a
//! clean Debian 12 root and running its units is `deploy_systemd_privileged`.

use std::process::Command;

use gateway_testkit::deploy::{deb, ok};

#[test]
fn lintian_reports_no_error() {
    let out = Command::new("lintian")
        .arg(deb())
        .output()
        .expect("lintian (Debian package lintian; ./dev setup installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{text}");
    assert!(out.status.success(), "lintian failed: {out:?}");
}

#[test]
fn the_package_holds_the_binary_config_units_docs_and_completions() {
    let deb = deb();
    let listing = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    for path in [
        "./usr/bin/gateway",
        "./etc/gateway/gateway.toml",
        "./etc/default/gateway-observe",
        "./etc/logrotate.d/gateway",
        "./usr/lib/systemd/system/gateway.service",
        "./usr/lib/systemd/system/gateway-observe.service",
        "./usr/share/man/man1/gateway.1.gz",
        "./usr/share/man/man1/gateway-run.1.gz",
        "./usr/share/man/man1/gateway-observe.1.gz",
        "./usr/share/bash-completion/completions/gateway",
        "./usr/share/zsh/vendor-completions/_gateway",
        "./usr/share/fish/vendor_completions.d/gateway.fish",
        "./usr/share/doc/gateway/copyright",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} missing:\n{listing}"
        );
    }
    let conffiles = ok(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"));
    for c in [
        "/etc/gateway/gateway.toml",
        "/etc/default/gateway-observe",
        "/etc/logrotate.d/gateway",
    ] {
        assert!(
            conffiles.lines().any(|l| l == c),
            "{c} is not a conffile: {conffiles}"
        );
    }

    let dir = std::env::temp_dir().join(format!("gateway-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir));
    let bin = dir.join("usr/bin/gateway");
    // Stripped: no symbol table, no DWARF.
    let sections = ok(Command::new("readelf").arg("-S").arg("-W").arg(&bin));
    assert!(
        !sections.contains(".symtab") && !sections.contains(".debug_info"),
        "the packaged binary is not stripped"
    );
    // The shipped config is valid, and the binary runs on this machine.
    let checked = ok(Command::new(&bin)
        .arg("check-config")
        .arg(dir.join("etc/gateway/gateway.toml")));
    assert!(checked.contains(": ok:"), "{checked}");
    let bash =
        std::fs::read_to_string(dir.join("usr/share/bash-completion/completions/gateway")).unwrap();
    assert!(
        bash.contains("complete -F _gateway") && bash.contains("check-config"),
        "{bash}"
    );
    let unit = std::fs::read_to_string(dir.join("usr/lib/systemd/system/gateway.service")).unwrap();
    for line in [
        "Type=notify",
        "Delegate=yes",
        "AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "ExecReload=/usr/bin/gateway reload --config /etc/gateway/gateway.toml --pid $MAINPID",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "gateway.service lacks {line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
