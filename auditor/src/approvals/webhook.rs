//! Announces each new request to a webhook (`approvals.webhook`): Slack-compatible JSON
//! (`text` and `blocks`, which a Slack incoming webhook posts to its channel) with the
//! request itself under `auditor` for anything else that reads it.
//!
//! Only what the trail shows goes out: the statement as recorded (literals as `$n` unless
//! the policy records raw text), never its bind values. A webhook that fails is retried
//! twice and logged (by host only: Slack's URLs are secrets); a hold never waits on it.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use serde_json::{json, Value};

use super::Request;
use crate::{config::WebhookConfig, console::http::Client};

pub struct Webhook {
    url: zeroize::Zeroizing<String>,
    /// What logs name it by.
    host: String,
    client: Client,
    /// The console's URL, for a link to the request.
    console: Option<String>,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
}

const ATTEMPTS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(4),
];

impl Webhook {
    pub fn new(cfg: &WebhookConfig, console: Option<String>) -> Result<Webhook, String> {
        let url = match (&cfg.url, &cfg.url_file) {
            (Some(u), None) => u.trim().to_string(),
            (None, Some(p)) => std::fs::read_to_string(p)
                .map_err(|e| format!("approvals.webhook.url_file {}: {e}", p.display()))?
                .trim()
                .to_string(),
            _ => return Err("approvals.webhook: give one of url and url_file".into()),
        };
        let uri: hyper::Uri = url
            .parse()
            .map_err(|_| "approvals.webhook: not a URL".to_string())?;
        let host = uri.host().unwrap_or("").to_string();
        let loopback = host == "localhost"
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback());
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if loopback => {}
            _ => {
                return Err(format!(
                    "approvals.webhook: the URL to {host} must be https (http only to a loopback address)"
                ))
            }
        }
        Ok(Webhook {
            url: zeroize::Zeroizing::new(url),
            host,
            client: Client::new(cfg.ca_file.as_deref())?,
            console: console.map(|c| c.trim_end_matches('/').to_string()),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// The JSON posted for a request.
    pub fn payload(&self, r: &Request) -> Value {
        let decide = match &self.console {
            Some(c) => format!("<{c}/requests/{}|decide in the console>, or ", r.id),
            None => String::new(),
        };
        let text = format!(
            "auditor: a statement waits for approval on {} (request {}, rule {}/{}): {} — sent by {}. {}`auditor approvals approve {}` / `deny {}`. Refused at {} without a decision.",
            r.host,
            r.id,
            r.policy,
            r.rule,
            clip(&r.statement, 300),
            r.requester.summary(),
            decide,
            r.id,
            r.id,
            r.expires_at,
        );
        json!({
            "text": text,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": format!(
                    "*Statement waiting for approval* on `{}` (request `{}`, rule `{}/{}`)",
                    r.host, r.id, r.policy, r.rule)}},
                {"type": "section", "text": {"type": "mrkdwn",
                    "text": format!("```{}```", clip(&r.statement, 2500).replace("```", "'''"))}},
                {"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
                    "Sent by {}. {}`auditor approvals approve {}`. Refused at {} without a decision.",
                    r.requester.summary(), decide, r.id, r.expires_at)}]},
            ],
            "auditor": {
                "event": "approval_requested",
                "id": r.id,
                "host": r.host,
                "policy": r.policy,
                "rule": r.rule,
                "statement": r.statement,
                "params": r.params.len(),
                "requester": {
                    "summary": r.requester.summary(),
                    "workload": r.requester.workload,
                    "db_user": r.requester.db_user,
                    "database": r.requester.database,
                    "application_name": r.requester.application_name,
                    "pid": r.requester.pid,
                    "comm": r.requester.comm,
                    "labels": r.requester.labels,
                },
                "approvers": r.approvers,
                "created_at": r.created_at,
                "expires_at": r.expires_at,
                "console": self.console.as_ref().map(|c| format!("{c}/requests/{}", r.id)),
            },
        })
    }

    /// Posts the announcement, retrying twice.
    pub async fn announce(&self, r: Request) {
        let body = self.payload(&r).to_string();
        let mut last = String::new();
        for wait in ATTEMPTS {
            tokio::time::sleep(wait).await;
            match self.client.post_json(&self.url, body.as_bytes()).await {
                Ok((status, _)) if (200..300).contains(&status) => {
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok((status, answer)) => {
                    last = format!(
                        "answered {status} {}",
                        String::from_utf8_lossy(&answer[..answer.len().min(200)])
                    );
                    if (400..500).contains(&status) && status != 429 {
                        break; // it will not take it
                    }
                }
                // The error names the URL: say only the host.
                Err(_) => last = "unreachable".to_string(),
            }
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(request = %r.id, "approvals: the webhook at {} {last}: request not announced", self.host);
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_to_loopback() {
        let cfg = |u: &str| WebhookConfig {
            url: Some(u.into()),
            url_file: None,
            ca_file: None,
        };
        assert!(Webhook::new(&cfg("https://hooks.slack.com/services/T/B/X"), None).is_ok());
        assert!(Webhook::new(&cfg("http://127.0.0.1:9000/hook"), None).is_ok());
        assert!(Webhook::new(&cfg("http://hooks.example.com/hook"), None).is_err());
        assert!(Webhook::new(
            &WebhookConfig {
                url: None,
                url_file: None,
                ca_file: None
            },
            None
        )
        .is_err());
    }

    #[test]
    fn bind_values_never_go_out() {
        let w = Webhook::new(
            &WebhookConfig {
                url: Some("http://127.0.0.1:1/".into()),
                url_file: None,
                ca_file: None,
            },
            Some("https://auditor.example.com/".into()),
        )
        .unwrap();
        let r = Request {
            id: "3f9a1c2e7b".into(),
            state: super::super::State::Pending,
            created_at: "t0".into(),
            expires_at: "t1".into(),
            timeout_s: 60,
            policy: "agents".into(),
            rule: "deletes".into(),
            approvers: vec![],
            statement: "DELETE FROM accounts WHERE id = $1".into(),
            params: vec!["4111-1111-1111-1111".into()],
            binding: String::new(),
            requester: Default::default(),
            host: "db-1".into(),
            decided_by: None,
            decided_at: None,
            reason: None,
        };
        let p = w.payload(&r).to_string();
        assert!(!p.contains("4111"), "{p}");
        assert!(p.contains("DELETE FROM accounts WHERE id = $1"));
        assert!(p.contains("https://auditor.example.com/requests/3f9a1c2e7b"));
        assert!(p.contains("\"text\""));
    }
}
