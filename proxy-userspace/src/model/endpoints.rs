//! EndpointSlices into endpoints, and endpoints into the sets a frontend
//! uses (kube-proxy's `endpointslicecache.go` and `topology.go`).
//!
//! - A slice is taken whole or rejected whole: every port and endpoint is
//!   validated before anything is taken from it.
//! - Only `addresses[0]` of an endpoint is used; its family must be the
//!   slice's `addressType`; addresses the API server refuses for endpoints
//!   (unspecified, loopback, link-local, link-local multicast) are refused
//!   here too, since in standalone mode nothing else validates them.
//! - Conditions default as the API says: `ready` and `serving` true,
//!   `terminating` false.
//! - The same `ip:port` in two slices of one Service counts once: a
//!   non-terminating entry replaces an earlier one, a terminating one never
//!   replaces (a pod moving between slices keeps its ready state).
//! - `categorize` is kube-proxy's `CategorizeEndpoints`: the cluster set
//!   (ready, filtered by topology hints all-or-nothing, else serving and
//!   terminating anywhere) and the local set (ready on this node, else
//!   serving and terminating on this node), each with its own terminating
//!   fallback; topology never applies to the local set.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::parse_proto;
use crate::{
    source::{Slice, slim::Address},
    types::{Family, Proto},
};

/// One endpoint of one Service port, with what kube-proxy keeps of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// `nodeName`, when the slice says (shared with the slice's copy).
    pub node: Option<Arc<str>>,
    /// `hints.forZones[].name`.
    pub zone_hints: BTreeSet<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: BTreeSet<String>,
}

impl Endpoint {
    /// Runs on this node (by `nodeName`, never by address).
    pub fn is_local(&self, node_name: Option<&str>) -> bool {
        matches!((self.node.as_deref(), node_name), (Some(a), Some(b)) if !b.is_empty() && a == b)
    }
}

/// Endpoints of one Service and family, by (slice port name, protocol),
/// each list keyed and sorted by `(address, port)`.
pub type PortEndpoints = HashMap<(String, Proto), BTreeMap<(IpAddr, u16), Endpoint>>;

/// Why the API server would refuse `addr` as an endpoint address
/// (`ValidateEndpointIP`), if it would.
fn refused_endpoint(addr: IpAddr) -> Option<&'static str> {
    let link_local_multicast = match addr {
        IpAddr::V4(a) => a.octets()[..3] == [224, 0, 0],
        IpAddr::V6(a) => a.segments()[0] & 0xff0f == 0xff02,
    };
    if addr.is_unspecified() {
        Some("unspecified")
    } else if addr.is_loopback() {
        Some("a loopback address")
    } else if super::policy::is_link_local(addr) {
        Some("link-local")
    } else if link_local_multicast {
        Some("link-local multicast")
    } else {
        None
    }
}

