//! Client drivers other than libpq's tools, each with its own protocol implementation and
//! habits: asyncpg (Parse/Describe/Sync before executing, binary formats, pipelined
//! executemany), psycopg 3 (pipeline mode with an error mid-batch), pgjdbc (batches, the
//! switch to named statements after prepareThreshold) and node-postgres. The same workload
//! for each (tests/helpers/drivers/): what the server logged is what the auditor recorded,
//! every event names the driver's own process, a failed statement keeps its text and
//! SQLSTATE, statements the server skipped are not recorded, and the marker the workload
//! puts in parameters and rows never reaches the log.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use auditor_tests::{can_run, python3, str_of, workspace_root, Cgroup, Daemon, Netns, Postgres};

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
use serde_json::Value;

fn helper(name: &str) -> PathBuf {
    workspace_root().join("tests/helpers/drivers").join(name)
}

/// Where `cargo xtask setup --tests` installs node-postgres (npm's `pg`).
fn node_modules() -> PathBuf {
    workspace_root().join("target/test-deps/node_modules")
}

/// Runs `client` (which gets PORT APP SECRET as its last arguments) against a fresh
/// Postgres under a fresh daemon and checks the trail against the server's own log.
/// `skipped` is a statement the workload makes the server skip (never executed).
fn check_driver(test: &str, app: &str, client: Command, skipped: Option<&str>) {
    check_driver_as(test, app, client, skipped, Via::Capture)
}

/// How the driver reaches the server.
#[derive(Clone, Copy, PartialEq)]
enum Via {
    /// Directly, captured.
    Capture,
    /// Through the redirect and the inline proxy: the driver's cgroup is under an
    /// `enforce` policy (whose rule this workload never breaks). `tls`: the server has TLS,
    /// the proxy a certificate, and the driver requires TLS (AUDITOR_TEST_SSL=require).
    /// `netns`: the server and the driver are in a network namespace of the test's own.
    Proxy { tls: bool, netns: bool },
}

