//! Loads and attaches the eBPF programs, configures which endpoints are watched, and reads
//! the ring buffer and the kernel-side counters.

pub mod btf;

use std::{
    os::fd::{AsFd, AsRawFd},
    path::Path,
    time::Duration,
};

use auditor_common::{counter, EndpointKey, PORT_ANY_ADDR, PORT_LISTED_ADDRS};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
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
];

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
}

pub struct Capture {
    _ebpf: Ebpf,
    ring: RingBuf<MapData>,
    muted: BpfHashMap<MapData, u64, u64>,
    counters: PerCpuArray<MapData, u64>,
    pub attached: Vec<String>,
}

/// Mounts tracefs where the tracepoint attach code looks for it, if it is not there yet.
fn ensure_tracefs() -> Result<(), CaptureError> {
    if Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: static NUL-terminated strings; no data argument.
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
        return Err(CaptureError::Tracefs(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn addr16(ip: &std::net::IpAddr) -> [u8; 16] {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(v6) => v6.octets(),
    }
}

impl Capture {
    /// Loads, configures and attaches everything; on error nothing stays attached (the
    /// programs and links are dropped with the `Ebpf`).
    pub fn start(endpoints: &[Endpoint], ring_buffer_bytes: u32) -> Result<Self, CaptureError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(CaptureError::NotRoot);
        }
        ensure_tracefs()?;
        let offsets = btf::Btf::from_sys_fs()?.kernel_offsets()?;
        let tgid = std::process::id();
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("DAEMON_TGID", &tgid, true)
            .map_max_entries("EVENTS", ring_buffer_bytes)
            .load(aya::include_bytes_aligned!(concat!(
                env!("OUT_DIR"),
                "/auditor"
            )))?;

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

        let mut attached = Vec::new();
        for (category, name) in TRACEPOINTS {
            let program_err = |source| CaptureError::Program {
                name: name.to_string(),
                source,
            };
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| CaptureError::Program {
                    name: name.to_string(),
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(program_err)?;
            prog.load().map_err(program_err)?;
            prog.attach(category, name).map_err(program_err)?;
            attached.push(format!("{category}:{name}"));
        }

        let ring = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or(CaptureError::MissingMap("EVENTS"))?,
        )
        .map_err(|source| CaptureError::Map {
            name: "EVENTS",
            source,
        })?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map("COUNTERS")
                .ok_or(CaptureError::MissingMap("COUNTERS"))?,
        )
        .map_err(|source| CaptureError::Map {
            name: "COUNTERS",
            source,
        })?;
        let muted = BpfHashMap::try_from(
            ebpf.take_map("MUTED")
                .ok_or(CaptureError::MissingMap("MUTED"))?,
        )
        .map_err(|source| CaptureError::Map {
            name: "MUTED",
            source,
        })?;
        Ok(Capture {
            _ebpf: ebpf,
            ring,
            muted,
            counters,
            attached,
        })
    }

    /// Waits up to `timeout` for records, then hands up to `budget` of them to `f` (bounded,
    /// so the caller gets to ship what they produced while the kernel keeps writing).
    /// Returns how many.
    pub fn poll(
        &mut self,
        timeout: Duration,
        budget: usize,
        mut f: impl FnMut(&[u8]),
    ) -> Result<usize, CaptureError> {
        let mut n = self.drain(budget, &mut f);
        if n > 0 {
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
        n += self.drain(budget, &mut f);
        Ok(n)
    }

    fn drain(&mut self, budget: usize, f: &mut impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while n < budget {
            let Some(item) = self.ring.next() else { break };
            f(&item);
            n += 1;
        }
        n
    }

    /// Stops copying the payload of a socket (the redundant end of a local connection).
    /// The kernel forgets it when the socket closes.
    pub fn mute(&mut self, sock: u64, conn_start_ns: u64) -> Result<(), CaptureError> {
        self.muted
            .insert(sock, conn_start_ns, 0)
            .map_err(|source| CaptureError::Map {
                name: "MUTED",
                source,
            })
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
        }
    }
}
