//! Upstream clusters: their endpoints and how a request picks one (`endpoint`, `balancer`,
//! `resolve`), each endpoint's health and latency as the proxy keeps them (`health`, `latency`), getting a connection
//! for a request and giving it back (`checkout`, `pool`), making a new one (`connect`, racing a
//! `hedge` when the kernel saw no SYN-ACK in time; then `tls` for a TLS cluster; HTTP/2
//! connections shared by many requests in `multiplex`), active probes (`probe`), and each
//! endpoint's last five minutes for the status page (`history`). `cluster` ties
//! them together. Every decision is taken in `decide/`; these modules do the I/O and feed it.

mod balancer;
mod checkout;
mod cluster;
mod connect;
mod endpoint;
mod gate;
mod health;
mod hedge;
mod history;
mod latency;
mod lifetime;
mod multiplex;
mod pool;
mod probe;
mod resolve;
mod tls;

pub(crate) use self::{
    balancer::key_hash,
    checkout::{Lease, Want, checkout, reuse},
    cluster::Cluster,
    endpoint::{Endpoint, InFlight, NoPick},
    hedge::Hedging,
    pool::{SendResult, UpstreamConn, set_worker_index, socket_of},
};
pub use self::{
    health::{HealthEvent, HealthEventKind},
    history::Series as HistorySeries,
};
