//! Desired vs programmed state, turned into map operations. Pure.
//!
//! `Programmed` mirrors the maps exactly (it is rebuilt from them at start,
//! and every operation the kernel accepted is folded into it with
//! `Programmed::apply`). Planning never mutates it: a `Step` lists the
//! operations for one frontend in make-before-break order:
//!
//! 1. new backends (`PutBackend`), and a reverse-NAT entry for a new frontend;
//! 2. the complete backend list in the frontend's *inactive* slot generation;
//! 3. one write of the frontend (slot 0) that flips count and generation:
//!    the switch is atomic for the datapath;
//! 4. deletion of the old generation's slots.
//!
//! Side tables keyed by the frontend's id follow the same order: session
//! affinity memberships (`(frontend id, backend id)`, for frontends with
//! ClientIP affinity) and source ranges are added before the flip and
//! removed after it, so the datapath never sees a frontend whose flags ask
//! for an entry that is not there yet (for source ranges, during a change
//! the union of the old and new ranges is admitted, never less than
//! either). The node addresses NodePorts answer on are one more table,
//! planned on their own (`plan_node_addresses`).
//!
//! Backends are deleted only by `plan_gc`, once no slot references them.
//! Many steps can be planned against one mirror before any is applied
//! (`Reserved` hands out fresh ids), which is what lets `sync` batch them.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    hash::BuildHasher as _,
    net::IpAddr,
};

use hashbrown::HashTable;

use proxy_common::{MAX_BACKENDS_PER_SVC, SLOT_GEN_A, SLOT_GEN_B};

use crate::types::{Backend, Cidr, Desired, Family, Frontend, FrontendSpec, Settings};

/// Slot 0 of a frontend: its active generation and its settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendValue {
    pub count: u16,
    pub slot_base: u16,
    pub rev_nat_id: u32,
    pub settings: Settings,
}

/// One map write or delete. Ids are per family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend {
        id: u32,
        backend: Backend,
    },
    DeleteBackend {
        id: u32,
        backend: Backend,
    },
    /// The reverse-NAT entry of a frontend, and the name of its Service
    /// port (`namespace/name:port`), kept beside it for restarts and
    /// `dsproxy inspect`.
    PutRevNat {
        id: u32,
        frontend: Frontend,
        owner: String,
    },
    ClearRevNat {
        id: u32,
        family: Family,
    },
    PutSlot {
        frontend: Frontend,
        slot: u16,
        backend_id: u32,
    },
    DeleteSlot {
        frontend: Frontend,
        slot: u16,
    },
    PutFrontend {
        frontend: Frontend,
        value: FrontendValue,
    },
    DeleteFrontend {
        frontend: Frontend,
    },
    /// Backend `backend_id` is in the active set of frontend `frontend_id`:
    /// the datapath keeps a client on its sticky backend only while this
    /// entry exists (session affinity).
    PutAffinityMatch {
        family: Family,
        frontend_id: u32,
        backend_id: u32,
    },
    DeleteAffinityMatch {
        family: Family,
        frontend_id: u32,
        backend_id: u32,
    },
    /// A source range of frontend `frontend_id` (`loadBalancerSourceRanges`).
    PutSourceRange {
        frontend_id: u32,
        cidr: Cidr,
    },
    DeleteSourceRange {
        frontend_id: u32,
        cidr: Cidr,
    },
    /// A node address NodePort frontends answer on.
    PutNodeAddress {
        addr: IpAddr,
    },
    DeleteNodeAddress {
        addr: IpAddr,
    },
}

impl Op {
    /// The family of the maps it writes.
    pub fn family(&self) -> Family {
        match self {
            Op::PutBackend { backend, .. } | Op::DeleteBackend { backend, .. } => backend.family(),
            Op::PutRevNat { frontend, .. }
            | Op::PutSlot { frontend, .. }
            | Op::DeleteSlot { frontend, .. }
            | Op::PutFrontend { frontend, .. }
            | Op::DeleteFrontend { frontend } => frontend.family(),
            Op::ClearRevNat { family, .. }
            | Op::PutAffinityMatch { family, .. }
            | Op::DeleteAffinityMatch { family, .. } => *family,
            Op::PutSourceRange { cidr, .. } | Op::DeleteSourceRange { cidr, .. } => cidr.family(),
            Op::PutNodeAddress { addr } | Op::DeleteNodeAddress { addr } => Family::of(*addr),
        }
    }
}

