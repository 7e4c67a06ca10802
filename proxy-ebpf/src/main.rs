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
mod revnat;
mod service;
mod stats;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use proxy_common::Stat;

use crate::{
    family::{Family, V4, V6},
    parse::{L3, Pkt, Verdict},
};

#[classifier]
pub fn dsproxy_tc(ctx: TcContext) -> i32 {
    match try_dsproxy_tc(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_dsproxy_tc(ctx: &TcContext) -> Result<i32, i32> {
    match parse::parse(ctx)? {
        L3::V4(pkt) => handle::<V4>(ctx, &pkt),
        L3::V6(pkt) => handle::<V6>(ctx, &pkt),
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
