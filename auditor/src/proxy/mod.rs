//! The inline proxy of enforced workloads.
//!
//! Connections of cgroups that may be under an `enforce` policy are redirected in the
//! kernel ([`redirect`]) to the proxy's listener on the loopback address; the proxy finds
//! where each was going and who made it (by the client's port, from the redirect's map),
//! connects there itself, and relays ([`relay`]): statements its policies refuse never
//! reach the server. It records each session once, as the capture path would (the
//! client's bytes as sent and what it received go to the tracker as `capture = proxy`
//! records); its own upstream sockets are neither captured nor redirected.
//!
//! The proxy runs on threads of its own ([`Workers`]), each with a single-threaded tokio
//! runtime: a connection lives on one thread, so a message relayed costs no wakeup of
//! another thread. The daemon's main loop keeps the redirect's verdicts (which cgroups)
//! and drains the proxy's records.

pub mod conn;
pub mod copy;
pub mod detect;
mod hold;
pub mod login;
pub mod mask;
pub mod netns;
pub mod redirect;
pub mod relay;
pub mod tls;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
};

use auditor_common::RecordHeader;

use crate::{
    pg::{BufferBudget, TokenizerLimits},
    policy::{Defaults, PolicySet},
};

/// The kind of a proxy record carrying a note on a held statement (JSON
/// `approvals::Note`); never a kernel record's kind.
pub const RECORD_NOTE: u32 = 0x100;

/// The kind of a proxy record saying what the proxy masked in a result (JSON
/// [`MaskTally`]), placed in the session's stream just before the message that ends the
/// result.
pub const RECORD_MASKED: u32 = 0x101;

/// What the proxy masked in one result: the masked columns (`schema.table.column`) and
/// how many values of each. Never the values.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MaskTally {
    pub columns: Vec<String>,
    pub values: Vec<u64>,
}

/// A record the proxy makes for the tracker: the same shape the kernel's ring buffer
/// carries (`stream = STREAM_PROXY`).
pub struct ProxyRecord {
    pub header: RecordHeader,
    pub data: Vec<u8>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize, Clone, Copy)]
pub struct ProxyStats {
    pub connections: u64,
    pub active: u64,
    pub enforced_sessions: u64,
    pub blocked: u64,
    /// Connections to the proxy's port that the redirect did not send (refused).
    pub unknown_origin: u64,
    /// Redirected connections whose server could not be reached.
    pub upstream_failures: u64,
    pub redirected_cgroups: u64,
    /// Network namespaces besides the host's the proxy listens in.
    #[serde(default)]
    pub namespaces: u64,
    /// Network namespaces of redirected workloads where the proxy cannot listen (its port
    /// is taken there): their enforced connections are refused; tried again every 30 s.
    #[serde(default)]
    pub namespaces_refused: u64,
    /// Values the proxy masked in results.
    #[serde(default)]
    pub masked_values: u64,
    /// Statements held for approval.
    #[serde(default)]
    pub held: u64,
    /// Requests waiting for a decision now.
    #[serde(default)]
    pub pending_approvals: u64,
    /// New requests announced to the webhook, and those it did not take.
    #[serde(default)]
    pub webhook_sent: u64,
    #[serde(default)]
    pub webhook_failed: u64,
    /// 1 while the shared approvals store cannot be reached.
    #[serde(default)]
    pub approvals_store_down: u64,
}

#[derive(Default)]
pub struct ProxyCounters {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub enforced_sessions: AtomicU64,
    pub blocked: AtomicU64,
    pub unknown_origin: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub masked_values: AtomicU64,
    pub held: AtomicU64,
}

impl ProxyCounters {
    pub fn stats(&self) -> ProxyStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            connections: g(&self.connections),
            active: g(&self.active),
            enforced_sessions: g(&self.enforced_sessions),
            blocked: g(&self.blocked),
            unknown_origin: g(&self.unknown_origin),
            upstream_failures: g(&self.upstream_failures),
            masked_values: g(&self.masked_values),
            held: g(&self.held),
            pending_approvals: 0,
            webhook_sent: 0,
            webhook_failed: 0,
            approvals_store_down: 0,
            redirected_cgroups: 0,
            namespaces: 0,
            namespaces_refused: 0,
        }
    }
}

