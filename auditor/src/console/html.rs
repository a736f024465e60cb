//! The console's pages, rendered on the server. Every value from a request, a policy or the
//! trail goes through [`esc`]: no statement text, label or name reaches the page
//! unescaped. Scripts only from /static (the Content-Security-Policy allows nothing else).

use std::fmt::Write as _;

use crate::{
    approvals::{Approver, Grant, GrantState, Request, State},
    audit::event::{AuditEvent, EventKind},
};

/// HTML-escaped text (for element content and quoted attribute values).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Who is signed in, and the token their forms carry.
pub struct Viewer<'a> {
    pub approver: &'a Approver,
    pub csrf: &'a str,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Requests,
    Grants,
    Sessions,
    None,
}

pub fn page(title: &str, host: &str, viewer: Option<&Viewer<'_>>, tab: Tab, body: &str) -> String {
    let mut nav = String::new();
    if let Some(v) = viewer {
        let item = |t: Tab, href: &str, label: &str| {
            format!(
                "<a href=\"{href}\"{}>{label}</a>",
                if t == tab {
                    " aria-current=\"page\""
                } else {
                    ""
                }
            )
        };
        let _ = write!(
            nav,
            "<nav>{}{}{}<span class=\"who\">{}</span>\
             <form method=\"post\" action=\"/logout\" class=\"inline\">{}\
             <button type=\"submit\" class=\"link\">Sign out</button></form></nav>",
            item(Tab::Requests, "/requests", "Requests"),
            item(Tab::Grants, "/grants", "Grants"),
            item(Tab::Sessions, "/sessions", "Sessions"),
            esc(&v.approver.display()),
            csrf_field(v.csrf),
        );
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · auditor</title>\
         <link rel=\"stylesheet\" href=\"/static/console.css\">\
         <script src=\"/static/console.js\" defer></script></head>\
         <body><header><span class=\"brand\">auditor</span><span class=\"host\">{}</span>{nav}</header>\
         <main>{body}</main></body></html>\n",
        esc(title),
        esc(host),
    )
}

fn csrf_field(token: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(token)
    )
}

pub fn message(title: &str, text: &str, back: Option<(&str, &str)>) -> String {
    let mut s = format!(
        "<h1>{}</h1><p class=\"message\">{}</p>",
        esc(title),
        esc(text)
    );
    if let Some((href, label)) = back {
        let _ = write!(s, "<p><a href=\"{}\">{}</a></p>", esc(href), esc(label));
    }
    s
}

fn state_class(s: State) -> &'static str {
    match s {
        State::Pending => "pending",
        State::Approved | State::Granted => "approved",
        State::Denied => "denied",
        State::Expired | State::Withdrawn | State::Canceled => "ended",
    }
}

fn labels(map: &std::collections::BTreeMap<String, String>) -> String {
    let mut s = String::new();
    for (k, v) in map {
        let _ = write!(s, "<span class=\"label\">{}={}</span> ", esc(k), esc(v));
    }
    s
}

fn requester_rows(r: &Request) -> String {
    let q = &r.requester;
    let mut s = String::new();
    let mut row = |k: &str, v: String| {
        if !v.is_empty() {
            let _ = write!(s, "<tr><th>{}</th><td>{v}</td></tr>", esc(k));
        }
    };
    row("Requested by", esc(&q.summary()));
    row("Workload", esc(&q.workload));
    row("Labels", labels(&q.labels));
    row(
        "Session",
        format!(
            "{} as <b>{}</b> on <b>{}</b>{}",
            esc(&q.client_addr),
            esc(&q.db_user),
            esc(&q.database),
            if q.application_name.is_empty() {
                String::new()
            } else {
                format!(" (application {})", esc(&q.application_name))
            }
        ),
    );
    row("Server", esc(&q.server));
    row("Host", esc(&r.host));
    row("Rule", esc(&format!("{}/{}", r.policy, r.rule)));
    row(
        "Approvers",
        esc(&if r.approvers.is_empty() {
            "anyone signed in".to_string()
        } else {
            r.approvers.join(", ")
        }),
    );
    s
}

