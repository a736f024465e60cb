//! The proxy in workloads' own network namespaces.
//!
//! The redirect sends a connection to the proxy port on the loopback address of the
//! client's network namespace, and a pod's (or any container's) 127.0.0.1 is its own, not
//! the host's. So the daemon listens inside each namespace that has redirected workloads,
//! as Istio ambient's node proxy does: a thread of the daemon enters the namespace
//! (`setns`), opens the listeners there and stays, making the upstream sockets of that
//! namespace's connections, so that the proxy reaches the server exactly as the client
//! would have (the namespace's routes, addresses and loopback; the server sees the
//! workload's address). Listening sockets keep a namespace alive, so a namespace whose
//! redirected processes are all gone loses its listeners at the next look.
//!
//! Until the daemon has looked at a new workload (every [`super::SCAN_EVERY`]), its
//! namespace may have no listener: its connections are then refused, never let through.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpSocket;

use super::{conn, Shared};

/// How long after failing to listen in a namespace the daemon tries again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// A socket for one upstream connection, made in the listener's namespace.
struct Request {
    dest: SocketAddr,
    reply: tokio::sync::oneshot::Sender<std::io::Result<(TcpSocket, SocketAddr)>>,
}

/// Where a listener is: what its connections need to know of their namespace.
pub struct Place {
    /// The namespace's inode (`ns.inum`, as the capture's tuples carry it).
    pub inum: u32,
    /// The low half of its cookie (the key of the redirect's records, see `PeerKey`).
    pub cookie: u32,
    /// The host's namespace (the daemon's own): upstream sockets are made in place.
    pub host: bool,
    factory: Option<std::sync::mpsc::Sender<Request>>,
}

