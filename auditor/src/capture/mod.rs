//! Loads and attaches the eBPF programs, configures which endpoints are watched, and reads
//! the ring buffer and the kernel-side counters.

pub mod btf;
pub mod handover;
pub mod session;
pub mod stream;
pub mod tls;

use std::{
    os::{
        fd::{AsFd, AsRawFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use auditor_common::{counter, EndpointKey, Handover, PORT_ANY_ADDR, PORT_LISTED_ADDRS};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        uprobe::{UProbeAttachLocation, UProbeScope},
        TracePoint, UProbe,
    },
    Ebpf, EbpfLoader,
};

use crate::config::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "this needs root (CAP_BPF and CAP_PERFMON): run it as root or with those capabilities"
    )]
    NotRoot,
    #[error(transparent)]
    Btf(#[from] btf::BtfError),
    #[error("mounting tracefs at /sys/kernel/tracing: {0}")]
    Tracefs(std::io::Error),
    #[error("loading the eBPF programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: String,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("polling the ring buffer: {0}")]
    Poll(std::io::Error),
    #[error("the capture's pins: {0}")]
    Pins(String),
}

/// (tracepoint category, name) of every program, by program name.
const TRACEPOINTS: &[(&str, &str)] = &[
    ("syscalls", "sys_enter_read"),
    ("syscalls", "sys_exit_read"),
    ("syscalls", "sys_enter_write"),
    ("syscalls", "sys_exit_write"),
    ("syscalls", "sys_enter_recvfrom"),
    ("syscalls", "sys_exit_recvfrom"),
    ("syscalls", "sys_enter_sendto"),
    ("syscalls", "sys_exit_sendto"),
    ("syscalls", "sys_enter_readv"),
    ("syscalls", "sys_exit_readv"),
    ("syscalls", "sys_enter_writev"),
    ("syscalls", "sys_exit_writev"),
    ("syscalls", "sys_enter_recvmsg"),
    ("syscalls", "sys_exit_recvmsg"),
    ("syscalls", "sys_enter_sendmsg"),
    ("syscalls", "sys_exit_sendmsg"),
    ("syscalls", "sys_enter_connect"),
    ("syscalls", "sys_exit_connect"),
    ("syscalls", "sys_exit_accept"),
    ("syscalls", "sys_exit_accept4"),
    ("sock", "inet_sock_set_state"),
    ("sched", "sched_process_exit"),
    ("sched", "sched_process_exec"),
    ("syscalls", "sys_enter_mmap"),
];

/// Tracepoints needed only to find TLS libraries.
const TLS_TRACEPOINTS: &[&str] = &["sched_process_exec", "sys_enter_mmap"];

/// Entry programs of the TLS uprobes (see tls::TLS_FUNCTIONS) and the one return program.
const TLS_ENTRY_PROGRAMS: &[&str] = &[
    "ssl_read",
    "ssl_write",
    "ssl_read_ex",
    "ssl_write_ex",
    "ssl_other",
];
const TLS_RETURN_PROGRAM: &str = "ssl_return";

/// The programs that copy payload come in two builds: with `bpf_loop` (Linux 5.17+, up to
/// MAX_CHUNKS_PER_CALL chunks per call) and `<name>_compat` without (COMPAT_CHUNKS_PER_CALL).
const COPYING_EXITS: &[&str] = &[
    "sys_exit_read",
    "sys_exit_write",
    "sys_exit_recvfrom",
    "sys_exit_sendto",
    "sys_exit_readv",
    "sys_exit_writev",
    "sys_exit_recvmsg",
    "sys_exit_sendmsg",
];

/// The entries of the read/write family: attached only where the exits cannot take their
/// calls alone (see `exit_only`).
const IO_ENTRIES: &[&str] = &[
    "sys_enter_read",
    "sys_enter_write",
    "sys_enter_recvfrom",
    "sys_enter_sendto",
    "sys_enter_readv",
    "sys_enter_writev",
    "sys_enter_recvmsg",
    "sys_enter_sendmsg",
];

/// Set (to anything) to load the programs as an older kernel gets them (built without
/// `bpf_loop`, and walking from the task to its files with helper reads) even where the
/// kernel has what the newer ones use (how the tests keep them working).
pub const NO_BPF_LOOP_ENV: &str = "AUDITOR_NO_BPF_LOOP";

/// Kernel-side counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct KernelCounters {
    pub ringbuf_drops: u64,
    pub truncated_calls: u64,
    pub truncated_bytes: u64,
    pub read_failures: u64,
    pub conn_table_full: u64,
    pub chunks: u64,
    pub bytes: u64,
    pub control_drops: u64,
    pub tls_untied_calls: u64,
    pub tls_untied_bytes: u64,
    pub tls_chunks: u64,
    pub file_drops: u64,
    /// Connections of enforced workloads sent to the inline proxy, and refused (no proxy).
    #[serde(default)]
    pub redirected: u64,
    #[serde(default)]
    pub redirect_refused: u64,
    /// Reads and writes of watched sockets not followed: the table of calls in flight
    /// was full.
    #[serde(default)]
    pub pending_full: u64,
    /// TLS library calls on watched sockets not followed because the table of TLS calls
    /// in flight was full.
    #[serde(default)]
    pub tls_calls_full: u64,
}

