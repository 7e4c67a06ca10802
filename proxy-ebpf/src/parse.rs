//! Header parsing. Every access is bounds-checked against `data_end`; a
//! frame the parser does not fully understand fails open (passes
//! untouched, counted).
//!
//! Parsing counts nothing: a packet it does not take comes back as the
//! reason (`Err(Stat)`), for the caller to count (ingress) or not (egress,
//! which sees every packet the node sends).
//!
//! What comes out is one of:
//! - a TCP or UDP packet (`Pkt`), possibly a fragment: the first fragment
//!   carries the ports, later ones get them from the fragment stage;
//! - an ICMP / ICMPv6 error quoting a TCP or UDP packet (`IcmpErr`), which
//!   may belong to a service flow.
use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use proxy_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Stat};

use crate::{
    family::{V4, V6},
    work::Work,
};

/// A TC verdict (`TC_ACT_*`).
pub type Verdict = i32;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const IPV4_HLEN_MIN: usize = 20;
pub const IPV6_HLEN: usize = 40;
const TCP_HLEN_MIN: usize = 20;
const UDP_HLEN: usize = 8;
pub const ICMP_HLEN: usize = 8;

/// Offsets inside the IPv4 header.
pub const IP4_TOT_LEN_OFF: usize = ETH_HLEN + 2;
pub const IP4_TTL_OFF: usize = ETH_HLEN + 8;
pub const IP4_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP4_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP4_DADDR_OFF: usize = ETH_HLEN + 16;
/// Offsets inside the IPv6 header.
pub const IP6_PAYLOAD_LEN_OFF: usize = ETH_HLEN + 4;
pub const IP6_HOP_LIMIT_OFF: usize = ETH_HLEN + 7;
pub const IP6_SADDR_OFF: usize = ETH_HLEN + 8;
pub const IP6_DADDR_OFF: usize = ETH_HLEN + 24;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// The fragment offset bits of IPv4's flags-and-offset field (units of 8
/// bytes); MF is the bit above.
const FRAG_OFFSET: u16 = 0x1fff;

/// IPv6 extension headers walked (more than this: not understood).
const IPV6_MAX_EXT: usize = 4;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_DEST: u8 = 60;

/// Transport header facts shared by both families.
#[derive(Clone, Copy)]
pub struct L4 {
    /// Network byte order (from the fragment table for later fragments).
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP and for later fragments).
    pub tcp_flags: u8,
    /// Offset of the transport header (or the fragment's payload).
    pub off: usize,
    /// Offset of the transport checksum.
    pub csum_off: usize,
    /// The transport header is in this packet (not a later fragment).
    pub has_hdr: bool,
}

impl L4 {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }

    /// A TCP segment that opens a connection (SYN without ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }
}

/// A fragment: its datagram's identification (IPv4 uses the first two
/// bytes) and whether it is the first one.
#[derive(Clone, Copy)]
pub struct Frag {
    pub id: [u8; 4],
    pub first: bool,
}

/// A parsed TCP/UDP packet; `A` is the address type of its family.
pub struct Pkt<A> {
    /// Network byte order.
    pub saddr: A,
    /// Network byte order.
    pub daddr: A,
    pub l4: L4,
    /// Set when the datagram is fragmented.
    pub frag: Option<Frag>,
}

impl<A: Copy> Pkt<A> {
    #[inline(always)]
    pub fn src(&self) -> (A, u16) {
        (self.saddr, self.l4.sport)
    }

    #[inline(always)]
    pub fn dst(&self) -> (A, u16) {
        (self.daddr, self.l4.dport)
    }
}

/// The packet an ICMP error quotes.
#[derive(Clone, Copy)]
pub struct Inner<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// Offset of the quoted IP header.
    pub l3_off: usize,
    /// Offset of the quoted transport header.
    pub l4_off: usize,
    /// Offset of the quoted transport checksum; 0 when it is not in the
    /// packet or not in use (IPv4 UDP may carry none).
    pub csum_off: usize,
}

