//! The daemon's configuration (YAML). Every field has a default; an unknown or invalid field
//! stops the daemon with a message that names it.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use crate::sink::{
    clickhouse::{ClickHouseConfig, WhenSpoolFull},
    local::LocalLogConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: `{field}`: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

/// One Postgres endpoint to watch: a port, optionally only on one address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub port: u16,
    /// Only this address (IPv4 or IPv6); any address when absent.
    #[serde(default)]
    pub address: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Recording {
    /// Record SQL text as sent, literals included. Default: false (literals become $n).
    pub raw_statements: bool,
    /// Record bind parameter values as sent. Default: false (keyed hashes).
    pub raw_params: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Size of the kernel ring buffer (a power of two, at least 64 KiB). Default: 16 MiB.
    /// It is allocated once and mapped into the daemon twice (so the resident set counts
    /// it twice), and every record moves through it: a larger ring holds a longer daemon
    /// stop or a longer burst, at the cost of memory and of caches it shares with Postgres.
    pub ring_buffer_bytes: u32,
    /// Largest read or write call copied whole (2-64 MiB; with a ring smaller than twice
    /// this, half the ring, but never less than 2 MiB); what a call moves beyond it is
    /// recorded as a gap (a huge message keeps its head and its end). Default: 8 MiB (ORMs' bulk inserts and JSON documents of a few megabytes
    /// arrive whole). Linux 5.17+; before, 128 KiB per call.
    pub max_call_bytes: u32,
    /// Largest client message decoded whole (Query, Parse, Bind); a larger one is recorded
    /// from its first 64 KiB, flagged `truncated`, with its outcome. Default: 16 MiB (bulk
    /// INSERTs and long IN lists run to megabytes).
    pub max_message_bytes: u32,
    /// Take the plaintext of TLS connections at OpenSSL (uprobes on every libssl and
    /// OpenSSL-linked program on the host). Default: true. With false, TLS sessions are
    /// recorded as `tls_unreadable`.
    pub tls: bool,
    /// Scheduling niceness of the daemon (-20..19). Default: -5: under a CPU-saturating
    /// load the daemon must keep up with the kernel ring buffer, or bytes are lost (and
    /// recorded as gaps); at the default niceness a busy 2-core host starved it.
    pub nice: i32,
    /// How often the daemon drains the kernel ring buffer, in ms (1-1000), unless an eighth
    /// of it fills first or a connection opens (its process is identified at once, while
    /// it lives). Default: 10. Waking the daemon for every record instead costs a
    /// context switch per transaction: several times the auditing itself under load.
    pub drain_every_ms: u32,
    /// How long, in seconds, the capture goes on after the daemon stops or dies, for the
    /// next daemon to take over (a restart, an upgrade, a DaemonSet rollout, an OOM kill):
    /// its programs and ring buffer are pinned under `pin_dir`, keep capturing into the
    /// ring while no daemon runs, and the next daemon with the same state directory drains
    /// what they caught and continues the sessions. Past this time they go quiet (and
    /// the next start detaches them); `auditor detach` detaches them at once. 0: the
    /// capture ends with the daemon (a restart then loses what ran in between, recorded
    /// as a `capture_interrupted` gap). Default: 600.
    pub keep_while_stopped_s: u32,
    /// Where the capture that outlives the daemon is pinned (on bpffs). Default:
    /// /sys/fs/bpf/auditor/capture.
    pub pin_dir: PathBuf,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            ring_buffer_bytes: 16 << 20,
            max_call_bytes: 8 << 20,
            max_message_bytes: 16 << 20,
            tls: true,
            nice: -5,
            drain_every_ms: 10,
            keep_while_stopped_s: 600,
            pin_dir: PathBuf::from("/sys/fs/bpf/auditor/capture"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// `auto` (default): on when the daemon runs in a pod (KUBERNETES_SERVICE_HOST is
    /// set) or `kubeconfig` is given; `true`; `false`.
    pub enabled: Toggle,
    /// A kubeconfig file; default: the pod's service account (in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name, as pods' `spec.nodeName` says it. Default: the NODE_NAME
    /// environment variable (set it from the downward API), else the host name.
    pub node_name: Option<String>,
    /// How long a session whose pod the watch has not shown yet waits for it before its
    /// events are recorded without pod metadata (flagged `pod_unknown`). Default: 5000.
    pub pod_wait_ms: u32,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            enabled: Toggle::Auto,
            kubeconfig: None,
            node_name: None,
            pod_wait_ms: 5000,
        }
    }
}

