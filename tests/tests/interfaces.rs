//! Interfaces come and go under a running agent: it waits for the first
//! one instead of exiting, attaches each new one, forgets each one that is
//! gone (its pins with it), and logs every change. A `load` that attaches
//! to nothing leaves nothing behind.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use dsproxy_tests::{
    Cluster,
    echo::{tcp_request, udp_request},
    manifests::{Port, READY, documents, service, slice},
    topo::{vip4, vip6},
};

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");
const WAIT: Duration = Duration::from_secs(10);

/// Service `web` on both families over the pod that will be created
/// second on the node (pod link `k` holds 198.18.k.2 and fd00:0:0:k::2).
fn web() -> String {
    let ports = [
        Port { name: "tcp", port: 80, proto: "TCP", target: 8080 },
        Port { name: "udp", port: 80, proto: "UDP", target: 8080 },
    ];
    let vips = [IpAddr::V4(vip4(10)), IpAddr::V6(vip6(10))];
    let mut objs = vec![service("web", &vips, "RequireDualStack", &ports)];
    for (family, addr) in [("IPv4", "198.18.2.2"), ("IPv6", "fd00:0:0:2::2")] {
        let eps = [(addr.parse().expect("ip"), READY)];
        objs.push(slice(&format!("web-{family}"), "web", family, &[("tcp", 8080, "TCP"), ("udp", 8080, "UDP")], &eps));
    }
    documents(&objs)
}

fn pins(pin_dir: &Path, name: &str) -> [bool; 2] {
    ["ingress", "egress"].map(|dir| pin_dir.join("links").join(dir).join(name).exists())
}

#[test]
fn should_wait_for_interfaces_and_follow_them_as_they_come_and_go() {
    let mut c = Cluster::new(Path::new(BIN));
    // Nothing matches the attach patterns: no pod yet, and the uplink
    // renamed out of the device pattern.
    let node = &c.topo.node;
    node.ip(&["link", "set", "dsx0", "name", "uplink0"]);
    node.ip(&["link", "set", "uplink0", "up"]);
    c.write("web.yaml", &web());
    c.start_agent();
    let agent = c.agent();
    agent.wait_for_line(|l| l.contains("synced generation=1"), WAIT);
    agent.wait_for_line(|l| l.contains("no interface matches") && l.contains("waiting for one"), WAIT);

    // Pods appear: each interface is attached, pinned and logged.
    let client = c.client();
    let backend = c.backend("be0", 8080, false);
    for name in ["dsp1", "dsp2"] {
        c.agent().wait_for_line(|l| l.contains(&format!("attached to {name} ")), WAIT);
    }
    let pin_dir = c.bpf.pin_dir();
    assert_eq!(pins(&pin_dir, "dsp2"), [true, true], "the backend's interface is pinned at ingress and egress");
    for vip in [IpAddr::V4(vip4(10)), IpAddr::V6(vip6(10))] {
        let target = SocketAddr::new(vip, 80);
        let (tcp, udp) = c.in_pod(client, move || (tcp_request(target), udp_request(target)));
        assert_eq!(tcp.expect("TCP through the VIP").backend, "be0");
        assert_eq!(udp.expect("UDP through the VIP").backend, "be0");
    }

    // The backend's interface disappears: logged, its pins removed, the
    // agent keeps running and keeps the other interface.
    c.topo.node.ip(&["link", "del", "dsp2"]);
    c.agent().wait_for_line(|l| l.contains("interface dsp2") && l.contains("is gone"), WAIT);
    assert_eq!(pins(&pin_dir, "dsp2"), [false, false], "pins follow interfaces");
    assert_eq!(pins(&pin_dir, "dsp1"), [true, true], "the client's interface stays");
    let log = c.agent().log().join("\n");
    assert!(!log.contains("exiting"), "the agent keeps running:\n{log}");
    let _ = backend;
}

#[test]
fn should_leave_nothing_behind_when_load_attaches_to_nothing() {
    let c = Cluster::new(Path::new(BIN));
    let pin_dir = c.bpf.pin_dir();
    let out = Command::new("ip")
        .args(["netns", "exec", &c.topo.node.name, BIN, "load", "--attach", "nomatch*", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .expect("run dsproxy load");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "load must fail: {err}");
    assert!(err.contains("no interface matches"), "the error says why: {err}");
    let left: Vec<_> = std::fs::read_dir(&pin_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "a failed load leaves nothing pinned: {left:?}");
}
