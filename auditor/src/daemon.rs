//! `auditor run`: capture -> tracker -> sinks, until SIGINT or SIGTERM.
//!
//! The capture loop runs on the main thread and hands batches of events to the sink thread
//! over a bounded channel: when the sink falls behind, capture waits, the kernel ring buffer
//! fills, and what the kernel cannot hand over is counted there and becomes gap events.

use std::{
    io::Write,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use auditor_common::RECORD_FILE;
use serde::{Deserialize, Serialize};

use crate::{
    audit::event::{AuditEvent, Timestamp},
    audit::recorder::RecordingPolicy,
    capture::{
        tls::{self, TlsCounters, TlsFinder},
        Capture, CaptureError, KernelCounters,
    },
    config::Config,
    continuity,
    pg::TokenizerLimits,
    sink::{self, clickhouse::ClickHouseCounters, Health, SinkError, SinkThread},
    tracker::{Record, Tracker, TrackerConfig, TrackerCounters},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error("{0}")]
    Sink(SinkError),
    #[error("state directory {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Policy(#[from] crate::policy::live::PolicyError),
    #[error("enforcement cannot start: {0} (an enforce policy is loaded; the daemon does not run without enforcing it)")]
    Enforcement(String),
    #[error("the console cannot start: {0}")]
    Console(String),
    #[error(
        "another daemon runs on the state directory {0} (pid {1}): one daemon per state \
         directory (they would share its log and the capture it keeps)"
    )]
    AlreadyRunning(String, String),
    #[error("--bare-hooks: {0}")]
    BareHooks(String),
}

/// How `auditor run` runs, beyond its configuration.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Attach the capture's tracepoints with programs that return at once: nothing is
    /// captured or recorded. Measures what the hooks alone cost on this host (the bench's
    /// floor under the capture's own cost). Needs a state directory without a trail, and
    /// no enforcement.
    pub bare_hooks: bool,
}

/// Refuses `--bare-hooks` where it would leave a false record: a trail in the state
/// directory (its window would read as audited). (Enforce policies are refused once they
/// are loaded: bare hooks redirect nothing.)
fn check_bare_hooks(cfg: &Config) -> Result<(), DaemonError> {
    let log = cfg.log_dir();
    let marker = cfg.state_dir.join(BARE_HOOKS_MARKER);
    let has_trail = std::fs::read_dir(&log).is_ok_and(|mut entries| entries.next().is_some());
    if has_trail && !marker.exists() {
        return Err(DaemonError::BareHooks(format!(
            "{} holds an audit trail; bare hooks record nothing, so give them a state \
             directory of their own (--state-dir)",
            log.display()
        )));
    }
    // The log this run leaves holds no statement: the next bare run may use it again.
    crate::fsutil::private_dir(&cfg.state_dir)
        .and_then(|()| std::fs::write(&marker, b"state directory of `auditor run --bare-hooks`\n"))
        .map_err(|source| DaemonError::State {
            path: marker.display().to_string(),
            source,
        })
}

/// In a state directory `--bare-hooks` ran in (its log records nothing).
const BARE_HOOKS_MARKER: &str = "bare-hooks";

fn write_checkpoint(cp: &continuity::Checkpoint, state_dir: &std::path::Path) {
    if let Err(e) = cp.write(state_dir) {
        let path = continuity::Checkpoint::path(state_dir);
        tracing::warn!("{}: {e}", path.display());
    }
}

/// How long a starting daemon waits for the one before on the same state directory.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// Holds `daemon.lock` in the state directory for the daemon's lifetime (an exclusive
/// `flock`, released by the kernel however the process ends), with its pid inside.
fn lock_state_dir(
    state_dir: &std::path::Path,
    wait: Duration,
) -> Result<std::fs::File, DaemonError> {
    use std::{io::Write as _, os::fd::AsRawFd as _};
    let path = state_dir.join("daemon.lock");
    let state_err = |source| DaemonError::State {
        path: path.display().to_string(),
        source,
    };
    let mut file = crate::fsutil::private_options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(state_err)?;
    // A rollout may start this daemon while the one before is still stopping: it waits
    // for it (bounded), then refuses.
    let deadline = Instant::now() + wait;
    let mut said = false;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(state_err(err));
        }
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        if Instant::now() >= deadline || STOP.load(Ordering::SeqCst) {
            return Err(DaemonError::AlreadyRunning(
                state_dir.display().to_string(),
                holder.trim().to_string(),
            ));
        }
        if !said {
            tracing::info!(
                "waiting up to {} s for the daemon before (pid {}) to stop",
                wait.as_secs(),
                holder.trim()
            );
            said = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    file.set_len(0).map_err(state_err)?;
    writeln!(file, "{}", std::process::id()).map_err(state_err)?;
    Ok(file)
}

static STOP: AtomicBool = AtomicBool::new(false);

