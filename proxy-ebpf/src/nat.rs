//! Address and port rewrites with incremental checksum updates. The
//! transport checksum goes through the kernel helpers: they also handle
//! `CHECKSUM_PARTIAL` skbs from local sockets (the TCP/UDP checksum field
//! then holds only the pseudo-header sum) and keep `skb->csum` right for
//! `CHECKSUM_COMPLETE` ones. Everything else (addresses, ports, the IPv4
//! header checksum, TTL / hop limit, MACs) is written into the packet
//! directly: the IPv4 header's sum stays constant under a correct
//! checksum update, so `skb->csum` needs nothing there, and the helpers'
//! calls cost more than the writes.
use aya_ebpf::programs::TcContext;
use proxy_common::{IPPROTO_UDP, StatSlot};

use crate::{
    csum,
    parse::{
        self, IP4_CSUM_OFF, IP4_DADDR_OFF, IP4_SADDR_OFF, IP4_TTL_OFF, IP6_DADDR_OFF, IP6_HOP_LIMIT_OFF, IP6_SADDR_OFF,
        L4, Verdict, read,
    },
    stats::{drop_rewrite, passing},
};

/// Flags of `bpf_l3_csum_replace` / `bpf_l4_csum_replace`. The low four
/// bits give the size of the field replaced (2 or 4 bytes), or 0 when `to`
/// is a checksum difference.
mod csum_flags {
    pub const DIFF: u64 = 0;
    pub const SIZE_2: u64 = 2;
    pub const SIZE_4: u64 = 4;
    /// The field is part of the pseudo-header (an IP address).
    pub const PSEUDO_HDR: u64 = 1 << 4;
    /// UDP over IPv4: a checksum of 0 means none and stays 0; a computed
    /// 0 becomes 0xffff.
    pub const MARK_MANGLED_0: u64 = 1 << 5;
    /// The pseudo-header is IPv6's: `skb->csum` of a `CHECKSUM_COMPLETE`
    /// skb needs no adjustment (Linux 6.16).
    pub const IPV6: u64 = 1 << 7;
}

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// A rewrite: the address and port there now, and what replaces them
/// (addresses by reference, ports in network byte order).
pub struct Ends<'a, A> {
    pub old: &'a A,
    pub old_port: u16,
    pub new: &'a A,
    pub new_port: u16,
}

/// Flags for `l4_csum_replace`, by protocol.
#[inline(always)]
fn l4_flags(l4: &L4) -> u64 {
    if l4.proto == IPPROTO_UDP { csum_flags::MARK_MANGLED_0 } else { 0 }
}

#[inline(always)]
fn port_off(l4: &L4, end: End) -> usize {
    match end {
        End::Src => l4.off,
        End::Dst => l4.off + 2,
    }
}

/// Rewrite the port at `end`, fixing the L4 checksum.
#[inline(always)]
fn rewrite_port(ctx: &TcContext, l4: &L4, end: End, old: u16, new: u16, slot: StatSlot) -> Result<(), Verdict> {
    if old == new || !l4.has_hdr {
        return Ok(());
    }
    ctx.l4_csum_replace(l4.csum_off, u64::from(old), u64::from(new), l4_flags(l4) | csum_flags::SIZE_2)
        .map_err(drop_rewrite(slot))?;
    put(ctx, port_off(l4, end), &new, slot)
}

/// Write `v` at `off`: directly when the bytes are in the linear part of
/// the frame (always the case for headers the parser read directly),
/// through the helper otherwise (headers after IPv6 extension headers).
#[inline(always)]
fn put<T: Copy>(ctx: &TcContext, off: usize, v: &T, slot: StatSlot) -> Result<(), Verdict> {
    if parse::write(ctx, off, *v).is_ok() {
        return Ok(());
    }
    ctx.store(off, v, 0).map_err(drop_rewrite(slot))
}

/// Replace the 16-bit words `old` with `new` at `off` in the IPv4 header
/// and update its checksum to match, all directly in the packet.
#[inline(always)]
fn ip4_replace<const N: usize>(ctx: &TcContext, off: usize, old: &[u8; N], new: &[u8; N]) -> Result<(), ()> {
    let sum = read::<[u8; 2]>(ctx, IP4_CSUM_OFF).map_err(|_| ())?;
    let mut diff = csum::Sum::default();
    let mut i = 0;
    while i + 1 < N {
        diff.replace16([old[i], old[i + 1]], [new[i], new[i + 1]]);
        i += 2;
    }
    parse::write(ctx, IP4_CSUM_OFF, csum::update(sum, diff))?;
    parse::write(ctx, off, *new)
}

