//! Per-packet cost through BPF_PROG_TEST_RUN at growing numbers of Services.
//!
//! BPF_PROG_TEST_RUN runs every repetition on one buffer, so after a DNAT
//! the program would see its own rewritten packet. Every measurement is
//! therefore one call with `repeat = 1` on a fresh frame, rotating through
//! many flows and Services; the figure is the median of the kernel-measured
//! run times. The floor program (`dsproxy_floor`: parse + one hash lookup)
//! is measured on the same frames the same way.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
};

use aya::programs::SchedClassifier;

/// `TC_ACT_OK` and `TC_ACT_REDIRECT`.
const TC_ACT_OK: i32 = 0;
const TC_ACT_REDIRECT: i32 = 7;
use dsproxy::{
    attach::{self, Capacities},
    diff::Programmed,
    frames::{ACK, SYN, TCP, frame, inspect},
    sync, testrun,
    types::{Backend, Desired, Frontend, FrontendSpec, Proto},
};
use serde::Serialize;

use crate::vip;
use dsproxy_tests::netns::{BpfFs, NetNs};

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub family: &'static str,
    pub services: usize,
    /// Median ns per packet.
    pub new_flow: f64,
    pub established: f64,
    /// Established, on a flow the host stack forwards.
    pub established_stack: f64,
    pub reply: f64,
    pub non_service: f64,
    pub floor: f64,
    /// Parse and the flow's conntrack lookup (`dsproxy_floor_flow`, on
    /// established frames): what any established packet pays.
    pub floor_flow: f64,
    /// Parse, service lookup, conntrack miss and two inserts
    /// (`dsproxy_floor_new`, on opening frames): what any new flow pays.
    pub floor_new: f64,
}

fn backend(i: usize, v6: bool) -> IpAddr {
    let n = u8::try_from(i % 250).expect("small");
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0x100 + u16::from(n), 0, 0, 0, 2))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 18, 100 + n % 100, 2 + n / 100))
    }
}

fn client(v6: bool) -> IpAddr {
    if v6 { "fd00:0:0:1::2".parse().expect("v6") } else { "198.18.1.2".parse().expect("v4") }
}

/// The client of `dsproxy_floor_new`'s frames: its flows are never the
/// measured ones, so the floor warms none of their conntrack buckets.
fn floor_client(v6: bool) -> IpAddr {
    if v6 { "fd00:0:0:1::3".parse().expect("v6") } else { "198.18.1.3".parse().expect("v4") }
}

/// Deterministic spread over `n` (a multiplicative hash), so consecutive
/// samples hit unrelated Services.
fn spread(i: usize, n: usize) -> usize {
    (i.wrapping_mul(2_654_435_761) >> 7) % n
}

fn median(mut v: Vec<u32>) -> f64 {
    v.sort_unstable();
    f64::from(v[v.len() / 2])
}

/// The loaded datapath; fields drop in order, the bpffs last.
struct Loaded {
    ebpf: aya::Ebpf,
    maps: dsproxy::maps::Maps,
    _mount: BpfFs,
}

/// The floor programs, loaded beside the datapath (which the agent loads
/// without them).
const FLOORS: [&str; 3] =
    [proxy_common::programs::FLOOR, proxy_common::programs::FLOOR_FLOW, proxy_common::programs::FLOOR_NEW];

fn load(services: usize, samples: usize) -> Loaded {
    let mount = BpfFs::new();
    let n = u32::try_from(services).expect("fits");
    let caps = Capacities {
        svc: n * 3 + 1024,
        backend: 1024,
        revnat: n + 16,
        ct: u32::try_from(samples * 4 + 1024).expect("fits"),
        ..Capacities::default()
    };
    let (mut ebpf, maps) = attach::load(&mount.pin_dir(), &caps).expect("load datapath");
    for name in FLOORS {
        let floor: &mut SchedClassifier =
            ebpf.program_mut(name).expect("floor program").try_into().expect("classifier");
        floor.load().expect("load floor program");
    }
    for name in [proxy_common::programs::FROM_POD, proxy_common::programs::FLOOR] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).expect("program").try_into().expect("classifier");
        if let Ok(info) = p.info() {
            eprintln!(
                "  program {name}: {} instructions verified, {} after translation",
                info.verified_instruction_count().unwrap_or(0),
                info.size_translated().unwrap_or(0) / 8
            );
        }
    }
    Loaded { ebpf, maps, _mount: mount }
}

