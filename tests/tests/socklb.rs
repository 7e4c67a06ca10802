//! Socket-level load balancing: processes in the node's own network
//! namespace (host-network clients) reach Services through the cgroup
//! socket programs. Every client here is a process of its own
//! (`dsproxy-sock-client`), started with `ip netns exec NODE` and moved
//! into a child cgroup the test made (`TestCgroup`); the agent attaches the
//! socket programs to that child only.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
};

use dsproxy_tests::{
    Cluster,
    cgroup::TestCgroup,
    manifests::{Port, READY, documents, service, slice},
    netns::NetNs,
    topo::{Profile, vip4, vip6},
};
use proxy_common::Stat;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");
const CLIENT: &str = env!("CARGO_BIN_EXE_dsproxy-sock-client");
const SVC_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;

const ECONNREFUSED: i64 = 111;
const EHOSTUNREACH: i64 = 113;

/// A node with backends, Services and the agent, and the test's cgroup.
/// Field order is drop order: the agent (and its links) before the cgroup.
struct Setup {
    c: Cluster,
    cg: TestCgroup,
    backends: Vec<usize>,
    /// A client pod (for the pods' case).
    pod: usize,
}

/// VIP `n` of a family (`web` is 10, `empty` 11, `sticky` 12, `local` 13,
/// `only4` 14, `only6` 15).
fn vip(n: u8, v6: bool) -> SocketAddr {
    let ip: IpAddr = if v6 { vip6(u16::from(n)).into() } else { vip4(n).into() };
    SocketAddr::new(ip, SVC_PORT)
}

/// An IPv4 VIP as an AF_INET6 socket names it (`::ffff:a.b.c.d`).
fn mapped(n: u8) -> SocketAddr {
    SocketAddr::new(vip4(n).to_ipv6_mapped().into(), SVC_PORT)
}

fn ports() -> [Port<'static>; 2] {
    [
        Port { name: "tcp", port: SVC_PORT, proto: "TCP", target: TARGET_PORT },
        Port { name: "udp", port: SVC_PORT, proto: "UDP", target: TARGET_PORT },
    ]
}

/// Dual-stack Service `name` on VIP `n` over `backends`, both families
/// (no slices when `backends` is empty); `edit` changes the Service and
/// `node` names the node of every endpoint.
fn svc(
    c: &Cluster,
    name: &str,
    n: u8,
    backends: &[usize],
    node: Option<&str>,
    edit: impl Fn(&mut Value),
) -> Vec<Value> {
    let mut s = service(name, &[vip(n, false).ip(), vip(n, true).ip()], "RequireDualStack", &ports());
    edit(&mut s);
    let mut objs = vec![s];
    if backends.is_empty() {
        return objs;
    }
    for v6 in [false, true] {
        let eps: Vec<_> = backends.iter().map(|b| (c.addr(*b, v6), READY)).collect();
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let mut sl = slice(
            &format!("{name}-{fam}"),
            name,
            fam,
            &[("tcp", TARGET_PORT, "TCP"), ("udp", TARGET_PORT, "UDP")],
            &eps,
        );
        if let Some(node) = node {
            for ep in sl["endpoints"].as_array_mut().expect("endpoints") {
                ep["nodeName"] = node.into();
            }
        }
        objs.push(sl);
    }
    objs
}

/// Three backends (the last behind a second node), a client pod and the
/// Services: `web` over all of them, `empty` without endpoints, `sticky`
/// with ClientIP affinity, `local` with internalTrafficPolicy Local and endpoints only
/// on another node, `only4` and `only6` dual-stack with endpoints of one
/// family. The agent runs with `extra` flags on the test cgroup.
fn setup(profile: Profile, extra: &[&str]) -> Setup {
    eprintln!("node profile {profile:?}");
    let mut c = Cluster::with_profile(Path::new(BIN), profile);
    let backends: Vec<usize> = (0..3).map(|i| c.backend(&format!("be{i}"), TARGET_PORT, i == 2)).collect();
    let pod = c.client();
    let mut objs = svc(&c, "web", 10, &backends, None, |_| {});
    objs.extend(svc(&c, "empty", 11, &[], None, |_| {}));
    objs.extend(svc(&c, "sticky", 12, &backends, None, |s| s["spec"]["sessionAffinity"] = "ClientIP".into()));
    objs.extend(svc(&c, "local", 13, &backends, Some("some-other-node"), |s| {
        s["spec"]["internalTrafficPolicy"] = "Local".into();
    }));
    for (name, n, keep) in [("only4", 14, "IPv4"), ("only6", 15, "IPv6")] {
        let one = svc(&c, name, n, &backends, None, |_| {});
        objs.extend(one.into_iter().filter(|o| o["kind"] == "Service" || o["addressType"] == keep));
    }
    c.write("services.yaml", &documents(&objs));
    let cg = TestCgroup::new();
    let mut s = Setup { c, cg, backends, pod };
    start(&mut s, extra);
    s
}

