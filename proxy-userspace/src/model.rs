//! The functional core: Services and EndpointSlices in, desired frontends
//! out. Pure: no I/O, no clock, deterministic order.
//!
//! Rules (Kubernetes semantics, see shared/SERVICE-SEMANTICS.md):
//! - one frontend per (ClusterIP, port, protocol) for every address in
//!   `spec.clusterIPs` (or `spec.clusterIP` when the list is empty);
//! - the family of each ClusterIP picks the slices that feed it: IPv4 from
//!   `addressType: IPv4`, IPv6 from `IPv6`; `FQDN` slices are ignored;
//! - slices belong to the Service named by their `kubernetes.io/service-name`
//!   label in the same namespace; endpoints are unioned over all slices and
//!   counted once;
//! - a Service port takes its backends' port from the slice port with the
//!   same name and protocol (named `targetPort`s resolve this way);
//! - `ready` endpoints serve; when none is ready, `serving && terminating`
//!   ones do; otherwise the frontend has no backends;
//! - headless, ExternalName and other proxies' Services are not proxied;
//! - a malformed object is rejected alone, with an error naming it.
use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

pub use crate::types::{Backend, Desired, Family, Frontend, FrontendSpec, Proto};
use crate::{
    source::{Event, Object, ObjectKind},
    store::{Dirty, Store, ns_name},
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

/// Agent settings that affect the model.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// `--service-proxy-name`: when set, handle only Services labelled
    /// `service.kubernetes.io/service-proxy-name=<name>`; when unset, only
    /// Services without that label (kube-proxy's rule).
    pub service_proxy_name: Option<String>,
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

/// One Service port, validated.
struct SvcPort {
    name: String,
    port: u16,
    proto: Proto,
}

/// A Service that passed validation and is ours to proxy.
struct ValidService {
    name: String,
    cluster_ips: Vec<IpAddr>,
    ports: Vec<SvcPort>,
}

/// The Service's verdict: proxy it, skip it silently (not ours), or reject.
fn validate_service(svc: &Service, config: &Config) -> Result<Option<ValidService>, String> {
    let proxy_label = svc.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME));
    if proxy_label != config.service_proxy_name.as_ref() {
        return Ok(None);
    }
    let Some(spec) = &svc.spec else { return Ok(None) };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => vec![],
    };
    if ips.is_empty() || ips.iter().any(|ip| ip.is_empty() || *ip == "None") {
        // Headless (or not yet allocated): nothing to proxy.
        return Ok(None);
    }
    let mut cluster_ips = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let addr: IpAddr = ip.parse().map_err(|_| format!("clusterIPs[{i}] {ip:?} is not an IP address"))?;
        let family = Family::of(addr);
        if cluster_ips.iter().any(|a| Family::of(*a) == family) {
            return Err(format!("clusterIPs has more than one {} address", family.k8s_name()));
        }
        if let Some(declared) = spec.ip_families.as_ref().and_then(|f| f.get(i))
            && Family::from_k8s(declared) != Some(family)
        {
            return Err(format!("clusterIPs[{i}] {ip} is {} but ipFamilies[{i}] is {declared}", family.k8s_name()));
        }
        cluster_ips.push(addr);
    }
    if let (Some(legacy), Some(first)) = (spec.cluster_ip.as_deref(), ips.first())
        && !legacy.is_empty()
        && legacy != *first
    {
        return Err(format!("clusterIP {legacy} differs from clusterIPs[0] {first}"));
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let name = p.name.clone().unwrap_or_default();
        let port = u16::try_from(p.port)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("port {:?} number {} is out of range 1-65535", name, p.port))?;
        let proto = parse_proto(p.protocol.as_deref()).map_err(|e| format!("port {name:?}: {e}"))?;
        if ports.iter().any(|q: &SvcPort| q.port == port && q.proto == proto) {
            return Err(format!("port {port}/{proto} appears more than once"));
        }
        if ports.iter().any(|q: &SvcPort| q.name == name) {
            return Err(format!("port name {name:?} appears more than once"));
        }
        ports.push(SvcPort { name, port, proto });
    }
    Ok(Some(ValidService { name: ns_name(&svc.metadata), cluster_ips, ports }))
}

/// Endpoint readiness, with Kubernetes' defaults for missing conditions.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Usable {
    /// `serving && terminating`: only used when nothing is ready.
    Terminating,
    Ready,
}

/// Endpoints of one Service, one family, by (slice port name, protocol).
type PortEndpoints = HashMap<(String, Proto), BTreeMap<(IpAddr, u16), Usable>>;

