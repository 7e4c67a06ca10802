//! The test topology: a node namespace routing between pod namespaces over
//! veth pairs, optionally a second node with its own pods, and an uplink
//! carrying the node's default route, as on a real node. Nothing gets a
//! route out: the uplink ends in an upstream namespace that forwards
//! nothing, and pods route only 198.18.0.0/15 and fd00::/8 via their node.
//!
//! Addressing (all inside 198.18.0.0/15 and fd00::/8):
//! - pod link `k`: pod 198.18.k.2/24 and fd00:0:0:k::2/64, node side .1 / ::1;
//! - service VIPs: 198.19.0.0/16 and fd00:ffff::/64 (see `vip4`/`vip6`);
//! - node-to-node link: 198.18.250.0/24 and fd00:0:0:fa::/64;
//! - uplink: 198.18.251.0/24 and fd00:0:0:fb::/64 (node .2, upstream .1);
//!   the upstream namespace is the external client beyond the node (it
//!   routes only the service ranges to the node, `route_services_upstream`).
//!
//! A `Profile` dresses the nodes as real nodes are dressed (kube-proxy's
//! INVALID-drop rule in one of three firewalls, strict reverse-path
//! filtering, a CNI's masquerade towards the other node).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::netns::NetNs;

/// The node's and the upstream's addresses on the uplink.
pub const UPLINK_NODE4: &str = "198.18.251.2";
pub const UPLINK_NODE6: &str = "fd00:0:0:fb::2";
pub const UPSTREAM4: &str = "198.18.251.1";
pub const UPSTREAM6: &str = "fd00:0:0:fb::1";
/// The node's and the remote node's addresses on the node-to-node link.
pub const LINK_NODE4: &str = "198.18.250.1";
pub const LINK_NODE6: &str = "fd00:0:0:fa::1";

/// Pod-facing interfaces the agent attaches to on every node.
pub const ATTACH_GLOB: &str = "dsp*";
/// Node devices (node-to-node link, uplink) the agent attaches to.
pub const DEVICES_GLOB: &str = "dsn*,dsx*";

/// What a node carries besides its routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Nothing.
    Clean,
    /// kube-proxy's `-m conntrack --ctstate INVALID -j DROP` in FORWARD (its
    /// KUBE-FORWARD chain), both families, in this firewall.
    KubeProxyRules(Firewall),
    /// `rp_filter=1` on every interface, and firewalld's IPv6 equivalent
    /// (`ip6tables -t raw -A PREROUTING -m rpfilter --invert -j DROP`).
    StrictRpFilter,
    /// A CNI-style `MASQUERADE` of traffic leaving towards the other node.
    Masquerade,
}

/// Which firewall holds the rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firewall {
    IptablesLegacy,
    IptablesNft,
    Nftables,
}

impl Profile {
    /// Every profile, for tests that must hold on all of them.
    pub const ALL: [Profile; 6] = [
        Profile::Clean,
        Profile::KubeProxyRules(Firewall::IptablesLegacy),
        Profile::KubeProxyRules(Firewall::IptablesNft),
        Profile::KubeProxyRules(Firewall::Nftables),
        Profile::StrictRpFilter,
        Profile::Masquerade,
    ];

    /// The two every datapath test runs on at least.
    pub const BASIC: [Profile; 2] = [Profile::Clean, Profile::KubeProxyRules(Firewall::Nftables)];

    /// Apply to a node namespace whose link to the other node is `peer_if`.
    pub fn apply(self, ns: &NetNs, peer_if: &str) {
        match self {
            Profile::Clean => {}
            Profile::KubeProxyRules(fw) => invalid_drop(ns, fw),
            Profile::StrictRpFilter => {
                ns.sysctl("net.ipv4.conf.all.rp_filter", "1");
                ns.sysctl("net.ipv4.conf.default.rp_filter", "1");
                ns.exec(&[
                    "ip6tables-legacy",
                    "-t",
                    "raw",
                    "-A",
                    "PREROUTING",
                    "-m",
                    "rpfilter",
                    "--invert",
                    "-j",
                    "DROP",
                ]);
            }
            Profile::Masquerade => {
                for cmd in ["iptables-legacy", "ip6tables-legacy"] {
                    ns.exec(&[cmd, "-t", "nat", "-A", "POSTROUTING", "-o", peer_if, "-j", "MASQUERADE"]);
                }
            }
        }
    }
}

