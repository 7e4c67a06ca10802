//! Address and port rewrites with incremental checksum updates, only through
//! the kernel helpers: they also handle `CHECKSUM_PARTIAL` skbs from local
//! sockets, where the TCP/UDP checksum field holds only the pseudo-header sum.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use proxy_common::{IPPROTO_UDP, Stat};

use crate::{
    parse::{IP4_CSUM_OFF, IP4_DADDR_OFF, IP4_SADDR_OFF, IP6_DADDR_OFF, IP6_SADDR_OFF, L4, Verdict},
    stats,
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy)]
pub enum End {
    Src,
    Dst,
}

/// Flags for `l4_csum_replace`, computed once per protocol. A UDP checksum
/// of 0 means "none" on IPv4: `BPF_F_MARK_MANGLED_0` leaves it at 0 and
/// turns a computed 0 into 0xffff.
#[inline(always)]
fn l4_flags(l4: &L4) -> u64 {
    if l4.proto == IPPROTO_UDP { u64::from(BPF_F_MARK_MANGLED_0) } else { 0 }
}

#[inline(always)]
fn port_off(l4: &L4, end: End) -> usize {
    match end {
        End::Src => l4.off,
        End::Dst => l4.off + 2,
    }
}

/// A helper failed: the packet may be half rewritten, so it must not leave.
#[inline(always)]
fn drop_rewrite<E>(_: E) -> Verdict {
    stats::count(Stat::DropRewrite);
    aya_ebpf::bindings::TC_ACT_SHOT
}

/// Rewrite the port at `end`, fixing the L4 checksum.
#[inline(always)]
fn rewrite_port(ctx: &TcContext, l4: &L4, end: End, old: u16, new: u16) -> Result<(), Verdict> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(l4.csum_off, u64::from(old), u64::from(new), l4_flags(l4) | 2).map_err(drop_rewrite)?;
    ctx.store(port_off(l4, end), &new, 0).map_err(drop_rewrite)
}

/// Rewrite the IPv4 address and port at `end`.
#[inline(always)]
pub fn rewrite_v4(ctx: &TcContext, l4: &L4, end: End, old: ([u8; 4], u16), new: ([u8; 4], u16)) -> Result<(), Verdict> {
    let (old_addr, new_addr) = (u32::from_ne_bytes(old.0), u32::from_ne_bytes(new.0));
    let addr_off = match end {
        End::Src => IP4_SADDR_OFF,
        End::Dst => IP4_DADDR_OFF,
    };
    ctx.l4_csum_replace(
        l4.csum_off,
        u64::from(old_addr),
        u64::from(new_addr),
        l4_flags(l4) | u64::from(BPF_F_PSEUDO_HDR) | 4,
    )
    .map_err(drop_rewrite)?;
    rewrite_port(ctx, l4, end, old.1, new.1)?;
    ctx.l3_csum_replace(IP4_CSUM_OFF, u64::from(old_addr), u64::from(new_addr), 4).map_err(drop_rewrite)?;
    ctx.store(addr_off, &new.0, 0).map_err(drop_rewrite)
}

/// Rewrite the IPv6 address and port at `end`. IPv6 has no header checksum;
/// the address change enters the L4 checksum through the pseudo-header.
#[inline(always)]
pub fn rewrite_v6(
    ctx: &TcContext,
    l4: &L4,
    end: End,
    old: ([u8; 16], u16),
    new: ([u8; 16], u16),
) -> Result<(), Verdict> {
    let addr_off = match end {
        End::Src => IP6_SADDR_OFF,
        End::Dst => IP6_DADDR_OFF,
    };
    // bpf_csum_diff wants 4-byte words on the stack.
    let mut from: [u32; 4] = words(&old.0);
    let mut to: [u32; 4] = words(&new.0);
    // SAFETY: both buffers are 16 bytes on this stack frame, as the sizes say.
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
    if diff < 0 {
        return Err(drop_rewrite(diff));
    }
    // size 0: `to` is a checksum difference, not a value.
    ctx.l4_csum_replace(l4.csum_off, 0, diff as u64, l4_flags(l4) | u64::from(BPF_F_PSEUDO_HDR))
        .map_err(drop_rewrite)?;
    rewrite_port(ctx, l4, end, old.1, new.1)?;
    ctx.store(addr_off, &new.0, 0).map_err(drop_rewrite)
}

#[inline(always)]
fn words(addr: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}