fn run(ebpf: &mut aya::Ebpf, prog: &str, f: &[u8]) -> testrun::Outcome {
    let p: &mut SchedClassifier = ebpf.program_mut(prog).expect("program").try_into().expect("classifier");
    let fd = p.fd().expect("loaded");
    testrun::run(&fd.as_fd(), f, 1).expect("BPF_PROG_TEST_RUN")
}

/// The node the programs run on: a namespace of the bench's own whose
/// routes to backends and clients leave by a pod veth of ours with
/// resolved neighbours, so a translated packet takes the whole path of a
/// same-node Service connection (FIB lookup, MTU and TTL checks, MAC
/// rewrite, redirect into the pod) as on a real node. Returns the
/// namespace (deleted on drop) and the pod interface's ifindex there.
fn node() -> (NetNs, u32) {
    let ns = NetNs::new("bench-dp");
    ns.ip(&["link", "add", "dpod0", "type", "veth", "peer", "name", "dpod1"]);
    for dev in ["dpod0", "dpod1"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    for key in ["net.ipv4.conf.all.forwarding", "net.ipv6.conf.all.forwarding"] {
        ns.sysctl(key, "1");
    }
    let mut batch = String::from(
        "route add 198.18.0.0/15 dev dpod0\nroute add fd00::/16 dev dpod0\n\
         neigh replace 198.18.1.2 lladdr 02:00:00:00:00:02 dev dpod0 nud permanent\n\
         neigh replace fd00:0:0:1::2 lladdr 02:00:00:00:00:02 dev dpod0 nud permanent\n",
    );
    for i in 0..250 {
        for v6 in [false, true] {
            let _ =
                writeln!(batch, "neigh replace {} lladdr 02:00:00:00:01:02 dev dpod0 nud permanent", backend(i, v6));
        }
    }
    let file = std::env::temp_dir().join(format!("{}.batch", ns.name));
    std::fs::write(&file, batch).expect("write ip batch");
    ns.ip(&["-batch", &file.to_string_lossy()]);
    let _ = std::fs::remove_file(&file);
    let ifindex = ns.run(|| ifindex_of("dpod0"));
    (ns, ifindex)
}

fn ifindex_of(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: a valid NUL-terminated string; if_nametoindex only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i != 0, "interface {name} not found");
    i
}

/// Measure one size on both families, on a node namespace of the bench's
/// own (see `node`).
pub fn measure(services: usize, samples: usize) -> Vec<Row> {
    let (ns, ifindex) = node();
    let rows = ns.run(move || measure_on(services, samples, ifindex));
    drop(ns);
    rows
}

