//! Kubernetes pod metadata for the pods on this node: one watch of the API server (kube-rs's
//! watcher: list, then watch from its resourceVersion, relist when the watch expires or
//! fails, with backoff), kept in a local cache. A connection's pod is looked up in the
//! cache by the pod uid its cgroup path shows: no API request per connection.
//!
//! Labels: `k8s.pod.name`, `k8s.namespace`, `k8s.serviceaccount`, `k8s.node`, and each
//! pod label as `k8s.pod/<key>` (`k8s.pod/app.kubernetes.io/name=web`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, RwLock,
    },
};

#[cfg(feature = "kubernetes")]
use futures::StreamExt;
#[cfg(feature = "kubernetes")]
use k8s_openapi::api::core::v1::Pod;
#[cfg(feature = "kubernetes")]
use kube::runtime::{watcher, WatchStreamExt};

use super::LabelSource;
use crate::audit::event::ProcessIdentity;

/// What the daemon keeps of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub node: String,
}

#[cfg(feature = "kubernetes")]
impl PodMeta {
    fn of(pod: &Pod) -> Option<(String, PodMeta)> {
        let m = &pod.metadata;
        let uid = m.uid.clone()?;
        let spec = pod.spec.as_ref();
        Some((
            uid,
            PodMeta {
                name: m.name.clone().unwrap_or_default(),
                namespace: m.namespace.clone().unwrap_or_default(),
                labels: m.labels.clone().unwrap_or_default(),
                service_account: spec
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            },
        ))
    }
}

/// The pods of this node, by uid, as the watch last saw them.
#[derive(Default)]
pub struct PodCache {
    pods: RwLock<HashMap<String, Arc<PodMeta>>>,
    /// The first list is complete.
    pub synced: AtomicBool,
    pub counters: KubeCounters,
}

#[derive(Default, Debug)]
pub struct KubeCounters {
    pub events: AtomicU64,
    pub relists: AtomicU64,
    pub errors: AtomicU64,
}

/// What `stats.json` shows of the watch.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct KubeStats {
    pub pods: u64,
    pub synced: bool,
    pub events: u64,
    pub lists: u64,
    pub errors: u64,
}

impl PodCache {
    pub fn stats(&self) -> KubeStats {
        KubeStats {
            pods: self.len() as u64,
            synced: self.synced.load(Ordering::Relaxed),
            events: self.counters.events.load(Ordering::Relaxed),
            lists: self.counters.relists.load(Ordering::Relaxed),
            errors: self.counters.errors.load(Ordering::Relaxed),
        }
    }

    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.pods.read().ok()?.get(uid).cloned()
    }

    pub fn len(&self) -> usize {
        self.pods.read().map(|p| p.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    #[cfg(feature = "kubernetes")]
    fn apply(&self, pod: &Pod) {
        if let (Some((uid, meta)), Ok(mut pods)) = (PodMeta::of(pod), self.pods.write()) {
            pods.insert(uid, Arc::new(meta));
        }
    }

    #[cfg(feature = "kubernetes")]
    fn delete(&self, pod: &Pod) {
        if let (Some(uid), Ok(mut pods)) = (&pod.metadata.uid, self.pods.write()) {
            pods.remove(uid);
        }
    }

    #[cfg(feature = "kubernetes")]
    fn replace(&self, all: HashMap<String, Arc<PodMeta>>) {
        if let Ok(mut pods) = self.pods.write() {
            *pods = all;
        }
        self.synced.store(true, Ordering::SeqCst);
    }
}

/// Where the API server is and which node this is.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// A kubeconfig file; None: in-cluster service account (or KUBECONFIG, ~/.kube/config).
    pub kubeconfig: Option<PathBuf>,
    pub node_name: String,
}

/// This build has no Kubernetes client.
#[cfg(not(feature = "kubernetes"))]
pub fn start(_: KubeSettings, _: Arc<SecretStore>) -> std::io::Result<Arc<PodCache>> {
    Err(std::io::Error::other(
        "this build has no Kubernetes support (the `kubernetes` feature)",
    ))
}