/// One eBPF program's runs and their time, as the kernel counts them while
/// `kernel.bpf_stats_enabled` is 1 (`cargo xtask bench` turns it on for its runs).
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProgramRuns {
    pub runs: u64,
    pub run_time_ns: u64,
}

/// How the capture outlives the daemon (see [`handover`]).
#[derive(Debug, Clone)]
pub struct HandoverSettings {
    /// `capture.pin_dir`.
    pub base: PathBuf,
    /// The trail's state directory: only a daemon of the same trail takes a capture over.
    pub state_dir: PathBuf,
    /// `capture.keep_while_stopped_s`.
    pub keep_s: u32,
}

/// What this daemon found when it took the capture over.
#[derive(Debug, Clone, Copy)]
pub struct Takeover {
    /// The generation that was on duty, when this daemon took over a capture left running
    /// (its ring holds what was captured while no daemon ran).
    pub previous: Option<Handover>,
    /// Kernel time of the takeover.
    pub at_ns: u64,
}

pub struct Capture {
    ebpf: Ebpf,
    /// The pinned capture this daemon's programs belong to, when it outlives the daemon.
    pins: Option<handover::Pins>,
    handover: Array<MapData, Handover>,
    /// This generation's pinned links (tracepoints and TLS uprobes).
    links: Vec<aya::programs::links::PinnedLink>,
    ring: RingBuf<MapData>,
    /// The last drain stopped at its budget: more records may be waiting.
    ring_had_more: bool,
    muted: BpfHashMap<MapData, u64, u64>,
    /// Moved on after each insertion into `muted` (the programs look a socket up there
    /// again only when it changed).
    mute_epoch: Array<MapData, u32>,
    known_files: BpfHashMap<MapData, [u64; 2], u8>,
    counters: PerCpuArray<MapData, u64>,
    pub attached: Vec<String>,
    /// Loaded, not attached yet: (category, tracepoint, program).
    to_attach: Vec<(&'static str, &'static str, String)>,
    /// Unix-domain sockets are watched (this kernel's BTF describes them).
    pub unix_sockets: bool,
    /// Loopback connections carry their network namespace (`Tuple::netns`).
    pub netns_known: bool,
    /// Bytes one read or write call is copied up to (more is recorded as a gap).
    pub copy_limit: u64,
    /// Why the programs with `bpf_loop` were not used (a kernel before 5.17 refuses them).
    pub without_bpf_loop: Option<String>,
    /// Reads and writes are taken at their exits alone (see `exit_only`).
    pub exit_only: bool,
    tls_return_program: &'static str,
    /// Why backends older than the daemon cannot be asked for statement texts (the
    /// PortalDefineQuery probe did not load), if so.
    pub server_probe_error: Option<String>,
    /// The backends hooked, with their probe (see [`Capture::hook_backend`]).
    backend_hooks: std::collections::HashMap<u32, aya::programs::uprobe::UProbeLinkId>,
    /// PortalDefineQuery's file offset in each Postgres executable examined (dev, inode).
    server_symbols: std::collections::HashMap<(u64, u64), Option<u64>>,
    old_backends: Option<BpfHashMap<MapData, u32, u8>>,
}

/// The uprobe on Postgres's PortalDefineQuery (auditor-ebpf/src/server.rs).
const SERVER_PROGRAM: &str = "portal_define_query";

/// Mounts tracefs where the tracepoint attach code looks for it, if it is not there yet.
fn ensure_tracefs() -> Result<(), CaptureError> {
    if Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    mount_fs(c"tracefs", c"/sys/kernel/tracing").map_err(CaptureError::Tracefs)
}

/// Mounts a kernel filesystem of type `fstype` at `target` (tracefs, bpffs).
pub fn mount_fs(fstype: &std::ffi::CStr, target: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn addr16(ip: &std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

/// Takes a map out of the object as its typed handle.
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, CaptureError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))?;
    M::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

/// Links of tracepoints and uprobes can be pinned (outlive the daemon) from Linux 5.15
/// (BPF links of perf events).
fn perf_links_pin() -> Result<(), String> {
    match aya::util::KernelVersion::current() {
        Ok(v) if v >= aya::util::KernelVersion::new(5, 15, 0) => Ok(()),
        Ok(v) => Err(format!(
            "Linux {v} cannot pin tracepoint links (5.15 and later can)"
        )),
        Err(e) => Err(format!("the kernel's version: {e}")),
    }
}

/// `load()` of the program types used here.
trait Loadable {
    fn load_into_kernel(&mut self) -> Result<(), aya::programs::ProgramError>;
}

