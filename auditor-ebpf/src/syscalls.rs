//! Syscall tracepoints: connect/accept mark connections, the read/write family copies payload
//! bytes of watched sockets into the ring buffer, and `sock:inet_sock_set_state` ends them.
//!
//! A read or write is resolved to its `struct sock` (fd -> file -> socket), so a connection is
//! recognised by what it is, not by which process happened to accept it: the postmaster
//! accepts and a forked backend reads, and connections older than the daemon are seen at
//! their next read or write. Where the kernel allows (EXIT_ONLY), that happens at the call's
//! exit alone, with its arguments from the task's registers, and only for a call that moved
//! bytes; elsewhere the entry resolves it and notes the call in `PENDING` for the exit.

use core::ffi::c_void;

use auditor_common::{
    counter, lost_bit, RecordHeader, AF_UNIX, CHUNK_DATA, COMPAT_CHUNKS_PER_CALL, COMPAT_IOVECS,
    DIR_TO_CLIENT, DIR_TO_SERVER, MAX_CHUNKS_PER_CALL, MAX_IOVECS, OPEN_AUDIT_IDS, RECORD_CLOSE,
    RECORD_DATA, RECORD_FILE, RECORD_LOST_BEFORE, RECORD_OPEN, RECORD_SAME_IDENTITY, ROLE_CLIENT,
    SEEN_ACCEPT, SEEN_CONNECT, SEEN_IO, STREAM_RAW, STREAM_TLS,
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_task_btf, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
        generated::{
            bpf_get_current_comm as get_current_comm_raw, bpf_loop,
            bpf_probe_read_user as probe_read_user_raw, bpf_task_pt_regs,
        },
    },
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext as _,
};

use crate::{
    maps::{
        count, tls_in_flight, ConnState, PendingCall, SockRef, SslKey, TlsCall, BARE,
        CHUNKS_PER_CALL, CONNECTING, CONNS, DAEMON_TGID, EVENTS, EXIT_ONLY, GENERATION, HANDOVER,
        KNOWN_FILES, LOOP_STATE, MUTED, MUTE_EPOCH, NEW_CONN, PENDING, PENDING_ACTIVE,
        PENDING_EOF_ONLY, PENDING_READ, SCRATCH, SSL_SOCKS, TAKEN, TLS_CALLS, WAKE_BYTES,
        WAKE_CHECK, WAKE_CHECK_BYTES,
    },
    sock::{file_id_of_fd, offsets, sock_of_fd, watched_sock},
};

const HEADER_LEN: usize = core::mem::size_of::<RecordHeader>();
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const ARG3: usize = 40;
const ARG4: usize = 48;
const RET: usize = 16;
/// `__syscall_nr` in the records of both syscall tracepoints.
const NR: usize = 8;
const EINPROGRESS: i64 = 115;
const MSG_PEEK: u64 = 2;
const TCP_CLOSE: i32 = 7;

/// A field of the tracepoint's record, read in place: a tracepoint program may load its
/// context directly (aligned, within the record), which costs one instruction where
/// `read_at` costs a helper call.
#[inline(always)]
fn arg(ctx: &TracePointContext, at: usize) -> u64 {
    // SAFETY: `at` is one of the constant, 8-byte aligned offsets of a syscall
    // tracepoint's arguments or return value, all inside its record.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(at) as *const u64) }
}

/// Whether this load's programs are on duty (`HANDOVER` names their generation): while a
/// starting daemon attaches its programs beside those of the daemon before, only one set
/// acts. The calls one set began (`PENDING`, `TLS_CALLS`, shared) the other completes.
#[inline(always)]
pub(crate) fn on_duty() -> Option<()> {
    let h = HANDOVER.get(0)?;
    (h.generation == GENERATION.load()).then_some(())
}

/// On duty and within the lease (a capture left running by a daemon that never came back
/// goes quiet). Checked where a call, connection or file is first taken up; what was
/// taken up is completed whatever the lease.
#[inline(always)]
pub(crate) fn on_duty_now() -> Option<()> {
    on_duty_at().map(|_| ())
}

