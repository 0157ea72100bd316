//! `gateway diagnose --admin ADDR CLUSTER` against a running gateway: the cluster name is
//! resolved through the gateway's `/status`, the endpoints are probed, and the report carries
//! the gateway's own recent evidence (its health state, reason and last failure per endpoint).
//!
//! The gateway runs in-process on userspace timing; diagnose runs as the built binary with
//! `--no-kernel`, so the test needs no privileges (diagnose's kernel path has its own privileged
//! tests in `diagnose_cli` and `diagnose_verdicts`).

use gateway_testkit::{
    gateway_bin,
    http::{client, get},
    inprocess::gateway,
    ports::refused_addr,
    upstream::Upstream,
};
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnose_resolves_a_cluster_through_the_admin_api_and_quotes_the_gateway() {
    let good = Upstream::start("good").await;
    let refused = refused_addr();
    let gw = gateway(
        "admin-diagnose",
        &format!(
            "[router.upstream]\nendpoints = [\"{refused}\", \"{}\"]\n\n\
             [router.upstream.health]\nejection_ms = 60000\n",
            good.addr
        ),
    )
    .await;
    let admin = gw.handle.admin_addr().expect("admin listener");
    let c = client();
    for _ in 0..4 {
        assert_eq!(get(&c, gw.addr, "/").await.status, StatusCode::OK);
    }
    let run = move |json: bool| {
        let mut cmd = gateway_bin!().command();
        cmd.args(["diagnose", "--admin"])
            .arg(admin.to_string())
            .args([
                "default",
                "--count",
                "2",
                "--interval-ms",
                "0",
                "--no-kernel",
            ]);
        if json {
            cmd.arg("--json");
        }
        cmd.output().expect("running gateway diagnose")
    };
    let (out, text_out) = tokio::task::spawn_blocking(move || (run(true), run(false)))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a cluster with a refusing endpoint is not healthy: {stdout}\n{stderr}"
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("one JSON object ({e}): {stdout}\n{stderr}"));
    assert_eq!(report["target"], "default");
    assert_eq!(report["verdict"], "refused", "{report:#}");
    let m = &report["measurements"];
    assert_eq!(m["resolution"]["method"], "admin", "{m:#}");
    let probed: Vec<&str> = m["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["address"].as_str().unwrap())
        .collect();
    assert_eq!(probed.len(), 2, "{probed:?}");
    for a in [refused.to_string(), good.addr.to_string()] {
        assert!(probed.contains(&a.as_str()), "{a} probed: {probed:?}");
    }

    // The gateway's view, as structured data…
    let g = &m["gateway"];
    assert_eq!(g["admin"], admin.to_string());
    assert_eq!(g["cluster"], "default");
    assert_eq!(g["observer"], "userspace");
    let bad = g["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == refused.to_string())
        .unwrap_or_else(|| panic!("{refused} in the gateway's view: {g:#}"));
    assert_eq!(bad["state"], "ejected");
    assert_eq!(bad["reason"], "refused");
    assert_eq!(bad["recent"][0]["event"], "ejected");
    // …and as evidence lines a reader sees.
    let evidence: Vec<&str> = report["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let line = evidence
        .iter()
        .find(|l| l.contains(&format!("has {refused} ejected (refused)")))
        .unwrap_or_else(|| panic!("the gateway's evidence for {refused}: {evidence:#?}"));
    assert!(
        line.starts_with(&format!(
            "the gateway at {admin} (userspace timing) has {refused} ejected (refused); latest "
        )) && line.contains(&format!(
            ": ejected (refused): connection refused by {refused}"
        )) && line.ends_with(" [gateway]"),
        "{line}"
    );
    assert!(
        evidence
            .iter()
            .any(|l| l.contains(&format!("has {} healthy", good.addr))),
        "{evidence:#?}"
    );

    let text = String::from_utf8_lossy(&text_out.stdout);
    assert!(
        text.starts_with("default: refused (confidence "),
        "text report: {text}"
    );
    assert!(
        text.contains(&format!(
            "    - the gateway at {admin} (userspace timing) has {refused} ejected (refused)"
        )),
        "text report quotes the gateway: {text}"
    );
}