/// Fold one slice into `acc` (kube-proxy's merge rule), or say why it is
/// rejected; a rejected slice contributes nothing.
pub fn add_slice(slice: &Slice, family: Family, acc: &mut PortEndpoints) -> Result<(), String> {
    let mut ports = Vec::new();
    for p in slice.ports() {
        // kube-proxy ignores ports without a number (and 0).
        let Some(number) = p.port.filter(|n| *n != 0) else { continue };
        let number = u16::try_from(number).map_err(|_| format!("port {number} is out of range 1-65535"))?;
        let proto = parse_proto(p.protocol.as_deref()).map_err(|e| format!("port {number}: {e}"))?;
        ports.push((p.name.clone().unwrap_or_default(), proto, number));
    }
    let mut endpoints = Vec::new();
    for (i, ep) in slice.endpoints().iter().enumerate() {
        let addr = match ep.first_address() {
            None => continue,
            Some(Address::Ip(addr)) => addr,
            Some(Address::Text(first)) => {
                first.parse().map_err(|_| format!("endpoints[{i}] address {first:?} is not an IP address"))?
            }
        };
        if Family::of(addr) != family {
            return Err(format!(
                "endpoints[{i}] address {addr} is {} but the slice's addressType is {}",
                Family::of(addr).k8s_name(),
                family.k8s_name()
            ));
        }
        if let Some(what) = refused_endpoint(addr) {
            return Err(format!("endpoints[{i}] address {addr} is {what}, which an endpoint may not be"));
        }
        let cond = ep.conditions();
        let hints = ep.hints();
        endpoints.push(Endpoint {
            addr,
            port: 0,
            ready: cond.and_then(|c| c.ready).unwrap_or(true),
            serving: cond.and_then(|c| c.serving).unwrap_or(true),
            terminating: cond.and_then(|c| c.terminating).unwrap_or(false),
            node: ep.node_name_shared().cloned(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        });
    }
    for (name, proto, number) in ports {
        let set = acc.entry((name, proto)).or_default();
        for ep in &endpoints {
            merge(set, Endpoint { port: number, ..ep.clone() });
        }
    }
    Ok(())
}

/// kube-proxy's duplicate rule: a non-terminating endpoint replaces an
/// earlier one with the same `ip:port`; a terminating one never does.
pub fn merge(set: &mut BTreeMap<(IpAddr, u16), Endpoint>, ep: Endpoint) {
    let key = (ep.addr, ep.port);
    if !set.contains_key(&key) || !ep.terminating {
        set.insert(key, ep);
    }
}

/// Which endpoint sets a Service port uses (kube-proxy's
/// `UsesClusterEndpoints`/`UsesLocalEndpoints`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uses {
    pub cluster: bool,
    pub local: bool,
}

impl Uses {
    /// From the port's traffic policies and whether it is externally
    /// accessible in this family (a node port, an external or LB IP).
    pub fn new(internal_local: bool, external_local: bool, externally_accessible: bool) -> Self {
        Self {
            cluster: !internal_local || externally_accessible,
            local: internal_local || (external_local && externally_accessible),
        }
    }
}

/// The result of `categorize`. `None`: the port does not use that set (or
/// no local endpoint qualifies); `Some(empty)`: it does, and none is usable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized<'a> {
    pub cluster: Option<Vec<&'a Endpoint>>,
    pub local: Option<Vec<&'a Endpoint>>,
    /// Some usable endpoint exists somewhere in the cluster: an empty set
    /// then drops (a Local policy) instead of refusing.
    pub has_any: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameZone,
    SameNode,
}

/// kube-proxy's `topologyModeFromHints`: a mode is used only when every
/// ready endpoint carries that kind of hint and at least one names this
/// node (zone). Not-ready endpoints are not looked at.
fn topology_mode(endpoints: &[&Endpoint], node_name: Option<&str>, zone: Option<&str>) -> TopologyMode {
    let mut has_ready = false;
    let (mut all_node_hints, mut for_node) = (true, false);
    let (mut all_zone_hints, mut for_zone) = (true, false);
    for ep in endpoints.iter().filter(|e| e.ready) {
        has_ready = true;
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if node_name.is_some_and(|n| ep.node_hints.contains(n)) {
            for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if zone.is_some_and(|z| ep.zone_hints.contains(z)) {
            for_zone = true;
        }
    }
    if !has_ready {
        TopologyMode::None
    } else if all_node_hints && for_node {
        TopologyMode::SameNode
    } else if all_zone_hints && for_zone {
        TopologyMode::SameZone
    } else {
        TopologyMode::None
    }
}

fn available(ep: &Endpoint, mode: TopologyMode, node_name: Option<&str>, zone: Option<&str>) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => node_name.is_some_and(|n| ep.node_hints.contains(n)),
        TopologyMode::SameZone => zone.is_some_and(|z| ep.zone_hints.contains(z)),
    }
}

