//! Benchmark floor programs: BENCH ONLY, never attached, never loaded by
//! the agent (which loads its programs by name). `cargo xtask bench`
//! reports the datapath's cost per packet against them.
//!
//! - `dsproxy_floor`: parse the headers as the datapath does and make one
//!   hash lookup (the service map), nothing else: the floor the targets
//!   are ratios to.
//! - `dsproxy_floor_flow`: parse and look the packet's flow up in the
//!   conntrack forward map, reading what an established packet needs from
//!   the entry (no service lookup, no rewrite, no delivery): the least any
//!   design that keeps per-flow state pays for an established packet.
//! - `dsproxy_floor_new`: parse, the service lookup, the conntrack miss and
//!   the two inserts (forward and reverse entry) of a new flow, under keys
//!   no packet carries (`FLOOR_PROTO`): the least a new flow with state for
//!   both directions pays (no backend pick, no rewrite, no FIB lookup).
use aya_ebpf::{
    bindings::{BPF_ANY, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use proxy_common::{CtKey, SCOPE_EXTERNAL};

use crate::{
    family::{Family, V4, V6},
    parse::{self, ETH_P_IP, ETH_P_IPV6, Parsed},
    work::Work,
};

/// The protocol number of `dsproxy_floor_new`'s entries: no TCP or UDP
/// packet is looked up under it.
const FLOOR_PROTO: u8 = 0xfd;

/// Which floor.
#[derive(Clone, Copy)]
enum Floor {
    Lookup,
    Flow,
    New,
}

#[classifier]
pub fn dsproxy_floor(ctx: TcContext) -> i32 {
    floor(&ctx, Floor::Lookup)
}

#[classifier]
pub fn dsproxy_floor_flow(ctx: TcContext) -> i32 {
    floor(&ctx, Floor::Flow)
}

#[classifier]
pub fn dsproxy_floor_new(ctx: TcContext) -> i32 {
    floor(&ctx, Floor::New)
}

#[inline(always)]
fn floor(ctx: &TcContext, which: Floor) -> i32 {
    match parse::ethertype(ctx) {
        Ok(ETH_P_IP) => floor_v4(TcContext::new(ctx.skb.skb), which),
        Ok(ETH_P_IPV6) => floor_v6(TcContext::new(ctx.skb.skb), which),
        Ok(_) | Err(_) => TC_ACT_OK,
    }
}

#[inline(never)]
fn floor_v4(ctx: TcContext, which: Floor) -> i32 {
    let Some(w) = V4::work() else { return TC_ACT_OK };
    match parse::parse_v4(&ctx, w) {
        Ok(Parsed::L4) => stage::<V4>(w, which),
        Ok(Parsed::IcmpErr) | Err(_) => TC_ACT_OK,
    }
}

#[inline(never)]
fn floor_v6(ctx: TcContext, which: Floor) -> i32 {
    let Some(w) = V6::work() else { return TC_ACT_OK };
    match parse::parse_v6(&ctx, w) {
        Ok(Parsed::L4) => stage::<V6>(w, which),
        Ok(Parsed::IcmpErr) | Err(_) => TC_ACT_OK,
    }
}

#[inline(always)]
fn stage<F: Family>(w: &mut Work<F>, which: Floor) -> i32 {
    match which {
        Floor::Lookup => lookup::<F>(w),
        Floor::Flow => flow::<F>(w),
        Floor::New => new::<F>(w),
    }
}

// Every floor uses what it looked up, so the lookup is not optimised away.

#[inline(always)]
fn lookup<F: Family>(w: &Work<F>) -> i32 {
    let pkt = &w.pkt;
    match F::svc(pkt.daddr, pkt.l4.dport, pkt.l4.proto, SCOPE_EXTERNAL, 0) {
        Some(svc) if svc.count == u16::MAX => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}

#[inline(always)]
fn flow<F: Family>(w: &mut Work<F>) -> i32 {
    let pkt = &w.pkt;
    w.key = CtKey::new(pkt.src(), pkt.dst(), pkt.l4.proto);
    // A miss is told apart (the bench checks that every lookup found its
    // flow).
    let Some(ptr) = F::fwd_get(&w.key) else { return TC_ACT_UNSPEC };
    // SAFETY: pointer from a successful lookup, valid for this run (RCU).
    let e = unsafe { &*ptr };
    let seen =
        e.expires ^ u64::from(e.backend_port) ^ u64::from(e.to_backend.ifindex) ^ u64::from(e.to_backend.macs[0]);
    if seen == u64::MAX { TC_ACT_SHOT } else { TC_ACT_OK }
}

#[inline(always)]
fn new<F: Family>(w: &mut Work<F>) -> i32 {
    if lookup::<F>(w) == TC_ACT_SHOT {
        return TC_ACT_SHOT;
    }
    let pkt = &w.pkt;
    w.key = CtKey::new(pkt.src(), pkt.dst(), pkt.l4.proto);
    if F::fwd_get(&w.key).is_some() {
        return TC_ACT_SHOT;
    }
    w.key.proto = FLOOR_PROTO;
    let pkt = &w.pkt;
    w.key2 = CtKey::new(pkt.dst(), pkt.src(), FLOOR_PROTO);
    // Field by field, as the datapath fills them.
    let flow = &mut w.flow;
    (flow.expires, flow.state, flow.flags, flow.backend_id, flow.frontend_id) = (1, 0, 0, 0, 0);
    (flow.backend, flow.backend_port) = (pkt.daddr, pkt.l4.dport);
    (flow.nat, flow.nat_port) = (pkt.saddr, pkt.l4.sport);
    let b = &mut w.back;
    (b.client, b.client_port, b.frontend, b.frontend_port, b.flags) =
        (pkt.saddr, pkt.l4.sport, pkt.daddr, pkt.l4.dport, 0);
    let fwd = F::fwd_insert(&w.key, &w.flow, u64::from(BPF_ANY));
    let rev = F::rev_insert(&w.key2, &w.back, u64::from(BPF_ANY));
    if fwd.is_err() || rev.is_err() { TC_ACT_SHOT } else { TC_ACT_OK }
}