/// How often idle sessions are checked, and how idle they must be.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
const SWEEP_IDLE: Duration = Duration::from_secs(300);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGHUP {
        crate::policy::live::RELOAD.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// Events handed to the sink thread at a time, at least (unless `SEND_EVERY` passed).
const SEND_AT: usize = 512;
const SEND_EVERY: Duration = Duration::from_millis(20);

/// Hands `batch` to the sink thread, counting it in `sent`. False: the thread is gone.
/// The next batch is one the sink thread sent back (see `SinkSender::reuse`), emptied
/// here: its events are dropped on this thread, which made them.
fn hand_on(
    tx: &mut sink::SinkSender,
    capture: &mut Capture,
    batch: &mut Vec<Box<AuditEvent>>,
    sent: &mut u64,
    last_send: &mut Instant,
) -> bool {
    let n = batch.len() as u64;
    let next = match tx.reuse() {
        Some(mut used) => {
            // Their boxes are kept for the next events (see `recorder::boxed`), those of
            // a burst's batch too: freeing them here and allocating anew would cost a
            // malloc and a free per event at the busiest time.
            crate::cache::prefetched_drain(&mut used, crate::audit::recorder::recycle);
            // A list a burst grew is not kept for the quiet after.
            if used.capacity() <= 2 * SEND_AT {
                used
            } else {
                Vec::with_capacity(SEND_AT)
            }
        }
        None => Vec::with_capacity(SEND_AT),
    };
    // While the sinks catch up the ring holds what comes (what it cannot hold is counted
    // and becomes a gap); the lease is kept, or the capture would go quiet.
    let renew = || {
        if let Err(e) = capture.renew_lease() {
            tracing::warn!("renewing the capture's lease: {e}");
        }
    };
    if tx
        .send_waiting(std::mem::replace(batch, next), renew)
        .is_err()
    {
        return false;
    }
    *sent += n;
    *last_send = Instant::now();
    true
}

/// What `auditor stats` shows, written by the daemon every second.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub pid: u32,
    pub started_at: String,
    pub updated_at: String,
    pub uptime_s: u64,
    pub events_written: u64,
    pub sink_errors: u64,
    pub active_sessions: u64,
    pub tracker: TrackerCounters,
    pub kernel: KernelCounters,
    /// Each eBPF program's runs and run time, while the kernel counts them
    /// (`kernel.bpf_stats_enabled = 1`); empty otherwise.
    #[serde(default)]
    pub bpf_programs: std::collections::BTreeMap<String, crate::capture::ProgramRuns>,
    pub tls: TlsCounters,
    /// The TLS libraries hooked so far.
    pub tls_libraries: Vec<String>,
    /// Bytes one read or write call is copied up to; more is recorded as a gap (8 MiB
    /// with the default ring, 128 KiB on a kernel without bpf_loop).
    #[serde(default)]
    pub copy_limit_bytes: u64,
    /// The kernel ring buffer's size (allocated once; the daemon's resident set counts it
    /// twice, since its data pages are mapped twice).
    #[serde(default)]
    pub ring_buffer_bytes: u64,
    /// Policies in force, reloads and refused reloads.
    #[serde(default)]
    pub policies: crate::policy::live::PolicyCounters,
    /// The Kubernetes pod watch, when it runs.
    #[serde(default)]
    pub kubernetes: Option<crate::workload::kubernetes::KubeStats>,
    /// The inline proxy of enforced workloads, when it runs.
    #[serde(default)]
    pub proxy: Option<crate::proxy::ProxyStats>,
    /// How far behind now the trail is known complete (the watermark: everything read
    /// before it is in events every sink has flushed), in ms.
    #[serde(default)]
    pub trail_lag_ms: Option<u64>,
    /// Events handed to the sinks and not flushed by all of them yet.
    #[serde(default)]
    pub sink_backlog_events: u64,
    /// What the events handed to the sink thread and not delivered yet hold, about, in
    /// bytes (at most `MAX_QUEUED_BYTES`, 64 MiB, beyond which capture waits).
    #[serde(default)]
    pub sink_backlog_bytes: u64,
    /// How many times capture waited for the sinks because that bound was reached (the
    /// kernel ring held what came meanwhile; what it could not hold is a gap).
    #[serde(default)]
    pub sink_waits: u64,
    /// The daemon's own CPU time since it started, by thread: what observing costs this
    /// host (absent from stats of older daemons).
    #[serde(default)]
    pub cpu: crate::cpu::CpuStats,
    /// Each sink's health, by name.
    pub sinks: std::collections::BTreeMap<String, Health>,
    /// The ClickHouse sink's counters (also under `sinks`), when it runs.
    pub clickhouse: Option<ClickHouseCounters>,
}

/// The key of the parameter hashes: created once per installation, never logged.
fn param_key(state_dir: &Path) -> Result<Vec<u8>, DaemonError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join("param.key");
    let state_err = |source| DaemonError::State {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read(&path) {
        Ok(k) if k.len() >= 32 => return Ok(k),
        Ok(_) | Err(_) => {}
    }
    let mut key = vec![0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut key[..]);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(state_err)?;
    f.write_all(&key).map_err(state_err)?;
    Ok(key)
}

