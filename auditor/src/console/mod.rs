//! The web console (`console` in the configuration): approvers sign in with OpenID
//! Connect, see held statements live, approve, deny or grant a window; investigators replay
//! sessions from the trail.
//!
//! Served by the daemon on a thread of its own (a slow browser never touches the proxy's
//! threads), HTTP/1.1 with hyper, HTTPS with `console.tls` or behind a terminating proxy.
//! Every page but the login itself needs a signed-in session: an opaque random cookie
//! (`HttpOnly`, `SameSite=Lax`, `Secure` and `__Host-` over HTTPS) naming a session kept
//! in memory (a restart signs everyone out). Every form carries the session's CSRF token
//! and is refused from another origin. Pages are rendered on the server ([`html`]); one
//! script keeps the pending list current from a server-sent event stream.

pub mod html;
pub mod http;
pub mod oidc;
pub mod trail;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, Limited};
use hyper::{body::Incoming, header, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest, Sha256};

use crate::{
    approvals::{Approver, DecideError, Hub},
    config::{Config, ConsoleConfig},
};
use html::{Tab, Viewer};

type Body = BoxBody<Bytes, Infallible>;

/// Logins started and not finished: at most this many (the oldest go first).
const MAX_LOGINS: usize = 1024;
const LOGIN_TTL: Duration = Duration::from_secs(600);
/// Signed-in sessions kept at most.
const MAX_SESSIONS: usize = 4096;
/// Form bodies are small.
const MAX_FORM: usize = 64 * 1024;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;
/// Sessions the sessions page lists.
const SESSIONS_LISTED: usize = 200;

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

/// Checks `console` as the configuration is loaded.
pub fn validate(cfg: &ConsoleConfig) -> Result<(), (&'static str, String)> {
    let Some(listen) = cfg.listen else {
        return Ok(());
    };
    let Some(oidc) = &cfg.oidc else {
        return Err((
            "oidc",
            "the console needs an identity provider (console.oidc: issuer, client_id)".into(),
        ));
    };
    let issuer: hyper::Uri = oidc
        .issuer
        .parse()
        .map_err(|_| ("oidc.issuer", format!("{} is not a URL", oidc.issuer)))?;
    match issuer.scheme_str() {
        Some("https") => {}
        Some("http") if is_loopback_host(issuer.host().unwrap_or("")) => {}
        _ => {
            return Err((
                "oidc.issuer",
                format!(
                    "{} must be https (http only for an issuer on a loopback address)",
                    oidc.issuer
                ),
            ))
        }
    }
    if oidc.client_id.trim().is_empty() {
        return Err(("oidc.client_id", "must not be empty".into()));
    }
    let public = public_url(cfg, listen)?;
    if !public.secure && !is_loopback_host(&public.host) {
        return Err((
            "public_url",
            format!(
                "{} is plain http on a non-loopback address: sign-ins and session cookies \
                 would cross the network in clear. Give console.tls, or the https URL of the \
                 TLS-terminating proxy in front of the console",
                public.base
            ),
        ));
    }
    if let Some(m) = cfg.session_minutes {
        if !(1..=7 * 24 * 60).contains(&m) {
            return Err(("session_minutes", format!("{m} must be 1 to 10080")));
        }
    }
    for a in &cfg.allow {
        if !(a.starts_with("oidc:") || a.starts_with("oidc-group:")) {
            return Err((
                "allow",
                format!("`{a}` is not oidc:NAME or oidc-group:NAME"),
            ));
        }
    }
    Ok(())
}

fn is_loopback_host(h: &str) -> bool {
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .map(|a| a.is_loopback())
            .unwrap_or(false)
}

#[derive(Debug, Clone)]
struct PublicUrl {
    /// `https://auditor.example.com` (no trailing slash).
    base: String,
    /// `scheme://host[:port]`, what browsers send as `Origin`.
    origin: String,
    host: String,
    secure: bool,
}

