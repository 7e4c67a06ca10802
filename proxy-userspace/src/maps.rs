//! The only code that reads and writes the datapath's maps: applies `Op`s
//! and reads the pinned state back into a `Programmed` mirror.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use proxy_common::{
    Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value, DatapathConfig, FrontendName, MapSpec, RevNat4, RevNat6,
    Stat, Svc4Key, Svc6Key, SvcValue, maps as spec,
};

use crate::{
    diff::{FrontendValue, Op, Programmed},
    types::{Backend, Family, Frontend, Proto, Scope, Settings},
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

/// Where `apply` writes: the real maps, or a fake in tests.
pub trait Kernel {
    fn apply(&mut self, op: &Op) -> Result<()>;
}

/// The datapath's maps, typed.
pub struct Maps {
    pub svc4: HashMap<MapData, Svc4Key, SvcValue>,
    pub svc6: HashMap<MapData, Svc6Key, SvcValue>,
    pub backend4: HashMap<MapData, u32, Backend4>,
    pub backend6: HashMap<MapData, u32, Backend6>,
    pub revnat4: Array<MapData, RevNat4>,
    pub revnat6: Array<MapData, RevNat6>,
    pub ct4: HashMap<MapData, Ct4Key, Ct4Value>,
    pub ct6: HashMap<MapData, Ct6Key, Ct6Value>,
    pub stats: PerCpuArray<MapData, u64>,
    pub config: Array<MapData, DatapathConfig>,
    /// Service port names by reverse-NAT id (`inspect`, restarts).
    pub names4: HashMap<MapData, u32, FrontendName>,
    pub names6: HashMap<MapData, u32, FrontendName>,
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
            ct4: typed(&spec::CT4, &mut get)?,
            ct6: typed(&spec::CT6, &mut get)?,
            stats: typed(&spec::STATS, &mut get)?,
            config: typed(&spec::CONFIG, &mut get)?,
            names4: typed(&spec::NAMES4, &mut get)?,
            names6: typed(&spec::NAMES6, &mut get)?,
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

    /// Write the datapath's runtime settings (one atomic map update).
    pub fn set_config(&mut self, cfg: &DatapathConfig) -> Result<()> {
        write(&spec::CONFIG, "set", &"the datapath configuration", self.config.set(0, *cfg, 0))
    }

    /// The datapath's runtime settings.
    pub fn config(&self) -> Result<DatapathConfig> {
        self.config.get(&0, 0).map_err(|source| Error::Read { map: spec::CONFIG.name, source })
    }

    /// Sum of each counter over all CPUs.
    pub fn stats(&self) -> Result<Vec<(Stat, u64)>> {
        Stat::ALL
            .iter()
            .map(|s| {
                let v =
                    self.stats.get(&(*s as u32), 0).map_err(|source| Error::Read { map: spec::STATS.name, source })?;
                Ok((*s, v.iter().sum()))
            })
            .collect()
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
            let mut n = 0u32;
            for v in map.iter() {
                n += u32::from(v.map_err(|source| Error::Read { map: m.name, source })? != V::default());
            }
            Ok((n, capacity(m, map)?))
        }
        match m.name {
            names::SVC4 => keys(m, &self.svc4),
            names::SVC6 => keys(m, &self.svc6),
            names::BACKEND4 => keys(m, &self.backend4),
            names::BACKEND6 => keys(m, &self.backend6),
            names::CT4 => keys(m, &self.ct4),
            names::CT6 => keys(m, &self.ct6),
            names::NAMES4 => keys(m, &self.names4),
            names::NAMES6 => keys(m, &self.names6),
            names::REVNAT4 => in_use(m, &self.revnat4),
            names::REVNAT6 => in_use(m, &self.revnat6),
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
        for item in &self.svc4 {
            let (k, v) = item.map_err(read(&spec::SVC4))?;
            let owner = names.get(&(Family::V4, v.rev_nat_id));
            svc_entry(IpAddr::V4(Ipv4Addr::from(k.addr)), (k.port, k.proto, k.scope, k.slot), &v, owner, &mut ops);
        }
        for item in &self.svc6 {
            let (k, v) = item.map_err(read(&spec::SVC6))?;
            let owner = names.get(&(Family::V6, v.rev_nat_id));
            svc_entry(IpAddr::V6(Ipv6Addr::from(k.addr)), (k.port, k.proto, k.scope, k.slot), &v, owner, &mut ops);
        }
        for op in &ops {
            prog.apply(op);
        }
        Ok(prog)
    }
}

/// The ops that rebuild one service-map entry (`(port, proto, scope, slot)`
/// as in the key) in the mirror; `owner`: the frontend's name, if pinned.
fn svc_entry(
    addr: IpAddr,
    (port, proto, scope, slot): (u16, u8, u8, u16),
    v: &SvcValue,
    owner: Option<&String>,
    ops: &mut Vec<Op>,
) {
    let (Some(proto), Some(scope)) = (Proto::from_number(proto), Scope::from_number(scope)) else { return };
    let frontend = Frontend { addr, port: u16::from_be(port), proto, scope };
    if slot == 0 {
        let settings = Settings::from_flags(v.flags, v.affinity_timeout);
        let value = FrontendValue { count: v.count, slot_base: v.slot_base, rev_nat_id: v.rev_nat_id, settings };
        let owner = owner.cloned().unwrap_or_default();
        ops.push(Op::PutRevNat { id: v.rev_nat_id, frontend, owner });
        ops.push(Op::PutFrontend { frontend, value });
    } else {
        ops.push(Op::PutSlot { frontend, slot, backend_id: v.backend_id });
    }
}

fn backend_from(addr: IpAddr, port: u16, proto: u8) -> Option<Backend> {
    Some(Backend { addr, port: u16::from_be(port), proto: Proto::from_number(proto)? })
}

fn svc4_key(f: &Frontend, slot: u16) -> Svc4Key {
    let IpAddr::V4(a) = f.addr else { unreachable!("IPv4 frontend") };
    Svc4Key::new(a, f.port, f.proto.number(), f.scope.number(), slot)
}

fn svc6_key(f: &Frontend, slot: u16) -> Svc6Key {
    let IpAddr::V6(a) = f.addr else { unreachable!("IPv6 frontend") };
    Svc6Key::new(a, f.port, f.proto.number(), f.scope.number(), slot)
}

fn write(map: &'static MapSpec, op: &'static str, object: &impl ToString, r: Result<(), MapError>) -> Result<()> {
    r.map_err(|e| Error::Write { map: map.name, op, object: object.to_string(), detail: describe(map, &e) })
}

/// A map error in words, with the errno and, for a full map, the flag
/// that raises its capacity (from the map table, never guessed by name).
pub fn describe(map: &MapSpec, e: &MapError) -> String {
    match e {
        MapError::SyscallError(s) => match s.io_error.raw_os_error() {
            Some(libc::E2BIG | libc::ENOMEM) => match map.sizing.flag() {
                Some(flag) => format!("the map is full ({}); raise {flag}", s.io_error),
                None => format!("the map is full ({})", s.io_error),
            },
            _ => format!("{} failed: {}", s.call, s.io_error),
        },
        other => other.to_string(),
    }
}

/// Deleting what is already gone is success: the goal state holds.
fn delete(map: &'static MapSpec, object: &impl ToString, r: Result<(), MapError>) -> Result<()> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => write(map, "delete", object, r),
    }
}

