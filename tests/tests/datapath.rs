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
    echo::{Conn, Reply, tcp_request, tcp_request_from, udp_request, udp_request_on},
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

/// A node dressed as `profile` with one client and `n` backends (the last
/// `remote` of them behind a second node), and Service `web` over all of
/// them, served by the agent.
fn setup(profile: Profile, n: usize, remote: usize, families: &[bool]) -> Setup {
    let mut s = prepare(profile, n, remote);
    let text = web_manifests(&s, &s.backends.clone(), families);
    s.c.write("web.yaml", &text);
    s.c.start_agent();
    s
}

/// `setup` without manifests and agent.
fn prepare(profile: Profile, n: usize, remote: usize) -> Setup {
    eprintln!("node profile {profile:?}");
    let mut c = Cluster::with_profile(Path::new(BIN), profile);
    let client = c.client();
    let backends: Vec<usize> = (0..n).map(|i| c.backend(&format!("be{i}"), TARGET_PORT, i >= n - remote)).collect();
    Setup { c, client, backends, vip4: IpAddr::V4(vip4(10)), vip6: IpAddr::V6(vip6(10)) }
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
    for profile in Profile::BASIC {
        let s = setup(profile, 3, 0, &[false, true]);
        for v6 in [false, true] {
            for udp in [false, true] {
                let replies = requests(&s, vip(&s, v6), udp, 30);
                assert_same_family(&s, &replies, v6);
            }
        }
    }
}

