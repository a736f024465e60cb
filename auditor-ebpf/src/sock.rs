//! From a file descriptor of the current task to its TCP socket and endpoints.
//!
//! The walk is current task -> files -> fdtable -> file -> inode (S_IFSOCK?) -> socket -> sock,
//! with field offsets from the daemon (computed from the running kernel's BTF). A socket's
//! inode shares one allocation with its `struct socket` (`socket_alloc`): where the BTF says
//! where, a file whose inode is not there is no socket (turned away before any inode is
//! read), and a socket's `sk`, inode mode and inode number take one read.

use auditor_common::{
    is_loopback, v4_mapped, EndpointKey, KernelOffsets, ProxyPeerKey, Tuple, AF_INET, AF_INET6,
    AF_UNIX, PORT_ANY_ADDR, PORT_LISTED_ADDRS, PORT_NONE, ROLE_CLIENT, ROLE_SERVER,
};
use core::ffi::c_void;

use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_get_current_task_btf, bpf_probe_read_kernel,
    generated::bpf_probe_read_kernel as probe_read_kernel_raw,
};

use crate::maps::{ENDPOINTS, OFFSETS, PORT_RULES, PROXY_PEERS, TASK_BTF, WALK};

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const IPPROTO_TCP: u16 = 6;
const SOCK_STREAM: u16 = 1;

#[inline(always)]
unsafe fn read<T>(addr: u64) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel(addr as *const T) }
}

/// A field of a kernel object the verifier knows the type of, at a constant offset.
#[inline(always)]
unsafe fn field<T: Copy>(base: *const u8, offset: u32) -> T {
    unsafe { core::ptr::read_volatile(base.add(offset as usize) as *const T) }
}

/// The `struct file` behind `fd` of the current task.
#[inline(always)]
fn file_of_fd(off: &KernelOffsets, fd: u64) -> Option<u64> {
    unsafe {
        let fd_array = if TASK_BTF.load() != 0 {
            // The task, its files and fdtable are typed pointers to the verifier (the
            // task's from bpf_get_current_task_btf, the others as the fields it reads at
            // offsets it knows: the daemon's offsets sit in frozen read-only data), so each
            // field is one load the kernel guards, not a helper call (about 50 ns each).
            let task = bpf_get_current_task_btf() as *const u8;
            let files = field::<u64>(task, off.task_files) as *const u8;
            if files.is_null() {
                return None;
            }
            let fdt = field::<u64>(files, off.files_fdt) as *const u8;
            if fdt.is_null() {
                return None;
            }
            let max_fds = field::<u32>(fdt, off.fdtable_max_fds);
            if fd >= max_fds as u64 {
                return None;
            }
            field::<u64>(fdt, off.fdtable_fd)
        } else {
            let task = bpf_get_current_task();
            let files: u64 = read(task + off.task_files as u64).ok()?;
            if files == 0 {
                return None;
            }
            let fdt: u64 = read(files + off.files_fdt as u64).ok()?;
            let max_fds: u32 = read(fdt + off.fdtable_max_fds as u64).ok()?;
            if fd >= max_fds as u64 {
                return None;
            }
            read(fdt + off.fdtable_fd as u64).ok()?
        };
        // The table's slots are an array of pointers: read with the helper.
        let file: u64 = read(fd_array + fd * 8).ok()?;
        if file == 0 {
            None
        } else {
            Some(file)
        }
    }
}

