//! Who is behind a connection: the process on its local end, where it sits (cgroup,
//! container, Kubernetes pod, systemd unit), and the labels policies select on.
//!
//! Labels come from sources: each adds what it knows of a process. Today: the process
//! itself and its cgroup path; Kubernetes pod metadata and systemd unit labels plug in as
//! further sources. Captured and proxied sessions resolve their workload the same way,
//! once per session (again only if the process on that end changes).

pub mod kubernetes;
pub mod process;
pub mod systemd;

use std::collections::BTreeMap;

use crate::{
    audit::event::{Labels, ProcessIdentity},
    text::Text,
};

pub use process::{cgroup2_mount, parse_cgroup_path, CgroupFacts, IdentityResolver};

/// Adds the labels it knows of a process.
pub trait LabelSource: Send {
    fn add_labels(&self, id: &ProcessIdentity, labels: &mut BTreeMap<String, String>);

    /// Whether it should know the process but does not yet (a pod the watch has not
    /// shown yet): its session waits a bounded time rather than be recorded without them.
    fn pending(&self, _id: &ProcessIdentity) -> bool {
        false
    }
}

/// `process.comm`, `process.exe`, `process.uid`, `process.user`, and who logged in:
/// `process.loginuid`, `process.login_user`, `process.sessionid` (the audit login
/// identity, kept across `sudo` and `su`).
pub struct ProcessLabels;

impl LabelSource for ProcessLabels {
    fn add_labels(&self, id: &ProcessIdentity, labels: &mut BTreeMap<String, String>) {
        labels.insert("process.comm".to_string(), id.comm.to_string());
        if !id.exe.is_empty() {
            labels.insert("process.exe".to_string(), id.exe.to_string());
        }
        if id.pid == 0 {
            return; // no process known
        }
        labels.insert("process.uid".to_string(), id.uid.to_string());
        if let Some(name) = process::user_name(id.uid) {
            labels.insert("process.user".to_string(), name);
        }
        if let Some(login) = id.loginuid {
            labels.insert("process.loginuid".to_string(), login.to_string());
            if let Some(name) = process::user_name(login) {
                labels.insert("process.login_user".to_string(), name);
            }
        }
        if let Some(session) = id.sessionid {
            labels.insert("process.sessionid".to_string(), session.to_string());
        }
    }
}

/// What the cgroup path says: `systemd.unit`, `container.id`, `k8s.pod.uid`,
/// `cgroup.path`.
pub struct CgroupLabels;

impl LabelSource for CgroupLabels {
    fn add_labels(&self, id: &ProcessIdentity, labels: &mut BTreeMap<String, String>) {
        let mut put = |key: &str, value: &str| {
            if !value.is_empty() {
                labels.insert(key.to_string(), value.to_string());
            }
        };
        put("systemd.unit", &id.systemd_unit);
        put(
            "systemd.slice",
            process::systemd_slice(&id.cgroup_path).unwrap_or(""),
        );
        put("container.id", &id.container_id);
        put("k8s.pod.uid", &id.pod_uid);
        put("cgroup.path", &id.cgroup_path);
    }
}

/// The configuration's `host_labels`, as `host.label/<key>`.
pub struct HostLabels {
    labels: Vec<(String, String)>,
}

impl HostLabels {
    pub fn new(labels: &BTreeMap<String, String>) -> HostLabels {
        HostLabels {
            labels: labels
                .iter()
                .map(|(k, v)| (format!("host.label/{k}"), v.clone()))
                .collect(),
        }
    }
}

impl LabelSource for HostLabels {
    fn add_labels(&self, _: &ProcessIdentity, labels: &mut BTreeMap<String, String>) {
        for (k, v) in &self.labels {
            labels.insert(k.clone(), v.clone());
        }
    }
}

/// A session's workload: the process identity events carry, its name and its labels.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    /// The process, with what the sources told of it (its pod's name and namespace).
    pub process: ProcessIdentity,
    /// See [`workload_name`].
    pub name: Text,
    pub labels: Labels,
    /// A source should know the process but does not yet.
    pub pending: bool,
}

/// The workload a process belongs to, most specific first: `pod:<namespace>/<name>`,
/// `pod-uid:<uid>`, `container:<id>`, `unit:<systemd unit>`, `cgroup:<path>`, or
/// `process:<comm>` for a process in the root cgroup.
pub fn workload_name(p: &ProcessIdentity) -> Text {
    if !p.pod_name.is_empty() {
        Text::lasting(&format!("pod:{}/{}", p.namespace, p.pod_name))
    } else if !p.pod_uid.is_empty() {
        Text::lasting(&format!("pod-uid:{}", p.pod_uid))
    } else if !p.container_id.is_empty() {
        Text::lasting(&format!("container:{}", p.container_id))
    } else if !p.systemd_unit.is_empty() {
        Text::lasting(&format!("unit:{}", p.systemd_unit))
    } else if !p.cgroup_path.is_empty() && &*p.cgroup_path != "/" {
        Text::lasting(&format!("cgroup:{}", p.cgroup_path))
    } else {
        Text::lasting(&format!("process:{}", p.comm))
    }
}

