//! The functional core: Services, EndpointSlices and this node's Node in,
//! desired frontends out. Pure: no I/O, no clock, deterministic order.
//! Host facts (interface and API server addresses) come in through
//! `Config::host`, gathered by the agent.
//!
//! One module per concern, each with its rules in its docs:
//! - `service`: a Service object into what is proxied (validation, types,
//!   policies, affinity, external and LB IPs, node ports);
//! - `endpoints`: slices into endpoints (merging, conditions) and
//!   kube-proxy's `CategorizeEndpoints` (topology, terminating fallback,
//!   local set);
//! - `frontends`: frontends per family and kind, traffic policies mapped
//!   onto the datapath's two scopes, health-check node ports;
//! - `policy`: the addresses and ports a Service may claim;
//! - `node`: this node's name, zone and addresses, and the NodePort
//!   addresses.
//!
//! Here: the families (IPv4 frontends from IPv4 slices only, IPv6 from
//! IPv6; `FQDN` slices ignored), the join of slices to Services (the
//! `kubernetes.io/service-name` label, same namespace), and who holds an
//! address:port two Services claim. A ClusterIP, node port or
//! health-check port (allocated by the API server) takes it from an
//! external or LB IP (written by users); otherwise the first holder keeps
//! it. The loser is rejected, naming both, and takes over when the holder
//! goes. A malformed or refused object is rejected alone, by name.
mod endpoints;
mod frontends;
mod node;
mod policy;
mod service;
#[cfg(test)]
mod testkit;

use std::{
    borrow::Borrow,
    collections::{BTreeSet, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use self::{
    endpoints::PortEndpoints,
    frontends::{Claim, Claimed, Key, Rank},
};
pub use self::{
    endpoints::{Categorized, Endpoint, Uses, categorize},
    node::{HostAddresses, LABEL_ZONE, NodeContext, NodePortAddresses, parse_cidrs, parse_service_cidrs},
    policy::{PortRange, refused_class, startup_warnings},
    service::DEFAULT_AFFINITY_TIMEOUT,
};
pub use crate::types::{Backend, Desired, Family, Frontend, FrontendSpec, Proto};
use crate::{
    source::{Event, Object, ObjectKind, Slice},
    store::{Dirty, Store, ns_name},
    types::{Cidr, Scope},
};

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";

/// A Kubernetes `protocol` field (TCP when absent).
fn parse_proto(s: Option<&str>) -> Result<Proto, String> {
    match s.unwrap_or("TCP") {
        "TCP" => Ok(Proto::Tcp),
        "UDP" => Ok(Proto::Udp),
        other => Err(format!("protocol {other} is not supported (TCP and UDP are)")),
    }
}

/// Agent settings and host facts that affect the model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `--service-proxy-name`: when set, handle only Services labelled
    /// `service.kubernetes.io/service-proxy-name=<name>`; when unset, only
    /// Services without that label (kube-proxy's rule).
    pub service_proxy_name: Option<String>,
    /// This node's name: endpoints with this `nodeName` are local. `None`:
    /// no node context (Local policies have no local endpoints).
    pub node_name: Option<String>,
    /// `--nodeport-addresses`.
    pub nodeport_addresses: NodePortAddresses,
    /// `--service-cluster-ip-range`: at most one CIDR per family.
    pub service_cidrs: Vec<Cidr>,
    /// `--external-ip-cidrs`: `None` when not set (any external IP not
    /// otherwise refused is accepted).
    pub external_ip_cidrs: Option<Vec<Cidr>>,
    /// `--service-node-port-range`.
    pub node_port_range: PortRange,
    /// Addresses of this host, gathered by the agent.
    pub host: HostAddresses,
}

/// An object the model rejected, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name}: {reason}")]
pub struct Rejected {
    pub kind: &'static str,
    /// `namespace/name`.
    pub name: String,
    pub reason: String,
}

/// Something the model ignored in an object it otherwise took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub kind: &'static str,
    /// `namespace/name`.
    pub name: String,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.name, self.message)
    }
}

/// The Services (`ns/name`) whose ClusterIPs, external IPs or LB ingress
/// IPs name one of `addrs`: those whose verdict a change of this host's
/// addresses can change.
pub fn services_naming(store: &Store, addrs: &BTreeSet<IpAddr>) -> Vec<String> {
    if addrs.is_empty() {
        return Vec::new();
    }
    store.services().filter(|(_, svc)| service::names_any(svc, addrs)).map(|(name, _)| name.clone()).collect()
}

/// Compute the desired state from scratch. Rejected objects and warnings
/// are returned beside the result; everything else is in it.
pub fn desired<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
    node: Option<&Node>,
    config: &Config,
) -> (Desired, Vec<Rejected>, Vec<Warning>) {
    let mut store = Store::default();
    let svcs = services.iter().map(|s| Object::Service(Arc::new(s.borrow().clone()))).collect();
    let sls = slices.iter().map(|s| Object::slice(s.borrow().clone())).collect();
    store.apply(Event::Replace(ObjectKind::Service, svcs));
    store.apply(Event::Replace(ObjectKind::EndpointSlice, sls));
    store
        .apply(Event::Replace(ObjectKind::Node, node.map(|n| Object::Node(Arc::new(n.clone()))).into_iter().collect()));
    let mut cache = Cache::default();
    let update = cache.update(&store, &Dirty::All, config);
    (cache.desired, update.rejected, update.warnings)
}

/// One Service's claims, rejections and warnings.
#[derive(Default)]
struct Computed {
    claims: Vec<Claim>,
    rejected: Vec<Rejected>,
    warnings: Vec<Warning>,
}