/// What the proxy's connections share with the daemon.
pub struct Shared {
    pub maps: Arc<Mutex<redirect::RedirectMaps>>,
    /// The policy set in force (replaced on reload).
    pub policies: Mutex<Arc<PolicySet>>,
    /// Labels of each cgroup from every source but the process (kept by the main loop).
    pub cgroup_labels: Mutex<HashMap<u64, Arc<BTreeMap<String, String>>>>,
    pub defaults: Defaults,
    pub records: Mutex<mpsc::Sender<ProxyRecord>>,
    pub counters: ProxyCounters,
    pub limits: TokenizerLimits,
    pub budget: BufferBudget,
    /// Connection ids (the `sock` of the records: high bit set, never a kernel address).
    next_id: AtomicU64,
    /// Set when the daemon stops: connections send nothing more to their servers.
    pub stop: tokio::sync::watch::Sender<bool>,
    /// The capture tells loopback connections of different namespaces apart (this
    /// kernel's BTF describes `sock` and `net`): so must the registration of upstreams.
    pub netns_known: bool,
    /// TLS through the proxy (`proxy.tls`), if configured.
    pub tls: Option<Arc<tls::ProxyTls>>,
    /// Kubernetes Secrets that credentials name.
    pub secrets: Arc<crate::workload::kubernetes::SecretStore>,
    /// The key of masking's keyed hash.
    pub mask_key: Arc<[u8]>,
    /// Statements held for approval.
    pub approvals: Arc<crate::approvals::Hub>,
    /// This host's name (in approval requests).
    pub host: String,
    /// Sessions with a statement held, by their cancel key's digest: a CancelRequest
    /// (on a connection of its own) wakes the holder.
    pub cancels: Mutex<HashMap<[u8; 32], Arc<tokio::sync::Notify>>>,
}

impl Shared {
    pub fn new(
        maps: Arc<Mutex<redirect::RedirectMaps>>,
        policies: Arc<PolicySet>,
        defaults: Defaults,
        records: mpsc::Sender<ProxyRecord>,
        limits: TokenizerLimits,
        netns_known: bool,
    ) -> Shared {
        Shared {
            maps,
            policies: Mutex::new(policies),
            cgroup_labels: Mutex::new(HashMap::new()),
            defaults,
            records: Mutex::new(records),
            counters: ProxyCounters::default(),
            limits,
            budget: BufferBudget::new(256 << 20),
            next_id: AtomicU64::new(1),
            stop: tokio::sync::watch::channel(false).0,
            netns_known,
            tls: None,
            secrets: Arc::default(),
            mask_key: Arc::from(&b""[..]),
            approvals: Arc::new(crate::approvals::Hub::new(None)),
            host: String::new(),
            cancels: Mutex::new(HashMap::new()),
        }
    }

    pub fn next_id(&self) -> u64 {
        (1 << 63) | self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// The running proxy: its port, and the thread serving it.
pub struct Proxy {
    pub port: u16,
    pub shared: Arc<Shared>,
    /// Its listeners in workloads' own network namespaces.
    pub namespaces: netns::Namespaces,
}

/// The proxy's threads. Each runs a single-threaded tokio runtime; accepted connections
/// are handed out in turn, and each stays on its thread (both directions, the upstream
/// connect, TLS): relaying a message costs the reads and writes and no cross-thread
/// wakeup, as in pgbouncer's event loop. More threads serve more connections at once on
/// larger hosts (`proxy.threads`).
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
}

impl Workers {
    /// Starts `n` threads (at least one).
    pub fn start(n: usize) -> std::io::Result<Arc<Workers>> {
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("auditor-proxy-{i}"))
                .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        }
        Ok(Arc::new(Workers {
            handles,
            next: std::sync::atomic::AtomicUsize::new(0),
        }))
    }

    /// Where accept loops run.
    pub fn first(&self) -> &tokio::runtime::Handle {
        &self.handles[0]
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Serves an accepted connection on the next thread in turn.
    pub fn dispatch(
        &self,
        stream: tokio::net::TcpStream,
        peer: std::net::SocketAddr,
        place: Arc<netns::Place>,
        shared: Arc<Shared>,
    ) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        let target = &self.handles[i];
        let here = tokio::runtime::Handle::try_current().map(|h| h.id());
        if here.as_ref().ok() == Some(&target.id()) {
            target.spawn(conn::handle(stream, peer, place, shared));
            return;
        }
        // A socket is registered with the runtime that accepted it: it moves as a plain
        // (non-blocking) socket and is registered again on its thread.
        match stream.into_std() {
            Ok(std) => {
                target.spawn(async move {
                    match tokio::net::TcpStream::from_std(std) {
                        Ok(stream) => conn::handle(stream, peer, place, shared).await,
                        Err(e) => tracing::warn!("proxy: cannot serve a connection: {e}"),
                    }
                });
            }
            Err(e) => tracing::warn!("proxy: cannot serve a connection: {e}"),
        }
    }
}

/// The number of proxy threads `proxy.threads: 0` means: one per four CPUs, from one to
/// eight.
pub fn default_threads() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cpus / 4).clamp(1, 8)
}

