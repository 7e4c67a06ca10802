//! Backend selection for a new flow: a random slot of the frontend's active
//! generation, as kube-proxy's `statistic --mode random` chains do.
use aya_ebpf::helpers::bpf_get_prandom_u32;
use proxy_common::SvcValue;

use crate::family::Family;

/// Pick a backend of the frontend `(addr, port, proto)` whose slot-0 value
/// is `svc`. Returns the backend id and its address and port.
#[inline(always)]
pub fn select<F: Family>(vip: (F::Addr, u16), proto: u8, svc: &SvcValue) -> Option<(u32, (F::Addr, u16))> {
    if svc.count == 0 {
        return None;
    }
    // SAFETY: helper without arguments or side effects.
    let rand = unsafe { bpf_get_prandom_u32() };
    // `count` is at most MAX_BACKENDS_PER_SVC, so the slot fits in u16.
    let idx = (rand % u32::from(svc.count)) as u16;
    let slot = F::svc_get(&F::svc_key(vip.0, vip.1, proto, svc.slot_base.wrapping_add(idx)))?;
    let backend = F::backend(slot.backend_id)?;
    Some((slot.backend_id, backend))
}
