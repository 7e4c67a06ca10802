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
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SRC, TC_ACT_OK,
        bpf_check_mtu_flags::BPF_MTU_CHK_SEGS, bpf_fib_lookup as FibParams, bpf_redir_neigh,
    },
    helpers::generated::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use proxy_common::{Stat, iface_role};

use crate::{
    family::{Family, V4, V6},
    maps::IFACES_V1,
    parse::Verdict,
    stats::{self, drop_rewrite},
    work::Work,
};

/// Sizes of the helpers' parameter blocks (64 and 20 bytes).
#[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "a 64-byte struct")]
const FIB_LEN: i32 = size_of::<FibParams>() as i32;
#[expect(clippy::cast_possible_truncation, clippy::cast_possible_wrap, reason = "a 20-byte struct")]
const NH_LEN: i32 = size_of::<bpf_redir_neigh>() as i32;

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

/// Send a translated packet on its way: past the host stack when `fib`
/// names one of our interfaces and the packet fits, to the host stack
/// otherwise.
#[inline(never)]
pub fn deliver<F: Family>(ctx: &TcContext, w: &Work<F>, fib: Fib) -> Verdict {
    let Some((ifindex, role)) = fib.ours() else {
        return stats::pass(F::SLOT, Stat::Stack);
    };
    // Owning forwarding means owning its duties: the MTU of the next link
    // (segments of a GSO packet included). A successful FIB lookup checked
    // it already (`bpf_skb_fib_lookup` without `tot_len` returns
    // FRAG_NEEDED, which is `Fib::Stack`, for a packet the device would not
    // forward), except for the segments of a GSO packet, which it lets
    // through whatever their size; one that left the neighbour to the
    // kernel checked nothing.
    // SAFETY: reading a field of the program's own context.
    let gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if gso || matches!(fib, Fib::Neigh(_)) {
        let mut mtu = 0u32;
        // SAFETY: helper on the program's own skb with a valid out-pointer.
        let fits = unsafe { bpf_check_mtu(ctx.as_ptr(), ifindex, &raw mut mtu, 0, u64::from(BPF_MTU_CHK_SEGS)) } == 0;
        if !fits {
            // The host stack answers with fragmentation needed / packet
            // too big, quoting the translated packet; egress translates it
            // back.
            return stats::pass(F::SLOT, Stat::Stack);
        }
    }
    // The TTL / hop limit.
    match F::decrement_ttl(ctx) {
        Ok(true) => {}
        Ok(false) => return stats::pass(F::SLOT, Stat::Stack),
        Err(v) => return v,
    }
    match fib {
        Fib::Out(_) => {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(&w.fib.dmac);
            macs[6..].copy_from_slice(&w.fib.smac);
            if let Err(v) = ctx.store(0, &macs, 0).map_err(drop_rewrite(F::SLOT)) {
                return v;
            }
            if role == iface_role::POD {
                // Straight into the pod's namespace (TC ingress only, which
                // is where every caller of `deliver` runs).
                stats::count(F::SLOT, Stat::RedirectPeer);
                // SAFETY: plain helper call; returns TC_ACT_REDIRECT or SHOT.
                stats::redirected(unsafe { bpf_redirect_peer(ifindex, 0) })
            } else {
                stats::count(F::SLOT, Stat::Redirect);
                // SAFETY: as above.
                stats::redirected(unsafe { bpf_redirect(ifindex, 0) })
            }
        }
        Fib::Neigh(_) => {
            let mut nh = w.nh;
            stats::count(F::SLOT, Stat::RedirectNeigh);
            // SAFETY: `nh` is a valid bpf_redir_neigh on our stack.
            stats::redirected(unsafe { bpf_redirect_neigh(ifindex, &raw mut nh, NH_LEN, 0) })
        }
        Fib::Stack => TC_ACT_OK,
    }
}
