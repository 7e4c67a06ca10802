//! The only code that reads and writes the datapath's maps: applies `Op`s
//! and reads the pinned state back into a `Programmed` mirror. Writes are
//! sorted by map and sent as batches (`batch`); the IPv4 and IPv6 maps are
//! disjoint, so large sets of writes go to them from two threads.
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use proxy_common::{
    AffMatchKey, AffinityKey, AffinityValue, Backend4, Backend6, CtFwd4, CtFwd6, CtKey4, CtKey6, CtRev4, CtRev6,
    DatapathConfig, FragKey4, FragKey6, FragPorts, FrontendName, IfaceInfo, MapSpec, RevNat4, RevNat6, SockFwd4,
    SockFwd6, SockKey4, SockKey6, SockRev4, SockRev6, SockRevKey4, SockRevKey6, SrcRange4, SrcRange6, Stat, StatSlot,
    Svc4Key, Svc6Key, SvcValue, maps as spec, svc_flags,
};

use crate::{
    batch,
    diff::{FrontendValue, Op, Programmed},
    filter,
    types::{Backend, Cidr, Family, Frontend, Proto, Scope, Settings},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("map {map}: {op} failed for {object}: {detail}")]
    Write { map: &'static str, op: &'static str, object: String, detail: String },
    #[error("map {map}: reading failed: {source}")]
    Read { map: &'static str, source: MapError },
    #[error("map {map} is missing from the loaded object")]
    Missing { map: &'static str },
    #[error("opening pinned map {path}: {source}")]
    OpenPinned { path: PathBuf, source: MapError },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where ops are written: the real maps, or a fake in tests.
pub trait Kernel {
    /// Apply every op of `ops`. They are independent of each other (no op
    /// changes what another one means), so they may land in any order, in
    /// batches or side by side. Returns the ops that failed, by index, with
    /// why; every other one landed.
    fn apply_all(&mut self, ops: &[Op]) -> Vec<(usize, Error)>;

    /// Clear what removals left behind in the frontend-address filter
    /// (`filter`), once every op of a pass has landed. A fake kernel has
    /// no filter.
    fn prune_filter(&mut self, _prog: &Programmed) -> Result<()> {
        Ok(())
    }
}

/// The datapath's maps, typed.
pub struct Maps {
    pub svc4: HashMap<MapData, Svc4Key, SvcValue>,
    pub svc6: HashMap<MapData, Svc6Key, SvcValue>,
    pub backend4: HashMap<MapData, u32, Backend4>,
    pub backend6: HashMap<MapData, u32, Backend6>,
    pub revnat4: Array<MapData, RevNat4>,
    pub revnat6: Array<MapData, RevNat6>,
    pub ct4_fwd: HashMap<MapData, CtKey4, CtFwd4>,
    pub ct4_rev: HashMap<MapData, CtKey4, CtRev4>,
    pub ct6_fwd: HashMap<MapData, CtKey6, CtFwd6>,
    pub ct6_rev: HashMap<MapData, CtKey6, CtRev6>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub affmatch4: HashMap<MapData, AffMatchKey, u8>,
    pub affmatch6: HashMap<MapData, AffMatchKey, u8>,
    pub srcrange4: LpmTrie<MapData, SrcRange4, u8>,
    pub srcrange6: LpmTrie<MapData, SrcRange6, u8>,
    pub nodeport4: HashMap<MapData, [u8; 4], u8>,
    pub nodeport6: HashMap<MapData, [u8; 16], u8>,
    pub frag4: HashMap<MapData, FragKey4, FragPorts>,
    pub frag6: HashMap<MapData, FragKey6, FragPorts>,
    pub sock4_fwd: HashMap<MapData, SockKey4, SockFwd4>,
    pub sock4_rev: HashMap<MapData, SockRevKey4, SockRev4>,
    pub sock6_fwd: HashMap<MapData, SockKey6, SockFwd6>,
    pub sock6_rev: HashMap<MapData, SockRevKey6, SockRev6>,
    pub ifaces: HashMap<MapData, u32, IfaceInfo>,
    pub stats: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, DatapathConfig>,
    /// Service port names by reverse-NAT id (`inspect`, restarts).
    pub names4: HashMap<MapData, u32, FrontendName>,
    pub names6: HashMap<MapData, u32, FrontendName>,
    /// Frontend-address filters (`filter`), and their words as last read
    /// or written (`None`: not read yet), IPv4 then IPv6.
    pub filter4: Array<MapData, u64>,
    pub filter6: Array<MapData, u64>,
    filter_words: [Option<Vec<u64>>; 2],
}

impl Maps {
    /// Build the typed maps from `get`, which hands over each map of the
    /// table (`proxy_common::maps::ALL`) by its spec.
    fn from_table(mut get: impl FnMut(&'static MapSpec) -> Result<Map>) -> Result<Self> {
        fn typed<T: TryFrom<Map, Error = MapError>>(
            spec: &'static MapSpec,
            get: &mut impl FnMut(&'static MapSpec) -> Result<Map>,
        ) -> Result<T> {
            T::try_from(get(spec)?).map_err(|source| Error::Read { map: spec.name, source })
        }
        Ok(Self {
            svc4: typed(&spec::SVC4, &mut get)?,
            svc6: typed(&spec::SVC6, &mut get)?,
            backend4: typed(&spec::BACKEND4, &mut get)?,
            backend6: typed(&spec::BACKEND6, &mut get)?,
            revnat4: typed(&spec::REVNAT4, &mut get)?,
            revnat6: typed(&spec::REVNAT6, &mut get)?,
            ct4_fwd: typed(&spec::CT4_FWD, &mut get)?,
            ct4_rev: typed(&spec::CT4_REV, &mut get)?,
            ct6_fwd: typed(&spec::CT6_FWD, &mut get)?,
            ct6_rev: typed(&spec::CT6_REV, &mut get)?,
            affinity: typed(&spec::AFFINITY, &mut get)?,
            affmatch4: typed(&spec::AFFMATCH4, &mut get)?,
            affmatch6: typed(&spec::AFFMATCH6, &mut get)?,
            srcrange4: typed(&spec::SRCRANGE4, &mut get)?,
            srcrange6: typed(&spec::SRCRANGE6, &mut get)?,
            nodeport4: typed(&spec::NODEPORT4, &mut get)?,
            nodeport6: typed(&spec::NODEPORT6, &mut get)?,
            frag4: typed(&spec::FRAG4, &mut get)?,
            frag6: typed(&spec::FRAG6, &mut get)?,
            sock4_fwd: typed(&spec::SOCK4_FWD, &mut get)?,
            sock4_rev: typed(&spec::SOCK4_REV, &mut get)?,
            sock6_fwd: typed(&spec::SOCK6_FWD, &mut get)?,
            sock6_rev: typed(&spec::SOCK6_REV, &mut get)?,
            ifaces: typed(&spec::IFACES, &mut get)?,
            stats: typed(&spec::STATS, &mut get)?,
            config: typed(&spec::CONFIG, &mut get)?,
            names4: typed(&spec::NAMES4, &mut get)?,
            names6: typed(&spec::NAMES6, &mut get)?,
            filter4: typed(&spec::FILTER4, &mut get)?,
            filter6: typed(&spec::FILTER6, &mut get)?,
            filter_words: [None, None],
        })
    }

    /// Take the maps out of a loaded object (the programs stay in it).
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self> {
        Self::from_table(|m| ebpf.take_map(m.name).ok_or(Error::Missing { map: m.name }))
    }

    /// Open the maps pinned under `dir` without loading a program.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        Self::from_table(|m| {
            let path = dir.join(m.name);
            let data = MapData::from_pin(&path).map_err(|source| Error::OpenPinned { path: path.clone(), source })?;
            Map::from_map_data(data).map_err(|source| Error::OpenPinned { path, source })
        })
    }

    /// Write the datapath's runtime settings (one atomic map update). The
    /// route generation (`route_gen`) is the datapath's, not the caller's:
    /// it moves on, so flows look their routes up again.
    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<()> {
        let route_gen = self.config().map_or(0, |c| c.route_gen).wrapping_add(1);
        let cfg = DatapathConfig { route_gen, ..*cfg };
        write(&spec::CONFIG, "set", &"the datapath configuration", self.config.set(0, cfg, 0))
    }

    /// Make every flow look its route up again (`Hop`): an interface
    /// changed.
    fn bump_route_gen(&mut self) -> Result<()> {
        let cfg = self.config()?;
        self.set_config(&cfg)
    }

    /// The datapath's runtime settings.
    pub fn config(&self) -> Result<DatapathConfig> {
        self.config.get(&0, 0).map_err(|source| Error::Read { map: spec::CONFIG.name, source })
    }

    /// Sum of each counter over all CPUs, by family and reason.
    pub fn stats(&self) -> Result<Vec<(StatSlot, Stat, u64)>> {
        let mut out = Vec::with_capacity(StatSlot::ENTRIES as usize);
        for slot in StatSlot::ALL {
            for stat in Stat::ALL {
                let v = self
                    .stats
                    .get(&slot.index(stat), 0)
                    .map_err(|source| Error::Read { map: spec::STATS.name, source })?;
                out.push((slot, stat, v.iter().sum()));
            }
        }
        Ok(out)
    }

    /// Sum of one counter over both families.
    pub fn stat(&self, stat: Stat) -> Result<u64> {
        Ok(self.stats()?.iter().filter(|(_, s, _)| *s == stat).map(|(_, _, n)| n).sum())
    }

    /// Record an attached interface and what it faces, so the datapath
    /// may deliver flows to it directly.
    pub fn set_iface(&mut self, ifindex: u32, role: u32) -> Result<()> {
        write(&spec::IFACES, "insert", &ifindex, self.ifaces.insert(ifindex, IfaceInfo { role }, 0))?;
        self.bump_route_gen()
    }

    /// Forget an interface that is gone; no flow keeps a route through it.
    pub fn remove_iface(&mut self, ifindex: u32) -> Result<()> {
        delete(&spec::IFACES, &ifindex, self.ifaces.remove(&ifindex))?;
        self.bump_route_gen()
    }

    /// `family`'s filter map and its words as the map holds them (read
    /// once, then kept as written).
    fn filter_of(&mut self, family: Family) -> Result<(BorrowedFd<'_>, &mut Vec<u64>)> {
        let spec = filter_spec(family);
        let (map, words) = match family {
            Family::V4 => (&self.filter4, &mut self.filter_words[0]),
            Family::V6 => (&self.filter6, &mut self.filter_words[1]),
        };
        let fd = map.map().fd().as_fd();
        if words.is_none() {
            let mut read = batch::array_values::<u64>(fd, proxy_common::filter::WORDS).map_err(|e| Error::Write {
                map: spec.name,
                op: "read",
                object: "the frontend-address filter".into(),
                detail: describe_io(spec, "bpf_map_lookup_batch", &e),
            })?;
            read.resize(filter::WORDS, 0);
            *words = Some(read);
        }
        Ok((fd, words.as_mut().expect("read above")))
    }

    /// Write `changes` (word index, new word) to `family`'s filter.
    fn write_filter(&mut self, family: Family, changes: Vec<(u32, u64)>) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let spec = filter_spec(family);
        let (fd, words) = self.filter_of(family)?;
        let (keys, values): (Vec<u32>, Vec<u64>) = changes.into_iter().unzip();
        let failed = batch::update_all(fd, &keys, &values);
        // What landed is what the map holds now.
        let failed_at: HashSet<usize> = failed.iter().map(|(i, _)| *i).collect();
        for (i, (k, v)) in keys.iter().zip(&values).enumerate() {
            if !failed_at.contains(&i) {
                words[*k as usize] = *v;
            }
        }
        match failed.into_iter().next() {
            None => Ok(()),
            Some((_, e)) => Err(Error::Write {
                map: spec.name,
                op: "update",
                object: "the frontend-address filter".into(),
                detail: describe_io(spec, "bpf_map_update_batch", &e),
            }),
        }
    }

    /// Set the filter bits of the addresses the frontends and node
    /// addresses of `ops` put, before those ops land (a frontend that
    /// exists already has its bit: nothing to write). Returns the ops whose
    /// bit could not be written, with why: they must not land (the
    /// datapath would not look their entries up).
    fn set_filter_bits(&mut self, ops: &[Op]) -> Vec<(usize, Error)> {
        let mut failed = Vec::new();
        for family in Family::ALL {
            let addrs = ops.iter().enumerate().filter_map(|(at, op)| match op {
                Op::PutFrontend { frontend, .. } if frontend.family() == family => Some((at, frontend.addr)),
                Op::PutNodeAddress { addr } if Family::of(*addr) == family => Some((at, *addr)),
                _ => None,
            });
            let addrs: Vec<(usize, IpAddr)> = addrs.collect();
            if addrs.is_empty() {
                continue;
            }
            let written = self.filter_of(family).map(|(_, words)| filter::with(words, addrs.iter().map(|(_, a)| a)));
            if let Err(e) = written.and_then(|changes| self.write_filter(family, changes)) {
                let (map, detail) = (filter_spec(family).name, e.to_string());
                failed.extend(addrs.iter().map(|(at, _)| {
                    (*at, Error::Write { map, op: "update", object: object(&ops[*at]), detail: detail.clone() })
                }));
            }
        }
        failed
    }

    /// Bring both filters to exactly the addresses `prog` holds, clearing
    /// the bits of addresses no entry uses any more (and setting any
    /// missing: after an upgrade from a datapath without a filter). Called
    /// at start, before programs are attached, and once removals landed.
    pub fn rebuild_filter(&mut self, prog: &Programmed) -> Result<()> {
        for family in Family::ALL {
            let want = filter::words(filter::addresses(prog, family));
            let changes = filter::changed(self.filter_of(family)?.1, &want);
            self.write_filter(family, changes)?;
        }
        Ok(())
    }

    /// Entries in use and capacity of the map `m` of the table (arrays:
    /// entries holding something). A hash map's keys are walked one by one:
    /// under churn the count is approximate, and never above the capacity.
    pub fn fill(&self, m: &'static MapSpec) -> Result<(u32, u32)> {
        use aya::maps::IterableMap;
        use proxy_common::names;
        fn capacity<K: aya::Pod, V>(m: &'static MapSpec, map: &impl IterableMap<K, V>) -> Result<u32> {
            Ok(map.map().info().map_err(|source| Error::Read { map: m.name, source })?.max_entries())
        }
        fn keys<K: aya::Pod, V: aya::Pod>(m: &'static MapSpec, map: &HashMap<MapData, K, V>) -> Result<(u32, u32)> {
            let max = capacity(m, map)?;
            let mut n = 0u32;
            for k in map.keys().take(max as usize) {
                k.map_err(|source| Error::Read { map: m.name, source })?;
                n += 1;
            }
            Ok((n, max))
        }
        fn in_use<V: aya::Pod + Default + PartialEq>(
            m: &'static MapSpec,
            map: &Array<MapData, V>,
        ) -> Result<(u32, u32)> {
            let max = capacity(m, map)?;
            let n = if let Ok(values) = batch::array_values::<V>(map.map().fd().as_fd(), max) {
                values.iter().filter(|v| **v != V::default()).count()
            } else {
                // Without batch lookups: one element at a time.
                let mut n = 0usize;
                for v in map.iter() {
                    n += usize::from(v.map_err(|source| Error::Read { map: m.name, source })? != V::default());
                }
                n
            };
            Ok((u32::try_from(n).unwrap_or(max), max))
        }
        fn trie<K: aya::Pod>(m: &'static MapSpec, map: &LpmTrie<MapData, K, u8>) -> Result<(u32, u32)> {
            let max = capacity(m, map)?;
            let n = map.keys().take(max as usize).flatten().count();
            Ok((u32::try_from(n).unwrap_or(max), max))
        }
        match m.name {
            names::SVC4 => keys(m, &self.svc4),
            names::SVC6 => keys(m, &self.svc6),
            names::BACKEND4 => keys(m, &self.backend4),
            names::BACKEND6 => keys(m, &self.backend6),
            names::CT4_FWD => keys(m, &self.ct4_fwd),
            names::CT4_REV => keys(m, &self.ct4_rev),
            names::CT6_FWD => keys(m, &self.ct6_fwd),
            names::CT6_REV => keys(m, &self.ct6_rev),
            names::FRAG4 => keys(m, &self.frag4),
            names::FRAG6 => keys(m, &self.frag6),
            names::AFFINITY => keys(m, &self.affinity),
            names::AFFMATCH4 => keys(m, &self.affmatch4),
            names::AFFMATCH6 => keys(m, &self.affmatch6),
            names::SRCRANGE4 => trie(m, &self.srcrange4),
            names::SRCRANGE6 => trie(m, &self.srcrange6),
            names::NODEPORT4 => keys(m, &self.nodeport4),
            names::NODEPORT6 => keys(m, &self.nodeport6),
            names::SOCK4_FWD => keys(m, &self.sock4_fwd),
            names::SOCK4_REV => keys(m, &self.sock4_rev),
            names::SOCK6_FWD => keys(m, &self.sock6_fwd),
            names::SOCK6_REV => keys(m, &self.sock6_rev),
            names::IFACES => keys(m, &self.ifaces),
            names::NAMES4 => keys(m, &self.names4),
            names::NAMES6 => keys(m, &self.names6),
            names::REVNAT4 => in_use(m, &self.revnat4),
            names::REVNAT6 => in_use(m, &self.revnat6),
            names::FILTER4 => in_use(m, &self.filter4),
            names::FILTER6 => in_use(m, &self.filter6),
            names::CONFIG => Ok((1, capacity(m, &self.config)?)),
            _ => {
                let n = capacity(m, &self.stats)?;
                Ok((n, n))
            }
        }
    }

    /// Read the maps back into a mirror: what a restarted agent starts from.
    pub fn read_back(&self) -> Result<Programmed> {
        let read = |m: &'static MapSpec| move |source| Error::Read { map: m.name, source };
        let mut prog = Programmed::default();
        let mut ops = Vec::new();
        let mut names = std::collections::HashMap::new();
        for (map, family, spec) in
            [(&self.names4, Family::V4, &spec::NAMES4), (&self.names6, Family::V6, &spec::NAMES6)]
        {
            for item in map {
                let (id, name) = item.map_err(read(spec))?;
                names.insert((family, id), name.as_str().unwrap_or_default().to_owned());
            }
        }
        for item in &self.backend4 {
            let (id, b) = item.map_err(read(&spec::BACKEND4))?;
            if let Some(backend) = backend_from(IpAddr::V4(Ipv4Addr::from(b.addr)), b.port, b.proto) {
                ops.push(Op::PutBackend { id, backend });
            }
        }
        for item in &self.backend6 {
            let (id, b) = item.map_err(read(&spec::BACKEND6))?;
            if let Some(backend) = backend_from(IpAddr::V6(Ipv6Addr::from(b.addr)), b.port, b.proto) {
                ops.push(Op::PutBackend { id, backend });
            }
        }
        // Frontends whose slot 0 says they have source ranges.
        let mut ranged = Vec::new();
        for item in &self.svc4 {
            let (k, v) = item.map_err(read(&spec::SVC4))?;
            let owner = names.get(&(Family::V4, v.rev_nat_id));
            let addr = IpAddr::V4(Ipv4Addr::from(k.addr));
            ranged.extend(svc_entry(addr, (k.port, k.proto, k.scope, k.slot), &v, owner, &mut ops));
        }
        for item in &self.svc6 {
            let (k, v) = item.map_err(read(&spec::SVC6))?;
            let owner = names.get(&(Family::V6, v.rev_nat_id));
            let addr = IpAddr::V6(Ipv6Addr::from(k.addr));
            ranged.extend(svc_entry(addr, (k.port, k.proto, k.scope, k.slot), &v, owner, &mut ops));
        }
        self.read_side_tables(&mut ops)?;
        for op in &ops {
            prog.apply(op);
        }
        // Slot 0 says whether a frontend has source ranges; the trie, which.
        for f in ranged {
            let Some(v) = prog.frontends.get_mut(&f) else { continue };
            let fam = match f.family() {
                Family::V4 => &prog.v4,
                Family::V6 => &prog.v6,
            };
            v.settings.source_ranges = fam.ranges.get(&v.rev_nat_id).into_iter().flatten().copied().collect();
        }
        Ok(prog)
    }

    /// The ops that rebuild the affinity memberships, source ranges and
    /// node addresses in the mirror.
    fn read_side_tables(&self, ops: &mut Vec<Op>) -> Result<()> {
        let read = |m: &'static MapSpec| move |source| Error::Read { map: m.name, source };
        for (map, family, spec) in
            [(&self.affmatch4, Family::V4, &spec::AFFMATCH4), (&self.affmatch6, Family::V6, &spec::AFFMATCH6)]
        {
            for key in map.keys() {
                let k = key.map_err(read(spec))?;
                ops.push(Op::PutAffinityMatch { family, frontend_id: k.frontend_id, backend_id: k.backend_id });
            }
        }
        for key in self.srcrange4.keys() {
            let k = key.map_err(read(&spec::SRCRANGE4))?;
            let d = k.data();
            ops.extend(range_op(d.frontend_id, IpAddr::V4(d.addr.into()), k.prefix_len() - SrcRange4::ID_BITS));
        }
        for key in self.srcrange6.keys() {
            let k = key.map_err(read(&spec::SRCRANGE6))?;
            let d = k.data();
            ops.extend(range_op(d.frontend_id, IpAddr::V6(d.addr.into()), k.prefix_len() - SrcRange6::ID_BITS));
        }
        for key in self.nodeport4.keys() {
            let a = key.map_err(read(&spec::NODEPORT4))?;
            ops.push(Op::PutNodeAddress { addr: IpAddr::V4(a.into()) });
        }
        for key in self.nodeport6.keys() {
            let a = key.map_err(read(&spec::NODEPORT6))?;
            ops.push(Op::PutNodeAddress { addr: IpAddr::V6(a.into()) });
        }
        Ok(())
    }
}

