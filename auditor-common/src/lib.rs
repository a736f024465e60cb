//! Types shared by the eBPF programs and the userspace daemon.
//!
//! Everything here is `#[repr(C)]`, `Copy`, with explicit padding, and its size is asserted at
//! compile time: the kernel side writes these bytes and the daemon reads them back.
#![no_std]

use core::mem::size_of;

/// Bytes of payload carried by one ring-buffer chunk.
pub const CHUNK_DATA: usize = 16384;
/// The fewest chunks one call may take (2 MiB); the daemon raises it to
/// `capture.max_call_bytes` (`CHUNKS_PER_CALL`). A syscall moving more is truncated (and counted): the
/// per-direction offset still advances by the real length, so the daemon records a gap.
/// Drivers read big: asyncio's transports (asyncpg, psycopg's async mode) ask for 256 KiB
/// per recv, and a large result fills them.
pub const MAX_CHUNKS_PER_CALL: u32 = 128;
/// iovecs examined per readv/writev/recvmsg/sendmsg (each may take several chunks).
pub const MAX_IOVECS: u32 = 16;
/// On kernels without `bpf_loop` (before 5.17) the chunk loops are unrolled for the
/// verifier, which bounds them far lower: 8 chunks per call (128 KiB), and one chunk of
/// each of the first 8 iovecs.
pub const COMPAT_CHUNKS_PER_CALL: u32 = 8;
pub const COMPAT_IOVECS: u32 = 8;

/// Record kinds at the head of every ring-buffer record.
pub const RECORD_DATA: u32 = 1;
pub const RECORD_OPEN: u32 = 2;
pub const RECORD_CLOSE: u32 = 3;
/// A process exec'd (`aux[0]` = 0) or mapped an executable file not seen before
/// (`aux` = [kernel dev_t, inode]): the daemon checks it for a TLS library to hook.
pub const RECORD_FILE: u32 = 4;
/// A Postgres backend bound a named prepared statement (uprobe on `PortalDefineQuery`):
/// the payload is the statement's name in the first SERVER_NAME_BYTES (NUL-padded, `aux[0]`
/// its length), then its source text (`call_len` bytes, cut at the record's capacity).
pub const RECORD_SERVER_TEXT: u32 = 5;
/// Room for a statement name in a RECORD_SERVER_TEXT (Postgres names are at most 63 bytes).
pub const SERVER_NAME_BYTES: usize = 64;

/// Payload read or written by the socket syscalls (ciphertext on TLS connections).
pub const STREAM_RAW: u8 = 0;
/// Plaintext taken at the TLS library (SSL_read/SSL_write of OpenSSL).
pub const STREAM_TLS: u8 = 1;

/// `RecordHeader::flags` of a data record: calls of its stream and direction went by
/// uncopied since the record before (the kernel's table of calls in flight was full): bytes
/// were lost, how many is unknown. A close record's flags say the same for calls after the
/// last data records: bit `lost_bit(stream, direction)` each.
pub const RECORD_LOST_BEFORE: u8 = 1;

/// `RecordHeader::flags` of a data record: made by the same process as the socket's record
/// before it that carried an identity, which this one leaves out (`uid_gid`, `cgroup_id`
/// and `comm` are zero; `pid_tgid` is always there). The kernel side sends a socket's
/// identity again whenever another process uses it, and once to each new daemon.
pub const RECORD_SAME_IDENTITY: u8 = 2;

/// The bit of `ConnState::lost` (and of a close record's flags) for calls of one stream
/// (STREAM_RAW, STREAM_TLS) and direction that went by uncopied.
pub const fn lost_bit(stream: u8, direction: u8) -> u8 {
    let stream = if stream == STREAM_TLS { 2 } else { 0 };
    1 << (stream + (direction & 1))
}
/// Plaintext relayed by the daemon's inline proxy: records the proxy makes itself (the
/// client's bytes as it sent them, and what it received), never the kernel.
pub const STREAM_PROXY: u8 = 2;

