//! Labels a systemd unit declares for itself: `X-Auditor-Labels=team=billing tier=batch`
//! in the `[Unit]` section of its unit file or of a drop-in (`<unit>.d/*.conf`; later
//! files add and override). The unit file is found as systemd finds it (its FragmentPath):
//! the first of the unit directories holding `<unit>` (or, for an instance `a@b.service`,
//! its template `a@.service`). Read once per unit, cached; labels become
//! `systemd.label/<key>`.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use super::LabelSource;
use crate::audit::event::ProcessIdentity;

/// Where systemd looks for unit files, most important first.
pub const DEFAULT_UNIT_DIRS: [&str; 5] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

const KEY: &str = "X-Auditor-Labels";
/// A unit file edited since is read again after this long.
const TTL: Duration = Duration::from_secs(60);

/// A unit's labels, and when they were read.
type Cached = (Instant, Vec<(String, String)>);

pub struct UnitLabels {
    dirs: Vec<PathBuf>,
    cache: Mutex<HashMap<String, Cached>>,
}

impl UnitLabels {
    pub fn new(dirs: Vec<PathBuf>) -> UnitLabels {
        UnitLabels {
            dirs,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The labels of `unit`, from its files.
    pub fn labels_of(&self, unit: &str) -> Vec<(String, String)> {
        if let Ok(cache) = self.cache.lock() {
            if let Some((at, labels)) = cache.get(unit) {
                if at.elapsed() < TTL {
                    return labels.clone();
                }
            }
        }
        let labels = read_unit_labels(&self.dirs, unit);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > 4096 {
                cache.clear();
            }
            cache.insert(unit.to_string(), (Instant::now(), labels.clone()));
        }
        labels
    }
}

impl LabelSource for UnitLabels {
    fn add_labels(&self, id: &ProcessIdentity, labels: &mut BTreeMap<String, String>) {
        if id.systemd_unit.is_empty() {
            return;
        }
        for (k, v) in self.labels_of(&id.systemd_unit) {
            labels.insert(format!("systemd.label/{k}"), v);
        }
    }
}

/// `a@b.service` -> `a@.service`.
fn template_of(unit: &str) -> Option<String> {
    let (prefix, rest) = unit.split_once('@')?;
    let (_, suffix) = rest.rsplit_once('.')?;
    Some(format!("{prefix}@.{suffix}"))
}

/// The unit file and drop-ins of `unit`, in the order they apply.
fn unit_files(dirs: &[PathBuf], unit: &str) -> Vec<PathBuf> {
    let names: Vec<String> = std::iter::once(unit.to_string())
        .chain(template_of(unit))
        .collect();
    let mut files = Vec::new();
    'found: for name in &names {
        for d in dirs {
            let p = d.join(name);
            if p.is_file() {
                files.push(p);
                break 'found;
            }
        }
    }
    // Drop-ins: every `<name>.d/*.conf` of every directory, by file name (a name in an
    // earlier directory hides the same name in later ones), applied in name order.
    let mut dropins: BTreeMap<String, PathBuf> = BTreeMap::new();
    for name in names.iter().rev() {
        for d in dirs.iter().rev() {
            let Ok(entries) = std::fs::read_dir(d.join(format!("{name}.d"))) else {
                continue;
            };
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                if file.ends_with(".conf") {
                    dropins.insert(file, e.path());
                }
            }
        }
    }
    files.extend(dropins.into_values());
    files
}

/// `X-Auditor-Labels=` of the `[Unit]` sections of a unit's files; an empty assignment
/// resets what earlier files said, as systemd does for list settings.
pub fn read_unit_labels(dirs: &[PathBuf], unit: &str) -> Vec<(String, String)> {
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for file in unit_files(dirs, unit) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        parse_into(&text, &file, &mut labels);
    }
    labels.into_iter().collect()
}

fn parse_into(text: &str, file: &Path, labels: &mut BTreeMap<String, String>) {
    let mut in_unit = false;
    // Continuation lines (a trailing backslash) are joined first.
    let mut logical = String::new();
    for raw in text.lines() {
        if let Some(stripped) = raw.strip_suffix('\\') {
            logical.push_str(stripped);
            logical.push(' ');
            continue;
        }
        logical.push_str(raw);
        let line = std::mem::take(&mut logical);
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            in_unit = line == "[Unit]";
            continue;
        }
        if !in_unit {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        if key.trim() != KEY {
            continue;
        }
        let value = value.trim();
        if value.is_empty() {
            labels.clear();
            continue;
        }
        for pair in value.split_whitespace() {
            match pair.split_once('=') {
                Some((k, v)) if !k.is_empty() => {
                    labels.insert(k.to_string(), v.trim_matches('"').to_string());
                }
                _ => tracing::warn!(
                    "{}: {KEY}: `{pair}` is not key=value (ignored)",
                    file.display()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_from_unit_files_and_drop_ins() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        let lib = root.path().join("lib");
        for d in [
            &etc,
            &lib,
            &etc.join("billing.service.d"),
            &lib.join("billing.service.d"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(
            lib.join("billing.service"),
            "[Unit]\nDescription=x\nX-Auditor-Labels=team=payments tier=batch\n[Service]\nX-Auditor-Labels=ignored=yes\n",
        )
        .unwrap();
        // Drop-ins: lib's 10 is hidden by etc's 10; 20 adds.
        std::fs::write(
            lib.join("billing.service.d/10-a.conf"),
            "[Unit]\nX-Auditor-Labels=hidden=yes\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("billing.service.d/10-a.conf"),
            "[Unit]\nX-Auditor-Labels=tier=online \\\n  owner=\"dba\"\n",
        )
        .unwrap();
        std::fs::write(
            etc.join("billing.service.d/20-b.conf"),
            "# comment\n[Unit]\nX-Auditor-Labels=env=prod\n",
        )
        .unwrap();
        let dirs = vec![etc.clone(), lib.clone()];
        assert_eq!(
            read_unit_labels(&dirs, "billing.service"),
            [
                ("env".to_string(), "prod".to_string()),
                ("owner".into(), "dba".into()),
                ("team".into(), "payments".into()),
                ("tier".into(), "online".into()),
            ]
        );
        // An instance takes its template's file; an empty assignment resets.
        std::fs::write(
            lib.join("worker@.service"),
            "[Unit]\nX-Auditor-Labels=a=1\nX-Auditor-Labels=\nX-Auditor-Labels=b=2\n",
        )
        .unwrap();
        assert_eq!(
            read_unit_labels(&dirs, "worker@7.service"),
            [("b".to_string(), "2".to_string())]
        );
        assert!(read_unit_labels(&dirs, "none.service").is_empty());

        let source = UnitLabels::new(dirs);
        let id = ProcessIdentity {
            systemd_unit: "billing.service".into(),
            ..ProcessIdentity::default()
        };
        let mut labels = BTreeMap::new();
        source.add_labels(&id, &mut labels);
        assert_eq!(
            labels.get("systemd.label/team").map(String::as_str),
            Some("payments")
        );
    }
}
