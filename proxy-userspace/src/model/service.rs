//! A Service object into what the model proxies (kube-proxy's
//! `serviceport.go` `newBaseServiceInfo`), validated as the API server
//! would where kube-proxy relies on it (in standalone mode nothing else
//! validates).
//!
//! - Not proxied, silently: another proxy's Services
//!   (`service.kubernetes.io/service-proxy-name`), ExternalName, headless
//!   (`clusterIP: None`) and not yet allocated ones.
//! - A port's `nodePort` is programmed whatever the type says, as
//!   kube-proxy does (the API server allocates them for NodePort and
//!   LoadBalancer Services only); `allocateLoadBalancerNodePorts: false`
//!   on a LoadBalancer means none.
//! - Load-balancer IPs are `status.loadBalancer.ingress[].ip` (kube-proxy
//!   reads the status whatever the type); hostname-only entries and
//!   `ipMode: Proxy` are skipped; `spec.loadBalancerIP` is a request, not a
//!   frontend. `loadBalancerSourceRanges` (trimmed) apply to them only.
//! - `externalTrafficPolicy: Local` counts only for a Service that is
//!   externally accessible by type (NodePort, LoadBalancer, or ClusterIP
//!   with external IPs); `internalTrafficPolicy: Local` always.
//! - `sessionAffinity: ClientIP` times out after
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800, at
//!   most 86400).
//! - `healthCheckNodePort` counts for LoadBalancer Services with
//!   `externalTrafficPolicy: Local`.
use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::{Config, LABEL_SERVICE_PROXY_NAME, parse_proto};
use crate::{
    store::ns_name,
    types::{Cidr, Family, Proto},
};

/// The API server's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The API server's largest `timeoutSeconds`.
pub const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// `spec.type`, for the types that are proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvcType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// One Service port, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SvcPort {
    /// `name` ("" when unnamed).
    pub name: String,
    pub port: u16,
    pub proto: Proto,
    /// `nodePort`, when the Service has one.
    pub node_port: Option<u16>,
}

/// A Service that passed validation and is ours to proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidService {
    /// `namespace/name`.
    pub name: String,
    pub type_: SvcType,
    /// At most one per family.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<SvcPort>,
    /// `spec.externalIPs` (index, address), duplicates dropped.
    pub external_ips: Vec<(usize, IpAddr)>,
    /// `status.loadBalancer.ingress` (index, address) in VIP mode.
    pub lb_ips: Vec<(usize, IpAddr)>,
    /// `spec.loadBalancerSourceRanges`, both families.
    pub source_ranges: Vec<Cidr>,
    /// kube-proxy's `ExternalPolicyLocal`.
    pub external_local: bool,
    pub internal_local: bool,
    /// ClientIP affinity timeout, seconds.
    pub affinity: Option<u32>,
    pub health_check_node_port: Option<u16>,
}

impl ValidService {
    /// The Service's addresses of `family` in `list`.
    pub fn of_family(list: &[(usize, IpAddr)], family: Family) -> Vec<IpAddr> {
        list.iter().map(|(_, a)| *a).filter(|a| Family::of(*a) == family).collect()
    }

    /// The Service's families (those it has a ClusterIP of).
    pub fn families(&self) -> impl Iterator<Item = Family> + '_ {
        self.cluster_ips.iter().map(|a| Family::of(*a))
    }
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, String> {
    s.trim().parse().map_err(|_| format!("{field} {s:?} is not an IP address"))
}

fn policy_is_local(field: &str, value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("Cluster") => Ok(false),
        Some("Local") => Ok(true),
        Some(other) => Err(format!("{field} {other:?} is neither Cluster nor Local")),
    }
}