/// What a step is for, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// A Service port (`ns/name:port`) and the frontend it programs.
    Port(String, Frontend),
    Removed(Frontend),
    /// The node addresses NodePorts answer on.
    NodeAddresses,
    GarbageCollection,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Port(port, frontend) => write!(f, "{port} ({frontend})"),
            Owner::Removed(frontend) => write!(f, "removed frontend {frontend}"),
            Owner::NodeAddresses => f.write_str("node addresses for NodePorts"),
            Owner::GarbageCollection => f.write_str("garbage collection"),
        }
    }
}

/// A hash map with a fast, per-process seeded hash (foldhash): the
/// mirror's tables are looked up once or twice per map operation.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The operations for one frontend (or one clean-up), in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// What the step is for (formatted only for messages).
    pub owner: Owner,
    pub ops: Vec<Op>,
    /// Ops at index `< commit` can be undone by `rollback`; the op at
    /// `commit` makes the step visible; after it, failures leave garbage
    /// for the next clean-up but never a broken frontend.
    pub commit: usize,
    pub rollback: Vec<Op>,
}

/// Lowest-free id allocator; ids start at 1 (0 means "none"). O(log n):
/// ids below `next` that are not in use sit in `free`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdAlloc {
    next: u32,
    free: BTreeSet<u32>,
}

impl Default for IdAlloc {
    fn default() -> Self {
        Self { next: 1, free: BTreeSet::new() }
    }
}

impl IdAlloc {
    /// Take the lowest free id.
    pub fn take_lowest(&mut self) -> u32 {
        let id = self.free.first().copied().unwrap_or(self.next);
        self.take(id);
        id
    }

    pub fn take(&mut self, id: u32) {
        if id >= self.next {
            self.free.extend(self.next..id);
            self.next = id + 1;
        } else {
            self.free.remove(&id);
        }
    }

    pub fn free(&mut self, id: u32) {
        if id < self.next {
            self.free.insert(id);
        }
    }
}

/// A backend id's entry: the backend (if written) and the number of slots
/// (of any generation) that point at the id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct BackendEntry {
    backend: Option<Backend>,
    refs: u32,
}

/// Per-family bookkeeping.
#[derive(Clone, Debug, Default)]
pub struct FamilyState {
    pub backend_ids: IdAlloc,
    pub rev_nat_ids: IdAlloc,
    /// Backend id -> its entry.
    backends: FastMap<u32, BackendEntry>,
    /// The ids of the written backends, found by backend: 5 bytes a
    /// backend where a map from backend to id would take 25.
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    /// Backends whose last reference went since the last gc: candidates
    /// for `plan_gc_freed`.
    pub freed: Vec<u32>,
    /// Reverse-NAT id -> the Service port name written beside it.
    pub names: FastMap<u32, String>,
    /// Frontend id -> the backend ids of its affinity memberships.
    pub affinity: FastMap<u32, BTreeSet<u32>>,
    /// Frontend id -> its source ranges.
    pub ranges: FastMap<u32, BTreeSet<Cidr>>,
}

impl PartialEq for FamilyState {
    fn eq(&self, other: &Self) -> bool {
        // `index` is a function of `backends`.
        self.backend_ids == other.backend_ids
            && self.rev_nat_ids == other.rev_nat_ids
            && self.backends == other.backends
            && self.freed == other.freed
            && self.names == other.names
            && self.affinity == other.affinity
            && self.ranges == other.ranges
    }
}

impl Eq for FamilyState {}

impl FamilyState {
    /// The backend written under `id`.
    pub fn backend(&self, id: u32) -> Option<&Backend> {
        self.backends.get(&id)?.backend.as_ref()
    }

    /// Every written backend, by id, in no particular order.
    pub fn backends(&self) -> impl Iterator<Item = (u32, &Backend)> {
        self.backends.iter().filter_map(|(id, e)| Some((*id, e.backend.as_ref()?)))
    }