/// kube-proxy's `CategorizeEndpoints` for one Service port and family.
/// `zone` is this node's `topology.kubernetes.io/zone` label (an empty one
/// counts as none).
pub fn categorize<'a>(
    endpoints: &[&'a Endpoint],
    uses: Uses,
    node_name: Option<&str>,
    zone: Option<&str>,
) -> Categorized<'a> {
    let zone = zone.filter(|z| !z.is_empty());
    let mut out = Categorized::default();
    if endpoints.is_empty() {
        return out;
    }
    if uses.cluster {
        let mode = topology_mode(endpoints, node_name, zone);
        let mut cluster: Vec<&Endpoint> =
            endpoints.iter().copied().filter(|e| e.ready && available(e, mode, node_name, zone)).collect();
        if cluster.is_empty() {
            // The terminating fallback ignores topology.
            cluster = endpoints.iter().copied().filter(|e| e.serving && e.terminating).collect();
        }
        out.has_any = !cluster.is_empty();
        out.cluster = Some(cluster);
    }
    if !uses.local {
        return out;
    }
    let (mut local_ready, mut local_terminating) = (false, false);
    for ep in endpoints {
        if ep.ready {
            out.has_any = true;
            local_ready |= ep.is_local(node_name);
        } else if ep.serving && ep.terminating {
            out.has_any = true;
            local_terminating |= ep.is_local(node_name);
        }
    }
    if local_ready {
        out.local = Some(endpoints.iter().copied().filter(|e| e.is_local(node_name) && e.ready).collect());
    } else if local_terminating {
        out.local =
            Some(endpoints.iter().copied().filter(|e| e.is_local(node_name) && e.serving && e.terminating).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This node, as the upstream tests' node name.
    const NODE: &str = "node-1";

    /// `ip:port` with flags from `R`eady, `S`erving, `T`erminating,
    /// `L`ocal (Go zero values: an unlisted flag is false, as in the
    /// upstream test literals) and zone hints.
    fn e(addr: &str, flags: &str, zones: &[&str]) -> Endpoint {
        let (ip, port) = addr.rsplit_once(':').expect("ip:port");
        Endpoint {
            addr: ip.parse().expect("ip"),
            port: port.parse().expect("port"),
            ready: flags.contains('R'),
            serving: flags.contains('S'),
            terminating: flags.contains('T'),
            node: Some(Arc::from(if flags.contains('L') { NODE } else { "node-2" })),
            zone_hints: zones.iter().map(|z| (*z).to_owned()).collect(),
            node_hints: BTreeSet::new(),
        }
    }

    /// The upstream `makeServicePortInfo` fields these tests set.
    #[derive(Clone, Copy, Default)]
    struct Svc {
        itp_local: bool,
        etp_local: bool,
        node_port: bool,
    }

    fn set(eps: Option<&Vec<&Endpoint>>) -> Option<BTreeSet<String>> {
        eps.map(|v| v.iter().map(|e| format!("{}:{}", e.addr, e.port)).collect())
    }

    fn want(list: Option<&[&str]>) -> Option<BTreeSet<String>> {
        list.map(|l| l.iter().map(|s| (*s).to_owned()).collect())
    }

    /// One case of upstream `TestCategorizeEndpoints`, checked as its
    /// harness checks: a `nil` expectation requires `None`, an empty one
    /// accepts `None` or empty; `has_any` must equal "the expected
    /// reachable set is not empty, or onlyRemoteEndpoints".
    struct Case {
        name: &'static str,
        zone: Option<&'static str>,
        svc: Svc,
        eps: Vec<Endpoint>,
        cluster: Option<&'static [&'static str]>,
        local: Option<&'static [&'static str]>,
        /// upstream `allEndpoints` where the harness does not derive it
        /// (both sets expected); only its emptiness is used here, through
        /// `has_any` (the union is iptables' chain-creation list, which
        /// dsproxy does not need).
        all: Option<&'static [&'static str]>,
        only_remote: bool,
    }

    /// A case whose `allEndpoints` the upstream harness derives.
    fn case(
        name: &'static str,
        zone: Option<&'static str>,
        svc: Svc,
        eps: Vec<Endpoint>,
        cluster: Option<&'static [&'static str]>,
        local: Option<&'static [&'static str]>,
    ) -> Case {
        Case { name, zone, svc, eps, cluster, local, all: None, only_remote: false }
    }

    fn run(cases: Vec<Case>) {
        for c in cases {
            let refs: Vec<&Endpoint> = c.eps.iter().collect();
            let uses = Uses::new(c.svc.itp_local, c.svc.etp_local, c.svc.node_port);
            let got = categorize(&refs, uses, Some(NODE), c.zone);
            let expect_set = |got: Option<&Vec<&Endpoint>>, w: Option<&[&str]>, what: &str| match w {
                None => assert_eq!(set(got), None, "{}: {what} must be nil", c.name),
                Some(w) => {
                    assert_eq!(set(got).unwrap_or_default(), want(Some(w)).unwrap_or_default(), "{}: {what}", c.name);
                }
            };
            expect_set(got.cluster.as_ref(), c.cluster, "cluster");
            expect_set(got.local.as_ref(), c.local, "local");
            let all = match (c.cluster, c.local) {
                (Some(cl), None) => cl,
                (None, Some(lo)) => lo,
                _ => c.all.unwrap_or(&[]),
            };
            assert_eq!(got.has_any, !all.is_empty() || c.only_remote, "{}: has_any", c.name);
        }
    }

    const ZA: Option<&str> = Some("zone-a");

    /// Four ready endpoints hinted a, b, c, a (used by several cases).
    fn abca(l1: &str, l2: &str) -> Vec<Endpoint> {
        vec![
            e("10.1.2.3:80", l1, &["zone-a"]),
            e("10.1.2.4:80", l2, &["zone-b"]),
            e("10.1.2.5:80", "R", &["zone-c"]),
            e("10.1.2.6:80", "R", &["zone-a"]),
        ]
    }

    /// kubernetes/kubernetes pkg/proxy/topology_test.go
    /// `TestCategorizeEndpoints`, topology cases (names are upstream's).
    #[test]
    #[expect(clippy::too_many_lines, reason = "an upstream case table, transcribed whole")]
    fn categorize_topology_cases_from_upstream() {
        let np = Svc { node_port: true, ..Svc::default() };
        run(vec![
            case(
                "should use topology since all endpoints have hints, node has a zone label and and there are endpoints for the node's zone",
                ZA,
                Svc::default(),
                abca("R", "R"),
                Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                None,
            ),
            Case {
                all: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
                ..case(
                    "externalTrafficPolicy: Local, topology ignored for Local endpoints",
                    ZA,
                    Svc { etp_local: true, ..np },
                    abca("RL", "RL"),
                    Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                    Some(&["10.1.2.3:80", "10.1.2.4:80"]),
                )
            },
            Case {
                all: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
                ..case(
                    "internalTrafficPolicy: Local, topology ignored for Local endpoints",
                    ZA,
                    Svc { itp_local: true, ..np },
                    abca("RL", "RL"),
                    Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                    Some(&["10.1.2.3:80", "10.1.2.4:80"]),
                )
            },
            case(
                "unready endpoint",
                ZA,
                Svc::default(),
                vec![
                    e("10.1.2.3:80", "R", &["zone-a"]),
                    e("10.1.2.4:80", "R", &["zone-b"]),
                    e("10.1.2.5:80", "R", &["zone-c"]),
                    e("10.1.2.6:80", "", &["zone-a"]),
                ],
                Some(&["10.1.2.3:80"]),
                None,
            ),
            case(
                "only unready endpoints in same zone (should not filter)",
                ZA,
                Svc::default(),
                vec![
                    e("10.1.2.3:80", "", &["zone-a"]),
                    e("10.1.2.4:80", "R", &["zone-b"]),
                    e("10.1.2.5:80", "R", &["zone-c"]),
                    e("10.1.2.6:80", "", &["zone-a"]),
                ],
                Some(&["10.1.2.4:80", "10.1.2.5:80"]),
                None,
            ),
            case(
                "missing hints, no filtering applied",
                ZA,
                Svc::default(),
                vec![
                    e("10.1.2.3:80", "R", &["zone-a"]),
                    e("10.1.2.4:80", "R", &["zone-b"]),
                    e("10.1.2.5:80", "R", &[]),
                    e("10.1.2.6:80", "R", &["zone-a"]),
                ],
                Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
                None,
            ),
            case(
                "multiple hints per endpoint, filtering includes any endpoint with zone included",
                Some("zone-c"),
                Svc::default(),
                vec![
                    e("10.1.2.3:80", "R", &["zone-a", "zone-b", "zone-c"]),
                    e("10.1.2.4:80", "R", &["zone-b", "zone-c"]),
                    e("10.1.2.5:80", "R", &["zone-b", "zone-d"]),
                    e("10.1.2.6:80", "R", &["zone-c"]),
                ],
                Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
                None,
            ),
            Case {
                all: Some(&["10.0.0.0:80", "10.0.0.1:80", "10.0.0.2:80"]),
                ..case(
                    "conflicting topology and localness require merging allEndpoints",
                    ZA,
                    Svc { etp_local: true, ..np },
                    vec![
                        e("10.0.0.0:80", "RL", &["zone-a"]),
                        e("10.0.0.1:80", "RL", &["zone-b"]),
                        e("10.0.0.2:80", "R", &["zone-a"]),
                        e("10.0.0.3:80", "R", &["zone-b"]),
                    ],
                    Some(&["10.0.0.0:80", "10.0.0.2:80"]),
                    Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                )
            },
        ]);
        // Three upstream cases: one hinted endpoint, no usable zone.
        for (name, zone) in [
            ("empty node labels", None),
            ("empty zone label", Some("")),
            ("node in different zone, no endpoint filtering", Some("zone-b")),
        ] {
            let eps = vec![e("10.1.2.3:80", "R", &["zone-a"])];
            run(vec![case(name, zone, Svc::default(), eps, Some(&["10.1.2.3:80"]), None)]);
        }
    }

    /// kubernetes/kubernetes pkg/proxy/topology_test.go
    /// `TestCategorizeEndpoints`, traffic-policy and terminating cases
    /// (names are upstream's).
    #[test]
    #[expect(clippy::too_many_lines, reason = "an upstream case table, transcribed whole")]
    fn categorize_policy_and_terminating_cases_from_upstream() {
        let itp = Svc { itp_local: true, ..Svc::default() };
        let np = Svc { node_port: true, ..Svc::default() };
        let two_remote = || vec![e("10.0.0.0:80", "R", &[]), e("10.0.0.1:80", "R", &[])];
        run(vec![
            case("internalTrafficPolicy: Local, with empty endpoints", None, itp, vec![], None, Some(&[])),
            Case {
                only_remote: true,
                ..case(
                    "internalTrafficPolicy: Local, but all endpoints are remote",
                    None,
                    itp,
                    two_remote(),
                    None,
                    Some(&[]),
                )
            },
            case(
                "internalTrafficPolicy: Local, all endpoints are local",
                None,
                itp,
                vec![e("10.0.0.0:80", "RL", &[]), e("10.0.0.1:80", "RL", &[])],
                None,
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
            ),
            case(
                "internalTrafficPolicy: Local, some endpoints are local",
                None,
                itp,
                vec![e("10.0.0.0:80", "RL", &[]), e("10.0.0.1:80", "R", &[])],
                None,
                Some(&["10.0.0.0:80"]),
            ),
            case(
                "Cluster traffic policy, endpoints not Ready",
                None,
                Svc::default(),
                vec![e("10.0.0.0:80", "", &[]), e("10.0.0.1:80", "", &[])],
                Some(&[]),
                None,
            ),
            case(
                "Cluster traffic policy, some endpoints are Ready",
                None,
                Svc::default(),
                vec![e("10.0.0.0:80", "", &[]), e("10.0.0.1:80", "R", &[])],
                Some(&["10.0.0.1:80"]),
                None,
            ),
            case(
                "Cluster traffic policy, all endpoints are terminating",
                None,
                Svc::default(),
                vec![e("10.0.0.0:80", "STL", &[]), e("10.0.0.1:80", "ST", &[])],
                Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                None,
            ),
            Case {
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                ..case(
                    "iTP: Local, eTP: Local, all endpoints remote",
                    None,
                    Svc { itp_local: true, etp_local: true, node_port: true },
                    two_remote(),
                    Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                    Some(&[]),
                )
            },
            Case {
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                only_remote: true,
                ..case(
                    "iTP: Local, eTP: Local, all endpoints remote and terminating",
                    None,
                    Svc { itp_local: true, etp_local: true, node_port: true },
                    vec![e("10.0.0.0:80", "ST", &[]), e("10.0.0.1:80", "ST", &[])],
                    Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                    Some(&[]),
                )
            },
            Case {
                all: Some(&["10.0.0.0:80", "10.0.0.2:80"]),
                ..case(
                    "iTP: Cluster, eTP: Local, with terminating endpoints",
                    None,
                    Svc { etp_local: true, ..np },
                    vec![
                        e("10.0.0.0:80", "R", &[]),
                        e("10.0.0.1:80", "L", &[]),
                        e("10.0.0.2:80", "STL", &[]),
                        e("10.0.0.3:80", "ST", &[]),
                    ],
                    Some(&["10.0.0.0:80"]),
                    Some(&["10.0.0.2:80"]),
                )
            },
            Case {
                all: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                ..case(
                    "externalTrafficPolicy ignored if not externally accessible",
                    None,
                    Svc { etp_local: true, ..Svc::default() },
                    vec![e("10.0.0.0:80", "R", &[]), e("10.0.0.1:80", "RL", &[])],
                    Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                    None,
                )
            },
            Case {
                all: Some(&["10.0.0.1:80"]),
                ..case(
                    "no cluster endpoints for iTP:Local internal-only service",
                    None,
                    itp,
                    vec![e("10.0.0.0:80", "R", &[]), e("10.0.0.1:80", "RL", &[])],
                    None,
                    Some(&["10.0.0.1:80"]),
                )
            },
        ]);
        // Three upstream cases with one endpoint set and one answer.
        for (name, svc) in [
            ("iTP: Local, eTP: Cluster, some endpoints local", Svc { itp_local: true, ..np }),
            ("iTP: Cluster, eTP: Local, some endpoints local", Svc { etp_local: true, ..np }),
            ("iTP: Local, eTP: Local, some endpoints local", Svc { itp_local: true, etp_local: true, node_port: true }),
        ] {
            let eps = vec![e("10.0.0.0:80", "RL", &[]), e("10.0.0.1:80", "R", &[])];
            let both: &[&str] = &["10.0.0.0:80", "10.0.0.1:80"];
            run(vec![Case { all: Some(both), ..case(name, None, svc, eps, Some(both), Some(&["10.0.0.0:80"])) }]);
        }
    }

    /// Node hints (PreferSameNode), read from kube-proxy's
    /// `topologyModeFromHints` (pkg/proxy/topology.go): the node check
    /// comes first, with the same all-or-nothing rule, then the zone
    /// check. The upstream test file in our reference has no node-hint
    /// cases; these are ours.
    #[test]
    fn node_hints_are_preferred_all_or_nothing_then_zone_hints() {
        let hinted = |addr: &str, zone: &str, node: Option<&str>| Endpoint {
            node_hints: node.into_iter().map(str::to_owned).collect(),
            ..e(addr, "RS", &[zone])
        };
        let four = |n3: Option<&str>| {
            vec![
                hinted("10.1.2.3:80", "zone-a", Some(NODE)),
                hinted("10.1.2.4:80", "zone-b", Some("node-2")),
                hinted("10.1.2.5:80", "zone-c", n3),
                hinted("10.1.2.6:80", "zone-a", Some("node-4")),
            ]
        };
        let cluster = |eps: &[Endpoint], node: &str| {
            let refs: Vec<&Endpoint> = eps.iter().collect();
            let got = categorize(&refs, Uses::new(false, false, false), Some(node), ZA);
            set(got.cluster.as_ref()).expect("cluster used")
        };
        let s = |l: &[&str]| want(Some(l)).expect("set");
        assert_eq!(cluster(&four(Some("node-3")), NODE), s(&["10.1.2.3:80"]), "every endpoint node-hinted");
        assert_eq!(
            cluster(&four(None), NODE),
            s(&["10.1.2.3:80", "10.1.2.6:80"]),
            "one endpoint without a node hint: zone hints decide"
        );
        assert_eq!(
            cluster(&four(Some("node-3")), "node-0"),
            s(&["10.1.2.3:80", "10.1.2.6:80"]),
            "no endpoint for this node: zone hints decide"
        );
        let mut no_zone = four(None);
        no_zone[1].zone_hints.clear();
        assert_eq!(cluster(&no_zone, NODE).len(), 4, "neither hint complete: everything");
    }

    /// kube-proxy `endpointslicecache_test.go` `TestEndpointInfoByServicePort`,
    /// "with duplicate Endpoints, prefer non-terminating": one address three
    /// times in a slice (terminating, ready, not serving) is one ready
    /// endpoint; across slices, in either order, too.
    #[test]
    fn duplicate_endpoints_prefer_the_non_terminating_one_from_upstream() {
        use serde_json::json;

        use super::super::testkit::{ep, slice};
        let port = || json!([{"name": "port-0", "port": 80, "protocol": "TCP"}]);
        let merged = |slices: &[k8s_openapi::api::discovery::v1::EndpointSlice]| {
            let mut acc = PortEndpoints::new();
            for s in slices {
                add_slice(&Slice::from(s.clone()), Family::V4, &mut acc).expect("valid slice");
            }
            let set = &acc[&("port-0".to_owned(), Proto::Tcp)];
            set.values()
                .map(|e| (e.addr.to_string(), e.ready, e.serving, e.terminating, e.is_local(Some("host1"))))
                .collect::<Vec<_>>()
        };
        let one = |name: &str, flags: &[&str]| {
            let eps = flags.iter().map(|f| ep("10.0.1.1", Some(f), Some("host1"))).collect();
            slice(&format!("ns1/{name}"), "svc1", "IPv4", port(), eps)
        };
        let want = vec![("10.0.1.1".to_owned(), true, true, false, true)];
        assert_eq!(merged(&[one("a", &["ST", "RS", "T"])]), want, "upstream case");
        assert_eq!(merged(&[one("a", &["ST"]), one("b", &["RS"])]), want, "terminating first");
        assert_eq!(merged(&[one("a", &["RS"]), one("b", &["ST"])]), want, "terminating last");
    }

    #[test]
    fn the_terminating_fallback_ignores_topology_and_locality_needs_a_node_name() {
        // Only terminating endpoints, hinted for another zone: all used.
        let eps = [e("10.0.0.0:80", "ST", &["zone-b"]), e("10.0.0.1:80", "ST", &["zone-b"])];
        let refs: Vec<&Endpoint> = eps.iter().collect();
        let got = categorize(&refs, Uses::new(false, false, false), Some(NODE), ZA);
        assert_eq!(got.cluster.map(|c| c.len()), Some(2));
        // Without a node name nothing is local.
        let local = e("10.0.0.0:80", "RL", &[]);
        assert!(local.is_local(Some(NODE)));
        assert!(!local.is_local(None));
        assert!(!local.is_local(Some("")));
    }
}