/// Fold one slice into `acc`, or say why it is rejected.
fn add_slice(slice: &EndpointSlice, family: Family, acc: &mut PortEndpoints) -> Result<(), String> {
    // Validate the whole slice before taking anything from it.
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let Some(number) = p.port.filter(|n| *n != 0) else { continue };
        let number = u16::try_from(number).map_err(|_| format!("port {number} is out of range 1-65535"))?;
        let proto = parse_proto(p.protocol.as_deref()).map_err(|e| format!("port {number}: {e}"))?;
        ports.push((p.name.clone().unwrap_or_default(), proto, number));
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints.iter().enumerate() {
        let Some(first) = ep.addresses.first() else { continue };
        let addr: IpAddr =
            first.parse().map_err(|_| format!("endpoints[{i}] address {first:?} is not an IP address"))?;
        if Family::of(addr) != family {
            return Err(format!(
                "endpoints[{i}] address {addr} is {} but the slice's addressType is {}",
                Family::of(addr).k8s_name(),
                family.k8s_name()
            ));
        }
        let cond = ep.conditions.as_ref();
        let ready = cond.and_then(|c| c.ready).unwrap_or(true);
        let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
        let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
        let usable = if ready {
            Some(Usable::Ready)
        } else if serving && terminating {
            Some(Usable::Terminating)
        } else {
            None
        };
        if let Some(usable) = usable {
            endpoints.push((addr, usable));
        }
    }
    for (name, proto, number) in ports {
        let set = acc.entry((name, proto)).or_default();
        for (addr, usable) in &endpoints {
            // The same endpoint in two slices counts once, with its best
            // condition (a pod moving between slices).
            let e = set.entry((*addr, number)).or_insert(*usable);
            *e = (*e).max(*usable);
        }
    }
    Ok(())
}

/// Compute the desired frontends from scratch. Rejected objects are
/// returned beside the result; everything else is in it.
pub fn desired<S: Borrow<Service>, E: Borrow<EndpointSlice>>(
    services: &[S],
    slices: &[E],
    config: &Config,
) -> (Desired, Vec<Rejected>) {
    let mut store = Store::default();
    let svcs = services.iter().map(|s| Object::Service(Arc::new(s.borrow().clone()))).collect();
    let sls = slices.iter().map(|s| Object::Slice(Arc::new(s.borrow().clone()))).collect();
    store.apply(Event::Replace(ObjectKind::Service, svcs));
    store.apply(Event::Replace(ObjectKind::EndpointSlice, sls));
    let mut cache = Cache::default();
    let update = cache.update(&store, &Dirty::All, config);
    (cache.desired, update.rejected)
}

/// One Service's frontends and rejections, computed from it and its slices.
struct Computed {
    frontends: Vec<(Frontend, FrontendSpec)>,
    rejected: Vec<Rejected>,
}

fn compute_service(svc: &Service, slices: &[&EndpointSlice], config: &Config) -> Computed {
    let mut rejected = Vec::new();
    let mut by_family: HashMap<Family, PortEndpoints> = HashMap::new();
    for slice in slices {
        let Some(family) = Family::from_k8s(&slice.address_type) else {
            continue; // FQDN slices are not proxied.
        };
        let mut scratch = PortEndpoints::new();
        match add_slice(slice, family, &mut scratch) {
            Ok(()) => {
                let acc = by_family.entry(family).or_default();
                for (port, eps) in scratch {
                    let set = acc.entry(port).or_default();
                    for (ep, usable) in eps {
                        let e = set.entry(ep).or_insert(usable);
                        *e = (*e).max(usable);
                    }
                }
            }
            Err(reason) => rejected.push(Rejected { kind: "EndpointSlice", name: ns_name(&slice.metadata), reason }),
        }
    }
    let valid = match validate_service(svc, config) {
        Ok(Some(v)) => v,
        Ok(None) => return Computed { frontends: Vec::new(), rejected },
        Err(reason) => {
            rejected.push(Rejected { kind: "Service", name: ns_name(&svc.metadata), reason });
            return Computed { frontends: Vec::new(), rejected };
        }
    };
    let mut frontends = Vec::new();
    for vip in &valid.cluster_ips {
        let eps = by_family.get(&Family::of(*vip));
        for port in &valid.ports {
            let set = eps.and_then(|e| e.get(&(port.name.clone(), port.proto)));
            let best = set.and_then(|s| s.values().max().copied());
            let backends = set
                .into_iter()
                .flatten()
                .filter(|(_, u)| Some(**u) == best)
                .map(|((addr, p), _)| Backend { addr: *addr, port: *p, proto: port.proto })
                .collect();
            let owner = if port.name.is_empty() {
                format!("{}:{}", valid.name, port.port)
            } else {
                format!("{}:{}", valid.name, port.name)
            };
            frontends.push((Frontend::new(*vip, port.port, port.proto), FrontendSpec::new(owner, backends)));
        }
    }
    Computed { frontends, rejected }
}

