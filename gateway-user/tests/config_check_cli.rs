//! `gateway check-config FILE` on good and bad files: exit status, and for bad files the
//! file, line and key in the message. Runs the built binary.

use std::path::PathBuf;

use gateway_testkit::gateway_bin;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn check(name: &str) -> Outcome {
    let out = gateway_bin!()
        .command()
        .arg("check-config")
        .arg(fixture(name))
        .output()
        .expect("running gateway check-config");
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn common_layout_is_valid() {
    let o = check("good_common.toml");
    assert!(o.ok, "{}", o.stderr);
    assert!(
        o.stdout.contains(
            "good_common.toml: ok: listen 0.0.0.0:8080, 1 route(s), 1 cluster(s), 0 warning(s)"
        ),
        "{}",
        o.stdout
    );
}

#[test]
fn full_example_is_valid() {
    let o = check("good_full.toml");
    assert!(o.ok, "{}", o.stderr);
    assert!(
        o.stdout.contains("2 route(s), 2 cluster(s)"),
        "{}",
        o.stdout
    );
}

#[test]
fn unknown_key_names_file_line_key_and_the_allowed_keys() {
    let o = check("bad_unknown_key.toml");
    assert!(!o.ok);
    let path = fixture("bad_unknown_key.toml");
    let want = format!(
        "{}:8:1: key `router.upstream.timeouts.conect_timeout_ms`: unknown field `conect_timeout_ms`, expected one of `connect_timeout_ms`",
        path.display()
    );
    assert!(o.stderr.contains(&want), "{}", o.stderr);
    assert!(
        o.stderr.contains("   8 | conect_timeout_ms = 6000"),
        "{}",
        o.stderr
    );
}

#[test]
fn semantic_errors_are_all_reported_with_lines() {
    let o = check("bad_unknown_cluster.toml");
    assert!(!o.ok);
    let path = fixture("bad_unknown_cluster.toml");
    assert!(
        o.stderr.contains(&format!(
            "{}:6:1: key `routes[0].cluster`: unknown cluster `apii`; defined clusters: `api`",
            path.display()
        )),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains(&format!(
            "{}:9:31: key `clusters.api.endpoints[1]`: invalid endpoint \"10.0.0.6\": no port",
            path.display()
        )),
        "{}",
        o.stderr
    );
}

#[test]
fn syntax_error_names_the_line() {
    let o = check("bad_syntax.toml");
    assert!(!o.ok);
    let path = fixture("bad_syntax.toml");
    assert!(
        o.stderr.contains(&format!("{}:3:", path.display())),
        "{}",
        o.stderr
    );
}

#[test]
fn wrong_type_names_line_and_key() {
    let o = check("bad_type.toml");
    assert!(!o.ok);
    let path = fixture("bad_type.toml");
    assert!(
        o.stderr.contains(&format!(
            "{}:8:22: key `router.upstream.timeouts.connect_timeout_ms`",
            path.display()
        )),
        "{}",
        o.stderr
    );
}

#[test]
fn cascading_timeouts_warn_but_pass() {
    let o = check("warn_cascade.toml");
    assert!(o.ok, "{}", o.stderr);
    assert!(o.stderr.contains("warning: "), "{}", o.stderr);
    assert!(
        o.stderr
            .contains(":10:1: key `router.upstream.timeouts.request_timeout_ms`"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.contains("1 warning(s)"), "{}", o.stdout);
}

#[test]
fn missing_file_is_an_error() {
    let o = check("does_not_exist.toml");
    assert!(!o.ok);
    assert!(
        o.stderr.contains("does_not_exist.toml: cannot read"),
        "{}",
        o.stderr
    );
}

/// An invalid `RUST_LOG` fails `check-config` as it fails `run`: it passed, and the service
/// then refused to start.
#[test]
fn an_invalid_rust_log_fails_the_check_as_it_fails_run() {
    let out = gateway_bin!()
        .command()
        .env("RUST_LOG", "warning")
        .arg("check-config")
        .arg(fixture("good_common.toml"))
        .output()
        .expect("running gateway check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("RUST_LOG=\"warning\" is invalid"),
        "{stderr}"
    );
}
