//! The kernel side of enforcement: the redirect programs (`auditor-ebpf/src/redirect.rs`)
//! attached at the cgroup v2 root, and the maps the daemon and its proxy share with them.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use auditor_common::{EndpointKey, OrigDst, PeerKey, RedirectConfig};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData},
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
    proxy_peers: BpfHashMap<MapData, EndpointKey, u8>,
}

impl RedirectMaps {
    /// The original destination and caller of the redirected connection whose client
    /// port (as the proxy sees it) is `port`; the entry is consumed.
    pub fn take_origin(&mut self, port: u16) -> Option<OrigDst> {
        let key = PeerKey {
            port: u32::from(port),
            netns: 0,
        };
        let orig = self.by_peer.get(&key, 0).ok()?;
        let _ = self.by_peer.remove(&key);
        Some(orig)
    }

    pub fn add_upstream(&mut self, local: SocketAddr) -> Result<(), String> {
        self.proxy_peers
            .insert(endpoint_key(local), 1, 0)
            .map_err(|e| e.to_string())
    }

    pub fn remove_upstream(&mut self, local: SocketAddr) {
        let _ = self.proxy_peers.remove(&endpoint_key(local));
    }
}

fn endpoint_key(a: SocketAddr) -> EndpointKey {
    let addr = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    EndpointKey {
        addr,
        port: a.port(),
        _pad: [0; 6],
    }
}

/// The attached redirect: the verdict per cgroup, kept by the daemon's main loop.
pub struct Redirect {
    enforced: BpfHashMap<MapData, u64, u8>,
    config: Array<MapData, RedirectConfig>,
    /// What the kernel map holds, to write only changes.
    verdicts: HashMap<u64, u8>,
    pub root: PathBuf,
    pub maps: Arc<Mutex<RedirectMaps>>,
}

impl Redirect {
    /// Loads and attaches the programs at the cgroup v2 root. Nothing is redirected until
    /// [`Redirect::configure`] names the proxy's port and cgroups get a verdict.
    pub fn attach(ebpf: &mut Ebpf) -> Result<Redirect, RedirectError> {
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
        for name in SOCK_ADDR_PROGRAMS {
            let p: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(aya::programs::ProgramError::UnexpectedProgramType)
                .and_then(|p| p.try_into())
                .map_err(program_err(name))?;
            p.load().map_err(program_err(name))?;
            p.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(program_err(name))?;
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
            root,
            maps: Arc::new(Mutex::new(RedirectMaps {
                by_peer,
                proxy_peers,
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
