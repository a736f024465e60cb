//! `auditor query`: named questions to the audit trail in ClickHouse, with filters.
//!
//! Every filter applies to the events table (so `--label` works for every query), values
//! are bound by the client (never pasted into SQL), and the views read the table with
//! FINAL (an event delivered twice counts once).

use std::time::Duration;

use clap::ValueEnum;

use crate::{
    config::ClickHouseConfig,
    sink::clickhouse::{client, Features},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Named {
    /// Sessions: who connected, from which workload, statements, errors, gaps.
    Sessions,
    /// Statements, newest first.
    Statements,
    /// Statements that failed, with SQLSTATE and message.
    Errors,
    /// Schema changes and grants (CREATE, ALTER, DROP, TRUNCATE, GRANT, REVOKE, COMMENT).
    Ddl,
    /// The most executed query shapes (fingerprints).
    Top,
    /// What policy rules decided on statements (would_block, would_hold, would_mask),
    /// with the rule, newest first: what a dry-run policy would have done.
    Decisions,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// Tab-separated with a header line.
    Tsv,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub since: Option<Duration>,
    pub until: Option<Duration>,
    /// key=value pairs, all required.
    pub labels: Vec<(String, String)>,
    pub db_user: Option<String>,
    pub database: Option<String>,
    pub workload: Option<String>,
    pub session: Option<String>,
    pub fingerprint: Option<String>,
    pub limit: u64,
}

/// Parses 90s, 15m, 2h, 7d (or plain seconds).
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, like 30m, 2h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        "w" => n * 7 * 86400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use s, m, h, d or w)"
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

/// Parses key=value.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?}: expected key=value, like app=payments")),
    }
}

/// The WHERE clause over the events table and the values to bind, in order.
pub fn conditions(f: &Filters, features: Features) -> (String, Vec<String>) {
    let mut conds: Vec<String> = Vec::new();
    let mut binds: Vec<String> = Vec::new();
    if let Some(age) = f.since {
        conds.push(format!("ts >= now() - {}", age.as_secs()));
    }
    if let Some(age) = f.until {
        conds.push(format!("ts <= now() - {}", age.as_secs()));
    }
    for (k, v) in &f.labels {
        if features.map {
            conds.push("labels[?] = ?".into());
            binds.push(k.clone());
            binds.push(v.clone());
        } else {
            conds.push("has(label_keys, ?) AND label_values[indexOf(label_keys, ?)] = ?".into());
            binds.push(k.clone());
            binds.push(k.clone());
            binds.push(v.clone());
        }
    }
    for (col, val) in [
        ("db_user", &f.db_user),
        ("database", &f.database),
        ("workload", &f.workload),
        ("session_id", &f.session),
        ("fingerprint", &f.fingerprint),
    ] {
        if let Some(v) = val {
            conds.push(format!("{col} = ?"));
            binds.push(v.clone());
        }
    }
    if conds.is_empty() {
        ("1".into(), binds)
    } else {
        (conds.join(" AND "), binds)
    }
}

