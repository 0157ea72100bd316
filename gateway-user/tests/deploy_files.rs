//! The shipped Prometheus rules and Grafana dashboard: promtool accepts the rules and their
//! unit tests pass, and every metric they use exists in the catalogue (METRICS.md).

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use gateway::metrics::CATALOGUE;

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool is required (Debian package prometheus; ./dev setup installs it): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_the_alerting_rules() {
    // promtool must find every rule the file defines, however many there are.
    let rules = std::fs::read_to_string(deploy("prometheus/gateway-alerts.yml"))
        .unwrap()
        .lines()
        .filter(|l| {
            let l = l.trim_start().trim_start_matches("- ");
            l.starts_with("alert:") || l.starts_with("record:")
        })
        .count();
    assert!(rules > 0, "gateway-alerts.yml defines no rule");
    let out = promtool(&["check", "rules", "gateway-alerts.yml"]);
    assert!(
        out.contains(&format!("SUCCESS: {rules} rules found")),
        "{rules} rules in the file:\n{out}"
    );
}

#[test]
fn the_alerting_rules_unit_tests_pass() {
    let out = promtool(&["test", "rules", "gateway-alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// `gateway_*` names in `text`, with histogram and counter suffixes mapped to the family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("gateway_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end] == b'_'
                || bytes[end].is_ascii_digit())
        {
            end += 1;
        }
        let mut name = &text[start..end];
        for suffix in ["_bucket", "_count", "_sum", "_total"] {
            name = name.strip_suffix(suffix).unwrap_or(name);
        }
        // `gateway diagnose` in prose and the dashboard uid are not metrics.
        if name.len() > "gateway_".len() && name != "gateway_kernel" {
            names.insert(name.to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

#[test]
fn rules_and_dashboard_only_use_catalogued_metrics() {
    let known: BTreeSet<&str> = CATALOGUE.iter().map(|d| d.name).collect();
    for file in ["prometheus/gateway-alerts.yml", "grafana/gateway.json"] {
        let text = std::fs::read_to_string(deploy(file)).unwrap();
        let used = metric_names(&text);
        assert!(used.len() >= 8, "{file} uses too few metrics: {used:?}");
        for name in &used {
            assert!(
                known.contains(name.as_str()),
                "{file} uses {name}, which METRICS.md does not list"
            );
        }
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/gateway.json")).unwrap())
            .unwrap();
    assert!(dash["panels"].as_array().unwrap().len() >= 10);
}
