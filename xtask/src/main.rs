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
    /// Set up, build as installed (the `dist` profile) and run the auditor on this host in
    /// the foreground with the embedded default (the sealed local log under
    /// /var/lib/auditor).
    Run {
        /// Arguments after `--` go to `auditor run` (for example `-- --config my.yaml`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, then check formatting and lints and run every test, the root-only
    /// integration tests included (real eBPF, real Postgres, real clients). Needs root:
    /// a test that cannot run fails with the reason instead of being skipped.
    Ci,
    /// Validate the deployment files: deploy/kubernetes rendered by kustomize and checked
    /// against the Kubernetes API schemas, its policies linted, deploy/systemd verified
    /// (part of `ci`; builds the daemon first).
    DeployCheck,
    /// Measure what auditing costs next to no auditing, pgaudit and log_statement=all,
    /// interleaved, and write docs/benchmarks.md (about 45 minutes; --smoke: seconds, report
    /// not written; a selection of workloads or configurations: target/bench-partial.md).
    Bench {
        /// Seconds instead of minutes; CI runs it. The report goes to the temp directory.
        #[arg(long)]
        smoke: bool,
        /// Only this workload (repeatable): select-only/simple, select-only/extended,
        /// select-only/prepared, TPC-B-like/simple, TPC-B-like/extended, TPC-B-like/prepared,
        /// memory (1,000 connections), masking (a 200,000-row result masked in the proxy),
        /// profile (`perf record` on the daemon during a select-only run).
        /// Any selection writes target/bench-partial.md, not docs/benchmarks.md.
        #[arg(long, value_name = "WORKLOAD/MODE")]
        only: Vec<String>,
        /// Only these configurations besides "none" (comma-separated): bare (the auditor's
        /// hooks with programs that return at once), auditor, clickhouse, pgaudit,
        /// log_statement, proxy, pgbouncer.
        #[arg(long, value_delimiter = ',')]
        configs: Vec<String>,
        /// Interleaved repetitions (default 3).
        #[arg(long)]
        reps: Option<u32>,
        /// Seconds per pgbench run (default 10).
        #[arg(long)]
        seconds: Option<u32>,
    },
    /// Run the fuzz targets (auditor/fuzz: codec, session, proxy) with the pinned nightly and
    /// cargo-fuzz, each for a bounded time; a crash leaves its input in
    /// auditor/fuzz/artifacts/TARGET/ and fails the command.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Only these targets (default: all).
        targets: Vec<String>,
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

/// Builds the daemon as it is installed (the `dist` profile: `release` optimised across
/// crates) and returns its path.
pub fn build_daemon() -> Result<std::path::PathBuf> {
    run(cargo().args(["build", "--profile", "dist", "-p", "auditor"]))?;
    Ok(workspace_root().join("target/dist/auditor"))
}

/// Fuzz targets in auditor/fuzz/fuzz_targets.
const FUZZ_TARGETS: &[&str] = &["codec", "session", "proxy"];

fn fuzz(seconds: u32, only: &[String]) -> Result<()> {
    for target in FUZZ_TARGETS {
        if !only.is_empty() && !only.iter().any(|t| t == target) {
            continue;
        }
        // The corpus grows in target/ (not committed); the seeds are the recorded
        // transcripts' bytes, so the fuzzer starts from real conversations.
        let corpus = workspace_root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        seed_corpus(&corpus)?;
        run(Command::new("rustup")
            .current_dir(workspace_root().join("auditor"))
            .env("PATH", setup::path_with_cargo_bin())
            .env_remove("RUSTC")
            .env_remove("RUSTFLAGS")
            .args([
                "run",
                setup::EBPF_TOOLCHAIN,
                "cargo",
                "fuzz",
                "run",
                "--release",
            ])
            .args(["--fuzz-dir", "fuzz", target])
            .arg(&corpus)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=2048",
            ])
            .args(["-max_len=65536", "-print_final_stats=1"]))?;
    }
    Ok(())
}

