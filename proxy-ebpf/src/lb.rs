//! Frontend lookup and backend selection, shared by the packet path (TC)
//! and the socket path (cgroup hooks): one function each, so every rule
//! (scopes, NodePorts, session affinity) holds on both.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::{AffinityKey, AffinityValue, SCOPE_EXTERNAL, SCOPE_INTERNAL, Stat, SvcValue, svc_flags};

use crate::{family::Family, maps::AFFINITY_V1, stats};

/// A frontend entry a packet or socket is addressed to.
#[derive(Clone, Copy)]
pub struct Frontend<A> {
    /// The entry's address: the packet's destination, or the unspecified
    /// address for a NodePort.
    pub addr: A,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub svc: SvcValue,
}

/// The frontend `(daddr, dport, proto)` names, for a client on this node
/// (`internal`: pods, host processes) or not. NodePorts answer on the node
/// addresses the agent lists; a frontend with two scopes sends internal
/// clients to its internal entry.
/// The frontend is written to `fe`; returns whether there is one.
#[inline(always)]
pub fn lookup<F: Family>(fe: &mut Frontend<F::Addr>, daddr: &F::Addr, dport: u16, proto: u8, internal: bool) -> bool {
    let mut svc = F::svc(*daddr, dport, proto, SCOPE_EXTERNAL, 0);
    fe.addr = *daddr;
    if svc.is_none() && F::is_nodeport_addr(daddr) {
        fe.addr = F::UNSPECIFIED;
        svc = F::svc(F::UNSPECIFIED, dport, proto, SCOPE_EXTERNAL, 0);
    }
    let Some(svc) = svc else { return false };
    (fe.port, fe.proto, fe.scope, fe.svc) = (dport, proto, SCOPE_EXTERNAL, svc);
    if internal
        && svc.flags & svc_flags::TWO_SCOPES != 0
        && let Some(svc) = F::svc(fe.addr, dport, proto, SCOPE_INTERNAL, 0)
    {
        (fe.scope, fe.svc) = (SCOPE_INTERNAL, svc);
    }
    true
}

/// Who a client is, for session affinity.
#[derive(Clone, Copy)]
pub enum Client<A> {
    /// Its address (the packet path).
    Addr(A),
    /// Its network namespace cookie (the socket path: no source address
    /// is chosen at connect time).
    Cookie(u64),
}

/// A chosen backend.
#[derive(Clone, Copy)]
pub struct Chosen<A> {
    pub id: u32,
    /// Address and port, network byte order.
    pub backend: (A, u16),
}

/// A random backend of the frontend's active generation, as kube-proxy's
/// `statistic --mode random` chains pick one.
#[inline(always)]
fn random<F: Family>(fe: &Frontend<F::Addr>) -> Option<Chosen<F::Addr>> {
    let svc = &fe.svc;
    if svc.count == 0 {
        return None;
    }
    // SAFETY: helper without arguments or side effects.
    let rand = unsafe { bpf_get_prandom_u32() };
    // `count` is at most MAX_BACKENDS_PER_SVC, so the index fits in u16.
    let idx = u16::try_from(rand % u32::from(svc.count)).unwrap_or(0);
    let slot = F::svc(fe.addr, fe.port, fe.proto, fe.scope, svc.slot_base.wrapping_add(idx))?;
    let backend = F::backend(slot.backend_id)?;
    Some(Chosen { id: slot.backend_id, backend })
}

/// The backend for a new connection of `client` to `fe`: with ClientIP
/// session affinity, the client's backend while its entry is fresh and the
/// backend still in the frontend's set (kube-proxy restarts the timer on
/// each new connection); otherwise a random one.
#[inline(always)]
pub fn select<F: Family>(fe: &Frontend<F::Addr>, client: Client<F::Addr>, now: u64) -> Option<Chosen<F::Addr>> {
    let svc = &fe.svc;
    if svc.flags & svc_flags::AFFINITY == 0 {
        return random::<F>(fe);
    }
    let (by_cookie, id) = match client {
        Client::Addr(a) => (0, F::client_id(a)),
        Client::Cookie(c) => {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&c.to_ne_bytes());
            (1, id)
        }
    };
    let key = AffinityKey { frontend_id: svc.rev_nat_id, family: F::NUMBER, by_cookie, _pad: [0; 2], client: id };
    if let Some(ptr) = AFFINITY_V1.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup, valid for this run.
        let sticky = unsafe { &mut *ptr };
        let timeout_ns = u64::from(svc.affinity_timeout) * 1_000_000_000;
        if now.saturating_sub(sticky.last_used_ns) < timeout_ns
            && F::affinity_match(svc.rev_nat_id, sticky.backend_id)
            && let Some(backend) = F::backend(sticky.backend_id)
        {
            sticky.last_used_ns = now;
            stats::count(F::SLOT, Stat::AffinityHit);
            return Some(Chosen { id: sticky.backend_id, backend });
        }
    }
    let chosen = random::<F>(fe)?;
    let value = AffinityValue { last_used_ns: now, backend_id: chosen.id, _pad: 0 };
    // A lost insert (LRU pressure) costs this client its stickiness once.
    let _ = AFFINITY_V1.insert(key, value, 0);
    Some(chosen)
}
