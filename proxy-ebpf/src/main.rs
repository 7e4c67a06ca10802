//! dsproxy datapath: one TC program, attached at ingress of every pod-facing
//! interface of the node. Packets to a service address are DNATed to a
//! backend of the same family; replies from that backend are rewritten back
//! to the service address. Everything else passes untouched.
//!
//! Stages, one module each: `parse` (headers), `service` (frontend lookup),
//! `backend` (slot selection), `conntrack` (flow table and state), `nat`
//! (rewrites and checksums), `revnat` (reply translation), `stats`
//! (per-CPU counters). This file holds only the entry point.
#![no_std]
#![no_main]

mod backend;
mod conntrack;
mod family;
mod maps;
mod nat;
mod parse;
mod reject;
mod revnat;
mod service;
mod stats;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use proxy_common::Stat;

use crate::{
    family::{Family, V4, V6},
    parse::{ETH_P_IP, ETH_P_IPV6, Pkt, Verdict},
};

#[classifier]
pub fn dsproxy_tc(ctx: TcContext) -> i32 {
    match try_dsproxy_tc(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_dsproxy_tc(ctx: &TcContext) -> Result<i32, i32> {
    match parse::ethertype(ctx)? {
        ETH_P_IP => Ok(handle_v4(TcContext::new(ctx.skb.skb))),
        ETH_P_IPV6 => Ok(handle_v6(TcContext::new(ctx.skb.skb))),
        _ => Err(pass(Stat::PassNotIp)),
    }
}

// One BPF subprogram per family (`inline(never)`): the IPv4 and IPv6 paths
// get stack frames of their own instead of adding up in the 512 bytes of
// one. The context travels by value (it is one pointer).

#[inline(never)]
fn handle_v4(ctx: TcContext) -> i32 {
    match parse::parse_v4(&ctx).and_then(|pkt| handle::<V4>(&ctx, &pkt)) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(never)]
fn handle_v6(ctx: TcContext) -> i32 {
    match parse::parse_v6(&ctx).and_then(|pkt| handle::<V6>(&ctx, &pkt)) {
        Ok(v) | Err(v) => v,
    }
}

/// A packet to a frontend takes the forward path; anything else may be a
/// reply of a tracked flow.
#[inline(always)]
fn handle<F: Family>(ctx: &TcContext, pkt: &Pkt<F::Addr>) -> Result<i32, i32> {
    match service::lookup::<F>(pkt) {
        Some(svc) => service::forward::<F>(ctx, pkt, &svc),
        None => revnat::reverse::<F>(ctx, pkt),
    }
}

/// Benchmark floor: parse the headers as `dsproxy_tc` does and make one
/// hash lookup (the service map), nothing else. Never attached; `cargo
/// xtask bench` reports the datapath's cost as a ratio to this.
#[classifier]
pub fn dsproxy_floor(ctx: TcContext) -> i32 {
    match parse::ethertype(&ctx) {
        Ok(ETH_P_IP) => floor::<V4>(&ctx, parse::parse_v4(&ctx)),
        Ok(ETH_P_IPV6) => floor::<V6>(&ctx, parse::parse_v6(&ctx)),
        Ok(_) | Err(_) => TC_ACT_OK,
    }
}

#[inline(always)]
fn floor<F: Family>(_ctx: &TcContext, pkt: Result<Pkt<F::Addr>, i32>) -> i32 {
    match pkt {
        Ok(pkt) => match service::lookup::<F>(&pkt) {
            // Use the result so the lookup is not optimised away.
            Some(svc) if svc.count == u16::MAX => aya_ebpf::bindings::TC_ACT_SHOT,
            _ => TC_ACT_OK,
        },
        Err(v) => v,
    }
}

/// Count `stat` and let the packet through untouched.
#[inline(always)]
pub(crate) fn pass(stat: Stat) -> Verdict {
    stats::count(stat);
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach this; it
    // exists only to satisfy `no_std`.
    unsafe { core::hint::unreachable_unchecked() }
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
