//! The test topology: a node namespace routing between pod namespaces over
//! veth pairs, optionally a second node with its own pods. Nothing gets a
//! route out: pods route only 198.18.0.0/15 and fd00::/8 via their node.
//!
//! Addressing (all inside 198.18.0.0/15 and fd00::/8):
//! - pod link `k`: pod 198.18.k.2/24 and fd00:0:0:k::2/64, node side .1 / ::1;
//! - service VIPs: 198.19.0.0/16 and fd00:ffff::/64 (see `vip4`/`vip6`);
//! - node-to-node link: 198.18.250.0/24 and fd00:0:0:fa::/64.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::netns::NetNs;

/// Interfaces the agent attaches to on every node.
pub const ATTACH_GLOB: &str = "dsp*";

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
    pub node: NetNs,
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
        let node = NetNs::new("node");
        router(&node);
        Self { pods: Vec::new(), remote: None, node, links: 0 }
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

    fn add_remote_node(&mut self) {
        let remote = NetNs::new("node2");
        router(&remote);
        self.node.ip(&["link", "add", "dsp-n2", "type", "veth", "peer", "name", "dsp-n1", "netns", &remote.name]);
        self.node.ip(&["addr", "add", "198.18.250.1/24", "dev", "dsp-n2"]);
        self.node.ip(&["-6", "addr", "add", "fd00:0:0:fa::1/64", "dev", "dsp-n2", "nodad"]);
        self.node.ip(&["link", "set", "dsp-n2", "up"]);
        remote.ip(&["addr", "add", "198.18.250.2/24", "dev", "dsp-n1"]);
        remote.ip(&["-6", "addr", "add", "fd00:0:0:fa::2/64", "dev", "dsp-n1", "nodad"]);
        remote.ip(&["link", "set", "dsp-n1", "up"]);
        // The remote node sends everything else in the test ranges back to us.
        remote.ip(&["route", "add", "198.18.0.0/15", "via", "198.18.250.1"]);
        remote.ip(&["-6", "route", "add", "fd00::/8", "via", "fd00:0:0:fa::1"]);
        self.remote = Some(remote);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