/// An ICMP or ICMPv6 error quoting a TCP or UDP packet.
pub struct IcmpErr<A> {
    pub saddr: A,
    pub daddr: A,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    pub inner: Inner<A>,
}

/// What a packet parsed as: its headers are in the `Work`'s `pkt` or `err`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    L4,
    IcmpErr,
}

/// Pointer to a `T` at `off` in the linear part of the frame.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *const T)
}

/// Write `v` at `off` in the linear part of the frame, directly (no helper
/// call). `off` is bounded for the verifier, which only follows packet
/// offsets it can bound; `Err` when the bytes are not in the linear part
/// (the caller then writes through the helper). Packet pointers do not
/// survive a helper that may move the data (the checksum helpers), so
/// every write derives its own.
#[inline(always)]
pub fn write<T: Copy>(ctx: &TcContext, off: usize, v: T) -> Result<(), ()> {
    if off > MAX_DIRECT_OFF {
        return Err(());
    }
    let ptr = ptr_at::<T>(ctx, off)?.cast_mut();
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `ptr` lie inside
    // the packet; TC programs may write it (the verifier unclones the skb
    // first); `write_unaligned` because packet offsets need not be aligned.
    unsafe { ptr.write_unaligned(v) };
    Ok(())
}

/// The largest offset `write` takes: past every header it rewrites.
const MAX_DIRECT_OFF: usize = 1024;

/// Read a `T` at `off`; a frame too short is malformed.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Stat> {
    let ptr = ptr_at::<T>(ctx, off).map_err(|()| Stat::PassMalformed)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `ptr` lie inside
    // the packet; `read_unaligned` because packet offsets need not be aligned.
    Ok(unsafe { ptr.read_unaligned() })
}

/// Read a `T` at a variable offset `off` with `bpf_skb_load_bytes`: for
/// headers after extension headers or inside ICMP errors, where the
/// verifier cannot follow a direct access (and the data may sit in paged
/// fragments).
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Stat> {
    ctx.load::<T>(off).map_err(|_| Stat::PassMalformed)
}

/// Make the first `len` bytes of the frame linear, pulling them in from
/// paged data if needed (GSO/GRO skbs can keep headers there). Fails when
/// the frame is shorter than `len`.
#[inline(always)]
pub fn ensure_linear(ctx: &TcContext, len: usize) -> Result<(), Stat> {
    if ctx.data() + len <= ctx.data_end() {
        return Ok(());
    }
    if (ctx.len() as usize) < len {
        return Err(Stat::PassMalformed);
    }
    // `len` is a header offset: at most a few hundred bytes, so it fits.
    let len32 = u32::try_from(len).map_err(|_| Stat::PassMalformed)?;
    ctx.pull_data(len32).map_err(|_| Stat::PassMalformed)
}

/// The frame's ethertype.
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Result<u16, Stat> {
    Ok(u16::from_be(read::<u16>(ctx, 12)?))
}

// Parsing runs in BPF subprograms of its own (`inline(never)`): its
// temporaries stay in its frame, the result is written straight into the
// caller's.

