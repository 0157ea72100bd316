//! `[observer]`: where the kernel observer attaches (`cgroup`), whether it must (`mode`), and
//! how many connects in flight its table of records holds (`max_connections`, not the cluster
//! limit of the same name).

use std::path::PathBuf;

use gateway_common::names::{DEFAULT_MAX_CONNECTIONS, MAX_CONNECTIONS_LIMIT};

use super::{At, Checker, Invalid, Warning};
use crate::config::{
    model::{DEFAULT_OBSERVER_CGROUP, ObserverConfig},
    settings::{Observer, ObserverCgroup},
    source::KeyPath,
};

/// Above this many slots (128 MiB) the table of connect records gets a warning: a size for a
/// host with that many connects in flight at once, easily set by mistake.
const LARGE_CONNECT_TABLE: u64 = 1 << 20;

pub(super) fn observer(c: &mut Checker, cfg: &ObserverConfig) -> Observer {
    let cgroup = cgroup(c, cfg.cgroup.as_deref().unwrap_or(DEFAULT_OBSERVER_CGROUP));
    let key = KeyPath::root().key("observer").key("max_connections");
    let max_connections = c.range(
        &key,
        cfg.max_connections
            .map_or(u64::from(DEFAULT_MAX_CONNECTIONS), u64::from),
        1,
        u64::from(MAX_CONNECTIONS_LIMIT),
        "",
    ) as u32;
    let slots = u64::from(max_connections).next_power_of_two();
    if slots > LARGE_CONNECT_TABLE {
        c.warnings.push(At {
            key,
            what: Warning::LargeConnectTable {
                value: max_connections,
                mib: (slots * 128) >> 20,
            },
        });
    }
    Observer {
        mode: cfg.mode.unwrap_or_default(),
        cgroup,
        max_connections,
    }
}

/// `[observer] cgroup`: a child name, `"."`, or an absolute path.
fn cgroup(c: &mut Checker, value: &str) -> ObserverCgroup {
    let key = KeyPath::root().key("observer").key("cgroup");
    let mut fail = |reason| {
        c.fail(
            key.clone(),
            Invalid::InvalidObserverCgroup {
                value: value.to_owned(),
                reason,
            },
        );
        ObserverCgroup::Own
    };
    if value == "." {
        ObserverCgroup::Own
    } else if value.is_empty() {
        fail("empty")
    } else if value.starts_with('/') {
        if value.split('/').any(|part| part == "..") {
            fail("`..` is not allowed")
        } else {
            ObserverCgroup::Path(PathBuf::from(value))
        }
    } else if value.contains('/') {
        fail("a child name cannot contain `/`")
    } else if value == ".." || value.starts_with("cgroup.") {
        fail("not a name the cgroup filesystem allows")
    } else if value.matches("{pid}").count() > 1 {
        fail("`{pid}` may appear once")
    } else {
        ObserverCgroup::Child(value.to_owned())
    }
}
