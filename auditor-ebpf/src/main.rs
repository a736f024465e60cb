//! eBPF programs of the auditor. Thin entry points; each calls a `try_*` function.
#![no_std]
#![no_main]
// The atomic add of `maps::tls_in_flight_add` (the BPF target has no atomic types that
// read-modify-write).
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod maps;
mod redirect;
mod server;
mod sock;
mod syscalls;
mod tls;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that can reach this; it is never taken.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
