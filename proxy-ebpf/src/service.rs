//! The forward path: packets addressed to a frontend, from a client on this
//! node (`EXTERNAL == false`: a pod interface) or from outside (a node
//! device).
//!
//! A live flow keeps its backend. A new one gets a backend (session
//! affinity first), a source translation when the backend would otherwise
//! not answer through us (a pod reaching its own Service: hairpin; an
//! external client of an externalTrafficPolicy Cluster frontend:
//! masquerade to the node's address on the route to the backend), its
//! conntrack entries, and a delivery mode: past the host stack when the
//! route to the backend leaves by one of our interfaces, through it
//! otherwise. A masqueraded flow must leave by one of ours: its replies
//! are addressed to the node, and only our ingress can translate them
//! before the host stack takes them for its own.
use aya_ebpf::programs::TcContext;
use proxy_common::{CtKey, Stat, ct_flags, svc_flags};

use crate::{
    conntrack::{self, Fwd},
    family::Family,
    lb::{self, Client},
    nat::{End, Ends},
    parse::Verdict,
    route::{self, Dir, Fib},
    stats,
    work::Work,
};

/// `new_flow`'s answer when the flow is not the one it created (another
/// CPU recorded the tuple first): its packet goes as one of that flow,
/// sent by `resend`, a subprogram beside it. Not a TC verdict.
const AS_ESTABLISHED: Verdict = i32::MIN;

/// DNAT (and SNAT) the packet in `w.pkt`, addressed to frontend `w.fe`.
/// The established and the new-flow paths are subprograms of their own,
/// side by side: their stack frames never add up.
#[inline(always)]
pub fn forward<F: Family, const EXTERNAL: bool>(ctx: TcContext, w: &mut Work<F>) -> Verdict {
    w.now = conntrack::now();
    match conntrack::lookup_fwd::<F>(w, w.now) {
        Fwd::Hit => established::<F>(ctx, w),
        Fwd::Miss { stale } => match new_flow::<F, EXTERNAL>(TcContext::new(ctx.skb.skb), w, stale) {
            AS_ESTABLISHED => resend::<F>(ctx, w),
            v => v,
        },
    }
}

/// Send the translated packet of the flow in `w.flow` on its way.
#[inline(never)]
fn resend<F: Family>(ctx: TcContext, w: &mut Work<F>) -> Verdict {
    send::<F>(&ctx, w)
}

/// Is the packet in `w.pkt` (a TCP segment that opens nothing) one of a
/// live flow whose frontend still exists? Then the flow is in `w.flow`,
/// the packet recorded on it (`conntrack::lookup_established`).
#[inline(always)]
pub fn live_flow<F: Family>(w: &mut Work<F>) -> bool {
    w.now = conntrack::now();
    conntrack::lookup_established::<F>(w, w.now)
}

/// A packet of a live flow (in `w.flow`).
#[inline(never)]
pub fn established<F: Family>(ctx: TcContext, w: &mut Work<F>) -> Verdict {
    if let Err(v) = translate::<F>(&ctx, w) {
        return v;
    }
    stats::count(F::SLOT, Stat::DnatEstablished);
    send::<F>(&ctx, w)
}