fn compute_service(svc: &Service, slices: &[&Slice], node: &NodeContext, config: &Config) -> Computed {
    let mut out = Computed::default();
    let mut by_family: Vec<(Family, PortEndpoints)> = Vec::new();
    for slice in slices {
        let Some(family) = Family::from_k8s(slice.address_type()) else {
            continue; // FQDN slices are not proxied.
        };
        let mut scratch = PortEndpoints::new();
        match endpoints::add_slice(slice, family, &mut scratch) {
            Ok(()) => {
                if !by_family.iter().any(|(f, _)| *f == family) {
                    by_family.push((family, PortEndpoints::new()));
                }
                let acc = &mut by_family.iter_mut().find(|(f, _)| *f == family).expect("just added").1;
                for (port, eps) in scratch {
                    let set = acc.entry(port).or_default();
                    for ep in eps.into_values() {
                        endpoints::merge(set, ep);
                    }
                }
            }
            Err(reason) => {
                out.rejected.push(Rejected { kind: "EndpointSlice", name: slice.ns_name(), reason });
            }
        }
    }
    let reject = |reason| Rejected { kind: "Service", name: ns_name(&svc.metadata), reason };
    let valid = match service::validate(svc, config) {
        Ok(Some(v)) => v,
        Ok(None) => return out,
        Err(reason) => {
            out.rejected.push(reject(reason));
            return out;
        }
    };
    if let Err(reason) = policy::check(&valid, node, config) {
        out.rejected.push(reject(reason));
        return out;
    }
    let built = frontends::build(&valid, &by_family, node);
    out.claims = built.claims;
    out.warnings = built.warnings;
    out
}

/// Services recomputed on one thread at most; more are split between the
/// cores (a start-up or a relist recomputes every Service).
const SERVICES_PER_THREAD: usize = 1024;

/// Compute every Service in `names` (`None`: gone from the store), in
/// order. Each Service's computation reads only the store: large sets are
/// computed in parallel chunks.
fn compute_all(
    store: &Store,
    names: Vec<String>,
    node: &NodeContext,
    config: &Config,
) -> Vec<(String, Option<Computed>)> {
    let one = |name: String| {
        let computed = store.service(&name).map(|svc| compute_service(svc, &store.slices_of(&name), node, config));
        (name, computed)
    };
    // The core count is asked only for a large set: the answer costs
    // system calls (cgroup quota files).
    let threads = if names.len() <= SERVICES_PER_THREAD {
        1
    } else {
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get).min(names.len() / SERVICES_PER_THREAD)
    };
    if threads <= 1 {
        return names.into_iter().map(one).collect();
    }
    let chunk = names.len().div_ceil(threads);
    let mut names = names.into_iter();
    let chunks: Vec<Vec<String>> = (0..threads).map(|_| names.by_ref().take(chunk).collect()).collect();
    std::thread::scope(|s| {
        let workers: Vec<_> =
            chunks.into_iter().map(|c| s.spawn(move || c.into_iter().map(one).collect::<Vec<_>>())).collect();
        workers.into_iter().flat_map(|w| w.join().expect("computing a Service does not panic")).collect()
    })
}

/// What a Service holds in `desired`: the claim's frontends are its key in
/// both scopes, its health check the port.
struct Held {
    what: Claimed,
    rank: Rank,
}

/// The model, kept between syncs: only the Services the store reports
/// dirty (their object or one of their slices changed) are recomputed, and
/// the frontends that may have changed are reported, so a sync costs what
/// changed, not what exists (kube-proxy's partial sync). `desired` always
/// holds the full state.
/// Does `desired` hold a NodePort frontend (the unspecified address)? The
/// frontends are ordered by address, the unspecified address first in its
/// family, and no frontend has port 0: one look-up per family, not a walk.
fn has_nodeport(desired: &Desired) -> bool {
    [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)].into_iter().any(|addr| {
        desired.frontends.range(Frontend::new(addr, 0, Proto::Tcp)..).next().is_some_and(|(f, _)| f.addr == addr)
    })
}

#[derive(Default)]
pub struct Cache {
    /// Service (`ns/name`) -> its rejections and warnings, for the
    /// Services that have any: an update walks these, not every Service.
    entries: HashMap<String, (Vec<Rejected>, Vec<Warning>)>,
    /// Service -> what it holds in `desired`.
    held: HashMap<String, Vec<Held>>,
    /// Claimed key -> the Service holding it.
    holders: HashMap<Key, Arc<str>>,
    /// Services that lost a claim to another: re-evaluated every time, so
    /// they take it over when the holder goes.
    contenders: BTreeSet<String>,
    pub desired: Desired,
}

/// The result of `Cache::update`.
#[derive(Debug, Default)]
pub struct Update {
    /// Frontends that were added, removed or may have changed.
    pub dirty: BTreeSet<Frontend>,
    /// Every object currently rejected.
    pub rejected: Vec<Rejected>,
    /// Everything currently ignored in objects otherwise taken.
    pub warnings: Vec<Warning>,
    /// Services recomputed.
    pub recomputed: usize,
}

impl Cache {
    /// Bring `desired` up to date with the Services in `dirty` (and with
    /// the Node and `config`: a change of either must come as
    /// `Dirty::All`, as the store reports a Node change).
    pub fn update(&mut self, store: &Store, dirty: &Dirty, config: &Config) -> Update {
        let node = NodeContext::new(store.node(), config);
        self.desired.nodeport_addresses = node.nodeport_addresses(config);
        self.desired.health_check_addresses =
            (config.nodeport_addresses != NodePortAddresses::All).then(|| self.desired.nodeport_addresses.clone());
        let mut names: BTreeSet<String> = match dirty {
            Dirty::None => BTreeSet::new(),
            Dirty::Services(set) => set.clone(),
            Dirty::All => store
                .services()
                .map(|(n, _)| n.clone())
                .chain(self.entries.keys().cloned())
                .chain(self.held.keys().cloned())
                .collect(),
        };
        names.extend(self.contenders.iter().cloned());
        let mut update = Update { recomputed: names.len(), ..Update::default() };
        let mut changed = compute_all(store, names.into_iter().collect(), &node, config);
        // A Service gone from the store matters only if it held or was refused something.
        changed.retain(|(n, c)| c.is_some() || self.entries.contains_key(n) || self.held.contains_key(n));
        // Withdraw every changed Service first, then place the new ones, so
        // a frontend moving between Services is not refused.
        for (name, _) in &changed {
            self.release(name, |_| true, &mut update.dirty);
            self.contenders.remove(name);
            self.entries.remove(name);
        }
        for (name, computed) in changed {
            let Some(computed) = computed else { continue };
            let (mut rejected, warnings) = (computed.rejected, computed.warnings);
            let shared: Arc<str> = Arc::from(name.as_str());
            for claim in computed.claims {
                self.place(&shared, claim, &mut rejected, &mut update.dirty);
            }
            if !rejected.is_empty() || !warnings.is_empty() {
                self.entries.insert(name, (rejected, warnings));
            }
        }
        for (rejected, warnings) in self.entries.values() {
            update.rejected.extend(rejected.iter().cloned());
            update.warnings.extend(warnings.iter().cloned());
        }
        if !node.known && has_nodeport(&self.desired) {
            update.warnings.push(Warning {
                kind: "Node",
                name: node.name.clone().unwrap_or_else(|| "(no node name)".into()),
                message: "not found: node ports answer on no address until it is (they use its status.addresses)"
                    .into(),
            });
        }
        update.rejected.sort_by(|a, b| (a.kind, &a.name, &a.reason).cmp(&(b.kind, &b.name, &b.reason)));
        update.warnings.sort_by(|a, b| (a.kind, &a.name, &a.message).cmp(&(b.kind, &b.name, &b.message)));
        update
    }

