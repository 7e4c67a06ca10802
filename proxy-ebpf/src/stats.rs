//! Per-CPU counters, one per `Stat`. No per-packet logging.
use proxy_common::Stat;

use crate::maps::STATS_V1;

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(slot) = STATS_V1.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU value, so no other CPU writes it; TC programs do
        // not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}
