//! Frames for the fuzzer, drawn from a seeded generator: service flows of
//! both families (TCP with every kind of flags, UDP) from clients on the
//! node, hairpin clients and external clients, their replies, ICMP errors
//! quoting either direction, fragments (in and out of order), IPv4 options,
//! IPv6 extension-header chains, VLAN tags, padding, frames to frontends
//! without backends, to other ports and addresses, other protocols, and
//! random bytes; a quarter of them mutated (bytes, bits, lengths, cuts).
//!
//! The frames depend on the seed alone, never on what the datapath did, so
//! a seed replays the same frames.
use std::{collections::VecDeque, net::IpAddr};

use dsproxy::{
    frames::{ACK, FIN, RST, SYN, TCP, UDP, pseudo},
    rand::XorShift,
};

use super::{
    model::{Ep, Hook, fold, sum},
    scene::Scene,
};

const PSH: u8 = 0x08;

/// One generated frame and where it runs.
pub struct Frame {
    pub hook: Hook,
    pub bytes: Vec<u8>,
    /// What the generator meant (for the report and failures).
    pub kind: &'static str,
}

pub struct Gen {
    rng: XorShift,
    scene: Scene,
    /// Later fragments waiting for their turn.
    pending: VecDeque<Frame>,
}

/// A TCP/UDP packet to build.
struct Seg {
    src: Ep,
    dst: Ep,
    proto: u8,
    flags: u8,
}