    /// The id of backend `b`, if written.
    pub fn id_of(&self, b: &Backend) -> Option<u32> {
        let backends = &self.backends;
        self.index
            .find(self.hasher.hash_one(b), |id| backends.get(id).is_some_and(|e| e.backend.as_ref() == Some(b)))
            .copied()
    }

    /// Slots pointing at `id`.
    pub fn refs(&self, id: u32) -> u32 {
        self.backends.get(&id).map_or(0, |e| e.refs)
    }

    fn put_backend(&mut self, id: u32, b: Backend) {
        self.backend_ids.take(id);
        let entry = self.backends.entry(id).or_default();
        let old = entry.backend.replace(b);
        if let Some(old) = old {
            let hash = self.hasher.hash_one(old);
            if let Ok(found) = self.index.find_entry(hash, |i| *i == id) {
                found.remove();
            }
        }
        let (backends, hasher) = (&self.backends, &self.hasher);
        self.index.insert_unique(self.hasher.hash_one(b), id, |i| {
            hasher.hash_one(backends.get(i).and_then(|e| e.backend).expect("indexed ids are written"))
        });
    }

    fn delete_backend(&mut self, id: u32) {
        self.backend_ids.free(id);
        if let Some(BackendEntry { backend: Some(b), .. }) = self.backends.remove(&id)
            && let Ok(found) = self.index.find_entry(self.hasher.hash_one(b), |i| *i == id)
        {
            found.remove();
        }
    }

    fn add_ref(&mut self, id: u32) {
        self.backends.entry(id).or_default().refs += 1;
    }

    fn unref(&mut self, id: u32) {
        if let Some(e) = self.backends.get_mut(&id) {
            e.refs = e.refs.saturating_sub(1);
            if e.refs == 0 {
                if e.backend.is_none() {
                    self.backends.remove(&id);
                } else {
                    self.freed.push(id);
                }
            }
        }
    }
}

/// The maps' content, as the agent knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    pub frontends: FastMap<Frontend, FrontendValue>,
    /// Every backend slot in the maps, both generations.
    pub slots: FastMap<Frontend, BTreeMap<u16, u32>>,
    /// The node addresses NodePorts answer on, both families.
    pub node_addresses: BTreeSet<IpAddr>,
    pub v4: FamilyState,
    pub v6: FamilyState,
}

