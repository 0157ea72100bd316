//! The fault lab: a client network namespace and N upstream "hosts", each in its own namespace
//! and linked to the client by its own veth pair, plus the faults, servers, cgroups and counters
//! that the observer's and the proxy's privileged tests (and `gateway demo`) are built on. It
//! needs root, and it never changes the root namespace's sysctls or firewall.
//!
//! # Topology
//!
//! ```text
//!  client netns gwlab-<pid>-<n>-c                 upstream netns gwlab-<pid>-<n>-u<k>
//!  up<k>  10.77.<k>.1/24  fd77:0:<k>::1/64  ──veth──  eth0  10.77.<k>.2/24  fd77:0:<k>::2/64
//! ```
//!
//! Upstream `k` (1-based, named `upstream-<k>`) is `lab.upstreams()[k - 1]`. Addresses are only
//! unique within one lab: parallel labs each have their own client namespace. IPv6 addresses are
//! added with `nodad`, so they work at once. Upstream namespaces have ICMP rate limits off, so
//! REJECT answers every packet.
//!
//! # API
//!
//! - [`Lab::new`]`(`[`LabSpec`]`) -> LabResult<Lab>`: builds it (first calling
//!   [`Lab::sweep_stale`], which removes `gwlab-*` namespaces and cgroups of dead pids).
//!   [`Lab::client`], [`Lab::upstreams`], [`Lab::upstream`]`(index)`, [`Lab::client_cgroup`].
//! - [`Upstream`]: [`addr_v4`](Upstream::addr_v4)`(port)`, [`addr_v6`](Upstream::addr_v6),
//!   [`addrs`](Upstream::addrs), [`netns`](Upstream::netns), and
//!   - [`apply`](Upstream::apply)`(`[`Fault`]`) -> LabResult<`[`FaultGuard`]`>`: refuse (RST),
//!     ICMP host unreachable (the ICMP held [`ICMP_ERROR_DELAY`], see there why), SYN
//!     blackhole, whole-host blackhole, random loss, SYN-ACK delay (NFQUEUE + a delayer thread
//!     in the upstream namespace). The guard clears the fault on drop, `clear()` reports
//!     errors, `detach()` keeps it until the lab drops.
//!   - [`serve_http`](Upstream::serve_http)`(port, `[`HttpBehaviour`]`) -> `[`HttpServer`]: body
//!     `upstream-<k>` and header `x-upstream`, optional delay, echo and status, changeable live.
//!   - [`serve_hold`](Upstream::serve_hold)`(port) -> `[`HoldServer`]: accepts and holds.
//!   - [`overflow_accept_queue`](Upstream::overflow_accept_queue)`(port) ->`
//!     [`AcceptQueueOverflow`]: backlog-0 listener, filled, so new SYNs are dropped.
//! - [`Lab::set_client_sysctl`]`(`[`ClientSysctl`]`) -> `[`SysctlGuard`]: `tcp_syn_retries`,
//!   `tcp_syn_linear_timeouts`, `ip_local_port_range` in the client namespace only.
//! - [`Netns`]: [`spawn_thread`](Netns::spawn_thread) (a new OS thread that `setns`'d in),
//!   [`run`](Netns::run) (the same, scoped and waited for), [`block_on`](Netns::block_on) (a
//!   future on a current-thread tokio runtime there), [`command`](Netns::command) and
//!   [`NetnsCommandExt`] (`in_netns`, `in_cgroup`: a child that is in both before it execs),
//!   [`exec`](Netns::exec) (`ip netns exec`), [`sysctl`](Netns::sysctl),
//!   [`netstat`](Netns::netstat) → [`NetStat`] (`TcpExtTCPSynRetrans` and friends: the
//!   kernel's own counters, as an independent witness).
//! - [`CgroupGuard`]: a cgroup v2 directory under the v2 mount found in `/proc/self/mounts`;
//!   `path()`, `id()` (= inode = `bpf_get_current_cgroup_id()`), `add_pid()`.
//!
//! # Cleanup
//!
//! Dropping the [`Lab`] — also while a test unwinds from a panic — stops every server, delayer
//! and held socket it started (whether or not their guards are still alive), SIGKILLs any
//! process still inside its namespaces, deletes the namespaces (their veths and iptables rules
//! die with them) and removes its cgroup. Threads the caller started with
//! [`Netns::spawn_thread`] are the caller's to end.
//!
//! Helper programs: `ip` (iproute2), `iptables-legacy` and `ip6tables-legacy` (this kernel has no
//! nft `queue`). Every failure is a [`LabError`] showing the command line and its stderr.