impl Loadable for TracePoint {
    fn load_into_kernel(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

impl Loadable for UProbe {
    fn load_into_kernel(&mut self) -> Result<(), aya::programs::ProgramError> {
        self.load()
    }
}

/// The program `name`, loaded into the kernel, as its typed handle.
fn load_program<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, CaptureError>
where
    P: Loadable + 'a,
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program_err = |source| CaptureError::Program {
        name: name.to_string(),
        source,
    };
    let prog: &mut P = ebpf
        .program_mut(name)
        .ok_or_else(|| program_err(aya::programs::ProgramError::UnexpectedProgramType))?
        .try_into()
        .map_err(program_err)?;
    prog.load_into_kernel().map_err(program_err)?;
    Ok(prog)
}

/// 1 where the programs may walk from the task to its files with typed loads
/// (`bpf_get_current_task_btf`, Linux 5.11+); 0 on older kernels, and where the tests ask
/// for the programs of old kernels (NO_BPF_LOOP_ENV).
fn task_btf() -> u8 {
    if std::env::var_os(NO_BPF_LOOP_ENV).is_some() {
        return 0;
    }
    match aya::util::KernelVersion::current() {
        Ok(v) => (v >= aya::util::KernelVersion::new(5, 11, 0)) as u8,
        Err(_) => 0,
    }
}

/// 1 where the read/write family is taken at its exits alone: the exit reads its call's
/// arguments from the task's registers (`bpf_task_pt_regs`, Linux 5.15+, on the typed
/// task of TASK_BTF, at offsets this kernel's BTF gives for this architecture), so the
/// entry tracepoints are not attached: a failed call (EAGAIN) costs one short run and no
/// table of calls in flight can fill. 0 elsewhere: each entry notes its call in `PENDING`.
fn exit_only(task_btf: u8, offsets: &auditor_common::KernelOffsets) -> u8 {
    let kernel = aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 15, 0));
    (task_btf != 0 && kernel && offsets.regs_args.iter().all(|&o| o != u32::MAX)) as u8
}

/// Whether the verifier refused a program because the kernel has no `bpf_loop` helper
/// (number 181): "invalid func unknown#181" before 5.17, "unknown func bpf_loop#181" where
/// a kernel knows the name but not the helper for this program type.
fn lacks_bpf_loop(e: &CaptureError) -> bool {
    let CaptureError::Program {
        source: aya::programs::ProgramError::LoadError { verifier_log, .. },
        ..
    } = e
    else {
        return false;
    };
    verifier_log.to_string().lines().any(|l| {
        let l = l.trim();
        (l.starts_with("invalid func") || l.starts_with("unknown func")) && l.ends_with("#181")
    })
}

/// Attaches the loaded uprobe `program` at `offset` of file `target`, in every process.
fn attach_uprobe(
    ebpf: &mut Ebpf,
    program: &str,
    offset: u64,
    target: &Path,
    scope: UProbeScope,
) -> Result<aya::programs::uprobe::UProbeLinkId, aya::programs::ProgramError> {
    let p: &mut UProbe = ebpf
        .program_mut(program)
        .ok_or(aya::programs::ProgramError::UnexpectedProgramType)?
        .try_into()?;
    p.attach(UProbeAttachLocation::AbsoluteOffset(offset), target, scope)
}

/// A loading error without the whole verifier log (it can run to megabytes): the error and
/// the log's last lines, which say why.
fn brief(e: &CaptureError) -> String {
    let CaptureError::Program {
        name,
        source:
            aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            },
    } = e
    else {
        return e.to_string();
    };
    let log = verifier_log.to_string();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(6)..].join(" | ");
    format!("eBPF program {name}: {io_error}; verifier: {tail}")
}

/// Chunks one read or write call may take: `max_call_bytes` (the configuration bounds it to
/// 2-64 MiB), but no more than half the ring, so that a huge call leaves room for the other
/// connections' records; never fewer than MAX_CHUNKS_PER_CALL (2 MiB), the programs' own
/// floor. With the defaults (16 MiB ring, 8 MiB per call) ORMs' bulk inserts and JSON
/// documents of a few megabytes arrive whole; what a call moves beyond is a gap.
pub fn chunks_per_call(ring_buffer_bytes: u32, max_call_bytes: u32) -> u32 {
    let chunk = auditor_common::CHUNK_DATA as u32;
    (max_call_bytes.min(ring_buffer_bytes / 2) / chunk)
        .clamp(auditor_common::MAX_CHUNKS_PER_CALL, (64 << 20) / chunk)
}

