//! Maps and globals shared by the programs.

use auditor_common::{
    counter, DataRecord, EndpointKey, Handover, KernelOffsets, OrigDst, PeerKey, ProxyPeerKey,
    RedirectConfig, Tuple,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
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
    inode_i_ino: 0,
    inode_i_sb: 0,
    sb_s_dev: 0,
    unix_valid: 0,
    sock_type: 0,
    unix_addr: 0,
    unix_peer: 0,
    unix_address_len: 0,
    unix_address_name: 0,
    sock_net: u32::MAX,
    net_ns_inum: u32::MAX,
    socket_inode: u32::MAX,
    regs_args: [u32::MAX; 4],
    task_loginuid: u32::MAX,
    task_sessionid: u32::MAX,
    task_group_leader: u32::MAX,
    task_start_boottime: u32::MAX,
    _pad: [0; 3],
});

/// 1 where the kernel has `bpf_get_current_task_btf` (Linux 5.11+): the walk from the task
/// to a file descriptor's file starts with typed loads instead of helper reads. Set by the
/// daemon; read-only data, so the verifier sees a constant and never checks the branch
/// not taken (an older kernel does not refuse the helper it would not run).
#[unsafe(no_mangle)]
pub static TASK_BTF: Global<u8> = Global::new(0);

/// 1 where a read or write is taken at its exit alone (the daemon sets it where the
/// kernel has `bpf_task_pt_regs`, Linux 5.15+, with TASK_BTF, and it knows this
/// architecture's `pt_regs`): the exit reads the call's arguments from the registers the
/// task entered with, and the entry tracepoints of the read/write family are not attached
/// at all. A call that fails (EAGAIN: most reads of non-blocking sockets) then costs one
/// short program run, and no table of calls in flight can fill up. 0: the entries note
/// each call in `PENDING` and the exits complete it (older kernels).
#[unsafe(no_mangle)]
pub static EXIT_ONLY: Global<u8> = Global::new(0);

/// This load's generation: the programs act only while `HANDOVER` names it (set by the
/// daemon at load time, one more than the generation on duty before it).
#[unsafe(no_mangle)]
pub static GENERATION: Global<u64> = Global::new(0);

/// The generation on duty and its lease (see `auditor_common::Handover`). Pinned with the
/// maps successive daemons share: one entry, read at the top of every capture program.
#[map]
pub static HANDOVER: Array<Handover> = Array::with_max_entries(1, 0);

/// Calls the generation handing over took while a takeover is under way (see
/// `Handover::handing_over`), by thread: written by its exit program, removed by the new
/// generation's, which runs next for the same call and so leaves it. Shared (pinned).
#[map]
pub static TAKEN: HashMap<u64, u8> = HashMap::with_max_entries(4096, 0);

/// 1: every syscall and scheduler tracepoint program returns at once, before anything
/// else (`auditor run --bare-hooks`: what the hooks alone cost on this host, the floor
/// under the capture's own cost). Set by the daemon at load time.
#[unsafe(no_mangle)]
pub static BARE: Global<u8> = Global::new(0);

/// The daemon's own tgid: its traffic is never captured.
#[unsafe(no_mangle)]
pub static DAEMON_TGID: Global<u32> = Global::new(0);

/// Records wake the daemon only once this many bytes wait in the ring buffer (set by the
/// daemon at load time to a fraction of the ring); otherwise it drains on its own timer.
/// Waking a consumer per record costs more than the record (an irq_work per submit and a
/// context switch per transaction): batching is what keeps observe mode cheap.
#[unsafe(no_mangle)]
pub static WAKE_BYTES: Global<u64> = Global::new(0);

/// How many bytes of records a CPU sends between two looks at the ring's fill (set by the
/// daemon: WAKE_BYTES / (2 * possible CPUs); 0 looks at every record).
#[unsafe(no_mangle)]
pub static WAKE_CHECK_BYTES: Global<u64> = Global::new(0);

/// Bytes of records this CPU sent since it last looked at the ring's fill.
#[map]
pub static WAKE_CHECK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Chunks of CHUNK_DATA bytes one read or write call may take (with bpf_loop): set by the
/// daemon at load time (`capture.max_call_bytes`, at most half the ring); what a call moves
/// beyond is counted as truncated and becomes a gap.
#[unsafe(no_mangle)]
pub static CHUNKS_PER_CALL: Global<u32> = Global::new(0);

