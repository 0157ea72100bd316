//! Round robin over an HTTP/1 cluster's endpoints with each one's share of the connections
//! (`Shares`): the turn of an endpoint that holds its share, or cannot take it, goes to another.

use std::sync::atomic::Ordering;

use super::{super::balancer, EndpointSet};
use crate::config::{ClusterSpec, UpstreamProtocol};

/// Round robin, HTTP/1: the endpoint whose turn it is, unless it holds its share
/// ([`Shares::full`]). Then an endpoint of the least load (by weight) among the `eligible`
/// ones with room takes the turn, at random by weight among equals (not the next in line,
/// nor the first listed, either of which would take every turn given up), or among all the
/// `eligible` ones when none has room.
pub(super) fn round_robin_with_room(
    set: &EndpointSet,
    spec: &ClusterSpec,
    tick: usize,
    eligible: impl Fn(usize) -> bool,
) -> Option<usize> {
    // The turn of an endpoint that cannot take it (ejected, suspect, tried) goes to another at
    // random by weight: the next in line would take every turn of its neighbour, twice its
    // share with one of three ejected.
    let n = set.schedule.len();
    let scheduled = set.schedule.get(tick % n.max(1)).map(|&i| i as usize);
    let i = match scheduled.filter(|&i| eligible(i)) {
        Some(i) => i,
        None => {
            let mut rng = rand::rng();
            let draw = || rand::Rng::random_range(&mut rng, 0..usize::MAX);
            balancer::weighted_random(&set.schedule, draw, &eligible)?
        }
    };
    let shares = Shares::of(set, spec);
    if !shares.full(i) {
        return Some(i);
    }
    let least = |ok: &dyn Fn(usize) -> bool| {
        let lowest = (0..set.endpoints.len())
            .filter(|&j| ok(j))
            .min_by(|&a, &b| shares.compare(a, b))?;
        let mut rng = rand::rng();
        let draw = || rand::Rng::random_range(&mut rng, 0..usize::MAX);
        let tied = |j: usize| ok(j) && shares.compare(j, lowest).is_eq();
        balancer::weighted_random(&set.schedule, draw, tied)
    };
    least(&|j| eligible(j) && !shares.full(j)).or_else(|| least(&eligible))
}

/// Each endpoint's share of a round-robin HTTP/1 cluster's connections: `max_connections` by
/// weight among the routable endpoints. An endpoint with as many requests in flight (waiting
/// for a connection or holding one) is full, and its turns go to endpoints with room.
///
/// Without this, an endpoint that takes connections and answers nothing (a hung process still
/// accepting) kept its turns, each holding a connection until the response timeout, until it
/// held every connection of the cluster and the healthy endpoints' requests waited for one.
/// `least_request` and `peak_ewma` weigh the requests in flight already; `protocol = "auto"`
/// and HTTP/2 clusters (many requests to a connection) keep plain round robin.
pub(super) struct Shares<'a> {
    set: &'a EndpointSet,
    max: u64,
    applies: bool,
    /// The routable endpoints' weights, summed once needed.
    routable: std::cell::OnceCell<u64>,
}

impl<'a> Shares<'a> {
    pub(super) fn of(set: &'a EndpointSet, spec: &ClusterSpec) -> Shares<'a> {
        Shares {
            set,
            max: spec.limits.max_connections as u64,
            applies: spec.protocol == UpstreamProtocol::Http1,
            routable: std::cell::OnceCell::new(),
        }
    }

    fn load(&self, j: usize) -> u64 {
        self.set.endpoints[j].in_flight.load(Ordering::Relaxed)
    }

    fn weight(&self, j: usize) -> u64 {
        u64::from(self.set.endpoints[j].weight)
    }

    pub(super) fn full(&self, j: usize) -> bool {
        let (load, share) = (self.load(j), self.max * self.weight(j));
        // Below its share of every endpoint's weight: below its share among the routable.
        if !self.applies || load * self.set.weight < share {
            return false;
        }
        let total = *self.routable.get_or_init(|| {
            let eps = self.set.endpoints.iter();
            eps.filter(|e| e.health.routable())
                .map(|e| u64::from(e.weight))
                .sum()
        });
        load * total >= share
    }

    /// `a`'s load against `b`'s, by weight.
    pub(super) fn compare(&self, a: usize, b: usize) -> std::cmp::Ordering {
        (self.load(a) * self.weight(b)).cmp(&(self.load(b) * self.weight(a)))
    }
}
