use std::path::PathBuf;

use auditor::{cli, config::Config, daemon};
use clap::{Parser, Subcommand};

// Events are many small strings: the allocator was a quarter of the daemon's profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Records every statement that any process on this host exchanges with PostgreSQL, tied to
/// the process and workload that sent it. Captures with eBPF; needs root to `run`.
#[derive(Parser)]
#[command(name = "auditor", version, propagate_version = true)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct StateDir {
    /// State directory of the daemon (where its log and stats are).
    #[arg(long, env = "AUDITOR_STATE_DIR", default_value = "/var/lib/auditor")]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Capture and record, in the foreground, until Ctrl-C (which flushes everything).
    ///
    /// Without --config: port 5432 on any address, events in /var/lib/auditor/log.
    Run {
        /// YAML configuration (see `auditor config-example`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Overrides the config's state_dir.
        #[arg(long, env = "AUDITOR_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Show the latest events and follow new ones as they are written.
    Tail {
        #[command(flatten)]
        dir: StateDir,
        /// Events to show before following.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// One JSON object per line instead of readable lines.
        #[arg(long)]
        json: bool,
        /// Print and exit instead of following.
        #[arg(long)]
        no_follow: bool,
    },
    /// List sessions: who, which database, how many statements, errors and gaps.
    Sessions {
        #[command(flatten)]
        dir: StateDir,
        /// Show the last N sessions.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// One session's events in order, with timings and outcomes.
    Show {
        /// Session id (or a prefix of at least 8 characters), from `auditor sessions`.
        session: String,
        #[command(flatten)]
        dir: StateDir,
        #[arg(long)]
        json: bool,
    },
    /// Counters of the running (or last) daemon: events, bytes, drops, truncations, gaps.
    Stats {
        #[command(flatten)]
        dir: StateDir,
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain of the local log; reports the first modified, removed or
    /// reordered line. Exit status 1 when broken.
    Verify {
        #[command(flatten)]
        dir: StateDir,
    },
    /// Print a commented configuration file with every default.
    ConfigExample,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = dispatch(args) {
        // The cause chain, one line: what failed and why, without a backtrace.
        eprintln!("auditor: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Run { config, state_dir } => {
            let mut cfg = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            if let Some(dir) = state_dir {
                cfg.state_dir = dir;
            }
            daemon::run(&cfg)?;
        }
        Command::Tail {
            dir,
            lines,
            json,
            no_follow,
        } => cli::tail(&dir.state_dir.join("log"), lines, json, !no_follow)?,
        Command::Sessions { dir, limit } => cli::sessions(&dir.state_dir.join("log"), limit)?,
        Command::Show { session, dir, json } => {
            cli::show(&dir.state_dir.join("log"), &session, json)?
        }
        Command::Stats { dir, json } => cli::stats(&dir.state_dir.join("stats.json"), json)?,
        Command::Verify { dir } => cli::verify_log(&dir.state_dir.join("log"))?,
        Command::ConfigExample => print!("{}", auditor::config::EXAMPLE),
    }
    Ok(())
}