/// `cmd`, run inside network namespace `ns` instead.
fn inside(ns: &Netns, cmd: &Command) -> Command {
    let mut c = ns.command(cmd.get_program().to_str().unwrap());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// Through the proxy, the same checks hold, every event saying `capture = proxy`.
fn check_driver_as(test: &str, app: &str, client: Command, skipped: Option<&str>, via: Via) {
    if !can_run(test) {
        return;
    }
    let enforced = via != Via::Capture;
    let (tls, netns) = match via {
        Via::Proxy { tls, netns } => (tls, netns),
        Via::Capture => (false, false),
    };
    let ns = netns.then(|| Netns::new("drv").unwrap());
    let pg = match &ns {
        Some(ns) => Postgres::start_in_netns(ns, auditor_tests::free_port()).unwrap(),
        None if tls => Postgres::start_tls(&[]).unwrap(),
        None => Postgres::start(&[]).unwrap(),
    };
    let mut client = match &ns {
        Some(ns) => inside(ns, &client),
        None => client,
    };
    if tls {
        client.env("AUDITOR_TEST_SSL", "require");
    }
    let cg = Cgroup::new(app).unwrap();
    let policies = tempfile::tempdir().unwrap();
    let pin_dir = format!("/sys/fs/bpf/auditor-test-{app}-{}", std::process::id());
    let config = if enforced {
        std::fs::write(
            policies.path().join("p.yaml"),
            format!(
                "name: drivers\nselector: {{matchLabels: {{cgroup.path: {}}}}}\nmode: enforce\n\
                 block:\n  - name: no-server-files\n    when: {{functions: [pg_read_file]}}\n",
                cg.name
            ),
        )
        .unwrap();
        let tls_config = if tls {
            let (cert, key) = pg.cert_and_key();
            format!(
                ", tls: {{cert: {}, key: {}}}",
                cert.display(),
                key.display()
            )
        } else {
            String::new()
        };
        format!(
            "policies_dir: {}\nproxy: {{port: {}, pin_dir: {pin_dir}{tls_config}}}\n",
            policies.path().display(),
            auditor_tests::free_port()
        )
    } else {
        String::new()
    };
    let _detach = enforced.then(|| auditor_tests::DetachOnDrop::new(&pin_dir));
    let mut daemon = Daemon::start(pg.port, &config).unwrap();
    // In a namespace of its own, the workload's sandbox comes first (as a pod's), so that
    // the daemon listens there before the driver connects.
    let _sandbox = ns.as_ref().map(|ns| {
        let mut sleep = ns.command("sleep");
        sleep.arg("600");
        cg.enter(&mut sleep);
        let sandbox = KillOnDrop(sleep.spawn().unwrap());
        let stats =
            daemon.wait_for_stats(Duration::from_secs(10), |s| s["proxy"]["namespaces"] == 1);
        assert_eq!(stats["proxy"]["namespaces"], 1, "{stats:#}");
        sandbox
    });
    let secret = format!("drvsecret{}x{}", std::process::id(), pg.port);
    client
        .args([&pg.port.to_string(), app, &secret])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cg.enter(&mut client);
    let child = client.spawn().unwrap_or_else(|e| panic!("{app}: {e}"));
    let pid = child.id() as u64;
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("done"),
        "{app} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    daemon
        .wait_for(Duration::from_secs(10), |evs| {
            evs.iter()
                .any(|e| str_of(e, "kind") == "session_end" && str_of(e, "application_name") == app)
        })
        .unwrap();
    let events = daemon.stop_without_gaps();

    // The driver's connection (some set application_name with a statement of their own,
    // after the first events).
    let session = events
        .iter()
        .find(|e| str_of(e, "application_name") == app)
        .map(|e| str_of(e, "session_id"))
        .unwrap_or_else(|| panic!("{app}: nothing recorded"));
    let mine: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "session_id") == session)
        .collect();
    let statements: Vec<&Value> = mine
        .iter()
        .copied()
        .filter(|e| str_of(e, "kind") == "statement")
        .collect();
    for e in &mine {
        assert_eq!(
            e["pid"].as_u64(),
            Some(pid),
            "{app}: not the driver's process: {e}"
        );
        assert_eq!(str_of(e, "cgroup_path"), cg.name, "{e}");
        assert_eq!(
            str_of(e, "capture"),
            if enforced { "proxy" } else { "ebpf" },
            "{e}"
        );
        let flags: Vec<&str> = e["flags"]
            .as_array()
            .map(|f| f.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        // (asyncpg's fetchval and fetchrow ask for one row and leave the portal there.)
        assert!(
            flags
                .iter()
                .all(|f| *f == "failed_before_execute" || *f == "portal_suspended"),
            "{app}: {e}"
        );
    }
    let other: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "session_id") != session && str_of(e, "kind") == "statement")
        .collect();
    assert!(
        other.is_empty(),
        "{app}: statements of no client: {other:#?}"
    );
    let backend = statements
        .first()
        .and_then(|e| e["server_pid"].as_u64())
        .unwrap_or_else(|| panic!("{app}: no backend pid"));

    // The server logs a statement when it executes it (log_statement = all); one that
    // fails while being prepared never executes, and is recorded with its error.
    let failed_early = statements
        .iter()
        .filter(|e| {
            e["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|v| v == "failed_before_execute"))
        })
        .count();
    let executed = pg.logged_statements_of_backend(backend).unwrap();
    assert!(executed >= 70, "{app}: server logged {executed}");
    if statements.len() != executed + failed_early {
        let recorded: Vec<String> = statements
            .iter()
            .map(|e| format!("{} [{}]", str_of(e, "statement"), str_of(e, "error_code")))
            .collect();
        let log = std::fs::read_to_string(pg.log_path()).unwrap_or_default();
        panic!(
            "{app}: recorded {} statements, the server executed {executed} ({failed_early} \
             failed before executing)\nrecorded:\n{}\nserver log:\n{log}",
            statements.len(),
            recorded.join("\n"),
        );
    }

    // The failed statement: its text, its SQLSTATE.
    let failed: Vec<&&Value> = statements
        .iter()
        .filter(|e| str_of(e, "error_code") == "42P01")
        .collect();
    assert_eq!(failed.len(), 1, "{app}: {failed:#?}");
    assert!(
        str_of(failed[0], "statement").contains("drv_missing_table"),
        "{app}: the failed statement's text: {}",
        failed[0]
    );
    assert!(str_of(failed[0], "error_message").contains("drv_missing_table"));
    if let Some(skipped) = skipped {
        assert!(
            statements
                .iter()
                .all(|e| !str_of(e, "statement").contains(skipped)),
            "{app}: a statement the server skipped was recorded"
        );
    }
    // The large result: every row counted.
    assert!(
        statements
            .iter()
            .any(|e| str_of(e, "statement").contains("generate_series") && e["rows"] == 2000),
        "{app}: the 2000-row result"
    );
    // Parameters are redacted by default: the marker never lands in the log.
    let raw = auditor_tests::raw_log(&daemon.log_dir());
    assert!(!raw.is_empty());
    assert!(
        !auditor_tests::contains_bytes(&raw, &secret),
        "{app}: a parameter value reached the log"
    );
}

