//! Refusing new connections to a frontend without backends, as kube-proxy's
//! REJECT rules do: a TCP segment is answered with a RST, a UDP datagram
//! with ICMP / ICMPv6 port unreachable, both sent from the VIP back out of
//! the interface the packet came in on. The client fails fast
//! (ECONNREFUSED) instead of timing out against a black hole.
//!
//! The packet is rewritten in place into the answer: headers are composed
//! on the stack, checksums computed from scratch with `bpf_csum_diff`, the
//! frame resized with `bpf_skb_adjust_room`/`bpf_skb_change_tail`, and the
//! result redirected with `bpf_redirect`.
use aya_ebpf::{
    bindings::{__sk_buff, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use proxy_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, Stat, StatSlot};

use crate::{
    parse::{ETH_HLEN, IPV4_HLEN_MIN, IPV6_HLEN, Pkt, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN, Verdict},
    stats::{self, drop_rewrite, pass},
};

const TTL: u8 = 64;

/// Scratch space for composing an answer: a per-CPU map value rather than
/// stack, which the main path already needs.
#[repr(C, align(8))]
pub struct Scratch {
    pub eth: [u8; 16],
    pub ip: [u8; 40],
    /// Pseudo-header and transport or ICMP message, for the checksum.
    pub seg: [u8; 96],
}

// Not pinned: it holds no state between packets.
#[map]
static SCRATCH_V1: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The refusal could not be built: count it and let the packet pass.
#[inline(always)]
fn failed(slot: StatSlot) -> Verdict {
    pass(slot, Stat::RejectFailed)
}

#[inline(always)]
fn scratch(slot: StatSlot) -> Result<&'static mut Scratch, Verdict> {
    match SCRATCH_V1.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; TC programs do not preempt each other on a
        // CPU, so this run has it to itself.
        Some(p) => Ok(unsafe { &mut *p }),
        None => Err(failed(slot)),
    }
}

/// Sum the first `N` bytes of `buf` (N a multiple of 4) and fold them into
/// a checksum field value, ready to store as is.
#[inline(always)]
fn checksum<const N: usize>(buf: &mut [u8; 96]) -> Result<[u8; 2], ()> {
    let _ = &buf[..N];
    let n = u32::try_from(N).map_err(|_| ())?;
    // SAFETY: `buf` is 96 bytes of map value and N <= 96 (checked above by
    // the slice); a multiple of 4 as the helper requires.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf.as_mut_ptr().cast(), n, 0) };
    let sum = u32::try_from(sum).map_err(|_| ())?;
    let mut s = crate::csum::Sum::default();
    s.add_wide(sum);
    Ok((!s.fold()).to_ne_bytes())
}

#[inline(always)]
fn put(dst: &mut [u8], at: usize, src: &[u8]) {
    dst[at..at + src.len()].copy_from_slice(src);
}

/// View `N` bytes of `buf` at `at` as an array, for `store`.
#[inline(always)]
fn view<const N: usize>(buf: &[u8], at: usize) -> &[u8; N] {
    // SAFETY: the slice is N bytes long (bounds-checked by indexing).
    unsafe { &*buf[at..at + N].as_ptr().cast::<[u8; N]>() }
}

/// Copy `N` bytes of the frame at `off` into `dst[at..]`, with a constant
/// length (aya's `load_bytes` clamps the length at run time, and the
/// verifier refuses a length that may be zero).
#[inline(always)]
fn load_into<const N: usize>(
    ctx: &TcContext,
    off: usize,
    dst: &mut [u8],
    at: usize,
    slot: StatSlot,
) -> Result<(), Verdict> {
    let dst = &mut dst[at..at + N];
    let (Ok(off), Ok(n)) = (u32::try_from(off), u32::try_from(N)) else { return Err(failed(slot)) };
    // SAFETY: `dst` is N writable bytes.
    let rc = unsafe { bpf_skb_load_bytes(ctx.skb.skb as *const _, off, dst.as_mut_ptr().cast(), n) };
    if rc == 0 { Ok(()) } else { Err(failed(slot)) }
}

/// The Ethernet header of the answer: the request's, with MACs swapped.
#[inline(always)]
fn eth_reply(ctx: &TcContext, s: &mut Scratch, slot: StatSlot) -> Result<(), Verdict> {
    load_into::<ETH_HLEN>(ctx, 0, &mut s.eth, 0, slot)?;
    for i in 0..6 {
        s.eth.swap(i, i + 6);
    }
    Ok(())
}

