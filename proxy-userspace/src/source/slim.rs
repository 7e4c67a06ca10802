//! What the agent keeps of each object, the same for every source: only
//! what the model, the store and the metrics read. Services and the Node
//! stay `k8s-openapi` objects, slimmed; EndpointSlices, most of the
//! memory (a `k8s-openapi` endpoint is 352 bytes before its strings), are
//! kept in a compact form (`Slice`) that the model reads as it is.
//!
//! Kept of a slice: name, namespace, resourceVersion, labels and the
//! `KEPT_ANNOTATIONS`; its address type and ports; per endpoint the
//! addresses, conditions, node name, zone and hints. Dropped: everything
//! else (managed fields, owner references, target references, hostnames,
//! deprecated topology). A field the model starts to read must be kept
//! here too; what `Slice`'s accessors give back is the slimmed slice,
//! which a test checks field by field.
use std::{
    collections::{BTreeMap, HashSet},
    hash::Hash,
    net::IpAddr,
    sync::{Arc, LazyLock, Mutex},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, NodeSpec, NodeStatus, Service},
        discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// Annotations the agent reads (the model's, and the trigger time the
/// network programming latency is measured from); every other one is
/// dropped on arrival.
pub const KEPT_ANNOTATIONS: [&str; 3] = [
    "service.kubernetes.io/topology-mode",
    "service.kubernetes.io/topology-aware-hints",
    crate::observe::TRIGGER_TIME_ANNOTATION,
];

/// Keep only what the model reads of a Service.
pub fn service(svc: &mut Service) {
    meta(&mut svc.metadata);
    svc.status = svc.status.take().filter(|s| s.load_balancer.is_some());
}

/// Keep only what the agent reads of the Node: labels, addresses, deletion,
/// the cluster autoscaler's to-be-deleted taint.
pub fn node(node: &mut Node) {
    meta(&mut node.metadata);
    let taints = node.spec.take().and_then(|s| s.taints).map(|mut t| {
        t.retain(|t| t.key == crate::health::TAINT_TO_BE_DELETED);
        t
    });
    node.spec = taints.filter(|t| !t.is_empty()).map(|t| NodeSpec { taints: Some(t), ..Default::default() });
    if let Some(status) = &mut node.status {
        *status = NodeStatus { addresses: status.addresses.take(), ..Default::default() };
    }
}

/// Keep only what the agent reads of an object's metadata.
pub fn meta(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.owner_references = None;
    meta.annotations = meta.annotations.take().and_then(|mut a| {
        a.retain(|k, _| KEPT_ANNOTATIONS.contains(&k.as_str()));
        (!a.is_empty()).then_some(a)
    });
}

/// Values that repeat across objects (label and annotation keys, address
/// types, an endpoint's node and zone), stored once. Entries nothing else
/// holds any more are dropped when the pool has doubled since the last
/// sweep.
struct Pool<T: ?Sized + 'static> {
    set: LazyLock<Mutex<(FastSet<Arc<T>>, usize)>>,
}

type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

impl<T: ?Sized + Eq + Hash> Pool<T> {
    const fn new() -> Self {
        Self { set: LazyLock::new(|| Mutex::new((FastSet::default(), 0))) }
    }

    fn get(&self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        let mut guard = self.set.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (set, swept_at) = &mut *guard;
        if let Some(found) = set.get(value) {
            return Arc::clone(found);
        }
        if set.len() >= 2 * (*swept_at).max(512) {
            set.retain(|e| Arc::strong_count(e) > 1);
            *swept_at = set.len();
        }
        let new = make();
        set.insert(Arc::clone(&new));
        new
    }
}

static STRINGS: Pool<str> = Pool::new();

fn intern(s: &str) -> Arc<str> {
    STRINGS.get(s, || Arc::from(s))
}

/// `(key, value)` pairs of a string map, keys interned, in key order.
type Pairs = Box<[(Arc<str>, Box<str>)]>;

fn pairs(map: Option<BTreeMap<String, String>>) -> Option<Pairs> {
    map.map(|m| m.into_iter().map(|(k, v)| (intern(&k), v.into_boxed_str())).collect())
}

/// The metadata of a slice, as kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    name: Option<Box<str>>,
    namespace: Option<Arc<str>>,
    resource_version: Option<Box<str>>,
    labels: Option<Pairs>,
    annotations: Option<Pairs>,
}

impl Meta {
    fn new(mut m: ObjectMeta) -> Self {
        meta(&mut m);
        Self {
            name: m.name.map(String::into_boxed_str),
            namespace: m.namespace.as_deref().map(intern),
            resource_version: m.resource_version.map(String::into_boxed_str),
            labels: pairs(m.labels),
            annotations: pairs(m.annotations),
        }
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.resource_version.as_deref()
    }

