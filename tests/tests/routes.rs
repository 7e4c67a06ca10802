//! The route a flow delivered past the host stack caches (`Hop`): crafted
//! frames through the real TC program with BPF_PROG_TEST_RUN, on a node
//! namespace of the test's own whose routes leave by a pod veth registered
//! as ours, with permanent neighbours.
//!
//! Needs root and BPF; fails loudly without them.
use std::{net::IpAddr, time::Duration};

use dsproxy::{
    frames::{ACK, SYN, TCP, frame, inspect},
    types::{Backend, Frontend, Proto},
};
use dsproxy_tests::{netns::NetNs, packet::Env};
use proxy_common::{ROUTE_CACHE_NS, iface_role};

const TC_ACT_OK: i32 = 0;
const TC_ACT_REDIRECT: i32 = 7;

const BACKEND_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];
const MOVED_MAC: [u8; 6] = [0x02, 0, 0, 0, 9, 9];

fn addr(s: &str) -> IpAddr {
    s.parse().expect("addr")
}

/// Client, VIP and the two backends of one family.
fn family(v6: bool) -> (IpAddr, IpAddr, [&'static str; 2]) {
    if v6 {
        (addr("fd00:0:0:1::2"), addr("fd00:ffff::10"), ["fd00:0:0:2::2", "fd00:0:0:3::2"])
    } else {
        (addr("198.18.1.2"), addr("198.19.0.10"), ["198.18.2.2", "198.18.3.2"])
    }
}

fn mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The node: a veth whose host end (`dpod0`) carries the routes to every
/// test address, with the backends' neighbours resolved. Returns the
/// namespace (deleted on drop) and `dpod0`'s ifindex.
fn node(role: &str) -> (NetNs, u32) {
    let ns = NetNs::new(role);
    ns.ip(&["link", "add", "dpod0", "type", "veth", "peer", "name", "dpod1"]);
    for dev in ["dpod0", "dpod1"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    for key in ["net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding"] {
        ns.sysctl(key, "1");
    }
    ns.ip(&["route", "add", "198.18.0.0/15", "dev", "dpod0"]);
    ns.ip(&["-6", "route", "add", "fd00::/16", "dev", "dpod0"]);
    for v6 in [false, true] {
        let (client, _, backends) = family(v6);
        ns.ip(&[
            "neigh",
            "replace",
            &client.to_string(),
            "lladdr",
            "02:00:00:00:00:02",
            "dev",
            "dpod0",
            "nud",
            "permanent",
        ]);
        for b in backends {
            ns.ip(&["neigh", "replace", b, "lladdr", &mac(BACKEND_MAC), "dev", "dpod0", "nud", "permanent"]);
        }
    }
    let line = ns.ip(&["-o", "link", "show", "dpod0"]);
    let ifindex = line.split(':').next().and_then(|i| i.trim().parse().ok()).expect("ifindex of dpod0");
    (ns, ifindex)
}

/// The datapath in the node's namespace with `dpod0` registered as a pod
/// interface and TCP port 80 on both VIPs.
fn datapath(ifindex: u32) -> Env {
    let mut env = Env::new();
    env.maps.set_iface(ifindex, iface_role::POD).expect("register dpod0");
    let mut fronts = Vec::new();
    for v6 in [false, true] {
        let (_, vip, backends) = family(v6);
        let b = backends.iter().map(|a| Backend { addr: addr(a), port: 8080, proto: Proto::Tcp }).collect();
        fronts.push((Frontend::new(vip, 80, Proto::Tcp), b));
    }
    env.program(&fronts);
    env
}

/// TTL / hop limit of a frame.
fn ttl(f: &[u8], v6: bool) -> u8 {
    if v6 { f[21] } else { f[22] }
}

/// A frame delivered past the host stack to a backend: translated with
/// valid checksums, the backend's MAC, the TTL decremented once.
fn assert_redirected(out: &dsproxy::testrun::Outcome, v6: bool, dst_mac: [u8; 6], what: &str) -> IpAddr {
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "{what}: not redirected");
    assert_eq!(out.frame[..6], dst_mac, "{what}: destination MAC");
    assert_eq!(ttl(&out.frame, v6), 63, "{what}: TTL / hop limit decremented once");
    let seen = inspect(&out.frame);
    assert_eq!(seen.dst.1, 8080, "{what}: translated");
    seen.dst.0
}

#[test]
fn should_deliver_by_the_cached_route_and_stop_once_its_interface_is_forgotten() {
    let (ns, ifindex) = node("routes");
    ns.run(move || {
        let mut env = datapath(ifindex);
        for v6 in [false, true] {
            let (client, vip, _) = family(v6);
            let c = (client, 40_000);
            let syn = env.run(&frame(c, (vip, 80), TCP, SYN));
            let backend = assert_redirected(&syn, v6, BACKEND_MAC, "SYN");
            // The flow's later packets take the route the SYN cached.
            for i in 0..3 {
                let ack = env.run(&frame(c, (vip, 80), TCP, ACK));
                assert_eq!(assert_redirected(&ack, v6, BACKEND_MAC, "ACK"), backend, "ACK {i}: same backend");
            }
            // dsproxy no longer handles the interface: well within the
            // cache's lifetime, no packet is redirected to it any more.
            env.maps.remove_iface(ifindex).expect("forget dpod0");
            let input = frame(c, (vip, 80), TCP, ACK);
            let ack = env.run(&input);
            assert_eq!(ack.verdict, TC_ACT_OK, "after the interface is forgotten: to the host stack");
            assert_eq!(ack.frame[..12], input[..12], "MACs untouched for the host stack");
            assert_eq!(ttl(&ack.frame, v6), 64, "the host stack decrements the TTL, not dsproxy");
            assert_eq!(inspect(&ack.frame).dst, (backend, 8080), "still translated for the host stack");
            env.maps.set_iface(ifindex, iface_role::POD).expect("register dpod0 again");
        }
    });
}

#[test]
fn should_hand_a_packet_bigger_than_the_cached_mtu_to_the_host_stack() {
    let (ns, ifindex) = node("routes-mtu");
    ns.ip(&["link", "set", "dpod0", "mtu", "1280"]);
    ns.run(move || {
        let mut env = datapath(ifindex);
        for v6 in [false, true] {
            let (client, vip, _) = family(v6);
            let c = (client, 40_001);
            let syn = env.run(&frame(c, (vip, 80), TCP, SYN));
            assert_redirected(&syn, v6, BACKEND_MAC, "SYN");
            // 1,400 bytes on the wire (the IP packet's own length is what
            // it is; what follows is link padding the skb carries): more
            // than the link takes, on the cached route as on the first.
            let mut big = frame(c, (vip, 80), TCP, ACK);
            big.resize(1400, 0);
            let out = env.run(&big);
            assert_eq!(out.verdict, TC_ACT_OK, "a packet over the MTU goes to the host stack (which answers)");
            assert_eq!(ttl(&out.frame, v6), 64, "not forwarded by dsproxy");
            let small = env.run(&frame(c, (vip, 80), TCP, ACK));
            assert_redirected(&small, v6, BACKEND_MAC, "a packet that fits");
        }
    });
}

/// Point the neighbour entry of `addr` in namespace `ns` at `lladdr`.
fn set_neigh(ns: &str, addr: IpAddr, lladdr: [u8; 6]) {
    let (addr, lladdr) = (addr.to_string(), mac(lladdr));
    dsproxy_tests::netns::sh(&[
        "ip",
        "-n",
        ns,
        "neigh",
        "replace",
        &addr,
        "lladdr",
        &lladdr,
        "dev",
        "dpod0",
        "nud",
        "permanent",
    ]);
}

#[test]
fn should_follow_a_changed_neighbour_once_the_cached_route_expires() {
    let (ns, ifindex) = node("routes-neigh");
    let ns_name = ns.name.clone();
    ns.run(move || {
        let mut env = datapath(ifindex);
        for v6 in [false, true] {
            let (client, vip, _) = family(v6);
            let c = (client, 40_002);
            let syn = env.run(&frame(c, (vip, 80), TCP, SYN));
            let backend = assert_redirected(&syn, v6, BACKEND_MAC, "SYN");
            // The backend's MAC changes (a neighbour update).
            set_neigh(&ns_name, backend, MOVED_MAC);
            std::thread::sleep(Duration::from_nanos(ROUTE_CACHE_NS) + Duration::from_millis(100));
            let ack = env.run(&frame(c, (vip, 80), TCP, ACK));
            assert_eq!(assert_redirected(&ack, v6, MOVED_MAC, "ACK after the cache's lifetime"), backend);
            set_neigh(&ns_name, backend, BACKEND_MAC);
        }
    });
}
