//! Which addresses and ports a Service may claim (CVE-2020-8554 and its
//! relatives): a Service never captures traffic for an address it does not
//! own. Pure; the node's addresses come in through `NodeContext`.
//!
//! Refused for every frontend kind (ClusterIP, external IP, load-balancer
//! IP), both families, whatever the flags say:
//! - loopback (127.0.0.0/8, ::1), unspecified (0.0.0.0/8, ::), link-local
//!   (169.254.0.0/16, where cloud metadata lives, and fe80::/10),
//!   multicast (224.0.0.0/4, ff00::/8), broadcast (255.255.255.255 and the
//!   broadcast address of every interface subnet), IPv4-mapped IPv6
//!   (::ffff:0:0/96: an IPv4 destination in IPv6 clothing);
//! - this node's own addresses (its Node object's and its interfaces'):
//!   node ports are the only way to use them;
//! - the API server's address the agent talks to.
//!
//! Then the flags: ClusterIPs must lie in `--service-cluster-ip-range` of
//! their family when one is set; external and LB IPs must lie in
//! `--external-ip-cidrs` when set, and never in a service CIDR (only the
//! API server hands those out); node ports and health-check node ports
//! must lie in `--service-node-port-range`.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    str::FromStr,
};

use super::{Config, node::NodeContext, service::ValidService};
use crate::types::{Cidr, Family};

/// An inclusive port range (`--service-node-port-range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl Default for PortRange {
    /// The API server's default, 30000-32767.
    fn default() -> Self {
        Self { first: 30000, last: 32767 }
    }
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// `FIRST-LAST`, `FIRST+COUNT` (kube's `PortRange` forms) or one port.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range (FIRST-LAST, e.g. 30000-32767)");
        let num = |t: &str| t.trim().parse::<u16>().map_err(|_| bad());
        let (first, last) = if let Some((a, b)) = s.split_once('-') {
            (num(a)?, num(b)?)
        } else if let Some((a, n)) = s.split_once('+') {
            let first = num(a)?;
            (first, first.checked_add(num(n)?).ok_or_else(bad)?)
        } else {
            let p = num(s)?;
            (p, p)
        };
        if first == 0 || last < first {
            return Err(bad());
        }
        Ok(Self { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

pub fn is_link_local(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    }
}

/// Why no Service may claim `addr`, whatever the node, if so.
pub fn refused_class(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) if a.octets()[0] == 0 => Some("an unspecified address (0.0.0.0/8)"),
        IpAddr::V6(a) if a.is_unspecified() => Some("the unspecified address"),
        _ if addr.is_loopback() => Some("a loopback address"),
        _ if is_link_local(addr) => Some("link-local (cloud metadata services live there)"),
        _ if addr.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a == Ipv4Addr::BROADCAST => Some("the broadcast address"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => Some("an IPv4-mapped IPv6 address"),
        _ => None,
    }
}

/// Why no Service may claim `addr` on this node, if so.
pub fn refused(addr: IpAddr, node: &NodeContext, config: &Config) -> Option<String> {
    if let Some(class) = refused_class(addr) {
        return Some(format!("is {class}"));
    }
    if node.addresses.iter().any(|(a, _)| *a == addr) {
        return Some("is an address of this node (its Node object); only node ports may use it".into());
    }
    if config.host.interfaces.contains(&addr) {
        return Some("is an address of this node (an interface); only node ports may use it".into());
    }
    if config.host.broadcasts.contains(&addr) {
        return Some("is the broadcast address of one of this node's subnets".into());
    }
    if config.host.api_servers.contains(&addr) {
        return Some("is the API server's address".into());
    }
    None
}

fn service_cidr(config: &Config, family: Family) -> Option<&Cidr> {
    config.service_cidrs.iter().find(|c| c.family() == family)
}

