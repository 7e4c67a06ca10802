//! A validated Service and its endpoints into frontends, per family and per
//! kind, with kube-proxy's traffic-policy semantics mapped onto the
//! datapath's two scopes (`External`: every client; `Internal`: clients on
//! this node, when the `External` entry has `two_scopes`).
//!
//! For each family the Service has a ClusterIP of, and each port:
//! - **ClusterIP**: one entry. `internalTrafficPolicy: Cluster` uses the
//!   cluster set; `Local` the local set, dropping (not refusing) when it is
//!   empty while other nodes have endpoints.
//! - **NodePort** (the family's unspecified address, answered on every node
//!   address of the family), **ExternalIP** and **LoadBalancer** (with the
//!   family's `loadBalancerSourceRanges`): with
//!   `externalTrafficPolicy: Cluster` one entry, the cluster set (the
//!   datapath masquerades external clients); with `Local` an `External`
//!   entry with the local set, `external_local` (the client address is
//!   kept) and `two_scopes`, dropping when empty while other nodes have
//!   endpoints, plus an `Internal` entry with the cluster set (pods and
//!   host processes on this node reach the cluster-wide endpoints).
//! - Every entry refuses (RST / ICMP unreachable) when no usable endpoint
//!   exists anywhere, and carries the Service's ClientIP affinity timeout.
//! - Addresses (external, LB, source ranges) of a family the Service has no
//!   ClusterIP of are ignored, with a warning.
use std::{collections::BTreeSet, net::IpAddr};

use super::{
    Warning,
    endpoints::{Categorized, Endpoint, PortEndpoints, Uses, categorize},
    node::NodeContext,
    service::{SvcPort, SvcType, ValidService},
};
use crate::types::{
    Backend, EndpointInfo, Family, Frontend, FrontendSpec, HealthCheck, Kind, Proto, Scope, Settings, WhenEmpty,
};

/// Who may take an address from whom when two Services claim it: the API
/// server allocates ClusterIPs, node ports and health-check ports;
/// external and load-balancer IPs are written by users and controllers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    Allocated,
    UserWritten,
}

/// What a claim occupies: an `(address, port, protocol)` (the family's
/// unspecified address for node ports), in every scope.
pub type Key = (IpAddr, u16, Proto);

/// What one Service holds exclusively.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claimed {
    /// A frontend address:port, with its one or two scope entries.
    Address(Key),
    /// A health-check node port: TCP on both families' node port space.
    HealthCheck(u16),
}

impl Claimed {
    /// The keys it occupies.
    pub fn keys(self) -> impl Iterator<Item = Key> {
        let (one, hc) = match self {
            Claimed::Address(k) => (Some(k), None),
            Claimed::HealthCheck(p) => (None, Some(p)),
        };
        one.into_iter().chain(hc.into_iter().flat_map(|p| Family::ALL.map(|f| (f.unspecified(), p, Proto::Tcp))))
    }

    /// For messages: `198.19.0.1:80/TCP`, `nodePort 30080/TCP (IPv4)`,
    /// `healthCheckNodePort 30100`.
    pub fn describe(self) -> String {
        match self {
            Claimed::Address((addr, port, proto)) if addr.is_unspecified() => {
                format!("nodePort {port}/{proto} ({})", Family::of(addr).k8s_name())
            }
            Claimed::Address((addr, port, proto)) => Frontend::new(addr, port, proto).to_string(),
            Claimed::HealthCheck(p) => format!("healthCheckNodePort {p}"),
        }
    }
}

/// A claim and what it brings into the desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub what: Claimed,
    pub rank: Rank,
    pub frontends: Vec<(Frontend, FrontendSpec)>,
    pub health_check: Option<HealthCheck>,
}

/// Everything one Service contributes.
#[derive(Clone, Debug, Default)]
pub struct Built {
    pub claims: Vec<Claim>,
    pub warnings: Vec<Warning>,
}

fn spec(
    owner: &str,
    port: &SvcPort,
    settings: Settings,
    set: Option<&Vec<&Endpoint>>,
    has_any: bool,
    empty_means: WhenEmpty,
) -> FrontendSpec {
    let eps = set.map_or(&[][..], Vec::as_slice);
    let when_empty = if eps.is_empty() && has_any { empty_means } else { WhenEmpty::Reject };
    FrontendSpec {
        owner: owner.to_owned(),
        port_name: port.name.clone(),
        settings: Settings { when_empty, ..settings },
        backends: eps.iter().map(|e| Backend { addr: e.addr, port: e.port, proto: port.proto }).collect(),
        info: eps.iter().map(|e| EndpointInfo { node: e.node.clone(), terminating: e.terminating }).collect(),
    }
}

/// The entries of one external frontend (NodePort, ExternalIP, LB).
fn external(
    svc: &ValidService,
    owner: &str,
    port: &SvcPort,
    frontend: Frontend,
    settings: Settings,
    cat: &Categorized<'_>,
) -> Vec<(Frontend, FrontendSpec)> {
    if !svc.external_local {
        return vec![(frontend, spec(owner, port, settings, cat.cluster.as_ref(), cat.has_any, WhenEmpty::Reject))];
    }
    let ext = Settings { external_local: true, two_scopes: true, ..settings.clone() };
    vec![
        (frontend, spec(owner, port, ext, cat.local.as_ref(), cat.has_any, WhenEmpty::Drop)),
        (
            frontend.with_scope(Scope::Internal),
            spec(owner, port, settings, cat.cluster.as_ref(), cat.has_any, WhenEmpty::Reject),
        ),
    ]
}

fn claim(rank: Rank, frontends: Vec<(Frontend, FrontendSpec)>) -> Claim {
    let f = frontends[0].0;
    Claim { what: Claimed::Address((f.addr, f.port, f.proto)), rank, frontends, health_check: None }
}

