//! The reference model of the datapath: what each frame must become, written
//! from the rules in docs/design.md, independently of the eBPF code. It
//! parses every frame itself, keeps its own conntrack, fragment and
//! affinity tables, and says for each frame the verdict and the exact bytes
//! that must come out.
//!
//! The datapath picks backends (and, on a collision, masquerade ports) at
//! random: for a new flow the model reads the choice from the output,
//! checks it is one it allows, and holds the datapath to it from then on.
//!
//! Checksum fields are compared up to the representation of zero (0x0000
//! and 0xffff both verify), except UDP's, where 0 means "none": a UDP
//! checksum of 0 must stay 0 and a computed 0 must be sent as 0xffff.
use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use dsproxy::frames::{ACK, FIN, RST, SYN, TCP, UDP, pseudo};
use proxy_common::{ct_state, programs};

use super::scene::{Fe, Scene};

pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Where a frame is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// TC ingress of a pod interface.
    FromPod,
    /// TC ingress of a node device (external clients).
    FromDevice,
    /// TC egress.
    Egress,
}

impl Hook {
    pub const ALL: [Hook; 3] = [Hook::FromPod, Hook::FromDevice, Hook::Egress];

    pub fn program(self) -> &'static str {
        match self {
            Hook::FromPod => programs::FROM_POD,
            Hook::FromDevice => programs::FROM_DEVICE,
            Hook::Egress => programs::EGRESS,
        }
    }
}

pub type Ep = (IpAddr, u16);

/// A conntrack key: source, destination, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: Ep,
    dst: Ep,
    proto: u8,
}

/// A flow as its forward entry holds it.
#[derive(Clone, Copy, Debug)]
struct Flow {
    backend: Ep,
    /// The source the backend sees (the client unless translated).
    nat: Ep,
    state: u8,
    snat: bool,
}

/// Where a flow's replies go back to.
#[derive(Clone, Copy, Debug)]
struct Back {
    client: Ep,
    frontend: Ep,
}

/// What a frame counted as (for the report).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Not ours: passed byte for byte.
    Untouched,
    /// A new flow, translated to the backend the datapath chose.
    NewFlow,
    /// A packet of a live flow, translated to its backend.
    Established,
    /// A reply, translated back to the frontend.
    Reply,
    /// An ICMP error about a service flow, translated.
    IcmpError,
    /// A new connection to a frontend without backends, refused.
    Refused,
    /// Dropped (a Local policy without local backends).
    Dropped,
    /// An external client's new flow dropped: its masquerade needs a route
    /// out of one of our interfaces (none is ours under BPF_PROG_TEST_RUN).
    NoRoute,
    /// Refused by BPF_PROG_TEST_RUN itself (too short for its ethertype).
    NotRun,
}

impl Outcome {
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Untouched => "untouched",
            Outcome::NewFlow => "new flow",
            Outcome::Established => "established",
            Outcome::Reply => "reply",
            Outcome::IcmpError => "icmp error",
            Outcome::Refused => "refused",
            Outcome::Dropped => "dropped",
            Outcome::NoRoute => "dropped, no route to masquerade on",
            Outcome::NotRun => "not run (too short)",
        }
    }
}

// ---------------------------------------------------------------- bytes

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn be32(f: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]])
}

fn addr_at(f: &[u8], at: usize, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&f[at..at + 16]).expect("16 bytes")))
    } else {
        IpAddr::V4(Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]))
    }
}

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// One's complement sum of 16-bit big-endian words (an odd byte padded).
pub fn sum(bytes: &[u8]) -> u64 {
    bytes.chunks(2).map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

pub fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    u16::try_from(s).expect("folded")
}

/// The checksum field `csum` after `old` bytes became `new` (RFC 1624,
/// eqn. 3), both of even length at an even offset of the covered range.
fn adjust(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let inv: u64 = old.chunks(2).map(|c| u64::from(!u16::from_be_bytes([c[0], c[1]]))).sum();
    !fold(u64::from(!csum) + inv + sum(new))
}

/// How a checksum field is compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CsumKind {
    /// Up to the representation of zero.
    Plain,
    /// UDP: 0 means none.
    Udp,
}

/// A frame being rewritten as the model says, with its checksum fields.
struct Rewrite {
    frame: Vec<u8>,
    csums: Vec<(usize, CsumKind)>,
}

impl Rewrite {
    fn new(frame: &[u8]) -> Self {
        Self { frame: frame.to_vec(), csums: Vec::new() }
    }

