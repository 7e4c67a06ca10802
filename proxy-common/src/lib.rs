//! Map keys, values and names shared by the eBPF datapath and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding and a size
//! assertion, so both sides agree on the layout byte for byte. Addresses and
//! ports are stored as on the wire (network byte order); slots, ids, counts
//! and timestamps are host order.
//!
//! The layout follows Cilium's service maps: a service key is
//! `(vip, port, proto, scope, slot)`. Slot 0 holds the frontend (backend
//! count, the first slot of the active generation, reverse-NAT id, flags);
//! slots `base..base+count` hold backend ids; backends live in their own
//! map. Two slot generations (`SLOT_GEN_A`, `SLOT_GEN_B`) let the agent write
//! a complete new backend set beside the old one and then flip the frontend
//! with one map update: make-before-break with no window of stale slots.
#![no_std]

use core::mem::size_of;
use core::net::{Ipv4Addr, Ipv6Addr};

/// Map names. They are a contract with pinned state: a layout change bumps
/// the `_V<n>` suffix so a new agent never reads an old layout.
pub mod names {
    pub const SVC4: &str = "SVC4_V1";
    pub const SVC6: &str = "SVC6_V1";
    pub const BACKEND4: &str = "BACKEND4_V1";
    pub const BACKEND6: &str = "BACKEND6_V1";
    pub const REVNAT4: &str = "REVNAT4_V1";
    pub const REVNAT6: &str = "REVNAT6_V1";
    pub const CT4: &str = "CT4_V1";
    pub const CT6: &str = "CT6_V1";
    pub const STATS: &str = "STATS_V1";
    pub const CONFIG: &str = "CONFIG_V1";
    pub const NAMES4: &str = "NAMES4_V1";
    pub const NAMES6: &str = "NAMES6_V1";
}

/// Name of the TC program in the object file.
pub const PROGRAM_NAME: &str = "dsproxy_tc";

/// Default capacities; the agent overrides them at load time.
pub mod capacity {
    /// Service map entries per family (frontends plus backend slots).
    pub const SVC: u32 = 131_072;
    /// Backends per family.
    pub const BACKEND: u32 = 65_536;
    /// Reverse-NAT ids per family (one per frontend).
    pub const REVNAT: u32 = 65_536;
    /// Conntrack entries per family (two per flow).
    pub const CT: u32 = 262_144;
}

/// What sets a map's capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sizing {
    /// Service map entries per family (frontends plus backend slots).
    Svc,
    /// Backends per family.
    Backend,
    /// Frontends (reverse-NAT ids) per family.
    RevNat,
    /// Conntrack entries per family (two per flow).
    Ct,
    /// Fixed by the datapath: not configurable.
    Fixed,
}

impl Sizing {
    /// Every configurable sizing, in the order the agent reports them.
    pub const CONFIGURABLE: [Sizing; 4] = [Sizing::Svc, Sizing::Backend, Sizing::RevNat, Sizing::Ct];

    /// The `dsproxy run` flag that sets it.
    pub const fn flag(self) -> Option<&'static str> {
        match self {
            Sizing::Svc => Some("--svc-capacity"),
            Sizing::Backend => Some("--backend-capacity"),
            Sizing::RevNat => Some("--revnat-capacity"),
            Sizing::Ct => Some("--ct-capacity"),
            Sizing::Fixed => None,
        }
    }

    /// The default capacity.
    pub const fn default_capacity(self) -> u32 {
        match self {
            Sizing::Svc => capacity::SVC,
            Sizing::Backend => capacity::BACKEND,
            Sizing::RevNat => capacity::REVNAT,
            Sizing::Ct => capacity::CT,
            Sizing::Fixed => 0,
        }
    }
}

/// One pinned map of the datapath: the single table that loading, pinning,
/// reading back, `status` and capacity errors all work from (as Katran's
/// `balancer_maps.h` keeps its maps in one place).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// Name in the object file and under `<pin-dir>/maps`.
    pub name: &'static str,
    /// Key and value types (for messages and docs) and their sizes.
    pub key: &'static str,
    pub key_size: usize,
    pub value: &'static str,
    pub value_size: usize,
    /// Entries by default.
    pub capacity: u32,
    /// What sets the capacity at load time.
    pub sizing: Sizing,
}