/// Seeds: each recorded transcript's client bytes and server bytes, and both interleaved
/// as the session target reads them (flags, length, bytes).
fn seed_corpus(dir: &std::path::Path) -> Result<()> {
    let fixtures = workspace_root().join("auditor/tests/fixtures");
    for entry in std::fs::read_dir(&fixtures)? {
        let path = entry?.path();
        let name = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path)?;
        let mut client = vec![0x04u8];
        let mut server = vec![0x05u8];
        let mut both = vec![0u8];
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            let bytes = hex::decode(v["hex"].as_str().unwrap_or_default())?;
            let to_client = v["d"] == "s";
            if to_client { &mut server } else { &mut client }.extend_from_slice(&bytes);
            for piece in bytes.chunks(255) {
                both.extend_from_slice(&[to_client as u8, piece.len() as u8]);
                both.extend_from_slice(piece);
            }
        }
        std::fs::write(dir.join(format!("{name}-client")), &client)?;
        std::fs::write(dir.join(format!("{name}-server")), &server)?;
        std::fs::write(dir.join(format!("{name}-both")), &both)?;
    }
    Ok(())
}

/// The deployment files: the DaemonSet manifests rendered by kustomize and validated
/// against the Kubernetes API schemas (strict: unknown fields fail), their configuration
/// and policies loaded by the daemon's own checks, and the systemd unit verified.
fn check_deploy(auditor: &std::path::Path) -> Result<()> {
    let root = workspace_root();
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root.join("deploy/kubernetes"))
        .output()
        .context("running kubectl kustomize")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize deploy/kubernetes: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rendered = root.join("target/deploy-kubernetes.yaml");
    std::fs::write(&rendered, &out.stdout)?;
    run(Command::new("python3")
        .env("PYTHONPATH", root.join("target/test-deps/python"))
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            "1.30.0",
        ])
        .arg(&rendered))?;
    run(Command::new(auditor)
        .args(["policy", "lint"])
        .arg(root.join("deploy/kubernetes/policies")))?;
    // The unit as installed, with ExecStart pointing at this build.
    let unit = std::fs::read_to_string(root.join("deploy/systemd/auditor.service"))?;
    let dir = root.join("target/deploy-systemd");
    std::fs::create_dir_all(&dir)?;
    let local = dir.join("auditor.service");
    std::fs::write(
        &local,
        unit.replace("/usr/local/bin/auditor", &auditor.display().to_string()),
    )?;
    // `verify` exits 0 on unknown or misspelt keys, only saying so: any word is a failure.
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local)
        .output()
        .context("running systemd-analyze verify")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!("systemd-analyze verify deploy/systemd/auditor.service:\n{said}");
    }
    eprintln!("deploy: the DaemonSet manifests validate, the unit verifies");
    Ok(())
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
            let bin = build_daemon()?;
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
            // The daemon the integration tests start is this release build. (The `dist`
            // build, as installed, is the same code linked as one unit: ten more minutes
            // here, for a build the benchmark measures and `run` starts.)
            run(cargo().args(["build", "--release", "-p", "auditor"]))?;
            check_deploy(&workspace_root().join("target/release/auditor"))?;
            // Default members: every host crate (the eBPF crate is built by auditor/build.rs).
            // One test at a time: the integration tests load this 2-core machine fully.
            // CI=true: a root integration test that cannot run here (not root, no server)
            // fails with its reason instead of skipping; `xtask ci` is the full bar.
            run(cargo()
                .env("CI", "true")
                .args(["test", "--release", "--", "--test-threads=1"]))?;
            // The parsers and the proxy's relay under arbitrary bytes, bounded: half a minute
            // per target.
            fuzz(30, &[])?;
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
        Cmd::Fuzz { seconds, targets } => {
            setup::setup(setup::Purpose::Test)?;
            fuzz(seconds, &targets)
        }
        Cmd::DeployCheck => {
            setup::setup(setup::Purpose::Test)?;
            check_deploy(&build_daemon()?)
        }
        Cmd::Fixtures { out } => fixtures::record(&workspace_root().join(out)),
    }
}