/// Binds the listeners on 127.0.0.1 and ::1 of the daemon's namespace (`port`, 0 for any
/// free one) and starts serving on `threads` threads of its own. An error binding
/// 127.0.0.1 is returned (nothing runs); ::1 is optional (a host without IPv6).
pub fn start(port: u16, threads: usize, shared: Arc<Shared>) -> std::io::Result<Proxy> {
    let (v4, v6) = netns::bind_listeners(port)?;
    let port = v4.local_addr()?.port();
    // The redirect sends connections to these listeners only once they are registered.
    let added = match shared.maps.lock() {
        Ok(mut m) => m.add_listeners(&v4, v6.as_ref()),
        Err(_) => Err("the redirect's maps are unusable".to_string()),
    };
    added.map_err(|e| std::io::Error::other(format!("registering the proxy's listeners: {e}")))?;
    if v6.is_none() {
        tracing::info!("proxy: not listening on [::1]:{port}; IPv6 connections of enforced workloads on this host will be refused");
    }
    let place = Arc::new(netns::host_place(&v4));
    let workers = Workers::start(threads)?;
    for l in [Some(v4), v6].into_iter().flatten() {
        let (place, s, w) = (place.clone(), shared.clone(), workers.clone());
        workers.first().spawn(async move {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => conn::accept_loop(l, place, s, w).await,
                Err(e) => tracing::error!("proxy listener: {e}"),
            }
        });
    }
    Ok(Proxy {
        port,
        namespaces: netns::Namespaces::new(workers, shared.clone(), port),
        shared,
    })
}

/// Enforcement as the daemon's main loop runs it: the redirect's verdicts per cgroup, the
/// proxy, and the policies they follow.
pub struct Enforcement {
    pub redirect: redirect::Redirect,
    pub proxy: Proxy,
    policies: Arc<PolicySet>,
    last_scan: Option<std::time::Instant>,
    pub records: mpsc::Receiver<ProxyRecord>,
}

/// How often the cgroup tree is looked at for new workloads (between looks, connections
/// of cgroups not judged yet go to the proxy while any policy enforces).
pub const SCAN_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum EnforcementError {
    #[error("the redirect into the proxy: {0}")]
    Redirect(#[from] redirect::RedirectError),
    #[error("the proxy cannot listen on 127.0.0.1:{port}: {source} (set proxy.port)")]
    Listen { port: u16, source: std::io::Error },
    #[error("the redirect's settings: {0}")]
    Configure(String),
    #[error("proxy.tls: {0}")]
    Tls(String),
}

/// How the proxy runs (from the configuration and what the capture found).
pub struct Settings<'a> {
    /// Its port (0: any free one).
    pub port: u16,
    pub defaults: Defaults,
    pub limits: TokenizerLimits,
    /// The capture tells loopback connections apart by network namespace.
    pub netns_known: bool,
    pub tls: Option<&'a crate::config::ProxyTlsConfig>,
    /// The proxy's threads (0: [`default_threads`]).
    pub threads: usize,
    /// Kubernetes Secrets that credentials name.
    pub secrets: Arc<crate::workload::kubernetes::SecretStore>,
    /// The installation's key (masking's keyed hash derives its own from it).
    pub mask_key: Arc<[u8]>,
    /// Where held statements wait for decisions.
    pub approvals: Arc<crate::approvals::Hub>,
    /// Where approvers reach the hub (bound already), served on the proxy's first thread.
    pub control: Option<std::os::unix::net::UnixListener>,
    pub host: String,
}

impl Enforcement {
    /// Attaches the redirect (acting on nothing yet) and starts the proxy.
    pub fn start(
        ebpf: &mut aya::Ebpf,
        pins: Option<&std::path::Path>,
        policies: Arc<PolicySet>,
        settings: Settings<'_>,
    ) -> Result<Enforcement, EnforcementError> {
        let Settings {
            port,
            defaults,
            limits,
            netns_known,
            tls,
            threads,
            secrets,
            mask_key,
            approvals,
            control,
            host,
        } = settings;
        let threads = if threads == 0 {
            default_threads()
        } else {
            threads
        };
        let tls = match tls {
            Some(cfg) => Some(Arc::new(
                tls::ProxyTls::load(cfg).map_err(EnforcementError::Tls)?,
            )),
            None => None,
        };
        let redirect = redirect::Redirect::attach(ebpf, pins)?;
        let (tx, rx) = mpsc::channel();
        let mut shared = Shared::new(
            redirect.maps.clone(),
            policies.clone(),
            defaults,
            tx,
            limits,
            netns_known,
        );
        shared.tls = tls;
        shared.secrets = secrets;
        shared.mask_key = mask_key;
        shared.approvals = approvals.clone();
        shared.host = host;
        let shared = Arc::new(shared);
        let proxy = start(port, threads, shared)
            .map_err(|source| EnforcementError::Listen { port, source })?;
        if approvals.store().is_some() {
            proxy
                .namespaces
                .first_runtime()
                .spawn(crate::approvals::sync(approvals.clone()));
        }
        if let Some(l) = control {
            proxy
                .namespaces
                .first_runtime()
                .spawn(crate::approvals::control::serve(l, approvals));
        }
        Ok(Enforcement {
            redirect,
            proxy,
            policies,
            last_scan: None,
            records: rx,
        })
    }

