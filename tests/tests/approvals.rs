//! Statements held for approval inside their live connection: psql and asyncpg, unchanged,
//! send statements a `require_approval` rule matches; the proxy holds them (Postgres's own
//! log shows they arrive only after approval), the test decides through `auditor
//! approvals` over the control socket, and the clients see the outcome: an approved
//! DROP TABLE runs (the table is gone), a denied one fails with 42501 and the session goes
//! on, one nobody decides fails when its rule's timeout passes, a requester's own approval
//! is refused (another user's is taken). Every step is in the audit trail, linked to the
//! statement's event by the request's id.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use auditor_tests::{can_run, check, run, statements_of, str_of, Cgroup, Daemon, Postgres};
use serde_json::Value;

const POLICY: &str = r#"
name: agents
selector:
  matchLabels:
    cgroup.path: CGROUP
mode: enforce
record: {raw_statements: true, raw_params: true}
require_approval:
  - name: short-fuse
    when: {pattern: "short_fuse"}
    timeout: 3s
  - name: ddl-review
    when: {ddl: true}
    timeout: 2m
  - name: deletes
    when: {commands: [DELETE]}
    timeout: 2m
"#;

/// The uid the clients (and the second approver) run as: nobody.
const NOBODY: u32 = 65534;

/// `cmd` run as `uid` (group nogroup) through setpriv, with its audit login uid set to
/// the same where the kernel lets root set it: a person of its own, whatever login the
/// test runs in. (Set up as root first: a cgroup entered with `Cgroup::enter` on the
/// returned command is entered before the switch.)
fn as_user(cmd: &Command, uid: u32) -> Command {
    let mut c = Command::new("setpriv");
    if uid != 0 {
        c.args([
            format!("--reuid={uid}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".to_string(),
        ]);
        // root's home is not theirs to read (drivers look for ~/.pgpass there).
        c.env("HOME", "/nonexistent");
    }
    c.arg("--").arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    // SAFETY: between fork and exec only a write to our own /proc file.
    unsafe {
        c.pre_exec(move || {
            let _ = std::fs::write("/proc/self/loginuid", uid.to_string());
            Ok(())
        });
    }
    c
}

struct Approvals {
    socket: PathBuf,
}

impl Approvals {
    fn cli(&self, uid: u32, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new(auditor_tests::auditor_bin());
        cmd.arg("approvals")
            .args(args)
            .arg("--socket")
            .arg(&self.socket);
        run(&mut as_user(&cmd, uid))
    }

    fn pending(&self) -> Vec<Value> {
        let (ok, out, err) = self.cli(0, &["list", "--json"]);
        assert!(ok, "approvals list: {out}{err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits for the pending request whose statement contains `needle`.
    fn wait_request(&self, needle: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = self
                .pending()
                .into_iter()
                .find(|r| r["statement"].as_str().unwrap_or("").contains(needle))
            {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no request for {needle:?}: {:?}",
                self.pending()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (bool, String, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A webhook receiver on loopback: the JSON bodies POSTed to it.
struct Hook {
    port: u16,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

impl Hook {
    fn start() -> Hook {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = bodies.clone();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let l = line.trim_end().to_ascii_lowercase();
                    if l.is_empty() {
                        break;
                    }
                    if let Some(v) = l.strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_ok() {
                    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                        b.lock().unwrap().push(v);
                    }
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                );
            }
        });
        Hook { port, bodies }
    }

    /// The body announcing request `id`.
    fn wait_for(&self, id: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = self
                .bodies
                .lock()
                .unwrap()
                .iter()
                .find(|v| v["auditor"]["id"] == id)
            {
                return v.clone();
            }
            assert!(
                Instant::now() < deadline,
                "the webhook was not told of {id}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn server_saw(pg: &Postgres, needle: &str) -> bool {
    std::fs::read_to_string(pg.log_path())
        .unwrap()
        .contains(needle)
}

fn table_exists(pg: &Postgres, name: &str) -> bool {
    let out = check(pg.psql().args([
        "-At",
        "-c",
        &format!("SELECT to_regclass('{name}') IS NOT NULL"),
    ]))
    .unwrap();
    out.trim() == "t"
}

#[test]
fn held_statements_wait_for_a_person() {
    if !can_run("held_statements_wait_for_a_person") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    check(pg.psql().args([
        "-c",
        "CREATE TABLE doomed (a int); CREATE TABLE kept (a int); CREATE TABLE mine (a int); \
         CREATE TABLE accounts (id int PRIMARY KEY, note text); \
         INSERT INTO accounts VALUES (1, 'a'), (2, 'b'), (3, 'c'); \
         GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC",
    ]))
    .unwrap();
    let agent = Cgroup::new("held").unwrap();
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("agents.yaml"),
        POLICY.replace("CGROUP", &agent.name),
    )
    .unwrap();
    let proxy_port = auditor_tests::free_port();
    let pin_dir = format!("/sys/fs/bpf/auditor-test-{}", std::process::id());
    // Outside the (private) state directory, open to group nogroup: the second approver
    // is user nobody.
    let socket = PathBuf::from(format!(
        "/tmp/auditor-approvals-{}.sock",
        std::process::id()
    ));
    let hook = Hook::start();
    let config = format!(
        "policies_dir: {}\nproxy: {{port: {proxy_port}, pin_dir: {pin_dir}}}\n\
         approvals: {{socket: {}, socket_group: nogroup, \
         webhook: {{url: \"http://127.0.0.1:{}/hook\"}}}}\n",
        policies.path().display(),
        socket.display(),
        hook.port
    );
    let _detach = auditor_tests::DetachOnDrop::new(&pin_dir);
    let mut daemon = Daemon::start(pg.port, &config).unwrap();
    let approvals = Approvals {
        socket: socket.clone(),
    };
    let psql_as = |uid: u32, sql: &[&str]| {
        let mut cmd = pg.psql();
        cmd.arg("-At").env("PGAPPNAME", "held_psql");
        for s in sql {
            cmd.args(["-c", s]);
        }
        let mut cmd = as_user(&cmd, uid);
        agent.enter(&mut cmd);
        spawn(&mut cmd)
    };

    // No daemon on a socket: a clear error.
    let (ok, _, err) = run(Command::new(auditor_tests::auditor_bin()).args([
        "approvals",
        "list",
        "--socket",
        "/tmp/no-such-auditor.sock",
    ]));
    assert!(!ok && err.contains("the daemon is not running"), "{err}");

    // 1. Approved: the DROP reaches the server only then, and runs. It waits inside a
    // transaction whose idle_in_transaction_session_timeout (2 s) is shorter than the
    // wait: the proxy's keepalives hold it off.
    let client = psql_as(
        NOBODY,
        &[
            "BEGIN",
            "SET LOCAL idle_in_transaction_session_timeout = '2s'",
            "DROP TABLE doomed",
            "COMMIT",
            "SELECT 'after-drop'",
        ],
    );
    let r = approvals.wait_request("DROP TABLE doomed");
    assert_eq!(r["rule"], "ddl-review");
    assert_eq!(r["requester"]["uid"], NOBODY);
    assert_eq!(r["requester"]["db_user"], "postgres");
    assert_eq!(r["requester"]["application_name"], "held_psql");
    assert_eq!(r["requester"]["comm"], "psql");
    std::thread::sleep(Duration::from_millis(3500));
    assert!(
        !server_saw(&pg, "DROP TABLE doomed"),
        "the server saw a held statement"
    );
    assert!(table_exists(&pg, "doomed"));
    let id = r["id"].as_str().unwrap().to_string();
    // Announced to the webhook, Slack-style, with the request.
    let posted = hook.wait_for(&id);
    assert!(
        posted["text"]
            .as_str()
            .unwrap()
            .contains("DROP TABLE doomed"),
        "{posted}"
    );
    assert_eq!(posted["auditor"]["rule"], "ddl-review");
    assert_eq!(posted["auditor"]["requester"]["comm"], "psql");
    let (ok, out, err) = approvals.cli(0, &["show", &id[..6]]);
    assert!(
        ok && out.contains("DROP TABLE doomed") && out.contains("ddl-review"),
        "{out}{err}"
    );
    let (ok, out, err) = approvals.cli(0, &["approve", &id, "--reason", "planned"]);
    assert!(ok, "approve: {out}{err}");
    assert!(out.contains(&format!("approved {id}")), "{out}");
    let (ok, out, err) = finish(client);
    assert!(ok, "{out}{err}");
    assert!(out.contains("after-drop"), "{out}{err}");
    assert!(
        err.contains("waits for approval") && err.contains(&id),
        "{err}"
    );
    assert!(err.contains("approved by root"), "{err}");
    assert!(server_saw(&pg, "DROP TABLE doomed"));
    assert!(!table_exists(&pg, "doomed"));
    // Decided: a second decision is refused.
    let (ok, _, err) = approvals.cli(0, &["deny", &id]);
    assert!(!ok && err.contains("approved already"), "{err}");

    // 2. Denied: 42501 with the reason, and the session goes on.
    let client = psql_as(NOBODY, &["DROP TABLE kept", "SELECT 'still-here'"]);
    let r = approvals.wait_request("DROP TABLE kept");
    let denied_id = r["id"].as_str().unwrap().to_string();
    let (ok, out, err) = approvals.cli(
        0,
        &["deny", &denied_id, "--reason", "not during business hours"],
    );
    assert!(ok, "deny: {out}{err}");
    let (_, out, err) = finish(client);
    assert!(out.contains("still-here"), "{out}{err}");
    assert!(
        err.contains(&format!(
            "ERROR:  statement denied by root (request {denied_id}"
        )),
        "{err}"
    );
    assert!(err.contains("DETAIL:  not during business hours"), "{err}");
    assert!(!server_saw(&pg, "DROP TABLE kept"));
    assert!(table_exists(&pg, "kept"));

    // 3. Nobody decides: refused when the rule's timeout passes; the session goes on.
    let started = Instant::now();
    let client = psql_as(
        NOBODY,
        &["CREATE TABLE short_fuse (a int)", "SELECT 'after-timeout'"],
    );
    let (_, out, err) = finish(client);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(out.contains("after-timeout"), "{out}{err}");
    assert!(err.contains("not approved: no decision within 3s"), "{err}");
    assert!(!table_exists(&pg, "short_fuse"));
    assert!(!server_saw(&pg, "CREATE TABLE short_fuse"));

    // 3b. The client gives up (psql's Ctrl-C sends a CancelRequest on a connection of its
    // own): the request is withdrawn, the client gets Postgres's cancellation error.
    let client = psql_as(NOBODY, &["ALTER TABLE kept ADD COLUMN c int"]);
    let r = approvals.wait_request("ALTER TABLE kept");
    let canceled_id = r["id"].as_str().unwrap().to_string();
    check(Command::new("kill").args(["-INT", &client.id().to_string()])).unwrap();
    let (_, _, err) = finish(client);
    assert!(
        err.contains("canceling statement due to user request"),
        "{err}"
    );
    assert!(err.contains(&canceled_id), "{err}");
    assert!(!server_saw(&pg, "ALTER TABLE kept"));
    let (ok, _, err) = approvals.cli(0, &["approve", &canceled_id]);
    assert!(!ok && err.contains("canceled already"), "{err}");

    // 3c. The client goes away while its statement waits: the request is withdrawn, and
    // nothing of it ever runs.
    let mut client = psql_as(NOBODY, &["DROP TABLE kept"]);
    let r = approvals.wait_request("DROP TABLE kept");
    let gone_id = r["id"].as_str().unwrap().to_string();
    client.kill().unwrap();
    let _ = client.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while approvals
        .pending()
        .iter()
        .any(|p| p["id"] == gone_id.as_str())
    {
        assert!(Instant::now() < deadline, "{gone_id} still pending");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = approvals.cli(0, &["approve", &gone_id]);
    assert!(!ok && err.contains("withdrawn already"), "{err}");
    assert!(table_exists(&pg, "kept"));

    // 4. A requester never approves their own request (root sent it, root approves);
    // another user may (nobody, through the socket's group).
    let client = psql_as(0, &["DROP TABLE mine"]);
    let r = approvals.wait_request("DROP TABLE mine");
    let own_id = r["id"].as_str().unwrap().to_string();
    let (ok, _, err) = approvals.cli(0, &["approve", &own_id]);
    assert!(
        !ok && err.contains("never approves their own request"),
        "{err}"
    );
    assert!(table_exists(&pg, "mine"));
    let (ok, out, err) = approvals.cli(NOBODY, &["approve", &own_id]);
    assert!(ok, "nobody's approval: {out}{err}");
    let (ok, out, err) = finish(client);
    assert!(ok, "{out}{err}");
    assert!(!table_exists(&pg, "mine"));

    // 4b. Grants: a window in which the rule's statements of a workload pass without a
    // request, each recorded with the grant; revoked, the next is held again. A grant from
    // a request approves it and lets the workload's next ones through until it expires.
    let label = format!("cgroup.path={}", agent.name);
    let (ok, out, err) = approvals.cli(
        0,
        &[
            "grant",
            "--rule",
            "agents/ddl-review",
            "--label",
            &label,
            "--for",
            "10m",
            "--reason",
            "migration",
        ],
    );
    assert!(ok, "grant: {out}{err}");
    let grant_id = grant_id_of(&out);
    let client = psql_as(
        NOBODY,
        &[
            "CREATE TABLE g1 (a int)",
            "CREATE TABLE g2 (a int)",
            "ALTER TABLE g1 ADD b int",
        ],
    );
    let (ok, out, err) = finish(client);
    assert!(ok && !err.contains("waits for approval"), "{out}{err}");
    assert!(table_exists(&pg, "g1") && table_exists(&pg, "g2"));
    let (ok, out, _) = approvals.cli(0, &["grants", "--json"]);
    assert!(ok);
    let g: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        (g["id"].as_str(), g["uses"].as_u64()),
        (Some(grant_id.as_str()), Some(3)),
        "{g}"
    );
    let (ok, out, err) = approvals.cli(0, &["revoke", &grant_id]);
    assert!(ok && out.contains("3 statements passed"), "{out}{err}");
    let client = psql_as(NOBODY, &["DROP TABLE g2", "DROP TABLE g1"]);
    let r = approvals.wait_request("DROP TABLE g2");
    let (ok, out, err) = approvals.cli(0, &["grant", r["id"].as_str().unwrap(), "--for", "4s"]);
    assert!(ok && out.contains("granted g"), "{out}{err}");
    let (ok, out, err) = finish(client);
    assert!(ok, "{out}{err}");
    assert_eq!(err.matches("waits for approval").count(), 1, "{err}");
    assert!(!table_exists(&pg, "g1") && !table_exists(&pg, "g2"));
    // Expired: held again.
    std::thread::sleep(Duration::from_secs(5));
    let client = psql_as(NOBODY, &["CREATE TABLE g3 (a int)"]);
    let r = approvals.wait_request("CREATE TABLE g3");
    let (ok, out, err) = approvals.cli(0, &["deny", r["id"].as_str().unwrap()]);
    assert!(ok, "{out}{err}");
    finish(client);
    assert!(!table_exists(&pg, "g3"));

    // 5. asyncpg (extended protocol, held at the Bind with its values) in transactions.
    let mut cmd = Command::new(auditor_tests::python3());
    cmd.arg(auditor_tests::workspace_root().join("tests/helpers/drivers/asyncpg_hold.py"))
        .arg(pg.port.to_string());
    let mut cmd = as_user(&cmd, NOBODY);
    agent.enter(&mut cmd);
    let mut client = spawn(&mut cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        if let Some(r) = approvals.pending().into_iter().find(|r| {
            r["statement"]
                .as_str()
                .unwrap_or("")
                .contains("DELETE FROM accounts")
        }) {
            break r;
        }
        if client.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let _ = client.kill();
            let (_, out, err) = finish(client);
            panic!("asyncpg's DELETE was not held: {out}{err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r["params"], serde_json::json!(["1"]), "{r}");
    // The webhook says how many bind values, never which.
    let posted = hook.wait_for(r["id"].as_str().unwrap());
    assert_eq!(posted["auditor"]["params"], 1, "{posted}");
    let (ok, out, err) = approvals.cli(0, &["approve", r["id"].as_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let r2 = loop {
        let p = approvals.pending();
        if let Some(r2) = p
            .into_iter()
            .find(|x| x["params"] == serde_json::json!(["2"]))
        {
            break r2;
        }
        assert!(Instant::now() < deadline, "no second request");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (ok, out, err) = approvals.cli(0, &["deny", r2["id"].as_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = finish(client);
    assert!(ok, "{out}{err}");
    assert!(out.contains("approved DELETE 1"), "{out}");
    assert!(
        out.contains("denied 42501 statement denied by root"),
        "{out}"
    );
    assert!(out.contains("after 2 touched"), "{out}");
    assert!(out.contains("waits for approval"), "{out}");
    assert!(out.ends_with("done\n"), "{out}");

    // 5b. psycopg's pipeline: the DELETE held at its Bind, the query behind it waits
    // with it and runs after, in order.
    let mut cmd = Command::new(auditor_tests::python3());
    cmd.arg(auditor_tests::workspace_root().join("tests/helpers/drivers/psycopg_hold.py"))
        .arg(pg.port.to_string());
    let mut cmd = as_user(&cmd, NOBODY);
    agent.enter(&mut cmd);
    let client = spawn(&mut cmd);
    let r = approvals.wait_request("DELETE FROM accounts");
    assert_eq!(r["params"], serde_json::json!(["3"]), "{r}");
    let (ok, out, err) = approvals.cli(0, &["approve", r["id"].as_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = finish(client);
    assert!(ok, "{out}{err}");
    assert!(out.contains("pipeline before 1 1\n"), "{out}");

    // Nothing waits now; the history has them all.
    assert!(approvals.pending().is_empty());
    let (ok, out, _) = approvals.cli(0, &["list", "--all"]);
    assert!(
        ok && out.contains("expired") && out.contains("denied"),
        "{out}"
    );

    // The trail: each request's events, linked to its statement by id.
    // The daemon's counters (`auditor stats`, the Prometheus metrics) count every hold.
    let stats = daemon.wait_for_stats(Duration::from_secs(5), |s| {
        s["proxy"]["held"] == 11 && s["proxy"]["pending_approvals"] == 0
    });
    assert_eq!(stats["proxy"]["held"], 11, "{stats:#}");
    assert_eq!(stats["proxy"]["pending_approvals"], 0, "{stats:#}");
    daemon.wait_sessions_ended(&agent.name);
    daemon.stop().unwrap();
    let events = daemon.events().unwrap();
    let of_request = |id: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| str_of(e, "approval_id") == id)
            .collect()
    };
    let kinds = |id: &str| -> Vec<String> {
        of_request(id)
            .iter()
            .map(|e| str_of(e, "kind").to_string())
            .collect()
    };
    assert_eq!(
        kinds(&id),
        ["approval_requested", "approval_granted", "statement"],
        "{:#?}",
        of_request(&id)
    );
    let granted = of_request(&id)[1];
    assert_eq!(str_of(granted, "approver"), "root");
    assert_eq!(str_of(granted, "decision_rule"), "agents/ddl-review");
    let st = of_request(&id)[2];
    assert_eq!(str_of(st, "decision"), "approved");
    assert_eq!(str_of(st, "statement"), "DROP TABLE doomed");
    assert_eq!(str_of(st, "error_code"), "");
    assert_eq!(st["uid"], NOBODY);
    // The requested event has the session's identity.
    let requested = of_request(&id)[0];
    assert_eq!(str_of(requested, "session_id"), str_of(st, "session_id"));
    assert_eq!(str_of(requested, "comm"), "psql");
    assert_eq!(
        kinds(&denied_id),
        ["approval_requested", "approval_denied", "statement"]
    );
    let st = of_request(&denied_id)[2];
    assert_eq!(str_of(st, "decision"), "denied");
    assert_eq!(str_of(st, "error_code"), "42501");
    let expired: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "kind") == "approval_expired")
        .collect();
    assert_eq!(expired.len(), 1, "{expired:#?}");
    let exp_id = str_of(expired[0], "approval_id");
    assert_eq!(str_of(of_request(exp_id)[2], "decision"), "expired");
    assert_eq!(
        kinds(&canceled_id),
        ["approval_requested", "approval_withdrawn", "statement"]
    );
    assert_eq!(str_of(of_request(&canceled_id)[2], "decision"), "canceled");
    assert_eq!(
        kinds(&gone_id),
        ["approval_requested", "approval_withdrawn", "statement"]
    );
    assert_eq!(str_of(of_request(&gone_id)[2], "decision"), "withdrawn");
    assert_eq!(kinds(&own_id)[1], "approval_granted");
    assert_eq!(str_of(of_request(&own_id)[1], "approver"), "nobody");
    // asyncpg's DELETEs: approved with its value, then denied.
    let deletes: Vec<&Value> = statements_of(&events, &agent.name)
        .into_iter()
        .filter(|e| str_of(e, "statement").starts_with("DELETE FROM accounts"))
        .collect();
    let decisions: Vec<&str> = deletes.iter().map(|e| str_of(e, "decision")).collect();
    assert_eq!(
        decisions,
        ["approved", "denied", "approved"],
        "{deletes:#?}"
    );
    assert!(deletes.iter().all(|e| !str_of(e, "approval_id").is_empty()));
    // Grants: opened, revoked, expired; the statements they let through name them.
    let grant_kinds: Vec<&str> = events
        .iter()
        .map(|e| str_of(e, "kind"))
        .filter(|k| k.starts_with("grant_"))
        .collect();
    assert_eq!(
        grant_kinds,
        [
            "grant_created",
            "grant_revoked",
            "grant_created",
            "grant_expired"
        ],
        "{grant_kinds:?}"
    );
    let granted: Vec<&Value> = statements_of(&events, &agent.name)
        .into_iter()
        .filter(|e| str_of(e, "decision") == "granted")
        .collect();
    assert_eq!(granted.len(), 4, "{granted:#?}");
    assert!(granted[..3]
        .iter()
        .all(|e| str_of(e, "approval_id") == grant_id));
    assert!(granted.iter().all(|e| str_of(e, "approver") == "root"));
    assert_eq!(str_of(granted[3], "statement"), "DROP TABLE g1");
    // Held statements are recorded once each.
    auditor_tests::assert_no_duplicates(&events);
    let _ = std::fs::remove_file(Path::new(&socket));
}

/// Two nodes (two daemons, two state directories, each enforcing its own workload) and one
/// shared store: a statement held on one node is listed and approved from the other, and
/// runs; with the store gone, a held statement is refused at its timeout saying so, and a
/// decision asked meanwhile is an error, never a local approval.
#[test]
fn two_nodes_decide_through_one_store() {
    if !can_run("two_nodes_decide_through_one_store") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    check(pg.psql().args([
        "-c",
        "CREATE TABLE shared_doomed (a int); GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC",
    ]))
    .unwrap();
    // The store: a database of its own, on a port no daemon watches.
    let store = Postgres::start(&[]).unwrap();
    let url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        store.port
    );
    let mut nodes = Vec::new();
    let mut keep = Vec::new();
    for name in ["node-a", "node-b"] {
        let cgroup = Cgroup::new(&format!("store-{name}")).unwrap();
        let policies = tempfile::tempdir().unwrap();
        std::fs::write(
            policies.path().join("agents.yaml"),
            POLICY.replace("CGROUP", &cgroup.name),
        )
        .unwrap();
        let proxy_port = auditor_tests::free_port();
        let pin_dir = format!("/sys/fs/bpf/auditor-test-{name}-{}", std::process::id());
        let socket = PathBuf::from(format!(
            "/tmp/auditor-approvals-{name}-{}.sock",
            std::process::id()
        ));
        let config = format!(
            "host: {name}\npolicies_dir: {}\nproxy: {{port: {proxy_port}, pin_dir: {pin_dir}}}\n\
             approvals: {{socket: {}, store: {{url: \"{url}\"}}}}\n",
            policies.path().display(),
            socket.display()
        );
        keep.push((auditor_tests::DetachOnDrop::new(&pin_dir), policies));
        let daemon = Daemon::start(pg.port, &config).unwrap();
        nodes.push((daemon, cgroup, Approvals { socket }));
    }
    let psql_on = |node: usize, sql: &[&str]| {
        let mut cmd = pg.psql();
        cmd.arg("-At").env("PGAPPNAME", "store_psql");
        for s in sql {
            cmd.args(["-c", s]);
        }
        let mut cmd = as_user(&cmd, NOBODY);
        nodes[node].1.enter(&mut cmd);
        spawn(&mut cmd)
    };

    // Held on node A, seen and approved from node B.
    let client = psql_on(0, &["DROP TABLE shared_doomed", "SELECT 'after-shared'"]);
    let on_b = nodes[1].2.wait_request("DROP TABLE shared_doomed");
    assert_eq!(on_b["host"], "node-a");
    let id = on_b["id"].as_str().unwrap().to_string();
    let on_a = nodes[0].2.wait_request("DROP TABLE shared_doomed");
    assert_eq!(on_a["id"], on_b["id"]);
    assert!(!server_saw(&pg, "DROP TABLE shared_doomed"));
    let (ok, out, err) = nodes[1]
        .2
        .cli(0, &["approve", &id, "--reason", "from node b"]);
    assert!(ok, "approve on node B: {out}{err}");
    let (ok, out, err) = finish(client);
    assert!(ok && out.contains("after-shared"), "{out}{err}");
    assert!(err.contains("approved by root"), "{err}");
    assert!(!table_exists(&pg, "shared_doomed"));
    // Node A's trail has the decision made on node B.
    let events = nodes[0].0.wait_sessions_ended(&nodes[0].1.name);
    let stmt = events
        .iter()
        .find(|e| {
            str_of(e, "kind") == "statement"
                && str_of(e, "statement").contains("DROP TABLE shared_doomed")
        })
        .expect("the DROP in node A's trail");
    assert_eq!(str_of(stmt, "approval_id"), id);
    assert_eq!(str_of(stmt, "decision"), "approved");
    let row = check(store.psql().args([
        "-At",
        "-c",
        &format!("SELECT node, state, decided_by, delivered FROM auditor_approvals.requests WHERE id = '{id}'"),
    ]))
    .unwrap();
    assert_eq!(row.trim(), "node-a|approved|root|t");

    // A grant made on node B lets node A's workload through; revoked on node B, node A
    // holds the next statement again.
    let workload = format!("cgroup:{}", nodes[0].1.name);
    let (ok, out, err) = nodes[1].2.cli(
        0,
        &[
            "grant",
            "--rule",
            "agents/ddl-review",
            "--workload",
            &workload,
            "--for",
            "10m",
        ],
    );
    assert!(ok, "grant on node B: {out}{err}");
    let grant_id = grant_id_of(&out);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, _) = nodes[0].2.cli(0, &["grants", "--json"]);
        if ok && out.contains(&grant_id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node A never saw the grant: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, out, err) = finish(psql_on(0, &["CREATE TABLE granted_on_b (a int)"]));
    assert!(ok && !err.contains("waits for approval"), "{out}{err}");
    assert!(table_exists(&pg, "granted_on_b"));
    let (ok, out, err) = nodes[1].2.cli(0, &["revoke", &grant_id]);
    assert!(ok, "revoke on node B: {out}{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = nodes[0].2.cli(0, &["grants", "--json"]);
        if !out.contains(&grant_id) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node A kept the revoked grant: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let client = psql_on(0, &["DROP TABLE granted_on_b"]);
    let r = nodes[1].2.wait_request("DROP TABLE granted_on_b");
    let (ok, out, err) = nodes[1].2.cli(0, &["deny", r["id"].as_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let (_, _, err) = finish(client);
    assert!(err.contains("statement denied by root"), "{err}");
    assert!(table_exists(&pg, "granted_on_b"));

    // The store goes away: fail closed.
    drop(store);
    let started = Instant::now();
    let client = psql_on(
        0,
        &[
            "CREATE TABLE short_fuse (a int)",
            "SELECT 'after-store-gone'",
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, _, err) = nodes[1].2.cli(0, &["list"]);
    assert!(
        !ok && err.contains("approvals store"),
        "list with the store gone: {err}"
    );
    let (_, out, err) = finish(client);
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(out.contains("after-store-gone"), "{out}{err}");
    assert!(
        err.contains("statement not approved: no decision within 3s")
            && err.contains("approvals store")
            && !server_saw(&pg, "CREATE TABLE short_fuse"),
        "{err}"
    );
    // A decision asked of it is an error.
    let (ok, _, err) = nodes[1].2.cli(0, &["approve", "abcdef1234"]);
    assert!(!ok && err.contains("approvals store"), "{err}");
    // The grant's events are node B's, once each; node A applied it silently.
    let mut grant_events = Vec::new();
    for (mut daemon, _, _) in nodes {
        daemon.stop().unwrap();
        let events = daemon.events().unwrap();
        grant_events.push(
            events
                .iter()
                .filter(|e| str_of(e, "kind").starts_with("grant_"))
                .map(|e| str_of(e, "kind").to_string())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        grant_events,
        vec![
            vec![],
            vec!["grant_created".to_string(), "grant_revoked".to_string()]
        ]
    );
}

/// The grant's id in what `auditor approvals grant` printed ("grant gXXXX: ...").
fn grant_id_of(out: &str) -> String {
    let id = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .trim_end_matches(':')
        .to_string();
    assert!(id.starts_with('g'), "{out}");
    id
}