/// The Service's verdict: proxy it (`Some`), skip it silently (`None`:
/// not ours, or nothing to proxy), or reject it with the reason.
pub fn validate(svc: &Service, config: &Config) -> Result<Option<ValidService>, String> {
    let proxy_label = svc.metadata.labels.as_ref().and_then(|l| l.get(LABEL_SERVICE_PROXY_NAME));
    if proxy_label != config.service_proxy_name.as_ref() {
        return Ok(None);
    }
    let Some(spec) = &svc.spec else { return Ok(None) };
    let type_ = match spec.type_.as_deref() {
        None | Some("ClusterIP") => SvcType::ClusterIp,
        Some("NodePort") => SvcType::NodePort,
        Some("LoadBalancer") => SvcType::LoadBalancer,
        Some("ExternalName") => return Ok(None),
        Some(other) => return Err(format!("type {other:?} is not a Service type")),
    };
    let Some(cluster_ips) = cluster_ips(spec)? else { return Ok(None) };
    let ports = ports(spec, type_ == SvcType::LoadBalancer && spec.allocate_load_balancer_node_ports == Some(false))?;
    let (external_ips, lb_ips) = addresses(svc, &cluster_ips)?;
    let mut source_ranges = Vec::new();
    for (i, s) in spec.load_balancer_source_ranges.iter().flatten().enumerate() {
        let c: Cidr = s.trim().parse().map_err(|e| format!("loadBalancerSourceRanges[{i}]: {e}"))?;
        source_ranges.push(c);
    }
    source_ranges.sort_unstable();
    source_ranges.dedup();
    let externally_accessible =
        type_ != SvcType::ClusterIp || spec.external_ips.as_ref().is_some_and(|e| !e.is_empty());
    let external_local =
        externally_accessible && policy_is_local("externalTrafficPolicy", spec.external_traffic_policy.as_deref())?;
    let internal_local = policy_is_local("internalTrafficPolicy", spec.internal_traffic_policy.as_deref())?;
    let health_check_node_port = match spec.health_check_node_port.filter(|p| *p != 0) {
        Some(p) if type_ == SvcType::LoadBalancer && external_local => {
            Some(u16::try_from(p).map_err(|_| format!("healthCheckNodePort {p} is out of range 1-65535"))?)
        }
        _ => None,
    };
    if let Some(hc) = health_check_node_port
        && ports.iter().any(|p| p.node_port == Some(hc) && p.proto == Proto::Tcp)
    {
        return Err(format!("healthCheckNodePort {hc} is also a TCP nodePort of the Service"));
    }
    Ok(Some(ValidService {
        name: ns_name(&svc.metadata),
        type_,
        cluster_ips,
        ports,
        external_ips,
        lb_ips,
        source_ranges,
        external_local,
        internal_local,
        affinity: affinity(spec)?,
        health_check_node_port,
    }))
}

/// Whether the Service's ClusterIPs, external IPs or LB ingress IPs name
/// one of `addrs` (parsed as loosely as anything; the verdict is
/// `validate`'s).
pub fn names_any(svc: &Service, addrs: &BTreeSet<IpAddr>) -> bool {
    let spec = svc.spec.as_ref();
    let cluster = spec.and_then(|s| s.cluster_ips.as_ref()).into_iter().flatten();
    let legacy = spec.and_then(|s| s.cluster_ip.as_ref());
    let external = spec.and_then(|s| s.external_ips.as_ref()).into_iter().flatten();
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
    let lb = ingress.into_iter().flatten().filter_map(|i| i.ip.as_ref());
    cluster.chain(legacy).chain(external).chain(lb).any(|a| a.trim().parse().is_ok_and(|ip| addrs.contains(&ip)))
}

/// `clusterIPs` (or the legacy `clusterIP`), one per family, agreeing
/// with `ipFamilies`; `None` for headless or not yet allocated.
fn cluster_ips(spec: &ServiceSpec) -> Result<Option<Vec<IpAddr>>, String> {
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => vec![],
    };
    if ips.is_empty() || ips.iter().any(|ip| ip.is_empty() || *ip == "None") {
        return Ok(None);
    }
    let mut cluster_ips = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let addr = parse_ip(&format!("clusterIPs[{i}]"), ip)?;
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
    Ok(Some(cluster_ips))
}

