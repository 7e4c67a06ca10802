//! Per-packet working state, in a per-CPU map (Cilium keeps its packet
//! context off the stack the same way): the verifier adds up the stack
//! frames of a call chain against 512 bytes, and an IPv6 packet, its flow,
//! two conntrack keys and a FIB lookup do not fit there. Every stage gets
//! the packet's `Work` by reference instead.
//!
//! A CPU runs one program at a time (TC and cgroup programs do not preempt
//! each other on a CPU), so a run has its CPU's entry to itself. Nothing in
//! it survives from one packet to the next: every field is written before
//! it is read.
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, bpf_redir_neigh},
    macros::map,
    maps::PerCpuArray,
};

use proxy_common::{CtKey, Hop};

use crate::{
    family::{Back, Family, Flow, V4, V6},
    icmp::Change,
    lb::Frontend,
    parse::{IcmpErr, Pkt},
};

#[repr(C)]
pub struct Work<F: Family> {
    /// The packet, as parsed (a TCP/UDP packet).
    pub pkt: Pkt<F::Addr>,
    /// The packet, as parsed (an ICMP error and what it quotes).
    pub err: IcmpErr<F::Addr>,
    /// The frontend the packet is addressed to.
    pub fe: Frontend<F::Addr>,
    /// The packet's flow.
    pub flow: Flow<F::Addr>,
    /// Where the flow's replies go.
    pub back: Back<F::Addr>,
    /// Conntrack keys being looked up or written.
    pub key: CtKey<F::Addr>,
    pub key2: CtKey<F::Addr>,
    /// FIB lookup parameters and result.
    pub fib: FibParams,
    /// Next hop for `bpf_redirect_neigh`.
    pub nh: bpf_redir_neigh,
    /// The route a FIB lookup found, as a flow caches it.
    pub hop: Hop,
    /// What to change in an ICMP error.
    pub change: Change<F::Addr>,
    /// `the clock (`conntrack::now`) when the packet's flow was looked up (read once
    /// per packet, on the paths that need a clock).
    pub now: u64,
}

#[map]
pub static WORK4_V1: PerCpuArray<Work<V4>> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static WORK6_V1: PerCpuArray<Work<V6>> = PerCpuArray::with_max_entries(1, 0);
