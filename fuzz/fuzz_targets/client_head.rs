//! The client side of the proxy: request line, headers and bodies (chunked or not) as raw
//! bytes, through the real gateway to a real upstream. The gateway must answer with HTTP or
//! close, within its timeouts, and never panic. Each input is one connection, so several
//! pipelined requests in one input share it.
#![no_main]

use gateway_fuzz::{UpstreamKind, assert_http_answer, lab};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Half-closed after the bytes, so that an incomplete head or body ends at once instead of
    // at the gateway's header or request timeout (hyper then closes without answering, which
    // is allowed here).
    let answer = lab(UpstreamKind::Http).exchange(data, true);
    assert_http_answer(data, &answer);
});