/// The inline proxy of enforced workloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// `auto` (default): the proxy listens and the redirect attaches when the daemon
    /// starts (it acts only on workloads under an `enforce` policy); `false`: neither,
    /// and `enforce` policies are judged like `dry-run` ones (recorded, not enforced).
    pub enabled: Toggle,
    /// The proxy's port on 127.0.0.1 and ::1. Default: 15432.
    pub port: u16,
    /// Largest client message the proxy holds to judge (a statement, a Bind); a larger
    /// one is refused in an enforced session (fail closed). Default: 64 MiB.
    pub max_message_bytes: u32,
    /// Where the redirect is pinned (on bpffs), so that enforcement holds while the daemon
    /// restarts: the next daemon takes it over; `auditor detach` removes it. Default:
    /// /sys/fs/bpf/auditor.
    pub pin_dir: PathBuf,
    /// The proxy's threads, each serving its share of the connections on an event loop of
    /// its own. Default 0: one per four CPUs, from one to eight (enforced workloads are
    /// usually a few agents and jobs; one thread relays tens of thousands of messages a
    /// second).
    pub threads: usize,
    /// TLS through the proxy. Without it, a client's SSLRequest is answered `N`
    /// (`sslmode=prefer` goes on in plaintext on the loopback, `sslmode=require` fails).
    pub tls: Option<ProxyTlsConfig>,
}

/// The proxy's TLS: it terminates a client's TLS with this certificate when the server
/// would have accepted TLS, and originates TLS to the server on that connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyTlsConfig {
    /// PEM certificate chain offered to clients (`sslmode=verify-full` works for clients
    /// that trust its CA and dial a name or address it is issued for).
    pub cert: PathBuf,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates servers are verified against (their certificate must name the
    /// address the client dialled, or `server_name`). Without it, the server leg is
    /// encrypted but the server is not verified (as libpq's `sslmode=require`).
    #[serde(default)]
    pub server_ca: Option<PathBuf>,
    /// The name servers' certificates are checked for, instead of the dialled address.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            enabled: Toggle::Auto,
            port: 15432,
            max_message_bytes: 64 << 20,
            pin_dir: PathBuf::from("/sys/fs/bpf/auditor"),
            threads: 0,
            tls: None,
        }
    }
}

impl ProxyConfig {
    pub fn active(&self) -> bool {
        self.enabled != Toggle::False
    }
}

/// Statements held for approval (`require_approval` rules of enforce policies).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// The control socket `auditor approvals` talks to (peer credentials name the
    /// approver). Default: approvals.sock in the state directory.
    pub socket: Option<PathBuf>,
    /// A group whose members may use the socket (mode 0660); without it only root can
    /// (mode 0600). The socket's directory must be reachable by them too.
    pub socket_group: Option<String>,
    /// A Postgres database every node reaches, where requests are seen and decided across
    /// nodes. Default: none (each node's requests are decided on that node).
    pub store: Option<ApprovalsStoreConfig>,
    /// Where each new request is announced (Slack-compatible JSON). Default: nowhere.
    pub webhook: Option<WebhookConfig>,
}

