//! This node's context: its name, zone and addresses (from its Node object),
//! what the host itself has (interface addresses, the API server's
//! address), and the node addresses NodePorts answer on.
use std::{net::IpAddr, str::FromStr};

use k8s_openapi::api::core::v1::Node;

use super::Config;
use crate::types::{Cidr, Family};

/// The Node label kube-proxy reads the zone from.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";

/// Facts about the host the agent runs on, gathered by the agent (the
/// model does no I/O).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddresses {
    /// Every address of every interface.
    pub interfaces: Vec<IpAddr>,
    /// The broadcast address of every IPv4 interface subnet.
    pub broadcasts: Vec<IpAddr>,
    /// The API server address(es) the agent talks to.
    pub api_servers: Vec<IpAddr>,
}

/// `--nodeport-addresses`: which node addresses NodePorts answer on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every node address (kube-proxy's iptables default).
    #[default]
    All,
    /// The node's primary address of each family: its first InternalIP
    /// (else ExternalIP) of that family (kube-proxy's `primary`).
    Primary,
    /// Node addresses inside these CIDRs; a family without a CIDR in the
    /// list keeps all its addresses (kube-proxy's `NewNodePortAddresses`).
    Cidrs(Vec<Cidr>),
}

impl FromStr for NodePortAddresses {
    type Err = String;

    /// `primary`, or CIDRs separated by commas.
    fn from_str(s: &str) -> Result<Self, String> {
        let items: Vec<&str> = s.split(',').map(str::trim).filter(|i| !i.is_empty()).collect();
        if items.contains(&"primary") {
            return if items.len() == 1 {
                Ok(Self::Primary)
            } else {
                Err("`primary` must be the only --nodeport-addresses entry".into())
            };
        }
        if items.is_empty() {
            return Ok(Self::All);
        }
        let cidrs =
            items
                .iter()
                .map(|i| {
                    if i.contains('/') {
                        i.parse::<Cidr>()
                    } else {
                        Err(format!("{i:?} is not a CIDR (ADDRESS/LENGTH)"))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
        Ok(Self::Cidrs(cidrs))
    }
}

/// CIDRs separated by commas, at most one per family
/// (`--service-cluster-ip-range`).
pub fn parse_service_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    let cidrs = parse_cidrs(s)?;
    for f in Family::ALL {
        if cidrs.iter().filter(|c| c.family() == f).count() > 1 {
            return Err(format!("more than one {} service CIDR in {s:?} (one per family)", f.k8s_name()));
        }
    }
    Ok(cidrs)
}

/// CIDRs separated by commas.
pub fn parse_cidrs(s: &str) -> Result<Vec<Cidr>, String> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty()).map(str::parse).collect()
}

/// The kind of a Node address (`status.addresses[].type`) the model uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressType {
    Internal,
    External,
}

/// This node as the model sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name: endpoints with this `nodeName` are local.
    pub name: Option<String>,
    /// `topology.kubernetes.io/zone` of the Node object.
    pub zone: Option<String>,
    /// InternalIP and ExternalIP addresses of the Node object, in order.
    pub addresses: Vec<(IpAddr, AddressType)>,
    /// Whether the Node object is known at all.
    pub known: bool,
}

impl NodeContext {
    /// From the Node object (if any) and the configured node name.
    pub fn new(node: Option<&Node>, config: &Config) -> Self {
        let mut ctx = Self { name: config.node_name.clone(), ..Self::default() };
        let Some(node) = node else { return ctx };
        ctx.known = true;
        ctx.zone = node.metadata.labels.as_ref().and_then(|l| l.get(LABEL_ZONE)).filter(|z| !z.is_empty()).cloned();
        for a in node.status.as_ref().and_then(|s| s.addresses.as_ref()).into_iter().flatten() {
            let kind = match a.type_.as_str() {
                "InternalIP" => AddressType::Internal,
                "ExternalIP" => AddressType::External,
                _ => continue, // Hostname, InternalDNS, ExternalDNS
            };
            if let Ok(ip) = a.address.trim().parse::<IpAddr>()
                && !ctx.addresses.iter().any(|(x, _)| *x == ip)
            {
                ctx.addresses.push((ip, kind));
            }
        }
        ctx
    }

    /// kube-proxy's node IPs (`GetNodeHostIPs`): per family, the first
    /// InternalIP, else the first ExternalIP.
    fn primary(&self) -> Vec<IpAddr> {
        let mut out = Vec::new();
        for f in Family::ALL {
            let of = |kind| self.addresses.iter().find(|(a, k)| Family::of(*a) == f && *k == kind).map(|(a, _)| *a);
            out.extend(of(AddressType::Internal).or_else(|| of(AddressType::External)));
        }
        out
    }