impl Programmed {
    pub fn family(&self, f: Family) -> &FamilyState {
        match f {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    fn family_mut(&mut self, f: Family) -> &mut FamilyState {
        match f {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    /// The backends of `frontend`'s active generation, in slot order.
    pub fn active_backends(&self, frontend: &Frontend) -> Option<Vec<Backend>> {
        let fam = self.family(frontend.family());
        self.active_ids(frontend)?.map(|id| fam.backend(id?).copied()).collect()
    }

    /// The backend ids of `frontend`'s active generation, in slot order
    /// (`None` for a slot that is missing).
    fn active_ids(&self, frontend: &Frontend) -> Option<impl Iterator<Item = Option<u32>>> {
        let value = self.frontends.get(frontend)?;
        let slots = self.slots.get(frontend);
        Some((0..value.count).map(move |i| slots?.get(&(value.slot_base + i)).copied()))
    }

    /// Fold an operation the kernel accepted into the mirror.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend { id, backend } => self.family_mut(backend.family()).put_backend(*id, *backend),
            Op::DeleteBackend { id, backend } => self.family_mut(backend.family()).delete_backend(*id),
            Op::PutRevNat { id, frontend, owner } => {
                let fam = self.family_mut(frontend.family());
                fam.rev_nat_ids.take(*id);
                fam.names.insert(*id, owner.clone());
            }
            Op::ClearRevNat { id, family } => {
                let fam = self.family_mut(*family);
                fam.rev_nat_ids.free(*id);
                fam.names.remove(id);
            }
            Op::PutSlot { frontend, slot, backend_id } => {
                let old = self.slots.entry(*frontend).or_default().insert(*slot, *backend_id);
                let fam = self.family_mut(frontend.family());
                if let Some(old) = old {
                    fam.unref(old);
                }
                fam.add_ref(*backend_id);
            }
            Op::DeleteSlot { frontend, slot } => {
                let Some(slots) = self.slots.get_mut(frontend) else { return };
                let old = slots.remove(slot);
                if slots.is_empty() {
                    self.slots.remove(frontend);
                }
                if let Some(old) = old {
                    self.family_mut(frontend.family()).unref(old);
                }
            }
            Op::PutFrontend { frontend, value } => {
                self.frontends.insert(*frontend, value.clone());
            }
            Op::DeleteFrontend { frontend } => {
                self.frontends.remove(frontend);
            }
            Op::PutAffinityMatch { family, frontend_id, backend_id } => {
                self.family_mut(*family).affinity.entry(*frontend_id).or_default().insert(*backend_id);
            }
            Op::DeleteAffinityMatch { family, frontend_id, backend_id } => {
                remove_member(&mut self.family_mut(*family).affinity, *frontend_id, backend_id);
            }
            Op::PutSourceRange { frontend_id, cidr } => {
                self.family_mut(cidr.family()).ranges.entry(*frontend_id).or_default().insert(*cidr);
            }
            Op::DeleteSourceRange { frontend_id, cidr } => {
                remove_member(&mut self.family_mut(cidr.family()).ranges, *frontend_id, cidr);
            }
            Op::PutNodeAddress { addr } => {
                self.node_addresses.insert(*addr);
            }
            Op::DeleteNodeAddress { addr } => {
                self.node_addresses.remove(addr);
            }
        }
    }
}

/// Remove `member` from the set of `id`, and the set once empty.
fn remove_member<T: Ord>(sets: &mut FastMap<u32, BTreeSet<T>>, id: u32, member: &T) {
    if let Some(set) = sets.get_mut(&id) {
        set.remove(member);
        if set.is_empty() {
            sets.remove(&id);
        }
    }
}

/// What must change for the maps to match `desired`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    Upsert(Frontend, &'a FrontendSpec),
    Remove(Frontend),
}

/// Is `frontend` programmed exactly as `spec` says: same settings, same
/// name, same backends in the active generation, side tables in step?
fn up_to_date(prog: &Programmed, frontend: &Frontend, spec: &FrontendSpec) -> bool {
    prog.frontends.get(frontend).is_some_and(|v| {
        v.settings == spec.settings && named(prog, frontend, v, &spec.owner) && sides_match(prog, frontend, v)
    }) && prog.active_backends(frontend).as_deref() == Some(spec.backends.as_slice())
}

/// Do the side tables of the programmed `frontend` hold what its settings
/// (`v`) and active backends ask for, and nothing else?
fn sides_match(prog: &Programmed, frontend: &Frontend, v: &FrontendValue) -> bool {
    let fam = prog.family(frontend.family());
    let want = &v.settings.source_ranges;
    let ranges = fam
        .ranges
        .get(&v.rev_nat_id)
        .map_or(want.is_empty(), |have| have.len() == want.len() && want.iter().all(|c| have.contains(c)));
    let members = fam.affinity.get(&v.rev_nat_id);
    let affinity = if v.settings.affinity_timeout.is_none() {
        members.is_none()
    } else {
        let mut n = 0;
        let all_members = prog.active_ids(frontend).into_iter().flatten().all(|id| {
            n += 1;
            matches!((id, members), (Some(id), Some(m)) if m.contains(&id))
        });
        all_members && members.map_or(0, BTreeSet::len) == n
    };
    ranges && affinity
}

/// The side-table writes that bring frontend `id` (of `family`) from what
/// the mirror holds to `settings` over backend ids `ids`.
#[derive(Default)]
struct Sides {
    /// Entries to add, before the flip (undone by `rollback`).
    add: Vec<Op>,
    rollback: Vec<Op>,
    /// Entries to remove.
    remove: Vec<Op>,
}

fn sides(prog: &Programmed, family: Family, id: u32, settings: &Settings, ids: &[u32]) -> Sides {
    let fam = prog.family(family);
    let mut out = Sides::default();
    let empty = BTreeSet::new();
    let have = fam.ranges.get(&id).unwrap_or(&empty);
    for cidr in settings.source_ranges.iter().filter(|c| !have.contains(c)) {
        out.add.push(Op::PutSourceRange { frontend_id: id, cidr: *cidr });
        out.rollback.push(Op::DeleteSourceRange { frontend_id: id, cidr: *cidr });
    }
    for cidr in have.iter().filter(|c| !settings.source_ranges.contains(c)) {
        out.remove.push(Op::DeleteSourceRange { frontend_id: id, cidr: *cidr });
    }
    let empty = BTreeSet::new();
    let have = fam.affinity.get(&id).unwrap_or(&empty);
    let want: BTreeSet<u32> =
        if settings.affinity_timeout.is_some() { ids.iter().copied().collect() } else { BTreeSet::new() };
    for backend_id in want.iter().filter(|b| !have.contains(b)) {
        out.add.push(Op::PutAffinityMatch { family, frontend_id: id, backend_id: *backend_id });
        out.rollback.push(Op::DeleteAffinityMatch { family, frontend_id: id, backend_id: *backend_id });
    }
    for backend_id in have.iter().filter(|b| !want.contains(b)) {
        out.remove.push(Op::DeleteAffinityMatch { family, frontend_id: id, backend_id: *backend_id });
    }
    out
}

/// Does the programmed frontend carry the name `owner`?
fn named(prog: &Programmed, frontend: &Frontend, v: &FrontendValue, owner: &str) -> bool {
    prog.family(frontend.family()).names.get(&v.rev_nat_id).is_some_and(|n| n == owner)
}

/// Frontends to write (new, or with other settings or backends) and to remove.
pub fn changes<'a>(prog: &Programmed, desired: &'a Desired) -> Vec<Change<'a>> {
    let mut out = Vec::new();
    for (f, spec) in &desired.frontends {
        if !up_to_date(prog, f, spec) {
            out.push(Change::Upsert(*f, spec));
        }
    }
    for f in prog.frontends.keys() {
        if !desired.frontends.contains_key(f) {
            out.push(Change::Remove(*f));
        }
    }
    out
}

