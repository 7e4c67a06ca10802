//! Delivery past the host stack ("BPF host routing", as Cilium's
//! `fib_redirect`): a translated packet is routed by a FIB lookup and
//! redirected to its next interface, so the host's netfilter, conntrack,
//! reverse-path filter and masquerade never see half a translation. A flow
//! is delivered this way only when the interface it leaves by is one of
//! ours (`IFACES`): its replies then come back through our TC ingress too.
//! Everything else (a local destination, a route the FIB will not give, a
//! packet too big for the next link, a TTL about to expire) goes to the host
//! stack, which forwards it or answers with the right ICMP error.
use core::mem::size_of;

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, bpf_check_mtu_flags::BPF_MTU_CHK_SEGS,
        bpf_fib_lookup as FibParams, bpf_redir_neigh,
    },
    helpers::generated::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use proxy_common::{Hop, ROUTE_CACHE_NS, Stat, hop_flags, iface_role};

use crate::{
    family::{Family, V4, V6},
    maps::{CONFIG_V2, IFACES_V1},
    parse::Verdict,
    stats,
    work::Work,
};

/// Sizes of the helpers' parameter blocks (64 and 20 bytes).
#[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "a 64-byte struct")]
const FIB_LEN: i32 = size_of::<FibParams>() as i32;
#[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "a 20-byte struct")]
const NH_LEN: i32 = size_of::<bpf_redir_neigh>() as i32;

/// What `is_skb_forwardable` allows on top of the MTU: an Ethernet
/// header and a VLAN tag.
const LINK_HLEN: u32 = 14 + 4;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Lookup flag: also find the source address the node would send from on
/// the route found (`BPF_FIB_LOOKUP_SRC`, Linux 6.7): the route's
/// preferred source, else the outgoing interface's address for the next
/// hop, as the host stack (and so netfilter's MASQUERADE) picks it.
pub const SOURCE: u32 = BPF_FIB_LOOKUP_SRC;

/// What the FIB says about a destination (the MACs and the next hop stay in
/// the `Work`'s `fib` and `nh`).
#[derive(Clone, Copy)]
pub enum Fib {
    /// Out of this interface, with the MACs the lookup found.
    Out(u32),
    /// Out of this interface to the next hop in `nh`, whose MAC the kernel
    /// resolves.
    Neigh(u32),
    /// The host stack's business.
    Stack,
}

impl Fib {
    /// The interface and its role (`iface_role::*`), when it is one of
    /// ours: then the flow's replies come back through our ingress and it
    /// may bypass the host stack.
    #[inline(always)]
    pub fn ours(self) -> Option<(u32, u32)> {
        let ifindex = match self {
            Fib::Out(i) | Fib::Neigh(i) => i,
            Fib::Stack => return None,
        };
        // SAFETY: pointer from a successful lookup, valid for this run.
        IFACES_V1.get_ptr(ifindex).map(|i| (ifindex, unsafe { (*i).role }))
    }
}

/// The FIB lookup proper, in a BPF subprogram of its own.
#[inline(never)]
fn lookup(ctx: &TcContext, p: &mut FibParams, nh: &mut bpf_redir_neigh, flags: u32) -> Fib {
    // SAFETY: `p` is a valid, initialised bpf_fib_lookup in map memory.
    let rc = unsafe { bpf_fib_lookup(ctx.as_ptr(), &raw mut *p, FIB_LEN, flags) };
    match u32::try_from(rc) {
        Ok(BPF_FIB_LKUP_RET_SUCCESS) => Fib::Out(p.ifindex),
        Ok(BPF_FIB_LKUP_RET_NO_NEIGH) => {
            // After a lookup the destination field holds the next hop
            // (gateway or destination).
            nh.nh_family = u32::from(p.family);
            // SAFETY: plain-data unions; both members are plain integers.
            unsafe { nh.__bindgen_anon_1.ipv6_nh = p.__bindgen_anon_4.ipv6_dst };
            Fib::Neigh(p.ifindex)
        }
        _ => Fib::Stack,
    }
}

/// FIB lookup for forwarding `src -> dst` in from `ifindex`, IPv4.
#[inline(always)]
pub fn fib_v4(ctx: &TcContext, w: &mut Work<V4>, src: [u8; 4], dst: [u8; 4], ifindex: u32, flags: u32) -> Fib {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid start.
    w.fib = unsafe { core::mem::zeroed() };
    w.fib.family = AF_INET;
    w.fib.ifindex = ifindex;
    w.fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    w.fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    lookup(ctx, &mut w.fib, &mut w.nh, flags)
}

