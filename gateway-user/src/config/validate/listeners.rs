//! `[router]`'s plain and HTTPS listeners, and the admin address beside them: at least one
//! listener, and no two that would share connections.

use std::net::SocketAddr;

use super::{
    super::{model::RouterConfig, settings::Https, source::KeyPath},
    Checker, Invalid, tls,
};

/// The plain and HTTPS listeners: at least one, and no address twice.
pub(super) fn listeners(
    c: &mut Checker,
    r: &RouterConfig,
    files: &tls::Files<'_>,
) -> (Vec<SocketAddr>, Option<Https>) {
    let router = KeyPath::root().key("router");
    let mut listen = r.listen.clone();
    if let Some(port) = r.listener_port {
        listen.push(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    let https = tls::https(c, r, files);
    let https_listen = https.as_ref().map_or(&[][..], |h| &h.listen[..]);
    // An HTTPS listener asked for but refused (a certificate problem) has its own error: no
    // second one saying there is no listener.
    let https_asked = match r.https_enabled {
        Some(on) => on,
        None => r.https_port.is_some() || !r.https_listen.is_empty(),
    };
    if listen.is_empty() && https_listen.is_empty() && !https_asked {
        c.fail(router.clone(), Invalid::NoListener);
    }
    let all: Vec<SocketAddr> = listen.iter().chain(https_listen).copied().collect();
    for (i, addr) in all.iter().enumerate() {
        if addr.port() != 0 && all[..i].contains(addr) {
            c.fail(
                router.key("listen"),
                Invalid::DuplicateListen { addr: *addr },
            );
        } else if let Some(other) = all[..i].iter().find(|o| *o != addr && covers(**o, *addr)) {
            // The wildcard is the one that covers the other, whichever came first.
            let (addr, other) = if addr.ip().is_unspecified() {
                (*other, *addr)
            } else {
                (*addr, *other)
            };
            c.fail(
                router.key("listen"),
                Invalid::OverlappingListen { addr, other },
            );
        }
    }
    (listen, https)
}

/// Whether listeners on `a` and `b` share connections: the same port (not 0) and address, or
/// a wildcard of the same family beside it (the gateway's IPv6 sockets are IPv6-only, so
/// `[::]` and `0.0.0.0` on one port are two listeners, as is usual).
fn covers(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The admin address apart from every client listener: on one's port, it took a share of the
/// clients' connections, or `run` failed with "Address already in use" naming no key.
pub(super) fn admin_apart(
    c: &mut Checker,
    admin: Option<SocketAddr>,
    listen: &[SocketAddr],
    https: Option<&Https>,
) {
    let Some(addr) = admin else { return };
    let clients = listen.iter().chain(https.iter().flat_map(|h| &h.listen));
    if let Some(other) = clients.copied().find(|l| covers(addr, *l)) {
        c.fail(
            KeyPath::root().key("admin").key("listen"),
            Invalid::AdminOnClientListener { addr, other },
        );
    }
}
