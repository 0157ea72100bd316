//! Which service made a connect: the kernel gives each record the cgroup v2 id of the
//! process (`bpf_get_current_cgroup_id`, the cgroup directory's inode number in cgroupfs);
//! this module turns it into the cgroup's path and, where the path follows a known layout,
//! the systemd unit, the container id and the Kubernetes pod UID. That is what someone
//! chasing `connection timed out: getsockopt` on a shared host needs: not pid 4242, but
//! `payments.service`, or pod `7d2c…` container `3f9a…`.
//!
//! Paths are matched by their components only ([`Service::from_path`], pure):
//!
//! - systemd unit: the deepest component ending in `.service`, `.scope` or `.socket`
//!   (`/system.slice/nginx.service`, `/user.slice/user-0.slice/session-3.scope`);
//! - container id: 64 hex digits, bare (`/docker/<id>`, `/kubepods/burstable/pod…/<id>`) or
//!   in a runtime's scope (`docker-<id>.scope`, `cri-containerd-<id>.scope`, `crio-<id>.scope`,
//!   `libpod-<id>.scope`);
//! - pod UID: `pod<uid>` (cgroupfs driver) or `kubepods-<qos>-pod<uid>.slice` (systemd driver,
//!   where the UID's dashes are underscores), given back with dashes.
//!
//! The id → path map is built by walking the v2 hierarchy, again when an unknown id shows up
//! (at most once per [`RESCAN_INTERVAL`]), and is bounded ([`MAX_CGROUPS`]).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;

/// How often at most the hierarchy is walked again for ids it did not know.
pub const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Cgroups remembered (and walked) at most: a host with more is a host where attribution
/// gives up on the rest rather than on its memory.
pub const MAX_CGROUPS: usize = 65_536;

/// Who a connect belongs to. Serialised into each `observe --json` line; a field is `null`
/// where the path says nothing about it (or the cgroup was gone before it was looked up).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Service {
    /// The cgroup's path from the v2 root, e.g. `/system.slice/nginx.service`.
    pub cgroup: Option<String>,
    pub systemd_unit: Option<String>,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

const UNIT_SUFFIXES: [&str; 3] = [".service", ".scope", ".socket"];
const RUNTIME_PREFIXES: [&str; 5] = [
    "docker-",
    "cri-containerd-",
    "crio-",
    "libpod-",
    "containerd-",
];

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn container_id(component: &str) -> Option<&str> {
    if is_hex64(component) {
        return Some(component);
    }
    let inner = component.strip_suffix(".scope")?;
    RUNTIME_PREFIXES
        .iter()
        .find_map(|p| inner.strip_prefix(p))
        .filter(|id| is_hex64(id))
}

fn pod_uid(component: &str) -> Option<String> {
    let c = component.strip_suffix(".slice").unwrap_or(component);
    // `kubepods-burstable-pod<uid>`, `kubepods-pod<uid>` or `pod<uid>`.
    let uid = c.rsplit_once("-pod").map_or_else(
        || c.strip_prefix("pod"),
        |(head, uid)| head.starts_with("kubepods").then_some(uid),
    )?;
    let uid = uid.replace('_', "-");
    let shape = uid.len() == 36
        && uid.char_indices().all(|(i, ch)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                ch == '-'
            } else {
                ch.is_ascii_hexdigit()
            }
        });
    shape.then_some(uid)
}

impl Service {
    /// What the path `path` (from the v2 root) says about its owner.
    pub fn from_path(path: &str) -> Service {
        let mut s = Service {
            cgroup: Some(path.to_owned()),
            ..Service::default()
        };
        for c in path.split('/').filter(|c| !c.is_empty()) {
            if UNIT_SUFFIXES.iter().any(|suffix| c.ends_with(suffix)) {
                s.systemd_unit = Some(c.to_owned());
            }
            if let Some(id) = container_id(c) {
                s.container_id = Some(id.to_owned());
            }
            if let Some(uid) = pod_uid(c) {
                s.pod_uid = Some(uid);
            }
        }
        s
    }

    /// The value of the `service` metric label under `by`; `None` when the path says nothing.
    pub fn label(&self, by: ServiceLabel) -> Option<&str> {
        match by {
            ServiceLabel::Cgroup => self.cgroup.as_deref(),
            ServiceLabel::Unit => self.systemd_unit.as_deref(),
            ServiceLabel::Container => self.container_id.as_deref(),
            ServiceLabel::Pod => self.pod_uid.as_deref(),
        }
    }
}

/// `observe --metrics-by`: what the `service` label of
/// `gateway_connect_attempts_by_service_total` holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceLabel {
    Cgroup,
    Unit,
    Container,
    Pod,
}

/// Cgroup ids to [`Service`]s, from walks of the v2 hierarchy.
pub struct Resolver {
    root: PathBuf,
    known: HashMap<u64, Arc<Service>>,
    last_walk: Option<Instant>,
    unknown: Arc<Service>,
}

impl Resolver {
    /// A resolver for the hierarchy mounted at `root` (walked at the first lookup).
    pub fn new(root: PathBuf) -> Resolver {
        Resolver {
            root,
            known: HashMap::new(),
            last_walk: None,
            unknown: Arc::new(Service::default()),
        }
    }