/// The state of the chunk loop under way on this CPU (see `syscalls::Chunks`).
#[map]
pub static LOOP_STATE: PerCpuArray<crate::syscalls::Chunks> = PerCpuArray::with_max_entries(1, 0);

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
    /// Set once a hooked TLS library call used this socket: from then on its payload is
    /// taken as plaintext at the library, and the ciphertext is not copied.
    pub tls: u8,
    /// Per stream and direction (bit `lost_bit(stream, direction)`): a call went by
    /// uncopied (PENDING or TLS_CALLS was full); the next record of that stream and
    /// direction carries RECORD_LOST_BEFORE, or the close record the bit.
    pub lost: u8,
    /// Set (to the generation, with its top bit) once this generation found the socket in
    /// MUTED: its next calls take no lookup there (see `syscalls::is_muted`).
    pub muted: u32,
    /// Plaintext bytes seen so far in each direction (STREAM_TLS offsets).
    pub tls_offsets: [u64; 2],
    /// The socket's inode number: a different one at the same address is a new socket
    /// (the old one's close was not seen).
    pub ino: u64,
    /// The process whose identity the socket's last record carried, and the generation
    /// that sent it (its mark): later records of that process leave it out
    /// (RECORD_SAME_IDENTITY).
    pub ident_tgid: u32,
    pub ident_mark: u32,
    /// The generation (its mark) and the MUTE_EPOCH at which this socket was last looked up
    /// in MUTED and not found: until the epoch moves on, its calls take no lookup there.
    pub unmuted_mark: u32,
    pub unmuted_epoch: u32,
}

/// LRU: Unix-domain sockets have no close tracepoint, so their entries are replaced when
/// the address is reused (see `ino`) or evicted as the least recently used.
#[map]
pub static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// Sockets whose payload the daemon does not need (the second end of a connection whose
/// two ends are both on this host): sock address -> the connection's first-seen time, so
/// an entry that outlives its socket never mutes a later connection at a reused address.
/// LRU: a Unix-domain connection that ends at its Terminate leaves its entry behind.
#[map]
pub static MUTED: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

/// Where a connection's entry is assembled before it goes into CONNS (the stack is too
/// small for it beside the callers' frames).
#[map]
pub static NEW_CONN: PerCpuArray<ConnState> = PerCpuArray::with_max_entries(1, 0);

/// Moved on by the daemon after each entry it puts in MUTED: a socket found unmuted is
/// looked up there again only once the epoch has changed (see `syscalls::is_muted`). Each
/// generation's own, like MUTED.
#[map]
pub static MUTE_EPOCH: Array<u32> = Array::with_max_entries(1, 0);

/// A read or write in flight on a watched socket, from sys_enter to sys_exit.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingCall {
    pub sock: u64,
    /// User buffer, or the iovec array for the vectored calls.
    pub buf: u64,
    /// Number of iovecs; 0 for a plain buffer.
    pub iovcnt: u64,
    /// The syscall it is (`__syscall_nr` of the tracepoint's record): an exit completes
    /// only the call its own syscall began.
    pub nr: u32,
    pub direction: u8,
    /// PENDING_ACTIVE, PENDING_READ, PENDING_EOF_ONLY.
    pub flags: u8,
    pub _pad: [u8; 2],
}

/// The call reads (a return of 0 is the end of the stream).
pub const PENDING_READ: u8 = 1;
/// A read on a muted Unix-domain end: only its end of stream matters (there is no close
/// tracepoint for Unix sockets).
pub const PENDING_EOF_ONLY: u8 = 2;
/// The entry holds a call in flight; its exit clears the flag. A thread's entry is written
/// in place call after call, never deleted: an update and a delete per call cost more
/// than the call's whole lookup path.
pub const PENDING_ACTIVE: u8 = 4;

/// The call in flight of each thread (by pid_tgid) that read or wrote a watched socket;
/// its entry goes when the thread ends (`sched_process_exit`). Not LRU: an entry is never
/// taken from a thread blocked in a long read; a full table is counted (PENDING_FULL).
#[map]
pub static PENDING: HashMap<u64, PendingCall> = HashMap::with_max_entries(16384, 0);

/// Sockets in connect() or accept(): pid_tgid -> fd (connect) or 0 (accept).
#[map]
pub static CONNECTING: HashMap<u64, u64> = HashMap::with_max_entries(16384, 0);