#[test]
fn asyncpg() {
    let mut cmd = Command::new(python3());
    cmd.arg(helper("asyncpg_client.py"));
    check_driver("asyncpg", "drv_asyncpg", cmd, None);
}

#[test]
fn asyncpg_through_the_proxy() {
    let mut cmd = Command::new(python3());
    cmd.arg(helper("asyncpg_client.py"));
    check_driver_as(
        "asyncpg_through_the_proxy",
        "drv_asyncpg_enf",
        cmd,
        None,
        Via::Proxy {
            tls: false,
            netns: false,
        },
    );
}

#[test]
fn asyncpg_through_the_proxy_over_tls() {
    let mut cmd = Command::new(python3());
    cmd.arg(helper("asyncpg_client.py"));
    check_driver_as(
        "asyncpg_through_the_proxy_over_tls",
        "drv_asyncpg_tls",
        cmd,
        None,
        Via::Proxy {
            tls: true,
            netns: false,
        },
    );
}

#[test]
fn asyncpg_through_the_proxy_in_a_namespace() {
    let mut cmd = Command::new(python3());
    cmd.arg(helper("asyncpg_client.py"));
    check_driver_as(
        "asyncpg_through_the_proxy_in_a_namespace",
        "drv_asyncpg_ns",
        cmd,
        None,
        Via::Proxy {
            tls: false,
            netns: true,
        },
    );
}

#[test]
fn psycopg3_pipeline() {
    let mut cmd = Command::new(python3());
    cmd.arg(helper("psycopg_client.py"));
    check_driver("psycopg3_pipeline", "drv_psycopg", cmd, Some("'skipped'"));
}

fn pgjdbc_command() -> Command {
    auditor_tests::pgjdbc_command("PgjdbcClient")
}

#[test]
fn pgjdbc() {
    if !can_run("pgjdbc") {
        return;
    }
    check_driver("pgjdbc", "drv_jdbc", pgjdbc_command(), None);
}

#[test]
fn pgjdbc_through_the_proxy() {
    if !can_run("pgjdbc_through_the_proxy") {
        return;
    }
    check_driver_as(
        "pgjdbc_through_the_proxy",
        "drv_jdbc_enf",
        pgjdbc_command(),
        None,
        Via::Proxy {
            tls: false,
            netns: false,
        },
    );
}

#[test]
fn pgjdbc_through_the_proxy_over_tls() {
    if !can_run("pgjdbc_through_the_proxy_over_tls") {
        return;
    }
    check_driver_as(
        "pgjdbc_through_the_proxy_over_tls",
        "drv_jdbc_tls",
        pgjdbc_command(),
        None,
        Via::Proxy {
            tls: true,
            netns: false,
        },
    );
}

#[test]
fn pgjdbc_through_the_proxy_in_a_namespace() {
    if !can_run("pgjdbc_through_the_proxy_in_a_namespace") {
        return;
    }
    check_driver_as(
        "pgjdbc_through_the_proxy_in_a_namespace",
        "drv_jdbc_ns",
        pgjdbc_command(),
        None,
        Via::Proxy {
            tls: false,
            netns: true,
        },
    );
}

#[test]
fn node_postgres() {
    if !can_run("node_postgres") {
        return;
    }
    assert!(
        node_modules().join("pg").exists(),
        "node-postgres is not installed: run `cargo xtask setup --tests`"
    );
    let mut cmd = Command::new("node");
    cmd.arg(helper("node_pg_client.js"))
        .env("NODE_PATH", node_modules());
    check_driver("node_postgres", "drv_node", cmd, None);
}
