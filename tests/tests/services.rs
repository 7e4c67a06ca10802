//! The Service API beyond ClusterIP, end to end: the agent on a node with a
//! Node object, backends on this node and behind a second one, pods on
//! this node and an external client beyond the uplink (the upstream
//! namespace). NodePorts, external IPs and load-balancer IPs on both
//! families, TCP and UDP; externalTrafficPolicy Cluster (masquerade) and
//! Local (client address kept, drop without local endpoints, pods
//! short-circuited to the cluster); internalTrafficPolicy Local; source
//! ranges; ClientIP session affinity; topology hints.
//!
//! Needs root and BPF; fails loudly without them.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use dsproxy_tests::{
    Cluster,
    echo::{Reply, request_from},
    http::get,
    manifests::{self, Port, READY, documents, endpoint, node, slice_of},
    netns::NetNs,
    probe::{PORT, TARGET},
    topo::{LINK_NODE4, LINK_NODE6, Profile, UPLINK_NODE4, UPLINK_NODE6, UPSTREAM4, UPSTREAM6, vip4, vip6},
};
use proxy_common::Stat;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");
/// This node and the other one, by their Node names.
const HERE: &str = "node-a";
const THERE: &str = "node-b";
/// How long a dropped connection attempt is given: drops are expected,
/// and must not make the tests slow.
const DROPPED: Duration = Duration::from_millis(300);
const ANSWERED: Duration = Duration::from_secs(2);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// The family's address of a pair.
fn pick(v6: bool, four: &str, six: &str) -> IpAddr {
    ip(if v6 { six } else { four })
}

/// The node (its Node object says where node ports answer, and its zone),
/// a client pod on it, and backends: `(name, behind the other node)`.
struct World {
    c: Cluster,
    client: usize,
    /// Backend pod indices, with whether each is behind the other node.
    be: Vec<(usize, bool)>,
}

impl World {
    fn new(profile: Profile, backends: &[(&str, bool)]) -> Self {
        eprintln!("node profile {profile:?}");
        let mut c = Cluster::with_profile(Path::new(BIN), profile);
        c.topo.route_services_upstream();
        let client = c.client();
        let be = backends.iter().map(|(name, remote)| (c.backend(name, TARGET, *remote), *remote)).collect();
        Self { c, client, be }
    }

    /// Write the manifests (with this node's Node object) and start the
    /// agent as node `HERE`.
    fn start(&mut self, objs: &[Value]) {
        self.c.write("objects.yaml", &Self::text(objs));
        self.c.start_agent_with(&["--node-name", HERE]);
    }

    fn text(objs: &[Value]) -> String {
        let mut all = vec![node(HERE, Some("zone-a"), &[ip(UPLINK_NODE4), ip(UPLINK_NODE6)])];
        all.extend_from_slice(objs);
        documents(&all)
    }

    /// Replace the manifests and wait for the agent to sync them.
    fn change(&self, objs: &[Value]) {
        let text = Self::text(objs);
        self.c.change_and_sync(|| self.c.write("objects.yaml", &text));
    }

    /// Slices of Service `name` over backends `eps`: `(backend index in
    /// `be`, node name)`; `fill` may add fields to each endpoint.
    fn slices(&self, name: &str, eps: &[(usize, &str)], fill: impl Fn(usize, &mut Value)) -> Vec<Value> {
        [false, true]
            .iter()
            .map(|&v6| {
                let list: Vec<Value> = eps
                    .iter()
                    .map(|&(b, node)| {
                        let mut e = endpoint(self.c.addr(self.be[b].0, v6), READY);
                        e["nodeName"] = json!(node);
                        fill(b, &mut e);
                        e
                    })
                    .collect();
                let fam = if v6 { "IPv6" } else { "IPv4" };
                slice_of(&format!("{name}-{fam}"), name, fam, &[("tcp", TARGET, "TCP"), ("udp", TARGET, "UDP")], &list)
            })
            .collect()
    }