/// The op that rebuilds one source-range entry (`frontend_id` as stored,
/// big-endian); `None` for a prefix no agent writes.
/// `family`'s frontend-address filter map.
fn filter_spec(family: Family) -> &'static MapSpec {
    match family {
        Family::V4 => &spec::FILTER4,
        Family::V6 => &spec::FILTER6,
    }
}

fn range_op(frontend_id: [u8; 4], addr: IpAddr, len: u32) -> Option<Op> {
    let cidr = Cidr::new(addr, u8::try_from(len).ok()?)?;
    Some(Op::PutSourceRange { frontend_id: u32::from_be_bytes(frontend_id), cidr })
}

/// The ops that rebuild one service-map entry (`(port, proto, scope, slot)`
/// as in the key) in the mirror; `owner`: the frontend's name, if pinned.
/// Returns the frontend when it is a slot 0 with source ranges.
fn svc_entry(
    addr: IpAddr,
    (port, proto, scope, slot): (u16, u8, u8, u16),
    v: &SvcValue,
    owner: Option<&String>,
    ops: &mut Vec<Op>,
) -> Option<Frontend> {
    let (Some(proto), Some(scope)) = (Proto::from_number(proto), Scope::from_number(scope)) else { return None };
    let frontend = Frontend { addr, port: u16::from_be(port), proto, scope };
    if slot == 0 {
        let settings = Settings::from_flags(v.flags, v.affinity_timeout);
        let value = FrontendValue { count: v.count, slot_base: v.slot_base, rev_nat_id: v.rev_nat_id, settings };
        let owner = owner.cloned().unwrap_or_default();
        ops.push(Op::PutRevNat { id: v.rev_nat_id, frontend, owner });
        ops.push(Op::PutFrontend { frontend, value });
        (v.flags & svc_flags::SOURCE_RANGES != 0).then_some(frontend)
    } else {
        ops.push(Op::PutSlot { frontend, slot, backend_id: v.backend_id });
        None
    }
}

