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
    // Not half-closed: the request is complete and says `connection: close`.
    let answer = lab.exchange(REQUEST, false);
    // With no complete response head from the upstream the gateway must answer (502). Once
    // it has forwarded a head, a body that breaks before its first byte ends the client's
    // connection without a word: the status is already committed, so a closed connection is
    // the honest answer (never a made-up 200 with an empty body).
    // (httparse also ends a head at a bare-LF blank line.)
    let complete_head =
        data.windows(2).any(|w| w == b"\n\n") || data.windows(3).any(|w| w == b"\n\r\n");
    assert!(
        !answer.is_empty() || complete_head,
        "the gateway closed without answering, and the upstream had sent no complete head"
    );
    assert_http_answer(REQUEST, &answer);
});