fn sinks_health(board: &sink::HealthBoard) -> std::collections::BTreeMap<String, Health> {
    board
        .lock()
        .map(|b| b.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
        .unwrap_or_default()
}

fn write_stats(path: &Path, stats: &Stats) {
    if let Ok(text) = serde_json::to_vec_pretty(stats) {
        let _ = crate::fsutil::rewrite_private(path, &text);
    }
}

/// The proxy's records (its sessions' bytes), decoded like the kernel's.
fn drain_proxy(
    enforcement: Option<&crate::proxy::Enforcement>,
    tracker: &mut Tracker,
    batch: &mut Vec<Box<AuditEvent>>,
) {
    if let Some(e) = enforcement {
        for r in e.records.try_iter() {
            let rec = Record {
                header: r.header,
                data: &r.data,
            };
            tracker.handle(&rec, batch);
        }
    }
}

/// Gives back to the system what starting took and no longer holds: loading the eBPF
/// programs parses the kernel's BTF (some 20 MB, freed once they are loaded), which the
/// allocator would otherwise keep for the daemon's whole life.
fn release_startup_memory() {
    // SAFETY: malloc_trim only returns the allocator's free pages to the system.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

pub fn run(cfg: &Config, opts: RunOptions) -> Result<(), DaemonError> {
    if opts.bare_hooks {
        check_bare_hooks(cfg)?;
        tracing::warn!(
            "bare hooks: the capture's programs return at once; NOTHING is captured or \
             recorded (kernel.bpf_stats_enabled=1 and `auditor stats` show what the hooks \
             cost)"
        );
    }
    install_signal_handlers();
    // Before any thread starts: threads inherit it.
    // SAFETY: setpriority on our own process; no memory is passed.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, cfg.capture.nice) } != 0 {
        tracing::warn!(
            "could not set niceness {}: {} (running at the default)",
            cfg.capture.nice,
            std::io::Error::last_os_error()
        );
    }
    crate::fsutil::private_dir(&cfg.state_dir).map_err(|source| DaemonError::State {
        path: cfg.state_dir.display().to_string(),
        source,
    })?;
    let _lock = lock_state_dir(&cfg.state_dir, LOCK_WAIT)?;
    if !opts.bare_hooks {
        // This directory's log is a trail from now on: no bare run may use it again.
        let _ = std::fs::remove_file(cfg.state_dir.join(BARE_HOOKS_MARKER));
    }
    let key = param_key(&cfg.state_dir)?;
    // Policies before capture: a broken set refuses the start, before anything attaches.
    let (policies_dir, policies_required) = cfg.policies_dir();
    let mut policies = crate::policy::live::LivePolicies::start(&policies_dir, policies_required)?;
    if opts.bare_hooks && policies.set.any_enforce() {
        return Err(DaemonError::BareHooks(format!(
            "{} holds enforce policies; bare hooks enforce nothing (run them with a \
             policies_dir without any)",
            policies_dir.display()
        )));
    }
    // Bare hooks neither redirect nor proxy anything.
    let proxy_active = cfg.proxy.active() && !opts.bare_hooks;
    // What the run before this one left: read before this run writes its own.
    let previous_watermark = continuity::Watermark::read(&cfg.state_dir);
    let previous_stats: Option<Stats> = std::fs::read_to_string(cfg.stats_path())
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    // Where the redirect is pinned: enforcement then holds while the daemon restarts.
    let pins = if proxy_active {
        match crate::proxy::redirect::prepare_pin_dir(&cfg.proxy.pin_dir) {
            Ok(()) => Some(cfg.proxy.pin_dir.clone()),
            Err(e) => {
                tracing::warn!("the redirect cannot be pinned ({e}): enforcement will not hold while the daemon restarts");
                None
            }
        }
    } else {
        None
    };
    // The capture outlives the daemon (for the next one) unless told otherwise.
    // Bare hooks never take over, nor leave behind, a capture of this state directory.
    let handover = (cfg.capture.keep_while_stopped_s > 0 && !opts.bare_hooks).then(|| {
        crate::capture::HandoverSettings {
            base: cfg.capture.pin_dir.clone(),
            state_dir: cfg.state_dir.clone(),
            keep_s: cfg.capture.keep_while_stopped_s,
        }
    });
    // Bare hooks take no TLS library calls either.
    let tls = cfg.capture.tls && !opts.bare_hooks;
    let mut capture = Capture::start(
        &cfg.endpoints,
        cfg.capture.ring_buffer_bytes,
        cfg.capture.max_call_bytes,
        tls,
        pins.as_deref(),
        handover.as_ref(),
        opts.bare_hooks,
    )?;
    let sinks = sink::build(cfg).map_err(DaemonError::Sink)?;
    let mut tracker = Tracker::new(TrackerConfig {
        host: crate::text::Text::lasting(&cfg.host_name()),
        policy: RecordingPolicy::new(cfg.record.raw_statements, cfg.record.raw_params, &key),
        limits: TokenizerLimits {
            max_buffered: cfg.capture.max_message_bytes,
        },
        pod_wait: Duration::from_millis(u64::from(cfg.kubernetes.pod_wait_ms)),
    });
    // Secrets credentials name: watched through the API server when Kubernetes is on.
    let secrets = std::sync::Arc::new(crate::workload::kubernetes::SecretStore::default());
    secrets.want(policies.set.secrets());
    let pods = if cfg.kubernetes.active() {
        let settings = crate::workload::kubernetes::KubeSettings {
            kubeconfig: cfg.kubernetes.kubeconfig.clone(),
            node_name: cfg.kubernetes.node(&cfg.host_name()),
        };
        let cache =
            crate::workload::kubernetes::start(settings, secrets.clone()).map_err(|source| {
                DaemonError::State {
                    path: "kubernetes watch thread".into(),
                    source,
                }
            })?;
        tracker.add_label_source(Box::new(crate::workload::kubernetes::PodLabels {
            cache: cache.clone(),
        }));
        Some(cache)
    } else {
        None
    };
    tracker.set_policies(policies.set.clone());
    tracker.add_label_source(Box::new(crate::workload::systemd::UnitLabels::new(
        cfg.systemd_unit_dirs.clone(),
    )));
    if !cfg.host_labels.is_empty() {
        tracker.add_label_source(Box::new(crate::workload::HostLabels::new(&cfg.host_labels)));
    }
    // The backends running now serve sessions older than the capture about to begin.
    let backends = tracker.remember_backends();
    // Their prepared statements were parsed before capture: the backends name the texts
    // when they bind them.
    let mut hooked = 0;
    for pid in &backends {
        match capture.hook_backend(*pid) {
            Ok(true) => hooked += 1,
            Ok(false) => {}
            Err(e) => tracing::debug!("backend {pid}: {e}"),
        }
    }
    match &capture.server_probe_error {
        Some(e) => {
            tracing::warn!("statements prepared before the daemon started will have no text: {e}")
        }
        None if !backends.is_empty() => tracing::info!(
            "{} Postgres backends older than the daemon; {hooked} report the text of the \
             statements they prepared before it (PortalDefineQuery)",
            backends.len()
        ),
        None => {}
    }
    // The redirect of enforced workloads and its proxy: before capture begins, so the
    // first connections of an enforced workload already go to the proxy.
    let mut enforcement = if proxy_active {
        let netns_known = capture.netns_known;
        let socket = cfg.approvals_socket();
        let control =
            crate::approvals::control::bind(&socket, cfg.approvals.socket_group.as_deref())
                .map_err(|e| DaemonError::Enforcement(format!("the approvals socket: {e}")))?;
        let mut approvals = crate::approvals::Hub::new(Some(cfg.state_dir.join("approvals.jsonl")))
            .with_grants(cfg.state_dir.join("grants.json"));
        if let Some(store) = &cfg.approvals.store {
            let store = crate::approvals::store::Store::new(store)
                .map_err(|e| DaemonError::Enforcement(format!("the approvals store: {e}")))?;
            tracing::info!(
                "approvals: requests are kept in {} and decided from any node",
                store.url()
            );
            approvals = approvals.with_store(std::sync::Arc::new(store), cfg.host_name());
        }
        if let Some(w) = &cfg.approvals.webhook {
            let console = cfg.console.listen.map(|l| {
                cfg.console.public_url.clone().unwrap_or_else(|| {
                    format!(
                        "{}://{l}",
                        if cfg.console.tls.is_some() {
                            "https"
                        } else {
                            "http"
                        }
                    )
                })
            });
            let w = crate::approvals::webhook::Webhook::new(w, console)
                .map_err(DaemonError::Enforcement)?;
            approvals = approvals.with_webhook(w);
        }
        approvals.set_rules(&policies.set);
        let approvals = std::sync::Arc::new(approvals);
        match crate::proxy::Enforcement::start(
            capture.ebpf_mut(),
            pins.as_deref(),
            policies.set.clone(),
            crate::proxy::Settings {
                port: cfg.proxy.port,
                defaults: crate::policy::Defaults {
                    raw_statements: cfg.record.raw_statements,
                    raw_params: cfg.record.raw_params,
                },
                limits: TokenizerLimits {
                    max_buffered: cfg.proxy.max_message_bytes,
                },
                netns_known,
                tls: cfg.proxy.tls.as_ref(),
                threads: cfg.proxy.threads,
                secrets: secrets.clone(),
                mask_key: std::sync::Arc::from(&key[..]),
                approvals,
                control: Some(control),
                host: cfg.host_name(),
            },
        ) {
            Ok(mut e) => {
                e.refresh(&|id| tracker.workload_of(id))
                    .map_err(|e| DaemonError::Enforcement(e.to_string()))?;
                tracing::info!(
                    "proxy listening on 127.0.0.1:{} for workloads under an enforce policy ({} cgroups redirected now)",
                    e.proxy.port,
                    e.redirect.redirected_cgroups()
                );
                Some(e)
            }
            Err(e) if policies.set.any_enforce() => {
                // Enforcement fails closed: no start without it.
                return Err(DaemonError::Enforcement(e.to_string()));
            }
            Err(e) => {
                tracing::warn!("enforcement is unavailable: {e}; enforce policies loaded later will not be enforced");
                // The redirect's pins go: those attached before the proxy failed, and
                // those a daemon before this one left (it was killed), which would go on
                // sending the cgroups it enforced to a proxy port nobody serves now (or
                // somebody else does). No enforce policy is in force.
                if let Some(dir) = &pins {
                    match crate::proxy::redirect::detach(dir) {
                        Ok(removed) if !removed.is_empty() => tracing::info!(
                            "removed the redirect's {1} pins in {0}: nothing is redirected without enforcement",
                            dir.display(),
                            removed.len()
                        ),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(
                            "the redirect's pins in {} could not be removed: {e} (`auditor detach` removes them)",
                            dir.display()
                        ),
                    }
                }
                None
            }
        }
    } else {
        if policies.set.any_enforce() {
            tracing::warn!(
                "proxy.enabled is false: enforce policies are recorded as dry runs, not enforced"
            );
        }
        None
    };
    // Backends are hooked first, so every statement captured has its report before it.
    // The programs attach idle, and go on duty at the takeover below, once the TLS
    // libraries are hooked too: from then on nothing is missed (where the daemon before
    // left its capture running, its programs hand over without a gap).
    capture.attach()?;

    let endpoints: Vec<String> = cfg
        .endpoints
        .iter()
        .map(|e| match e.address {
            Some(a) => format!("{a} port {}", e.port),
            None => format!("port {} on any address", e.port),
        })
        .collect();
    let taken = if capture.exit_only {
        "taken at its exit alone"
    } else {
        "noted at its entry (before Linux 5.15)"
    };
    match &capture.without_bpf_loop {
        None => tracing::info!(
            "each read or write call is {taken} and copied up to {} KiB",
            capture.copy_limit / 1024
        ),
        Some(why) => tracing::warn!(
            "without bpf_loop (Linux 5.17+), each read or write call is \
             copied up to {} KiB only; a larger one is recorded as a gap ({why})",
            capture.copy_limit / 1024
        ),
    }
    // TLS libraries: the usual library directories, then what running processes map.
    let mut finder = TlsFinder::default();
    if tls {
        let mut candidates = tls::library_dir_candidates();
        candidates.extend(tls::running_candidates());
        for c in &candidates {
            capture.consider_tls_file(&mut finder, c);
        }
    }
    let takeover = capture.take_over()?;
    let capture_since = Timestamp::now();
    let wall_offset = crate::tracker::wall_offset_ns();
    let kernel_wall = |ns: u64| Timestamp::from_unix_ns((i128::from(ns) + wall_offset).max(0));
    tracing::info!(
        "attached {} tracepoints ({})",
        capture.attached.len(),
        capture.attached.join(", ")
    );
    if tls {
        // What processes mapped between the look above and the takeover (the programs that
        // report new mappings were idle until then).
        for c in &tls::running_candidates() {
            capture.consider_tls_file(&mut finder, c);
        }
    }
    match (&takeover.previous, capture.pin_dir()) {
        (Some(h), Some(dir)) => tracing::info!(
            "took over the capture the daemon before left running (generation {}, in {}): \
             what it captured meanwhile is drained first",
            h.generation,
            dir.display()
        ),
        (None, Some(dir)) => tracing::info!(
            "the capture outlives the daemon by {} s (pinned in {}; `auditor detach` ends it)",
            cfg.capture.keep_while_stopped_s,
            dir.display()
        ),
        _ => {}
    }
    if opts.bare_hooks {
        tracing::warn!("bare hooks attached: nothing is captured or recorded until this stops");
    } else if !tls {
        tracing::info!("TLS plaintext capture is off (capture.tls: false): TLS sessions are recorded as tls_unreadable");
    } else if finder.libraries.is_empty() {
        tracing::info!(
            "no OpenSSL library found yet ({} files checked); TLS connections are recorded as tls_unreadable until one is mapped",
            finder.counters.files_checked
        );
    } else {
        tracing::info!(
            "hooked TLS plaintext (OpenSSL) in {} file(s): {}",
            finder.libraries.len(),
            finder
                .libraries
                .iter()
                .map(|l| l.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    tracing::info!("watching TCP {}", endpoints.join(", "));
    if capture.unix_sockets {
        tracing::info!(
            "and Unix-domain sockets named .s.PGSQL.<port> for those ports (any directory)"
        );
    } else {
        tracing::info!("Unix-domain sockets are NOT watched: this kernel's BTF does not describe them (AF_UNIX built as a module?)");
    }
    if cfg.local_log.enabled {
        tracing::info!(
            "events -> {} (sealed blocks; `auditor tail` follows them, `auditor verify` checks them)",
            cfg.log_dir().display()
        );
    } else {
        tracing::info!("local log disabled: events are counted but not stored");
    }
    if cfg.clickhouse.enabled {
        tracing::info!(
            "events -> ClickHouse {} database {} (spooled in {} until delivered)",
            cfg.clickhouse.url,
            cfg.clickhouse.database,
            cfg.spool_dir().display()
        );
    }
    tracing::info!("stats -> {} (`auditor stats`)", cfg.stats_path().display());
    let metrics = match cfg.metrics_listen {
        Some(addr) => {
            let latest = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
            let bound = crate::metrics::serve(addr, latest.clone()).map_err(|source| {
                DaemonError::State {
                    path: format!("metrics_listen {addr}"),
                    source,
                }
            })?;
            tracing::info!("metrics -> http://{bound}/metrics (Prometheus)");
            Some(latest)
        }
        None => None,
    };
    if let Some(bound) = crate::console::bind(
        cfg,
        enforcement
            .as_ref()
            .map(|e| e.proxy.shared.approvals.clone()),
    )
    .map_err(DaemonError::Console)?
    {
        let addr = bound
            .local_addr()
            .map_err(|e| DaemonError::Console(e.to_string()))?;
        crate::console::spawn(bound).map_err(|e| DaemonError::Console(e.to_string()))?;
        tracing::info!("console -> {addr} (approvals and session replay, OpenID Connect sign-in)");
    }
    tracing::info!("ready; Ctrl-C stops and flushes everything");
    release_startup_memory();
    let _ = std::io::stdout().flush();

    // What ClickHouse does not take within the grace period at stop stays spooled for
    // the next start.
    let (mut tx, sink) =
        SinkThread::spawn(sinks, 1024, sink::MAX_QUEUED_BYTES, Duration::from_secs(10));
    let (written, health) = (sink.events.clone(), sink.health.clone());
    let flushed = sink.flushed.clone();
    let mut sent: u64 = 0;
    let mut watermark = continuity::WatermarkKeeper::default();
    let mut batch: Vec<Box<AuditEvent>> = Vec::with_capacity(256);
    let previous_update = previous_stats
        .as_ref()
        .map(|s| (s.pid, s.updated_at.as_str()));
    // The window the daemon before left uncovered: all of it when its capture ended with
    // it; when it was taken over, only what it had read and not written out (if killed)
    // and the time after its lease ran out.
    let mut pending_window = None;
    match takeover.previous {
        None => {
            if let Some(ev) = continuity::interrupted_event(
                previous_watermark.as_ref(),
                previous_update,
                capture_since,
                &cfg.host_name(),
            ) {
                tracing::warn!("{}", ev.statement);
                batch.push(Box::new(ev));
            }
        }
        Some(h) => {
            // The sessions it followed continue here (with what its checkpoint says).
            let checkpoint =
                continuity::Checkpoint::take(&cfg.state_dir, previous_watermark.as_ref());
            tracing::info!(
                "continuing {} sessions of the daemon before ({})",
                checkpoint.as_ref().map_or(0, |c| c.sessions.len()),
                match &checkpoint {
                    Some(c) if c.stopped =>
                        "it stopped cleanly: same session ids, exact stream offsets",
                    Some(_) => "from its last checkpoint",
                    None => "it left no checkpoint: joined mid-stream",
                }
            );
            tracker.carry_in(takeover.at_ns, checkpoint);
            let lease_ended =
                (h.lease_until_ns < takeover.at_ns).then(|| kernel_wall(h.lease_until_ns));
            // Records the ring could not take while no daemon drained it (the counters
            // are shared with the daemon before, whose last stats say how many it saw).
            let dropped = |k: &crate::capture::KernelCounters| k.ringbuf_drops + k.control_drops;
            let lost = previous_stats.as_ref().map_or(0, |s| {
                dropped(&capture.counters()).saturating_sub(dropped(&s.kernel))
            });
            let (window, now) = continuity::Takeover::begin(
                previous_watermark.as_ref(),
                previous_update,
                lease_ended,
                lost,
                capture_since,
                &cfg.host_name(),
            );
            for ev in now {
                tracing::warn!("{}", ev.statement);
                batch.push(Box::new(ev));
            }
            pending_window = Some(window);
        }
    }
    // The time of the first record drained (where a killed daemon's window ends).
    let mut first_record_ns: Option<u64> = None;
    // A capture that outlives the daemon: the next daemon continues the sessions from
    // the checkpoint (kept each second while it changes).
    let keep_checkpoint = capture.pin_dir().is_some();
    let mut checkpoint_version = None;

    let started = Instant::now();
    let started_at = Timestamp::now().to_string();
    let mut last_stats = Instant::now() - Duration::from_secs(2);
    let mut last_send = Instant::now();
    let stats_path = cfg.stats_path();
    let make_stats = |tracker: &Tracker,
                      capture: &Capture,
                      finder: &TlsFinder,
                      policies: crate::policy::live::PolicyCounters,
                      proxy_stats: Option<crate::proxy::ProxyStats>,
                      sink_errors: u64,
                      cpu: crate::cpu::CpuStats| Stats {
        pid: std::process::id(),
        started_at: started_at.clone(),
        updated_at: Timestamp::now().to_string(),
        uptime_s: started.elapsed().as_secs(),
        events_written: written.load(Ordering::Relaxed),
        sink_errors,
        active_sessions: tracker.active_sessions() as u64,
        tracker: tracker.counters,
        kernel: capture.counters(),
        bpf_programs: capture.program_runs(),
        tls: finder.counters,
        tls_libraries: finder.libraries.iter().map(|l| l.path.clone()).collect(),
        copy_limit_bytes: capture.copy_limit,
        ring_buffer_bytes: u64::from(cfg.capture.ring_buffer_bytes),
        policies,
        kubernetes: pods.as_ref().map(|p| p.stats()),
        proxy: proxy_stats,
        trail_lag_ms: None,
        sink_backlog_events: 0,
        sink_backlog_bytes: 0,
        sink_waits: 0,
        cpu,
        sinks: sinks_health(&health),
        clickhouse: sinks_health(&health)
            .get("clickhouse")
            .and_then(|h| serde_json::from_value(h.detail.clone()).ok()),
    };

    let mut malformed_records = 0u64;
    // The daemon's CPU time, by thread, for the stats (read each second).
    let mut cpu = crate::cpu::CpuCounter::default();
    // A failed mute only costs duplicate copying: counted, not fatal.
    let mut mute_failures = 0u64;
    let drain_every = Duration::from_millis(u64::from(cfg.capture.drain_every_ms));
    let mut last_sweep = Instant::now();
    let mut last_tick = Instant::now();
    // The host name of events that belong to no session (made when the first is).
    let mut host_text: Option<crate::text::Text> = None;
    // New programs and newly mapped executable files: (pid, file or None for exec).
    let mut new_files: Vec<(u32, Option<tls::FileId>, u64)> = Vec::new();
    while !STOP.load(Ordering::SeqCst) {
        capture.poll(drain_every, 4096, |bytes| match Record::parse(bytes) {
            Some(rec) if rec.header.kind == RECORD_FILE => {
                let pid = (rec.header.pid_tgid >> 32) as u32;
                let [dev, ino] = rec.header.aux;
                new_files.push((pid, (ino != 0).then_some((dev, ino)), rec.header.ts_ns));
            }
            Some(rec) => {
                first_record_ns.get_or_insert(rec.header.ts_ns);
                tracker.handle(&rec, &mut batch)
            }
            None => malformed_records += 1,
        })?;
        if let Some(mut window) = pending_window.take() {
            if let Some(ev) = window.gap_until(
                first_record_ns.map(kernel_wall),
                capture_since,
                &cfg.host_name(),
            ) {
                tracing::warn!("{}", ev.statement);
                batch.push(Box::new(ev));
            }
        }
        drain_proxy(enforcement.as_ref(), &mut tracker, &mut batch);
        for (pid, file, seen_ns) in new_files.drain(..) {
            let candidates = match file {
                None => tls::exe_candidate(pid).into_iter().collect(),
                Some(id) if finder.is_checked(&id) => Vec::new(),
                Some(id) => tls::mapped_candidates(pid, Some(id)),
            };
            for c in candidates {
                if finder.is_checked(&c.id) {
                    continue;
                }
                if let Some(lib) = capture.consider_tls_file(&mut finder, &c) {
                    let after = crate::tracker::monotonic_ns().saturating_sub(seen_ns);
                    tracing::info!(
                        "hooked TLS plaintext (OpenSSL) in {} (mapped by pid {pid}; hooked {:.1} ms later)",
                        lib.path,
                        after as f64 / 1e6
                    );
                }
            }
        }
        if last_tick.elapsed() >= Duration::from_millis(250) {
            tracker.tick(crate::tracker::monotonic_ns(), &mut batch);
            last_tick = Instant::now();
            let mut own = Vec::new();
            let reloaded = policies.poll(&mut own);
            if let Some(e) = &enforcement {
                let hub = &e.proxy.shared.approvals;
                hub.sweep();
                own.extend(hub.take_events().into_iter().map(Box::new));
            }
            if !own.is_empty() {
                host_text.get_or_insert_with(|| cfg.host_name().into());
            }
            for mut ev in own {
                // Events of no session: their id, time and host here.
                ev.event_id = crate::audit::event::new_event_id();
                ev.ts = Timestamp::now();
                ev.host = host_text.clone().unwrap_or_default();
                batch.push(ev);
            }
            if let Some(set) = reloaded {
                secrets.want(set.secrets());
                if let Some(e) = &mut enforcement {
                    e.set_policies(set.clone());
                }
                tracker.set_policies(set);
            }
            if let Some(e) = &mut enforcement {
                if let Err(err) = e.refresh(&|id| tracker.workload_of(id)) {
                    tracing::warn!("{err}");
                }
            }
            // A watermark candidate covers every event made so far: all are handed on.
            if !batch.is_empty()
                && !hand_on(&mut tx, &mut capture, &mut batch, &mut sent, &mut last_send)
            {
                break;
            }
            let now = Timestamp::now();
            watermark.offer(
                sent,
                Timestamp::from_unix_ns(
                    tracker.complete_until_ns(now.unix_micros() as i128 * 1000),
                ),
            );
        }
        if let Some(t) = watermark.ready(flushed.load(Ordering::Relaxed)) {
            let w = continuity::Watermark {
                pid: std::process::id(),
                complete_until: t.to_string(),
                stopped: false,
            };
            if let Err(e) = w.write_running(&cfg.state_dir) {
                tracing::warn!(
                    "{}: {e}",
                    continuity::Watermark::path(&cfg.state_dir).display()
                );
            }
        }
        mute_failures += capture.mute(tracker.drain_mutes().map(|end| (end.sock, end.start_ns)));
        // Batches go to the sink thread when large or 20 ms old: one hand-over (a thread
        // wake-up) per few hundred events, not per drain of the ring.
        if (batch.len() >= SEND_AT || (!batch.is_empty() && last_send.elapsed() >= SEND_EVERY))
            && !hand_on(&mut tx, &mut capture, &mut batch, &mut sent, &mut last_send)
        {
            break;
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            let now = crate::tracker::monotonic_ns();
            tracker.sweep(now, SWEEP_IDLE.as_nanos() as u64, &mut batch);
            capture.unhook_gone_backends();
            last_sweep = Instant::now();
        }
        if last_stats.elapsed() >= Duration::from_secs(1) {
            if let Err(e) = capture.renew_lease() {
                tracing::warn!("renewing the capture's lease: {e}");
            }
            if keep_checkpoint {
                let v = tracker.checkpoint_version();
                if checkpoint_version != Some(v) {
                    write_checkpoint(&tracker.checkpoint(false), &cfg.state_dir);
                    checkpoint_version = Some(v);
                }
            }
            let mut stats = make_stats(
                &tracker,
                &capture,
                &finder,
                policies.counters,
                enforcement.as_ref().map(|e| e.stats()),
                0,
                cpu.read(),
            );
            stats.trail_lag_ms = watermark
                .lag(Timestamp::now())
                .map(|d| d.as_millis() as u64);
            stats.sink_backlog_events = sent.saturating_sub(flushed.load(Ordering::Relaxed));
            stats.sink_backlog_bytes = tx.queued_bytes();
            stats.sink_waits = tx.waits();
            write_stats(&stats_path, &stats);
            if let Some(latest) = &metrics {
                if let Ok(mut m) = latest.lock() {
                    *m = crate::metrics::render(&stats);
                }
            }
            last_stats = Instant::now();
        }
    }

    // Stop: the proxy sends nothing more to servers (what was in flight is answered and
    // recorded first), then take what the kernel still holds, flush in-flight requests,
    // close the sinks.
    if let Some(e) = &enforcement {
        let left = e.stop_relaying(Duration::from_secs(5));
        if left > 0 {
            tracing::warn!("{left} proxied connections still waited for their servers at stop: their statements in flight are recorded without a response");
        }
    }
    while capture.poll(Duration::from_millis(0), 4096, |bytes| {
        if let Some(rec) = Record::parse(bytes) {
            tracker.handle(&rec, &mut batch)
        }
    })? > 0
    {
        if batch.len() >= 4096 {
            let _ = tx.send(std::mem::take(&mut batch));
        }
    }
    drain_proxy(enforcement.as_ref(), &mut tracker, &mut batch);
    // A capture that outlives the daemon goes on from here, for the next daemon.
    if let Some(lease) = capture.release() {
        tracing::info!(
            "the capture goes on for {} s for the next daemon, which takes over what it \
             captured meanwhile (`auditor detach` ends it now)",
            lease.as_secs()
        );
    }
    let final_proxy_stats = enforcement.as_ref().map(|e| e.stats());
    if let Some(e) = enforcement.take() {
        e.release();
    }
    tracker.shutdown(&mut batch);
    if !batch.is_empty() {
        let _ = tx.send(std::mem::take(&mut batch));
    }
    drop(tx);
    let report = sink.join();
    let stats = make_stats(
        &tracker,
        &capture,
        &finder,
        policies.counters,
        final_proxy_stats,
        report.errors,
        cpu.read(),
    );
    write_stats(&stats_path, &stats);
    // The sessions as the next daemon continues them: exactly (same ids, next seq, stream
    // offsets) when every event was written out.
    if keep_checkpoint {
        write_checkpoint(&tracker.checkpoint(report.errors == 0), &cfg.state_dir);
    }
    // Everything read is recorded (in-flight statements as no_response): the trail is
    // complete up to now, unless a sink failed.
    if report.errors == 0 {
        let w = continuity::Watermark {
            pid: std::process::id(),
            complete_until: Timestamp::now().to_string(),
            stopped: true,
        };
        if let Err(e) = w.write(&cfg.state_dir) {
            tracing::warn!(
                "{}: {e}",
                continuity::Watermark::path(&cfg.state_dir).display()
            );
        }
    }
    tracing::info!(
        "stopped; {} events written, {} statements, {} gaps, {} kernel drops",
        report.events,
        stats.tracker.statements,
        stats.tracker.gaps,
        stats.kernel.ringbuf_drops + stats.kernel.control_drops
    );
    if mute_failures > 0 {
        tracing::warn!("{mute_failures} redundant sockets could not be muted (table full?)");
    }
    if malformed_records > 0 {
        tracing::warn!("{malformed_records} malformed ring-buffer records were skipped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_daemon_per_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_state_dir(dir.path(), Duration::ZERO).unwrap();
        let pid = std::process::id().to_string();
        match lock_state_dir(dir.path(), Duration::from_millis(300)) {
            Err(DaemonError::AlreadyRunning(_, holder)) => assert_eq!(holder, pid),
            other => panic!("{other:?}"),
        }
        // Released with the descriptor (a daemon that exits or dies): the next one runs.
        drop(held);
        let _next = lock_state_dir(dir.path(), Duration::ZERO).unwrap();
    }
}