mod cgroup;
mod cmd;
mod counters;
mod delay;
mod error;
mod fault;
mod names;
mod netns;
mod overflow;
mod registry;
mod server;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use self::registry::Registry;
pub use self::{
    cgroup::{CgroupGuard, cgroup2_mount},
    counters::NetStat,
    error::{LabError, LabResult},
    fault::{Fault, FaultGuard, ICMP_ERROR_DELAY, MAX_SYN_ACK_DELAY},
    names::{NAME_PREFIX, SweepReport, sweep_stale},
    netns::{Netns, NetnsCommandExt, SysctlGuard},
    overflow::AcceptQueueOverflow,
    server::{HoldServer, HttpBehaviour, HttpServer},
};

/// The most upstreams one lab can have (one /24 per upstream under 10.77.0.0/16).
pub const MAX_UPSTREAMS: usize = 254;

/// The client-side veth of upstream `k` gets ifindex `CLIENT_IFINDEX_BASE + k` (see `Lab::link`).
const CLIENT_IFINDEX_BASE: usize = 100;

/// How long [`Lab::new`] waits for the veths' carrier to reach IPv6 and the qdisc.
const LINK_READY_TIMEOUT: Duration = Duration::from_secs(3);
const LINK_READY_POLL: Duration = Duration::from_millis(5);

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    /// Number of upstream namespaces, 1..=[`MAX_UPSTREAMS`].
    pub upstreams: usize,
    /// Create a cgroup for client workloads ([`Lab::client_cgroup`]).
    pub client_cgroup: bool,
}

impl LabSpec {
    /// `upstreams` upstreams and a client cgroup.
    pub fn new(upstreams: usize) -> Self {
        Self {
            upstreams,
            client_cgroup: true,
        }
    }
}

impl Default for LabSpec {
    fn default() -> Self {
        Self::new(3)
    }
}

/// A client-namespace sysctl that shapes connects (see docs/kernel.md, "Kernel settings that
/// shape connect timing").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientSysctl {
    /// `net.ipv4.tcp_syn_retries` (also used for IPv6).
    SynRetries(u8),
    /// `net.ipv4.tcp_syn_linear_timeouts`: retransmits at a fixed 1 s interval before
    /// exponential back-off begins. These come *on top of* `tcp_syn_retries` in SYN_SENT
    /// (`tcp_write_timeout` in `net/ipv4/tcp_timer.c`), so 0 gives the classic 1, 3, 7 s.
    SynLinearTimeouts(u8),
    /// `net.ipv4.ip_local_port_range` (also used for IPv6): a narrow range exhausts ephemeral
    /// ports, and `connect()` then fails with EADDRNOTAVAIL.
    LocalPortRange { low: u16, high: u16 },
}

impl ClientSysctl {
    fn key_value(self) -> (&'static str, String) {
        match self {
            ClientSysctl::SynRetries(n) => ("net.ipv4.tcp_syn_retries", n.to_string()),
            ClientSysctl::SynLinearTimeouts(n) => {
                ("net.ipv4.tcp_syn_linear_timeouts", n.to_string())
            }
            ClientSysctl::LocalPortRange { low, high } => {
                ("net.ipv4.ip_local_port_range", format!("{low} {high}"))
            }
        }
    }
}