fn backend_from(addr: IpAddr, port: u16, proto: u8) -> Option<Backend> {
    Some(Backend { addr, port: u16::from_be(port), proto: Proto::from_number(proto)? })
}

/// A map error in words, with the errno and, for a full map, the flag
/// that raises its capacity (from the map table, never guessed by name).
pub fn describe(map: &MapSpec, e: &MapError) -> String {
    match e {
        MapError::SyscallError(s) => describe_io(map, s.call, &s.io_error),
        other => other.to_string(),
    }
}

/// `describe` for the error of a system call.
fn describe_io(map: &MapSpec, call: &str, e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::E2BIG | libc::ENOMEM) => match map.sizing.flag() {
            Some(flag) => format!("the map is full ({e}); raise {flag}"),
            None => format!("the map is full ({e})"),
        },
        _ => format!("{call} failed: {e}"),
    }
}

fn write(map: &'static MapSpec, op: &'static str, object: &impl ToString, r: Result<(), MapError>) -> Result<()> {
    r.map_err(|e| Error::Write { map: map.name, op, object: object.to_string(), detail: describe(map, &e) })
}

/// Deleting what is already gone is success: the goal state holds.
fn delete(map: &'static MapSpec, object: &impl ToString, r: Result<(), MapError>) -> Result<()> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => write(map, "delete", object, r),
    }
}

