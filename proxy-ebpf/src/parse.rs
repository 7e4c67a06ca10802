//! Header parsing. Every access is bounds-checked against `data_end`; any
//! frame the parser does not fully understand fails open (passes untouched).
use core::mem::size_of;

use aya_ebpf::programs::TcContext;
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP, Stat};

use crate::pass;

/// A TC verdict (`TC_ACT_*`).
pub type Verdict = i32;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
const IPV4_HLEN_MIN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN_MIN: usize = 20;
const UDP_HLEN: usize = 8;

/// Offsets inside the IPv4 header.
pub const IP4_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IP4_SADDR_OFF: usize = ETH_HLEN + 12;
pub const IP4_DADDR_OFF: usize = ETH_HLEN + 16;
/// Offsets inside the IPv6 header.
pub const IP6_SADDR_OFF: usize = ETH_HLEN + 8;
pub const IP6_DADDR_OFF: usize = ETH_HLEN + 24;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// Transport header facts shared by both families.
#[derive(Clone, Copy)]
pub struct L4 {
    /// Network byte order, as read from the packet.
    pub sport: u16,
    /// Network byte order, as read from the packet.
    pub dport: u16,
    pub proto: u8,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    /// Offset of the transport header from the start of the frame.
    pub off: usize,
    /// Offset of the transport checksum from the start of the frame.
    pub csum_off: usize,
}

impl L4 {
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.proto == IPPROTO_TCP
    }
}

/// A parsed TCP/UDP packet; `A` is the address type of its family.
pub struct Pkt<A> {
    /// Network byte order.
    pub saddr: A,
    /// Network byte order.
    pub daddr: A,
    pub l4: L4,
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

/// Pointer to a `T` at `off` in the linear part of the frame, or `Err` when
/// it does not fit.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, off: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + off) as *const T)
}

/// Read a `T` at `off`, or pass the packet as malformed.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Result<T, Verdict> {
    let ptr = ptr_at::<T>(ctx, off).map_err(|()| pass(Stat::PassMalformed))?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `ptr` lie inside
    // the packet; `read_unaligned` because packet offsets need not be aligned.
    Ok(unsafe { ptr.read_unaligned() })
}

/// Make the first `len` bytes of the frame linear, pulling them in from
/// paged data if needed (GSO/GRO skbs can keep headers there). Fails when
/// the frame is shorter than `len`.
#[inline(always)]
fn ensure_linear(ctx: &TcContext, len: usize) -> Result<(), Verdict> {
    if ctx.data() + len <= ctx.data_end() {
        return Ok(());
    }
    if (ctx.len() as usize) < len {
        return Err(pass(Stat::PassMalformed));
    }
    ctx.pull_data(len as u32).map_err(|_| pass(Stat::PassMalformed))
}

/// The frame's ethertype.
#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Result<u16, Verdict> {
    Ok(u16::from_be(read::<u16>(ctx, 12)?))
}

#[inline(always)]
pub fn parse_v4(ctx: &TcContext) -> Result<Pkt<[u8; 4]>, Verdict> {
    ensure_linear(ctx, ETH_HLEN + IPV4_HLEN_MIN)?;
    let ver_ihl = read::<u8>(ctx, ETH_HLEN)?;
    // The L4 offset comes from IHL, never a fixed 20: options are legal.
    let ihl = usize::from(ver_ihl & 0x0f) * 4;
    if ver_ihl >> 4 != 4 || ihl < IPV4_HLEN_MIN {
        return Err(pass(Stat::PassMalformed));
    }
    let tot_len = usize::from(u16::from_be(read::<u16>(ctx, ETH_HLEN + 2)?));
    if tot_len < ihl || ETH_HLEN + tot_len > ctx.len() as usize {
        return Err(pass(Stat::PassMalformed));
    }
    // More-fragments bit or a fragment offset: only the first fragment has
    // ports, so fragments are left to the stack.
    let frag = u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?);
    if frag & 0x3fff != 0 {
        return Err(pass(Stat::PassFragment));
    }
    let proto = read::<u8>(ctx, ETH_HLEN + 9)?;
    let saddr = read::<[u8; 4]>(ctx, IP4_SADDR_OFF)?;
    let daddr = read::<[u8; 4]>(ctx, IP4_DADDR_OFF)?;
    let l4 = parse_l4(ctx, proto, ETH_HLEN + ihl, tot_len - ihl, false)?;
    Ok(Pkt { saddr, daddr, l4 })
}

#[inline(always)]
pub fn parse_v6(ctx: &TcContext) -> Result<Pkt<[u8; 16]>, Verdict> {
    ensure_linear(ctx, ETH_HLEN + IPV6_HLEN)?;
    let ver = read::<u8>(ctx, ETH_HLEN)?;
    if ver >> 4 != 6 {
        return Err(pass(Stat::PassMalformed));
    }
    let payload_len = usize::from(u16::from_be(read::<u16>(ctx, ETH_HLEN + 4)?));
    if ETH_HLEN + IPV6_HLEN + payload_len > ctx.len() as usize {
        return Err(pass(Stat::PassMalformed));
    }
    // Only TCP or UDP directly after the fixed header: extension headers
    // (fragments among them) pass untouched.
    let next_hdr = read::<u8>(ctx, ETH_HLEN + 6)?;
    let saddr = read::<[u8; 16]>(ctx, IP6_SADDR_OFF)?;
    let daddr = read::<[u8; 16]>(ctx, IP6_DADDR_OFF)?;
    let l4 = parse_l4(ctx, next_hdr, ETH_HLEN + IPV6_HLEN, payload_len, true)?;
    Ok(Pkt { saddr, daddr, l4 })
}

/// Parse the TCP or UDP header at `off`, `len` bytes long per the IP header.
#[inline(always)]
fn parse_l4(ctx: &TcContext, proto: u8, off: usize, len: usize, v6: bool) -> Result<L4, Verdict> {
    let (hlen, csum_off) = match proto {
        IPPROTO_TCP => (TCP_HLEN_MIN, off + 16),
        IPPROTO_UDP => (UDP_HLEN, off + 6),
        _ => return Err(pass(Stat::PassNotL4)),
    };
    if len < hlen {
        return Err(pass(Stat::PassMalformed));
    }
    ensure_linear(ctx, off + hlen)?;
    let sport = read::<u16>(ctx, off)?;
    let dport = read::<u16>(ctx, off + 2)?;
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        let data_off = usize::from(read::<u8>(ctx, off + 12)? >> 4) * 4;
        if data_off < TCP_HLEN_MIN || data_off > len {
            return Err(pass(Stat::PassMalformed));
        }
        tcp_flags = read::<u8>(ctx, off + 13)?;
    } else {
        let udp_len = usize::from(u16::from_be(read::<u16>(ctx, off + 4)?));
        // IPv6 forbids a zero UDP checksum (RFC 8200 8.1): such a packet is
        // malformed and left for the stack to drop.
        if udp_len < UDP_HLEN || udp_len > len || (v6 && read::<u16>(ctx, csum_off)? == 0) {
            return Err(pass(Stat::PassMalformed));
        }
    }
    Ok(L4 { sport, dport, proto, tcp_flags, off, csum_off })
}
