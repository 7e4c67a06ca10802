//! Connection tracking: state machine, timeouts and flow creation.
//!
//! A flow has two entries in the family's LRU map: the forward entry, keyed
//! by the client's packet (client -> VIP), which holds the backend, state and
//! expiry; and the reverse entry, keyed by the backend's reply (backend ->
//! client), which holds the reverse-NAT id. The forward entry is the one
//! source of state: replies update it too.
//!
//! Races between CPUs: two CPUs may see the first packets of one flow (a
//! retransmitted SYN) at once. The forward entry is inserted with
//! `BPF_NOEXIST`, so one CPU wins and the other adopts the winner's backend.
//! State and expiry updates are plain stores; a lost update costs at most
//! one packet's worth of freshness.
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_ns,
};
use proxy_common::{CT_DIR_FORWARD, CT_DIR_REVERSE, Stat, ct_state, ct_timeout};

use crate::{
    family::{CtRef, Family},
    maps::CONFIG_V1,
    parse::{L4, Pkt, TCP_FLAG_ACK, TCP_FLAG_FIN, TCP_FLAG_RST, TCP_FLAG_SYN},
    stats,
};

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
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
/// agent's configuration (`CONFIG`).
#[inline(always)]
pub fn timeout(state: u8, l4: &L4) -> u64 {
    const BOTH_FIN: u8 = ct_state::FIN_FWD | ct_state::FIN_REV;
    let cfg = CONFIG_V1.get(0).copied().unwrap_or_default();
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

/// Record a packet on a forward entry: advance the state, push the expiry.
#[inline(always)]
pub fn touch<A>(ct: &mut CtRef<'_, A>, l4: &L4, reply: bool, now: u64) {
    let state = next_state(*ct.state, l4, reply);
    *ct.state = state;
    *ct.expires = now + timeout(state, l4);
}

/// A bare SYN on an entry whose connection closed is a new connection
/// reusing the port: it gets a fresh backend choice.
#[inline(always)]
fn is_reopen(state: u8, l4: &L4) -> bool {
    l4.is_tcp()
        && l4.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
        && state & (ct_state::RST | ct_state::FIN_FWD | ct_state::FIN_REV) != 0
}

/// Outcome of a forward lookup.
pub enum Forward<A> {
    /// A live flow: its backend.
    Hit((A, u16)),
    /// No usable entry. `stale` is true when an expired or closed one is in
    /// the way and must be overwritten.
    Miss { stale: bool },
}

/// Look up the forward entry of the client's packet and, when it is live,
/// record the packet on it.
#[inline(always)]
pub fn lookup_forward<F: Family>(pkt: &Pkt<F::Addr>, now: u64) -> Forward<F::Addr> {
    let key = F::ct_key(pkt.src(), pkt.dst(), pkt.l4.proto, CT_DIR_FORWARD);
    let Some(ptr) = F::ct_get(&key) else {
        return Forward::Miss { stale: false };
    };
    // SAFETY: pointer from a successful lookup, valid for this run (RCU).
    let mut ct = F::ct_ref(unsafe { &mut *ptr });
    if *ct.expires <= now || is_reopen(*ct.state, &pkt.l4) {
        return Forward::Miss { stale: true };
    }
    // A UDP flow has no end: when its backend is removed, the next datagram
    // moves to a live one instead of following the old entry into a black
    // hole (kube-proxy clears such entries; kubernetes#19029). TCP flows
    // keep their backend until they end.
    if !pkt.l4.is_tcp() && F::backend(ct.backend_id) != Some(ct.backend) {
        stats::count(Stat::UdpRepick);
        return Forward::Miss { stale: true };
    }
    touch(&mut ct, &pkt.l4, false, now);
    Forward::Hit(ct.backend)
}

/// Create the forward and reverse entries of a new flow to `backend`.
/// Returns the backend the flow ends up with: ours, or the one another CPU
/// recorded first.
#[inline(always)]
pub fn create<F: Family>(
    pkt: &Pkt<F::Addr>,
    backend_id: u32,
    backend: (F::Addr, u16),
    rev_nat_id: u32,
    stale: bool,
    now: u64,
) -> (F::Addr, u16) {
    let l4 = &pkt.l4;
    let fkey = F::ct_key(pkt.src(), pkt.dst(), l4.proto, CT_DIR_FORWARD);
    let state = next_state(0, l4, false);
    let fval = F::ct_value(now + timeout(state, l4), backend_id, rev_nat_id, backend, state);
    let flags = if stale { BPF_ANY } else { BPF_NOEXIST };
    if F::ct_insert(&fkey, &fval, u64::from(flags)).is_err() {
        if let Some(ptr) = F::ct_get(&fkey) {
            // Another CPU created the flow first: follow its choice.
            // SAFETY: pointer from a successful lookup, valid for this run.
            return F::ct_ref(unsafe { &mut *ptr }).backend;
        }
        // LRU insert failures are transient; translate this packet anyway,
        // the next one retries.
        stats::count(Stat::CtInsertFailed);
    }
    let rkey = F::ct_key(backend, pkt.src(), l4.proto, CT_DIR_REVERSE);
    let rval = F::ct_value(0, 0, rev_nat_id, backend, 0);
    if F::ct_insert(&rkey, &rval, u64::from(BPF_ANY)).is_err() {
        stats::count(Stat::CtInsertFailed);
    }
    backend
}