/// Like `changes`, for the frontends in `dirty` only: the incremental path,
/// whose cost follows what changed.
pub fn changes_in<'a>(prog: &Programmed, desired: &'a Desired, dirty: &BTreeSet<Frontend>) -> Vec<Change<'a>> {
    dirty
        .iter()
        .filter_map(|f| match desired.frontends.get(f) {
            Some(spec) if !up_to_date(prog, f, spec) => Some(Change::Upsert(*f, spec)),
            Some(_) => None,
            None => prog.frontends.contains_key(f).then_some(Change::Remove(*f)),
        })
        .collect()
}

/// Ids handed to steps that are planned but not applied yet, so that many
/// steps can be planned against the same mirror and applied together: no
/// two of them take the same fresh id, and a new backend two of them use is
/// written once, by the first.
#[derive(Debug, Default)]
pub struct Reserved {
    /// New backends (not in the mirror) and the id given to them.
    backends: FastMap<Backend, u32>,
    /// Per family: backend and reverse-NAT ids, from the mirror's on first use.
    ids: [Option<(IdAlloc, IdAlloc)>; 2],
}

impl Reserved {
    fn ids(&mut self, prog: &Programmed, family: Family) -> &mut (IdAlloc, IdAlloc) {
        let slot = match family {
            Family::V4 => 0,
            Family::V6 => 1,
        };
        self.ids[slot].get_or_insert_with(|| {
            let fam = prog.family(family);
            (fam.backend_ids.clone(), fam.rev_nat_ids.clone())
        })
    }

    /// The id of backend `b`, and whether this step must write it.
    fn backend(&mut self, prog: &Programmed, b: &Backend) -> (u32, bool) {
        if let Some(id) = prog.family(b.family()).id_of(b).or_else(|| self.backends.get(b).copied()) {
            return (id, false);
        }
        let id = self.ids(prog, b.family()).0.take_lowest();
        self.backends.insert(*b, id);
        (id, true)
    }