/// Starts the watches on a thread of their own: this node's pods (the cache fills as it
/// lists) and the Secrets that policies' credentials name (`secrets`).
#[cfg(feature = "kubernetes")]
pub fn start(settings: KubeSettings, secrets: Arc<SecretStore>) -> std::io::Result<Arc<PodCache>> {
    let cache = Arc::new(PodCache::default());
    let c = cache.clone();
    secrets.enabled.store(true, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("kube".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("kubernetes: cannot start a runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let client = loop {
                    match client(&settings).await {
                        Ok(client) => break client,
                        Err(e) => {
                            c.counters.errors.fetch_add(1, Ordering::Relaxed);
                            secrets.failed(&e);
                            tracing::error!(
                                "kubernetes: {e}; pod labels and Secrets are unavailable (retrying in 30 s)"
                            );
                            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                        }
                    }
                };
                tokio::join!(
                    watch(client.clone(), settings, c),
                    watch_secrets(client, secrets)
                );
            });
        })?;
    Ok(cache)
}

#[cfg(feature = "kubernetes")]
async fn client(settings: &KubeSettings) -> Result<kube::Client, String> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no in-cluster configuration or kubeconfig: {e}"))?,
    };
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

#[cfg(feature = "kubernetes")]
async fn watch(client: kube::Client, settings: KubeSettings, cache: Arc<PodCache>) {
    let pods: kube::Api<Pod> = kube::Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    tracing::info!(
        "kubernetes: watching the pods of node {} ({})",
        settings.node_name,
        settings
            .kubeconfig
            .as_ref()
            .map(|p| format!("kubeconfig {}", p.display()))
            .unwrap_or_else(|| "in-cluster configuration".into())
    );
    let mut stream = watcher(pods, cfg).default_backoff().boxed();
    let mut listing: HashMap<String, Arc<PodMeta>> = HashMap::new();
    let mut logged_error = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listing.clear(),
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some((uid, meta)) = PodMeta::of(&pod) {
                    listing.insert(uid, Arc::new(meta));
                }
            }
            Ok(watcher::Event::InitDone) => {
                let n = listing.len();
                cache.replace(std::mem::take(&mut listing));
                let first = cache.counters.relists.fetch_add(1, Ordering::Relaxed) == 0;
                if first || logged_error {
                    tracing::info!("kubernetes: {n} pods on this node");
                }
                logged_error = false;
            }
            Ok(watcher::Event::Apply(pod)) => {
                cache.counters.events.fetch_add(1, Ordering::Relaxed);
                cache.apply(&pod);
            }
            Ok(watcher::Event::Delete(pod)) => {
                cache.counters.events.fetch_add(1, Ordering::Relaxed);
                cache.delete(&pod);
            }
            Err(e) => {
                cache.counters.errors.fetch_add(1, Ordering::Relaxed);
                if !logged_error {
                    tracing::warn!("kubernetes: the pod watch failed: {e} (retrying)");
                    logged_error = true;
                }
            }
        }
    }
}

/// Labels of the pod a process runs in.
pub struct PodLabels {
    pub cache: Arc<PodCache>,
}

impl LabelSource for PodLabels {
    fn add_labels(&self, id: &ProcessIdentity, labels: &mut BTreeMap<String, String>) {
        if id.pod_uid.is_empty() {
            return;
        }
        let Some(pod) = self.cache.get(&id.pod_uid) else {
            return;
        };
        let mut put = |k: &str, v: &str| {
            if !v.is_empty() {
                labels.insert(k.to_string(), v.to_string());
            }
        };
        put("k8s.pod.name", &pod.name);
        put("k8s.namespace", &pod.namespace);
        put("k8s.serviceaccount", &pod.service_account);
        put("k8s.node", &pod.node);
        for (k, v) in &pod.labels {
            labels.insert(format!("k8s.pod/{k}"), v.clone());
        }
    }

    fn pending(&self, id: &ProcessIdentity) -> bool {
        !id.pod_uid.is_empty() && self.cache.get(&id.pod_uid).is_none()
    }
}

/// The Secrets that credentials name, as their watches last saw them. A password is
/// taken from here for each new session the proxy logs in for: a rotated Secret is used
/// from the next session on. Values are wiped from memory when replaced or dropped.
pub struct SecretStore {
    /// Kubernetes is enabled (the watches run).
    enabled: AtomicBool,
    secrets: RwLock<HashMap<SecretKey, SecretState>>,
    /// The Secrets credentials name (set from the policies at each load).
    wanted: tokio::sync::watch::Sender<BTreeSet<SecretKey>>,
    /// The client could not be made (no configuration): why.
    client_error: RwLock<Option<String>>,
}