/// A webhook told of each new request (a Slack incoming webhook, or anything that takes
/// its JSON: `text`, `blocks`, and the request under `auditor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The URL (https; http only to a loopback address). Or `url_file`, for a URL that is a
    /// secret (Slack's are).
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// CA certificates (PEM) besides the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// The shared approvals store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsStoreConfig {
    /// `postgres://user@host:5432/db` (add `?sslmode=require` to insist on TLS,
    /// `?sslmode=disable` for none; the default tries TLS first).
    pub url: String,
    /// A file holding the password (better than one in the URL).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificates (PEM) the server's certificate is checked against, besides the
    /// system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The schema the daemon creates and migrates. Default: auditor_approvals.
    #[serde(default)]
    pub schema: Option<String>,
}

/// The web console: approvals and session replay in a browser, behind OpenID Connect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Where to serve it, e.g. 127.0.0.1:8443. Default: not served.
    pub listen: Option<std::net::SocketAddr>,
    /// The URL people open (what the identity provider redirects back to, under
    /// `/callback`). Default: `http://<listen>`, or `https://` with `tls`. Plain `http` only
    /// on a loopback address: behind a TLS-terminating proxy, give its `https` URL.
    pub public_url: Option<String>,
    /// Serve HTTPS with this certificate and key (PEM).
    pub tls: Option<ConsoleTlsConfig>,
    /// The identity provider every page's login goes through (required with `listen`).
    pub oidc: Option<OidcConfig>,
    /// How long a login lasts, in minutes. Default: 480.
    pub session_minutes: Option<u64>,
    /// Who may sign in at all (`oidc:NAME`, `oidc-group:NAME`). Default: anyone the
    /// provider signs in for this client (restrict the client there, or here).
    pub allow: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleTlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// An OpenID Connect provider (any standard issuer: Keycloak, Dex, Okta, Entra ID,
/// Google): the authorization code flow with PKCE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The issuer URL (its `/.well-known/openid-configuration` is read).
    pub issuer: String,
    pub client_id: String,
    /// A file holding the client secret (confidential clients); without it, a public
    /// client (PKCE alone).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Scopes asked for. Default: openid, email, profile, groups.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// The ID token claim naming the person (what rules' `oidc:NAME` approvers and
    /// decisions name). Default: email (refused when `email_verified` is false).
    #[serde(default)]
    pub username_claim: Option<String>,
    /// The claim listing their groups (`oidc-group:NAME` approvers). Default: groups.
    #[serde(default)]
    pub groups_claim: Option<String>,
    /// A claim whose value is the person's login name on the hosts (e.g.
    /// preferred_username): a request sent by a process of that login is their own, and
    /// they may not approve it.
    #[serde(default)]
    pub local_user_claim: Option<String>,
    /// CA certificates (PEM) the issuer's certificate is checked against, besides the
    /// system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Toggle {
    Auto,
    #[serde(alias = "yes", alias = "on")]
    True,
    #[serde(alias = "no", alias = "off")]
    False,
}

impl KubernetesConfig {
    pub fn active(&self) -> bool {
        match self.enabled {
            Toggle::True => true,
            Toggle::False => false,
            Toggle::Auto => {
                self.kubeconfig.is_some() || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            }
        }
    }