    fn rev_nat(&mut self, prog: &Programmed, family: Family) -> u32 {
        self.ids(prog, family).1.take_lowest()
    }
}

/// Plan writing `spec` to `frontend`, make-before-break. When only the
/// settings differ, slot 0 is rewritten in place (one atomic write). Fresh
/// ids come from `reserved` (see `Reserved`).
pub fn plan_upsert(
    prog: &Programmed,
    reserved: &mut Reserved,
    frontend: Frontend,
    spec: &FrontendSpec,
) -> Result<Step, String> {
    let owner = Owner::Port(spec.owner.clone(), frontend);
    let count = u16::try_from(spec.backends.len()).ok().filter(|n| *n <= MAX_BACKENDS_PER_SVC).ok_or_else(|| {
        format!("{owner}: {} backends, more than the {MAX_BACKENDS_PER_SVC} one frontend can hold", spec.backends.len())
    })?;
    let existing = prog.frontends.get(&frontend);
    // A frontend whose Service port changed name (or that was pinned by an
    // agent that wrote no names) gets its name rewritten in place.
    let rename = existing.filter(|v| !named(prog, &frontend, v, &spec.owner)).map(|v| Op::PutRevNat {
        id: v.rev_nat_id,
        frontend,
        owner: spec.owner.clone(),
    });
    let family = frontend.family();
    if let Some(v) = existing
        && prog.active_backends(&frontend).as_deref() == Some(spec.backends.as_slice())
    {
        let ids: Vec<u32> = prog.active_ids(&frontend).into_iter().flatten().flatten().collect();
        let side = sides(prog, family, v.rev_nat_id, &spec.settings, &ids);
        let value = FrontendValue { settings: spec.settings.clone(), ..v.clone() };
        let mut ops: Vec<Op> = rename.into_iter().chain(side.add).collect();
        let commit = ops.len();
        ops.push(Op::PutFrontend { frontend, value });
        ops.extend(side.remove);
        return Ok(Step { owner, ops, commit, rollback: side.rollback });
    }
    let mut ops = Vec::with_capacity(2 * spec.backends.len() + 3);
    ops.extend(rename);
    let mut ids = Vec::with_capacity(spec.backends.len());
    for b in &spec.backends {
        let (id, new) = reserved.backend(prog, b);
        if new {
            ops.push(Op::PutBackend { id, backend: *b });
        }
        ids.push(id);
    }

    let rev_nat_id = if let Some(v) = existing {
        v.rev_nat_id
    } else {
        let id = reserved.rev_nat(prog, family);
        ops.push(Op::PutRevNat { id, frontend, owner: spec.owner.clone() });
        id
    };
    let slot_base = match existing {
        Some(v) if v.slot_base == SLOT_GEN_A => SLOT_GEN_B,
        _ => SLOT_GEN_A,
    };
    let mut rollback = Vec::new();
    for (i, id) in (0u16..).zip(&ids) {
        ops.push(Op::PutSlot { frontend, slot: slot_base + i, backend_id: *id });
        rollback.push(Op::DeleteSlot { frontend, slot: slot_base + i });
    }
    let side = sides(prog, family, rev_nat_id, &spec.settings, &ids);
    ops.extend(side.add);
    rollback.extend(side.rollback);
    if existing.is_none() {
        // A fresh id: nothing can reach its entries yet, and leftovers of
        // an earlier holder (a delete that failed) go before it is used.
        ops.extend(side.remove.iter().cloned());
        rollback.push(Op::ClearRevNat { id: rev_nat_id, family });
    }
    let commit = ops.len();
    let value = FrontendValue { count, slot_base, rev_nat_id, settings: spec.settings.clone() };
    ops.push(Op::PutFrontend { frontend, value });
    let new_range = slot_base..slot_base + count;
    for slot in prog.slots.get(&frontend).into_iter().flat_map(BTreeMap::keys) {
        if !new_range.contains(slot) {
            ops.push(Op::DeleteSlot { frontend, slot: *slot });
        }
    }
    if existing.is_some() {
        ops.extend(side.remove);
    }
    Ok(Step { owner, ops, commit, rollback })
}