/// Send the rewritten frame back out of the interface it arrived on.
#[inline(always)]
fn bounce(ctx: &TcContext, slot: StatSlot) -> Verdict {
    stats::count(slot, Stat::RejectNoBackend);
    // SAFETY: reading ifindex from the program's own context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain helper call; it returns TC_ACT_REDIRECT or TC_ACT_SHOT.
    stats::redirected(unsafe { bpf_redirect(ifindex, 0) })
}

#[inline(always)]
fn change_tail(ctx: &TcContext, len: usize, slot: StatSlot) -> Result<(), Verdict> {
    let len = u32::try_from(len).map_err(drop_rewrite(slot))?;
    // SAFETY: helper on the program's own skb.
    match unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) } {
        0 => Ok(()),
        e => Err(drop_rewrite(slot)(e)),
    }
}

/// Sequence and acknowledgement numbers and flags of a RST answering a
/// segment (RFC 9293 3.10.7.1): with ACK, seq = their ack; without, ack =
/// their seq + segment length (SYN and FIN count one).
#[inline(always)]
fn rst_numbers(
    ctx: &TcContext,
    l4_off: usize,
    flags: u8,
    seg_len: u32,
    slot: StatSlot,
) -> Result<([u8; 4], [u8; 4], u8), Verdict> {
    let no = |_| failed(slot);
    let seq = u32::from_be(ctx.load::<u32>(l4_off + 4).map_err(no)?);
    let ack = ctx.load::<[u8; 4]>(l4_off + 8).map_err(no)?;
    if flags & TCP_FLAG_ACK != 0 {
        return Ok((ack, [0; 4], TCP_FLAG_RST));
    }
    let mut len = seg_len;
    if flags & TCP_FLAG_SYN != 0 {
        len += 1;
    }
    if flags & TCP_FLAG_FIN != 0 {
        len += 1;
    }
    Ok(([0; 4], seq.wrapping_add(len).to_be_bytes(), TCP_FLAG_RST | TCP_FLAG_ACK))
}

/// A bare 20-byte TCP header for a RST from `src_port` to `dst_port`
/// (ports in network byte order), written at `at`.
#[inline(always)]
fn rst_header(buf: &mut [u8], at: usize, ports: (u16, u16), seq: [u8; 4], ack: [u8; 4], flags: u8) {
    put(buf, at, &ports.0.to_ne_bytes());
    put(buf, at + 2, &ports.1.to_ne_bytes());
    put(buf, at + 4, &seq);
    put(buf, at + 8, &ack);
    buf[at + 12] = 5 << 4;
    buf[at + 13] = flags;
    buf[at + 14] = 0;
    buf[at + 15] = 0;
    buf[at + 16] = 0;
    buf[at + 17] = 0;
    buf[at + 18] = 0;
    buf[at + 19] = 0;
}

// The answers are built by BPF subprograms (`inline(never)`) in the per-CPU
// scratch map, keeping the main path's stack small: the verifier adds up
// the frames of a call chain against 512 bytes.

#[inline(always)]
pub fn reject_v4(skb: *mut __sk_buff, pkt: &Pkt<[u8; 4]>) -> Verdict {
    let ctx = TcContext::new(skb);
    let l4 = &pkt.l4;
    // Never answer a RST; a later fragment has nothing to answer with.
    if (l4.is_tcp() && l4.tcp_flags & TCP_FLAG_RST != 0) || !l4.has_hdr {
        return pass(StatSlot::V4, Stat::PassNoBackend);
    }
    // Only plain 20-byte IPv4 headers are answered.
    if l4.off != ETH_HLEN + IPV4_HLEN_MIN {
        return failed(StatSlot::V4);
    }
    let r = if l4.is_tcp() { rst_v4(&ctx, pkt) } else { unreachable_v4(&ctx, pkt) };
    match r {
        Ok(()) => bounce(&ctx, StatSlot::V4),
        Err(v) => v,
    }
}

