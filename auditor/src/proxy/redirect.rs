//! The kernel side of enforcement: the redirect programs (`auditor-ebpf/src/redirect.rs`)
//! attached at the cgroup v2 root, and the maps the daemon and its proxy share with them.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use auditor_common::{OrigDst, PeerKey, ProxyPeerKey, RedirectConfig};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, SockHash},
    programs::{links::CgroupAttachMode, CgroupSockAddr, SockOps},
    Ebpf,
};

const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    "redirect_connect4",
    "redirect_connect6",
    "redirect_getpeername4",
    "redirect_getpeername6",
];
const SOCK_OPS_PROGRAM: &str = "redirect_sock_ops";
/// The programs whose links are pinned, so that they stay attached when the daemon stops
/// (a restart, a crash): enforced workloads' connections are then refused, not let through.
const PINNED_LINKS: [&str; 2] = ["redirect_connect4", "redirect_connect6"];
/// The maps the programs of successive daemons share (pinned by name in the pin directory).
pub const PINNED_MAPS: [&str; 4] = ["ENFORCED", "REDIRECT", "ORIG_BY_COOKIE", "ORIG_BY_PEER"];

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Makes `dir` usable for pins: bpffs mounted at /sys/fs/bpf (mounted here if it is not,
/// as systemd does at boot), the directory created.
pub fn prepare_pin_dir(dir: &Path) -> Result<(), String> {
    ensure_bpffs(dir)?;
    std::fs::create_dir_all(dir.join("links")).map_err(|e| format!("{}: {e}", dir.display()))
}

/// Checks that `dir` is under /sys/fs/bpf and that bpffs is mounted there (mounting it if
/// not, as systemd does at boot).
pub fn ensure_bpffs(dir: &Path) -> Result<(), String> {
    let bpffs = Path::new("/sys/fs/bpf");
    if !dir.starts_with(bpffs) {
        return Err(format!("{} is not under /sys/fs/bpf", dir.display()));
    }
    if !is_bpffs(bpffs) {
        if let Err(e) = crate::capture::mount_fs(c"bpf", c"/sys/fs/bpf") {
            return Err(format!(
                "bpffs is not mounted at /sys/fs/bpf and mounting it failed: {e}"
            ));
        }
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a zeroed statfs the call fills.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Removes the pins of `dir` (`auditor detach`): the pinned programs detach, the maps go
/// when nothing uses them. Returns what was removed.
pub fn detach(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for name in PINNED_LINKS {
        let p = dir.join("links").join(name);
        if p.exists() {
            std::fs::remove_file(&p)?;
            removed.push(p);
        }
    }
    for name in PINNED_MAPS {
        let p = dir.join(name);
        if p.exists() {
            std::fs::remove_file(&p)?;
            removed.push(p);
        }
    }
    let _ = std::fs::remove_dir(dir.join("links"));
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("no cgroup v2 hierarchy is mounted: the redirect attaches at its root")]
    NoCgroup2,
    #[error("opening the cgroup v2 root {path}: {source}")]
    Cgroup {
        path: String,
        source: std::io::Error,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: String,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {detail}")]
    Map { name: &'static str, detail: String },
}

fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, RedirectError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::Map {
        name,
        detail: "missing from the object".into(),
    })?;
    M::try_from(map).map_err(|e| RedirectError::Map {
        name,
        detail: e.to_string(),
    })
}

/// What the proxy needs of the kernel: where a connection it accepted was going, and the
/// registration of its own upstream sockets (never captured, never redirected).
pub struct RedirectMaps {
    by_peer: BpfHashMap<MapData, PeerKey, OrigDst>,
    proxy_peers: BpfHashMap<MapData, ProxyPeerKey, u8>,
    /// The proxy's listeners, by namespace (see `PROXY_LISTENERS` in the programs): a
    /// namespace is redirected into only while this daemon's listener holds the port there.
    listeners: SockHash<MapData, u64>,
}

impl RedirectMaps {
    /// The original destination and caller of the redirected connection whose client
    /// port (as the proxy sees it) is `port`; the entry is consumed.
    pub fn take_origin(&mut self, port: u16, netns_cookie: u32) -> Option<OrigDst> {
        let key = PeerKey {
            port: u32::from(port),
            netns: netns_cookie,
        };
        let orig = self.by_peer.get(&key, 0).ok()?;
        let _ = self.by_peer.remove(&key);
        Some(orig)
    }

    /// Registers an upstream socket's local address (`netns`: its namespace's inode for
    /// a loopback address, else 0; see `ProxyPeerKey`).
    pub fn add_upstream(&mut self, local: SocketAddr, netns: u32) -> Result<(), String> {
        self.proxy_peers
            .insert(peer_key(local, netns), 1, 0)
            .map_err(|e| e.to_string())
    }

    pub fn remove_upstream(&mut self, local: SocketAddr, netns: u32) {
        let _ = self.proxy_peers.remove(&peer_key(local, netns));
    }

    /// Lets the redirect send connections of `v4`'s network namespace to these listeners
    /// (`v6` takes those of IPv6 destinations): until then, and once they close, the
    /// namespace's enforced connections are refused.
    pub fn add_listeners(
        &mut self,
        v4: &std::net::TcpListener,
        v6: Option<&std::net::TcpListener>,
    ) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let netns = super::netns::netns_cookie(v4).map_err(|e| format!("its namespace: {e}"))?;
        for (l, bit) in [(Some(v4), 0u64), (v6, 1)] {
            let Some(l) = l else { continue };
            self.listeners
                .insert((netns << 1) | bit, l.as_raw_fd(), 0)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn peer_key(a: SocketAddr, netns: u32) -> ProxyPeerKey {
    let addr = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    ProxyPeerKey {
        addr,
        port: a.port(),
        _pad: 0,
        netns,
    }
}

/// The attached redirect: the verdict per cgroup, kept by the daemon's main loop.
pub struct Redirect {
    enforced: BpfHashMap<MapData, u64, u8>,
    config: Array<MapData, RedirectConfig>,
    /// What the kernel map holds, to write only changes.
    verdicts: HashMap<u64, u8>,
    /// Where the links and maps are pinned, if they are.
    pins: Option<PathBuf>,
    links: Vec<aya::programs::links::PinnedLink>,
    pub root: PathBuf,
    pub maps: Arc<Mutex<RedirectMaps>>,
}

impl Redirect {
    /// Loads and attaches the programs at the cgroup v2 root. Nothing is redirected until
    /// [`Redirect::configure`] names the proxy's port and cgroups get a verdict.
    /// With `pins` (prepared by [`prepare_pin_dir`], and the maps loaded from it): the
    /// links of connect4/6 are pinned there, replacing (detaching) those of the daemon
    /// before, once the new ones are attached.
    pub fn attach(ebpf: &mut Ebpf, pins: Option<&Path>) -> Result<Redirect, RedirectError> {
        let root = crate::workload::cgroup2_mount().ok_or(RedirectError::NoCgroup2)?;
        let cgroup = std::fs::File::open(&root).map_err(|source| RedirectError::Cgroup {
            path: root.display().to_string(),
            source,
        })?;
        let program_err = |name: &str| {
            let name = name.to_string();
            move |source| RedirectError::Program { name, source }
        };
        // The maps first: nothing acts before the programs attach, and they act only on
        // cgroups with a verdict once the proxy's port is set.
        let enforced = take(ebpf, "ENFORCED")?;
        let config = take(ebpf, "REDIRECT")?;
        let by_peer = take(ebpf, "ORIG_BY_PEER")?;
        let proxy_peers = take(ebpf, "PROXY_PEERS")?;
        let listeners = take(ebpf, "PROXY_LISTENERS")?;
        let mut links = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
                .and_then(|p| p.try_into())
                .map_err(program_err(name))?;
            p.load().map_err(program_err(name))?;
            let id = p
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
            let Some(dir) = pins.filter(|_| PINNED_LINKS.contains(&name)) else {
                continue;
            };
            let link = p.take_link(id).map_err(program_err(name))?;
            let fd: aya::programs::links::FdLink =
                link.try_into()
                    .map_err(|e: aya::programs::links::LinkError| RedirectError::Map {
                        name: "link",
                        detail: format!("{name}: {e}"),
                    })?;
            let path = dir.join("links").join(name);
            if path.exists() {
                // The previous daemon's link: detached now that this one runs.
                match aya::programs::links::PinnedLink::from_pin(&path) {
                    Ok(old) => drop(old.unpin()),
                    Err(_) => drop(std::fs::remove_file(&path)),
                }
            }
            let pinned = fd.pin(&path).map_err(|e| RedirectError::Map {
                name: "link",
                detail: format!("pinning {}: {e}", path.display()),
            })?;
            links.push(pinned);
        }
        let p: &mut SockOps = ebpf
            .program_mut(SOCK_OPS_PROGRAM)
            .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
            .and_then(|p| p.try_into())
            .map_err(program_err(SOCK_OPS_PROGRAM))?;
        p.load().map_err(program_err(SOCK_OPS_PROGRAM))?;
        p.attach(&cgroup, CgroupAttachMode::Single)
            .map_err(program_err(SOCK_OPS_PROGRAM))?;
        Ok(Redirect {
            enforced,
            config,
            verdicts: HashMap::new(),
            pins: pins.map(Path::to_path_buf),
            links,
            root,
            maps: Arc::new(Mutex::new(RedirectMaps {
                by_peer,
                proxy_peers,
                listeners,
            })),
        })
    }

    /// Where the proxy listens (0: nowhere, and enforced connections are refused), and
    /// whether cgroups without a verdict go to it.
    pub fn configure(&mut self, proxy_port: u16, redirect_unknown: bool) -> Result<(), String> {
        let cfg = RedirectConfig {
            proxy_port,
            redirect_unknown: redirect_unknown as u8,
            _pad: [0; 5],
        };
        self.config.set(0, cfg, 0).map_err(|e| e.to_string())
    }

    /// Makes the kernel's verdicts these (cgroup id -> redirect or not); cgroups not
    /// listed lose theirs. Returns how many changed.
    pub fn set_verdicts(&mut self, verdicts: &HashMap<u64, bool>) -> usize {
        let mut changed = 0;
        let gone: Vec<u64> = self
            .verdicts
            .keys()
            .filter(|id| !verdicts.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            let _ = self.enforced.remove(&id);
            self.verdicts.remove(&id);
            changed += 1;
        }
        for (&id, &redirect) in verdicts {
            let v = redirect as u8;
            if self.verdicts.get(&id) == Some(&v) {
                continue;
            }
            match self.enforced.insert(id, v, 0) {
                Ok(()) => {
                    self.verdicts.insert(id, v);
                    changed += 1;
                }
                Err(e) => tracing::warn!("redirect verdict for cgroup {id}: {e}"),
            }
        }
        changed
    }

    /// At the daemon's stop. `keep_enforcing` (an enforce policy is in force, and the links
    /// are pinned): the links stay and refuse enforced workloads' connections until the
    /// next daemon takes over (nothing listens for them meanwhile); else everything is
    /// detached and unpinned.
    pub fn release(self, keep_enforcing: bool) {
        let Some(dir) = &self.pins else { return };
        if keep_enforcing {
            let mut config = self.config;
            let cfg = RedirectConfig {
                proxy_port: 0,
                redirect_unknown: 1,
                _pad: [0; 5],
            };
            if let Err(e) = config.set(0, cfg, 0) {
                tracing::warn!("redirect: could not switch to refusing at stop: {e}");
            }
            tracing::info!(
                "enforcement holds while the daemon is stopped: connections of enforced (and \
                 new) workloads to Postgres are refused until it starts again (`auditor detach` \
                 lifts this)"
            );
            return;
        }
        drop(self.links);
        match detach(dir) {
            Ok(removed) => tracing::info!(
                "redirect detached (no enforce policy in force): {} pins removed from {}",
                removed.len(),
                dir.display()
            ),
            Err(e) => tracing::warn!("redirect: removing the pins in {}: {e}", dir.display()),
        }
    }

    /// How many cgroups are redirected now.
    pub fn redirected_cgroups(&self) -> usize {
        self.verdicts.values().filter(|v| **v == 1).count()
    }
}

/// Every cgroup under `root` (the root included): (cgroup id, path relative to the root,
/// as /proc/PID/cgroup shows it).
pub fn cgroups(root: &Path) -> Vec<(u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::from("/"))];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        out.push((meta.ino(), rel.clone()));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let name = e.file_name().to_string_lossy().into_owned();
                let child = if rel == "/" {
                    format!("/{name}")
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((e.path(), child));
            }
        }
    }
    out
}

/// The processes of the cgroup at `path` (relative to `root`, as [`cgroups`] gives it).
pub fn pids_of(root: &Path, path: &str) -> Vec<u32> {
    let dir = root.join(path.trim_start_matches('/'));
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}
