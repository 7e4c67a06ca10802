//! ICMP and ICMPv6 errors about service flows (fragmentation needed /
//! packet too big, destination and port unreachable, time exceeded) are
//! translated like the flow itself, inside and out, so they reach the
//! socket they are about: without it path MTU discovery black-holes and a
//! UDP client never hears ECONNREFUSED (Katran and Cilium do the same).
//!
//! Two cases, by what the error quotes:
//! - a packet on its way to a backend (client -> backend after DNAT), sent
//!   by a router on the way or by the backend's host: the quoted
//!   destination becomes the frontend again, the quoted source and the
//!   outer destination the client (when its source was translated), an
//!   outer source that is the backend becomes the frontend;
//! - a reply on its way to the client (frontend -> client), sent by the
//!   client's side to the frontend address: the mirror image, towards the
//!   backend.
//!
//! Checksums: the quoted IPv4 header's, the quoted transport checksum
//! (when quoted and in use) and the ICMP checksum are updated from the
//! bytes changed (one's complement differences); ICMPv6's pseudo-header
//! takes the outer address change too.
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{CtKey, IPPROTO_UDP, Stat, StatSlot, ct_flags};

use crate::{
    conntrack::{self, Rev},
    csum::{self, Sum},
    family::Family,
    parse::{ETH_HLEN, Verdict, load},
    route, stats,
    stats::drop_rewrite,
    work::Work,
};

/// What to change in an ICMP error (kept in the `Work`): every field is
/// always written (the verifier refuses reading what was not), `which`
/// says which ones apply.
pub struct Change<A> {
    pub inner_src: (A, u16),
    pub inner_dst: (A, u16),
    pub outer_src: A,
    pub outer_dst: A,
    /// `INNER_SRC | INNER_DST | OUTER_SRC | OUTER_DST`.
    pub which: u8,
}

const INNER_SRC: u8 = 1 << 0;
const INNER_DST: u8 = 1 << 1;
const OUTER_SRC: u8 = 1 << 2;
const OUTER_DST: u8 = 1 << 3;

/// `bit` when `cond`, else nothing.
#[inline(always)]
fn when(cond: bool, bit: u8) -> u8 {
    if cond { bit } else { 0 }
}

/// Translate the ICMP error in `w.err` when it is about a service flow. At
/// ingress (`EGRESS == false`) errors about flows that bypass the host
/// stack are translated and delivered, and errors on their way to a
/// frontend address always (the host stack could not route them); at
/// egress, every error still quoting a translated packet: those about
/// flows the host stack forwards, and those the node itself sent about a
/// flow of either kind (a packet we handed it that exceeds the next link's
/// MTU, or whose TTL ran out). An error translated once no longer matches
/// a flow, so nothing is translated twice.
#[inline(never)]
pub fn handle<F: Family, const EGRESS: bool>(ctx: TcContext, w: &mut Work<F>) -> Verdict {
    let now = conntrack::now();
    w.now = now;
    let inner = w.err.inner;
    let (isrc, idst) = ((inner.saddr, inner.sport), (inner.daddr, inner.dport));
    // About a packet on its way to a backend: the quoted packet reversed is
    // the flow's reverse key (backend -> the source it saw).
    w.key = CtKey::new(idst, isrc, inner.proto);
    if conntrack::lookup_rev::<F>(w, false) == Rev::Hit {
        let bypass = w.flow.flags & ct_flags::BYPASS != 0;
        if !bypass && !EGRESS {
            // The host stack forwards this flow: it must see the error as
            // the backend's host sent it, and egress translates.
            return TC_ACT_OK;
        }
        let snat = w.flow.flags & ct_flags::SNAT != 0;
        let (back, flow) = (&w.back, &w.flow);
        w.change = Change {
            inner_src: (back.client, back.client_port),
            inner_dst: (back.frontend, back.frontend_port),
            outer_src: back.frontend,
            outer_dst: back.client,
            which: INNER_DST | when(snat, INNER_SRC | OUTER_DST) | when(w.err.saddr == flow.backend, OUTER_SRC),
        };
        let to = w.back.client;
        return finish::<F, EGRESS>(ctx, w, true, to);
    }
    // About a reply on its way to the client: the quoted packet reversed
    // is the flow's forward key (client -> frontend).
    w.key2 = CtKey::new(idst, isrc, inner.proto);
    if conntrack::peek_fwd::<F>(w, now) {
        let flow = &w.flow;
        let snat = flow.flags & ct_flags::SNAT != 0;
        w.change = Change {
            inner_src: (flow.backend, flow.backend_port),
            inner_dst: (flow.nat, flow.nat_port),
            outer_src: flow.nat,
            outer_dst: flow.backend,
            which: INNER_SRC | OUTER_DST | when(snat, INNER_DST) | when(snat && w.err.saddr == inner.daddr, OUTER_SRC),
        };
        let (bypass, to) = (flow.flags & ct_flags::BYPASS != 0, flow.backend);
        return finish::<F, EGRESS>(ctx, w, bypass, to);
    }
    if EGRESS { TC_ACT_OK } else { stats::pass(F::SLOT, Stat::PassNotL4) }
}

