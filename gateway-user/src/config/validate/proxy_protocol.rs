//! `[router.proxy_protocol]`: the load balancers that open connections with a PROXY header.

use std::sync::Arc;

use ipnet::IpNet;

use super::{At, Checker, Invalid, Warning, blocks, ms};
use crate::config::{model::*, settings::ProxyProtocol, source::KeyPath};

/// `None` unless `enabled = true`; a key set without it is a warning, a `from` that lists no
/// peer an error, and one left out (or covering every address) a warning: any client that
/// reaches the listeners could then name another.
pub(super) fn proxy_protocol(c: &mut Checker, cfg: &ProxyProtocolConfig) -> Option<ProxyProtocol> {
    let key = KeyPath::root().key("router").key("proxy_protocol");
    if cfg.enabled != Some(true) {
        let set = [
            ("from", cfg.from.is_some()),
            ("required", cfg.required.is_some()),
            ("timeout_ms", cfg.timeout_ms.is_some()),
        ];
        if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
            c.warnings.push(At {
                key: key.key(name),
                what: Warning::ProxyProtocolOff,
            });
        }
        return None;
    }
    let from: Option<Arc<[IpNet]>> = cfg.from.as_ref().map(|list| {
        if list.is_empty() {
            c.fail(key.key("from"), Invalid::NoProxyProtocolPeer);
        }
        blocks(c, list, &key.key("from"), "load balancer").into()
    });
    let everyone = |nets: &Arc<[IpNet]>| nets.iter().any(|n| n.prefix_len() == 0);
    if from.as_ref().is_none_or(everyone) {
        c.warnings.push(At {
            key: key.key("from"),
            what: Warning::ProxyProtocolFromAnyone,
        });
    }
    let timeout = c.range(
        &key.key("timeout_ms"),
        cfg.timeout_ms.unwrap_or(DEFAULT_PROXY_PROTOCOL_TIMEOUT_MS),
        1,
        60_000,
        " ms",
    );
    Some(ProxyProtocol {
        from,
        required: cfg.required.unwrap_or(true),
        timeout: ms(timeout),
    })
}