/// One upstream host: its namespace, addresses, and what runs or breaks there.
pub struct Upstream {
    number: usize,
    name: String,
    netns: Netns,
    registry: Arc<Registry>,
}

impl Upstream {
    /// `upstream-<k>`; also the HTTP server's response body.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `k`, 1-based.
    pub fn number(&self) -> usize {
        self.number
    }

    /// The upstream's namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// `10.77.<k>.2`.
    pub fn ipv4(&self) -> Ipv4Addr {
        upstream_v4(self.number, 2)
    }

    /// `fd77:0:<k>::2`.
    pub fn ipv6(&self) -> Ipv6Addr {
        upstream_v6(self.number, 2)
    }

    /// The client side of this upstream's link: `10.77.<k>.1`.
    pub fn client_ipv4(&self) -> Ipv4Addr {
        upstream_v4(self.number, 1)
    }

    /// The client side of this upstream's link: `fd77:0:<k>::1`.
    pub fn client_ipv6(&self) -> Ipv6Addr {
        upstream_v6(self.number, 1)
    }

    /// `10.77.<k>.2:port`.
    pub fn addr_v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4()), port)
    }

    /// `[fd77:0:<k>::2]:port`.
    pub fn addr_v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ipv6()), port)
    }

    /// Both addresses, v4 first.
    pub fn addrs(&self, port: u16) -> [SocketAddr; 2] {
        [self.addr_v4(port), self.addr_v6(port)]
    }

    /// Applies `fault` (to IPv4 and IPv6) until the guard is dropped or cleared.
    pub fn apply(&self, fault: Fault) -> LabResult<FaultGuard> {
        FaultGuard::apply(&self.netns, fault, &self.registry)
    }

    /// Starts an HTTP/1.1 server on both addresses (port 0 picks one; see
    /// [`HttpServer::addrs`]).
    pub fn serve_http(&self, port: u16, behaviour: HttpBehaviour) -> LabResult<HttpServer> {
        HttpServer::start(
            &self.netns,
            &self.name,
            &self.addrs(port),
            behaviour,
            &self.registry,
        )
    }

    /// Starts an accept-and-hold TCP listener on both addresses.
    pub fn serve_hold(&self, port: u16) -> LabResult<HoldServer> {
        HoldServer::start(&self.netns, &self.name, &self.addrs(port), &self.registry)
    }

    /// Listens on both addresses with backlog 0, never accepts, and fills the accept queues, so
    /// the listener drops every new SYN.
    pub fn overflow_accept_queue(&self, port: u16) -> LabResult<AcceptQueueOverflow> {
        AcceptQueueOverflow::start(&self.netns, &self.addrs(port), &self.registry)
    }
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("netns", &self.netns.name())
            .field("ipv4", &self.ipv4())
            .field("ipv6", &self.ipv6())
            .finish()
    }
}

fn upstream_v4(number: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, number as u8, host)
}

fn upstream_v6(number: usize, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd77, 0, number as u16, 0, 0, 0, 0, host)
}

/// A built lab. Everything it made goes away when it is dropped (see the module docs).
pub struct Lab {
    name: String,
    client: Netns,
    upstreams: Vec<Upstream>,
    cgroup: Option<CgroupGuard>,
    registry: Arc<Registry>,
}

