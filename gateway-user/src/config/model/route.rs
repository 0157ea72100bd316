//! `[[routes]]` as written: what a route matches, how it rewrites, and its own policy
//! (timeouts, retries, body limit, upgrades, HTTPS redirect, allowed clients, rate limit).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::RetryConfig;

/// `[[routes]]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Shown in the access log. Default: `host` + `path_prefix`.
    pub name: Option<String>,
    /// `api.example.com`, or `*.example.com` for any subdomain. Absent: any host.
    pub host: Option<String>,
    /// Plain string prefix of the path. Default `/`.
    pub path_prefix: Option<String>,
    /// A key of `[clusters]`, or `default`.
    pub cluster: String,
    /// Only these methods, e.g. `["GET", "HEAD"]`. Absent: any.
    pub methods: Option<Vec<String>>,
    /// Every condition must hold: `{ name = "x-canary", value = "1" }` (exact value),
    /// `{ name = "x-debug", present = true }` (any value) or `present = false` (absent).
    #[serde(default)]
    pub headers: Vec<HeaderMatchConfig>,
    /// Replaces the matched `path_prefix` before the request goes upstream, e.g.
    /// `path_prefix = "/api/"`, `rewrite_prefix = "/"`: `/api/users` goes up as `/users`.
    pub rewrite_prefix: Option<String>,
    /// Overrides of the cluster's request and response timeouts for this route.
    #[serde(default)]
    pub timeouts: RouteTimeoutsConfig,
    /// `true`: the gateway reads the first 64 KiB of a request body (all of a smaller one)
    /// before it takes an upstream connection, so that a client sending its body slowly holds
    /// none meanwhile. `false`: the body streams to the upstream as it arrives, for an upload
    /// whose client waits on the upstream's progress. Default: the cluster's (`true`). gRPC
    /// and Connect-protocol streams always stream.
    pub request_buffering: Option<bool>,
    /// Largest request body this route forwards; larger gets 413, as for
    /// `[router.downstream] max_request_body_bytes`, which it replaces on this route (higher
    /// or lower: an upload route may allow more than the rest). Default: the router's.
    pub max_request_body_bytes: Option<u64>,
    /// The HTTP/1.1 `Upgrade` protocols tunnelled on this route, replacing its cluster's
    /// `upgrades` (e.g. `[]` on the routes that must never become a tunnel, `["websocket"]`
    /// only on `/ws/`). Default: the cluster's.
    pub upgrades: Option<Vec<String>>,
    /// Replaces `[router] https_redirect` on this route: `false` keeps a path on plain HTTP
    /// (`/.well-known/acme-challenge/`, which ACME's HTTP-01 check fetches over HTTP), `true`
    /// redirects only this route's requests.
    pub https_redirect: Option<bool>,
    /// Only clients from these addresses or CIDR blocks reach this route (an admin path, an
    /// internal API); any other gets 403 `client_not_allowed` and nothing is forwarded. The
    /// client is the peer, or behind a trusted proxy (`[router.forwarded]`) the client its
    /// `X-Forwarded-For` names. Default: any client.
    pub allow_clients: Option<Vec<String>>,
    /// Requests over a rate are answered 429 and never forwarded.
    pub rate_limit: Option<RateLimitConfig>,
    /// Overrides of the cluster's retries and hedging for this route (same keys as a
    /// cluster's `retry` table).
    #[serde(default)]
    pub retry: RetryConfig,
    /// Headers added, set or removed on the request before it goes upstream.
    #[serde(default)]
    pub request_headers: HeaderRulesConfig,
    /// Headers added, set or removed on the upstream's response (and the gateway's own).
    #[serde(default)]
    pub response_headers: HeaderRulesConfig,
}

/// `[routes.rate_limit]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// The steady rate; a fraction for slower ones (`0.5`: 30 a minute).
    pub requests_per_second: f64,
    /// Requests taken at once above the rate. Default: one second's worth (at least 1).
    pub burst: Option<u32>,
    /// `"client"` (default): each client its own bucket; `"route"`: one for the whole route.
    pub by: Option<RateLimitBy>,
    /// Clients tracked at once with `by = "client"`. Default [`DEFAULT_RATE_LIMIT_CLIENTS`].
    pub max_clients: Option<u32>,
}

/// `rate_limit.by`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitBy {
    #[default]
    Client,
    Route,
}

pub const DEFAULT_RATE_LIMIT_CLIENTS: u32 = 100_000;

/// One header condition of a route.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchConfig {
    pub name: String,
    /// The exact value.
    pub value: Option<String>,
    /// `true`: present with any value; `false`: absent.
    pub present: Option<bool>,
}

/// `[routes.timeouts]`: what a route may override (the connection-level timeouts stay the
/// cluster's).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeoutsConfig {
    pub request_timeout_ms: Option<u64>,
    pub response_timeout_ms: Option<u64>,
    pub upgrade_idle_timeout_ms: Option<u64>,
    pub upgrade_max_duration_ms: Option<u64>,
}

/// `[routes.request_headers]`, `[routes.response_headers]`: applied in the order remove,
/// set, add.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderRulesConfig {
    /// Appended, beside any value already there: `add = { "x-env" = "prod" }`.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Replacing any value already there.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Removed: `remove = ["x-internal-token"]`.
    #[serde(default)]
    pub remove: Vec<String>,
}