    /// Who holds `key`, for messages: the holder's Service port, or the
    /// Service.
    fn describe_holder(&self, key: &Key, holder: &str) -> String {
        let f = Frontend::new(key.0, key.1, key.2);
        self.desired.frontends.get(&f).map_or_else(|| holder.to_owned(), |s| s.owner.clone())
    }

    /// Take `claim` for Service `name`, or reject it.
    fn place(&mut self, name: &Arc<str>, claim: Claim, rejected: &mut Vec<Rejected>, dirty: &mut BTreeSet<Frontend>) {
        let others: Vec<(Key, Arc<str>)> =
            claim.what.keys().filter_map(|k| self.holders.get(&k).map(|h| (k, Arc::clone(h)))).collect();
        let outranks =
            |held: &Vec<Held>, key: &Key| held.iter().any(|h| h.rank > claim.rank && h.what.keys().any(|k| k == *key));
        let all_outranked =
            others.iter().all(|(k, h)| h != name && self.held.get(&**h).is_some_and(|held| outranks(held, k)));
        if !others.is_empty() && !all_outranked {
            let mut by: Vec<String> = others.iter().map(|(k, h)| self.describe_holder(k, h)).collect();
            by.dedup();
            let reason = format!("{} is already served by {}", claim.what.describe(), by.join(", "));
            rejected.push(Rejected { kind: "Service", name: name.to_string(), reason });
            self.contenders.insert(name.to_string());
            return;
        }
        // Only a ClusterIP outranks: it takes an address:port from an
        // external or LB IP, and the loser reads what it would read had
        // the ClusterIP come first.
        let taker = claim.frontends.first().map_or_else(|| name.to_string(), |(_, s)| s.owner.clone());
        for (key, holder) in others {
            if !self.holders.contains_key(&key) {
                continue; // released with an earlier key of the same claim
            }
            self.release(&holder, |h| h.what.keys().any(|k| k == key), dirty);
            let lost = Frontend::new(key.0, key.1, key.2);
            let reason = format!("{lost} is already served by {taker}");
            self.entries.entry(holder.to_string()).or_default().0.push(Rejected {
                kind: "Service",
                name: holder.to_string(),
                reason,
            });
            self.contenders.insert(holder.to_string());
        }
        for k in claim.what.keys() {
            self.holders.insert(k, Arc::clone(name));
        }
        for (f, spec) in claim.frontends {
            self.desired.frontends.insert(f, spec);
            dirty.insert(f);
        }
        if let (Claimed::HealthCheck(port), Some(check)) = (claim.what, claim.health_check) {
            self.desired.health_checks.insert(port, check);
        }
        self.held.entry(name.to_string()).or_default().push(Held { what: claim.what, rank: claim.rank });
    }

    /// Withdraw what Service `name` holds that matches `which`.
    fn release(&mut self, name: &str, which: impl Fn(&Held) -> bool, dirty: &mut BTreeSet<Frontend>) {
        let Some(list) = self.held.get_mut(name) else { return };
        let (gone, keep): (Vec<Held>, Vec<Held>) = std::mem::take(list).into_iter().partition(|h| which(h));
        if keep.is_empty() {
            self.held.remove(name);
        } else {
            *list = keep;
        }
        for h in gone {
            for k in h.what.keys() {
                self.holders.remove(&k);
            }
            match h.what {
                Claimed::Address(k) => {
                    for scope in [Scope::External, Scope::Internal] {
                        let f = Frontend::new(k.0, k.1, k.2).with_scope(scope);
                        if self.desired.frontends.remove(&f).is_some() {
                            dirty.insert(f);
                        }
                    }
                }
                Claimed::HealthCheck(port) => {
                    self.desired.health_checks.remove(&port);
                }
            }
        }
    }
}