    /// The backend's name.
    fn name(&self, b: usize) -> String {
        self.c.servers[2 * b].name.clone()
    }

    /// The address this node sends from towards backend `b` (what a
    /// masquerade must put in the source).
    fn node_side(&self, b: usize, v6: bool) -> IpAddr {
        let (pod, remote) = self.be[b];
        if remote {
            return pick(v6, LINK_NODE4, LINK_NODE6);
        }
        match self.c.addr(pod, v6) {
            IpAddr::V4(a) => IpAddr::from([a.octets()[0], a.octets()[1], a.octets()[2], 1]),
            IpAddr::V6(a) => {
                let mut s = a.segments();
                s[7] = 1;
                IpAddr::from(s)
            }
        }
    }

    /// Requests to `target` from the external client, from address `from`.
    fn requests_from_outside(
        &self,
        from: IpAddr,
        target: SocketAddr,
        udp: bool,
        n: usize,
    ) -> Vec<std::io::Result<Reply>> {
        let timeout = ANSWERED;
        self.c.topo.upstream.run(move || (0..n).map(|_| request_from(from, target, udp, timeout)).collect())
    }

    /// Requests to `target` from the client pod.
    fn requests_from_pod(&self, target: SocketAddr, udp: bool, n: usize) -> Vec<std::io::Result<Reply>> {
        let from = self.c.addr(self.client, target.is_ipv6());
        self.c.in_pod(self.client, move || (0..n).map(|_| request_from(from, target, udp, ANSWERED)).collect())
    }
}

fn upstream(v6: bool) -> IpAddr {
    pick(v6, UPSTREAM4, UPSTREAM6)
}

/// Every request was answered; the replies.
fn answered(what: &str, results: Vec<std::io::Result<Reply>>) -> Vec<Reply> {
    results.into_iter().enumerate().map(|(i, r)| r.unwrap_or_else(|e| panic!("{what}: request {i}: {e}"))).collect()
}

/// Every request was refused (TCP RST, ICMP port unreachable), not
/// dropped.
fn refused(what: &str, ns: &NetNs, from: IpAddr, target: SocketAddr) {
    failed(what, ns, (from, target), ANSWERED, ("refused", |k| k == ErrorKind::ConnectionRefused));
}

/// Every request went unanswered: dropped, not refused.
fn dropped(what: &str, ns: &NetNs, from: IpAddr, target: SocketAddr) {
    failed(
        what,
        ns,
        (from, target),
        DROPPED,
        ("dropped", |k| matches!(k, ErrorKind::TimedOut | ErrorKind::WouldBlock)),
    );
}

/// Every request (TCP and UDP) from `from` to `target` in `ns` failed with
/// an error kind `how` accepts.
fn failed(
    what: &str,
    ns: &NetNs,
    (from, target): (IpAddr, SocketAddr),
    timeout: Duration,
    how: (&str, fn(ErrorKind) -> bool),
) {
    for udp in [false, true] {
        let r = ns.run(move || request_from(from, target, udp, timeout));
        assert!(
            matches!(&r, Err(e) if (how.1)(e.kind())),
            "{what} ({}) must be {}: {r:?}",
            if udp { "UDP" } else { "TCP" },
            how.0
        );
    }
}

fn backends(replies: &[Reply]) -> BTreeSet<String> {
    replies.iter().map(|r| r.backend.clone()).collect()
}

/// The node port of Service number `n` (TCP and UDP share it).
fn node_port(n: u8) -> u16 {
    30_000 + 10 * u16::from(n)
}