/// The `struct sock` behind `fd` of the current task, if it is a socket, and the socket's
/// inode number (unique among live sockets: it tells a reused `struct sock` address apart).
#[inline(always)]
pub fn sock_of_fd(off: &KernelOffsets, fd: u64) -> Option<(u64, u64)> {
    unsafe {
        let file = file_of_fd(off, fd)?;
        // Each helper read costs about 50 ns, whatever its size: fields that lie close
        // together are read at once. The offsets are constants to the verifier, so only
        // the branch this kernel's layout takes is checked and run.
        let f_inode = off.file_f_inode as u64;
        let private_data = off.file_private_data as u64;
        let (inode, socket) = if f_inode == private_data + 8 {
            // Linux 6.x: private_data, then f_inode.
            let w: [u64; 2] = read(file + private_data).ok()?;
            (w[1], w[0])
        } else if private_data == f_inode + 8 {
            let w: [u64; 2] = read(file + f_inode).ok()?;
            (w[0], w[1])
        } else {
            (read(file + f_inode).ok()?, read(file + private_data).ok()?)
        };
        let i_mode = off.inode_i_mode as u64;
        let i_ino = off.inode_i_ino as u64;
        if let Some((first, mode_word, ino_word, words)) = walk_layout(off) {
            // A socket's inode follows its `struct socket` in one allocation: a file whose
            // inode does not is no socket (most files on the host end here, one read
            // sooner), and for a socket one read takes its `sk`, mode and number.
            if inode != socket + off.socket_inode as u64 {
                return None;
            }
            let buf = WALK.get_ptr_mut(0)?;
            if probe_read_kernel_raw(
                buf as *mut c_void,
                (words * 8) as u32,
                (socket + first) as *const c_void,
            ) != 0
            {
                return None;
            }
            let w = &*buf;
            let sk = *w.first()?;
            let mode = *w.get(mode_word)? as u16;
            let ino = *w.get(ino_word)?;
            if mode & S_IFMT != S_IFSOCK || sk == 0 {
                return None;
            }
            return Some((sk, ino));
        }
        let (mode, ino) = if i_mode.is_multiple_of(8) && i_ino == i_mode + 64 {
            // i_mode opens struct inode and i_ino follows 64 bytes on (5.x and 6.x).
            let w: [u64; 9] = read(inode + i_mode).ok()?;
            (w[0] as u16, w[8])
        } else {
            let mode: u16 = read(inode + i_mode).ok()?;
            (mode, read(inode + i_ino).ok()?)
        };
        if mode & S_IFMT != S_IFSOCK {
            return None;
        }
        let sk: u64 = read(socket + off.socket_sk as u64).ok()?;
        if sk == 0 {
            None
        } else {
            Some((sk, ino))
        }
    }
}

/// Words of the one read that takes a socket's `sk`, inode mode and inode number.
pub const WALK_WORDS: usize = 32;

/// Where that read starts (from the `struct socket`), the words holding the mode and the
/// inode number, and how many words it takes; None where this kernel's layout does not
/// allow it (then they are read one by one). From the daemon's offsets, which the
/// verifier sees as constants: only the branch this kernel takes is checked and run.
#[inline(always)]
fn walk_layout(off: &KernelOffsets) -> Option<(u64, usize, usize, usize)> {
    if off.socket_inode == u32::MAX {
        return None;
    }
    let first = off.socket_sk as u64;
    let mode_at = off.socket_inode as u64 + off.inode_i_mode as u64;
    let ino_at = off.socket_inode as u64 + off.inode_i_ino as u64;
    if !first.is_multiple_of(8)
        || !mode_at.is_multiple_of(8)
        || !ino_at.is_multiple_of(8)
        || mode_at < first
        || ino_at < first
    {
        return None;
    }
    let words = ((ino_at.max(mode_at) + 8 - first) / 8) as usize;
    if words > WALK_WORDS {
        return None;
    }
    Some((
        first,
        ((mode_at - first) / 8) as usize,
        ((ino_at - first) / 8) as usize,
        words,
    ))
}

/// (kernel dev_t, inode number) of the file behind `fd` of the current task.
#[inline(always)]
pub fn file_id_of_fd(off: &KernelOffsets, fd: u64) -> Option<(u64, u64)> {
    unsafe {
        let file = file_of_fd(off, fd)?;
        let inode: u64 = read(file + off.file_f_inode as u64).ok()?;
        let ino: u64 = read(inode + off.inode_i_ino as u64).ok()?;
        let sb: u64 = read(inode + off.inode_i_sb as u64).ok()?;
        let dev: u32 = read(sb + off.sb_s_dev as u64).ok()?;
        Some((dev as u64, ino))
    }
}

/// The endpoints of a watched connection and which side the socket's owner is on: a TCP
/// socket with a watched endpoint, or a Unix-domain stream socket whose own or peer's
/// socket file is a Postgres one (`.s.PGSQL.<port>`) for a watched port.
#[inline(always)]
pub fn watched_sock(off: &KernelOffsets, sk: u64) -> Option<(Tuple, u8)> {
    let family: u16 = unsafe { read(sk + off.sock_family as u64) }.ok()?;
    if family == AF_UNIX {
        return unix_tuple(off, sk);
    }
    let tuple = tuple_of_sock(off, sk, family)?;
    let role = role_of(&tuple)?;
    Some((tuple, role))
}

