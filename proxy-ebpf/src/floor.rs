//! Benchmark floor programs: BENCH ONLY, never attached, never loaded by
//! the agent (which loads its programs by name). `cargo xtask bench`
//! reports the datapath's cost per packet against them.
//!
//! - `dsproxy_floor`: parse the headers as the datapath does and make one
//!   hash lookup (the service map), nothing else.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use proxy_common::SCOPE_EXTERNAL;

use crate::{
    family::{Family, V4, V6},
    parse::{self, ETH_P_IP, ETH_P_IPV6, Parsed},
    work::Work,
};

#[classifier]
pub fn dsproxy_floor(ctx: TcContext) -> i32 {
    match parse::ethertype(&ctx) {
        Ok(ETH_P_IP) => floor_v4(TcContext::new(ctx.skb.skb)),
        Ok(ETH_P_IPV6) => floor_v6(TcContext::new(ctx.skb.skb)),
        Ok(_) | Err(_) => TC_ACT_OK,
    }
}

#[inline(never)]
fn floor_v4(ctx: TcContext) -> i32 {
    let Some(w) = V4::work() else { return TC_ACT_OK };
    match parse::parse_v4(&ctx, w) {
        Ok(Parsed::L4) => lookup::<V4>(w),
        Ok(Parsed::IcmpErr) | Err(_) => TC_ACT_OK,
    }
}

#[inline(never)]
fn floor_v6(ctx: TcContext) -> i32 {
    let Some(w) = V6::work() else { return TC_ACT_OK };
    match parse::parse_v6(&ctx, w) {
        Ok(Parsed::L4) => lookup::<V6>(w),
        Ok(Parsed::IcmpErr) | Err(_) => TC_ACT_OK,
    }
}

#[inline(always)]
fn lookup<F: Family>(w: &Work<F>) -> i32 {
    let pkt = &w.pkt;
    match F::svc(pkt.daddr, pkt.l4.dport, pkt.l4.proto, SCOPE_EXTERNAL, 0) {
        // Use the result so the lookup is not optimised away.
        Some(svc) if svc.count == u16::MAX => aya_ebpf::bindings::TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}
