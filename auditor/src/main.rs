use std::path::PathBuf;

use auditor::{cli, config::Config, daemon};
use clap::{Parser, Subcommand};

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
enum LogCommand {
    /// Make the forward-secure sealing key (state_dir/seal.key) and print the verification
    /// key, once: keep it off this host (a password manager, paper). The daemon seals each
    /// block with the key of its epoch and erases each key when its epoch ends, so whoever
    /// takes the host later cannot alter, remove or cut off what was sealed before without
    /// `auditor verify --key` seeing it. Restart the daemon to begin sealing.
    ///
    /// Examples:
    ///   auditor log setup-keys
    ///   auditor log setup-keys --interval 5m
    SetupKeys {
        #[command(flatten)]
        dir: StateDir,
        /// Epoch length: a key lives this long; what was sealed in the current epoch is
        /// not yet protected (10s to 1d).
        #[arg(long, default_value = "1m", value_parser = parse_interval)]
        interval: u64,
    },
}

fn parse_interval(s: &str) -> Result<u64, String> {
    Ok(parse_duration(s)?.as_secs())
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
        /// How the daemon's own log lines look on stderr: `human`, or `json` (one object
        /// per line, for a DaemonSet's log collector). Levels and modules are chosen with
        /// AUDITOR_LOG (e.g. `debug`, `info,auditor::sink=debug`; default `info`).
        #[arg(long, env = "AUDITOR_LOG_FORMAT", value_enum, default_value = "human")]
        log_format: LogFormat,
        /// Measure what the capture's hooks alone cost on this host: its tracepoint
        /// programs attach and return at once, so NOTHING is captured or recorded. With
        /// `sysctl kernel.bpf_stats_enabled=1`, `auditor stats` shows their runs and time;
        /// compare with a normal run under the same load (as `cargo xtask bench` does).
        /// Needs a state directory without a trail (e.g. --state-dir /tmp/bare) and a
        /// configuration that enforces nothing.
        #[arg(long)]
        bare_hooks: bool,
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
    /// Counters of the running (or last) daemon: events, bytes, drops, truncations, gaps,
    /// and what observing costs: its CPU time per statement recorded, by thread, and the
    /// eBPF programs' (while `kernel.bpf_stats_enabled = 1`).
    Stats {
        #[command(flatten)]
        dir: StateDir,
        /// Print stats.json as the daemon wrote it (every second).
        #[arg(long)]
        json: bool,
    },
    /// Check the local log: every record against its block's seal, every block against
    /// the one before it, the end against the log's head (a cut-off tail), and with the
    /// verification key every seal. Names the first record modified, removed or moved.
    /// Exit status 1 when the log is not intact.
    ///
    /// Examples:
    ///   auditor verify
    ///   auditor verify --key-file /media/offline/auditor-db1.vk
    Verify {
        #[command(flatten)]
        dir: StateDir,
        /// The verification key `auditor log setup-keys` printed (avk1-...).
        #[arg(
            long,
            env = "AUDITOR_VERIFY_KEY",
            conflicts_with = "key_file",
            hide_env_values = true
        )]
        key: Option<String>,
        /// A file holding the verification key.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Also check the log against the heads ClickHouse received from this host (the
        /// daemon sends them when it writes both): catches a log rewritten or cut short
        /// consistently, even without the key. ClickHouse and the host name come from
        /// --config.
        #[arg(long)]
        against_clickhouse: bool,
        /// The daemon's configuration (for --against-clickhouse).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Every event of the local log (or one session's) as JSON Lines, the event contract's
    /// fields, whichever format the log has on disk.
    ///
    /// Examples:
    ///   auditor export --json > trail.jsonl
    ///   auditor export --json --session 0193a7c2
    Export {
        #[command(flatten)]
        dir: StateDir,
        /// JSON Lines (the only format, and the default; accepted for scripts that say it).
        #[arg(long)]
        json: bool,
        /// Only this session (its id, or a prefix of at least 8 characters).
        #[arg(long)]
        session: Option<String>,
    },
    /// The local log's sealing keys.
    #[command(subcommand)]
    Log(LogCommand),
    /// Ask the audit trail in ClickHouse a named question, with filters.
    ///
    /// Examples:
    ///   auditor query sessions --since 1h --label app=payments
    ///   auditor query statements --workload unit:billing.service --since 30m
    ///   auditor query errors --db-user app_rw --since 1d
    ///   auditor query ddl --since 7d
    ///   auditor query top --since 1d --limit 20
    ///   auditor query decisions --since 1d --label k8s.namespace=agents
    #[command(verbatim_doc_comment)]
    Query {
        /// What to ask.
        #[arg(value_enum)]
        name: auditor::query::Named,
        /// The daemon's configuration: where ClickHouse is (its `clickhouse` section).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// ClickHouse HTTP URL, instead of the config's.
        #[arg(long)]
        url: Option<String>,
        /// Only events newer than this (30m, 2h, 7d).
        #[arg(long, value_parser = auditor::query::parse_age)]
        since: Option<std::time::Duration>,
        /// Only events older than this.
        #[arg(long, value_parser = auditor::query::parse_age)]
        until: Option<std::time::Duration>,
        /// Only workloads with this label (key=value; repeat to require several).
        #[arg(long, value_parser = auditor::query::parse_label)]
        label: Vec<(String, String)>,
        /// Only this database user.
        #[arg(long)]
        db_user: Option<String>,
        /// Only this database.
        #[arg(long)]
        db: Option<String>,
        /// Only this workload (as the `workload` column shows it, e.g. unit:x.service).
        #[arg(long)]
        workload: Option<String>,
        /// Only this session.
        #[arg(long)]
        session: Option<String>,
        /// Only this query fingerprint.
        #[arg(long)]
        fingerprint: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 50)]
        limit: u64,
        #[arg(long, value_enum, default_value = "table")]
        format: auditor::query::Format,
    },
    /// Print a commented configuration file with every default.
    ConfigExample,
    /// Check whether this host can run the daemon as configured (kernel, BTF, tracefs,
    /// cgroup v2, capabilities, state directory, policies, the Kubernetes API server,
    /// ClickHouse), and say what to fix. Exit status 1 when a check fails.
    Doctor {
        /// The daemon's configuration (default: the built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check, try out and explain policies (see policies/ for examples).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Statements held for approval by `require_approval` rules: list them, look at one,
    /// approve or deny it. Talks to the running daemon over its control socket, which
    /// names you by your Unix user (a requester never approves their own statement).
    ///
    /// Examples:
    ///   auditor approvals list
    ///   auditor approvals show 3f9a1c2e
    ///   auditor approvals approve 3f9a1c2e --reason "planned migration, JIRA-123"
    ///   auditor approvals deny 3f9a1c2e --reason "not during business hours"
    #[command(subcommand, verbatim_doc_comment)]
    Approvals(ApprovalsCommand),
    /// Remove what a stopped daemon left attached for the next one: the capture that goes
    /// on while no daemon runs (`capture.pin_dir`, for `capture.keep_while_stopped_s`) and
    /// the enforcement that holds meanwhile (`proxy.pin_dir`: while the daemon is stopped
    /// with an enforce policy in force, connections of enforced and new workloads to
    /// Postgres are refused, as enforcement fails closed). Run this when uninstalling. A
    /// running daemon keeps its own capture and enforcement until it stops.
    Detach {
        /// The daemon's configuration (its `capture.pin_dir` and `proxy.pin_dir`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ControlSocket {
    /// The daemon's control socket (default: the configuration's approvals.socket, or
    /// approvals.sock in the state directory).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The daemon's configuration (its approvals.socket and state_dir).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    dir: StateDir,
}

impl ControlSocket {
    fn path(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        Ok(match &self.config {
            Some(c) => Config::load(c)?.approvals_socket(),
            None => self.dir.state_dir.join("approvals.sock"),
        })
    }
}

#[derive(Subcommand)]
enum ApprovalsCommand {
    /// Statements waiting for a decision, oldest first.
    List {
        #[command(flatten)]
        socket: ControlSocket,
        /// The recently decided requests too (approved, denied, expired, withdrawn).
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// One request: its statement, who sent it (process, workload, labels, database
    /// user), its rule and approvers, what became of it.
    Show {
        /// The request's id (or a unique prefix of at least 4 characters).
        id: String,
        #[command(flatten)]
        socket: ControlSocket,
        #[arg(long)]
        json: bool,
    },
    /// Let the held statement run: it goes to the server unchanged, exactly as held.
    Approve {
        id: String,
        /// Why (recorded with the decision).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        socket: ControlSocket,
    },
    /// Refuse the held statement: its client gets an error (SQLSTATE 42501) naming you,
    /// and its session goes on.
    Deny {
        id: String,
        /// Why (the client sees it in the error's DETAIL).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        socket: ControlSocket,
    },
    /// A time-boxed window in which the statements a rule holds pass without a request,
    /// for one workload or database user; each is recorded with the grant.
    ///
    /// Examples:
    ///   auditor approvals grant 3f9a1c2e --for 30m          # approve it, and its workload
    ///                                                      # (and db user) for 30 minutes
    ///   auditor approvals grant --rule agents/ddl-review --workload pod:agents/migrator-7d9 \
    ///       --tables 'billing.*' --for 1h --reason "schema migration JIRA-123"
    ///   auditor approvals grant --rule agents/deletes --db-user app_rw --for 15m
    #[command(verbatim_doc_comment)]
    Grant {
        /// A pending request: approve it and grant its workload and database user its rule.
        id: Option<String>,
        /// How long: 90s, 30m, 2h (at most 24h).
        #[arg(long = "for", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// The rule, as policy/rule (without a request id).
        #[arg(long)]
        rule: Option<String>,
        /// The workload, as events show it (pod:NAMESPACE/NAME, unit:NAME, cgroup:PATH, ...).
        #[arg(long)]
        workload: Option<String>,
        /// A workload label, KEY=VALUE (repeatable; all must match).
        #[arg(long, value_parser = auditor::query::parse_label)]
        label: Vec<(String, String)>,
        /// The database user.
        #[arg(long)]
        db_user: Option<String>,
        /// Only statements on these tables (schema.table, `*` wildcards; repeatable).
        #[arg(long)]
        tables: Vec<String>,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        socket: ControlSocket,
    },
    /// End a grant before its time.
    Revoke {
        /// The grant's id (g…), or a unique prefix.
        id: String,
        #[command(flatten)]
        socket: ControlSocket,
    },
    /// Grants in force (with --all, those ended recently too).
    Grants {
        #[command(flatten)]
        socket: ControlSocket,
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Who the daemon takes you for, and the groups it sees you in.
    Whoami {
        #[command(flatten)]
        socket: ControlSocket,
    },
}

#[derive(clap::Args)]
struct PolicyDir {
    /// Policies directory, instead of the one the configuration names (default
    /// /etc/auditor/policies).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The daemon's configuration: its `policies_dir`, `record` and `host_labels`.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Check every policy file of a directory: errors with file:line:column, and warnings
    /// (a selector on a label no source sets). Exit status 1 on any error.
    Lint {
        /// The directory (default: the configuration's policies_dir).
        dir: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Which policies a session with these labels gets, and the verdict on a statement.
    ///
    /// Example:
    ///   auditor policy test --dir policies --labels k8s.namespace=agents,k8s.pod/app=bot \
    ///       --db-user app_rw --sql "DELETE FROM orders"
    #[command(verbatim_doc_comment)]
    Test {
        #[command(flatten)]
        dir: PolicyDir,
        /// Workload labels, key=value, comma-separated (repeatable).
        #[arg(long, value_delimiter = ',', value_parser = auditor::query::parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long, default_value = "")]
        db_user: String,
        #[arg(long, default_value = "")]
        db_name: String,
        #[arg(long, default_value = "")]
        application_name: String,
        #[arg(long)]
        client_addr: Option<std::net::IpAddr>,
        #[arg(long)]
        server_addr: Option<std::net::IpAddr>,
        #[arg(long, default_value_t = 5432)]
        server_port: u16,
        /// A query string (several statements are judged one by one, as captured).
        #[arg(long)]
        sql: Option<String>,
    },
    /// Which policies applied to a recorded session and why, from its events in the local
    /// log; and what the policies as they are now would make of it.
    Explain {
        /// Session id (or a prefix of at least 8 characters), from `auditor sessions`.
        session: String,
        #[command(flatten)]
        state: StateDir,
        #[command(flatten)]
        dir: PolicyDir,
    },
    /// Print the JSON Schema of policy files (committed as policies/schema.json).
    Schema,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

/// The daemon's own diagnostics (not the audit trail): tracing to stderr.
fn init_logging(format: LogFormat) -> anyhow::Result<()> {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("AUDITOR_LOG") {
        Ok(spec) => EnvFilter::try_new(&spec)
            .map_err(|e| anyhow::anyhow!("AUDITOR_LOG={spec:?} is not a valid filter: {e}"))?,
        Err(_) => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
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
        Command::Run {
            config,
            state_dir,
            log_format,
            bare_hooks,
        } => {
            init_logging(log_format)?;
            let mut cfg = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            if let Some(dir) = state_dir {
                cfg.state_dir = dir;
            }
            daemon::run(&cfg, daemon::RunOptions { bare_hooks })?;
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
        Command::Verify {
            dir,
            key,
            key_file,
            against_clickhouse,
            config,
        } => {
            let key = match (key, key_file) {
                (Some(k), _) => Some(k),
                (None, Some(f)) => Some(std::fs::read_to_string(&f).map_err(|e| {
                    anyhow::anyhow!("reading the verification key {}: {e}", f.display())
                })?),
                (None, None) => None,
            };
            let key = key
                .map(|k| k.parse::<auditor::sink::local::seal::VerificationKey>())
                .transpose()?;
            let cfg = match (against_clickhouse, config) {
                (false, _) => None,
                (true, Some(path)) => Some(Config::load(&path)?),
                (true, None) => {
                    anyhow::bail!("--against-clickhouse needs --config (where ClickHouse is)")
                }
            };
            cli::verify_log(&dir.state_dir, key, cfg.as_ref())?
        }
        Command::Export {
            dir,
            json: _,
            session,
        } => cli::export(&dir.state_dir.join("log"), session.as_deref())?,
        Command::Log(LogCommand::SetupKeys { dir, interval }) => {
            let path = auditor::sink::local::key_path(&dir.state_dir);
            let vk = auditor::sink::local::seal::SealingKey::setup(&path, interval)?;
            eprintln!(
                "Sealing key written to {} (epochs of {}).\n\
                 The verification key follows: store it OFF this host, it is not kept here.\n\
                 Restart the daemon to begin sealing; check with `auditor verify --key <key>`.",
                path.display(),
                format_args!("{interval} s")
            );
            println!("{vk}");
        }
        Command::Query {
            name,
            config,
            url,
            since,
            until,
            label,
            db_user,
            db,
            workload,
            session,
            fingerprint,
            limit,
            format,
        } => {
            let mut ch = match &config {
                Some(path) => Config::load(path)?.clickhouse,
                None => auditor::config::ClickHouseConfig::default(),
            };
            if let Some(u) = url {
                ch.url = u;
            }
            let filters = auditor::query::Filters {
                since,
                until,
                labels: label,
                db_user,
                database: db,
                workload,
                session,
                fingerprint,
                limit,
            };
            auditor::query::run(&ch, name, &filters, format)?;
        }
        Command::ConfigExample => print!("{}", auditor::config::EXAMPLE),
        Command::Policy(cmd) => policy_command(cmd)?,
        Command::Approvals(cmd) => approvals_command(cmd)?,
        Command::Detach { config } => {
            let cfg = policy_config(&config)?;
            let mut removed = auditor::capture::handover::detach_all(&cfg.capture.pin_dir)?;
            removed.extend(auditor::proxy::redirect::detach(&cfg.proxy.pin_dir)?);
            if removed.is_empty() {
                println!(
                    "nothing pinned in {} or {}",
                    cfg.capture.pin_dir.display(),
                    cfg.proxy.pin_dir.display()
                );
            } else {
                for p in removed {
                    println!("removed {}", p.display());
                }
            }
        }
        Command::Doctor { config } => {
            let cfg = policy_config(&config)?;
            if !auditor::doctor::report(&auditor::doctor::run_checks(&cfg)) {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

fn approvals_command(cmd: ApprovalsCommand) -> anyhow::Result<()> {
    use auditor::approvals::{cli, control::Call};
    match cmd {
        ApprovalsCommand::List { socket, all, json } => {
            let r = cli::call_ok(&socket.path()?, &Call::List { all })?;
            if json {
                for q in &r.requests {
                    println!("{}", serde_json::to_string(q)?);
                }
            } else {
                print!("{}", cli::render_list(&r.requests));
            }
        }
        ApprovalsCommand::Show { id, socket, json } => {
            let r = cli::call_ok(&socket.path()?, &Call::Show { id })?;
            if let Some(q) = r.request {
                if json {
                    println!("{}", serde_json::to_string_pretty(&q)?);
                } else {
                    print!("{}", cli::render_request(&q));
                }
            }
        }
        ApprovalsCommand::Approve { id, reason, socket } => {
            let r = cli::call_ok(&socket.path()?, &Call::Approve { id, reason })?;
            if let Some(q) = r.request {
                println!(
                    "approved {}: the statement of {} runs now\n  {}",
                    q.id,
                    q.requester.summary(),
                    q.statement
                );
            }
        }
        ApprovalsCommand::Deny { id, reason, socket } => {
            let r = cli::call_ok(&socket.path()?, &Call::Deny { id, reason })?;
            if let Some(q) = r.request {
                println!(
                    "denied {}: {} gets an error in place of\n  {}",
                    q.id,
                    q.requester.summary(),
                    q.statement
                );
            }
        }
        ApprovalsCommand::Grant {
            id,
            duration,
            rule,
            workload,
            label,
            db_user,
            tables,
            reason,
            socket,
        } => {
            let seconds = duration.as_secs();
            let call = match id {
                Some(id) => {
                    if rule.is_some()
                        || workload.is_some()
                        || !label.is_empty()
                        || db_user.is_some()
                        || !tables.is_empty()
                    {
                        anyhow::bail!("a grant from a request takes its rule and workload from the request: give either a request id or --rule with a subject");
                    }
                    Call::GrantRequest {
                        id,
                        seconds,
                        reason,
                    }
                }
                None => {
                    let Some(rule) = rule else {
                        anyhow::bail!("give a pending request's id, or --rule POLICY/RULE with --workload, --label or --db-user");
                    };
                    if !rule.contains('/') {
                        anyhow::bail!(
                            "--rule is POLICY/RULE, as `auditor approvals list` shows it"
                        );
                    }
                    let mut subject: std::collections::BTreeMap<String, String> =
                        label.into_iter().collect();
                    if let Some(w) = workload {
                        subject.insert("workload".into(), w);
                    }
                    if let Some(u) = db_user {
                        subject.insert("db.user".into(), u);
                    }
                    Call::Grant {
                        spec: auditor::approvals::GrantSpec {
                            rule,
                            subject,
                            tables,
                            seconds,
                            reason,
                        },
                    }
                }
            };
            let r = cli::call_ok(&socket.path()?, &call)?;
            if let Some(q) = &r.request {
                println!(
                    "approved {}: the statement of {} runs now",
                    q.id,
                    q.requester.summary()
                );
            }
            if let Some(g) = &r.grant {
                println!(
                    "granted {}: {}/{} for {} until {}",
                    g.id,
                    g.policy,
                    g.rule,
                    g.subject_text(),
                    g.expires_at
                );
            }
        }
        ApprovalsCommand::Revoke { id, socket } => {
            let r = cli::call_ok(&socket.path()?, &Call::Revoke { id })?;
            if let Some(g) = r.grant {
                println!(
                    "revoked {} ({}/{} for {}; {} statements passed under it)",
                    g.id,
                    g.policy,
                    g.rule,
                    g.subject_text(),
                    g.uses
                );
            }
        }
        ApprovalsCommand::Grants { socket, all, json } => {
            let r = cli::call_ok(&socket.path()?, &Call::Grants { all })?;
            if json {
                for g in &r.grants {
                    println!("{}", serde_json::to_string(g)?);
                }
            } else {
                print!("{}", cli::render_grants(&r.grants));
            }
        }
        ApprovalsCommand::Whoami { socket } => {
            let r = cli::call_ok(&socket.path()?, &Call::Whoami)?;
            if let Some(a) = r.you {
                println!(
                    "{} (uid {}{}), groups: {}",
                    a.display(),
                    a.uid,
                    a.loginuid
                        .map(|l| format!(", login uid {l}"))
                        .unwrap_or_default(),
                    a.groups.join(", ")
                );
            }
        }
    }
    Ok(())
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    auditor::policy::model::duration_text::parse(s)
}

fn policy_config(config: &Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(match config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    })
}

fn policy_command(cmd: PolicyCommand) -> anyhow::Result<()> {
    use auditor::policy::cli as pc;
    match cmd {
        PolicyCommand::Lint { dir, config } => {
            let cfg = policy_config(&config)?;
            let dir = dir.unwrap_or_else(|| cfg.policies_dir().0);
            if !pc::lint(&dir) {
                std::process::exit(1);
            }
        }
        PolicyCommand::Test {
            dir,
            labels,
            db_user,
            db_name,
            application_name,
            client_addr,
            server_addr,
            server_port,
            sql,
        } => {
            let cfg = policy_config(&dir.config)?;
            let path = dir.dir.unwrap_or_else(|| cfg.policies_dir().0);
            let session = pc::TestSession {
                labels: labels.into_iter().collect(),
                db_user,
                database: db_name,
                application_name,
                client_addr,
                server_addr,
                server_port,
            };
            pc::test(&path, &cfg, &session, sql.as_deref())?;
        }
        PolicyCommand::Explain {
            session,
            state,
            dir,
        } => {
            let cfg = policy_config(&dir.config)?;
            let path = dir.dir.unwrap_or_else(|| cfg.policies_dir().0);
            pc::explain(&state.state_dir.join("log"), &session, &path, &cfg)?;
        }
        PolicyCommand::Schema => println!("{}", auditor::policy::schema_json()),
    }
    Ok(())
}
