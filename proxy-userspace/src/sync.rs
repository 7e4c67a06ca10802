//! One reconciliation pass: desired vs programmed, one make-before-break
//! step per frontend. Steps are planned and applied many at a time, in
//! phases (`run_steps`), so the kernel layer gets few large batches of
//! independent writes instead of one system call per entry. A step that
//! fails is rolled back (when it had not yet committed) and reported by the
//! name of the object it was for; every other step still lands, and nothing
//! already programmed is lost.
use std::collections::BTreeSet;

use crate::{
    diff::{self, Change, Op, Programmed, Reserved, Step},
    maps::Kernel,
    types::{Desired, Family, Frontend},
};

/// What a pass did.
#[derive(Debug, Default)]
pub struct Report {
    pub upserted: usize,
    pub removed: usize,
    pub ops: usize,
    /// One message per failed step, naming its object.
    pub errors: Vec<String>,
}

/// Bring the maps (and `prog`, their mirror) to `desired`, looking at every
/// frontend and every map entry: at start, and after a pass with errors.
pub fn sync(kernel: &mut impl Kernel, prog: &mut Programmed, desired: &Desired) -> Report {
    let mut report = Report::default();
    let fresh = prog.frontends.is_empty()
        && prog.slots.is_empty()
        && [&prog.v4, &prog.v6]
            .iter()
            .all(|f| f.backends().next().is_none() && f.affinity.is_empty() && f.ranges.is_empty());
    run_one(kernel, prog, diff::plan_node_addresses(prog, &desired.nodeport_addresses), &mut report);
    apply(kernel, prog, diff::changes(prog, desired), &mut report);
    // From empty maps, a pass without failures leaves nothing to collect:
    // skip the walk over every entry.
    if !fresh || !report.errors.is_empty() {
        // Orphan slots first, then the backends they freed.
        collect(kernel, prog, diff::plan_gc, &mut report);
        collect(kernel, prog, diff::plan_gc, &mut report);
    }
    prune_filter(kernel, prog, &mut report);
    report
}

/// Bring the frontends in `dirty` to `desired`: the steady-state path,
/// whose cost follows the size of the change, not of the cluster.
pub fn sync_dirty(
    kernel: &mut impl Kernel,
    prog: &mut Programmed,
    desired: &Desired,
    dirty: &BTreeSet<Frontend>,
) -> Report {
    let mut report = Report::default();
    let node_addresses = prog.node_addresses.clone();
    run_one(kernel, prog, diff::plan_node_addresses(prog, &desired.nodeport_addresses), &mut report);
    apply(kernel, prog, diff::changes_in(prog, desired, dirty), &mut report);
    collect(kernel, prog, diff::plan_gc_freed, &mut report);
    // Only removals leave filter bits behind (a walk over every frontend).
    if report.removed > 0 || prog.node_addresses != node_addresses {
        prune_filter(kernel, prog, &mut report);
    }
    report
}

/// Clear the filter bits no entry needs any more. A failure leaves bits
/// set: packets to those addresses are looked up for nothing, no more.
fn prune_filter(kernel: &mut impl Kernel, prog: &Programmed, report: &mut Report) {
    if let Err(e) = kernel.prune_filter(prog) {
        report.errors.push(e.to_string());
    }
}

/// Run a garbage-collection plan, then forget the freed-backend candidates
/// (every pass ends with them collected).
fn collect(kernel: &mut impl Kernel, prog: &mut Programmed, plan: fn(&Programmed) -> Step, report: &mut Report) {
    run_one(kernel, prog, plan(prog), report);
    prog.v4.freed.clear();
    prog.v6.freed.clear();
}

/// Apply one step on its own (node addresses, a clean-up); its failure
/// is reported.
fn run_one(kernel: &mut impl Kernel, prog: &mut Programmed, step: Step, report: &mut Report) {
    if !step.ops.is_empty()
        && let Some(Some(e)) = run_steps(kernel, prog, vec![step], report).pop()
    {
        report.errors.push(e);
    }
}

/// Steps planned and applied together (a bound on what is in flight).
const STEPS_PER_BATCH: usize = 256;

/// Plan and apply `changes`, many steps at a time. Steps that fail in a
/// batch are tried again one by one, as the only step in flight: in a
/// batch, a nearly full map can take the new slots of many steps and then
/// refuse all their commits, where one at a time as many fit as there is
/// room for.
fn apply(kernel: &mut impl Kernel, prog: &mut Programmed, changes: Vec<Change<'_>>, report: &mut Report) {
    let mut again = Vec::new();
    for chunk in interleave(changes).chunks(STEPS_PER_BATCH) {
        again.extend(apply_batch(kernel, prog, chunk, report).into_iter().map(|(change, _)| change));
    }
    for change in again {
        for (_, e) in apply_batch(kernel, prog, &[change], report) {
            report.errors.push(e);
        }
    }
}