/// As `on_duty_now`, with the time it read: where a record or a connection is about to be
/// made, the clock read that stamps it also checks the lease (a read or write is taken up
/// at its entry on the generation alone, and dropped at its exit if the lease ran out
/// meanwhile; on a VM a clock read is a good part of a short program's time).
#[inline(always)]
pub(crate) fn on_duty_at() -> Option<u64> {
    let h = HANDOVER.get(0)?;
    if h.generation != GENERATION.load() {
        return None;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    (now <= h.lease_until_ns).then_some(now)
}

/// Set by `auditor run --bare-hooks` (read-only data: for the verifier a constant, so in
/// a normal load the check and the branch it guards are gone before the first run).
#[inline(always)]
pub(crate) fn bare() -> bool {
    BARE.load() != 0
}

#[inline(always)]
pub(crate) fn is_daemon(pid_tgid: u64) -> bool {
    (pid_tgid >> 32) as u32 == DAEMON_TGID.load()
}

/// The watched connection of socket `sk` (inode `ino`), registering it on first sight.
/// None if the socket is not a watched connection.
#[inline(always)]
fn conn_of_sock(sk: u64, ino: u64, seen: u8) -> Option<(ConnState, bool)> {
    let (entry, new) = conn_entry(sk, ino, seen)?;
    Some((unsafe { *entry }, new))
}

/// As `conn_of_sock`, the connection's entry in CONNS itself (one lookup where it is
/// known, the common case), and whether it was registered just now.
#[inline(always)]
fn conn_entry(sk: u64, ino: u64, seen: u8) -> Option<(*mut ConnState, bool)> {
    if let Some(entry) = CONNS.get_ptr_mut(sk) {
        if unsafe { (*entry).ino } == ino {
            return Some((entry, false));
        }
    }
    let registered = register_conn(sk, ino, seen as u64);
    if registered == REGISTER_NONE {
        return None;
    }
    match CONNS.get_ptr_mut(sk) {
        Some(entry) => Some((entry, registered == REGISTER_NEW)),
        None => {
            count(counter::CONN_TABLE_FULL, 1);
            None
        }
    }
}

/// `register_conn`: the socket is not a watched connection (or the lease is out).
const REGISTER_NONE: u64 = 0;
/// `register_conn`: another CPU registered it first.
const REGISTER_RACED: u64 = 1;
/// `register_conn`: registered by this call.
const REGISTER_NEW: u64 = 2;

/// The first sight of socket `sk` (inode `ino`): ends the connection of a closed socket
/// that stood at its address, and enters it in CONNS if it is a watched connection.
/// A function of its own, not inlined: its locals (the tuple, the new entry, the walk of
/// the socket's addresses) sit in their own stack frame, beside and not on top of the
/// frame of the caller's hot path; inlined, every syscall exit program's frame grew by
/// them and, with the `bpf_loop` callback's frame on top, passed the verifier's 512-byte
/// bound for a call chain.
#[inline(never)]
fn register_conn(sk: u64, ino: u64, seen: u64) -> u64 {
    let Some(off) = offsets() else {
        return REGISTER_NONE;
    };
    if let Some(state) = unsafe { CONNS.get(sk) } {
        if state.ino == ino {
            return REGISTER_RACED;
        }
        // A new socket at the address of one whose close was not seen (Unix-domain
        // sockets have no close tracepoint): the old connection ends here.
        emit_control(RECORD_CLOSE, sk, state, 0);
        let _ = CONNS.remove(sk);
        let _ = MUTED.remove(sk);
    }
    let Some((tuple, role)) = watched_sock(off, sk) else {
        return REGISTER_NONE;
    };
    // A connection is taken up only within the lease.
    let Some(now) = on_duty_at() else {
        return REGISTER_NONE;
    };
    // The new entry is assembled in scratch space, not on the stack (see `register_conn`).
    let Some(state) = NEW_CONN.get_ptr_mut(0) else {
        return REGISTER_NONE;
    };
    unsafe {
        zero_words(state);
        (*state).start_ns = now;
        copy_words(&mut (*state).tuple, &tuple);
        (*state).role = role;
        (*state).seen = seen as u8;
        (*state).ino = ino;
    }
    // A mute left over from an earlier socket at this address does not apply.
    let _ = MUTED.remove(sk);
    // BPF_NOEXIST: two CPUs racing on first sight keep the first entry.
    // (By reference: the helper reads the entry where it is, no copy on the stack.)
    let entry: &ConnState = unsafe { &*state };
    if CONNS.insert(sk, entry, 1).is_ok() {
        REGISTER_NEW
    } else {
        REGISTER_RACED
    }
}

/// This generation's mark in a connection entry's fields (`muted`, `ident_mark`): never
/// 0, the value of a new entry.
#[inline(always)]
fn generation_mark() -> u32 {
    GENERATION.load() as u32 | 1 << 31
}

/// Whether the daemon muted the connection of entry `conn` (socket `sk`). A yes is kept
/// in the entry, so later calls take no second lookup; it is kept for this generation
/// only, as MUTED is each generation's own (a successor sees both ends again, see
/// `handover::SHARED_MAPS`). A no is kept with the MUTE_EPOCH it was found at: MUTED is
/// looked up again only after the daemon added to it.
#[inline(always)]
pub(crate) fn is_muted(conn: *mut ConnState, sk: u64) -> bool {
    let mark = generation_mark();
    unsafe {
        if (*conn).muted == mark {
            return true;
        }
        // Read before the lookup: the daemon moves the epoch on after its insertion, so an
        // epoch seen here is never newer than what the lookup finds.
        let epoch = match MUTE_EPOCH.get(0) {
            Some(&epoch) => epoch,
            None => return false,
        };
        if (*conn).unmuted_mark == mark && (*conn).unmuted_epoch == epoch {
            return false;
        }
        if MUTED
            .get(sk)
            .is_some_and(|&start| start == (*conn).start_ns)
        {
            (*conn).muted = mark;
            return true;
        }
        (*conn).unmuted_mark = mark;
        (*conn).unmuted_epoch = epoch;
    }
    false
}

/// The watched connection behind `fd`, registering it on first sight.
#[inline(always)]
fn lookup_conn(fd: u64, seen: u8) -> Option<(u64, ConnState, bool)> {
    let off = offsets()?;
    let (sk, ino) = sock_of_fd(off, fd)?;
    let (state, new) = conn_of_sock(sk, ino, seen)?;
    Some((sk, state, new))
}

#[inline(always)]
pub(crate) fn fill_identity(h: &mut RecordHeader) {
    fill_identity_at(h, unsafe { bpf_ktime_get_ns() }, bpf_get_current_pid_tgid());
}

/// The record's time and the identity of the thread `pid_tgid` making it (the current
/// one: its id is passed where the caller has it already).
#[inline(always)]
pub(crate) fn fill_identity_at(h: &mut RecordHeader, ts_ns: u64, pid_tgid: u64) {
    h.pid_tgid = pid_tgid;
    h.uid_gid = bpf_get_current_uid_gid();
    h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // Straight into the header: the helper pads the name with zeros (and zeroes all of it
    // should it fail), where a name returned by value is zeroed, filled and copied again,
    // byte by byte.
    unsafe {
        get_current_comm_raw(
            h.comm.as_mut_ptr() as *mut c_void,
            core::mem::size_of_val(&h.comm) as u32,
        )
    };
    h.ts_ns = ts_ns;
}

/// Copies `*src` to `*dst` a word at a time. An assignment between two places the
/// compiler cannot prove apart (map values, scratch space) becomes a call to `memmove`,
/// which BPF runs as a loop of single bytes: some 400 instructions for a 48-byte tuple,
/// on every record.
#[inline(always)]
pub(crate) unsafe fn copy_words<T: Copy>(dst: *mut T, src: *const T) {
    const { assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() >= 8) };
    let (d, s) = (dst as *mut u64, src as *const u64);
    let mut i = 0;
    while i < size_of::<T>() / 8 {
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Zeroes `*dst` a word at a time (see `copy_words`: a `memset` is a byte loop too).
#[inline(always)]
pub(crate) unsafe fn zero_words<T: Copy>(dst: *mut T) {
    const { assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() >= 8) };
    let d = dst as *mut u64;
    let mut i = 0;
    while i < size_of::<T>() / 8 {
        unsafe { core::ptr::write_volatile(d.add(i), 0) };
        i += 1;
    }
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Submit flags for a record of `len` bytes: no wake-up until WAKE_BYTES wait unread (the
/// daemon drains on a timer). The ring is asked how full it is only once per
/// WAKE_CHECK_BYTES of this CPU's records, not per record (the query is a helper call):
/// with every CPU that far behind, the wake-up comes at most WAKE_BYTES / 2 late.
#[inline(always)]
fn wake_flags(len: u64) -> u64 {
    let wake_at = WAKE_BYTES.load();
    if wake_at == 0 {
        return 0; // adaptive: the kernel's default
    }
    if let Some(since) = WAKE_CHECK.get_ptr_mut(0) {
        let n = unsafe { *since } + len;
        if n < WAKE_CHECK_BYTES.load() {
            unsafe { *since = n };
            return BPF_RB_NO_WAKEUP;
        }
        unsafe { *since = 0 };
    }
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= wake_at {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Sends an open or close record (header only), assembled in scratch space (the stack is
/// too small for it next to the callers' state).
#[inline(always)]
fn emit_control(kind: u32, sk: u64, state: &ConnState, dir: u8) {
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        count(counter::CONTROL_DROPS, 1);
        return;
    };
    unsafe {
        let h = &mut (*rec).header;
        h.kind = kind;
        h.len = 0;
        h.sock = sk;
        h.conn_start_ns = state.start_ns;
        copy_words(&mut h.tuple, &state.tuple);
        h.role = state.role;
        h.seen = state.seen;
        h.direction = dir;
        h.chunk_index = 0;
        h.stream = 0;
        // Calls lost since the last data records (see `ConnState::lost`).
        h.flags = state.lost;
        h._pad = [0; 2];
        h.offset = state.offsets[DIR_TO_SERVER as usize];
        h.call_len = state.offsets[DIR_TO_CLIENT as usize];
        h.ssl = 0;
        if kind == RECORD_OPEN {
            task_facts(h);
        } else {
            copy_words(&mut h.aux, &state.tls_offsets);
        }
        fill_identity(h);
        // A new connection wakes the daemon at once: it reads the process's /proc entry
        // (executable, login uid and session) while the process lives. A client that
        // connects, runs a statement and exits within a drain interval would be gone
        // first. One wake-up per connection, not per statement.
        let flags = if kind == RECORD_OPEN {
            BPF_RB_FORCE_WAKEUP
        } else {
            wake_flags(HEADER_LEN as u64)
        };
        if EVENTS.output::<RecordHeader>(h, flags).is_err() {
            count(counter::CONTROL_DROPS, 1);
        }
    }
}

/// What an open record says of the current task beyond its ids: its audit login uid and
/// session id (see `OPEN_AUDIT_IDS`), the kernel's where the daemon's read of /proc finds
/// nothing once a short-lived client has exited; and its process's start time (in `ssl`),
/// which tells the daemon whether the /proc entry it reads is still this process's.
/// Once per connection.
#[inline(always)]
fn task_facts(h: &mut RecordHeader) {
    h.aux[0] = 0;
    h.aux[1] = 0;
    let Some(off) = offsets() else {
        return;
    };
    let task = unsafe { bpf_get_current_task() };
    if off.task_loginuid != u32::MAX && off.task_sessionid != u32::MAX {
        let read = |at: u32| unsafe { bpf_probe_read_kernel((task + at as u64) as *const u32) };
        if let (Ok(loginuid), Ok(sessionid)) = (read(off.task_loginuid), read(off.task_sessionid)) {
            h.aux[0] = loginuid as u64 | (sessionid as u64) << 32;
            h.aux[1] = OPEN_AUDIT_IDS;
        }
    }
    if off.task_group_leader != u32::MAX && off.task_start_boottime != u32::MAX {
        let leader: Result<u64, _> =
            unsafe { bpf_probe_read_kernel((task + off.task_group_leader as u64) as *const u64) };
        if let Ok(leader) = leader {
            if leader != 0 {
                let start: Result<u64, _> = unsafe {
                    bpf_probe_read_kernel((leader + off.task_start_boottime as u64) as *const u64)
                };
                h.ssl = start.unwrap_or(0);
            }
        }
    }
}

// ---- read/write family -------------------------------------------------------------------

/// The TLS library call in flight on this thread, if any may be.
#[inline(always)]
fn tls_call_of(pid_tgid: u64) -> Option<*mut TlsCall> {
    if tls_in_flight() {
        TLS_CALLS.get_ptr_mut(pid_tgid)
    } else {
        None
    }
}

/// A socket that is not watched moved the ciphertext of TLS library call `call`: its
/// `SSL *` runs over no watched connection (remembered, so that its plaintext is not
/// taken up).
#[inline(always)]
fn untie_tls(pid_tgid: u64, call: Option<*mut TlsCall>) {
    let Some(call) = call else {
        return;
    };
    if unsafe { (*call).sock } != 0 {
        return;
    }
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: unsafe { (*call).ssl },
    };
    let _ = SSL_SOCKS.insert(
        key,
        SockRef {
            sock: 0,
            start_ns: 0,
        },
        0,
    );
}

/// Watched socket `sk` moved the ciphertext of TLS library call `call`: the call and its
/// `SSL *` are tied to the connection, which is marked TLS (its plaintext comes from the
/// library hooks from now on). Returns whether there was a call (then the bytes moved are
/// ciphertext, not copied).
#[inline(always)]
fn tie_tls(pid_tgid: u64, call: Option<*mut TlsCall>, sk: u64, state: &ConnState) -> bool {
    let Some(call) = call else {
        return false;
    };
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: unsafe { (*call).ssl },
    };
    unsafe {
        (*call).sock = sk;
        (*call).start_ns = state.start_ns;
    }
    let _ = SSL_SOCKS.insert(
        key,
        SockRef {
            sock: sk,
            start_ns: state.start_ns,
        },
        0,
    );
    if state.tls == 0 {
        if let Some(p) = CONNS.get_ptr_mut(sk) {
            unsafe { (*p).tls = 1 };
        }
    }
    true
}

#[inline(always)]
fn enter_io(ctx: &TracePointContext, is_write: bool, buf: u64, iovcnt: u64) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_daemon(pid_tgid) {
        return None;
    }
    // The lease is checked at the exit, with the clock read that stamps the record.
    on_duty()?;
    let off = offsets()?;
    let (sk, ino) = sock_of_fd(off, arg(ctx, ARG0))?;
    // Inside a hooked TLS library call: this syscall moves ciphertext for that call, and
    // tells which socket the library object runs over.
    let tls_call = tls_call_of(pid_tgid);
    let Some((conn, _)) = conn_entry(sk, ino, SEEN_IO) else {
        untie_tls(pid_tgid, tls_call);
        return None;
    };
    let state = unsafe { *conn };
    if tie_tls(pid_tgid, tls_call, sk, &state) {
        return None;
    }
    if state.tls != 0 {
        // Plaintext of this socket comes from the TLS hooks.
        return None;
    }
    let mut flags = PENDING_ACTIVE | if is_write { 0 } else { PENDING_READ };
    if is_muted(conn, sk) {
        if is_write || state.tuple.family != AF_UNIX {
            return None;
        }
        flags |= PENDING_EOF_ONLY;
    }
    let towards_server = (state.role == ROLE_CLIENT) == is_write;
    let pending = PendingCall {
        sock: sk,
        buf,
        iovcnt,
        nr: syscall_nr(ctx),
        direction: if towards_server {
            DIR_TO_SERVER
        } else {
            DIR_TO_CLIENT
        },
        flags,
        _pad: [0; 2],
    };
    // The thread's entry from its last call, rewritten in place (see PENDING_ACTIVE).
    if let Some(slot) = PENDING.get_ptr_mut(pid_tgid) {
        unsafe { *slot = pending };
        return Some(());
    }
    if PENDING.insert(pid_tgid, pending, 0).is_err() {
        // This call goes by uncopied: the next record of its direction says so (a gap
        // of unknown size), or the stream would run on as if nothing was missing.
        count(counter::PENDING_FULL, 1);
        if let Some(p) = CONNS.get_ptr_mut(sk) {
            unsafe { (*p).lost |= lost_bit(STREAM_RAW, pending.direction) };
        }
    }
    Some(())
}

/// The syscall number in a syscall tracepoint's record.
#[inline(always)]
fn syscall_nr(ctx: &TracePointContext) -> u32 {
    // SAFETY: `__syscall_nr` is an int at offset 8 of both syscall tracepoints' records.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(NR) as *const u32) }
}

/// Copies `len` bytes from user memory at `src` into one record and sends it.
#[inline(always)]
fn send_chunk(rec: *mut auditor_common::DataRecord, src: u64, len: u64, offset: u64, more: bool) {
    let n = if len > CHUNK_DATA as u64 {
        CHUNK_DATA as u64
    } else {
        len
    };
    unsafe {
        (*rec).header.offset = offset;
        (*rec).header.len = n as u32;
        // The daemon only asks whether a chunk starts its call (0) or continues it (1).
        (*rec).header.chunk_index = more as u8;
        let dst = core::ptr::addr_of_mut!((*rec).data) as *mut c_void;
        if probe_read_user_raw(dst, n as u32, src as *const c_void) != 0 {
            count(counter::READ_FAILURES, 1);
            return;
        }
        let total = HEADER_LEN + n as usize;
        let bytes = core::slice::from_raw_parts(rec as *const u8, total);
        if EVENTS
            .output::<[u8]>(bytes, wake_flags(total as u64))
            .is_err()
        {
            count(counter::RINGBUF_DROPS, 1);
        } else {
            count(counter::CHUNKS, 1);
            count(counter::BYTES, n);
        }
    }
}

/// Reserves `total` bytes of one stream of connection `sock` (its entry `state`) and
/// prepares the record header in scratch space, stamped `ts_ns` and made by thread
/// `pid_tgid`. Returns (first stream offset, record).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn prepare_record(
    state: *mut ConnState,
    sock: u64,
    direction: u8,
    stream: u8,
    ssl: u64,
    total: u64,
    ts_ns: u64,
    pid_tgid: u64,
) -> Option<(u64, *mut auditor_common::DataRecord)> {
    let dir = direction as usize & 1;
    // This call's range of the stream. A plain read-modify-write: the socket lock orders
    // concurrent transfers on one socket and their exits can run in another order, so
    // syscall hooks cannot order truly concurrent writers anyway (no Postgres client or
    // backend does that: the protocol is sequential per connection).
    let base = unsafe {
        if stream == STREAM_TLS {
            let base = (*state).tls_offsets[dir];
            (*state).tls_offsets[dir] = base + total;
            base
        } else {
            let base = (*state).offsets[dir];
            (*state).offsets[dir] = base + total;
            base
        }
    };
    // Calls of this stream and direction lost since the last record (`ConnState::lost`).
    let bit = lost_bit(stream, direction);
    let lost = unsafe { (*state).lost } & bit != 0;
    if lost {
        unsafe { (*state).lost &= !bit };
    }
    let rec = SCRATCH.get_ptr_mut(0)?;
    unsafe {
        let h = &mut (*rec).header;
        h.kind = RECORD_DATA;
        h.sock = sock;
        h.conn_start_ns = (*state).start_ns;
        h.call_len = total;
        copy_words(&mut h.tuple, &(*state).tuple);
        h.direction = direction;
        h.role = (*state).role;
        h.seen = (*state).seen;
        h.stream = stream;
        h._pad = [0; 2];
        zero_words(&mut h.aux);
        h.ssl = ssl;
        // The process's identity goes with the socket's first record and again when
        // another process uses the socket (or another daemon reads the ring), not with
        // every record: three helper calls fewer on the common path.
        let tgid = (pid_tgid >> 32) as u32;
        let mark = generation_mark();
        let same = (*state).ident_tgid == tgid && (*state).ident_mark == mark;
        h.flags = if lost { RECORD_LOST_BEFORE } else { 0 };
        if same {
            h.flags |= RECORD_SAME_IDENTITY;
            h.pid_tgid = pid_tgid;
            h.uid_gid = 0;
            h.cgroup_id = 0;
            // (The name sits at an 8-byte boundary of the header.)
            zero_words(h.comm.as_mut_ptr() as *mut [u64; 2]);
            h.ts_ns = ts_ns;
        } else {
            fill_identity_at(h, ts_ns, pid_tgid);
            (*state).ident_tgid = tgid;
            (*state).ident_mark = mark;
        }
    }
    Some((base, rec))
}

/// Takes the pending call of this thread and prepares the record header in scratch space.
/// Returns (call, payload length, first stream offset, record).
#[inline(always)]
fn begin_exit(
    ctx: &TracePointContext,
) -> Option<(PendingCall, u64, u64, *mut auditor_common::DataRecord)> {
    on_duty()?;
    let pid_tgid = bpf_get_current_pid_tgid();
    let slot = PENDING.get_ptr_mut(pid_tgid)?;
    let pending = unsafe { *slot };
    if pending.flags & PENDING_ACTIVE == 0 || pending.nr != syscall_nr(ctx) {
        return None;
    }
    unsafe { (*slot).flags = 0 };
    let ret = arg(ctx, RET) as i64;
    if ret == 0 && pending.flags & PENDING_READ != 0 {
        end_of_stream(pending.sock);
        return None;
    }
    if ret <= 0 || pending.flags & PENDING_EOF_ONLY != 0 {
        return None;
    }
    let now = on_duty_at()?;
    let total = ret as u64;
    let (base, rec) = prepare_record(
        CONNS.get_ptr_mut(pending.sock)?,
        pending.sock,
        pending.direction,
        STREAM_RAW,
        0,
        total,
        now,
        pid_tgid,
    )?;
    Some((pending, total, base, rec))
}

/// A read or write to copy: where its bytes are, how many, and the record prepared for
/// them at their place in the stream.
struct Call {
    /// The buffer, or the iovec array of a vectored call.
    buf: u64,
    iovcnt: u64,
    total: u64,
    base: u64,
    rec: *mut auditor_common::DataRecord,
}

/// Where a call of the read/write family keeps what the exit needs (exit-only mode).
/// read, write, sendto: the buffer is the second argument.
const ARGS_BUF: u8 = 0;
/// recvfrom: the buffer, and flags (MSG_PEEK) in the fourth.
const ARGS_RECVFROM: u8 = 1;
/// readv, writev: the iovecs and their count.
const ARGS_IOV: u8 = 2;
/// recvmsg, sendmsg: a `struct user_msghdr`, and flags in the third.
const ARGS_MSG: u8 = 3;

#[inline(always)]
fn exit_only() -> bool {
    EXIT_ONLY.load() != 0
}

/// A word of the registers the task entered the system call with.
#[inline(always)]
fn reg(regs: *const u8, at: u32) -> u64 {
    // SAFETY: `regs` is the task's `struct pt_regs` as the verifier types it, `at` the
    // offset of one of its 8-byte fields (the daemon's, from this kernel's BTF; a
    // constant to the verifier, which checks the load against the type).
    unsafe { core::ptr::read_volatile(regs.add(at as usize) as *const u64) }
}

/// The call returning here, taken at its exit alone (EXIT_ONLY): its arguments are read
/// from the registers the task entered with (the read/write family leaves them as they
/// came), its socket resolved from the descriptor, and its record prepared. A call that
/// failed (EAGAIN: most reads of non-blocking sockets) ends at the first test, unless a
/// TLS library call is in flight (the failed read still tells which socket it runs over).
#[inline(always)]
fn take_call(ctx: &TracePointContext, is_write: bool, args: u8) -> Option<Call> {
    {
        let ret = arg(ctx, RET) as i64;
        if ret < 0 || (ret == 0 && is_write) {
            // Nothing moved. Taken on only inside a TLS library call, to tie it.
            if !tls_in_flight() {
                return None;
            }
        }
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    {
        let handover = HANDOVER.get(0)?;
        let generation = GENERATION.load();
        if handover.handing_over != 0
            && handover.handing_over != generation
            && TAKEN.get_ptr(pid_tgid).is_some()
        {
            // A takeover is under way and the generation handing over took this very
            // call (its program ran just before this one: the two are attached to the
            // same tracepoint, in that order).
            let _ = TAKEN.remove(pid_tgid);
            return None;
        }
        if is_daemon(pid_tgid) || handover.generation != generation {
            return None;
        }
    }
    let off = offsets()?;
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    if regs.is_null() {
        return None;
    }
    let fd = reg(regs, off.regs_args[0]);
    let arg1 = reg(regs, off.regs_args[1]);
    if !is_write {
        // A peek does not consume: the bytes come again in a later read.
        let flags = match args {
            ARGS_RECVFROM => reg(regs, off.regs_args[3]),
            ARGS_MSG => reg(regs, off.regs_args[2]),
            _ => 0,
        };
        if flags & MSG_PEEK != 0 {
            return None;
        }
    }
    let (sk, ino) = sock_of_fd(off, fd)?;
    // Inside a hooked TLS library call: this syscall moves ciphertext for that call, and
    // tells which socket the library object runs over.
    let tls_call = tls_call_of(pid_tgid);
    let Some((conn, _)) = conn_entry(sk, ino, SEEN_IO) else {
        untie_tls(pid_tgid, tls_call);
        return None;
    };
    if tie_tls(pid_tgid, tls_call, sk, unsafe { &*conn }) || unsafe { (*conn).tls } != 0 {
        // Plaintext of this socket comes from the TLS hooks.
        return None;
    }
    // What follows reads the call's result afresh, not from what the walk above kept: to
    // the verifier, values kept across it are several (bytes moved, end of stream or
    // failed), and everything after would be checked once for each.
    let ret = arg(ctx, RET) as i64;
    if ret == 0 && !is_write {
        end_of_stream(sk);
        return None;
    }
    if ret <= 0 || is_muted(conn, sk) {
        return None;
    }
    let role = unsafe { (*conn).role };
    let direction = ((role == ROLE_CLIENT) != is_write) as u8;
    const _: () = assert!(DIR_TO_SERVER == 0 && DIR_TO_CLIENT == 1);
    let (buf, iovcnt) = match args {
        ARGS_IOV => (arg1, reg(regs, off.regs_args[2])),
        ARGS_MSG => {
            // struct user_msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov;
            // size_t msg_iovlen; ... }
            match unsafe { bpf_probe_read_user((arg1 + 16) as *const [u64; 2]) } {
                Ok([iov, n]) => (iov, n),
                Err(_) => {
                    // The bytes moved but cannot be found: the next record of this
                    // direction says so (a gap of unknown size).
                    count(counter::READ_FAILURES, 1);
                    unsafe { (*conn).lost |= lost_bit(STREAM_RAW, direction) };
                    return None;
                }
            }
        }
        _ => (arg1, 0),
    };
    let now = on_duty_at()?;
    if HANDOVER
        .get(0)
        .is_some_and(|h| h.handing_over == GENERATION.load())
    {
        // (Should the table be full, the call is taken unmarked: the new generation takes
        // it too only if it comes on duty in the microseconds between the two runs.)
        let _ = TAKEN.insert(pid_tgid, 1, 0);
    }
    let total = ret as u64;
    let (base, rec) = prepare_record(conn, sk, direction, STREAM_RAW, 0, total, now, pid_tgid)?;
    Some(Call {
        buf,
        iovcnt,
        total,
        base,
        rec,
    })
}

/// The call returning here and its record: taken at the exit alone (EXIT_ONLY), or
/// completing what its entry noted.
#[inline(always)]
fn begin_call(ctx: &TracePointContext, is_write: bool, args: u8) -> Option<Call> {
    if exit_only() {
        return take_call(ctx, is_write, args);
    }
    let (pending, total, base, rec) = begin_exit(ctx)?;
    Some(Call {
        buf: pending.buf,
        iovcnt: pending.iovcnt,
        total,
        base,
        rec,
    })
}

/// A read returned end of stream: the peer is gone. TCP connections end on their state
/// change; a Unix-domain one has no such tracepoint, so its end is recorded here.
#[inline(always)]
fn end_of_stream(sk: u64) {
    let Some(state) = (unsafe { CONNS.get(sk) }) else {
        return;
    };
    if state.tuple.family != AF_UNIX {
        return;
    }
    emit_control(RECORD_CLOSE, sk, state, 0);
    let _ = CONNS.remove(sk);
    let _ = MUTED.remove(sk);
}

#[inline(always)]
fn count_truncation(total: u64, copied: u64) {
    if copied < total {
        count(counter::TRUNCATED_CALLS, 1);
        count(counter::TRUNCATED_BYTES, total - copied);
    }
}

/// read, write, recvfrom, sendto: one buffer, sent as up to MAX_CHUNKS_PER_CALL chunks.
#[inline(always)]
fn exit_plain<const LOOP: bool>(ctx: &TracePointContext, is_write: bool, args: u8) -> Option<()> {
    let call = begin_call(ctx, is_write, args)?;
    send_buffer::<LOOP>(call.buf, call.total, call.base);
    Some(())
}

/// What one round of a chunk loop works on. It lives in a per-CPU map (`LOOP_STATE`), not
/// on the stack: the verifier checks a `bpf_loop` callback round after round until two
/// rounds look alike, and values it reads from a map are unknown to it, so every round
/// looks alike after the first. Counters kept on the stack are exact constants to the
/// verifier (0, 1, 2, ...), never alike, and with a bound the daemon sets at load time
/// (`CHUNKS_PER_CALL`) the check ran into the kernel's million-instruction limit.
#[repr(C)]
pub struct Chunks {
    /// Where the current buffer continues and how much of it is left.
    ptr: u64,
    left: u64,
    /// Bytes sent so far, of `total`; the stream offset of the first.
    done: u64,
    total: u64,
    base: u64,
    /// Vectored calls: the iovec array, its length, the next to take.
    iov: u64,
    iovcnt: u64,
    next_iov: u64,
    /// Chunks sent so far.
    chunks: u64,
    /// Chunks this call may take (CHUNKS_PER_CALL, read once).
    max_chunks: u64,
    /// Bytes jumped over to send the buffer's last chunk (see `tail`).
    skipped: u64,
    /// 1: when the buffer does not fit, its last chunk is its end, not the bytes that
    /// follow the head. A huge message usually shares its call with the small ones after
    /// it (Bind, Execute, Sync): with the head and the end, the daemon knows where the
    /// huge one ends and reads the rest whole; the lost middle is a gap inside it.
    tail: u64,
}

impl Chunks {
    /// The loop state for a vectored transfer of `total` bytes at stream offset `base`
    /// from `iovcnt` iovecs at `iov`.
    #[inline(always)]
    fn vectored(total: u64, base: u64, iov: u64, iovcnt: u64) -> Self {
        Chunks {
            ptr: 0,
            left: 0,
            done: 0,
            total,
            base,
            iov,
            iovcnt,
            next_iov: 0,
            chunks: 0,
            max_chunks: chunks_per_call(),
            skipped: 0,
            tail: 0,
        }
    }
}

/// Chunks one call may take with bpf_loop: set by the daemon (`capture.max_call_bytes`),
/// never fewer than MAX_CHUNKS_PER_CALL.
#[inline(always)]
fn chunks_per_call() -> u64 {
    let n = CHUNKS_PER_CALL.load();
    if n < MAX_CHUNKS_PER_CALL {
        MAX_CHUNKS_PER_CALL as u64
    } else {
        n as u64
    }
}

/// One chunk of the current buffer into the ring. 0: go on, 1: stop.
#[inline(always)]
fn send_next_chunk(c: &mut Chunks) -> i64 {
    if c.done >= c.total || c.left == 0 || c.chunks >= c.max_chunks {
        return 1;
    }
    let Some(rec) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    if c.tail != 0 && c.chunks + 1 == c.max_chunks && c.left > CHUNK_DATA as u64 {
        let skip = c.left - CHUNK_DATA as u64;
        c.ptr += skip;
        c.left -= skip;
        c.done += skip;
        c.skipped += skip;
    }
    let n = core::cmp::min(c.left, CHUNK_DATA as u64);
    send_chunk(rec, c.ptr, n, c.base + c.done, c.chunks != 0);
    c.ptr += n;
    c.left -= n;
    c.done += n;
    c.chunks += 1;
    0
}

#[inline(never)]
extern "C" fn buffer_round(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(c) = LOOP_STATE.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's slot; the program that filled it is the one looping.
    send_next_chunk(unsafe { &mut *c })
}

#[inline(never)]
extern "C" fn vectored_round(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(c) = LOOP_STATE.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: as in `buffer_round`.
    let c = unsafe { &mut *c };
    if c.done >= c.total {
        return 1;
    }
    if c.left > 0 {
        return send_next_chunk(c);
    }
    // Take the next iovec: struct iovec { void *iov_base; size_t iov_len; }
    if c.next_iov >= c.iovcnt || c.next_iov >= MAX_IOVECS as u64 {
        return 1;
    }
    let iov = c.iov + c.next_iov * 16;
    c.next_iov += 1;
    let Ok([ptr, len]) = (unsafe { bpf_probe_read_user(iov as *const [u64; 2]) }) else {
        return 1;
    };
    c.ptr = ptr;
    c.left = core::cmp::min(len, c.total - c.done);
    0
}

/// Sends the chunks of the vectored transfer set up in this CPU's `LOOP_STATE`; returns
/// the bytes sent.
#[inline(always)]
fn send_vectored(init: Chunks) -> Option<u64> {
    let c = LOOP_STATE.get_ptr_mut(0)?;
    unsafe {
        *c = init;
        // Each round takes the next iovec or sends one chunk of the current one.
        bpf_loop(
            (*c).max_chunks as u32 + MAX_IOVECS,
            vectored_round as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
        Some((*c).done)
    }
}

/// Sends `total` bytes of one user buffer as up to CHUNKS_PER_CALL chunks: when it does not
/// fit, its head and its last chunk (see `Chunks::tail`); what is left out is counted as
/// truncated. Returns the chunks sent.
/// `LOOP`: with `bpf_loop` (Linux 5.17+), up to CHUNKS_PER_CALL; without, an unrolled
/// loop of COMPAT_CHUNKS_PER_CALL on the stack.
#[inline(always)]
pub(crate) fn send_buffer<const LOOP: bool>(buf: u64, total: u64, base: u64) -> u64 {
    // Most calls fit one chunk: no loop, no loop state.
    if total <= CHUNK_DATA as u64 {
        let Some(rec) = SCRATCH.get_ptr_mut(0) else {
            return 0;
        };
        send_chunk(rec, buf, total, base, false);
        return 1;
    }
    let init = Chunks {
        ptr: buf,
        left: total,
        done: 0,
        total,
        base,
        iov: 0,
        iovcnt: 0,
        next_iov: 0,
        chunks: 0,
        max_chunks: if LOOP {
            chunks_per_call()
        } else {
            COMPAT_CHUNKS_PER_CALL as u64
        },
        skipped: 0,
        tail: LOOP as u64,
    };
    let (done, skipped, chunks) = if LOOP {
        let Some(c) = LOOP_STATE.get_ptr_mut(0) else {
            return 0;
        };
        unsafe {
            *c = init;
            bpf_loop(
                (*c).max_chunks as u32,
                buffer_round as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
            ((*c).done, (*c).skipped, (*c).chunks)
        }
    } else {
        let mut c = init;
        for _ in 0..COMPAT_CHUNKS_PER_CALL {
            if send_next_chunk(&mut c) != 0 {
                break;
            }
        }
        (c.done, c.skipped, c.chunks)
    };
    count_truncation(total, done - skipped);
    chunks
}

/// readv, writev, recvmsg, sendmsg: the iovecs in order (up to MAX_IOVECS), each in as
/// many chunks as it needs, up to CHUNKS_PER_CALL in all. What does not fit is counted
/// as truncated (the stream offsets still advance, so the daemon records a gap).
#[inline(always)]
fn exit_vectored<const LOOP: bool>(
    ctx: &TracePointContext,
    is_write: bool,
    args: u8,
) -> Option<()> {
    let call = begin_call(ctx, is_write, args)?;
    if !LOOP {
        return exit_vectored_compat(call);
    }
    let (total, base) = (call.total, call.base);
    let done = send_vectored(Chunks::vectored(total, base, call.buf, call.iovcnt))?;
    count_truncation(total, done);
    Some(())
}

/// Without bpf_loop: one chunk of each of the first COMPAT_IOVECS iovecs.
#[inline(always)]
fn exit_vectored_compat(call: Call) -> Option<()> {
    let Call {
        buf,
        iovcnt,
        total,
        base,
        rec,
    } = call;
    let mut done: u64 = 0;
    for i in 0..COMPAT_IOVECS {
        if done >= total || i as u64 >= iovcnt {
            break;
        }
        // struct iovec { void *iov_base; size_t iov_len; }
        let iov = buf + i as u64 * 16;
        let Ok(ptr) = (unsafe { bpf_probe_read_user(iov as *const u64) }) else {
            break;
        };
        let Ok(len) = (unsafe { bpf_probe_read_user((iov + 8) as *const u64) }) else {
            break;
        };
        let n = core::cmp::min(core::cmp::min(len, total - done), CHUNK_DATA as u64);
        send_chunk(rec, ptr, n, base + done, i != 0);
        done += n;
        if n < len && done < total {
            break; // the rest of this iovec did not fit in a chunk
        }
    }
    count_truncation(total, done);
    Some(())
}

/// Each exit that copies payload comes twice: with bpf_loop, and `_compat` without (the
/// daemon loads the second where the kernel lacks bpf_loop). The entries are attached only
/// where the exits cannot read their call's arguments themselves (see EXIT_ONLY).
macro_rules! plain_io {
    ($enter:ident, $exit:ident, $compat:ident, $is_write:expr, $args:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            if bare() || exit_only() {
                return 0;
            }
            if $args != ARGS_RECVFROM || arg(&ctx, ARG3) & MSG_PEEK == 0 {
                let _ = enter_io(&ctx, $is_write, arg(&ctx, ARG1), 0);
            }
            0
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            if bare() {
                return 0;
            }
            let _ = exit_plain::<true>(&ctx, $is_write, $args);
            0
        }
        #[tracepoint]
        pub fn $compat(ctx: TracePointContext) -> u32 {
            if bare() {
                return 0;
            }
            let _ = exit_plain::<false>(&ctx, $is_write, $args);
            0
        }
    };
}

plain_io!(
    sys_enter_read,
    sys_exit_read,
    sys_exit_read_compat,
    false,
    ARGS_BUF
);
plain_io!(
    sys_enter_write,
    sys_exit_write,
    sys_exit_write_compat,
    true,
    ARGS_BUF
);
plain_io!(
    sys_enter_sendto,
    sys_exit_sendto,
    sys_exit_sendto_compat,
    true,
    ARGS_BUF
);
// A peek does not consume: the bytes come again in a later read.
plain_io!(
    sys_enter_recvfrom,
    sys_exit_recvfrom,
    sys_exit_recvfrom_compat,
    false,
    ARGS_RECVFROM
);

macro_rules! vector_io {
    ($enter:ident, $exit:ident, $compat:ident, $is_write:expr, $args:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            if bare() || exit_only() {
                return 0;
            }
            if $args == ARGS_MSG {
                let _ = enter_msg(&ctx, $is_write);
            } else {
                let iovcnt = arg(&ctx, ARG2);
                if iovcnt > 0 {
                    let _ = enter_io(&ctx, $is_write, arg(&ctx, ARG1), iovcnt);
                }
            }
            0
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            if bare() {
                return 0;
            }
            let _ = exit_vectored::<true>(&ctx, $is_write, $args);
            0
        }
        #[tracepoint]
        pub fn $compat(ctx: TracePointContext) -> u32 {
            if bare() {
                return 0;
            }
            let _ = exit_vectored::<false>(&ctx, $is_write, $args);
            0
        }
    };
}

vector_io!(
    sys_enter_readv,
    sys_exit_readv,
    sys_exit_readv_compat,
    false,
    ARGS_IOV
);
vector_io!(
    sys_enter_writev,
    sys_exit_writev,
    sys_exit_writev_compat,
    true,
    ARGS_IOV
);
vector_io!(
    sys_enter_recvmsg,
    sys_exit_recvmsg,
    sys_exit_recvmsg_compat,
    false,
    ARGS_MSG
);
vector_io!(
    sys_enter_sendmsg,
    sys_exit_sendmsg,
    sys_exit_sendmsg_compat,
    true,
    ARGS_MSG
);

/// recvmsg/sendmsg: the iovecs are behind a `struct user_msghdr` in user memory.
#[inline(always)]
fn enter_msg(ctx: &TracePointContext, is_write: bool) -> Option<()> {
    let msg = arg(ctx, ARG1);
    if !is_write && arg(ctx, ARG2) & MSG_PEEK != 0 {
        return None;
    }
    // struct user_msghdr { void *msg_name; int msg_namelen; struct iovec *msg_iov; size_t msg_iovlen; ... }
    let iov: u64 = unsafe { bpf_probe_read_user((msg + 16) as *const u64) }.ok()?;
    let iovcnt: u64 = unsafe { bpf_probe_read_user((msg + 24) as *const u64) }.ok()?;
    if iovcnt == 0 {
        return None;
    }
    enter_io(ctx, is_write, iov, iovcnt)
}

// ---- connection lifecycle ----------------------------------------------------------------

#[inline(always)]
fn opened(fd: u64, seen: u8) -> Option<()> {
    let (sk, state, new) = lookup_conn(fd, seen)?;
    if new {
        emit_control(RECORD_OPEN, sk, &state, 0);
    }
    Some(())
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    if bare() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_daemon(pid_tgid) && on_duty_now().is_some() {
        let _ = CONNECTING.insert(pid_tgid, arg(&ctx, ARG0), 0);
    }
    0
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    if bare() {
        return 0;
    }
    if on_duty().is_none() {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(fd) = unsafe { CONNECTING.get(pid_tgid) }.copied() {
        let _ = CONNECTING.remove(pid_tgid);
        let ret = arg(&ctx, RET) as i64;
        // libpq connects non-blocking: EINPROGRESS is the normal answer.
        if ret == 0 || ret == -EINPROGRESS {
            let _ = opened(fd, SEEN_CONNECT);
        }
    }
    0
}

macro_rules! accept_exit {
    ($name:ident) => {
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            if bare() {
                return 0;
            }
            let fd = arg(&ctx, RET) as i64;
            if fd >= 0 && !is_daemon(bpf_get_current_pid_tgid()) && on_duty_now().is_some() {
                let _ = opened(fd as u64, SEEN_ACCEPT);
            }
            0
        }
    };
}

accept_exit!(sys_exit_accept);
accept_exit!(sys_exit_accept4);

/// Offsets within the `sock:inet_sock_set_state` record, from its tracefs format.
const STATE_SKADDR: usize = 8;
const STATE_NEWSTATE: usize = 20;

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if bare() {
        return 0;
    }
    let _ = try_set_state(&ctx);
    0
}

#[inline(always)]
fn try_set_state(ctx: &TracePointContext) -> Option<()> {
    let newstate: i32 = unsafe { ctx.read_at(STATE_NEWSTATE) }.ok()?;
    if newstate != TCP_CLOSE {
        return None;
    }
    on_duty()?;
    let sk: u64 = unsafe { ctx.read_at(STATE_SKADDR) }.ok()?;
    let state = unsafe { CONNS.get(sk) }?;
    emit_control(RECORD_CLOSE, sk, state, 0);
    let _ = CONNS.remove(sk);
    let _ = MUTED.remove(sk);
    Some(())
}

// ---- new programs and libraries (for the TLS uprobes) ------------------------------------

#[inline(always)]
fn emit_file(dev: u64, ino: u64) {
    let mut h = RecordHeader {
        kind: RECORD_FILE,
        aux: [dev, ino],
        ..RecordHeader::default()
    };
    fill_identity(&mut h);
    // Rare, and the daemon hooks TLS libraries from them: wake it at once.
    if EVENTS
        .output::<RecordHeader>(&h, BPF_RB_FORCE_WAKEUP)
        .is_err()
    {
        count(counter::FILE_DROPS, 1);
    }
}

/// A thread ended: its entry in PENDING (if it ever read or wrote a watched socket) goes.
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    if bare() {
        return 0;
    }
    let _ = PENDING.remove(bpf_get_current_pid_tgid());
    0
}