/// Apply `w.change` and send the error on towards `to`: redirected when
/// its flow bypasses the host stack, to the stack otherwise.
#[inline(never)]
fn finish<F: Family, const EGRESS: bool>(ctx: TcContext, w: &mut Work<F>, bypass: bool, to: F::Addr) -> Verdict {
    let ctx = &ctx;
    if let Err(v) = rewrite::<F>(ctx, w) {
        return v;
    }
    stats::count(F::SLOT, Stat::IcmpXlate);
    if EGRESS {
        return TC_ACT_OK;
    }
    if !bypass {
        // The host stack forwards the flow; now it can route the error.
        return stats::pass(F::SLOT, Stat::Stack);
    }
    let src = if w.change.which & OUTER_SRC != 0 { w.change.outer_src } else { w.err.saddr };
    let fib = F::fib(ctx, w, src, to, route::ingress_ifindex(ctx), 0);
    // Errors are rare: the route is not cached.
    route::set_hop::<F>(w, fib);
    route::deliver::<F>(ctx, w, fib, &w.hop)
}

/// Replace the address at `off` (`old` -> `new`), accounting the change
/// in every checksum that covers it.
#[inline(always)]
fn put_addr<A: AsRef<[u8]>>(
    ctx: &TcContext,
    off: usize,
    old: &A,
    new: &A,
    sums: &mut [&mut Sum],
    slot: StatSlot,
) -> Result<(), Verdict> {
    let mut d = Sum::default();
    d.replace(old.as_ref(), new.as_ref()).map_err(drop_rewrite(slot))?;
    for s in sums.iter_mut() {
        s.add(d);
    }
    ctx.store(off, new, 0).map_err(drop_rewrite(slot))
}

/// Replace the 16-bit field at `off` (`old` -> `new`), accounting the
/// change in every checksum that covers it.
#[inline(always)]
fn put16(
    ctx: &TcContext,
    off: usize,
    old: [u8; 2],
    new: [u8; 2],
    sums: &mut [&mut Sum],
    slot: StatSlot,
) -> Result<(), Verdict> {
    for s in sums.iter_mut() {
        s.replace16(old, new);
    }
    ctx.store(off, &new, 0).map_err(drop_rewrite(slot))
}

/// Apply `w.change` to the ICMP error in `w.err`: the quoted packet, then
/// the outer header and the ICMP checksum. Addresses are stored straight
/// from the `Work` (no copies on the stack).
#[inline(always)]
fn rewrite<F: Family>(ctx: &TcContext, w: &Work<F>) -> Result<(), Verdict> {
    let icmp = rewrite_inner::<F>(ctx, w)?;
    rewrite_outer::<F>(ctx, w, icmp)
}