    fn get<'a>(pairs: Option<&'a Pairs>, key: &str) -> Option<&'a str> {
        let pairs = pairs?;
        pairs.binary_search_by(|(k, _)| (**k).cmp(key)).ok().map(|i| &*pairs[i].1)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        Self::get(self.labels.as_ref(), key)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        Self::get(self.annotations.as_ref(), key)
    }

    /// The kept labels (`labels`) or annotations, in key order.
    fn all(pairs: Option<&Pairs>) -> impl Iterator<Item = (&str, &str)> {
        pairs.into_iter().flatten().map(|(k, v)| (&**k, &**v))
    }

    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        Self::all(self.labels.as_ref())
    }

    pub fn annotations(&self) -> impl Iterator<Item = (&str, &str)> {
        Self::all(self.annotations.as_ref())
    }
}

/// Where an endpoint runs: shared by the endpoints of one node.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Place {
    node_name: Option<Arc<str>>,
    zone: Option<Box<str>>,
}

static PLACES: Pool<Place> = Pool::new();

/// What an endpoint holds besides a canonical first address, its
/// conditions and its place; most endpoints have none of it.
#[derive(Clone, Debug, PartialEq)]
struct EndpointRest {
    /// The addresses from the first one that is not the canonical text of
    /// an IP address on (consumers use the first address only).
    addresses: Vec<String>,
    hints: Option<EndpointHints>,
}

/// An endpoint's first address: parsed when its text was the canonical
/// form of an IP address, else the text as written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Address<'a> {
    Ip(IpAddr),
    Text(&'a str),
}

/// One endpoint, as kept: 40 bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactEndpoint {
    /// `addresses[0]`, when its text is the canonical form of an address.
    first: Option<IpAddr>,
    conditions: Option<EndpointConditions>,
    place: Option<Arc<Place>>,
    rest: Option<Box<EndpointRest>>,
}

impl CompactEndpoint {
    fn new(ep: Endpoint) -> Self {
        let mut addresses = ep.addresses.into_iter().peekable();
        let first = addresses.peek().and_then(|a| a.parse::<IpAddr>().ok().filter(|ip| ip.to_string() == *a));
        if first.is_some() {
            addresses.next();
        }
        let rest: Vec<String> = addresses.collect();
        let rest = (!rest.is_empty() || ep.hints.is_some())
            .then(|| Box::new(EndpointRest { addresses: rest, hints: ep.hints }));
        let place = (ep.node_name.is_some() || ep.zone.is_some()).then(|| {
            let place = Place { node_name: ep.node_name.map(Arc::from), zone: ep.zone.map(String::into_boxed_str) };
            PLACES.get(&place, || Arc::new(Place { node_name: place.node_name.clone(), zone: place.zone.clone() }))
        });
        Self { first, conditions: ep.conditions, place, rest }
    }

    /// `addresses[0]`; consumers read no other.
    pub fn first_address(&self) -> Option<Address<'_>> {
        match (self.first, &self.rest) {
            (Some(ip), _) => Some(Address::Ip(ip)),
            (None, Some(rest)) => rest.addresses.first().map(|a| Address::Text(a)),
            (None, None) => None,
        }
    }

    pub fn conditions(&self) -> Option<&EndpointConditions> {
        self.conditions.as_ref()
    }

    pub fn node_name(&self) -> Option<&str> {
        self.place.as_deref().and_then(|p| p.node_name.as_deref())
    }

    /// `nodeName`, shared: every endpoint of a node holds the same one.
    pub fn node_name_shared(&self) -> Option<&Arc<str>> {
        self.place.as_deref().and_then(|p| p.node_name.as_ref())
    }

    pub fn zone(&self) -> Option<&str> {
        self.place.as_deref().and_then(|p| p.zone.as_deref())
    }

    pub fn hints(&self) -> Option<&EndpointHints> {
        self.rest.as_ref().and_then(|r| r.hints.as_ref())
    }

    /// Every address, as written.
    pub fn addresses(&self) -> impl Iterator<Item = String> + '_ {
        let rest = self.rest.iter().flat_map(|r| r.addresses.iter().cloned());
        self.first.as_ref().map(IpAddr::to_string).into_iter().chain(rest)
    }
}

/// An EndpointSlice as the agent keeps it (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    pub meta: Meta,
    address_type: Arc<str>,
    ports: Option<Box<[EndpointPort]>>,
    endpoints: Box<[CompactEndpoint]>,
}

impl From<EndpointSlice> for Slice {
    fn from(s: EndpointSlice) -> Self {
        Self {
            meta: Meta::new(s.metadata),
            address_type: intern(&s.address_type),
            ports: s.ports.map(Vec::into_boxed_slice),
            endpoints: s.endpoints.into_iter().map(CompactEndpoint::new).collect(),
        }
    }
}

impl Slice {
    /// `addressType` (`IPv4`, `IPv6`, `FQDN`).
    pub fn address_type(&self) -> &str {
        &self.address_type
    }