    /// Replace the bytes at `at` with `new`, adjusting each checksum field
    /// in `csums` (an offset; UDP's checksum of 0 stays 0).
    fn put(&mut self, at: usize, new: &[u8], csums: &[(usize, CsumKind)]) {
        let old = self.frame[at..at + new.len()].to_vec();
        if old == new {
            return;
        }
        for &(off, kind) in csums {
            self.csum_adjust(off, kind, &old, new);
        }
        self.frame[at..at + new.len()].copy_from_slice(new);
    }

    fn csum_adjust(&mut self, off: usize, kind: CsumKind, old: &[u8], new: &[u8]) {
        if !self.csums.iter().any(|&(o, _)| o == off) {
            self.csums.push((off, kind));
        }
        let c = be16(&self.frame, off);
        if kind == CsumKind::Udp && c == 0 {
            return;
        }
        let mut n = adjust(c, old, new);
        if kind == CsumKind::Udp && n == 0 {
            n = 0xffff;
        }
        self.frame[off..off + 2].copy_from_slice(&n.to_be_bytes());
    }
}

/// Compare `out` with the expectation; a description of the first
/// difference.
fn compare(out: &[u8], expect: &Rewrite) -> Result<(), String> {
    let e = &expect.frame;
    if out.len() != e.len() {
        return Err(format!("length {} instead of {}", out.len(), e.len()));
    }
    for (i, (a, b)) in out.iter().zip(e).enumerate() {
        if a == b {
            continue;
        }
        let field = expect.csums.iter().find(|&&(o, _)| i == o || i == o + 1);
        if let Some(&(off, kind)) = field {
            let (got, want) = (be16(out, off), be16(e, off));
            let zero = |v: u16| v == 0 || v == 0xffff;
            let same = match kind {
                CsumKind::Plain => zero(got) && zero(want),
                CsumKind::Udp => got == 0xffff && want == 0xffff,
            };
            if same {
                continue;
            }
            return Err(format!("checksum at byte {off}: {got:#06x}, expected {want:#06x}"));
        }
        return Err(format!("byte {i}: {a:#04x}, expected {b:#04x}"));
    }
    Ok(())
}

// ---------------------------------------------------------------- parsing

/// The IP header of a frame.
#[derive(Clone, Copy, Debug)]
struct Ip {
    v6: bool,
    src: IpAddr,
    dst: IpAddr,
    /// End of the IP packet in the frame (what follows is padding).
    end: usize,
}

impl Ip {
    fn saddr_off(&self) -> usize {
        if self.v6 { 22 } else { 26 }
    }

    fn daddr_off(&self) -> usize {
        if self.v6 { 38 } else { 30 }
    }
}

/// A fragment's id (IPv4: 2 bytes, zero-padded) and whether it is the first.
type FragId = ([u8; 4], bool);
/// Source, destination, id, protocol: the datagram a fragment is of.
type FragKey = (IpAddr, IpAddr, [u8; 4], u8);

/// A TCP or UDP packet (or a fragment of one).
#[derive(Clone, Copy, Debug)]
struct L4 {
    proto: u8,
    off: usize,
    sport: u16,
    dport: u16,
    flags: u8,
    /// The transport header is here (not a later fragment).
    has_hdr: bool,
    frag: Option<FragId>,
}

impl L4 {
    fn tcp(&self) -> bool {
        self.proto == TCP
    }

    fn syn(&self) -> bool {
        self.flags & (SYN | ACK) == SYN
    }

    fn csum_off(&self) -> usize {
        self.off + if self.tcp() { 16 } else { 6 }
    }

    fn csum_kind(&self) -> CsumKind {
        if self.tcp() { CsumKind::Plain } else { CsumKind::Udp }
    }
}

/// The packet an ICMP error quotes.
#[derive(Clone, Copy, Debug)]
struct Quote {
    src: Ep,
    dst: Ep,
    proto: u8,
    l3_off: usize,
    l4_off: usize,
    /// The quoted transport checksum, when quoted and in use.
    csum_off: Option<usize>,
}

#[derive(Clone, Copy, Debug)]
enum Parsed {
    L4(Ip, L4),
    Icmp(Ip, usize, Quote),
}

fn parse(f: &[u8]) -> Option<Parsed> {
    match be16(f, 12) {
        0x0800 => parse_v4(f),
        0x86DD => parse_v6(f),
        _ => None,
    }
}

