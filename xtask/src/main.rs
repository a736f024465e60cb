//! The commands a person types: `cargo xtask setup | run | ci | fixtures`.

mod bench;
mod fixtures;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need and this machine lacks (Debian/Ubuntu, root):
    /// the pinned nightly with rust-src and LLVM 22 with bpf-linker (to build the eBPF
    /// programs), libclang (for pg_query); with --tests also PostgreSQL 15 server and
    /// client (psql, pgbench) for the integration tests.
    Setup {
        #[arg(long)]
        tests: bool,
    },
    /// Set up, build in release mode and run the auditor on this host in the foreground
    /// with the embedded default (the hash-chained log under /var/lib/auditor).
    Run {
        /// Arguments after `--` go to `auditor run` (for example `-- --config my.yaml`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then check formatting and lints and run every test, the root-only
    /// integration tests included (real eBPF, real Postgres, real clients). Needs root:
    /// a test that cannot run fails with the reason instead of being skipped.
    Ci,
    /// Measure what auditing costs next to no auditing, pgaudit and log_statement=all,
    /// interleaved, and write docs/benchmarks.md (about 30 minutes; --smoke: seconds, report
    /// not written; a selection of workloads or configurations: target/bench-partial.md).
    Bench {
        /// Seconds instead of minutes; CI runs it. The report goes to the temp directory.
        #[arg(long)]
        smoke: bool,
        /// Only this workload (repeatable): select-only/simple, select-only/extended,
        /// select-only/prepared, TPC-B-like/simple, TPC-B-like/extended, TPC-B-like/prepared.
        /// Any selection writes target/bench-partial.md, not docs/benchmarks.md.
        #[arg(long, value_name = "WORKLOAD/MODE")]
        only: Vec<String>,
        /// Only these configurations besides "none" (comma-separated): auditor, clickhouse,
        /// pgaudit, log_statement.
        #[arg(long, value_delimiter = ',')]
        configs: Vec<String>,
        /// Interleaved repetitions (default 3).
        #[arg(long)]
        reps: Option<u32>,
        /// Seconds per pgbench run (default 10).
        #[arg(long)]
        seconds: Option<u32>,
    },
    /// Record Postgres protocol transcripts through a recording proxy, as test fixtures.
    Fixtures {
        /// Where to write the transcripts.
        #[arg(long, default_value = "auditor/tests/fixtures")]
        out: PathBuf,
    },
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c.env("PATH", setup::path_with_cargo_bin());
    c
}

fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::Setup { tests } => setup::setup(if tests {
            setup::Purpose::Test
        } else {
            setup::Purpose::Build
        }),
        Cmd::Run { args } => {
            setup::setup(setup::Purpose::Build)?;
            run(cargo().args(["build", "--release", "-p", "auditor"]))?;
            let bin = workspace_root().join("target/release/auditor");
            let mut cmd = Command::new(bin);
            cmd.arg("run").args(args);
            run(&mut cmd)
        }
        Cmd::Ci => {
            setup::setup(setup::Purpose::Test)?;
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            // Host crates (the default members), then the eBPF crate on its own target.
            run(cargo().args([
                "clippy",
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ]))?;
            // `rustup run`: $CARGO is the stable toolchain's own cargo, not the proxy.
            run(Command::new("rustup")
                .current_dir(workspace_root().join("auditor-ebpf"))
                .env("PATH", setup::path_with_cargo_bin())
                .env_remove("RUSTC")
                .args(["run", setup::EBPF_TOOLCHAIN, "cargo", "clippy", "--release"])
                .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
                .args(["--", "-D", "warnings"]))?;
            // The daemon the integration tests start is this release build.
            run(cargo().args(["build", "--release", "-p", "auditor"]))?;
            // Default members: every host crate (the eBPF crate is built by auditor/build.rs).
            // One test at a time: the integration tests load this 2-core machine fully.
            // CI=true: a root integration test that cannot run here (not root, no server)
            // fails with its reason instead of skipping; `xtask ci` is the full bar.
            run(cargo()
                .env("CI", "true")
                .args(["test", "--release", "--", "--test-threads=1"]))?;
            // The benchmark in seconds, so the command never rots.
            bench::bench(bench::Options {
                smoke: true,
                ..bench::Options::default()
            })
        }
        Cmd::Bench {
            smoke,
            only,
            configs,
            reps,
            seconds,
        } => bench::bench(bench::Options {
            smoke,
            only,
            configs,
            reps,
            seconds,
        }),
        Cmd::Fixtures { out } => fixtures::record(&workspace_root().join(out)),
    }
}