/// Where external clients reach Service number `n` made `external`.
fn targets(n: u8, v6: bool) -> [(&'static str, SocketAddr); 3] {
    let n16 = u16::from(n);
    let (ext, lb) = if v6 {
        (IpAddr::from(vip6(0x100 + n16)), IpAddr::from(vip6(0x200 + n16)))
    } else {
        (IpAddr::from([198, 19, 1, n]), IpAddr::from([198, 19, 2, n]))
    };
    [
        ("node port", SocketAddr::new(pick(v6, UPLINK_NODE4, UPLINK_NODE6), node_port(n))),
        ("external IP", SocketAddr::new(ext, PORT)),
        ("load-balancer IP", SocketAddr::new(lb, PORT)),
    ]
}

fn cluster_ip(n: u8, v6: bool) -> SocketAddr {
    SocketAddr::new(if v6 { IpAddr::from(vip6(u16::from(n))) } else { IpAddr::from(vip4(n)) }, PORT)
}

/// Dual-stack Service `name` number `n` with TCP and UDP on `PORT`.
fn service(name: &str, n: u8) -> Value {
    let ports = [("tcp", "TCP"), ("udp", "UDP")].map(|(name, proto)| Port { name, port: PORT, proto, target: TARGET });
    let ips = [cluster_ip(n, false).ip(), cluster_ip(n, true).ip()];
    manifests::service(name, &ips, "RequireDualStack", &ports)
}

/// Service `name` number `n` as a LoadBalancer: a node port, external IPs
/// and load-balancer IPs of both families, `externalTrafficPolicy`
/// `policy` (with a health-check node port when `Local`).
fn load_balancer(name: &str, n: u8, policy: &str) -> Value {
    let mut s = service(name, n);
    let [(_, _), (_, e4), (_, l4)] = targets(n, false);
    let [(_, _), (_, e6), (_, l6)] = targets(n, true);
    let spec = &mut s["spec"];
    spec["type"] = json!("LoadBalancer");
    spec["externalTrafficPolicy"] = json!(policy);
    spec["externalIPs"] = json!([e4.ip().to_string(), e6.ip().to_string()]);
    for p in spec["ports"].as_array_mut().expect("ports") {
        p["nodePort"] = json!(node_port(n));
    }
    if policy == "Local" {
        spec["healthCheckNodePort"] = json!(node_port(n) + 1);
    }
    s["status"] = json!({"loadBalancer": {"ingress": [{"ip": l4.ip().to_string()}, {"ip": l6.ip().to_string()}]}});
    s
}

#[test]
fn cluster_policy_serves_external_clients_on_node_ports_external_and_lb_ips_masqueraded() {
    for profile in Profile::BASIC {
        // be0 on this node, be1 behind the other one.
        let mut w = World::new(profile, &[("be0", false), ("be1", true)]);
        let mut objs = vec![load_balancer("shop", 30, "Cluster")];
        objs.extend(w.slices("shop", &[(0, HERE), (1, THERE)], |_, _| {}));
        w.start(&objs);
        for v6 in [false, true] {
            for (what, target) in targets(30, v6) {
                for udp in [false, true] {
                    let what = format!("{what} {target} ({})", if udp { "UDP" } else { "TCP" });
                    let replies = answered(&what, w.requests_from_outside(upstream(v6), target, udp, 16));
                    assert_eq!(backends(&replies).len(), 2, "{what}: both backends serve: {replies:?}");
                    for r in &replies {
                        let b = usize::from(r.backend == "be1");
                        // The backend sees the node's address on the route
                        // towards it: its reply comes back through the node.
                        assert_eq!(r.peer.ip(), w.node_side(b, v6), "{what}: masqueraded to the node: {r:?}");
                        assert_eq!(r.local.port(), TARGET);
                    }
                }
            }
            // Pods on this node reach the same addresses, and keep their
            // own address (the reply comes back through this node anyway).
            for (what, target) in targets(30, v6) {
                let replies = answered(what, w.requests_from_pod(target, false, 8));
                assert!(replies.iter().all(|r| r.peer.ip() == w.c.addr(w.client, v6)), "{what}: {replies:?}");
            }
        }
        assert_eq!(w.c.stat(Stat::MasqueradeNoRoute), 0);
    }
}

#[test]
fn local_policy_keeps_the_client_address_drops_without_local_endpoints_while_pods_reach_the_cluster_and_refuses_without_any()
 {
    for profile in Profile::BASIC {
        let mut w = World::new(profile, &[("be0", false), ("be1", true)]);
        let objs = |here: &str| {
            let mut objs = vec![load_balancer("shop", 31, "Local")];
            objs.extend(w.slices("shop", &[(0, here), (1, THERE)], |_, _| {}));
            objs
        };
        let (with_local, without_local) = (objs(HERE), objs(THERE));
        let nowhere = vec![load_balancer("shop", 31, "Local")];
        w.start(&with_local);
        let health = SocketAddr::new(ip(UPLINK_NODE4), node_port(31) + 1);
        for v6 in [false, true] {
            for (what, target) in targets(31, v6) {
                for udp in [false, true] {
                    let replies = answered(what, w.requests_from_outside(upstream(v6), target, udp, 8));
                    for r in &replies {
                        assert_eq!(r.backend, "be0", "{what}: only this node's endpoint: {r:?}");
                        assert_eq!(r.peer.ip(), upstream(v6), "{what}: the client's own address: {r:?}");
                    }
                }
            }
        }
        let hc = get(&w.c.topo.upstream, health, "/");
        assert_eq!(hc.as_ref().map(|r| r.status).ok(), Some(200), "health check with a local endpoint: {hc:?}");

        // The endpoint moves to the other node: this node has none.
        w.change(&without_local);
        let before = w.c.stat(Stat::DropNoLocalBackend);
        for v6 in [false, true] {
            for (what, target) in targets(31, v6) {
                dropped(what, &w.c.topo.upstream, upstream(v6), target);
                // A pod on this node is sent to the cluster-wide endpoints.
                for udp in [false, true] {
                    let replies = answered(what, w.requests_from_pod(target, udp, 12));
                    assert_eq!(backends(&replies).len(), 2, "{what}: pods reach the cluster: {replies:?}");
                }
            }
        }
        assert!(w.c.stat(Stat::DropNoLocalBackend) >= before + 12, "{}", w.c.stats_dump());
        let hc = get(&w.c.topo.upstream, health, "/");
        assert_eq!(hc.as_ref().map(|r| r.status).ok(), Some(503), "health check without: {hc:?}");

        // No endpoint anywhere: refused, from outside as from a pod.
        w.change(&nowhere);
        for v6 in [false, true] {
            for (what, target) in targets(31, v6) {
                refused(what, &w.c.topo.upstream, upstream(v6), target);
                let pod = &w.c.topo.pods[w.client];
                refused(what, &pod.ns, pod.addr(v6), target);
            }
        }
    }
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints_and_drops_without_them() {
    for profile in Profile::BASIC {
        let mut w = World::new(profile, &[("be0", false), ("be1", true)]);
        let objs = |here: &str| {
            let mut s = service("api", 32);
            s["spec"]["internalTrafficPolicy"] = json!("Local");
            let mut objs = vec![s];
            objs.extend(w.slices("api", &[(0, here), (1, THERE)], |_, _| {}));
            objs
        };
        let (with_local, without_local) = (objs(HERE), objs(THERE));
        w.start(&with_local);
        for v6 in [false, true] {
            for udp in [false, true] {
                let replies = answered("ClusterIP", w.requests_from_pod(cluster_ip(32, v6), udp, 12));
                assert_eq!(backends(&replies), BTreeSet::from(["be0".to_owned()]), "only this node's endpoint");
            }
        }
        w.change(&without_local);
        for v6 in [false, true] {
            let pod = &w.c.topo.pods[w.client];
            dropped("ClusterIP without a local endpoint", &pod.ns, pod.addr(v6), cluster_ip(32, v6));
        }
    }
}

#[test]
fn source_ranges_admit_listed_clients_on_lb_ips_and_drop_the_others_but_not_on_node_ports() {
    for profile in Profile::BASIC {
        let mut w = World::new(profile, &[("be0", false)]);
        // A second external client, outside the ranges.
        let stranger = [ip("198.18.251.3"), ip("fd00:0:0:fb::3")];
        w.c.topo.upstream.ip(&["addr", "add", "198.18.251.3/24", "dev", "up0"]);
        w.c.topo.upstream.ip(&["-6", "addr", "add", "fd00:0:0:fb::3/64", "dev", "up0", "nodad"]);
        let mut lb = load_balancer("shop", 33, "Cluster");
        lb["spec"]["loadBalancerSourceRanges"] = json!([format!("{UPSTREAM4}/32"), format!("{UPSTREAM6}/128")]);
        let mut objs = vec![lb];
        objs.extend(w.slices("shop", &[(0, HERE)], |_, _| {}));
        w.start(&objs);
        for v6 in [false, true] {
            let [(_, node_port), (_, external), (_, lb)] = targets(33, v6);
            let stranger = stranger[usize::from(v6)];
            for udp in [false, true] {
                answered("LB IP from inside the ranges", w.requests_from_outside(upstream(v6), lb, udp, 4));
                // Node ports and external IPs are not the load balancer's.
                answered("node port from outside the ranges", w.requests_from_outside(stranger, node_port, udp, 4));
                answered("external IP from outside the ranges", w.requests_from_outside(stranger, external, udp, 4));
            }
            let before = w.c.stat(Stat::DropSourceRange);
            dropped("LB IP from outside the ranges", &w.c.topo.upstream, stranger, lb);
            let pod = &w.c.topo.pods[w.client];
            dropped("LB IP from a pod outside the ranges", &pod.ns, pod.addr(v6), lb);
            assert!(w.c.stat(Stat::DropSourceRange) >= before + 4, "{}", w.c.stats_dump());
        }
    }
}

/// The backend that answers `n` fresh connections to `target` from the
/// client pod, when it is one and the same, over TCP and over UDP (two
/// Service ports: each has its own affinity).
fn sticky(w: &World, target: SocketAddr, n: usize) -> [String; 2] {
    [false, true].map(|udp| {
        let mut seen = backends(&answered("affinity", w.requests_from_pod(target, udp, n)));
        assert_eq!(seen.len(), 1, "{n} connections to {target} (udp={udp}) must reach one backend: {seen:?}");
        seen.pop_first().expect("one")
    })
}

/// The affinity timeout of every frontend of Service `name`, as pinned.
fn pinned_timeouts(w: &World) -> BTreeSet<Option<u32>> {
    let maps = dsproxy::maps::Maps::open_pinned(&w.c.bpf.pin_dir().join("maps")).expect("open pinned maps");
    let prog = maps.read_back().expect("read back");
    prog.frontends.values().map(|v| v.settings.affinity_timeout).collect()
}

#[test]
fn client_ip_affinity_sticks_until_the_timeout_and_a_timeout_change_alone_is_programmed_and_survives_a_restart() {
    for profile in Profile::BASIC {
        let mut w = World::new(profile, &[("be0", false), ("be1", false), ("be2", true)]);
        let objs = |w: &World, timeout: u32, eps: &[(usize, &str)]| {
            let mut s = load_balancer("sticky", 34, "Cluster");
            s["spec"]["sessionAffinity"] = json!("ClientIP");
            s["spec"]["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": timeout}});
            let mut objs = vec![s];
            objs.extend(w.slices("sticky", eps, |_, _| {}));
            objs
        };
        let all = [(0, HERE), (1, HERE), (2, THERE)];
        let first_objs = objs(&w, 2, &all);
        w.start(&first_objs);
        let hits = w.c.stat(Stat::AffinityHit);
        let mut first = Vec::new();
        for v6 in [false, true] {
            first.push(sticky(&w, cluster_ip(34, v6), 20));
            // An external client is sticky on the node port too.
            let [(_, np), _, _] = targets(34, v6);
            let replies = answered("node port", w.requests_from_outside(upstream(v6), np, false, 20));
            assert_eq!(backends(&replies).len(), 1, "node port: one backend for one client: {replies:?}");
        }
        assert!(w.c.stat(Stat::AffinityHit) >= hits + 4 * 19, "{}", w.c.stats_dump());
        // After the 2 s timeout without a new connection the client is
        // placed afresh: within a few rounds it lands elsewhere.
        for (i, v6) in [false, true].into_iter().enumerate() {
            let start = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(2300));
                let now = answered("re-pick", w.requests_from_pod(cluster_ip(34, v6), false, 1));
                if now[0].backend != first[i][0] {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(30), "v6={v6}: never re-picked after the timeout");
            }
        }
        // The sticky backend leaves: its clients move to another one
        // without a refused or lost connection, and stick there.
        let target = cluster_ip(34, false);
        let [was, _] = sticky(&w, target, 5);
        let left = (0..w.be.len()).find(|b| w.name(*b) == was);
        let rest: Vec<(usize, &str)> = all.iter().copied().filter(|(b, _)| Some(*b) != left).collect();
        w.change(&objs(&w, 2, &rest));
        let now = sticky(&w, target, 10);
        assert!(!now.contains(&was), "the departed backend is replaced: {now:?}");

        // Only the timeout changes: programmed (slot 0 of every frontend),
        // read back from the pinned maps, and a restart writes nothing.
        assert_eq!(pinned_timeouts(&w), BTreeSet::from([Some(2)]));
        let line = {
            let text = World::text(&objs(&w, 3600, &rest));
            w.c.change_and_sync(|| w.c.write("objects.yaml", &text))
        };
        assert!(line.contains("upserted=") && !line.contains("upserted=0 "), "{line}");
        assert_eq!(pinned_timeouts(&w), BTreeSet::from([Some(3600)]));
        w.c.stop_agent();
        w.c.start_agent_with(&["--node-name", HERE]);
        let log = w.c.agent().log().join("\n");
        assert!(log.contains("upserted=0 removed=0 ops=0"), "an unchanged restart writes nothing:\n{log}");
        assert_eq!(sticky(&w, target, 5), now, "still sticky after the restart");
    }
}

