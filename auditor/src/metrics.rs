//! Prometheus metrics (`metrics_listen`): the daemon's counters in the text exposition
//! format on `GET /metrics`, from the same snapshot as stats.json (refreshed every second).
//! A plain blocking server on its own thread: one scrape at a time is plenty.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::daemon::Stats;

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP auditor_{name} {help}");
    let _ = writeln!(out, "# TYPE auditor_{name} {kind}");
    let _ = writeln!(out, "auditor_{name} {value}");
}

/// The daemon's CPU seconds by thread and mode, and its whole process's (threads that
/// ended included).
fn cpu(o: &mut String, c: &crate::cpu::CpuStats) {
    if c.threads.is_empty() {
        return;
    }
    let _ = writeln!(
        o,
        "# HELP auditor_cpu_seconds_total The daemon's CPU time by thread name and mode (a thread that ended: as last read)."
    );
    let _ = writeln!(o, "# TYPE auditor_cpu_seconds_total counter");
    for (thread, t) in &c.threads {
        // Thread names are the daemon's own (and the kernel's 15 bytes): no quotes or
        // backslashes to escape, but escaped anyway.
        let name = thread
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n");
        for (mode, v) in [("user", t.user_s), ("system", t.system_s)] {
            let _ = writeln!(
                o,
                "auditor_cpu_seconds_total{{thread=\"{name}\",mode=\"{mode}\"}} {v}"
            );
        }
    }
    metric(
        o,
        "process_cpu_seconds_total",
        "counter",
        "The daemon's CPU time, all threads (ended ones included), user and system.",
        c.process.total(),
    );
}