fn parse_v4(f: &[u8]) -> Option<Parsed> {
    if f.len() < 34 {
        return None;
    }
    let ihl = usize::from(f[14] & 0xf) * 4;
    if f[14] >> 4 != 4 || ihl < 20 {
        return None;
    }
    let tot = usize::from(be16(f, 16));
    if tot < ihl || 14 + tot > f.len() {
        return None;
    }
    let frag_off = be16(f, 20);
    let proto = f[23];
    let ip = Ip { v6: false, src: addr_at(f, 26, false), dst: addr_at(f, 30, false), end: 14 + tot };
    let frag = (frag_off & 0x3fff != 0).then_some(([f[18], f[19], 0, 0], frag_off.trailing_zeros() >= 13));
    let off = 14 + ihl;
    if proto == ICMP {
        if frag.is_some() {
            return None;
        }
        return icmp_v4(f, ip, off);
    }
    Some(Parsed::L4(ip, parse_l4(f, proto, off, ip.end, frag, false)?))
}

/// Extension headers from `off`: the transport protocol, its offset and the
/// fragment header. At most three are walked; a routing header is not ours.
fn walk_v6(f: &[u8], mut next: u8, mut off: usize) -> Option<(u8, usize, Option<FragId>)> {
    let mut frag = None;
    for _ in 0..4 {
        match next {
            0 | 60 => {
                if off + 2 > f.len() {
                    return None;
                }
                next = f[off];
                off += (usize::from(f[off + 1]) + 1) * 8;
            }
            44 => {
                if off + 8 > f.len() {
                    return None;
                }
                next = f[off];
                frag = Some(([f[off + 4], f[off + 5], f[off + 6], f[off + 7]], be16(f, off + 2) >> 3 == 0));
                off += 8;
            }
            43 => return None,
            _ => return Some((next, off, frag)),
        }
    }
    None
}

fn parse_v6(f: &[u8]) -> Option<Parsed> {
    if f.len() < 54 || f[14] >> 4 != 6 {
        return None;
    }
    let end = 54 + usize::from(be16(f, 18));
    if end > f.len() {
        return None;
    }
    let ip = Ip { v6: true, src: addr_at(f, 22, true), dst: addr_at(f, 38, true), end };
    let (proto, off, frag) = walk_v6(f, f[20], 54)?;
    if off > end {
        return None;
    }
    if proto == ICMPV6 {
        if frag.is_some() {
            return None;
        }
        return icmp_v6(f, ip, off);
    }
    Some(Parsed::L4(ip, parse_l4(f, proto, off, end, frag, true)?))
}

fn parse_l4(f: &[u8], proto: u8, off: usize, end: usize, frag: Option<FragId>, v6: bool) -> Option<L4> {
    let hlen = match proto {
        TCP => 20,
        UDP => 8,
        _ => return None,
    };
    let mut l4 = L4 { proto, off, sport: 0, dport: 0, flags: 0, has_hdr: false, frag };
    if frag.is_some_and(|(_, first)| !first) {
        return Some(l4);
    }
    let len = end - off;
    if len < hlen {
        return None;
    }
    (l4.sport, l4.dport, l4.has_hdr) = (be16(f, off), be16(f, off + 2), true);
    if proto == TCP {
        let doff = usize::from(f[off + 12] >> 4) * 4;
        if doff < 20 || doff > len {
            return None;
        }
        l4.flags = f[off + 13];
    } else {
        let udp_len = usize::from(be16(f, off + 4));
        // A fragment's UDP length is the whole datagram's. IPv6 has no
        // checksum-less UDP.
        if udp_len < 8 || (frag.is_none() && udp_len > len) || (v6 && be16(f, off + 6) == 0) {
            return None;
        }
    }
    Some(l4)
}

/// The transport part of a quoted packet: ports and checksum, when they
/// are inside the IP packet (`end`).
fn quoted_l4(f: &[u8], proto: u8, l4_off: usize, end: usize) -> Option<(u16, u16, Option<usize>)> {
    if (proto != TCP && proto != UDP) || l4_off + 4 > end {
        return None;
    }
    let csum_off = if proto == UDP { l4_off + 6 } else { l4_off + 16 };
    let quoted = csum_off + 2 <= end && (proto == TCP || be16(f, csum_off) != 0);
    Some((be16(f, l4_off), be16(f, l4_off + 2), quoted.then_some(csum_off)))
}

