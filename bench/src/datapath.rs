//! Per-packet cost through BPF_PROG_TEST_RUN at growing numbers of Services.
//!
//! BPF_PROG_TEST_RUN runs every repetition on one buffer, so after a DNAT
//! the program would see its own rewritten packet. Every measurement is
//! therefore one call with `repeat = 1` on a fresh frame, rotating through
//! many flows and Services; the figure is the median of the kernel-measured
//! run times. The floor program (`dsproxy_floor`: parse + one hash lookup)
//! is measured on the same frames the same way.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd,
};

use aya::programs::SchedClassifier;
use dsproxy::{
    attach::{self, Capacities},
    diff::Programmed,
    frames::{ACK, SYN, TCP, frame, inspect},
    sync, testrun,
    types::{Backend, Desired, Frontend, FrontendSpec, Proto},
};
use serde::Serialize;

use crate::vip;
use dsproxy_tests::netns::BpfFs;

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub family: &'static str,
    pub services: usize,
    /// Median ns per packet.
    pub new_flow: f64,
    pub established: f64,
    pub reply: f64,
    pub non_service: f64,
    pub floor: f64,
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
    let floor: &mut SchedClassifier =
        ebpf.program_mut(proxy_common::programs::FLOOR).expect("floor program").try_into().expect("classifier");
    floor.load().expect("load floor program");
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

/// Measure one size on both families.
pub fn measure(services: usize, samples: usize) -> Vec<Row> {
    let mut l = load(services, samples);
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
        let mut flows = Vec::with_capacity(samples);
        for i in 0..samples {
            let sport = 1024 + u16::try_from(i % 60_000).expect("port");
            let dst = vip(spread(i, services), v6);
            let syn = frame((c, sport), dst, TCP, SYN);
            t_floor.push(run(&mut l.ebpf, proxy_common::programs::FLOOR, &syn).duration_ns);
            let out = run(&mut l.ebpf, proxy_common::programs::FROM_POD, &syn);
            t_new.push(out.duration_ns);
            flows.push(((c, sport), dst, inspect(&out.frame).dst));
        }
        let mut t_est = Vec::with_capacity(samples);
        let mut t_reply = Vec::with_capacity(samples);
        let mut t_none = Vec::with_capacity(samples);
        for i in 0..flows.len() {
            let (src_j, dst_j, be_j) = flows[spread(i, flows.len())];
            t_est.push(run(&mut l.ebpf, proxy_common::programs::FROM_POD, &frame(src_j, dst_j, TCP, ACK)).duration_ns);
            t_reply.push(run(&mut l.ebpf, proxy_common::programs::FROM_POD, &frame(be_j, src_j, TCP, ACK)).duration_ns);
            let other = (if v6 { "fd00:0:0:9::9".parse().expect("v6") } else { "198.18.9.9".parse().expect("v4") }, 80);
            t_none.push(run(&mut l.ebpf, proxy_common::programs::FROM_POD, &frame(src_j, other, TCP, ACK)).duration_ns);
        }
        rows.push(Row {
            family: if v6 { "IPv6" } else { "IPv4" },
            services,
            new_flow: median(t_new),
            established: median(t_est),
            reply: median(t_reply),
            non_service: median(t_none),
            floor: median(t_floor),
        });
    }
    rows
}