/// Check every address and port the Service claims; the first problem
/// rejects the whole Service.
pub fn check(svc: &ValidService, node: &NodeContext, config: &Config) -> Result<(), String> {
    for (i, ip) in svc.cluster_ips.iter().enumerate() {
        if let Some(why) = refused(*ip, node, config) {
            return Err(format!("clusterIPs[{i}] {ip} {why}"));
        }
        if let Some(range) = service_cidr(config, Family::of(*ip))
            && !range.contains(*ip)
        {
            return Err(format!("clusterIPs[{i}] {ip} is outside the service CIDR {range}"));
        }
    }
    let claimed = svc
        .external_ips
        .iter()
        .map(|(i, ip)| (format!("externalIPs[{i}]"), ip))
        .chain(svc.lb_ips.iter().map(|(i, ip)| (format!("status.loadBalancer.ingress[{i}].ip"), ip)));
    for (field, ip) in claimed {
        if let Some(why) = refused(*ip, node, config) {
            return Err(format!("{field} {ip} {why}"));
        }
        if let Some(range) = service_cidr(config, Family::of(*ip))
            && range.contains(*ip)
        {
            return Err(format!("{field} {ip} is inside the service CIDR {range}, which only ClusterIPs may use"));
        }
        if let Some(allowed) = &config.external_ip_cidrs
            && !allowed.iter().any(|c| c.contains(*ip))
        {
            return Err(format!("{field} {ip} is outside --external-ip-cidrs"));
        }
    }
    let range = config.node_port_range;
    for p in &svc.ports {
        if let Some(np) = p.node_port
            && !range.contains(np)
        {
            return Err(format!("port {:?} nodePort {np} is outside the node port range {range}", p.name));
        }
    }
    if let Some(hc) = svc.health_check_node_port
        && !range.contains(hc)
    {
        return Err(format!("healthCheckNodePort {hc} is outside the node port range {range}"));
    }
    Ok(())
}