fn icmp_v4(f: &[u8], ip: Ip, off: usize) -> Option<Parsed> {
    if ip.end - off < 8 + 20 + 8 || (f[off] != 3 && f[off] != 11) {
        return None;
    }
    let l3 = off + 8;
    let ihl = usize::from(f[l3] & 0xf) * 4;
    if f[l3] >> 4 != 4 || ihl < 20 || be16(f, l3 + 6) & 0x1fff != 0 {
        return None;
    }
    let proto = f[l3 + 9];
    let (sport, dport, csum_off) = quoted_l4(f, proto, l3 + ihl, ip.end)?;
    let (src, dst) = (addr_at(f, l3 + 12, false), addr_at(f, l3 + 16, false));
    Some(Parsed::Icmp(
        ip,
        off,
        Quote { src: (src, sport), dst: (dst, dport), proto, l3_off: l3, l4_off: l3 + ihl, csum_off },
    ))
}

fn icmp_v6(f: &[u8], ip: Ip, off: usize) -> Option<Parsed> {
    if ip.end - off < 8 + 40 + 8 || !(1..=3).contains(&f[off]) {
        return None;
    }
    let l3 = off + 8;
    if f[l3] >> 4 != 6 {
        return None;
    }
    let (proto, l4_off, frag) = walk_v6(f, f[l3 + 6], l3 + 40)?;
    if frag.is_some_and(|(_, first)| !first) {
        return None;
    }
    let (sport, dport, csum_off) = quoted_l4(f, proto, l4_off, ip.end)?;
    let (src, dst) = (addr_at(f, l3 + 8, true), addr_at(f, l3 + 24, true));
    Some(Parsed::Icmp(ip, off, Quote { src: (src, sport), dst: (dst, dport), proto, l3_off: l3, l4_off, csum_off }))
}

// ---------------------------------------------------------------- checks

/// Every checksum of an unfragmented TCP, UDP or ICMP frame, recomputed
/// from scratch (`Ok` for frames it does not cover).
pub fn checksums_valid(f: &[u8]) -> Result<(), String> {
    let Some(parsed) = parse(f) else { return Ok(()) };
    let (ip, from, proto, off) = match parsed {
        Parsed::L4(ip, l4) => {
            if l4.frag.is_some() {
                return Ok(());
            }
            (ip, l4.off, l4.proto, l4.csum_off())
        }
        Parsed::Icmp(ip, off, _) => (ip, off, if ip.v6 { ICMPV6 } else { ICMP }, off + 2),
    };
    if !ip.v6 {
        let ihl = usize::from(f[14] & 0xf) * 4;
        if fold(sum(&f[14..14 + ihl])) != 0xffff {
            return Err("IPv4 header checksum".into());
        }
    }
    if proto == UDP && !ip.v6 && be16(f, off) == 0 {
        return Ok(());
    }
    let seg = &f[from..ip.end];
    let mut s = sum(seg);
    if proto != ICMP {
        s += sum(&pseudo(ip.src, ip.dst, proto, seg.len()));
    }
    if fold(s) != 0xffff {
        return Err(format!("protocol {proto} checksum"));
    }
    Ok(())
}

// ---------------------------------------------------------------- the model

/// What the model expects of one frame.
enum Expect {
    Untouched,
    Dropped,
    /// This frame (checksums as `Rewrite` says), verdict OK.
    Rewritten(Rewrite, Outcome),
    /// This answer, redirected back out.
    Refused(Rewrite),
    /// A new flow to one of `candidates` (resolved from the output).
    New {
        key: Key,
        l4: L4,
        ip: Ip,
        candidates: Vec<Ep>,
        fe: usize,
        external: bool,
    },
}

pub struct Model {
    scene: Scene,
    fwd: HashMap<Key, Flow>,
    rev: HashMap<Key, Back>,
    frags: HashMap<FragKey, (u16, u16)>,
    /// ClientIP affinity: (frontend, client) -> backend.
    sticky: HashMap<(usize, IpAddr), Ep>,
}

fn next_state(state: u8, l4: &L4, reply: bool) -> u8 {
    let mut s = state;
    if reply {
        s |= ct_state::SEEN_REPLY;
    }
    if l4.tcp() {
        if l4.flags & RST != 0 {
            s |= ct_state::RST;
        }
        if l4.flags & FIN != 0 {
            s |= if reply { ct_state::FIN_REV } else { ct_state::FIN_FWD };
        }
    }
    s
}

const CLOSED: u8 = ct_state::RST | ct_state::FIN_FWD | ct_state::FIN_REV;

impl Model {
    pub fn new(scene: Scene) -> Self {
        Self { scene, fwd: HashMap::new(), rev: HashMap::new(), frags: HashMap::new(), sticky: HashMap::new() }
    }

    /// The Services changed (the datapath was reprogrammed the same way).
    pub fn set_scene(&mut self, scene: Scene) {
        self.scene = scene;
    }

    /// Conntrack flows and fragment records the model holds.
    pub fn sizes(&self) -> (usize, usize) {
        (self.fwd.len(), self.frags.len())
    }

