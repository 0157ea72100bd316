//! Requests hyper refuses itself, before the proxy sees them: an HTTP/1 head it cannot parse
//! (`400`: a bad request line, header or version, or bytes that are not HTTP, such as a TLS
//! hello on a plain listener), a head over `max_request_header_bytes` or 100 fields (`431`), a
//! target over hyper's URI limit (`414`). hyper answers them itself and ends the connection.
//! They are logged and counted here as any request is, with method and path `-` (nginx logs
//! its own `400`s too), so that what a client is sent is seen in the access log and in
//! `gateway_requests_total`, not only by the client. (hyper answers only when no response is
//! being written: a bad head pipelined behind a response still being sent is logged as
//! answered, though its client only sees the connection close.)

use std::error::Error;

use http::{Method, StatusCode, Uri, Version};

use crate::proxy::{access_log::Record, error::ErrorKind, request::Client, shared::Shared};

/// Logs and counts the request hyper answered, if the connection ended with `e` because it
/// did (see the module doc); anything else is no request.
pub(super) fn note(shared: &Shared, client: &Client, e: &(dyn Error + 'static)) {
    let Some((status, kind)) = e.downcast_ref::<hyper::Error>().and_then(answered) else {
        return;
    };
    let mut record = Record::new(
        client.addr,
        Method::from_bytes(b"-").expect("a token"),
        Uri::from_static("-"),
        Version::HTTP_11,
    );
    record.status = status.as_u16();
    record.error = Some(kind);
    record.error_detail = Some(format!("refused by the HTTP/1 parser: {e}"));
    record.tls = client.tls;
    shared.telemetry.request_refused(record.status);
    shared.log.log(&record);
}

/// The status hyper wrote for a parse error of a request head (`Server::on_error` in hyper's
/// `proto/h1/role.rs`), and its reason here.
fn answered(e: &hyper::Error) -> Option<(StatusCode, ErrorKind)> {
    // An HTTP/2 preface where HTTP/1 was expected is not answered (and the connection speaks
    // HTTP/2 by then, see `park`), nor is hyper's internal error.
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    let text = e.to_string();
    if text.starts_with("internal error") {
        return None;
    }
    if !e.is_parse_too_large() {
        return Some((StatusCode::BAD_REQUEST, ErrorKind::BadRequest));
    }
    // hyper says which limit only in its words: "URI too long" (`UriTooLong`) or
    // "message head is too large" (`TooLarge`).
    if text.contains("URI") {
        Some((StatusCode::URI_TOO_LONG, ErrorKind::BadRequest))
    } else {
        Some((
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::RequestHeadersTooLarge,
        ))
    }
}
