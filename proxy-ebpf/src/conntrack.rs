//! Connection tracking: state machine, timeouts, flow creation, and the
//! rule that keeps entries flow-scoped: a reverse entry translates only
//! while the forward entry of its flow lives and still names the same
//! backend and source. Anything else is stale and is removed on sight.
//!
//! Races between CPUs: two CPUs may see the first packets of one flow (a
//! retransmitted SYN) at once. The forward entry is inserted with
//! `BPF_NOEXIST`, so one CPU wins and the other adopts the winner's backend.
//! State and expiry updates are plain stores; a lost update costs at most
//! one packet's worth of freshness.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_prandom_u32, generated::bpf_ktime_get_coarse_ns},
};
use proxy_common::{CtKey, DatapathConfig, Hop, Stat, ct_flags, ct_state, ct_timeout};

use crate::{
    family::{Family, Flow},
    maps::CONFIG_V2,
    parse::{L4, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN},
    stats,
    work::Work,
};

/// CLOCK_MONOTONIC at tick resolution (`bpf_ktime_get_coarse_ns`): every
/// lifetime the datapath keeps (conntrack, affinity, route cache) is a
/// second or more, and the coarse clock reads no clock source per packet.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The agent's runtime settings (all zero before it wrote them).
#[inline(always)]
pub fn config() -> DatapathConfig {
    CONFIG_V2.get(0).copied().unwrap_or_default()
}

/// State after a packet with these TCP flags, sent by the client
/// (`reply == false`) or by the backend.
#[inline(always)]
pub fn next_state(state: u8, l4: &L4, reply: bool) -> u8 {
    let mut s = state;
    if reply {
        s |= ct_state::SEEN_REPLY;
    }
    if l4.is_tcp() {
        if l4.tcp_flags & TCP_FLAG_RST != 0 {
            s |= ct_state::RST;
        }
        if l4.tcp_flags & TCP_FLAG_FIN != 0 {
            s |= if reply { ct_state::FIN_REV } else { ct_state::FIN_FWD };
        }
    }
    s
}

/// `configured`, or `default` when the agent left it at 0.
#[inline(always)]
fn or_default(configured: u64, default: u64) -> u64 {
    if configured == 0 { default } else { configured }
}

/// Lifetime of an entry in `state`, one named timeout per state, from the
/// agent's configuration.
#[inline(always)]
pub fn timeout(state: u8, l4: &L4) -> u64 {
    const BOTH_FIN: u8 = ct_state::FIN_FWD | ct_state::FIN_REV;
    let cfg = config();
    if !l4.is_tcp() {
        or_default(cfg.udp_ns, ct_timeout::UDP)
    } else if state & ct_state::RST != 0 || state & BOTH_FIN == BOTH_FIN {
        or_default(cfg.tcp_close_ns, ct_timeout::TCP_CLOSE)
    } else if state & ct_state::SEEN_REPLY != 0 {
        or_default(cfg.tcp_established_ns, ct_timeout::TCP_ESTABLISHED)
    } else {
        or_default(cfg.tcp_syn_ns, ct_timeout::TCP_SYN)
    }
}

/// A bare SYN on an entry whose connection closed is a new connection
/// reusing the port: it gets a fresh backend choice.
#[inline(always)]
fn is_reopen(state: u8, l4: &L4) -> bool {
    l4.is_syn() && state & (ct_state::RST | ct_state::FIN_FWD | ct_state::FIN_REV) != 0
}

/// A SYN-ACK from the backend of a flow that has closed answers a new
/// connection: had the client reopened through the frontend, its SYN would
/// have reset the flow. So it answers a direct connection that reuses the
/// client's port, and must pass untouched.
#[inline(always)]
fn is_reply_to_reopen(state: u8, l4: &L4, reply: bool) -> bool {
    reply
        && l4.is_tcp()
        && l4.tcp_flags & TCP_FLAG_SYN != 0
        && state & (ct_state::RST | ct_state::FIN_FWD | ct_state::FIN_REV) != 0
}

/// Outcome of a forward lookup.
pub enum Fwd {
    /// A live flow, now in `w.flow`.
    Hit,
    /// No usable entry. `stale` is true when an expired or closed one is in
    /// the way and must be overwritten.
    Miss { stale: bool },
}