/// Rewrite the IPv4 address and port at `end`. A later fragment has no
/// transport header: only the address and the IP checksum change.
#[inline(always)]
pub fn rewrite_v4(ctx: &TcContext, l4: &L4, end: End, e: Ends<'_, [u8; 4]>) -> Result<(), Verdict> {
    const SLOT: StatSlot = StatSlot::V4;
    let (old_addr, new_addr) = (u32::from_ne_bytes(*e.old), u32::from_ne_bytes(*e.new));
    let addr_off = match end {
        End::Src => IP4_SADDR_OFF,
        End::Dst => IP4_DADDR_OFF,
    };
    if old_addr != new_addr {
        if l4.has_hdr {
            let flags = l4_flags(l4) | csum_flags::PSEUDO_HDR | csum_flags::SIZE_4;
            ctx.l4_csum_replace(l4.csum_off, u64::from(old_addr), u64::from(new_addr), flags)
                .map_err(drop_rewrite(SLOT))?;
        }
        ip4_replace(ctx, addr_off, e.old, e.new).map_err(drop_rewrite(SLOT))?;
    }
    rewrite_port(ctx, l4, end, e.old_port, e.new_port, SLOT)
}

/// Rewrite the IPv6 address and port at `end`. IPv6 has no header
/// checksum; the address change enters the L4 checksum through the
/// pseudo-header.
#[inline(always)]
pub fn rewrite_v6(ctx: &TcContext, l4: &L4, end: End, e: Ends<'_, [u8; 16]>) -> Result<(), Verdict> {
    const SLOT: StatSlot = StatSlot::V6;
    let addr_off = match end {
        End::Src => IP6_SADDR_OFF,
        End::Dst => IP6_DADDR_OFF,
    };
    if e.old != e.new {
        if l4.has_hdr {
            let mut diff = csum::Sum::default();
            diff.replace(e.old, e.new).map_err(drop_rewrite(SLOT))?;
            let flags = l4_flags(l4) | csum_flags::PSEUDO_HDR | csum_flags::DIFF;
            if ctx.l4_csum_replace(l4.csum_off, 0, diff.as_diff(), flags | csum_flags::IPV6).is_err() {
                // Kernels before 6.16 refuse BPF_F_IPV6; there the
                // pseudo-header flag alone is right for every skb but
                // CHECKSUM_COMPLETE ones, which veth does not produce.
                ctx.l4_csum_replace(l4.csum_off, 0, diff.as_diff(), flags).map_err(drop_rewrite(SLOT))?;
            }
        }
        put(ctx, addr_off, e.new, SLOT)?;
    }
    rewrite_port(ctx, l4, end, e.old_port, e.new_port, SLOT)
}

/// A router's duties on an IPv4 packet it forwards: decrement the TTL
/// (and fix the header checksum), and write the MACs of the next link
/// when given (`None`: the kernel resolves them). `false` when the packet
/// must not be forwarded (TTL 1 or 0: the host stack answers).
#[inline(always)]
pub fn forward_v4(ctx: &TcContext, macs: Option<&[u8; 12]>) -> Result<bool, Verdict> {
    const SLOT: StatSlot = StatSlot::V4;
    // TTL and protocol form one 16-bit word of the header checksum.
    let word = read::<[u8; 2]>(ctx, IP4_TTL_OFF).map_err(passing(SLOT))?;
    if word[0] <= 1 {
        return Ok(false);
    }
    ip4_replace(ctx, IP4_TTL_OFF, &word, &[word[0] - 1, word[1]]).map_err(drop_rewrite(SLOT))?;
    if let Some(m) = macs {
        parse::write(ctx, 0, *m).map_err(drop_rewrite(SLOT))?;
    }
    Ok(true)
}

/// The same for IPv6: the hop limit (no header checksum), and the MACs.
#[inline(always)]
pub fn forward_v6(ctx: &TcContext, macs: Option<&[u8; 12]>) -> Result<bool, Verdict> {
    const SLOT: StatSlot = StatSlot::V6;
    let hops = read::<u8>(ctx, IP6_HOP_LIMIT_OFF).map_err(passing(SLOT))?;
    if hops <= 1 {
        return Ok(false);
    }
    parse::write(ctx, IP6_HOP_LIMIT_OFF, hops - 1).map_err(drop_rewrite(SLOT))?;
    if let Some(m) = macs {
        parse::write(ctx, 0, *m).map_err(drop_rewrite(SLOT))?;
    }
    Ok(true)
}