/// FIB lookup for forwarding `src -> dst` in from `ifindex`, IPv6.
#[inline(always)]
pub fn fib_v6(ctx: &TcContext, w: &mut Work<V6>, src: [u8; 16], dst: [u8; 16], ifindex: u32, flags: u32) -> Fib {
    // SAFETY: as in `fib_v4`.
    w.fib = unsafe { core::mem::zeroed() };
    w.fib.family = AF_INET6;
    w.fib.ifindex = ifindex;
    w.fib.__bindgen_anon_3.ipv6_src = words(&src);
    w.fib.__bindgen_anon_4.ipv6_dst = words(&dst);
    lookup(ctx, &mut w.fib, &mut w.nh, flags)
}

/// The source address a `SOURCE` lookup left in `p`, IPv4.
#[inline(always)]
pub fn source_v4(p: &FibParams) -> [u8; 4] {
    // SAFETY: plain-data union; every member is plain integers.
    unsafe { p.__bindgen_anon_3.ipv4_src }.to_ne_bytes()
}

/// The source address a `SOURCE` lookup left in `p`, IPv6.
#[inline(always)]
pub fn source_v6(p: &FibParams) -> [u8; 16] {
    // SAFETY: as in `source_v4`; the words are the address in network
    // order, and [u32; 4] and [u8; 16] have the same size with no padding.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(p.__bindgen_anon_3.ipv6_src) }
}

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The interface the packet came in on.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of the program's own context.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Which way a flow's packet goes, for the route the flow caches.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// The client's packet, to the backend (`Flow::to_backend`).
    ToBackend,
    /// The backend's reply, to the client (`Flow::to_client`).
    ToClient,
}

/// The generation cached routes must carry to hold (`Hop`).
#[inline(always)]
fn route_gen() -> u32 {
    CONFIG_V2.get(0).map_or(0, |c| c.route_gen)
}

/// Set `w.hop` to the route `fib` found, as a flow caches it: an
/// interface of ours and the MACs to write. No route (`ifindex` 0) when
/// the lookup left the neighbour to the kernel, or the interface is not
/// ours. (Written in place: a `Hop` on the stack counts against the
/// frames of the call chain.)
#[inline(never)]
pub fn set_hop<F: Family>(w: &mut Work<F>, fib: Fib) {
    let found = match fib {
        Fib::Out(_) => fib.ours(),
        Fib::Neigh(_) | Fib::Stack => None,
    };
    let Some((ifindex, role)) = found else {
        w.hop.ifindex = 0;
        return;
    };
    let h = &mut w.hop;
    h.until = w.now + ROUTE_CACHE_NS;
    h.route_gen = route_gen();
    h.ifindex = ifindex;
    // SAFETY: plain-data union; after a successful lookup without
    // `tot_len` it holds the interface's MTU.
    h.mtu = unsafe { w.fib.__bindgen_anon_1.mtu_result };
    h.flags = if role == iface_role::POD { hop_flags::POD } else { 0 };
    h.macs[..6].copy_from_slice(&w.fib.dmac);
    h.macs[6..].copy_from_slice(&w.fib.smac);
}

/// Send the translated packet of the bypass flow in `w.flow` on its way
/// `dir`: by the route the flow cached while it holds (fresh and of the
/// current generation), else by a FIB lookup, whose route the flow then
/// caches for the packets that follow. `w.key` is the key of the entry
/// that caches it (forward, or reverse for a reply).
#[inline(always)]
pub fn send<F: Family>(ctx: &TcContext, w: &mut Work<F>, dir: Dir) -> Verdict {
    let cached = match dir {
        Dir::ToBackend => &w.flow.to_backend,
        Dir::ToClient => &w.back.to_client,
    };
    if cached.ifindex != 0 && cached.until > w.now && cached.route_gen == route_gen() {
        return out::<F>(ctx, cached);
    }
    let (src, dst) = match dir {
        Dir::ToBackend => (w.flow.nat, w.flow.backend),
        Dir::ToClient => (w.back.frontend, w.back.client),
    };
    let fib = F::fib(ctx, w, src, dst, ingress_ifindex(ctx), 0);
    set_hop::<F>(w, fib);
    if w.hop.ifindex != 0 {
        cache::<F>(w, dir);
    }
    deliver::<F>(ctx, w, fib, &w.hop)
}

