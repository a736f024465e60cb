//! `cargo xtask bench [--smoke]`: what auditing costs, side by side, in one run, written to
//! docs/benchmarks.md.
//!
//! Configurations run interleaved (repetition 1 of each, then repetition 2, ...), and each
//! table shows the median of the ratios to "no auditing" and their spread. CPU time per
//! transaction comes from /proc/stat (all CPUs, without idle, iowait and steal): much
//! steadier than throughput on a small noisy VM.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use auditor_tests::{each_event, Daemon, Postgres};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Config {
    None,
    /// The daemon with `--bare-hooks`: its tracepoints attached, their programs returning
    /// at once (nothing recorded). The floor under the capture's own cost.
    BareHooks,
    AuditorLocalLog,
    AuditorClickHouse,
    Pgaudit,
    LogStatementAll,
    /// pgbench in a cgroup under an enforce policy: redirected into the inline proxy
    /// (which also records every statement).
    AuditorProxy,
    Pgbouncer,
}

impl Config {
    /// The short name `--configs` takes.
    fn key(self) -> &'static str {
        match self {
            Config::None => "none",
            Config::BareHooks => "bare",
            Config::AuditorLocalLog => "auditor",
            Config::AuditorClickHouse => "clickhouse",
            Config::Pgaudit => "pgaudit",
            Config::LogStatementAll => "log_statement",
            Config::AuditorProxy => "proxy",
            Config::Pgbouncer => "pgbouncer",
        }
    }

    fn is_auditor(self) -> bool {
        matches!(
            self,
            Config::AuditorLocalLog | Config::AuditorClickHouse | Config::AuditorProxy
        )
    }

    /// Runs with a daemon: the auditor's, and the bare hooks.
    fn has_daemon(self) -> bool {
        self.is_auditor() || self == Config::BareHooks
    }

    /// Runs whose per-transaction latencies are logged (the proxy's table).
    fn logs_latency(self) -> bool {
        matches!(
            self,
            Config::None | Config::AuditorProxy | Config::Pgbouncer
        )
    }

    fn name(self) -> &'static str {
        match self {
            Config::None => "no auditing",
            Config::BareHooks => "bare hooks (programs return at once; records nothing)",
            Config::AuditorLocalLog => "auditor, local log",
            Config::AuditorClickHouse => "auditor, local log + ClickHouse",
            Config::Pgaudit => "pgaudit, log = all",
            Config::LogStatementAll => "log_statement = all",
            Config::AuditorProxy => "auditor, enforcing: through the inline proxy",
            Config::Pgbouncer => "pgbouncer, session mode (no auditing)",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Sample {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
    cpu_ns_per_tx: f64,
    /// The daemon's CPU seconds per 10,000 statements.
    daemon_cpu_per_10k: Option<f64>,
    /// Mean run time per BPF program invocation, ns.
    bpf_ns_per_call: Option<f64>,
    bpf_calls: Option<u64>,
    /// Each program's (runs, run time ns) during the run, from the daemon's stats.
    bpf_by_program: BTreeMap<String, (u64, u64)>,
    daemon_peak_rss_kib: Option<u64>,
    recorded: Option<u64>,
    /// Statements in ClickHouse after the run (the ClickHouse configuration).
    clickhouse_recorded: Option<u64>,
    /// Seconds after pgbench ended until ClickHouse had acknowledged every event.
    clickhouse_catchup_s: Option<f64>,
    expected: Option<u64>,
    /// Per-transaction latency percentiles from pgbench's log, µs.
    latency_p50_us: Option<f64>,
    latency_p99_us: Option<f64>,
}

/// Busy CPU time of the whole machine, in ns (USER_HZ ticks from /proc/stat).
fn busy_cpu_ns() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    let hz = 100; // USER_HZ on Linux
    Ok(busy * 1_000_000_000 / hz)
}

/// Waits until the machine is quiet (under 10% of one CPU busy over half a second; at
/// most a minute): what an earlier run left working (ClickHouse merging what it was sent,
/// Postgres writing its log, a daemon's last flush) would otherwise be counted against the
/// next run, whichever configuration that is.
fn settle() -> Result<()> {
    let started = Instant::now();
    let mut busy = 1.0;
    while started.elapsed() < Duration::from_secs(60) {
        let b0 = busy_cpu_ns()?;
        std::thread::sleep(Duration::from_millis(500));
        busy = (busy_cpu_ns()? - b0) as f64 / 500e6;
        if busy < 0.10 {
            break;
        }
    }
    if started.elapsed() > Duration::from_secs(2) {
        eprintln!(
            "bench:   waited {:.0} s for the machine to settle (last: {:.0}% of a CPU busy)",
            started.elapsed().as_secs_f64(),
            busy * 100.0
        );
    }
    Ok(())
}

/// utime + stime of a process, ns.
fn process_cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

/// A kB figure of /proc/PID/status (`VmHWM`, `RssAnon`, ...).
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

/// Statements of pgbench's script (application `bench`) in the daemon's log, counted as
/// `auditor export --json` prints them (one line at a time: a run writes millions).
fn recorded_statements(d: &Daemon) -> Result<u64> {
    /// The fields the count looks at; the others are skipped unparsed.
    #[derive(serde::Deserialize)]
    struct Seen<'a> {
        #[serde(borrow, default)]
        kind: std::borrow::Cow<'a, str>,
        #[serde(borrow, default)]
        application_name: std::borrow::Cow<'a, str>,
        #[serde(borrow, default)]
        statement: std::borrow::Cow<'a, str>,
    }
    let mut n = 0;
    each_event(&d.log_dir(), |line| {
        let e: Seen = serde_json::from_slice(line).with_context(|| {
            format!(
                "auditor export printed a line that is not an event: {}",
                String::from_utf8_lossy(line)
            )
        })?;
        if e.kind == "statement" && e.application_name == "bench" && script_statement(&e.statement)
        {
            n += 1;
        }
        Ok(())
    })?;
    Ok(n)
}