/// kube-proxy's INVALID drop, both families.
fn invalid_drop(ns: &NetNs, fw: Firewall) {
    match fw {
        Firewall::IptablesLegacy | Firewall::IptablesNft => {
            let suffix = if fw == Firewall::IptablesLegacy { "legacy" } else { "nft" };
            for cmd in [format!("iptables-{suffix}"), format!("ip6tables-{suffix}")] {
                ns.exec(&[&cmd, "-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]);
            }
        }
        Firewall::Nftables => {
            ns.exec(&["nft", "add", "table", "inet", "kube-proxy"]);
            ns.exec(&["nft", "add chain inet kube-proxy forward { type filter hook forward priority 0 ; }"]);
            ns.exec(&["nft", "add", "rule", "inet", "kube-proxy", "forward", "ct", "state", "invalid", "drop"]);
        }
    }
}

pub fn vip4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, 0, n)
}

pub fn vip6(n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 0, n)
}

/// A pod: its namespace and addresses.
pub struct Pod {
    pub ns: NetNs,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Pod {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { IpAddr::V6(self.v6) } else { IpAddr::V4(self.v4) }
    }
}

/// Nodes and pods. Field order is drop order: pods go before nodes.
pub struct Topology {
    pub pods: Vec<Pod>,
    pub remote: Option<NetNs>,
    pub upstream: NetNs,
    pub node: NetNs,
    pub profile: Profile,
    links: u8,
}

fn router(ns: &NetNs) {
    ns.sysctl("net.ipv4.ip_forward", "1");
    ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    // Replies leave the backend's link with the VIP as source: strict
    // reverse-path filtering would drop them.
    ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
    ns.sysctl("net.ipv4.conf.default.rp_filter", "0");
    // Answer every packet to an unroutable address with an ICMP error at
    // once: tests time how fast a removed VIP stops working, and the
    // default one-per-second limit would hide that.
    ns.sysctl("net.ipv4.icmp_ratelimit", "0");
    ns.sysctl("net.ipv6.icmp.ratelimit", "0");
    // The service ranges lead nowhere, as in a cluster. `prohibit` answers
    // with ICMP administratively prohibited, a hard error for the client:
    // a VIP without a frontend fails fast instead of timing out.
    ns.ip(&["route", "add", "prohibit", "198.19.0.0/16"]);
    ns.ip(&["-6", "route", "add", "prohibit", "fd00:ffff::/64"]);
}

impl Topology {
    pub fn new() -> Self {
        Self::with_profile(Profile::Clean)
    }

    pub fn with_profile(profile: Profile) -> Self {
        let node = NetNs::new("node");
        router(&node);
        let upstream = NetNs::new("up");
        node.ip(&["link", "add", "dsx0", "type", "veth", "peer", "name", "up0", "netns", &upstream.name]);
        node.ip(&["addr", "add", &format!("{UPLINK_NODE4}/24"), "dev", "dsx0"]);
        node.ip(&["-6", "addr", "add", &format!("{UPLINK_NODE6}/64"), "dev", "dsx0", "nodad"]);
        node.ip(&["link", "set", "dsx0", "up"]);
        upstream.ip(&["addr", "add", &format!("{UPSTREAM4}/24"), "dev", "up0"]);
        upstream.ip(&["-6", "addr", "add", &format!("{UPSTREAM6}/64"), "dev", "up0", "nodad"]);
        upstream.ip(&["link", "set", "up0", "up"]);
        // The default route, as on a real node; upstream forwards nothing.
        node.ip(&["route", "add", "default", "via", "198.18.251.1"]);
        node.ip(&["-6", "route", "add", "default", "via", "fd00:0:0:fb::1"]);
        profile.apply(&node, "dsn-n2");
        Self { pods: Vec::new(), remote: None, upstream, node, profile, links: 0 }
    }

