//! The Services the fuzzer programs, shared by the datapath (through the
//! agent's own sync), the model and the frame generator: per family,
//! frontends with two backends, one backend on the frontend's own port,
//! none (refuse), none with a Local policy (drop), a backend that is also a
//! client (hairpin), ClientIP affinity, and a NodePort answered on the node
//! address. (External clients of these Cluster-policy frontends are
//! dropped unless hairpinned: their masquerade needs a route out of one of
//! our interfaces, and BPF_PROG_TEST_RUN runs where none is ours.)
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use dsproxy::{
    frames::{TCP, UDP},
    types::{Backend, Desired, Frontend, FrontendSpec, Proto, Settings, WhenEmpty},
};
use proxy_common::DatapathConfig;

use super::model::Ep;

/// One frontend.
#[derive(Clone, Debug)]
pub struct Fe {
    /// The unspecified address for a NodePort.
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub backends: Vec<Ep>,
    pub drop_when_empty: bool,
    pub affinity: bool,
}

/// Addresses of one family.
#[derive(Clone, Debug)]
pub struct Hosts {
    pub vips: Vec<IpAddr>,
    /// Clients on this node; the last one is also a backend (hairpin).
    pub clients: Vec<IpAddr>,
    /// A client outside the node (its frames come in through a node
    /// device).
    pub external: IpAddr,
    pub node: IpAddr,
    /// Sends ICMP errors (a router on the way).
    pub router: IpAddr,
    pub backends: Vec<IpAddr>,
}

#[derive(Clone, Debug)]
pub struct Scene {
    pub frontends: Vec<Fe>,
    pub v4: Hosts,
    pub v6: Hosts,
}

fn a(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn hosts(v6: bool) -> Hosts {
    let p = |n4: &str, n6: &str| if v6 { a(n6) } else { a(n4) };
    Hosts {
        vips: vec![p("198.19.0.10", "fd00:ffff::10"), p("198.19.0.11", "fd00:ffff::11")],
        clients: vec![p("198.18.1.2", "fd00:0:0:1::2"), p("198.18.2.9", "fd00:0:0:2::9")],
        external: p("198.18.100.2", "fd00:0:0:64::2"),
        node: p("198.18.0.1", "fd00::1"),
        router: p("198.18.250.2", "fd00:0:0:fa::2"),
        backends: (1..=8).map(|i| p(&format!("198.18.2.{i}"), &format!("fd00:0:0:2::{i}"))).collect(),
    }
}

impl Scene {
    pub fn new() -> Self {
        let mut frontends = Vec::new();
        for h in [hosts(false), hosts(true)] {
            let b = |i: usize, port: u16| (h.backends[i - 1], port);
            let hairpin = *h.clients.last().expect("clients");
            let unspecified =
                if h.node.is_ipv6() { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
            let (vip, vip2) = (h.vips[0], h.vips[1]);
            for proto in [TCP, UDP] {
                let fe = |addr, port, backends: Vec<Ep>| Fe {
                    addr,
                    port,
                    proto,
                    backends,
                    drop_when_empty: false,
                    affinity: false,
                };
                frontends.push(fe(vip, 80, vec![b(1, 8080), b(2, 8080)]));
                frontends.push(fe(vip, 81, vec![b(3, 81)]));
                frontends.push(fe(vip, 82, vec![]));
                frontends.push(Fe { drop_when_empty: true, ..fe(vip, 83, vec![]) });
                frontends.push(fe(vip2, 53, vec![b(4, 5353), (hairpin, 5353), b(5, 5353)]));
                frontends.push(Fe { affinity: true, ..fe(vip2, 443, vec![b(6, 8443), b(7, 8443), (hairpin, 8443)]) });
                // Shares backend 1 with port 80: masquerade ports collide.
                frontends.push(fe(unspecified, 30080, vec![b(1, 8080), b(3, 8080)]));
            }
        }
        Self { frontends, v4: hosts(false), v6: hosts(true) }
    }

    pub fn hosts(&self, v6: bool) -> &Hosts {
        if v6 { &self.v6 } else { &self.v4 }
    }

    pub fn node_addr(&self, v6: bool) -> IpAddr {
        self.hosts(v6).node
    }

    /// The scene after an EndpointSlice change: every frontend without
    /// affinity swaps one backend for a new one and drops another (the
    /// one-backend frontend moves to a new backend on the same port), so
    /// flows lose their backends while others stay.
    #[must_use]
    pub fn churned(&self) -> Scene {
        let mut s = self.clone();
        for f in s.frontends.iter_mut().filter(|f| !f.affinity && !f.backends.is_empty()) {
            let extra = self.hosts(f.addr.is_ipv6()).backends[7];
            let port = f.backends[0].1;
            f.backends.remove(0);
            f.backends.push((extra, port));
        }
        s
    }

    /// Does a frontend of `proto` still use backend `b`? (A backend no
    /// frontend uses is deleted: UDP flows on it move.)
    pub fn has_backend(&self, b: Ep, proto: u8) -> bool {
        self.frontends.iter().any(|f| f.proto == proto && f.backends.contains(&b))
    }

    /// The frontend a packet to `daddr:dport` is for: the address itself,
    /// else a NodePort when `daddr` is the node's.
    pub fn lookup(&self, daddr: IpAddr, dport: u16, proto: u8) -> Option<usize> {
        let find =
            |addr: IpAddr| self.frontends.iter().position(|f| f.addr == addr && f.port == dport && f.proto == proto);
        find(daddr).or_else(|| {
            let node = self.node_addr(daddr.is_ipv6());
            if daddr != node {
                return None;
            }
            find(if daddr.is_ipv6() { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) })
        })
    }

    /// What the agent would program for it.
    pub fn desired(&self) -> Desired {
        let mut d = Desired::default();
        for f in &self.frontends {
            let proto = if f.proto == TCP { Proto::Tcp } else { Proto::Udp };
            let mut backends: Vec<_> = f.backends.iter().map(|&(addr, port)| Backend { addr, port, proto }).collect();
            backends.sort();
            let mut spec = FrontendSpec::new(format!("fuzz/fe-{}-{}", f.port, f.proto), backends);
            spec.settings = Settings {
                affinity_timeout: f.affinity.then_some(10_800),
                when_empty: if f.drop_when_empty { WhenEmpty::Drop } else { WhenEmpty::Reject },
                ..Settings::default()
            };
            d.frontends.insert(Frontend::new(f.addr, f.port, proto), spec);
        }
        d.nodeport_addresses = vec![self.v4.node, self.v6.node];
        d
    }

    /// Timeouts far beyond a run (the model keeps no clock).
    pub fn config(&self) -> DatapathConfig {
        const HOUR: u64 = 3_600_000_000_000;
        DatapathConfig {
            tcp_syn_ns: HOUR,
            tcp_established_ns: HOUR,
            tcp_close_ns: HOUR,
            udp_ns: HOUR,
            ..DatapathConfig::DEFAULT
        }
    }
}

impl Default for Scene {
    fn default() -> Self {
        Self::new()
    }
}