/// A Secret's namespace and name.
type SecretKey = (String, String);

impl Default for SecretStore {
    fn default() -> Self {
        SecretStore {
            enabled: AtomicBool::new(false),
            secrets: RwLock::default(),
            wanted: tokio::sync::watch::channel(BTreeSet::new()).0,
            client_error: RwLock::default(),
        }
    }
}

// Without the `kubernetes` feature nothing fills the store (every lookup says so).
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
enum SecretState {
    /// Not listed yet; the last error of its watch, if any.
    Pending(Option<String>),
    /// The API server says there is no such Secret.
    Missing,
    Present(BTreeMap<String, zeroize::Zeroizing<Vec<u8>>>),
}

impl SecretStore {
    /// Watches exactly these Secrets (namespace, name) from now on.
    pub fn want(&self, wanted: BTreeSet<SecretKey>) {
        if let Ok(mut s) = self.secrets.write() {
            s.retain(|k, _| wanted.contains(k));
            for k in &wanted {
                s.entry(k.clone()).or_insert(SecretState::Pending(None));
            }
        }
        self.wanted.send_replace(wanted);
    }

    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    fn failed(&self, e: &str) {
        if let Ok(mut c) = self.client_error.write() {
            *c = Some(e.to_string());
        }
    }

    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    fn set(&self, key: SecretKey, state: SecretState) {
        if let Ok(mut s) = self.secrets.write() {
            if s.contains_key(&key) {
                s.insert(key, state);
            }
        }
    }

    /// The password a credential's Secret holds (the first line of its key's value).
    pub fn password(
        &self,
        r: &crate::policy::model::SecretRef,
    ) -> Result<zeroize::Zeroizing<String>, String> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Err(format!(
                "{r} cannot be read: Kubernetes is not enabled (kubernetes.enabled)"
            ));
        }
        let secrets = self.secrets.read().map_err(|_| "poisoned".to_string())?;
        let key = (r.namespace.clone(), r.name.clone());
        match secrets.get(&key) {
            None | Some(SecretState::Pending(None)) => {
                let why = self
                    .client_error
                    .read()
                    .ok()
                    .and_then(|c| c.clone())
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                Err(format!(
                    "{r} has not been read from the API server yet{why}"
                ))
            }
            Some(SecretState::Pending(Some(e))) => {
                Err(format!("{r} cannot be read from the API server: {e}"))
            }
            Some(SecretState::Missing) => Err(format!("{r} does not exist")),
            Some(SecretState::Present(data)) => {
                let value = data
                    .get(&r.key)
                    .ok_or_else(|| format!("{r}: the Secret has no key `{}`", r.key))?;
                let text = std::str::from_utf8(value)
                    .map_err(|_| format!("{r}: the value is not UTF-8 text"))?;
                let line = text.lines().next().unwrap_or("");
                if line.is_empty() {
                    return Err(format!("{r}: the value is empty"));
                }
                Ok(zeroize::Zeroizing::new(line.to_string()))
            }
        }
    }
}

/// Keeps one watch per wanted Secret (a field selector on its name: RBAC can grant just
/// that Secret), started and stopped as the policies change.
#[cfg(feature = "kubernetes")]
async fn watch_secrets(client: kube::Client, store: Arc<SecretStore>) {
    let mut wanted = store.wanted.subscribe();
    let mut running: HashMap<SecretKey, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        let now: BTreeSet<SecretKey> = wanted.borrow_and_update().clone();
        running.retain(|k, task| {
            let keep = now.contains(k);
            if !keep {
                task.abort();
            }
            keep
        });
        for key in now {
            if running.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(watch_secret(client.clone(), store.clone(), key.clone()));
            running.insert(key, task);
        }
        if wanted.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(feature = "kubernetes")]
