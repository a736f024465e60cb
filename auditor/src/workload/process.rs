//! Who is on the local end of a connection: pid -> exe, uid, cgroup v2 path -> container,
//! Kubernetes pod, systemd unit.
//!
//! The kernel side reports pid, comm, uid and cgroup id at the moment of the syscall, so a
//! process that exits right away still has those; exe comes from /proc while it lives.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::audit::event::ProcessIdentity;

/// Where cgroup v2 is mounted (read from /proc/self/mountinfo).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in info.lines() {
        // ... mount_point ... - fstype source options
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next() == Some("cgroup2") {
            return left.split_whitespace().nth(4).map(PathBuf::from);
        }
    }
    None
}

/// Container id, pod uid and systemd unit, as far as a cgroup path shows them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    pub container_id: String,
    pub pod_uid: String,
    pub systemd_unit: String,
}

fn is_hex_id(s: &str) -> bool {
    s.len() >= 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses the layouts of systemd, cgroupfs, docker, containerd, CRI-O, podman and kubelet.
pub fn parse_cgroup_path(path: &str) -> CgroupFacts {
    let mut facts = CgroupFacts::default();
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        let base = seg
            .strip_suffix(".scope")
            .or_else(|| seg.strip_suffix(".slice"))
            .unwrap_or(seg);
        // docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope
        for prefix in [
            "docker-",
            "cri-containerd-",
            "crio-",
            "libpod-",
            "containerd-",
        ] {
            if let Some(id) = base.strip_prefix(prefix) {
                if is_hex_id(id) {
                    facts.container_id = id.to_string();
                }
            }
        }
        // cgroupfs driver: /docker/<id>, /kubepods/burstable/pod<uid>/<id>
        if is_hex_id(base) && facts.container_id.is_empty() {
            facts.container_id = base.to_string();
        }
        // kubepods-burstable-pod<uid_with_underscores>.slice or pod<uid>
        if let Some(pos) = base.rfind("pod") {
            let candidate = &base[pos + 3..];
            let uid = candidate.replace('_', "-");
            if uid.len() == 36 && uid.bytes().filter(|&b| b == b'-').count() == 4 {
                facts.pod_uid = uid;
            }
        }
        if seg.ends_with(".service") {
            facts.systemd_unit = seg.to_string();
        }
    }
    facts
}

struct Cached {
    identity: ProcessIdentity,
    at: Instant,
}

/// Resolves identities, caching per process for a short while (pids are reused).
pub struct IdentityResolver {
    cgroup_root: Option<PathBuf>,
    cgroup_paths: HashMap<u64, String>,
    processes: HashMap<u32, Cached>,
    proc_root: PathBuf,
}

const PROCESS_TTL: Duration = Duration::from_secs(30);

impl IdentityResolver {
    pub fn new() -> Self {
        IdentityResolver {
            cgroup_root: cgroup2_mount(),
            cgroup_paths: HashMap::new(),
            processes: HashMap::new(),
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// The identity of `tgid` as seen at a syscall with the given kernel facts.
    pub fn resolve(&mut self, tgid: u32, comm: &str, uid: u32, cgroup_id: u64) -> ProcessIdentity {
        if let Some(c) = self.processes.get(&tgid) {
            if c.at.elapsed() < PROCESS_TTL
                && c.identity.cgroup_id == cgroup_id
                && &*c.identity.comm == comm
            {
                return c.identity.clone();
            }
        }
        let mut id = ProcessIdentity {
            pid: tgid,
            comm: comm.into(),
            uid,
            cgroup_id,
            ..ProcessIdentity::default()
        };
        let proc_dir = self.proc_root.join(tgid.to_string());
        id.exe = std::fs::read_link(proc_dir.join("exe"))
            .map(|p| p.to_string_lossy().into())
            .unwrap_or_default();
        id.cgroup_path = self
            .cgroup_path(cgroup_id)
            .or_else(|| cgroup_of_proc(&proc_dir))
            .unwrap_or_default()
            .into();
        let facts = parse_cgroup_path(&id.cgroup_path);
        id.container_id = facts.container_id.into();
        id.pod_uid = facts.pod_uid.into();
        id.systemd_unit = facts.systemd_unit.into();
        if self.processes.len() > 65536 {
            self.processes.retain(|_, c| c.at.elapsed() < PROCESS_TTL);
        }
        self.processes.insert(
            tgid,
            Cached {
                identity: id.clone(),
                at: Instant::now(),
            },
        );
        id
    }

    /// The path of cgroup `id` (its directory's inode number under the v2 mount).
    fn cgroup_path(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.cgroup_paths.get(&id) {
            return Some(p.clone());
        }
        let root = self.cgroup_root.clone()?;
        let found = find_cgroup(&root, &root, id, 0)?;
        if self.cgroup_paths.len() > 16384 {
            self.cgroup_paths.clear();
        }
        self.cgroup_paths.insert(id, found.clone());
        Some(found)
    }
}

impl Default for IdentityResolver {
    fn default() -> Self {
        Self::new()
    }
}

fn find_cgroup(root: &Path, dir: &Path, id: u64, depth: u32) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).ok()?;
    if meta.ino() == id {
        let rel = dir.strip_prefix(root).ok()?;
        return Some(format!("/{}", rel.to_string_lossy()));
    }
    if depth > 16 {
        return None;
    }
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if let Some(p) = find_cgroup(root, &entry.path(), id, depth + 1) {
                return Some(p);
            }
        }
    }
    None
}

fn cgroup_of_proc(proc_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(proc_dir.join("cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_systemd_driver() {
        let f = parse_cgroup_path(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_1111_2222_3333_444455556666.slice/cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope",
        );
        assert_eq!(&*f.pod_uid, "1b2c3d4e-1111-2222-3333-444455556666");
        assert_eq!(
            f.container_id,
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        );
    }

    #[test]
    fn docker_cgroupfs_and_systemd_units() {
        let f = parse_cgroup_path(
            "/docker/0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        );
        assert_eq!(f.container_id.len(), 64);
        let f = parse_cgroup_path("/system.slice/payments.service");
        assert_eq!(&*f.systemd_unit, "payments.service");
        assert_eq!(&*f.container_id, "");
    }
}