#[test]
fn topology_hints_keep_traffic_in_this_nodes_zone_and_fall_back_to_every_endpoint() {
    for profile in Profile::BASIC {
        // be0 here (zone-a), be1 on the other node in zone-b, be2 on the
        // other node in zone-a.
        let mut w = World::new(profile, &[("be0", false), ("be1", true), ("be2", true)]);
        let zones = ["zone-a", "zone-b", "zone-a"];
        let objs = |w: &World, hinted: usize| {
            let mut objs = vec![service("near", 35)];
            objs.extend(w.slices("near", &[(0, HERE), (1, THERE), (2, THERE)], |b, e| {
                e["zone"] = json!(zones[b]);
                if b < hinted {
                    e["hints"] = json!({"forZones": [{"name": zones[b]}]});
                }
            }));
            objs
        };
        let hinted = objs(&w, 3);
        w.start(&hinted);
        let zone_a = BTreeSet::from(["be0".to_owned(), "be2".to_owned()]);
        for v6 in [false, true] {
            for udp in [false, true] {
                let replies = answered("hinted", w.requests_from_pod(cluster_ip(35, v6), udp, 24));
                assert_eq!(backends(&replies), zone_a, "only endpoints hinted for zone-a");
            }
        }
        // One endpoint without hints: kube-proxy ignores them all.
        w.change(&objs(&w, 2));
        for v6 in [false, true] {
            let replies = answered("unhinted", w.requests_from_pod(cluster_ip(35, v6), false, 30));
            assert_eq!(backends(&replies).len(), 3, "every endpoint once hints are incomplete: {replies:?}");
        }
    }
}
