//! The Kubernetes API source: list/watch loops (`watch`) for Services,
//! EndpointSlices and this node's Node object, their events handed over as
//! changes.
//!
//! - The list/watch calls carry kube-proxy's label selector: Services and
//!   slices labelled `service.kubernetes.io/service-proxy-name` (another
//!   proxy's) or `service.kubernetes.io/headless` are not even fetched.
//! - A (re)list arrives as `Relisting(kind)` then one `Replace(kind, ...)`;
//!   watch events as `Apply`/`Delete`. The loops relist after `410 Gone`
//!   and failed watches, resume dead watches, back off while the server
//!   fails (see `watch`); the agent keeps the last complete state
//!   meanwhile, so a connection problem never touches the datapath.
//! - Objects that fail to deserialize are kept out by `DeserializeGuard` and
//!   reported by name, without ending the stream; their last good version
//!   stays.
//! - Only what the model reads is kept of each object (`slim`): managed
//!   fields, most annotations and the Node's status bulk are dropped as
//!   they arrive, and slices are kept compact.
use std::{path::PathBuf, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    core::{DeserializeGuard, Resource},
};
use tokio::task::JoinHandle;

use super::{
    Object, ObjectKind, Sender, slim,
    watch::{self, Watched},
};
use crate::model::{LABEL_SERVICE_NAME, LABEL_SERVICE_PROXY_NAME};

/// kube-proxy's label for headless Services' slices (`v1.IsHeadlessService`).
const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// Longest wait for a TCP connection to the API server: a server that
/// drops packets (rather than refusing) must not hold a retry for long.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig { path: PathBuf, source: kube::config::KubeconfigError },
    #[error(
        "in-cluster configuration: {0} (is {env} set? A DaemonSet gets it from the API server's address in \
         the dsproxy ConfigMap, see deploy/)",
        env = "KUBERNETES_SERVICE_HOST"
    )]
    InCluster(#[from] kube::config::InClusterError),
    #[error(
        "no API server to follow: {var} is not set, and neither --kubeconfig nor --manifests was given \
         (a DaemonSet sets {var} and KUBERNETES_SERVICE_PORT from the dsproxy ConfigMap, see deploy/)"
    )]
    NoInClusterVariable { var: &'static str },
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
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
    /// Liveness, backoff and list settings of the watch loops.
    pub watch: watch::Settings,
}

/// Fail early on a configuration that cannot work: a kubeconfig that does
/// not read, or missing in-cluster variables.
pub fn preflight(opts: &Options) -> Result<()> {
    if let Some(path) = &opts.kubeconfig {
        Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig { path: path.clone(), source })?;
        return Ok(());
    }
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
            return Err(Error::NoInClusterVariable { var });
        }
    }
    Config::incluster()?;
    Ok(())
}

/// The label selector kube-proxy puts on its Service and EndpointSlice
/// informers, with `--service-proxy-name` as Cilium does it.
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        None => format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}"),
        Some(name) => format!("{LABEL_SERVICE_PROXY_NAME}={name},!{LABEL_HEADLESS}"),
    }
}

/// The watchers, running in the background until dropped.
pub struct KubeSource {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Run one kind's list/watch loop in the background.
fn spawn_watch<K>(
    api: Api<DeserializeGuard<K>>,
    k: Watched<K>,
    settings: &watch::Settings,
    tx: Sender,
    shared: &Arc<watch::Shared>,
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    tokio::spawn(watch::run(api, k, settings.clone(), tx, Arc::clone(shared)))
}

/// The client configuration `opts` describes.
async fn config(opts: &Options) -> Result<Config> {
    match &opts.kubeconfig {
        Some(path) => {
            let err = |source| Error::Kubeconfig { path: path.clone(), source };
            let kc = Kubeconfig::read_from(path).map_err(err)?;
            Ok(Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.map_err(err)?)
        }
        None => Ok(Config::incluster()?),
    }
}

/// The addresses of the API server the agent talks to (its URL's host,
/// resolved when it is a name): no Service may capture them. Empty when
/// the name does not resolve (yet); the watchers report that themselves.
pub async fn api_server_addresses(opts: &Options) -> Result<Vec<std::net::IpAddr>> {
    let url = config(opts).await?.cluster_url;
    let Some(host) = url.host() else { return Ok(Vec::new()) };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse() {
        return Ok(vec![ip]);
    }
    let port = url.port_u16().unwrap_or(443);
    let mut out: Vec<std::net::IpAddr> = match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => addrs.map(|a| a.ip()).collect(),
        Err(e) => {
            log::warn!("resolving the API server's name {host}: {e}");
            Vec::new()
        }
    };
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

impl KubeSource {
    /// Connect and start the watchers; events go to `tx`.
    pub async fn start(opts: &Options, tx: Sender) -> Result<Self> {
        let mut config = config(opts).await?;
        // The watch loops retry with their own backoff (reset as soon as
        // the server answers); the client's retries would hide failures
        // and delay recovery.
        config.default_retry = false;
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        let client = Client::try_from(config)?;
        let labels = label_selector(opts.service_proxy_name.as_deref());
        let shared = Arc::new(watch::Shared::default());
        let w = &opts.watch;
        let tasks = vec![
            spawn_watch(
                Api::<DeserializeGuard<Service>>::all(client.clone()),
                Watched {
                    kind: ObjectKind::Service,
                    wrap: |o| Object::Service(Arc::new(o)),
                    slim: slim::service,
                    labels: Some(labels.clone()),
                    fields: None,
                },
                w,
                tx.clone(),
                &shared,
            ),
            spawn_watch(
                Api::<DeserializeGuard<EndpointSlice>>::all(client.clone()),
                Watched {
                    kind: ObjectKind::EndpointSlice,
                    wrap: Object::slice,
                    slim: |_| {},
                    labels: Some(format!("{labels},{LABEL_SERVICE_NAME}")),
                    fields: None,
                },
                w,
                tx.clone(),
                &shared,
            ),
            spawn_watch(
                Api::<DeserializeGuard<Node>>::all(client),
                Watched {
                    kind: ObjectKind::Node,
                    wrap: |o| Object::Node(Arc::new(o)),
                    slim: slim::node,
                    labels: None,
                    fields: Some(format!("metadata.name={}", opts.node_name)),
                },
                w,
                tx,
                &shared,
            ),
        ];
        Ok(Self { tasks })
    }
}
