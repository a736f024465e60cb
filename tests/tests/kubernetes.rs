//! Workloads in Kubernetes pods, their labels from the API server (a fake one serving
//! list and watch of pods in the real API's JSON shapes), and the policies those labels
//! select: client processes run in cgroups shaped like the kubelet's (systemd and cgroupfs
//! drivers), and their events must carry their own pod's name, namespace and labels, and
//! their own policy's recording and dry-run decisions, exactly.

use std::{
    io::Write,
    process::Stdio,
    time::{Duration, Instant},
};

use auditor_tests::{can_run, pod_json, str_of, Daemon, FakeKubeApi, NestedCgroup, Postgres};
use serde_json::Value;

const NODE: &str = "node-test";
const AGENT_UID: &str = "0b6a4f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b";
const WEB_UID: &str = "7d8e9fa0-b1c2-4d3e-9f40-a1b2c3d4e5f6";
const LATE_UID: &str = "11111111-2222-4333-8444-555555555555";
const GHOST_UID: &str = "99999999-8888-4777-8666-555555555555";

fn container_id(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

const POLICIES: &str = r#"
name: agents-raw
selector:
  matchLabels:
    k8s.namespace: agents
mode: dry-run
record:
  raw_statements: true
block:
  - name: no-ddl
    when: {ddl: true}
  - name: no-unbounded-writes
    when: {without_where: true}
---
name: web-redacted
selector:
  matchLabels:
    k8s.pod/app: web
mode: audit
"#;

/// Runs psql in `cg` with `sql` (one -c per statement), application_name `app`.
fn psql_in(pg: &Postgres, cg: &NestedCgroup, app: &str, sql: &[&str]) {
    let mut cmd = pg.psql();
    cmd.env("PGAPPNAME", app);
    for s in sql {
        cmd.args(["-c", s]);
    }
    cg.cgroup.enter(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn statements<'a>(events: &'a [Value], app: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| str_of(e, "kind") == "statement" && str_of(e, "application_name") == app)
        .collect()
}

fn label<'a>(e: &'a Value, key: &str) -> &'a str {
    e["labels"][key].as_str().unwrap_or("")
}