    /// The owner of cgroup `id`; all fields `None` when no walk found it (a cgroup removed
    /// before its first lookup, or one beyond [`MAX_CGROUPS`]).
    pub fn lookup(&mut self, id: u64) -> Arc<Service> {
        if let Some(s) = self.known.get(&id) {
            return s.clone();
        }
        if self
            .last_walk
            .is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL)
        {
            self.walk();
        }
        self.known
            .get(&id)
            .cloned()
            .unwrap_or_else(|| self.unknown.clone())
    }

    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        // A fresh map: ids of removed cgroups go (the kernel does not reuse them).
        let mut known = HashMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            if known.len() >= MAX_CGROUPS {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            let rel = relative(&self.root, &dir);
            let service = self
                .known
                .get(&meta.ino())
                .filter(|s| s.cgroup.as_deref() == Some(rel.as_str()))
                .cloned()
                .unwrap_or_else(|| Arc::new(Service::from_path(&rel)));
            known.insert(meta.ino(), service);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        self.known = known;
    }
}

fn relative(root: &Path, dir: &Path) -> String {
    match dir.strip_prefix(root) {
        Ok(p) if p.as_os_str().is_empty() => "/".to_owned(),
        Ok(p) => format!("/{}", p.display()),
        Err(_) => dir.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f9a0c1b2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f90";

    #[test]
    fn systemd_units_sessions_and_delegated_subgroups() {
        let s = Service::from_path("/system.slice/nginx.service");
        assert_eq!(s.systemd_unit.as_deref(), Some("nginx.service"));
        assert_eq!((s.container_id, s.pod_uid), (None, None));
        let s = Service::from_path("/user.slice/user-0.slice/session-3.scope");
        assert_eq!(s.systemd_unit.as_deref(), Some("session-3.scope"));
        // A unit's own subtree (Delegate=yes): still that unit.
        let s = Service::from_path("/system.slice/gateway.service/gateway-4242");
        assert_eq!(s.systemd_unit.as_deref(), Some("gateway.service"));
        assert_eq!(
            s.cgroup.as_deref(),
            Some("/system.slice/gateway.service/gateway-4242")
        );
        // Slices are not services.
        assert_eq!(Service::from_path("/system.slice").systemd_unit, None);
        assert_eq!(Service::from_path("/").systemd_unit, None);
    }

    #[test]
    fn containers_of_each_runtime_and_driver() {
        for path in [
            format!("/docker/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/system.slice/crio-{ID}.scope"),
        ] {
            let s = Service::from_path(&path);
            assert_eq!(s.container_id.as_deref(), Some(ID), "{path}");
            assert_eq!(s.pod_uid, None, "{path}");
        }
        // 63 digits, or a non-hex one, is no container id.
        assert_eq!(
            Service::from_path(&format!("/docker/{}", &ID[1..])).container_id,
            None
        );
        assert_eq!(
            Service::from_path(&format!("/docker/{}g", &ID[1..])).container_id,
            None
        );
    }

    #[test]
    fn kubernetes_pods_with_either_cgroup_driver() {
        let uid = "7d2c1f0e-9a8b-4c3d-8e7f-6a5b4c3d2e1f";
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{ID}.scope",
            uid.replace('-', "_")
        );
        let s = Service::from_path(&systemd);
        assert_eq!(s.pod_uid.as_deref(), Some(uid));
        assert_eq!(s.container_id.as_deref(), Some(ID));
        assert_eq!(
            s.systemd_unit.as_deref(),
            Some(format!("cri-containerd-{ID}.scope").as_str())
        );
        let cgroupfs = format!("/kubepods/besteffort/pod{uid}/{ID}");
        let s = Service::from_path(&cgroupfs);
        assert_eq!(s.pod_uid.as_deref(), Some(uid));
        assert_eq!(s.container_id.as_deref(), Some(ID));
        assert_eq!(s.systemd_unit, None);
        // A guaranteed pod sits right under kubepods.
        let s = Service::from_path(&format!(
            "/kubepods.slice/kubepods-pod{}.slice",
            uid.replace('-', "_")
        ));
        assert_eq!(s.pod_uid.as_deref(), Some(uid));
        // Not a UID: no pod.
        assert_eq!(
            Service::from_path("/kubepods/burstable/podcast").pod_uid,
            None
        );
        assert_eq!(
            Service::from_path("/system.slice/ipod-sync.service").pod_uid,
            None
        );
    }

    #[test]
    fn the_label_follows_the_choice() {
        let s = Service::from_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(s.label(ServiceLabel::Container), Some(ID));
        assert_eq!(
            s.label(ServiceLabel::Cgroup),
            Some(format!("/system.slice/docker-{ID}.scope").as_str())
        );
        assert_eq!(s.label(ServiceLabel::Pod), None);
    }

    #[test]
    fn ids_resolve_to_their_directory_and_new_ones_after_a_rescan() {
        let root = std::env::temp_dir().join(format!("gw-attr-{}", std::process::id()));
        let unit = root.join("system.slice/payments.service");
        std::fs::create_dir_all(&unit).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let mut r = Resolver::new(root.clone());
        let s = r.lookup(ino(&unit));
        assert_eq!(s.cgroup.as_deref(), Some("/system.slice/payments.service"));
        assert_eq!(s.systemd_unit.as_deref(), Some("payments.service"));
        assert_eq!(r.lookup(ino(&root)).cgroup.as_deref(), Some("/"));
        // Created after the first walk: found once the rescan interval has passed.
        let later = root.join("system.slice/late.service");
        std::fs::create_dir_all(&later).unwrap();
        r.last_walk = Some(Instant::now() - RESCAN_INTERVAL);
        assert_eq!(
            r.lookup(ino(&later)).systemd_unit.as_deref(),
            Some("late.service")
        );
        // An id nobody has: all unknown.
        assert_eq!(*r.lookup(u64::MAX), Service::default());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