/// Warn once per address of a family the Service has no ClusterIP of.
fn other_family_warnings(svc: &ValidService, out: &mut Vec<Warning>) {
    let families: BTreeSet<Family> = svc.families().collect();
    let ignored = |a: IpAddr| !families.contains(&Family::of(a));
    let mut say = |field: String, what: String| {
        out.push(Warning {
            kind: "Service",
            name: svc.name.clone(),
            message: format!("{field} {what} is ignored: the Service has no ClusterIP of its family"),
        });
    };
    for (i, a) in svc.external_ips.iter().filter(|(_, a)| ignored(*a)) {
        say(format!("externalIPs[{i}]"), a.to_string());
    }
    for (i, a) in svc.lb_ips.iter().filter(|(_, a)| ignored(*a)) {
        say(format!("status.loadBalancer.ingress[{i}].ip"), a.to_string());
    }
    for c in svc.source_ranges.iter().filter(|c| ignored(c.addr)) {
        say("loadBalancerSourceRanges".into(), c.to_string());
    }
}

/// The Service's frontends and health check.
pub fn build(svc: &ValidService, eps: &[(Family, PortEndpoints)], node: &NodeContext) -> Built {
    let mut out = Built::default();
    if !svc.external_ips.is_empty() || !svc.lb_ips.is_empty() || !svc.source_ranges.is_empty() {
        other_family_warnings(svc, &mut out.warnings);
    }
    let node_name = node.name.as_deref();
    let zone = node.zone.as_deref();
    let mut local_ready: Vec<(Family, usize)> = Vec::new();
    for cip in &svc.cluster_ips {
        let family = Family::of(*cip);
        let by_port = eps.iter().find(|(f, _)| *f == family).map(|(_, p)| p);
        let ext_ips = ValidService::of_family(&svc.external_ips, family);
        let lb_ips = ValidService::of_family(&svc.lb_ips, family);
        let ranges: Vec<_> = svc.source_ranges.iter().filter(|c| c.family() == family).copied().collect();
        if svc.health_check_node_port.is_some() {
            // kube-proxy's LocalReadyEndpoints: distinct ready local
            // addresses over every port of the Service's slices.
            let local_ips: BTreeSet<IpAddr> = by_port
                .into_iter()
                .flat_map(|p| p.values().flat_map(|m| m.values()))
                .filter(|e| e.ready && e.is_local(node_name))
                .map(|e| e.addr)
                .collect();
            local_ready.push((family, local_ips.len()));
        }
        for port in &svc.ports {
            let list: Vec<&Endpoint> = by_port
                .and_then(|p| p.get(&(port.name.clone(), port.proto)))
                .map(|m| m.values().collect())
                .unwrap_or_default();
            let accessible = port.node_port.is_some() || !ext_ips.is_empty() || !lb_ips.is_empty();
            let uses = Uses::new(svc.internal_local, svc.external_local, accessible);
            let cat = categorize(&list, uses, node_name, zone);
            let owner = if port.name.is_empty() {
                format!("{}:{}", svc.name, port.port)
            } else {
                format!("{}:{}", svc.name, port.name)
            };
            let base = Settings { affinity_timeout: svc.affinity, ..Settings::default() };
            // ClusterIP.
            let (set, empty_means) = if svc.internal_local {
                (cat.local.as_ref(), WhenEmpty::Drop)
            } else {
                (cat.cluster.as_ref(), WhenEmpty::Reject)
            };
            let f = Frontend::new(*cip, port.port, port.proto);
            let s = Settings { kind: Kind::ClusterIp, ..base.clone() };
            out.claims.push(claim(Rank::Allocated, vec![(f, spec(&owner, port, s, set, cat.has_any, empty_means))]));
            // NodePort.
            if let Some(np) = port.node_port {
                let f = Frontend::new(family.unspecified(), np, port.proto);
                let s = Settings { kind: Kind::NodePort, ..base.clone() };
                out.claims.push(claim(Rank::Allocated, external(svc, &owner, port, f, s, &cat)));
            }
            // External IPs and load-balancer IPs.
            for ip in &ext_ips {
                let f = Frontend::new(*ip, port.port, port.proto);
                let s = Settings { kind: Kind::ExternalIp, ..base.clone() };
                out.claims.push(claim(Rank::UserWritten, external(svc, &owner, port, f, s, &cat)));
            }
            for ip in &lb_ips {
                let f = Frontend::new(*ip, port.port, port.proto);
                let s = Settings { kind: Kind::LoadBalancer, source_ranges: ranges.clone(), ..base.clone() };
                out.claims.push(claim(Rank::UserWritten, external(svc, &owner, port, f, s, &cat)));
            }
        }
    }
    if let (Some(port), SvcType::LoadBalancer) = (svc.health_check_node_port, svc.type_) {
        let check = HealthCheck {
            service: svc.name.clone(),
            local_endpoints: local_ready.iter().map(|(_, n)| *n).max().unwrap_or(0),
            by_family: local_ready,
        };
        out.claims.push(Claim {
            what: Claimed::HealthCheck(port),
            rank: Rank::Allocated,
            frontends: Vec::new(),
            health_check: Some(check),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::testkit::{NODE, config, ep, node, run, service, slice};
    use crate::types::Kind;

    fn p80() -> Value {
        json!([{"name": "p80", "port": 80, "protocol": "TCP"}])
    }

    fn unnamed80() -> Value {
        json!([{"name": "", "port": 80, "protocol": "TCP"}])
    }

    type Flow = (&'static str, bool, &'static str, u16, &'static str, Option<bool>);

    /// kube-proxy's nftables (and iptables) `proxier_test.go`
    /// `TestInternalExternalMasquerade`, base case (with a local traffic
    /// detector): every flow's endpoints, and for external clients whether
    /// their address is kept (`masq: false`). "pod" and "node" clients are
    /// on this node (`local`). Masquerading of pod and node clients is the
    /// datapath's business and is not asserted here.
    #[test]
    fn flows_by_client_and_policy_from_upstream_internal_external_masquerade() {
        let lb = |ns: &str, name: &str, cip: &str, np: u16, hc: u16, lbip: &str, extra: Value| {
            let mut spec = json!({
                "type": "LoadBalancer", "clusterIP": cip,
                "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": np}],
                "healthCheckNodePort": hc,
            });
            for (k, v) in extra.as_object().expect("object") {
                spec[k] = v.clone();
            }
            service(
                &format!("{ns}/{name}"),
                json!({"spec": spec, "status": {"loadBalancer": {"ingress": [{"ip": lbip}]}}}),
            )
        };
        let services = [
            lb("ns1", "svc1", "172.30.0.41", 3001, 30001, "1.2.3.4", json!({})),
            lb("ns2", "svc2", "172.30.0.42", 3002, 30002, "5.6.7.8", json!({"externalTrafficPolicy": "Local"})),
            lb("ns3", "svc3", "172.30.0.43", 3003, 30003, "9.10.11.12", json!({"internalTrafficPolicy": "Local"})),
        ];
        let slices: Vec<_> = (1..=3)
            .map(|i| {
                slice(
                    &format!("ns{i}/svc{i}-1"),
                    &format!("svc{i}"),
                    "IPv4",
                    p80(),
                    vec![
                        ep(&format!("10.180.0.{i}"), None, Some(NODE)),
                        ep(&format!("10.180.1.{i}"), None, Some("remote")),
                    ],
                )
            })
            .collect();
        let m = run(&services, &slices, None, &config());
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        // (name, local client, destination, port, output, masq for external clients)
        let flows: &[Flow] = &[
            ("pod to ClusterIP", true, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", None),
            ("pod to NodePort", true, "node", 3001, "10.180.0.1:80, 10.180.1.1:80", None),
            ("pod to LB", true, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", None),
            ("node to ClusterIP", true, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", None),
            ("node to NodePort", true, "node", 3001, "10.180.0.1:80, 10.180.1.1:80", None),
            ("node to LB", true, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", None),
            ("external to ClusterIP", false, "172.30.0.41", 80, "10.180.0.1:80, 10.180.1.1:80", None),
            ("external to NodePort", false, "node", 3001, "10.180.0.1:80, 10.180.1.1:80", Some(true)),
            ("external to LB", false, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80", Some(true)),
            ("pod to ClusterIP with eTP:Local", true, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", None),
            ("pod to NodePort with eTP:Local", true, "node", 3002, "10.180.0.2:80, 10.180.1.2:80", None),
            ("pod to LB with eTP:Local", true, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", None),
            ("node to ClusterIP with eTP:Local", true, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", None),
            // Upstream's case uses port 3001 (svc1's node port).
            ("node to NodePort with eTP:Local", true, "node", 3001, "10.180.0.1:80, 10.180.1.1:80", None),
            ("node to LB with eTP:Local", true, "5.6.7.8", 80, "10.180.0.2:80, 10.180.1.2:80", None),
            ("external to ClusterIP with eTP:Local", false, "172.30.0.42", 80, "10.180.0.2:80, 10.180.1.2:80", None),
            ("external to NodePort with eTP:Local", false, "node", 3002, "10.180.0.2:80", Some(false)),
            ("external to LB with eTP:Local", false, "5.6.7.8", 80, "10.180.0.2:80", Some(false)),
            ("pod to ClusterIP with iTP:Local", true, "172.30.0.43", 80, "10.180.0.3:80", None),
            ("pod to NodePort with iTP:Local", true, "node", 3003, "10.180.0.3:80, 10.180.1.3:80", None),
            ("pod to LB with iTP:Local", true, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", None),
            ("node to ClusterIP with iTP:Local", true, "172.30.0.43", 80, "10.180.0.3:80", None),
            ("node to NodePort with iTP:Local", true, "node", 3003, "10.180.0.3:80, 10.180.1.3:80", None),
            ("node to LB with iTP:Local", true, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", None),
            ("external to ClusterIP with iTP:Local", false, "172.30.0.43", 80, "10.180.0.3:80", None),
            ("external to NodePort with iTP:Local", false, "node", 3003, "10.180.0.3:80, 10.180.1.3:80", Some(true)),
            ("external to LB with iTP:Local", false, "9.10.11.12", 80, "10.180.0.3:80, 10.180.1.3:80", Some(true)),
        ];
        for (name, local, dst, port, want, masq) in flows {
            assert_eq!(m.serve(dst, *port, "TCP", *local), *want, "{name}");
            if let Some(masq) = masq {
                let f = m
                    .desired
                    .frontends
                    .iter()
                    .find(|(f, _)| {
                        f.port == *port
                            && (if *dst == "node" { f.addr.is_unspecified() } else { f.addr.to_string() == *dst })
                    })
                    .expect("frontend");
                assert_eq!(f.1.settings.external_local, !masq, "{name}: client address kept");
            }
        }
    }

    fn etp_lb(policy: &str) -> k8s_openapi::api::core::v1::Service {
        service(
            "ns1/svc1",
            json!({
                "spec": {"clusterIP": "172.30.1.1", "type": "LoadBalancer", "externalTrafficPolicy": policy,
                         "ports": [{"name": "", "port": 80, "protocol": "TCP", "targetPort": 80}],
                         "healthCheckNodePort": 30000},
                "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}
            }),
        )
    }

    /// (case, endpoints, pod to clusterIP, external to LB).
    type TerminatingCase = (&'static str, Vec<Value>, &'static str, &'static str);

    fn terminating_cases(policy: &str, cases: Vec<TerminatingCase>) {
        for (name, eps, pod, external) in cases {
            let s = slice("ns1/svc1-1", "svc1", "IPv4", unnamed80(), eps);
            let m = run(&[etp_lb(policy)], std::slice::from_ref(&s), None, &config());
            assert_eq!(m.serve("172.30.1.1", 80, "TCP", true), pod, "{name}: pod to clusterIP");
            assert_eq!(m.serve("1.2.3.4", 80, "TCP", false), external, "{name}: external to LB");
            let m = run(&[etp_lb(policy)], &[], None, &config());
            assert_eq!(m.serve("172.30.1.1", 80, "TCP", true), "reject", "{name}: after endpoints deleted");
            assert_eq!(m.serve("1.2.3.4", 80, "TCP", false), "reject", "{name}: after endpoints deleted");
        }
    }

    /// kube-proxy `proxier_test.go` `TestTerminatingEndpointsTrafficPolicyLocal`.
    #[test]
    fn terminating_endpoints_with_external_policy_local_from_upstream() {
        terminating_cases(
            "Local",
            vec![
                (
                    "ready endpoints exist",
                    vec![
                        ep("10.0.1.1", Some("RS"), Some(NODE)),
                        ep("10.0.1.2", Some("RS"), Some(NODE)),
                        ep("10.0.1.3", Some("ST"), Some(NODE)),
                        ep("10.0.1.4", Some("T"), Some(NODE)),
                        ep("10.0.1.5", Some("RS"), Some("node-1")),
                    ],
                    "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                    "10.0.1.1:80, 10.0.1.2:80",
                ),
                (
                    "only terminating endpoints exist",
                    vec![
                        ep("10.0.1.2", Some("ST"), Some(NODE)),
                        ep("10.0.1.3", Some("ST"), Some(NODE)),
                        ep("10.0.1.4", Some("T"), Some(NODE)),
                        ep("10.0.1.5", Some("RS"), Some("node-1")),
                    ],
                    "10.0.1.5:80",
                    "10.0.1.2:80, 10.0.1.3:80",
                ),
                (
                    "terminating endpoints on remote node",
                    vec![ep("10.0.1.5", Some("ST"), Some("node-1"))],
                    "10.0.1.5:80",
                    "drop",
                ),
                (
                    "no usable endpoints on any node",
                    vec![ep("10.0.1.5", Some("T"), Some(NODE)), ep("10.0.1.5", Some("T"), Some("node-1"))],
                    "reject",
                    "reject",
                ),
            ],
        );
    }

    /// kube-proxy `proxier_test.go` `TestTerminatingEndpointsTrafficPolicyCluster`.
    #[test]
    fn terminating_endpoints_with_external_policy_cluster_from_upstream() {
        terminating_cases(
            "Cluster",
            vec![
                (
                    "ready endpoints exist",
                    vec![
                        ep("10.0.1.1", Some("RS"), Some(NODE)),
                        ep("10.0.1.2", Some("RS"), Some(NODE)),
                        ep("10.0.1.3", Some("ST"), Some("another-node")),
                        ep("10.0.1.4", Some("T"), Some("another-node")),
                        ep("10.0.1.5", Some("RS"), Some("another-node")),
                    ],
                    "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                    "10.0.1.1:80, 10.0.1.2:80, 10.0.1.5:80",
                ),
                (
                    "only terminating endpoints exist",
                    vec![
                        ep("10.0.1.2", Some("ST"), Some(NODE)),
                        ep("10.0.1.3", Some("ST"), Some(NODE)),
                        ep("10.0.1.4", Some("T"), Some("another-node")),
                        ep("10.0.1.5", Some("ST"), Some("another-node")),
                    ],
                    "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80",
                    "10.0.1.2:80, 10.0.1.3:80, 10.0.1.5:80",
                ),
                (
                    "terminating endpoints on remote node",
                    vec![ep("10.0.1.5", Some("ST"), Some("node-1"))],
                    "10.0.1.5:80",
                    "10.0.1.5:80",
                ),
                (
                    "no usable endpoints on any node",
                    vec![ep("10.0.1.5", Some("T"), Some(NODE)), ep("10.0.1.5", Some("T"), Some("node-1"))],
                    "reject",
                    "reject",
                ),
            ],
        );
    }

    /// kube-proxy `proxier_test.go` `TestInternalTrafficPolicy`.
    #[test]
    fn internal_traffic_policy_from_upstream() {
        let cases: &[(&str, Option<&str>, [&str; 3], &str)] = &[
            (
                "internalTrafficPolicy is cluster",
                Some("Cluster"),
                [NODE, "node1", "node2"],
                "10.0.1.1:80, 10.0.1.2:80, 10.0.1.3:80",
            ),
            (
                "internalTrafficPolicy is local and there is one local endpoint",
                Some("Local"),
                [NODE, "node1", "node2"],
                "10.0.1.1:80",
            ),
            (
                "internalTrafficPolicy is local and there are multiple local endpoints",
                Some("Local"),
                [NODE, NODE, "node2"],
                "10.0.1.1:80, 10.0.1.2:80",
            ),
            (
                "internalTrafficPolicy is local and there are no local endpoints",
                Some("Local"),
                ["node0", "node1", "node2"],
                "drop",
            ),
        ];
        for (name, itp, nodes, want) in cases {
            let mut spec = json!({"clusterIP": "172.30.1.1", "ports": [{"name": "", "port": 80, "protocol": "TCP"}]});
            if let Some(p) = itp {
                spec["internalTrafficPolicy"] = json!(p);
            }
            let svc = service("ns1/svc1", spec);
            let eps = (0..3).map(|i| ep(&format!("10.0.1.{}", i + 1), Some("R"), Some(nodes[i]))).collect();
            let s = slice("ns1/svc1-1", "svc1", "IPv4", unnamed80(), eps);
            let m = run(std::slice::from_ref(&svc), &[s], None, &config());
            assert_eq!(m.serve("172.30.1.1", 80, "TCP", true), *want, "{name}");
            let m = run(&[svc], &[], None, &config());
            assert_eq!(m.serve("172.30.1.1", 80, "TCP", true), "reject", "{name}: endpoints deleted");
        }
    }

    /// kube-proxy `proxier_test.go` `TestNoEndpointsReject`: with no
    /// endpoints, ClusterIP, external IP, node port and LB IP all refuse
    /// (also in the scope pods use).
    #[test]
    fn no_endpoints_reject_on_every_kind_from_upstream() {
        for policy in ["Cluster", "Local"] {
            let svc = service(
                "ns1/svc1",
                json!({"spec": {"type": "LoadBalancer", "clusterIP": "172.30.1.1", "externalIPs": ["192.168.99.11"],
                                "externalTrafficPolicy": policy,
                                "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]},
                       "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}]}}}),
            );
            let m = run(&[svc], &[], None, &config());
            for (dst, port) in [("172.30.1.1", 80), ("192.168.99.11", 80), ("node", 3001), ("1.2.3.4", 80)] {
                for local in [false, true] {
                    assert_eq!(m.serve(dst, port, "TCP", local), "reject", "{policy}: {dst}:{port} local={local}");
                }
            }
        }
    }

    /// kube-proxy `service_test.go` `TestServiceToServiceMap` (per-port
    /// info, per family), as the frontends it yields here.
    #[test]
    #[expect(clippy::too_many_lines, reason = "an upstream case table, transcribed whole")]
    fn service_to_frontends_from_upstream_service_to_service_map() {
        let port = |name: &str, proto: &str, port: u16, np: u16| json!({"name": name, "protocol": proto, "port": port, "nodePort": np});
        let lb_status = |ips: &[(&str, Option<&str>)]| {
            let ing: Vec<Value> = ips
                .iter()
                .map(|(ip, mode)| match mode {
                    Some(m) => json!({"ip": ip, "ipMode": m}),
                    None => json!({"ip": ip}),
                })
                .collect();
            json!({"loadBalancer": {"ingress": ing}})
        };
        let (cip4, ext4, range4) = ("10.0.0.1", "8.8.8.8", "0.0.0.0/1");
        let (cip6, ext6, range6) = ("2001:db8:85a3::8a2e:370:7334", "2001:db8:85a3::8a2e:370:7335", "2001:db8::/32");
        let both_ing = lb_status(&[(ext4, None), (ext6, None)]);
        let t = |p: &str| json!([{"name": "testPort", "port": 12345, "protocol": p}]);
        let cases: Vec<(&str, Value, Vec<&str>)> = vec![
            (
                "headless service",
                json!({"type": "ClusterIP", "clusterIP": "None", "ports": [port("rpc", "UDP", 1234, 0)]}),
                vec![],
            ),
            ("headless service without port", json!({"type": "ClusterIP", "clusterIP": "None"}), vec![]),
            (
                "cluster ip service",
                json!({"type": "ClusterIP", "clusterIP": "172.16.55.4", "ports": [port("p1", "UDP", 1234, 0), port("p2", "UDP", 1235, 0)]}),
                vec!["172.16.55.4:1234/UDP ClusterIP -> reject", "172.16.55.4:1235/UDP ClusterIP -> reject"],
            ),
            (
                "nodeport service",
                json!({"type": "NodePort", "clusterIP": "172.16.55.10", "ports": [port("port1", "UDP", 345, 678), port("port2", "TCP", 344, 677)]}),
                vec![
                    "node:677/TCP NodePort -> reject",
                    "node:678/UDP NodePort -> reject",
                    "172.16.55.10:344/TCP ClusterIP -> reject",
                    "172.16.55.10:345/UDP ClusterIP -> reject",
                ],
            ),
            (
                "load balancer service",
                json!({"spec": {"type": "LoadBalancer", "clusterIP": "172.16.55.11", "loadBalancerIP": "5.6.7.8",
                                "ports": [port("port3", "UDP", 8675, 30061), port("port4", "UDP", 8676, 30062)]},
                       "status": lb_status(&[("10.1.2.4", None)])}),
                vec![
                    "node:30061/UDP NodePort -> reject",
                    "node:30062/UDP NodePort -> reject",
                    "10.1.2.4:8675/UDP LoadBalancer -> reject",
                    "10.1.2.4:8676/UDP LoadBalancer -> reject",
                    "172.16.55.11:8675/UDP ClusterIP -> reject",
                    "172.16.55.11:8676/UDP ClusterIP -> reject",
                ],
            ),
            (
                "load balancer service ipMode Proxy feature gate enabled",
                json!({"spec": {"type": "LoadBalancer", "clusterIP": "172.16.55.11", "loadBalancerIP": "5.6.7.8",
                                "ports": [port("port3", "UDP", 8675, 30061)]},
                       "status": lb_status(&[("10.1.2.4", Some("Proxy"))])}),
                vec!["node:30061/UDP NodePort -> reject", "172.16.55.11:8675/UDP ClusterIP -> reject"],
            ),
            (
                "load balancer service ipMode VIP feature gate enabled",
                json!({"spec": {"type": "LoadBalancer", "clusterIP": "172.16.55.11",
                                "ports": [port("port3", "UDP", 8675, 30061)]},
                       "status": lb_status(&[("10.1.2.4", Some("VIP"))])}),
                vec![
                    "node:30061/UDP NodePort -> reject",
                    "10.1.2.4:8675/UDP LoadBalancer -> reject",
                    "172.16.55.11:8675/UDP ClusterIP -> reject",
                ],
            ),
            (
                "external name service",
                json!({"type": "ExternalName", "clusterIP": "172.16.55.4", "externalName": "foo2.bar.com", "ports": [port("portz", "UDP", 1235, 0)]}),
                vec![],
            ),
            (
                "service with ipv6 clusterIP under ipv4 mode, service should be filtered",
                json!({"spec": {"clusterIP": cip6, "ports": t("TCP")}, "status": both_ing.clone()}),
                vec![
                    "[2001:db8:85a3::8a2e:370:7334]:12345/TCP ClusterIP -> reject",
                    "[2001:db8:85a3::8a2e:370:7335]:12345/TCP LoadBalancer -> reject",
                ],
            ),
            (
                "service with both ipv4 and ipv6 configurations under ipv4 mode, ipv6 fields should be filtered",
                json!({"spec": {"clusterIP": cip4, "externalIPs": [ext4, ext6], "loadBalancerSourceRanges": [range4, range6], "ports": t("TCP")},
                       "status": both_ing.clone()}),
                // 8.8.8.8 is both external and LB IP: one LB frontend.
                vec![
                    "8.8.8.8:12345/TCP LoadBalancer ranges=0.0.0.0/1 -> reject",
                    "10.0.0.1:12345/TCP ClusterIP -> reject",
                ],
            ),
            (
                "service with both ipv4 and ipv6 configurations under ipv6 mode, ipv4 fields should be filtered",
                json!({"spec": {"clusterIP": cip6, "externalIPs": [ext4, ext6], "loadBalancerSourceRanges": [range4, range6], "ports": t("TCP")},
                       "status": both_ing.clone()}),
                vec![
                    "[2001:db8:85a3::8a2e:370:7334]:12345/TCP ClusterIP -> reject",
                    "[2001:db8:85a3::8a2e:370:7335]:12345/TCP LoadBalancer ranges=2001:db8::/32 -> reject",
                ],
            ),
            (
                "service with extra space in LoadBalancerSourceRanges",
                json!({"spec": {"clusterIP": cip4, "loadBalancerSourceRanges": [" 10.1.2.0/28"], "ports": t("TCP")},
                       "status": lb_status(&[("10.1.2.4", None)])}),
                vec![
                    "10.0.0.1:12345/TCP ClusterIP -> reject",
                    "10.1.2.4:12345/TCP LoadBalancer ranges=10.1.2.0/28 -> reject",
                ],
            ),
        ];
        for (name, spec, want) in cases {
            let m = run(&[service("test/svc", spec)], &[], None, &config());
            assert!(m.rejected.is_empty(), "{name}: {:?}", m.rejected);
            let mut want: Vec<String> = want.into_iter().map(String::from).collect();
            want.sort();
            let mut got = m.rows();
            got.sort();
            assert_eq!(got, want, "{name}");
        }
        // The same object, both ways: the externalIPs, ingress IPs and
        // ranges of the other family are named in one warning each.
        let spec = json!({"spec": {"clusterIP": cip4, "externalIPs": [ext4, ext6], "loadBalancerSourceRanges": [range4, range6], "ports": t("TCP")},
                          "status": both_ing});
        let m = run(&[service("test/svc", spec)], &[], None, &config());
        let w: Vec<String> = m.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        for what in [format!("ingress[1].ip {ext6}"), format!("loadBalancerSourceRanges {range6}")] {
            assert!(w.iter().any(|l| l.contains(&what) && l.starts_with("Service test/svc:")), "{what}: {w:?}");
        }
    }

    /// kube-proxy `service_test.go` `TestBuildServiceMapAddRemove` and
    /// `TestBuildServiceMapServiceUpdate`: one health-check node port per
    /// LoadBalancer Service with externalTrafficPolicy Local; gone with the
    /// Service or when it turns back into a ClusterIP.
    #[test]
    fn health_check_node_ports_from_upstream_build_service_map() {
        let p = |n: &str, port: u16, np: u16| json!({"name": n, "protocol": "UDP", "port": port, "nodePort": np});
        let lb = |name: &str, cip: &str, ing: &str, local: bool| {
            let mut spec = json!({"type": "LoadBalancer", "clusterIP": cip, "loadBalancerIP": "5.6.7.8",
                                  "ports": [p("foobar", 8675, 30061), p("baz", 8676, 30062)]});
            if local {
                spec["externalTrafficPolicy"] = json!("Local");
                spec["healthCheckNodePort"] = json!(345);
                spec["ports"] = json!([p("foobar2", 8677, 30063), p("baz", 8678, 30064)]);
            }
            service(
                &format!("ns1/{name}"),
                json!({"spec": spec, "status": {"loadBalancer": {"ingress": [{"ip": ing}]}}}),
            )
        };
        let services = vec![
            service(
                "ns2/cluster-ip",
                json!({"type": "ClusterIP", "clusterIP": "172.16.55.4", "ports": [p("port1", 1234, 0), p("port2", 1235, 0)]}),
            ),
            service(
                "ns2/node-port",
                json!({"type": "NodePort", "clusterIP": "172.16.55.10", "ports": [p("port1", 345, 678), p("port2", 344, 677)]}),
            ),
            lb("load-balancer", "172.16.55.11", "10.1.2.4", false),
            lb("only-local-load-balancer", "172.16.55.12", "10.1.2.3", true),
        ];
        let m = run(&services, &[], None, &config());
        let hc: Vec<(u16, String)> = m.desired.health_checks.iter().map(|(p, h)| (*p, h.service.clone())).collect();
        assert_eq!(hc, vec![(345, "ns1/only-local-load-balancer".to_owned())]);
        let m = run(&services[..1], &[], None, &config());
        assert!(m.desired.health_checks.is_empty(), "removed with the Service");
        // TestBuildServiceMapServiceUpdate: ClusterIP -> LB Local -> ClusterIP.
        let v1 =
            service("ns1/svc1", json!({"type": "ClusterIP", "clusterIP": "172.16.55.4", "ports": [p("p1", 1234, 0)]}));
        let v2 = lb("svc1", "172.16.55.4", "10.1.2.3", true);
        assert!(run(std::slice::from_ref(&v1), &[], None, &config()).desired.health_checks.is_empty());
        assert_eq!(run(&[v2], &[], None, &config()).desired.health_checks.len(), 1);
        assert!(run(&[v1], &[], None, &config()).desired.health_checks.is_empty());
    }

    /// kube-proxy `proxier_test.go` `TestHealthCheckNodePortWhenTerminating`
    /// and `LocalReadyEndpoints`: the health check counts distinct ready
    /// endpoints on this node, per family; terminating ones count 0.
    #[test]
    fn health_check_counts_local_ready_endpoints_only() {
        let svc = service(
            "ns1/svc1",
            json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30000,
                   "clusterIPs": ["172.30.1.1", "fd00:ffff::1"], "ipFamilies": ["IPv4", "IPv6"],
                   "ports": [{"name": "", "port": 80, "protocol": "TCP", "nodePort": 30080},
                             {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]}),
        );
        let ports =
            json!([{"name": "", "port": 80, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}]);
        let v4 = |flags: &str| {
            slice(
                "ns1/svc1-v4",
                "svc1",
                "IPv4",
                ports.clone(),
                vec![
                    ep("10.0.1.1", Some(flags), Some(NODE)),
                    ep("10.0.1.2", Some(flags), Some(NODE)),
                    ep("10.0.1.3", Some("RS"), Some("node-1")),
                ],
            )
        };
        let v6 = slice("ns1/svc1-v6", "svc1", "IPv6", ports.clone(), vec![ep("fd00::1:1", Some("RS"), Some(NODE))]);
        let m = run(std::slice::from_ref(&svc), &[v4("RS"), v6.clone()], None, &config());
        let hc = &m.desired.health_checks[&30000];
        assert_eq!(hc.service, "ns1/svc1");
        assert_eq!(
            hc.by_family,
            vec![(crate::types::Family::V4, 2), (crate::types::Family::V6, 1)],
            "distinct addresses over both ports"
        );
        assert_eq!(hc.local_endpoints, 2);
        let m = run(std::slice::from_ref(&svc), &[v4("ST"), v6], None, &config());
        assert_eq!(
            m.desired.health_checks[&30000].by_family[0],
            (crate::types::Family::V4, 0),
            "terminating ones count 0"
        );
        // Without a node name nothing is local.
        let mut cfg = config();
        cfg.node_name = None;
        assert_eq!(run(&[svc], &[v4("RS")], None, &cfg).desired.health_checks[&30000].local_endpoints, 0);
    }

    /// kube-proxy `proxier_test.go` `TestLoadBalancer`: source ranges
    /// filter the LB IP (both scopes: pods are not exempt), never the node
    /// port; each family gets its own ranges, and a family without any has
    /// no filter.
    #[test]
    fn source_ranges_apply_to_lb_ips_only_and_per_family() {
        let svc = service(
            "ns1/svc1",
            json!({"spec": {"type": "LoadBalancer", "clusterIPs": ["172.30.0.41", "fd00:ffff::41"], "ipFamilies": ["IPv4", "IPv6"],
                            "externalIPs": ["192.168.99.11"], "externalTrafficPolicy": "Local",
                            "loadBalancerSourceRanges": ["203.0.113.0/25"],
                            "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]},
                   "status": {"loadBalancer": {"ingress": [{"ip": "1.2.3.4"}, {"ip": "fd00:1b::4"}]}}}),
        );
        let m = run(&[svc], &[], None, &config());
        let ranged: Vec<String> = m
            .desired
            .frontends
            .iter()
            .filter(|(_, s)| !s.settings.source_ranges.is_empty())
            .map(|(f, s)| format!("{f} {}", s.settings.source_ranges[0]))
            .collect();
        assert_eq!(ranged, vec!["1.2.3.4:80/TCP 203.0.113.0/25", "1.2.3.4:80/TCP (internal) 203.0.113.0/25"]);
        assert!(m.rows().iter().any(|r| r.starts_with("[fd00:1b::4]:80/TCP LoadBalancer local two-scopes ->")));
    }

    /// Session affinity (kube-proxy `TestOverallIPTablesRules`: `--rcheck
    /// --seconds 10800`): the timeout (default 10800) is on every entry of
    /// every frontend, both families, both scopes; without ClientIP none.
    #[test]
    fn session_affinity_is_on_every_entry_with_its_timeout() {
        let svc = |affinity: Value| {
            let mut spec = json!({"type": "NodePort", "clusterIPs": ["172.30.0.41", "fd00:ffff::41"], "ipFamilies": ["IPv4", "IPv6"],
                                  "externalIPs": ["192.168.99.11"], "externalTrafficPolicy": "Local",
                                  "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]});
            for (k, v) in affinity.as_object().expect("object") {
                spec[k] = v.clone();
            }
            service("ns1/svc1", spec)
        };
        let timeouts = |m: &super::super::testkit::Model| {
            m.desired.frontends.values().map(|s| s.settings.affinity_timeout).collect::<Vec<_>>()
        };
        let m = run(&[svc(json!({"sessionAffinity": "ClientIP"}))], &[], None, &config());
        assert_eq!(m.desired.frontends.len(), 8, "2 ClusterIPs; 2 node ports and 1 external IP, in 2 scopes each");
        assert!(timeouts(&m).iter().all(|t| *t == Some(10_800)), "{:?}", m.rows());
        let m = run(
            &[svc(
                json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}}),
            )],
            &[],
            None,
            &config(),
        );
        assert!(timeouts(&m).iter().all(|t| *t == Some(5)));
        let m = run(&[svc(json!({"sessionAffinity": "None"}))], &[], None, &config());
        assert!(timeouts(&m).iter().all(Option::is_none));
        for bad in [
            json!({"sessionAffinity": "Cookie"}),
            json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}}}),
        ] {
            let m = run(&[svc(bad.clone())], &[], None, &config());
            assert_eq!(m.rejected_names(), vec!["Service ns1/svc1"], "{bad}");
        }
    }

    /// kube-proxy `serviceport.go`: a family without a ClusterIP has no
    /// frontend at all (no node port either); the node port number is the
    /// same in both families. `allocateLoadBalancerNodePorts: false`: no
    /// node port.
    #[test]
    fn node_ports_exist_per_family_of_the_cluster_ips() {
        let svc = |ips: &[&str], fams: &[&str], extra: Value| {
            let mut spec = json!({"type": "LoadBalancer", "clusterIPs": ips, "ipFamilies": fams,
                                  "ports": [{"name": "p", "port": 80, "protocol": "TCP", "nodePort": 30080}]});
            for (k, v) in extra.as_object().expect("object") {
                spec[k] = v.clone();
            }
            service("ns1/svc1", spec)
        };
        let nodeports = |m: &super::super::testkit::Model| {
            m.desired
                .frontends
                .iter()
                .filter(|(_, s)| s.settings.kind == Kind::NodePort)
                .map(|(f, _)| f.to_string())
                .collect::<Vec<_>>()
        };
        let dual = run(&[svc(&["172.30.0.41", "fd00:ffff::41"], &["IPv4", "IPv6"], json!({}))], &[], None, &config());
        assert_eq!(nodeports(&dual), vec!["node:30080/TCP", "node:30080/TCP"]);
        assert_eq!(
            dual.desired
                .frontends
                .keys()
                .filter(|f| f.addr.is_unspecified())
                .map(crate::types::Frontend::family)
                .collect::<Vec<_>>()
                .len(),
            2
        );
        let v6 = run(&[svc(&["fd00:ffff::41"], &["IPv6"], json!({}))], &[], None, &config());
        let fams: Vec<_> = v6.desired.frontends.keys().map(crate::types::Frontend::family).collect();
        assert!(fams.iter().all(|f| *f == crate::types::Family::V6), "{:?}", v6.rows());
        let none = run(
            &[svc(&["172.30.0.41"], &["IPv4"], json!({"allocateLoadBalancerNodePorts": false}))],
            &[],
            None,
            &config(),
        );
        assert!(nodeports(&none).is_empty());
    }

    /// Topology from this node's Node object: its zone label picks the
    /// hinted endpoints for the cluster set (PreferClose / PreferSameZone
    /// hints as the EndpointSlice controller writes them); the local set
    /// (externalTrafficPolicy Local) ignores hints.
    #[test]
    fn topology_hints_use_the_zone_of_this_nodes_node_object() {
        let svc = service(
            "ns1/svc1",
            json!({"type": "NodePort", "clusterIP": "172.30.0.41", "externalTrafficPolicy": "Local", "trafficDistribution": "PreferClose",
                   "ports": [{"name": "p80", "port": 80, "protocol": "TCP", "nodePort": 3001}]}),
        );
        let hinted = |addr: &str, zone: &str, node: &str| {
            let mut e = ep(addr, Some("RS"), Some(node));
            e["hints"] = json!({"forZones": [{"name": zone}]});
            e
        };
        let s = slice(
            "ns1/svc1-1",
            "svc1",
            "IPv4",
            p80(),
            vec![
                hinted("10.0.0.1", "zone-a", "node-b"),
                hinted("10.0.0.2", "zone-b", NODE),
                hinted("10.0.0.3", "zone-a", "node-c"),
            ],
        );
        let zone_a = node(Some("zone-a"), &["198.18.250.1"]);
        let m = run(std::slice::from_ref(&svc), std::slice::from_ref(&s), Some(&zone_a), &config());
        assert_eq!(m.serve("172.30.0.41", 80, "TCP", true), "10.0.0.1:80, 10.0.0.3:80", "cluster set: zone-a only");
        assert_eq!(m.serve("node", 3001, "TCP", true), "10.0.0.1:80, 10.0.0.3:80", "pods on this node: cluster set");
        assert_eq!(m.serve("node", 3001, "TCP", false), "10.0.0.2:80", "external: local set, hints ignored");
        let no_zone = node(None, &["198.18.250.1"]);
        let m = run(&[svc], &[s], Some(&no_zone), &config());
        assert_eq!(
            m.serve("172.30.0.41", 80, "TCP", true),
            "10.0.0.1:80, 10.0.0.2:80, 10.0.0.3:80",
            "no zone label: no filter"
        );
    }

    /// The endpoint details `check` shows: node name and terminating.
    #[test]
    fn backends_carry_their_node_and_terminating_state() {
        let svc = service(
            "ns1/svc1",
            json!({"clusterIP": "172.30.0.41", "ports": [{"name": "p80", "port": 80, "protocol": "TCP"}]}),
        );
        let s = slice(
            "ns1/svc1-1",
            "svc1",
            "IPv4",
            p80(),
            vec![ep("10.0.0.1", Some("ST"), Some("node-b")), ep("10.0.0.2", Some("ST"), None)],
        );
        let m = run(&[svc], &[s], None, &config());
        let spec = m.desired.frontends.values().next().expect("one frontend");
        assert_eq!(spec.port_name, "p80");
        let info: Vec<(Option<&str>, bool)> = spec.info.iter().map(|i| (i.node.as_deref(), i.terminating)).collect();
        assert_eq!(info, vec![(Some("node-b"), true), (None, true)]);
    }
}
