//! `https_redirect`: a request that came over plain HTTP, on a route that wants HTTPS, is
//! answered with the same URL over HTTPS instead of being forwarded: `301` for GET and HEAD
//! (what browsers and caches know best), `308` for every other method, which a client must
//! repeat with the same method and body (a `301` lets it turn a POST into a GET).

use http::{HeaderValue, Method, StatusCode, Uri};

use super::target::host_without_port;
use crate::proxy::error::ProxyError;

/// The gateway's answer to a request on plain HTTP that must use HTTPS.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Redirect {
    pub status: StatusCode,
    pub location: HeaderValue,
}

/// What a request gets instead of being forwarded.
pub(super) enum Instead {
    Error(ProxyError),
    Redirect(Redirect),
}

impl From<ProxyError> for Instead {
    fn from(e: ProxyError) -> Self {
        Instead::Error(e)
    }
}

/// The redirect to `https://` on `port` (left out when 443) for a request to `authority`
/// and `uri`'s path and query. A request with no host to name (an empty `Host`, HTTP/1.0
/// without one) cannot be sent anywhere: 400.
pub(super) fn to_https(
    port: u16,
    method: &Method,
    authority: Option<&HeaderValue>,
    uri: &Uri,
) -> Result<Redirect, ProxyError> {
    const NO_HOST: ProxyError = ProxyError::BadRequest {
        what: "a redirect to HTTPS needs the request's host, and it has none",
    };
    let host = authority
        .and_then(|a| a.to_str().ok())
        .map(host_without_port)
        .filter(|h| !h.is_empty())
        .ok_or(NO_HOST)?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    let url = if port == 443 {
        format!("https://{host}{path}")
    } else {
        format!("https://{host}:{port}{path}")
    };
    // The host passed `authority`'s checks and the path hyper's: both visible ASCII.
    let location = HeaderValue::try_from(url).map_err(|_| NO_HOST)?;
    let status = if method == Method::GET || method == Method::HEAD {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    Ok(Redirect { status, location })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(port: u16, method: Method, host: &str, uri: &str) -> Option<(u16, String)> {
        let host = HeaderValue::from_str(host).unwrap();
        let uri: Uri = uri.parse().unwrap();
        to_https(port, &method, Some(&host), &uri)
            .ok()
            .map(|r| (r.status.as_u16(), r.location.to_str().unwrap().to_owned()))
    }

    #[test]
    fn the_same_url_over_https_with_the_method_kept_where_it_matters() {
        let got = |m, port, host, uri| redirect(port, m, host, uri).unwrap();
        assert_eq!(
            got(Method::GET, 443, "api.example.com:8080", "/a/b?q=1&r=%20"),
            (301, "https://api.example.com/a/b?q=1&r=%20".to_owned())
        );
        assert_eq!(
            got(Method::HEAD, 8443, "api.example.com", "/"),
            (301, "https://api.example.com:8443/".to_owned())
        );
        assert_eq!(
            got(Method::POST, 443, "[2001:db8::1]:80", "/orders"),
            (308, "https://[2001:db8::1]/orders".to_owned())
        );
        // An absolute-form target: its path, the routed host.
        assert_eq!(
            got(Method::DELETE, 443, "a.example", "http://a.example/x?y"),
            (308, "https://a.example/x?y".to_owned())
        );
        // `OPTIONS *` has no path of its own.
        assert_eq!(
            got(Method::OPTIONS, 443, "a.example", "*").1,
            "https://a.example/"
        );
    }

    #[test]
    fn a_request_without_a_host_is_refused() {
        let uri: Uri = "/".parse().unwrap();
        assert!(to_https(443, &Method::GET, None, &uri).is_err());
        let empty = HeaderValue::from_static("");
        assert!(to_https(443, &Method::GET, Some(&empty), &uri).is_err());
        assert!(redirect(443, Method::GET, ":8080", "/").is_none());
    }
}