#[inline(never)]
pub fn parse_v4(ctx: &TcContext, w: &mut Work<V4>) -> Result<Parsed, Stat> {
    ensure_linear(ctx, ETH_HLEN + IPV4_HLEN_MIN)?;
    let ver_ihl = read::<u8>(ctx, ETH_HLEN)?;
    // The L4 offset comes from IHL, never a fixed 20: options are legal.
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_HLEN_MIN {
        return Err(Stat::PassMalformed);
    }
    let tot_len = usize::from(u16::from_be(read::<u16>(ctx, IP4_TOT_LEN_OFF)?));
    if tot_len < ihl || ETH_HLEN + tot_len > ctx.len() as usize {
        return Err(Stat::PassMalformed);
    }
    let frag_off = u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?);
    let proto = read::<u8>(ctx, ETH_HLEN + 9)?;
    let saddr = read::<[u8; 4]>(ctx, IP4_SADDR_OFF)?;
    let daddr = read::<[u8; 4]>(ctx, IP4_DADDR_OFF)?;
    let l4_off = ETH_HLEN + ihl;
    let l4_len = tot_len - ihl;
    // More-fragments bit or a fragment offset: a fragment. Only the first
    // one (offset 0) has the transport header.
    let frag = if frag_off & 0x3fff != 0 {
        let id = read::<[u8; 2]>(ctx, ETH_HLEN + 4)?;
        Some(Frag { id: [id[0], id[1], 0, 0], first: frag_off & FRAG_OFFSET == 0 })
    } else {
        None
    };
    if proto == IPPROTO_ICMP {
        if frag.is_some() {
            // ICMP errors are never fragmented; anything else is not ours.
            return Err(Stat::PassNotL4);
        }
        w.err.saddr = saddr;
        w.err.daddr = daddr;
        icmp_v4(ctx, &mut w.err, l4_off, l4_len)?;
        return Ok(Parsed::IcmpErr);
    }
    w.pkt.l4 = parse_l4::<true>(ctx, proto, l4_off, l4_len, frag, false)?;
    w.pkt.saddr = saddr;
    w.pkt.daddr = daddr;
    w.pkt.frag = frag;
    Ok(Parsed::L4)
}

/// Walk IPv6 extension headers from `off` (next header `next`): the
/// transport protocol, its offset and the fragment header if any. A routing
/// header passes untouched (the transport checksum's pseudo-header uses the
/// final destination, not the one in the packet).
#[inline(always)]
fn walk_v6(ctx: &TcContext, mut next: u8, mut off: usize) -> Result<(u8, usize, Option<Frag>), Stat> {
    let mut frag = None;
    for _ in 0..IPV6_MAX_EXT {
        match next {
            NEXTHDR_HOP | NEXTHDR_DEST => {
                let h = load::<[u8; 2]>(ctx, off)?;
                next = h[0];
                off += (usize::from(h[1]) + 1) * 8;
            }
            NEXTHDR_FRAGMENT => {
                let h = load::<[u8; 8]>(ctx, off)?;
                next = h[0];
                let frag_off = u16::from_be_bytes([h[2], h[3]]);
                frag = Some(Frag { id: [h[4], h[5], h[6], h[7]], first: frag_off >> 3 == 0 });
                off += 8;
            }
            NEXTHDR_ROUTING => return Err(Stat::PassNotL4),
            _ => return Ok((next, off, frag)),
        }
    }
    Err(Stat::PassNotL4)
}

#[inline(never)]
pub fn parse_v6(ctx: &TcContext, w: &mut Work<V6>) -> Result<Parsed, Stat> {
    ensure_linear(ctx, ETH_HLEN + IPV6_HLEN)?;
    let ver = read::<u8>(ctx, ETH_HLEN)?;
    if ver >> 4 != 6 {
        return Err(Stat::PassMalformed);
    }
    let payload_len = usize::from(u16::from_be(read::<u16>(ctx, IP6_PAYLOAD_LEN_OFF)?));
    let end = ETH_HLEN + IPV6_HLEN + payload_len;
    if end > ctx.len() as usize {
        return Err(Stat::PassMalformed);
    }
    let next_hdr = read::<u8>(ctx, ETH_HLEN + 6)?;
    if next_hdr == IPPROTO_TCP || next_hdr == IPPROTO_UDP {
        // The common case: the transport header right after the fixed one,
        // at a constant offset the verifier follows.
        let l4 = parse_l4::<true>(ctx, next_hdr, ETH_HLEN + IPV6_HLEN, payload_len, None, true)?;
        w.pkt.l4 = l4;
        w.pkt.saddr = read::<[u8; 16]>(ctx, IP6_SADDR_OFF)?;
        w.pkt.daddr = read::<[u8; 16]>(ctx, IP6_DADDR_OFF)?;
        w.pkt.frag = None;
        return Ok(Parsed::L4);
    }
    let (proto, l4_off, frag) = walk_v6(ctx, next_hdr, ETH_HLEN + IPV6_HLEN)?;
    if l4_off > end {
        return Err(Stat::PassMalformed);
    }
    let l4_len = end - l4_off;
    if proto == IPPROTO_ICMPV6 {
        if frag.is_some() {
            return Err(Stat::PassNotL4);
        }
        w.err.saddr = read::<[u8; 16]>(ctx, IP6_SADDR_OFF)?;
        w.err.daddr = read::<[u8; 16]>(ctx, IP6_DADDR_OFF)?;
        icmp_v6(ctx, &mut w.err, l4_off, l4_len)?;
        return Ok(Parsed::IcmpErr);
    }
    w.pkt.l4 = parse_l4::<false>(ctx, proto, l4_off, l4_len, frag, true)?;
    w.pkt.saddr = read::<[u8; 16]>(ctx, IP6_SADDR_OFF)?;
    w.pkt.daddr = read::<[u8; 16]>(ctx, IP6_DADDR_OFF)?;
    w.pkt.frag = frag;
    Ok(Parsed::L4)
}

