//! Security: a Service never captures traffic for an address it does not
//! own. A hostile Service naming this node's own address is rejected by
//! the running agent and the node's traffic stays the node's; a Service
//! naming cloud metadata (169.254.169.254) is never programmed, shown at
//! packet level with BPF_PROG_TEST_RUN (no real traffic is ever sent to
//! an address outside 198.18.0.0/15 and fd00::/8).
//!
//! Needs root and BPF; fails loudly without them.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::Path,
    time::Duration,
};

use dsproxy::{
    attach::{self, Capacities},
    diff::Programmed,
    frames::{SYN, TCP, UDP, frame, inspect},
    model, sync, testrun,
};
use dsproxy_tests::{
    Cluster,
    echo::{Backend, tcp_request, udp_request},
    manifests::{Port, READY, documents, service, slice},
    netns::BpfFs,
    topo::{vip4, vip6},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");
const TARGET: u16 = 8080;
const TC_ACT_OK: i32 = 0;

fn ports() -> [Port<'static>; 2] {
    [
        Port { name: "tcp", port: 80, proto: "TCP", target: TARGET },
        Port { name: "udp", port: 80, proto: "UDP", target: TARGET },
    ]
}

/// Service `name` on `ips` (both families) with one slice per family over
/// `backend`'s addresses.
fn service_on(c: &Cluster, name: &str, ips: [IpAddr; 2], backend: usize) -> Vec<Value> {
    let mut objs = vec![service(name, &ips, "RequireDualStack", &ports())];
    for v6 in [false, true] {
        let fam = if v6 { "IPv6" } else { "IPv4" };
        objs.push(slice(
            &format!("{name}-{fam}"),
            name,
            fam,
            &[("tcp", TARGET, "TCP"), ("udp", TARGET, "UDP")],
            &[(c.addr(backend, v6), READY)],
        ));
    }
    objs
}

/// Who answers TCP and UDP on `target`, from pod `client`.
fn answers(c: &Cluster, client: usize, target: SocketAddr) -> (String, String) {
    c.in_pod(client, move || {
        let tcp = tcp_request(target).unwrap_or_else(|e| panic!("TCP {target}: {e}")).backend;
        let udp = udp_request(target).unwrap_or_else(|e| panic!("UDP {target}: {e}")).backend;
        (tcp, udp)
    })
}

#[test]
fn should_reject_a_service_on_a_node_address_and_keep_the_nodes_traffic() {
    let mut c = Cluster::new(Path::new(BIN));
    let client = c.client(); // link 1: the node's dsp1 holds 198.18.1.1 and fd00:0:0:1::1
    let good = c.backend("good", TARGET, false);
    let evil = c.backend("evil", TARGET, false);
    let node_v4: IpAddr = "198.18.1.1".parse().expect("ip");
    let node_v6: IpAddr = "fd00:0:0:1::1".parse().expect("ip");
    // A server of the node itself, on its own addresses, port 80.
    for ip in [node_v4, node_v6] {
        let server = Backend::start(&c.topo.node, "node", SocketAddr::new(ip, 80));
        c.servers.push(server);
    }
    let mut objs = service_on(&c, "web", [vip4(10).into(), vip6(10).into()], good);
    objs.extend(service_on(&c, "hijack", [node_v4, node_v6], evil));
    c.write("objects.yaml", &documents(&objs));
    // The agent attaches after its first sync: traffic meets that state.
    c.start_agent();
    for ip in [node_v4, node_v6] {
        assert_eq!(
            answers(&c, client, SocketAddr::new(ip, 80)),
            ("node".to_owned(), "node".to_owned()),
            "the node's own server answers on {ip}, never the hostile endpoint"
        );
    }
    for vip in [IpAddr::from(vip4(10)), IpAddr::from(vip6(10))] {
        assert_eq!(
            answers(&c, client, SocketAddr::new(vip, 80)),
            ("good".to_owned(), "good".to_owned()),
            "the good Service keeps working on {vip}"
        );
    }
    let line = c.agent().wait_for_line(|l| l.contains("rejected Service default/hijack"), Duration::from_secs(10));
    assert!(line.contains("198.18.1.1 is an address of this node"), "{line}");
    // An address this node gains later is refused from then on: a
    // Service on it, accepted while it was nobody's, is rejected.
    let late: IpAddr = "198.18.77.1".parse().expect("ip");
    objs.push(service("latecomer", &[late], "SingleStack", &ports()));
    c.change_and_sync(|| c.write("objects.yaml", &documents(&objs)));
    assert!(!c.agent().log().iter().any(|l| l.contains("rejected Service default/latecomer")));
    c.topo.node.ip(&["addr", "add", "198.18.77.1/32", "dev", "dsp1"]);
    let line = c.agent().wait_for_line(|l| l.contains("rejected Service default/latecomer"), Duration::from_secs(10));
    assert!(line.contains("198.18.77.1 is an address of this node (an interface)"), "{line}");
    let log = c.agent().log();
    assert!(!log.iter().any(|l| l.contains("not programmed")), "no sync error: {log:?}");
    assert!(
        !log.iter().any(|l| l.contains("checking Service default/web again")),
        "only the Service naming the new address is checked again: {log:?}"
    );
}

/// The loaded datapath on a private bpffs, fed by the model.
struct Env {
    ebpf: aya::Ebpf,
    _maps: dsproxy::maps::Maps,
    _bpf: BpfFs,
}

impl Env {
    fn run(&mut self, f: &[u8]) -> testrun::Outcome {
        let prog = attach::program(&mut self.ebpf, proxy_common::programs::FROM_POD).expect("program");
        let fd = prog.fd().expect("loaded");
        testrun::run(&fd.as_fd(), f, 1).expect("BPF_PROG_TEST_RUN")
    }
}

fn json_objects<T: serde::de::DeserializeOwned>(objs: &[Value], kind: &str) -> Vec<T> {
    objs.iter().filter(|o| o["kind"] == kind).map(|o| serde_json::from_value(o.clone()).expect(kind)).collect()
}

#[test]
fn should_pass_frames_to_cloud_metadata_untouched_when_a_service_claims_it() {
    dsproxy_tests::netns::require_root();
    let vip_good = [IpAddr::from(vip4(10)), IpAddr::from(vip6(10))];
    let metadata: [IpAddr; 2] = ["169.254.169.254".parse().expect("ip"), "fe80::a9fe:a9fe".parse().expect("ip")];
    let slices_for = |name: &str, b4: &str, b6: &str| {
        ["IPv4", "IPv6"].map(|fam| {
            let b: IpAddr = if fam == "IPv4" { b4 } else { b6 }.parse().expect("ip");
            slice(&format!("{name}-{fam}"), name, fam, &[("tcp", TARGET, "TCP"), ("udp", TARGET, "UDP")], &[(b, READY)])
        })
    };
    let mut objs = vec![service("web", &vip_good, "RequireDualStack", &ports())];
    objs.extend(slices_for("web", "198.18.2.2", "fd00:0:0:2::2"));
    objs.push(service("meta", &metadata, "RequireDualStack", &ports()));
    objs.extend(slices_for("meta", "198.18.66.6", "fd00:0:0:66::6"));
    let services: Vec<k8s_openapi::api::core::v1::Service> = json_objects(&objs, "Service");
    let slices: Vec<k8s_openapi::api::discovery::v1::EndpointSlice> = json_objects(&objs, "EndpointSlice");
    let (desired, rejected, _) = model::desired(&services, &slices, None, &model::Config::default());
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert_eq!(rejected[0].name, "default/meta");
    assert!(rejected[0].reason.contains("169.254.169.254 is link-local"), "{}", rejected[0]);

    let bpf = BpfFs::new();
    let caps = Capacities { svc: 1024, backend: 256, revnat: 256, ct: 1024, ..Capacities::default() };
    let (ebpf, mut maps) = attach::load(&bpf.pin_dir(), &caps).expect("load datapath");
    let report = sync::sync(&mut maps, &mut Programmed::default(), &desired);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let mut env = Env { ebpf, _maps: maps, _bpf: bpf };
    let clients: [IpAddr; 2] = ["198.18.1.2".parse().expect("ip"), "fd00:0:0:1::2".parse().expect("ip")];
    for (i, client) in clients.into_iter().enumerate() {
        for (proto, flags) in [(TCP, SYN), (UDP, 0)] {
            let to_meta = frame((client, 40000), (metadata[i], 80), proto, flags);
            let out = env.run(&to_meta);
            assert_eq!(out.verdict, TC_ACT_OK, "{}: verdict", metadata[i]);
            assert_eq!(out.frame, to_meta, "a frame to {} (proto {proto}) passes untouched", metadata[i]);
            // The same program and maps do translate the good Service.
            let to_good = frame((client, 40001), (vip_good[i], 80), proto, flags);
            let seen = inspect(&env.run(&to_good).frame);
            assert_eq!(seen.dst.1, TARGET, "{}: the good Service is translated", vip_good[i]);
            assert_ne!(seen.dst.0, vip_good[i]);
        }
    }
}
