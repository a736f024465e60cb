//! `auditor doctor`: whether this host can run the daemon as configured, each check with
//! what to do when it fails. Nothing is changed; nothing is loaded into the kernel.

use std::{path::Path, time::Duration};

use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about it (for Warn and Fail).
    pub fix: String,
}

fn check(name: &'static str, verdict: Verdict, detail: String, fix: &str) -> Check {
    Check {
        name,
        verdict,
        detail,
        fix: fix.to_string(),
    }
}

/// The running kernel's release, as (major, minor).
fn kernel_version() -> Option<(u32, u32, String)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim().to_string();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, release))
}

/// Effective capabilities of this process (CapEff of /proc/self/status).
fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

/// The capabilities the daemon uses, with why.
const CAPABILITIES: [(u32, &str, &str); 5] = [
    (39, "CAP_BPF", "load eBPF programs and maps"),
    (38, "CAP_PERFMON", "attach tracepoints and uprobes"),
    (
        19,
        "CAP_SYS_PTRACE",
        "read other processes' exe, root and maps",
    ),
    (
        2,
        "CAP_DAC_READ_SEARCH",
        "cgroup paths from cgroup ids (open_by_handle_at)",
    ),
    (23, "CAP_SYS_NICE", "run at capture.nice below 0"),
];
const CAP_SYS_ADMIN: u32 = 21;

const CAP_NET_ADMIN: u32 = 12;

/// What enforcing needs, once an enforce policy is loaded: the capabilities of the
/// redirect and of the listeners in workloads' namespaces, the proxy's TLS files, and
/// each credential's password file (read, never shown).
fn enforcement_checks(cfg: &Config, set: &crate::policy::PolicySet) -> Vec<Check> {
    use Verdict::*;
    let mut out = Vec::new();
    let caps = effective_caps().unwrap_or(0);
    let has = |bit: u32| caps & (1u64 << bit) != 0;
    out.push(if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        check(
            "enforcement",
            Fail,
            "an enforce policy is loaded and CAP_NET_ADMIN is missing: the redirect cannot attach, so the daemon refuses to start".into(),
            "grant CAP_NET_ADMIN (deploy/ has it), or set proxy.enabled: false to record enforce policies as dry runs",
        )
    } else if !has(CAP_SYS_ADMIN) {
        check(
            "enforcement",
            Warn,
            "CAP_SYS_ADMIN is missing: the proxy cannot listen inside containers' and pods' own network namespaces, whose enforced connections are then refused".into(),
            "grant CAP_SYS_ADMIN (deploy/ has it) if enforced workloads run in containers",
        )
    } else {
        check(
            "enforcement",
            Ok,
            "CAP_NET_ADMIN and CAP_SYS_ADMIN: the redirect and the proxy's listeners in workloads' namespaces".into(),
            "",
        )
    });
    if let Some(tls) = &cfg.proxy.tls {
        out.push(match crate::proxy::tls::ProxyTls::load(tls) {
            Result::Ok(_) => check(
                "proxy tls",
                Ok,
                format!("{} and its key load", tls.cert.display()),
                "",
            ),
            Err(e) => check(
                "proxy tls",
                Fail,
                e,
                "correct proxy.tls: the daemon refuses to start with it",
            ),
        });
    }
    let holds = set.policies.iter().any(|p| {
        p.policy.mode == Some(crate::policy::Mode::Enforce) && !p.policy.require_approval.is_empty()
    });
    if holds {
        out.push(approvals_check(cfg));
        if let Some(store) = &cfg.approvals.store {
            out.push(store_check(store));
        }
        if let Some(w) = &cfg.approvals.webhook {
            out.push(match crate::approvals::webhook::Webhook::new(w, None) {
                Result::Ok(_) => check(
                    "approvals webhook",
                    Ok,
                    "new requests are announced (Slack-compatible JSON)".into(),
                    "",
                ),
                Err(e) => check(
                    "approvals webhook",
                    Fail,
                    e,
                    "correct approvals.webhook: the daemon refuses to start with it",
                ),
            });
        }
    }
    if cfg.console.listen.is_some() {
        out.push(console_check(cfg));
    }
    for p in &set.policies {
        let Some(c) = &p.policy.credential else {
            continue;
        };
        if let Some(secret) = &c.secret {
            out.push(secret_check(cfg, &p.policy.name, &c.user, secret));
            continue;
        }
        out.push(
            match crate::proxy::login::read_password(c, &Default::default()) {
                Result::Ok(_) => check(
                    "credential",
                    Ok,
                    format!(
                        "policy {}: {} is readable (role {})",
                        p.policy.name,
                        c.source(),
                        c.user
                    ),
                    "",
                ),
                Err(e) => check(
                    "credential",
                    Fail,
                    format!("policy {}: {e}", p.policy.name),
                    "its sessions are refused until the file holds the role's password",
                ),
            },
        );
    }
    out
}