    pub fn node(&self, host: &str) -> String {
        self.node_name
            .clone()
            .or_else(|| std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()))
            .unwrap_or_else(|| host.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the log, the parameter-hash key and the stats live. Default: /var/lib/auditor.
    pub state_dir: PathBuf,
    /// Host name written into events. Default: this machine's host name.
    pub host: Option<String>,
    /// Postgres endpoints to watch. Default: TCP port 5432 on any address.
    pub endpoints: Vec<Endpoint>,
    pub record: Recording,
    /// Directory of policy files (`*.yaml`), reloaded on change and on SIGHUP. Default:
    /// /etc/auditor/policies; when the default does not exist, no policy applies (every
    /// session is audited as `record` says). A directory set here must exist.
    pub policies_dir: Option<PathBuf>,
    /// Pod metadata from the Kubernetes API server (labels for policies, pod names).
    pub kubernetes: KubernetesConfig,
    /// The inline proxy that enforced workloads' connections are redirected into.
    pub proxy: ProxyConfig,
    /// Statements held for approval, and where approvers reach the daemon.
    pub approvals: ApprovalsConfig,
    /// The web console (approvals and session replay behind OpenID Connect).
    pub console: ConsoleConfig,
    /// Where to serve Prometheus metrics (`GET /metrics`), e.g. 0.0.0.0:9464. Default:
    /// not served.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Labels of this host, for policy selectors (`host.label/<key>`).
    pub host_labels: std::collections::BTreeMap<String, String>,
    /// Where systemd unit files are (for their `X-Auditor-Labels=`), in systemd's order.
    /// In a container, the host's directories as mounted there.
    pub systemd_unit_dirs: Vec<PathBuf>,
    pub local_log: LocalLogConfig,
    pub capture: CaptureConfig,
    pub clickhouse: ClickHouseConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            state_dir: PathBuf::from("/var/lib/auditor"),
            host: None,
            endpoints: vec![Endpoint {
                port: 5432,
                address: None,
            }],
            record: Recording::default(),
            policies_dir: None,
            kubernetes: KubernetesConfig::default(),
            proxy: ProxyConfig::default(),
            approvals: ApprovalsConfig::default(),
            console: ConsoleConfig::default(),
            metrics_listen: None,
            host_labels: Default::default(),
            systemd_unit_dirs: crate::workload::systemd::DEFAULT_UNIT_DIRS
                .iter()
                .map(PathBuf::from)
                .collect(),
            local_log: LocalLogConfig::default(),
            capture: CaptureConfig::default(),
            clickhouse: ClickHouseConfig::default(),
        }
    }
}

impl Config {
    /// Where the approvals control socket is.
    pub fn approvals_socket(&self) -> PathBuf {
        self.approvals
            .socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join("approvals.sock"))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field: &str, problem: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field: field.to_string(),
            problem,
        };
        if self.endpoints.is_empty() {
            return Err(invalid(
                "endpoints",
                "is empty: nothing would be captured (the default is port 5432)".into(),
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if e.port == 0 {
                return Err(invalid(
                    &format!("endpoints[{i}].port"),
                    "must be 1-65535".into(),
                ));
            }
        }
        let rb = self.capture.ring_buffer_bytes;
        if !rb.is_power_of_two() || rb < 64 * 1024 {
            return Err(invalid(
                "capture.ring_buffer_bytes",
                format!("{rb} must be a power of two of at least 65536"),
            ));
        }
        let call = self.capture.max_call_bytes;
        if !(MIN_CALL_BYTES..=MAX_CALL_BYTES).contains(&call) {
            return Err(invalid(
                "capture.max_call_bytes",
                format!("{call} must be between {MIN_CALL_BYTES} and {MAX_CALL_BYTES}"),
            ));
        }
        let m = self.capture.max_message_bytes;
        if !(1024..=(1 << 30)).contains(&m) {
            return Err(invalid(
                "capture.max_message_bytes",
                format!("{m} must be between 1024 and 1073741824"),
            ));
        }
        if self.capture.keep_while_stopped_s > 0
            && !self.capture.pin_dir.starts_with("/sys/fs/bpf/")
        {
            return Err(invalid(
                "capture.pin_dir",
                format!(
                    "{} is not under /sys/fs/bpf (set capture.keep_while_stopped_s: 0 to \
                     end the capture with the daemon)",
                    self.capture.pin_dir.display()
                ),
            ));
        }
        if !(1..=1000).contains(&self.capture.drain_every_ms) {
            return Err(invalid(
                "capture.drain_every_ms",
                format!("{} must be between 1 and 1000", self.capture.drain_every_ms),
            ));
        }
        if !(-20..=19).contains(&self.capture.nice) {
            return Err(invalid(
                "capture.nice",
                format!("{} must be between -20 and 19", self.capture.nice),
            ));
        }
        self.local_log
            .validate()
            .map_err(|(field, problem)| invalid(&format!("local_log.{field}"), problem))?;
        self.clickhouse
            .validate()
            .map_err(|(field, problem)| invalid(&format!("clickhouse.{field}"), problem))?;
        crate::console::validate(&self.console)
            .map_err(|(field, problem)| invalid(&format!("console.{field}"), problem))?;
        if !self.state_dir.is_absolute() {
            return Err(invalid(
                "state_dir",
                format!("{} must be an absolute path", self.state_dir.display()),
            ));
        }
        Ok(())
    }

    /// The policies directory, and whether the configuration named it.
    pub fn policies_dir(&self) -> (PathBuf, bool) {
        match &self.policies_dir {
            Some(d) => (d.clone(), true),
            None => (PathBuf::from(DEFAULT_POLICIES_DIR), false),
        }
    }

    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("log")
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.state_dir.join("spool")
    }

    pub fn stats_path(&self) -> PathBuf {
        self.state_dir.join("stats.json")
    }

    pub fn host_name(&self) -> String {
        if let Some(h) = &self.host {
            return h.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    }
}