impl Gen {
    pub fn new(seed: u64, scene: Scene) -> Self {
        Self { rng: XorShift::new(seed), scene, pending: VecDeque::new() }
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.rng.below(n as u64)).expect("fits")
    }

    /// True `per_mille` times in a thousand.
    fn chance(&mut self, per_mille: usize) -> bool {
        self.below(1000) < per_mille
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn byte(&mut self) -> u8 {
        self.rng.next_u64().to_le_bytes()[0]
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    pub fn draw(&mut self) -> Frame {
        if !self.pending.is_empty() && self.chance(400) {
            return self.pending.pop_front().expect("pending");
        }
        let mut f = match self.below(100) {
            0..=34 => self.forward(),
            35..=59 => self.reply(),
            60..=69 => self.icmp_about_forward(),
            70..=76 => self.icmp_about_reply(),
            77..=84 => self.elsewhere(),
            85..=91 => self.other_protocol(),
            _ => self.garbage(),
        };
        if self.chance(250) {
            self.mutate(&mut f.bytes);
            f.kind = match f.kind {
                "forward" => "forward, mutated",
                "reply" => "reply, mutated",
                "icmp error about a forward packet" => "icmp error about a forward packet, mutated",
                "icmp error about a reply" => "icmp error about a reply, mutated",
                _ => "other, mutated",
            };
        }
        f
    }

    /// A frontend of the family, the client and hook of a flow to it, and
    /// the address the client sends to.
    fn flow(&mut self) -> (bool, usize, Ep, IpAddr, Hook) {
        let v6 = self.chance(500);
        let fes: Vec<usize> =
            (0..self.scene.frontends.len()).filter(|&i| self.scene.frontends[i].addr.is_ipv6() == v6).collect();
        let fe = self.pick(&fes);
        let h = self.scene.hosts(v6).clone();
        let (client, hook) =
            if self.chance(250) { (h.external, Hook::FromDevice) } else { (self.pick(&h.clients), Hook::FromPod) };
        let port = 40000 + u16::try_from(self.below(24)).expect("small");
        let f = &self.scene.frontends[fe];
        let dst = if f.addr.is_unspecified() { h.node } else { f.addr };
        (v6, fe, (client, port), dst, hook)
    }

    fn tcp_flags(&mut self, reply: bool) -> u8 {
        match self.below(20) {
            0..=5 => {
                if reply {
                    SYN | ACK
                } else {
                    SYN
                }
            }
            6..=9 => ACK,
            10..=12 => PSH | ACK,
            13..=14 => FIN | ACK,
            15 => RST,
            16 => RST | ACK,
            17 => SYN | ACK,
            _ => self.byte(),
        }
    }

    fn forward(&mut self) -> Frame {
        let (_, fe, client, dst, hook) = self.flow();
        let f = &self.scene.frontends[fe];
        let (proto, mut port) = (f.proto, f.port);
        if self.chance(50) {
            port = port.wrapping_add(1000);
        }
        let flags = if proto == TCP { self.tcp_flags(false) } else { 0 };
        let seg = Seg { src: client, dst: (dst, port), proto, flags };
        let bytes = self.packet(&seg, hook, "forward");
        Frame { hook, bytes, kind: "forward" }
    }

    /// The backend side of a flow: (backend, the address and port it
    /// answers to) as the datapath would have translated it.
    fn backend_side(&mut self, fe: usize, client: Ep, dst: IpAddr, hook: Hook) -> (Ep, Ep) {
        let f = self.scene.frontends[fe].clone();
        let h = self.scene.hosts(client.0.is_ipv6()).clone();
        let backend = if f.backends.is_empty() || self.chance(50) {
            (self.pick(&h.backends), f.port)
        } else {
            self.pick(&f.backends)
        };
        let to = if backend.0 == client.0 {
            (dst, client.1)
        } else if hook == Hook::FromDevice {
            (h.node, client.1)
        } else {
            client
        };
        (backend, to)
    }

    fn reply(&mut self) -> Frame {
        let (_, fe, client, dst, hook) = self.flow();
        let (backend, to) = self.backend_side(fe, client, dst, hook);
        let proto = self.scene.frontends[fe].proto;
        let flags = if proto == TCP { self.tcp_flags(true) } else { 0 };
        let seg = Seg { src: backend, dst: to, proto, flags };
        let hook = if self.chance(750) { Hook::Egress } else { Hook::FromPod };
        let bytes = self.packet(&seg, hook, "reply");
        Frame { hook, bytes, kind: "reply" }
    }

    /// ICMP error types: IPv4 fragmentation needed, port and host
    /// unreachable, time exceeded, parameter problem; their ICMPv6
    /// counterparts.
    fn icmp_kind(&mut self, v6: bool) -> ((u8, u8), u32) {
        if v6 {
            self.pick(&[((2, 0), 1280), ((1, 4), 0), ((1, 0), 0), ((3, 0), 0), ((4, 0), 0)])
        } else {
            self.pick(&[((3, 4), 1280), ((3, 3), 0), ((3, 1), 0), ((11, 0), 0), ((12, 0), 0)])
        }
    }

    fn icmp_about_forward(&mut self) -> Frame {
        let (v6, fe, client, dst, hook) = self.flow();
        let (backend, from) = self.backend_side(fe, client, dst, hook);
        let proto = self.scene.frontends[fe].proto;
        let quoted = Seg { src: from, dst: backend, proto, flags: SYN };
        let router = self.scene.hosts(v6).router;
        let sender = if self.chance(500) { backend.0 } else { router };
        let hook = if self.chance(700) { Hook::Egress } else { Hook::FromPod };
        let bytes = self.icmp_error(sender, from.0, &quoted);
        Frame { hook, bytes, kind: "icmp error about a forward packet" }
    }

    fn icmp_about_reply(&mut self) -> Frame {
        let (_, fe, client, dst, hook) = self.flow();
        let port = self.scene.frontends[fe].port;
        let proto = self.scene.frontends[fe].proto;
        let (backend, to) = self.backend_side(fe, client, dst, hook);
        // The reply as the client saw it (from the frontend), or still
        // from the backend.
        let from = if self.chance(800) { (dst, port) } else { backend };
        let quoted = Seg { src: from, dst: client, proto, flags: SYN | ACK };
        let sender = if self.chance(800) { client.0 } else { to.0 };
        let hook = if self.chance(500) { Hook::Egress } else { hook };
        let bytes = self.icmp_error(sender, from.0, &quoted);
        Frame { hook, bytes, kind: "icmp error about a reply" }
    }

    fn icmp_error(&mut self, from: IpAddr, to: IpAddr, quoted: &Seg) -> Vec<u8> {
        let v6 = from.is_ipv6();
        let ((ty, code), extra) = self.icmp_kind(v6);
        let plain = self.chance(700);
        let inner = self.ip_packet(quoted, plain);
        let hlen = if v6 { 40 } else { usize::from(inner[0] & 0xf) * 4 };
        let quote = match self.below(6) {
            0 => inner.len(),
            1 => (hlen + 8).min(inner.len()),
            2 => (hlen + 20).min(inner.len()),
            3 => (hlen + self.below(28)).min(inner.len()),
            _ => inner.len().min(if v6 { 1232 } else { 548 }),
        };
        let mut msg = vec![ty, code, 0, 0];
        msg.extend(extra.to_be_bytes());
        msg.extend(&inner[..quote]);
        let mut s = sum(&msg);
        if v6 {
            s += sum(&pseudo(from, to, 58, msg.len()));
        }
        msg[2..4].copy_from_slice(&(!fold(s)).to_be_bytes());
        let proto = if v6 { 58 } else { 1 };
        let mut ip = self.ip_header(from, to, proto, msg.len(), false);
        ip.extend(msg);
        self.frame(ip, v6)
    }

    /// Traffic not addressed to a frontend: other addresses of the test
    /// ranges, other ports.
    fn elsewhere(&mut self) -> Frame {
        let v6 = self.chance(500);
        let addr = |g: &mut Self| -> IpAddr {
            if v6 {
                let mut o = [0u8; 16];
                o[0] = 0xfd;
                o[15] = g.byte();
                o[7] = g.byte() & 3;
                IpAddr::from(o)
            } else {
                IpAddr::from([198, 18 + (g.byte() & 1), g.byte() & 3, g.byte()])
            }
        };
        let proto = self.pick(&[TCP, UDP]);
        let seg = Seg {
            src: (addr(self), self.rng.next_u64().to_le_bytes()[1].into()),
            dst: (addr(self), self.pick(&[80, 53, 443, 8080, 30080])),
            proto,
            flags: if proto == TCP { self.tcp_flags(false) } else { 0 },
        };
        let hook = self.pick(&Hook::ALL);
        let bytes = self.packet(&seg, hook, "elsewhere");
        Frame { hook, bytes, kind: "not to a frontend" }
    }

    /// ICMP echo and NDP, SCTP and GRE to a VIP, ARP.
    fn other_protocol(&mut self) -> Frame {
        let v6 = self.chance(500);
        let h = self.scene.hosts(v6).clone();
        let (src, dst) = (h.clients[0], h.vips[0]);
        let hook = self.pick(&Hook::ALL);
        let bytes = match self.below(4) {
            0 => {
                let mut msg = if v6 { vec![128, 0, 0, 0, 0, 1, 0, 1] } else { vec![8, 0, 0, 0, 0, 1, 0, 1] };
                msg.extend(self.bytes(16));
                let mut s = sum(&msg);
                if v6 {
                    s += sum(&pseudo(src, dst, 58, msg.len()));
                }
                msg[2..4].copy_from_slice(&(!fold(s)).to_be_bytes());
                let mut ip = self.ip_header(src, dst, if v6 { 58 } else { 1 }, msg.len(), false);
                ip.extend(msg);
                self.frame(ip, v6)
            }
            1 if v6 => {
                let mut msg = vec![135, 0, 0, 0, 0, 0, 0, 0];
                msg.extend([0xfd, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
                let mut ip = self.ip_header(src, "ff02::1:ff00:10".parse().expect("v6"), 58, msg.len(), false);
                ip.extend(msg);
                self.frame(ip, v6)
            }
            1 | 2 => {
                let proto = self.pick(&[132, 47, 0, 255]);
                let body = self.bytes(24);
                let mut ip = self.ip_header(src, dst, proto, body.len(), false);
                ip.extend(body);
                self.frame(ip, v6)
            }
            _ => {
                let mut f = vec![0xff; 6];
                f.extend([2, 0, 0, 0, 0, 1, 0x08, 0x06]);
                f.extend([0, 1, 8, 0, 6, 4, 0, 1]);
                f.extend(self.bytes(20));
                f
            }
        };
        Frame { hook, bytes, kind: "other protocol" }
    }

    fn garbage(&mut self) -> Frame {
        let len = 14 + self.below(160);
        let mut f = self.bytes(len);
        let et: u16 = self.pick(&[0x0800, 0x86DD, 0x8100, 0x0806]);
        f[12..14].copy_from_slice(&et.to_be_bytes());
        if len > 14 && self.chance(700) {
            f[14] = if et == 0x86DD { 0x60 } else { 0x45 };
        }
        Frame { hook: self.pick(&Hook::ALL), bytes: f, kind: "random bytes" }
    }

    // ------------------------------------------------------------ building

    /// A TCP or UDP segment with a valid checksum (sometimes none, on UDP;
    /// sometimes a wrong one), with TCP options and a payload.
    fn segment(&mut self, s: &Seg) -> Vec<u8> {
        let n = self.pick(&[0, 0, 1, 7, 8, 33, 200]);
        let payload = self.bytes(n);
        let mut seg = Vec::new();
        seg.extend(s.src.1.to_be_bytes());
        seg.extend(s.dst.1.to_be_bytes());
        let at = if s.proto == TCP {
            let opts = if self.chance(150) { 4 * (1 + self.below(10)) } else { 0 };
            seg.extend(self.rng.next_u64().to_le_bytes()[..4].iter());
            let ack = if s.flags & ACK != 0 { self.rng.next_u64().to_le_bytes() } else { [0; 8] };
            seg.extend(&ack[..4]);
            seg.extend([u8::try_from((20 + opts) / 4).expect("doff") << 4, s.flags, 0xff, 0xff, 0, 0, 0, 0]);
            seg.extend(std::iter::repeat_n(1u8, opts));
            16
        } else {
            seg.extend(u16::try_from(8 + payload.len()).expect("len").to_be_bytes());
            seg.extend([0, 0]);
            6
        };
        seg.extend(payload);
        if s.proto == UDP && self.chance(60) {
            return seg;
        }
        let mut c = !fold(sum(&pseudo(s.src.0, s.dst.0, s.proto, seg.len())) + sum(&seg));
        if c == 0 && s.proto == UDP {
            c = 0xffff;
        }
        if self.chance(20) {
            c = c.wrapping_add(1 + u16::from(self.byte()));
        }
        seg[at..at + 2].copy_from_slice(&c.to_be_bytes());
        seg
    }

    /// An IP header for `payload_len` bytes of `proto` (IPv4 options and
    /// IPv6 extension headers sometimes, when `plain` is false).
    fn ip_header(&mut self, src: IpAddr, dst: IpAddr, proto: u8, payload_len: usize, plain: bool) -> Vec<u8> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let opts = if !plain && self.chance(100) { 4 * (1 + self.below(10)) } else { 0 };
                let ihl = 20 + opts;
                let mut h = vec![0x40 | u8::try_from(ihl / 4).expect("ihl"), 0];
                h.extend(u16::try_from(ihl + payload_len).expect("len").to_be_bytes());
                h.extend(self.bytes(2));
                h.extend([if self.chance(500) { 0x40 } else { 0 }, 0, self.pick(&[64, 1, 0, 255]), proto, 0, 0]);
                h.extend(s.octets());
                h.extend(d.octets());
                h.extend(std::iter::repeat_n(1u8, opts));
                let c = !fold(sum(&h));
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext = if plain || !self.chance(150) { Vec::new() } else { self.ext_headers(proto) };
                let next = if ext.is_empty() { proto } else { ext[0].0 };
                let mut chain = Vec::new();
                for (i, &(_, len)) in ext.iter().enumerate() {
                    let nh = ext.get(i + 1).map_or(proto, |e| e.0);
                    let mut e = vec![nh, u8::try_from(len / 8 - 1).expect("len")];
                    if ext[i].0 == 44 {
                        // An atomic fragment (offset 0, no more fragments).
                        e = vec![nh, 0, 0, 0];
                        e.extend(self.bytes(4));
                    } else {
                        e.extend([1, u8::try_from(len - 4).expect("len")]);
                        e.resize(len, 0);
                    }
                    chain.extend(e);
                }
                let mut h = vec![0x60, 0, 0, 0];
                h.extend(u16::try_from(chain.len() + payload_len).expect("len").to_be_bytes());
                h.extend([next, self.pick(&[64, 1, 0, 255])]);
                h.extend(s.octets());
                h.extend(d.octets());
                h.extend(chain);
                h
            }
            _ => unreachable!("one family"),
        }
    }

    /// One to five extension headers: (type, length).
    fn ext_headers(&mut self, _proto: u8) -> Vec<(u8, usize)> {
        let n = 1 + self.below(5);
        (0..n)
            .map(|_| match self.below(10) {
                0..=3 => (0, 8 * (1 + self.below(3))),
                4..=6 => (60, 8 * (1 + self.below(3))),
                7..=8 => (44, 8),
                _ => (43, 8),
            })
            .collect()
    }

    /// The IP packet of `s` (`plain`: no options or extension headers).
    fn ip_packet(&mut self, s: &Seg, plain: bool) -> Vec<u8> {
        let seg = self.segment(s);
        let mut p = self.ip_header(s.src.0, s.dst.0, s.proto, seg.len(), plain);
        p.extend(seg);
        p
    }

    /// A TCP/UDP packet as a frame; sometimes fragmented (the first
    /// fragment now, the others queued), padded or VLAN-tagged.
    fn packet(&mut self, s: &Seg, hook: Hook, kind: &'static str) -> Vec<u8> {
        let v6 = s.src.0.is_ipv6();
        if self.chance(80) {
            let seg = self.segment(s);
            let mut frags = self.fragments(s, &seg);
            if frags.len() > 1 {
                let first = frags.remove(0);
                // Sometimes a later fragment arrives first.
                let later_first = self.chance(150);
                for f in frags {
                    let bytes = self.frame(f, v6);
                    self.pending.push_back(Frame {
                        hook,
                        bytes,
                        kind: if kind == "forward" { "forward fragment" } else { "fragment" },
                    });
                }
                if later_first {
                    let bytes = self.frame(first, v6);
                    self.pending.push_back(Frame { hook, bytes, kind: "first fragment, late" });
                    return self.pending.pop_front().expect("queued").bytes;
                }
                return self.frame(first, v6);
            }
        }
        let p = self.ip_packet(s, false);
        self.frame(p, v6)
    }

    /// `seg` of `s` cut into IP fragments at 8-byte boundaries.
    fn fragments(&mut self, s: &Seg, seg: &[u8]) -> Vec<Vec<u8>> {
        let v6 = s.src.0.is_ipv6();
        let cut = 8 * (1 + self.below(seg.len().div_ceil(8).max(2) - 1));
        if cut >= seg.len() {
            return Vec::new();
        }
        let id = self.rng.next_u64().to_le_bytes();
        let id = [0, 0, id[0] & 7, id[1] & 7];
        let mut out = Vec::new();
        for (off, part) in [(0, &seg[..cut]), (cut, &seg[cut..])] {
            let more = off == 0;
            let off16 = u16::try_from(off / 8).expect("offset");
            if v6 {
                let mut fh = vec![s.proto, 0];
                fh.extend(((off16 << 3) | u16::from(more)).to_be_bytes());
                fh.extend(id);
                let mut h = self.ip_header(s.src.0, s.dst.0, 44, 0, true);
                h[4..6].copy_from_slice(&u16::try_from(8 + part.len()).expect("len").to_be_bytes());
                h.extend(fh);
                h.extend(part);
                out.push(h);
            } else {
                let mut h = self.ip_header(s.src.0, s.dst.0, s.proto, part.len(), true);
                h[4..6].copy_from_slice(&id[2..4]);
                h[6..8].copy_from_slice(&((off16 & 0x1fff) | if more { 0x2000 } else { 0 }).to_be_bytes());
                h[10..12].copy_from_slice(&[0, 0]);
                let c = !fold(sum(&h[..20]));
                h[10..12].copy_from_slice(&c.to_be_bytes());
                h.extend(part);
                out.push(h);
            }
        }
        out
    }

    /// Ethernet around an IP packet; sometimes a VLAN tag or padding.
    fn frame(&mut self, ip: Vec<u8>, v6: bool) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        if self.chance(20) {
            f.extend([0x81, 0x00, 0, self.byte()]);
        }
        f.extend(if v6 { [0x86, 0xDD] } else { [0x08, 0x00] });
        f.extend(ip);
        if self.chance(80) {
            let n = 1 + self.below(24);
            let pad = self.bytes(n);
            f.extend(pad);
        }
        f
    }

    // ------------------------------------------------------------ mutation

    fn mutate(&mut self, f: &mut Vec<u8>) {
        for _ in 0..=self.below(3) {
            let len = f.len();
            match self.below(9) {
                0 => {
                    let i = self.below(len);
                    f[i] = self.byte();
                }
                1 => {
                    let i = self.below(len);
                    f[i] ^= 1 << self.below(8);
                }
                2 if len > 14 => f.truncate(14 + self.below(len - 14)),
                3 => {
                    let n = self.below(32);
                    let more = self.bytes(n);
                    f.extend(more);
                }
                4 => {
                    // A length or header-length field to a boundary value.
                    let at = self.pick(&[14, 16, 17, 18, 19, 20, 21, 54 + 12, 34 + 12, 34 + 4, 54 + 4, 34 + 5, 54 + 5]);
                    if at < len {
                        f[at] = self.pick(&[0, 1, 0x40, 0x45, 0x4f, 0x50, 0x60, 0xff, 0x20, 0x3f]);
                    }
                }
                5 => {
                    // Protocol or next header.
                    let at = self.pick(&[23, 20, 54, 62]);
                    if at < len {
                        f[at] = self.pick(&[0, 1, 6, 17, 43, 44, 58, 60, 255]);
                    }
                }
                6 => {
                    let et: u16 = self.pick(&[0x0800, 0x86DD, 0x8100]);
                    f[12..14].copy_from_slice(&et.to_be_bytes());
                }
                7 => {
                    // Fragment bits (IPv4).
                    if len > 22 {
                        f[20] = self.pick(&[0x20, 0x00, 0x01, 0x3f, 0x40, 0x60]);
                        f[21] = self.byte() & 3;
                    }
                }
                _ => {
                    // TCP flags of a plain header.
                    let at = self.pick(&[34 + 13, 54 + 13]);
                    if at < len {
                        f[at] = self.byte();
                    }
                }
            }
        }
    }
}
