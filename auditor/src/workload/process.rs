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

/// The systemd slice a cgroup path is in (the innermost `.slice`), if any.
pub fn systemd_slice(path: &str) -> Option<&str> {
    path.split('/').rev().find(|s| s.ends_with(".slice"))
}

/// The audit login uid of process `pid` (`/proc/PID/loginuid`); None when unset.
pub fn loginuid_of(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/loginuid"))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .filter(|&v| v != u32::MAX)
}

/// The name of user `uid` (this host's user database, or the daemon container's).
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both ours and sized as passed.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(
            uid,
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        );
        if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// A Postgres backend's process title (`/proc/PID/cmdline` as `ps` shows it).
pub fn process_title(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let text = String::from_utf8_lossy(&raw).replace('\0', " ");
    Some(text.trim().to_string())
}

/// The process titles of every Postgres backend on the host (processes whose title
/// starts with `postgres: `), by pid.
pub fn backend_titles() -> std::collections::HashMap<u32, String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let title = process_title(pid)?;
            title.starts_with("postgres: ").then_some((pid, title))
        })
        .collect()
}

/// Database user and database from a backend's process title:
/// `postgres: [CLUSTER: ]USER DB HOST(PORT) STATE` (or `[local]` for a Unix socket), as
/// Postgres sets it while `update_process_title` is on. None when the title is not a
/// backend's, when user and database cannot be told apart (a name with a space), or when
/// `client_port` is given and the title names another port (another connection).
pub fn parse_backend_title(title: &str, client_port: Option<u16>) -> Option<(String, String)> {
    let rest = title.strip_prefix("postgres: ")?;
    let tokens: Vec<&str> = rest.split(' ').filter(|t| !t.is_empty()).collect();
    // The client's token: HOST(PORT) or [local].
    let at = tokens
        .iter()
        .position(|t| *t == "[local]" || (t.ends_with(')') && t.contains('(')))?;
    let mut names = &tokens[..at];
    if names.len() == 3 && names[0].ends_with(':') {
        names = &names[1..]; // cluster_name
    }
    let [user, db] = names else {
        return None;
    };
    if let (Some(want), Some(port)) = (client_port, tokens[at].rsplit_once('(')) {
        let port: u16 = port.1.trim_end_matches(')').parse().ok()?;
        if port != want {
            return None;
        }
    }
    Some((user.to_string(), db.to_string()))
}

struct Cached {
    identity: ProcessIdentity,
    /// The process's start time its open record gave, if it gave one.
    start_ns: Option<u64>,
    /// Its start time as /proc gave it (clock ticks), when it was read.
    proc_ticks: Option<u64>,
    at: Instant,
}

impl Cached {
    /// Whether the process this was read from started after the kernel saw the one it is
    /// asked for (at `seen_ns`): a later holder of the pid.
    fn started_after(&self, seen_ns: Option<u64>) -> bool {
        seen_ns
            .zip(self.proc_ticks)
            .is_some_and(|(seen, ticks)| started_after(ticks, seen))
    }
}

/// What an open record tells of its process beyond its pid, name, uid and cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskFacts {
    /// Audit login uid and session id as the kernel read them (u32::MAX: unset).
    pub audit: Option<(u32, u32)>,
    /// When the process started, ns since boot (its thread group leader's
    /// `start_boottime`, what /proc/PID/stat gives in clock ticks).
    pub start_ns: Option<u64>,
    /// When the kernel saw the process at the socket (the record's time, CLOCK_MONOTONIC
    /// ns): a process that started after it holds a pid the one seen gave up. What tells
    /// them apart when no open record came (it was lost, or the connection is older than
    /// the capture).
    pub seen_ns: Option<u64>,
}

/// Nanoseconds per clock tick of /proc/PID/stat's times.
pub(crate) fn ns_per_tick() -> u64 {
    static NS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NS.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        1_000_000_000 / u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
    })
}

/// The boot-time and monotonic offsets of the daemon's time namespace, in ns
/// (/proc/self/timens_offsets; 0 in the host's): /proc and the daemon's clocks show times
/// shifted by them, the kernel's records do not.
fn timens_offsets() -> (i64, i64) {
    static NS: std::sync::OnceLock<(i64, i64)> = std::sync::OnceLock::new();
    *NS.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/self/timens_offsets").unwrap_or_default();
        (
            parse_offset(&text, "boottime"),
            parse_offset(&text, "monotonic"),
        )
    })
}

