//! Namespace integration tests: the real agent, the real TC program on real
//! veth pairs, real TCP and UDP sockets on both families.
use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use dsproxy_tests::{
    Cluster,
    echo::{Conn, Reply, tcp_request, udp_request},
    manifests::{Port, READY, documents, service, slice},
    topo::{Profile, vip4, vip6},
};
use proxy_common::Stat;

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");
const SVC_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

struct Setup {
    c: Cluster,
    client: usize,
    backends: Vec<usize>,
    vip4: IpAddr,
    vip6: IpAddr,
}

fn ports() -> [Port<'static>; 2] {
    [
        Port { name: "tcp", port: SVC_PORT, proto: "TCP", target: TARGET_PORT },
        Port { name: "udp", port: SVC_PORT, proto: "UDP", target: TARGET_PORT },
    ]
}

/// Manifests for Service `web` over `backends`: a dual-stack Service with
/// one slice per family listed in `families`.
fn web_manifests(s: &Setup, backends: &[usize], families: &[bool]) -> String {
    let mut objs = vec![service("web", &[s.vip4, s.vip6], "RequireDualStack", &ports())];
    for v6 in families {
        let eps: Vec<_> = backends.iter().map(|b| (s.c.addr(*b, *v6), READY)).collect();
        let (name, family) = if *v6 { ("web-v6", "IPv6") } else { ("web-v4", "IPv4") };
        objs.push(slice(name, "web", family, &[("tcp", TARGET_PORT, "TCP"), ("udp", TARGET_PORT, "UDP")], &eps));
    }
    documents(&objs)
}

/// A node with one client and `n` backends (the last `remote` of them
/// behind a second node), and Service `web` over all of them.
fn setup(n: usize, remote: usize, families: &[bool]) -> Setup {
    setup_on(Profile::Clean, n, remote, families)
}

/// `setup` on a node dressed as `profile`.
fn setup_on(profile: Profile, n: usize, remote: usize, families: &[bool]) -> Setup {
    let mut c = Cluster::with_profile(Path::new(BIN), profile);
    let client = c.client();
    let backends: Vec<usize> = (0..n).map(|i| c.backend(&format!("be{i}"), TARGET_PORT, i >= n - remote)).collect();
    let mut s = Setup { c, client, backends, vip4: IpAddr::V4(vip4(10)), vip6: IpAddr::V6(vip6(10)) };
    let text = web_manifests(&s, &s.backends.clone(), families);
    s.c.write("web.yaml", &text);
    s.c.start_agent();
    s
}

fn vip(s: &Setup, v6: bool) -> SocketAddr {
    SocketAddr::new(if v6 { s.vip6 } else { s.vip4 }, SVC_PORT)
}

/// `count` requests from the client to `target`, over TCP or UDP.
fn requests(s: &Setup, target: SocketAddr, udp: bool, count: usize) -> Vec<Reply> {
    s.c.in_pod(s.client, move || {
        (0..count)
            .map(|i| {
                let r = if udp { udp_request(target) } else { tcp_request(target) };
                r.unwrap_or_else(|e| {
                    panic!("request {i} to {target} ({}) failed: {e}", if udp { "udp" } else { "tcp" })
                })
            })
            .collect()
    })
}

/// Every reply came from a backend address of the VIP's family, at the
/// target port, and saw the client's own address (no SNAT).
fn assert_same_family(s: &Setup, replies: &[Reply], v6: bool) {
    let allowed: BTreeSet<IpAddr> = s.backends.iter().map(|b| s.c.addr(*b, v6)).collect();
    let client = s.c.addr(s.client, v6);
    for r in replies {
        assert!(
            allowed.contains(&r.local.ip()),
            "reply from {} is not a {} backend ({allowed:?})",
            r.local,
            if v6 { "v6" } else { "v4" }
        );
        assert_eq!(r.local.port(), TARGET_PORT, "DNAT must use the slice's port");
        assert_eq!(r.peer.ip(), client, "the backend must see the client's own address");
    }
}