async fn watch_secret(client: kube::Client, store: Arc<SecretStore>, key: SecretKey) {
    use k8s_openapi::api::core::v1::Secret;
    let (namespace, name) = &key;
    let api: kube::Api<Secret> = kube::Api::namespaced(client, namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let mut listed = None;
    let mut logged_error = false;
    let data_of = |mut secret: Secret| {
        let data: BTreeMap<String, zeroize::Zeroizing<Vec<u8>>> = secret
            .data
            .take()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, zeroize::Zeroizing::new(v.0)))
            .collect();
        SecretState::Present(data)
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Init) => listed = None,
            Ok(watcher::Event::InitApply(secret)) => listed = Some(data_of(secret)),
            Ok(watcher::Event::InitDone) => {
                let found = listed.is_some();
                store.set(key.clone(), listed.take().unwrap_or(SecretState::Missing));
                if logged_error || !found {
                    tracing::info!(
                        "kubernetes: Secret {namespace}/{name} {}",
                        if found { "read" } else { "does not exist" }
                    );
                }
                logged_error = false;
            }
            Ok(watcher::Event::Apply(secret)) => {
                tracing::info!(
                    "kubernetes: Secret {namespace}/{name} changed: new sessions use it"
                );
                store.set(key.clone(), data_of(secret));
            }
            Ok(watcher::Event::Delete(_)) => {
                tracing::warn!("kubernetes: Secret {namespace}/{name} was deleted");
                store.set(key.clone(), SecretState::Missing);
            }
            Err(e) => {
                let already = store
                    .secrets
                    .read()
                    .map(|s| matches!(s.get(&key), Some(SecretState::Present(_))))
                    .unwrap_or(false);
                // A failed watch keeps the last value read (the watch resumes); one never
                // read says why.
                if !already {
                    store.set(key.clone(), SecretState::Pending(Some(e.to_string())));
                }
                if !logged_error {
                    tracing::warn!(
                        "kubernetes: the watch of Secret {namespace}/{name} failed: {e} (retrying)"
                    );
                    logged_error = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::SecretRef;

    fn r(key: &str) -> SecretRef {
        SecretRef {
            namespace: "db".into(),
            name: "app".into(),
            key: key.into(),
        }
    }

    #[test]
    fn a_secret_password_says_why_it_cannot_be_had() {
        let store = SecretStore::default();
        let key = ("db".to_string(), "app".to_string());
        let err = store.password(&r("password")).unwrap_err();
        assert!(err.contains("Kubernetes is not enabled"), "{err}");
        store.enabled.store(true, Ordering::Relaxed);
        store.want([key.clone()].into());
        let err = store.password(&r("password")).unwrap_err();
        assert!(
            err.contains("has not been read from the API server yet"),
            "{err}"
        );
        store.set(
            key.clone(),
            SecretState::Pending(Some("403 Forbidden".into())),
        );
        let err = store.password(&r("password")).unwrap_err();
        assert!(
            err.ends_with("cannot be read from the API server: 403 Forbidden"),
            "{err}"
        );
        store.set(key.clone(), SecretState::Missing);
        assert_eq!(
            store.password(&r("password")).unwrap_err(),
            "Secret db/app (key password) does not exist"
        );
        let data = [
            (
                "password".to_string(),
                zeroize::Zeroizing::new(b"s3cret\nignored".to_vec()),
            ),
            ("empty".to_string(), zeroize::Zeroizing::new(Vec::new())),
            (
                "binary".to_string(),
                zeroize::Zeroizing::new(vec![0xff, 0xfe]),
            ),
        ];
        store.set(
            key.clone(),
            SecretState::Present(data.into_iter().collect()),
        );
        assert_eq!(store.password(&r("password")).unwrap().as_str(), "s3cret");
        for (k, want) in [
            ("other", "the Secret has no key `other`"),
            ("empty", "the value is empty"),
            ("binary", "not UTF-8"),
        ] {
            let err = store.password(&r(k)).unwrap_err();
            assert!(err.contains(want), "{err}");
            assert!(!err.contains("s3cret"));
        }
        // No longer wanted: forgotten (and wiped).
        store.want(BTreeSet::new());
        let err = store.password(&r("password")).unwrap_err();
        assert!(err.contains("has not been read"), "{err}");
        // A Secret not wanted is not kept.
        store.set(key, SecretState::Missing);
        assert!(store.secrets.read().unwrap().is_empty());
    }
}