impl Kernel for Maps {
    fn apply(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::PutBackend { id, backend } => match backend.addr {
                IpAddr::V4(a) => {
                    let v = Backend4 {
                        addr: a.octets(),
                        port: backend.port.to_be(),
                        proto: backend.proto.number(),
                        flags: 0,
                    };
                    write(&spec::BACKEND4, "insert", &backend, self.backend4.insert(id, v, 0))
                }
                IpAddr::V6(a) => {
                    let v = Backend6 {
                        addr: a.octets(),
                        port: backend.port.to_be(),
                        proto: backend.proto.number(),
                        flags: 0,
                    };
                    write(&spec::BACKEND6, "insert", &backend, self.backend6.insert(id, v, 0))
                }
            },
            Op::DeleteBackend { id, backend } => match backend.family() {
                Family::V4 => delete(&spec::BACKEND4, &backend, self.backend4.remove(id)),
                Family::V6 => delete(&spec::BACKEND6, &backend, self.backend6.remove(id)),
            },
            // The name first: a reverse-NAT entry never exists without it.
            Op::PutRevNat { id, frontend, owner } => match frontend.addr {
                IpAddr::V4(a) => {
                    let name = FrontendName::new(owner);
                    write(&spec::NAMES4, "insert", &frontend, self.names4.insert(id, name, 0))?;
                    let v = RevNat4 { addr: a.octets(), port: frontend.port.to_be(), _pad: [0; 2] };
                    write(&spec::REVNAT4, "set", &frontend, self.revnat4.set(*id, v, 0))
                }
                IpAddr::V6(a) => {
                    let name = FrontendName::new(owner);
                    write(&spec::NAMES6, "insert", &frontend, self.names6.insert(id, name, 0))?;
                    let v = RevNat6 { addr: a.octets(), port: frontend.port.to_be(), _pad: [0; 2] };
                    write(&spec::REVNAT6, "set", &frontend, self.revnat6.set(*id, v, 0))
                }
            },
            Op::ClearRevNat { id, family } => match family {
                Family::V4 => {
                    write(&spec::REVNAT4, "clear", &id, self.revnat4.set(*id, RevNat4::default(), 0))?;
                    delete(&spec::NAMES4, &id, self.names4.remove(id))
                }
                Family::V6 => {
                    write(&spec::REVNAT6, "clear", &id, self.revnat6.set(*id, RevNat6::default(), 0))?;
                    delete(&spec::NAMES6, &id, self.names6.remove(id))
                }
            },
            Op::PutSlot { frontend, slot, backend_id } => {
                let v = SvcValue { backend_id: *backend_id, ..SvcValue::default() };
                let what = format_args!("{frontend} slot {slot}").to_string();
                match frontend.family() {
                    Family::V4 => {
                        write(&spec::SVC4, "insert", &what, self.svc4.insert(svc4_key(frontend, *slot), v, 0))
                    }
                    Family::V6 => {
                        write(&spec::SVC6, "insert", &what, self.svc6.insert(svc6_key(frontend, *slot), v, 0))
                    }
                }
            }
            Op::DeleteSlot { frontend, slot } => {
                let what = format_args!("{frontend} slot {slot}").to_string();
                match frontend.family() {
                    Family::V4 => delete(&spec::SVC4, &what, self.svc4.remove(&svc4_key(frontend, *slot))),
                    Family::V6 => delete(&spec::SVC6, &what, self.svc6.remove(&svc6_key(frontend, *slot))),
                }
            }
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
                match frontend.family() {
                    Family::V4 => {
                        write(&spec::SVC4, "insert", &frontend, self.svc4.insert(svc4_key(frontend, 0), v, 0))
                    }
                    Family::V6 => {
                        write(&spec::SVC6, "insert", &frontend, self.svc6.insert(svc6_key(frontend, 0), v, 0))
                    }
                }
            }
            Op::DeleteFrontend { frontend } => match frontend.family() {
                Family::V4 => delete(&spec::SVC4, &frontend, self.svc4.remove(&svc4_key(frontend, 0))),
                Family::V6 => delete(&spec::SVC6, &frontend, self.svc6.remove(&svc6_key(frontend, 0))),
            },
        }
    }
}