/// The SQL of a named query (with `?` placeholders for the binds).
pub fn sql(name: Named, db: &str, f: &Filters, features: Features) -> (String, Vec<String>) {
    let (cond, binds) = conditions(f, features);
    let limit = f.limit.max(1);
    // 18.16 keeps seconds and microseconds apart (no DateTime64).
    let ts = if features.datetime64 {
        "ts AS time".to_string()
    } else {
        "concat(toString(ts), '.', substring(toString(1000000 + ts_us), 2, 6)) AS time".to_string()
    };
    let text = match name {
        Named::Sessions => format!(
            "SELECT session_id, started, last_seen, workload, db_user, database, \
             application_name, comm, pid, client_addr, tls, statements, errors, gaps \
             FROM {db}.sessions WHERE session_id IN \
             (SELECT session_id FROM {db}.events WHERE {cond}) \
             ORDER BY started DESC LIMIT {limit}"
        ),
        Named::Statements => format!(
            "SELECT {ts}, workload, db_user, database, comm, pid, command, rows, error_code, \
             duration_us, statement FROM {db}.statements WHERE {cond} \
             ORDER BY ts DESC LIMIT {limit}"
        ),
        Named::Errors => format!(
            "SELECT {ts}, workload, db_user, comm, pid, error_code, error_message, statement \
             FROM {db}.errors WHERE {cond} ORDER BY ts DESC LIMIT {limit}"
        ),
        Named::Ddl => format!(
            "SELECT {ts}, workload, db_user, database, comm, pid, command, error_code, statement \
             FROM {db}.ddl WHERE {cond} ORDER BY ts DESC LIMIT {limit}"
        ),
        Named::Decisions => format!(
            "SELECT {ts}, workload, db_user, policy, decision, decision_rule, masked_columns, \
             command, statement FROM {db}.statements WHERE decision != '' AND {cond} \
             ORDER BY ts DESC LIMIT {limit}"
        ),
        Named::Top => format!(
            "SELECT fingerprint, any(statement) AS example, count() AS executions, \
             countIf(error_code != '') AS errors, sum(duration_us) AS total_us, \
             uniqExact(workload) AS workloads FROM {db}.statements WHERE {cond} \
             GROUP BY fingerprint ORDER BY executions DESC LIMIT {limit}"
        ),
    };
    (text, binds)
}

/// Aligns tab-separated lines into columns.
pub fn align(tsv: &str) -> String {
    let rows: Vec<Vec<&str>> = tsv.lines().map(|l| l.split('\t').collect()).collect();
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut width = vec![0usize; cols];
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count().min(80));
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            let c: String = c.chars().take(80).collect();
            if i + 1 == r.len() {
                line.push_str(&c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = width[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Runs a named query against ClickHouse and prints the answer.
pub fn run(cfg: &ClickHouseConfig, name: Named, f: &Filters, format: Format) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = client(cfg)?;
        let version: String = client
            .query("SELECT version()")
            .fetch_one()
            .await
            .map_err(|e| anyhow::anyhow!("ClickHouse at {}: {e}", cfg.url))?;
        let features = Features::of_version(&version);
        let (text, binds) = sql(name, &cfg.database, f, features);
        let mut q = client.query(&text);
        for b in &binds {
            q = q.bind(b.as_str());
        }
        let fmt = match format {
            Format::Json => "JSONEachRow",
            _ => "TabSeparatedWithNames",
        };
        let mut cursor = q.fetch_bytes(fmt)?;
        let mut body = Vec::new();
        while let Some(chunk) = cursor.next().await? {
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body);
        match format {
            Format::Table => print!("{}", align(&text)),
            _ => print!("{text}"),
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_labels() {
        assert_eq!(parse_age("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_age("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(604800));
        assert!(parse_age("h").is_err() && parse_age("3y").is_err());
        assert_eq!(
            parse_label("app=payments").unwrap(),
            ("app".into(), "payments".into())
        );
        assert!(parse_label("=x").is_err() && parse_label("nolabel").is_err());
    }

    #[test]
    fn values_are_bound_not_pasted() {
        let f = Filters {
            since: Some(Duration::from_secs(3600)),
            labels: vec![("app".into(), "pay'; DROP TABLE x; --".into())],
            db_user: Some("alice".into()),
            limit: 10,
            ..Filters::default()
        };
        for v in ["18.16.1", "24.3.1"] {
            let (sql, binds) = sql(Named::Statements, "auditor", &f, Features::of_version(v));
            assert!(
                !sql.contains("DROP TABLE x") && !sql.contains("alice"),
                "{sql}"
            );
            assert!(binds.iter().any(|b| b.contains("DROP TABLE x")));
            assert_eq!(sql.matches('?').count(), binds.len(), "{sql}");
        }
    }
}