/// Plan `changes` together and apply them; count what landed and return
/// what did not, with why.
fn apply_batch<'a>(
    kernel: &mut impl Kernel,
    prog: &mut Programmed,
    changes: &[Change<'a>],
    report: &mut Report,
) -> Vec<(Change<'a>, String)> {
    let mut reserved = Reserved::default();
    let mut steps = Vec::with_capacity(changes.len());
    let mut planned = Vec::with_capacity(changes.len());
    for change in changes {
        let step = match change {
            Change::Upsert(frontend, spec) => diff::plan_upsert(prog, &mut reserved, *frontend, spec),
            Change::Remove(frontend) => Ok(diff::plan_remove(prog, *frontend)),
        };
        match step {
            Ok(step) => {
                planned.push(change.clone());
                steps.push(step);
            }
            Err(e) => report.errors.push(e),
        }
    }
    let mut failed = Vec::new();
    for (change, error) in planned.into_iter().zip(run_steps(kernel, prog, steps, report)) {
        match (error, &change) {
            (Some(e), _) => failed.push((change, e)),
            (None, Change::Upsert(..)) => report.upserted += 1,
            (None, Change::Remove(_)) => report.removed += 1,
        }
    }
    failed
}

/// The changes with the families alternating, so that every batch has
/// writes for both families' maps (the kernel layer writes them side by
/// side).
fn interleave(changes: Vec<Change<'_>>) -> Vec<Change<'_>> {
    let family = |c: &Change<'_>| match c {
        Change::Upsert(f, _) | Change::Remove(f) => f.family(),
    };
    let (v4, v6): (Vec<_>, Vec<_>) = changes.into_iter().partition(|c| family(c) == Family::V4);
    let mut out = Vec::with_capacity(v4.len() + v6.len());
    let (mut a, mut b) = (v4.into_iter(), v6.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

/// Ops of different steps, independent of each other, applied together;
/// `owner[i]` is the step of `ops[i]`.
#[derive(Default)]
struct Phase {
    owner: Vec<usize>,
    ops: Vec<Op>,
}

impl Phase {
    fn push(&mut self, owner: usize, op: Op) {
        self.owner.push(owner);
        self.ops.push(op);
    }

    /// The ops of the steps `keep` accepts.
    fn retain(self, keep: impl Fn(usize) -> bool) -> Self {
        let mut out = Phase::default();
        for (owner, op) in self.owner.into_iter().zip(self.ops) {
            if keep(owner) {
                out.push(owner, op);
            }
        }
        out
    }

    /// Apply the ops and fold what landed into the mirror; keep the first
    /// failure of each step in `failed`. Returns the number that landed.
    fn run(&self, kernel: &mut impl Kernel, prog: &mut Programmed, failed: &mut [Option<String>]) -> usize {
        if self.ops.is_empty() {
            return 0;
        }
        let mut landed = vec![true; self.ops.len()];
        for (i, e) in kernel.apply_all(&self.ops) {
            landed[i] = false;
            failed[self.owner[i]].get_or_insert_with(|| e.to_string());
        }
        let mut n = 0;
        for (op, landed) in self.ops.iter().zip(landed) {
            if landed {
                prog.apply(op);
                n += 1;
            }
        }
        n
    }
}

/// Apply `steps` together, each one make-before-break, in four phases:
///
/// 1. every step's ops before its commit point (new backends, reverse-NAT
///    entries, the slots of the inactive generation: nothing a packet can
///    reach yet);
/// 2. the commit op (the flip of slot 0, or the removal of a frontend) of
///    every step whose earlier ops all landed and whose backends exist;
/// 3. the roll-back of every step that failed up to its commit;
/// 4. the ops after the commit point (old slots, reverse-NAT entries of
///    removed frontends) of every committed step.
///
/// Steps touch disjoint entries (their own frontend's slots, fresh ids
/// from `Reserved`), except that one new backend may serve several steps:
/// a step commits only when every backend its slots point at exists. So
/// the ops of one phase are independent, and every order the kernel layer
/// applies them in keeps each step's order: before, commit, after.
/// Returns, per step, its first failure, named by its owner (`None`: all
/// its ops landed).
fn run_steps(
    kernel: &mut impl Kernel,
    prog: &mut Programmed,
    steps: Vec<Step>,
    report: &mut Report,
) -> Vec<Option<String>> {
    let mut failed: Vec<Option<String>> = vec![None; steps.len()];
    let (mut before, mut commit, mut after) = (Phase::default(), Phase::default(), Phase::default());
    let mut rollback = Vec::with_capacity(steps.len());
    let mut owners = Vec::with_capacity(steps.len());
    for (i, step) in steps.into_iter().enumerate() {
        let mut ops = step.ops;
        if step.commit < ops.len() {
            for op in ops.drain(step.commit + 1..) {
                after.push(i, op);
            }
            commit.push(i, ops.pop().expect("the commit op"));
        }
        for op in ops {
            before.push(i, op);
        }
        rollback.push(step.rollback);
        owners.push(step.owner);
    }
    report.ops += before.run(kernel, prog, &mut failed);
    // A new backend that did not land keeps the steps using it uncommitted.
    let some_failed = failed.iter().any(Option::is_some);
    for (i, op) in before.owner.iter().zip(&before.ops).filter(|_| some_failed) {
        if let Op::PutSlot { frontend, backend_id, .. } = op
            && failed[*i].is_none()
            && prog.family(frontend.family()).backend(*backend_id).is_none()
        {
            failed[*i] = Some(format!("its backend {backend_id} could not be written"));
        }
    }
    let commit = commit.retain(|i| failed[i].is_none());
    report.ops += commit.run(kernel, prog, &mut failed);
    // Best effort: an undo that fails leaves an entry no frontend points
    // at; the next gc removes it.
    let mut undo = Phase::default();
    for (i, ops) in rollback.into_iter().enumerate() {
        if failed[i].is_some() {
            for op in ops {
                undo.push(i, op);
            }
        }
    }
    undo.run(kernel, prog, &mut vec![None; failed.len()]);
    let after = after.retain(|i| failed[i].is_none());
    report.ops += after.run(kernel, prog, &mut failed);
    failed.into_iter().zip(owners).map(|(e, owner)| e.map(|e| format!("{owner}: {e}"))).collect()
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, net::IpAddr};

    use super::*;
    use crate::{
        diff::{FrontendValue, Op},
        maps,
        rand::XorShift,
        types::{Backend, Cidr, Family, Frontend, FrontendSpec, Proto, Settings},
    };

    /// The maps, in memory, with capacities and failure injection. A batch
    /// (`apply_all`) is applied one op at a time, in a shuffled order (the
    /// contract allows any order), and after every single op it checks the
    /// datapath invariant: every frontend's active slots exist and point at
    /// existing backends of its family, and its reverse-NAT entry is its own.
    struct Fake {
        frontends: BTreeMap<Frontend, FrontendValue>,
        slots: BTreeMap<(Frontend, u16), u32>,
        backends: BTreeMap<(Family, u32), Backend>,
        revnat: BTreeMap<(Family, u32), Frontend>,
        names: BTreeMap<(Family, u32), String>,
        /// `(family, frontend id, backend id)`.
        affinity: BTreeSet<(Family, u32, u32)>,
        /// `(frontend id, range)`; the range gives the family.
        ranges: BTreeSet<(u32, Cidr)>,
        node_addresses: BTreeSet<IpAddr>,
        /// Most service-map entries (frontends plus slots) per family.
        svc_capacity: usize,
        /// Most backends per family.
        backend_capacity: usize,
        /// A backend whose write fails.
        poisoned: Option<Backend>,
        /// Source-range deletes fail.
        stuck_ranges: bool,
        ops: usize,
        batches: usize,
        order: XorShift,
    }

    impl Fake {
        fn new(svc_capacity: usize) -> Self {
            Self {
                frontends: BTreeMap::new(),
                slots: BTreeMap::new(),
                backends: BTreeMap::new(),
                revnat: BTreeMap::new(),
                names: BTreeMap::new(),
                affinity: BTreeSet::new(),
                ranges: BTreeSet::new(),
                node_addresses: BTreeSet::new(),
                svc_capacity,
                backend_capacity: usize::MAX,
                poisoned: None,
                stuck_ranges: false,
                ops: 0,
                batches: 0,
                order: XorShift::new(0x9e37_79b9_7f4a_7c15),
            }
        }

        fn svc_entries(&self, fam: Family) -> usize {
            self.frontends.keys().filter(|f| f.family() == fam).count()
                + self.slots.keys().filter(|(f, _)| f.family() == fam).count()
        }

        fn full(&self, f: &Frontend, slot: u16) -> bool {
            let exists = if slot == 0 { self.frontends.contains_key(f) } else { self.slots.contains_key(&(*f, slot)) };
            !exists && self.svc_entries(f.family()) >= self.svc_capacity
        }

        /// What a packet to `f` can reach right now.
        fn reachable(&self, f: &Frontend) -> Vec<Backend> {
            let v = &self.frontends[f];
            (0..v.count)
                .map(|i| {
                    let id = self
                        .slots
                        .get(&(*f, v.slot_base + i))
                        .unwrap_or_else(|| panic!("{f}: active slot {} missing", v.slot_base + i));
                    *self.backends.get(&(f.family(), *id)).unwrap_or_else(|| panic!("{f}: backend {id} missing"))
                })
                .collect()
        }

        /// The source ranges of frontend `id` of `family`.
        fn ranges_of(&self, family: Family, id: u32) -> BTreeSet<Cidr> {
            self.ranges.iter().filter(|(i, c)| *i == id && c.family() == family).map(|(_, c)| *c).collect()
        }

        fn check(&self) {
            for (f, v) in &self.frontends {
                for b in self.reachable(f) {
                    assert_eq!(b.family(), f.family(), "{f}: cross-family backend");
                }
                assert_eq!(self.revnat.get(&(f.family(), v.rev_nat_id)), Some(f), "{f}: reverse-NAT entry");
                assert!(self.names.contains_key(&(f.family(), v.rev_nat_id)), "{f}: a name beside it");
                // Side tables are complete before slot 0 asks for them: a
                // client is never refused a range it is in, nor a sticky
                // backend of the active set.
                let ranges = self.ranges_of(f.family(), v.rev_nat_id);
                for c in &v.settings.source_ranges {
                    assert!(ranges.contains(c), "{f}: range {c} missing while slot 0 has it");
                }
                if v.settings.affinity_timeout.is_some() {
                    for i in 0..v.count {
                        let id = self.slots[&(*f, v.slot_base + i)];
                        assert!(
                            self.affinity.contains(&(f.family(), v.rev_nat_id, id)),
                            "{f}: active backend {id} without its affinity membership"
                        );
                    }
                }
            }
        }
    }

    fn full_err(what: String) -> maps::Error {
        maps::Error::Write { map: "SVC", op: "insert", object: what, detail: "the map is full".into() }
    }

    impl Kernel for Fake {
        fn apply_all(&mut self, ops: &[Op]) -> Vec<(usize, maps::Error)> {
            self.batches += 1;
            let mut order: Vec<usize> = (0..ops.len()).collect();
            for i in (1..order.len()).rev() {
                let j = self.order.below(u64::try_from(i + 1).expect("fits"));
                order.swap(i, usize::try_from(j).expect("below i + 1"));
            }
            order.into_iter().filter_map(|i| self.apply(&ops[i]).err().map(|e| (i, e))).collect()
        }
    }

    impl Fake {
        fn apply(&mut self, op: &Op) -> maps::Result<()> {
            match op {
                Op::PutBackend { id, backend } => {
                    let fam = backend.family();
                    let exists = self.backends.contains_key(&(fam, *id));
                    let full = self.backends.keys().filter(|(f, _)| *f == fam).count() >= self.backend_capacity;
                    if self.poisoned == Some(*backend) || (!exists && full) {
                        return Err(full_err(backend.to_string()));
                    }
                    self.backends.insert((fam, *id), *backend);
                }
                Op::DeleteBackend { id, backend } => {
                    self.backends.remove(&(backend.family(), *id));
                }
                Op::PutRevNat { id, frontend, owner } => {
                    self.names.insert((frontend.family(), *id), owner.clone());
                    self.revnat.insert((frontend.family(), *id), *frontend);
                }
                Op::ClearRevNat { id, family } => {
                    self.revnat.remove(&(*family, *id));
                    self.names.remove(&(*family, *id));
                }
                Op::PutSlot { frontend, slot, backend_id } => {
                    if self.full(frontend, *slot) {
                        return Err(full_err(format!("{frontend} slot {slot}")));
                    }
                    self.slots.insert((*frontend, *slot), *backend_id);
                }
                Op::DeleteSlot { frontend, slot } => {
                    self.slots.remove(&(*frontend, *slot));
                }
                Op::PutFrontend { frontend, value } => {
                    if self.full(frontend, 0) {
                        return Err(full_err(frontend.to_string()));
                    }
                    self.frontends.insert(*frontend, value.clone());
                }
                Op::DeleteFrontend { frontend } => {
                    self.frontends.remove(frontend);
                }
                Op::PutAffinityMatch { family, frontend_id, backend_id } => {
                    self.affinity.insert((*family, *frontend_id, *backend_id));
                }
                Op::DeleteAffinityMatch { family, frontend_id, backend_id } => {
                    self.affinity.remove(&(*family, *frontend_id, *backend_id));
                }
                Op::PutSourceRange { frontend_id, cidr } => {
                    self.ranges.insert((*frontend_id, *cidr));
                }
                Op::DeleteSourceRange { frontend_id, cidr } => {
                    if self.stuck_ranges {
                        return Err(full_err(format!("range {cidr}")));
                    }
                    self.ranges.remove(&(*frontend_id, *cidr));
                }
                Op::PutNodeAddress { addr } => {
                    self.node_addresses.insert(*addr);
                }
                Op::DeleteNodeAddress { addr } => {
                    self.node_addresses.remove(addr);
                }
            }
            self.ops += 1;
            self.check();
            Ok(())
        }
    }

    fn fe(vip: &str, port: u16) -> Frontend {
        Frontend::new(vip.parse().expect("ip"), port, Proto::Tcp)
    }

    fn be(addr: &str) -> Backend {
        Backend { addr: addr.parse::<IpAddr>().expect("ip"), port: 8080, proto: Proto::Tcp }
    }

    fn want(entries: &[(Frontend, &[&str])]) -> Desired {
        let mut d = Desired::default();
        for (f, bs) in entries {
            let backends = bs.iter().map(|b| be(b)).collect();
            d.frontends.insert(*f, FrontendSpec::new(format!("default/svc-{}:http", f.port), backends));
        }
        d
    }

    #[test]
    fn programs_swaps_and_removes_with_no_window_of_missing_backends() {
        let (mut k, mut prog) = (Fake::new(1000), Programmed::default());
        let a = fe("198.19.0.10", 80);
        let b = fe("fd00:ffff::a", 80);
        let states = [
            want(&[(a, &["198.18.2.2", "198.18.3.2"]), (b, &["fd00::2"])]),
            want(&[(a, &["198.18.3.2", "198.18.4.2", "198.18.5.2"]), (b, &[])]),
            want(&[(a, &["198.18.9.2"]), (b, &["fd00::3", "fd00::4"])]),
            want(&[(b, &["fd00::3"])]),
            want(&[]),
        ];
        for d in &states {
            let r = sync(&mut k, &mut prog, d);
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            for (f, spec) in &d.frontends {
                assert_eq!(k.reachable(f), spec.backends, "{f}");
                assert_eq!(prog.active_backends(f).as_ref(), Some(&spec.backends), "mirror of {f}");
            }
            assert_eq!(k.frontends.len(), d.frontends.len());
            let used: std::collections::BTreeSet<(Family, u32)> =
                k.slots.iter().map(|((f, _), id)| (f.family(), *id)).collect();
            assert_eq!(k.backends.len(), used.len(), "unused backends are collected");
        }
        assert!(k.slots.is_empty() && k.backends.is_empty() && k.revnat.is_empty(), "everything removed at the end");
        assert!(k.names.is_empty(), "names go with their reverse-NAT entries");
    }

    #[test]
    fn service_port_names_are_written_beside_the_reverse_nat_entry_and_follow_renames() {
        let (mut kernel, mut prog) = (Fake::new(1000), Programmed::default());
        let web = fe("198.19.0.10", 80);
        let api = fe("fd00:ffff::a", 443);
        let mut desired = want(&[(web, &["198.18.2.2"]), (api, &["fd00::2"])]);
        sync(&mut kernel, &mut prog, &desired);
        let name_of = |k: &Fake, f: &Frontend| k.names.get(&(f.family(), k.frontends[f].rev_nat_id)).cloned();
        assert_eq!(name_of(&kernel, &web).as_deref(), Some("default/svc-80:http"));
        assert_eq!(name_of(&kernel, &api).as_deref(), Some("default/svc-443:http"));
        // Another Service takes over the same address and port: one write
        // of the name, one of slot 0 (the owner is part of the frontend).
        desired.frontends.get_mut(&web).expect("web").owner = "other/svc:web".into();
        let before = kernel.ops;
        let report = sync(&mut kernel, &mut prog, &desired);
        assert_eq!((report.upserted, kernel.ops - before), (1, 2));
        assert_eq!(name_of(&kernel, &web).as_deref(), Some("other/svc:web"));
        assert_eq!(sync(&mut kernel, &mut prog, &desired).ops, 0, "the mirror knows the new name");
        // A frontend read back without a name (an older agent's pins) gets one.
        let id = prog.frontends[&api].rev_nat_id;
        prog.v6.names.remove(&id);
        kernel.names.remove(&(Family::V6, id));
        assert_eq!(sync(&mut kernel, &mut prog, &desired).upserted, 1);
        assert_eq!(name_of(&kernel, &api).as_deref(), Some("default/svc-443:http"));
    }

    #[test]
    fn an_unchanged_state_writes_nothing() {
        let (mut k, mut prog) = (Fake::new(1000), Programmed::default());
        let d = want(&[(fe("198.19.0.10", 80), &["198.18.2.2"])]);
        sync(&mut k, &mut prog, &d);
        let before = k.ops;
        let r = sync(&mut k, &mut prog, &d);
        assert_eq!((r.ops, k.ops), (0, before));
    }

    #[test]
    fn a_change_of_settings_only_is_one_write_of_slot_zero_and_of_its_side_entries() {
        use crate::types::{Kind, WhenEmpty};
        let (mut k, mut prog) = (Fake::new(1000), Programmed::default());
        let a = fe("198.19.0.10", 80);
        let mut d = want(&[(a, &["198.18.2.2", "198.18.3.2"])]);
        sync(&mut k, &mut prog, &d);
        // Writes besides slot 0: affinity on or off writes or deletes a
        // membership per backend, a range change one entry per range.
        for (settings, side) in [
            (Settings { affinity_timeout: Some(10_800), ..Settings::default() }, 2),
            (Settings { affinity_timeout: Some(30), ..Settings::default() }, 0),
            (Settings { kind: Kind::ExternalIp, when_empty: WhenEmpty::Drop, ..Settings::default() }, 2),
            (
                Settings {
                    kind: Kind::LoadBalancer,
                    source_ranges: vec![cidr("198.51.100.0/24")],
                    ..Settings::default()
                },
                1,
            ),
            (
                Settings {
                    kind: Kind::LoadBalancer,
                    source_ranges: vec![cidr("203.0.113.0/24")],
                    ..Settings::default()
                },
                2,
            ),
        ] {
            d.frontends.get_mut(&a).expect("a").settings = settings.clone();
            let before = k.ops;
            let r = sync(&mut k, &mut prog, &d);
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            assert_eq!((r.upserted, k.ops - before), (1, 1 + side), "writes for {settings:?}");
            assert_eq!(k.frontends[&a].settings, settings, "the kernel holds the new settings");
            assert_eq!(k.reachable(&a), d.frontends[&a].backends, "the backends are untouched");
            assert_eq!(sync(&mut k, &mut prog, &d).ops, 0, "and the mirror knows it: {settings:?}");
        }
    }

    #[test]
    fn the_new_generation_is_complete_before_the_flip() {
        let (mut k, mut prog) = (Fake::new(1000), Programmed::default());
        let a = fe("198.19.0.10", 80);
        sync(&mut k, &mut prog, &want(&[(a, &["198.18.2.2"])]));
        let step = diff::plan_upsert(
            &prog,
            &mut Reserved::default(),
            a,
            &want(&[(a, &["198.18.3.2", "198.18.4.2"])]).frontends[&a],
        )
        .expect("plan");
        let flip = step.ops.iter().position(|o| matches!(o, Op::PutFrontend { .. })).expect("flip");
        assert_eq!(flip, step.commit);
        let before: Vec<_> = step.ops[..flip].iter().collect();
        assert!(
            before.iter().filter(|o| matches!(o, Op::PutSlot { .. })).count() == 2,
            "both new slots before the flip: {step:?}"
        );
        assert!(
            step.ops[flip + 1..].iter().all(|o| matches!(o, Op::DeleteSlot { .. })),
            "only old slots go after the flip: {step:?}"
        );
    }

    #[test]
    fn a_full_map_rejects_the_frontend_that_does_not_fit_and_keeps_the_rest() {
        // Room for 5 entries per family: frontend `a` (1 + 2 slots) fits,
        // then `b` (1 + 3 slots) does not.
        let (mut k, mut prog) = (Fake::new(5), Programmed::default());
        let a = fe("198.19.0.10", 80);
        let b = fe("198.19.0.11", 80);
        let r = sync(
            &mut k,
            &mut prog,
            &want(&[(a, &["198.18.2.2", "198.18.3.2"]), (b, &["198.18.4.2", "198.18.5.2", "198.18.6.2"])]),
        );
        assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
        assert!(
            r.errors[0].contains("default/svc-80:http") && r.errors[0].contains("198.19.0.11:80/TCP"),
            "{}",
            r.errors[0]
        );
        assert_eq!(k.reachable(&a).len(), 2);
        assert!(!k.frontends.contains_key(&b), "the frontend that did not fit is not half-programmed");
        assert_eq!(k.svc_entries(Family::V4), 3, "its partial slots were rolled back");
        // Growing `a` beyond the capacity fails too, and `a` keeps its old backends.
        let r = sync(&mut k, &mut prog, &want(&[(a, &["198.18.2.2", "198.18.3.2", "198.18.7.2"])]));
        assert_eq!(r.errors.len(), 1);
        assert_eq!(k.reachable(&a), vec![be("198.18.2.2"), be("198.18.3.2")], "what was programmed stays");
        assert_eq!(prog.active_backends(&a), Some(k.reachable(&a)), "the mirror agrees with the maps");
    }

    /// Each frontend present with probability 3/4, each backend of its
    /// family's pool with 1/2.
    fn random_desired(rng: &mut XorShift, frontends: &[Frontend], pool4: &[String], pool6: &[String]) -> Desired {
        let mut d = Desired::default();
        for f in frontends {
            if rng.below(4) == 0 {
                continue;
            }
            let pool = if f.family() == Family::V4 { pool4 } else { pool6 };
            let mut backends: Vec<Backend> = pool.iter().filter(|_| rng.below(2) == 0).map(|a| be(a)).collect();
            backends.sort();
            d.frontends.insert(*f, FrontendSpec::new(f.to_string(), backends));
        }
        d
    }

    #[test]
    fn random_sequences_keep_the_invariant_and_converge() {
        let frontends = [fe("198.19.0.10", 80), fe("198.19.0.10", 443), fe("fd00:ffff::a", 80)];
        let pool4: Vec<String> = (2..10).map(|i| format!("198.18.{i}.2")).collect();
        let pool6: Vec<String> = (2..10).map(|i| format!("fd00::{i}")).collect();
        let mut rng = XorShift::new(0x2545_f491_4f6c_dd1d);
        let (mut k, mut prog) = (Fake::new(10_000), Programmed::default());
        for _ in 0..300 {
            let d = random_desired(&mut rng, &frontends, &pool4, &pool6);
            let r = sync(&mut k, &mut prog, &d);
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            for (f, spec) in &d.frontends {
                assert_eq!(k.reachable(f), spec.backends);
            }
            assert_eq!(k.frontends.len(), d.frontends.len());
        }
    }

    #[test]
    fn a_new_backend_that_fails_keeps_every_frontend_using_it_unprogrammed() {
        // `a` and `b` share the new backend .2.2, whose write fails: planned
        // together, `a` writes it and `b` only points at it, so `b` must not
        // commit either. `c` does not use it and lands.
        let (mut k, mut prog) = (Fake::new(1000), Programmed::default());
        k.poisoned = Some(be("198.18.2.2"));
        let (shared_a, shared_b, other) = (fe("198.19.0.10", 80), fe("198.19.0.11", 80), fe("198.19.0.12", 80));
        let d =
            want(&[(shared_a, &["198.18.2.2"]), (shared_b, &["198.18.2.2", "198.18.3.2"]), (other, &["198.18.3.2"])]);
        let r = sync(&mut k, &mut prog, &d);
        assert_eq!(r.errors.len(), 2, "{:?}", r.errors);
        for f in [shared_a, shared_b] {
            assert!(r.errors.iter().any(|e| e.contains(&f.to_string())), "{f} is named: {:?}", r.errors);
            assert!(!k.frontends.contains_key(&f) && !prog.frontends.contains_key(&f), "{f} is not programmed");
        }
        assert_eq!(k.reachable(&other), vec![be("198.18.3.2")]);
        assert!(k.slots.keys().all(|(f, _)| *f == other), "the failed frontends' slots were rolled back");
        // Once the backend can be written, the next full pass converges.
        k.poisoned = None;
        let r = sync(&mut k, &mut prog, &d);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        for (f, spec) in &d.frontends {
            assert_eq!(k.reachable(f), spec.backends, "{f}");
        }
    }

    #[test]
    fn many_frontends_are_written_in_a_few_batches() {
        let (mut k, mut prog) = (Fake::new(100_000), Programmed::default());
        let pool: Vec<String> = (2..12).map(|i| format!("198.18.{i}.2")).collect();
        let mut entries: Vec<(Frontend, Vec<&str>)> = Vec::new();
        for i in 0..300u16 {
            let backends = pool.iter().skip(usize::from(i % 5)).take(4).map(String::as_str).collect();
            entries.push((fe(&format!("198.19.{}.{}", i / 200, i % 200), 80), backends));
        }
        let entries: Vec<(Frontend, &[&str])> = entries.iter().map(|(f, b)| (*f, b.as_slice())).collect();
        let d = want(&entries);
        let r = sync(&mut k, &mut prog, &d);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.upserted, 300);
        assert!(k.batches <= 4, "300 frontends took {} batches", k.batches);
        for (f, spec) in &d.frontends {
            assert_eq!(k.reachable(f), spec.backends, "{f}");
        }
    }

    #[test]
    fn the_incremental_path_converges_like_the_full_one_and_collects_backends() {
        let frontends = [fe("198.19.0.10", 80), fe("198.19.0.11", 80), fe("fd00:ffff::a", 80)];
        let pool4: Vec<String> = (2..8).map(|i| format!("198.18.{i}.2")).collect();
        let pool6: Vec<String> = (2..8).map(|i| format!("fd00::{i}")).collect();
        let mut rng = XorShift::new(0x0bad_cafe_f00d_d00d);
        let (mut k, mut prog) = (Fake::new(10_000), Programmed::default());
        let mut before = Desired::default();
        for _ in 0..300 {
            let d = random_desired(&mut rng, &frontends, &pool4, &pool6);
            let dirty: BTreeSet<Frontend> =
                frontends.iter().filter(|f| before.frontends.get(f) != d.frontends.get(f)).copied().collect();
            let r = sync_dirty(&mut k, &mut prog, &d, &dirty);
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            for (f, spec) in &d.frontends {
                assert_eq!(k.reachable(f), spec.backends);
            }
            assert_eq!(k.frontends.len(), d.frontends.len());
            let used: std::collections::BTreeSet<(Family, u32)> =
                k.slots.iter().map(|((f, _), id)| (f.family(), *id)).collect();
            assert_eq!(k.backends.len(), used.len(), "backends without slots are collected incrementally");
            before = d;
        }
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("cidr")
    }

    /// What the fake's side tables hold for `f`: its affinity memberships
    /// (as backends) and its source ranges.
    fn sides_of(k: &Fake, f: &Frontend) -> (BTreeSet<Backend>, BTreeSet<Cidr>) {
        let v = &k.frontends[f];
        let members = k
            .affinity
            .iter()
            .filter(|(fam, id, _)| *fam == f.family() && *id == v.rev_nat_id)
            .map(|(fam, _, b)| k.backends[&(*fam, *b)])
            .collect();
        (members, k.ranges_of(f.family(), v.rev_nat_id))
    }

    /// Random backends and settings (affinity on or off, a subset of a few
    /// source ranges) per frontend; after every op the fake checks that
    /// slot 0 never asks for a side entry that is missing, after every pass
    /// the side tables hold exactly what the settings say, and a second pass
    /// writes nothing.
    #[test]
    fn side_tables_follow_settings_and_backends_make_before_break() {
        let frontends = [fe("198.19.0.10", 80), fe("198.19.0.11", 80), fe("fd00:ffff::a", 80)];
        let pool4: Vec<String> = (2..8).map(|i| format!("198.18.{i}.2")).collect();
        let pool6: Vec<String> = (2..8).map(|i| format!("fd00::{i}")).collect();
        let ranges4 = [cidr("198.18.0.0/15"), cidr("198.51.100.0/24"), cidr("0.0.0.0/0")];
        let ranges6 = [cidr("fd00::/8"), cidr("2001:db8::/32")];
        let mut rng = XorShift::new(0x005e_ed0f_a117_ab1e);
        let (mut k, mut prog) = (Fake::new(10_000), Programmed::default());
        for round in 0..300 {
            let mut d = random_desired(&mut rng, &frontends, &pool4, &pool6);
            for (f, spec) in &mut d.frontends {
                let pool: &[Cidr] = if f.family() == Family::V4 { &ranges4 } else { &ranges6 };
                let mut ranges: Vec<Cidr> = pool.iter().filter(|_| rng.below(2) == 0).copied().collect();
                ranges.sort();
                let affinity = [None, Some(30), Some(10_800)][usize::try_from(rng.below(3)).expect("small")];
                spec.settings = Settings { affinity_timeout: affinity, source_ranges: ranges, ..Settings::default() };
            }
            let r = if round % 2 == 0 {
                sync(&mut k, &mut prog, &d)
            } else {
                sync_dirty(&mut k, &mut prog, &d, &frontends.iter().copied().collect())
            };
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            for (f, spec) in &d.frontends {
                let (members, ranges) = sides_of(&k, f);
                let want: BTreeSet<Backend> = if spec.settings.affinity_timeout.is_some() {
                    spec.backends.iter().copied().collect()
                } else {
                    BTreeSet::new()
                };
                assert_eq!(members, want, "{f}: affinity memberships in round {round}");
                assert_eq!(ranges, spec.settings.source_ranges.iter().copied().collect(), "{f}: ranges");
            }
            let ids: BTreeSet<(Family, u32)> = k.frontends.iter().map(|(f, v)| (f.family(), v.rev_nat_id)).collect();
            assert!(
                k.affinity.iter().all(|(fam, id, _)| ids.contains(&(*fam, *id))),
                "no membership of a gone frontend"
            );
            assert!(k.ranges.iter().all(|(id, c)| ids.contains(&(c.family(), *id))), "no range of a gone frontend");
            assert_eq!(sync(&mut k, &mut prog, &d).ops, 0, "round {round}: the mirror knows the side tables");
        }
    }

    #[test]
    fn a_change_of_the_affinity_timeout_alone_is_one_write_and_its_memberships_stay() {
        let (mut k, mut prog) = (Fake::new(1000), Programmed::default());
        let a = fe("198.19.0.10", 80);
        let mut d = want(&[(a, &["198.18.2.2", "198.18.3.2"])]);
        d.frontends.get_mut(&a).expect("a").settings.affinity_timeout = Some(10_800);
        let r = sync(&mut k, &mut prog, &d);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(sides_of(&k, &a).0.len(), 2, "a membership per backend");
        d.frontends.get_mut(&a).expect("a").settings.affinity_timeout = Some(5);
        let before = k.ops;
        let r = sync(&mut k, &mut prog, &d);
        assert_eq!((r.upserted, k.ops - before), (1, 1), "only slot 0");
        assert_eq!(k.frontends[&a].settings.affinity_timeout, Some(5));
    }

    #[test]
    fn node_addresses_follow_the_desired_state_on_both_paths() {
        let (mut k, mut prog) = (Fake::new(1000), Programmed::default());
        let ips = |list: &[&str]| -> Vec<IpAddr> { list.iter().map(|a| a.parse().expect("ip")).collect() };
        let mut d = want(&[]);
        d.nodeport_addresses = ips(&["198.18.251.2", "fd00:0:0:fb::2"]);
        assert!(sync(&mut k, &mut prog, &d).errors.is_empty());
        assert_eq!(k.node_addresses, d.nodeport_addresses.iter().copied().collect());
        assert_eq!(sync(&mut k, &mut prog, &d).ops, 0, "unchanged: nothing written");
        d.nodeport_addresses = ips(&["198.18.250.1", "fd00:0:0:fb::2"]);
        let r = sync_dirty(&mut k, &mut prog, &d, &BTreeSet::new());
        assert_eq!((r.ops, r.errors.len()), (2, 0), "one put, one delete, with no frontend dirty");
        assert_eq!(k.node_addresses, d.nodeport_addresses.iter().copied().collect());
    }

    #[test]
    fn a_frontend_id_taken_over_never_inherits_source_ranges_left_behind() {
        let (mut k, mut prog) = (Fake::new(1000), Programmed::default());
        let (gone, taker) = (fe("198.19.0.10", 80), fe("198.19.0.11", 80));
        let mut first = want(&[(gone, &["198.18.2.2"])]);
        first.frontends.get_mut(&gone).expect("gone").settings.source_ranges = vec![cidr("198.51.100.0/24")];
        assert!(sync(&mut k, &mut prog, &first).errors.is_empty());
        let id = k.frontends[&gone].rev_nat_id;
        // `gone` goes, but its range cannot be deleted; `taker` takes its id.
        k.stuck_ranges = true;
        let r = sync(&mut k, &mut prog, &want(&[]));
        assert_eq!(r.errors.len(), 2, "the removal and the clean-up report the stuck range: {:?}", r.errors);
        assert!(k.ranges.contains(&(id, cidr("198.51.100.0/24"))), "left behind");
        k.stuck_ranges = false;
        let second = want(&[(taker, &["198.18.2.2"])]);
        let r = sync_dirty(&mut k, &mut prog, &second, &BTreeSet::from([taker]));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(k.frontends[&taker].rev_nat_id, id, "the lowest free id");
        assert!(k.ranges.is_empty(), "removed before the new frontend could meet it");
    }
}