/// `ports`, each (name) and (port, protocol) and (nodePort, protocol) once.
fn ports(spec: &ServiceSpec, no_node_ports: bool) -> Result<Vec<SvcPort>, String> {
    let mut ports: Vec<SvcPort> = Vec::new();
    for p in spec.ports.iter().flatten() {
        let name = p.name.clone().unwrap_or_default();
        let port = u16::try_from(p.port)
            .ok()
            .filter(|n| *n != 0)
            .ok_or_else(|| format!("port {:?} number {} is out of range 1-65535", name, p.port))?;
        let proto = parse_proto(p.protocol.as_deref()).map_err(|e| format!("port {name:?}: {e}"))?;
        let node_port = match p.node_port.filter(|n| *n != 0) {
            None => None,
            Some(_) if no_node_ports => None,
            Some(n) => {
                Some(u16::try_from(n).map_err(|_| format!("port {name:?} nodePort {n} is out of range 1-65535"))?)
            }
        };
        if ports.iter().any(|q| q.port == port && q.proto == proto) {
            return Err(format!("port {port}/{proto} appears more than once"));
        }
        if ports.iter().any(|q| q.name == name) {
            return Err(format!("port name {name:?} appears more than once"));
        }
        if let Some(np) = node_port
            && ports.iter().any(|q| q.node_port == Some(np) && q.proto == proto)
        {
            return Err(format!("nodePort {np}/{proto} appears more than once"));
        }
        ports.push(SvcPort { name, port, proto, node_port });
    }
    Ok(ports)
}

/// (`externalIPs`, load-balancer IPs), each (index, address), duplicates
/// dropped, none of them a ClusterIP of the Service.
type Addresses = (Vec<(usize, IpAddr)>, Vec<(usize, IpAddr)>);

fn addresses(svc: &Service, cluster_ips: &[IpAddr]) -> Result<Addresses, String> {
    let mut external_ips: Vec<(usize, IpAddr)> = Vec::new();
    for (i, s) in svc.spec.as_ref().and_then(|s| s.external_ips.as_ref()).into_iter().flatten().enumerate() {
        let ip = parse_ip(&format!("externalIPs[{i}]"), s)?;
        if cluster_ips.contains(&ip) {
            return Err(format!("externalIPs[{i}] {ip} is also the Service's ClusterIP"));
        }
        if !external_ips.iter().any(|(_, a)| *a == ip) {
            external_ips.push((i, ip));
        }
    }
    let mut lb_ips: Vec<(usize, IpAddr)> = Vec::new();
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        // Hostname-only entries and ipMode Proxy (kube-proxy's IsVIPMode).
        let Some(s) = ing.ip.as_deref().filter(|s| !s.is_empty()) else { continue };
        if !matches!(ing.ip_mode.as_deref(), None | Some("VIP")) {
            continue;
        }
        let ip = parse_ip(&format!("status.loadBalancer.ingress[{i}].ip"), s)?;
        if cluster_ips.contains(&ip) {
            return Err(format!("status.loadBalancer.ingress[{i}].ip {ip} is also the Service's ClusterIP"));
        }
        if !lb_ips.iter().any(|(_, a)| *a == ip) {
            lb_ips.push((i, ip));
        }
    }
    // An address both external and LB IP is one frontend, a LoadBalancer
    // one (its source ranges apply).
    external_ips.retain(|(_, a)| !lb_ips.iter().any(|(_, b)| a == b));
    Ok((external_ips, lb_ips))
}