impl Lab {
    /// Builds the lab described by `spec`. Fails with [`LabError::NotRoot`] unless root.
    pub fn new(spec: LabSpec) -> LabResult<Self> {
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(LabError::NotRoot { euid });
        }
        if !(1..=MAX_UPSTREAMS).contains(&spec.upstreams) {
            return Err(LabError::UpstreamCount {
                requested: spec.upstreams,
                max: MAX_UPSTREAMS,
            });
        }
        if let Err(err) = Self::sweep_stale() {
            tracing::warn!(error = %err, "could not sweep leftovers of earlier labs");
        }
        // Build into `lab` step by step: if a step fails, dropping `lab` undoes the earlier ones.
        let name = names::instance_name();
        let client = Netns::create(&format!("{name}-c"))?;
        let mut lab = Lab {
            name,
            client: client.clone(),
            upstreams: Vec::with_capacity(spec.upstreams),
            cgroup: None,
            registry: Arc::default(),
        };
        cmd::ip_batch(Some(client.name()), &["link set lo up".to_owned()], false)?;
        for number in 1..=spec.upstreams {
            let upstream = Netns::create(&format!("{}-u{number}", lab.name))?;
            lab.upstreams.push(Upstream {
                number,
                name: format!("upstream-{number}"),
                netns: upstream.clone(),
                registry: Arc::clone(&lab.registry),
            });
            lab.link(&client, &upstream, number)?;
        }
        lab.wait_links_ready()?;
        if spec.client_cgroup {
            lab.cgroup = Some(CgroupGuard::create(
                cgroup2_mount()?.join(format!("{}-client", lab.name)),
            )?);
        }
        tracing::debug!(lab = %lab.name, upstreams = spec.upstreams, "lab built");
        Ok(lab)
    }

    /// Links upstream `number` to the client with a veth pair and addresses both ends.
    fn link(&self, client: &Netns, upstream: &Netns, number: usize) -> LabResult<()> {
        let dev = format!("up{number}");
        let (c4, c6) = (upstream_v4(number, 1), upstream_v6(number, 1));
        let (u4, u6) = (upstream_v4(number, 2), upstream_v6(number, 2));
        // The peer is created directly in the upstream namespace: no interface ever appears in
        // the root namespace, so names cannot collide with the host's or another lab's.
        //
        // The explicit ifindex matters. Both ends would otherwise be ifindex 2 in their fresh
        // namespaces, so each end's iflink (its peer's ifindex) equals its own ifindex, and
        // `linkwatch_urgent_event` (net/core/link_watch.c) then treats the carrier change as
        // non-urgent: it is batched for up to 1 s, IPv6 on the link is not ready until then, and
        // the first neighbour solicitations are dropped, so the first IPv6 connect took 1-2 s.
        cmd::ip_batch(
            Some(client.name()),
            &[
                format!(
                    "link add {dev} index {} type veth peer name eth0 netns {}",
                    CLIENT_IFINDEX_BASE + number,
                    upstream.name()
                ),
                format!("addr add {c4}/24 dev {dev}"),
                format!("addr add {c6}/64 dev {dev} nodad"),
                format!("link set {dev} up"),
            ],
            false,
        )?;
        cmd::ip_batch(
            Some(upstream.name()),
            &[
                "link set lo up".to_owned(),
                format!("addr add {u4}/24 dev eth0"),
                format!("addr add {u6}/64 dev eth0 nodad"),
                "link set eth0 up".to_owned(),
            ],
            false,
        )?;
        // REJECT answers through icmp_send, which rate-limits per destination; a test that
        // connects in a loop must see every answer.
        upstream.write_sysctl("net.ipv4.icmp_ratelimit", "0")?;
        upstream.write_sysctl("net.ipv6.icmp.ratelimit", "0")?;
        Ok(())
    }

    /// Waits until every veth end has its IPv6 link-local address. addrconf adds it when
    /// linkwatch reports the carrier (`addrconf_notify`, NETDEV_CHANGE), which is also when the
    /// device's qdisc is activated (`linkwatch_do_dev` → `dev_activate`); before that, packets
    /// the end sends are dropped. Normally this is immediate (see the ifindex note in `link`).
    fn wait_links_ready(&self) -> LabResult<()> {
        let start = Instant::now();
        let mut pending: Vec<(&Netns, String)> = self
            .upstreams
            .iter()
            .flat_map(|u| {
                [
                    (&self.client, format!("up{}", u.number)),
                    (&u.netns, "eth0".to_owned()),
                ]
            })
            .collect();
        loop {
            let mut listings = std::collections::HashMap::new();
            for (ns, _) in &pending {
                if !listings.contains_key(ns.name()) {
                    let listing =
                        cmd::ip(&["-n", ns.name(), "-6", "-o", "addr", "show", "scope", "link"])?;
                    listings.insert(ns.name().to_owned(), listing);
                }
            }
            pending.retain(|(ns, dev)| {
                !listings[ns.name()]
                    .lines()
                    .any(|l| l.split_whitespace().nth(1) == Some(dev.as_str()))
            });
            match pending.first() {
                None => return Ok(()),
                Some((ns, dev)) if start.elapsed() >= LINK_READY_TIMEOUT => {
                    return Err(LabError::LinkNotReady {
                        netns: ns.name().to_owned(),
                        dev: dev.clone(),
                        waited: start.elapsed(),
                    });
                }
                Some(_) => std::thread::sleep(LINK_READY_POLL),
            }
        }
    }

    /// Removes `gwlab-*` namespaces and cgroups whose creating process is dead. [`Lab::new`]
    /// calls it; call it yourself after a crash to clean up before anything else runs.
    pub fn sweep_stale() -> LabResult<SweepReport> {
        names::sweep_stale()
    }

    /// `gwlab-<pid>-<n>`: the prefix of all this lab's namespace and cgroup names.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client namespace: run connects (threads, commands, the gateway) here.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// All upstreams; index `k - 1` is `upstream-<k>`.
    pub fn upstreams(&self) -> &[Upstream] {
        &self.upstreams
    }

    /// The upstream at `index` (0-based; its name is `upstream-<index + 1>`).
    pub fn upstream(&self, index: usize) -> LabResult<&Upstream> {
        self.upstreams.get(index).ok_or(LabError::NoSuchUpstream {
            index,
            count: self.upstreams.len(),
        })
    }

    /// The cgroup for client workloads, if [`LabSpec::client_cgroup`] asked for one. Put a
    /// child process in it with [`NetnsCommandExt::in_cgroup`]; a thread cannot be moved into
    /// a cgroup on its own (cgroup v2 moves whole processes).
    pub fn client_cgroup(&self) -> Option<&CgroupGuard> {
        self.cgroup.as_ref()
    }

    /// Sets a client-namespace sysctl until the guard is dropped.
    pub fn set_client_sysctl(&self, sysctl: ClientSysctl) -> LabResult<SysctlGuard> {
        let (key, value) = sysctl.key_value();
        self.client().set_sysctl(key, &value)
    }

    /// Names of every namespace this lab created (client first).
    pub fn netns_names(&self) -> Vec<String> {
        std::iter::once(&self.client)
            .chain(self.upstreams.iter().map(|u| &u.netns))
            .map(|ns| ns.name().to_owned())
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.registry.stop_all();
        let namespaces: Vec<&Netns> = std::iter::once(&self.client)
            .chain(self.upstreams.iter().map(|u| &u.netns))
            .collect();
        for ns in &namespaces {
            names::kill_all(&ns.foreign_pids());
        }
        let lines: Vec<String> = namespaces
            .iter()
            .map(|ns| format!("netns del {}", ns.name()))
            .collect();
        if let Err(err) = cmd::ip_batch(None, &lines, true) {
            tracing::warn!(lab = %self.name, error = %err, "lab namespaces left behind");
        }
        // The CgroupGuard's own drop moves stray members out and removes the directory.
        self.cgroup.take();
        tracing::debug!(lab = %self.name, "lab removed");
    }
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("name", &self.name)
            .field("upstreams", &self.upstreams)
            .field("cgroup", &self.cgroup.as_ref().map(CgroupGuard::path))
            .finish()
    }
}

/// The lab is shared with async tests and across threads.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Lab>();
    send_sync::<Upstream>();
    send_sync::<Netns>();
    send_sync::<CgroupGuard>();
    send_sync::<FaultGuard>();
    send_sync::<HttpServer>();
    send_sync::<HoldServer>();
    send_sync::<AcceptQueueOverflow>();
    send_sync::<SysctlGuard>();
};
