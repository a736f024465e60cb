//! uprobes on OpenSSL (1.1 and 3.x): SSL_read, SSL_read_ex, SSL_write, SSL_write_ex take the
//! plaintext; SSL_do_handshake (which SSL_connect and SSL_accept call), SSL_peek(_ex) and
//! SSL_shutdown only let the socket under an `SSL *` be learnt.
//!
//! Which connection a plaintext belongs to is never guessed: while a library call is in
//! flight on a thread, the read/write syscalls it makes (sys_enter_* in syscalls.rs) name
//! the socket, mark it as TLS (its ciphertext is no longer copied) and remember the socket of
//! that `SSL *`. A read served from the library's buffer without a syscall uses the socket
//! remembered for its `SSL *`; with neither, the call is counted as untied.

use auditor_common::{
    counter, lost_bit, DIR_TO_CLIENT, DIR_TO_SERVER, ROLE_CLIENT, STREAM_TLS, TLS_OTHER, TLS_READ,
    TLS_READ_EX, TLS_WRITE, TLS_WRITE_EX,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    maps::{count, tls_in_flight_add, SslKey, TlsCall, CONNS, SSL_SOCKS, TLS_CALLS},
    syscalls::{is_daemon, is_muted, on_duty, on_duty_now, prepare_record, send_buffer},
};

/// The stack pointer at a probe: tells a nested library call (deeper stack) from the
/// return of the outermost one, and a stale entry (its frame is gone) from a live one.
#[inline(always)]
fn stack_pointer(regs: *mut aya_ebpf::bindings::pt_regs) -> u64 {
    #[cfg(bpf_target_arch = "x86_64")]
    {
        unsafe { (*regs).rsp }
    }
    #[cfg(bpf_target_arch = "aarch64")]
    {
        let regs = regs as *const aya_ebpf::bindings::user_pt_regs;
        unsafe { (*regs).sp }
    }
    #[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
    {
        let _ = regs;
        0
    }
}

#[inline(always)]
fn enter(ctx: &ProbeContext, kind: u8) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if is_daemon(pid_tgid) {
        return None;
    }
    on_duty_now()?;
    let sp = stack_pointer(ctx.regs);
    let replaces = match TLS_CALLS.get_ptr_mut(pid_tgid) {
        // Deeper than a call in flight: nested in it (SSL_connect -> SSL_do_handshake).
        Some(outer) if sp < unsafe { (*outer).sp } => return None,
        // Otherwise that entry is left from a call whose return was never seen.
        Some(_) => true,
        None => false,
    };
    let ssl: u64 = ctx.arg(0)?;
    let (buf, len_out) = match kind {
        TLS_READ | TLS_WRITE => (ctx.arg::<u64>(1)?, 0),
        TLS_READ_EX | TLS_WRITE_EX => (ctx.arg::<u64>(1)?, ctx.arg::<u64>(3)?),
        _ => (0, 0),
    };
    let call = TlsCall {
        ssl,
        buf,
        len_out,
        sock: 0,
        start_ns: 0,
        sp,
        kind,
        _pad: [0; 7],
    };
    // Counted before the entry exists: a read or write never sees an entry uncounted.
    if !replaces {
        tls_in_flight_add(1);
    }
    if TLS_CALLS.insert(pid_tgid, call, 0).is_err() {
        if !replaces {
            tls_in_flight_add(-1);
        }
        if kind != TLS_OTHER {
            lost_call(pid_tgid, ssl, kind);
        }
        return None;
    }
    Some(())
}

/// A read or write the table of calls in flight had no room for: its plaintext goes by
/// uncopied. The connection its `SSL *` is known to be on says so in its next plaintext
/// record of that direction (a gap of unknown size), or the stream would run on as if
/// nothing was missing. (A first call, before the `SSL *` was tied, has no connection to
/// tell: the counter does.)
#[inline(always)]
fn lost_call(pid_tgid: u64, ssl: u64, kind: u8) {
    count(counter::TLS_CALLS_FULL, 1);
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl,
    };
    let Some(r) = (unsafe { SSL_SOCKS.get(key) }) else {
        return;
    };
    let (sock, start_ns) = (r.sock, r.start_ns);
    let Some(state) = CONNS.get_ptr_mut(sock) else {
        return;
    };
    unsafe {
        if (*state).start_ns != start_ns {
            return;
        }
        (*state).lost |= lost_bit(STREAM_TLS, direction_of((*state).role, kind));
    }
}