/// A process replaced its program: the daemon checks the new executable (which may link a
/// TLS library statically) before the program gets far.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    if bare() {
        return 0;
    }
    if !is_daemon(bpf_get_current_pid_tgid()) && on_duty_now().is_some() {
        emit_file(0, 0);
    }
    0
}

const PROT_EXEC: u64 = 4;

/// mmap(addr, len, prot, flags, fd, off) of a file with PROT_EXEC: a library being loaded
/// (by the dynamic loader or dlopen). Each file is reported once.
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    if bare() {
        return 0;
    }
    let _ = try_mmap(&ctx);
    0
}

#[inline(always)]
fn try_mmap(ctx: &TracePointContext) -> Option<()> {
    if arg(ctx, ARG2) & PROT_EXEC == 0 {
        return None;
    }
    let fd = arg(ctx, ARG4) as i64;
    if fd < 0 || is_daemon(bpf_get_current_pid_tgid()) {
        return None;
    }
    on_duty_now()?;
    let off = offsets()?;
    let (dev, ino) = file_id_of_fd(off, fd as u64)?;
    let key = [dev, ino];
    if unsafe { KNOWN_FILES.get(key) }.is_some() {
        return None;
    }
    let _ = KNOWN_FILES.insert(key, 1, 0);
    emit_file(dev, ino);
    Some(())
}
