use super::*;

fn sample() -> Status {
    Status {
        version: "0.1.0".into(),
        uptime_s: 12.5,
        started_unix_ms: 1_763_740_000_000,
        now_unix_ms: 1_763_740_012_500,
        draining: false,
        ready: false,
        not_ready: vec!["cluster `api`: no routable endpoint (1 endpoint(s), all ejected)".into()],
        observer: ObserverStatus {
            mode: SignalOrigin::Kernel,
            kernel_signals: true,
            reason: None,
            cgroup: Some("/sys/fs/cgroup/gateway-4242".into()),
            events_lost: Some(0),
        },
        clusters: vec![ClusterStatus {
            name: "api".into(),
            lb_policy: LbPolicy::RoundRobin,
            hash_on: None,
            routable: 0,
            dns: Vec::new(),
            endpoints: vec![EndpointStatus {
                address: "10.0.0.5:8080".parse().unwrap(),
                weight: 1,
                state: State::Ejected,
                reason: Some(Reason::Refused),
                since_unix_ms: 1_763_740_011_000,
                ejected_until_unix_ms: Some(1_763_740_012_000),
                connect_deadline_ms: 250.0,
                connect_deadline_source: ConnectDeadlineSource::Configured,
                syn_rtt: SynRtt {
                    p50_us: Some(61),
                    p99_us: Some(140),
                    samples: 24,
                },
                in_flight: 0,
                latency: LatencyStatus {
                    ewma_ms: Some(0.61),
                    samples: 1834,
                    source: LatencySource::Responses,
                    awaiting_head: 0,
                    slow_above_ms: None,
                },
                h2_requests_per_connection: None,
                slow_start_percent: None,
                recent: vec![HealthEvent {
                    at_unix_ms: 1_763_740_011_000,
                    event: HealthEventKind::Ejected,
                    reason: Some(Reason::Refused),
                    detail: "connection refused by 10.0.0.5:8080 after 0 ms; kernel: refused, 1 \
                             SYN sent, RST received, ECONNREFUSED"
                        .into(),
                }],
                history: EndpointHistory {
                    series: HistorySeries {
                        first_unix_s: 1_763_740_009,
                        requests: vec![40, 12, 0],
                        latency_p50_us: vec![Some(610), Some(598), None],
                        latency_p99_us: vec![Some(2100), Some(1890), None],
                        syn_rtt_p50_us: vec![Some(62), None, None],
                        syn_rtt_p99_us: vec![Some(140), None, None],
                        hedges: vec![0, 0, 0],
                        errors: [("connect_refused".to_owned(), vec![0, 3, 0])].into(),
                    },
                    changes: vec![HealthEvent {
                        at_unix_ms: 1_763_740_011_000,
                        event: HealthEventKind::Ejected,
                        reason: Some(Reason::Refused),
                        detail: "connection refused".into(),
                    }],
                },
            }],
        }],
    }
}

/// The contract of the module doc, byte for byte as `/status` serves it.
const SAMPLE_JSON: &str = r#"{
  "version": "0.1.0",
  "uptime_s": 12.5,
  "started_unix_ms": 1763740000000,
  "now_unix_ms": 1763740012500,
  "draining": false,
  "ready": false,
  "not_ready": [
    "cluster `api`: no routable endpoint (1 endpoint(s), all ejected)"
  ],
  "observer": {
    "mode": "kernel",
    "kernel_signals": true,
    "reason": null,
    "cgroup": "/sys/fs/cgroup/gateway-4242",
    "events_lost": 0
  },
  "clusters": [
    {
      "name": "api",
      "lb_policy": "round_robin",
      "routable": 0,
      "endpoints": [
        {
          "address": "10.0.0.5:8080",
          "weight": 1,
          "state": "ejected",
          "reason": "refused",
          "since_unix_ms": 1763740011000,
          "ejected_until_unix_ms": 1763740012000,
          "connect_deadline_ms": 250.0,
          "connect_deadline_source": "configured",
          "syn_rtt": {
            "p50_us": 61,
            "p99_us": 140,
            "samples": 24
          },
          "in_flight": 0,
          "latency": {
            "ewma_ms": 0.61,
            "samples": 1834,
            "source": "responses",
            "awaiting_head": 0,
            "slow_above_ms": null
          },
          "h2_requests_per_connection": null,
          "recent": [
            {
              "at_unix_ms": 1763740011000,
              "event": "ejected",
              "reason": "refused",
              "detail": "connection refused by 10.0.0.5:8080 after 0 ms; kernel: refused, 1 SYN sent, RST received, ECONNREFUSED"
            }
          ],
          "history": {
            "first_unix_s": 1763740009,
            "requests": [
              40,
              12,
              0
            ],
            "latency_p50_us": [
              610,
              598,
              null
            ],
            "latency_p99_us": [
              2100,
              1890,
              null
            ],
            "syn_rtt_p50_us": [
              62,
              null,
              null
            ],
            "syn_rtt_p99_us": [
              140,
              null,
              null
            ],
            "hedges": [
              0,
              0,
              0
            ],
            "errors": {
              "connect_refused": [
                0,
                3,
                0
              ]
            },
            "changes": [
              {
                "at_unix_ms": 1763740011000,
                "event": "ejected",
                "reason": "refused",
                "detail": "connection refused"
              }
            ]
          }
        }
      ]
    }
  ]
}"#;

