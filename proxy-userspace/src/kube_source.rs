//! The Kubernetes API source: kube-rs watchers and reflector stores for
//! Services, EndpointSlices and this node's Node object.
//!
//! - The list/watch calls carry kube-proxy's label selector: Services and
//!   slices labelled `service.kubernetes.io/service-proxy-name` (another
//!   proxy's) or `service.kubernetes.io/headless` are not even fetched.
//! - Watchers relist after errors and `410 Gone` on their own, with backoff;
//!   the stores keep the last complete state meanwhile, so the datapath is
//!   never touched by a connection problem.
//! - Objects that fail to deserialize are kept out by `DeserializeGuard`
//!   and reported by name, without ending the stream.
//! - The agent acts only once every store has seen its initial list.
use std::{path::PathBuf, sync::Arc};

use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    core::{DeserializeGuard, Resource},
    runtime::{WatchStreamExt as _, reflector, reflector::Store, watcher},
};
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    model::{LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME},
    source::Snapshot,
};

/// kube-proxy's label for headless Services' slices (`v1.IsHeadlessService`).
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error("in-cluster configuration: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error("a reflector store was dropped before its initial list completed")]
    StoreDropped,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to reach the API server and what to select.
#[derive(Clone, Debug)]
pub struct Options {
    /// A kubeconfig file; `None` means in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (the Node object to watch).
    pub node_name: String,
    /// `--service-proxy-name`.
    pub service_proxy_name: Option<String>,
}

/// The label selector kube-proxy puts on its Service and EndpointSlice
/// informers, with `--service-proxy-name` as Cilium does it.
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        None => format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"),
        Some(name) => format!("{LABEL_SERVICE_PROXY_NAME}={name},!{LABEL_HEADLESS}"),
    }
}

/// Watchers running in the background, their stores, and a signal raised on
/// every change.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    pub changed: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// An object that could not be read does not reach the store (which keeps
/// the last good version, if any): it is reported by name and skipped.
fn readable<K: Resource<DynamicType = ()>>(guard: DeserializeGuard<K>) -> Option<K> {
    match guard.0 {
        Ok(obj) => Some(obj),
        Err(invalid) => {
            log::error!(
                "unreadable {} {}/{}: {}",
                K::kind(&()),
                invalid.metadata.namespace.as_deref().unwrap_or(""),
                invalid.metadata.name.as_deref().unwrap_or(""),
                invalid.error
            );
            None
        }
    }
}

/// The same event, for the readable object inside the guard.
fn unguard<K: Resource<DynamicType = ()>>(event: watcher::Event<DeserializeGuard<K>>) -> Option<watcher::Event<K>> {
    use watcher::Event;
    Some(match event {
        Event::Apply(g) => Event::Apply(readable(g)?),
        Event::Delete(g) => Event::Delete(readable(g)?),
        Event::InitApply(g) => Event::InitApply(readable(g)?),
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
    })
}

/// Start a reflected watcher for `K`; returns its store and task.
fn spawn_watch<K>(
    api: Api<DeserializeGuard<K>>,
    config: watcher::Config,
    changed: Arc<Notify>,
    what: &'static str,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .try_filter_map(|event| std::future::ready(Ok(unguard(event))))
        .modify(|obj: &mut K| {
            // managedFields are large and never read: keep them out of memory.
            obj.meta_mut().managed_fields = None;
        })
        .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    changed.notify_one();
                }
                Ok(_) => {}
                // The watcher relists by itself (410 Gone included); the
                // store keeps serving the last complete state meanwhile.
                Err(e) => log::warn!("{what} watch: {e}; retrying"),
            }
        }
    });
    (reader, task)
}

impl KubeSource {
    /// Connect and start the watchers.
    pub async fn start(opts: &Options) -> Result<Self> {
        let config = match &opts.kubeconfig {
            Some(path) => {
                let err = |source| Error::Kubeconfig { path: path.clone(), source };
                let kc = Kubeconfig::read_from(path).map_err(err)?;
                Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(err)?
            }
            None => Config::incluster()?,
        };
        let client = Client::try_from(config)?;
        let changed = Arc::new(Notify::new());
        let labels = label_selector(opts.service_proxy_name.as_deref());
        let cfg = watcher::Config::default().labels(&labels);
        let (services, t1) = spawn_watch(Api::all(client.clone()), cfg.clone(), Arc::clone(&changed), "Service");
        let slice_cfg = cfg.labels(&format!("{labels},{LABEL_SERVICE_NAME}"));
        let (slices, t2) = spawn_watch(Api::all(client.clone()), slice_cfg, Arc::clone(&changed), "EndpointSlice");
        let node_cfg = watcher::Config::default().fields(&format!("metadata.name={}", opts.node_name));
        let (node, t3) = spawn_watch(Api::all(client), node_cfg, Arc::clone(&changed), "Node");
        Ok(Self { services, slices, node, changed, tasks: vec![t1, t2, t3] })
    }

    /// Wait until every store has its initial list: acting on a partial
    /// list would prune what is still valid (kubernetes#126468).
    pub async fn wait_ready(&self) -> Result<()> {
        self.services.wait_until_ready().await.map_err(|_| Error::StoreDropped)?;
        self.slices.wait_until_ready().await.map_err(|_| Error::StoreDropped)?;
        self.node.wait_until_ready().await.map_err(|_| Error::StoreDropped)?;
        Ok(())
    }

    /// The stores' current content: shared pointers, no copies.
    pub fn snapshot(&self) -> (Snapshot, Vec<String>) {
        let snap = Snapshot {
            services: self.services.state(),
            slices: self.slices.state(),
            node: self.node.state().into_iter().next(),
        };
        (snap, Vec::new())
    }
}