/// A TLS library call in flight on a thread, from its uprobe to its uretprobe.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    /// The `SSL *` argument.
    pub ssl: u64,
    /// The plaintext buffer.
    pub buf: u64,
    /// SSL_read_ex/SSL_write_ex: where the library stores the byte count.
    pub len_out: u64,
    /// The socket a nested read/write syscall used (0: none yet in this call).
    pub sock: u64,
    pub start_ns: u64,
    /// Stack pointer at entry. Library calls nested in this one (SSL_connect calling
    /// SSL_do_handshake) run deeper; only the outermost return is acted on.
    pub sp: u64,
    /// TLS_READ, TLS_WRITE, TLS_READ_EX, TLS_WRITE_EX or TLS_OTHER.
    pub kind: u8,
    pub _pad: [u8; 7],
}

#[map]
pub static TLS_CALLS: HashMap<u64, TlsCall> = HashMap::with_max_entries(16384, 0);

/// Entries in TLS_CALLS (added by a TLS entry probe, taken by its return): while none is,
/// no read or write can be inside a library call, and sys_enter skips the lookup. It may
/// count too many (an entry whose return was never seen stays), never too few.
#[map]
pub static TLS_IN_FLIGHT: Array<u64> = Array::with_max_entries(1, 0);

/// Adds `by` to TLS_IN_FLIGHT, atomically (the probes of several CPUs change it).
#[inline(always)]
pub fn tls_in_flight_add(by: i64) {
    if let Some(p) = TLS_IN_FLIGHT.get_ptr_mut(0) {
        // SAFETY: an 8-byte aligned map value that lives as long as the map. The BPF
        // target has no atomic read-modify-write types: the intrinsic is the atomic add
        // instruction (its result unused).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                p, by as u64,
            );
        }
    }
}

/// Whether a TLS library call may be in flight on some thread.
#[inline(always)]
pub fn tls_in_flight() -> bool {
    TLS_IN_FLIGHT.get(0).is_none_or(|&n| n != 0)
}

/// The socket an `SSL *` of a process was last seen using.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslKey {
    pub tgid: u64,
    pub ssl: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SockRef {
    /// 0: the SSL object runs over a socket that is not watched.
    pub sock: u64,
    pub start_ns: u64,
}

#[map]
pub static SSL_SOCKS: LruHashMap<SslKey, SockRef> = LruHashMap::with_max_entries(65536, 0);

/// Executable files already reported to the daemon: (kernel dev_t, inode) -> 1.
#[map]
pub static KNOWN_FILES: LruHashMap<[u64; 2], u8> = LruHashMap::with_max_entries(16384, 0);

/// Postgres backends older than the daemon (tgid -> 1): the only ones whose statement texts
/// the PortalDefineQuery probe reports (see server.rs).
#[map]
pub static OLD_BACKENDS: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);

/// Where a socket's `sk`, inode mode and inode number are read at once (see
/// `sock::sock_of_fd`): too large for the stack beside the callers' state.
#[map]
pub static WALK: PerCpuArray<[u64; crate::sock::WALK_WORDS]> = PerCpuArray::with_max_entries(1, 0);

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

/// The inline proxy's upstream sockets (their local address and port, and namespace for a
/// loopback one): the server end of such a connection is not captured, since the proxy
/// records the session it relays.
#[map]
pub static PROXY_PEERS: HashMap<ProxyPeerKey, u8> = HashMap::with_max_entries(65536, 0);

/// The daemon's verdict on each cgroup (by id): 1, its connections to watched endpoints go
/// to the inline proxy (a workload that may be under an `enforce` policy); 0, they do not.
/// A cgroup not listed is one the daemon has not judged yet (see `RedirectConfig`).
#[map]
pub static ENFORCED: HashMap<u64, u8> = HashMap::with_max_entries(65536, 0);

/// Where the proxy listens.
#[map]
pub static REDIRECT: Array<RedirectConfig> = Array::with_max_entries(1, 0);

/// The running daemon's proxy listeners, by network namespace: key `netns cookie << 1`,
/// its low bit set for the IPv6 one. The kernel drops a socket from it when the socket
/// closes, so a connection is redirected only into a namespace where this daemon's own
/// listener holds the proxy port: not to a port another process took (a sidecar of the
/// pod, a local user while the daemon is down), not after the daemon died. Not pinned:
/// a daemon's programs and this map go together.
#[map]
pub static PROXY_LISTENERS: SockHash<u64> = SockHash::with_max_entries(65536, 0);

/// Original destinations of redirected sockets, by socket cookie (connect4/6, then read by
/// getpeername4/6). LRU: a cookie is never reused, so an entry whose socket closed is
/// only waiting to be evicted.
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65536, 0);

/// The same, keyed by the client's local port once the connection is established
/// (sock_ops): what the proxy looks up for the connection it accepted.
#[map]
pub static ORIG_BY_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::with_max_entries(65536, 0);