#[test]
fn pods_get_their_labels_and_their_policies() {
    if !can_run("pods_get_their_labels_and_their_policies") {
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    let api = FakeKubeApi::start().unwrap();
    api.set_pods(&[
        pod_json("agents", "agent-1", AGENT_UID, NODE, &[("app", "bot")]),
        pod_json(
            "shop",
            "web-1",
            WEB_UID,
            NODE,
            &[("app", "web"), ("tier", "front")],
        ),
        // Another node's pod: the watch's field selector leaves it out.
        pod_json(
            "shop",
            "elsewhere",
            LATE_UID,
            "node-other",
            &[("app", "web")],
        ),
    ])
    .unwrap();
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(policies.path().join("p.yaml"), POLICIES).unwrap();
    let agent = NestedCgroup::pod(AGENT_UID, &container_id(1), true).unwrap();
    let web = NestedCgroup::pod(WEB_UID, &container_id(2), false).unwrap();
    let late = NestedCgroup::pod(LATE_UID, &container_id(3), true).unwrap();
    let ghost = NestedCgroup::pod(GHOST_UID, &container_id(4), false).unwrap();

    let mut daemon = Daemon::start(
        pg.port,
        &format!(
            "policies_dir: {}\nkubernetes:\n  enabled: true\n  kubeconfig: {}\n  node_name: {NODE}\n  pod_wait_ms: 3000\n",
            policies.path().display(),
            api.kubeconfig.display()
        ),
    )
    .unwrap();
    daemon.wait_for_stats(Duration::from_secs(20), |s| {
        s["kubernetes"]["synced"].as_bool() == Some(true)
    });
    // `auditor doctor` with the daemon's configuration reaches the API server.
    let out = std::process::Command::new(auditor_tests::auditor_bin())
        .args(["doctor", "--config"])
        .arg(daemon.state.join("config.yaml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ok   kubernetes       the API server lists 2 pods on node node-test"),
        "{text}"
    );

    let sql = [
        "SELECT 42 AS answer",
        "CREATE TEMP TABLE t (a int)",
        "DELETE FROM pg_temp.t",
    ];
    // One session per pod (the temp table lives in the session).
    psql_in(&pg, &agent, "k8s_agent", &[&sql.join("; ")]);
    psql_in(&pg, &web, "k8s_web", &[&sql.join("; ")]);

    // A session whose pod is not listed yet: it waits (bounded) for the watch to show it.
    let mut cmd = pg.psql();
    cmd.env("PGAPPNAME", "k8s_late")
        .args(["-c", "SELECT 7 AS late"]);
    late.cgroup.enter(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(500));
    api.set_pods(&[
        pod_json("agents", "agent-1", AGENT_UID, NODE, &[("app", "bot")]),
        pod_json(
            "shop",
            "web-1",
            WEB_UID,
            NODE,
            &[("app", "web"), ("tier", "front")],
        ),
        pod_json("batch", "late-1", LATE_UID, NODE, &[("app", "job")]),
    ])
    .unwrap();
    // A pod the API server never shows: recorded after the wait, flagged, no pod named.
    psql_in(&pg, &ghost, "k8s_ghost", &["SELECT 8 AS ghost"]);

    // Relabel the web pod while a session of it runs: that session keeps the labels it
    // started with; the next session gets the new ones (and so another policy).
    let mut cmd = pg.psql();
    cmd.env("PGAPPNAME", "k8s_relabel")
        .args(["-X", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    web.cgroup.enter(&mut cmd);
    let mut running = cmd.spawn().unwrap();
    let mut stdin = running.stdin.take().unwrap();
    writeln!(stdin, "SELECT 1 AS before_relabel;").unwrap();
    std::thread::sleep(Duration::from_millis(700));
    api.relabel("shop", "web-1", &[("app", "web-v2")]).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    writeln!(stdin, "SELECT 2 AS after_relabel;").unwrap();
    drop(stdin);
    assert!(running.wait().unwrap().success());
    psql_in(&pg, &web, "k8s_relabelled", &["SELECT 3 AS new_session"]);

    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let evs = daemon.events().unwrap();
        let ended = |app: &str| {
            evs.iter()
                .any(|e| str_of(e, "kind") == "session_end" && str_of(e, "application_name") == app)
        };
        if [
            "k8s_agent",
            "k8s_web",
            "k8s_late",
            "k8s_ghost",
            "k8s_relabel",
            "k8s_relabelled",
        ]
        .iter()
        .all(|a| ended(a))
            || Instant::now() > deadline
        {
            break evs;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    daemon.stop().unwrap();
    let stats = daemon.stats().unwrap();

    // The agent's pod: its name, namespace, labels; raw text; dry-run decisions.
    let a = statements(&events, "k8s_agent");
    assert_eq!(a.len(), 3, "{a:#?}");
    for e in &a {
        assert_eq!(str_of(e, "pod_name"), "agent-1");
        assert_eq!(str_of(e, "namespace"), "agents");
        assert_eq!(str_of(e, "pod_uid"), AGENT_UID);
        assert_eq!(str_of(e, "workload"), "pod:agents/agent-1");
        assert_eq!(label(e, "k8s.pod/app"), "bot");
        assert_eq!(label(e, "k8s.namespace"), "agents");
        assert_eq!(label(e, "k8s.serviceaccount"), "agent-1-sa");
        assert_eq!(label(e, "k8s.node"), NODE);
        assert_eq!(str_of(e, "policy"), "agents-raw");
        assert!(!str_of(e, "policy_version").is_empty());
    }
    assert_eq!(str_of(a[0], "statement"), "SELECT 42 AS answer");
    assert_eq!(str_of(a[0], "decision"), "");
    assert_eq!(str_of(a[1], "decision"), "would_block");
    assert_eq!(str_of(a[1], "decision_rule"), "agents-raw/no-ddl");
    assert_eq!(str_of(a[2], "statement"), "DELETE FROM pg_temp.t");
    assert_eq!(str_of(a[2], "decision"), "would_block");
    assert_eq!(
        str_of(a[2], "decision_rule"),
        "agents-raw/no-unbounded-writes"
    );
    // Dry run: the statements ran.
    assert!(a.iter().all(|e| str_of(e, "error_code").is_empty()));

    // The web pod (cgroupfs driver): redacted, audited, no decisions.
    let w = statements(&events, "k8s_web");
    assert_eq!(w.len(), 3, "{w:#?}");
    for e in &w {
        assert_eq!(str_of(e, "pod_name"), "web-1");
        assert_eq!(str_of(e, "namespace"), "shop");
        assert_eq!(label(e, "k8s.pod/app"), "web");
        assert_eq!(label(e, "k8s.pod/tier"), "front");
        assert_eq!(str_of(e, "policy"), "web-redacted");
        assert_eq!(str_of(e, "decision"), "");
    }
    assert_eq!(str_of(w[0], "statement"), "SELECT $1 AS answer");
    assert_ne!(
        str_of(w[0], "policy_version"),
        str_of(a[0], "policy_version")
    );

    // The late pod: the session waited for it and got it.
    let l = statements(&events, "k8s_late");
    assert_eq!(l.len(), 1, "{l:#?}");
    assert_eq!(str_of(l[0], "pod_name"), "late-1");
    assert_eq!(str_of(l[0], "namespace"), "batch");
    assert_eq!(label(l[0], "k8s.pod/app"), "job");

    // The ghost pod: no other pod's name, flagged.
    let g = statements(&events, "k8s_ghost");
    assert_eq!(g.len(), 1, "{g:#?}");
    assert_eq!(str_of(g[0], "pod_name"), "");
    assert_eq!(str_of(g[0], "pod_uid"), GHOST_UID);
    assert_eq!(str_of(g[0], "workload"), format!("pod-uid:{GHOST_UID}"));
    assert!(
        g[0]["flags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "pod_unknown"),
        "{:#?}",
        g[0]
    );
    assert_eq!(str_of(g[0], "policy"), "");

    // Relabelled while running: the running session keeps its labels and policy.
    let r = statements(&events, "k8s_relabel");
    assert_eq!(r.len(), 2, "{r:#?}");
    for e in &r {
        assert_eq!(label(e, "k8s.pod/app"), "web");
        assert_eq!(str_of(e, "policy"), "web-redacted");
    }
    let n = statements(&events, "k8s_relabelled");
    assert_eq!(n.len(), 1, "{n:#?}");
    assert_eq!(label(n[0], "k8s.pod/app"), "web-v2");
    assert_eq!(str_of(n[0], "policy"), "");
    assert_eq!(str_of(n[0], "statement"), "SELECT $1 AS new_session");

    // One list and one watch, not a request per connection.
    let requests = api.requests().unwrap();
    assert!(
        requests.len() <= 4,
        "the daemon should list once and watch: {requests:#?}"
    );
    assert!(requests
        .iter()
        .all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-test")));
    assert_eq!(stats["tracker"]["pod_unknown"], 1, "{stats:#}");
    assert!(
        stats["tracker"]["pod_waits"].as_u64().unwrap() >= 2,
        "{stats:#}"
    );
}