/// Look up the forward entry of the packet in `w.pkt` and, when it is live,
/// record the packet on it and copy it to `w.flow`. Leaves the forward key
/// in `w.key`.
#[inline(always)]
pub fn lookup_fwd<F: Family>(w: &mut Work<F>, now: u64) -> Fwd {
    let Some(entry) = fwd_entry(w) else {
        return Fwd::Miss { stale: false };
    };
    let l4 = &w.pkt.l4;
    if entry.expires <= now || is_reopen(entry.state, l4) {
        return Fwd::Miss { stale: true };
    }
    // A UDP flow has no end: when its backend is removed, the next datagram
    // moves to a live one instead of following the old entry into a black
    // hole (kube-proxy clears such entries; kubernetes#19029). TCP flows
    // keep their backend until they end.
    if !l4.is_tcp() && F::backend(entry.backend_id) != Some((entry.backend, entry.backend_port)) {
        stats::count(F::SLOT, Stat::UdpRepick);
        return Fwd::Miss { stale: true };
    }
    record(w, entry, now);
    Fwd::Hit
}

/// The live forward entry of the packet in `w.pkt` (a TCP segment that
/// opens nothing) while the frontend its flow was opened to still exists
/// at the packet's destination: then the packet is recorded on it, the
/// flow copied to `w.flow`, and no frontend lookup is needed. Otherwise
/// nothing is touched and the frontend lookup decides, as for any packet.
#[inline(always)]
pub fn lookup_established<F: Family>(w: &mut Work<F>, now: u64) -> bool {
    let Some(entry) = fwd_entry(w) else { return false };
    if entry.expires <= now || !F::frontend_at(entry.frontend_id, &w.pkt.daddr, w.pkt.l4.dport) {
        return false;
    }
    record(w, entry, now);
    true
}

/// The forward entry of the packet in `w.pkt`, whose key is left in
/// `w.key`.
#[inline(always)]
fn fwd_entry<'a, F: Family>(w: &mut Work<F>) -> Option<&'a mut Flow<F::Addr>> {
    let pkt = &w.pkt;
    w.key = CtKey::new(pkt.src(), pkt.dst(), pkt.l4.proto);
    // SAFETY: pointer from a successful lookup, valid for this run (RCU);
    // no other reference to the entry is made during it.
    F::fwd_get(&w.key).map(|ptr| unsafe { &mut *ptr })
}

/// Record the packet in `w.pkt` on its live forward entry and copy the
/// entry to `w.flow`.
#[inline(always)]
fn record<F: Family>(w: &mut Work<F>, entry: &mut Flow<F::Addr>, now: u64) {
    let l4 = &w.pkt.l4;
    let state = next_state(entry.state, l4, false);
    entry.state = state;
    entry.expires = now + timeout(state, l4);
    load_flow(w, entry, true);
}

/// Copy the forward entry `e` to `w.flow`, with the route it cached when
/// `route` (the client's packets of a flow past the host stack). Only what
/// the packet needs: every cache line of an entry read is a cache miss on
/// a table much larger than the CPU's caches.
#[inline(always)]
fn load_flow<F: Family>(w: &mut Work<F>, e: &Flow<F::Addr>, route: bool) {
    let f = &mut w.flow;
    (f.expires, f.backend_id, f.frontend_id) = (e.expires, e.backend_id, e.frontend_id);
    (f.backend, f.backend_port, f.nat, f.nat_port) = (e.backend, e.backend_port, e.nat, e.nat_port);
    (f.state, f.flags) = (e.state, e.flags);
    if route && e.flags & ct_flags::BYPASS != 0 {
        f.to_backend = e.to_backend;
    }
}

/// Outcome of a reverse lookup.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Rev {
    /// No reverse entry: not a reply of a flow of ours.
    None,
    /// A reverse entry whose flow is gone: removed, the packet is not ours.
    Stale,
    /// A reply of a live flow: the reverse entry is in `w.back`, the
    /// forward entry in `w.flow`.
    Hit,
}

