//! Who is behind a connection: the process on its local end, where it sits (cgroup,
//! container, Kubernetes pod, systemd unit), and the labels policies select on.
//!
//! Labels come from sources: each adds what it knows of a process. Today: the process
//! itself and its cgroup path; Kubernetes pod metadata and systemd unit labels plug in as
//! further sources. Captured and proxied sessions resolve their workload the same way,
//! once per session (again only if the process on that end changes).

pub mod process;

use std::{collections::BTreeMap, sync::Arc};

use crate::event::{Labels, ProcessIdentity};

pub use process::{cgroup2_mount, parse_cgroup_path, CgroupFacts, IdentityResolver};

/// Adds the labels it knows of a process.
pub trait LabelSource: Send {
    fn add_labels(&self, id: &ProcessIdentity, labels: &mut BTreeMap<String, String>);
}

/// `process.comm`, `process.exe`.
pub struct ProcessLabels;

impl LabelSource for ProcessLabels {
    fn add_labels(&self, id: &ProcessIdentity, labels: &mut BTreeMap<String, String>) {
        labels.insert("process.comm".to_string(), id.comm.to_string());
        if !id.exe.is_empty() {
            labels.insert("process.exe".to_string(), id.exe.to_string());
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
        put("container.id", &id.container_id);
        put("k8s.pod.uid", &id.pod_uid);
        put("cgroup.path", &id.cgroup_path);
    }
}

/// A session's workload: the process identity events carry, and its labels.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub process: ProcessIdentity,
    pub labels: Labels,
}

/// Resolves processes (from /proc and cgroup v2, cached) and their labels.
pub struct WorkloadResolver {
    pub processes: IdentityResolver,
    sources: Vec<Box<dyn LabelSource>>,
}

impl Default for WorkloadResolver {
    fn default() -> Self {
        WorkloadResolver {
            processes: IdentityResolver::new(),
            sources: vec![Box::new(ProcessLabels), Box::new(CgroupLabels)],
        }
    }
}

impl WorkloadResolver {
    /// Another source of labels, consulted after those already added.
    pub fn add_source(&mut self, source: Box<dyn LabelSource>) {
        self.sources.push(source);
    }

    /// The process `tgid` as seen at a syscall with these kernel facts.
    pub fn process(&mut self, tgid: u32, comm: &str, uid: u32, cgroup_id: u64) -> ProcessIdentity {
        self.processes.resolve(tgid, comm, uid, cgroup_id)
    }

    /// The workload of a process: its labels from every source.
    pub fn workload(&self, process: &ProcessIdentity) -> Workload {
        let mut labels = BTreeMap::new();
        for source in &self.sources {
            source.add_labels(process, &mut labels);
        }
        Workload {
            process: process.clone(),
            labels: Arc::new(labels),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_process_and_cgroup() {
        let id = ProcessIdentity {
            pid: 7,
            comm: "psql".into(),
            exe: "/usr/bin/psql".into(),
            cgroup_path: "/system.slice/billing.service".into(),
            systemd_unit: "billing.service".into(),
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
                ("systemd.unit", "billing.service"),
            ]
        );
    }
}
