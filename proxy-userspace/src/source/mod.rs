//! Where Services, EndpointSlices and this node's Node come from, and the
//! one contract every source keeps.
//!
//! A source hands over *changes*, not snapshots (kube-proxy's change
//! trackers, kube-rs's watcher events): `Event`s on a channel, applied by
//! the agent to its `Store`. The contract:
//!
//! - `Replace(kind, objects)` says "these are all the `kind` objects": the
//!   first complete list, and every relist after an error. `Relisting(kind)`
//!   comes before a relist starts.
//! - `Apply(object)` / `Delete(key)` are single changes.
//! - `Synced` comes once, when every kind has had its first `Replace`: the
//!   agent programs nothing before it (a partial list would prune what is
//!   still valid, kubernetes#126468).
//! - `Problem { what, reason }` reports something the source could not
//!   take, by name (a file and document, or `Kind ns/name`), once per
//!   change; `reason: None` says the problem is gone. An object with a
//!   problem never replaces its last good version.
//!
//! Sources: `manifests` (a directory of YAML/JSON files, watched) and
//! `kube` (the Kubernetes API through kube-rs watchers). Both keep only
//! what `slim` says of each object.
pub mod kube;
pub mod manifests;
pub mod slim;
pub mod watch;

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use tokio::sync::mpsc;

pub use self::slim::Slice;
use crate::store::ns_name;

/// The kinds of object the agent reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl ObjectKind {
    pub const ALL: [ObjectKind; 3] = [ObjectKind::Service, ObjectKind::EndpointSlice, ObjectKind::Node];

    pub const fn name(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        }
    }
}

/// An object as kept (`slim`), shared: sources and the store hold the
/// same allocation.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    Slice(Arc<Slice>),
    Node(Arc<Node>),
}

impl Object {
    /// An EndpointSlice, kept compact.
    pub fn slice(slice: EndpointSlice) -> Self {
        Object::Slice(Arc::new(Slice::from(slice)))
    }

    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::Service(_) => ObjectKind::Service,
            Object::Slice(_) => ObjectKind::EndpointSlice,
            Object::Node(_) => ObjectKind::Node,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let (namespace, name) = match self {
            Object::Service(o) => (o.metadata.namespace.as_deref(), o.metadata.name.as_deref().unwrap_or_default()),
            Object::Slice(o) => (o.meta.namespace(), o.meta.name()),
            Object::Node(o) => (None, o.metadata.name.as_deref().unwrap_or_default()),
        };
        let namespace = match self {
            Object::Node(_) => String::new(),
            _ => namespace.unwrap_or("default").to_owned(),
        };
        ObjectKey { kind: self.kind(), namespace, name: name.to_owned() }
    }
}

/// Kind, namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: ObjectKind,
    /// Empty for cluster-scoped objects (Node).
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    /// `namespace/name` (as the store keys objects).
    pub fn ns_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.name(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

/// One change from a source (see the module docs for the contract).
#[derive(Clone, Debug)]
pub enum Event {
    Apply(Object),
    Delete(ObjectKey),
    Replace(ObjectKind, Vec<Object>),
    Relisting(ObjectKind),
    Synced,
    Problem { what: String, reason: Option<String> },
}

/// Where events go.
pub type Sender = mpsc::UnboundedSender<Event>;

/// Where the agent reads Services and EndpointSlices from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests, watched for changes.
    Manifests(manifests::Options),
    /// The Kubernetes API.
    Kube(kube::Options),
}

/// A running source: its tasks end when it is dropped.
pub enum Running {
    Manifests(manifests::Watch),
    Kube(kube::KubeSource),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifests(#[from] manifests::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Check what can be checked before anything is loaded (a kubeconfig that
/// does not exist, a directory that is not one), so the agent fails early.
pub fn preflight(cfg: &SourceConfig) -> Result<(), Error> {
    match cfg {
        SourceConfig::Manifests(opts) => Ok(manifests::preflight(opts)?),
        SourceConfig::Kube(opts) => Ok(kube::preflight(opts)?),
    }
}

/// Start the source; its events go to `tx`.
pub async fn start(cfg: &SourceConfig, tx: Sender) -> Result<Running, Error> {
    match cfg {
        SourceConfig::Manifests(opts) => Ok(Running::Manifests(manifests::Watch::start(opts, tx)?)),
        SourceConfig::Kube(opts) => Ok(Running::Kube(kube::KubeSource::start(opts, tx).await?)),
    }
}

/// `Kind ns/name` of an object, for problem reports.
pub fn describe(kind: ObjectKind, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    match kind {
        ObjectKind::Node => format!("Node {}", meta.name.as_deref().unwrap_or("")),
        _ => format!("{} {}", kind.name(), ns_name(meta)),
    }
}
