//! Where the console reads sessions from: ClickHouse when the daemon writes there (every
//! node's sessions, for a cluster), else the node's local log.

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::html::SessionRow;
use crate::{audit::event::AuditEvent, sink::clickhouse::ClickHouseConfig};

pub enum Trail {
    ClickHouse(ClickHouseConfig),
    Local(PathBuf),
    None,
}

/// Sessions a list shows.
const LISTED: usize = 200;

impl Trail {
    pub fn describe(&self, host: &str) -> String {
        match self {
            Trail::ClickHouse(c) => format!("ClickHouse ({}, database {})", c.url, c.database),
            Trail::Local(_) => format!("the local log of {host}"),
            Trail::None => String::new(),
        }
    }

    /// Sessions, newest first.
    pub async fn sessions(&self) -> Result<Vec<SessionRow>, String> {
        match self {
            Trail::ClickHouse(c) => ch_sessions(c).await,
            Trail::Local(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || super::session_rows(&dir))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Trail::None => Ok(Vec::new()),
        }
    }

    /// A session's events in order (its id, or a unique prefix of 8 characters or more).
    pub async fn events(&self, id: &str) -> Result<Vec<AuditEvent>, String> {
        match self {
            Trail::ClickHouse(c) => ch_events(c, id).await,
            Trail::Local(dir) => {
                let (dir, id) = (dir.clone(), id.to_string());
                tokio::task::spawn_blocking(move || super::session_events(&dir, &id))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())
            }
            Trail::None => Ok(Vec::new()),
        }
    }
}

/// The expressions for the time stamp and the labels, by the table's style (servers before
/// DateTime64 and Map keep `ts` + `ts_us` and two label arrays).
async fn style(
    client: &clickhouse::Client,
    database: &str,
) -> Result<(&'static str, &'static str), String> {
    let compat: u64 = client
        .query(
            "SELECT count() FROM system.columns WHERE database = ? AND table = 'events' \
             AND name = 'ts_us'",
        )
        .bind(database)
        .fetch_one()
        .await
        .map_err(|e| e.to_string())?;
    Ok(if compat > 0 {
        (
            "concat(toString(ts), '.', substring(toString(1000000 + ts_us), 2, 6))",
            "arrayMap((k, v) -> [k, v], label_keys, label_values)",
        )
    } else {
        (
            "substring(toString(ts), 1, 26)",
            "arrayMap((k, v) -> [k, v], mapKeys(labels), mapValues(labels))",
        )
    })
}

fn client(c: &ClickHouseConfig) -> Result<clickhouse::Client, String> {
    crate::sink::clickhouse::client(c).map_err(|e| e.to_string())
}

async fn json_rows(query: clickhouse::query::Query) -> Result<Vec<Map<String, Value>>, String> {
    let bytes = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        query
            .fetch_bytes("JSONEachRow")
            .map_err(|e| e.to_string())?
            .collect()
            .await
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| "ClickHouse did not answer within 20 s".to_string())??;
    let mut out = Vec::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<Value>(line) {
            Ok(Value::Object(m)) => out.push(m),
            _ => return Err("ClickHouse answered something that is not JSON rows".into()),
        }
    }
    Ok(out)
}

/// `2026-12-02 13:39:38.219378` as the trail writes time stamps.
fn rfc3339(ch: &str) -> String {
    format!("{}Z", ch.replacen(' ', "T", 1))
}

