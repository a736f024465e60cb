//! A uprobe in the Postgres server: `PortalDefineQuery(portal, prepStmtName, sourceText,
//! ...)` runs on every Bind (and simple query) and names the prepared statement and its
//! source text. The daemon attaches it to the executables of backends older than itself
//! and lists those backends in OLD_BACKENDS (for them, the Parse went by before capture);
//! it reports only theirs, so the statement text of their prepared statements is known
//! when they are executed. The probe is removed when the last of them exits. Its first three arguments have kept their meaning from
//! Postgres 9 to 17.

use auditor_common::{RecordHeader, CHUNK_DATA, RECORD_SERVER_TEXT, SERVER_NAME_BYTES};
use aya_ebpf::{
    helpers::generated::bpf_probe_read_user_str, macros::uprobe, programs::ProbeContext,
};
use core::ffi::c_void;

use crate::{
    maps::{count, EVENTS, OLD_BACKENDS, SCRATCH},
    syscalls::fill_identity,
};

const HEADER_LEN: usize = core::mem::size_of::<RecordHeader>();
const TEXT_BYTES: usize = CHUNK_DATA - SERVER_NAME_BYTES;

#[uprobe]
pub fn portal_define_query(ctx: ProbeContext) -> u32 {
    let _ = try_portal_define_query(&ctx);
    0
}

#[inline(always)]
fn try_portal_define_query(ctx: &ProbeContext) -> Option<()> {
    let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
    unsafe { OLD_BACKENDS.get(tgid) }?;
    let name: u64 = ctx.arg(1)?;
    let text: u64 = ctx.arg(2)?;
    // Unnamed statements are parsed again for each use: nothing to learn.
    if name == 0 || text == 0 {
        return None;
    }
    let rec = SCRATCH.get_ptr_mut(0)?;
    unsafe {
        let h = &mut (*rec).header;
        *h = RecordHeader::default();
        h.kind = RECORD_SERVER_TEXT;
        fill_identity(h);
        let data = core::ptr::addr_of_mut!((*rec).data) as *mut u8;
        let n = bpf_probe_read_user_str(
            data as *mut c_void,
            SERVER_NAME_BYTES as u32,
            name as *const c_void,
        );
        if n <= 1 {
            return None;
        }
        // Without its NUL.
        (*rec).header.aux[0] = (n - 1) as u64;
        let t = bpf_probe_read_user_str(
            data.add(SERVER_NAME_BYTES) as *mut c_void,
            TEXT_BYTES as u32,
            text as *const c_void,
        );
        if t < 1 {
            return None;
        }
        let t = core::cmp::min(t as u64 - 1, TEXT_BYTES as u64 - 1);
        (*rec).header.call_len = t;
        let len = SERVER_NAME_BYTES as u64 + t;
        (*rec).header.len = len as u32;
        let total = HEADER_LEN as u64 + len;
        if total > (HEADER_LEN + CHUNK_DATA) as u64 {
            return None;
        }
        let bytes = core::slice::from_raw_parts(rec as *const u8, total as usize);
        if EVENTS.output::<[u8]>(bytes, 0).is_err() {
            count(auditor_common::counter::RINGBUF_DROPS, 1);
        }
    }
    Some(())
}