fn boottime_offset_ns() -> i64 {
    timens_offsets().0
}

fn monotonic_offset_ns() -> i64 {
    timens_offsets().1
}

fn parse_offset(text: &str, clock: &str) -> i64 {
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next()? == clock).then_some(())?;
            let secs: i64 = f.next()?.parse().ok()?;
            let nanos: i64 = f.next()?.parse().ok()?;
            Some(secs.saturating_mul(1_000_000_000).saturating_add(nanos))
        })
        .unwrap_or(0)
}

/// Whether a process the kernel says started at `start_ns` (ns since boot) is the one
/// /proc says started at `ticks` (clock ticks, as the daemon's time namespace sees them).
fn same_start(start_ns: u64, ticks: u64) -> bool {
    let seen = i128::from(start_ns) + i128::from(boottime_offset_ns());
    seen.max(0) as u64 / ns_per_tick() == ticks
}

/// Nanoseconds the host's boot-time clock is ahead of its monotonic clock now (the time
/// the machine was suspended).
fn suspended_ns() -> i128 {
    let now = |clock| {
        // SAFETY: clock_gettime fills the timespec it is given.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    };
    let boot = now(libc::CLOCK_BOOTTIME) - i128::from(boottime_offset_ns());
    let mono = now(libc::CLOCK_MONOTONIC) - i128::from(monotonic_offset_ns());
    (boot - mono).max(0)
}

/// Whether the process /proc says started at `ticks` (clock ticks since boot, as the
/// daemon's time namespace sees them) started after the kernel saw the socket's process
/// at `seen_ns` (CLOCK_MONOTONIC): then it is a later process that took the pid. A tick
/// rounds down, so the process seen is never taken for a later one; a later one that
/// started within the tick of `seen_ns` is not told apart.
fn started_after(ticks: u64, seen_ns: u64) -> bool {
    let started = i128::from(ticks) * i128::from(ns_per_tick()) - i128::from(boottime_offset_ns());
    started > i128::from(seen_ns) + suspended_ns()
}

/// A process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None
/// when it cannot be read (the process is gone).
fn start_ticks(proc_dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    stat_fields(&stat)?.1.nth(22 - 3)?.parse().ok()
}

/// A `stat` line of /proc (of a process or a thread): its name, and its fields from the
/// third (the state) on. The name is between the first `(` and the last `)`: it may hold
/// spaces and parentheses itself.
pub(crate) fn stat_fields(line: &str) -> Option<(&str, std::str::SplitAsciiWhitespace<'_>)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let name = line.get(open + 1..close)?;
    Some((name, line.get(close + 1..)?.split_ascii_whitespace()))
}

/// Resolves identities, caching per process for a short while (pids are reused).
///
/// It runs when a connection's end is first seen, on the capture thread: exe can only be
/// read while the process lives, so it is read at once. Every step costs a few system
/// calls and is cached (per process, per cgroup); a cgroup's path comes from its id by
/// handle, never from walking the cgroup tree (thousands of directories on a Kubernetes
/// node) unless the kernel cannot open cgroups by handle.
pub struct IdentityResolver {
    cgroup_root: Option<PathBuf>,
    /// The cgroup v2 mount, opened once, to open cgroups by handle.
    cgroup_mount_fd: Option<std::os::fd::OwnedFd>,
    cgroup_paths: HashMap<u64, String>,
    processes: HashMap<u32, Cached>,
    proc_root: PathBuf,
}

const PROCESS_TTL: Duration = Duration::from_secs(30);

impl IdentityResolver {
    pub fn new() -> Self {
        let cgroup_root = cgroup2_mount();
        let cgroup_mount_fd = cgroup_root.as_ref().and_then(|root| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY)
                .open(root)
                .ok()
                .map(std::os::fd::OwnedFd::from)
        });
        IdentityResolver {
            cgroup_mount_fd,
            cgroup_root,
            cgroup_paths: HashMap::new(),
            processes: HashMap::new(),
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// The identity of `tgid` as seen at a syscall with the given kernel facts; `task`:
    /// what an open record adds (its audit login uid and session id, which /proc is not
    /// asked for then; its start time, which tells this process from a later one that
    /// took its pid before /proc was read).
    pub fn resolve(
        &mut self,
        tgid: u32,
        comm: &str,
        uid: u32,
        cgroup_id: u64,
        task: TaskFacts,
    ) -> ProcessIdentity {
        let audit = task.audit;
        let logged_in = |v: u32| (v != u32::MAX).then_some(v); // (uid_t)-1: never logged in
        if let Some(c) = self.processes.get(&tgid) {
            if c.at.elapsed() < PROCESS_TTL
                && c.identity.cgroup_id == cgroup_id
                && c.identity.uid == uid
                && &*c.identity.comm == comm
                && (task.start_ns.is_none() || c.start_ns.is_none() || c.start_ns == task.start_ns)
                && (task.start_ns.is_some() || !c.started_after(task.seen_ns))
            {
                let mut id = c.identity.clone();
                if let Some((loginuid, sessionid)) = audit {
                    id.loginuid = logged_in(loginuid);
                    id.sessionid = logged_in(sessionid);
                }
                return id;
            }
        }
        let mut id = ProcessIdentity {
            pid: tgid,
            comm: crate::text::Text::lasting(comm),
            uid,
            cgroup_id,
            ..ProcessIdentity::default()
        };
        let proc_dir = self.proc_root.join(tgid.to_string());
        // The pid taken by a later process (this one exited first): nothing of /proc is
        // its. The kernel's start time tells, else the time the kernel saw the process: one
        // that started after it is not it.
        let ticks = (task.start_ns.is_some() || task.seen_ns.is_some())
            .then(|| start_ticks(&proc_dir))
            .flatten();
        let reused = match (task.start_ns, task.seen_ns, ticks) {
            (Some(ns), _, Some(ticks)) => !same_start(ns, ticks),
            (None, Some(seen), Some(ticks)) => started_after(ticks, seen),
            _ => false,
        };
        match std::fs::read_link(proc_dir.join("exe")) {
            _ if reused => {}
            Ok(p) => id.exe = crate::text::Text::lasting(&p.to_string_lossy()),
            // Ended before the daemon got here (a client that connected, ran its
            // statements and exited within one drain of the ring): said on its events.
            Err(_) if !proc_dir.exists() => id.gone = true,
            // A kernel thread, or no permission: no executable to name.
            Err(_) => {}
        }
        id.gone |= reused;
        match audit {
            Some((loginuid, sessionid)) => {
                id.loginuid = logged_in(loginuid);
                id.sessionid = logged_in(sessionid);
            }
            // Another process's login is not this one's.
            None if reused => {}
            None => {
                let audit_id = |file: &str| {
                    std::fs::read_to_string(proc_dir.join(file))
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok())
                        .and_then(logged_in)
                };
                id.loginuid = audit_id("loginuid");
                id.sessionid = audit_id("sessionid");
            }
        }
        // (By id first: a process's own cgroup file is read only when the id finds none.)
        let own = (!reused).then_some(proc_dir.as_path());
        id.cgroup_path =
            crate::text::Text::lasting(&self.cgroup_path(cgroup_id, own).unwrap_or_default());
        let facts = parse_cgroup_path(&id.cgroup_path);
        id.container_id = crate::text::Text::lasting(&facts.container_id);
        id.pod_uid = crate::text::Text::lasting(&facts.pod_uid);
        id.systemd_unit = crate::text::Text::lasting(&facts.systemd_unit);
        if self.processes.len() > 65536 {
            self.processes.retain(|_, c| c.at.elapsed() < PROCESS_TTL);
        }
        self.processes.insert(
            tgid,
            Cached {
                identity: id.clone(),
                start_ns: task.start_ns,
                proc_ticks: ticks,
                at: Instant::now(),
            },
        );
        id
    }

    /// The identity of `tgid` from /proc alone, for a record that left the kernel's facts
    /// out (RECORD_SAME_IDENTITY) where the daemon did not keep them (an end it let go of
    /// while idle): the process's cached identity while fresh, else its name, real uid and
    /// cgroup as /proc tells them now. A process gone meanwhile is known by its pid alone
    /// (no name, uid u32::MAX, cgroup 0).
    pub fn resolve_pid(&mut self, tgid: u32, seen_ns: Option<u64>) -> ProcessIdentity {
        if let Some(c) = self.processes.get(&tgid) {
            if c.at.elapsed() < PROCESS_TTL && !c.started_after(seen_ns) {
                return c.identity.clone();
            }
        }
        let proc_dir = self.proc_root.join(tgid.to_string());
        let comm = std::fs::read_to_string(proc_dir.join("comm")).unwrap_or_default();
        let uid = std::fs::read_to_string(proc_dir.join("status"))
            .ok()
            .and_then(|s| {
                let real = s.lines().find_map(|l| l.strip_prefix("Uid:"))?;
                real.split_whitespace().next()?.parse().ok()
            })
            .unwrap_or(u32::MAX);
        let cgroup_id = self
            .cgroup_root
            .as_ref()
            .and_then(|root| inode_of(root, &cgroup_of_proc(&proc_dir)?))
            .unwrap_or(0);
        self.resolve(
            tgid,
            comm.trim_end_matches('\n'),
            uid,
            cgroup_id,
            TaskFacts {
                seen_ns,
                ..TaskFacts::default()
            },
        )
    }

    /// The path of cgroup `id` (its directory's inode number under the v2 mount): cached;
    /// else opened by its handle; else the process's own cgroup (`proc_dir`, None when
    /// /proc is not the process's) if its inode is `id`; else, on kernels that cannot open
    /// cgroups by handle, a walk of the tree.
    fn cgroup_path(&mut self, id: u64, proc_dir: Option<&Path>) -> Option<String> {
        if let Some(p) = self.cgroup_paths.get(&id) {
            return Some(p.clone());
        }
        let root = self.cgroup_root.clone()?;
        let by_handle = self
            .cgroup_mount_fd
            .as_ref()
            .and_then(|fd| cgroup_path_by_handle(fd, &root, id));
        let found = match by_handle {
            Some(p) => p,
            None => {
                let own = || proc_dir.and_then(cgroup_of_proc);
                own()
                    .filter(|p| inode_of(&root, p) == Some(id))
                    .or_else(|| find_cgroup(&root, &root, id, 0))
                    .or_else(own)?
            }
        };
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

/// The path of cgroup `id` from its kernfs file handle (`open_by_handle_at`, which needs
/// CAP_DAC_READ_SEARCH): one open and one readlink.
fn cgroup_path_by_handle(mount: &std::os::fd::OwnedFd, root: &Path, id: u64) -> Option<String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    /// `struct file_handle` with the 8 bytes of a kernfs node id.
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: u32,
        handle_type: i32,
        id: [u8; 8],
    }
    const FILEID_KERNFS: i32 = 0xfe;
    let mut h = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id: id.to_ne_bytes(),
    };
    // SAFETY: `h` is a valid file_handle with 8 bytes of handle; the kernel reads it only.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&mut h as *mut KernfsHandle).cast::<libc::file_handle>(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor we just opened and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let rel = target.strip_prefix(root).ok()?;
    Some(format!("/{}", rel.to_string_lossy()))
}

