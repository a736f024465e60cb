//! The web console in headless Chromium: an approver signs in through an OpenID Connect
//! provider the test starts (authorization code flow with PKCE, ES256 ID token), sees a
//! held DROP TABLE appear without reloading the page, approves it, and psql's statement
//! completes (Postgres's log shows it only after the click); forms without the session's
//! CSRF token or from another origin are refused; the session's replay lists its statements
//! in order with the decision and the approver. Screenshots of each page go to
//! target/test-artifacts/console/.

use std::{path::PathBuf, process::Stdio, time::Duration};

use auditor_tests::{
    can_run, check, oidc::Issuer, str_of, webdriver::Browser, Cgroup, Daemon, Postgres,
};
use serde_json::Value;

const POLICY: &str = r#"
name: agents
selector:
  matchLabels:
    cgroup.path: CGROUP
mode: enforce
require_approval:
  - name: ddl-review
    when: {ddl: true}
    approvers: [oidc-group:dba]
    timeout: 2m
"#;

fn artifacts() -> PathBuf {
    auditor_tests::workspace_root().join("target/test-artifacts/console")
}

fn server_saw(pg: &Postgres, needle: &str) -> bool {
    std::fs::read_to_string(pg.log_path())
        .unwrap()
        .contains(needle)
}

/// A raw HTTP/1.1 request to the console: its status line and body.
fn post(port: u16, path: &str, headers: &[(&str, &str)], body: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[test]
fn an_approver_signs_in_and_approves_a_held_statement_live() {
    if !can_run("an_approver_signs_in_and_approves_a_held_statement_live") {
        return;
    }
    if let Some(why) = auditor_tests::webdriver::available() {
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipping the console test: {why}");
        return;
    }
    let pg = Postgres::start(&[]).unwrap();
    check(pg.psql().args([
        "-c",
        "CREATE TABLE doomed (a int); GRANT ALL ON ALL TABLES IN SCHEMA public TO PUBLIC",
    ]))
    .unwrap();
    let agent = Cgroup::new("console").unwrap();
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("agents.yaml"),
        POLICY.replace("CGROUP", &agent.name),
    )
    .unwrap();
    let issuer = Issuer::start().unwrap();
    issuer.set_person("u-alice", "alice@example.com", &["dba"], "alice");
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("oidc-secret");
    std::fs::write(&secret_file, format!("{}\n", issuer.secret)).unwrap();
    let proxy_port = auditor_tests::free_port();
    let console_port = auditor_tests::free_port();
    let pin_dir = format!("/sys/fs/bpf/auditor-test-console-{}", std::process::id());
    let config = format!(
        "policies_dir: {}\nproxy: {{port: {proxy_port}, pin_dir: {pin_dir}}}\n\
         console:\n  listen: 127.0.0.1:{console_port}\n  oidc:\n    issuer: {}\n    \
         client_id: {}\n    client_secret_file: {}\n    local_user_claim: preferred_username\n",
        policies.path().display(),
        issuer.url,
        auditor_tests::oidc::CLIENT_ID,
        secret_file.display(),
    );
    let _detach = auditor_tests::DetachOnDrop::new(&pin_dir);
    let mut daemon = Daemon::start(pg.port, &config).unwrap();
    let base = format!("http://127.0.0.1:{console_port}");

    // Not signed in: every page sends the browser to the provider, the event stream and
    // forms are refused.
    let (status, _) = post(console_port, "/requests/abc/approve", &[], "csrf=x");
    assert!(status.contains("401"), "{status}");

    let browser = Browser::start().unwrap();
    browser.goto(&format!("{base}/requests")).unwrap();
    let signin = browser
        .wait_for("#signin", "Sign in", Duration::from_secs(20))
        .unwrap();
    assert!(
        browser.url().unwrap().starts_with(&issuer.url),
        "not at the provider: {}",
        browser.url().unwrap()
    );
    browser.click(&signin).unwrap();
    browser
        .wait_for("#pending", "No statement waits", Duration::from_secs(20))
        .unwrap();
    browser
        .wait_for("#live", "Live", Duration::from_secs(10))
        .unwrap();
    assert_eq!(issuer.tokens_issued(), 1);
    let who = browser.find_all("header .who").unwrap();
    assert_eq!(browser.text(&who[0]).unwrap(), "oidc:alice@example.com");
    let _ = browser.screenshot(&artifacts().join("1-signed-in.png"));
    // A mark on this page: gone if it reloads.
    browser.execute("window.__sameDocument = 42;").unwrap();

    // The session cookie, for forms sent from outside the page.
    let cookie = browser
        .cookies()
        .unwrap()
        .into_iter()
        .find(|c| c["name"] == "auditor_session")
        .expect("a session cookie");
    assert_eq!(cookie["httpOnly"], Value::Bool(true));
    assert_eq!(cookie["sameSite"], "Lax");
    let cookie_header = format!("auditor_session={}", cookie["value"].as_str().unwrap());

    // An agent's psql: a statement before, the DROP TABLE (held), one after.
    let mut cmd = pg.psql();
    cmd.args(["-At", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "SELECT 'before' AS before_marker"])
        .args(["-c", "DROP TABLE doomed"])
        .args(["-c", "SELECT 'after' AS after_marker"])
        .env("PGAPPNAME", "console_psql");
    agent.enter(&mut cmd);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // It appears without a reload.
    let card = browser
        .wait_for(
            "#pending article.request",
            "DROP TABLE doomed",
            Duration::from_secs(30),
        )
        .unwrap();
    assert_eq!(
        browser.execute("return window.__sameDocument;").unwrap(),
        Value::from(42),
        "the page reloaded"
    );
    let text = browser.text(&card).unwrap();
    assert!(text.contains("agents/ddl-review"), "{text}");
    assert!(text.contains("psql"), "{text}");
    assert!(text.contains("oidc-group:dba"), "{text}");
    let _ = browser.screenshot(&artifacts().join("2-pending.png"));
    let id = browser
        .execute("return document.querySelector('#pending article.request').dataset.id;")
        .unwrap();
    let id = id.as_str().unwrap().to_string();
    assert!(!server_saw(&pg, "DROP TABLE doomed"), "ran before approval");

    // Forms need the session's token, from this origin.
    let (status, _) = post(
        console_port,
        &format!("/requests/{id}/approve"),
        &[("Cookie", &cookie_header)],
        "reason=forged",
    );
    assert!(status.contains("403"), "without the token: {status}");
    let (status, _) = post(
        console_port,
        &format!("/requests/{id}/approve"),
        &[
            ("Cookie", &cookie_header),
            ("Origin", "https://evil.example.com"),
        ],
        "csrf=whatever",
    );
    assert!(status.contains("403"), "from another origin: {status}");
    assert!(!server_saw(&pg, "DROP TABLE doomed"));

    // Approve in the page.
    let approve = browser.find_in(&card, "button.approve").unwrap();
    browser.click(&approve).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("before") && stdout.contains("after"),
        "{stdout}"
    );
    assert!(stderr.contains("waits for approval"), "{stderr}");
    assert!(server_saw(&pg, "DROP TABLE doomed"));
    let gone = check(
        pg.psql()
            .args(["-At", "-c", "SELECT to_regclass('doomed') IS NULL"]),
    )
    .unwrap();
    assert_eq!(gone.trim(), "t");
    browser
        .wait_for("#pending", "No statement waits", Duration::from_secs(10))
        .unwrap();
    browser
        .wait_for(
            "table.list",
            "oidc:alice@example.com",
            Duration::from_secs(10),
        )
        .unwrap();
    let _ = browser.screenshot(&artifacts().join("3-approved.png"));

    // The trail: the statement approved by the console user.
    let events = daemon.wait_sessions_ended(&agent.name);
    let dropped = events
        .iter()
        .find(|e| str_of(e, "kind") == "statement" && str_of(e, "statement").contains("DROP TABLE"))
        .expect("the DROP TABLE in the trail");
    assert_eq!(str_of(dropped, "approval_id"), id);
    assert_eq!(str_of(dropped, "approver"), "oidc:alice@example.com");
    let session = str_of(dropped, "session_id").to_string();

    // The session's replay: its statements in order, with the decision.
    browser.goto(&format!("{base}/sessions")).unwrap();
    let row = browser
        .wait_for(
            "#sessions tbody tr",
            "console_psql",
            Duration::from_secs(10),
        )
        .unwrap();
    let link = browser.find_in(&row, "a").unwrap();
    browser.click(&link).unwrap();
    let timeline = browser
        .wait_for("#timeline", "DROP TABLE doomed", Duration::from_secs(10))
        .unwrap();
    assert!(
        browser.url().unwrap().ends_with(&session),
        "{}",
        browser.url().unwrap()
    );
    let text = browser.text(&timeline).unwrap();
    let at = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} not in the replay: {text}"))
    };
    assert!(at("before_marker") < at("DROP TABLE doomed"));
    assert!(at("DROP TABLE doomed") < at("after_marker"));
    assert!(at("approval requested") < at("DROP TABLE doomed"), "{text}");
    assert!(text.contains("oidc:alice@example.com"), "{text}");
    let _ = browser.screenshot(&artifacts().join("4-replay.png"));

    // Signing out ends the session: the next page asks the provider again.
    browser.goto(&format!("{base}/requests")).unwrap();
    let out_button = browser.find_all("header form button").unwrap();
    browser.click(&out_button[0]).unwrap();
    browser
        .wait_for("main", "signed out", Duration::from_secs(10))
        .unwrap();
    let (status, _) = post(
        console_port,
        "/requests/abc/approve",
        &[("Cookie", &cookie_header)],
        "csrf=x",
    );
    assert!(status.contains("401"), "after signing out: {status}");
    drop(browser);

    let events = daemon.stop_without_gaps();
    assert!(events
        .iter()
        .any(|e| str_of(e, "kind") == "approval_granted"
            && str_of(e, "approver") == "oidc:alice@example.com"));
}