/// Bounds of `capture.max_call_bytes`: the fewest chunks the programs take per call (2
/// MiB) and 64 MiB.
pub const MIN_CALL_BYTES: u32 =
    auditor_common::MAX_CHUNKS_PER_CALL * auditor_common::CHUNK_DATA as u32;
pub const MAX_CALL_BYTES: u32 = 64 << 20;

pub const DEFAULT_POLICIES_DIR: &str = "/etc/auditor/policies";

/// The commented default configuration (`auditor config-example`).
pub const EXAMPLE: &str = r#"# auditor configuration. Every field is optional; shown are the defaults.
state_dir: /var/lib/auditor        # log/, stats.json and the parameter-hash key live here
# host: db-1                       # host name in events (default: this machine's)
endpoints:                         # Postgres endpoints: a port, optionally one address
  - port: 5432
  # - port: 6432
  #   address: 10.0.0.5
record:
  raw_statements: false            # true: keep literals in SQL text (default: $n)
  raw_params: false                # true: keep bind values (default: keyed hashes)
# policies_dir: /etc/auditor/policies   # policy files, reloaded on change (see policies/)
# metrics_listen: 127.0.0.1:9464  # Prometheus metrics on GET /metrics (default: off)
host_labels: {}                    # e.g. {env: prod, region: eu-1}: selectors see host.label/env
systemd_unit_dirs:                 # unit files, for X-Auditor-Labels= (selectors: systemd.label/KEY)
  - /etc/systemd/system
  - /run/systemd/system
  - /usr/local/lib/systemd/system
  - /usr/lib/systemd/system
  - /lib/systemd/system
kubernetes:
  enabled: auto                    # auto: on inside a pod, or with a kubeconfig
  # kubeconfig: /etc/auditor/kubeconfig   # default: the pod's service account
  # node_name: node-1              # default: $NODE_NAME (downward API), else the host name
  pod_wait_ms: 5000                # a session waits this long for its pod to be known
proxy:
  enabled: auto                    # the inline proxy of workloads under an enforce policy
  port: 15432                      # on 127.0.0.1 and ::1; redirected connections land here
  max_message_bytes: 67108864      # larger statements are refused in enforced sessions
  pin_dir: /sys/fs/bpf/auditor     # the redirect stays here across restarts (auditor detach)
  threads: 0                       # event-loop threads; 0: one per 4 CPUs (1 to 8)
  # tls:                           # TLS through the proxy (else SSLRequest is answered N)
  #   cert: /etc/auditor/proxy.crt # presented to clients (the server's own keeps channel binding)
  #   key: /etc/auditor/proxy.key
  #   server_ca: /etc/auditor/db-ca.pem   # verify servers; without it: encrypted, unverified
# approvals:                       # statements held by require_approval rules
  # socket: /run/auditor/approvals.sock  # `auditor approvals` talks here (default: state_dir)
  # socket_group: dba              # members may use the socket (else root only)
  # webhook: {url_file: /etc/auditor/slack-webhook}   # each new request announced (Slack JSON)
  # store:                         # decide any node's requests from any node (docs/approvals.md)
  #   url: postgres://auditor@ops-db.internal:5432/ops?sslmode=require
  #   password_file: /etc/auditor/approvals-store.password
