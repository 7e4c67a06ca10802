//! Fragments of service flows: the first fragment's ports are remembered
//! under `(saddr, daddr, id, proto)` (Cilium's `ipv4_frag_datagrams`), so
//! the later fragments, which carry no transport header, find the flow and
//! get the same address translation. A later fragment that arrives before
//! its first one passes untouched.
use proxy_common::{FragPorts, Stat};

use crate::{family::Family, parse::Pkt, stats};

/// Give a fragment its ports: record them from a first fragment, look them
/// up for a later one (`Err` with the reason when they are unknown).
/// Unfragmented packets pass through unchanged.
#[inline(always)]
pub fn ports<F: Family>(pkt: &mut Pkt<F::Addr>) -> Result<(), Stat> {
    let Some(frag) = pkt.frag else { return Ok(()) };
    let l4 = &mut pkt.l4;
    if frag.first {
        F::frag_record(pkt.saddr, pkt.daddr, frag.id, l4.proto, FragPorts { sport: l4.sport, dport: l4.dport });
        return Ok(());
    }
    let p = F::frag_ports(pkt.saddr, pkt.daddr, frag.id, l4.proto).ok_or(Stat::PassFragment)?;
    l4.sport = p.sport;
    l4.dport = p.dport;
    stats::count(F::SLOT, Stat::FragTracked);
    Ok(())
}