impl Place {
    /// A socket towards `dest`, bound to the source address the namespace routes from
    /// (registered by the caller before it connects).
    pub async fn upstream_socket(
        &self,
        dest: SocketAddr,
    ) -> std::io::Result<(TcpSocket, SocketAddr)> {
        let Some(factory) = &self.factory else {
            return upstream_socket(dest);
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        factory
            .send(Request { dest, reply })
            .map_err(|_| std::io::Error::other("the namespace's thread is gone"))?;
        answer
            .await
            .map_err(|_| std::io::Error::other("the namespace's thread is gone"))?
    }
}

/// The source address a socket of this thread's namespace would use towards `dest` (a
/// UDP socket's connect picks the route; nothing is sent).
fn source_for(dest: SocketAddr) -> Option<IpAddr> {
    if dest.ip().is_loopback() {
        return Some(dest.ip());
    }
    let bind: SocketAddr = match dest {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(dest).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// An unconnected socket of this thread's namespace, bound to its source towards `dest`.
fn upstream_socket(dest: SocketAddr) -> std::io::Result<(TcpSocket, SocketAddr)> {
    let source = source_for(dest).ok_or_else(|| std::io::Error::other("no route to the server"))?;
    let socket = match dest {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let local = socket.local_addr()?;
    Ok((socket, local))
}

/// The cookie of the namespace `socket` is in (`SO_NETNS_COOKIE`, Linux 5.14).
pub(crate) fn netns_cookie(socket: &impl AsRawFd) -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an 8-byte buffer whose length is passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The inode of the namespace of `/proc/<pid>/ns/net` (`self` for the daemon's).
fn inode_of(ns: &Path) -> Option<u64> {
    std::fs::metadata(ns).ok().map(|m| m.ino())
}

/// The listeners on 127.0.0.1 and ::1 (`port`; 0 for any free one; ::1 optional, a
/// namespace may have no IPv6), made in the calling thread's namespace.
pub fn bind_listeners(
    port: u16,
) -> std::io::Result<(std::net::TcpListener, Option<std::net::TcpListener>)> {
    let v4 = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    let port = v4.local_addr()?.port();
    v4.set_nonblocking(true)?;
    let v6 = match std::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
        Ok(l) => {
            l.set_nonblocking(true)?;
            Some(l)
        }
        Err(e) => {
            tracing::debug!("proxy: not listening on [::1]:{port} ({e})");
            None
        }
    };
    Ok((v4, v6))
}

/// The daemon's own namespace, as a place.
pub fn host_place(v4: &std::net::TcpListener) -> Place {
    Place {
        inum: inode_of(Path::new("/proc/self/ns/net")).unwrap_or(0) as u32,
        cookie: netns_cookie(v4).unwrap_or(0) as u32,
        host: true,
        factory: None,
    }
}

type Bound = (std::net::TcpListener, Option<std::net::TcpListener>, u64);

/// Enters the namespace of `pid` on a thread of its own, listens there on `port`, and
/// keeps the thread to make that namespace's upstream sockets (it ends when the place is
/// dropped).
fn enter(pid: u32, inode: u64, port: u16) -> std::io::Result<(Place, Bound)> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    if ns.metadata()?.ino() != inode {
        return Err(std::io::Error::other("the process left the namespace"));
    }
    let (bound_tx, bound_rx) = std::sync::mpsc::channel::<std::io::Result<Bound>>();
    let (requests, incoming) = std::sync::mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name(format!("auditor-netns-{inode}"))
        .spawn(move || {
            // SAFETY: a namespace file descriptor; setns moves only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let _ = bound_tx.send(Err(std::io::Error::last_os_error()));
                return;
            }
            drop(ns);
            let bound = bind_listeners(port).and_then(|(v4, v6)| {
                let cookie = netns_cookie(&v4)?;
                Ok((v4, v6, cookie))
            });
            let failed = bound.is_err();
            let _ = bound_tx.send(bound);
            if failed {
                return;
            }
            while let Ok(r) = incoming.recv() {
                let _ = r.reply.send(upstream_socket(r.dest));
            }
        })?;
    let bound = bound_rx
        .recv()
        .map_err(|_| std::io::Error::other("the namespace's thread ended"))??;
    let place = Place {
        inum: inode as u32,
        cookie: bound.2 as u32,
        host: false,
        factory: Some(requests),
    };
    Ok((place, bound))
}

struct Listening {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        // The listeners close with their accept loops; connections already accepted go
        // on (each holds its place).
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The proxy's listeners in workloads' namespaces, kept by the daemon's main loop.
pub struct Namespaces {
    workers: Arc<super::Workers>,
    shared: Arc<Shared>,
    port: u16,
    own: Option<u64>,
    listening: HashMap<u64, Listening>,
    /// Namespaces where listening failed, and when (warned once, tried again later).
    failed: HashMap<u64, Instant>,
}

impl Namespaces {
    /// The runtime of the proxy's first thread (where listeners are served).
    pub fn first_runtime(&self) -> &tokio::runtime::Handle {
        self.workers.first()
    }

    pub fn new(workers: Arc<super::Workers>, shared: Arc<Shared>, port: u16) -> Namespaces {
        Namespaces {
            workers,
            shared,
            port,
            own: inode_of(Path::new("/proc/self/ns/net")),
            listening: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// Namespaces the proxy listens in besides the host's.
    pub fn count(&self) -> usize {
        self.listening.len()
    }

    /// Namespaces where listening failed (until tried again).
    pub fn refused(&self) -> usize {
        self.failed.len()
    }

    /// Listens in the namespaces of `pids` (the processes of redirected cgroups) where it
    /// does not yet, and stops listening in those none of them is in any more.
    pub fn update(&mut self, pids: impl IntoIterator<Item = u32>) {
        let mut seen: HashMap<u64, u32> = HashMap::new();
        for pid in pids {
            if let Some(ino) = inode_of(Path::new(&format!("/proc/{pid}/ns/net"))) {
                if Some(ino) != self.own {
                    seen.entry(ino).or_insert(pid);
                }
            }
        }
        self.listening.retain(|ino, _| seen.contains_key(ino));
        self.failed
            .retain(|ino, at| seen.contains_key(ino) && at.elapsed() < RETRY_AFTER);
        for (ino, pid) in seen {
            if self.listening.contains_key(&ino) || self.failed.contains_key(&ino) {
                continue;
            }
            let entered = enter(pid, ino, self.port).and_then(|(place, (v4, v6, c))| {
                // The redirect sends the namespace's connections here only from now on.
                let added = match self.shared.maps.lock() {
                    Ok(mut m) => m.add_listeners(&v4, v6.as_ref()),
                    Err(_) => Err("the redirect's maps are unusable".to_string()),
                };
                added
                    .map(|()| (place, (v4, v6, c)))
                    .map_err(|e| std::io::Error::other(format!("registering its listeners: {e}")))
            });
            match entered {
                Ok((place, (v4, v6, _))) => {
                    tracing::info!(
                        "proxy: listening on 127.0.0.1:{} in network namespace {ino} (of pid {pid})",
                        self.port
                    );
                    let place = Arc::new(place);
                    let tasks = [Some(v4), v6]
                        .into_iter()
                        .flatten()
                        .map(|l| {
                            let shared = self.shared.clone();
                            let place = place.clone();
                            let workers = self.workers.clone();
                            self.workers.first().spawn(async move {
                                match tokio::net::TcpListener::from_std(l) {
                                    Ok(l) => conn::accept_loop(l, place, shared, workers).await,
                                    Err(e) => tracing::error!("proxy listener: {e}"),
                                }
                            })
                        })
                        .collect();
                    self.listening.insert(ino, Listening { tasks });
                }
                Err(e) => {
                    tracing::warn!(
                        "proxy: cannot listen in network namespace {ino} (of pid {pid}): {e}; \
                         its enforced workloads' connections are refused"
                    );
                    self.failed.insert(ino, Instant::now());
                }
            }
        }
    }
}