/// Parse the TCP or UDP header at `off`, `len` bytes long per the IP header
/// (ports are left 0 for a later fragment: the fragment stage fills them).
/// `DIRECT`: `off` is one the verifier can follow for direct packet access
/// (a constant, or IPv4's header length); otherwise the helper reads.
#[inline(always)]
fn parse_l4<const DIRECT: bool>(
    ctx: &TcContext,
    proto: u8,
    off: usize,
    len: usize,
    frag: Option<Frag>,
    v6: bool,
) -> Result<L4, Stat> {
    let (hlen, csum_off) = match proto {
        IPPROTO_TCP => (TCP_HLEN_MIN, off + 16),
        IPPROTO_UDP => (UDP_HLEN, off + 6),
        _ => return Err(Stat::PassNotL4),
    };
    if let Some(f) = frag
        && !f.first
    {
        return Ok(L4 { sport: 0, dport: 0, proto, tcp_flags: 0, off, csum_off, has_hdr: false });
    }
    if len < hlen {
        return Err(Stat::PassMalformed);
    }
    if DIRECT {
        ensure_linear(ctx, off + hlen)?;
    }
    let get16 = |o: usize| if DIRECT { read::<u16>(ctx, o) } else { load::<u16>(ctx, o) };
    let get8 = |o: usize| if DIRECT { read::<u8>(ctx, o) } else { load::<u8>(ctx, o) };
    let sport = get16(off)?;
    let dport = get16(off + 2)?;
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        let data_off = usize::from(get8(off + 12)? >> 4) * 4;
        if data_off < TCP_HLEN_MIN || data_off > len {
            return Err(Stat::PassMalformed);
        }
        tcp_flags = get8(off + 13)?;
    } else {
        let udp_len = usize::from(u16::from_be(get16(off + 4)?));
        // A fragment's UDP length covers the whole datagram, not this
        // fragment; otherwise it must fit. IPv6 forbids a zero UDP checksum
        // (RFC 8200 8.1): such a packet is left for the stack to drop.
        let fits = frag.is_some() || udp_len <= len;
        if udp_len < UDP_HLEN || !fits || (v6 && get16(csum_off)? == 0) {
            return Err(Stat::PassMalformed);
        }
    }
    Ok(L4 { sport, dport, proto, tcp_flags, off, csum_off, has_hdr: true })
}

/// The transport ports of a quoted packet whose transport header starts at
/// `l4_off`, and its checksum offset when quoted. Only bytes inside the
/// error's IP packet (before `end`) count: what follows it in the frame
/// (Ethernet padding) is not covered by the ICMP checksum, and must never
/// be read as the quote or rewritten.
#[inline(always)]
fn quoted_l4(ctx: &TcContext, proto: u8, l4_off: usize, end: usize) -> Result<(u16, u16, usize), Stat> {
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Stat::PassNotL4);
    }
    // An error quotes at least 8 bytes of the transport header (RFC 792,
    // 4443), but IPv4 options or extension headers in the quote can push
    // even the ports out of it.
    if l4_off + 4 > end {
        return Err(Stat::PassNotL4);
    }
    let sport = load::<u16>(ctx, l4_off)?;
    let dport = load::<u16>(ctx, l4_off + 2)?;
    let csum_off = if proto == IPPROTO_UDP {
        let off = l4_off + 6;
        // A zero UDP checksum (IPv4) means none: it stays zero.
        if off + 2 <= end && load::<u16>(ctx, off)? != 0 { off } else { 0 }
    } else {
        // TCP's checksum is at 16: quoted only when the error has room.
        let off = l4_off + 16;
        if off + 2 <= end { off } else { 0 }
    };
    Ok((sport, dport, csum_off))
}