fn inode_of(root: &Path, cgroup_path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(root.join(cgroup_path.trim_start_matches('/')))
        .ok()
        .map(|m| m.ino())
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

    /// Every cgroup this process can see resolves to its own path by handle (as root; the
    /// walk and /proc stand in otherwise, and are checked against the same answers).
    #[test]
    fn cgroup_paths_from_ids() {
        use std::os::unix::fs::MetadataExt;
        let Some(root) = cgroup2_mount() else {
            eprintln!("skipped: no cgroup v2 mount");
            return;
        };
        let mine = cgroup_of_proc(Path::new("/proc/self")).unwrap();
        let mut dirs = vec![
            ("/".to_string(), root.clone()),
            (mine.clone(), root.join(mine.trim_start_matches('/'))),
        ];
        for e in std::fs::read_dir(&root).unwrap().flatten().take(20) {
            if e.file_type().unwrap().is_dir() {
                dirs.push((format!("/{}", e.file_name().to_string_lossy()), e.path()));
            }
        }
        let mut r = IdentityResolver::new();
        let by_handle = r.cgroup_mount_fd.is_some() && unsafe { libc::geteuid() } == 0;
        for (want, dir) in dirs {
            let id = std::fs::metadata(&dir).unwrap().ino();
            if by_handle {
                let fd = r.cgroup_mount_fd.as_ref().unwrap();
                assert_eq!(
                    cgroup_path_by_handle(fd, &root, id).as_deref(),
                    Some(want.as_str())
                );
            }
            assert_eq!(
                find_cgroup(&root, &root, id, 0).as_deref(),
                Some(want.as_str())
            );
            assert_eq!(
                r.cgroup_path(id, Some(Path::new("/proc/self"))).as_deref(),
                Some(want.as_str())
            );
        }
        // An id that is no cgroup opens nothing.
        let none = u64::MAX - 7;
        if by_handle {
            let fd = r.cgroup_mount_fd.as_ref().unwrap();
            assert_eq!(cgroup_path_by_handle(fd, &root, none), None);
        }
    }

    /// What /proc says of this very process is what the kernel facts of its records would
    /// say (name, real uid, cgroup id), and a cached identity is taken as it is.
    #[test]
    fn identity_from_proc_alone() {
        use std::os::unix::fs::MetadataExt;
        let me = std::process::id();
        let mut r = IdentityResolver::new();
        let id = r.resolve_pid(me, None);
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        assert_eq!(id.pid, me);
        assert_eq!(&*id.comm, comm.trim_end());
        assert_eq!(id.uid, unsafe { libc::getuid() });
        if let Some(root) = cgroup2_mount() {
            let mine = cgroup_of_proc(Path::new("/proc/self")).unwrap();
            let ino = std::fs::metadata(root.join(mine.trim_start_matches('/')))
                .unwrap()
                .ino();
            assert_eq!(id.cgroup_id, ino);
            assert_eq!(&*id.cgroup_path, mine.as_str());
        }
        assert!(!id.exe.is_empty());
        // Cached: the same answer without /proc.
        r.proc_root = PathBuf::from("/nonexistent");
        assert_eq!(r.resolve_pid(me, None).comm, id.comm);
        // A process /proc does not know: its pid alone.
        let gone = r.resolve_pid(u32::MAX - 1, None);
        assert_eq!(
            (gone.pid, &*gone.comm, gone.uid, gone.cgroup_id),
            (u32::MAX - 1, "", u32::MAX, 0)
        );
    }

    #[test]
    fn a_process_gone_before_its_lookup_is_said_so_and_keeps_the_kernels_audit_ids() {
        // A client that exited before the daemon read /proc: no executable, said so; its
        // login uid and session are those its open record carried.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let mut r = IdentityResolver::new();
        let audit = |a: (u32, u32)| TaskFacts {
            audit: Some(a),
            ..TaskFacts::default()
        };
        let id = r.resolve(pid, "true", 1000, 1, audit((1000, 7)));
        assert!(id.gone);
        assert_eq!(&*id.exe, "");
        assert_eq!((id.loginuid, id.sessionid), (Some(1000), Some(7)));
        // A live one: its executable, not gone; the kernel's "never logged in" (u32::MAX)
        // is taken over whatever /proc says, in a fresh lookup and from the cache.
        let me = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let unset = audit((u32::MAX, u32::MAX));
        let id = r.resolve(me, comm.trim_end(), 0, 2, unset);
        assert!(!id.gone);
        assert_eq!(&*id.exe, exe.to_string_lossy());
        assert_eq!((id.loginuid, id.sessionid), (None, None));
        let cached = r.resolve(me, comm.trim_end(), 0, 2, audit((42, 43)));
        assert_eq!((cached.loginuid, cached.sessionid), (Some(42), Some(43)));
        assert_eq!(&*cached.exe, exe.to_string_lossy());
    }

    #[test]
    fn time_namespace_offsets() {
        let host = "monotonic           0         0\nboottime            0         0\n";
        assert_eq!(parse_offset(host, "boottime"), 0);
        let shifted = "monotonic 5 0\nboottime -86400 250\n";
        assert_eq!(parse_offset(shifted, "boottime"), -86_400_000_000_000 + 250);
        assert_eq!(parse_offset(shifted, "monotonic"), 5_000_000_000);
        assert_eq!(parse_offset("", "boottime"), 0);
        assert_eq!(parse_offset("boottime x y", "boottime"), 0);
    }

    #[test]
    fn a_pid_another_process_took_is_not_read_as_the_one_that_connected() {
        let me = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        // The kernel's start (ns since boot), as /proc gives it (in ticks, shifted by this
        // time namespace's boot-time offset).
        let ticks = start_ticks(Path::new("/proc/self")).unwrap();
        let kernel_ns =
            (i128::from(ticks * ns_per_tick()) - i128::from(boottime_offset_ns())) as u64;
        let at = |ns: u64| TaskFacts {
            start_ns: Some(ns),
            ..TaskFacts::default()
        };
        // Started when /proc says (the kernel's ns, within the tick): this process.
        let mut r = IdentityResolver::new();
        let id = r.resolve(me, comm.trim_end(), 0, 2, at(kernel_ns + 7));
        assert!(!id.gone);
        assert_eq!(&*id.exe, exe.to_string_lossy());
        // A process that started a second earlier had this pid: it is gone, and this one's
        // executable is not its.
        let mut r = IdentityResolver::new();
        let earlier = kernel_ns.saturating_sub(1_000_000_000);
        let id = r.resolve(me, comm.trim_end(), 0, 2, at(earlier));
        assert!(id.gone);
        assert_eq!(&*id.exe, "");
        // Cached by its start: the same pid with the right start is read afresh.
        let id = r.resolve(me, comm.trim_end(), 0, 2, at(kernel_ns));
        assert!(!id.gone);
        assert_eq!(&*id.exe, exe.to_string_lossy());
    }

    #[test]
    fn without_an_open_record_a_process_started_after_the_socket_was_seen_is_not_it() {
        let me = std::process::id();
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let mono_now =
            (i128::from(crate::tracker::monotonic_ns()) - i128::from(monotonic_offset_ns())) as u64;
        let seen = |ns: u64| TaskFacts {
            seen_ns: Some(ns),
            ..TaskFacts::default()
        };
        // Seen now: this process (it started before).
        let mut r = IdentityResolver::new();
        let id = r.resolve(me, comm.trim_end(), 0, 2, seen(mono_now));
        assert!(!id.gone);
        assert_eq!(&*id.exe, exe.to_string_lossy());
        // Seen a minute before this process started (what a record of the process that
        // had the pid before says): not this one; nothing of /proc is used, and the
        // cached identity is not taken for it either.
        let ticks = start_ticks(Path::new("/proc/self")).unwrap();
        let started_mono = (i128::from(ticks * ns_per_tick())
            - i128::from(boottime_offset_ns())
            - suspended_ns()) as u64;
        let before = started_mono.saturating_sub(60_000_000_000);
        assert!(started_after(ticks, before));
        assert!(!started_after(ticks, started_mono + ns_per_tick()));
        let id = r.resolve(me, comm.trim_end(), 0, 2, seen(before));
        assert!(id.gone);
        assert_eq!(&*id.exe, "");
        let id = r.resolve_pid(me, Some(before));
        assert!(id.gone);
        // And seen now again: read afresh, this process.
        let id = r.resolve(me, comm.trim_end(), 0, 2, seen(mono_now));
        assert!(!id.gone);
        assert_eq!(&*id.exe, exe.to_string_lossy());
        // A different uid than the one cached: read afresh, not taken from the cache.
        let id = r.resolve(me, comm.trim_end(), 5, 2, seen(mono_now));
        assert_eq!(id.uid, 5);
    }

    #[test]
    fn backend_titles() {
        let p = parse_backend_title;
        let ok = |u: &str, d: &str| Some((u.to_string(), d.to_string()));
        assert_eq!(
            p("postgres: alice shop 127.0.0.1(43210) idle", Some(43210)),
            ok("alice", "shop")
        );
        assert_eq!(
            p("postgres: alice shop ::1(5) SELECT", None),
            ok("alice", "shop")
        );
        assert_eq!(
            p(
                "postgres: main: alice shop 10.0.0.2(41000) idle in transaction",
                Some(41000)
            ),
            ok("alice", "shop")
        );
        assert_eq!(
            p("postgres: bob app [local] idle", Some(0)),
            ok("bob", "app")
        );
        // Another connection's backend (the pid was reused), names with spaces, other
        // processes, titles turned off.
        assert_eq!(
            p("postgres: alice shop 127.0.0.1(43211) idle", Some(43210)),
            None
        );
        assert_eq!(p("postgres: my user shop 127.0.0.1(1) idle", None), None);
        assert_eq!(p("postgres: checkpointer", None), None);
        assert_eq!(p("postgres: walwriter ", None), None);
        assert_eq!(
            p("/usr/lib/postgresql/15/bin/postgres -D /var/lib/pg", None),
            None
        );
    }

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
