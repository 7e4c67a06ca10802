//! The objects the sources handed over, indexed for the model, and which
//! Services they changed since the last sync (kube-proxy's change
//! trackers). Applying an event costs what the event holds, not what the
//! store holds: EndpointSlices are indexed by the Service they feed, so a
//! sync recomputes only the Services whose object or slices changed.
//! Slices are held compact (`source::Slice`), as the model reads them.
//!
//! **Relist gate.** While EndpointSlices are being relisted (from
//! `Relisting(EndpointSlice)` to its `Replace`), a Service that appears
//! (new by name, from a list or a watch event) is held back: the model does
//! not see it until the slices' relist is complete, so it is never
//! programmed without the endpoints the relist is about to bring (a
//! Service without endpoints refuses connections). Services already known
//! change as usual. The agent releases held Services after a time limit
//! if the slices' relist does not end (`release_held`).
use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use k8s_openapi::{
    api::core::v1::{Node, Service},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    model::LABEL_SERVICE_NAME,
    source::{Event, Object, ObjectKey, ObjectKind, Slice},
};

/// `namespace/name` of a Service.
pub type ServiceName = String;

/// What changed since the last `take_dirty`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Dirty {
    #[default]
    None,
    /// These Services (by `namespace/name`), present or gone.
    Services(BTreeSet<ServiceName>),
    /// Everything: the node changed, or the first sync.
    All,
}

impl Dirty {
    fn add(&mut self, name: ServiceName) {
        match self {
            Dirty::None => *self = Dirty::Services(BTreeSet::from([name])),
            Dirty::Services(set) => {
                set.insert(name);
            }
            Dirty::All => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Dirty::None
    }
}

/// Every object the sources hold.
#[derive(Default)]
pub struct Store {
    services: HashMap<ServiceName, Arc<Service>>,
    slices: HashMap<String, Arc<Slice>>,
    /// Service -> the slices labelled for it.
    by_service: HashMap<ServiceName, BTreeSet<String>>,
    node: Option<Arc<Node>>,
    dirty: Dirty,
    /// Kinds whose relist has started and not ended.
    relisting: BTreeSet<ObjectKind>,
    /// Services that appeared while EndpointSlices were relisting.
    held: HashMap<ServiceName, Arc<Service>>,
}

/// `namespace/name` of an object (the namespace defaults to `default`, as
/// `kubectl apply` does for manifests without one).
pub fn ns_name(meta: &ObjectMeta) -> String {
    format!("{}/{}", meta.namespace.as_deref().unwrap_or("default"), meta.name.as_deref().unwrap_or(""))
}

/// The Service a slice feeds, from its `kubernetes.io/service-name` label.
pub fn owner(slice: &Slice) -> Option<ServiceName> {
    let svc = slice.meta.label(LABEL_SERVICE_NAME)?;
    Some(format!("{}/{svc}", slice.meta.namespace().unwrap_or("default")))
}

/// Is `new` a different version of `old`? The resourceVersion decides
/// when both have one (the API); otherwise the content does (manifests).
fn changed<T: PartialEq>(old: (&T, Option<&str>), new: (&T, Option<&str>)) -> bool {
    match (old.1, new.1) {
        (Some(a), Some(b)) => a != b,
        _ => old.0 != new.0,
    }
}

fn service_version(svc: &Service) -> (&Service, Option<&str>) {
    (svc, svc.metadata.resource_version.as_deref())
}

fn slice_version(slice: &Slice) -> (&Slice, Option<&str>) {
    (slice, slice.meta.resource_version())
}

/// The parts of the Node the model reads: a change elsewhere (heartbeats,
/// conditions) does not dirty every Service.
fn node_view(node: Option<&Node>) -> Option<String> {
    let node = node?;
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    let view = (&node.metadata.labels, addresses, node.metadata.deletion_timestamp.is_some());
    Some(serde_json::to_string(&view).unwrap_or_default())
}

impl Store {
    /// Take one event. Returns whether anything changed.
    pub fn apply(&mut self, event: Event) -> bool {
        let before = self.dirty.clone();
        match event {
            Event::Apply(obj) => self.upsert(obj),
            Event::Delete(key) => self.remove(&key),
            Event::Replace(kind, objs) => {
                self.replace(kind, objs);
                self.relisting.remove(&kind);
                if kind == ObjectKind::EndpointSlice {
                    self.release_held();
                }
            }
            Event::Relisting(kind) => {
                self.relisting.insert(kind);
            }
            Event::Problem { .. } | Event::Synced => {}
        }
        self.dirty != before
    }

    /// Let every held Service in (the slices' relist ended, or took too
    /// long); returns how many there were.
    pub fn release_held(&mut self) -> usize {
        let held = std::mem::take(&mut self.held);
        let n = held.len();
        for (name, svc) in held {
            self.services.insert(name.clone(), svc);
            self.dirty.add(name);
        }
        n
    }