pub fn run_checks(cfg: &Config) -> Vec<Check> {
    use Verdict::*;
    let mut out = Vec::new();
    match kernel_version() {
        Some((maj, min, rel)) if (maj, min) >= (5, 17) => out.push(check(
            "kernel",
            Ok,
            format!("{rel}: bpf_loop, ring buffer, CAP_BPF"),
            "",
        )),
        Some((maj, min, rel)) if (maj, min) >= (5, 8) => out.push(check(
            "kernel",
            Warn,
            format!("{rel}: no bpf_loop (5.17): each read or write is copied up to 128 KiB only; larger ones are recorded as gaps"),
            "run Linux 5.17 or later",
        )),
        Some((_, _, rel)) => out.push(check(
            "kernel",
            Fail,
            format!("{rel}: the ring buffer and CAP_BPF need Linux 5.8"),
            "run Linux 5.17 or later",
        )),
        None => out.push(check("kernel", Warn, "release unknown".into(), "")),
    }
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    out.push(if btf.exists() {
        check("BTF", Ok, btf.display().to_string(), "")
    } else {
        check(
            "BTF",
            Fail,
            "no /sys/kernel/btf/vmlinux: the programs are relocated against the kernel's BTF"
                .into(),
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distribution's is)",
        )
    });
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("events/syscalls").is_dir());
    out.push(match tracefs {
        Some(p) => check("tracefs", Ok, format!("{} (syscall tracepoints)", p.display()), ""),
        None => check(
            "tracefs",
            Fail,
            "no syscall tracepoints under /sys/kernel/tracing".into(),
            "mount it: `mount -t tracefs tracefs /sys/kernel/tracing` (in a pod: a hostPath volume, see deploy/kubernetes)",
        ),
    });
    out.push(match crate::workload::cgroup2_mount() {
        Some(p) => check("cgroup v2", Ok, format!("mounted at {}", p.display()), ""),
        None => check(
            "cgroup v2",
            Warn,
            "no cgroup2 mount: workloads are told apart by process only (no container, pod or unit)".into(),
            "boot with the unified hierarchy (systemd.unified_cgroup_hierarchy=1); in a pod, mount the host's /sys/fs/cgroup",
        ),
    });
    match effective_caps() {
        Some(caps) => {
            let has = |bit: u32| caps & (1u64 << bit) != 0;
            let missing: Vec<String> = CAPABILITIES
                .iter()
                .filter(|(bit, _, _)| !has(*bit))
                .map(|(_, name, why)| format!("{name} ({why})"))
                .collect();
            if missing.is_empty() {
                out.push(check(
                    "capabilities",
                    Ok,
                    CAPABILITIES.map(|(_, n, _)| n).join(", "),
                    "",
                ));
            } else {
                let fatal = !has(39) && !has(CAP_SYS_ADMIN) || !has(38) && !has(CAP_SYS_ADMIN);
                out.push(check(
                    "capabilities",
                    if fatal { Fail } else { Warn },
                    format!("missing {}", missing.join(", ")),
                    "run as root, or grant them (deploy/systemd/auditor.service, deploy/kubernetes/daemonset.yaml)",
                ));
            }
        }
        None => out.push(check("capabilities", Warn, "unknown".into(), "")),
    }
    let state = &cfg.state_dir;
    out.push(
        match std::fs::create_dir_all(state).and_then(|_| {
            let probe = state.join(".doctor-probe");
            std::fs::write(&probe, b"")?;
            std::fs::remove_file(&probe)
        }) {
            Result::Ok(()) => check(
                "state directory",
                Ok,
                format!("{} is writable", state.display()),
                "",
            ),
            Err(e) => check(
                "state directory",
                Fail,
                format!("{}: {e}", state.display()),
                "make it writable by the daemon, or set state_dir",
            ),
        },
    );
    if cfg.local_log.enabled {
        out.push(local_log_check(cfg));
    }
    let (dir, required) = cfg.policies_dir();
    if dir.is_dir() || required {
        let (set, report) = crate::policy::load_dir(&dir);
        out.push(if report.errors.is_empty() {
            check(
                "policies",
                if report.warnings.is_empty() { Ok } else { Warn },
                format!(
                    "{}: {} policies, version {}{}",
                    dir.display(),
                    set.policies.len(),
                    set.version,
                    if report.warnings.is_empty() {
                        String::new()
                    } else {
                        format!("; {} warning(s)", report.warnings.len())
                    }
                ),
                "see `auditor policy lint`",
            )
        } else {
            check(
                "policies",
                Fail,
                format!("{}: {}", dir.display(), report.errors[0]),
                "fix them (`auditor policy lint` lists every error): the daemon refuses to start with them",
            )
        });
        if set.any_enforce() && cfg.proxy.active() {
            out.extend(enforcement_checks(cfg, &set));
        }
    } else {
        out.push(check(
            "policies",
            Ok,
            format!(
                "no {}: every session is audited as `record` says",
                dir.display()
            ),
            "",
        ));
    }
    if cfg.kubernetes.active() {
        out.push(kubernetes_check(cfg));
    }
    if cfg.clickhouse.enabled {
        out.push(clickhouse_check(cfg));
    }
    out
}

