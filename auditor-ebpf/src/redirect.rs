//! The redirect of enforced workloads into the daemon's inline proxy.
//!
//! `cgroup/connect4` and `connect6` (attached at the cgroup v2 root) act only for sockets
//! of cgroups listed in ENFORCED that connect over TCP to a watched Postgres endpoint: the
//! original destination and the caller's identity are kept under the socket's cookie and
//! the destination is rewritten to the proxy on the loopback address. `sock_ops`, at the
//! client's established callback, moves that record under the client's local port, where
//! the proxy looks it up for the connection it accepted (no guessing: the callback runs
//! before the client's handshake completes, so before the proxy can accept).
//! `getpeername4/6` answer a client that asks with the address it dialled.
//!
//! The proxy's address is the loopback of the client's own network namespace: the daemon
//! opens a listener in each namespace with redirected workloads (a pod's 127.0.0.1 is not
//! the host's), and the record is keyed by that namespace too.
//!
//! Fail closed: a workload in ENFORCED whose connection cannot be redirected (no proxy
//! configured, the record cannot be kept) has its connect refused (EPERM), never let
//! through. The daemon's own sockets (its proxy's upstream connections) are never
//! redirected.

use auditor_common::{counter, v4_mapped, OrigDst, PeerKey, AF_INET, AF_INET6};
use aya_ebpf::cty::c_void;
use aya_ebpf::{
    bindings::{bpf_sock_addr, bpf_sock_ops},
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{
            bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_map_lookup_elem, bpf_sk_release,
        },
    },
    macros::{cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};

use crate::{
    maps::{count, DAEMON_TGID, ENFORCED, ORIG_BY_COOKIE, ORIG_BY_PEER, PROXY_LISTENERS, REDIRECT},
    sock::is_endpoint,
};

const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const IPPROTO_TCP: u32 = 6;
/// BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: a connect() completed its handshake.
const ACTIVE_ESTABLISHED: u32 = 4;

/// Whether this caller's connections may be redirected at all: a TCP socket of an
/// enforced cgroup, not the daemon's.
#[inline(always)]
fn enforced(sa: *const bpf_sock_addr) -> bool {
    if unsafe { (*sa).protocol } != IPPROTO_TCP {
        return false;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid == DAEMON_TGID.load() {
        return false;
    }
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    match unsafe { ENFORCED.get(cgroup) } {
        Some(v) => *v == 1,
        None => REDIRECT.get(0).is_some_and(|c| c.redirect_unknown == 1),
    }
}

/// Whether this daemon's proxy listens in the caller's network namespace (for IPv6
/// destinations, `v6`, on its IPv6 address): its listener is in PROXY_LISTENERS.
#[inline(always)]
fn proxy_listens(ctx: &SockAddrContext, v6: bool) -> bool {
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) };
    let key: u64 = (netns << 1) | u64::from(v6);
    // A socket from the map is a reference the program must give back.
    let sk = unsafe {
        bpf_map_lookup_elem(
            core::ptr::addr_of!(PROXY_LISTENERS) as *mut c_void,
            core::ptr::addr_of!(key) as *const c_void,
        )
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk) };
    true
}

/// Keeps the original destination under the socket's cookie; the proxy port to rewrite
/// to, or None to refuse the connect (no proxy port set, or this daemon's proxy does not
/// hold it in the caller's namespace).
#[inline(always)]
fn keep(ctx: &SockAddrContext, addr: [u8; 16], port: u16, family: u16, v6: bool) -> Option<u16> {
    let proxy_port = REDIRECT.get(0).map(|c| c.proxy_port).unwrap_or(0);
    if proxy_port == 0 || !proxy_listens(ctx, v6) {
        return None;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let orig = OrigDst {
        addr,
        port,
        family,
        _pad: 0,
        pid_tgid,
        uid_gid: bpf_get_current_uid_gid(),
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        ts_ns: unsafe { bpf_ktime_get_ns() },
        cookie,
    };
    ORIG_BY_COOKIE.insert(cookie, orig, 0).ok()?;
    Some(proxy_port)
}

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !enforced(sa) {
        return ALLOW;
    }
    // user_ip4 and user_port are in network order.
    let ip = unsafe { (*sa).user_ip4 }.to_ne_bytes();
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    let addr = v4_mapped(ip);
    if !is_endpoint(&addr, port) {
        return ALLOW;
    }
    match keep(&ctx, addr, port, AF_INET, false) {
        Some(proxy_port) => {
            unsafe {
                (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
                (*sa).user_port = u32::from(proxy_port.to_be());
            }
            count(counter::REDIRECTED, 1);
            ALLOW
        }
        None => {
            count(counter::REDIRECT_REFUSED, 1);
            REFUSE
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !enforced(sa) {
        return ALLOW;
    }
    let words = unsafe { (*sa).user_ip6 };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    if !is_endpoint(&addr, port) {
        return ALLOW;
    }
    let mapped = addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
    match keep(&ctx, addr, port, AF_INET6, !mapped) {
        Some(proxy_port) => {
            // An IPv4-mapped destination goes to the proxy's IPv4 address (a dual-stack
            // socket), any other to its IPv6 one.
            let to: [u8; 16] = if mapped {
                v4_mapped([127, 0, 0, 1])
            } else {
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
            };
            unsafe {
                (*sa).user_ip6 = [
                    u32::from_ne_bytes([to[0], to[1], to[2], to[3]]),
                    u32::from_ne_bytes([to[4], to[5], to[6], to[7]]),
                    u32::from_ne_bytes([to[8], to[9], to[10], to[11]]),
                    u32::from_ne_bytes([to[12], to[13], to[14], to[15]]),
                ];
                (*sa).user_port = u32::from(proxy_port.to_be());
            }
            count(counter::REDIRECTED, 1);
            ALLOW
        }
        None => {
            count(counter::REDIRECT_REFUSED, 1);
            REFUSE
        }
    }
}

/// A redirected socket's peer is the address its owner dialled.
#[cgroup_sock_addr(getpeername4)]
pub fn redirect_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut _) };
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(cookie) } {
        let a = orig.addr;
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
            (*sa).user_port = u32::from(orig.port.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn redirect_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let cookie = unsafe { bpf_get_socket_cookie(sa as *mut _) };
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(cookie) } {
        let a = orig.addr;
        unsafe {
            (*sa).user_ip6 = [
                u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
                u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
                u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
                u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
            ];
            (*sa).user_port = u32::from(orig.port.to_be());
        }
    }
    ALLOW
}

/// At a redirected client's established callback: its record, under its local port.
#[sock_ops]
pub fn redirect_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != ACTIVE_ESTABLISHED {
        return 1;
    }
    let ops: *mut bpf_sock_ops = ctx.ops;
    let cookie = unsafe { bpf_get_socket_cookie(ops as *mut _) };
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(cookie) } {
        // The proxy listens in the client's own namespace and looks the record up by
        // that namespace's cookie (see PeerKey).
        let key = PeerKey {
            port: ctx.local_port(),
            netns: unsafe { bpf_get_netns_cookie(ops as *mut _) } as u32,
        };
        let _ = ORIG_BY_PEER.insert(key, *orig, 0);
    }
    1
}