fn public_url(
    cfg: &ConsoleConfig,
    listen: SocketAddr,
) -> Result<PublicUrl, (&'static str, String)> {
    let text = match &cfg.public_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => format!(
            "{}://{listen}",
            if cfg.tls.is_some() { "https" } else { "http" }
        ),
    };
    let uri: hyper::Uri = text
        .parse()
        .map_err(|_| ("public_url", format!("{text} is not a URL")))?;
    let secure = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(("public_url", format!("{text} is not an http(s) URL"))),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| ("public_url", format!("{text} has no host")))?;
    Ok(PublicUrl {
        origin: format!("{}://{}", if secure { "https" } else { "http" }, authority),
        host: authority.host().to_string(),
        base: text,
        secure,
    })
}

struct PendingLogin {
    challenge: oidc::Challenge,
    return_to: String,
    at: Instant,
}

struct WebSession {
    approver: Approver,
    csrf: String,
    until: Instant,
}

/// The console's state, shared by its connections.
pub struct Console {
    hub: Option<Arc<Hub>>,
    provider: oidc::Provider,
    public: PublicUrl,
    allow: Vec<String>,
    session_ttl: Duration,
    /// Where sessions are replayed from.
    trail: trail::Trail,
    host: String,
    logins: Mutex<HashMap<String, PendingLogin>>,
    /// By the SHA-256 of the cookie's token (the token itself is not kept).
    sessions: Mutex<HashMap<[u8; 32], WebSession>>,
}

/// The console, bound and ready to serve.
pub struct Bound {
    listener: std::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    console: Arc<Console>,
}