fn start(s: &mut Setup, extra: &[&str]) {
    let cgroup = s.cg.as_path().to_str().expect("utf-8").to_owned();
    let mut args = vec!["--cgroup", &cgroup];
    args.extend_from_slice(extra);
    s.c.start_agent_with(&args);
    s.c.agent()
        .wait_for_line(|l| l.contains("socket-level load balancing on cgroup"), std::time::Duration::from_secs(10));
}

/// The client command in `ns`, in the test cgroup when `join`.
fn client(s: &Setup, ns: &NetNs, join: bool, ops: &[String]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, CLIENT]);
    if join {
        cmd.arg("--join").arg(s.cg.procs());
    }
    cmd.args(ops);
    cmd
}

/// Run the client to the end; one JSON value per operation.
fn run(s: &Setup, ns: &NetNs, join: bool, ops: &[String]) -> Vec<Value> {
    let out = client(s, ns, join, ops).output().expect("run the socket client");
    assert!(out.status.success(), "client {ops:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let values: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad client line {l:?}: {e}")))
        .collect();
    assert_eq!(values.len(), ops.iter().filter(|o| is_op(o)).count(), "one answer per operation: {values:?}");
    values
}

fn is_op(s: &str) -> bool {
    ["tcp", "udp", "udpfrom", "hold", "loop", "rate"].contains(&s)
}

/// A host-network client in the test cgroup.
fn host(s: &Setup, ops: &[String]) -> Vec<Value> {
    run(s, &s.c.topo.node, true, ops)
}

fn ops(list: &[(&str, SocketAddr)]) -> Vec<String> {
    list.iter().flat_map(|(op, a)| [(*op).to_owned(), a.to_string()]).collect()
}

fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name].as_str().unwrap_or_else(|| panic!("no {name} in {v}"))
}

fn ok(v: &Value) -> &Value {
    assert_eq!(v["ok"], true, "operation failed: {v}");
    v
}

/// The backend addresses of a family.
fn backend_addrs(s: &Setup, v6: bool) -> BTreeSet<SocketAddr> {
    s.backends.iter().map(|b| SocketAddr::new(s.c.addr(*b, v6), TARGET_PORT)).collect()
}

/// A reply came from a backend of the family, which saw a client address
/// of that family, and the client saw `peer` as its peer.
fn check(s: &Setup, v: &Value, v6: bool, peer: SocketAddr) -> SocketAddr {
    let v = ok(v);
    let local: SocketAddr = field(v, "local").parse().expect("local");
    assert!(backend_addrs(s, v6).contains(&local), "{local} is not a {} backend: {v}", if v6 { "v6" } else { "v4" });
    let seen: SocketAddr = field(v, "seen").parse().expect("seen");
    assert_eq!(seen.is_ipv6(), v6, "the backend saw a client of the other family: {v}");
    assert_eq!(field(v, "peer"), peer.to_string(), "the client must see the VIP as its peer: {v}");
    local
}

#[test]
fn host_clients_reach_both_families_over_tcp_and_connected_udp_and_see_the_vip() {
    for profile in Profile::BASIC {
        let s = setup(profile, &[]);
        for v6 in [false, true] {
            let target = vip(10, v6);
            let list: Vec<_> = (0..12).flat_map(|_| [("tcp", target), ("udp", target)]).collect();
            let out = host(&s, &ops(&list));
            let mut tcp = BTreeSet::new();
            let mut udp = BTreeSet::new();
            for (i, v) in out.iter().enumerate() {
                let local = check(&s, v, v6, target);
                if i % 2 == 0 {
                    tcp.insert(local)
                } else {
                    udp.insert(local)
                };
            }
            // A backend per connect(): 12 connects meet more than one of 3.
            assert!(tcp.len() > 1 && udp.len() > 1, "connects did not spread: tcp {tcp:?}, udp {udp:?}");
        }
        assert!(s.c.stat(Stat::SockXlate) >= 48, "{}", s.c.stats_dump());
        assert!(s.c.stat(Stat::SockRevXlate) >= 48, "getpeername showed the VIP: {}", s.c.stats_dump());
        assert_eq!(s.c.stat(Stat::DnatNew), 0, "host clients never meet the packet path: {}", s.c.stats_dump());
    }
}

