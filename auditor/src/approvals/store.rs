//! The shared approvals store (`approvals.store`): a Postgres database every node reaches,
//! so that a statement held on one node is seen and decided from any (its CLI, its
//! console). The schema is created and migrated by the daemon (under an advisory lock, so
//! nodes starting together do not race).
//!
//! The node that holds a statement inserts its request; a decision made anywhere updates
//! the row; the holding node polls for decisions on its own requests (every
//! [`POLL`]), delivers them to the held connection and marks them delivered. A holder that
//! ends a request itself (its timeout, the client cancelling or leaving) overwrites any
//! decision not yet delivered: the row always says what happened to the statement.
//!
//! Fail closed: a node that cannot reach the store cannot learn a decision, so its held
//! statements are refused when their rule's timeout passes, saying the store was
//! unreachable; a decision asked of an unreachable store is an error, never a local
//! approval.

use std::{sync::Arc, time::Duration};

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use super::{Approver, DecideError, Request, State, Verdict};
use crate::config::ApprovalsStoreConfig;

/// How often the holding node looks for decisions (and every node refreshes its view).
pub const POLL: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A query that takes longer is an unreachable store.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Decided requests the list shows.
const RECENT: i64 = 50;

#[derive(Debug, thiserror::Error, Clone)]
#[error("the approvals store {url}: {detail}")]
pub struct StoreError {
    pub url: String,
    pub detail: String,
}

pub struct Store {
    cfg: ApprovalsStoreConfig,
    /// The URL without its password, as errors name it.
    shown: String,
    password: Option<zeroize::Zeroizing<String>>,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    schema: String,
    client: Mutex<Option<Arc<Client>>>,
}

/// The migrations, in order; the store's `migrations` table says which have run.
const MIGRATIONS: &[&str] = &[
    // 1: requests, one row per held statement, the whole request as JSON beside the
    // columns that change.
    "CREATE TABLE {s}.requests (
        id text PRIMARY KEY,
        node text NOT NULL,
        state text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL,
        body jsonb NOT NULL,
        decided_by text,
        decided_at timestamptz,
        reason text,
        delivered boolean NOT NULL DEFAULT false
     );
     CREATE INDEX requests_pending ON {s}.requests (created_at) WHERE state = 'pending';
     CREATE INDEX requests_undelivered ON {s}.requests (node) WHERE state <> 'pending' AND NOT delivered;",
    // 2: grants, applied by every node.
    "CREATE TABLE {s}.grants (
        id text PRIMARY KEY,
        node text NOT NULL,
        state text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        expires_at timestamptz NOT NULL,
        body jsonb NOT NULL,
        revoked_by text
     );",
];