macro_rules! spec {
    ($name:expr, $key:ty, $value:ty, $sizing:expr, $capacity:expr) => {
        MapSpec {
            name: $name,
            key: stringify!($key),
            key_size: size_of::<$key>(),
            value: stringify!($value),
            value_size: size_of::<$value>(),
            capacity: $capacity,
            sizing: $sizing,
        }
    };
}

/// The datapath's pinned maps.
pub mod maps {
    use super::{
        Backend4, Backend6, Ct4Key, Ct4Value, Ct6Key, Ct6Value, DatapathConfig, FrontendName, MapSpec, RevNat4,
        RevNat6, Sizing, Stat, Svc4Key, Svc6Key, SvcValue, capacity, names, size_of,
    };

    pub const SVC4: MapSpec = spec!(names::SVC4, Svc4Key, SvcValue, Sizing::Svc, capacity::SVC);
    pub const SVC6: MapSpec = spec!(names::SVC6, Svc6Key, SvcValue, Sizing::Svc, capacity::SVC);
    pub const BACKEND4: MapSpec = spec!(names::BACKEND4, u32, Backend4, Sizing::Backend, capacity::BACKEND);
    pub const BACKEND6: MapSpec = spec!(names::BACKEND6, u32, Backend6, Sizing::Backend, capacity::BACKEND);
    pub const REVNAT4: MapSpec = spec!(names::REVNAT4, u32, RevNat4, Sizing::RevNat, capacity::REVNAT);
    pub const REVNAT6: MapSpec = spec!(names::REVNAT6, u32, RevNat6, Sizing::RevNat, capacity::REVNAT);
    pub const CT4: MapSpec = spec!(names::CT4, Ct4Key, Ct4Value, Sizing::Ct, capacity::CT);
    pub const CT6: MapSpec = spec!(names::CT6, Ct6Key, Ct6Value, Sizing::Ct, capacity::CT);
    pub const STATS: MapSpec = spec!(names::STATS, u32, u64, Sizing::Fixed, Stat::COUNT);
    pub const CONFIG: MapSpec = spec!(names::CONFIG, u32, DatapathConfig, Sizing::Fixed, 1);
    pub const NAMES4: MapSpec = spec!(names::NAMES4, u32, FrontendName, Sizing::RevNat, capacity::REVNAT);
    pub const NAMES6: MapSpec = spec!(names::NAMES6, u32, FrontendName, Sizing::RevNat, capacity::REVNAT);

    /// Every pinned map, in the order the agent reports them.
    pub const ALL: [MapSpec; 12] =
        [SVC4, SVC6, BACKEND4, BACKEND6, REVNAT4, REVNAT6, CT4, CT6, STATS, CONFIG, NAMES4, NAMES6];

    /// The spec of the map called `name`.
    pub fn by_name(name: &str) -> Option<&'static MapSpec> {
        ALL.iter().find(|m| m.name == name)
    }
}

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Scope of a frontend entry. Only ClusterIP (`SCOPE_EXTERNAL`) exists today;
/// `SCOPE_INTERNAL` is reserved for the Local-only view of traffic policies.
pub const SCOPE_EXTERNAL: u8 = 0;
pub const SCOPE_INTERNAL: u8 = 1;

/// Largest number of backends one frontend can hold.
pub const MAX_BACKENDS_PER_SVC: u16 = 16_383;
/// First backend slot of generation A.
pub const SLOT_GEN_A: u16 = 1;
/// First backend slot of generation B.
pub const SLOT_GEN_B: u16 = 1 + MAX_BACKENDS_PER_SVC;

/// Frontend flags (`SvcValue::flags`, slot 0).
pub mod svc_flags {
    /// The frontend's kind, two bits.
    pub const KIND_MASK: u32 = 0b11;
    pub const KIND_CLUSTER_IP: u32 = 0;
    pub const KIND_NODE_PORT: u32 = 1;
    pub const KIND_EXTERNAL_IP: u32 = 2;
    pub const KIND_LOAD_BALANCER: u32 = 3;
    /// ClientIP session affinity; the timeout is `SvcValue::affinity_timeout`.
    pub const AFFINITY: u32 = 1 << 2;
    /// No backends: drop new connections instead of refusing them.
    pub const DROP_WHEN_EMPTY: u32 = 1 << 3;
    /// Only sources in the frontend's source ranges are admitted.
    pub const SOURCE_RANGES: u32 = 1 << 4;
    /// An internal-scope entry exists: clients on this node use it.
    pub const TWO_SCOPES: u32 = 1 << 5;
    /// externalTrafficPolicy Local: external clients keep their address.
    pub const EXTERNAL_LOCAL: u32 = 1 << 6;
}

