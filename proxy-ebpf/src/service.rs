//! Service lookup and the forward path: packets addressed to a frontend.
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{Stat, SvcValue};

use crate::{
    backend,
    conntrack::{self, Forward},
    family::Family,
    nat::End,
    parse::{Pkt, Verdict},
    stats,
};

/// The frontend (slot 0) the packet is addressed to, if any.
#[inline(always)]
pub fn lookup<F: Family>(pkt: &Pkt<F::Addr>) -> Option<SvcValue> {
    F::svc_get(&F::svc_key(pkt.daddr, pkt.l4.dport, pkt.l4.proto, 0))
}

/// DNAT a packet addressed to frontend `svc` to the flow's backend, picking
/// one for a new flow.
#[inline(always)]
pub fn forward<F: Family>(ctx: &TcContext, pkt: &Pkt<F::Addr>, svc: &SvcValue) -> Result<Verdict, Verdict> {
    let now = conntrack::now();
    let (backend, stat) = match conntrack::lookup_forward::<F>(pkt, now) {
        Forward::Hit(backend) => (backend, Stat::DnatEstablished),
        Forward::Miss { stale } => {
            let Some((id, backend)) = backend::select::<F>(pkt.dst(), pkt.l4.proto, svc) else {
                // No backend of this family (never borrow one of the
                // other): refuse, as kube-proxy's REJECT rules do.
                return Ok(F::reject(ctx, pkt));
            };
            let backend = conntrack::create::<F>(pkt, id, backend, svc.rev_nat_id, stale, now);
            (backend, Stat::DnatNew)
        }
    };
    F::rewrite(ctx, &pkt.l4, End::Dst, pkt.dst(), backend)?;
    stats::count(stat);
    Ok(TC_ACT_OK)
}
