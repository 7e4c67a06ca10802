//! dsproxy datapath. Entry points only; the stages live in modules:
//!
//! - `parse` (headers, extension headers, fragments, ICMP errors),
//!   `frag` (ports of later fragments);
//! - `lb` (frontend lookup with NodePorts and scopes, backend selection
//!   with session affinity), shared with the socket hooks (`sock`);
//! - `conntrack` (flow-scoped state), `service` (forward path),
//!   `revnat` (reply path), `icmp` (errors about service flows),
//!   `reject` (refusals);
//! - `nat` (rewrites and checksums), `route` (FIB lookup and redirect past
//!   the host stack), `stats` (per-CPU counters per family), `csum`,
//!   `family` (the IPv4/IPv6 split), `maps`.
//!
//! Programs:
//! - `dsproxy_from_pod`: TC ingress of pod-facing interfaces (clients on
//!   this node);
//! - `dsproxy_from_device`: TC ingress of node devices (external clients,
//!   replies from other nodes);
//! - `dsproxy_egress`: TC egress of both (replies of flows the host stack
//!   forwards, and ICMP errors about them);
//! - `dsproxy_connect4/6`, `dsproxy_sendmsg4/6`, `dsproxy_recvmsg4/6`,
//!   `dsproxy_getpeername4/6`: cgroup socket hooks, socket-level load
//!   balancing for clients in the node's own network namespace (`sock`).
#![no_std]
#![no_main]
#![expect(
    clippy::needless_pass_by_value,
    reason = "the TC context travels by value to BPF subprograms: it is one pointer"
)]

mod conntrack;
mod csum;
mod family;
mod floor;
mod frag;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod revnat;
mod route;
mod service;
mod sock;
mod stats;
mod work;

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use proxy_common::{Stat, StatSlot};

use crate::{
    family::{Family, V4, V6},
    parse::{ETH_P_IP, ETH_P_IPV6, Parsed, Verdict},
    work::Work,
};

#[classifier]
pub fn dsproxy_from_pod(ctx: TcContext) -> i32 {
    ingress::<false>(&ctx)
}

#[classifier]
pub fn dsproxy_from_device(ctx: TcContext) -> i32 {
    ingress::<true>(&ctx)
}

#[classifier]
pub fn dsproxy_egress(ctx: TcContext) -> i32 {
    match parse::ethertype(&ctx) {
        Ok(ETH_P_IP) => egress_v4(TcContext::new(ctx.skb.skb)),
        Ok(ETH_P_IPV6) => egress_v6(TcContext::new(ctx.skb.skb)),
        Ok(_) | Err(_) => TC_ACT_OK,
    }
}

#[inline(always)]
fn ingress<const EXTERNAL: bool>(ctx: &TcContext) -> Verdict {
    match parse::ethertype(ctx) {
        Ok(ETH_P_IP) => ingress_v4::<EXTERNAL>(TcContext::new(ctx.skb.skb)),
        Ok(ETH_P_IPV6) => ingress_v6::<EXTERNAL>(TcContext::new(ctx.skb.skb)),
        Ok(_) => stats::pass(StatSlot::Other, Stat::PassNotIp),
        Err(stat) => stats::pass(StatSlot::Other, stat),
    }
}

// One BPF subprogram per family and hook (`inline(never)`); the packet's
// working state lives in a per-CPU map (`work`), so frames stay small.

#[inline(never)]
fn ingress_v4<const EXTERNAL: bool>(ctx: TcContext) -> Verdict {
    let Some(w) = V4::work() else { return TC_ACT_OK };
    match parse::parse_v4(&ctx, w) {
        Ok(p) => ingress_parsed::<V4, EXTERNAL>(ctx, w, p),
        Err(stat) => stats::pass(StatSlot::V4, stat),
    }
}

#[inline(never)]
fn ingress_v6<const EXTERNAL: bool>(ctx: TcContext) -> Verdict {
    let Some(w) = V6::work() else { return TC_ACT_OK };
    match parse::parse_v6(&ctx, w) {
        Ok(p) => ingress_parsed::<V6, EXTERNAL>(ctx, w, p),
        Err(stat) => stats::pass(StatSlot::V6, stat),
    }
}

/// A packet to a frontend takes the forward path; anything else may be a
/// reply of a tracked flow, or an ICMP error about one.
///
/// The order saves lookups: a destination the frontend-address filter
/// rules out skips the service and NodePort lookups; a TCP segment that
/// opens nothing, to an address that may be a frontend, looks its flow up
/// first and needs no frontend lookup when its frontend still exists (an
/// array read by the flow's frontend id). Anything else meets the frontend
/// lookup first, as before.
#[inline(always)]
fn ingress_parsed<F: Family, const EXTERNAL: bool>(ctx: TcContext, w: &mut Work<F>, parsed: Parsed) -> Verdict {
    if parsed == Parsed::IcmpErr {
        return icmp::handle::<F, false>(ctx, w);
    }
    if let Err(stat) = frag::ports::<F>(&mut w.pkt) {
        return stats::pass(F::SLOT, stat);
    }
    if !F::maybe_frontend(&w.pkt.daddr) {
        return revnat::ingress::<F>(ctx, w);
    }
    let l4 = &w.pkt.l4;
    if l4.is_tcp() && !l4.is_syn() && service::live_flow::<F>(w) {
        return service::established::<F>(ctx, w);
    }
    let (pkt, fe) = (&w.pkt, &mut w.fe);
    if lb::lookup::<F>(fe, &pkt.daddr, pkt.l4.dport, pkt.l4.proto, !EXTERNAL) {
        service::forward::<F, EXTERNAL>(ctx, w)
    } else {
        revnat::ingress::<F>(ctx, w)
    }
}

#[inline(never)]
fn egress_v4(ctx: TcContext) -> Verdict {
    let Some(w) = V4::work() else { return TC_ACT_OK };
    match parse::parse_v4(&ctx, w) {
        Ok(p) => egress_parsed::<V4>(ctx, w, p),
        Err(_) => TC_ACT_OK,
    }
}

#[inline(never)]
fn egress_v6(ctx: TcContext) -> Verdict {
    let Some(w) = V6::work() else { return TC_ACT_OK };
    match parse::parse_v6(&ctx, w) {
        Ok(p) => egress_parsed::<V6>(ctx, w, p),
        Err(_) => TC_ACT_OK,
    }
}

#[inline(always)]
fn egress_parsed<F: Family>(ctx: TcContext, w: &mut Work<F>, parsed: Parsed) -> Verdict {
    if parsed == Parsed::IcmpErr {
        return icmp::handle::<F, true>(ctx, w);
    }
    if frag::ports::<F>(&mut w.pkt).is_err() {
        return TC_ACT_OK;
    }
    revnat::egress::<F>(ctx, w)
}

// Socket hooks: one program per hook, sharing the socket module's paths.

#[cgroup_sock_addr(connect4)]
pub fn dsproxy_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward4(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn dsproxy_connect6(ctx: SockAddrContext) -> i32 {
    sock::forward6(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dsproxy_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward4(&ctx, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dsproxy_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::forward6(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn dsproxy_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn dsproxy_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn dsproxy_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse4(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn dsproxy_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse6(&ctx, false)
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