/// Service map key, IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc4Key {
    /// Service address, network byte order.
    pub addr: [u8; 4],
    /// Service port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
    /// 0 for the frontend, otherwise a backend slot. Host byte order.
    pub slot: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Svc4Key>() == 12);

/// Service map key, IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Svc6Key {
    /// Service address, network byte order.
    pub addr: [u8; 16],
    /// Service port, network byte order.
    pub port: u16,
    /// IP protocol number.
    pub proto: u8,
    /// `SCOPE_*`.
    pub scope: u8,
    /// 0 for the frontend, otherwise a backend slot. Host byte order.
    pub slot: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Svc6Key>() == 24);

impl Svc4Key {
    /// Key from host-order fields.
    pub const fn new(addr: Ipv4Addr, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self { addr: addr.octets(), port: port.to_be(), proto, scope, slot, _pad: [0; 2] }
    }
}

impl Svc4Key {
    /// Key from wire-format fields (`port` already in network byte order).
    #[inline(always)]
    pub const fn from_wire(addr: [u8; 4], port: u16, proto: u8, slot: u16) -> Self {
        Self { addr, port, proto, scope: SCOPE_EXTERNAL, slot, _pad: [0; 2] }
    }
}

impl Svc6Key {
    /// Key from wire-format fields (`port` already in network byte order).
    #[inline(always)]
    pub const fn from_wire(addr: [u8; 16], port: u16, proto: u8, slot: u16) -> Self {
        Self { addr, port, proto, scope: SCOPE_EXTERNAL, slot, _pad: [0; 2] }
    }

    /// Key from host-order fields.
    pub const fn new(addr: Ipv6Addr, port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self { addr: addr.octets(), port: port.to_be(), proto, scope, slot, _pad: [0; 2] }
    }
}

/// Service map value, both families. Slot 0 (frontend) uses `count`,
/// `slot_base`, `rev_nat_id`, `flags` and `affinity_timeout`; backend slots
/// use only `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcValue {
    /// Frontend: number of backends in the active generation. Host order.
    pub count: u16,
    /// Frontend: first slot of the active generation (`SLOT_GEN_A` or `SLOT_GEN_B`).
    pub slot_base: u16,
    /// Backend slot: id of the backend in `BACKEND{4,6}`. Host order.
    pub backend_id: u32,
    /// Frontend: index into `REVNAT{4,6}`. Host order.
    pub rev_nat_id: u32,
    /// Frontend: `svc_flags::*`.
    pub flags: u32,
    /// Frontend: session affinity timeout in seconds (0: none).
    pub affinity_timeout: u32,
}
const _: () = assert!(size_of::<SvcValue>() == 20);

/// Backend, IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend4 {
    /// Backend address, network byte order.
    pub addr: [u8; 4],
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// Reserved, 0.
    pub flags: u8,
}
const _: () = assert!(size_of::<Backend4>() == 8);

/// Backend, IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend6 {
    /// Backend address, network byte order.
    pub addr: [u8; 16],
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// Reserved, 0.
    pub flags: u8,
}
const _: () = assert!(size_of::<Backend6>() == 20);

/// Reverse-NAT entry: the frontend a reply is rewritten back to, IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat4 {
    /// Service address, network byte order.
    pub addr: [u8; 4],
    /// Service port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<RevNat4>() == 8);

/// Reverse-NAT entry, IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat6 {
    /// Service address, network byte order.
    pub addr: [u8; 16],
    /// Service port, network byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<RevNat6>() == 20);

/// The name of the Service port a frontend belongs to (`namespace/name:port`),
/// by reverse-NAT id, in `NAMES{4,6}`: written by the agent, read back at
/// restart and by `dsproxy inspect`; the datapath never reads it. UTF-8,
/// padded with zeros; the longest Kubernetes name (63 + 1 + 63 + 1 + 15
/// bytes) fits.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrontendName {
    pub bytes: [u8; FrontendName::LEN],
}
const _: () = assert!(size_of::<FrontendName>() == 144);

impl FrontendName {
    pub const LEN: usize = 144;

    /// `name`, cut at a character boundary if longer than `LEN` bytes.
    pub fn new(name: &str) -> Self {
        let mut end = name.len().min(Self::LEN);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; Self::LEN];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        Self { bytes }
    }

    /// The name, up to the first zero; `None` if it is not UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        let end = self.bytes.iter().position(|b| *b == 0).unwrap_or(Self::LEN);
        core::str::from_utf8(&self.bytes[..end]).ok()
    }
}