/// Record `w.hop` in the flow's entry for `dir`, keyed by `w.key`: the
/// forward entry (the client's packets) or the reverse entry (replies),
/// when it still names the route's ends: another CPU may have replaced it
/// with a later flow on the same tuple, whose route this is not.
#[inline(always)]
fn cache<F: Family>(w: &Work<F>, dir: Dir) {
    match dir {
        Dir::ToBackend => {
            let Some(ptr) = F::fwd_get(&w.key) else { return };
            // SAFETY: pointer from a successful lookup, valid for this run.
            let e = unsafe { &mut *ptr };
            // The route from the source the backend sees to the backend.
            if e.backend == w.flow.backend && e.nat == w.flow.nat {
                e.to_backend = w.hop;
            }
        }
        Dir::ToClient => {
            let Some(ptr) = F::rev_get(&w.key) else { return };
            // SAFETY: as above.
            let e = unsafe { &mut *ptr };
            // The route from the frontend back to the client.
            if e.client == w.back.client && e.frontend == w.back.frontend {
                e.to_client = w.hop;
            }
        }
    }
}

/// Send a translated packet on its way: by `hop` when it holds a route,
/// else as `fib` says (a next hop whose MAC the kernel resolves, on one
/// of our interfaces, or the host stack).
#[inline(never)]
pub fn deliver<F: Family>(ctx: &TcContext, w: &Work<F>, fib: Fib, hop: &Hop) -> Verdict {
    if hop.ifindex != 0 {
        return out::<F>(ctx, hop);
    }
    let Fib::Neigh(_) = fib else {
        return stats::pass(F::SLOT, Stat::Stack);
    };
    let Some((ifindex, _)) = fib.ours() else {
        return stats::pass(F::SLOT, Stat::Stack);
    };
    // Nothing checked the MTU on this route yet.
    if !fits(ctx, ifindex) {
        return stats::pass(F::SLOT, Stat::Stack);
    }
    match F::forward(ctx, None) {
        Ok(true) => {}
        Ok(false) => return stats::pass(F::SLOT, Stat::Stack),
        Err(v) => return v,
    }
    let mut nh = w.nh;
    stats::count(F::SLOT, Stat::RedirectNeigh);
    // SAFETY: `nh` is a valid bpf_redir_neigh on our stack.
    stats::redirected(unsafe { bpf_redirect_neigh(ifindex, &raw mut nh, NH_LEN, 0) })
}

/// Does the packet fit the MTU of `ifindex` (each segment of a GSO
/// packet)?
#[inline(always)]
fn fits(ctx: &TcContext, ifindex: u32) -> bool {
    let mut mtu = 0u32;
    // SAFETY: helper on the program's own skb with a valid out-pointer.
    unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &raw mut mtu, 0, u64::from(BPF_MTU_CHK_SEGS)) == 0 }
}

/// Deliver a translated packet by `hop`, an interface of ours with the
/// neighbour's MAC: router duties, MACs, redirect.
#[inline(never)]
fn out<F: Family>(ctx: &TcContext, hop: &Hop) -> Verdict {
    // Owning forwarding means owning its duties: the MTU of the next link
    // (segments of a GSO packet included). The first packet's FIB lookup
    // checked the packet against the interface (`is_skb_forwardable`:
    // MTU + link header + a VLAN tag) and gave its MTU; a packet too big
    // for it goes to the host stack, which answers with fragmentation
    // needed / packet too big, quoting the translated packet (egress
    // translates it back). The segments of a GSO packet are checked by the
    // kernel's helper.
    // SAFETY: reading fields of the program's own context.
    let (len, gso) = unsafe { ((*ctx.skb.skb).len, (*ctx.skb.skb).gso_size) };
    let fit = if gso == 0 { len <= u32::from(hop.mtu) + LINK_HLEN } else { fits(ctx, hop.ifindex) };
    if !fit {
        return stats::pass(F::SLOT, Stat::Stack);
    }
    // The TTL / hop limit and the MACs.
    match F::forward(ctx, Some(&hop.macs)) {
        Ok(true) => {}
        Ok(false) => return stats::pass(F::SLOT, Stat::Stack),
        Err(v) => return v,
    }
    if hop.flags & hop_flags::POD != 0 {
        // Straight into the pod's namespace (TC ingress only, which is
        // where every caller runs).
        stats::count(F::SLOT, Stat::RedirectPeer);
        // SAFETY: plain helper call; returns TC_ACT_REDIRECT or SHOT.
        stats::redirected(unsafe { bpf_redirect_peer(hop.ifindex, 0) })
    } else {
        stats::count(F::SLOT, Stat::Redirect);
        // SAFETY: as above.
        stats::redirected(unsafe { bpf_redirect(hop.ifindex, 0) })
    }
}