/// The Postgres port in the name of a Unix socket's bound address, if it is
/// `<dir>/.s.PGSQL.<port>` (also in the abstract namespace).
#[inline(always)]
fn pg_port_of_unix_addr(off: &KernelOffsets, usk: u64) -> Option<u16> {
    unsafe {
        let addr: u64 = read(usk + off.unix_addr as u64).ok()?;
        if addr == 0 {
            return None;
        }
        // len counts sun_family, the path and (for file names) its terminating NUL.
        let len: i32 = read(addr + off.unix_address_len as u64).ok()?;
        if !(2 + 10..=2 + 108 + 1).contains(&len) {
            return None;
        }
        let name = addr + off.unix_address_name as u64;
        let mut end = len as u64;
        let last: u8 = read(name + end - 1).ok()?;
        if last == 0 {
            end -= 1;
        }
        if end < 2 + 10 {
            return None;
        }
        // The last 16 bytes hold the longest suffix, ".s.PGSQL.65535", and what precedes
        // it. For a shorter path they start inside the address header: still readable, and
        // only path bytes are looked at.
        let tail: [u8; 16] = read(name + end - 16).ok()?;
        let path_len = end - 2;
        // Digits from the back (at most five), then the fixed part, then '/' or the start.
        let mut port: u32 = 0;
        let mut scale: u32 = 1;
        let mut digits: usize = 0;
        while digits < 5 {
            let c = tail[15 - digits];
            if !c.is_ascii_digit() {
                break;
            }
            port += (c - b'0') as u32 * scale;
            scale *= 10;
            digits += 1;
        }
        if digits == 0 || port == 0 || port > 65535 || path_len < (digits + 9) as u64 {
            return None;
        }
        // Constant indices only (the verifier refuses variable offsets into the stack).
        let named = match digits {
            1 => pg_suffix::<1>(&tail, path_len),
            2 => pg_suffix::<2>(&tail, path_len),
            3 => pg_suffix::<3>(&tail, path_len),
            4 => pg_suffix::<4>(&tail, path_len),
            _ => pg_suffix::<5>(&tail, path_len),
        };
        if !named {
            return None;
        }
        Some(port as u16)
    }
}

/// Whether the last 16 bytes of a socket path of `path_len` bytes end in `.s.PGSQL.`
/// and `D` digits, preceded by '/' (or NUL in the abstract namespace) or nothing.
#[inline(always)]
fn pg_suffix<const D: usize>(tail: &[u8; 16], path_len: u64) -> bool {
    const SUFFIX: &[u8; 9] = b".s.PGSQL.";
    let start = 16 - D - 9;
    let mut i = 0;
    while i < 9 {
        if tail[start + i] != SUFFIX[i] {
            return false;
        }
        i += 1;
    }
    path_len == (D + 9) as u64 || tail[start - 1] == b'/' || tail[start - 1] == 0
}

/// A Unix-domain connection to a watched Postgres socket: the server end is the socket
/// bound to `.s.PGSQL.<port>` (an accepted socket shares its listener's address), the
/// client end the socket whose peer is.
#[inline(always)]
fn unix_tuple(off: &KernelOffsets, sk: u64) -> Option<(Tuple, u8)> {
    if off.unix_valid == 0 {
        return None;
    }
    let ty: u16 = unsafe { read(sk + off.sock_type as u64) }.ok()?;
    if ty != SOCK_STREAM {
        return None;
    }
    let peer: u64 = unsafe { read(sk + off.unix_peer as u64) }.ok()?;
    if peer == 0 {
        return None;
    }
    let (port, role) = match pg_port_of_unix_addr(off, sk) {
        Some(port) => (port, ROLE_SERVER),
        None => (pg_port_of_unix_addr(off, peer)?, ROLE_CLIENT),
    };
    if PORT_RULES
        .get(port as u32)
        .is_none_or(|&rule| rule == PORT_NONE)
    {
        return None;
    }
    let mut tuple = Tuple {
        family: AF_UNIX,
        ..Tuple::default()
    };
    // The two socket addresses as the first 8 bytes of the endpoints, little-endian: one
    // store each (a byte loop spills every byte to the stack).
    const _: () =
        assert!(align_of::<Tuple>() >= 8 && core::mem::offset_of!(Tuple, remote_addr) == 16);
    unsafe {
        (tuple.local_addr.as_mut_ptr() as *mut u64).write(sk.to_le());
        (tuple.remote_addr.as_mut_ptr() as *mut u64).write(peer.to_le());
    }
    if role == ROLE_SERVER {
        tuple.local_port = port;
    } else {
        tuple.remote_port = port;
    }
    Some((tuple, role))
}

