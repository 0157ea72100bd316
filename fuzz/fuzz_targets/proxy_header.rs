//! What a load balancer sends first: a PROXY protocol header (v1 text, v2 binary, or anything
//! else) and whatever follows it, as raw bytes through the real gateway with
//! `[router.proxy_protocol]` on, to a real upstream. The gateway must close the connection
//! (no header, a malformed one) or answer with HTTP after a whole one, within its timeouts,
//! and never panic.
#![no_main]

use gateway_fuzz::{UpstreamKind, assert_http_answer, lab};
use libfuzzer_sys::fuzz_target;

const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

fuzz_target!(|data: &[u8]| {
    let answer = lab(UpstreamKind::HttpBehindProxyProtocol).exchange(data, true);
    if !answer.is_empty() {
        // Only a whole header lets a connection reach HTTP.
        assert!(
            data.starts_with(b"PROXY ") || data.starts_with(V2_SIGNATURE),
            "answered a connection without a PROXY header: {:?}",
            String::from_utf8_lossy(&data[..data.len().min(256)])
        );
    }
    assert_http_answer(after_header(data), &answer);
});

/// What follows the header `data` starts with (v2: by its length; v1: after its line).
fn after_header(data: &[u8]) -> &[u8] {
    if data.starts_with(V2_SIGNATURE) && data.len() >= 16 {
        let len = 16 + usize::from(u16::from_be_bytes([data[14], data[15]]));
        return &data[len.min(data.len())..];
    }
    data.iter()
        .position(|&b| b == b'\n')
        .map_or(&data[data.len()..], |i| &data[i + 1..])
}
