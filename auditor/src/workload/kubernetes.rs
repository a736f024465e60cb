//! Kubernetes pod metadata for the pods on this node: one watch of the API server (kube-rs's
//! watcher: list, then watch from its resourceVersion, relist when the watch expires or
//! fails, with backoff), kept in a local cache. A connection's pod is looked up in the
//! cache by the pod uid its cgroup path shows: no API request per connection.
//!
//! Labels: `k8s.pod.name`, `k8s.namespace`, `k8s.serviceaccount`, `k8s.node`, and each
//! pod label as `k8s.pod/<key>` (`k8s.pod/app.kubernetes.io/name=web`).

use std::{
    collections::{BTreeMap, HashMap},
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
pub fn start(_: KubeSettings) -> std::io::Result<Arc<PodCache>> {
    Err(std::io::Error::other(
        "this build has no Kubernetes support (the `kubernetes` feature)",
    ))
}

/// Starts the watch on its own thread; the cache fills as it lists.
#[cfg(feature = "kubernetes")]
pub fn start(settings: KubeSettings) -> std::io::Result<Arc<PodCache>> {
    let cache = Arc::new(PodCache::default());
    let c = cache.clone();
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
            rt.block_on(watch(settings, c));
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
async fn watch(settings: KubeSettings, cache: Arc<PodCache>) {
    let client = loop {
        match client(&settings).await {
            Ok(c) => break c,
            Err(e) => {
                cache.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("kubernetes: {e}; pod labels are unavailable (retrying in 30 s)");
                tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            }
        }
    };
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