/// Whether the local log is sealed, and private.
fn local_log_check(cfg: &Config) -> Check {
    use crate::sink::local::seal::SealingKey;
    use std::os::unix::fs::PermissionsExt;
    use Verdict::*;
    let open = [cfg.state_dir.clone(), cfg.log_dir()]
        .into_iter()
        .filter(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o077 != 0))
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>();
    let privacy = if open.is_empty() {
        String::new()
    } else {
        format!(
            "; {} can be read by other users (the daemon makes them 0700 when it starts)",
            open.join(", ")
        )
    };
    let path = crate::sink::local::key_path(&cfg.state_dir);
    match SealingKey::load(&path) {
        Result::Ok(Some(k)) => check(
            "local log",
            Ok,
            format!(
                "sealed with a forward-secure key ({}, epochs of {} s, epoch {}){privacy}",
                path.display(),
                k.epochs().interval_us() / 1_000_000,
                k.epoch()
            ),
            "",
        ),
        Result::Ok(None) => check(
            "local log",
            Warn,
            format!("chained but not sealed: no key at {}{privacy}", path.display()),
            "run `auditor log setup-keys` and keep the key it prints off this host (docs/local-log.md)",
        ),
        Err(e) => check(
            "local log",
            Fail,
            e.to_string(),
            "restore the key file, or move it away and run `auditor log setup-keys` again",
        ),
    }
}

/// Where approvers reach held statements: the control socket's place and group, and
/// whether a daemon answers there now.
fn approvals_check(cfg: &Config) -> Check {
    use Verdict::*;
    let socket = cfg.approvals_socket();
    let shown = socket.display();
    if let Some(g) = &cfg.approvals.socket_group {
        let known = crate::approvals::group_id(g).is_some();
        if !known {
            return check(
                "approvals",
                Fail,
                format!("approvals.socket_group: no group {g:?} on this host"),
                "create the group, or correct approvals.socket_group: the daemon refuses to start with it",
            );
        }
    }
    let access = match &cfg.approvals.socket_group {
        Some(g) => format!("root and group {g}"),
        None => "root only (set approvals.socket_group to let a group of approvers in)".to_string(),
    };
    match crate::approvals::cli::call(&socket, &crate::approvals::control::Call::List { all: false }) {
        Result::Ok(r) => check(
            "approvals",
            Ok,
            format!(
                "a daemon answers on {shown} ({} statements waiting); access: {access}",
                r.requests.len()
            ),
            "",
        ),
        Err(crate::approvals::cli::CliError::NotRunning(_)) => check(
            "approvals",
            Ok,
            format!("statements held for approval are decided through {shown} once the daemon runs; access: {access}"),
            "",
        ),
        Err(e) => check(
            "approvals",
            Warn,
            format!("{shown}: {e}"),
            "",
        ),
    }
}

