//! The upstream side of the proxy: status line, headers, bodies (content-length, chunked,
//! close-delimited) and trailers as raw bytes from the upstream, for a fixed client request
//! through the real gateway. The gateway must answer the client with HTTP (the upstream's
//! response or a 502) within its timeouts, and never panic.
#![no_main]

use gateway_fuzz::{UpstreamKind, assert_http_answer, lab};
use libfuzzer_sys::fuzz_target;

const REQUEST: &[u8] =
    b"GET /fuzz HTTP/1.1\r\nhost: fuzz.local\r\nte: trailers\r\nconnection: close\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let lab = lab(UpstreamKind::Raw);
    *lab.reply.lock().expect("reply lock") = data.to_vec();
    let answer = lab.exchange(REQUEST);
    assert!(!answer.is_empty(), "the gateway closed without answering a complete request");
    assert_http_answer(&answer);
});