    /// Services held back by the relist gate.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn upsert(&mut self, obj: Object) {
        match obj {
            Object::Service(svc) => {
                let name = ns_name(&svc.metadata);
                if self.relisting.contains(&ObjectKind::EndpointSlice) && !self.services.contains_key(&name) {
                    self.held.insert(name, svc);
                    return;
                }
                if self.services.get(&name).is_some_and(|old| !changed(service_version(old), service_version(&svc))) {
                    return;
                }
                self.services.insert(name.clone(), svc);
                self.dirty.add(name);
            }
            Object::Slice(slice) => {
                let name = slice.ns_name();
                let new_owner = owner(&slice);
                if let Some(old) = self.slices.get(&name) {
                    if !changed(slice_version(old), slice_version(&slice)) {
                        return;
                    }
                    if let Some(old_owner) = owner(old)
                        && Some(&old_owner) != new_owner.as_ref()
                    {
                        self.unindex(&old_owner, &name);
                    }
                }
                if let Some(o) = new_owner {
                    self.by_service.entry(o.clone()).or_default().insert(name.clone());
                    self.dirty.add(o);
                }
                self.slices.insert(name, slice);
            }
            Object::Node(node) => {
                if node_view(self.node.as_deref()) != node_view(Some(&node)) {
                    self.dirty = Dirty::All;
                }
                self.node = Some(node);
            }
        }
    }

    fn unindex(&mut self, service: &str, slice: &str) {
        if let Some(set) = self.by_service.get_mut(service) {
            set.remove(slice);
            if set.is_empty() {
                self.by_service.remove(service);
            }
        }
        self.dirty.add(service.to_owned());
    }

    fn remove(&mut self, key: &ObjectKey) {
        let name = key.ns_name();
        match key.kind {
            ObjectKind::Service => {
                self.held.remove(&name);
                if self.services.remove(&name).is_some() {
                    self.dirty.add(name);
                }
            }
            ObjectKind::EndpointSlice => {
                if let Some(old) = self.slices.remove(&name)
                    && let Some(o) = owner(&old)
                {
                    self.unindex(&o, &name);
                }
            }
            ObjectKind::Node => {
                if self.node.take().is_some() {
                    self.dirty = Dirty::All;
                }
            }
        }
    }

    /// `objs` is every object of `kind` now: apply them, drop the rest.
    fn replace(&mut self, kind: ObjectKind, objs: Vec<Object>) {
        let keep: BTreeSet<String> = objs.iter().map(|o| o.key().ns_name()).collect();
        if kind == ObjectKind::Service {
            self.held.retain(|name, _| keep.contains(name));
        }
        let gone: Vec<ObjectKey> = match kind {
            ObjectKind::Service => self.services.keys().filter(|k| !keep.contains(*k)).map(|k| key(kind, k)).collect(),
            ObjectKind::EndpointSlice => {
                self.slices.keys().filter(|k| !keep.contains(*k)).map(|k| key(kind, k)).collect()
            }
            // A Node's key has no namespace (`ObjectKey::ns_name` is `/NAME`).
            ObjectKind::Node => self
                .node
                .as_ref()
                .map(|n| Object::Node(Arc::clone(n)).key())
                .filter(|k| !keep.contains(&k.ns_name()))
                .into_iter()
                .collect(),
        };
        for k in &gone {
            self.remove(k);
        }
        for o in objs {
            self.upsert(o);
        }
    }

    /// What changed since the last call; resets it.
    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// Mark everything changed (a full recomputation next time).
    pub fn mark_all(&mut self) {
        self.dirty = Dirty::All;
    }

    /// Mark Service `name` changed.
    pub fn mark_service(&mut self, name: &str) {
        self.dirty.add(name.to_owned());
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// Every Service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = (&ServiceName, &Arc<Service>)> {
        self.services.iter()
    }

    /// The slices labelled for Service `name`, in name order.
    pub fn slices_of(&self, name: &str) -> Vec<&Slice> {
        self.by_service.get(name).into_iter().flatten().filter_map(|s| self.slices.get(s).map(|s| &**s)).collect()
    }

    pub fn node(&self) -> Option<&Node> {
        self.node.as_deref()
    }

    /// Numbers of Services and EndpointSlices held.
    pub fn len(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.slices.is_empty()
    }
}

