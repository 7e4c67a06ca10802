//! Reverse path: replies from a backend are rewritten back to the service
//! address and port the client connected to.
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use proxy_common::{CT_DIR_FORWARD, CT_DIR_REVERSE, Stat};

use crate::{
    conntrack,
    family::Family,
    nat::End,
    parse::{Pkt, Verdict},
    pass, stats,
};

#[inline(always)]
pub fn reverse<F: Family>(ctx: &TcContext, pkt: &Pkt<F::Addr>) -> Result<Verdict, Verdict> {
    let l4 = &pkt.l4;
    let rkey = F::ct_key(pkt.src(), pkt.dst(), l4.proto, CT_DIR_REVERSE);
    let Some(rptr) = F::ct_get(&rkey) else {
        return Ok(pass(Stat::PassNoService));
    };
    // SAFETY: pointer from a successful lookup, valid for this run (RCU).
    let rev_nat_id = F::ct_ref(unsafe { &mut *rptr }).rev_nat_id;
    let Some(vip) = F::revnat(rev_nat_id) else {
        return Ok(pass(Stat::PassStaleRevNat));
    };
    // The forward entry holds the flow's state: a reply refreshes it, so a
    // flow where only the backend talks stays on its backend.
    let fkey = F::ct_key(pkt.dst(), vip, l4.proto, CT_DIR_FORWARD);
    if let Some(fptr) = F::ct_get(&fkey) {
        // SAFETY: as above.
        let mut ct = F::ct_ref(unsafe { &mut *fptr });
        conntrack::touch(&mut ct, l4, true, conntrack::now());
    }
    F::rewrite(ctx, l4, End::Src, pkt.src(), vip)?;
    stats::count(Stat::RevNat);
    Ok(TC_ACT_OK)
}