/// What an op writes, in words, for its error message.
fn object(op: &Op) -> String {
    match op {
        Op::PutBackend { backend, .. } | Op::DeleteBackend { backend, .. } => backend.to_string(),
        Op::PutRevNat { frontend, .. } | Op::PutFrontend { frontend, .. } | Op::DeleteFrontend { frontend } => {
            frontend.to_string()
        }
        Op::ClearRevNat { id, family } => format!("{} reverse-NAT id {id}", family.k8s_name()),
        Op::PutSlot { frontend, slot, .. } | Op::DeleteSlot { frontend, slot } => format!("{frontend} slot {slot}"),
        Op::PutAffinityMatch { family, frontend_id, backend_id }
        | Op::DeleteAffinityMatch { family, frontend_id, backend_id } => {
            format!("{} frontend {frontend_id} backend {backend_id}", family.k8s_name())
        }
        Op::PutSourceRange { frontend_id, cidr } | Op::DeleteSourceRange { frontend_id, cidr } => {
            format!("frontend {frontend_id} source range {cidr}")
        }
        Op::PutNodeAddress { addr } | Op::DeleteNodeAddress { addr } => format!("node address {addr}"),
    }
}

/// Writes to one map: keys, values (none for deletes) and, for each, the
/// index of its op.
struct Writes<K, V> {
    map: &'static MapSpec,
    keys: Vec<K>,
    values: Vec<V>,
    at: Vec<usize>,
}