/// Kinds of TLS library calls the uprobes track (see `TlsCall`).
pub const TLS_READ: u8 = 1;
pub const TLS_WRITE: u8 = 2;
pub const TLS_READ_EX: u8 = 3;
pub const TLS_WRITE_EX: u8 = 4;
/// Handshake, peek, shutdown: the socket they use is learnt, no payload is taken.
pub const TLS_OTHER: u8 = 5;

/// Bytes travelling from the client to the server.
pub const DIR_TO_SERVER: u8 = 0;
/// Bytes travelling from the server to the client.
pub const DIR_TO_CLIENT: u8 = 1;

/// The process owning the socket is the client (its peer is a Postgres endpoint).
pub const ROLE_CLIENT: u8 = 0;
/// The process owning the socket is the server (its local endpoint is a Postgres endpoint).
pub const ROLE_SERVER: u8 = 1;

/// How a connection was first seen by the kernel side.
pub const SEEN_CONNECT: u8 = 1;
pub const SEEN_ACCEPT: u8 = 2;
/// First seen in a read or write: it may predate the daemon.
pub const SEEN_IO: u8 = 3;

/// Value of `PORT_RULES[port]`: the port is not watched.
/// Address families as the kernel numbers them.
pub const AF_UNIX: u16 = 1;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

pub const PORT_NONE: u8 = 0;
/// Any address with this port is a Postgres endpoint.
pub const PORT_ANY_ADDR: u8 = 1;
/// Only the addresses listed in `ENDPOINTS` with this port are Postgres endpoints.
pub const PORT_LISTED_ADDRS: u8 = 2;

/// Indices of the per-CPU counters in the `COUNTERS` map.
pub mod counter {
    /// Chunks that did not fit in the ring buffer.
    pub const RINGBUF_DROPS: u32 = 0;
    /// Syscalls whose payload exceeded what one call may copy.
    pub const TRUNCATED_CALLS: u32 = 1;
    /// Bytes not copied because of truncation.
    pub const TRUNCATED_BYTES: u32 = 2;
    /// `bpf_probe_read_user` failures (page not resident and the like).
    pub const READ_FAILURES: u32 = 3;
    /// Connections that could not be added to the connection table.
    pub const CONN_TABLE_FULL: u32 = 4;
    /// Data chunks sent.
    pub const CHUNKS: u32 = 5;
    /// Payload bytes sent.
    pub const BYTES: u32 = 6;
    /// Open/close records that did not fit in the ring buffer.
    pub const CONTROL_DROPS: u32 = 7;
    /// TLS plaintext calls that could not be tied to a socket (the library was used
    /// without a socket under it, e.g. memory BIOs), and their bytes.
    pub const TLS_UNTIED_CALLS: u32 = 8;
    pub const TLS_UNTIED_BYTES: u32 = 9;
    /// TLS plaintext chunks sent.
    pub const TLS_CHUNKS: u32 = 10;
    /// New-file records (exec, mmap of an executable file) that did not fit.
    pub const FILE_DROPS: u32 = 11;
    /// Connections of enforced workloads sent to the inline proxy.
    pub const REDIRECTED: u32 = 12;
    /// Connections of enforced workloads refused (no proxy listening, or the original
    /// destination could not be kept): enforcement fails closed.
    pub const REDIRECT_REFUSED: u32 = 13;
    /// Reads and writes of watched sockets not followed because the table of calls in
    /// flight was full (their bytes are missing from the stream).
    pub const PENDING_FULL: u32 = 14;
    /// TLS library calls on watched sockets not followed because the table of TLS calls
    /// in flight was full (their plaintext is missing from the stream).
    pub const TLS_CALLS_FULL: u32 = 15;
    pub const COUNT: u32 = 16;
}