impl Bound {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds the console of the configuration (None when it is not configured). Errors are
/// the daemon's: a console asked for and not served stops the start.
pub fn bind(cfg: &Config, hub: Option<Arc<Hub>>) -> Result<Option<Bound>, String> {
    let c = &cfg.console;
    let Some(listen) = c.listen else {
        return Ok(None);
    };
    validate(c).map_err(|(f, e)| format!("console.{f}: {e}"))?;
    let oidc_cfg = c.oidc.clone().expect("validated");
    let provider = oidc::Provider::new(oidc_cfg).map_err(|e| format!("console.oidc: {e}"))?;
    let public = public_url(c, listen).map_err(|(f, e)| format!("console.{f}: {e}"))?;
    let tls = match &c.tls {
        Some(t) => {
            let chain = crate::proxy::tls::certs(&t.cert)?;
            use rustls_pki_types::pem::PemObject;
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&t.key)
                .map_err(|e| format!("console.tls.key {}: {e}", t.key.display()))?;
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut server = rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .map_err(|e| format!("console.tls: {e}"))?;
            server.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
        }
        None => None,
    };
    let listener =
        std::net::TcpListener::bind(listen).map_err(|e| format!("console.listen {listen}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("console.listen {listen}: {e}"))?;
    let trail = if cfg.clickhouse.enabled {
        trail::Trail::ClickHouse(cfg.clickhouse.clone())
    } else if cfg.local_log.enabled {
        trail::Trail::Local(cfg.log_dir())
    } else {
        trail::Trail::None
    };
    Ok(Some(Bound {
        listener,
        tls,
        console: Arc::new(Console {
            hub,
            provider,
            public,
            allow: c.allow.clone(),
            session_ttl: Duration::from_secs(c.session_minutes.unwrap_or(480) * 60),
            trail,
            host: cfg.host_name(),
            logins: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }),
    }))
}

/// Serves the console on a thread of its own until the process ends.
pub fn spawn(bound: Bound) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("console".into())
        .spawn(move || runtime.block_on(serve(bound)))?;
    Ok(())
}

async fn serve(bound: Bound) {
    let Bound {
        listener,
        tls,
        console,
    } = bound;
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("console: cannot serve: {e}");
            return;
        }
    };
    tracing::info!(
        "console on {} ({}), signing in through {}",
        listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        console.public.base,
        console.provider.issuer()
    );
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("console: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(stream); // too many: the browser retries
            continue;
        };
        let console = console.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let console = console.clone();
                async move { Ok::<_, Infallible>(console.handle(req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(20))
                .max_buf_size(64 * 1024);
            match tls {
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(Duration::from_secs(20), acceptor.accept(stream))
                            .await
                    else {
                        return;
                    };
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type.parse().expect("static"));
    r
}

fn redirect(to: &str) -> Response<Body> {
    let mut r = full(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(v) = to.parse() {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Headers every answer carries: no framing, no sniffing, no caching, no referrer to other
/// sites, and
/// scripts and styles only from the console itself.
fn harden(r: &mut Response<Body>) {
    let h = r.headers_mut();
    let set = |h: &mut hyper::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, hyper::header::HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    // same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on the
    // console's own forms, and the origin check below needs the real one.
    set(h, "referrer-policy", "same-origin");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
}

fn cookie<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A path of this console to go back to after signing in (nothing else: no open
/// redirect).
fn local_path(p: &str) -> String {
    if p.starts_with('/') && !p.starts_with("//") && !p.contains('\\') && !p.starts_with("/login") {
        p.to_string()
    } else {
        "/requests".into()
    }
}

fn token_key(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Server-sent events: a body fed by a channel.
struct EventBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

fn sse(event: &str, html: &str) -> Bytes {
    let mut s = format!("event: {event}\n");
    for line in html.split('\n') {
        s.push_str("data: ");
        s.push_str(line.trim_end_matches('\r'));
        s.push('\n');
    }
    s.push('\n');
    Bytes::from(s)
}

impl Console {
    fn session_cookie(&self) -> &'static str {
        if self.public.secure {
            "__Host-auditor_session"
        } else {
            "auditor_session"
        }
    }

    fn cookie_attrs(&self) -> &'static str {
        if self.public.secure {
            "; Path=/; HttpOnly; SameSite=Lax; Secure"
        } else {
            "; Path=/; HttpOnly; SameSite=Lax"
        }
    }

    fn redirect_uri(&self) -> String {
        format!("{}/callback", self.public.base)
    }

    /// The signed-in session of a request: its approver and CSRF token.
    fn session(&self, req: &Request<Incoming>) -> Option<(Approver, String)> {
        let token = cookie(req, self.session_cookie())?;
        let key = token_key(token);
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(&key) {
            Some(s) if s.until > Instant::now() => Some((s.approver.clone(), s.csrf.clone())),
            Some(_) => {
                sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    fn page(
        &self,
        status: StatusCode,
        title: &str,
        v: Option<&Viewer<'_>>,
        tab: Tab,
        body: &str,
    ) -> Response<Body> {
        full(
            status,
            "text/html; charset=utf-8",
            html::page(title, &self.host, v, tab, body),
        )
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let mut r = self.route(req).await;
        harden(&mut r);
        r
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let method = req.method().clone();
        // Open to anyone: the sign-in, its static parts, and a health check.
        match (&method, path.as_str()) {
            (&Method::GET, "/static/console.css") => {
                let mut r = full(StatusCode::OK, "text/css; charset=utf-8", CSS);
                r.headers_mut().insert(
                    header::CACHE_CONTROL,
                    "max-age=300".parse().expect("static"),
                );
                return r;
            }
            (&Method::GET, "/static/console.js") => {
                let mut r = full(StatusCode::OK, "text/javascript; charset=utf-8", JS);
                r.headers_mut().insert(
                    header::CACHE_CONTROL,
                    "max-age=300".parse().expect("static"),
                );
                return r;
            }
            (&Method::GET, "/healthz") => return full(StatusCode::OK, "text/plain", "ok\n"),
            (&Method::GET, "/login") => return self.login(&req).await,
            (&Method::GET, "/callback") => return self.callback(&req).await,
            _ => {}
        }
        let Some((approver, csrf)) = self.session(&req) else {
            if method == Method::GET && path != "/events" {
                let back = match req.uri().path_and_query() {
                    Some(pq) => local_path(pq.as_str()),
                    None => "/requests".into(),
                };
                let to = format!(
                    "/login?{}",
                    form_urlencoded::Serializer::new(String::new())
                        .append_pair("return", &back)
                        .finish()
                );
                return redirect(&to);
            }
            return full(
                StatusCode::UNAUTHORIZED,
                "text/plain; charset=utf-8",
                "not signed in\n",
            );
        };
        let v = Viewer {
            approver: &approver,
            csrf: &csrf,
        };
        if method == Method::POST {
            return self.post(req, &path, &v).await;
        }
        if method != Method::GET && method != Method::HEAD {
            return full(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "method not allowed\n",
            );
        }
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match segments.as_slice() {
            [""] => redirect("/requests"),
            ["requests"] => self.requests_page(&v),
            ["requests", id] => self.request_page(id, &v),
            ["grants"] => self.grants_page(&v),
            ["sessions"] => self.sessions_page(&v).await,
            ["sessions", id] => self.replay_page(id, &v).await,
            ["events"] => self.events(&req),
            _ => self.page(
                StatusCode::NOT_FOUND,
                "Not found",
                Some(&v),
                Tab::None,
                &html::message(
                    "Not found",
                    "No such page.",
                    Some(("/requests", "Requests")),
                ),
            ),
        }
    }

    async fn login(self: &Arc<Self>, req: &Request<Incoming>) -> Response<Body> {
        let meta = match self.provider.metadata().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("console: sign-in: {e}");
                return self.page(
                    StatusCode::BAD_GATEWAY,
                    "Cannot sign in",
                    None,
                    Tab::None,
                    &html::message(
                        "Cannot sign in",
                        &format!("The identity provider cannot be reached: {e}"),
                        Some(("/login", "Try again")),
                    ),
                );
            }
        };
        let challenge = oidc::Challenge::new();
        let url = self
            .provider
            .authorize_url(&meta, &self.redirect_uri(), &challenge);
        let state = challenge.state.clone();
        {
            let mut logins = self.logins.lock().unwrap_or_else(|e| e.into_inner());
            logins.retain(|_, l| l.at.elapsed() < LOGIN_TTL);
            if logins.len() >= MAX_LOGINS {
                if let Some(oldest) = logins
                    .iter()
                    .min_by_key(|(_, l)| l.at)
                    .map(|(k, _)| k.clone())
                {
                    logins.remove(&oldest);
                }
            }
            logins.insert(
                state.clone(),
                PendingLogin {
                    challenge,
                    return_to: local_path(&query_param(req, "return").unwrap_or_default()),
                    at: Instant::now(),
                },
            );
        }
        let mut r = redirect(&url);
        // The login is bound to this browser: the callback must come back with it.
        let c = format!(
            "auditor_login={state}; Path=/callback; Max-Age=600; HttpOnly; SameSite=Lax{}",
            if self.public.secure { "; Secure" } else { "" }
        );
        if let Ok(v) = c.parse() {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
        r
    }

    async fn callback(self: &Arc<Self>, req: &Request<Incoming>) -> Response<Body> {
        let fail = |why: String| {
            tracing::warn!("console: sign-in refused: {why}");
            self.page(
                StatusCode::FORBIDDEN,
                "Sign-in refused",
                None,
                Tab::None,
                &html::message("Sign-in refused", &why, Some(("/login", "Sign in again"))),
            )
        };
        if let Some(e) = query_param(req, "error") {
            let d = query_param(req, "error_description").unwrap_or_default();
            return fail(format!("the identity provider says {e} {d}"));
        }
        let (Some(code), Some(state)) = (query_param(req, "code"), query_param(req, "state"))
        else {
            return fail("the identity provider's answer has no code or state".into());
        };
        let bound = cookie(req, "auditor_login").unwrap_or("");
        if !oidc::constant_eq(bound.as_bytes(), state.as_bytes()) {
            return fail(
                "this sign-in was not started in this browser (or took longer than 10 minutes)"
                    .into(),
            );
        }
        let pending = self
            .logins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&state);
        let Some(pending) = pending.filter(|p| p.at.elapsed() < LOGIN_TTL) else {
            return fail("this sign-in is unknown or expired".into());
        };
        let approver = match self
            .provider
            .exchange(&code, &pending.challenge, &self.redirect_uri())
            .await
        {
            Ok(a) => a,
            Err(e) => return fail(e.to_string()),
        };
        if !self.allow.is_empty() && !approver.may_approve(&self.allow) {
            return fail(format!(
                "{} may not use this console (console.allow)",
                approver.display()
            ));
        }
        let token = oidc::random_token();
        let csrf = oidc::random_token();
        {
            let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            sessions.retain(|_, s| s.until > now);
            if sessions.len() >= MAX_SESSIONS {
                if let Some(k) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.until)
                    .map(|(k, _)| *k)
                {
                    sessions.remove(&k);
                }
            }
            sessions.insert(
                token_key(&token),
                WebSession {
                    approver: approver.clone(),
                    csrf,
                    until: now + self.session_ttl,
                },
            );
        }
        tracing::info!(who = %approver.display(), "console: signed in");
        let mut r = redirect(&pending.return_to);
        let h = r.headers_mut();
        let session = format!(
            "{}={token}{}; Max-Age={}",
            self.session_cookie(),
            self.cookie_attrs(),
            self.session_ttl.as_secs()
        );
        if let Ok(v) = session.parse() {
            h.append(header::SET_COOKIE, v);
        }
        if let Ok(v) = "auditor_login=; Path=/callback; Max-Age=0; HttpOnly; SameSite=Lax".parse() {
            h.append(header::SET_COOKIE, v);
        }
        r
    }

    fn requests_page(&self, v: &Viewer<'_>) -> Response<Body> {
        let (pending, recent) = match &self.hub {
            Some(h) => {
                let all = h.list(true);
                let (p, r): (Vec<_>, Vec<_>) = all
                    .into_iter()
                    .partition(|r| r.state == crate::approvals::State::Pending);
                (p, r)
            }
            None => (Vec::new(), Vec::new()),
        };
        let mut body = String::new();
        if let Some(down) = self.hub.as_ref().and_then(|h| h.store_down()) {
            body.push_str(&format!(
                "<p class=\"alert\">{}: requests cannot be decided until it answers \
                 (held statements are refused at their timeout).</p>",
                html::esc(&down)
            ));
        }
        body.push_str(&html::requests(
            &html::pending(&pending, v),
            &recent,
            self.hub.is_some(),
        ));
        self.page(StatusCode::OK, "Requests", Some(v), Tab::Requests, &body)
    }

    fn request_page(&self, id: &str, v: &Viewer<'_>) -> Response<Body> {
        let found = self.hub.as_ref().map(|h| h.find(id));
        match found {
            Some(Ok(r)) => self.page(
                StatusCode::OK,
                &format!("Request {}", r.id),
                Some(v),
                Tab::Requests,
                &html::request_card(&r, v, false),
            ),
            Some(Err(e)) => self.decide_error(e, v),
            None => self.decide_error(DecideError::NotFound(id.to_string()), v),
        }
    }

    fn grants_page(&self, v: &Viewer<'_>) -> Response<Body> {
        let list = self
            .hub
            .as_ref()
            .map(|h| h.grants(true))
            .unwrap_or_default();
        self.page(
            StatusCode::OK,
            "Grants",
            Some(v),
            Tab::Grants,
            &html::grants(&list, v),
        )
    }

    fn decide_error(&self, e: DecideError, v: &Viewer<'_>) -> Response<Body> {
        let status = match e {
            DecideError::NotFound(_) => StatusCode::NOT_FOUND,
            DecideError::NotAnApprover { .. } | DecideError::OwnRequest { .. } => {
                StatusCode::FORBIDDEN
            }
            DecideError::Decided { .. } | DecideError::Gone(_) | DecideError::Ambiguous(..) => {
                StatusCode::CONFLICT
            }
            DecideError::Full | DecideError::Grant(_) => StatusCode::BAD_REQUEST,
            DecideError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let text = e
            .to_string()
            .replace("`auditor approvals list --all`", "the requests page");
        self.page(
            status,
            "Not done",
            Some(v),
            Tab::Requests,
            &html::message(
                "Not done",
                &text,
                Some(("/requests", "Back to the requests")),
            ),
        )
    }

    async fn post(&self, req: Request<Incoming>, path: &str, v: &Viewer<'_>) -> Response<Body> {
        // Forms from this console only: the Origin (browsers send it on every POST) and the
        // session's token.
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            if origin.to_str().ok() != Some(self.public.origin.as_str()) {
                return full(
                    StatusCode::FORBIDDEN,
                    "text/plain; charset=utf-8",
                    "a form from another origin\n",
                );
            }
        }
        let body = match Limited::new(req.into_body(), MAX_FORM).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return full(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain; charset=utf-8",
                    "form too large\n",
                )
            }
        };
        let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
        let token = form.get("csrf").map(String::as_str).unwrap_or("");
        if !oidc::constant_eq(token.as_bytes(), v.csrf.as_bytes()) {
            return full(
                StatusCode::FORBIDDEN,
                "text/plain; charset=utf-8",
                "this form is not from your session (reload the page)\n",
            );
        }
        let reason = form
            .get("reason")
            .map(|r| r.trim().chars().take(500).collect::<String>())
            .filter(|r| !r.is_empty());
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if segments == ["logout"] {
            return self.logout(v);
        }
        let Some(hub) = &self.hub else {
            return self.decide_error(DecideError::NotFound(path.to_string()), v);
        };
        let who = v.approver.display();
        let done = match segments.as_slice() {
            ["requests", id, "approve"] => hub.decide_any(id, v.approver, true, reason).await.map(|r| {
                tracing::info!(request = %r.id, by = %who, rule = %format!("{}/{}", r.policy, r.rule), "approvals: approved in the console");
            }),
            ["requests", id, "deny"] => hub.decide_any(id, v.approver, false, reason).await.map(|r| {
                tracing::info!(request = %r.id, by = %who, rule = %format!("{}/{}", r.policy, r.rule), "approvals: denied in the console");
            }),
            ["requests", id, "grant"] => {
                let minutes: u64 = form
                    .get("minutes")
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(30);
                hub.grant_request_any(id, v.approver, minutes.saturating_mul(60), reason)
                    .await
                    .map(|(r, g)| {
                        tracing::info!(request = %r.id, grant = %g.id, by = %who, "approvals: approved with a grant in the console");
                    })
            }
            ["grants", id, "revoke"] => hub.revoke_any(id, v.approver).await.map(|g| {
                tracing::info!(grant = %g.id, by = %who, "approvals: grant revoked in the console");
            }),
            _ => Err(DecideError::NotFound(path.to_string())),
        };
        match done {
            Ok(()) if segments.first() == Some(&"grants") => redirect("/grants"),
            Ok(()) => redirect("/requests"),
            Err(e) => self.decide_error(e, v),
        }
    }

    fn logout(&self, v: &Viewer<'_>) -> Response<Body> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| s.csrf != v.csrf);
        let mut r = self.page(
            StatusCode::OK,
            "Signed out",
            None,
            Tab::None,
            &html::message(
                "Signed out",
                "You are signed out.",
                Some(("/login", "Sign in")),
            ),
        );
        let c = format!(
            "{}={}; Max-Age=0",
            self.session_cookie(),
            self.cookie_attrs()
        );
        if let Ok(h) = c.parse() {
            r.headers_mut().append(header::SET_COOKIE, h);
        }
        r
    }

    /// The pending list, live: the whole fragment at each change of the hub (and a comment
    /// every 15 s, so that proxies keep the stream open). Ends with the session.
    fn events(self: &Arc<Self>, req: &Request<Incoming>) -> Response<Body> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let console = self.clone();
        let token = cookie(req, self.session_cookie()).unwrap_or("").to_string();
        tokio::spawn(async move {
            let mut changed = console.hub.as_ref().map(|h| h.changed.subscribe());
            loop {
                let Some((approver, csrf)) = console.session_of(&token) else {
                    let _ = tx
                        .send(Bytes::from_static(b"event: signed_out\ndata: \n\n"))
                        .await;
                    return;
                };
                let list = console
                    .hub
                    .as_ref()
                    .map(|h| h.list(false))
                    .unwrap_or_default();
                let v = Viewer {
                    approver: &approver,
                    csrf: &csrf,
                };
                if tx
                    .send(sse("pending", &html::pending(&list, &v)))
                    .await
                    .is_err()
                {
                    return;
                }
                loop {
                    let wait = async {
                        match changed.as_mut() {
                            Some(c) => c.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        alive = wait => {
                            if !alive { return; }
                            // Let a burst of changes land before rendering.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            if let Some(c) = changed.as_mut() { c.borrow_and_update(); }
                            break;
                        }
                        _ = tokio::time::sleep(Duration::from_secs(15)) => {
                            if tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                                return;
                            }
                            if console.session_of(&token).is_none() { break; }
                        }
                    }
                }
            }
        });
        let mut r = Response::new(EventBody { rx }.boxed());
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            "text/event-stream".parse().expect("static"),
        );
        h.insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
        r
    }

    fn session_of(&self, token: &str) -> Option<(Approver, String)> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(&token_key(token))
            .filter(|s| s.until > Instant::now())
            .map(|s| (s.approver.clone(), s.csrf.clone()))
    }

    fn no_trail(&self, v: &Viewer<'_>) -> Response<Body> {
        self.page(
            StatusCode::OK,
            "Sessions",
            Some(v),
            Tab::Sessions,
            &html::message(
                "Sessions",
                "Session replay reads ClickHouse or the local log, and this host writes \
                 neither (clickhouse.enabled and local_log.enabled are false).",
                None,
            ),
        )
    }

    async fn sessions_page(&self, v: &Viewer<'_>) -> Response<Body> {
        if matches!(self.trail, trail::Trail::None) {
            return self.no_trail(v);
        }
        match self.trail.sessions().await {
            Ok(rows) => self.page(
                StatusCode::OK,
                "Sessions",
                Some(v),
                Tab::Sessions,
                &html::sessions(&rows, &self.trail.describe(&self.host)),
            ),
            Err(e) => self.trail_error(e, v),
        }
    }

    async fn replay_page(&self, id: &str, v: &Viewer<'_>) -> Response<Body> {
        if matches!(self.trail, trail::Trail::None) {
            return self.no_trail(v);
        }
        match self.trail.events(id).await {
            Ok(events) if !events.is_empty() => {
                let sid = events[0].session_id.to_string();
                self.page(
                    StatusCode::OK,
                    &format!("Session {sid}"),
                    Some(v),
                    Tab::Sessions,
                    &html::replay(&sid, &events),
                )
            }
            Ok(_) => self.page(
                StatusCode::NOT_FOUND,
                "No such session",
                Some(v),
                Tab::Sessions,
                &html::message(
                    "No such session",
                    &format!("No session {id} in {}.", self.trail.describe(&self.host)),
                    Some(("/sessions", "Sessions")),
                ),
            ),
            Err(e) => self.trail_error(e, v),
        }
    }

    fn trail_error(&self, e: String, v: &Viewer<'_>) -> Response<Body> {
        self.page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Sessions",
            Some(v),
            Tab::Sessions,
            &html::message("The trail cannot be read", &e, None),
        )
    }
}