impl Default for FrontendName {
    fn default() -> Self {
        Self { bytes: [0; Self::LEN] }
    }
}

/// Conntrack direction (`Ct*Key::dir`).
pub const CT_DIR_FORWARD: u8 = 0;
pub const CT_DIR_REVERSE: u8 = 1;

/// Conntrack key, IPv4. A forward entry is keyed by the packet as the client
/// sends it (client -> VIP); a reverse entry by the reply as the backend sends
/// it (backend -> client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    /// Network byte order.
    pub saddr: [u8; 4],
    /// Network byte order.
    pub daddr: [u8; 4],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_*`.
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Ct4Key>() == 16);

/// Conntrack key, IPv6 (see `Ct4Key`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ct6Key {
    /// Network byte order.
    pub saddr: [u8; 16],
    /// Network byte order.
    pub daddr: [u8; 16],
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_*`.
    pub dir: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Ct6Key>() == 40);

impl Ct4Key {
    /// Key from wire-format `(address, port)` pairs.
    #[inline(always)]
    pub const fn from_wire(src: ([u8; 4], u16), dst: ([u8; 4], u16), proto: u8, dir: u8) -> Self {
        Self { saddr: src.0, daddr: dst.0, sport: src.1, dport: dst.1, proto, dir, _pad: [0; 2] }
    }
}

impl Ct6Key {
    /// Key from wire-format `(address, port)` pairs.
    #[inline(always)]
    pub const fn from_wire(src: ([u8; 16], u16), dst: ([u8; 16], u16), proto: u8, dir: u8) -> Self {
        Self { saddr: src.0, daddr: dst.0, sport: src.1, dport: dst.1, proto, dir, _pad: [0; 2] }
    }
}

/// Conntrack state bits (`Ct*Value::state`).
pub mod ct_state {
    /// The backend has answered.
    pub const SEEN_REPLY: u8 = 1 << 0;
    /// FIN from the client.
    pub const FIN_FWD: u8 = 1 << 1;
    /// FIN from the backend.
    pub const FIN_REV: u8 = 1 << 2;
    /// RST in either direction.
    pub const RST: u8 = 1 << 3;
}

/// Conntrack timeouts, nanoseconds of `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
pub mod ct_timeout {
    const SEC: u64 = 1_000_000_000;
    /// TCP before the backend answered.
    pub const TCP_SYN: u64 = 60 * SEC;
    /// TCP once both sides spoke and neither closed.
    pub const TCP_ESTABLISHED: u64 = 6 * 3600 * SEC;
    /// TCP after RST, or after a FIN in each direction.
    pub const TCP_CLOSE: u64 = 10 * SEC;
    /// UDP, refreshed by traffic in either direction.
    pub const UDP: u64 = 60 * SEC;
}

/// Runtime settings the datapath reads: the one entry of `CONFIG`. The
/// agent writes it at start (from its configuration); a zero field means
/// the built-in default (`ct_timeout`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// TCP before the backend answered, nanoseconds.
    pub tcp_syn_ns: u64,
    /// TCP once both sides spoke and neither closed, nanoseconds.
    pub tcp_established_ns: u64,
    /// TCP after RST, or after a FIN in each direction, nanoseconds.
    pub tcp_close_ns: u64,
    /// UDP, refreshed by traffic in either direction, nanoseconds.
    pub udp_ns: u64,
}
const _: () = assert!(size_of::<DatapathConfig>() == 32);

impl DatapathConfig {
    /// The built-in timeouts.
    pub const DEFAULT: Self = Self {
        tcp_syn_ns: ct_timeout::TCP_SYN,
        tcp_established_ns: ct_timeout::TCP_ESTABLISHED,
        tcp_close_ns: ct_timeout::TCP_CLOSE,
        udp_ns: ct_timeout::UDP,
    };
}

/// Conntrack value, IPv4. Forward entries hold the backend, the state and
/// the expiry; reverse entries hold only `rev_nat_id` and point back to the
/// forward entry, which stays the one source of state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Value {
    /// Forward: expiry, `bpf_ktime_get_ns` nanoseconds.
    pub expires: u64,
    /// Forward: backend id the flow was given.
    pub backend_id: u32,
    /// Both: index into `REVNAT4`.
    pub rev_nat_id: u32,
    /// Forward: backend address, network byte order.
    pub backend_addr: [u8; 4],
    /// Forward: backend port, network byte order.
    pub backend_port: u16,
    /// Forward: `ct_state::*`.
    pub state: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<Ct4Value>() == 24);