impl<K: Pod, V: Pod> Writes<K, V> {
    fn new(map: &'static MapSpec) -> Self {
        Self { map, keys: Vec::new(), values: Vec::new(), at: Vec::new() }
    }

    fn put(&mut self, at: usize, key: K, value: V) {
        self.keys.push(key);
        self.values.push(value);
        self.at.push(at);
    }

    fn delete(&mut self, at: usize, key: K) {
        self.keys.push(key);
        self.at.push(at);
    }

    /// Only the writes of ops not in `failed`.
    fn without(self, failed: &HashSet<usize>) -> Self {
        if failed.is_empty() {
            return self;
        }
        let mut out = Self::new(self.map);
        let values = self.values.into_iter().map(Some).chain(std::iter::repeat_with(|| None));
        for ((key, at), value) in self.keys.into_iter().zip(self.at).zip(values) {
            if !failed.contains(&at) {
                out.keys.push(key);
                out.values.extend(value);
                out.at.push(at);
            }
        }
        out
    }

    /// Apply them (`update`: puts, otherwise deletes); failures go to
    /// `failed` by op index, described with `ops`.
    fn run(&self, fd: BorrowedFd<'_>, ops: &[Op], failed: &mut Vec<(usize, Error)>) {
        if self.keys.is_empty() {
            return;
        }
        let (errors, verb, call) = if self.values.is_empty() {
            (batch::delete_all(fd, &self.keys), "delete", "bpf_map_delete_elem")
        } else {
            (batch::update_all(fd, &self.keys, &self.values), "update", "bpf_map_update_elem")
        };
        for (i, e) in errors {
            let at = self.at[i];
            let detail = describe_io(self.map, call, &e);
            failed.push((at, Error::Write { map: self.map.name, op: verb, object: object(&ops[at]), detail }));
        }
    }
}