/// ICMP destination unreachable (3) and time exceeded (11) quoting a TCP
/// or UDP packet; everything else passes.
#[inline(never)]
fn icmp_v4(ctx: &TcContext, err: &mut IcmpErr<[u8; 4]>, icmp_off: usize, len: usize) -> Result<(), Stat> {
    if len < ICMP_HLEN + IPV4_HLEN_MIN + 8 {
        return Err(Stat::PassNotL4);
    }
    let ty = load::<u8>(ctx, icmp_off)?;
    if ty != 3 && ty != 11 {
        return Err(Stat::PassNotL4);
    }
    let l3_off = icmp_off + ICMP_HLEN;
    let ver_ihl = load::<u8>(ctx, l3_off)?;
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_HLEN_MIN {
        return Err(Stat::PassMalformed);
    }
    // A quoted later fragment has no ports.
    if u16::from_be(load::<u16>(ctx, l3_off + 6)?) & 0x1fff != 0 {
        return Err(Stat::PassNotL4);
    }
    let proto = load::<u8>(ctx, l3_off + 9)?;
    let inner_src = load::<[u8; 4]>(ctx, l3_off + 12)?;
    let inner_dst = load::<[u8; 4]>(ctx, l3_off + 16)?;
    let l4_off = l3_off + ihl;
    let (sport, dport, csum_off) = quoted_l4(ctx, proto, l4_off, icmp_off + len)?;
    err.icmp_off = icmp_off;
    err.inner = Inner { saddr: inner_src, daddr: inner_dst, sport, dport, proto, l3_off, l4_off, csum_off };
    Ok(())
}

/// ICMPv6 destination unreachable (1), packet too big (2) and time
/// exceeded (3) quoting a TCP or UDP packet; everything else passes.
#[inline(never)]
fn icmp_v6(ctx: &TcContext, err: &mut IcmpErr<[u8; 16]>, icmp_off: usize, len: usize) -> Result<(), Stat> {
    if len < ICMP_HLEN + IPV6_HLEN + 8 {
        return Err(Stat::PassNotL4);
    }
    let ty = load::<u8>(ctx, icmp_off)?;
    if !(1..=3).contains(&ty) {
        return Err(Stat::PassNotL4);
    }
    // The quoted header starts after the 8-byte ICMPv6 header (the 4 bytes
    // after type, code and checksum are unused, or the MTU).
    let l3_off = icmp_off + ICMP_HLEN;
    if load::<u8>(ctx, l3_off)? >> 4 != 6 {
        return Err(Stat::PassMalformed);
    }
    let next = load::<u8>(ctx, l3_off + 6)?;
    let (proto, l4_off, frag) = walk_v6(ctx, next, l3_off + IPV6_HLEN)?;
    if frag.is_some_and(|f| !f.first) {
        return Err(Stat::PassNotL4);
    }
    let (sport, dport, csum_off) = quoted_l4(ctx, proto, l4_off, icmp_off + len)?;
    err.icmp_off = icmp_off;
    let inner = &mut err.inner;
    inner.saddr = load::<[u8; 16]>(ctx, l3_off + 8)?;
    inner.daddr = load::<[u8; 16]>(ctx, l3_off + 24)?;
    (inner.sport, inner.dport, inner.proto) = (sport, dport, proto);
    (inner.l3_off, inner.l4_off, inner.csum_off) = (l3_off, l4_off, csum_off);
    Ok(())
}