/// Conntrack value, IPv6 (see `Ct4Value`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct6Value {
    /// Forward: expiry, `bpf_ktime_get_ns` nanoseconds.
    pub expires: u64,
    /// Forward: backend id the flow was given.
    pub backend_id: u32,
    /// Both: index into `REVNAT6`.
    pub rev_nat_id: u32,
    /// Forward: backend address, network byte order.
    pub backend_addr: [u8; 16],
    /// Forward: backend port, network byte order.
    pub backend_port: u16,
    /// Forward: `ct_state::*`.
    pub state: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<Ct6Value>() == 40);

/// Counter indices in `STATS` (a per-CPU array of u64). Numbers are stable:
/// never renumber, only append.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    PassNotIp = 0,
    /// IPv4/IPv6 but not TCP or UDP (ICMP, extension headers, ...).
    PassNotL4 = 1,
    /// IPv4 fragment.
    PassFragment = 2,
    /// Headers shorter than they claim.
    PassMalformed = 3,
    /// TCP/UDP not addressed to a service and not a reply of a tracked flow.
    PassNoService = 4,
    /// Addressed to a service with no backends.
    PassNoBackend = 5,
    /// New flow translated to a backend.
    DnatNew = 6,
    /// Packet of a tracked flow translated to its backend.
    DnatEstablished = 7,
    /// Reply translated back to the service address.
    RevNat = 8,
    /// A helper failed while rewriting; the packet was dropped.
    DropRewrite = 9,
    /// Conntrack insert failed; the packet was translated anyway.
    CtInsertFailed = 10,
    /// A reverse entry whose reverse-NAT id is unknown.
    PassStaleRevNat = 11,
    /// New connection to a frontend without backends: answered with a TCP
    /// RST or ICMP port unreachable.
    RejectNoBackend = 12,
    /// UDP flow whose backend was removed: moved to a live backend.
    UdpRepick = 13,
}

impl Stat {
    pub const COUNT: u32 = 14;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::PassNotIp,
        Stat::PassNotL4,
        Stat::PassFragment,
        Stat::PassMalformed,
        Stat::PassNoService,
        Stat::PassNoBackend,
        Stat::DnatNew,
        Stat::DnatEstablished,
        Stat::RevNat,
        Stat::DropRewrite,
        Stat::CtInsertFailed,
        Stat::PassStaleRevNat,
        Stat::RejectNoBackend,
        Stat::UdpRepick,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::PassNotIp => "pass_not_ip",
            Stat::PassNotL4 => "pass_not_l4",
            Stat::PassFragment => "pass_fragment",
            Stat::PassMalformed => "pass_malformed",
            Stat::PassNoService => "pass_no_service",
            Stat::PassNoBackend => "pass_no_backend",
            Stat::DnatNew => "dnat_new",
            Stat::DnatEstablished => "dnat_established",
            Stat::RevNat => "rev_nat",
            Stat::DropRewrite => "drop_rewrite",
            Stat::CtInsertFailed => "ct_insert_failed",
            Stat::PassStaleRevNat => "pass_stale_rev_nat",
            Stat::RejectNoBackend => "reject_no_backend",
            Stat::UdpRepick => "udp_repick",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, made only of integers and byte
    // arrays, with explicit padding, so any bit pattern is valid and there
    // are no implicit padding bytes.
    unsafe impl aya::Pod for super::Svc4Key {}
    unsafe impl aya::Pod for super::Svc6Key {}
    unsafe impl aya::Pod for super::SvcValue {}
    unsafe impl aya::Pod for super::Backend4 {}
    unsafe impl aya::Pod for super::Backend6 {}
    unsafe impl aya::Pod for super::RevNat4 {}
    unsafe impl aya::Pod for super::RevNat6 {}
    unsafe impl aya::Pod for super::Ct4Key {}
    unsafe impl aya::Pod for super::Ct6Key {}
    unsafe impl aya::Pod for super::Ct4Value {}
    unsafe impl aya::Pod for super::Ct6Value {}
    unsafe impl aya::Pod for super::DatapathConfig {}
    unsafe impl aya::Pod for super::FrontendName {}
}
