//! From a file descriptor of the current task to its TCP socket and endpoints.
//!
//! The walk is current task -> files -> fdtable -> file -> inode (S_IFSOCK?) -> socket -> sock,
//! with field offsets from the daemon (computed from the running kernel's BTF).

use auditor_common::{
    v4_mapped, EndpointKey, KernelOffsets, Tuple, PORT_ANY_ADDR, PORT_LISTED_ADDRS, ROLE_CLIENT,
    ROLE_SERVER,
};
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::maps::{ENDPOINTS, OFFSETS, PORT_RULES};

const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

#[inline(always)]
unsafe fn read<T>(addr: u64) -> Result<T, i32> {
    unsafe { bpf_probe_read_kernel(addr as *const T) }
}

/// The `struct file` behind `fd` of the current task.
#[inline(always)]
fn file_of_fd(off: &KernelOffsets, fd: u64) -> Option<u64> {
    unsafe {
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
        let fd_array: u64 = read(fdt + off.fdtable_fd as u64).ok()?;
        let file: u64 = read(fd_array + fd * 8).ok()?;
        if file == 0 {
            None
        } else {
            Some(file)
        }
    }
}

/// The `struct sock` behind `fd` of the current task, if it is a socket.
#[inline(always)]
pub fn sock_of_fd(off: &KernelOffsets, fd: u64) -> Option<u64> {
    unsafe {
        let file = file_of_fd(off, fd)?;
        let inode: u64 = read(file + off.file_f_inode as u64).ok()?;
        let mode: u16 = read(inode + off.inode_i_mode as u64).ok()?;
        if mode & S_IFMT != S_IFSOCK {
            return None;
        }
        let socket: u64 = read(file + off.file_private_data as u64).ok()?;
        let sk: u64 = read(socket + off.socket_sk as u64).ok()?;
        if sk == 0 {
            None
        } else {
            Some(sk)
        }
    }
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

/// The endpoints of a TCP socket; None for other families and protocols.
#[inline(always)]
pub fn tuple_of_sock(off: &KernelOffsets, sk: u64) -> Option<Tuple> {
    unsafe {
        let family: u16 = read(sk + off.sock_family as u64).ok()?;
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
        Some(tuple)
    }
}

#[inline(always)]
fn is_endpoint(addr: &[u8; 16], port: u16) -> bool {
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
pub fn role_of(tuple: &Tuple) -> Option<u8> {
    if is_endpoint(&tuple.local_addr, tuple.local_port) {
        Some(ROLE_SERVER)
    } else if is_endpoint(&tuple.remote_addr, tuple.remote_port) {
        Some(ROLE_CLIENT)
    } else {
        None
    }
}

#[inline(always)]
pub fn offsets() -> Option<KernelOffsets> {
    let off = OFFSETS.load();
    if off.valid == 0 {
        None
    } else {
        Some(off)
    }
}
