//! The client side of the proxy: request line, headers and bodies (chunked or not) as raw
//! bytes, through the real gateway to a real upstream. The gateway must answer with HTTP or
//! close, within its timeouts, and never panic.
#![no_main]

use gateway_fuzz::{UpstreamKind, assert_http_answer, lab};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let answer = lab(UpstreamKind::Http).exchange(data);
    assert_http_answer(&answer);
});
