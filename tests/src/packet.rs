//! The datapath loaded for BPF_PROG_TEST_RUN: the real programs and maps on
//! a private bpffs, frames run through them one at a time. Used by the
//! packet tests and the datapath fuzzer (`fuzz`).
//!
//! Needs root and BPF; fails loudly without them.
use std::os::fd::AsFd;

use aya::Ebpf;
use dsproxy::{
    attach::{self, Capacities},
    diff::Programmed,
    maps::Maps,
    sync, testrun,
    types::{Backend, Desired, Frontend, FrontendSpec},
};
use proxy_common::programs;

use crate::netns::BpfFs;

/// The loaded datapath on a private bpffs (the harness's guard, unmounted
/// on drop, also when loading fails); fields drop in order, the mount last.
pub struct Env {
    pub ebpf: Ebpf,
    pub maps: Maps,
    pub prog: Programmed,
    _bpf: BpfFs,
}

impl Env {
    /// The datapath with small maps (the packet tests).
    pub fn new() -> Self {
        Self::with_capacities(&Capacities { svc: 1024, backend: 256, revnat: 256, ct: 1024, ..Capacities::default() })
    }

    pub fn with_capacities(caps: &Capacities) -> Self {
        let bpf = BpfFs::new();
        let (ebpf, maps) = attach::load(&bpf.pin_dir(), caps).expect("load datapath");
        Env { ebpf, maps, prog: Programmed::default(), _bpf: bpf }
    }

    /// The frame through program `name` (`proxy_common::programs`).
    pub fn try_run_prog(&mut self, name: &'static str, frame: &[u8]) -> std::io::Result<testrun::Outcome> {
        let prog = attach::program(&mut self.ebpf, name).expect("program");
        let fd = prog.fd().expect("loaded");
        testrun::run(&fd.as_fd(), frame, 1)
    }

    pub fn try_run(&mut self, frame: &[u8]) -> std::io::Result<testrun::Outcome> {
        self.try_run_prog(programs::FROM_POD, frame)
    }

    /// The frame through TC ingress of a pod interface.
    pub fn run(&mut self, frame: &[u8]) -> testrun::Outcome {
        self.try_run(frame).unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on a {}-byte frame: {e}", frame.len()))
    }

    /// The frame through TC egress (towards a client): where replies of
    /// flows the host stack forwards are translated. (BPF_PROG_TEST_RUN
    /// runs in a namespace where no interface is ours, so every flow here
    /// travels through the host stack.)
    pub fn egress(&mut self, frame: &[u8]) -> testrun::Outcome {
        self.try_run_prog(programs::EGRESS, frame)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN (egress) on a {}-byte frame: {e}", frame.len()))
    }

    /// Program these frontends (default settings) and nothing else.
    pub fn program(&mut self, frontends: &[(Frontend, Vec<Backend>)]) {
        let mut desired = Desired::default();
        for (f, b) in frontends {
            desired.frontends.insert(*f, FrontendSpec::new("default/web:p", b.clone()));
        }
        self.program_desired(&desired);
    }

    pub fn program_desired(&mut self, desired: &Desired) {
        let report = sync::sync(&mut self.maps, &mut self.prog, desired);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}