#[test]
fn client_ip_affinity_keeps_every_host_connection_on_one_backend_per_family() {
    for profile in Profile::BASIC {
        let s = setup(profile, &[]);
        for v6 in [false, true] {
            let target = vip(12, v6);
            let list: Vec<_> = (0..10).flat_map(|_| [("tcp", target), ("udp", target)]).collect();
            // Each operation is a new socket; the node's clients are one
            // client for affinity (the node's network namespace).
            // Affinity is per frontend: the TCP port and the UDP port each
            // keep their own backend.
            let out = host(&s, &ops(&list));
            for (proto, first) in [("tcp", 0), ("udp", 1)] {
                let chosen: BTreeSet<SocketAddr> =
                    out.iter().skip(first).step_by(2).map(|v| check(&s, v, v6, target)).collect();
                assert_eq!(chosen.len(), 1, "affinity: 10 {proto} sockets went to {chosen:?}");
            }
        }
        // All but the first socket of each frontend (4 of them) met its entry.
        assert_eq!(s.c.stat(Stat::AffinityHit), 36, "{}", s.c.stats_dump());
    }
}

#[test]
fn unconnected_udp_keeps_one_backend_per_socket_and_recvfrom_shows_the_vip() {
    for profile in Profile::BASIC {
        let s = setup(profile, &[]);
        for v6 in [false, true] {
            let target = vip(10, v6);
            let list: Vec<_> = (0..12).map(|_| ("udpfrom", target)).collect();
            let mut args = ops(&list);
            // `udpfrom ADDR N`: the count follows each address.
            args = args.chunks(2).flat_map(|c| [c[0].clone(), c[1].clone(), "10".to_owned()]).collect();
            let out = host(&s, &args);
            let mut per_socket = BTreeSet::new();
            for v in &out {
                let replies = ok(v)["replies"].as_array().expect("replies");
                assert_eq!(replies.len(), 10);
                let backends: BTreeSet<SocketAddr> = replies.iter().map(|r| check(&s, r, v6, target)).collect();
                assert_eq!(backends.len(), 1, "one socket's datagrams to one VIP went to several backends: {v}");
                per_socket.extend(backends);
            }
            assert!(per_socket.len() > 1, "12 sockets all met one backend: {per_socket:?}");
        }
    }
}

#[test]
fn a_frontend_without_backends_fails_connect_and_sendmsg_with_econnrefused() {
    for profile in Profile::BASIC {
        let s = setup(profile, &[]);
        let before = s.c.stat(Stat::SockReject);
        for target in [vip(11, false), vip(11, true), mapped(11)] {
            let mut args = ops(&[("tcp", target), ("udp", target), ("udpfrom", target)]);
            args.push("1".into());
            for v in host(&s, &args) {
                assert_eq!(v["errno"], ECONNREFUSED, "{target}: expected ECONNREFUSED: {v}");
            }
        }
        assert_eq!(s.c.stat(Stat::SockReject) - before, 9, "{}", s.c.stats_dump());
    }
}

#[test]
fn a_family_without_endpoints_is_refused_and_never_served_by_the_other_family() {
    for profile in Profile::BASIC {
        let s = setup(profile, &[]);
        // `only4` has IPv4 endpoints alone, `only6` IPv6 endpoints alone.
        for (n, v6) in [(14, false), (15, true)] {
            let mut args = ops(&[("tcp", vip(n, v6)), ("udp", vip(n, v6))]);
            // The other family of the same Service: refused, not translated.
            let other = [vip(n, !v6), if v6 { mapped(n) } else { vip(n, true) }];
            for target in other {
                args.extend(ops(&[("tcp", target), ("udp", target), ("udpfrom", target)]));
                args.push("1".into());
            }
            let out = host(&s, &args);
            check(&s, &out[0], v6, vip(n, v6));
            check(&s, &out[1], v6, vip(n, v6));
            for v in &out[2..] {
                assert_eq!(v["errno"], ECONNREFUSED, "VIP {n}: the family without endpoints must refuse: {v}");
            }
        }
    }
}

#[test]
fn ipv4_mapped_ipv6_sockets_reach_ipv4_backends_and_see_the_mapped_vip() {
    for profile in Profile::BASIC {
        let s = setup(profile, &[]);
        let target = mapped(10);
        let mut args = ops(&[("tcp", target), ("udp", target), ("udpfrom", target)]);
        args.push("3".into());
        let out = host(&s, &args);
        // The backends answer on their IPv4 address: IPv4 on the wire.
        check(&s, &out[0], false, target);
        check(&s, &out[1], false, target);
        for r in ok(&out[2])["replies"].as_array().expect("replies") {
            check(&s, r, false, target);
        }
    }
}

