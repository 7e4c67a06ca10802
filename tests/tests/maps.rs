//! The kernel layer on the real maps: batched writes (`BPF_MAP_UPDATE_BATCH`
//! / `BPF_MAP_DELETE_BATCH`), both families side by side, every element
//! that fails named and every other one landed.
//!
//! Needs root and BPF; fails loudly without them.
use std::net::IpAddr;

use dsproxy::{
    attach::{self, Capacities},
    diff::{Op, Programmed},
    maps::{Kernel as _, Maps},
    types::{Backend, Frontend, Proto},
};
use dsproxy_tests::netns::BpfFs;

fn fe(vip: &str) -> Frontend {
    Frontend::new(vip.parse().expect("ip"), 80, Proto::Tcp)
}

fn be(addr: IpAddr) -> Backend {
    Backend { addr, port: 8080, proto: Proto::Tcp }
}

fn load(caps: &Capacities) -> (BpfFs, aya::Ebpf, Maps) {
    let bpf = BpfFs::new();
    let (ebpf, maps) = attach::load(&bpf.pin_dir(), caps).expect("load datapath");
    (bpf, ebpf, maps)
}

fn slots(prog: &Programmed, f: &Frontend) -> Vec<u16> {
    prog.slots.get(f).map(|s| s.keys().copied().collect()).unwrap_or_default()
}

#[test]
fn should_land_what_fits_in_a_batch_and_name_every_element_that_does_not() {
    let (_bpf, _ebpf, mut maps) =
        load(&Capacities { svc: 6, backend: 4, revnat: 4, ct: 1024, ..Capacities::default() });
    let (f4, f6) = (fe("198.19.0.10"), fe("fd00:ffff::a"));
    let mut ops: Vec<Op> = (1..=8).map(|slot| Op::PutSlot { frontend: f4, slot, backend_id: 1 }).collect();
    ops.extend((1..=3).map(|slot| Op::PutSlot { frontend: f6, slot, backend_id: 1 }));
    ops.extend((1..=5u8).map(|i| Op::PutBackend { id: u32::from(i), backend: be(IpAddr::from([198, 18, 2, 2 + i])) }));
    let failed = maps.apply_all(&ops);
    let mut at: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
    at.sort_unstable();
    // The IPv4 service map holds 6 of the 8 slots, the backend map 4 of 5;
    // the batch goes on after a failed element.
    assert_eq!(at.len(), 3, "{failed:?}");
    for (i, e) in &failed {
        let text = e.to_string();
        match &ops[*i] {
            Op::PutSlot { frontend, slot, .. } => {
                assert_eq!(*frontend, f4, "only IPv4 slots overflow: {text}");
                assert!(text.contains(&format!("slot {slot}")) && text.contains("--svc-capacity"), "{text}");
            }
            Op::PutBackend { .. } => assert!(text.contains("--backend-capacity"), "{text}"),
            other => panic!("{other:?} should not fail: {text}"),
        }
    }
    let prog = maps.read_back().expect("read back");
    assert_eq!(slots(&prog, &f4).len(), 6, "every IPv4 slot that fit landed");
    assert_eq!(slots(&prog, &f6), vec![1, 2, 3], "IPv6 slots are in their own map");
    assert_eq!(prog.v4.backends().count(), 4);

    // Deleting keys that are partly missing deletes the rest and fails none.
    let deletes: Vec<Op> = (1..=8).map(|slot| Op::DeleteSlot { frontend: f4, slot }).collect();
    assert!(maps.apply_all(&deletes).is_empty(), "a missing key counts as deleted");
    let prog = maps.read_back().expect("read back");
    assert!(slots(&prog, &f4).is_empty());
    assert_eq!(slots(&prog, &f6), vec![1, 2, 3], "untouched");
}

#[test]
fn should_write_both_families_side_by_side_in_one_call() {
    // Enough writes per family for the kernel layer to use two threads.
    let n = 3000u16;
    let (_bpf, _ebpf, mut maps) =
        load(&Capacities { svc: 8192, backend: 8192, revnat: 64, ct: 1024, ..Capacities::default() });
    let (f4, f6) = (fe("198.19.0.10"), fe("fd00:ffff::a"));
    let mut ops = Vec::new();
    for i in 1..=n {
        let [hi, lo] = i.to_be_bytes();
        let id = u32::from(i);
        ops.push(Op::PutBackend { id, backend: be(IpAddr::from([198, 18, hi, lo])) });
        ops.push(Op::PutBackend { id, backend: be(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 1, i])) });
        ops.push(Op::PutSlot { frontend: f4, slot: i, backend_id: id });
        ops.push(Op::PutSlot { frontend: f6, slot: i, backend_id: id });
    }
    assert!(maps.apply_all(&ops).is_empty());
    let prog = maps.read_back().expect("read back");
    let want: Vec<u16> = (1..=n).collect();
    assert_eq!(slots(&prog, &f4), want);
    assert_eq!(slots(&prog, &f6), want);
    assert_eq!((prog.v4.backends().count(), prog.v6.backends().count()), (usize::from(n), usize::from(n)));
    assert_eq!(prog.v4.backend(7), Some(&be(IpAddr::from([198, 18, 0, 7]))), "values land with their keys");
    assert_eq!(prog.v6.backend(7), Some(&be(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 1, 7]))));
}
