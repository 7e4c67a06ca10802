//! The frontend-address filter as the agent keeps it (pure): which bit of
//! a family's filter an address sets, and the words of a filter holding a
//! set of addresses. The datapath reads the same bits
//! (`proxy_common::filter`); `maps` writes them: an address's bit before
//! the first entry that needs it, the whole filter brought to exactly the
//! programmed addresses once removals have landed (`Maps::prune_filter`).
use std::net::IpAddr;

use proxy_common::filter;

use crate::{diff::Programmed, types::Family};

/// Words per family.
pub const WORDS: usize = filter::WORDS as usize;

/// The word and bit mask of `addr` in its family's filter.
pub fn slot(addr: &IpAddr) -> (usize, u64) {
    let bit = match addr {
        IpAddr::V4(a) => filter::bit(&a.octets()),
        IpAddr::V6(a) => filter::bit(&a.octets()),
    };
    ((bit >> 6) as usize, 1 << (bit & 63))
}

/// The addresses `prog` needs in `family`'s filter: every frontend's (the
/// unspecified address of NodePort frontends included, harmlessly) and
/// every node address NodePorts answer on.
pub fn addresses(prog: &Programmed, family: Family) -> impl Iterator<Item = IpAddr> + '_ {
    let frontends = prog.frontends.keys().map(|f| f.addr);
    frontends.chain(prog.node_addresses.iter().copied()).filter(move |a| Family::of(*a) == family)
}

/// The words of a filter holding exactly `addrs`.
pub fn words(addrs: impl Iterator<Item = IpAddr>) -> Vec<u64> {
    let mut w = vec![0u64; WORDS];
    for a in addrs {
        let (i, bit) = slot(&a);
        w[i] |= bit;
    }
    w
}

/// The words to write so that `now` also holds `addrs`: (index, new
/// word), none for an address whose bit is set already.
pub fn with<'a>(now: &[u64], addrs: impl Iterator<Item = &'a IpAddr>) -> Vec<(u32, u64)> {
    let mut out: Vec<(u32, u64)> = Vec::new();
    for a in addrs {
        let (i, bit) = slot(a);
        let word = out.iter().find(|(k, _)| *k as usize == i).map_or(now[i], |(_, w)| *w);
        if word & bit != 0 {
            continue;
        }
        let index = u32::try_from(i).expect("a filter has fewer than 2^32 words");
        match out.iter_mut().find(|(k, _)| *k == index) {
            Some(entry) => entry.1 = word | bit,
            None => out.push((index, word | bit)),
        }
    }
    out
}

/// The words of `now` that differ in `want`: (index, new word).
pub fn changed(now: &[u64], want: &[u64]) -> Vec<(u32, u64)> {
    now.iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (_, b))| (u32::try_from(i).expect("a filter has fewer than 2^32 words"), *b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn an_address_sets_one_bit_and_the_same_one_each_time() {
        for addr in [a("198.19.0.10"), a("fd00:ffff::a")] {
            let w = words([addr, addr].into_iter());
            assert_eq!(w.iter().map(|x| x.count_ones()).sum::<u32>(), 1);
            let (i, bit) = slot(&addr);
            assert_eq!(w[i], bit);
        }
    }

    #[test]
    fn nearby_service_addresses_spread_over_the_filter() {
        // 10,000 consecutive ClusterIPs: a Bloom filter of 2^18 bits with
        // one hash sets close to 10,000 distinct bits.
        let addrs = (0..10_000u32).map(|i| IpAddr::V4((0xC613_0000 + i).into()));
        let set: u32 = words(addrs).iter().map(|x| x.count_ones()).sum();
        assert!(set > 9_700, "{set} bits for 10,000 addresses");
        let addrs = (0..10_000u128).map(|i| IpAddr::V6((0xfd00_u128 << 112 | i).into()));
        let set: u32 = words(addrs).iter().map(|x| x.count_ones()).sum();
        assert!(set > 9_700, "{set} bits for 10,000 addresses");
    }

    #[test]
    fn adding_addresses_writes_each_changed_word_once_and_nothing_for_a_set_bit() {
        let now = words([a("198.19.0.10")].into_iter());
        assert!(with(&now, [a("198.19.0.10")].iter()).is_empty(), "set already");
        let new: Vec<IpAddr> = (0..200u32).map(|i| IpAddr::V4((0xC613_0100 + i).into())).collect();
        let changes = with(&now, new.iter());
        let mut after = now.clone();
        for (i, w) in &changes {
            after[*i as usize] = *w;
        }
        assert_eq!(after, words(new.iter().copied().chain([a("198.19.0.10")])));
        let mut indices: Vec<u32> = changes.iter().map(|(i, _)| *i).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), changes.len(), "one write per word");
    }

    #[test]
    fn only_the_words_that_differ_are_written() {
        let now = words([a("198.19.0.10"), a("198.19.0.11")].into_iter());
        let want = words([a("198.19.0.10")].into_iter());
        let diff = changed(&now, &want);
        assert_eq!(diff.len(), 1);
        assert_eq!(diff[0].0 as usize, slot(&a("198.19.0.11")).0);
        assert!(changed(&want, &want).is_empty());
    }
}