fn shown_url(url: &str) -> String {
    // postgres://user:secret@host/db -> postgres://user@host/db
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl Store {
    pub fn new(cfg: &ApprovalsStoreConfig) -> Result<Store, String> {
        let password = match &cfg.password_file {
            Some(p) => {
                let s = std::fs::read_to_string(p)
                    .map_err(|e| format!("approvals.store.password_file {}: {e}", p.display()))?;
                Some(zeroize::Zeroizing::new(
                    s.trim_end_matches(['\n', '\r']).to_string(),
                ))
            }
            None => None,
        };
        cfg.url
            .parse::<tokio_postgres::Config>()
            .map_err(|e| format!("approvals.store.url: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        if let Some(p) = &cfg.ca_file {
            for c in crate::proxy::tls::certs(p)? {
                roots
                    .add(c)
                    .map_err(|e| format!("approvals.store.ca_file {}: {e}", p.display()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let schema = cfg
            .schema
            .clone()
            .unwrap_or_else(|| "auditor_approvals".to_string());
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(format!(
                "approvals.store.schema {schema:?}: lower-case letters, digits and _ only"
            ));
        }
        Ok(Store {
            shown: shown_url(&cfg.url),
            cfg: cfg.clone(),
            password,
            tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls),
            schema,
            client: Mutex::new(None),
        })
    }

    pub fn url(&self) -> &str {
        &self.shown
    }

    fn err(&self, detail: impl std::fmt::Display) -> StoreError {
        StoreError {
            url: self.shown.clone(),
            detail: detail.to_string(),
        }
    }

    /// A driver error with its causes (tokio-postgres keeps the reason in its source).
    fn pg_err(&self, e: tokio_postgres::Error) -> StoreError {
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail.push_str(&format!(": {s}"));
            source = s.source();
        }
        self.err(detail)
    }

    /// A connected client (connecting, and migrating the schema, when there is none).
    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let mut config: tokio_postgres::Config = self.cfg.url.parse().map_err(|e| self.err(e))?;
        if let Some(p) = &self.password {
            config.password(p.as_bytes());
        }
        config.application_name("auditor approvals");
        config.connect_timeout(CONNECT_TIMEOUT);
        let plain = self.cfg.url.contains("sslmode=disable");
        let client = if plain {
            let (client, conn) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls))
                .await
                .map_err(|_| self.err("no connection within 5 s"))?
                .map_err(|e| self.pg_err(e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        } else {
            let (client, conn) =
                tokio::time::timeout(CONNECT_TIMEOUT, config.connect(self.tls.clone()))
                    .await
                    .map_err(|_| self.err("no connection within 5 s"))?
                    .map_err(|e| self.pg_err(e))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        };
        self.migrate(&client).await?;
        let client = Arc::new(client);
        *guard = Some(client.clone());
        Ok(client)
    }

    async fn migrate(&self, client: &Client) -> Result<(), StoreError> {
        let s = &self.schema;
        let sql = format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('auditor approvals store {s}'));
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.migrations (
                 version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now());
             COMMIT;"
        );
        client
            .batch_execute(&sql)
            .await
            .map_err(|e| self.pg_err(e))?;
        for (i, m) in MIGRATIONS.iter().enumerate() {
            let version = i as i32 + 1;
            let sql = format!(
                "BEGIN;
                 SELECT pg_advisory_xact_lock(hashtext('auditor approvals store {s}'));
                 DO $$ BEGIN
                   IF NOT EXISTS (SELECT 1 FROM {s}.migrations WHERE version = {version}) THEN
                     EXECUTE $m${m}$m$;
                     INSERT INTO {s}.migrations (version) VALUES ({version});
                   END IF;
                 END $$;
                 COMMIT;",
                m = m.replace("{s}", s)
            );
            if let Err(e) = client.batch_execute(&sql).await {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(self.err(format!("migration {version}: {e}")));
            }
        }
        Ok(())
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(QUERY_TIMEOUT, f).await {
            Ok(r) => r.map_err(|e| self.pg_err(e)),
            Err(_) => {
                // A connection that does not answer is dropped: the next call reconnects.
                *self.client.lock().await = None;
                Err(self.err("no answer within 5 s"))
            }
        }
    }

    /// Whether the store answers (connecting, and creating or migrating its schema as the
    /// daemon would): what `auditor doctor` says.
    pub async fn ping(&self) -> Result<i64, StoreError> {
        let c = self.client().await?;
        let sql = format!(
            "SELECT count(*) FROM {}.requests WHERE state = 'pending' AND expires_at > now()",
            self.schema
        );
        let row = self.timed(c.query_one(&sql, &[])).await?;
        Ok(row.get(0))
    }

    /// Records a grant made on this node.
    pub async fn insert_grant(&self, node: &str, g: &super::Grant) -> Result<(), StoreError> {
        let c = self.client().await?;
        let body = serde_json::to_value(g).map_err(|e| self.err(e))?;
        let sql = format!(
            "INSERT INTO {}.grants (id, node, state, expires_at, body)
             VALUES ($1, $2, 'active', to_timestamp($3::float8), $4)",
            self.schema
        );
        self.timed(c.execute(&sql, &[&g.id, &node, &(g.expires_unix as f64), &body]))
            .await?;
        Ok(())
    }

    /// Revokes a grant for every node.
    pub async fn revoke_grant(&self, id: &str, by: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        let sql = format!(
            "UPDATE {}.grants SET state = 'revoked', revoked_by = $2 WHERE id = $1 AND state = 'active'",
            self.schema
        );
        self.timed(c.execute(&sql, &[&id, &by])).await?;
        Ok(())
    }

    /// Grants not over for more than an hour: active ones to apply, revoked ones to end.
    pub async fn grants(&self) -> Result<Vec<super::Grant>, StoreError> {
        let c = self.client().await?;
        let sql = format!(
            "SELECT body, state, revoked_by FROM {}.grants
             WHERE expires_at > now() - interval '1 hour' ORDER BY created_at",
            self.schema
        );
        let rows = self.timed(c.query(&sql, &[])).await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let body: serde_json::Value = row.get("body");
                let mut g: super::Grant = serde_json::from_value(body).ok()?;
                let state: String = row.get("state");
                g.state = match state.as_str() {
                    "active" => super::GrantState::Active,
                    "revoked" => super::GrantState::Revoked,
                    _ => super::GrantState::Expired,
                };
                g.revoked_by = row.get("revoked_by");
                Some(g)
            })
            .collect())
    }

    /// Records a request this node holds.
    pub async fn insert(&self, node: &str, r: &Request) -> Result<(), StoreError> {
        let c = self.client().await?;
        let body = serde_json::to_value(r).map_err(|e| self.err(e))?;
        let sql = format!(
            "INSERT INTO {}.requests (id, node, state, expires_at, body)
             VALUES ($1, $2, 'pending', now() + make_interval(secs => $3), $4)",
            self.schema
        );
        self.timed(c.execute(&sql, &[&r.id, &node, &(r.timeout_s as f64), &body]))
            .await?;
        Ok(())
    }

    fn row_request(row: &tokio_postgres::Row) -> Option<Request> {
        let body: serde_json::Value = row.get("body");
        let mut r: Request = serde_json::from_value(body).ok()?;
        let state: String = row.get("state");
        r.state = State::parse(&state)?;
        r.decided_by = row.get("decided_by");
        r.reason = row.get("reason");
        r.decided_at = row.get("decided_at_text");
        if r.state == State::Pending && row.get::<_, bool>("past") {
            // Its holder could not say: the store's clock says it is over.
            r.state = State::Expired;
            r.reason = Some("past its timeout; the holding node did not report".into());
        }
        Some(r)
    }

    fn select(&self) -> String {
        format!(
            "SELECT id, node, state, body, decided_by, reason, delivered,
                    to_char(decided_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS decided_at_text,
                    expires_at <= now() AS past
             FROM {}.requests",
            self.schema
        )
    }

    /// Pending requests of every node (oldest first); with `all`, the last decided ones
    /// before them.
    pub async fn list(&self, all: bool) -> Result<Vec<Request>, StoreError> {
        let c = self.client().await?;
        let mut out = Vec::new();
        if all {
            let sql = format!(
                "SELECT * FROM ({} WHERE state <> 'pending' OR expires_at <= now()
                 ORDER BY created_at DESC LIMIT {RECENT}) d ORDER BY decided_at_text NULLS FIRST",
                self.select()
            );
            for row in self.timed(c.query(&sql, &[])).await? {
                out.extend(Self::row_request(&row));
            }
        }
        let sql = format!(
            "{} WHERE state = 'pending' AND expires_at > now() ORDER BY created_at, id",
            self.select()
        );
        for row in self.timed(c.query(&sql, &[])).await? {
            out.extend(Self::row_request(&row));
        }
        Ok(out)
    }

    /// The request a prefix of its id names.
    pub async fn find(&self, prefix: &str) -> Result<Request, DecideError> {
        let prefix = prefix.trim().to_ascii_lowercase();
        if prefix.len() < 4 || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(DecideError::NotFound(format!(
                "{prefix} (give at least 4 hex characters of the id)"
            )));
        }
        let c = self.client().await.map_err(store_err)?;
        let sql = format!(
            "{} WHERE id LIKE $1 || '%' ORDER BY created_at DESC LIMIT 5",
            self.select()
        );
        let rows = self
            .timed(c.query(&sql, &[&prefix]))
            .await
            .map_err(store_err)?;
        match rows.as_slice() {
            [one] => Self::row_request(one).ok_or(DecideError::NotFound(prefix)),
            [] => Err(DecideError::NotFound(prefix)),
            many => Err(DecideError::Ambiguous(
                prefix,
                many.iter()
                    .map(|r| r.get::<_, String>("id"))
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }

    /// An approver's decision, made in the store: checked against the request's rule and
    /// requester as the holding node recorded them. Waits a little for the holding node to
    /// deliver it (its answer says whether the client was still there).
    pub async fn decide(
        &self,
        prefix: &str,
        approver: &Approver,
        approve: bool,
        reason: Option<String>,
    ) -> Result<Request, DecideError> {
        let r = self.find(prefix).await?;
        if r.state != State::Pending {
            return Err(DecideError::decided(&r));
        }
        r.check_decider(approver)?;
        let c = self.client().await.map_err(store_err)?;
        let state = if approve { "approved" } else { "denied" };
        let sql = format!(
            "UPDATE {}.requests SET state = $2, decided_by = $3, decided_at = now(), reason = $4
             WHERE id = $1 AND state = 'pending' AND expires_at > now()",
            self.schema
        );
        let by = approver.display();
        let n = self
            .timed(c.execute(&sql, &[&r.id, &state, &by, &reason]))
            .await
            .map_err(store_err)?;
        if n == 0 {
            // Decided, or ended by its holder, in the meantime.
            return Err(DecideError::decided(&self.find(&r.id).await?));
        }
        // The holding node delivers it within a poll or two.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let sql = format!("{} WHERE id = $1", self.select());
            if let Ok(Some(row)) = self.timed(c.query_opt(&sql, &[&r.id])).await {
                let delivered: bool = row.get("delivered");
                let now = Self::row_request(&row);
                match now {
                    Some(now) if delivered && now.state.as_str() == state => return Ok(now),
                    Some(now) if now.state == State::Withdrawn => {
                        return Err(DecideError::Gone(now.id))
                    }
                    Some(now) if now.state.as_str() != state => {
                        return Err(DecideError::Decided {
                            id: now.id.clone(),
                            state: now.state.as_str(),
                            by: now.reason.map(|b| format!(" ({b})")).unwrap_or_default(),
                        })
                    }
                    _ => {}
                }
            }
            if tokio::time::Instant::now() > deadline {
                // Recorded; the holding node has not taken it yet (it will, or its
                // timeout refuses the statement and the row says so).
                let mut done = r.clone();
                done.state = if approve {
                    State::Approved
                } else {
                    State::Denied
                };
                done.decided_by = Some(by);
                done.reason = reason;
                return Ok(done);
            }
        }
    }

    /// Decisions made elsewhere on this node's requests, not delivered yet.
    pub async fn decisions(&self, node: &str) -> Result<Vec<(String, Verdict)>, StoreError> {
        let c = self.client().await?;
        let sql = format!(
            "SELECT id, state, decided_by, reason FROM {}.requests
             WHERE node = $1 AND state IN ('approved', 'denied') AND NOT delivered",
            self.schema
        );
        let rows = self.timed(c.query(&sql, &[&node])).await?;
        Ok(rows
            .iter()
            .map(|row| {
                let id: String = row.get("id");
                let state: String = row.get("state");
                let by: String = row
                    .get::<_, Option<String>>("decided_by")
                    .unwrap_or_default();
                let reason: Option<String> = row.get("reason");
                let v = if state == "approved" {
                    Verdict::Approved { by }
                } else {
                    Verdict::Denied { by, reason }
                };
                (id, v)
            })
            .collect())
    }

    /// The holding node took the decision (or, `gone`, its client had left).
    pub async fn delivered(&self, id: &str, gone: bool) -> Result<(), StoreError> {
        let c = self.client().await?;
        let sql = if gone {
            format!(
                "UPDATE {}.requests SET delivered = true, state = 'withdrawn',
                 reason = 'the client went away before the decision' WHERE id = $1",
                self.schema
            )
        } else {
            format!(
                "UPDATE {}.requests SET delivered = true WHERE id = $1",
                self.schema
            )
        };
        self.timed(c.execute(&sql, &[&id])).await?;
        Ok(())
    }

    /// The holder ended a request itself (timeout, cancel, client gone): what the row says
    /// from now on, over any decision it had not delivered.
    pub async fn end(&self, id: &str, state: State, reason: &str) -> Result<(), StoreError> {
        let c = self.client().await?;
        let sql = format!(
            "UPDATE {}.requests SET state = $2, reason = $3, decided_by = NULL,
                    decided_at = now(), delivered = true
             WHERE id = $1 AND NOT delivered",
            self.schema
        );
        self.timed(c.execute(&sql, &[&id, &state.as_str(), &reason]))
            .await?;
        Ok(())
    }
}

fn store_err(e: StoreError) -> DecideError {
    DecideError::Store(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            shown_url("postgres://auditor:s3cret@db.internal:5432/ops?sslmode=require"),
            "postgres://auditor@db.internal:5432/ops?sslmode=require"
        );
        assert_eq!(
            shown_url("postgres://db.internal/ops"),
            "postgres://db.internal/ops"
        );
    }
}