    /// Add a pod on the node (or on the remote node, created on first
    /// use); returns its index in `pods`.
    pub fn add_pod(&mut self, role: &str, remote: bool) -> usize {
        self.links += 1;
        let k = self.links;
        assert!(k < 250, "too many pods");
        if remote && self.remote.is_none() {
            self.add_remote_node();
        }
        let host = if remote { self.remote.as_ref().expect("remote node") } else { &self.node };
        let pod = NetNs::new(role);
        let host_if = format!("dsp{k}");
        host.ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name]);
        let (v4, v6) = (Ipv4Addr::new(198, 18, k, 2), Ipv6Addr::new(0xfd00, 0, 0, u16::from(k), 0, 0, 0, 2));
        host.ip(&["addr", "add", &format!("198.18.{k}.1/24"), "dev", &host_if]);
        host.ip(&["-6", "addr", "add", &format!("fd00:0:0:{k:x}::1/64"), "dev", &host_if, "nodad"]);
        host.ip(&["link", "set", &host_if, "up"]);
        pod.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
        pod.ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "198.18.0.0/15", "via", &format!("198.18.{k}.1")]);
        pod.ip(&["-6", "route", "add", "fd00::/8", "via", &format!("fd00:0:0:{k:x}::1")]);
        if remote {
            // The local node reaches this pod through the remote node.
            self.node.ip(&["route", "add", &format!("198.18.{k}.0/24"), "via", "198.18.250.2"]);
            self.node.ip(&["-6", "route", "add", &format!("fd00:0:0:{k:x}::/64"), "via", "fd00:0:0:fa::2"]);
        }
        self.pods.push(Pod { ns: pod, v4, v6 });
        self.pods.len() - 1
    }

    /// The upstream namespace sends the service ranges (external and
    /// load-balancer IPs live there) to the node, as a router in front of
    /// a cluster does; nothing else.
    pub fn route_services_upstream(&self) {
        self.upstream.ip(&["route", "add", "198.19.0.0/16", "via", UPLINK_NODE4]);
        self.upstream.ip(&["-6", "route", "add", "fd00:ffff::/64", "via", UPLINK_NODE6]);
    }

    fn add_remote_node(&mut self) {
        let remote = NetNs::new("node2");
        router(&remote);
        self.node.ip(&["link", "add", "dsn-n2", "type", "veth", "peer", "name", "dsn-n1", "netns", &remote.name]);
        self.node.ip(&["addr", "add", "198.18.250.1/24", "dev", "dsn-n2"]);
        self.node.ip(&["-6", "addr", "add", "fd00:0:0:fa::1/64", "dev", "dsn-n2", "nodad"]);
        self.node.ip(&["link", "set", "dsn-n2", "up"]);
        remote.ip(&["addr", "add", "198.18.250.2/24", "dev", "dsn-n1"]);
        remote.ip(&["-6", "addr", "add", "fd00:0:0:fa::2/64", "dev", "dsn-n1", "nodad"]);
        remote.ip(&["link", "set", "dsn-n1", "up"]);
        // The remote node sends everything else in the test ranges back to us.
        remote.ip(&["route", "add", "198.18.0.0/15", "via", "198.18.250.1"]);
        remote.ip(&["-6", "route", "add", "fd00::/8", "via", "fd00:0:0:fa::1"]);
        // kube-proxy runs on every node; the CNI's masquerade too.
        if let Profile::KubeProxyRules(_) | Profile::Masquerade = self.profile {
            self.profile.apply(&remote, "dsn-n1");
        }
        self.remote = Some(remote);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