/// The endpoints of a TCP socket of `family`; None for other protocols.
#[inline(always)]
fn tuple_of_sock(off: &KernelOffsets, sk: u64, family: u16) -> Option<Tuple> {
    unsafe {
        if family != AF_INET && family != AF_INET6 {
            return None;
        }
        if off.sock_protocol != u32::MAX {
            let protocol: u16 = read(sk + off.sock_protocol as u64).ok()?;
            if protocol != IPPROTO_TCP {
                return None;
            }
        }
        let local_port: u16 = read(sk + off.sock_num as u64).ok()?;
        let dport_be: u16 = read(sk + off.sock_dport as u64).ok()?;
        let mut tuple = Tuple {
            local_port,
            remote_port: u16::from_be(dport_be),
            family,
            ..Tuple::default()
        };
        if family == AF_INET {
            let l: [u8; 4] = read(sk + off.sock_rcv_saddr as u64).ok()?;
            let r: [u8; 4] = read(sk + off.sock_daddr as u64).ok()?;
            tuple.local_addr = v4_mapped(l);
            tuple.remote_addr = v4_mapped(r);
        } else {
            tuple.local_addr = read(sk + off.sock_v6_rcv_saddr as u64).ok()?;
            tuple.remote_addr = read(sk + off.sock_v6_daddr as u64).ok()?;
        }
        if tuple.is_loopback() && off.sock_net != u32::MAX {
            // Failing reads leave 0: the connection is still watched, only not told
            // apart from a twin in another namespace.
            let net: u64 = read(sk + off.sock_net as u64).unwrap_or(0);
            if net != 0 {
                tuple.netns = read(net + off.net_ns_inum as u64).unwrap_or(0);
            }
        }
        Some(tuple)
    }
}

#[inline(always)]
pub fn is_endpoint(addr: &[u8; 16], port: u16) -> bool {
    match PORT_RULES.get(port as u32) {
        Some(&PORT_ANY_ADDR) => true,
        Some(&PORT_LISTED_ADDRS) => {
            let key = EndpointKey {
                addr: *addr,
                port,
                _pad: [0; 6],
            };
            unsafe { ENDPOINTS.get(key).is_some() }
        }
        _ => false,
    }
}

/// Which side of a Postgres connection the socket's owner is on, if either end is watched.
#[inline(always)]
fn role_of(tuple: &Tuple) -> Option<u8> {
    if is_endpoint(&tuple.local_addr, tuple.local_port) {
        // The server end of the inline proxy's own upstream connection: the proxy
        // records that session itself, from the client it relays.
        let peer = ProxyPeerKey {
            addr: tuple.remote_addr,
            port: tuple.remote_port,
            _pad: 0,
            netns: if is_loopback(&tuple.remote_addr) {
                tuple.netns
            } else {
                0
            },
        };
        if unsafe { PROXY_PEERS.get(peer).is_some() } {
            return None;
        }
        Some(ROLE_SERVER)
    } else if is_endpoint(&tuple.remote_addr, tuple.remote_port) {
        Some(ROLE_CLIENT)
    } else {
        None
    }
}

/// The daemon's offsets, in place: a copy (what `Global::load` makes) is 28 loads and
/// stores in every program run, and a fifth of the 512-byte stack.
/// The pointer is laundered through `black_box`: the compiler must load each field from
/// the global the daemon filled, not fold in the zeros it was declared with. To the
/// verifier the loads stay loads from frozen read-only data, hence known constants.
#[inline(always)]
pub fn offsets() -> Option<&'static KernelOffsets> {
    let global = core::hint::black_box(&OFFSETS as *const aya_ebpf::Global<KernelOffsets>);
    // SAFETY: Global<T> is a transparent wrapper of an initialised T.
    let off = unsafe { &*(global as *const KernelOffsets) };
    if unsafe { core::ptr::read_volatile(&off.valid) } == 0 {
        None
    } else {
        Some(off)
    }
}