/// The endpoints of a TCP connection as seen from the socket's owner.
/// (8-byte aligned so copies compile to word moves, not byte loops the verifier must walk.)
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    /// IPv4 addresses are stored as IPv4-mapped IPv6 (::ffff:a.b.c.d).
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// AF_INET or AF_INET6 as the socket reported it, or AF_UNIX. A Unix-domain
    /// connection has no addresses: each end is named by the kernel address of its
    /// `struct sock` (first 8 bytes, little-endian), and the server end's port is the one
    /// in its socket file's name (`.s.PGSQL.<port>`); the client's port is 0.
    pub family: u16,
    pub _pad: u16,
    /// The network namespace (its inode number, as in /proc/PID/ns/net) of a connection
    /// over a loopback address, 0 for any other: two namespaces (pods, containers) can
    /// each have a loopback connection with the very same addresses and ports, and only
    /// this tells them apart. Both ends of a loopback connection are in one namespace;
    /// the ends of any other connection may not be, so it is not set for them.
    pub netns: u32,
    pub _pad2: u32,
}
const _: () = assert!(size_of::<Tuple>() == 48);

impl Tuple {
    /// Whether either endpoint is a loopback address (127.0.0.0/8, ::1): then the
    /// connection cannot leave its network namespace.
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        is_loopback(&self.local_addr) || is_loopback(&self.remote_addr)
    }
}

/// 127.0.0.0/8 (IPv4-mapped) or ::1.
#[inline(always)]
pub fn is_loopback(addr: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        return addr[12] == 127;
    }
    addr[10] == 0
        && addr[11] == 0
        && addr[12] == 0
        && addr[13] == 0
        && addr[14] == 0
        && addr[15] == 1
}

/// Header of every ring-buffer record; data records carry `len` payload bytes after it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecordHeader {
    /// RECORD_DATA, RECORD_OPEN or RECORD_CLOSE.
    pub kind: u32,
    /// Payload bytes after this header (data records only).
    pub len: u32,
    /// Kernel address of the `struct sock`: with `conn_start_ns`, identifies the connection.
    pub sock: u64,
    /// When the kernel side first saw this socket (bpf_ktime_get_ns).
    pub conn_start_ns: u64,
    /// When this record was produced (bpf_ktime_get_ns).
    pub ts_ns: u64,
    /// Offset of the first payload byte within this direction's stream. For a close record,
    /// the total bytes seen towards the server.
    pub offset: u64,
    /// For a close record, the total bytes seen towards the client. For data, the full
    /// length the syscall moved (may exceed what was copied).
    pub call_len: u64,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
    pub tuple: Tuple,
    /// DIR_TO_SERVER or DIR_TO_CLIENT.
    pub direction: u8,
    /// ROLE_CLIENT or ROLE_SERVER.
    pub role: u8,
    /// SEEN_CONNECT, SEEN_ACCEPT or SEEN_IO.
    pub seen: u8,
    /// 0 for the first chunk of its syscall, 1 for the ones that continue it.
    pub chunk_index: u8,
    /// STREAM_RAW or STREAM_TLS: which byte stream of the connection `offset` counts in.
    pub stream: u8,
    /// A data record: RECORD_LOST_BEFORE. A close record: bit `lost_bit(stream, direction)`
    /// for each stream and direction whose calls went by uncopied since its last record.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// For a close record, the TLS plaintext totals [towards server, towards client]; for
    /// a file record, [kernel dev_t, inode]; for an open record, the task's audit ids
    /// ([`OPEN_AUDIT_IDS`]).
    pub aux: [u64; 2],
    /// The TLS library's connection object (`SSL *`) of a STREAM_TLS record; for an open
    /// record, its process's start time ([`RecordHeader::process_start_ns`]).
    pub ssl: u64,
}
const _: () = assert!(size_of::<RecordHeader>() == 168);
// The kernel side zeroes `comm` as two words.
const _: () = assert!(core::mem::offset_of!(RecordHeader, comm).is_multiple_of(8));