/// Resolves processes (from /proc and cgroup v2, cached) and their labels.
pub struct WorkloadResolver {
    pub processes: IdentityResolver,
    sources: Vec<Box<dyn LabelSource>>,
    /// Process titles of the Postgres backends that ran when capture began: their
    /// sessions are older than the daemon, and a backend may be gone by the time its
    /// records are read.
    backend_titles: std::collections::HashMap<u32, String>,
}

impl Default for WorkloadResolver {
    fn default() -> Self {
        WorkloadResolver {
            processes: IdentityResolver::new(),
            sources: vec![Box::new(ProcessLabels), Box::new(CgroupLabels)],
            backend_titles: Default::default(),
        }
    }
}

impl WorkloadResolver {
    /// Remembers the process titles of the Postgres backends running now (call when
    /// capture begins).
    /// Remembers the process titles of the Postgres processes running now; returns the
    /// client backends among them (sessions older than the daemon).
    pub fn remember_backends(&mut self) -> Vec<u32> {
        self.backend_titles = process::backend_titles();
        self.backend_titles
            .iter()
            .filter(|(_, t)| process::parse_backend_title(t, None).is_some())
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// The process title of backend `pid`: as it is now, or as it was when capture began.
    pub fn backend_title(&self, pid: u32) -> Option<String> {
        process::process_title(pid)
            .filter(|t| t.starts_with("postgres: "))
            .or_else(|| self.backend_titles.get(&pid).cloned())
    }

    /// Another source of labels, consulted after those already added.
    pub fn add_source(&mut self, source: Box<dyn LabelSource>) {
        self.sources.push(source);
    }

    /// The process `tgid` as seen at a syscall with these kernel facts.
    pub fn process(
        &mut self,
        tgid: u32,
        comm: &str,
        uid: u32,
        cgroup_id: u64,
        task: process::TaskFacts,
    ) -> ProcessIdentity {
        self.processes.resolve(tgid, comm, uid, cgroup_id, task)
    }

    /// The identity of `tgid` from /proc alone (see `IdentityResolver::resolve_pid`).
    pub fn process_by_pid(&mut self, tgid: u32, seen_ns: Option<u64>) -> ProcessIdentity {
        self.processes.resolve_pid(tgid, seen_ns)
    }

    /// The workload of a process: its labels from every source.
    pub fn workload(&self, process: &ProcessIdentity) -> Workload {
        let mut labels = BTreeMap::new();
        let mut pending = false;
        for source in &self.sources {
            source.add_labels(process, &mut labels);
            pending |= source.pending(process);
        }
        let mut process = process.clone();
        if let Some(name) = labels.get("k8s.pod.name") {
            process.pod_name = Text::lasting(name);
        }
        if let Some(ns) = labels.get("k8s.namespace") {
            process.namespace = Text::lasting(ns);
        }
        Workload {
            name: workload_name(&process),
            process,
            // Kept for the process's life once complete (a pod the watch has not shown
            // yet has more to come).
            labels: if pending {
                Labels::from(labels)
            } else {
                Labels::lasting(labels)
            },
            pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_most_specific_first() {
        let p = |f: &dyn Fn(&mut ProcessIdentity)| {
            let mut id = ProcessIdentity {
                comm: "psql".into(),
                ..ProcessIdentity::default()
            };
            f(&mut id);
            workload_name(&id).to_string()
        };
        assert_eq!(p(&|_| {}), "process:psql");
        assert_eq!(p(&|i| i.cgroup_path = "/".into()), "process:psql");
        assert_eq!(p(&|i| i.cgroup_path = "/a.slice".into()), "cgroup:/a.slice");
        assert_eq!(
            p(&|i| {
                i.cgroup_path = "/system.slice/api.service".into();
                i.systemd_unit = "api.service".into();
            }),
            "unit:api.service"
        );
        assert_eq!(
            p(&|i| {
                i.systemd_unit = "x.service".into();
                i.container_id = "c0ffee".into();
            }),
            "container:c0ffee"
        );
        assert_eq!(
            p(&|i| {
                i.container_id = "c0ffee".into();
                i.pod_uid = "u-1".into();
            }),
            "pod-uid:u-1"
        );
        assert_eq!(
            p(&|i| {
                i.pod_uid = "u-1".into();
                i.pod_name = "payments-1".into();
                i.namespace = "prod".into();
            }),
            "pod:prod/payments-1"
        );
    }

    #[test]
    fn labels_from_process_and_cgroup() {
        let id = ProcessIdentity {
            pid: 7,
            comm: "psql".into(),
            exe: "/usr/bin/psql".into(),
            cgroup_path: "/system.slice/billing.service".into(),
            systemd_unit: "billing.service".into(),
            loginuid: Some(54321), // no such user here: no login_user
            sessionid: Some(3),
            ..ProcessIdentity::default()
        };
        let w = WorkloadResolver::default().workload(&id);
        let got: Vec<(&str, &str)> = w
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("cgroup.path", "/system.slice/billing.service"),
                ("process.comm", "psql"),
                ("process.exe", "/usr/bin/psql"),
                ("process.loginuid", "54321"),
                ("process.sessionid", "3"),
                ("process.uid", "0"),
                ("process.user", "root"),
                ("systemd.slice", "system.slice"),
                ("systemd.unit", "billing.service"),
            ]
        );
    }
}
