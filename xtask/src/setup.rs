//! Installs what a fresh Debian bookworm machine lacks, and says why. Idempotent: what is
//! already there is left alone.

use std::{path::Path, process::Command};

use anyhow::{bail, Result};

use crate::run;

/// The nightly that builds the eBPF programs (its LLVM is 22, like bpf-linker's).
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-05-19";
/// The bpf-linker release installed: pinned like the nightly, so that a new release cannot
/// change the programs' code (and what the verifier makes of it) under a fresh machine.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages needed to build: (package, why).
const BUILD_PACKAGES: &[(&str, &str)] = &[
    (
        "llvm-22-dev",
        "bpf-linker links the eBPF programs with LLVM 22",
    ),
    (
        "libclang-dev",
        "pg_query (the Postgres parser) generates its bindings with bindgen",
    ),
];

/// Debian packages needed only by the tests.
const TEST_PACKAGES: &[(&str, &str)] = &[
    (
        "postgresql-15",
        "the integration tests start throwaway Postgres servers",
    ),
    (
        "postgresql-client-15",
        "psql and pgbench drive the integration tests",
    ),
    (
        "postgresql-15-pgaudit",
        "the benchmark compares the auditor with pgaudit",
    ),
    (
        "pgbouncer",
        "the benchmark compares the inline proxy with pgbouncer in session mode",
    ),
    (
        "clickhouse-server",
        "the ClickHouse tests start throwaway servers on their own ports",
    ),
    (
        "openssl",
        "the TLS tests make a certificate for their Postgres server",
    ),
    (
        "python3",
        "the TLS tests' own peers (tests/helpers/pg_tls.py) use Python's ssl module",
    ),
    (
        "libssl-dev",
        "a TLS test builds a client with OpenSSL linked statically (libssl.a)",
    ),
    (
        "iproute2",
        "a capture test runs Postgres servers in network namespaces of its own (`ip netns`)",
    ),
    (
        "python3-asyncpg",
        "the drivers test runs asyncpg (its own protocol implementation)",
    ),
    (
        "python3-psycopg",
        "the drivers test runs psycopg 3 in pipeline mode",
    ),
    (
        "libpostgresql-jdbc-java",
        "the drivers test runs pgjdbc (batches, named statements)",
    ),
    (
        "chromium",
        "the console test signs in and approves in headless Chromium",
    ),
    (
        "chromium-driver",
        "the console test drives Chromium over WebDriver (chromedriver)",
    ),
];

/// Tools the tests need, satisfied by any installation that puts the command on PATH
/// (Node.js from NodeSource, a JDK from elsewhere): (command, Debian package, why).
const TEST_COMMANDS: &[(&str, &str, &str)] = &[
    (
        "javac",
        "default-jdk-headless",
        "the drivers test compiles its pgjdbc client",
    ),
    ("node", "nodejs", "the drivers test runs node-postgres"),
    (
        "kubectl",
        "kubernetes-client",
        "CI renders deploy/kubernetes with `kubectl kustomize` to validate it",
    ),
    (
        "systemd-analyze",
        "systemd",
        "CI checks deploy/systemd/auditor.service with `systemd-analyze verify`",
    ),
    (
        "npm",
        "npm",
        "setup installs node-postgres (npm's `pg`) for the drivers test",
    ),
];

/// node-postgres for the drivers test, from npm into target/test-deps.
const NODE_PG: &str = "pg@8";

/// The Kubernetes manifest validator (with the API schemas it bundles), from PyPI into
/// target/test-deps/python.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// What to install.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Build,
    Test,
}

pub fn path_with_cargo_bin() -> String {
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or("/root".into())));
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{home}/bin:{path}")
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd} >/dev/null 2>&1")])
        .env("PATH", path_with_cargo_bin())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn setup(purpose: Purpose) -> Result<()> {
    let wanted = BUILD_PACKAGES.iter().chain(if purpose == Purpose::Test {
        TEST_PACKAGES
    } else {
        &[]
    });
    let mut missing: Vec<&(&str, &str)> = wanted.filter(|(p, _)| !installed(p)).collect();
    let commands: Vec<(&str, &str)> = if purpose == Purpose::Test {
        TEST_COMMANDS
            .iter()
            .filter(|(cmd, _, _)| !have(cmd))
            .map(|(_, p, why)| (*p, *why))
            .collect()
    } else {
        Vec::new()
    };
    missing.extend(commands.iter());
    if !missing.is_empty() {
        for (p, why) in &missing {
            eprintln!("setup: installing {p}: {why}");
        }
        if !is_root() {
            bail!(
                "installing Debian packages needs root: run `sudo apt-get install {}` or rerun as root",
                missing.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(" ")
            );
        }
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing.iter().map(|(p, _)| *p))
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut cmd)?;
    }

    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let sysroot_src = Command::new("rustup")
        .args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .map(|s| {
            Path::new(&s)
                .join("lib/rustlib/src/rust/library/core")
                .exists()
        })
        .unwrap_or(false);
    if !toolchains.contains(EBPF_TOOLCHAIN) || !sysroot_src {
        eprintln!(
            "setup: installing Rust {EBPF_TOOLCHAIN} with rust-src and clippy: the eBPF programs build with -Z build-std"
        );
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            EBPF_TOOLCHAIN,
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy",
        ]))?;
    }

    if !have("bpf-linker") {
        eprintln!(
            "setup: installing bpf-linker (built against LLVM 22): it links the eBPF programs"
        );
        let mut cmd = Command::new("cargo");
        cmd.args([
            "install",
            "--locked",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("PATH", path_with_cargo_bin());
        run(&mut cmd)?;
    }
    if purpose == Purpose::Test && !have("cargo-fuzz") {
        eprintln!(
            "setup: installing cargo-fuzz: CI runs the codec and session fuzz targets for a bounded time"
        );
        run(Command::new("cargo")
            .args(["install", "--locked", "cargo-fuzz"])
            .env("PATH", path_with_cargo_bin()))?;
    }
    if purpose == Purpose::Test {
        let node_modules = crate::workspace_root().join("target/test-deps");
        if !node_modules.join("node_modules/pg").exists() {
            eprintln!(
                "setup: installing node-postgres ({NODE_PG}) into {}: the drivers test runs it",
                node_modules.display()
            );
            std::fs::create_dir_all(&node_modules)?;
            run(Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
                .arg("--prefix")
                .arg(&node_modules)
                .arg(NODE_PG))?;
        }
        let python = crate::workspace_root().join("target/test-deps/python");
        if !python.join("kubernetes_validate").exists() {
            eprintln!(
                "setup: installing {KUBERNETES_VALIDATE} into {}: CI validates the DaemonSet manifests",
                python.display()
            );
            run(Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg("--target")
                .arg(&python)
                .arg(KUBERNETES_VALIDATE))?;
        }
        for tool in ["pgbench", "psql"] {
            if !have(tool) {
                bail!("{tool} is still missing after setup: install postgresql-client-15");
            }
        }
    }
    eprintln!("setup: everything needed is installed");
    Ok(())
}
