//! The TLS families: handshakes by side, result and version, failures by reason, handshake
//! durations, and the expiry of every certificate the gateway presents. Handshakes happen
//! once per connection, not per request, so each event looks its labels up.

use std::time::Duration;

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};

use crate::{
    metrics::{CertificateLabels, GatewayMetrics, SideLabels, TlsErrorLabels, TlsHandshakeLabels},
    tls::CertificateInfo,
};

/// Which side of the proxy a handshake is on (the `side` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// A client of the HTTPS listener.
    Downstream,
    /// The gateway to a TLS upstream.
    Upstream,
}

impl Side {
    const fn name(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
        }
    }
}

pub(crate) struct TlsMeter {
    handshakes: Family<TlsHandshakeLabels, Counter>,
    errors: Family<TlsErrorLabels, Counter>,
    durations: [prometheus_client::metrics::histogram::Histogram; 2],
    expiry: Family<CertificateLabels, Gauge>,
}

impl TlsMeter {
    pub fn new(m: &GatewayMetrics) -> TlsMeter {
        let d = |side: Side| {
            m.tls_handshake_duration
                .get_or_create(&SideLabels { side: side.name() })
                .clone()
        };
        TlsMeter {
            handshakes: m.tls_handshakes.clone(),
            errors: m.tls_handshake_errors.clone(),
            durations: [d(Side::Downstream), d(Side::Upstream)],
            expiry: m.tls_certificate_expiry.clone(),
        }
    }

    /// A handshake completed with `version` (see `tls::version_label`) after `took`.
    pub fn ok(&self, side: Side, version: &'static str, took: Duration) {
        self.handshakes
            .get_or_create(&TlsHandshakeLabels {
                side: side.name(),
                result: "ok",
                version,
            })
            .inc();
        self.durations[side as usize].observe(took.as_secs_f64());
    }

    /// A handshake failed for `reason`.
    pub fn failed(&self, side: Side, reason: &'static str) {
        self.handshakes
            .get_or_create(&TlsHandshakeLabels {
                side: side.name(),
                result: "error",
                version: "unknown",
            })
            .inc();
        self.errors
            .get_or_create(&TlsErrorLabels {
                side: side.name(),
                reason,
            })
            .inc();
    }

    /// The certificates of a config generation: replaces those of the previous one.
    pub fn certificates<'a>(&self, certs: impl Iterator<Item = &'a CertificateInfo>) {
        self.expiry.clear();
        for c in certs {
            self.expiry
                .get_or_create(&CertificateLabels {
                    role: c.role,
                    file: c.file.display().to_string(),
                    subject: c.subject.clone(),
                })
                .set(c.not_after);
        }
    }
}
