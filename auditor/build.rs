//! Builds the eBPF programs with the pinned nightly and bpf-linker (see README.md), and
//! embeds the object into the daemon.
use aya_build::{Package, Toolchain};

/// The nightly that builds the eBPF crate: LLVM 22, matching bpf-linker's LLVM.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";

fn main() -> anyhow::Result<()> {
    let package = Package {
        name: "auditor-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../auditor-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom(EBPF_TOOLCHAIN))
}
