//! Policies live: a reload in the middle of a pgbench run loses and duplicates nothing and
//! switches the policy named on events at the reload; a broken file keeps the previous
//! set (and says so in a `policy_error` event); a broken set refuses the start; `auditor
//! policy explain` tells which policies a recorded session had.

use std::{
    collections::HashMap,
    process::Command,
    time::{Duration, Instant},
};

use auditor_tests::{auditor_bin, can_run, check, str_of, Cgroup, Daemon, Postgres};
use serde_json::Value;

/// Replaces a policy file as editors and ConfigMaps do: a new file renamed over the old.
fn write_policy(dir: &std::path::Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

#[test]
fn a_reload_under_load_loses_nothing_and_switches_the_policy() {
    if !can_run("a_reload_under_load_loses_nothing_and_switches_the_policy") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    check(pg.pgbench().args(["-i", "-q", "-s", "1"]).arg("postgres")).unwrap();
    let policies = tempfile::tempdir().unwrap();
    write_policy(policies.path(), "p.yaml", "name: before\nselector: {}\n");
    let metrics_port = auditor_tests::free_port();
    let mut daemon = Daemon::start(
        pg.port,
        &format!(
            "policies_dir: {}\nmetrics_listen: 127.0.0.1:{metrics_port}\n",
            policies.path().display()
        ),
    )
    .unwrap();
    let cg = Cgroup::new("reload").unwrap();

    let mut cmd = pg.pgbench();
    cmd.args(["-n", "-S", "-M", "simple", "-c", "4", "-j", "2", "-T", "9"])
        .arg("postgres")
        .env("PGAPPNAME", "reload_bench");
    cg.enter(&mut cmd);
    let bench = std::thread::spawn(move || check(&mut cmd).unwrap());
    std::thread::sleep(Duration::from_secs(3));
    write_policy(
        policies.path(),
        "p.yaml",
        "name: after\nselector: {}\nrecord: {raw_statements: true}\n",
    );
    std::thread::sleep(Duration::from_secs(3));
    // Broken: the set in force stays `after`.
    write_policy(policies.path(), "p.yaml", "name: broken\nselecter: {}\n");
    let out = bench.join().unwrap();
    assert!(out.contains("number of failed transactions: 0"), "{out}");

    daemon.wait_sessions_ended(&cg.name);
    // Prometheus metrics say the same as stats.json.
    std::thread::sleep(Duration::from_millis(1200));
    let metrics =
        auditor_tests::http(metrics_port, "GET", "/metrics", "", Duration::from_secs(10)).unwrap();
    assert!(
        metrics.contains("\nauditor_policy_reloads_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nauditor_policy_reload_errors_total 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nauditor_policies 1\n"), "{metrics}");
    assert!(
        metrics.contains("\nauditor_trail_lag_seconds "),
        "{metrics}"
    );
    let events = daemon.stop_without_gaps();
    let stats = daemon.stats().unwrap();
    let recorded: Vec<&Value> = events
        .iter()
        .filter(|e| {
            str_of(e, "kind") == "statement" && str_of(e, "application_name") == "reload_bench"
        })
        .collect();
    let executed = pg.logged_statements("reload_bench").unwrap();
    assert!(executed > 10_000, "server logged {executed}");
    assert_eq!(
        recorded.len(),
        executed,
        "recorded vs executed by the server"
    );

    // Per session, in order: `before`, then `after` from the reload on, never back.
    let mut by_session: HashMap<&str, Vec<&str>> = HashMap::new();
    for e in &recorded {
        by_session
            .entry(str_of(e, "session_id"))
            .or_default()
            .push(str_of(e, "policy"));
    }
    let (mut before, mut after) = (0, 0);
    for (session, policies) in &by_session {
        let switch = policies
            .iter()
            .position(|p| *p == "after")
            .unwrap_or(policies.len());
        assert!(
            policies[..switch].iter().all(|p| *p == "before")
                && policies[switch..].iter().all(|p| *p == "after"),
            "session {session}: {policies:?}"
        );
        before += switch;
        after += policies.len() - switch;
    }
    assert!(
        before > 1000 && after > 1000,
        "before {before}, after {after}"
    );
    // `after` records raw text (the account number pgbench chose), `before` redacted it.
    for e in recorded.iter().filter(|e| {
        str_of(e, "command") == "SELECT" && str_of(e, "statement").contains("pgbench_accounts")
    }) {
        let redacted = str_of(e, "statement").ends_with("aid = $1");
        assert_eq!(redacted, str_of(e, "policy") == "before", "{e}");
    }

    let errors: Vec<&Value> = events
        .iter()
        .filter(|e| str_of(e, "kind") == "policy_error")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let msg = str_of(errors[0], "error_message");
    assert!(
        msg.contains("p.yaml:2:1: unknown field `selecter`"),
        "{msg}"
    );
    assert!(msg.contains("did you mean `selector`?"), "{msg}");
    assert_eq!(stats["policies"]["reloads"], 1, "{stats:#}");
    assert_eq!(stats["policies"]["reload_errors"], 1, "{stats:#}");
    // What observing cost: the daemon's CPU time, by thread (more than 10,000 statements
    // were decoded and written: its decoding and sink threads worked).
    for thread in ["main", "sink"] {
        let t = &stats["cpu"]["threads"][thread];
        assert!(
            t["user_s"].as_f64().unwrap() + t["system_s"].as_f64().unwrap() > 0.0,
            "{stats:#}"
        );
        assert!(
            metrics.contains(&format!(
                "\nauditor_cpu_seconds_total{{thread=\"{thread}\",mode=\"user\"}} "
            )),
            "{metrics}"
        );
    }
    assert!(stats["cpu"]["process"]["user_s"].as_f64().unwrap() > 0.0);
    let out = Command::new(auditor_bin())
        .args(["stats", "--state-dir"])
        .arg(&daemon.state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("daemon CPU ") && l.ends_with(" µs per statement")),
        "{text}"
    );

    // explain: the session's policies, recorded and as they are now.
    let some_session = recorded[recorded.len() / 2]["session_id"].as_str().unwrap();
    write_policy(policies.path(), "p.yaml", "name: later\nselector: {}\n");
    let out = Command::new(auditor_bin())
        .args(["policy", "explain", some_session, "--state-dir"])
        .arg(&daemon.state)
        .arg("--dir")
        .arg(policies.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("policy before version"), "{text}");
    assert!(text.contains("policy after version"), "{text}");
    assert!(text.contains("1. later"), "{text}");
    assert!(
        text.contains("differs from what its last events recorded"),
        "{text}"
    );
}