fn key(kind: ObjectKind, ns_name: &str) -> ObjectKey {
    let (namespace, name) = ns_name.split_once('/').unwrap_or(("", ns_name));
    ObjectKey { kind, namespace: namespace.to_owned(), name: name.to_owned() }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(name: &str, rv: &str) -> Object {
        Object::Service(Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}}))
                .expect("service"),
        ))
    }

    fn slice(name: &str, service: &str, rv: &str) -> Object {
        Object::slice(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv,
                             "labels": {LABEL_SERVICE_NAME: service}},
                "addressType": "IPv4", "endpoints": []
            }))
            .expect("slice"),
        )
    }

    fn dirty(names: &[&str]) -> Dirty {
        Dirty::Services(names.iter().map(|n| format!("ns/{n}")).collect())
    }

    #[test]
    fn changes_dirty_only_the_services_they_touch() {
        let mut s = Store::default();
        s.apply(Event::Replace(ObjectKind::Service, vec![svc("a", "1"), svc("b", "1")]));
        s.apply(Event::Replace(ObjectKind::EndpointSlice, vec![slice("a-1", "a", "1"), slice("b-1", "b", "1")]));
        assert_eq!(s.take_dirty(), dirty(&["a", "b"]));
        assert!(!s.apply(Event::Apply(svc("a", "1"))), "same resourceVersion: no change");
        assert!(s.apply(Event::Apply(slice("b-1", "b", "2"))));
        assert_eq!(s.take_dirty(), dirty(&["b"]), "a slice change dirties its Service only");
        // A slice moving to another Service dirties both.
        s.apply(Event::Apply(slice("b-1", "a", "3")));
        assert_eq!(s.take_dirty(), dirty(&["a", "b"]));
        assert_eq!(s.slices_of("ns/a").len(), 2);
        assert!(s.slices_of("ns/b").is_empty());
        s.apply(Event::Delete(ObjectKey {
            kind: ObjectKind::EndpointSlice,
            namespace: "ns".into(),
            name: "a-1".into(),
        }));
        assert_eq!(s.take_dirty(), dirty(&["a"]));
        // A relist without b: b is deleted; a unchanged stays clean.
        s.apply(Event::Replace(ObjectKind::Service, vec![svc("a", "1")]));
        assert_eq!(s.take_dirty(), dirty(&["b"]));
        assert!(s.service("ns/b").is_none());
        assert_eq!(s.len(), (1, 1));
    }

    #[test]
    fn relisting_the_same_node_changes_nothing() {
        let node = |zone: &str| {
            Object::Node(Arc::new(
                serde_json::from_value(json!({"metadata": {"name": "n1", "resourceVersion": "1",
                    "labels": {"topology.kubernetes.io/zone": zone}}}))
                .expect("node"),
            ))
        };
        let mut s = Store::default();
        s.apply(Event::Replace(ObjectKind::Service, vec![svc("a", "1")]));
        s.apply(Event::Replace(ObjectKind::Node, vec![node("z1")]));
        s.take_dirty();
        assert!(!s.apply(Event::Replace(ObjectKind::Node, vec![node("z1")])), "the same Node: nothing to recompute");
        assert!(s.apply(Event::Replace(ObjectKind::Node, vec![node("z2")])), "another zone: everything");
        assert_eq!(s.take_dirty(), Dirty::All);
        assert!(s.apply(Event::Replace(ObjectKind::Node, vec![])), "the Node gone");
        assert!(s.node().is_none());
    }

    #[test]
    fn a_service_new_during_a_slice_relist_waits_for_its_slices() {
        let mut s = Store::default();
        s.apply(Event::Replace(ObjectKind::Service, vec![svc("old", "1")]));
        s.apply(Event::Replace(ObjectKind::EndpointSlice, vec![slice("old-1", "old", "1")]));
        s.take_dirty();
        // An outage: both kinds relist; the Services' list ends first.
        s.apply(Event::Relisting(ObjectKind::Service));
        s.apply(Event::Relisting(ObjectKind::EndpointSlice));
        s.apply(Event::Replace(ObjectKind::Service, vec![svc("old", "2"), svc("new", "3"), svc("gone", "4")]));
        assert!(s.service("ns/new").is_none(), "held: its slices are not listed yet");
        assert_eq!(s.held(), 2);
        assert_eq!(s.take_dirty(), dirty(&["old"]), "a known Service changes as usual");
        // A watch event for another new Service, and a Service deleted
        // while held.
        s.apply(Event::Apply(svc("newer", "5")));
        s.apply(Event::Delete(ObjectKey { kind: ObjectKind::Service, namespace: "ns".into(), name: "gone".into() }));
        assert!(s.take_dirty().is_empty() && s.held() == 2);
        // The slices' relist ends: held Services come in with their slices.
        s.apply(Event::Replace(
            ObjectKind::EndpointSlice,
            vec![slice("old-1", "old", "1"), slice("new-1", "new", "6"), slice("newer-1", "newer", "7")],
        ));
        assert_eq!(s.held(), 0);
        assert_eq!(s.slices_of("ns/new").len(), 1);
        assert!(s.service("ns/new").is_some() && s.service("ns/newer").is_some() && s.service("ns/gone").is_none());
        assert_eq!(s.take_dirty(), dirty(&["new", "newer"]));
        // Outside a slice relist, a new Service comes in at once.
        s.apply(Event::Apply(svc("later", "8")));
        assert_eq!(s.take_dirty(), dirty(&["later"]));
    }

    #[test]
    fn held_services_are_released_on_demand_and_a_service_relist_drops_vanished_ones() {
        let mut s = Store::default();
        s.apply(Event::Relisting(ObjectKind::EndpointSlice));
        s.apply(Event::Replace(ObjectKind::Service, vec![svc("a", "1"), svc("b", "1")]));
        s.apply(Event::Replace(ObjectKind::Service, vec![svc("a", "2")]));
        assert_eq!(s.held(), 1, "b vanished from the second list");
        assert_eq!(s.release_held(), 1);
        assert_eq!(s.take_dirty(), dirty(&["a"]));
        assert!(s.service("ns/a").is_some());
    }
}