    /// Check the datapath's answer to `frame` at `hook` (`None`: the test
    /// run refused the frame) and update the model. `Err` says what is
    /// wrong.
    pub fn check(&mut self, hook: Hook, frame: &[u8], got: Option<(i32, &[u8])>) -> Result<Outcome, String> {
        let Some((verdict, out)) = got else {
            // BPF_PROG_TEST_RUN refuses only frames too short for the
            // header their ethertype names.
            let min = match be16(frame, 12) {
                0x0800 => 34,
                0x86DD => 54,
                _ => 14,
            };
            return if frame.len() < min { Ok(Outcome::NotRun) } else { Err("BPF_PROG_TEST_RUN refused it".into()) };
        };
        let expect = self.expect(hook, frame);
        let want = |v: i32| if verdict == v { Ok(()) } else { Err(format!("verdict {verdict}, expected {v}")) };
        match expect {
            Expect::Untouched => {
                want(TC_ACT_OK)?;
                if out != frame {
                    return Err(format!("must pass untouched; {}", diff(frame, out)));
                }
                Ok(Outcome::Untouched)
            }
            Expect::Dropped => want(TC_ACT_SHOT).map(|()| Outcome::Dropped),
            Expect::Rewritten(r, outcome) => {
                want(TC_ACT_OK)?;
                compare(out, &r)?;
                valid_if_valid(frame, out)?;
                Ok(outcome)
            }
            Expect::Refused(r) => {
                want(TC_ACT_REDIRECT)?;
                compare(out, &r)?;
                checksums_valid(out).map_err(|e| format!("answer: {e}"))?;
                Ok(Outcome::Refused)
            }
            Expect::New { external, ref candidates, ip, .. }
                if verdict == TC_ACT_SHOT && external && candidates.iter().any(|b| b.0 != ip.src) =>
            {
                // An external client of a Cluster-policy frontend is
                // masqueraded to the node's address on the route to the
                // backend, and only when that route leaves by one of our
                // interfaces; BPF_PROG_TEST_RUN runs where none is ours, so
                // every such flow is dropped (`masquerade_no_route`). An
                // affinity entry the datapath wrote for it is among the
                // candidates of the client's next flow, and learnt there.
                Ok(Outcome::NoRoute)
            }
            Expect::New { key, l4, ip, candidates, fe, external } => {
                want(TC_ACT_OK)?;
                self.new_flow(frame, out, key, l4, ip, &candidates, fe, external)?;
                valid_if_valid(frame, out)?;
                Ok(Outcome::NewFlow)
            }
        }
    }

    fn expect(&mut self, hook: Hook, f: &[u8]) -> Expect {
        let Some(parsed) = parse(f) else { return Expect::Untouched };
        match parsed {
            Parsed::Icmp(ip, off, q) => self.icmp(hook, f, ip, off, q),
            Parsed::L4(ip, mut l4) => {
                if let Some((id, first)) = l4.frag {
                    let key = (ip.src, ip.dst, id, l4.proto);
                    if first {
                        self.frags.insert(key, (l4.sport, l4.dport));
                    } else {
                        let Some(&(s, d)) = self.frags.get(&key) else { return Expect::Untouched };
                        (l4.sport, l4.dport) = (s, d);
                    }
                }
                if hook == Hook::Egress {
                    return self.reply(f, ip, &l4, true);
                }
                match self.scene.lookup(ip.dst, l4.dport, l4.proto) {
                    Some(fe) => self.forward(f, ip, l4, fe, hook == Hook::FromDevice),
                    None => self.reply(f, ip, &l4, false),
                }
            }
        }
    }

    /// The reverse entry `key` and its live flow (`record`: a reply, whose
    /// state is recorded on the flow). A reverse entry whose flow is gone
    /// or changed is removed.
    fn lookup_rev(&mut self, key: Key, record: Option<&L4>) -> Option<(Back, Flow)> {
        let back = *self.rev.get(&key)?;
        let fkey = Key { src: back.client, dst: back.frontend, proto: key.proto };
        let live = self.fwd.get_mut(&fkey).filter(|flow| {
            let reopened = record.is_some_and(|l4| l4.tcp() && l4.flags & SYN != 0 && flow.state & CLOSED != 0);
            flow.backend == key.src && flow.nat == key.dst && !reopened
        });
        let Some(flow) = live else {
            self.rev.remove(&key);
            return None;
        };
        if let Some(l4) = record {
            flow.state = next_state(flow.state, l4, true);
        }
        Some((back, *flow))
    }