/// `sessionAffinity` and its timeout.
fn affinity(spec: &ServiceSpec) -> Result<Option<u32>, String> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(None),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT)),
                Some(t) => {
                    u32::try_from(t).ok().filter(|t| (1..=MAX_AFFINITY_TIMEOUT).contains(t)).map(Some).ok_or_else(
                        || format!("sessionAffinityConfig.clientIP.timeoutSeconds {t} is out of range 1-86400"),
                    )
                }
            }
        }
        Some(other) => Err(format!("sessionAffinity {other:?} is neither None nor ClientIP")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::super::testkit::{config, run, service};

    fn spec(extra: &Value) -> Value {
        let mut s = json!({"type": "NodePort", "clusterIP": "198.19.0.10",
                           "ports": [{"name": "a", "port": 80, "protocol": "TCP", "nodePort": 30080}]});
        for (k, v) in extra.as_object().expect("object") {
            s[k] = v.clone();
        }
        s
    }

    /// In standalone mode nothing else validates: what the API server
    /// would refuse, and kube-proxy would misread, is rejected by name.
    #[test]
    fn malformed_fields_reject_the_service_with_the_field_named() {
        let cases = [
            (json!({"type": "Bogus"}), "type \"Bogus\""),
            (json!({"externalTrafficPolicy": "Global"}), "externalTrafficPolicy \"Global\""),
            (json!({"internalTrafficPolicy": "Node"}), "internalTrafficPolicy \"Node\""),
            (json!({"externalIPs": ["203.0.113.300"]}), "externalIPs[0]"),
            (json!({"externalIPs": ["198.19.0.10"]}), "also the Service's ClusterIP"),
            (
                json!({"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/33"]}),
                "loadBalancerSourceRanges[0]",
            ),
            (
                json!({"ports": [{"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 81, "nodePort": 30080}]}),
                "nodePort 30080/TCP appears more than once",
            ),
            (
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": 30080}),
                "healthCheckNodePort 30080 is also a TCP nodePort",
            ),
            (
                json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
                "timeoutSeconds 0",
            ),
        ];
        for (extra, reason) in cases {
            let m = run(
                &[
                    service("ns/bad", spec(&extra)),
                    service("ns/good", json!({"clusterIP": "198.19.0.11", "ports": [{"port": 80}]})),
                ],
                &[],
                None,
                &config(),
            );
            assert_eq!(m.rejected_names(), vec!["Service ns/bad"], "{extra}");
            assert!(m.rejected[0].reason.contains(reason), "{extra}: {}", m.rejected[0]);
            assert_eq!(m.desired.frontends.len(), 1, "{extra}: the good Service is programmed");
        }
    }

    #[test]
    fn accepted_oddities_follow_kube_proxy() {
        // Same external IP twice: one frontend. Hostname-only ingress:
        // skipped. loadBalancerIP: not a frontend.
        let m = run(
            &[service(
                "ns/ok",
                json!({"spec": spec(&json!({"type": "LoadBalancer", "externalIPs": ["203.0.113.1", "203.0.113.1"], "loadBalancerIP": "203.0.113.9"})),
                       "status": {"loadBalancer": {"ingress": [{"hostname": "lb.example"}, {"ip": "203.0.113.2"}]}}}),
            )],
            &[],
            None,
            &config(),
        );
        assert!(m.rejected.is_empty(), "{:?}", m.rejected);
        let mut rows = m.rows();
        rows.sort();
        assert_eq!(
            rows,
            vec![
                "198.19.0.10:80/TCP ClusterIP -> reject",
                "203.0.113.1:80/TCP ExternalIP -> reject",
                "203.0.113.2:80/TCP LoadBalancer -> reject",
                "node:30080/TCP NodePort -> reject",
            ]
        );
        // An external IP of the other family is ignored, with a warning.
        let node = super::super::testkit::node(None, &["198.18.250.1"]);
        let m = run(&[service("ns/v4", spec(&json!({"externalIPs": ["2001:db8::5"]})))], &[], Some(&node), &config());
        assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
        assert_eq!(
            m.warnings[0].to_string(),
            "Service ns/v4: externalIPs[0] 2001:db8::5 is ignored: the Service has no ClusterIP of its family"
        );
        assert!(m.rows().iter().all(|r| !r.contains("2001:db8::5")));
        // Without this node's Node object node ports answer nowhere: said once.
        let m = run(&[service("ns/v4", spec(&json!({})))], &[], None, &config());
        let w: Vec<String> = m.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            w,
            vec!["Node node-a: not found: node ports answer on no address until it is (they use its status.addresses)"]
        );
        assert!(m.desired.nodeport_addresses.is_empty());
    }
}