/// A 20-byte IPv4 header with its checksum, in `s.ip[..20]`.
#[inline(always)]
fn ip4_header(s: &mut Scratch, tot_len: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) -> Result<(), Verdict> {
    let h = &mut s.ip;
    for b in h.iter_mut() {
        *b = 0;
    }
    h[0] = 0x45;
    put(h, 2, &tot_len.to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = TTL;
    h[9] = proto;
    put(h, 12, &src);
    put(h, 16, &dst);
    // The IP header checksum covers just the header: sum it in `seg`.
    let mut tmp = [0u8; 20];
    tmp.copy_from_slice(&h[..20]);
    put(&mut s.seg, 0, &tmp);
    for b in &mut s.seg[20..] {
        *b = 0;
    }
    let c = checksum::<20>(&mut s.seg).map_err(|()| failed(StatSlot::V4))?;
    put(&mut s.ip, 10, &c);
    Ok(())
}

#[inline(never)]
fn rst_v4(ctx: &TcContext, pkt: &Pkt<[u8; 4]>) -> Result<(), Verdict> {
    const SLOT: StatSlot = StatSlot::V4;
    let l4 = &pkt.l4;
    let no = |_| failed(SLOT);
    let s = scratch(SLOT)?;
    let tot_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).map_err(no)?);
    let doff = u32::from(ctx.load::<u8>(l4.off + 12).map_err(no)? >> 4) * 4;
    let seg_len = u32::from(tot_len).saturating_sub(20 + doff);
    let (seq, ack, flags) = rst_numbers(ctx, l4.off, l4.tcp_flags, seg_len, SLOT)?;
    eth_reply(ctx, s, SLOT)?;
    ip4_header(s, 40, IPPROTO_TCP, pkt.daddr, pkt.saddr)?;
    // Pseudo-header (12 bytes) followed by the TCP header (20).
    for b in &mut s.seg {
        *b = 0;
    }
    put(&mut s.seg, 0, &pkt.daddr);
    put(&mut s.seg, 4, &pkt.saddr);
    s.seg[9] = IPPROTO_TCP;
    s.seg[11] = 20;
    rst_header(&mut s.seg, 12, (l4.dport, l4.sport), seq, ack, flags);
    let c = checksum::<32>(&mut s.seg).map_err(|()| failed(SLOT))?;
    put(&mut s.seg, 12 + 16, &c);
    // From here on the frame changes: failures drop it.
    change_tail(ctx, ETH_HLEN + IPV4_HLEN_MIN + 20, SLOT)?;
    ctx.store(0, view::<ETH_HLEN>(&s.eth, 0), 0).map_err(drop_rewrite(SLOT))?;
    ctx.store(ETH_HLEN, view::<20>(&s.ip, 0), 0).map_err(drop_rewrite(SLOT))?;
    ctx.store(ETH_HLEN + IPV4_HLEN_MIN, view::<20>(&s.seg, 12), 0).map_err(drop_rewrite(SLOT))
}

#[inline(never)]
fn unreachable_v4(ctx: &TcContext, pkt: &Pkt<[u8; 4]>) -> Result<(), Verdict> {
    const SLOT: StatSlot = StatSlot::V4;
    let s = scratch(SLOT)?;
    eth_reply(ctx, s, SLOT)?;
    ip4_header(s, 20 + 36, IPPROTO_ICMP, pkt.daddr, pkt.saddr)?;
    // ICMP header (8) + the offending IP header (20) + its first 8 bytes.
    for b in &mut s.seg {
        *b = 0;
    }
    s.seg[0] = 3; // destination unreachable
    s.seg[1] = 3; // port unreachable
    load_into::<28>(ctx, ETH_HLEN, &mut s.seg, 8, SLOT)?;
    let c = checksum::<36>(&mut s.seg).map_err(|()| failed(SLOT))?;
    put(&mut s.seg, 2, &c);
    // Make room for the new IP + ICMP headers (28 bytes) after Ethernet,
    // then cut everything past the quoted 8 bytes.
    ctx.adjust_room(28, BPF_ADJ_ROOM_MAC, 0).map_err(|_| failed(SLOT))?;
    change_tail(ctx, ETH_HLEN + IPV4_HLEN_MIN + 36, SLOT)?;
    ctx.store(0, view::<ETH_HLEN>(&s.eth, 0), 0).map_err(drop_rewrite(SLOT))?;
    ctx.store(ETH_HLEN, view::<20>(&s.ip, 0), 0).map_err(drop_rewrite(SLOT))?;
    ctx.store(ETH_HLEN + IPV4_HLEN_MIN, view::<36>(&s.seg, 0), 0).map_err(drop_rewrite(SLOT))
}

#[inline(always)]
pub fn reject_v6(skb: *mut __sk_buff, pkt: &Pkt<[u8; 16]>) -> Verdict {
    let ctx = TcContext::new(skb);
    let l4 = &pkt.l4;
    if (l4.is_tcp() && l4.tcp_flags & TCP_FLAG_RST != 0) || !l4.has_hdr {
        return pass(StatSlot::V6, Stat::PassNoBackend);
    }
    // Only packets without extension headers are answered.
    if l4.off != ETH_HLEN + IPV6_HLEN {
        return failed(StatSlot::V6);
    }
    let r = if l4.is_tcp() { rst_v6(&ctx, pkt) } else { unreachable_v6(&ctx, pkt) };
    match r {
        Ok(()) => bounce(&ctx, StatSlot::V6),
        Err(v) => v,
    }
}

