//! Harness for the integration tests (and the fixture recorder): a throwaway Postgres, the
//! auditor daemon, cgroup v2 subgroups for simulated workloads, and the event log.
//!
//! These tests need root, BTF and Debian's postgresql-15. Outside CI they skip with a printed
//! reason when those are missing; with CI set they fail instead.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

pub mod oidc;
pub mod webdriver;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Returns false (after printing why) when this environment cannot run root tests; panics
/// instead when running in CI, where they must run.
pub fn can_run(test: &str) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root");
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        missing.push("kernel BTF (/sys/kernel/btf/vmlinux)");
    }
    if !Path::new(PG_BIN).join("postgres").exists() {
        missing.push("postgresql-15 (run `cargo xtask setup`)");
    }
    if !auditor_bin().exists() {
        missing.push("the release daemon (cargo build --release -p auditor)");
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("{test}: needs {}", missing.join(", "));
    if std::env::var_os("CI").is_some() {
        panic!("{why} (CI is set: root tests must run here)");
    }
    eprintln!("skipped: {why}");
    false
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// The daemon the tests start: `$AUDITOR_BIN`, or the release build (`cargo xtask bench`
/// names the `dist` build, as installed, here).
pub fn auditor_bin() -> PathBuf {
    std::env::var_os("AUDITOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/auditor"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A Postgres 15 server in a temporary directory, on its own port, logging every
/// statement (the ground truth the tests compare against). Stopped on drop.
pub struct Postgres {
    pub port: u16,
    pub dir: tempfile::TempDir,
}

fn as_postgres(cmd: &str) -> Result<()> {
    as_postgres_in(None, cmd)
}

/// Runs `cmd` as user postgres, in network namespace `netns` if given.
fn as_postgres_in(netns: Option<&Netns>, cmd: &str) -> Result<()> {
    let mut command = match netns {
        Some(ns) => ns.command("runuser"),
        None => Command::new("runuser"),
    };
    let out = command
        .args(["-u", "postgres", "--", "sh", "-c", cmd])
        .output()
        .context("runuser")?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl Postgres {
    /// `extra` lines are appended to postgresql.conf.
    pub fn start(extra: &[&str]) -> Result<Self> {
        Self::start_with(extra, false, None, free_port())
    }

    /// With `ssl = on` and a self-signed certificate made for this server.
    pub fn start_tls(extra: &[&str]) -> Result<Self> {
        Self::start_with(extra, true, None, free_port())
    }

    /// Inside network namespace `netns`, on `port` of its own loopback.
    pub fn start_in_netns(netns: &Netns, port: u16) -> Result<Self> {
        Self::start_with(&[], false, Some(netns), port)
    }

    fn start_with(extra: &[&str], tls: bool, netns: Option<&Netns>, port: u16) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("auditor-pg-").tempdir()?;
        let path = dir.path().display().to_string();
        Command::new("chown")
            .args(["postgres:postgres", &path])
            .status()?;
        as_postgres(&format!(
            "{PG_BIN}/initdb -D {path}/data -A trust -U postgres --no-sync >/dev/null"
        ))?;
        let mut conf = vec![
            format!("port = {port}"),
            "listen_addresses = '127.0.0.1'".into(),
            format!("unix_socket_directories = '{path}'"),
            "fsync = off".into(),
            "synchronous_commit = off".into(),
            "log_statement = 'all'".into(),
            "log_line_prefix = '%a|%p|'".into(),
            "max_connections = 50".into(),
        ];
        if tls {
            let data = dir.path().join("data");
            check(
                Command::new("openssl")
                    .args(["req", "-new", "-x509", "-days", "2", "-nodes"])
                    .args(["-subj", "/CN=localhost", "-newkey", "rsa:2048"])
                    .arg("-keyout")
                    .arg(data.join("server.key"))
                    .arg("-out")
                    .arg(data.join("server.crt")),
            )?;
            for f in ["server.key", "server.crt"] {
                let p = data.join(f);
                check(Command::new("chown").arg("postgres:postgres").arg(&p))?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
            }
            conf.push("ssl = on".into());
        }
        conf.extend(extra.iter().map(|s| s.to_string()));
        let conf_path = dir.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push('\n');
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text)?;
        as_postgres_in(
            netns,
            &format!(
                "{PG_BIN}/pg_ctl -D {path}/data -l {path}/server.log -w -t 60 start >/dev/null"
            ),
        )?;
        Ok(Postgres { port, dir })
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The certificate and key of a server started with `start_tls`.
    pub fn cert_and_key(&self) -> (PathBuf, PathBuf) {
        let data = self.dir.path().join("data");
        (data.join("server.crt"), data.join("server.key"))
    }

    /// Statements the server logged for `application_name` (log_statement = all): one per
    /// simple Query message and one per extended-protocol Execute.
    pub fn logged_statements(&self, application_name: &str) -> Result<usize> {
        let text = std::fs::read_to_string(self.log_path())?;
        let prefix = format!("{application_name}|");
        Ok(text
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .filter(|l| l.contains("LOG:  statement: ") || l.contains("LOG:  execute "))
            .count())
    }

    /// Statements the server logged for backend process `pid`, whatever the application
    /// name was at the time (a driver may set it with a statement of its own).
    pub fn logged_statements_of_backend(&self, pid: u64) -> Result<usize> {
        let text = std::fs::read_to_string(self.log_path())?;
        let field = format!("|{pid}|");
        Ok(text
            .lines()
            .filter(|l| l.find('|').is_some_and(|at| l[at..].starts_with(&field)))
            .filter(|l| l.contains("LOG:  statement: ") || l.contains("LOG:  execute "))
            .count())
    }

    /// How clients reach this server: TCP on loopback, as user postgres.
    fn conn_args(&self) -> [String; 6] {
        [
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]
        .map(String::from)
    }

    /// How clients reach this server through its Unix-domain socket
    /// (`<dir>/.s.PGSQL.<port>`), as user postgres.
    fn unix_conn_args(&self) -> [String; 6] {
        [
            "-h".to_string(),
            self.dir.path().display().to_string(),
            "-p".to_string(),
            self.port.to_string(),
            "-U".to_string(),
            "postgres".to_string(),
        ]
    }

    /// psql against this server over TCP, as a command to adjust and run.
    pub fn psql(&self) -> Command {
        let mut c = Command::new("psql");
        c.arg("-X")
            .arg("-q")
            .args(self.conn_args())
            .args(["-v", "ON_ERROR_STOP=0", "postgres"]);
        c
    }

    /// psql through the Unix-domain socket.
    pub fn psql_unix(&self) -> Command {
        let mut c = Command::new("psql");
        c.arg("-X").arg("-q").args(self.unix_conn_args()).args([
            "-v",
            "ON_ERROR_STOP=0",
            "postgres",
        ]);
        c
    }

    pub fn pgbench(&self) -> Command {
        let mut c = Command::new("pgbench");
        c.args(self.conn_args());
        c
    }

    /// pgbench through the Unix-domain socket.
    pub fn pgbench_unix(&self) -> Command {
        let mut c = Command::new("pgbench");
        c.args(self.unix_conn_args());
        c
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let path = self.dir.path().display().to_string();
        let _ = as_postgres(&format!(
            "{PG_BIN}/pg_ctl -D {path}/data -m immediate -w stop >/dev/null 2>&1"
        ));
    }
}

/// A network namespace of the test's own (`ip netns add`), its loopback up; deleted on
/// drop. Processes started in it (`command`) reach only its own loopback.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Self> {
        let name = format!("auditor-{tag}-{}", std::process::id());
        check(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        check(ns.command("ip").args(["link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// `program` to run inside the namespace (`ip netns exec` execs it: the child's pid is
    /// the program's).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// The namespace's inode number, as /proc/PID/ns/net shows it.
    pub fn inode(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(std::fs::metadata(format!("/run/netns/{}", self.name))?.ino())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup v2 subgroup standing in for one workload; removed on drop.
pub struct Cgroup {
    pub path: PathBuf,
    /// The path as the auditor reports it ("/name").
    pub name: String,
}

pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Self> {
        let root = cgroup2_mount().context("no cgroup v2 mount")?;
        let name = format!("{name}-{}", std::process::id());
        let path = root.join(&name);
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Cgroup {
            path,
            name: format!("/{name}"),
        })
    }

    /// Makes `cmd` start inside this cgroup.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = self.path.join("cgroup.procs");
        // SAFETY: between fork and exec we only write our own pid to a file.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, std::process::id().to_string()));
        }
    }

    /// Runs the (ignored) test `test` of this test binary as a client process inside this
    /// cgroup, with `env` set, and fails if it fails: a hand-written client whose traffic
    /// is told apart by its cgroup.
    pub fn run_test_client(&self, test: &str, env: &[(&str, String)]) {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", test, "--nocapture", "--include-ignored"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.enter(&mut cmd);
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{test}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The statement events of the workload in cgroup `cgroup` (its path, as events show it).
pub fn statements_of<'a>(events: &'a [Value], cgroup: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| str_of(e, "cgroup_path") == cgroup && str_of(e, "kind") == "statement")
        .collect()
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // The processes have exited; a cgroup with none left can be removed.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The auditor daemon, watching one Postgres port, with its own state directory.
pub struct Daemon {
    child: Option<Child>,
    _owned_state: Option<tempfile::TempDir>,
    pub state: PathBuf,
    pub output: mpsc::Receiver<String>,
}

impl Daemon {
    pub fn start(pg_port: u16, extra_config: &str) -> Result<Self> {
        let state = tempfile::Builder::new()
            .prefix("auditor-state-")
            .tempdir()?;
        let mut d = Self::start_in(state.path(), pg_port, extra_config)?;
        d._owned_state = Some(state);
        Ok(d)
    }

    /// With environment variables set for the daemon.
    pub fn start_with_env(pg_port: u16, extra_config: &str, env: &[(&str, &str)]) -> Result<Self> {
        let state = tempfile::Builder::new()
            .prefix("auditor-state-")
            .tempdir()?;
        let mut d = Self::start_in_env(state.path(), pg_port, extra_config, env)?;
        d._owned_state = Some(state);
        Ok(d)
    }

    /// With more arguments to `auditor run` (e.g. `--bare-hooks`).
    pub fn start_with_args(pg_port: u16, extra_config: &str, args: &[&str]) -> Result<Self> {
        let state = tempfile::Builder::new()
            .prefix("auditor-state-")
            .tempdir()?;
        let mut d = Self::start_in_full(state.path(), pg_port, extra_config, &[], args)?;
        d._owned_state = Some(state);
        Ok(d)
    }

    /// With a state directory the caller keeps (to start another daemon on it later).
    pub fn start_in(state: &Path, pg_port: u16, extra_config: &str) -> Result<Self> {
        Self::start_in_env(state, pg_port, extra_config, &[])
    }

    fn start_in_env(
        state: &Path,
        pg_port: u16,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_in_full(state, pg_port, extra_config, env, &[])
    }

    fn start_in_full(
        state: &Path,
        pg_port: u16,
        extra_config: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Self> {
        let config = state.join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "state_dir: {}\nendpoints:\n  - port: {pg_port}\n{}",
                state.display(),
                capture_ends_with_daemon(extra_config)
            ),
        )?;
        let mut child = Command::new(auditor_bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the auditor")?;
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                    let _ = tx.send(line);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("ready; Ctrl-C stops") => break,
                // Every program must load on this kernel as built: a refused one falls
                // back to a weaker copy and would leave the tests passing on the fallback.
                Ok(line) if line.contains("the verifier refused") => {
                    let _ = child.kill();
                    bail!("the auditor's eBPF programs were refused: {line}");
                }
                Ok(line) => seen.push(line),
                Err(_) => {
                    let _ = child.kill();
                    bail!("the auditor did not become ready:\n{}", seen.join("\n"));
                }
            }
        }
        Ok(Daemon {
            child: Some(child),
            _owned_state: None,
            state: state.to_path_buf(),
            output: rx,
        })
    }

    pub fn log_dir(&self) -> PathBuf {
        self.state.join("log")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Kills the daemon with SIGKILL (no flushing, nothing to clean up): a crash.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Stops with SIGINT (the daemon flushes everything) and returns its last output.
    pub fn stop(&mut self) -> Result<Vec<String>> {
        let Some(mut child) = self.child.take() else {
            return Ok(Vec::new());
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = child.wait()?;
        let lines: Vec<String> = self.output.try_iter().collect();
        if !status.success() {
            bail!("the auditor exited with {status}:\n{}", lines.join("\n"));
        }
        Ok(lines)
    }

    /// Stops the daemon and returns every event, checking that none is recorded twice and
    /// that no bytes were lost (a gap fails, with the daemon's last words and the gaps).
    pub fn stop_without_gaps(&mut self) -> Vec<Value> {
        let output = self.stop().unwrap();
        let events = self.events().unwrap();
        assert_no_duplicates(&events);
        let gaps: Vec<&Value> = events
            .iter()
            .filter(|e| str_of(e, "kind") == "gap")
            .collect();
        assert!(gaps.is_empty(), "gaps recorded: {output:?} {gaps:#?}");
        events
    }

    /// What the daemon last wrote to stats.json (`auditor stats`).
    pub fn stats(&self) -> Result<Value> {
        let text = std::fs::read_to_string(self.state.join("stats.json"))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Every event in the log so far.
    pub fn events(&self) -> Result<Vec<Value>> {
        read_events(&self.log_dir())
    }

    /// Waits until every session of the workload in cgroup `cgroup` (its path, as events
    /// show it) that started has ended, at least one: a condition instead of a fixed sleep
    /// before the trail is read or the daemon stopped. Returns the events (after 30 s
    /// whatever they are: the assertions that follow say what is missing).
    pub fn wait_sessions_ended(&self, cgroup: &str) -> Vec<Value> {
        self.wait_for(Duration::from_secs(30), |evs| {
            let mut started = std::collections::HashSet::new();
            let mut ended = std::collections::HashSet::new();
            for e in evs.iter().filter(|e| str_of(e, "cgroup_path") == cgroup) {
                match str_of(e, "kind") {
                    "session_start" => started.insert(str_of(e, "session_id")),
                    "session_end" => ended.insert(str_of(e, "session_id")),
                    _ => false,
                };
            }
            !started.is_empty() && started.is_subset(&ended)
        })
        .unwrap()
    }

    /// Waits until `pred` holds for the stats (or the timeout passes) and returns them.
    pub fn wait_for_stats(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.stats().unwrap_or(Value::Null);
            if pred(&stats) || Instant::now() >= deadline {
                return stats;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `pred` holds for the events (or the timeout passes) and returns them.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events()?;
            if pred(&events) || Instant::now() >= deadline {
                return Ok(events);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The tests' daemons end their capture when they stop (`capture.keep_while_stopped_s: 0`)
/// unless a test sets the option itself: a capture left running for the next daemon would
/// go on capturing the next tests' servers (same ports) for its lease.
fn capture_ends_with_daemon(extra_config: &str) -> String {
    if extra_config.contains("keep_while_stopped_s") {
        return extra_config.to_string();
    }
    let mut out = String::new();
    let mut added = false;
    for line in extra_config.lines() {
        out.push_str(line);
        out.push('\n');
        if line.trim_end() == "capture:" {
            out.push_str("  keep_while_stopped_s: 0\n");
            added = true;
        }
    }
    if !added {
        out.push_str("capture:\n  keep_while_stopped_s: 0\n");
    }
    out
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

/// Every event in the log directory `dir` (`state_dir/log`), as `auditor export --json`
/// prints them: the way a user reads the trail, whichever format the files have.
pub fn read_events(dir: &Path) -> Result<Vec<Value>> {
    let mut events = Vec::new();
    each_event(dir, |line| {
        events.push(serde_json::from_slice::<Value>(line).with_context(|| {
            format!(
                "auditor export printed a line that is not JSON: {}",
                String::from_utf8_lossy(line)
            )
        })?);
        Ok(())
    })?;
    Ok(events)
}

/// As [`read_events`], one line of `auditor export --json` at a time, as it comes: a
/// log of millions of events is read in constant memory (the benchmark's runs write that
/// many, and a vector of JSON values of them took gigabytes).
pub fn each_event(dir: &Path, mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let state = dir.parent().context("the log directory has a parent")?;
    let mut child = Command::new(auditor_bin())
        .args(["export", "--json", "--state-dir"])
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running auditor export")?;
    // Its errors are read beside its output, or a full stderr pipe would stall it.
    let mut stderr = child.stderr.take().context("export's stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let mut out = BufReader::new(child.stdout.take().context("export's stdout")?);
    let mut line = Vec::new();
    let mut failed = None;
    loop {
        line.clear();
        match out.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                failed = Some(anyhow::Error::from(e).context("reading auditor export's output"));
                break;
            }
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        if text.is_empty() {
            continue;
        }
        if let Err(e) = f(text) {
            failed = Some(e);
            break;
        }
    }
    drop(out);
    if failed.is_some() {
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for auditor export")?;
    let err = errors.join().unwrap_or_default();
    if let Some(e) = failed {
        return Err(e);
    }
    if !status.success() {
        if err.contains("no events under") {
            return Ok(());
        }
        bail!("auditor export --json failed: {err}");
    }
    Ok(())
}

/// Every byte of the log directory's files (for checks that a secret never reached them,
/// in any form).
pub fn raw_log(dir: &Path) -> Vec<u8> {
    let mut raw = Vec::new();
    for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        raw.extend(std::fs::read(f.path()).unwrap());
    }
    raw
}

/// Whether `needle` occurs anywhere in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &str) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
}

/// Fails if any (session_id, seq) occurs twice: an event recorded twice. (Events of no
/// session, such as grants and policy errors, have unique ids of their own.)
pub fn assert_no_duplicates(events: &[Value]) {
    let mut seen = std::collections::HashSet::new();
    let mut ids = std::collections::HashSet::new();
    for e in events {
        assert!(
            ids.insert(str_of(e, "event_id").to_string()),
            "event id twice: {e}"
        );
        if str_of(e, "session_id").is_empty() {
            continue;
        }
        let key = (
            str_of(e, "session_id").to_string(),
            e["seq"].as_u64().unwrap(),
        );
        assert!(seen.insert(key.clone()), "event recorded twice: {key:?}");
    }
}

pub fn str_of<'a>(ev: &'a Value, field: &str) -> &'a str {
    ev.get(field).and_then(|v| v.as_str()).unwrap_or("")
}

/// Runs a command to completion, failing with its output if it fails.
pub fn check(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Python 3 (Debian's, where present) and the TLS test peers in tests/helpers/pg_tls.py.
/// A Java helper of tests/helpers/drivers (`class`.java) compiled against Debian's pgjdbc
/// into the target directory, as a command to run.
pub fn pgjdbc_command(class: &str) -> Command {
    let classes = workspace_root().join("target/test-deps/jdbc");
    std::fs::create_dir_all(&classes).expect("target/test-deps/jdbc");
    let jar = "/usr/share/java/postgresql.jar";
    let status = Command::new("javac")
        .args(["-cp", jar, "-d"])
        .arg(&classes)
        .arg(
            workspace_root()
                .join("tests/helpers/drivers")
                .join(format!("{class}.java")),
        )
        .status()
        .expect("javac (cargo xtask setup --tests installs default-jdk-headless)");
    assert!(status.success(), "javac failed");
    let mut cmd = Command::new("java");
    cmd.arg("-cp")
        .arg(format!("{jar}:{}", classes.display()))
        .arg(class);
    cmd
}

pub fn pg_tls_helper() -> Command {
    let mut c = Command::new(python3());
    c.arg(workspace_root().join("tests/helpers/pg_tls.py"));
    c
}

/// The same peers, run inside network namespace `ns`.
pub fn pg_tls_helper_in(ns: &Netns) -> Command {
    let mut c = ns.command(python3());
    c.arg(workspace_root().join("tests/helpers/pg_tls.py"));
    c
}

pub fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// A TLS-terminating front for a Postgres server, whose OpenSSL runs over memory buffers
/// (no socket under the library: its plaintext cannot be tied to a connection). Killed on
/// drop.
pub struct TlsProxy {
    pub port: u16,
    child: Child,
}

impl TlsProxy {
    pub fn start(pg: &Postgres) -> Result<Self> {
        let port = free_port();
        let (cert, key) = pg.cert_and_key();
        let mut child = pg_tls_helper()
            .args(["proxy", "--listen", &port.to_string()])
            .args(["--upstream", &pg.port.to_string()])
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the TLS proxy")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line)?;
        if !line.contains("listening") {
            let _ = child.kill();
            bail!("the TLS proxy did not start: {line}");
        }
        Ok(TlsProxy { port, child })
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A ClickHouse server (Debian's clickhouse-server) in a temporary directory, on its own
/// ports. Stopped on drop; `stop` and `restart` simulate an outage.
pub struct ClickHouse {
    pub http_port: u16,
    tcp_port: u16,
    interserver_port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

pub const CLICKHOUSE_SERVER: &str = "/usr/sbin/clickhouse-server";

impl ClickHouse {
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("auditor-ch-").tempdir()?;
        let mut ch = ClickHouse {
            http_port: free_port(),
            tcp_port: free_port(),
            interserver_port: free_port(),
            dir,
            child: None,
        };
        ch.restart()?;
        Ok(ch)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Starts the server (again) and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        let d = self.dir.path().display().to_string();
        let child = Command::new(CLICKHOUSE_SERVER)
            .arg("--config-file=/etc/clickhouse-server/config.xml")
            .arg("--")
            .arg(format!("--http_port={}", self.http_port))
            .arg(format!("--tcp_port={}", self.tcp_port))
            .arg(format!("--interserver_http_port={}", self.interserver_port))
            .arg(format!("--path={d}/data/"))
            .arg(format!("--tmp_path={d}/tmp/"))
            .arg(format!("--user_files_path={d}/user_files/"))
            .arg(format!("--format_schema_path={d}/format_schemas/"))
            .arg(format!("--logger.log={d}/server.log"))
            .arg(format!("--logger.errorlog={d}/error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting clickhouse-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.query("SELECT 1").is_ok_and(|r| r.trim() == "1") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "clickhouse-server did not answer on port {}",
                    self.http_port
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills the server (SIGKILL: the worst case for what it had acknowledged).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs a query over HTTP and returns the body (TabSeparated).
    pub fn query(&self, sql: &str) -> Result<String> {
        http(self.http_port, "POST", "/", sql, Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("clickhouse: {e}"))
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal Postgres client: messages written by hand, for protocol corners no psql or
/// driver run reaches (pipelines, huge single writes).
pub mod raw {
    use std::{
        io::{Read, Write},
        net::TcpStream,
        time::Duration,
    };

    pub fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    pub fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
        let mut b = cstr(name);
        b.extend(cstr(sql));
        b.extend((types.len() as i16).to_be_bytes());
        for t in types {
            b.extend(t.to_be_bytes());
        }
        msg(b'P', &b)
    }

    /// Bind with one parameter in the given format (0 text, 1 binary).
    pub fn bind(portal: &str, stmt: &str, param: Option<(i16, &[u8])>) -> Vec<u8> {
        let mut b = cstr(portal);
        b.extend(cstr(stmt));
        match param {
            Some((format, value)) => {
                b.extend(1i16.to_be_bytes());
                b.extend(format.to_be_bytes());
                b.extend(1i16.to_be_bytes());
                b.extend((value.len() as i32).to_be_bytes());
                b.extend(value);
            }
            None => {
                b.extend(0i16.to_be_bytes());
                b.extend(0i16.to_be_bytes());
            }
        }
        b.extend(0i16.to_be_bytes());
        msg(b'B', &b)
    }

    pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
        let mut b = cstr(portal);
        b.extend(max_rows.to_be_bytes());
        msg(b'E', &b)
    }

    /// Reads messages until `ready` ReadyForQuery messages were seen; returns the tags.
    pub fn read_until_ready(s: &mut TcpStream, ready: usize) -> Vec<u8> {
        read_messages(s, ready)
            .into_iter()
            .map(|(t, _)| t)
            .collect()
    }

    /// Reads messages until `ready` ReadyForQuery messages were seen: (tag, body) of each.
    pub fn read_messages(s: &mut TcpStream, ready: usize) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut seen = 0;
        while seen < ready {
            let mut head = [0u8; 5];
            s.read_exact(&mut head).unwrap();
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut body = vec![0u8; len - 4];
            s.read_exact(&mut body).unwrap();
            if head[0] == b'Z' {
                seen += 1;
            }
            out.push((head[0], body));
        }
        out
    }

    /// Connects as postgres to database postgres, past authentication (trust).
    pub fn connect(port: u16, application_name: &str) -> TcpStream {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut startup = Vec::new();
        startup.extend(196_608u32.to_be_bytes());
        for (k, v) in [
            ("user", "postgres"),
            ("database", "postgres"),
            ("application_name", application_name),
        ] {
            startup.extend(cstr(k));
            startup.extend(cstr(v));
        }
        startup.push(0);
        let mut packet = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
        packet.extend(startup);
        s.write_all(&packet).unwrap();
        read_until_ready(&mut s, 1);
        s
    }
}

/// One HTTP/1.0 request to a server on loopback: the body of a 200 answer, else an error
/// with the answer.
pub fn http(port: u16, method: &str, path: &str, body: &str, timeout: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{}: {}", head.lines().next().unwrap_or(""), body.trim());
    }
    Ok(body.to_string())
}

/// Runs `cmd` to completion: whether it succeeded, its stdout and its stderr.
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("the command starts");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The fake Kubernetes API server (tests/helpers/fake_kube_api.py): pods listed and
/// watched in the real API's JSON shapes, on loopback, with a kubeconfig pointing at it.
pub struct FakeKubeApi {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

/// A pod as the API server shows it.
pub fn pod_json(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: &[(&str, &str)],
) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": format!("{name}-sa"),
                 "containers": [{"name": "main", "image": "example"}]},
        "status": {"phase": "Running"},
    })
}

/// A Secret as the API server shows it (values base64-encoded).
pub fn secret_json(namespace: &str, name: &str, data: &[(&str, &str)]) -> Value {
    use base64::Engine;
    let data: serde_json::Map<String, Value> = data
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::from(base64::engine::general_purpose::STANDARD.encode(v)),
            )
        })
        .collect();
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace,
                     "uid": format!("secret-{namespace}-{name}")},
        "type": "Opaque",
        "data": data,
    })
}

impl FakeKubeApi {
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("fake-kube-").tempdir()?;
        let port_file = dir.path().join("port");
        let child = Command::new(python3())
            .arg(workspace_root().join("tests/helpers/fake_kube_api.py"))
            .arg(&port_file)
            .stdout(Stdio::null())
            .spawn()
            .context("starting the fake Kubernetes API server")?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let port: u16 = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                break p.trim().parse()?;
            }
            if Instant::now() > deadline {
                bail!("the fake Kubernetes API server did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
                 users:\n- name: auditor\n  user:\n    token: not-a-secret\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: auditor\ncurrent-context: fake\n"
            ),
        )?;
        Ok(FakeKubeApi {
            child,
            port,
            _dir: dir,
            kubeconfig,
        })
    }

    fn request(&self, method: &str, path: &str, body: &str) -> Result<String> {
        http(self.port, method, path, body, Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("fake API server: {e}"))
    }

    /// Replaces every pod (the watch sees ADDED, MODIFIED and DELETED events).
    pub fn set_pods(&self, pods: &[Value]) -> Result<()> {
        self.request(
            "PUT",
            "/control/pods",
            &Value::from(pods.to_vec()).to_string(),
        )
        .map(|_| ())
    }

    /// Replaces every Secret (ADDED, MODIFIED and DELETED events).
    pub fn set_secrets(&self, secrets: &[Value]) -> Result<()> {
        self.request(
            "PUT",
            "/control/secrets",
            &Value::from(secrets.to_vec()).to_string(),
        )
        .map(|_| ())
    }

    /// Gives a pod new labels (a MODIFIED event).
    pub fn relabel(&self, namespace: &str, name: &str, labels: &[(&str, &str)]) -> Result<()> {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), Value::from(*v)))
            .collect();
        self.request(
            "POST",
            &format!("/control/pods/{namespace}/{name}"),
            &serde_json::json!({ "labels": labels }).to_string(),
        )
        .map(|_| ())
    }

    /// The API requests served so far (paths with their queries).
    pub fn requests(&self) -> Result<Vec<String>> {
        Ok(self
            .request("GET", "/control/requests", "")?
            .lines()
            .map(str::to_string)
            .collect())
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cgroup some levels deep (a pod's container, a systemd unit in its slice); the
/// directories it made are removed on drop, innermost first.
pub struct NestedCgroup {
    /// Directories made, outermost first.
    made: Vec<PathBuf>,
    pub cgroup: Cgroup,
}

impl NestedCgroup {
    /// A pod's container cgroup as the kubelet makes it, with the systemd cgroup driver
    /// (`kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
    /// cri-containerd-<id>.scope`) or the cgroupfs one (`kubepods/burstable/pod<uid>/<id>`).
    pub fn pod(pod_uid: &str, container_id: &str, systemd_driver: bool) -> Result<Self> {
        let tag = std::process::id();
        let parts: Vec<String> = if systemd_driver {
            vec![
                format!("kubepods{tag}.slice"),
                format!("kubepods{tag}-besteffort.slice"),
                format!(
                    "kubepods{tag}-besteffort-pod{}.slice",
                    pod_uid.replace('-', "_")
                ),
                format!("cri-containerd-{container_id}.scope"),
            ]
        } else {
            vec![
                format!("kubepods{tag}"),
                "burstable".into(),
                format!("pod{pod_uid}"),
                container_id.to_string(),
            ]
        };
        Self::new(&parts)
    }

    /// The cgroup `parts` (joined by `/`) under the cgroup v2 root.
    pub fn new(parts: &[String]) -> Result<Self> {
        let root = cgroup2_mount().context("no cgroup v2 mount")?;
        let mut made = Vec::new();
        let mut path = root.clone();
        for p in parts {
            path = path.join(p);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                made.push(path.clone());
            }
        }
        let name = format!("/{}", parts.join("/"));
        Ok(NestedCgroup {
            cgroup: Cgroup {
                path: path.clone(),
                name,
            },
            made,
        })
    }
}

impl Drop for NestedCgroup {
    fn drop(&mut self) {
        // The container's directory first (its processes have exited), then its parents.
        for dir in std::iter::once(&self.cgroup.path).chain(self.made.iter().rev().skip(1)) {
            for _ in 0..50 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Removes a test daemon's pinned redirect (`auditor detach`) when dropped, whatever
/// happened: enforcement outlives a daemon that stops with an enforce policy in force.
pub struct DetachOnDrop(String);

impl DetachOnDrop {
    pub fn new(pin_dir: &str) -> Self {
        DetachOnDrop(pin_dir.to_string())
    }
}

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        let Ok(dir) = tempfile::tempdir() else { return };
        let config = dir.path().join("c.yaml");
        if std::fs::write(&config, format!("proxy: {{pin_dir: {}}}\n", self.0)).is_ok() {
            let _ = Command::new(auditor_bin())
                .args(["detach", "--config"])
                .arg(&config)
                .stdout(Stdio::null())
                .status();
        }
    }
}