#[cfg(test)]
#[expect(clippy::needless_pass_by_value, clippy::type_complexity, reason = "test tables read best inline")]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn a_nodeport_frontend_of_either_family_is_found_among_any_others() {
        let mut d = Desired::default();
        let fe = |a: &str, port| Frontend::new(a.parse().unwrap(), port, Proto::Udp);
        for f in [fe("198.19.0.1", 1), fe("1.0.0.0", 80), fe("fd00::1", 1), fe("::1", 53)] {
            d.frontends.insert(f, FrontendSpec::default());
        }
        assert!(!has_nodeport(&d), "no unspecified address");
        for nodeport in [fe("0.0.0.0", 65535), fe("::", 30080)] {
            let mut d = d.clone();
            d.frontends.insert(nodeport, FrontendSpec::default());
            assert!(has_nodeport(&d), "{nodeport}");
        }
    }

    fn svc(name: &str, ips: &[&str], families: &[&str], ports: Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIP": ips.first(), "clusterIPs": ips, "ipFamilies": families, "ports": ports}
        }))
        .expect("valid Service")
    }

    fn web_ports() -> Value {
        json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"}])
    }

    /// A slice of Service `svc` with `(name, port, protocol)` ports and
    /// `(address, ready, serving, terminating)` endpoints (None: unset).
    fn slice(
        name: &str,
        svc: &str,
        family: &str,
        ports: Value,
        eps: &[(&str, Option<bool>, Option<bool>, Option<bool>)],
    ) -> EndpointSlice {
        let eps: Vec<Value> = eps
            .iter()
            .map(|(a, r, s, t)| json!({"addresses": [a], "conditions": {"ready": r, "serving": s, "terminating": t}}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "labels": {LABEL_SERVICE_NAME: svc}},
            "addressType": family,
            "ports": ports,
            "endpoints": eps,
        }))
        .expect("valid EndpointSlice")
    }

    fn http(port: u16) -> Value {
        json!([{"name": "http", "port": port, "protocol": "TCP"}])
    }

    const R: (Option<bool>, Option<bool>, Option<bool>) = (Some(true), Some(true), Some(false));
    const T: (Option<bool>, Option<bool>, Option<bool>) = (Some(false), Some(true), Some(true));

    fn ep(a: &str, c: (Option<bool>, Option<bool>, Option<bool>)) -> (&str, Option<bool>, Option<bool>, Option<bool>) {
        (a, c.0, c.1, c.2)
    }

    fn v4_slice() -> EndpointSlice {
        slice("web-v4", "web", "IPv4", http(8080), &[ep("198.18.2.2", R), ep("198.18.3.2", R)])
    }

    fn v6_slice() -> EndpointSlice {
        slice("web-v6", "web", "IPv6", http(8080), &[ep("fd00::2:2", R)])
    }

    /// The frontends as `vip:port/proto -> [backends]` strings.
    fn table(services: &[Service], slices: &[EndpointSlice]) -> (Vec<String>, Vec<Rejected>) {
        let (d, rejected, _) = desired(services, slices, None, &Config::default());
        let rows = d
            .frontends
            .iter()
            .map(|(f, s)| {
                let b: Vec<String> = s.backends.iter().map(ToString::to_string).collect();
                format!("{f} -> [{}]", b.join(" "))
            })
            .collect();
        (rows, rejected)
    }

    #[test]
    fn dual_stack_cases_from_the_kubernetes_docs() {
        let v4b = "198.19.0.10:80/TCP -> [198.18.2.2:8080/TCP 198.18.3.2:8080/TCP]";
        let v6b = "[fd00:ffff::a]:80/TCP -> [[fd00::2:2]:8080/TCP]";
        let v6_empty = "[fd00:ffff::a]:80/TCP -> []";
        let cases: Vec<(&str, Service, Vec<EndpointSlice>, Vec<&str>)> = vec![
            (
                "SingleStack IPv4 ignores IPv6 slices",
                svc("web", &["198.19.0.10"], &["IPv4"], web_ports()),
                vec![v4_slice(), v6_slice()],
                vec![v4b],
            ),
            (
                "SingleStack IPv6 ignores IPv4 slices",
                svc("web", &["fd00:ffff::a"], &["IPv6"], web_ports()),
                vec![v4_slice(), v6_slice()],
                vec![v6b],
            ),
            (
                "PreferDualStack [IPv4, IPv6]",
                svc("web", &["198.19.0.10", "fd00:ffff::a"], &["IPv4", "IPv6"], web_ports()),
                vec![v4_slice(), v6_slice()],
                vec![v4b, v6b],
            ),
            (
                "RequireDualStack [IPv6, IPv4]: same datapath",
                svc("web", &["fd00:ffff::a", "198.19.0.10"], &["IPv6", "IPv4"], web_ports()),
                vec![v6_slice(), v4_slice()],
                vec![v4b, v6b],
            ),
            (
                "RequireDualStack with only IPv4 endpoints: the IPv6 VIP has none, never IPv4 ones",
                svc("web", &["198.19.0.10", "fd00:ffff::a"], &["IPv4", "IPv6"], web_ports()),
                vec![v4_slice()],
                vec![v4b, v6_empty],
            ),
        ];
        for (what, s, slices, want) in cases {
            let (rows, rejected) = table(&[s], &slices);
            assert!(rejected.is_empty(), "{what}: {rejected:?}");
            let mut want: Vec<String> = want.into_iter().map(String::from).collect();
            want.sort();
            assert_eq!(rows, want, "{what}");
        }
    }

    #[test]
    fn switching_single_to_dual_stack_and_back_adds_and_removes_the_second_vip() {
        let single = svc("web", &["198.19.0.10"], &["IPv4"], web_ports());
        let dual = svc("web", &["198.19.0.10", "fd00:ffff::a"], &["IPv4", "IPv6"], web_ports());
        let slices = [v4_slice(), v6_slice()];
        let (a, _) = table(std::slice::from_ref(&single), &slices);
        let (b, _) = table(&[dual], &slices);
        let (c, _) = table(&[single], &slices);
        assert_eq!(a.len(), 1);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0], a[0], "the IPv4 frontend is untouched by the switch");
        assert_eq!(a, c);
    }

    #[test]
    fn services_that_are_not_proxied() {
        let mut headless = svc("web", &["None"], &["IPv4"], web_ports());
        assert!(table(&[headless.clone()], &[v4_slice()]).0.is_empty(), "headless");
        headless.spec.as_mut().expect("spec").cluster_ips = None;
        headless.spec.as_mut().expect("spec").cluster_ip = Some("None".into());
        assert!(table(&[headless], &[v4_slice()]).0.is_empty(), "headless (legacy field)");
        let mut ext = svc("web", &["198.19.0.10"], &["IPv4"], web_ports());
        ext.spec.as_mut().expect("spec").type_ = Some("ExternalName".into());
        assert!(table(&[ext], &[v4_slice()]).0.is_empty(), "ExternalName");
        let mut other = svc("web", &["198.19.0.10"], &["IPv4"], web_ports());
        other.metadata.labels = Some([(LABEL_SERVICE_PROXY_NAME.to_owned(), "other".to_owned())].into());
        assert!(table(&[other.clone()], &[v4_slice()]).0.is_empty(), "another proxy's Service");
        let cfg = Config { service_proxy_name: Some("other".into()), ..Config::default() };
        assert_eq!(desired(&[other], &[v4_slice()], None, &cfg).0.frontends.len(), 1, "ours when the name matches");
        let plain = svc("web", &["198.19.0.10"], &["IPv4"], web_ports());
        assert!(
            desired(&[plain], &[v4_slice()], None, &cfg).0.frontends.is_empty(),
            "with a name set, unlabelled Services are not ours"
        );
    }

    #[test]
    fn malformed_services_are_rejected_alone_with_their_name() {
        let good = svc("good", &["198.19.0.11"], &["IPv4"], web_ports());
        let cases: Vec<(Service, &str)> = vec![
            (svc("web", &["198.19.0.999"], &["IPv4"], web_ports()), "not an IP address"),
            (svc("web", &["fd00:ffff::a"], &["IPv4"], web_ports()), "is IPv6 but ipFamilies[0] is IPv4"),
            (svc("web", &["198.19.0.10", "198.19.0.12"], &["IPv4", "IPv6"], web_ports()), "more than one IPv4"),
            (svc("web", &["198.19.0.10"], &["IPv4"], json!([{"name": "a", "port": 0}])), "out of range"),
            (svc("web", &["198.19.0.10"], &["IPv4"], json!([{"name": "a", "port": 70000}])), "out of range"),
            (
                svc("web", &["198.19.0.10"], &["IPv4"], json!([{"name": "a", "port": 80}, {"name": "b", "port": 80}])),
                "more than once",
            ),
            (
                svc("web", &["198.19.0.10"], &["IPv4"], json!([{"name": "a", "port": 80, "protocol": "SCTP"}])),
                "not supported",
            ),
        ];
        for (bad, reason) in cases {
            let (rows, rejected) = table(&[bad, good.clone()], &[]);
            assert_eq!(rows.len(), 1, "the good Service is still programmed ({reason})");
            assert_eq!(rejected.len(), 1, "{reason}");
            assert_eq!(rejected[0].name, "default/web");
            assert!(rejected[0].reason.contains(reason), "{} does not say {reason:?}", rejected[0]);
        }
    }

    #[test]
    fn slices_are_joined_by_label_and_family() {
        let s = svc("web", &["198.19.0.10"], &["IPv4"], web_ports());
        let mut unlabelled = slice("x", "web", "IPv4", http(8080), &[ep("198.18.9.9", R)]);
        unlabelled.metadata.labels = None;
        let mut other_ns = slice("y", "web", "IPv4", http(8080), &[ep("198.18.9.8", R)]);
        other_ns.metadata.namespace = Some("other".into());
        let fqdn = slice("z", "web", "FQDN", http(8080), &[ep("example.invalid", R)]);
        let wrong_family = slice("w", "web", "IPv6", http(8080), &[ep("198.18.9.7", R)]);
        let (rows, rejected) = table(&[s], &[v4_slice(), unlabelled, other_ns, fqdn, wrong_family]);
        assert_eq!(rows, vec!["198.19.0.10:80/TCP -> [198.18.2.2:8080/TCP 198.18.3.2:8080/TCP]"]);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].name, "default/w");
        assert!(rejected[0].reason.contains("addressType is IPv6"), "{}", rejected[0]);
    }

    #[test]
    fn a_slice_with_an_endpoint_on_a_refused_address_is_rejected_by_name() {
        // The API server's ValidateEndpointIP refuses these; a manifests
        // directory has no API server, so the model does.
        let cases = [
            ("IPv4", "127.0.0.1", "loopback"),
            ("IPv6", "::1", "loopback"),
            ("IPv4", "0.0.0.0", "unspecified"),
            ("IPv6", "::", "unspecified"),
            ("IPv4", "169.254.169.254", "link-local"),
            ("IPv6", "fe80::1", "link-local"),
            ("IPv4", "224.0.0.5", "link-local multicast"),
            ("IPv6", "ff02::1", "link-local multicast"),
        ];
        let s = svc("web", &["198.19.0.10", "fd00:ffff::a"], &["IPv4", "IPv6"], web_ports());
        for (family, addr, what) in cases {
            let bad = slice("bad", "web", family, http(8080), &[ep(addr, R)]);
            let (rows, rejected) = table(std::slice::from_ref(&s), &[v4_slice(), bad]);
            assert_eq!(rows[0], "198.19.0.10:80/TCP -> [198.18.2.2:8080/TCP 198.18.3.2:8080/TCP]", "{addr}");
            assert_eq!(rejected.len(), 1, "{addr}");
            assert_eq!(rejected[0].name, "default/bad");
            assert!(rejected[0].reason.contains(addr) && rejected[0].reason.contains(what), "{}", rejected[0]);
        }
    }

    #[test]
    fn many_slices_are_unioned_and_duplicates_count_once() {
        let s = svc("web", &["198.19.0.10"], &["IPv4"], web_ports());
        let a = slice("a", "web", "IPv4", http(8080), &[ep("198.18.2.2", R), ep("198.18.3.2", T)]);
        // The same endpoint moved to a new slice and is ready there.
        let b = slice("b", "web", "IPv4", http(8080), &[ep("198.18.3.2", R), ep("198.18.4.2", R)]);
        let (rows, _) = table(&[s], &[a, b]);
        assert_eq!(rows, vec!["198.19.0.10:80/TCP -> [198.18.2.2:8080/TCP 198.18.3.2:8080/TCP 198.18.4.2:8080/TCP]"]);
    }

    #[test]
    fn named_target_ports_resolve_per_slice_and_protocols_stay_apart() {
        let s = svc(
            "web",
            &["198.19.0.10"],
            &["IPv4"],
            json!([{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 80, "protocol": "UDP"}]),
        );
        let a = slice(
            "a",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
            &[ep("198.18.2.2", R)],
        );
        let b = slice(
            "b",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 9090, "protocol": "TCP"}, {"name": "dns", "port": 5353, "protocol": "UDP"}]),
            &[ep("198.18.3.2", R)],
        );
        let (rows, _) = table(&[s], &[a, b]);
        assert_eq!(
            rows,
            vec![
                "198.19.0.10:80/TCP -> [198.18.2.2:8080/TCP 198.18.3.2:9090/TCP]",
                "198.19.0.10:80/UDP -> [198.18.3.2:5353/UDP]",
            ]
        );
    }

    #[test]
    fn a_port_missing_from_the_slices_has_no_backends() {
        let s = svc("web", &["198.19.0.10"], &["IPv4"], json!([{"name": "metrics", "port": 9100}]));
        let (rows, _) = table(&[s], &[v4_slice()]);
        assert_eq!(rows, vec!["198.19.0.10:9100/TCP -> []"]);
    }

    #[test]
    fn endpoint_conditions_ready_then_terminating_fallback() {
        let s = || svc("web", &["198.19.0.10"], &["IPv4"], web_ports());
        let none = (None, None, None);
        let not_serving = (Some(false), Some(false), Some(true));
        let not_ready = (Some(false), Some(false), Some(false));
        let cases: Vec<(&str, Vec<(&str, Option<bool>, Option<bool>, Option<bool>)>, &str)> = vec![
            (
                "ready ones only while any is ready",
                vec![ep("198.18.2.2", R), ep("198.18.3.2", T)],
                "[198.18.2.2:8080/TCP]",
            ),
            (
                "serving+terminating when none is ready",
                vec![ep("198.18.2.2", T), ep("198.18.3.2", T), ep("198.18.4.2", not_serving)],
                "[198.18.2.2:8080/TCP 198.18.3.2:8080/TCP]",
            ),
            ("not serving: unused", vec![ep("198.18.2.2", not_serving), ep("198.18.3.2", not_ready)], "[]"),
            ("no conditions: ready", vec![ep("198.18.2.2", none)], "[198.18.2.2:8080/TCP]"),
        ];
        for (what, eps, want) in cases {
            let (rows, _) = table(&[s()], &[slice("a", "web", "IPv4", http(8080), &eps)]);
            assert_eq!(rows, vec![format!("198.19.0.10:80/TCP -> {want}")], "{what}");
        }
    }

    #[test]
    fn selectorless_services_use_hand_made_slices() {
        // No selector: the endpoints controller leaves it alone, and a
        // user-managed slice carrying the service-name label feeds it.
        let s = svc("external-db", &["198.19.0.20"], &["IPv4"], json!([{"name": "pg", "port": 5432}]));
        assert!(s.spec.as_ref().expect("spec").selector.is_none());
        let mut hand_made = slice(
            "external-db-1",
            "external-db",
            "IPv4",
            json!([{"name": "pg", "port": 5432}]),
            &[ep("198.18.7.7", R)],
        );
        hand_made
            .metadata
            .labels
            .as_mut()
            .expect("labels")
            .insert("endpointslice.kubernetes.io/managed-by".into(), "staff".into());
        let (rows, rejected) = table(&[s], &[hand_made]);
        assert!(rejected.is_empty());
        assert_eq!(rows, vec!["198.19.0.20:5432/TCP -> [198.18.7.7:5432/TCP]"]);
    }

    #[test]
    fn two_services_on_one_vip_port_keep_the_first() {
        let a = svc("a", &["198.19.0.10"], &["IPv4"], web_ports());
        let b = svc("b", &["198.19.0.10"], &["IPv4"], web_ports());
        let (d, rejected, _) = desired(&[a, b], &[] as &[EndpointSlice], None, &Config::default());
        assert_eq!(d.frontends.values().next().map(|s| s.owner.as_str()), Some("default/a:http"));
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].reason.contains("already served by default/a:http"));
    }

    /// Issue 14 point 3: two Services claiming one external or LB
    /// address:port: the first keeps it, the other is rejected naming both.
    #[test]
    fn two_services_claiming_one_external_or_lb_address_keep_the_first() {
        let ext = |name: &str, cip: &str| {
            let mut s = svc(name, &[cip], &["IPv4"], web_ports());
            s.spec.as_mut().expect("spec").external_ips = Some(vec!["203.0.113.5".into()]);
            s
        };
        let lb = |name: &str, cip: &str| {
            let mut s = svc(name, &[cip], &["IPv4"], web_ports());
            s.spec.as_mut().expect("spec").type_ = Some("LoadBalancer".into());
            s.status =
                serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}})).expect("status");
            s
        };
        for (a, b) in [
            (ext("a", "198.19.0.10"), ext("b", "198.19.0.11")),
            (lb("a", "198.19.0.10"), lb("b", "198.19.0.11")),
            (ext("a", "198.19.0.10"), lb("b", "198.19.0.11")),
        ] {
            let (d, rejected, _) = desired(&[b.clone(), a.clone()], &[] as &[EndpointSlice], None, &Config::default());
            let owner =
                |addr: &str| d.frontends.iter().find(|(f, _)| f.addr.to_string() == addr).map(|(_, s)| s.owner.clone());
            assert_eq!(owner("203.0.113.5").as_deref(), Some("default/a:http"));
            assert_eq!(owner("198.19.0.11").as_deref(), Some("default/b:http"), "b keeps its other frontends");
            assert_eq!(rejected.len(), 1, "{rejected:?}");
            assert_eq!(rejected[0].name, "default/b");
            assert!(
                rejected[0].reason.contains("203.0.113.5:80/TCP is already served by default/a:http"),
                "{}",
                rejected[0]
            );
        }
    }

    /// An external IP cannot take a ClusterIP:port, whatever the order the
    /// Services arrive in (a Service named to sort first, claiming the
    /// `kubernetes` Service's address, would otherwise win at start-up).
    #[test]
    fn a_cluster_ip_takes_its_address_back_from_an_external_ip_whatever_the_order() {
        let cfg = Config::default();
        let api = || with_rv(svc("kubernetes", &["198.19.0.1"], &["IPv4"], web_ports()), 1);
        let evil = || {
            let mut s = with_rv(svc("aaa-evil", &["198.19.0.66"], &["IPv4"], web_ports()), 1);
            s.spec.as_mut().expect("spec").external_ips = Some(vec!["198.19.0.1".into()]);
            s
        };
        let holder = |d: &Desired| {
            d.frontends.iter().find(|(f, _)| f.addr.to_string() == "198.19.0.1").map(|(_, s)| s.owner.clone())
        };
        let (d, rejected, _) = desired(&[evil(), api()], &[] as &[EndpointSlice], None, &cfg);
        assert_eq!(holder(&d).as_deref(), Some("default/kubernetes:http"));
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].name, "default/aaa-evil");
        assert!(rejected[0].reason.contains("already served by default/kubernetes:http"), "{}", rejected[0]);
        // Live: the external IP holds it first, then the ClusterIP arrives.
        let none: &[EndpointSlice] = &[];
        let mut live = Live::default();
        assert!(live.update(&[evil()], none, &cfg).rejected.is_empty());
        assert_eq!(holder(&live.cache.desired).as_deref(), Some("default/aaa-evil:http"));
        let u = live.update(&[evil(), api()], none, &cfg);
        assert_eq!(holder(&live.cache.desired).as_deref(), Some("default/kubernetes:http"));
        assert!(u.dirty.iter().any(|f| f.addr.to_string() == "198.19.0.1"));
        assert_eq!(u.rejected.len(), 1, "{:?}", u.rejected);
        assert!(
            u.rejected[0].reason.contains("198.19.0.1:80/TCP is already served by default/kubernetes:http"),
            "{}",
            u.rejected[0]
        );
        assert_eq!(live.cache.desired, desired(&[evil(), api()], none, None, &cfg).0, "incremental equals full");
        // The ClusterIP goes: the external IP is served again.
        let u = live.update(&[evil()], none, &cfg);
        assert!(u.rejected.is_empty());
        assert_eq!(holder(&live.cache.desired).as_deref(), Some("default/aaa-evil:http"));
    }

    /// A change of this host's addresses re-checks only the Services that
    /// name a changed address (as ClusterIP, external or LB IP).
    #[test]
    fn only_services_naming_a_changed_address_are_checked_again() {
        let mut ext = svc("ext", &["198.19.0.11"], &["IPv4"], web_ports());
        ext.spec.as_mut().expect("spec").external_ips = Some(vec!["198.18.77.1".into()]);
        let mut lb = svc("lb", &["198.19.0.12"], &["IPv4"], web_ports());
        lb.status = serde_json::from_value(json!({"loadBalancer": {"ingress": [{"ip": "fd00::77"}]}})).expect("status");
        let services = [
            svc("cip", &["198.18.77.1"], &["IPv4"], web_ports()),
            ext,
            lb,
            svc("other", &["198.19.0.13"], &["IPv4"], web_ports()),
        ];
        let mut store = Store::default();
        store.apply(Event::Replace(
            ObjectKind::Service,
            services.iter().map(|s| Object::Service(Arc::new(s.clone()))).collect(),
        ));
        let addrs = |l: &[&str]| l.iter().map(|a| a.parse().expect("ip")).collect::<BTreeSet<IpAddr>>();
        let mut named = services_naming(&store, &addrs(&["198.18.77.1", "fd00::77", "198.18.1.1"]));
        named.sort();
        assert_eq!(named, vec!["default/cip", "default/ext", "default/lb"]);
        assert!(services_naming(&store, &addrs(&["198.18.1.1"])).is_empty(), "an unrelated address: nothing");
        assert!(services_naming(&store, &BTreeSet::new()).is_empty());
    }

    /// Health-check node ports are claimed on both families' TCP node port
    /// space: a second Service on the same port is rejected.
    #[test]
    fn a_health_check_port_is_claimed_like_a_node_port() {
        let lb = |name: &str, cip: &str, hc: u16, np: u16| {
            let mut s = svc(name, &[cip], &["IPv4"], json!([{"name": "http", "port": 80, "nodePort": np}]));
            let spec = s.spec.as_mut().expect("spec");
            spec.type_ = Some("LoadBalancer".into());
            spec.external_traffic_policy = Some("Local".into());
            spec.health_check_node_port = Some(i32::from(hc));
            s
        };
        let (d, rejected, _) = desired(
            &[lb("a", "198.19.0.10", 30100, 30080), lb("b", "198.19.0.11", 30100, 30081)],
            &[] as &[EndpointSlice],
            None,
            &Config::default(),
        );
        assert_eq!(d.health_checks.get(&30100).map(|h| h.service.as_str()), Some("default/a"));
        assert_eq!(rejected.len(), 1);
        assert!(
            rejected[0].reason.contains("healthCheckNodePort 30100 is already served by default/a"),
            "{}",
            rejected[0]
        );
        let (_, rejected, _) = desired(
            &[lb("a", "198.19.0.10", 30100, 30080), lb("b", "198.19.0.11", 30101, 30100)],
            &[] as &[EndpointSlice],
            None,
            &Config::default(),
        );
        assert_eq!(rejected.len(), 1, "a node port on a health-check port");
        assert!(
            rejected[0].reason.contains("nodePort 30100/TCP (IPv4) is already served by default/a"),
            "{}",
            rejected[0]
        );
    }

    fn with_rv<T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>>(
        mut o: T,
        rv: u32,
    ) -> T {
        o.metadata_mut().resource_version = Some(rv.to_string());
        o
    }

    /// The store and the cache between syncs, fed whole lists as a relist
    /// would feed them.
    #[derive(Default)]
    struct Live {
        store: Store,
        cache: Cache,
    }

    impl Live {
        fn update(&mut self, services: &[Service], slices: &[EndpointSlice], cfg: &Config) -> Update {
            let svcs = services.iter().map(|s| Object::Service(Arc::new(s.clone()))).collect();
            let sls = slices.iter().map(|s| Object::slice(s.clone())).collect();
            self.store.apply(Event::Replace(ObjectKind::Service, svcs));
            self.store.apply(Event::Replace(ObjectKind::EndpointSlice, sls));
            let dirty = self.store.take_dirty();
            self.cache.update(&self.store, &dirty, cfg)
        }
    }

    #[test]
    fn the_cache_recomputes_only_what_changed_and_matches_a_full_computation() {
        let cfg = Config::default();
        let web = with_rv(svc("web", &["198.19.0.10", "fd00:ffff::a"], &["IPv4", "IPv6"], web_ports()), 1);
        let db = with_rv(svc("db", &["198.19.0.11"], &["IPv4"], web_ports()), 1);
        let mut slices = vec![
            with_rv(v4_slice(), 1),
            with_rv(v6_slice(), 1),
            with_rv(slice("db-1", "db", "IPv4", http(8080), &[ep("198.18.5.5", R)]), 1),
        ];
        let services = vec![web, db];
        let mut live = Live::default();
        let first = live.update(&services, &slices, &cfg);
        assert_eq!(first.dirty.len(), 3, "everything is new");
        let again = live.update(&services, &slices, &cfg);
        assert!(again.dirty.is_empty() && again.recomputed == 0, "nothing changed, nothing recomputed");

        // One endpoint of db changes (new resourceVersion).
        slices[2] = with_rv(slice("db-1", "db", "IPv4", http(8080), &[ep("198.18.6.6", R)]), 2);
        let u = live.update(&services, &slices, &cfg);
        assert_eq!(u.dirty.iter().map(ToString::to_string).collect::<Vec<_>>(), vec!["198.19.0.11:80/TCP"]);
        assert_eq!(u.recomputed, 1, "only db is recomputed");
        assert_eq!(live.cache.desired, desired(&services, &slices, None, &cfg).0, "incremental equals full");

        // db goes away.
        let u = live.update(&services[..1], &slices, &cfg);
        assert_eq!(u.dirty.len(), 1);
        assert_eq!(live.cache.desired, desired(&services[..1], &slices, None, &cfg).0);
    }

    #[test]
    fn many_services_computed_in_parallel_equal_the_same_computed_a_few_at_a_time() {
        let cfg = Config::default();
        let n = 3 * SERVICES_PER_THREAD;
        // Every 97th Service contends for its predecessor's address: who
        // keeps it must not depend on which thread computed whom.
        let ip = |i: usize| {
            let j = if i.is_multiple_of(97) && i > 0 { i - 1 } else { i };
            (format!("198.19.{}.{}", j / 250, j % 250 + 1), format!("fd00:ffff::{j:x}"))
        };
        let services: Vec<Service> = (0..n)
            .map(|i| {
                let (v4, v6) = ip(i);
                with_rv(svc(&format!("s{i}"), &[&v4, &v6], &["IPv4", "IPv6"], web_ports()), 1)
            })
            .collect();
        let slices: Vec<EndpointSlice> = (0..n)
            .map(|i| {
                let addr = format!("198.18.{}.{}", i / 250, i % 250 + 1);
                with_rv(slice(&format!("s{i}-a"), &format!("s{i}"), "IPv4", http(8080), &[ep(&addr, R)]), 1)
            })
            .collect();
        let mut bulk = Live::default();
        let all = bulk.update(&services, &slices, &cfg);
        assert_eq!(all.recomputed, n, "one pass over every Service, in parallel chunks");
        assert!(!all.rejected.is_empty(), "the contenders are refused");
        let mut few = Live::default();
        let mut last = Update::default();
        for k in (0..=n).step_by(100).skip(1).chain([n]) {
            last = few.update(&services[..k], &slices[..k], &cfg);
        }
        assert_eq!(bulk.cache.desired, few.cache.desired);
        assert_eq!(all.rejected, last.rejected);
    }

    #[test]
    fn a_refused_contender_takes_over_when_the_holder_goes() {
        let cfg = Config::default();
        let a = with_rv(svc("a", &["198.19.0.10"], &["IPv4"], web_ports()), 1);
        let b = with_rv(svc("b", &["198.19.0.10"], &["IPv4"], web_ports()), 1);
        let none: &[EndpointSlice] = &[];
        let mut live = Live::default();
        let u = live.update(&[a.clone(), b.clone()], none, &cfg);
        assert_eq!(u.rejected.len(), 1);
        let u = live.update(&[b], none, &cfg);
        assert!(u.rejected.is_empty(), "{:?}", u.rejected);
        assert_eq!(live.cache.desired.frontends.values().next().map(|s| s.owner.as_str()), Some("default/b:http"));
    }

    #[test]
    fn random_changes_keep_the_cache_equal_to_a_full_computation() {
        let cfg = Config::default();
        let mut rng = crate::rand::XorShift::new(0x1234_5678_9abc_def1);
        let mut rnd = move |n: u64| rng.below(n);
        let mut rv = 1;
        let mut live = Live::default();
        let mut services: Vec<Service> = Vec::new();
        let mut slices: Vec<EndpointSlice> = Vec::new();
        for _ in 0..300 {
            rv += 1;
            let i = rnd(6);
            let name = format!("s{i}");
            match rnd(5) {
                0 => services.retain(|s| s.metadata.name.as_deref() != Some(name.as_str())),
                1 => slices.retain(|s| s.metadata.name.as_deref() != Some(name.as_str())),
                2 | 3 => {
                    // Services may share a VIP, and claim another's as an
                    // external IP: exercises contention and take-over too.
                    let vip = format!("198.19.0.{}", 10 + rnd(4));
                    let mut s = with_rv(svc(&name, &[&vip], &["IPv4"], web_ports()), rv);
                    if rnd(2) == 0 {
                        let ext = format!("198.19.0.{}", 10 + rnd(4));
                        if ext != vip {
                            s.spec.as_mut().expect("spec").external_ips = Some(vec![ext]);
                        }
                    }
                    services.retain(|o| o.metadata.name != s.metadata.name);
                    services.push(s);
                }
                _ => {
                    let eps: Vec<String> = (0..rnd(4)).map(|k| format!("198.18.{}.{}", i, k + 2)).collect();
                    let refs: Vec<_> = eps.iter().map(|a| ep(a, if rnd(3) == 0 { T } else { R })).collect();
                    let s = with_rv(slice(&name, &name, "IPv4", http(8080), &refs), rv);
                    slices.retain(|o| o.metadata.name != s.metadata.name);
                    slices.push(s);
                }
            }
            let u = live.update(&services, &slices, &cfg);
            let (full, rejected, _) = desired(&services, &slices, None, &cfg);
            let cached = &live.cache.desired.frontends;
            // Which contender holds a shared VIP may differ; the set of
            // frontends and their backends, when owned alike, may not.
            assert_eq!(cached.keys().collect::<Vec<_>>(), full.frontends.keys().collect::<Vec<_>>());
            for (f, spec) in &full.frontends {
                if cached[f].owner == spec.owner {
                    assert_eq!(cached[f], *spec, "{f}");
                }
            }
            assert_eq!(u.rejected.len(), rejected.len(), "{:?} vs {rejected:?}", u.rejected);
        }
    }
}