/// The map layout of one family: key and value types, and how `Op`s'
/// objects become them.
trait Layout {
    type SvcKey: Pod;
    type Backend: Pod;
    type RevNat: Pod + Default;
    type Range: Pod;
    type Addr: Pod;
    /// Service, backend, reverse-NAT, names, affinity-membership,
    /// source-range and node-address maps, in this order.
    const MAPS: [&'static MapSpec; 7];
    fn svc_key(f: &Frontend, slot: u16) -> Self::SvcKey;
    fn backend(b: &Backend) -> Self::Backend;
    fn revnat(f: &Frontend) -> Self::RevNat;
    fn range(frontend_id: u32, cidr: &Cidr) -> Key<Self::Range>;
    fn addr(a: &IpAddr) -> Self::Addr;
}

struct V4;
struct V6;

impl Layout for V4 {
    type SvcKey = Svc4Key;
    type Backend = Backend4;
    type RevNat = RevNat4;
    type Range = SrcRange4;
    type Addr = [u8; 4];
    const MAPS: [&'static MapSpec; 7] = [
        &spec::SVC4,
        &spec::BACKEND4,
        &spec::REVNAT4,
        &spec::NAMES4,
        &spec::AFFMATCH4,
        &spec::SRCRANGE4,
        &spec::NODEPORT4,
    ];

    fn svc_key(f: &Frontend, slot: u16) -> Svc4Key {
        Svc4Key::new(v4(f.addr), f.port, f.proto.number(), f.scope.number(), slot)
    }

    fn backend(b: &Backend) -> Backend4 {
        Backend4 { addr: v4(b.addr).octets(), port: b.port.to_be(), proto: b.proto.number(), flags: 0 }
    }

    fn revnat(f: &Frontend) -> RevNat4 {
        RevNat4 { addr: v4(f.addr).octets(), port: f.port.to_be(), _pad: [0; 2] }
    }