/// One pending request with its buttons.
pub fn request_card(r: &Request, v: &Viewer<'_>, detail_link: bool) -> String {
    let id = esc(&r.id);
    let mut s = format!(
        "<article class=\"request {}\" id=\"req-{id}\" data-id=\"{id}\">\
         <h2><a href=\"/requests/{id}\">{id}</a> <span class=\"state\">{}</span> \
         <span class=\"rule\">{}</span></h2>\
         <pre class=\"sql\">{}</pre>",
        state_class(r.state),
        r.state.as_str(),
        esc(&format!("{}/{}", r.policy, r.rule)),
        esc(&r.statement),
    );
    if !r.params.is_empty() {
        let _ = write!(s, "<p class=\"params\">Parameters: ");
        for (i, p) in r.params.iter().enumerate() {
            let _ = write!(s, "<code>${}={}</code> ", i + 1, esc(p));
        }
        s.push_str("</p>");
    }
    let _ = write!(
        s,
        "<table class=\"facts\">{}<tr><th>Waiting since</th><td>{}</td></tr>\
         <tr><th>Denied unless decided by</th><td>{}</td></tr></table>",
        requester_rows(r),
        esc(&r.created_at),
        esc(&r.expires_at)
    );
    if r.state == State::Pending {
        let may = v.approver.may_approve(&r.approvers);
        let own = v.approver.is_requester(&r.requester);
        if !may {
            s.push_str("<p class=\"note\">You are not among this rule's approvers.</p>");
        } else if own {
            s.push_str("<p class=\"note\">You sent this statement: someone else approves it.</p>");
        } else {
            let _ = write!(
                s,
                "<div class=\"decide\">\
                 <form method=\"post\" action=\"/requests/{id}/approve\">{csrf}\
                 <input name=\"reason\" placeholder=\"reason (optional)\" maxlength=\"500\">\
                 <button type=\"submit\" class=\"approve\">Approve</button></form>\
                 <form method=\"post\" action=\"/requests/{id}/deny\">{csrf}\
                 <input name=\"reason\" placeholder=\"reason (optional)\" maxlength=\"500\">\
                 <button type=\"submit\" class=\"deny\">Deny</button></form>\
                 <form method=\"post\" action=\"/requests/{id}/grant\">{csrf}\
                 <select name=\"minutes\" aria-label=\"window\">\
                 <option value=\"15\">15 minutes</option><option value=\"30\" selected>30 minutes</option>\
                 <option value=\"60\">1 hour</option><option value=\"240\">4 hours</option></select>\
                 <button type=\"submit\" class=\"grant\">Approve and grant the workload this rule</button>\
                 </form></div>",
                csrf = csrf_field(v.csrf)
            );
        }
    } else {
        let _ = write!(
            s,
            "<p class=\"outcome\">{}{}{}</p>",
            esc(r.state.as_str()),
            r.decided_by
                .as_ref()
                .map(|b| format!(" by {}", esc(b)))
                .unwrap_or_default(),
            r.reason
                .as_ref()
                .map(|b| format!(": {}", esc(b)))
                .unwrap_or_default()
        );
    }
    if !detail_link {
        s.push_str("</article>");
        return s;
    }
    s.push_str("</article>");
    s
}

/// The live part of the requests page (what the event stream replaces).
pub fn pending(list: &[Request], v: &Viewer<'_>) -> String {
    if list.is_empty() {
        return "<p class=\"empty\">No statement waits for approval.</p>".into();
    }
    let mut s = String::new();
    for r in list {
        s.push_str(&request_card(r, v, true));
    }
    s
}