    /// The addresses NodePort frontends answer on: the Node object's
    /// addresses (none while no Node object is known), narrowed by
    /// `--nodeport-addresses`; never loopback or link-local.
    pub fn nodeport_addresses(&self, config: &Config) -> Vec<IpAddr> {
        let base: Vec<IpAddr> = self.addresses.iter().map(|(a, _)| *a).collect();
        let mut out: Vec<IpAddr> = match &config.nodeport_addresses {
            NodePortAddresses::All => base,
            NodePortAddresses::Primary => self.primary(),
            NodePortAddresses::Cidrs(cidrs) => base
                .into_iter()
                .filter(|a| {
                    let mine: Vec<&Cidr> = cidrs.iter().filter(|c| c.family() == Family::of(*a)).collect();
                    mine.is_empty() || mine.iter().any(|c| c.contains(*a))
                })
                .collect(),
        };
        out.retain(|a| super::policy::refused_class(*a).is_none());
        out.sort_unstable();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node() -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "node-a", "labels": {LABEL_ZONE: "zone-a"}},
            "status": {"addresses": [
                {"type": "Hostname", "address": "node-a"},
                {"type": "ExternalIP", "address": "203.0.113.7"},
                {"type": "InternalIP", "address": "198.18.250.1"},
                {"type": "InternalIP", "address": "198.18.251.1"},
                {"type": "InternalIP", "address": "fd00:0:0:fa::1"},
            ]}
        }))
        .expect("node")
    }

    fn cfg(np: &str) -> Config {
        Config { node_name: Some("node-a".into()), nodeport_addresses: np.parse().expect("flag"), ..Config::default() }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = list.iter().map(|a| a.parse().expect("ip")).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn the_node_object_gives_zone_and_addresses() {
        let c = cfg("");
        let ctx = NodeContext::new(Some(&node()), &c);
        assert_eq!(ctx.zone.as_deref(), Some("zone-a"));
        assert_eq!(ctx.name.as_deref(), Some("node-a"));
        assert_eq!(
            ctx.nodeport_addresses(&c),
            ips(&["203.0.113.7", "198.18.250.1", "198.18.251.1", "fd00:0:0:fa::1"]),
            "default: every node address"
        );
    }

    /// kube-proxy `primary` (cmd/kube-proxy/app/server.go): the node IP of
    /// each family, InternalIP first.
    #[test]
    fn nodeport_addresses_primary_is_the_first_internal_ip_of_each_family() {
        let c = cfg("primary");
        let ctx = NodeContext::new(Some(&node()), &c);
        assert_eq!(ctx.nodeport_addresses(&c), ips(&["198.18.250.1", "fd00:0:0:fa::1"]));
    }

    /// kube-proxy `NewNodePortAddresses`: CIDRs narrow their own family; a
    /// family without any CIDR keeps all its addresses.
    #[test]
    fn nodeport_address_cidrs_narrow_only_their_family() {
        let c = cfg("198.18.251.0/24");
        let ctx = NodeContext::new(Some(&node()), &c);
        assert_eq!(ctx.nodeport_addresses(&c), ips(&["198.18.251.1", "fd00:0:0:fa::1"]));
        let c = cfg("198.18.251.0/24, fd00:0:0:fb::/64");
        assert_eq!(ctx.nodeport_addresses(&c), ips(&["198.18.251.1"]));
        let c = cfg("0.0.0.0/0");
        assert_eq!(ctx.nodeport_addresses(&c).len(), 4);
    }

    #[test]
    fn node_ports_answer_only_on_node_object_addresses_never_loopback_or_link_local() {
        let mut c = cfg("");
        c.host.interfaces = ips(&["198.18.1.1", "fd00:0:0:1::1"]);
        let ctx = NodeContext::new(None, &c);
        assert!(!ctx.known);
        assert!(ctx.nodeport_addresses(&c).is_empty(), "no Node object: no node address, whatever the interfaces");
        let odd: Node = serde_json::from_value(json!({
            "metadata": {"name": "node-a"},
            "status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "InternalIP", "address": "fe80::1"},
                                     {"type": "InternalIP", "address": "198.18.250.1"}]}
        }))
        .expect("node");
        assert_eq!(NodeContext::new(Some(&odd), &c).nodeport_addresses(&c), ips(&["198.18.250.1"]));
    }

    #[test]
    fn flags_parse() {
        assert_eq!("primary".parse::<NodePortAddresses>(), Ok(NodePortAddresses::Primary));
        assert!("primary,10.0.0.0/8".parse::<NodePortAddresses>().is_err());
        assert!("10.0.0.1".parse::<NodePortAddresses>().is_err(), "a CIDR needs a length");
        assert_eq!(parse_service_cidrs("10.96.0.0/12, fd00:96::/108").map(|v| v.len()), Ok(2));
        assert!(parse_service_cidrs("10.96.0.0/12,10.100.0.0/16").is_err());
        assert!(parse_cidrs("10.0.0.0/8,bogus").is_err());
    }
}