/// An open record's `aux[1]` bit: `aux[0]` holds the task's audit login uid (low 32 bits)
/// and session id (high 32), read by the kernel side when the connection was first seen
/// (u32::MAX: never logged in). Other kinds give `aux` other meanings.
pub const OPEN_AUDIT_IDS: u64 = 1;

impl RecordHeader {
    /// The audit login uid and session id an open record carries, if the kernel side read
    /// them.
    pub fn audit_ids(&self) -> Option<(u32, u32)> {
        (self.kind == RECORD_OPEN && self.aux[1] & OPEN_AUDIT_IDS != 0)
            .then(|| (self.aux[0] as u32, (self.aux[0] >> 32) as u32))
    }

    /// When the process (its thread group leader) started, in ns since boot, as an open
    /// record carries it in `ssl` (0: not read): /proc/PID/stat's start time, to tell the
    /// process from a later one that took its pid.
    pub fn process_start_ns(&self) -> Option<u64> {
        (self.kind == RECORD_OPEN && self.ssl != 0).then_some(self.ssl)
    }
}

/// A data record as the kernel side assembles it in per-CPU scratch space.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DataRecord {
    pub header: RecordHeader,
    pub data: [u8; CHUNK_DATA],
}
const _: () = assert!(size_of::<DataRecord>() == 168 + CHUNK_DATA);

/// Offsets of kernel structure fields, computed by the daemon from the running kernel's BTF
/// and handed to the programs as a global at load time (Rust eBPF has no CO-RE relocations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_f_inode: u32,
    pub file_private_data: u32,
    pub inode_i_mode: u32,
    pub socket_sk: u32,
    pub sock_family: u32,
    pub sock_num: u32,
    pub sock_dport: u32,
    pub sock_daddr: u32,
    pub sock_rcv_saddr: u32,
    pub sock_v6_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    /// `sk_protocol`; u32::MAX where the kernel keeps it in a bitfield (then it is not checked).
    pub sock_protocol: u32,
    /// Non-zero once the daemon has filled these in.
    pub valid: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
    /// Non-zero when the Unix-domain socket fields below were found (AF_UNIX may be a
    /// module without BTF: then Unix sockets are not watched).
    pub unix_valid: u32,
    /// `sock.sk_type` (u16).
    pub sock_type: u32,
    /// `unix_sock.addr`, `unix_sock.peer`.
    pub unix_addr: u32,
    pub unix_peer: u32,
    /// `unix_address.len`, `unix_address.name`.
    pub unix_address_len: u32,
    pub unix_address_name: u32,
    /// `sock.__sk_common.skc_net.net` (a `struct net *`) and `net.ns.inum`; u32::MAX
    /// where the kernel has no network namespaces (then every netns is 0).
    pub sock_net: u32,
    pub net_ns_inum: u32,
    /// `socket_alloc.vfs_inode`: a socket's inode sits this far after its `struct
    /// socket`, in one allocation (so a file whose inode does not is not a socket, and
    /// the socket's `sk` and the inode's mode and number are read at once); u32::MAX
    /// where the kernel's BTF does not say (then they are read one by one).
    pub socket_inode: u32,
    /// Where the first four arguments of a system call sit in the `struct pt_regs` of the
    /// task that made it, as they stand when the call returns (x86-64: `di`, `si`, `dx`,
    /// `r10`; arm64: `orig_x0`, then `regs[1..4]`): the exits read their call's arguments
    /// there (see `EXIT_ONLY`). u32::MAX where this architecture's layout is not known.
    pub regs_args: [u32; 4],
    /// `task_struct.loginuid` (a `kuid_t`, one u32) and `task_struct.sessionid`: the
    /// audit login uid and session an open record carries; u32::MAX where the kernel has
    /// none (built without audit support).
    pub task_loginuid: u32,
    pub task_sessionid: u32,
    /// `task_struct.group_leader` and `task_struct.start_boottime`: the process's start
    /// time an open record carries (what /proc/PID/stat says, in ns); u32::MAX where the
    /// kernel's BTF does not say.
    pub task_group_leader: u32,
    pub task_start_boottime: u32,
    pub _pad: [u32; 3],
}
const _: () = assert!(size_of::<KernelOffsets>() == 160);