    /// A packet that is not to a frontend: maybe a reply of a flow,
    /// translated at egress (every flow here goes through the host stack).
    fn reply(&mut self, f: &[u8], ip: Ip, l4: &L4, egress: bool) -> Expect {
        let key = Key { src: (ip.src, l4.sport), dst: (ip.dst, l4.dport), proto: l4.proto };
        match self.lookup_rev(key, Some(l4)) {
            Some((back, flow)) if egress => {
                let mut r = Rewrite::new(f);
                rewrite_end(&mut r, ip, l4, true, back.frontend);
                if flow.snat {
                    rewrite_end(&mut r, ip, l4, false, back.client);
                }
                Expect::Rewritten(r, Outcome::Reply)
            }
            _ => Expect::Untouched,
        }
    }

    fn forward(&mut self, f: &[u8], ip: Ip, l4: L4, fe: usize, external: bool) -> Expect {
        let key = Key { src: (ip.src, l4.sport), dst: (ip.dst, l4.dport), proto: l4.proto };
        let scene = &self.scene;
        // A UDP flow has no end: when its backend is gone, the next
        // datagram takes a live one. A TCP flow keeps its backend.
        let live = |flow: &Flow| {
            !(l4.syn() && flow.state & CLOSED != 0) && (l4.tcp() || scene.has_backend(flow.backend, l4.proto))
        };
        if let Some(flow) = self.fwd.get_mut(&key)
            && live(flow)
        {
            flow.state = next_state(flow.state, &l4, false);
            let flow = *flow;
            let mut r = Rewrite::new(f);
            rewrite_end(&mut r, ip, &l4, false, flow.backend);
            if flow.snat {
                rewrite_end(&mut r, ip, &l4, true, flow.nat);
            }
            return Expect::Rewritten(r, Outcome::Established);
        }
        if !l4.has_hdr || (l4.tcp() && !l4.syn()) {
            // A later fragment cannot open a flow; a TCP segment other than
            // a SYN belongs to a connection set up before us.
            return Expect::Untouched;
        }
        let spec: &Fe = &self.scene.frontends[fe];
        if spec.backends.is_empty() {
            if spec.drop_when_empty {
                return Expect::Dropped;
            }
            return refuse(f, ip, &l4);
        }
        let candidates = match self.sticky.get(&(fe, ip.src)) {
            Some(&b) if spec.affinity => vec![b],
            _ => spec.backends.clone(),
        };
        Expect::New { key, l4, ip, candidates, fe, external }
    }

    /// Resolve a new flow from the output: the backend chosen must be one
    /// of `candidates`, the source translated as the rules say; then the
    /// output must be exactly that translation.
    #[expect(clippy::too_many_arguments, reason = "the parts of one expectation")]
    fn new_flow(
        &mut self,
        f: &[u8],
        out: &[u8],
        key: Key,
        l4: L4,
        ip: Ip,
        candidates: &[Ep],
        fe: usize,
        external: bool,
    ) -> Result<(), String> {
        if out.len() != f.len() {
            return Err(format!("new flow: length {} instead of {}", out.len(), f.len()));
        }
        let chosen = (addr_at(out, ip.daddr_off(), ip.v6), be16(out, l4.off + 2));
        if !candidates.contains(&chosen) {
            return Err(format!("new flow to {chosen:?}, expected one of {candidates:?}"));
        }
        let masquerade = if chosen.0 == ip.src {
            // Hairpin: from the address the client connected to.
            Some(ip.dst)
        } else if external {
            return Err(format!("an external client's flow to {chosen:?} sent on without a route of ours"));
        } else {
            None
        };
        let nat = match masquerade {
            None => key.src,
            Some(addr) => {
                let port = be16(out, l4.off);
                let free = |m: &mut Self, p: u16| {
                    m.lookup_rev(Key { src: chosen, dst: (addr, p), proto: l4.proto }, None).is_none()
                };
                if free(self, l4.sport) {
                    if port != l4.sport {
                        return Err(format!("masquerade port {port}, expected the client's {} (free)", l4.sport));
                    }
                } else if port < 32768 || !free(self, port) {
                    return Err(format!("masquerade port {port}: the client's is taken, expected a free one >= 32768"));
                }
                (addr, port)
            }
        };
        let mut r = Rewrite::new(f);
        rewrite_end(&mut r, ip, &l4, false, chosen);
        if masquerade.is_some() {
            rewrite_end(&mut r, ip, &l4, true, nat);
        }
        compare(out, &r).map_err(|e| format!("new flow to {chosen:?}: {e}"))?;
        let flow = Flow { backend: chosen, nat, state: next_state(0, &l4, false), snat: masquerade.is_some() };
        self.fwd.insert(key, flow);
        self.rev.insert(Key { src: chosen, dst: nat, proto: l4.proto }, Back { client: key.src, frontend: key.dst });
        if self.scene.frontends[fe].affinity {
            self.sticky.insert((fe, ip.src), chosen);
        }
        Ok(())
    }