fn text(m: &Map<String, Value>, k: &str) -> String {
    match m.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

fn number(m: &Map<String, Value>, k: &str) -> u64 {
    text(m, k).parse().unwrap_or(0)
}

async fn ch_sessions(c: &ClickHouseConfig) -> Result<Vec<SessionRow>, String> {
    let client = client(c)?;
    let (ts, _) = style(&client, &c.database).await?;
    let db = &c.database;
    let sql = format!(
        "SELECT session_id, min({ts}) AS first_ts, max({ts}) AS last_ts, any(comm) AS comm, \
         toString(any(pid)) AS pid, any(workload) AS workload, any(db_user) AS db_user, \
         any(database) AS db, any(application_name) AS app, \
         toString(countIf(kind = 'statement')) AS statements, \
         toString(countIf(kind = 'statement' AND error_code != '')) AS errors, \
         toString(countIf(kind = 'approval_requested')) AS held, \
         toString(countIf(kind = 'gap')) AS gaps, toString(countIf(kind = 'session_end')) AS ended \
         FROM {db}.events FINAL WHERE session_id != '' GROUP BY session_id \
         ORDER BY last_ts DESC LIMIT {LISTED}"
    );
    let rows = json_rows(client.query(&sql)).await?;
    Ok(rows
        .iter()
        .map(|m| SessionRow {
            id: text(m, "session_id"),
            first_ts: rfc3339(&text(m, "first_ts")),
            last_ts: rfc3339(&text(m, "last_ts")),
            who: format!("{}[{}]", text(m, "comm"), text(m, "pid")),
            workload: text(m, "workload"),
            db: format!("{}@{}", text(m, "db_user"), text(m, "db")),
            app: text(m, "app"),
            statements: number(m, "statements"),
            errors: number(m, "errors"),
            held: number(m, "held"),
            gaps: number(m, "gaps"),
            ended: number(m, "ended") > 0,
        })
        .collect())
}

/// The fields the replay shows, and how ClickHouse's JSON gives them.
const TEXTS: &[&str] = &[
    "event_id",
    "kind",
    "host",
    "session_id",
    "statement",
    "command",
    "protocol",
    "error_code",
    "error_message",
    "db_user",
    "database",
    "application_name",
    "client_addr",
    "server_addr",
    "comm",
    "exe",
    "workload",
    "cgroup_path",
    "policy",
    "policy_version",
    "decision",
    "decision_rule",
    "approval_id",
    "approver",
];
const NUMBERS: &[&str] = &[
    "seq",
    "duration_us",
    "client_port",
    "server_port",
    "pid",
    "uid",
    "gap_bytes",
];
const LISTS: &[&str] = &["params", "masked_columns", "tables"];

async fn ch_events(c: &ClickHouseConfig, id: &str) -> Result<Vec<AuditEvent>, String> {
    if id.len() < 8 || id.len() > 64 || !id.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Ok(Vec::new());
    }
    let client = client(c)?;
    let (ts, labels) = style(&client, &c.database).await?;
    let db = &c.database;
    let sql = format!(
        "SELECT *, {ts} AS ts_text, {labels} AS label_pairs, toString(rows) AS rows_text, \
         toString(tls) AS tls_text FROM {db}.events FINAL \
         WHERE session_id = (SELECT any(session_id) FROM {db}.events WHERE startsWith(session_id, ?)) \
         ORDER BY seq, ts_text"
    );
    let rows = json_rows(client.query(&sql).bind(id)).await?;
    let mut out = Vec::with_capacity(rows.len());
    for m in rows {
        let mut ev = Map::new();
        for k in TEXTS {
            ev.insert(k.to_string(), Value::String(text(&m, k)));
        }
        for k in NUMBERS {
            ev.insert(k.to_string(), Value::from(number(&m, k)));
        }
        for k in LISTS {
            if let Some(Value::Array(a)) = m.get(*k) {
                ev.insert(k.to_string(), Value::Array(a.clone()));
            }
        }
        ev.insert("ts".into(), Value::String(rfc3339(&text(&m, "ts_text"))));
        if let Ok(r) = text(&m, "rows_text").parse::<u64>() {
            ev.insert("rows".into(), Value::from(r));
        }
        ev.insert(
            "tls".into(),
            Value::Bool(matches!(text(&m, "tls_text").as_str(), "1" | "true")),
        );
        let mut l = Map::new();
        if let Some(Value::Array(pairs)) = m.get("label_pairs") {
            for p in pairs {
                if let (Some(k), Some(v)) = (p[0].as_str(), p[1].as_str()) {
                    l.insert(k.to_string(), Value::String(v.to_string()));
                }
            }
        }
        ev.insert("labels".into(), Value::Object(l));
        match serde_json::from_value::<AuditEvent>(Value::Object(ev)) {
            Ok(e) => out.push(e),
            Err(e) => return Err(format!("an event from ClickHouse does not read: {e}")),
        }
    }
    Ok(out)
}