/// The model, kept between syncs: only the Services the store reports
/// dirty (their object or one of their slices changed) are recomputed, and
/// the frontends that may have changed are reported, so a sync costs what
/// changed, not what exists (kube-proxy's partial sync). `desired` always
/// holds the full state.
#[derive(Default)]
pub struct Cache {
    /// Service (`ns/name`) -> what it contributed last time.
    entries: HashMap<String, Computed>,
    /// Service (`ns/name`) -> the frontends it holds in `desired`.
    owned: HashMap<String, Vec<Frontend>>,
    /// Services that lost a frontend to another: re-evaluated every time,
    /// so they take it over when the holder goes.
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
    /// Services recomputed.
    pub recomputed: usize,
}

impl Cache {
    /// Bring `desired` up to date with the Services in `dirty`.
    pub fn update(&mut self, store: &Store, dirty: &Dirty, config: &Config) -> Update {
        let mut names: BTreeSet<String> = match dirty {
            Dirty::None => BTreeSet::new(),
            Dirty::Services(set) => set.clone(),
            Dirty::All => store.services().map(|(n, _)| n.clone()).chain(self.entries.keys().cloned()).collect(),
        };
        names.extend(self.contenders.iter().cloned());
        let mut update = Update { recomputed: names.len(), ..Update::default() };
        let mut changed: Vec<(String, Option<Computed>)> = Vec::with_capacity(names.len());
        for name in names {
            match store.service(&name) {
                Some(svc) => changed.push((name.clone(), Some(compute_service(svc, &store.slices_of(&name), config)))),
                None => {
                    if self.entries.remove(&name).is_some() || self.owned.contains_key(&name) {
                        changed.push((name, None));
                    }
                }
            }
        }
        // Withdraw every changed Service's frontends first, then place the
        // new ones, so a frontend moving between Services is not refused.
        for (name, _) in &changed {
            for f in self.owned.remove(name).unwrap_or_default() {
                self.desired.frontends.remove(&f);
                update.dirty.insert(f);
            }
            self.contenders.remove(name);
        }
        for (name, computed) in changed {
            let Some(mut computed) = computed else { continue };
            for (f, spec) in &computed.frontends {
                if let Some(other) = self.desired.frontends.get(f) {
                    let reason = format!("{f} is already served by {}", other.owner);
                    computed.rejected.push(Rejected { kind: "Service", name: name.clone(), reason });
                    self.contenders.insert(name.clone());
                    continue;
                }
                self.desired.frontends.insert(*f, spec.clone());
                self.owned.entry(name.clone()).or_default().push(*f);
                update.dirty.insert(*f);
            }
            // Frontends are in `desired` now; keep only the rejections.
            computed.frontends = Vec::new();
            self.entries.insert(name, computed);
        }
        update.rejected.extend(self.entries.values().flat_map(|e| e.rejected.iter().cloned()));
        update.rejected.sort_by(|a, b| (a.kind, &a.name, &a.reason).cmp(&(b.kind, &b.name, &b.reason)));
        update
    }
}

#[cfg(test)]
#[expect(clippy::needless_pass_by_value, clippy::type_complexity, reason = "test tables read best inline")]
mod tests {
    use serde_json::{Value, json};

    use super::*;

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
        let (d, rejected) = desired(services, slices, &Config::default());
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
        let cfg = Config { service_proxy_name: Some("other".into()) };
        assert_eq!(desired(&[other], &[v4_slice()], &cfg).0.frontends.len(), 1, "ours when the name matches");
        let plain = svc("web", &["198.19.0.10"], &["IPv4"], web_ports());
        assert!(
            desired(&[plain], &[v4_slice()], &cfg).0.frontends.is_empty(),
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
        let (d, rejected) = desired(&[a, b], &[] as &[EndpointSlice], &Config::default());
        assert_eq!(d.frontends.values().next().map(|s| s.owner.as_str()), Some("default/a:http"));
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].reason.contains("already served by default/a:http"));
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
            let sls = slices.iter().map(|s| Object::Slice(Arc::new(s.clone()))).collect();
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
        assert_eq!(live.cache.desired, desired(&services, &slices, &cfg).0, "incremental equals full");

        // db goes away.
        let u = live.update(&services[..1], &slices, &cfg);
        assert_eq!(u.dirty.len(), 1);
        assert_eq!(live.cache.desired, desired(&services[..1], &slices, &cfg).0);
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
                    // Services may share a VIP: exercises contention too.
                    let vip = format!("198.19.0.{}", 10 + rnd(4));
                    let s = with_rv(svc(&name, &[&vip], &["IPv4"], web_ports()), rv);
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
            let (full, rejected) = desired(&services, &slices, &cfg);
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