/// Whether the shared approvals store answers (its schema created or migrated as the daemon
/// would).
fn store_check(store: &crate::config::ApprovalsStoreConfig) -> Check {
    use Verdict::*;
    let s = match crate::approvals::store::Store::new(store) {
        Result::Ok(s) => s,
        Err(e) => {
            return check(
                "approvals store",
                Fail,
                e,
                "correct approvals.store: the daemon refuses to start with it",
            )
        }
    };
    let answer = runtime().map(|rt| rt.block_on(s.ping()));
    match answer {
        Result::Ok(Result::Ok(n)) => check(
            "approvals store",
            Ok,
            format!("{} answers ({n} requests pending on all nodes)", s.url()),
            "",
        ),
        Result::Ok(Err(e)) => check(
            "approvals store",
            Fail,
            e.to_string(),
            "held statements cannot be decided (they are refused at their timeout) until it answers",
        ),
        Err(e) => check("approvals store", Fail, e.to_string(), ""),
    }
}

/// The console's configuration and its identity provider's discovery document.
fn console_check(cfg: &Config) -> Check {
    use Verdict::*;
    if let Err((field, e)) = crate::console::validate(&cfg.console) {
        return check(
            "console",
            Fail,
            format!("console.{field}: {e}"),
            "the daemon refuses to start with it",
        );
    }
    let Some(oidc) = cfg.console.oidc.clone() else {
        return check("console", Fail, "console.oidc is missing".into(), "");
    };
    let provider = match crate::console::oidc::Provider::new(oidc) {
        Result::Ok(p) => p,
        Err(e) => {
            return check(
                "console",
                Fail,
                format!("console.oidc: {e}"),
                "the daemon refuses to start with it",
            )
        }
    };
    match runtime().map(|rt| rt.block_on(provider.metadata())) {
        Result::Ok(Result::Ok(m)) => check(
            "console",
            Ok,
            format!(
                "sign-in through {} (authorization at {})",
                provider.issuer(),
                m.authorization_endpoint
            ),
            "",
        ),
        Result::Ok(Err(e)) => check(
            "console",
            Warn,
            e.to_string(),
            "nobody can sign in to the console until the provider answers",
        ),
        Err(e) => check("console", Fail, e.to_string(), ""),
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

#[cfg(not(feature = "kubernetes"))]
fn kubernetes_check(_: &Config) -> Check {
    check(
        "kubernetes",
        Verdict::Fail,
        "this build has no Kubernetes support".into(),
        "build with the `kubernetes` feature (the default)",
    )
}

#[cfg(feature = "kubernetes")]
async fn kube_client(cfg: &Config) -> Result<kube::Client, String> {
    let config = match &cfg.kubernetes.kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p).map_err(|e| e.to_string())?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| e.to_string())?
        }
        None => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

/// A credential's Secret: Kubernetes is on, and the Secret (listed by name, as the daemon
/// watches it) has the key. The value is never shown.
fn secret_check(
    cfg: &Config,
    policy: &str,
    user: &str,
    secret: &crate::policy::model::SecretRef,
) -> Check {
    if !cfg.kubernetes.active() {
        return check(
            "credential",
            Verdict::Fail,
            format!(
                "policy {policy}: its credential is in {secret}, and Kubernetes is not enabled"
            ),
            "set kubernetes.enabled (the daemon reads Secrets through the API server)",
        );
    }
    match read_secret_keys(cfg, secret) {
        Ok(Some(keys)) if keys.iter().any(|k| k == &secret.key) => check(
            "credential",
            Verdict::Ok,
            format!("policy {policy}: {secret} is readable (role {user})"),
            "",
        ),
        Ok(None) => check(
            "credential",
            Verdict::Fail,
            format!("policy {policy}: {secret} does not exist"),
            "create it; its sessions are refused until then",
        ),
        Ok(Some(keys)) => check(
            "credential",
            Verdict::Fail,
            format!(
                "policy {policy}: {secret} has no key `{}` (its keys: {})",
                secret.key,
                if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
            ),
            "correct the credential's `key`",
        ),
        Err(e) => check(
            "credential",
            Verdict::Fail,
            format!("policy {policy}: reading {secret}: {e}"),
            "RBAC must allow get, list and watch on that Secret (a Role with resourceNames, see deploy/kubernetes)",
        ),
    }
}