/// One established connection per target, with the backend that answers it.
fn open_connections(s: &Setup, targets: [SocketAddr; 2]) -> Vec<(Conn, String)> {
    s.c.connect_to(s.client, targets.to_vec())
}

fn spread(replies: &[Reply]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in replies {
        *m.entry(r.backend.clone()).or_default() += 1;
    }
    m
}

#[test]
fn should_serve_both_vips_from_backends_of_their_own_family() {
    let s = setup(3, 0, &[false, true]);
    for v6 in [false, true] {
        for udp in [false, true] {
            let replies = requests(&s, vip(&s, v6), udp, 30);
            assert_same_family(&s, &replies, v6);
        }
    }
}

#[test]
fn should_keep_the_vip_as_the_peer_of_the_client_socket() {
    let s = setup(2, 0, &[false, true]);
    for v6 in [false, true] {
        let target = vip(&s, v6);
        let peer = s.c.in_pod(s.client, move || {
            let mut conn = Conn::connect(target).expect("connect");
            conn.request().expect("request");
            conn.peer_addr().expect("peer")
        });
        assert_eq!(peer, target);
    }
}

#[test]
fn should_not_translate_a_v6_vip_that_has_only_v4_endpoints() {
    let s = setup(2, 0, &[false]);
    // IPv4 works.
    assert_same_family(&s, &requests(&s, vip(&s, false), false, 5), false);
    // IPv6 has no backend of its own family: never an IPv4 one instead.
    let target = vip(&s, true);
    let (tcp, udp) = s.c.in_pod(s.client, move || (tcp_request(target), udp_request(target)));
    // Refused, not black-holed: TCP gets a RST, UDP an ICMPv6 port unreachable.
    let refused = |r: &std::io::Result<_>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
    assert!(refused(&tcp), "TCP to a v6 VIP without v6 endpoints must be refused, got {tcp:?}");
    assert!(refused(&udp), "UDP to a v6 VIP without v6 endpoints must be refused, got {udp:?}");
}

#[test]
fn should_spread_300_connections_over_3_backends() {
    let s = setup(3, 0, &[false, true]);
    for v6 in [false, true] {
        let replies = requests(&s, vip(&s, v6), false, 300);
        assert_same_family(&s, &replies, v6);
        let m = spread(&replies);
        assert_eq!(m.len(), 3, "every backend must be used: {m:?}");
        for (b, n) in &m {
            assert!(*n >= 45, "backend {b} got {n} of 300 connections (< 15%): {m:?}");
        }
    }
}

#[test]
fn should_leave_direct_pod_to_pod_traffic_untouched() {
    let s = setup(2, 0, &[false, true]);
    for v6 in [false, true] {
        let be = s.backends[1];
        let target = SocketAddr::new(s.c.addr(be, v6), TARGET_PORT);
        for udp in [false, true] {
            let replies = requests(&s, target, udp, 5);
            for r in replies {
                assert_eq!(r.backend, "be1");
                assert_eq!(r.local, target);
                assert_eq!(r.peer.ip(), s.c.addr(s.client, v6));
            }
        }
    }
}

#[test]
fn should_reach_backends_behind_another_node() {
    // be0 local, be1 and be2 behind the second node.
    let s = setup(3, 2, &[false, true]);
    for v6 in [false, true] {
        for udp in [false, true] {
            let replies = requests(&s, vip(&s, v6), udp, 60);
            assert_same_family(&s, &replies, v6);
            assert!(spread(&replies).len() >= 2, "remote backends must serve too: {:?}", spread(&replies));
        }
    }
}

#[test]
fn should_keep_a_long_lived_connection_on_its_backend() {
    let s = setup(3, 0, &[false, true]);
    for v6 in [false, true] {
        let target = vip(&s, v6);
        let (first, spread_seen, later) = s.c.in_pod(s.client, move || {
            let mut conn = Conn::connect(target).expect("connect");
            let first = conn.request().expect("first request").backend;
            let mut seen = BTreeSet::new();
            let mut later = Vec::new();
            for _ in 0..60 {
                seen.insert(tcp_request(target).expect("other connection").backend);
                later.push(conn.request().expect("long-lived request").backend);
            }
            (first, seen, later)
        });
        assert!(spread_seen.len() > 1, "new connections must be spread: {spread_seen:?}");
        assert!(later.iter().all(|b| *b == first), "long-lived connection moved: {first} then {later:?}");
    }
}