    pub fn set_policies(&mut self, set: Arc<PolicySet>) {
        if let Ok(mut p) = self.proxy.shared.policies.lock() {
            *p = set.clone();
        }
        self.proxy.shared.approvals.set_rules(&set);
        self.policies = set;
        self.last_scan = None;
    }

    /// Looks at the cgroup tree (at most every SCAN_EVERY, or at once after a policy
    /// change) and brings the kernel's verdicts and the proxy's labels up to date.
    pub fn refresh(
        &mut self,
        workload_of: &dyn Fn(&crate::audit::event::ProcessIdentity) -> crate::workload::Workload,
    ) -> Result<(), EnforcementError> {
        if self.last_scan.is_some_and(|t| t.elapsed() < SCAN_EVERY) {
            return Ok(());
        }
        self.last_scan = Some(std::time::Instant::now());
        let any = self.policies.any_enforce();
        let mut verdicts = HashMap::new();
        let mut labels_of = HashMap::new();
        let paths = redirect::cgroups(&self.redirect.root);
        for (id, path) in &paths {
            let (id, path) = (*id, path);
            let facts = crate::workload::parse_cgroup_path(path);
            let identity = crate::audit::event::ProcessIdentity {
                cgroup_id: id,
                cgroup_path: path.as_str().into(),
                container_id: facts.container_id.into(),
                pod_uid: facts.pod_uid.into(),
                systemd_unit: facts.systemd_unit.into(),
                ..Default::default()
            };
            let w = workload_of(&identity);
            let mut labels: BTreeMap<String, String> = (*w.labels).clone();
            labels.retain(|k, _| !k.starts_with("process."));
            // A pod not known yet may turn out enforced: its connections go to the proxy,
            // which waits for its labels.
            let redirect = any && (w.pending || self.policies.may_enforce(&labels));
            verdicts.insert(id, redirect);
            labels_of.insert(id, Arc::new(labels));
        }
        if let Ok(mut m) = self.proxy.shared.cgroup_labels.lock() {
            *m = labels_of;
        }
        // The proxy listens in the network namespace of every redirected process.
        let pids = paths
            .iter()
            .filter(|(id, _)| verdicts.get(id) == Some(&true))
            .flat_map(|(_, path)| redirect::pids_of(&self.redirect.root, path));
        self.proxy.namespaces.update(pids);
        let changed = self.redirect.set_verdicts(&verdicts);
        if changed > 0 {
            tracing::debug!(
                changed,
                redirected = self.redirect.redirected_cgroups(),
                "redirect verdicts"
            );
        }
        self.redirect
            .configure(self.proxy.port, any)
            .map_err(EnforcementError::Configure)
    }

    /// The daemon stops: proxied connections send nothing more to their servers, and end
    /// once the servers answered what was in flight (waited for up to `wait`). Returns the
    /// connections still open then.
    pub fn stop_relaying(&self, wait: std::time::Duration) -> u64 {
        self.proxy.shared.stop.send_replace(true);
        let deadline = std::time::Instant::now() + wait;
        loop {
            let active = self.proxy.shared.counters.active.load(Ordering::Relaxed);
            if active == 0 || std::time::Instant::now() >= deadline {
                return active;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// At the daemon's stop: enforcement stays (refusing) while an enforce policy is in
    /// force, else the redirect is removed.
    pub fn release(self) {
        self.redirect.release(self.policies.any_enforce());
    }

    pub fn stats(&self) -> ProxyStats {
        let mut s = self.proxy.shared.counters.stats();
        s.redirected_cgroups = self.redirect.redirected_cgroups() as u64;
        s.namespaces = self.proxy.namespaces.count() as u64;
        s.namespaces_refused = self.proxy.namespaces.refused() as u64;
        let hub = &self.proxy.shared.approvals;
        s.pending_approvals = hub.pending_count() as u64;
        if let Some(w) = hub.webhook() {
            s.webhook_sent = w.sent.load(Ordering::Relaxed);
            s.webhook_failed = w.failed.load(Ordering::Relaxed);
        }
        s.approvals_store_down = u64::from(hub.store_down().is_some());
        s
    }
}