#[cfg(not(feature = "kubernetes"))]
fn read_secret_keys(
    _: &Config,
    _: &crate::policy::model::SecretRef,
) -> Result<Option<Vec<String>>, String> {
    Err("this build has no Kubernetes support".into())
}

/// The keys of a Secret (None: it does not exist).
#[cfg(feature = "kubernetes")]
fn read_secret_keys(
    cfg: &Config,
    secret: &crate::policy::model::SecretRef,
) -> Result<Option<Vec<String>>, String> {
    runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let client = kube_client(cfg).await?;
            let api: kube::Api<k8s_openapi::api::core::v1::Secret> =
                kube::Api::namespaced(client, &secret.namespace);
            let lp =
                kube::api::ListParams::default().fields(&format!("metadata.name={}", secret.name));
            let list = tokio::time::timeout(Duration::from_secs(10), api.list(&lp))
                .await
                .map_err(|_| "no answer in 10 s".to_string())?
                .map_err(|e| e.to_string())?;
            Ok(list
                .items
                .into_iter()
                .next()
                .map(|s| s.data.unwrap_or_default().into_keys().collect()))
        })
    })
}

#[cfg(feature = "kubernetes")]
fn kubernetes_check(cfg: &Config) -> Check {
    let node = cfg.kubernetes.node(&cfg.host_name());
    let result: Result<usize, String> = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let client = kube_client(cfg).await?;
            let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(client);
            let lp = kube::api::ListParams::default().fields(&format!("spec.nodeName={node}"));
            tokio::time::timeout(Duration::from_secs(10), pods.list(&lp))
                .await
                .map_err(|_| "no answer in 10 s".to_string())?
                .map(|l| l.items.len())
                .map_err(|e| e.to_string())
        })
    });
    match result {
        Ok(n) => check(
            "kubernetes",
            Verdict::Ok,
            format!("the API server lists {n} pods on node {node}"),
            "",
        ),
        Err(e) => check(
            "kubernetes",
            Verdict::Fail,
            format!("listing the pods of node {node}: {e}"),
            "check kubernetes.kubeconfig (or the pod's service account) and that RBAC allows get/list/watch on pods",
        ),
    }
}

fn clickhouse_check(cfg: &Config) -> Check {
    let result: Result<String, String> = runtime().map_err(|e| e.to_string()).and_then(|rt| {
        rt.block_on(async {
            let client =
                crate::sink::clickhouse::client(&cfg.clickhouse).map_err(|e| e.to_string())?;
            tokio::time::timeout(
                Duration::from_secs(10),
                client.query("SELECT version()").fetch_one::<String>(),
            )
            .await
            .map_err(|_| "no answer in 10 s".to_string())?
            .map_err(|e| e.to_string())
        })
    });
    match result {
        Ok(v) => check(
            "clickhouse",
            Verdict::Ok,
            format!("{} answers: version {v}", cfg.clickhouse.url),
            "",
        ),
        Err(e) => check(
            "clickhouse",
            Verdict::Warn,
            format!(
                "{}: {e} (events are spooled until it answers)",
                cfg.clickhouse.url
            ),
            "check clickhouse.url and the credentials",
        ),
    }
}

/// Prints the checks; false when any failed.
pub fn report(checks: &[Check]) -> bool {
    for c in checks {
        let mark = match c.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        println!("{mark} {:<16} {}", c.name, c.detail);
        if c.verdict != Verdict::Ok && !c.fix.is_empty() {
            println!("     {:<16} fix: {}", "", c.fix);
        }
    }
    let failed = checks.iter().filter(|c| c.verdict == Verdict::Fail).count();
    if failed == 0 {
        println!("the daemon can run here as configured");
    } else {
        println!("{failed} check(s) failed: the daemon cannot run here as configured");
    }
    failed == 0
}