impl Capture {
    /// Loads and configures everything; [`Capture::attach`] then begins capture. On error
    /// nothing stays attached (the programs and links are dropped with the `Ebpf`).
    /// `tls`: also load the OpenSSL uprobes and watch for new programs and libraries.
    /// `redirect_pins`: a directory on bpffs where the redirect's maps are pinned (and
    /// found again by the next daemon, so that enforcement holds across a restart).
    /// `handover`: pin the capture so that it outlives the daemon, and take over the one
    /// the daemon before left running (see [`handover`]); without it, or where it cannot
    /// be pinned, the capture ends with the daemon.
    /// `bare`: the tracepoint programs return at once (see `RunOptions::bare_hooks`).
    pub fn start(
        endpoints: &[Endpoint],
        ring_buffer_bytes: u32,
        max_call_bytes: u32,
        tls: bool,
        redirect_pins: Option<&Path>,
        handover: Option<&HandoverSettings>,
        bare: bool,
    ) -> Result<Self, CaptureError> {
        // Records wake the daemon only when an eighth of the ring is waiting; otherwise it
        // drains on its own timer (`poll`).
        let wake_bytes = u64::from(ring_buffer_bytes / 8);
        // Each CPU looks at the ring's fill once per this many bytes it sent.
        let cpus = aya::util::nr_cpus().map_or(256, |n| n.max(1)) as u64;
        let wake_check_bytes = wake_bytes / (2 * cpus);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(CaptureError::NotRoot);
        }
        ensure_tracefs()?;
        let offsets = btf::Btf::from_sys_fs()?.kernel_offsets()?;
        let tgid = std::process::id();
        let chunks_per_call = chunks_per_call(ring_buffer_bytes, max_call_bytes);
        let pin_paths: Vec<(&str, PathBuf)> = redirect_pins
            .map(|dir| {
                crate::proxy::redirect::PINNED_MAPS
                    .iter()
                    .map(|m| (*m, dir.join(m)))
                    .collect()
            })
            .unwrap_or_default();
        let task_btf = task_btf();
        let exit_only = exit_only(task_btf, &offsets);
        let object: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/auditor"));
        let pins = handover.and_then(|h| {
            // Programs that note calls at their entries and ones that take them at their
            // exits alone cannot complete each other's calls: another capture.
            let id = handover::capture_id(
                &h.state_dir,
                object,
                ring_buffer_bytes,
                chunks_per_call,
                exit_only,
            );
            match perf_links_pin().and_then(|()| handover::prepare(&h.base, &id, h.keep_s)) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(
                        "the capture cannot outlive the daemon ({e}): a restart will lose \
                         what runs while no daemon does (recorded as a gap)"
                    );
                    None
                }
            }
        });
        let generation = pins.as_ref().map_or(1, |p| p.generation);
        let mut loader = EbpfLoader::new();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        if let Some(p) = &pins {
            for name in handover::SHARED_MAPS {
                loader.map_pin_path(name, p.map_path(name));
            }
        }
        let mut ebpf = loader
            .override_global("OFFSETS", &offsets, true)
            .override_global("DAEMON_TGID", &tgid, true)
            .override_global("TASK_BTF", &task_btf, true)
            .override_global("EXIT_ONLY", &exit_only, true)
            .override_global("WAKE_BYTES", &wake_bytes, true)
            .override_global("WAKE_CHECK_BYTES", &wake_check_bytes, true)
            .override_global("CHUNKS_PER_CALL", &chunks_per_call, true)
            .override_global("GENERATION", &generation, true)
            .override_global("BARE", &u8::from(bare), true)
            .map_max_entries("EVENTS", ring_buffer_bytes)
            .load(object)?;

        {
            let map = ebpf
                .map_mut("PORT_RULES")
                .ok_or(CaptureError::MissingMap("PORT_RULES"))?;
            let mut rules: Array<_, u8> =
                Array::try_from(map).map_err(|source| CaptureError::Map {
                    name: "PORT_RULES",
                    source,
                })?;
            for e in endpoints {
                let current = rules.get(&(e.port as u32), 0).unwrap_or(0);
                let rule = match (e.address, current) {
                    (None, _) | (_, PORT_ANY_ADDR) => PORT_ANY_ADDR,
                    (Some(_), _) => PORT_LISTED_ADDRS,
                };
                rules
                    .set(e.port as u32, rule, 0)
                    .map_err(|source| CaptureError::Map {
                        name: "PORT_RULES",
                        source,
                    })?;
            }
        }
        {
            let map = ebpf
                .map_mut("ENDPOINTS")
                .ok_or(CaptureError::MissingMap("ENDPOINTS"))?;
            let mut listed: BpfHashMap<_, EndpointKey, u8> =
                BpfHashMap::try_from(map).map_err(|source| CaptureError::Map {
                    name: "ENDPOINTS",
                    source,
                })?;
            for e in endpoints {
                if let Some(ip) = &e.address {
                    let key = EndpointKey {
                        addr: addr16(ip),
                        port: e.port,
                        _pad: [0; 6],
                    };
                    listed
                        .insert(key, 1, 0)
                        .map_err(|source| CaptureError::Map {
                            name: "ENDPOINTS",
                            source,
                        })?;
                }
            }
        }

        // Every program is loaded before any is attached: a hook that fires while the rest
        // are still being verified would fill the ring before the daemon reads it.
        let mut without_bpf_loop =
            std::env::var_os(NO_BPF_LOOP_ENV).map(|_| format!("{NO_BPF_LOOP_ENV} is set"));
        let mut to_attach = Vec::new();
        for (category, name) in TRACEPOINTS {
            if !tls && TLS_TRACEPOINTS.contains(name) {
                continue;
            }
            if exit_only != 0 && IO_ENTRIES.contains(name) {
                continue;
            }
            let copying = COPYING_EXITS.contains(name);
            let compat = format!("{name}_compat");
            let mut program = if copying && without_bpf_loop.is_some() {
                compat.clone()
            } else {
                name.to_string()
            };
            if let Err(e) = load_program::<TracePoint>(&mut ebpf, &program).map(|_| ()) {
                if !copying || without_bpf_loop.is_some() {
                    return Err(e);
                }
                without_bpf_loop = Some(match lacks_bpf_loop(&e) {
                    // A kernel before 5.17 does not know the helper.
                    true => "this kernel has no bpf_loop helper".to_string(),
                    // Any other refusal is ours to mend: the looping build must load on
                    // every kernel that has the helper. Run on, loudly, with the compat build.
                    false => {
                        tracing::error!(
                            "the verifier refused {program}, which copies with bpf_loop; \
                             falling back to the build without it: {}",
                            brief(&e)
                        );
                        format!("the verifier refused {program}")
                    }
                });
                program = compat;
                load_program::<TracePoint>(&mut ebpf, &program)?;
            }
            to_attach.push((*category, *name, program));
        }
        let tls_return_program = if without_bpf_loop.is_some() {
            "ssl_return_compat"
        } else {
            TLS_RETURN_PROGRAM
        };
        let tls_programs: &[&str] = if tls { TLS_ENTRY_PROGRAMS } else { &[] };
        for name in tls_programs
            .iter()
            .chain(tls.then_some(&tls_return_program))
        {
            load_program::<UProbe>(&mut ebpf, name)?;
        }
        let mut server_probe_error = load_program::<UProbe>(&mut ebpf, SERVER_PROGRAM)
            .err()
            .map(|e| brief(&e));
        let old_backends = match take_map(&mut ebpf, "OLD_BACKENDS") {
            Ok(m) => Some(m),
            Err(e) => {
                server_probe_error.get_or_insert(e.to_string());
                None
            }
        };
        let chunks = if without_bpf_loop.is_some() {
            auditor_common::COMPAT_CHUNKS_PER_CALL
        } else {
            chunks_per_call
        };

        let ring = take_map(&mut ebpf, "EVENTS")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let muted = take_map(&mut ebpf, "MUTED")?;
        let mute_epoch = take_map(&mut ebpf, "MUTE_EPOCH")?;
        let known_files = take_map(&mut ebpf, "KNOWN_FILES")?;
        let handover = take_map(&mut ebpf, "HANDOVER")?;
        Ok(Capture {
            ebpf,
            pins,
            handover,
            links: Vec::new(),
            ring,
            ring_had_more: true,
            muted,
            mute_epoch,
            known_files,
            counters,
            attached: Vec::new(),
            to_attach,
            unix_sockets: offsets.unix_valid != 0,
            netns_known: offsets.sock_net != u32::MAX,
            copy_limit: u64::from(chunks) * auditor_common::CHUNK_DATA as u64,
            without_bpf_loop,
            exit_only: exit_only != 0,
            tls_return_program,
            server_probe_error,
            backend_hooks: Default::default(),
            server_symbols: Default::default(),
            old_backends,
        })
    }

    /// Attaches the syscall tracepoints: capture begins. (Everything else is ready first:
    /// records flow from here on.)
    pub fn attach(&mut self) -> Result<(), CaptureError> {
        for (category, name, program) in std::mem::take(&mut self.to_attach) {
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut(&program)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| CaptureError::Program {
                    name: program.clone(),
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                })?;
            let program_err = |source| CaptureError::Program {
                name: name.to_string(),
                source,
            };
            let id = prog.attach(category, name).map_err(program_err)?;
            if let Some(pins) = &self.pins {
                let link = prog.take_link(id).map_err(program_err)?;
                let fd = aya::programs::links::FdLink::try_from(link)
                    .map_err(|e| CaptureError::Pins(format!("{name}: {e}")))?;
                self.links
                    .push(pins.pin_link(fd, name).map_err(CaptureError::Pins)?);
            }
            self.attached.push(format!("{category}:{name}"));
        }
        Ok(())
    }

    /// Puts this daemon's programs on duty (they were attached idle): from here on they
    /// capture, and those of the daemon before (if it left its capture running) do
    /// nothing; the calls those began, these complete. Then the old links go.
    ///
    /// Where reads and writes are taken at their exits alone, nothing claims a call
    /// between the old program's run and this one's (the two run one after the other for
    /// each call), so the takeover goes in steps: the old generation is told it hands over
    /// (from then on it marks each call it takes, and the new one leaves those), a moment
    /// later the new one goes on duty, then the old links go and the marking ends.
    pub fn take_over(&mut self) -> Result<Takeover, CaptureError> {
        let previous = self.pins.as_ref().and_then(|p| p.previous);
        let handing_over = previous
            .map(|h| h.generation)
            .filter(|&g| g != 0 && self.exit_only);
        // Longer than any one call's run of the programs: a call seen by the old program
        // before a step and by the new one after it has ended by the next step.
        let settle = std::time::Duration::from_millis(20);
        if let (Some(old), Some(h)) = (handing_over, previous) {
            self.write_handover(Handover {
                handing_over: old,
                ..h
            })?;
            std::thread::sleep(settle);
        }
        let now = handover::kernel_now_ns();
        self.set_handover(now, handing_over.unwrap_or(0))?;
        if let Some(p) = &self.pins {
            p.remove_older_generations();
        }
        if handing_over.is_some() {
            std::thread::sleep(settle);
            self.set_handover(now, 0)?;
        }
        Ok(Takeover {
            previous,
            at_ns: now,
        })
    }

    fn set_handover(&mut self, now: u64, handing_over: u64) -> Result<Handover, CaptureError> {
        let value = match &self.pins {
            Some(p) => Handover {
                handing_over,
                ..p.handover_at(now)
            },
            None => Handover {
                generation: 1,
                lease_until_ns: u64::MAX,
                handing_over: 0,
            },
        };
        self.write_handover(value)?;
        Ok(value)
    }

    fn write_handover(&mut self, value: Handover) -> Result<(), CaptureError> {
        self.handover
            .set(0, value, 0)
            .map_err(|source| CaptureError::Map {
                name: "HANDOVER",
                source,
            })
    }

    /// Renews the lease of a capture that outlives the daemon (each second): it runs
    /// `capture.keep_while_stopped_s` from the daemon's last renewal.
    pub fn renew_lease(&mut self) -> Result<(), CaptureError> {
        if self.pins.is_some() {
            self.set_handover(handover::kernel_now_ns(), 0)?;
        }
        Ok(())
    }

    /// At the daemon's stop: a capture that outlives the daemon gets its lease from now
    /// and stays; returns for how long (None: the capture ends with the daemon).
    pub fn release(&mut self) -> Option<Duration> {
        self.pins.as_ref()?;
        let now = handover::kernel_now_ns();
        match self.set_handover(now, 0) {
            Ok(value) => Some(Duration::from_nanos(
                value.lease_until_ns.saturating_sub(now),
            )),
            Err(e) => {
                tracing::warn!("renewing the capture's lease at stop: {e}");
                None
            }
        }
    }

    /// Where the capture is pinned, if it outlives the daemon.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.dir.as_path())
    }

    /// Asks backend `pid` (a Postgres server process older than the daemon) for the text of
    /// each named prepared statement it binds (its Parse went by before capture): it is
    /// listed in OLD_BACKENDS and gets its own uprobe on PortalDefineQuery, removed when
    /// it exits ([`Capture::unhook_gone_backends`]). A probe scoped to the process puts
    /// its breakpoint in that process alone: one on the executable would trap in every
    /// backend's every Bind (on a VM, the trap and single step of a uprobe cost as much as
    /// a whole select-only transaction), for as long as one old backend lives (a pooler's
    /// server connections can live for hours). Returns whether `pid` was hooked now.
    pub fn hook_backend(&mut self, pid: u32) -> Result<bool, String> {
        use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
        if self.server_probe_error.is_some() || self.backend_hooks.contains_key(&pid) {
            return Ok(false);
        }
        let Some(scope) = std::num::NonZeroU32::new(pid) else {
            return Ok(false);
        };
        let exe = format!("/proc/{pid}/exe");
        let file = std::fs::File::open(&exe).map_err(|e| format!("{exe}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("{exe}: {e}"))?;
        let id = (meta.dev(), meta.ino());
        let offset = match self.server_symbols.get(&id) {
            Some(o) => *o,
            None => {
                let o = tls::find_symbols_in(&file, &["PortalDefineQuery"])
                    .map_err(|e| format!("{exe}: {e}"))?
                    .and_then(|found| found.first().map(|(_, o)| *o));
                self.server_symbols.insert(id, o);
                o
            }
        };
        let Some(offset) = offset else {
            return Ok(false);
        };
        if let Some(map) = &mut self.old_backends {
            map.insert(pid, 1, 0)
                .map_err(|e| format!("OLD_BACKENDS: {e}"))?;
        }
        // Through the daemon's own descriptor: the same inode, whatever mount namespace
        // the backend runs in.
        let target = format!("/proc/self/fd/{}", file.as_raw_fd());
        let link = attach_uprobe(
            &mut self.ebpf,
            SERVER_PROGRAM,
            offset,
            Path::new(&target),
            UProbeScope::OneProcess(scope),
        )
        .map_err(|e| format!("PortalDefineQuery in {exe}: {e}"))?;
        self.backend_hooks.insert(pid, link);
        Ok(true)
    }

    /// Forgets the hooked backends that have exited, and removes their probes.
    pub fn unhook_gone_backends(&mut self) {
        let gone: Vec<u32> = self
            .backend_hooks
            .keys()
            .copied()
            .filter(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            .collect();
        for pid in gone {
            let Some(link) = self.backend_hooks.remove(&pid) else {
                continue;
            };
            if let Some(map) = &mut self.old_backends {
                let _ = map.remove(&pid);
            }
            if let Some(p) = self
                .ebpf
                .program_mut(SERVER_PROGRAM)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
            {
                let _ = p.detach(link);
            }
        }
    }

    pub fn hooked_backends(&self) -> usize {
        self.backend_hooks.len()
    }

    /// Hands up to `budget` records to `f` (bounded, so the caller gets to ship what they
    /// produced while the kernel keeps writing). If the previous call emptied the ring, it
    /// first waits `timeout`: records do not wake the daemon (only a ring an eighth full
    /// does), so this wait is what batches the work. Returns how many records.
    pub fn poll(
        &mut self,
        timeout: Duration,
        budget: usize,
        mut f: impl FnMut(&[u8]),
    ) -> Result<usize, CaptureError> {
        if self.ring_had_more {
            let n = self.drain(budget, &mut f);
            self.ring_had_more = n == budget;
            return Ok(n);
        }
        let mut pfd = libc::pollfd {
            fd: self.ring.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(CaptureError::Poll(err));
            }
        }
        let n = self.drain(budget, &mut f);
        self.ring_had_more = n == budget;
        Ok(n)
    }

    fn drain(&mut self, budget: usize, f: &mut impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while n < budget {
            let Some(item) = self.ring.next() else { break };
            // The next record follows this one (8-byte aligned, after its 8-byte header;
            // the ring's pages are mapped twice, so past the end is its beginning): its
            // header is asked for while this one is decoded (see `cache`).
            crate::cache::prefetch_bytes(
                item.as_ptr().wrapping_add(item.len().next_multiple_of(8)),
                128,
                false,
            );
            f(&item);
            n += 1;
        }
        n
    }

    /// Stops copying the payload of sockets (the redundant ends of local connections),
    /// each given as (socket, its connection's first-seen time). The kernel forgets them
    /// when they close. Returns how many could not be muted (the table is full: their
    /// payload keeps coming, and is dropped here).
    pub fn mute(&mut self, ends: impl IntoIterator<Item = (u64, u64)>) -> u64 {
        let (mut added, mut failed) = (0u64, 0u64);
        for (sock, conn_start_ns) in ends {
            match self.muted.insert(sock, conn_start_ns, 0) {
                Ok(()) => added += 1,
                Err(_) => failed += 1,
            }
        }
        if added > 0 {
            // After the insertions: a program that sees the new epoch finds them.
            let epoch = self.mute_epoch.get(&0, 0).unwrap_or(0);
            if self.mute_epoch.set(0, epoch.wrapping_add(1), 0).is_err() {
                // Sockets the programs found unmuted since the last epoch keep coming.
                failed += added;
            }
        }
        failed
    }

    /// Hooks the TLS functions of one file (every process mapping it, now or later).
    /// Returns how many functions were hooked; the first failure, if any, is returned
    /// after trying them all.
    pub fn hook_tls(
        &mut self,
        path: &Path,
        symbols: &tls::TlsSymbols,
    ) -> (usize, Option<CaptureError>) {
        let mut hooked = 0;
        let mut first_error = None;
        for (function, offset) in &symbols.functions {
            let Some((_, entry)) = tls::TLS_FUNCTIONS.iter().find(|(f, _)| f == function) else {
                continue;
            };
            let mut ok = true;
            for program in [*entry, self.tls_return_program] {
                let result = attach_uprobe(
                    &mut self.ebpf,
                    program,
                    *offset,
                    path,
                    UProbeScope::AllProcesses,
                )
                .and_then(|id| self.pin_uprobe_link(program, id));
                if let Err(source) = result {
                    ok = false;
                    first_error.get_or_insert(CaptureError::Program {
                        name: format!("{program} at {function} in {}", path.display()),
                        source,
                    });
                }
            }
            if ok {
                hooked += 1;
            }
        }
        (hooked, first_error)
    }

    /// A capture that outlives the daemon keeps its TLS hooks too: the link is pinned
    /// (the program's own handle lets go of it).
    fn pin_uprobe_link(
        &mut self,
        program: &str,
        id: aya::programs::uprobe::UProbeLinkId,
    ) -> Result<(), aya::programs::ProgramError> {
        let Some(pins) = &self.pins else {
            return Ok(());
        };
        let p: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .ok_or(aya::programs::ProgramError::UnexpectedProgramType)?
            .try_into()?;
        let link = p.take_link(id)?;
        let fd = aya::programs::links::FdLink::try_from(link).map_err(|e| {
            aya::programs::ProgramError::IOError(std::io::Error::other(e.to_string()))
        })?;
        let name = format!("{program}-{}", self.links.len());
        let pinned = pins
            .pin_link(fd, &name)
            .map_err(|e| aya::programs::ProgramError::IOError(std::io::Error::other(e)))?;
        self.links.push(pinned);
        Ok(())
    }

    /// Tells the kernel side a file was examined, so it is not reported again.
    pub fn mark_file_known(&mut self, id: tls::FileId) {
        let _ = self.known_files.insert([id.0, id.1], 1, 0);
    }

    /// Examines one file and hooks it if it is a TLS library. Returns the library hooked.
    pub fn consider_tls_file(
        &mut self,
        finder: &mut tls::TlsFinder,
        cand: &tls::Candidate,
    ) -> Option<tls::TlsLibrary> {
        if !finder.mark(cand.id) {
            return None;
        }
        self.mark_file_known(cand.id);
        finder.counted_check();
        // The file is opened once and hooked through the daemon's own descriptor
        // (/proc/self/fd/N names the same inode), so a process that exits meanwhile, or
        // lives in another mount namespace, does not matter.
        let file = cand.open_paths.iter().find_map(|p| {
            let f = std::fs::File::open(p).ok()?;
            let meta = f.metadata().ok()?;
            (meta.ino() == cand.id.1).then_some(f)
        })?;
        let symbols = match tls::find_tls_symbols_in(&file) {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!("reading {}: {e}", cand.shown);
                return None;
            }
        };
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let (hooked, error) = self.hook_tls(&path, &symbols);
        if let Some(e) = &error {
            finder.counters.hook_failures += 1;
            tracing::warn!("hooking TLS in {}: {e}", cand.shown);
        }
        if hooked == 0 {
            return None;
        }
        finder.counters.libraries_hooked += 1;
        let lib = tls::TlsLibrary {
            path: cand.shown.clone(),
            id: cand.id,
            functions: hooked,
        };
        finder.libraries.push(lib.clone());
        Some(lib)
    }

    /// The loaded object, for the redirect (see `proxy::redirect`).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The runs of each program that ran so far, by name: empty unless the kernel counts
    /// them (`sysctl kernel.bpf_stats_enabled=1`, which costs a little on every run).
    pub fn program_runs(&self) -> std::collections::BTreeMap<String, ProgramRuns> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                let runs = ProgramRuns {
                    runs: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                };
                (runs.runs > 0).then(|| (name.to_string(), runs))
            })
            .collect()
    }

    pub fn counters(&self) -> KernelCounters {
        let get = |i: u32| -> u64 {
            self.counters
                .get(&i, 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            ringbuf_drops: get(counter::RINGBUF_DROPS),
            truncated_calls: get(counter::TRUNCATED_CALLS),
            truncated_bytes: get(counter::TRUNCATED_BYTES),
            read_failures: get(counter::READ_FAILURES),
            conn_table_full: get(counter::CONN_TABLE_FULL),
            chunks: get(counter::CHUNKS),
            bytes: get(counter::BYTES),
            control_drops: get(counter::CONTROL_DROPS),
            tls_untied_calls: get(counter::TLS_UNTIED_CALLS),
            tls_untied_bytes: get(counter::TLS_UNTIED_BYTES),
            tls_chunks: get(counter::TLS_CHUNKS),
            file_drops: get(counter::FILE_DROPS),
            redirected: get(counter::REDIRECTED),
            redirect_refused: get(counter::REDIRECT_REFUSED),
            pending_full: get(counter::PENDING_FULL),
            tls_calls_full: get(counter::TLS_CALLS_FULL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chunks_per_call;

    #[test]
    fn a_call_takes_its_bound_within_half_the_ring_and_never_under_2_mib() {
        let mib = |n: u32| n << 20;
        let chunks = |ring, call| chunks_per_call(ring, call) as u64 * 16384;
        // The defaults: 8 MiB per call from a 16 MiB ring.
        assert_eq!(chunks(mib(16), mib(8)), 8 << 20);
        assert_eq!(chunks(mib(256), mib(64)), 64 << 20);
        // Half the ring at most ...
        assert_eq!(chunks(mib(8), mib(8)), 4 << 20);
        // ... but never fewer chunks than the programs' floor.
        assert_eq!(chunks(mib(1), mib(8)), 2 << 20);
        assert_eq!(chunks(1 << 16, mib(2)), 2 << 20);
    }
}