fn measure_on(services: usize, samples: usize, pod_ifindex: u32) -> Vec<Row> {
    let mut l = load(services, samples);
    l.maps.set_iface(pod_ifindex, proxy_common::iface_role::POD).expect("register the pod interface");
    let mut desired = Desired::default();
    for v6 in [false, true] {
        for i in 0..services {
            let (addr, port) = vip(i, v6);
            let backends = (0..2)
                .map(|k| Backend { addr: backend(i * 2 + k, v6), port: 8080, proto: Proto::Tcp })
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            desired
                .frontends
                .insert(Frontend::new(addr, port, Proto::Tcp), FrontendSpec::new(format!("bench/svc-{i}"), backends));
        }
    }
    let report = sync::sync(&mut l.maps, &mut Programmed::default(), &desired);
    assert!(report.errors.is_empty(), "programming {services} services: {:?}", report.errors);

    let mut rows = Vec::new();
    for v6 in [false, true] {
        let c = client(v6);
        let mut t_new = Vec::with_capacity(samples);
        let mut t_floor = Vec::with_capacity(samples);
        let mut t_floor_new = Vec::with_capacity(samples);
        let mut flows = Vec::with_capacity(samples);
        for i in 0..samples {
            let sport = 1024 + u16::try_from(i % 60_000).expect("port");
            let dst = vip(spread(i, services), v6);
            let syn = frame((c, sport), dst, TCP, SYN);
            t_floor.push(run(&mut l.ebpf, proxy_common::programs::FLOOR, &syn).duration_ns);
            let other = frame((floor_client(v6), sport), dst, TCP, SYN);
            t_floor_new.push(run(&mut l.ebpf, proxy_common::programs::FLOOR_NEW, &other).duration_ns);
            let out = run(&mut l.ebpf, proxy_common::programs::FROM_POD, &syn);
            assert_eq!(out.verdict, TC_ACT_REDIRECT, "a new flow not redirected");
            t_new.push(out.duration_ns);
            flows.push(((c, sport), dst, inspect(&out.frame).dst));
        }
        let mut t_est = Vec::with_capacity(samples);
        let mut t_reply = Vec::with_capacity(samples);
        let mut t_none = Vec::with_capacity(samples);
        let mut t_floor_flow = Vec::with_capacity(samples);
        for i in 0..flows.len() {
            let (src_j, dst_j, be_j) = flows[spread(i, flows.len())];
            let est = run(&mut l.ebpf, proxy_common::programs::FROM_POD, &frame(src_j, dst_j, TCP, ACK));
            let reply = run(&mut l.ebpf, proxy_common::programs::FROM_POD, &frame(be_j, src_j, TCP, ACK));
            // Both take the whole path: translated and redirected into the
            // pod, as on a node (a figure of the host-stack path would
            // flatter).
            assert_eq!((est.verdict, reply.verdict), (TC_ACT_REDIRECT, TC_ACT_REDIRECT), "not redirected");
            t_est.push(est.duration_ns);
            t_reply.push(reply.duration_ns);
            let other = (if v6 { "fd00:0:0:9::9".parse().expect("v6") } else { "198.18.9.9".parse().expect("v4") }, 80);
            t_none.push(run(&mut l.ebpf, proxy_common::programs::FROM_POD, &frame(src_j, other, TCP, ACK)).duration_ns);
        }
        // The flow-lookup floor in a pass of its own, in the same order: each
        // entry was last touched a whole pass before, as for the established
        // packets above (interleaved, one would warm the other's entries).
        for i in 0..flows.len() {
            let (src_j, dst_j, _) = flows[spread(i, flows.len())];
            let f = frame(src_j, dst_j, TCP, ACK);
            let out = run(&mut l.ebpf, proxy_common::programs::FLOOR_FLOW, &f);
            assert_eq!(out.verdict, TC_ACT_OK, "the flow-lookup floor did not find the flow");
            t_floor_flow.push(out.duration_ns);
        }
        // The same packets on flows the host stack forwards (the route
        // leaves by no interface of ours): the difference is what
        // delivering past the host stack costs (FIB lookup, MAC rewrite,
        // redirect).
        l.maps.remove_iface(pod_ifindex).expect("unregister the pod interface");
        let mut stack_flows = Vec::with_capacity(samples);
        for i in 0..samples {
            let sport = 40_000 + u16::try_from(i % 20_000).expect("port");
            let dst = vip(spread(i, services), v6);
            let out = run(&mut l.ebpf, proxy_common::programs::FROM_POD, &frame((c, sport), dst, TCP, SYN));
            assert_eq!(out.verdict, TC_ACT_OK, "a host-stack flow redirected");
            stack_flows.push(((c, sport), dst));
        }
        let mut t_stack = Vec::with_capacity(samples);
        for i in 0..stack_flows.len() {
            let (src_j, dst_j) = stack_flows[spread(i, stack_flows.len())];
            let est = run(&mut l.ebpf, proxy_common::programs::FROM_POD, &frame(src_j, dst_j, TCP, ACK));
            assert_eq!(est.verdict, TC_ACT_OK, "a host-stack flow redirected");
            t_stack.push(est.duration_ns);
        }
        l.maps.set_iface(pod_ifindex, proxy_common::iface_role::POD).expect("register the pod interface");
        rows.push(Row {
            family: if v6 { "IPv6" } else { "IPv4" },
            services,
            new_flow: median(t_new),
            established: median(t_est),
            established_stack: median(t_stack),
            reply: median(t_reply),
            non_service: median(t_none),
            floor: median(t_floor),
            floor_flow: median(t_floor_flow),
            floor_new: median(t_floor_new),
        });
    }
    rows
}
