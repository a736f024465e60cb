//! A small reader of the kernel's BTF (/sys/kernel/btf/vmlinux): just enough to find the byte
//! offset of a (possibly nested, possibly inside anonymous unions) field of a named struct.
//!
//! The eBPF programs read kernel structures with `bpf_probe_read_kernel` at these offsets, so
//! one build of the programs runs on every kernel whose BTF names the same fields.

use std::collections::HashMap;

use auditor_common::KernelOffsets;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source} (the kernel must be built with CONFIG_DEBUG_INFO_BTF)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF: struct `{strukt}` has no field `{field}`")]
    NoField { strukt: String, field: String },
    #[error("kernel BTF: `{strukt}.{field}` is a bitfield; it cannot be read by offset")]
    Bitfield { strukt: String, field: String },
}

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Offset in bits from the start of the enclosing struct.
    bit_offset: u32,
    bitfield_size: u32,
}

#[derive(Debug, Clone)]
enum Type {
    /// struct or union
    Composite {
        name_off: u32,
        members: Vec<Member>,
    },
    /// typedef, const, volatile, restrict, type_tag: follow to the real type
    Alias {
        target: u32,
    },
    Other,
}

pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_at = hdr_len
            .checked_add(type_off)
            .ok_or(BtfError::Malformed("type offset"))?;
        let strs_at = hdr_len
            .checked_add(str_off)
            .ok_or(BtfError::Malformed("string offset"))?;
        let type_data = data
            .get(types_at..types_at + type_len)
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        let strings = data
            .get(strs_at..strs_at + str_len)
            .ok_or(BtfError::Malformed("string section out of bounds"))?
            .to_vec();

        // Type id 0 is void.
        let mut types = vec![Type::Other];
        let mut at = 0usize;
        while at < type_data.len() {
            let name_off = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_data, m + 8)?;
                        let (bit_offset, bitfield_size) = if kind_flag {
                            (offset & 0x00ff_ffff, offset >> 24)
                        } else {
                            (offset, 0)
                        };
                        members.push(Member {
                            name_off: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            bit_offset,
                            bitfield_size,
                        });
                    }
                    at += vlen * 12;
                    Type::Composite { name_off, members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias {
                        target: size_or_type,
                    }
                }
                KIND_INT => {
                    at += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_ENUM => {
                    at += vlen * 8;
                    Type::Other
                }
                KIND_ENUM64 => {
                    at += vlen * 12;
                    Type::Other
                }
                KIND_FUNC_PROTO => {
                    at += vlen * 8;
                    Type::Other
                }
                KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_DATASEC => {
                    at += vlen * 12;
                    Type::Other
                }
                KIND_PTR | KIND_FWD | KIND_FUNC | KIND_FLOAT => Type::Other,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            types.push(ty);
        }
        let mut btf = Btf {
            types,
            strings,
            by_name: HashMap::new(),
        };
        // The first struct of a name wins (vmlinux has one definition per struct name).
        let mut by_name = HashMap::new();
        for (id, ty) in btf.types.iter().enumerate() {
            if let Type::Composite { name_off, members } = ty {
                let name = btf.name(*name_off);
                if !name.is_empty() && !members.is_empty() {
                    by_name.entry(name.to_string()).or_insert(id as u32);
                }
            }
        }
        btf.by_name = by_name;
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let start = off as usize;
        let Some(rest) = self.strings.get(start..) else {
            return "";
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias { target } => id = *target,
                ty => return Some(ty),
            }
        }
        None
    }

    /// Byte offset of `field` in struct `strukt`, looking through anonymous members.
    pub fn field_offset(&self, strukt: &str, field: &str) -> Result<u32, BtfError> {
        let id = *self
            .by_name
            .get(strukt)
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        match self.find(id, field, 0) {
            Some((bits, 0)) if bits % 8 == 0 => Ok(bits / 8),
            Some(_) => Err(BtfError::Bitfield {
                strukt: strukt.into(),
                field: field.into(),
            }),
            None => Err(BtfError::NoField {
                strukt: strukt.into(),
                field: field.into(),
            }),
        }
    }

    /// (bit offset, bitfield size) of `field` within type `id`, searching anonymous members.
    fn find(&self, id: u32, field: &str, depth: u32) -> Option<(u32, u32)> {
        if depth > 8 {
            return None;
        }
        let Type::Composite { members, .. } = self.resolve(id)? else {
            return None;
        };
        for m in members {
            let name = self.name(m.name_off);
            if name == field {
                return Some((m.bit_offset, m.bitfield_size));
            }
            if name.is_empty() {
                if let Some((inner, size)) = self.find(m.type_id, field, depth + 1) {
                    return Some((m.bit_offset + inner, size));
                }
            }
        }
        None
    }

    /// The offsets the eBPF programs need, for the running kernel.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let sk_common = self.field_offset("sock", "__sk_common")?;
        let common = |f: &str| -> Result<u32, BtfError> {
            Ok(sk_common + self.field_offset("sock_common", f)?)
        };
        let sock_protocol = match self.field_offset("sock", "sk_protocol") {
            Ok(off) => off,
            // Kernels before 5.6 keep sk_protocol in a bitfield: skip the check there.
            Err(BtfError::Bitfield { .. }) => u32::MAX,
            Err(e) => return Err(e),
        };
        let unix = self.unix_offsets();
        let (sock_net, net_ns_inum) = match self.netns_offsets() {
            Some((net, inum)) => (sk_common + net, inum),
            None => (u32::MAX, u32::MAX),
        };
        // Fields an open record reads when the kernel has them (u32::MAX: it has not).
        let task_field = |f: &str| self.field_offset("task_struct", f).unwrap_or(u32::MAX);
        Ok(KernelOffsets {
            task_files: self.field_offset("task_struct", "files")?,
            files_fdt: self.field_offset("files_struct", "fdt")?,
            fdtable_max_fds: self.field_offset("fdtable", "max_fds")?,
            fdtable_fd: self.field_offset("fdtable", "fd")?,
            file_f_inode: self.field_offset("file", "f_inode")?,
            file_private_data: self.field_offset("file", "private_data")?,
            inode_i_mode: self.field_offset("inode", "i_mode")?,
            socket_sk: self.field_offset("socket", "sk")?,
            sock_family: common("skc_family")?,
            sock_num: common("skc_num")?,
            sock_dport: common("skc_dport")?,
            sock_daddr: common("skc_daddr")?,
            sock_rcv_saddr: common("skc_rcv_saddr")?,
            sock_v6_daddr: common("skc_v6_daddr")?,
            sock_v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
            sock_protocol,
            valid: 1,
            inode_i_ino: self.field_offset("inode", "i_ino")?,
            inode_i_sb: self.field_offset("inode", "i_sb")?,
            sb_s_dev: self.field_offset("super_block", "s_dev")?,
            unix_valid: unix.is_some() as u32,
            sock_type: unix.map_or(0, |u| u.0),
            unix_addr: unix.map_or(0, |u| u.1),
            unix_peer: unix.map_or(0, |u| u.2),
            unix_address_len: unix.map_or(0, |u| u.3),
            unix_address_name: unix.map_or(0, |u| u.4),
            sock_net,
            net_ns_inum,
            socket_inode: match (
                self.field_offset("socket_alloc", "socket"),
                self.field_offset("socket_alloc", "vfs_inode"),
            ) {
                (Ok(0), Ok(inode)) => inode,
                _ => u32::MAX,
            },
            regs_args: self.syscall_regs(),
            // Audit ids: a kernel built without audit support has neither field.
            task_loginuid: task_field("loginuid"),
            task_sessionid: task_field("sessionid"),
            task_group_leader: task_field("group_leader"),
            task_start_boottime: task_field("start_boottime"),
            _pad: [0; 3],
        })
    }

    /// Offsets in `struct pt_regs` of a system call's first four arguments as they stand
    /// at its exit; u32::MAX each where this architecture is not one whose layout is known
    /// (then the exits do not read them: the entries note every call).
    fn syscall_regs(&self) -> [u32; 4] {
        let none = [u32::MAX; 4];
        let at = |f: &str| self.field_offset("pt_regs", f).ok();
        let found = if cfg!(target_arch = "x86_64") {
            // The syscall ABI: rdi, rsi, rdx, r10 (r10 for the C ABI's rcx).
            (|| Some([at("di")?, at("si")?, at("dx")?, at("r10")?]))()
        } else if cfg!(target_arch = "aarch64") {
            // x0 holds the return value by then; the kernel keeps the first argument in
            // orig_x0. x1..x3 are untouched.
            (|| {
                let regs = at("regs")?;
                Some([at("orig_x0")?, regs + 8, regs + 16, regs + 24])
            })()
        } else {
            None
        };
        found.unwrap_or(none)
    }

    /// (sock_common.skc_net.net, net.ns.inum); None on a kernel built without network
    /// namespaces (`possible_net_t` is empty there).
    fn netns_offsets(&self) -> Option<(u32, u32)> {
        let skc_net = self.field_offset("sock_common", "skc_net").ok()?;
        // possible_net_t is an anonymous typedef'd struct: find `net` through the member.
        let net = self.member_field_offset("sock_common", "skc_net", "net")?;
        let ns = self.field_offset("net", "ns").ok()?;
        let inum = self.field_offset("ns_common", "inum").ok()?;
        Some((skc_net + net, ns + inum))
    }

    /// Byte offset of `field` inside the (possibly typedef'd, anonymous) type of member
    /// `member` of struct `strukt`.
    fn member_field_offset(&self, strukt: &str, member: &str, field: &str) -> Option<u32> {
        let id = *self.by_name.get(strukt)?;
        let Type::Composite { members, .. } = self.resolve(id)? else {
            return None;
        };
        let m = members.iter().find(|m| self.name(m.name_off) == member)?;
        match self.find(m.type_id, field, 0)? {
            (bits, 0) if bits % 8 == 0 => Some(bits / 8),
            _ => None,
        }
    }

    /// Offsets for Unix-domain sockets: (sock.sk_type, unix_sock.addr, unix_sock.peer,
    /// unix_address.len, unix_address.name); None where AF_UNIX is a module whose types
    /// are not in vmlinux's BTF.
    fn unix_offsets(&self) -> Option<(u32, u32, u32, u32, u32)> {
        Some((
            self.field_offset("sock", "sk_type").ok()?,
            self.field_offset("unix_sock", "addr").ok()?,
            self.field_offset("unix_sock", "peer").ok()?,
            self.field_offset("unix_address", "len").ok()?,
            self.field_offset("unix_address", "name").ok()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(Btf::parse(&[]).is_err());
        assert!(Btf::parse(&[0u8; 64]).is_err());
        let mut hdr = vec![0x9f, 0xeb, 1, 0, 24, 0, 0, 0];
        hdr.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(Btf::parse(&hdr).is_err());
    }

    #[test]
    fn running_kernel_offsets() {
        let Ok(btf) = Btf::from_sys_fs() else {
            eprintln!("skipped: no /sys/kernel/btf/vmlinux on this machine");
            return;
        };
        let off = btf.kernel_offsets().expect("offsets");
        // struct sock starts with sock_common, whose address pair comes first.
        assert_eq!(off.sock_daddr, 0);
        assert_eq!(off.sock_rcv_saddr, 4);
        assert!(off.sock_dport > off.sock_rcv_saddr && off.sock_num == off.sock_dport + 2);
        assert!(off.task_files > 0 && off.file_private_data > 0);
        // struct unix_sock starts with its struct sock; unix_address.name follows len.
        if off.unix_valid != 0 {
            assert!(off.unix_addr > off.sock_type && off.unix_peer > off.unix_addr);
            assert_eq!(off.unix_address_name, off.unix_address_len + 4);
        }
        // This kernel has network namespaces: skc_net follows the address pair and ports.
        assert!(off.sock_net != u32::MAX && off.sock_net > off.sock_num);
        assert!(off.net_ns_inum != u32::MAX && off.net_ns_inum > 0);
        // A socket's inode follows its struct socket (socket_alloc), past its sk pointer:
        // the capture reads sk, the inode's mode and number in one go.
        assert!(off.socket_inode != u32::MAX && off.socket_inode > off.socket_sk);
        // The arguments of a system call in the registers the task entered with.
        if cfg!(target_arch = "x86_64") {
            // struct pt_regs: r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di ...
            assert_eq!(off.regs_args, [112, 104, 96, 56]);
        }
        // This kernel has audit support: the task's login uid and session.
        assert!(off.task_loginuid != u32::MAX && off.task_loginuid > 0);
        assert!(off.task_sessionid != u32::MAX && off.task_sessionid > 0);
        assert!(off.task_group_leader != u32::MAX && off.task_start_boottime != u32::MAX);
    }
}