/// The direction of a TLS read or write (`kind`) made at a connection's end of `role`.
#[inline(always)]
fn direction_of(role: u8, kind: u8) -> u8 {
    let is_write = kind == TLS_WRITE || kind == TLS_WRITE_EX;
    if (role == ROLE_CLIENT) == is_write {
        DIR_TO_SERVER
    } else {
        DIR_TO_CLIENT
    }
}

macro_rules! entry_probe {
    ($name:ident, $kind:expr) => {
        #[uprobe]
        pub fn $name(ctx: ProbeContext) -> u32 {
            let _ = enter(&ctx, $kind);
            0
        }
    };
}

entry_probe!(ssl_read, TLS_READ);
entry_probe!(ssl_write, TLS_WRITE);
entry_probe!(ssl_read_ex, TLS_READ_EX);
entry_probe!(ssl_write_ex, TLS_WRITE_EX);
entry_probe!(ssl_other, TLS_OTHER);

/// One return program for every hooked function: the entry recorded what it was.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    let _ = exit::<true>(&ctx);
    0
}

/// The same without bpf_loop (kernels before 5.17).
#[uretprobe]
pub fn ssl_return_compat(ctx: RetProbeContext) -> u32 {
    let _ = exit::<false>(&ctx);
    0
}

#[inline(always)]
fn exit<const LOOP: bool>(ctx: &RetProbeContext) -> Option<()> {
    on_duty()?;
    let pid_tgid = bpf_get_current_pid_tgid();
    let call = *unsafe { TLS_CALLS.get(pid_tgid) }?;
    if stack_pointer(ctx.regs) < call.sp {
        return None; // the return of a nested call
    }
    if TLS_CALLS.remove(pid_tgid).is_ok() {
        tls_in_flight_add(-1);
    }
    // All hooked functions return a C int: the upper half of the register is not theirs.
    let ret = ctx.ret::<u64>() as u32 as i32;
    let total: u64 = match call.kind {
        TLS_READ | TLS_WRITE if ret > 0 => ret as u64,
        TLS_READ_EX | TLS_WRITE_EX if ret == 1 => {
            unsafe { bpf_probe_read_user(call.len_out as *const u64) }.ok()?
        }
        _ => return None,
    };
    if total == 0 {
        return None;
    }
    let (sock, start_ns) = if call.sock != 0 {
        (call.sock, call.start_ns)
    } else {
        let key = SslKey {
            tgid: pid_tgid >> 32,
            ssl: call.ssl,
        };
        match unsafe { SSL_SOCKS.get(key) } {
            Some(r) => (r.sock, r.start_ns),
            None => {
                count(counter::TLS_UNTIED_CALLS, 1);
                count(counter::TLS_UNTIED_BYTES, total);
                return None;
            }
        }
    };
    if sock == 0 {
        return None; // a TLS connection that is not a watched one
    }
    let entry = CONNS.get_ptr_mut(sock)?;
    if unsafe { (*entry).start_ns } != start_ns {
        return None; // the socket closed and its address was reused
    }
    if is_muted(entry, sock) {
        return None;
    }
    let direction = direction_of(unsafe { (*entry).role }, call.kind);
    let (base, _rec) = prepare_record(
        entry,
        sock,
        direction,
        STREAM_TLS,
        call.ssl,
        total,
        unsafe { bpf_ktime_get_ns() },
        pid_tgid,
    )?;
    let chunks = send_buffer::<LOOP>(call.buf, total, base);
    count(counter::TLS_CHUNKS, chunks);
    Some(())
}
