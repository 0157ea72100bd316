//! `/status` as `gateway diagnose --admin` reads it: the body of the admin API's answer (JSON,
//! deserialised into the same typed `Status` the gateway writes; the HTTP framing around it is
//! hyper's, fuzzed through the proxy targets), into the gateway's view of a cluster and its
//! evidence lines. Any bytes give a view or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let admin = "127.0.0.1:9901".parse().unwrap();
    // The first byte picks the cluster asked for, so both "found" and "unknown" are reached.
    let (pick, raw) = data.split_first().unwrap_or((&0, data));
    let cluster = ["api", "web", ""][usize::from(*pick) % 3];
    match gateway::diagnose::admin::view_from_body(admin, raw, cluster) {
        Ok(view) => {
            assert!(!view.endpoints.is_empty(), "a view with no endpoints");
            let lines = view.evidence();
            assert_eq!(lines.len(), view.endpoints.len());
            let _ = serde_json::to_string(&view).expect("views serialise");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("127.0.0.1:9901"),
                "an error that does not name the admin: {msg}"
            );
        }
    }
});