/// What the operator should know once about the flags as set.
pub fn startup_warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for family in Family::ALL {
        if service_cidr(config, family).is_none() {
            out.push(format!(
                "no {} service CIDR (--service-cluster-ip-range): {} ClusterIPs are not checked against one",
                family.k8s_name(),
                family.k8s_name()
            ));
        }
    }
    if config.external_ip_cidrs.is_none() {
        out.push(
            "no --external-ip-cidrs: any Service can claim an external or load-balancer IP \
             (except the refused address classes, this node's and the API server's addresses)"
                .into(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_in_kubes_forms() {
        assert_eq!("30000-32767".parse::<PortRange>(), Ok(PortRange::default()));
        assert_eq!("30000+2767".parse::<PortRange>(), Ok(PortRange::default()));
        assert_eq!("8080".parse::<PortRange>(), Ok(PortRange { first: 8080, last: 8080 }));
        for bad in ["", "a-b", "32767-30000", "0-10", "65535+1", "30000-70000"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?}");
        }
        assert!(PortRange::default().contains(30000) && PortRange::default().contains(32767));
        assert!(!PortRange::default().contains(29999) && !PortRange::default().contains(32768));
    }

    #[test]
    fn every_refused_class_on_both_families() {
        let cases = [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("::1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("224.0.0.1", "multicast"),
            ("239.1.2.3", "multicast"),
            ("ff02::1", "multicast"),
            ("ff0e::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::ffff:169.254.169.254", "IPv4-mapped"),
        ];
        for (a, class) in cases {
            let why = refused_class(a.parse().expect("ip")).unwrap_or_else(|| panic!("{a} accepted"));
            assert!(why.contains(class), "{a}: {why}");
        }
        for ok in ["198.19.0.1", "10.96.0.1", "fd00:ffff::1", "2001:db8::1", "64:ff9b::1", "fec0::1"] {
            assert_eq!(refused_class(ok.parse().expect("ip")), None, "{ok}");
        }
    }
}

/// The model with a hostile Service beside a good one.
#[cfg(test)]
mod model_tests {
    use serde_json::{Value, json};

    use super::{
        super::testkit::{Model, config, ep, node, run, service, slice},
        *,
    };

    /// This node: Node object addresses, interface addresses (with one
    /// subnet broadcast address), the API server.
    fn host_config() -> Config {
        let mut c = config();
        c.host.interfaces = ["127.0.0.1", "::1", "198.18.1.1", "fd00:0:0:1::1", "198.18.7.7"]
            .iter()
            .map(|a| a.parse().expect("ip"))
            .collect();
        c.host.broadcasts = vec!["198.18.1.255".parse().expect("ip")];
        c.host.api_servers = vec!["198.18.200.1".parse().expect("ip"), "fd00:200::1".parse().expect("ip")];
        c.node_port_range = PortRange::default();
        c
    }

    fn node_object() -> k8s_openapi::api::core::v1::Node {
        node(Some("zone-a"), &["198.18.250.1", "fd00:0:0:fa::1"])
    }

    /// A good dual-stack Service that must keep working.
    fn good() -> Vec<(k8s_openapi::api::core::v1::Service, k8s_openapi::api::discovery::v1::EndpointSlice)> {
        let svc = service(
            "good/web",
            json!({"clusterIPs": ["198.19.0.10", "fd00:ffff::10"], "ipFamilies": ["IPv4", "IPv6"],
                   "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
        );
        let s = slice(
            "good/web-1",
            "web",
            "IPv4",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
            vec![ep("198.18.2.2", None, None)],
        );
        vec![(svc, s)]
    }

    /// A Service claiming `addr` as a frontend of `kind`, with an endpoint.
    fn hostile(kind: &str, addr: &str) -> k8s_openapi::api::core::v1::Service {
        let v6 = addr.contains(':');
        let (cip, fam) = if v6 { ("fd00:ffff::66", "IPv6") } else { ("198.19.0.66", "IPv4") };
        let ports = json!([{"name": "http", "port": 80, "protocol": "TCP"}]);
        let spec: Value = match kind {
            "ClusterIP" => json!({"spec": {"clusterIPs": [addr], "ipFamilies": [fam], "ports": ports}}),
            "ExternalIP" => {
                json!({"spec": {"clusterIPs": [cip], "ipFamilies": [fam], "externalIPs": [addr], "ports": ports}})
            }
            "LoadBalancer" => {
                json!({"spec": {"type": "LoadBalancer", "clusterIPs": [cip], "ipFamilies": [fam], "ports": ports,
                                               "allocateLoadBalancerNodePorts": false},
                                      "status": {"loadBalancer": {"ingress": [{"ip": addr}]}}})
            }
            other => panic!("{other}"),
        };
        service("evil/meta", spec)
    }

    fn model_with(evil: k8s_openapi::api::core::v1::Service, cfg: &Config) -> Model {
        let (mut svcs, mut slices): (Vec<_>, Vec<_>) = good().into_iter().unzip();
        svcs.push(evil);
        slices.push(slice(
            "evil/meta-1",
            "meta",
            "IPv4",
            json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
            vec![ep("198.18.66.6", None, None)],
        ));
        run(&svcs, &slices, Some(&node_object()), cfg)
    }

    /// A Service claiming `addr` as `kind` is refused for `reason`.
    fn refuses(cfg: &Config, kind: &str, addr: &str, reason: &str) {
        assert_refused(&model_with(hostile(kind, addr), cfg), addr, reason, &format!("{kind} {addr}"));
    }

    fn assert_refused(m: &Model, addr: &str, reason: &str, what: &str) {
        assert_eq!(m.rejected_names(), vec!["Service evil/meta"], "{what}");
        assert!(m.rejected[0].reason.contains(reason), "{what}: {}", m.rejected[0]);
        assert!(m.rejected[0].reason.contains(addr), "{what}: names the address: {}", m.rejected[0]);
        let owners: Vec<&str> = m.desired.frontends.values().map(|s| s.owner.as_str()).collect();
        assert!(
            owners.iter().all(|o| o.starts_with("good/web")),
            "{what}: nothing of evil/meta is programmed: {owners:?}"
        );
        assert_eq!(owners.len(), 2, "{what}: the good Service keeps working on both families");
    }

    /// Issue 14 point 1: every refused address class, both families, every
    /// frontend kind that names an address.
    #[test]
    fn refused_address_classes_are_rejected_for_every_kind_on_both_families() {
        let cases: &[(&str, &str)] = &[
            ("127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("169.254.169.254", "link-local"),
            ("fe80::a9fe:a9fe", "link-local"),
            ("224.0.0.251", "multicast"),
            ("ff02::fb", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("198.18.1.255", "broadcast"),
            ("::ffff:169.254.169.254", "IPv4-mapped"),
            ("198.18.250.1", "Node object"),
            ("fd00:0:0:fa::1", "Node object"),
            ("198.18.1.1", "an interface"),
            ("fd00:0:0:1::1", "an interface"),
            ("198.18.200.1", "API server"),
            ("fd00:200::1", "API server"),
        ];
        let cfg = host_config();
        for kind in ["ClusterIP", "ExternalIP", "LoadBalancer"] {
            for (addr, reason) in cases {
                refuses(&cfg, kind, addr, reason);
            }
        }
    }

    /// The NodePort wildcard is the one unspecified address a Service gets,
    /// and it is not user-given: node ports are refused only outside the
    /// node port range (and so are health-check node ports).
    #[test]
    fn node_ports_and_health_check_ports_outside_the_range_are_rejected() {
        let cfg = host_config();
        let np = |np: u16, hc: u16| {
            service(
                "evil/meta",
                json!({"type": "LoadBalancer", "externalTrafficPolicy": "Local", "healthCheckNodePort": hc,
                       "clusterIPs": ["198.19.0.66", "fd00:ffff::66"], "ipFamilies": ["IPv4", "IPv6"],
                       "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": np}]}),
            )
        };
        let ok = model_with(np(30080, 30081), &cfg);
        assert!(ok.rejected.is_empty(), "{:?}", ok.rejected);
        assert_eq!(
            ok.desired.frontends.keys().filter(|f| f.addr.is_unspecified()).count(),
            4,
            "node ports, both families, two scopes"
        );
        assert_eq!(ok.desired.health_checks.keys().copied().collect::<Vec<_>>(), vec![30081]);
        assert_eq!(ok.desired.health_check_addresses, None, "every address without --nodeport-addresses");
        let mut primary = cfg.clone();
        primary.nodeport_addresses = "primary".parse().expect("flag");
        let m = model_with(np(30080, 30081), &primary);
        assert!(!m.desired.nodeport_addresses.is_empty());
        assert_eq!(
            m.desired.health_check_addresses.as_ref(),
            Some(&m.desired.nodeport_addresses),
            "the selected node addresses, as kube-proxy's health servers"
        );
        assert_refused(
            &model_with(np(22, 30081), &cfg),
            "22",
            "outside the node port range 30000-32767",
            "nodePort 22",
        );
        assert_refused(
            &model_with(np(30080, 10250), &cfg),
            "10250",
            "outside the node port range",
            "healthCheckNodePort 10250",
        );
        let mut wide = cfg.clone();
        wide.node_port_range = "20000-40000".parse().expect("range");
        assert!(
            model_with(np(22, 30081), &wide).rejected.len() == 1
                && model_with(np(20000, 40000), &wide).rejected.is_empty()
        );
    }

    /// Issue 14 point 2: `--service-cluster-ip-range` per family.
    #[test]
    fn cluster_ips_outside_the_service_cidr_of_their_family_are_rejected() {
        let mut cfg = host_config();
        cfg.service_cidrs = vec!["198.19.0.0/16".parse().expect("cidr")];
        assert!(model_with(hostile("ClusterIP", "198.19.5.5"), &cfg).rejected.is_empty());
        refuses(&cfg, "ClusterIP", "198.20.5.5", "outside the service CIDR 198.19.0.0/16");
        assert!(
            model_with(hostile("ClusterIP", "fd00:ffff::55"), &cfg).rejected.is_empty(),
            "no IPv6 CIDR: IPv6 unchecked"
        );
        cfg.service_cidrs.push("fd00:ffff::/112".parse().expect("cidr"));
        refuses(&cfg, "ClusterIP", "fd00:fffe::55", "outside the service CIDR");
        // External and LB IPs may not sit in a service CIDR.
        for kind in ["ExternalIP", "LoadBalancer"] {
            refuses(&cfg, kind, "198.19.0.10", "inside the service CIDR");
            refuses(&cfg, kind, "fd00:ffff::10", "inside the service CIDR");
        }
    }

    /// Issue 14 point 2: `--external-ip-cidrs` is an allow-list for external
    /// and LB IPs, both families; unset, any address not refused otherwise.
    #[test]
    fn external_and_lb_ips_outside_the_allow_list_are_rejected() {
        let mut cfg = host_config();
        for kind in ["ExternalIP", "LoadBalancer"] {
            assert!(model_with(hostile(kind, "203.0.113.9"), &cfg).rejected.is_empty(), "{kind}: unset accepts");
        }
        cfg.external_ip_cidrs =
            Some(vec!["203.0.113.0/24".parse().expect("cidr"), "2001:db8:1::/48".parse().expect("cidr")]);
        for kind in ["ExternalIP", "LoadBalancer"] {
            assert!(model_with(hostile(kind, "203.0.113.9"), &cfg).rejected.is_empty(), "{kind}");
            assert!(model_with(hostile(kind, "2001:db8:1::9"), &cfg).rejected.is_empty(), "{kind}");
            refuses(&cfg, kind, "198.51.100.9", "outside --external-ip-cidrs");
            refuses(&cfg, kind, "2001:db8:2::9", "outside --external-ip-cidrs");
            refuses(&cfg, kind, "169.254.169.254", "link-local");
        }
        cfg.external_ip_cidrs = Some(vec!["0.0.0.0/0".parse().expect("cidr")]);
        refuses(&cfg, "ExternalIP", "127.0.0.1", "loopback");
    }

    #[test]
    fn unset_flags_are_named_once_at_start() {
        let w = startup_warnings(&Config::default());
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("IPv4") && w[1].contains("IPv6") && w[2].contains("--external-ip-cidrs"));
        let set = Config {
            service_cidrs: vec!["10.96.0.0/12".parse().expect("cidr"), "fd00:96::/108".parse().expect("cidr")],
            external_ip_cidrs: Some(vec![]),
            ..Config::default()
        };
        assert!(startup_warnings(&set).is_empty());
    }
}