#[test]
fn a_process_outside_the_cgroup_is_untouched() {
    for profile in Profile::BASIC {
        let s = setup(profile, &[]);
        let before = s.c.stat(Stat::SockXlate);
        let node = &s.c.topo.node;
        for v6 in [false, true] {
            // Outside: the VIP is just an address, routed nowhere (the
            // node's `prohibit` route for the service range).
            for v in run(&s, node, false, &ops(&[("tcp", vip(10, v6)), ("udp", vip(10, v6))])) {
                assert_eq!(v["ok"], false, "a process outside the cgroup reached a VIP: {v}");
                assert_ne!(v["errno"], ECONNREFUSED, "refused by socket LB outside its cgroup: {v}");
            }
            // Inside: a connection to a backend's own address stays one.
            let direct = SocketAddr::new(s.c.addr(s.backends[0], v6), TARGET_PORT);
            let out = host(&s, &ops(&[("tcp", direct)]));
            assert_eq!(check(&s, &out[0], v6, direct), direct);
        }
        assert_eq!(s.c.stat(Stat::SockXlate), before, "{}", s.c.stats_dump());
    }
}

/// Spawn a client that keeps running; its stdout is read line by line.
fn spawn(s: &Setup, ops: &[String]) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut child =
        client(s, &s.c.topo.node, true, ops).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    (child, out)
}

fn next_line(out: &mut BufReader<std::process::ChildStdout>) -> Value {
    let mut line = String::new();
    out.read_line(&mut line).expect("read client output");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad client line {line:?}: {e}"))
}

#[test]
fn an_agent_restart_keeps_the_socket_programs_and_what_connected_sockets_connected_to() {
    for profile in Profile::BASIC {
        let mut s = setup(profile, &[]);
        // Connections opened before the restart, one per family.
        let held: Vec<_> = [false, true]
            .map(|v6| {
                let (child, mut out) = spawn(&s, &ops(&[("hold", vip(10, v6))]));
                assert_eq!(next_line(&mut out)["held"], true);
                (v6, child, out)
            })
            .into();
        // New connections all through the stop and the start.
        let (looping, mut loop_out) = spawn(&s, &[ops(&[("loop", vip(10, false))]), vec!["8000".into()]].concat());
        std::thread::sleep(std::time::Duration::from_millis(500));
        s.c.stop_agent();
        // No agent: the pinned links keep the programs attached.
        let out = host(&s, &ops(&[("tcp", vip(10, false)), ("tcp", vip(10, true))]));
        check(&s, &out[0], false, vip(10, false));
        check(&s, &out[1], true, vip(10, true));
        start(&mut s, &[]);
        let line = s
            .c
            .agent()
            .wait_for_line(|l| l.contains("socket-level load balancing on cgroup"), std::time::Duration::from_secs(1));
        for (_, prog) in proxy_common::programs::SOCK {
            assert!(line.contains(&format!("{prog} replaced")), "the restart must swap programs in place: {line}");
        }
        let v = next_line(&mut loop_out);
        assert_eq!(v["failed"], 0, "connections failed across the restart: {v}");
        assert_eq!(v["peers"], serde_json::json!([vip(10, false).to_string()]), "{v}");
        for (v6, mut child, mut out) in held {
            child.stdin.as_mut().expect("stdin").write_all(b"go\n").expect("wake the client");
            check(&s, &next_line(&mut out), v6, vip(10, v6));
            let _ = child.wait();
        }
        let mut looping = looping;
        let _ = looping.wait();
    }
}

#[test]
fn a_local_policy_without_local_endpoints_fails_with_ehostunreach() {
    for profile in Profile::BASIC {
        let s = setup(profile, &[]);
        for target in [vip(13, false), vip(13, true)] {
            let mut args = ops(&[("tcp", target), ("udp", target), ("udpfrom", target)]);
            args.push("1".into());
            for v in host(&s, &args) {
                assert_eq!(v["errno"], EHOSTUNREACH, "{target}: expected EHOSTUNREACH: {v}");
            }
        }
        assert_eq!(s.c.stat(Stat::DropNoLocalBackend), 6, "{}", s.c.stats_dump());
    }
}

#[test]
fn pods_use_the_packet_path_unless_socket_lb_pods_is_on() {
    for profile in Profile::BASIC {
        for pods in [false, true] {
            let s = setup(profile, if pods { &["--socket-lb-pods", "true"] } else { &[] });
            let ns = &s.c.topo.pods[s.pod].ns;
            let (xlate, dnat) = (s.c.stat(Stat::SockXlate), s.c.stat(Stat::DnatNew));
            let out = run(&s, ns, true, &ops(&[("tcp", vip(10, false)), ("tcp", vip(10, true))]));
            check(&s, &out[0], false, vip(10, false));
            check(&s, &out[1], true, vip(10, true));
            let (xlate, dnat) = (s.c.stat(Stat::SockXlate) - xlate, s.c.stat(Stat::DnatNew) - dnat);
            if pods {
                assert_eq!((xlate, dnat), (2, 0), "--socket-lb-pods: pods' connect() goes to the backend");
            } else {
                assert_eq!((xlate, dnat), (0, 2), "pods keep the packet path by default");
            }
        }
    }
}