/// The quoted packet; returns the change of the ICMP message's sum.
#[inline(never)]
fn rewrite_inner<F: Family>(ctx: &TcContext, w: &Work<F>) -> Result<Sum, Verdict> {
    let slot = F::SLOT;
    let (err, change) = (&w.err, &w.change);
    let inner = &err.inner;
    // Bytes inside the ICMP message, the quoted IP header, the quoted
    // transport checksum's coverage (pseudo-header included).
    let mut icmp = Sum::default();
    let mut ip = Sum::default();
    let mut l4 = Sum::default();
    if change.which & INNER_SRC != 0 {
        let (addr, port) = (&change.inner_src.0, change.inner_src.1);
        put_addr(ctx, inner.l3_off + F::IP_SADDR, &inner.saddr, addr, &mut [&mut icmp, &mut ip, &mut l4], slot)?;
        put16(ctx, inner.l4_off, inner.sport.to_ne_bytes(), port.to_ne_bytes(), &mut [&mut icmp, &mut l4], slot)?;
    }
    if change.which & INNER_DST != 0 {
        let (addr, port) = (&change.inner_dst.0, change.inner_dst.1);
        put_addr(ctx, inner.l3_off + F::IP_DADDR, &inner.daddr, addr, &mut [&mut icmp, &mut ip, &mut l4], slot)?;
        put16(ctx, inner.l4_off + 2, inner.dport.to_ne_bytes(), port.to_ne_bytes(), &mut [&mut icmp, &mut l4], slot)?;
    }
    if let Some(off) = F::IP_CSUM {
        let off = inner.l3_off + off;
        let old = load::<[u8; 2]>(ctx, off).map_err(stats::passing(slot))?;
        put16(ctx, off, old, csum::update(old, ip), &mut [&mut icmp], slot)?;
    }
    if inner.csum_off != 0 {
        let off = inner.csum_off;
        let old = load::<[u8; 2]>(ctx, off).map_err(stats::passing(slot))?;
        let mut new = csum::update(old, l4);
        if inner.proto == IPPROTO_UDP && new == [0, 0] {
            // 0 means "no checksum" for UDP: its value is written as 0xffff.
            new = [0xff, 0xff];
        }
        put16(ctx, off, old, new, &mut [&mut icmp], slot)?;
    }
    Ok(icmp)
}

/// The outer header: IPv4's has its own checksum; IPv6's addresses are in
/// ICMPv6's pseudo-header. Then the ICMP checksum, with `icmp`.
#[inline(never)]
fn rewrite_outer<F: Family>(ctx: &TcContext, w: &Work<F>, mut icmp: Sum) -> Result<(), Verdict> {
    let slot = F::SLOT;
    let (err, change) = (&w.err, &w.change);
    let mut outer = Sum::default();
    let v4 = F::IP_CSUM.is_some();
    if change.which & OUTER_SRC != 0 {
        let sums: &mut [&mut Sum] = if v4 { &mut [&mut outer] } else { &mut [&mut icmp] };
        put_addr(ctx, ETH_HLEN + F::IP_SADDR, &err.saddr, &change.outer_src, sums, slot)?;
    }
    if change.which & OUTER_DST != 0 {
        let sums: &mut [&mut Sum] = if v4 { &mut [&mut outer] } else { &mut [&mut icmp] };
        put_addr(ctx, ETH_HLEN + F::IP_DADDR, &err.daddr, &change.outer_dst, sums, slot)?;
    }
    if let Some(off) = F::IP_CSUM {
        let off = ETH_HLEN + off;
        let old = load::<[u8; 2]>(ctx, off).map_err(stats::passing(slot))?;
        ctx.store(off, &csum::update(old, outer), 0).map_err(drop_rewrite(slot))?;
    }
    let off = err.icmp_off + 2;
    let old = load::<[u8; 2]>(ctx, off).map_err(stats::passing(slot))?;
    ctx.store(off, &csum::update(old, icmp), 0).map_err(drop_rewrite(slot))
}
