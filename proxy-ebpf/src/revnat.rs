//! The reply path: packets from a backend back to its client are rewritten
//! to come from the address the client connected to (and to go to the
//! client again when its source was translated).
//!
//! Where it happens depends on how the flow travels (`ct_flags::BYPASS`):
//! - a flow redirected past the host stack is translated at TC ingress of
//!   the backend's interface and redirected to the client;
//! - a flow the host stack forwards is translated at TC egress towards the
//!   client, after netfilter, reverse-path filtering and any masquerade
//!   saw one consistent tuple both ways (client <-> backend).
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{CtKey, Stat, ct_flags};

use crate::{
    conntrack::{self, Rev},
    family::Family,
    nat::{End, Ends},
    parse::Verdict,
    route::{self, Dir},
    stats,
    work::Work,
};

/// Reply translation at TC ingress: flows that bypass the host stack.
#[inline(never)]
pub fn ingress<F: Family>(ctx: TcContext, w: &mut Work<F>) -> Verdict {
    let ctx = &ctx;
    w.key = CtKey::new(w.pkt.src(), w.pkt.dst(), w.pkt.l4.proto);
    match conntrack::lookup_rev::<F>(w, true) {
        Rev::None => stats::pass(F::SLOT, Stat::PassNoService),
        Rev::Stale => stats::pass(F::SLOT, Stat::PassStaleRevNat),
        Rev::Hit => {
            if w.flow.flags & ct_flags::BYPASS == 0 {
                // The host stack forwards this flow: egress translates.
                return stats::pass(F::SLOT, Stat::Stack);
            }
            if let Err(v) = translate::<F>(ctx, w) {
                return v;
            }
            stats::count(F::SLOT, Stat::RevNat);
            route::send::<F>(ctx, w, Dir::ToClient)
        }
    }
}

/// Reply translation at TC egress: flows the host stack forwards.
#[inline(never)]
pub fn egress<F: Family>(ctx: TcContext, w: &mut Work<F>) -> Verdict {
    w.key = CtKey::new(w.pkt.src(), w.pkt.dst(), w.pkt.l4.proto);
    if conntrack::lookup_rev::<F>(w, true) == Rev::Hit && w.flow.flags & ct_flags::BYPASS == 0 {
        if let Err(v) = translate::<F>(&ctx, w) {
            return v;
        }
        stats::count(F::SLOT, Stat::RevNat);
    }
    // Everything else on its way out is not ours to touch (and not counted:
    // egress sees every packet the node sends).
    TC_ACT_OK
}

/// Rewrite the reply in `w.pkt` to what the client of `w.back` expects.
#[inline(always)]
fn translate<F: Family>(ctx: &TcContext, w: &Work<F>) -> Result<(), Verdict> {
    let (pkt, back) = (&w.pkt, &w.back);
    let l4 = &pkt.l4;
    let src = Ends { old: &pkt.saddr, old_port: l4.sport, new: &back.frontend, new_port: back.frontend_port };
    F::rewrite(ctx, l4, End::Src, src)?;
    if w.flow.flags & ct_flags::SNAT != 0 {
        let dst = Ends { old: &pkt.daddr, old_port: l4.dport, new: &back.client, new_port: back.client_port };
        F::rewrite(ctx, l4, End::Dst, dst)?;
    }
    Ok(())
}