pub fn requests(pending_html: &str, recent: &[Request], enforcing: bool) -> String {
    let mut s = String::from("<h1>Statements waiting for approval</h1>");
    if !enforcing {
        s.push_str(
            "<p class=\"note\">No enforce policy runs on this host (the proxy is off): \
             nothing is held here.</p>",
        );
    }
    let _ = write!(
        s,
        "<section id=\"pending\" aria-live=\"polite\">{pending_html}</section>\
         <h2>Recently decided</h2>"
    );
    if recent.is_empty() {
        s.push_str("<p class=\"empty\">None yet.</p>");
        return s;
    }
    s.push_str(
        "<table class=\"list\"><thead><tr><th>Request</th><th>Outcome</th><th>By</th>\
         <th>Rule</th><th>Statement</th><th>Requested by</th><th>Decided</th></tr></thead><tbody>",
    );
    for r in recent.iter().rev() {
        let _ = write!(
            s,
            "<tr class=\"{}\"><td><a href=\"/requests/{id}\">{id}</a></td><td>{}</td><td>{}</td>\
             <td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            state_class(r.state),
            esc(r.state.as_str()),
            esc(r.decided_by.as_deref().unwrap_or("")),
            esc(&format!("{}/{}", r.policy, r.rule)),
            esc(&clip(&r.statement, 160)),
            esc(&r.requester.summary()),
            esc(r.decided_at.as_deref().unwrap_or("")),
            id = esc(&r.id),
        );
    }
    s.push_str("</tbody></table>");
    s
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

pub fn grants(list: &[Grant], v: &Viewer<'_>) -> String {
    let mut s = String::from("<h1>Grants</h1>");
    if list.is_empty() {
        s.push_str(
            "<p class=\"empty\">No grant. Approve a request with a window to make one, or \
             <code>auditor approvals grant</code>.</p>",
        );
        return s;
    }
    s.push_str(
        "<table class=\"list\"><thead><tr><th>Grant</th><th>State</th><th>Rule</th><th>For</th>\
         <th>Tables</th><th>Until</th><th>By</th><th>Used</th><th></th></tr></thead><tbody>",
    );
    for g in list {
        let revoke = if g.state == GrantState::Active {
            format!(
                "<form method=\"post\" action=\"/grants/{}/revoke\" class=\"inline\">{}\
                 <button type=\"submit\" class=\"deny\">Revoke</button></form>",
                esc(&g.id),
                csrf_field(v.csrf)
            )
        } else {
            String::new()
        };
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{revoke}</td></tr>",
            esc(&g.id),
            esc(g.state.as_str()),
            esc(&format!("{}/{}", g.policy, g.rule)),
            esc(&g.subject_text()),
            esc(&g.tables.join(", ")),
            esc(&g.expires_at),
            esc(&g.granted_by),
            g.uses,
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// A session as the sessions list shows it.
#[derive(Debug, Default, Clone)]
pub struct SessionRow {
    pub id: String,
    pub first_ts: String,
    pub last_ts: String,
    pub who: String,
    pub workload: String,
    pub db: String,
    pub app: String,
    pub statements: u64,
    pub errors: u64,
    pub held: u64,
    pub gaps: u64,
    pub ended: bool,
}

pub fn sessions(rows: &[SessionRow], source: &str) -> String {
    let mut s = format!(
        "<h1>Sessions</h1><p class=\"note\">From {}, newest first.</p>",
        esc(source)
    );
    if rows.is_empty() {
        s.push_str("<p class=\"empty\">No session in the trail yet.</p>");
        return s;
    }
    s.push_str(
        "<table class=\"list\" id=\"sessions\"><thead><tr><th>Session</th><th>From</th><th>To</th>\
         <th>Process</th><th>Workload</th><th>As</th><th>Application</th><th>Statements</th>\
         <th>Errors</th><th>Held</th><th>Gaps</th></tr></thead><tbody>",
    );
    for r in rows {
        let _ = write!(
            s,
            "<tr><td><a href=\"/sessions/{id}\">{short}</a>{open}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td></tr>",
            esc(&r.first_ts),
            esc(&r.last_ts),
            esc(&r.who),
            esc(&r.workload),
            esc(&r.db),
            esc(&r.app),
            r.statements,
            r.errors,
            r.held,
            r.gaps,
            id = esc(&r.id),
            short = esc(&r.id.chars().take(13).collect::<String>()),
            open = if r.ended {
                ""
            } else {
                " <span class=\"open\">open</span>"
            },
        );
    }
    s.push_str("</tbody></table>");
    s
}

fn ts_ns(ts: &str) -> Option<i128> {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos())
}

/// A session's replay: its events in order, statement by statement.
pub fn replay(id: &str, events: &[AuditEvent]) -> String {
    let mut s = format!("<h1>Session <code>{}</code></h1>", esc(id));
    let Some(first) = events.first() else {
        return s;
    };
    let _ = write!(
        s,
        "<table class=\"facts\"><tr><th>Process</th><td>{} (pid {}, uid {}) {}</td></tr>\
         <tr><th>Workload</th><td>{} {}</td></tr>\
         <tr><th>As</th><td><b>{}</b> on <b>{}</b>{}</td></tr>\
         <tr><th>Connection</th><td>{}:{} → {}:{}{}</td></tr>\
         <tr><th>Host</th><td>{}</td></tr>{}</table>",
        esc(&first.comm),
        first.pid,
        first.uid,
        esc(&first.exe),
        esc(&first.workload),
        labels(
            &first
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        ),
        esc(&first.db_user),
        esc(&first.database),
        if first.application_name.is_empty() {
            String::new()
        } else {
            format!(" (application {})", esc(&first.application_name))
        },
        esc(&first.client_addr),
        first.client_port,
        esc(&first.server_addr),
        first.server_port,
        if first.tls { " (TLS)" } else { "" },
        esc(&first.host),
        if first.policy.is_empty() {
            String::new()
        } else {
            format!(
                "<tr><th>Policy</th><td>{} (version {})</td></tr>",
                esc(&first.policy),
                esc(&first.policy_version)
            )
        },
    );
    let start = ts_ns(&first.ts.to_string());
    s.push_str(
        "<table class=\"timeline\" id=\"timeline\"><thead><tr><th>#</th><th>At</th><th>+s</th>\
         <th>What</th><th>Statement</th><th>Took</th><th>Rows</th><th>Outcome</th>\
         <th>Decision</th><th>Masked</th></tr></thead><tbody>",
    );
    for ev in events {
        let ts = ev.ts.to_string();
        let offset = match (start, ts_ns(&ts)) {
            (Some(a), Some(b)) => format!("{:.3}", (b - a) as f64 / 1e9),
            _ => String::new(),
        };
        let (what, text, class) = match ev.kind {
            EventKind::SessionStart => ("connected".to_string(), String::new(), "meta"),
            EventKind::SessionEnd => ("disconnected".to_string(), String::new(), "meta"),
            EventKind::Gap => (
                "gap".to_string(),
                format!(
                    "{} bytes not captured: statements may be missing here",
                    ev.gap_bytes
                ),
                "gap",
            ),
            EventKind::Statement => (
                if ev.command.is_empty() {
                    "statement".to_string()
                } else {
                    ev.command.to_string()
                },
                ev.statement.to_string(),
                if ev.error_code.is_empty() {
                    "stmt"
                } else {
                    "error"
                },
            ),
            k => (
                k.as_str().replace('_', " "),
                ev.statement.to_string(),
                "approval",
            ),
        };
        let outcome = if !ev.error_code.is_empty() {
            format!(
                "<span class=\"err\">{} {}</span>",
                esc(&ev.error_code),
                esc(&ev.error_message)
            )
        } else if ev.kind == EventKind::Statement {
            "ok".to_string()
        } else {
            String::new()
        };
        let mut decision = String::new();
        if !ev.decision.is_empty() {
            decision.push_str(&esc(&ev.decision));
            if !ev.decision_rule.is_empty() {
                let _ = write!(decision, " ({})", esc(&ev.decision_rule));
            }
        }
        if !ev.approval_id.is_empty() {
            let _ = write!(
                decision,
                " <a href=\"/requests/{id}\">{id}</a>",
                id = esc(&ev.approval_id)
            );
        }
        if !ev.approver.is_empty() {
            let _ = write!(decision, " by {}", esc(&ev.approver));
        }
        let _ = write!(
            s,
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td><pre class=\"sql\">{}</pre>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td></tr>",
            ev.seq,
            esc(ts.get(11..23).unwrap_or(&ts)),
            offset,
            esc(&what),
            esc(&text),
            if ev.params.is_empty() {
                String::new()
            } else {
                format!(
                    "<div class=\"params\">{}</div>",
                    esc(&ev.params.iter().collect::<Vec<_>>().join(", "))
                )
            },
            if ev.kind == EventKind::Statement {
                format!("{:.3} ms", ev.duration_us as f64 / 1000.0)
            } else {
                String::new()
            },
            ev.rows.map(|r| r.to_string()).unwrap_or_default(),
            outcome,
            decision,
            esc(&ev.masked_columns.join(", ")),
        );
    }
    s.push_str("</tbody></table>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn a_hostile_statement_renders_as_text() {
        let approver = Approver::of_oidc(
            "a@example.com".into(),
            vec![],
            crate::approvals::OidcIdentity {
                issuer: "i".into(),
                subject: "s".into(),
                local_user: None,
            },
        );
        let v = Viewer {
            approver: &approver,
            csrf: "tok\"en",
        };
        let r = Request {
            id: "ab12".into(),
            state: State::Pending,
            created_at: "2026-12-02T10:00:00Z".into(),
            expires_at: "2026-12-02T10:05:00Z".into(),
            timeout_s: 300,
            policy: "p".into(),
            rule: "r".into(),
            approvers: vec![],
            statement: "DROP TABLE \"</pre><script>x()</script>\"".into(),
            params: vec!["<img src=x onerror=y()>".into()],
            binding: String::new(),
            requester: Default::default(),
            host: "h".into(),
            decided_by: None,
            decided_at: None,
            reason: None,
        };
        let html = pending(&[r], &v);
        assert!(!html.contains("<script>"));
        assert!(!html.contains("<img"));
        assert!(html.contains("&lt;/pre&gt;&lt;script&gt;"));
        assert!(html.contains("value=\"tok&quot;en\""));
        assert!(html.contains("action=\"/requests/ab12/approve\""));
    }
}