/// (run_time_ns, run_cnt) summed over the BPF programs the process holds open.
fn bpf_stats(pid: u32) -> Option<(u64, u64)> {
    let mut time = 0;
    let mut count = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        // Descriptors come and go while the daemon runs: skip those gone since the listing.
        let Ok(link) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if link.to_string_lossy() != "anon_inode:bpf-prog" {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        )) else {
            continue;
        };
        for line in info.lines() {
            if let Some(v) = line.strip_prefix("run_time_ns:") {
                time += v.trim().parse::<u64>().unwrap_or(0);
            }
            if let Some(v) = line.strip_prefix("run_cnt:") {
                count += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Some((time, count))
}

/// The `--only` key of the memory run.
const MEMORY_RUN: &str = "memory";

/// Clients of the memory run.
const MEMORY_CLIENTS: u32 = 1000;

/// The daemon's memory with 1,000 concurrent connections (select-only, prepared): its heap
/// (RssAnon, sampled every 100 ms: the kernel keeps no peak of it), its whole resident set
/// (VmHWM), and the ring buffer, which the kernel allocates once and maps into the
/// daemon twice (its data pages follow each other twice so that a record wrapping the
/// end reads as one): VmRSS counts it twice.
fn memory_section(md: &mut String, pg: &Postgres, seconds: u32) -> Result<()> {
    let mut daemon = Daemon::start(pg.port, &pinned(""))?;
    let pid = daemon.pid();
    // The stats file comes with the daemon's first second.
    let mut ring_mib = None;
    for _ in 0..30 {
        ring_mib = daemon
            .stats()
            .ok()
            .and_then(|s| s["ring_buffer_bytes"].as_u64())
            .map(|b| b as f64 / (1 << 20) as f64);
        if ring_mib.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut load = pg.pgbench();
    load.args(["-n", "-S", "-M", "prepared"])
        .args(["-c", &MEMORY_CLIENTS.to_string(), "-j", "2"])
        .args(["-T", &seconds.to_string()])
        .env("PGAPPNAME", "bench")
        .arg("postgres")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = load.spawn()?;
    let mut peak_anon_kib = 0u64;
    while child.try_wait()?.is_none() {
        peak_anon_kib = peak_anon_kib.max(status_kib(pid, "RssAnon").unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "pgbench with {MEMORY_CLIENTS} clients failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (tps, _, transactions) = parse_pgbench(&String::from_utf8_lossy(&out.stdout))?;
    let peak_rss_kib = peak_rss_kib(pid).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(500));
    daemon.stop()?;
    let recorded = recorded_statements(&daemon)?;
    writeln!(md, "## Memory with {MEMORY_CLIENTS} connections\n")?;
    writeln!(
        md,
        "One select-only (prepared) run of {seconds} s with {MEMORY_CLIENTS} pgbench clients \
         (2 threads) through the auditor with the local log. The daemon's heap is RssAnon, \
         sampled every 100 ms; its resident set (VmHWM) adds the program's file pages and \
         the ring buffer, which the kernel allocates once but maps into the daemon twice \
         (its data pages follow each other twice, so that a record wrapping the end reads \
         as one), so the resident set counts it twice. Target: at most 100 MB.\n"
    )?;
    writeln!(
        md,
        "| clients | tps | daemon heap, peak MiB | ring buffer MiB (allocated once) | heap + ring MiB | resident set, peak MiB | recorded / expected statements |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let heap = peak_anon_kib as f64 / 1024.0;
    let ring = ring_mib.unwrap_or(0.0);
    writeln!(
        md,
        "| {MEMORY_CLIENTS} | {tps:.0} | {heap:.1} | {ring:.0} | {:.1} | {:.1} | {recorded}/{transactions} |\n",
        heap + ring,
        peak_rss_kib as f64 / 1024.0
    )?;
    if recorded != transactions {
        writeln!(
            md,
            "**The memory run recorded {recorded} statements of {transactions}: that is a bug to fix.**\n"
        )?;
    }
    Ok(())
}

/// The `--only` key of the masking run.
const MASKING_RUN: &str = "masking";

/// The `--only` key of the daemon's profile (`perf record` during a select-only run).
const PROFILE_RUN: &str = "profile";

/// Rows of the masking run's result (the issue's bar: a 200,000-row result with two masked
/// columns).
const MASKING_ROWS: u32 = 200_000;

/// How one configuration of the masking run reads the table.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MaskingPath {
    Direct,
    Proxy,
    Masked,
}

impl MaskingPath {
    fn name(self) -> &'static str {
        match self {
            MaskingPath::Direct => "direct (no auditing)",
            MaskingPath::Proxy => "through the inline proxy, unmasked",
            MaskingPath::Masked => "through the inline proxy, two columns masked",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct MaskingSample {
    latency_ms: f64,
    cpu_ms_per_query: f64,
    queries: u64,
    /// Values the proxy masked during the run (its `proxy.masked_values` counter).
    masked_values: u64,
}

/// The cost of masking: one client reads a `rows`-row table (an e-mail and a card number
/// masked, two columns not) with one query per transaction, directly, through the proxy
/// under a policy that masks nothing, and through it under one that masks the two columns;
/// `reps` interleaved repetitions of `seconds` each, one daemon serving both policies.
/// Every masked run must have masked exactly two values per row of every query.
fn masking_section(
    md: &mut String,
    pg: &Postgres,
    rows: u32,
    seconds: u32,
    reps: u32,
) -> Result<()> {
    sql(
        pg,
        &format!(
            "DROP TABLE IF EXISTS bench_customers; \
             CREATE TABLE bench_customers AS SELECT i AS id, \
             'person' || i || '@example.com' AS email, \
             (4000000000000000 + i)::text AS card, 'note ' || i AS note \
             FROM generate_series(1, {rows}) i"
        ),
    )?;
    sql(pg, "VACUUM ANALYZE bench_customers")?;
    let policies = tempfile::tempdir()?;
    let plain = auditor_tests::Cgroup::new("bench-unmasked")?;
    let masked = auditor_tests::Cgroup::new("bench-masked")?;
    std::fs::write(
        policies.path().join("bench.yaml"),
        format!(
            "name: plain\nselector: {{matchLabels: {{cgroup.path: {}}}}}\nmode: enforce\n\
             block:\n  - name: no-server-files\n    when: {{functions: [pg_read_file]}}\n\
             ---\n\
             name: masked\nselector: {{matchLabels: {{cgroup.path: {}}}}}\nmode: enforce\n\
             block:\n  - name: no-server-files\n    when: {{functions: [pg_read_file]}}\n\
             mask:\n  - name: contact\n    columns: [bench_customers.email]\n    using: email\n\
             \x20 - name: cards\n    columns: [bench_customers.card]\n    using: partial\n    keep: 4\n",
            plain.name, masked.name
        ),
    )?;
    let script = tempfile::NamedTempFile::new()?;
    std::fs::write(
        script.path(),
        "SELECT id, email, card, note FROM bench_customers;\n",
    )?;
    let mut daemon = Daemon::start(
        pg.port,
        &pinned(&format!(
            "policies_dir: {}\nproxy: {{port: {}}}\n",
            policies.path().display(),
            auditor_tests::free_port()
        )),
    )?;
    let masked_counter = |d: &Daemon| -> u64 {
        d.stats()
            .ok()
            .and_then(|s| s["proxy"]["masked_values"].as_u64())
            .unwrap_or(0)
    };
    let paths = [MaskingPath::Direct, MaskingPath::Proxy, MaskingPath::Masked];
    let mut results: BTreeMap<usize, Vec<MaskingSample>> = BTreeMap::new();
    for rep in 0..reps {
        for (i, &p) in paths.iter().enumerate() {
            eprintln!("bench: rep {}/{reps} masking {}", rep + 1, p.name());
            let mut cmd = pg.pgbench();
            cmd.args(["-n", "-c", "1", "-j", "1", "-T", &seconds.to_string(), "-f"])
                .arg(script.path())
                .env("PGAPPNAME", "bench_masking");
            match p {
                MaskingPath::Direct => {}
                MaskingPath::Proxy => plain.enter(&mut cmd),
                MaskingPath::Masked => masked.enter(&mut cmd),
            }
            cmd.arg("postgres");
            // The counter the daemon writes each second: settled before and after the run.
            std::thread::sleep(Duration::from_millis(1100));
            let masked0 = masked_counter(&daemon);
            let cpu0 = busy_cpu_ns()?;
            let out = cmd.output()?;
            let cpu1 = busy_cpu_ns()?;
            if !out.status.success() {
                bail!(
                    "pgbench (masking, {}) failed: {}",
                    p.name(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(1100));
            let masked1 = masked_counter(&daemon);
            let (_, latency_ms, queries) = parse_pgbench(&String::from_utf8_lossy(&out.stdout))?;
            results.entry(i).or_default().push(MaskingSample {
                latency_ms,
                cpu_ms_per_query: (cpu1 - cpu0) as f64 / 1e6 / queries.max(1) as f64,
                queries,
                masked_values: masked1 - masked0,
            });
        }
    }
    daemon.stop()?;
    writeln!(md, "## Masking\n")?;
    writeln!(
        md,
        "One client (pgbench, a custom script) reads a table of {rows} rows (`SELECT id, \
         email, card, note`, text results) again and again for {seconds} s: directly, \
         through the inline proxy under an `enforce` policy with no mask rule, and under \
         one that masks `email` (format-preserving keyed hash) and `card` (partial, last \
         4). Medians of {reps} interleaved repetitions. Latency is per query (the whole \
         result read); CPU is the machine's busy time per query. Target: the masked query \
         within 1.5× of the unmasked one through the proxy.\n"
    )?;
    writeln!(
        md,
        "| path | latency ms per query | CPU ms per query | latency ratio to direct | latency ratio to unmasked through the proxy | CPU ratio to unmasked through the proxy | masked values / expected |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    let lat = |i: usize| median(results[&i].iter().map(|s| s.latency_ms).collect());
    let cpu = |i: usize| median(results[&i].iter().map(|s| s.cpu_ms_per_query).collect());
    let mut short = Vec::new();
    for (i, &p) in paths.iter().enumerate() {
        let expected: Vec<String> = results[&i]
            .iter()
            .map(|s| {
                let want = if p == MaskingPath::Masked {
                    2 * u64::from(rows) * s.queries
                } else {
                    0
                };
                if s.masked_values != want {
                    short.push(format!(
                        "{}: {} values masked, {want} expected",
                        p.name(),
                        s.masked_values
                    ));
                }
                format!("{}/{want}", s.masked_values)
            })
            .collect();
        let vs_proxy = if p == MaskingPath::Direct {
            (String::new(), String::new())
        } else {
            (
                format!("{:.2}", lat(i) / lat(1)),
                format!("{:.2}", cpu(i) / cpu(1)),
            )
        };
        writeln!(
            md,
            "| {} | {:.1} | {:.1} | {:.2} | {} | {} | {} |",
            p.name(),
            lat(i),
            cpu(i),
            lat(i) / lat(0),
            vs_proxy.0,
            vs_proxy.1,
            expected.join(", ")
        )?;
    }
    writeln!(md)?;
    if !short.is_empty() {
        writeln!(
            md,
            "**Masking did not mask every value it had to: {}. That is a bug to fix.**\n",
            short.join("; ")
        )?;
        bail!("masking missed values: {}", short.join("; "));
    }
    Ok(())
}

/// Where the BPF time per transaction goes, program by program: runs and time summed over
/// the repetitions of each auditor configuration.
fn bpf_programs_section(
    md: &mut String,
    workloads: &[Workload],
    configs: &[Config],
    results: &BTreeMap<(usize, Config), Vec<Sample>>,
) -> Result<()> {
    let mut rows = Vec::new();
    for (wi, w) in workloads.iter().enumerate() {
        for &c in configs.iter().filter(|c| c.has_daemon()) {
            let Some(runs) = results.get(&(wi, c)) else {
                continue;
            };
            let tx: u64 = runs.iter().map(|r| r.transactions).sum();
            let mut by: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
            for r in runs {
                for (name, (n, ns)) in &r.bpf_by_program {
                    let e = by.entry(name.as_str()).or_default();
                    e.0 += n;
                    e.1 += ns;
                }
            }
            let mut by: Vec<_> = by.into_iter().collect();
            by.sort_by_key(|(_, (_, ns))| std::cmp::Reverse(*ns));
            for (name, (n, ns)) in by {
                let per_tx = ns as f64 / tx.max(1) as f64;
                if per_tx < 10.0 {
                    continue;
                }
                rows.push(format!(
                    "| {} | {} | {} | {name} | {:.2} | {:.0} | {:.0} |",
                    w.name,
                    w.mode,
                    c.name(),
                    n as f64 / tx.max(1) as f64,
                    ns as f64 / n.max(1) as f64,
                    per_tx
                ));
            }
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(md, "\n### BPF time per transaction, by program\n")?;
    writeln!(
        md,
        "Programs taking 10 ns or more per transaction, summed over the repetitions (the \
         kernel's counts while `kernel.bpf_stats_enabled = 1`, which adds its own clock reads \
         to every run).\n"
    )?;
    writeln!(
        md,
        "| workload | mode | configuration | program | runs per transaction | ns per run | ns per transaction |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    for r in rows {
        writeln!(md, "{r}")?;
    }
    Ok(())
}

/// (runs, run time ns) of each of the daemon's BPF programs, from its stats file (written
/// every second and as it stops); empty where the kernel does not count them.
fn program_runs(d: &Daemon) -> BTreeMap<String, (u64, u64)> {
    let Ok(stats) = d.stats() else {
        return BTreeMap::new();
    };
    let Some(programs) = stats["bpf_programs"].as_object() else {
        return BTreeMap::new();
    };
    programs
        .iter()
        .map(|(name, r)| {
            let n = |k: &str| r[k].as_u64().unwrap_or(0);
            (name.clone(), (n("runs"), n("run_time_ns")))
        })
        .collect()
}

fn sql(pg: &Postgres, statement: &str) -> Result<()> {
    crate::run(pg.psql().args(["-c", statement]))
}

fn parse_pgbench(out: &str) -> Result<(f64, f64, u64)> {
    let find = |prefix: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|s| s.trim().to_string())
    };
    let tps: f64 = find("tps = ")
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .context("pgbench printed no tps")?;
    let lat: f64 = find("latency average = ")
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let tx: u64 = find("number of transactions actually processed: ")
        .and_then(|s| s.split('/').next()?.trim().parse().ok())
        .context("pgbench printed no transaction count")?;
    Ok((tps, lat, tx))
}

/// Statements of pgbench's built-in scripts, as the auditor normalises them.
fn script_statement(statement: &str) -> bool {
    let s = statement.trim_end_matches(';');
    s == "BEGIN"
        || s == "END"
        || s.starts_with("UPDATE pgbench_")
        || s.starts_with("SELECT abalance FROM pgbench_accounts")
        || s.starts_with("INSERT INTO pgbench_history")
}

struct Workload {
    name: &'static str,
    select_only: bool,
    mode: &'static str,
}

impl Workload {
    /// Statements in one transaction of pgbench's built-in script.
    fn statements_per_tx(&self) -> u64 {
        if self.select_only {
            1
        } else {
            7
        }
    }
}

/// What the proxy and pgbouncer configurations need: the enforced cgroup pgbench runs in,
/// the daemon configuration that enforces on it, and pgbouncer's port.
struct ProxySetup {
    cgroup: auditor_tests::Cgroup,
    daemon_config: String,
    pgbouncer_port: u16,
}

fn one_run(
    pg: &Postgres,
    clickhouse: Option<&auditor_tests::ClickHouse>,
    proxy: Option<&ProxySetup>,
    config: Config,
    w: &Workload,
    seconds: u32,
    clients: u32,
) -> Result<Sample> {
    let mut daemon = None;
    // Each ClickHouse run writes to a database of its own, to count what arrived.
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let ch_database = format!(
        "audit_bench_{}_{}",
        std::process::id(),
        RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    match config {
        Config::LogStatementAll => {
            sql(pg, "ALTER SYSTEM SET log_statement = 'all'")?;
            sql(pg, "SELECT pg_reload_conf()")?;
        }
        Config::Pgaudit => {
            sql(pg, "ALTER SYSTEM SET pgaudit.log = 'all'")?;
            sql(pg, "SELECT pg_reload_conf()")?;
        }
        Config::AuditorLocalLog => daemon = Some(Daemon::start(pg.port, &pinned(""))?),
        Config::BareHooks => {
            daemon = Some(Daemon::start_with_args(
                pg.port,
                &pinned(""),
                &["--bare-hooks"],
            )?)
        }
        Config::AuditorClickHouse => {
            let ch = clickhouse.context("no ClickHouse server for this configuration")?;
            daemon = Some(Daemon::start(
                pg.port,
                &pinned(&format!(
                    "clickhouse:\n  enabled: true\n  url: {}\n  database: {ch_database}\n",
                    ch.url()
                )),
            )?)
        }
        Config::AuditorProxy => {
            let p = proxy.context("no proxy setup")?;
            daemon = Some(Daemon::start(pg.port, &pinned(&p.daemon_config))?)
        }
        Config::None | Config::Pgbouncer => {}
    }
    settle()?;
    let daemon_pid = daemon.as_ref().map(|d: &Daemon| d.pid());
    let cpu0 = busy_cpu_ns()?;
    let dcpu0 = daemon_pid.and_then(process_cpu_ns);
    let bpf0 = daemon_pid.and_then(bpf_stats);
    let programs0 = daemon.as_ref().map(program_runs).unwrap_or_default();
    let mut cmd = pg.pgbench();
    cmd.args([
        "-n",
        "-M",
        w.mode,
        "-c",
        &clients.to_string(),
        "-j",
        &clients.to_string(),
    ])
    .args(["-T", &seconds.to_string()])
    .env("PGAPPNAME", "bench");
    if w.select_only {
        cmd.arg("-S");
    }
    let log_dir = tempfile::tempdir()?;
    if config.logs_latency() {
        cmd.arg("-l")
            .arg(format!("--log-prefix={}/lat", log_dir.path().display()));
    }
    match (config, proxy) {
        (Config::Pgbouncer, Some(p)) => {
            cmd.args(["-p", &p.pgbouncer_port.to_string()]);
        }
        (Config::AuditorProxy, Some(p)) => p.cgroup.enter(&mut cmd),
        _ => {}
    }
    cmd.arg("postgres");
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let latencies = if config.logs_latency() {
        Some(latency_percentiles(log_dir.path())?)
    } else {
        None
    };
    let cpu1 = busy_cpu_ns()?;
    let (tps, latency_ms, transactions) = parse_pgbench(&String::from_utf8_lossy(&out.stdout))?;
    let mut s = Sample {
        tps,
        latency_ms,
        transactions,
        cpu_ns_per_tx: (cpu1 - cpu0) as f64 / transactions.max(1) as f64,
        latency_p50_us: latencies.map(|l| l.0),
        latency_p99_us: latencies.map(|l| l.1),
        ..Sample::default()
    };
    if let (Some(mut d), Some(pid)) = (daemon, daemon_pid) {
        let per_tx = w.statements_per_tx();
        let mut dcpu1 = process_cpu_ns(pid);
        let bpf1 = bpf_stats(pid);
        s.daemon_peak_rss_kib = peak_rss_kib(pid);
        // Let the daemon finish what the kernel handed over, then stop it (it flushes).
        std::thread::sleep(Duration::from_millis(500));
        if config == Config::AuditorClickHouse {
            // Delivered, not just spooled: wait until ClickHouse acknowledged everything.
            s.clickhouse_catchup_s = Some(wait_delivered(&d)?.as_secs_f64());
            // The daemon's CPU includes delivering what it had spooled.
            dcpu1 = process_cpu_ns(pid);
        }
        d.stop()?;
        // The stats the daemon wrote as it stopped: every program run of the workload.
        for (name, (runs, ns)) in program_runs(&d) {
            let (runs0, ns0) = programs0.get(&name).copied().unwrap_or((0, 0));
            if runs > runs0 {
                s.bpf_by_program
                    .insert(name, (runs - runs0, ns.saturating_sub(ns0)));
            }
        }
        // Bare hooks record nothing: their daemon's CPU is per statement executed.
        let recorded = if config == Config::BareHooks {
            transactions * per_tx
        } else {
            let recorded = recorded_statements(&d)?;
            s.recorded = Some(recorded);
            s.expected = Some(transactions * per_tx);
            recorded
        };
        if let (Config::AuditorClickHouse, Some(ch)) = (config, clickhouse) {
            // What the daemon delivered before it stopped, as the standard views see it.
            let n = ch.query(&format!(
                "SELECT count() FROM {ch_database}.events FINAL WHERE kind = 'statement' \
                 AND application_name = 'bench' \
                 AND (statement IN ('BEGIN', 'END', 'BEGIN;', 'END;') \
                 OR startsWith(statement, 'UPDATE pgbench_') \
                 OR startsWith(statement, 'SELECT abalance FROM pgbench_accounts') \
                 OR startsWith(statement, 'INSERT INTO pgbench_history'))"
            ))?;
            s.clickhouse_recorded = Some(n.trim().parse().context("ClickHouse count")?);
        }
        if let (Some(a), Some(b)) = (dcpu0, dcpu1) {
            s.daemon_cpu_per_10k = Some((b - a) as f64 / 1e9 / (recorded.max(1) as f64 / 1e4));
        }
        if let (Some((t0, c0)), Some((t1, c1))) = (bpf0, bpf1) {
            if c1 > c0 {
                s.bpf_ns_per_call = Some((t1 - t0) as f64 / (c1 - c0) as f64);
                s.bpf_calls = Some(c1 - c0);
            }
        }
    }
    if config == Config::LogStatementAll {
        sql(pg, "ALTER SYSTEM RESET log_statement")?;
        sql(pg, "SELECT pg_reload_conf()")?;
    }
    if config == Config::Pgaudit {
        sql(pg, "ALTER SYSTEM SET pgaudit.log = 'none'")?;
        sql(pg, "SELECT pg_reload_conf()")?;
    }
    Ok(s)
}

/// Median and 99th percentile of the per-transaction latencies (µs) in pgbench's logs
/// (`-l`: one file per thread; the third field of each line is the latency).
fn latency_percentiles(dir: &Path) -> Result<(f64, f64)> {
    let mut all: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        all.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<u64>().ok()),
        );
    }
    if all.is_empty() {
        bail!("pgbench wrote no latency log");
    }
    all.sort_unstable();
    let at = |q: f64| all[((all.len() - 1) as f64 * q).round() as usize] as f64;
    Ok((at(0.5), at(0.99)))
}

/// Starts pgbouncer (session mode, trust) in front of `pg` on a free port, as user
/// postgres; stopped when the returned directory's owner kills it (see `Pgbouncer`).
struct Pgbouncer {
    dir: tempfile::TempDir,
    port: u16,
}

impl Pgbouncer {
    fn start(pg: &Postgres) -> Result<Pgbouncer> {
        let dir = tempfile::Builder::new()
            .prefix("auditor-pgbouncer-")
            .tempdir()?;
        let port = auditor_tests::free_port();
        let d = dir.path().display().to_string();
        std::fs::write(dir.path().join("userlist.txt"), "\"postgres\" \"\"\n")?;
        std::fs::write(
            dir.path().join("pgbouncer.ini"),
            format!(
                "[databases]\npostgres = host=127.0.0.1 port={}\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {d}/userlist.txt\npool_mode = session\n\
                 max_client_conn = 200\ndefault_pool_size = 50\n\
                 logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
                pg.port
            ),
        )?;
        crate::run(Command::new("chown").args(["-R", "postgres:postgres", &d]))?;
        crate::run(Command::new("runuser").args([
            "-u",
            "postgres",
            "--",
            "pgbouncer",
            "-d",
            &format!("{d}/pgbouncer.ini"),
        ]))?;
        // Ready when it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("pgbouncer did not start (see {d}/pgbouncer.log)");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Pgbouncer { dir, port })
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("pgbouncer.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.3}–{max:.3}")
}

/// What `cargo xtask bench` runs. Without a selection, everything, into docs/benchmarks.md;
/// a selection (`--only`, `--configs`, `--reps`, `--seconds`) is for working on one number
/// and writes target/bench-partial.md instead.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub smoke: bool,
    /// `workload/mode` pairs, e.g. `select-only/prepared`.
    pub only: Vec<String>,
    /// Configuration keys: none, bare, auditor, clickhouse, pgaudit, log_statement, proxy,
    /// pgbouncer.
    pub configs: Vec<String>,
    pub reps: Option<u32>,
    pub seconds: Option<u32>,
}

impl Options {
    fn partial(&self) -> bool {
        !self.only.is_empty()
            || !self.configs.is_empty()
            || self.reps.is_some()
            || self.seconds.is_some()
    }
}

/// Where the bench's daemons pin their redirect: a directory of the bench's own, so that
/// a daemon this host runs (its pins in the default /sys/fs/bpf/auditor) is never taken
/// over or detached by the bench, and what a bench stopped by a signal left pinned (its
/// enforcing daemon keeps enforcing while stopped, by design) is removed when the next
/// one starts.
const PIN_DIR: &str = "/sys/fs/bpf/auditor-bench";

/// A daemon's configuration in the bench: `extra` with the bench's pin directory.
fn pinned(extra: &str) -> String {
    if extra.contains("proxy: {") {
        extra.replacen("proxy: {", &format!("proxy: {{pin_dir: {PIN_DIR}, "), 1)
    } else {
        format!("{extra}proxy:\n  pin_dir: {PIN_DIR}\n")
    }
}

pub fn bench(opts: Options) -> Result<()> {
    let smoke = opts.smoke;
    let partial = !smoke && opts.partial();
    crate::setup::setup(crate::setup::Purpose::Test)?;
    // The daemon measured is the one installed (`dist`); the smoke run in `ci` only
    // checks that the command works, with the release build the tests use.
    if std::env::var_os("AUDITOR_BIN").is_none() {
        let bin = if smoke {
            crate::run(crate::cargo().args(["build", "--release", "-p", "auditor"]))?;
            crate::workspace_root().join("target/release/auditor")
        } else {
            crate::build_daemon()?
        };
        std::env::set_var("AUDITOR_BIN", bin);
    }
    let started = Instant::now();
    // What an earlier bench stopped by a signal left pinned; and, at the end (or an
    // error), what this one leaves.
    drop(auditor_tests::DetachOnDrop::new(PIN_DIR));
    let _detach = auditor_tests::DetachOnDrop::new(PIN_DIR);
    let _bpf_stats = BpfStats::enable();
    let (mut seconds, mut reps, clients, scale) = if smoke { (3, 1, 2, 2) } else { (10, 3, 4, 10) };
    if !smoke {
        seconds = opts.seconds.unwrap_or(seconds);
        reps = opts.reps.unwrap_or(reps);
    }
    let mut workloads: Vec<Workload> = if smoke {
        vec![Workload {
            name: "select-only",
            select_only: true,
            mode: "prepared",
        }]
    } else {
        let mut v = Vec::new();
        for (name, select_only) in [("select-only", true), ("TPC-B-like", false)] {
            for mode in ["simple", "extended", "prepared"] {
                v.push(Workload {
                    name,
                    select_only,
                    mode,
                });
            }
        }
        v
    };
    let all_configs = [
        Config::None,
        Config::BareHooks,
        Config::AuditorLocalLog,
        Config::AuditorClickHouse,
        Config::Pgaudit,
        Config::LogStatementAll,
        Config::AuditorProxy,
        Config::Pgbouncer,
    ];
    let configs: Vec<Config> = if smoke {
        vec![
            Config::None,
            Config::BareHooks,
            Config::AuditorLocalLog,
            Config::AuditorProxy,
        ]
    } else if opts.configs.is_empty() {
        all_configs.to_vec()
    } else {
        let mut v = vec![Config::None];
        for key in &opts.configs {
            let c = all_configs
                .iter()
                .find(|c| c.key() == key)
                .with_context(|| {
                    format!(
                        "unknown configuration {key:?}; one of: {}",
                        all_configs.map(|c| c.key()).join(", ")
                    )
                })?;
            if !v.contains(c) {
                v.push(*c);
            }
        }
        v
    };
    // `--only memory`: the 1,000-connection run (it also runs in the full bench).
    let memory_run = !smoke && (!partial || opts.only.iter().any(|o| o == MEMORY_RUN));
    // `--only masking`: the masking run (also in the full bench, and small in the smoke).
    let masking_run = smoke || !partial || opts.only.iter().any(|o| o == MASKING_RUN);
    // `--only profile`: where the daemon's time goes (also in the full bench).
    let profile_run = !smoke && (!partial || opts.only.iter().any(|o| o == PROFILE_RUN));
    if !smoke && !opts.only.is_empty() {
        let known: Vec<String> = workloads
            .iter()
            .map(|w| format!("{}/{}", w.name, w.mode))
            .collect();
        for o in opts
            .only
            .iter()
            .filter(|o| ![MEMORY_RUN, MASKING_RUN, PROFILE_RUN].contains(&o.as_str()))
        {
            if !known.contains(o) {
                bail!(
                    "unknown workload {o:?}; one of: {}, {MEMORY_RUN}, {MASKING_RUN}, \
                     {PROFILE_RUN}",
                    known.join(", ")
                );
            }
        }
        workloads.retain(|w| opts.only.contains(&format!("{}/{}", w.name, w.mode)));
    }
    // A throwaway ClickHouse for the auditor's ClickHouse configuration and the sink's
    // ingest rate.
    let clickhouse = if smoke || (partial && !configs.contains(&Config::AuditorClickHouse)) {
        None
    } else {
        Some(auditor_tests::ClickHouse::start()?)
    };
    // The test harness logs every statement (its ground truth); a benchmark must not.
    // pgaudit is loaded in every configuration (log = none outside its own runs) so that
    // all of them run against one server, switched by a reload.
    let pg = Postgres::start(&[
        "log_statement = 'none'",
        "shared_buffers = '256MB'",
        "shared_preload_libraries = 'pgaudit'",
        "pgaudit.log = 'none'",
        // The memory run's 1,000 clients.
        "max_connections = 1100",
    ])?;
    sql(&pg, "CREATE EXTENSION IF NOT EXISTS pgaudit")?;
    crate::run(
        pg.pgbench()
            .args(["-i", "-q", "-s", &scale.to_string(), "postgres"]),
    )?;

    // The proxy's configuration: pgbench in a cgroup under an enforce policy (whose rule
    // the workload never breaks), and pgbouncer to compare with.
    let bouncer = if configs.contains(&Config::Pgbouncer) {
        Some(Pgbouncer::start(&pg)?)
    } else {
        None
    };
    let policies = tempfile::tempdir()?;
    let cgroup = auditor_tests::Cgroup::new("bench-enforced")?;
    std::fs::write(
        policies.path().join("bench.yaml"),
        format!(
            "name: bench\nselector: {{matchLabels: {{cgroup.path: {}}}}}\nmode: enforce\n\
             block:\n  - name: no-server-files\n    when: {{functions: [pg_read_file]}}\n",
            cgroup.name
        ),
    )?;
    // Every daemon of the bench pins its redirect in the bench's place, each taking over
    // from the last; what the last leaves is removed at the end (`bench`).
    let proxy = ProxySetup {
        cgroup,
        daemon_config: format!(
            "policies_dir: {}\nproxy: {{port: {}}}\n",
            policies.path().display(),
            auditor_tests::free_port()
        ),
        pgbouncer_port: bouncer.as_ref().map(|b| b.port).unwrap_or(0),
    };
    let mut results: BTreeMap<(usize, Config), Vec<Sample>> = BTreeMap::new();
    for rep in 0..reps {
        for (wi, w) in workloads.iter().enumerate() {
            for &c in &configs {
                eprintln!(
                    "bench: rep {}/{reps} {} {} {}",
                    rep + 1,
                    w.name,
                    w.mode,
                    c.name()
                );
                let s = one_run(
                    &pg,
                    clickhouse.as_ref(),
                    Some(&proxy),
                    c,
                    w,
                    seconds,
                    clients,
                )?;
                let mut line = format!(
                    "bench:   {:.0} tps, {:.1} µs CPU/tx",
                    s.tps,
                    s.cpu_ns_per_tx / 1000.0
                );
                if let Some(d) = s.daemon_cpu_per_10k {
                    line += &format!(", daemon {:.3} µs/statement", d * 100.0);
                }
                if let Some(ns) = s.bpf_ns_per_call {
                    line += &format!(", BPF {ns:.0} ns/run");
                }
                eprintln!("{line}");
                results.entry((wi, c)).or_default().push(s);
            }
        }
    }

    let mut md = String::new();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|s| s.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let kernel = String::from_utf8_lossy(&Command::new("uname").arg("-r").output()?.stdout)
        .trim()
        .to_string();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Written by `cargo xtask bench{}` in one run ({:.0} s). Machine: {} CPUs ({cpu_model}), \
         kernel {kernel}, PostgreSQL 15 (fsync off: CPU, not the disk, is measured; pgbench scale {scale}), {clients} pgbench \
         clients on loopback, {seconds} s per run, {reps} interleaved repetitions; medians of \
         the ratios to no auditing, with their spread (min–max).\n",
        if smoke { " --smoke" } else { "" },
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    )?;
    if smoke {
        writeln!(
            md,
            "This is the smoke mode CI runs so the command never rots: too short to compare \
             configurations. Run `cargo xtask bench` for the real tables.\n"
        )?;
    }
    // Workload tables (none in a run of `--only memory` or `--only masking` alone).
    if !workloads.is_empty() {
        writeln!(md, "## Observe-mode overhead\n")?;
        writeln!(
            md,
            "CPU/tx: busy CPU time of the whole machine (all cores; without idle, iowait, steal) \
             per transaction, relative to no auditing. Throughput: tps relative to no auditing.\n"
        )?;
        writeln!(
            md,
            "| workload | mode | configuration | CPU/tx ratio (spread) | throughput ratio (spread) | latency ms | tps |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|")?;
        for (wi, w) in workloads.iter().enumerate() {
            let base = &results[&(wi, Config::None)];
            for &c in &configs {
                let runs = &results[&(wi, c)];
                let cpu: Vec<f64> = runs
                    .iter()
                    .zip(base)
                    .map(|(r, b)| r.cpu_ns_per_tx / b.cpu_ns_per_tx)
                    .collect();
                let thr: Vec<f64> = runs.iter().zip(base).map(|(r, b)| r.tps / b.tps).collect();
                writeln!(
                    md,
                    "| {} | {} | {} | {:.3} ({}) | {:.3} ({}) | {:.3} | {:.0} |",
                    w.name,
                    w.mode,
                    c.name(),
                    median(cpu.clone()),
                    spread(&cpu),
                    median(thr.clone()),
                    spread(&thr),
                    median(runs.iter().map(|r| r.latency_ms).collect()),
                    median(runs.iter().map(|r| r.tps).collect()),
                )?;
            }
        }
        writeln!(md, "\n## The auditor's own cost and completeness\n")?;
        writeln!(
            md,
            "| workload | mode | configuration | daemon CPU µs / statement | BPF ns per program run | BPF runs per transaction | daemon peak RSS MiB | recorded / expected statements |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        for (wi, w) in workloads.iter().enumerate() {
            for &c in configs.iter().filter(|c| c.has_daemon()) {
                let runs = &results[&(wi, c)];
                let complete: Vec<String> = runs
                    .iter()
                    .map(|r| match r.clickhouse_recorded {
                        Some(ch) => format!(
                            "{}/{} (ClickHouse: {ch}, all delivered {:.1} s after the run)",
                            r.recorded.unwrap_or(0),
                            r.expected.unwrap_or(0),
                            r.clickhouse_catchup_s.unwrap_or(0.0)
                        ),
                        None if c == Config::BareHooks => "(records nothing)".into(),
                        None => format!("{}/{}", r.recorded.unwrap_or(0), r.expected.unwrap_or(0)),
                    })
                    .collect();
                writeln!(
                    md,
                    "| {} | {} | {} | {:.2} | {:.0} | {:.1} | {:.1} | {} |",
                    w.name,
                    w.mode,
                    c.name(),
                    // s per 10k statements to µs per statement: x 100.
                    median(runs.iter().filter_map(|r| r.daemon_cpu_per_10k).collect()) * 100.0,
                    median(runs.iter().filter_map(|r| r.bpf_ns_per_call).collect()),
                    median(
                        runs.iter()
                            .filter_map(|r| r
                                .bpf_calls
                                .map(|c| c as f64 / r.transactions.max(1) as f64))
                            .collect()
                    ),
                    median(
                        runs.iter()
                            .filter_map(|r| r.daemon_peak_rss_kib.map(|k| k as f64 / 1024.0))
                            .collect()
                    ),
                    complete.join(", ")
                )?;
            }
        }
        writeln!(md, "\n### Where the added CPU per transaction goes\n")?;
        writeln!(
            md,
            "Medians, in µs of CPU per transaction: the machine's busy time without auditing, what \
             the auditor adds to it, and the parts measured directly: the daemon's own CPU (user \
             and system) and the run time of its BPF programs. The rest is what neither accounts \
             for: the syscall tracepoints' dispatch on every traced call, ring-buffer pages, and \
             caches shared with Postgres and pgbench on 2 cores. With ClickHouse, its server runs \
             on the same 2 cores here (in production it is elsewhere): its CPU is in \"added\" and \
             \"rest\". The bare hooks are the floor: the same tracepoints, their programs \
             returning at once; what a configuration adds above them is the auditor's own \
             work.\n"
        )?;
        writeln!(
            md,
            "| workload | mode | configuration | without auditing | added | daemon | BPF programs | rest |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        for (wi, w) in workloads.iter().enumerate() {
            let base = &results[&(wi, Config::None)];
            let base_us = median(base.iter().map(|b| b.cpu_ns_per_tx / 1e3).collect());
            for &c in configs.iter().filter(|c| c.has_daemon()) {
                let runs = &results[&(wi, c)];
                let per_tx = w.statements_per_tx() as f64;
                let added = median(
                    runs.iter()
                        .zip(base)
                        .map(|(r, b)| (r.cpu_ns_per_tx - b.cpu_ns_per_tx) / 1e3)
                        .collect(),
                );
                let daemon = median(
                    runs.iter()
                        .filter_map(|r| r.daemon_cpu_per_10k)
                        .map(|d| d / 1e4 * 1e6 * per_tx)
                        .collect(),
                );
                let bpf = median(
                    runs.iter()
                        .filter_map(|r| {
                            Some(
                                r.bpf_ns_per_call? * r.bpf_calls? as f64
                                    / r.transactions.max(1) as f64
                                    / 1e3,
                            )
                        })
                        .collect(),
                );
                writeln!(
                    md,
                    "| {} | {} | {} | {base_us:.1} | {added:.1} | {daemon:.1} | {bpf:.1} | {:.1} |",
                    w.name,
                    w.mode,
                    c.name(),
                    added - daemon - bpf
                )?;
            }
        }
        bpf_programs_section(&mut md, &workloads, &configs, &results)?;
        if configs.contains(&Config::AuditorProxy) {
            writeln!(md, "\n## Inline proxy\n")?;
            writeln!(
                md,
                "pgbench in a cgroup under an `enforce` policy, redirected (cgroup/connect4) into \
                 the daemon's proxy, which judges every statement and records it (`capture = \
                 proxy`); pgbouncer in session mode on the same loopback, without auditing, for \
                 comparison. Added latency per query: the median (p99) of the per-transaction \
                 latencies in pgbench's log, minus the same without either, divided by the \
                 statements per transaction. Targets: at most 30 µs added per query at the median, \
                 and throughput at least pgbouncer's.\n"
            )?;
            writeln!(
                md,
                "| workload | mode | configuration | throughput ratio to direct | throughput ratio to pgbouncer | CPU/tx ratio | added µs per query, median | added µs per query, p99 |"
            )?;
            writeln!(md, "|---|---|---|---|---|---|---|---|")?;
            for (wi, w) in workloads.iter().enumerate() {
                let base = &results[&(wi, Config::None)];
                let bouncer_runs = results.get(&(wi, Config::Pgbouncer));
                for &c in configs
                    .iter()
                    .filter(|c| matches!(c, Config::AuditorProxy | Config::Pgbouncer))
                {
                    let runs = &results[&(wi, c)];
                    let per_q = w.statements_per_tx() as f64;
                    let thr: Vec<f64> = runs.iter().zip(base).map(|(r, b)| r.tps / b.tps).collect();
                    let vs_bouncer = match bouncer_runs {
                        Some(bs) if c == Config::AuditorProxy => {
                            let v: Vec<f64> =
                                runs.iter().zip(bs).map(|(r, b)| r.tps / b.tps).collect();
                            format!("{:.3} ({})", median(v.clone()), spread(&v))
                        }
                        _ => "".into(),
                    };
                    let cpu: Vec<f64> = runs
                        .iter()
                        .zip(base)
                        .map(|(r, b)| r.cpu_ns_per_tx / b.cpu_ns_per_tx)
                        .collect();
                    let added = |f: fn(&Sample) -> Option<f64>| {
                        median(
                            runs.iter()
                                .zip(base)
                                .filter_map(|(r, b)| Some((f(r)? - f(b)?) / per_q))
                                .collect(),
                        )
                    };
                    writeln!(
                        md,
                        "| {} | {} | {} | {:.3} ({}) | {} | {:.3} ({}) | {:.1} | {:.1} |",
                        w.name,
                        w.mode,
                        c.name(),
                        median(thr.clone()),
                        spread(&thr),
                        vs_bouncer,
                        median(cpu.clone()),
                        spread(&cpu),
                        added(|s| s.latency_p50_us),
                        added(|s| s.latency_p99_us),
                    )?;
                }
            }
        }
    }
    let incomplete = results.values().flatten().any(|r| {
        (r.recorded.is_some() && r.recorded != r.expected)
            || (r.clickhouse_recorded.is_some() && r.clickhouse_recorded != r.expected)
    });
    if incomplete {
        writeln!(
            md,
            "\n**Some runs recorded fewer or more statements than executed: that is a bug to fix.**"
        )?;
    }
    writeln!(
        md,
        "\nBPF run times need `kernel.bpf_stats_enabled = 1` (the bench sets it for the run).\n"
    )?;
    // The sink's ingest rate gets a fresh server: the one above holds every run's
    // database and is still merging their parts.
    drop(clickhouse);
    if !partial {
        let fresh = if smoke {
            None
        } else {
            Some(auditor_tests::ClickHouse::start()?)
        };
        pipeline_section(&mut md, smoke, fresh.as_ref())?;
    }
    if memory_run {
        memory_section(&mut md, &pg, seconds)?;
    }
    if masking_run {
        let rows = if smoke { 2_000 } else { MASKING_ROWS };
        masking_section(&mut md, &pg, rows, seconds, reps)?;
    }
    if profile_run {
        writeln!(md, "## Where the daemon's time goes\n")?;
        let server = auditor_tests::ClickHouse::start();
        if let Err(e) = &server {
            writeln!(md, "(No ClickHouse for its profile: {e}.)\n")?;
        }
        match profile(&pg, seconds, clients, server.as_ref().ok()) {
            Ok(text) => md.push_str(&text),
            Err(e) => writeln!(md, "No profile: {e}.\n")?,
        }
    }
    let path = crate::workspace_root().join("docs/benchmarks.md");
    if partial {
        let partial_path = crate::workspace_root().join("target/bench-partial.md");
        std::fs::write(&partial_path, &md)?;
        eprintln!(
            "bench: partial report at {} (docs/benchmarks.md untouched)",
            partial_path.display()
        );
        print!("{md}");
    } else if smoke {
        // The smoke run proves the command works; it does not replace the real report.
        let smoke_path = std::env::temp_dir().join("auditor-bench-smoke.md");
        std::fs::write(&smoke_path, &md)?;
        eprintln!("bench: smoke report at {}", smoke_path.display());
        print!("{md}");
    } else {
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        std::fs::write(&path, &md)?;
        eprintln!("bench: wrote {}", path.display());
    }
    if incomplete {
        bail!("statements were lost or duplicated under load (see the report)");
    }
    Ok(())
}

/// Decoder and sink throughput: the criterion benchmarks in auditor/benches/pipeline.rs.
fn pipeline_section(
    md: &mut String,
    smoke: bool,
    clickhouse: Option<&auditor_tests::ClickHouse>,
) -> Result<()> {
    let root = crate::workspace_root();
    let mut cmd = crate::cargo();
    if let Some(ch) = clickhouse {
        cmd.env("AUDITOR_BENCH_CLICKHOUSE_URL", ch.url());
    }
    cmd.args(["bench", "-p", "auditor", "--bench", "pipeline", "--"]);
    if smoke {
        cmd.args([
            "--warm-up-time",
            "0.1",
            "--measurement-time",
            "0.3",
            "--sample-size",
            "10",
        ]);
    }
    crate::run(&mut cmd)?;
    let criterion = root.join("target/criterion");
    let sizes: serde_json::Value =
        serde_json::from_slice(&std::fs::read(criterion.join("pipeline-sizes.json"))?)?;
    let median_ns = |id: &str| -> Result<f64> {
        let path = criterion.join(id).join("new/estimates.json");
        let v: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        v["median"]["point_estimate"]
            .as_f64()
            .context("no median in estimates.json")
    };
    writeln!(md, "## Decoder throughput\n")?;
    writeln!(
        md,
        "Criterion (`cargo bench -p auditor --bench pipeline`), one core: each iteration replays a \
         protocol transcript recorded from Postgres 15 through a new session (framing, message \
         decoding, request/response matching, SQL normalisation with pg_query and its cache).\n"
    )?;
    writeln!(
        md,
        "| transcript | bytes | messages | events | messages/s | MB/s | events/s |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|")?;
    if let Some(map) = sizes.as_object() {
        for (id, size) in map.iter().filter(|(id, _)| id.starts_with("decode/")) {
            let ns = median_ns(id)?;
            let per_s = |n: f64| n / (ns / 1e9);
            let bytes = size["bytes"].as_f64().unwrap_or(0.0);
            let messages = size["messages"].as_f64().unwrap_or(0.0);
            let events = size["events"].as_f64().unwrap_or(0.0);
            writeln!(
                md,
                "| {} | {bytes:.0} | {messages:.0} | {events:.0} | {:.0} | {:.1} | {:.0} |",
                id.trim_start_matches("decode/"),
                per_s(messages),
                per_s(bytes) / 1e6,
                per_s(events),
            )?;
        }
    }
    writeln!(
        md,
        "\nThe steady state, where the daemon's decoding thread spends its time: an established \
         session answering one more transaction, again and again (the same pgbench \
         TPC-B-like transaction; a simple `SELECT ... WHERE aid = N` with 1,000 values of N), \
         its events taken and their boxes handed back as the sink does. Allocations are \
         counted by the benchmark's allocator.\n"
    )?;
    writeln!(
        md,
        "| transaction | statements | ns per statement | allocations per statement |"
    )?;
    writeln!(md, "|---|---|---|---|")?;
    if let Some(map) = sizes.as_object() {
        for (id, size) in map.iter().filter(|(id, _)| id.starts_with("steady/")) {
            let statements = size["statements"].as_f64().unwrap_or(0.0);
            let ns = median_ns(id)?;
            writeln!(
                md,
                "| {} | {statements:.0} | {:.0} | {:.2} |",
                id.trim_start_matches("steady/"),
                ns / statements.max(1.0),
                size["allocations_per_statement"].as_f64().unwrap_or(0.0),
            )?;
        }
    }
    writeln!(md, "\n## Sink throughput\n")?;
    let events = sizes["sink/local-log"]["events"].as_f64().unwrap_or(0.0);
    let ns = median_ns("sink/local-log")?;
    writeln!(
        md,
        "- Local sealed log (binary records against each session's context, a digest per \
         record, a sealed block per batch of {events:.0}), one core: **{:.0} events/s**.",
        events / (ns / 1e9)
    )?;
    if sizes.get("sink/clickhouse").is_some() {
        let events = sizes["sink/clickhouse"]["events"].as_f64().unwrap_or(0.0);
        let ns = median_ns("sink/clickhouse")?;
        writeln!(
            md,
            "- ClickHouse (Debian's 18.16 on this machine, same host): {events:.0} events per \
             iteration through the spool (compact binary records in checksummed segments, \
             written by one thread, read back without copying by another) and copied from \
             them into RowBinary rows sent over HTTP, the server on the same 2 cores, until the server acknowledged all of them: **{:.0} \
             events/s** sustained.",
            events / (ns / 1e9)
        )?;
    } else {
        writeln!(md, "- ClickHouse: measured by the full run only.")?;
    }
    writeln!(md)?;
    Ok(())
}

/// CPU time (utime + stime, ns) of each of a process's threads, summed by thread name;
/// the process's first thread is named `main`.
fn threads_cpu_ns(pid: u32) -> BTreeMap<String, u64> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for t in tasks.flatten() {
        let tid: u32 = match t.file_name().to_str().and_then(|n| n.parse().ok()) {
            Some(tid) => tid,
            None => continue,
        };
        let name = if tid == pid {
            "main".to_string()
        } else {
            std::fs::read_to_string(t.path().join("comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or_default()
        };
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        *by_name.entry(name).or_insert(0) += ticks * 10_000_000;
    }
    by_name
}

/// What a daemon thread does, by its name.
fn thread_role(name: &str) -> &'static str {
    match name {
        "main" => "reads the ring buffer, decodes the protocol, matches requests to responses, builds events (parameters' keyed hashes included)",
        "sink" => "the local log: each event encoded against its session's context, a digest per record, blocks sealed and written; with ClickHouse on, the same frames and records copied for the spool (encoded once)",
        "ch-spool" => "appends the spool records to disk (a checksum each)",
        "ch-send" => "reads the spool back, copies each record and its context's fields into a RowBinary row, sends the inserts over HTTP",
        "tokio-rt-worker" => "ch-send's blocking pool: spool reads (checksums verified) and cursor commits",
        _ => "other",
    }
}

/// Waits until the daemon's ClickHouse sink has delivered everything it was given (at
/// most 180 s); returns how long it waited.
fn wait_delivered(d: &Daemon) -> Result<Duration> {
    let waited = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let st = d.stats()?;
        let ch = &st["clickhouse"];
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let written = n(&st["events_written"]);
        if n(&ch["spooled"]) >= written
            && n(&ch["inserted"]) >= n(&ch["spooled"])
            && n(&ch["spool_bytes"]) == 0
        {
            break;
        }
        if waited.elapsed() > Duration::from_secs(180) {
            eprintln!("bench: ClickHouse did not catch up in 180 s: {ch}");
            break;
        }
    }
    Ok(waited.elapsed())
}

/// Where the daemon's time goes under the select-only (prepared) load, with the local log
/// and, given a server, with ClickHouse too: each thread's CPU per statement, and the top
/// symbols from perf (Debian's linux-perf).
fn profile(
    pg: &Postgres,
    seconds: u32,
    clients: u32,
    clickhouse: Option<&auditor_tests::ClickHouse>,
) -> Result<String> {
    let ok = Command::new("perf")
        .args(["--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        bail!("perf is not installed (apt-get install linux-perf)");
    }
    let mut md = String::new();
    writeln!(
        md,
        "The daemon during one more select-only (prepared) run per configuration. Per thread: \
         its CPU time (utime and stime, from the start of the load until the daemon had \
         written, and with ClickHouse delivered, everything) per statement recorded. Then \
         `perf record` during the load: self time of the top symbols, and each thread's \
         share by object (user or kernel).\n"
    )?;
    let mut runs: Vec<(&str, String, std::path::PathBuf)> = vec![(
        "auditor, local log",
        String::new(),
        std::env::temp_dir().join("auditor-bench-perf.data"),
    )];
    if let Some(ch) = clickhouse {
        runs.push((
            "auditor, local log + ClickHouse",
            format!(
                "clickhouse:\n  enabled: true\n  url: {}\n  database: audit_bench_profile_{}\n",
                ch.url(),
                std::process::id()
            ),
            std::env::temp_dir().join("auditor-bench-perf-clickhouse.data"),
        ));
    }
    for (label, config, data) in runs {
        let daemon = Daemon::start(pg.port, &pinned(&config))?;
        let pid = daemon.pid();
        let before = threads_cpu_ns(pid);
        let mut load = pg.pgbench();
        // The application name the count of recorded statements looks for.
        load.env("PGAPPNAME", "bench")
            .args(["-n", "-S", "-M", "prepared", "-c", &clients.to_string()])
            .args([
                "-j",
                &clients.to_string(),
                "-T",
                &(seconds + 2).to_string(),
                "postgres",
            ]);
        let mut load = load.spawn()?;
        std::thread::sleep(Duration::from_secs(1));
        let rec = Command::new("perf")
            .args(["record", "-F", "999", "-g", "-p", &pid.to_string(), "-o"])
            .arg(&data)
            .args(["--", "sleep", &seconds.to_string()])
            .output()?;
        load.wait()?;
        std::thread::sleep(Duration::from_millis(500));
        if !config.is_empty() {
            wait_delivered(&daemon)?;
        }
        let after = threads_cpu_ns(pid);
        let mut daemon = daemon;
        daemon.stop()?;
        if !rec.status.success() {
            bail!(
                "perf record failed: {}",
                String::from_utf8_lossy(&rec.stderr).trim()
            );
        }
        let statements = recorded_statements(&daemon)?.max(1) as f64;
        writeln!(md, "### {label}\n")?;
        writeln!(
            md,
            "{statements:.0} statements recorded.\n\n| thread | what it does | CPU µs per statement | share |\n|---|---|---|---|"
        )?;
        let mut spent: Vec<(String, f64)> = after
            .iter()
            .map(|(name, ns)| {
                let ns0 = before.get(name).copied().unwrap_or(0);
                (
                    name.clone(),
                    ns.saturating_sub(ns0) as f64 / 1e3 / statements,
                )
            })
            .filter(|(_, us)| *us > 0.0)
            .collect();
        // The decoding thread first, then the local log's, then the others by name.
        spent.sort_by_key(|(name, _)| match name.as_str() {
            "main" => (0, String::new()),
            "sink" => (1, String::new()),
            other => (2, other.to_string()),
        });
        let total: f64 = spent.iter().map(|(_, us)| us).sum();
        for (name, us) in &spent {
            writeln!(
                md,
                "| {name} | {} | {us:.2} | {:.0}% |",
                thread_role(name),
                us / total.max(f64::MIN_POSITIVE) * 100.0
            )?;
        }
        writeln!(md, "| all | | **{total:.2}** | 100% |\n")?;
        let report = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "-g",
                "none",
                "--sort",
                "comm,dso,sym",
                "--percent-limit",
                "1",
                "-i",
            ])
            .arg(&data)
            .output()?;
        let text = String::from_utf8_lossy(&report.stdout);
        let mut top: String = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(25)
            .map(|l| format!("{}\n", l.trim_end()))
            .collect();
        // Each thread's share, user and kernel apart.
        let threads = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-g", "none"])
            .args(["--sort", "comm,dso", "--percent-limit", "1", "-i"])
            .arg(&data)
            .output()?;
        top.push_str("\nBy thread and object:\n");
        for l in String::from_utf8_lossy(&threads.stdout)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(12)
        {
            top.push_str(l.trim_end());
            top.push('\n');
        }
        writeln!(md, "```\n{top}```\n")?;
    }
    Ok(md)
}

/// Turns on the kernel's BPF run-time accounting for the benchmark, restoring it after.
pub struct BpfStats(String);

impl BpfStats {
    pub fn enable() -> Self {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let old = std::fs::read_to_string(path).unwrap_or_else(|_| "0".into());
        let _ = std::fs::write(path, "1");
        BpfStats(old.trim().to_string())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}