/// The IPv6 header in `s.ip` and its pseudo-header at the start of `s.seg`.
#[inline(always)]
fn ip6_header(s: &mut Scratch, payload_len: u16, next: u8, src: &[u8; 16], dst: &[u8; 16]) {
    for b in &mut s.ip {
        *b = 0;
    }
    s.ip[0] = 0x60;
    put(&mut s.ip, 4, &payload_len.to_be_bytes());
    s.ip[6] = next;
    s.ip[7] = TTL;
    put(&mut s.ip, 8, src);
    put(&mut s.ip, 24, dst);
    for b in &mut s.seg {
        *b = 0;
    }
    put(&mut s.seg, 0, src);
    put(&mut s.seg, 16, dst);
    put(&mut s.seg, 34, &payload_len.to_be_bytes());
    s.seg[39] = next;
}

#[inline(never)]
fn rst_v6(ctx: &TcContext, pkt: &Pkt<[u8; 16]>) -> Result<(), Verdict> {
    const SLOT: StatSlot = StatSlot::V6;
    let l4 = &pkt.l4;
    let no = |_| failed(SLOT);
    let s = scratch(SLOT)?;
    let payload_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 4).map_err(no)?);
    let doff = u32::from(ctx.load::<u8>(l4.off + 12).map_err(no)? >> 4) * 4;
    let seg_len = u32::from(payload_len).saturating_sub(doff);
    let (seq, ack, flags) = rst_numbers(ctx, l4.off, l4.tcp_flags, seg_len, SLOT)?;
    eth_reply(ctx, s, SLOT)?;
    ip6_header(s, 20, IPPROTO_TCP, &pkt.daddr, &pkt.saddr);
    rst_header(&mut s.seg, 40, (l4.dport, l4.sport), seq, ack, flags);
    let c = checksum::<60>(&mut s.seg).map_err(|()| failed(SLOT))?;
    put(&mut s.seg, 40 + 16, &c);
    change_tail(ctx, ETH_HLEN + IPV6_HLEN + 20, SLOT)?;
    ctx.store(0, view::<ETH_HLEN>(&s.eth, 0), 0).map_err(drop_rewrite(SLOT))?;
    ctx.store(ETH_HLEN, view::<40>(&s.ip, 0), 0).map_err(drop_rewrite(SLOT))?;
    ctx.store(ETH_HLEN + IPV6_HLEN, view::<20>(&s.seg, 40), 0).map_err(drop_rewrite(SLOT))
}

#[inline(never)]
fn unreachable_v6(ctx: &TcContext, pkt: &Pkt<[u8; 16]>) -> Result<(), Verdict> {
    const SLOT: StatSlot = StatSlot::V6;
    // ICMPv6 header (8) + offending IPv6 header (40) + its first 8 bytes,
    // after the pseudo-header (40) for the checksum.
    const ICMP_LEN: u16 = 8 + 48;
    let s = scratch(SLOT)?;
    eth_reply(ctx, s, SLOT)?;
    ip6_header(s, ICMP_LEN, IPPROTO_ICMPV6, &pkt.daddr, &pkt.saddr);
    s.seg[40] = 1; // destination unreachable
    s.seg[41] = 4; // port unreachable
    load_into::<48>(ctx, ETH_HLEN, &mut s.seg, 48, SLOT)?;
    let c = checksum::<96>(&mut s.seg).map_err(|()| failed(SLOT))?;
    put(&mut s.seg, 42, &c);
    ctx.adjust_room(48, BPF_ADJ_ROOM_MAC, 0).map_err(|_| failed(SLOT))?;
    change_tail(ctx, ETH_HLEN + IPV6_HLEN + usize::from(ICMP_LEN), SLOT)?;
    ctx.store(0, view::<ETH_HLEN>(&s.eth, 0), 0).map_err(drop_rewrite(SLOT))?;
    ctx.store(ETH_HLEN, view::<40>(&s.ip, 0), 0).map_err(drop_rewrite(SLOT))?;
    ctx.store(ETH_HLEN + IPV6_HLEN, view::<56>(&s.seg, 40), 0).map_err(drop_rewrite(SLOT))
}
