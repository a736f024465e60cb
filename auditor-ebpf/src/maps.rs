//! Maps and globals shared by the programs.

use auditor_common::{counter, DataRecord, EndpointKey, KernelOffsets, Tuple};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    Global,
};

/// Field offsets of the running kernel, filled in by the daemon at load time.
#[unsafe(no_mangle)]
pub static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_f_inode: 0,
    file_private_data: 0,
    inode_i_mode: 0,
    socket_sk: 0,
    sock_family: 0,
    sock_num: 0,
    sock_dport: 0,
    sock_daddr: 0,
    sock_rcv_saddr: 0,
    sock_v6_daddr: 0,
    sock_v6_rcv_saddr: 0,
    sock_protocol: 0,
    valid: 0,
    _pad: 0,
});

/// The daemon's own tgid: its traffic is never captured.
#[unsafe(no_mangle)]
pub static DAEMON_TGID: Global<u32> = Global::new(0);

/// Chunks and connection records for the daemon. Sized by the daemon at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(16 * 1024 * 1024, 0);

/// PORT_RULES[port]: PORT_NONE, PORT_ANY_ADDR or PORT_LISTED_ADDRS.
#[map]
pub static PORT_RULES: Array<u8> = Array::with_max_entries(65536, 0);

/// Watched (address, port) pairs for ports marked PORT_LISTED_ADDRS.
#[map]
pub static ENDPOINTS: HashMap<EndpointKey, u8> = HashMap::with_max_entries(1024, 0);

/// Per-connection state, keyed by the kernel address of the `struct sock`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ConnState {
    pub start_ns: u64,
    pub tuple: Tuple,
    /// Bytes seen so far in each direction (DIR_TO_SERVER, DIR_TO_CLIENT).
    pub offsets: [u64; 2],
    pub role: u8,
    pub seen: u8,
    pub _pad: [u8; 6],
}

#[map]
pub static CONNS: HashMap<u64, ConnState> = HashMap::with_max_entries(65536, 0);

/// Sockets whose payload the daemon does not need (the second end of a connection whose
/// two ends are both on this host): sock address -> the connection's first-seen time, so
/// an entry that outlives its socket never mutes a later connection at a reused address.
#[map]
pub static MUTED: HashMap<u64, u64> = HashMap::with_max_entries(65536, 0);

/// A read or write in flight on a watched socket, from sys_enter to sys_exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingCall {
    pub sock: u64,
    /// User buffer, or the iovec array for the vectored calls.
    pub buf: u64,
    /// Number of iovecs; 0 for a plain buffer.
    pub iovcnt: u64,
    pub direction: u8,
    pub _pad: [u8; 7],
}

#[map]
pub static PENDING: HashMap<u64, PendingCall> = HashMap::with_max_entries(16384, 0);

/// Sockets in connect() or accept(): pid_tgid -> fd (connect) or 0 (accept).
#[map]
pub static CONNECTING: HashMap<u64, u64> = HashMap::with_max_entries(16384, 0);

/// Scratch space for assembling one data record (too large for the stack).
#[map]
pub static SCRATCH: PerCpuArray<DataRecord> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU counters, indexed by `auditor_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32, by: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, and programs do not nest on one CPU here.
        unsafe { *slot += by };
    }
}