#[test]
fn status_serialises_to_the_documented_shape() {
    assert_eq!(
        serde_json::to_string_pretty(&sample()).unwrap(),
        SAMPLE_JSON
    );
}

#[test]
fn status_reads_back_into_the_same_structs() {
    let back: Status = serde_json::from_str(SAMPLE_JSON).unwrap();
    assert_eq!(back, sample());
}

/// A reader of an older gateway's `/status` (no `latency`) gets the default.
#[test]
fn status_without_latency_reads_back_with_the_default() {
    let old = SAMPLE_JSON.replace(
        r#""latency": {
            "ewma_ms": 0.61,
            "samples": 1834,
            "source": "responses",
            "awaiting_head": 0,
            "slow_above_ms": null
          },
          "#,
        "",
    );
    assert_ne!(old, SAMPLE_JSON);
    let back: Status = serde_json::from_str(&old).unwrap();
    assert_eq!(
        back.clusters[0].endpoints[0].latency,
        LatencyStatus::default()
    );
}

/// `history` came later: `/status` of an older gateway still reads, with it empty.
#[test]
fn a_status_without_history_reads_with_it_empty() {
    let mut v: serde_json::Value = serde_json::from_str(SAMPLE_JSON).unwrap();
    v["clusters"][0]["endpoints"][0]
        .as_object_mut()
        .unwrap()
        .remove("history");
    let back: Status = serde_json::from_value(v).unwrap();
    assert_eq!(
        back.clusters[0].endpoints[0].history,
        EndpointHistory::default()
    );
}

#[test]
fn every_word_serialises_as_its_name() {
    let name = |v: serde_json::Value| v.as_str().unwrap().to_owned();
    for s in State::ALL {
        assert_eq!(name(serde_json::to_value(s).unwrap()), s.name());
    }
    for k in [
        HealthEventKind::Failure,
        HealthEventKind::Suspect,
        HealthEventKind::Ejected,
        HealthEventKind::EjectionRefused,
        HealthEventKind::Probing,
        HealthEventKind::Recovered,
    ] {
        assert_eq!(name(serde_json::to_value(k).unwrap()), k.name());
    }
    for d in [
        ConnectDeadlineSource::Configured,
        ConnectDeadlineSource::Measured,
    ] {
        assert_eq!(name(serde_json::to_value(d).unwrap()), d.name());
    }
    for s in [
        LatencySource::Responses,
        LatencySource::Handshakes,
        LatencySource::Stalls,
    ] {
        assert_eq!(name(serde_json::to_value(s).unwrap()), s.name());
    }
    for p in [
        LbPolicy::RoundRobin,
        LbPolicy::LeastRequest,
        LbPolicy::PeakEwma,
        LbPolicy::ConsistentHash,
    ] {
        assert_eq!(name(serde_json::to_value(p).unwrap()), p.name());
    }
    assert_eq!(
        name(serde_json::to_value(SignalOrigin::Userspace).unwrap()),
        "userspace"
    );
}