#[test]
fn should_keep_the_vip_as_the_peer_of_the_client_socket() {
    for profile in Profile::BASIC {
        let s = setup(profile, 2, 0, &[false, true]);
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
}

#[test]
fn should_not_translate_a_v6_vip_that_has_only_v4_endpoints() {
    for profile in Profile::BASIC {
        let s = setup(profile, 2, 0, &[false]);
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
}

#[test]
fn should_spread_300_connections_over_3_backends() {
    for profile in Profile::BASIC {
        let s = setup(profile, 3, 0, &[false, true]);
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
}

#[test]
fn should_leave_direct_pod_to_pod_traffic_untouched() {
    for profile in Profile::BASIC {
        let s = setup(profile, 2, 0, &[false, true]);
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
}

#[test]
fn should_reach_backends_behind_another_node() {
    for profile in Profile::BASIC {
        // be0 local, be1 and be2 behind the second node.
        let s = setup(profile, 3, 2, &[false, true]);
        for v6 in [false, true] {
            for udp in [false, true] {
                let replies = requests(&s, vip(&s, v6), udp, 60);
                assert_same_family(&s, &replies, v6);
                assert!(spread(&replies).len() >= 2, "remote backends must serve too: {:?}", spread(&replies));
            }
        }
    }
}

#[test]
fn should_keep_a_long_lived_connection_on_its_backend() {
    for profile in Profile::BASIC {
        let s = setup(profile, 3, 0, &[false, true]);
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
}

#[test]
fn should_survive_an_agent_restart_without_dropping_connections() {
    for profile in Profile::BASIC {
        let mut s = setup(profile, 3, 0, &[false, true]);
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
}

#[test]
fn should_refuse_a_pin_dir_that_is_not_on_bpffs() {
    let s = setup(Profile::Clean, 1, 0, &[false]);
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
    for profile in Profile::BASIC {
        let mut s = setup(profile, 2, 0, &[false, true]);
        let be2 = s.c.backend("be2", TARGET_PORT, false);
        let targets = [vip(&s, false), vip(&s, true)];
        let mut conns = open_connections(&s, targets);
        s.backends.push(be2);
        let text = web_manifests(&s, &s.backends.clone(), &[false, true]);
        s.c.change_and_sync(|| s.c.write("web.yaml", &text));
        for v6 in [false, true] {
            let replies = requests(&s, vip(&s, v6), false, 90);
            assert!(
                spread(&replies).contains_key("be2"),
                "the new backend must get connections: {:?}",
                spread(&replies)
            );
        }
        for (conn, backend) in &mut conns {
            assert_eq!(&conn.request().expect("request after scale-up").backend, backend);
        }
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
        let s = setup(profile, 2, 1, &[false, true]);
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

/// Manifests for a dual-stack Service `name` on `vips`, port 80 (TCP and
/// UDP) to `target` on `backends`.
fn service_manifests(s: &Setup, name: &str, vips: [IpAddr; 2], target: u16, backends: &[usize]) -> String {
    let ports = [
        Port { name: "tcp", port: SVC_PORT, proto: "TCP", target },
        Port { name: "udp", port: SVC_PORT, proto: "UDP", target },
    ];
    let mut objs = vec![service(name, &vips, "RequireDualStack", &ports)];
    for (v6, family) in [(false, "IPv4"), (true, "IPv6")] {
        let eps: Vec<_> = backends.iter().map(|b| (s.c.addr(*b, v6), READY)).collect();
        objs.push(slice(
            &format!("{name}-{family}"),
            name,
            family,
            &[("tcp", target, "TCP"), ("udp", target, "UDP")],
            &eps,
        ));
    }
    documents(&objs)
}

/// The client namespace's count of retransmitted TCP segments (both
/// families share the counter).
fn retransmits(s: &Setup) -> u64 {
    s.c.in_pod(s.client, || {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("read snmp");
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().expect("Tcp header"), tcp.next().expect("Tcp values"));
        let at = names.split_whitespace().position(|n| n == "RetransSegs").expect("RetransSegs");
        values.split_whitespace().nth(at).and_then(|v| v.parse().ok()).expect("RetransSegs value")
    })
}

/// A pod that is the only backend of its Service reaches the Service and
/// lands on itself; its own address would be a martian source, so the
/// flow comes from the service address (both families, TCP and UDP).
#[test]
fn should_let_a_pod_reach_its_own_service() {
    for profile in Profile::BASIC {
        let s = setup(profile, 1, 0, &[false, true]);
        let be = s.backends[0];
        for v6 in [false, true] {
            for udp in [false, true] {
                let target = vip(&s, v6);
                let r =
                    s.c.in_pod(be, move || if udp { udp_request(target) } else { tcp_request(target) })
                        .unwrap_or_else(|e| panic!("{profile:?}: be0 to its own Service {target} (udp={udp}): {e}"));
                assert_eq!(r.backend, "be0");
                assert_eq!(r.local.ip(), s.c.addr(be, v6), "translated to the pod itself");
                assert_eq!(r.peer.ip(), target.ip(), "a hairpin flow comes from the service address");
            }
        }
        assert!(s.c.stat(Stat::Hairpin) >= 4, "{profile:?}: hairpin flows counted");
    }
}

/// Path MTU discovery through a VIP: between the nodes the MTU is 1280,
/// the fragmentation-needed / packet-too-big error quotes the translated
/// packet, and is translated back so the client's socket for the VIP
/// learns the smaller MTU.
#[test]
fn should_complete_a_large_upload_to_a_backend_behind_a_smaller_mtu() {
    for profile in Profile::BASIC {
        // One backend, behind the second node.
        let s = setup(profile, 1, 1, &[false, true]);
        let remote = s.c.topo.remote.as_ref().expect("second node");
        s.c.topo.node.ip(&["link", "set", "dsn-n2", "mtu", "1280"]);
        remote.ip(&["link", "set", "dsn-n1", "mtu", "1280"]);
        for v6 in [false, true] {
            let target = vip(&s, v6);
            let r = s.c.in_pod(s.client, move || {
                let mut conn = Conn::connect(target).expect("connect");
                conn.upload(400_000, std::time::Duration::from_secs(20))
            });
            let r = r.unwrap_or_else(|e| panic!("{profile:?}: 400 KB upload to {target}: {e}\n{}", s.c.stats_dump()));
            assert_eq!(r.backend, "be0");
        }
        assert!(s.c.stat(Stat::IcmpXlate) >= 2, "{profile:?}: the MTU errors were translated");
    }
}

/// kube-proxy's iptables-mode DNAT of `web`'s VIPs to `backend`: a
/// KUBE-SERVICES chain hooked into PREROUTING, one DNAT rule per family.
fn iptables_dnat(s: &Setup, backend: usize) {
    for v6 in [false, true] {
        let cmd = if v6 { "ip6tables-legacy" } else { "iptables-legacy" };
        let vip = vip(s, v6).ip().to_string();
        let to = SocketAddr::new(s.c.addr(backend, v6), TARGET_PORT).to_string();
        let node = &s.c.topo.node;
        node.exec(&[cmd, "-t", "nat", "-N", "KUBE-SERVICES"]);
        node.exec(&[cmd, "-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"]);
        for proto in ["tcp", "udp"] {
            node.exec(&[
                cmd,
                "-t",
                "nat",
                "-A",
                "KUBE-SERVICES",
                "-d",
                &vip,
                "-p",
                proto,
                "--dport",
                "80",
                "-j",
                "DNAT",
                "--to-destination",
                &to,
            ]);
        }
    }
}

/// Take over from kube-proxy without dropping anything: a connection that
/// netfilter translated before dsproxy started keeps its backend, while
/// new connections are dsproxy's.
#[test]
fn should_keep_a_connection_netfilter_translated_before_dsproxy_started() {
    for profile in Profile::BASIC {
        let mut s = prepare(profile, 2, 0);
        iptables_dnat(&s, s.backends[0]);
        let targets = [vip(&s, false), vip(&s, true)];
        let mut conns = open_connections(&s, targets);
        assert!(conns.iter().all(|(_, b)| b == "be0"), "netfilter's DNAT serves first");
        // dsproxy's view: be1 only, so new connections tell who served them.
        let text = web_manifests(&s, &[s.backends[1]], &[false, true]);
        s.c.write("web.yaml", &text);
        s.c.start_agent();
        for (conn, _) in &mut conns {
            for _ in 0..5 {
                let r = conn.request().unwrap_or_else(|e| panic!("{profile:?}: old connection after takeover: {e}"));
                assert_eq!(r.backend, "be0", "an established connection keeps its backend");
            }
        }
        for v6 in [false, true] {
            for r in requests(&s, vip(&s, v6), false, 10) {
                assert_eq!(r.backend, "be1", "new connections are dsproxy's");
            }
        }
        assert!(s.c.stat(Stat::PassTakeover) > 0, "{profile:?}: the old flows were left to the host stack");
    }
}

/// Conntrack state left by an iptables ruleset that served the same VIPs
/// (entries of the very tuples the client uses again) does not disturb
/// dsproxy: every connection and datagram is answered, no segment is
/// retransmitted.
#[test]
fn should_ignore_conntrack_state_left_by_a_previous_proxy() {
    const PORTS: std::ops::Range<u16> = 41000..41100;
    for profile in Profile::BASIC {
        let mut s = prepare(profile, 2, 1);
        iptables_dnat(&s, s.backends[0]);
        for v6 in [false, true] {
            let target = vip(&s, v6);
            s.c.in_pod(s.client, move || {
                for port in PORTS {
                    // A RST leaves the client no TIME_WAIT, the node an entry.
                    tcp_request_from(port, target, true).expect("through netfilter's DNAT");
                    udp_request_on(port, target, 6).expect("UDP through netfilter's DNAT");
                }
            });
        }
        let left = s.c.topo.node.exec(&["conntrack", "-L"]);
        assert!(left.lines().count() >= 400, "the old proxy left its entries: {left}");
        for cmd in ["iptables-legacy", "ip6tables-legacy"] {
            s.c.topo.node.exec(&[cmd, "-t", "nat", "-F"]);
        }
        let text = web_manifests(&s, &s.backends.clone(), &[false, true]);
        s.c.write("web.yaml", &text);
        s.c.start_agent();
        let before = retransmits(&s);
        for v6 in [false, true] {
            let target = vip(&s, v6);
            let replies = s.c.in_pod(s.client, move || {
                let mut replies = Vec::new();
                for port in PORTS {
                    let tcp = tcp_request_from(port, target, false);
                    let udp = udp_request_on(port, target, 6);
                    replies.push(tcp.unwrap_or_else(|e| panic!("{profile:?}: TCP from port {port} to {target}: {e}")));
                    replies.push(udp.unwrap_or_else(|e| panic!("{profile:?}: UDP from port {port} to {target}: {e}")));
                }
                replies
            });
            assert_same_family(&s, &replies, v6);
        }
        assert_eq!(retransmits(&s) - before, 0, "{profile:?}: no segment had to be sent twice");
    }
}

/// A closed Service connection leaves nothing behind: a direct connection
/// from the same client port to the backend that served it works, at
/// once and after the close timeout, both families, local and remote.
#[test]
fn should_not_touch_a_direct_connection_that_reuses_a_service_flows_port() {
    for profile in Profile::BASIC {
        let mut s = prepare(profile, 2, 1);
        let text = web_manifests(&s, &s.backends.clone(), &[false, true]);
        s.c.write("web.yaml", &text);
        s.c.start_agent_with(&["--conntrack-tcp-timeout-close", "1s"]);
        let mut port = 42000;
        for wait in [0, 2] {
            for v6 in [false, true] {
                for _ in 0..4 {
                    port += 1;
                    let target = vip(&s, v6);
                    let via_vip = s.c.in_pod(s.client, move || tcp_request_from(port, target, false));
                    let via_vip = via_vip.unwrap_or_else(|e| panic!("{profile:?}: via the VIP: {e}"));
                    std::thread::sleep(std::time::Duration::from_secs(wait));
                    let direct = via_vip.local;
                    let r = s.c.in_pod(s.client, move || tcp_request_from(port, direct, false));
                    let r = r.unwrap_or_else(|e| {
                        panic!("{profile:?}: direct to {direct} from port {port}, {wait}s after a VIP flow: {e}")
                    });
                    assert_eq!(r.local, direct);
                    assert_eq!(r.peer, SocketAddr::new(s.c.addr(s.client, v6), port));
                }
            }
        }
    }
}

/// 3000-byte datagrams travel as fragments; every fragment of a service
/// flow is translated, both directions, local and remote backends.
#[test]
fn should_translate_udp_datagrams_that_travel_as_fragments() {
    for profile in Profile::BASIC {
        let s = setup(profile, 2, 1, &[false, true]);
        for v6 in [false, true] {
            let target = vip(&s, v6);
            let replies = s.c.in_pod(s.client, move || {
                (0..24)
                    .map(|i| {
                        udp_request_on(0, target, 3000).unwrap_or_else(|e| panic!("datagram {i} to {target}: {e}"))
                    })
                    .collect::<Vec<_>>()
            });
            assert_same_family(&s, &replies, v6);
            assert_eq!(spread(&replies).len(), 2, "{profile:?}: both backends answer: {:?}", spread(&replies));
        }
        assert!(s.c.stat(Stat::FragTracked) > 0, "{profile:?}: later fragments were translated");
    }
}

/// UDP to a backend port where nothing listens fails at once with
/// ECONNREFUSED: the backend's port unreachable error is translated back
/// to the VIP (local and remote backend, both families).
#[test]
fn should_refuse_udp_to_a_closed_backend_port() {
    for profile in Profile::BASIC {
        for remote in [0, 1] {
            let mut s = prepare(profile, 1, remote);
            let vips = [IpAddr::V4(vip4(11)), IpAddr::V6(vip6(11))];
            let text = service_manifests(&s, "closed", vips, 9, &s.backends.clone());
            s.c.write("closed.yaml", &text);
            s.c.start_agent();
            for target in vips.map(|ip| SocketAddr::new(ip, SVC_PORT)) {
                let r = s.c.in_pod(s.client, move || udp_request(target));
                assert!(
                    matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
                    "{profile:?}, remote={remote}: UDP to {target} with a closed backend port: {r:?}"
                );
            }
            assert!(s.c.stat(Stat::IcmpXlate) >= 2, "{profile:?}: the errors were translated");
        }
    }
}