    /// An ICMP error: about a packet on its way to a backend (translated at
    /// egress, towards the client), or about a reply on its way to the
    /// client (translated at either hook, towards the backend).
    fn icmp(&mut self, hook: Hook, f: &[u8], ip: Ip, off: usize, q: Quote) -> Expect {
        let mut change = Change::default();
        if let Some((back, flow)) = self.lookup_rev(Key { src: q.dst, dst: q.src, proto: q.proto }, None) {
            if hook != Hook::Egress {
                return Expect::Untouched;
            }
            change.inner_dst = Some(back.frontend);
            if flow.snat {
                change.inner_src = Some(back.client);
                change.outer_dst = Some(back.client.0);
            }
            if ip.src == flow.backend.0 {
                change.outer_src = Some(back.frontend.0);
            }
        } else if let Some(flow) = self.fwd.get(&Key { src: q.dst, dst: q.src, proto: q.proto }) {
            change.inner_src = Some(flow.backend);
            change.outer_dst = Some(flow.backend.0);
            if flow.snat {
                change.inner_dst = Some(flow.nat);
                if ip.src == q.dst.0 {
                    change.outer_src = Some(flow.nat.0);
                }
            }
        } else {
            return Expect::Untouched;
        }
        Expect::Rewritten(icmp_rewrite(f, ip, off, &q, &change), Outcome::IcmpError)
    }
}

/// A translated output of a valid input must be valid.
fn valid_if_valid(input: &[u8], out: &[u8]) -> Result<(), String> {
    if checksums_valid(input).is_ok() {
        checksums_valid(out).map_err(|e| format!("a valid frame came out with a broken {e}"))?;
    }
    Ok(())
}

/// Rewrite the source (`src`) or destination of a TCP/UDP packet to `to`,
/// with the IPv4 header and transport checksums (a later fragment: the
/// address and the IPv4 header checksum only).
fn rewrite_end(r: &mut Rewrite, ip: Ip, l4: &L4, src: bool, to: Ep) {
    let ip_csum = (!ip.v6).then_some((24, CsumKind::Plain));
    let l4_csum = l4.has_hdr.then_some((l4.csum_off(), l4.csum_kind()));
    let at = if src { ip.saddr_off() } else { ip.daddr_off() };
    let sums: Vec<_> = ip_csum.into_iter().chain(l4_csum).collect();
    r.put(at, &octets(to.0), &sums);
    if l4.has_hdr {
        let at = if src { l4.off } else { l4.off + 2 };
        r.put(at, &to.1.to_be_bytes(), &[(l4.csum_off(), l4.csum_kind())]);
    }
}

#[derive(Default)]
struct Change {
    inner_src: Option<Ep>,
    inner_dst: Option<Ep>,
    outer_src: Option<IpAddr>,
    outer_dst: Option<IpAddr>,
}

/// The ICMP error with `change` applied: the quoted packet (its IPv4
/// header checksum and, when quoted, its transport checksum), the outer
/// header, and the ICMP checksum over all of it (ICMPv6's pseudo-header
/// included).
fn icmp_rewrite(f: &[u8], ip: Ip, off: usize, q: &Quote, change: &Change) -> Rewrite {
    let mut r = Rewrite::new(f);
    let icmp = (off + 2, CsumKind::Plain);
    let inner_ip = (!ip.v6).then_some((q.l3_off + 10, CsumKind::Plain));
    let inner_l4 = q.csum_off.map(|o| (o, if q.proto == UDP { CsumKind::Udp } else { CsumKind::Plain }));
    let (sa, da) = if ip.v6 { (8, 24) } else { (12, 16) };
    for (end, at_addr, at_port) in [(change.inner_src, sa, 0), (change.inner_dst, da, 2)] {
        let Some((addr, port)) = end else { continue };
        // The quoted checksums change first, then the ICMP checksum takes
        // every byte of the message that changed.
        let mut sums: Vec<_> = inner_ip.into_iter().chain(inner_l4).collect();
        let before = r.frame.clone();
        r.put(q.l3_off + at_addr, &octets(addr), &sums);
        sums.retain(|s| Some(*s) == inner_l4);
        r.put(q.l4_off + at_port, &port.to_be_bytes(), &sums);
        account(&mut r, &before, icmp);
    }
    let outer_ip = (!ip.v6).then_some((24, CsumKind::Plain));
    for (addr, at) in [(change.outer_src, ip.saddr_off()), (change.outer_dst, ip.daddr_off())] {
        let Some(addr) = addr else { continue };
        // IPv6: the addresses are in ICMPv6's pseudo-header.
        let sums: Vec<_> = outer_ip.into_iter().chain(ip.v6.then_some(icmp)).collect();
        r.put(at, &octets(addr), &sums);
    }
    r
}