/// The exposition of a stats snapshot.
pub fn render(s: &Stats) -> String {
    let mut o = String::new();
    cpu(&mut o, &s.cpu);
    let t = &s.tracker;
    let k = &s.kernel;
    metric(
        &mut o,
        "uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        s.uptime_s,
    );
    metric(
        &mut o,
        "events_written_total",
        "counter",
        "Events every sink has taken.",
        s.events_written,
    );
    metric(
        &mut o,
        "sink_errors_total",
        "counter",
        "Sink failures.",
        s.sink_errors,
    );
    metric(
        &mut o,
        "active_sessions",
        "gauge",
        "Connections being followed.",
        s.active_sessions,
    );
    if let Some(lag) = s.trail_lag_ms {
        metric(
            &mut o,
            "trail_lag_seconds",
            "gauge",
            "How far behind now the trail is known complete (flushed by every sink).",
            lag as f64 / 1000.0,
        );
    }
    metric(
        &mut o,
        "sink_backlog_events",
        "gauge",
        "Events handed to the sinks, not yet flushed by all of them.",
        s.sink_backlog_events,
    );
    metric(
        &mut o,
        "sink_backlog_bytes",
        "gauge",
        "What the events queued for the sink thread hold, about (capture waits past 64 MiB).",
        s.sink_backlog_bytes,
    );
    metric(
        &mut o,
        "sink_waits_total",
        "counter",
        "Times capture waited for the sinks because the queue held 64 MiB.",
        s.sink_waits,
    );
    metric(
        &mut o,
        "sessions_started_total",
        "counter",
        "Sessions seen starting.",
        t.sessions_started,
    );
    metric(
        &mut o,
        "sessions_ended_total",
        "counter",
        "Sessions seen ending.",
        t.sessions_ended,
    );
    metric(
        &mut o,
        "statements_total",
        "counter",
        "Statements recorded.",
        t.statements,
    );
    metric(
        &mut o,
        "gaps_total",
        "counter",
        "Gap events: bytes that were not captured.",
        t.gaps,
    );
    metric(
        &mut o,
        "gap_bytes_total",
        "counter",
        "Bytes lost in gaps.",
        t.gap_bytes,
    );
    metric(
        &mut o,
        "kernel_drops_total",
        "counter",
        "Records the kernel could not put in the ring buffer (full).",
        k.ringbuf_drops + k.control_drops,
    );
    metric(
        &mut o,
        "captured_bytes_total",
        "counter",
        "Payload bytes copied by the kernel side.",
        k.bytes,
    );
    metric(
        &mut o,
        "parse_errors_total",
        "counter",
        "Protocol messages that did not decode.",
        t.parse_errors,
    );
    metric(
        &mut o,
        "tls_unreadable_sessions_total",
        "counter",
        "TLS sessions whose plaintext could not be read.",
        t.tls_unreadable_sessions,
    );
    metric(
        &mut o,
        "decisions_total",
        "counter",
        "Statements policy rules decided on (dry run: would_*).",
        t.decisions,
    );
    metric(
        &mut o,
        "pod_waits_total",
        "counter",
        "Sessions whose events waited for their pod.",
        t.pod_waits,
    );
    metric(
        &mut o,
        "pod_unknown_total",
        "counter",
        "Sessions recorded without their pod (pod_unknown).",
        t.pod_unknown,
    );
    metric(
        &mut o,
        "policies",
        "gauge",
        "Policies in force.",
        s.policies.policies,
    );
    metric(
        &mut o,
        "policy_reloads_total",
        "counter",
        "Policy sets put in force after the first.",
        s.policies.reloads,
    );
    metric(
        &mut o,
        "policy_reload_errors_total",
        "counter",
        "Policy reloads refused (the previous set stayed).",
        s.policies.reload_errors,
    );
    if let Some(kube) = &s.kubernetes {
        metric(
            &mut o,
            "kubernetes_pods",
            "gauge",
            "Pods of this node in the watch's cache.",
            kube.pods,
        );
        metric(
            &mut o,
            "kubernetes_synced",
            "gauge",
            "1 once the first list completed.",
            u8::from(kube.synced),
        );
        metric(
            &mut o,
            "kubernetes_watch_errors_total",
            "counter",
            "Failed lists or watches.",
            kube.errors,
        );
    }
    if let Some(ch) = &s.clickhouse {
        metric(
            &mut o,
            "clickhouse_inserted_total",
            "counter",
            "Events ClickHouse acknowledged.",
            ch.inserted,
        );
        metric(
            &mut o,
            "clickhouse_insert_errors_total",
            "counter",
            "Failed inserts (retried).",
            ch.insert_errors,
        );
        metric(
            &mut o,
            "clickhouse_spool_bytes",
            "gauge",
            "Undelivered events waiting on disk.",
            ch.spool_bytes,
        );
        metric(
            &mut o,
            "clickhouse_dropped_total",
            "counter",
            "Events dropped with the spool full (recorded as gaps).",
            ch.dropped_spool_full,
        );
        metric(
            &mut o,
            "clickhouse_connected",
            "gauge",
            "1 while the last insert succeeded.",
            u8::from(ch.connected),
        );
    }
    if let Some(p) = &s.proxy {
        for (name, kind, help, value) in [
            (
                "proxy_connections_total",
                "counter",
                "Connections the inline proxy accepted.",
                p.connections,
            ),
            (
                "proxy_active_connections",
                "gauge",
                "Connections the inline proxy relays now.",
                p.active,
            ),
            (
                "proxy_enforced_sessions_total",
                "counter",
                "Sessions an enforce policy judged.",
                p.enforced_sessions,
            ),
            (
                "proxy_blocked_total",
                "counter",
                "Statements a rule refused.",
                p.blocked,
            ),
            (
                "proxy_masked_values_total",
                "counter",
                "Values masked in results.",
                p.masked_values,
            ),
            (
                "proxy_held_total",
                "counter",
                "Statements held for approval.",
                p.held,
            ),
            (
                "approvals_pending",
                "gauge",
                "Held statements waiting for a decision now.",
                p.pending_approvals,
            ),
            (
                "approvals_webhook_sent_total",
                "counter",
                "New requests announced to the webhook.",
                p.webhook_sent,
            ),
            (
                "approvals_webhook_failed_total",
                "counter",
                "New requests the webhook did not take (after retries).",
                p.webhook_failed,
            ),
            (
                "approvals_store_down",
                "gauge",
                "1 while the shared approvals store cannot be reached (held statements cannot be decided).",
                p.approvals_store_down,
            ),
            (
                "proxy_unknown_origin_total",
                "counter",
                "Connections to the proxy's port the redirect did not send (refused).",
                p.unknown_origin,
            ),
            (
                "proxy_upstream_failures_total",
                "counter",
                "Redirected connections whose server could not be reached.",
                p.upstream_failures,
            ),
            (
                "proxy_redirected_cgroups",
                "gauge",
                "Cgroups whose connections are redirected into the proxy.",
                p.redirected_cgroups,
            ),
            (
                "proxy_namespaces",
                "gauge",
                "Workloads' network namespaces (besides the host's) the proxy listens in.",
                p.namespaces,
            ),
            (
                "proxy_namespaces_refused",
                "gauge",
                "Redirected workloads' network namespaces where the proxy's port is taken: their enforced connections are refused.",
                p.namespaces_refused,
            ),
        ] {
            metric(&mut o, name, kind, help, value);
        }
    }
    o
}