/// Runs `auditor run` with a config of `state_dir` and `rest`; it must refuse to start.
/// Its stderr.
fn refused_start(rest: &str) -> String {
    let state = tempfile::tempdir().unwrap();
    let config = state.path().join("config.yaml");
    std::fs::write(
        &config,
        format!("state_dir: {}\n{rest}", state.path().display()),
    )
    .unwrap();
    let out = Command::new(auditor_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started with {rest:?}: {err}");
    err
}

#[test]
fn a_broken_policy_refuses_the_start() {
    if !can_run("a_broken_policy_refuses_the_start") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("name: x\nmode: [audit\n", "p.yaml:2:"),
        ("name: x\nmode: dry-run\nblock:\n  - name: r\n    when: {pattern: '(x'}\n", "p.yaml:5:"),
        (
            "name: x\nselector:\n  matchExpressions:\n    - {key: a, operator: Equals, values: [b]}\n",
            "unknown variant `Equals`",
        ),
    ];
    let started = Instant::now();
    for (text, want) in cases {
        std::fs::write(dir.path().join("p.yaml"), text).unwrap();
        let err = refused_start(&format!("policies_dir: {}\n", dir.path().display()));
        assert!(err.contains(want), "{text:?}: want {want:?} in {err}");
        assert!(err.contains("do not load"), "{err}");
        // Refused before any eBPF program was loaded.
        assert!(!err.contains("attached"), "{err}");
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    // A directory the configuration names must exist.
    let err = refused_start("policies_dir: /nonexistent/policies\n");
    assert!(err.contains("/nonexistent/policies"), "{err}");
}

#[test]
fn policy_lint_and_test_on_the_examples() {
    let root = auditor_tests::workspace_root();
    let out = Command::new(auditor_bin())
        .args(["policy", "lint"])
        .arg(root.join("policies"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("0 warning(s)"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "name: x\nselector:\n  matchLabels: {k8s.pod/app: web, tier: db}\nmode: dryrun\n",
    )
    .unwrap();
    let out = Command::new(auditor_bin())
        .args(["policy", "lint"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("bad.yaml:4:7: mode: unknown variant `dryrun`"),
        "{text}"
    );
    assert!(text.contains("did you mean `dry-run`?"), "{text}");

    let out = Command::new(auditor_bin())
        .args(["policy", "test", "--dir"])
        .arg(root.join("policies"))
        .args([
            "--labels",
            "k8s.namespace=agents,k8s.pod/app=bot",
            "--db-user",
            "app",
        ])
        .args([
            "--sql",
            "UPDATE accounts SET balance = 0; SELECT email FROM customers",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1. agents-guardrails"), "{text}");
    assert!(
        text.contains("block by rule agents-guardrails/no-unbounded-writes"),
        "{text}"
    );
    assert!(
        text.contains("mask by rule mask-customer-data/customer-pii"),
        "{text}"
    );
    assert!(text.contains("columns customers.email"), "{text}");
}

#[test]
fn systemd_unit_labels_select_policies() {
    if !can_run("systemd_unit_labels_select_policies") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let tag = std::process::id();
    let unit = format!("billing-{tag}.service");
    let slice = format!("system-{tag}.slice");
    // The unit file, with its labels in [Unit] and a drop-in adding one.
    let units = tempfile::tempdir().unwrap();
    std::fs::write(
        units.path().join(&unit),
        "[Unit]\nDescription=billing\nX-Auditor-Labels=team=payments tier=batch\n[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    std::fs::create_dir(units.path().join(format!("{unit}.d"))).unwrap();
    std::fs::write(
        units.path().join(format!("{unit}.d/10-owner.conf")),
        "[Unit]\nX-Auditor-Labels=owner=dba\n",
    )
    .unwrap();
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("p.yaml"),
        "name: payments-raw\nselector:\n  matchLabels:\n    systemd.label/team: payments\nrecord: {raw_statements: true}\n",
    )
    .unwrap();
    let cg = auditor_tests::NestedCgroup::new(&[slice.clone(), unit.clone()]).unwrap();
    let mut daemon = Daemon::start(
        pg.port,
        &format!(
            "policies_dir: {}\nsystemd_unit_dirs: [{}]\n",
            policies.path().display(),
            units.path().display()
        ),
    )
    .unwrap();
    let mut cmd = pg.psql();
    cmd.env("PGAPPNAME", "unit_labels")
        .args(["-c", "SELECT 'card' AS what"]);
    cg.cgroup.enter(&mut cmd);
    check(&mut cmd).unwrap();
    check(
        pg.psql()
            .env("PGAPPNAME", "no_unit")
            .args(["-c", "SELECT 'card' AS what"]),
    )
    .unwrap();
    daemon.wait_sessions_ended(&cg.cgroup.name);
    let events = daemon.stop_without_gaps();
    let of = |app: &str| -> Vec<&Value> {
        events
            .iter()
            .filter(|e| str_of(e, "kind") == "statement" && str_of(e, "application_name") == app)
            .collect()
    };
    let unit_events = of("unit_labels");
    assert_eq!(unit_events.len(), 1, "{unit_events:#?}");
    let e = unit_events[0];
    assert_eq!(str_of(e, "systemd_unit"), unit);
    assert_eq!(str_of(e, "workload"), format!("unit:{unit}"));
    assert_eq!(e["labels"]["systemd.slice"], slice.as_str());
    assert_eq!(e["labels"]["systemd.label/team"], "payments");
    assert_eq!(e["labels"]["systemd.label/tier"], "batch");
    assert_eq!(e["labels"]["systemd.label/owner"], "dba");
    assert_eq!(str_of(e, "policy"), "payments-raw");
    assert_eq!(str_of(e, "statement"), "SELECT 'card' AS what");
    // Another workload: no labels from the unit, no policy, literals redacted.
    let other = of("no_unit");
    assert_eq!(other.len(), 1);
    assert_eq!(str_of(other[0], "policy"), "");
    assert_eq!(str_of(other[0], "statement"), "SELECT $1 AS what");
}