/// Adjust checksum `csum` for every 16-bit word that differs between
/// `before` and the frame now (words from `csum`'s alignment).
fn account(r: &mut Rewrite, before: &[u8], csum: (usize, CsumKind)) {
    let changed: Vec<usize> = (0..before.len() / 2)
        .map(|w| w * 2)
        .filter(|&o| o != csum.0 && before[o..o + 2] != r.frame[o..o + 2])
        .collect();
    for o in changed {
        let (old, new) = (before[o..o + 2].to_vec(), r.frame[o..o + 2].to_vec());
        r.csum_adjust(csum.0, csum.1, &old, &new);
    }
}

/// The answer to a new connection to a frontend without backends: a RST
/// for a TCP SYN, ICMP port unreachable for UDP, from the frontend, built
/// from scratch. Only plain headers are answered (IPv4 without options,
/// IPv6 without extension headers); a RST is never answered.
fn refuse(f: &[u8], ip: Ip, l4: &L4) -> Expect {
    let plain = l4.off == if ip.v6 { 54 } else { 34 };
    if (l4.tcp() && l4.flags & RST != 0) || !plain {
        return Expect::Untouched;
    }
    let mut out = f[6..12].to_vec();
    out.extend(&f[0..6]);
    out.extend(&f[12..14]);
    let (proto, msg) = if l4.tcp() {
        let doff = u32::from(f[l4.off + 12] >> 4) * 4;
        let payload = if ip.v6 { u32::from(be16(f, 18)) } else { u32::from(be16(f, 16)).saturating_sub(20) };
        let mut len = payload.saturating_sub(doff) + 1;
        if l4.flags & FIN != 0 {
            len += 1;
        }
        let mut t = Vec::new();
        t.extend(l4.dport.to_be_bytes());
        t.extend(l4.sport.to_be_bytes());
        t.extend([0; 4]);
        t.extend(be32(f, l4.off + 4).wrapping_add(len).to_be_bytes());
        t.extend([5 << 4, RST | ACK, 0, 0, 0, 0, 0, 0]);
        (TCP, t)
    } else {
        let mut m = if ip.v6 { vec![1, 4, 0, 0, 0, 0, 0, 0] } else { vec![3, 3, 0, 0, 0, 0, 0, 0] };
        m.extend(&f[14..l4.off + 8]);
        (if ip.v6 { ICMPV6 } else { ICMP }, m)
    };
    let len = msg.len();
    if ip.v6 {
        out.extend([0x60, 0, 0, 0]);
        out.extend(u16::try_from(len).expect("len").to_be_bytes());
        out.extend([proto, 64]);
    } else {
        let mut h = vec![0x45, 0];
        h.extend(u16::try_from(20 + len).expect("len").to_be_bytes());
        h.extend([0, 0, 0x40, 0, 64, proto, 0, 0]);
        h.extend(octets(ip.dst));
        h.extend(octets(ip.src));
        let c = !fold(sum(&h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        out.extend(&h[..12]);
    }
    out.extend(octets(ip.dst));
    out.extend(octets(ip.src));
    let l4_at = out.len();
    out.extend(&msg);
    let csum_at = l4_at + if proto == TCP { 16 } else { 2 };
    let mut s = sum(&msg);
    if proto != ICMP {
        s += sum(&pseudo(ip.dst, ip.src, proto, len));
    }
    out[csum_at..csum_at + 2].copy_from_slice(&(!fold(s)).to_be_bytes());
    let mut csums = vec![(csum_at, CsumKind::Plain)];
    if !ip.v6 {
        csums.push((24, CsumKind::Plain));
    }
    Expect::Refused(Rewrite { frame: out, csums })
}

/// Where two frames differ, for messages.
pub fn diff(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!("length {} became {}", a.len(), b.len());
    }
    let mut s = String::new();
    for (i, (x, y)) in a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y).take(8) {
        let _ = write!(s, "byte {i}: {x:#04x} -> {y:#04x}; ");
    }
    s
}
