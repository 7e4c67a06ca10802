//! Per-CPU counters, one per reason and family. No per-packet logging.
use aya_ebpf::bindings::{TC_ACT_OK, TC_ACT_SHOT};
use proxy_common::{Stat, StatSlot};

use crate::{maps::STATS_V3, parse::Verdict};

#[inline(always)]
pub fn count(slot: StatSlot, stat: Stat) {
    if let Some(c) = STATS_V3.get_ptr_mut(slot.index(stat)) {
        // SAFETY: per-CPU value, so no other CPU writes it; TC and cgroup
        // programs do not preempt each other on one CPU.
        unsafe { *c += 1 };
    }
}

/// The verdict a redirect helper returned (`TC_ACT_REDIRECT`, or
/// `TC_ACT_SHOT` when the target is gone).
#[inline(always)]
pub fn redirected(rc: i64) -> Verdict {
    Verdict::try_from(rc).unwrap_or(TC_ACT_SHOT)
}

/// Count `stat` and let the packet through untouched.
#[inline(always)]
pub fn pass(slot: StatSlot, stat: Stat) -> Verdict {
    count(slot, stat);
    TC_ACT_OK
}

/// For `map_err`: count a reason the packet is not ours and let it pass.
#[inline(always)]
pub fn passing(slot: StatSlot) -> impl Fn(Stat) -> Verdict {
    move |stat| pass(slot, stat)
}

/// Count `stat` and drop the packet.
#[inline(always)]
pub fn drop(slot: StatSlot, stat: Stat) -> Verdict {
    count(slot, stat);
    TC_ACT_SHOT
}

/// A helper failed after the packet was partly rewritten: it must not
/// leave half translated.
#[inline(always)]
pub fn drop_rewrite<E>(slot: StatSlot) -> impl Fn(E) -> Verdict {
    move |_| drop(slot, Stat::DropRewrite)
}
