//! A cluster's own `endpoints` (never inherited): each address parsed, each weight checked,
//! and one listed twice warned of.

use super::super::{
    super::{model::*, settings::*, source::KeyPath},
    At, Checker, Invalid, Warning,
    addresses::parse_endpoint,
};

/// The cluster's own `endpoints` (never inherited), each address parsed and weight checked at
/// its index.
pub(super) fn endpoints(c: &mut Checker, own: &ClusterConfig, key: &KeyPath) -> Vec<EndpointSpec> {
    let mut endpoints = Vec::new();
    let Some(list) = &own.endpoints else {
        return endpoints;
    };
    let list_key = key.key("endpoints");
    if list.is_empty() {
        c.fail(list_key.clone(), Invalid::EmptyEndpoints);
    }
    for (i, e) in list.iter().enumerate() {
        let ek = list_key.index(i);
        let weight = e.weight.unwrap_or(DEFAULT_WEIGHT);
        if e.weight.is_some() {
            c.range(&ek.key("weight"), weight.into(), 1, MAX_WEIGHT.into(), "");
        }
        match parse_endpoint(&e.address) {
            Ok(address)
                if endpoints
                    .iter()
                    .any(|p: &EndpointSpec| p.address == address) =>
            {
                c.warnings.push(At {
                    key: ek,
                    what: Warning::DuplicateEndpoint {
                        value: e.address.clone(),
                    },
                });
            }
            Ok(address) => endpoints.push(EndpointSpec { address, weight }),
            Err(reason) => c.fail(
                ek,
                Invalid::InvalidEndpoint {
                    value: e.address.clone(),
                    reason,
                },
            ),
        }
    }
    endpoints
}
