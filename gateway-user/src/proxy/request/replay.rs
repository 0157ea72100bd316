//! What it takes to send a request again: a copy of its head and its kept body ([`Replay`]),
//! and the request rebuilt from them for a retry.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};

use super::Plan;
use crate::proxy::request_body::{Budget, KeptBody, RequestBody};

/// A copy of the request's head, and its body as kept while it streamed (none for a bodiless
/// request).
pub(super) struct Replay {
    method: Method,
    uri: Uri,
    /// The header fields in the map's order, as a list: one allocation, where a copy of the
    /// `HeaderMap` takes two and copies its index too. It is made for almost every request and
    /// read back only for a retry, which rebuilds the map.
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Option<KeptBody>,
}

impl Replay {
    /// A copy of `req`'s head, with its body (if any) kept from here on, within `budget`.
    pub(super) fn of(req: &mut Request<RequestBody>, budget: &Arc<Budget>) -> Replay {
        let body =
            (!hyper::body::Body::is_end_stream(req.body())).then(|| req.body_mut().keep(budget));
        Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: header_list(req.headers()),
            body,
        }
    }
}

impl Drop for Replay {
    /// The request has its answer (or failed for good): its body's copy is not needed, and its
    /// bytes go back to `request_buffering_memory_bytes` now, not when the client's body ends
    /// (a long HTTP/2 or gRPC stream's may not end for hours).
    fn drop(&mut self) {
        if let Some(kept) = &self.body {
            RequestBody::forget(kept);
        }
    }
}

impl Plan {
    /// Whether [`Plan::replay`] would give the request again (without rebuilding it).
    pub(super) fn can_replay(&self) -> bool {
        self.replay
            .as_ref()
            .is_some_and(|r| r.body.as_ref().is_none_or(RequestBody::replayable))
    }

    /// The request again, if it can be sent again (its body, if any, was kept whole).
    pub(super) fn replay(&self) -> Option<Request<RequestBody>> {
        // The request may have been sent as HTTP/2 (absolute URI, no `Host`): the kept head
        // is the one before that.
        let r = self.replay.as_ref()?;
        let body = match &r.body {
            Some(kept) => RequestBody::replay(kept)?,
            None => RequestBody::empty(),
        };
        let mut req = Request::new(body);
        *req.method_mut() = r.method.clone();
        *req.uri_mut() = r.uri.clone();
        *req.headers_mut() = header_map(&r.headers);
        Some(req)
    }
}

/// `headers` as a list of fields, in the map's order (a name's values together, in order).
fn header_list(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    let mut list = Vec::with_capacity(headers.len());
    list.extend(headers.iter().map(|(n, v)| (n.clone(), v.clone())));
    list
}

/// The map [`header_list`] was made from.
fn header_map(list: &[(HeaderName, HeaderValue)]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(list.len());
    for (name, value) in list {
        map.append(name.clone(), value.clone());
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_head_rebuilds_the_same_headers() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "a.example"),
            ("x-forwarded-for", "1.1.1.1"),
            ("accept", "text/html"),
            ("x-forwarded-for", "2.2.2.2"),
            ("via", "1.1 gateway"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let rebuilt = header_map(&header_list(&h));
        assert_eq!(rebuilt, h);
        let order = |m: &HeaderMap| {
            m.iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(order(&rebuilt), order(&h));
        assert!(header_map(&header_list(&HeaderMap::new())).is_empty());
    }
}