    pub fn ports(&self) -> &[EndpointPort] {
        self.ports.as_deref().unwrap_or_default()
    }

    pub fn endpoints(&self) -> &[CompactEndpoint] {
        &self.endpoints
    }

    /// `namespace/name`.
    pub fn ns_name(&self) -> String {
        format!("{}/{}", self.meta.namespace().unwrap_or("default"), self.meta.name())
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{EndpointHints, ForNode, ForZone};
    use serde_json::json;

    use super::*;

    /// A slice with every field set, kept or not.
    fn full() -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web-abc", "namespace": "shop", "resourceVersion": "42", "uid": "u-1", "generation": 3,
                "labels": {"kubernetes.io/service-name": "web", "endpointslice.kubernetes.io/managed-by": "x"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z",
                                "kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kube-controller-manager"}],
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "u-2"}]
            },
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
            "endpoints": [
                {"addresses": ["fd00::2"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "nodeName": "node-a", "zone": "z1", "hostname": "web-0",
                 "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "shop"},
                 "hints": {"forZones": [{"name": "z1"}], "forNodes": [{"name": "node-a"}]},
                 "deprecatedTopology": {"a": "b"}},
                {"addresses": ["FD00::3", "fd00::4"], "conditions": {"ready": false}},
                {"addresses": []}
            ]
        }))
        .expect("slice")
    }

    #[test]
    fn a_kept_slice_reads_back_as_the_slimmed_slice() {
        let original = full();
        let s = Slice::from(original.clone());
        let m = &s.meta;
        assert_eq!((m.name(), m.namespace(), s.ns_name().as_str()), ("web-abc", Some("shop"), "shop/web-abc"));
        assert_eq!(m.resource_version(), Some("42"));
        let labels: Vec<(&str, &str)> = original.metadata.labels.iter().flatten().map(|(k, v)| (&**k, &**v)).collect();
        assert_eq!(m.labels().collect::<Vec<_>>(), labels, "every label");
        let annotations: Vec<&str> = m.annotations().map(|(k, _)| k).collect();
        assert_eq!(annotations, ["endpoints.kubernetes.io/last-change-trigger-time"], "the kept annotations only");
        assert_eq!(
            (s.address_type(), s.ports()),
            (original.address_type.as_str(), &original.ports.clone().unwrap()[..])
        );
        let eps = s.endpoints();
        assert_eq!(eps.len(), 3);
        let e = &eps[0];
        assert_eq!(e.first_address(), Some(Address::Ip("fd00::2".parse().unwrap())));
        assert_eq!(e.addresses().collect::<Vec<_>>(), ["fd00::2"]);
        assert_eq!(e.conditions(), original.endpoints[0].conditions.as_ref());
        assert_eq!((e.node_name(), e.zone()), (Some("node-a"), Some("z1")));
        assert_eq!(
            e.hints(),
            Some(&EndpointHints {
                for_zones: Some(vec![ForZone { name: "z1".into() }]),
                for_nodes: Some(vec![ForNode { name: "node-a".into() }]),
            })
        );
        // Target references, hostnames and deprecated topology have no field to be kept in.
        assert_eq!(eps[1].first_address(), Some(Address::Text("FD00::3")), "a non-canonical address as written");
        assert_eq!(eps[1].addresses().collect::<Vec<_>>(), ["FD00::3", "fd00::4"], "addresses verbatim, all of them");
        assert_eq!(eps[1].conditions(), original.endpoints[1].conditions.as_ref());
        assert_eq!((eps[1].node_name(), eps[1].hints()), (None, None));
        assert_eq!((eps[2].first_address(), eps[2].addresses().count()), (None, 0));
    }

    #[test]
    fn kept_labels_and_annotations_are_found_by_key() {
        let s = Slice::from(full());
        assert_eq!(s.meta.label("kubernetes.io/service-name"), Some("web"));
        assert_eq!(s.meta.label("nope"), None);
        assert_eq!(s.meta.annotation(crate::observe::TRIGGER_TIME_ANNOTATION), Some("2026-01-01T00:00:00Z"));
        assert_eq!(
            (s.meta.name(), s.meta.namespace(), s.meta.resource_version()),
            ("web-abc", Some("shop"), Some("42"))
        );
        assert_eq!(s.address_type(), "IPv6");
    }

    #[test]
    fn repeated_strings_are_stored_once() {
        let (a, b) = (Slice::from(full()), Slice::from(full()));
        let place = |s: &Slice| s.endpoints[0].place.clone().expect("node and zone");
        assert!(Arc::ptr_eq(&place(&a), &place(&b)), "one node and zone for both");
        assert_eq!(size_of::<CompactEndpoint>(), 40);
        assert!(Arc::ptr_eq(&a.address_type, &b.address_type));
    }
}