#[test]
fn should_survive_an_agent_restart_without_dropping_connections() {
    let mut s = setup(3, 0, &[false, true]);
    let targets = [vip(&s, false), vip(&s, true)];
    let mut conns = open_connections(&s, targets);
    s.c.stop_agent();
    // The datapath stays attached with the agent gone.
    for (conn, backend) in &mut conns {
        assert_eq!(&conn.request().expect("request while the agent is down").backend, backend);
    }
    assert_same_family(&s, &requests(&s, targets[0], false, 10), false);
    s.c.start_agent();
    let log = s.c.agent().log().join("\n");
    assert!(log.contains("restored 4 frontends"), "the restarted agent must read the pinned state back:\n{log}");
    assert!(log.contains("upserted=0 removed=0 ops=0"), "an unchanged restart must write nothing:\n{log}");
    for (conn, backend) in &mut conns {
        assert_eq!(&conn.request().expect("request after restart").backend, backend);
    }
    for v6 in [false, true] {
        assert_same_family(&s, &requests(&s, vip(&s, v6), true, 10), v6);
    }
}

#[test]
fn should_refuse_a_pin_dir_that_is_not_on_bpffs() {
    let s = setup(1, 0, &[false]);
    // `ip netns exec` gives the command a fresh /sys: /sys/fs/bpf is no bpffs there.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &s.c.topo.node.name,
            BIN,
            "run",
            "--attach",
            "dsp*",
            "--pin-dir",
            "/sys/fs/bpf/dsproxy-x",
        ])
        .arg("--manifests")
        .arg(&s.c.manifests.0)
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not on a bpffs") && err.contains("--pin-dir"), "unhelpful error: {err}");
}

#[test]
fn should_follow_a_scale_up_and_keep_established_flows() {
    let mut s = setup(2, 0, &[false, true]);
    let be2 = s.c.backend("be2", TARGET_PORT, false);
    let targets = [vip(&s, false), vip(&s, true)];
    let mut conns = open_connections(&s, targets);
    s.backends.push(be2);
    let text = web_manifests(&s, &s.backends.clone(), &[false, true]);
    s.c.change_and_sync(|| s.c.write("web.yaml", &text));
    for v6 in [false, true] {
        let replies = requests(&s, vip(&s, v6), false, 90);
        assert!(spread(&replies).contains_key("be2"), "the new backend must get connections: {:?}", spread(&replies));
    }
    for (conn, backend) in &mut conns {
        assert_eq!(&conn.request().expect("request after scale-up").backend, backend);
    }
}

/// The datapath holds on every node profile a real node carries: kube-
/// proxy's INVALID drop (iptables-legacy, iptables-nft, nftables), strict
/// reverse-path filtering, a masquerade towards the other node; both
/// families, TCP and UDP, backends on this node and behind another one.
#[test]
fn should_serve_every_node_profile_on_both_families() {
    for profile in Profile::ALL {
        // be0 on this node, be1 behind the second node.
        let s = setup_on(profile, 2, 1, &[false, true]);
        for v6 in [false, true] {
            for udp in [false, true] {
                let replies = requests(&s, vip(&s, v6), udp, 40);
                assert_same_family(&s, &replies, v6);
                let m = spread(&replies);
                assert_eq!(m.len(), 2, "{profile:?}, v6={v6}, udp={udp}: both backends answer: {m:?}");
            }
        }
        // The host stack never saw these flows: they were delivered straight
        // into the backend pods and back into the client.
        let (peer, stack) = (s.c.stat(Stat::RedirectPeer), s.c.stat(Stat::Stack));
        assert!(peer > 0 && stack == 0, "{profile:?}: redirected {peer}, through the host stack {stack}");
    }
}
