//! Crafted Ethernet frames (IPv4/IPv6, TCP/UDP) with correct checksums,
//! and a checker that recomputes every checksum from scratch. Used by the
//! packet tests and the per-packet benchmarks with `testrun`.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;

pub fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded to 16 bits")
}

pub fn csum_add(bytes: &[u8]) -> u32 {
    bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend([0, proto]);
            p.extend(u16::try_from(len).expect("len").to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend(u32::try_from(len).expect("len").to_be_bytes());
            p.extend([0, 0, 0, proto]);
        }
        _ => panic!("mixed families"),
    }
    p
}

/// A TCP or UDP segment with a correct checksum (UDP over IPv4 may ask for
/// none: `zero_udp_csum`).
pub fn l4(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16, flags: u8, zero_udp_csum: bool) -> Vec<u8> {
    let payload = b"dsproxy";
    let mut seg = Vec::new();
    seg.extend(sport.to_be_bytes());
    seg.extend(dport.to_be_bytes());
    let csum_at = if proto == TCP {
        seg.extend(1000u32.to_be_bytes()); // seq
        seg.extend(if flags & ACK != 0 { 2000u32 } else { 0 }.to_be_bytes());
        seg.extend([5 << 4, flags]);
        seg.extend(65535u16.to_be_bytes());
        seg.extend([0, 0, 0, 0]); // csum, urgent
        16
    } else {
        seg.extend(u16::try_from(8 + payload.len()).expect("len").to_be_bytes());
        seg.extend([0, 0]);
        6
    };
    seg.extend(payload);
    if !zero_udp_csum {
        let mut sum = csum_add(&pseudo(src, dst, proto, seg.len()));
        sum += csum_add(&seg);
        let mut c = csum_fold(sum);
        if c == 0 && proto == UDP {
            c = 0xffff;
        }
        seg[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    seg
}

pub fn eth(ethertype: u16) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend(ethertype.to_be_bytes());
    f
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, options: usize, l4: &[u8]) -> Vec<u8> {
    let ihl = 20 + options;
    let mut h = vec![0x40 | u8::try_from(ihl / 4).expect("ihl"), 0];
    h.extend(u16::try_from(ihl + l4.len()).expect("len").to_be_bytes());
    h.extend([0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]); // id, DF, ttl, proto, csum
    h.extend(src.octets());
    h.extend(dst.octets());
    h.extend(std::iter::repeat_n(1u8, options)); // NOP options
    let c = csum_fold(csum_add(&h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = eth(0x0800);
    f.extend(h);
    f.extend(l4);
    f
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = eth(0x86DD);
    f.extend([0x60, 0, 0, 0]);
    f.extend(u16::try_from(payload.len()).expect("len").to_be_bytes());
    f.extend([next, 64]);
    f.extend(src.octets());
    f.extend(dst.octets());
    f.extend(payload);
    f
}

/// A TCP/UDP frame from `src` to `dst` of either family.
pub fn frame(src: (IpAddr, u16), dst: (IpAddr, u16), proto: u8, flags: u8) -> Vec<u8> {
    let seg = l4(src.0, dst.0, proto, src.1, dst.1, flags, false);
    match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, proto, 0, &seg),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, proto, &seg),
        _ => panic!("mixed families"),
    }
}

/// Source and destination of a frame, and whether every checksum in it is
/// right (recomputed from scratch).
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
}

pub fn inspect(f: &[u8]) -> Seen {
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let (src, dst, proto, l4_off, l4_len) = if ethertype == 0x0800 {
        let ihl = usize::from(f[14] & 0xf) * 4;
        assert_eq!(csum_fold(csum_add(&f[14..14 + ihl])), 0, "IPv4 header checksum is wrong");
        let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
        let s = IpAddr::V4(Ipv4Addr::new(f[26], f[27], f[28], f[29]));
        let d = IpAddr::V4(Ipv4Addr::new(f[30], f[31], f[32], f[33]));
        (s, d, f[23], 14 + ihl, tot - ihl)
    } else {
        let s = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&f[22..38]).expect("16")));
        let d = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&f[38..54]).expect("16")));
        let (mut next, mut off) = (f[20], 54);
        let end = 54 + usize::from(u16::from_be_bytes([f[18], f[19]]));
        // Hop-by-hop and destination options headers before the transport.
        while next == 0 || next == 60 {
            next = f[off];
            off += (usize::from(f[off + 1]) + 1) * 8;
        }
        (s, d, next, off, end - off)
    };
    let seg = &f[l4_off..l4_off + l4_len];
    let csum_at = if proto == TCP { 16 } else { 6 };
    let zero_udp = proto == UDP && seg[6] == 0 && seg[7] == 0;
    if !zero_udp {
        let sum = csum_add(&pseudo(src, dst, proto, seg.len())) + csum_add(seg);
        assert_eq!(
            csum_fold(sum),
            0,
            "L4 checksum is wrong (checksum field {:02x}{:02x})",
            seg[csum_at],
            seg[csum_at + 1]
        );
    }
    let sport = u16::from_be_bytes([seg[0], seg[1]]);
    let dport = u16::from_be_bytes([seg[2], seg[3]]);
    Seen { src: (src, sport), dst: (dst, dport) }
}

/// An ICMP (IPv4) or ICMPv6 error from `from` to `to` of `kind` (type,
/// code), with `extra` in the word after the checksum (the next-hop MTU of
/// fragmentation needed / packet too big), quoting the IP packet of frame
/// `quoted`: its IP header and `quote` bytes after it (all when `None`).
pub fn icmp_error(
    from: IpAddr,
    to: IpAddr,
    kind: (u8, u8),
    extra: u32,
    quoted: &[u8],
    quote: Option<usize>,
) -> Vec<u8> {
    let v6 = from.is_ipv6();
    let ip_hlen = if v6 { 40 } else { usize::from(quoted[14] & 0xf) * 4 };
    let end = quote.map_or(quoted.len(), |n| (14 + ip_hlen + n).min(quoted.len()));
    let mut msg = vec![kind.0, kind.1, 0, 0];
    msg.extend(extra.to_be_bytes());
    msg.extend(&quoted[14..end]);
    let sum = if v6 { csum_add(&pseudo(from, to, 58, msg.len())) } else { 0 } + csum_add(&msg);
    msg[2..4].copy_from_slice(&csum_fold(sum).to_be_bytes());
    match (from, to) {
        (IpAddr::V4(s), IpAddr::V4(d)) => ipv4(s, d, 1, 0, &msg),
        (IpAddr::V6(s), IpAddr::V6(d)) => ipv6(s, d, 58, &msg),
        _ => panic!("mixed families"),
    }
}