/// Key of the `ENDPOINTS` map: one watched address and port.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// IPv4 as IPv4-mapped IPv6.
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(size_of::<EndpointKey>() == 24);

/// Key of the `PROXY_PEERS` map: the local address and port of one of the inline proxy's
/// upstream sockets, and for a loopback address its network namespace's inode (`ns.inum`,
/// as `Tuple::netns`; 127.0.0.1 of one namespace is not another's), else 0 (a
/// non-loopback address names one host interface).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProxyPeerKey {
    /// IPv4 as IPv4-mapped IPv6.
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    pub netns: u32,
}
const _: () = assert!(size_of::<ProxyPeerKey>() == 24);

/// Where a redirected connection was going, and who made it: written by `cgroup/connect4`
/// and `connect6` under the socket's cookie, moved by `sock_ops` (at the client's
/// established callback) under the client's local port, where the proxy finds it by the
/// peer port of the connection it accepted (see `auditor-ebpf/src/redirect.rs`).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// The address the client dialled; IPv4 as IPv4-mapped IPv6.
    pub addr: [u8; 16],
    /// The port it dialled (host order).
    pub port: u16,
    /// AF_INET or AF_INET6: the family of the client's socket.
    pub family: u16,
    pub _pad: u32,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
    /// bpf_ktime_get_ns at connect.
    pub ts_ns: u64,
    /// The client socket's cookie.
    pub cookie: u64,
}
const _: () = assert!(size_of::<OrigDst>() == 80);

/// Key of the redirect's by-port map: the client's local port (host order) as seen by the
/// proxy on the connection it accepts, and the low 32 bits of the client's network
/// namespace cookie (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`): the proxy listens in each
/// namespace with redirected workloads, and two namespaces may use the same port at once.
/// (Cookies count up from boot: the low halves of two live namespaces differ unless 2^32
/// namespaces were made between them.)
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub port: u32,
    pub netns: u32,
}
const _: () = assert!(size_of::<PeerKey>() == 8);

/// Which generation of the capture programs is on duty, kept in the `HANDOVER` map that
/// successive daemons share (pinned): each program compares it with its own `GENERATION`
/// and does nothing when they differ, so a starting daemon attaches its programs beside
/// the ones left running by the daemon before and takes over in one map write. The
/// programs left running capture while no daemon runs, for `lease_until_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Handover {
    /// The generation on duty (0: none yet).
    pub generation: u64,
    /// Kernel time (CLOCK_MONOTONIC ns) after which the programs on duty stop capturing:
    /// renewed by the running daemon; a daemon that never comes back leaves them quiet.
    pub lease_until_ns: u64,
    /// While a daemon takes over (its programs and those of `handing_over` both attached):
    /// the generation handing over, else 0. Reads and writes taken at their exits alone
    /// have no entry to claim them: for each call the old generation's program runs first,
    /// and the generation on duty may change between the two runs, so the old one marks
    /// what it took (`TAKEN`) and the new one leaves it.
    pub handing_over: u64,
}

/// The redirect's settings, set by the daemon when its proxy listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The proxy's port on 127.0.0.1 and ::1 (host order); 0: no proxy, and connections
    /// of enforced workloads to watched endpoints are refused (fail closed).
    pub proxy_port: u16,
    /// 1: connections of cgroups the daemon has not judged yet (created since its last
    /// look) go to the proxy too, which resolves their policies itself (fail closed while
    /// any policy enforces).
    pub redirect_unknown: u8,
    pub _pad: [u8; 5],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::RecordHeader {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::ProxyPeerKey {}
    unsafe impl aya::Pod for super::RedirectConfig {}
    unsafe impl aya::Pod for super::Handover {}
}

/// Maps an IPv4 address (network order bytes) into IPv4-mapped IPv6.
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}