#[inline(never)]
fn new_flow<F: Family, const EXTERNAL: bool>(ctx: TcContext, w: &mut Work<F>, stale: bool) -> Verdict {
    let ctx = &ctx;
    let now = w.now;
    let l4 = w.pkt.l4;
    if !l4.has_hdr {
        // A later fragment cannot open a flow.
        return stats::pass(F::SLOT, Stat::PassFragment);
    }
    if l4.is_tcp() && !l4.is_syn() {
        // Not an opening segment and no flow of ours: a connection another
        // proxy (kube-proxy's netfilter DNAT) set up before dsproxy. The
        // host stack still knows it; leave it alone so it keeps working.
        return stats::pass(F::SLOT, Stat::PassTakeover);
    }
    let svc = w.fe.svc;
    if svc.flags & svc_flags::SOURCE_RANGES != 0 && !F::in_source_range(svc.rev_nat_id, w.pkt.saddr) {
        return stats::drop(F::SLOT, Stat::DropSourceRange);
    }
    let Some(chosen) = lb::select::<F>(&w.fe, Client::Addr(w.pkt.saddr), now) else {
        return empty::<F>(ctx, w);
    };
    let ifindex = route::ingress_ifindex(ctx);
    let mut flags = if EXTERNAL { ct_flags::EXTERNAL } else { 0 };
    let mut nat = w.pkt.src();
    // The route to the backend, when choosing the source needed it.
    let mut found = None;
    if chosen.backend.0 == w.pkt.saddr {
        // A pod reaching its own Service: a packet from its own address
        // would be dropped as martian, so it comes from the address it
        // connected to (kube-proxy masquerades hairpin traffic; Cilium uses
        // a loopback address).
        flags |= ct_flags::SNAT | ct_flags::HAIRPIN;
        nat.0 = w.pkt.daddr;
    } else if EXTERNAL && svc.flags & svc_flags::EXTERNAL_LOCAL == 0 {
        // externalTrafficPolicy Cluster: the backend answers the node,
        // which answers the client. The node's address is the one the host
        // stack would send from towards the backend, as kube-proxy's
        // MASQUERADE picks it. The replies come back through our ingress
        // only if the route leaves by one of our interfaces.
        let client = w.pkt.saddr;
        let fib = F::fib(ctx, w, client, chosen.backend.0, ifindex, route::SOURCE);
        let Some(node) = fib.ours().and(F::fib_source(w)) else {
            return stats::drop(F::SLOT, Stat::MasqueradeNoRoute);
        };
        flags |= ct_flags::SNAT;
        nat.0 = node;
        found = Some(fib);
    }
    if flags & ct_flags::SNAT != 0 {
        match conntrack::snat_port::<F>(w, chosen.backend, nat.0, nat.1) {
            Some(port) => nat.1 = port,
            None => return stats::drop(F::SLOT, Stat::SnatNoPort),
        }
    }
    // The route from the masquerade address is the one just found.
    let fib = match found {
        Some(fib) => fib,
        None => F::fib(ctx, w, nat.0, chosen.backend.0, ifindex, 0),
    };
    // The route, for the flow to cache: one of our interfaces with the
    // neighbour's MAC. A next hop on one of ours whose MAC the kernel
    // resolves is delivered past the host stack too, not cached.
    route::set_hop::<F>(w, fib);
    if w.hop.ifindex != 0 || (matches!(fib, Fib::Neigh(_)) && fib.ours().is_some()) {
        flags |= ct_flags::BYPASS;
    }
    // Field by field: a whole `Flow` would pass through the stack.
    let flow = &mut w.flow;
    (flow.expires, flow.state, flow.flags, flow._pad) = (0, 0, flags, [0; 2]);
    (flow.backend_id, flow.frontend_id) = (chosen.id, svc.rev_nat_id);
    (flow.backend, flow.backend_port) = chosen.backend;
    (flow.nat, flow.nat_port) = nat;
    flow.to_backend = w.hop;
    w.key = CtKey::new(w.pkt.src(), w.pkt.dst(), l4.proto);
    conntrack::create::<F>(w, stale, now);
    if let Err(v) = translate::<F>(ctx, w) {
        return v;
    }
    stats::count(F::SLOT, Stat::DnatNew);
    if w.flow.flags & ct_flags::HAIRPIN != 0 {
        stats::count(F::SLOT, Stat::Hairpin);
    }
    let ours = w.flow.flags == flags && w.flow.backend == chosen.backend.0 && w.flow.nat == nat.0;
    if !ours {
        return AS_ESTABLISHED;
    }
    if flags & ct_flags::BYPASS == 0 {
        return stats::pass(F::SLOT, Stat::Stack);
    }
    // The route found above still holds.
    route::deliver::<F>(ctx, w, fib, &w.hop)
}

/// Rewrite the client's packet in `w.pkt` to what the backend of `w.flow`
/// must see.
#[inline(always)]
fn translate<F: Family>(ctx: &TcContext, w: &Work<F>) -> Result<(), Verdict> {
    let (pkt, flow) = (&w.pkt, &w.flow);
    let l4 = &pkt.l4;
    let dst = Ends { old: &pkt.daddr, old_port: l4.dport, new: &flow.backend, new_port: flow.backend_port };
    F::rewrite(ctx, l4, End::Dst, dst)?;
    if flow.flags & ct_flags::SNAT != 0 {
        let src = Ends { old: &pkt.saddr, old_port: l4.sport, new: &flow.nat, new_port: flow.nat_port };
        F::rewrite(ctx, l4, End::Src, src)?;
    }
    Ok(())
}

/// Deliver a translated packet of `w.flow` the way the flow travels.
#[inline(always)]
fn send<F: Family>(ctx: &TcContext, w: &mut Work<F>) -> Verdict {
    if w.flow.flags & ct_flags::BYPASS == 0 {
        return stats::pass(F::SLOT, Stat::Stack);
    }
    route::send::<F>(ctx, w, Dir::ToBackend)
}

/// A frontend without a usable backend: refuse (no endpoint anywhere), or
/// drop (a Local policy and none on this node, so a load balancer retries
/// elsewhere).
#[inline(always)]
fn empty<F: Family>(ctx: &TcContext, w: &Work<F>) -> Verdict {
    if w.fe.svc.flags & svc_flags::DROP_WHEN_EMPTY != 0 {
        return stats::drop(F::SLOT, Stat::DropNoLocalBackend);
    }
    // No backend of this family (never borrow one of the other): refuse,
    // as kube-proxy's REJECT rules do.
    F::reject(ctx, w)
}