/// Serves `latest` on `addr` (GET /metrics) from a thread.
pub fn serve(addr: SocketAddr, latest: Arc<Mutex<String>>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let mut reader = BufReader::new(&stream);
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                // The rest of the request head.
                let mut header = String::new();
                while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                    header.clear();
                }
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let response = if line.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?")) {
                    let body = latest.lock().map(|b| b.clone()).unwrap_or_default();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 20\r\nConnection: close\r\n\r\nonly /metrics here\r\n".to_string()
                };
                let _ = stream.write_all(response.as_bytes());
            }
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_and_server() {
        let mut s = Stats::default();
        s.tracker.statements = 42;
        s.trail_lag_ms = Some(1500);
        s.policies.reload_errors = 1;
        let text = render(&s);
        assert!(
            text.contains("# TYPE auditor_statements_total counter\nauditor_statements_total 42\n")
        );
        assert!(text.contains("auditor_policy_reload_errors_total 1\n"));
        assert!(text.contains("\nauditor_trail_lag_seconds 1.5\n"));
        assert!(!text.contains("kubernetes"));
        assert!(!text.contains("cpu_seconds"), "not counted: not shown");
        s.cpu.process = crate::cpu::Seconds {
            user_s: 2.5,
            system_s: 0.75,
        };
        s.cpu.threads.insert(
            "main".into(),
            crate::cpu::Seconds {
                user_s: 2.0,
                system_s: 0.25,
            },
        );
        s.cpu.threads.insert(
            "a\"b".into(),
            crate::cpu::Seconds {
                user_s: 0.5,
                system_s: 0.0,
            },
        );
        let with_cpu = render(&s);
        for line in [
            "\n# TYPE auditor_cpu_seconds_total counter\n",
            "\nauditor_cpu_seconds_total{thread=\"main\",mode=\"user\"} 2\n",
            "\nauditor_cpu_seconds_total{thread=\"main\",mode=\"system\"} 0.25\n",
            "\nauditor_cpu_seconds_total{thread=\"a\\\"b\",mode=\"user\"} 0.5\n",
            "\nauditor_process_cpu_seconds_total 3.25\n",
        ] {
            assert!(with_cpu.contains(line), "{line} in {with_cpu}");
        }
        assert!(!text.contains("proxy"));
        s.proxy = Some(crate::proxy::ProxyStats {
            held: 3,
            pending_approvals: 1,
            ..Default::default()
        });
        let with_proxy = render(&s);
        assert!(
            with_proxy.contains("\nauditor_proxy_held_total 3\n"),
            "{with_proxy}"
        );
        assert!(with_proxy
            .contains("# TYPE auditor_approvals_pending gauge\nauditor_approvals_pending 1\n"));
        let latest = Arc::new(Mutex::new(text.clone()));
        let addr = serve("127.0.0.1:0".parse().unwrap(), latest).unwrap();
        let get = |path: &str| {
            use std::io::Read;
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut r = String::new();
            c.read_to_string(&mut r).unwrap();
            r
        };
        let r = get("/metrics");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with(&text));
        assert!(get("/other").starts_with("HTTP/1.1 404"));
    }
}