/// The sessions of the local log, newest first.
fn session_rows(dir: &std::path::Path) -> Result<Vec<html::SessionRow>, crate::cli::CliError> {
    use crate::audit::event::EventKind;
    let mut by_id: HashMap<String, html::SessionRow> = HashMap::new();
    let mut order: Vec<String> = Vec::new();
    let read = crate::cli::read_events(dir, |ev| {
        if ev.session_id.is_empty() {
            return;
        }
        let s = by_id.entry(ev.session_id.to_string()).or_insert_with(|| {
            order.push(ev.session_id.to_string());
            html::SessionRow {
                id: ev.session_id.to_string(),
                first_ts: ev.ts.to_string(),
                ..Default::default()
            }
        });
        s.last_ts = ev.ts.to_string();
        if s.who.is_empty() {
            s.who = format!("{}[{}]", ev.comm, ev.pid);
            s.workload = ev.workload.to_string();
            s.db = format!("{}@{}", ev.db_user, ev.database);
            s.app = ev.application_name.to_string();
        }
        match ev.kind {
            EventKind::Statement => {
                s.statements += 1;
                if !ev.error_code.is_empty() {
                    s.errors += 1;
                }
            }
            EventKind::ApprovalRequested => s.held += 1,
            EventKind::Gap => s.gaps += 1,
            EventKind::SessionEnd => s.ended = true,
            _ => {}
        }
    });
    match read {
        Ok(_) => {}
        Err(crate::cli::CliError::NoLog(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    Ok(order
        .iter()
        .rev()
        .take(SESSIONS_LISTED)
        .filter_map(|id| by_id.remove(id))
        .collect())
}

/// A session's events in the order they were written (a unique prefix of its id, of 8
/// characters or more, names it too).
fn session_events(
    dir: &std::path::Path,
    id: &str,
) -> Result<Vec<crate::audit::event::AuditEvent>, crate::cli::CliError> {
    let mut out = Vec::new();
    let mut which: Option<String> = None;
    let read = crate::cli::read_events(dir, |ev| {
        let hit = &*ev.session_id == id || (id.len() >= 8 && ev.session_id.starts_with(id));
        if !hit || ev.session_id.is_empty() {
            return;
        }
        match &which {
            None => which = Some(ev.session_id.to_string()),
            Some(w) if w.as_str() != &*ev.session_id => return,
            Some(_) => {}
        }
        out.push(ev);
    });
    match read {
        Ok(_) => Ok(out),
        Err(crate::cli::CliError::NoLog(_)) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(listen: &str, public: Option<&str>, issuer: &str) -> ConsoleConfig {
        ConsoleConfig {
            listen: Some(listen.parse().unwrap()),
            public_url: public.map(str::to_string),
            tls: None,
            oidc: Some(crate::config::OidcConfig {
                issuer: issuer.into(),
                client_id: "auditor".into(),
                client_secret_file: None,
                scopes: None,
                username_claim: None,
                groups_claim: None,
                local_user_claim: None,
                ca_file: None,
            }),
            session_minutes: None,
            allow: Vec::new(),
        }
    }

    #[test]
    fn the_console_is_never_served_in_clear_across_the_network() {
        assert!(validate(&cfg("127.0.0.1:8443", None, "https://login.example.com")).is_ok());
        assert!(validate(&cfg(
            "0.0.0.0:8443",
            Some("https://auditor.example.com"),
            "https://login.example.com"
        ))
        .is_ok());
        let e = validate(&cfg("0.0.0.0:8443", None, "https://login.example.com")).unwrap_err();
        assert_eq!(e.0, "public_url");
        let e = validate(&cfg("127.0.0.1:8443", None, "http://login.example.com")).unwrap_err();
        assert_eq!(e.0, "oidc.issuer");
        assert!(validate(&cfg("127.0.0.1:8443", None, "http://127.0.0.1:9000")).is_ok());
        let mut c = cfg("127.0.0.1:8443", None, "https://login.example.com");
        c.oidc = None;
        assert_eq!(validate(&c).unwrap_err().0, "oidc");
        c = cfg("127.0.0.1:8443", None, "https://login.example.com");
        c.allow = vec!["alice".into()];
        assert_eq!(validate(&c).unwrap_err().0, "allow");
    }

    #[test]
    fn only_local_paths_are_returned_to() {
        assert_eq!(local_path("/sessions/abc?x=1"), "/sessions/abc?x=1");
        for bad in [
            "https://evil.example.com/",
            "//evil.example.com",
            "/\\evil",
            "",
            "/login?x",
        ] {
            assert_eq!(local_path(bad), "/requests", "{bad}");
        }
    }

    #[test]
    fn event_data_is_one_field_per_line() {
        assert_eq!(
            &sse("pending", "<p>a</p>\n<p>b</p>")[..],
            b"event: pending\ndata: <p>a</p>\ndata: <p>b</p>\n\n"
        );
    }
}