    fn range(frontend_id: u32, cidr: &Cidr) -> Key<SrcRange4> {
        let data = SrcRange4 { frontend_id: frontend_id.to_be_bytes(), addr: v4(cidr.addr).octets() };
        Key::new(SrcRange4::ID_BITS + u32::from(cidr.len), data)
    }

    fn addr(a: &IpAddr) -> [u8; 4] {
        v4(*a).octets()
    }
}

impl Layout for V6 {
    type SvcKey = Svc6Key;
    type Backend = Backend6;
    type RevNat = RevNat6;
    type Range = SrcRange6;
    type Addr = [u8; 16];
    const MAPS: [&'static MapSpec; 7] = [
        &spec::SVC6,
        &spec::BACKEND6,
        &spec::REVNAT6,
        &spec::NAMES6,
        &spec::AFFMATCH6,
        &spec::SRCRANGE6,
        &spec::NODEPORT6,
    ];

    fn svc_key(f: &Frontend, slot: u16) -> Svc6Key {
        Svc6Key::new(v6(f.addr), f.port, f.proto.number(), f.scope.number(), slot)
    }

    fn backend(b: &Backend) -> Backend6 {
        Backend6 { addr: v6(b.addr).octets(), port: b.port.to_be(), proto: b.proto.number(), flags: 0 }
    }

    fn revnat(f: &Frontend) -> RevNat6 {
        RevNat6 { addr: v6(f.addr).octets(), port: f.port.to_be(), _pad: [0; 2] }
    }

    fn range(frontend_id: u32, cidr: &Cidr) -> Key<SrcRange6> {
        let data = SrcRange6 { frontend_id: frontend_id.to_be_bytes(), addr: v6(cidr.addr).octets() };
        Key::new(SrcRange6::ID_BITS + u32::from(cidr.len), data)
    }

    fn addr(a: &IpAddr) -> [u8; 16] {
        v6(*a).octets()
    }
}

fn v4(a: IpAddr) -> Ipv4Addr {
    let IpAddr::V4(a) = a else { unreachable!("ops are sorted by family: an IPv4 address") };
    a
}

fn v6(a: IpAddr) -> Ipv6Addr {
    let IpAddr::V6(a) = a else { unreachable!("ops are sorted by family: an IPv6 address") };
    a
}

/// Puts and deletes of one map.
struct PutDelete<K, V> {
    put: Writes<K, V>,
    delete: Writes<K, u8>,
}

impl<K: Pod, V: Pod> PutDelete<K, V> {
    fn new(map: &'static MapSpec) -> Self {
        Self { put: Writes::new(map), delete: Writes::new(map) }
    }

    fn len(&self) -> usize {
        self.put.at.len() + self.delete.at.len()
    }
}

/// The writes of one family, by map.
struct FamilyWrites<L: Layout> {
    svc: PutDelete<L::SvcKey, SvcValue>,
    backend: PutDelete<u32, L::Backend>,
    revnat: Writes<u32, L::RevNat>,
    names: PutDelete<u32, FrontendName>,
    affmatch: PutDelete<AffMatchKey, u8>,
    srcrange: PutDelete<Key<L::Range>, u8>,
    nodeport: PutDelete<L::Addr, u8>,
}

/// The maps of one family, by their file descriptors, in `Layout::MAPS`
/// order.
type FamilyFds<'a> = [BorrowedFd<'a>; 7];

impl<L: Layout> FamilyWrites<L> {
    fn new() -> Self {
        let [svc, backend, revnat, names, affmatch, srcrange, nodeport] = L::MAPS;
        Self {
            svc: PutDelete::new(svc),
            backend: PutDelete::new(backend),
            revnat: Writes::new(revnat),
            names: PutDelete::new(names),
            affmatch: PutDelete::new(affmatch),
            srcrange: PutDelete::new(srcrange),
            nodeport: PutDelete::new(nodeport),
        }
    }

    fn len(&self) -> usize {
        self.svc.len()
            + self.backend.len()
            + self.revnat.at.len()
            + self.affmatch.len()
            + self.srcrange.len()
            + self.nodeport.len()
    }