/// Look up the reverse entry keyed by `w.key` (a reply: backend -> the
/// source it saw) and check it against its flow's forward entry; with
/// `record`, record the reply in `w.pkt` on the flow.
#[inline(never)]
pub fn lookup_rev<F: Family>(w: &mut Work<F>, record: bool) -> Rev {
    let Some(back) = F::rev_get(&w.key) else {
        return Rev::None;
    };
    // The clock only for a packet that may be a reply (not for every
    // packet that is none of ours).
    let now = now();
    w.now = now;
    // SAFETY: pointer from a successful lookup, valid for this run (RCU).
    let back = unsafe { &*back };
    let b = &mut w.back;
    (b.client, b.client_port, b.frontend, b.frontend_port) =
        (back.client, back.client_port, back.frontend, back.frontend_port);
    b.flags = back.flags;
    // The route back to the client only for a flow past the host stack.
    if record && back.flags & ct_flags::BYPASS != 0 {
        b.to_client = back.to_client;
    }
    let (src, dst) = ((w.key.saddr, w.key.sport), (w.key.daddr, w.key.dport));
    w.key2 = CtKey::new((w.back.client, w.back.client_port), (w.back.frontend, w.back.frontend_port), w.key.proto);
    let Some(ptr) = F::fwd_get(&w.key2) else {
        F::rev_remove(&w.key);
        return Rev::Stale;
    };
    // SAFETY: as above.
    let entry = unsafe { &mut *ptr };
    // The forward entry must be this flow's: alive, same backend, same
    // source towards it. A later flow that reused the client's tuple has
    // another backend or source.
    if entry.expires <= now
        || (entry.backend, entry.backend_port) != src
        || (entry.nat, entry.nat_port) != dst
        || is_reply_to_reopen(entry.state, &w.pkt.l4, record)
    {
        F::rev_remove(&w.key);
        return Rev::Stale;
    }
    if record {
        // The forward entry holds the flow's state: a reply refreshes it,
        // so a flow where only the backend talks stays alive.
        let state = next_state(entry.state, &w.pkt.l4, true);
        entry.state = state;
        entry.expires = now + timeout(state, &w.pkt.l4);
    }
    load_flow(w, entry, false);
    Rev::Hit
}

/// The live forward entry keyed by `w.key2`, copied to `w.flow`, without
/// recording anything on it.
#[inline(always)]
pub fn peek_fwd<F: Family>(w: &mut Work<F>, now: u64) -> bool {
    let Some(ptr) = F::fwd_get(&w.key2) else { return false };
    // SAFETY: pointer from a successful lookup, valid for this run.
    let entry = unsafe { &*ptr };
    if entry.expires <= now {
        return false;
    }
    w.flow = *entry;
    true
}

/// Create the entries of the new flow in `w.flow` (backend, ids, source
/// and flags filled in) for the packet in `w.pkt`, whose forward key is in
/// `w.key`. On return `w.flow` is the flow as recorded: ours, or the one
/// another CPU recorded first.
#[inline(always)]
pub fn create<F: Family>(w: &mut Work<F>, stale: bool, now: u64) {
    let l4 = &w.pkt.l4;
    let tcp_state = next_state(0, l4, false);
    w.flow.state = tcp_state;
    w.flow.expires = now + timeout(tcp_state, l4);
    let flags = if stale { BPF_ANY } else { BPF_NOEXIST };
    if F::fwd_insert(&w.key, &w.flow, u64::from(flags)).is_err() {
        if let Some(ptr) = F::fwd_get(&w.key) {
            // Another CPU created the flow first: follow its choice.
            // SAFETY: pointer from a successful lookup, valid for this run.
            w.flow = unsafe { *ptr };
            return;
        }
        // LRU insert failures are transient; translate this packet anyway,
        // the next one retries.
        stats::count(F::SLOT, Stat::CtInsertFailed);
    }
    let pkt = &w.pkt;
    w.key2 = CtKey::new((w.flow.backend, w.flow.backend_port), (w.flow.nat, w.flow.nat_port), l4.proto);
    // Field by field: a whole entry would pass through the stack. No route
    // back to the client yet: the first reply looks it up.
    let b = &mut w.back;
    (b.client, b.client_port, b.frontend, b.frontend_port) = (pkt.saddr, pkt.l4.sport, pkt.daddr, pkt.l4.dport);
    (b.flags, b._pad) = (w.flow.flags, [0; 3]);
    b.to_client = Hop::default();
    if F::rev_insert(&w.key2, &w.back, u64::from(BPF_ANY)).is_err() {
        stats::count(F::SLOT, Stat::CtInsertFailed);
    }
}

/// A source port on `addr` towards `backend` that no live flow uses:
/// `preferred` when free, else one of a few random ports above 32768.
/// Uses `w.key`, `w.key2`, `w.back` and `w.flow`.
#[inline(always)]
pub fn snat_port<F: Family>(w: &mut Work<F>, backend: (F::Addr, u16), addr: F::Addr, preferred: u16) -> Option<u16> {
    let proto = w.pkt.l4.proto;
    let mut port = preferred;
    for _ in 0..4 {
        w.key = CtKey::new(backend, (addr, port), proto);
        if lookup_rev::<F>(w, false) != Rev::Hit {
            return Some(port);
        }
        // SAFETY: helper without arguments or side effects.
        let r = unsafe { bpf_get_prandom_u32() };
        // 32768..=65535, network byte order.
        port = (u16::try_from(r >> 17).unwrap_or(0) | 0x8000).to_be();
    }
    None
}