/// Plan removing `frontend`: it stops matching first, then its slots and
/// reverse-NAT entry go.
pub fn plan_remove(prog: &Programmed, frontend: Frontend) -> Step {
    let mut ops = vec![Op::DeleteFrontend { frontend }];
    for slot in prog.slots.get(&frontend).into_iter().flat_map(BTreeMap::keys) {
        ops.push(Op::DeleteSlot { frontend, slot: *slot });
    }
    if let Some(v) = prog.frontends.get(&frontend) {
        ops.extend(side_entries(prog.family(frontend.family()), frontend.family(), v.rev_nat_id));
        ops.push(Op::ClearRevNat { id: v.rev_nat_id, family: frontend.family() });
    }
    Step { owner: Owner::Removed(frontend), ops, commit: 0, rollback: vec![] }
}

/// Deletes of every side-table entry of frontend `id`.
fn side_entries(fam: &FamilyState, family: Family, id: u32) -> impl Iterator<Item = Op> + '_ {
    let ranges = fam.ranges.get(&id).into_iter().flatten();
    let members = fam.affinity.get(&id).into_iter().flatten();
    ranges.map(move |cidr| Op::DeleteSourceRange { frontend_id: id, cidr: *cidr }).chain(
        members.map(move |backend_id| Op::DeleteAffinityMatch { family, frontend_id: id, backend_id: *backend_id }),
    )
}

/// Plan bringing the node addresses NodePorts answer on to `wanted`.
pub fn plan_node_addresses(prog: &Programmed, wanted: &[IpAddr]) -> Step {
    let wanted: BTreeSet<IpAddr> = wanted.iter().copied().collect();
    let added = wanted.difference(&prog.node_addresses).map(|a| Op::PutNodeAddress { addr: *a });
    let gone = prog.node_addresses.difference(&wanted).map(|a| Op::DeleteNodeAddress { addr: *a });
    Step { owner: Owner::NodeAddresses, ops: added.chain(gone).collect(), commit: 0, rollback: vec![] }
}

/// Plan deleting the backends that lost their last slot since the last gc
/// (the incremental counterpart of `plan_gc`).
pub fn plan_gc_freed(prog: &Programmed) -> Step {
    let mut ops = Vec::new();
    for fam in [&prog.v4, &prog.v6] {
        let mut ids: Vec<u32> = fam.freed.clone();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if fam.refs(id) == 0
                && let Some(backend) = fam.backend(id)
            {
                ops.push(Op::DeleteBackend { id, backend: *backend });
            }
        }
    }
    Step { owner: Owner::GarbageCollection, commit: 0, ops, rollback: vec![] }
}

/// Plan deleting what nothing uses: slots outside their frontend's active
/// generation (left by an interrupted agent) and side-table entries of
/// frontend ids no frontend has, then unreferenced backends. Call again
/// after applying: freed slots free backends.
pub fn plan_gc(prog: &Programmed) -> Step {
    let mut ops = Vec::new();
    for family in Family::ALL {
        let used: BTreeSet<u32> =
            prog.frontends.iter().filter(|(f, _)| f.family() == family).map(|(_, v)| v.rev_nat_id).collect();
        let fam = prog.family(family);
        let ids: BTreeSet<u32> = fam.ranges.keys().chain(fam.affinity.keys()).copied().collect();
        for id in ids.difference(&used) {
            ops.extend(side_entries(fam, family, *id));
        }
    }
    for (frontend, slots) in &prog.slots {
        let active = prog.frontends.get(frontend).map(|v| v.slot_base..v.slot_base + v.count);
        for slot in slots.keys() {
            if !active.as_ref().is_some_and(|r| r.contains(slot)) {
                ops.push(Op::DeleteSlot { frontend: *frontend, slot: *slot });
            }
        }
    }
    if ops.is_empty() {
        for fam in [&prog.v4, &prog.v6] {
            for (id, backend) in fam.backends() {
                if fam.refs(id) == 0 {
                    ops.push(Op::DeleteBackend { id, backend: *backend });
                }
            }
        }
    }
    Step { owner: Owner::GarbageCollection, commit: 0, ops, rollback: vec![] }
}