    /// Sort `op` (of this family) into its maps.
    fn add(&mut self, at: usize, op: &Op) {
        match op {
            Op::PutBackend { id, backend } => self.backend.put.put(at, *id, L::backend(backend)),
            Op::DeleteBackend { id, .. } => self.backend.delete.delete(at, *id),
            Op::PutRevNat { id, frontend, owner } => {
                self.names.put.put(at, *id, FrontendName::new(owner));
                self.revnat.put(at, *id, L::revnat(frontend));
            }
            Op::ClearRevNat { id, .. } => {
                self.revnat.put(at, *id, L::RevNat::default());
                self.names.delete.delete(at, *id);
            }
            Op::PutSlot { frontend, slot, backend_id } => {
                let v = SvcValue { backend_id: *backend_id, ..SvcValue::default() };
                self.svc.put.put(at, L::svc_key(frontend, *slot), v);
            }
            Op::DeleteSlot { frontend, slot } => self.svc.delete.delete(at, L::svc_key(frontend, *slot)),
            Op::PutFrontend { frontend, value } => {
                let (flags, affinity_timeout) = value.settings.to_flags();
                let v = SvcValue {
                    count: value.count,
                    slot_base: value.slot_base,
                    rev_nat_id: value.rev_nat_id,
                    flags,
                    affinity_timeout,
                    ..SvcValue::default()
                };
                self.svc.put.put(at, L::svc_key(frontend, 0), v);
            }
            Op::DeleteFrontend { frontend } => self.svc.delete.delete(at, L::svc_key(frontend, 0)),
            Op::PutAffinityMatch { frontend_id, backend_id, .. } => {
                self.affmatch.put.put(at, AffMatchKey { frontend_id: *frontend_id, backend_id: *backend_id }, 1);
            }
            Op::DeleteAffinityMatch { frontend_id, backend_id, .. } => {
                self.affmatch.delete.delete(at, AffMatchKey { frontend_id: *frontend_id, backend_id: *backend_id });
            }
            Op::PutSourceRange { frontend_id, cidr } => self.srcrange.put.put(at, L::range(*frontend_id, cidr), 1),
            Op::DeleteSourceRange { frontend_id, cidr } => {
                self.srcrange.delete.delete(at, L::range(*frontend_id, cidr));
            }
            Op::PutNodeAddress { addr } => self.nodeport.put.put(at, L::addr(addr), 1),
            Op::DeleteNodeAddress { addr } => self.nodeport.delete.delete(at, L::addr(addr)),
        }
    }

    fn run(self, fds: &FamilyFds<'_>, ops: &[Op]) -> Vec<(usize, Error)> {
        let [svc, backend, revnat, names, affmatch, srcrange, nodeport] = *fds;
        let mut failed = Vec::new();
        // Independent ops, any order would do; this one is the order of a
        // single step. An op with two writes stops at its first failure: a
        // reverse-NAT entry is written after its name and cleared before it,
        // so it never exists without one.
        self.backend.put.run(backend, ops, &mut failed);
        self.names.put.run(names, ops, &mut failed);
        let done: HashSet<usize> = failed.iter().map(|(at, _)| *at).collect();
        self.revnat.without(&done).run(revnat, ops, &mut failed);
        let done: HashSet<usize> = failed.iter().map(|(at, _)| *at).collect();
        self.names.delete.without(&done).run(names, ops, &mut failed);
        self.affmatch.put.run(affmatch, ops, &mut failed);
        self.srcrange.put.run(srcrange, ops, &mut failed);
        self.nodeport.put.run(nodeport, ops, &mut failed);
        self.svc.put.run(svc, ops, &mut failed);
        self.svc.delete.run(svc, ops, &mut failed);
        self.affmatch.delete.run(affmatch, ops, &mut failed);
        self.srcrange.delete.run(srcrange, ops, &mut failed);
        self.nodeport.delete.run(nodeport, ops, &mut failed);
        self.backend.delete.run(backend, ops, &mut failed);
        failed
    }
}

/// Below this many writes per family, the families are not written from
/// two threads: starting one costs more than it saves.
const PARALLEL_MIN: usize = 512;

impl Kernel for Maps {
    fn apply_all(&mut self, ops: &[Op]) -> Vec<(usize, Error)> {
        // The filter first: no frontend or node address without its bit.
        let filter_failed = self.set_filter_bits(ops);
        let skip: HashSet<usize> = filter_failed.iter().map(|(at, _)| *at).collect();
        let mut v4 = FamilyWrites::<V4>::new();
        let mut v6 = FamilyWrites::<V6>::new();
        for (at, op) in ops.iter().enumerate().filter(|(at, _)| !skip.contains(at)) {
            match op.family() {
                Family::V4 => v4.add(at, op),
                Family::V6 => v6.add(at, op),
            }
        }
        let fds4 = [
            self.svc4.map().fd().as_fd(),
            self.backend4.map().fd().as_fd(),
            self.revnat4.map().fd().as_fd(),
            self.names4.map().fd().as_fd(),
            self.affmatch4.map().fd().as_fd(),
            self.srcrange4.map().fd().as_fd(),
            self.nodeport4.map().fd().as_fd(),
        ];
        let fds6 = [
            self.svc6.map().fd().as_fd(),
            self.backend6.map().fd().as_fd(),
            self.revnat6.map().fd().as_fd(),
            self.names6.map().fd().as_fd(),
            self.affmatch6.map().fd().as_fd(),
            self.srcrange6.map().fd().as_fd(),
            self.nodeport6.map().fd().as_fd(),
        ];
        // The families' maps are disjoint: write them side by side.
        let (mut failed, failed6) = if v4.len().min(v6.len()) >= PARALLEL_MIN {
            std::thread::scope(|s| {
                let six = s.spawn(|| v6.run(&fds6, ops));
                let four = v4.run(&fds4, ops);
                (four, six.join().expect("the IPv6 writer does not panic"))
            })
        } else {
            (v4.run(&fds4, ops), v6.run(&fds6, ops))
        };
        failed.extend(failed6);
        failed.extend(filter_failed);
        failed
    }

    fn prune_filter(&mut self, prog: &Programmed) -> Result<()> {
        self.rebuild_filter(prog)
    }
}