# console:                         # approvals and session replay in a browser (docs/approvals.md)
  # listen: 127.0.0.1:8443         # default: not served
  # public_url: https://auditor.example.com   # what the browser opens (http only on loopback)
  # tls: {cert: /etc/auditor/console.crt, key: /etc/auditor/console.key}
  # oidc:
  #   issuer: https://login.example.com/realms/ops
  #   client_id: auditor
  #   client_secret_file: /etc/auditor/oidc-secret   # none: a public client (PKCE alone)
  #   username_claim: email        # names approvers: oidc:alice@example.com in rules
  #   groups_claim: groups         # oidc-group:dba in rules
  #   local_user_claim: preferred_username   # their login on hosts: no approving their own
  # session_minutes: 480
  # allow: [oidc-group:dba, oidc-group:security]   # who may sign in (default: anyone the provider signs in)
local_log:
  enabled: true
  rotate_bytes: 104857600          # start a new file past 100 MiB
capture:
  ring_buffer_bytes: 16777216      # kernel ring buffer, a power of two
  max_call_bytes: 8388608          # largest read/write call copied whole (at most half the ring)
  max_message_bytes: 16777216      # larger client messages are recorded as truncated gaps
  tls: true                        # plaintext of TLS connections through uprobes on OpenSSL
  nice: -5                         # scheduling priority: keep up with the kernel under load
  drain_every_ms: 10               # drain the ring buffer this often (or when 1/8 full)
  keep_while_stopped_s: 600        # capture goes on this long after a stop, for the next daemon
  pin_dir: /sys/fs/bpf/auditor/capture  # where it is pinned meanwhile (auditor detach ends it)
clickhouse:
  enabled: false
  url: http://127.0.0.1:8123       # the HTTP interface
  database: auditor                # created if missing, with its tables and views
  user: default
  # password_file: /etc/auditor/clickhouse.password   # or password_env: VAR, or password
  retention_days: 0                # TTL on events (servers that support it); 0 = forever
  batch_rows: 100000               # an insert after this many rows,
  batch_bytes: 67108864            # or bytes,
  batch_period_ms: 1000            # or milliseconds, whichever first
  spool_max_bytes: 4294967296      # undelivered events wait on disk (state_dir/spool)
  when_spool_full: block           # block (capture waits; kernel drops become gaps) or drop (counted gap)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_is_the_default() {
        let cfg = Config::parse(EXAMPLE, Path::new("example.yaml")).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn the_deployment_configs_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let path = root.join("deploy/kubernetes/config.yaml");
        let cfg = Config::load(&path).unwrap();
        assert!(cfg.kubernetes.active());
        assert_eq!(
            cfg.policies_dir(),
            (PathBuf::from("/etc/auditor/policies"), true)
        );
        // The DaemonSet's default policy is the repository's.
        assert_eq!(
            std::fs::read_to_string(root.join("deploy/kubernetes/policies/default.yaml")).unwrap(),
            std::fs::read_to_string(root.join("policies/default.yaml")).unwrap(),
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::parse(
            "endpoints:\n  - port: 5432\n    adress: 1.2.3.4\n",
            Path::new("c.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("adress"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn invalid_values_are_named() {
        let err = Config::parse("capture:\n  ring_buffer_bytes: 1000\n", Path::new("c.yaml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("capture.ring_buffer_bytes"), "{err}");
        for call in [1 << 20, 128 << 20] {
            let err = Config::parse(
                &format!("capture:\n  max_call_bytes: {call}\n"),
                Path::new("c.yaml"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("capture.max_call_bytes"), "{err}");
        }
        // A small ring with the default per-call bound is valid (the bound halves with it).
        Config::parse(
            "capture:\n  ring_buffer_bytes: 1048576\n",
            Path::new("c.yaml"),
        )
        .unwrap();
    }
}
