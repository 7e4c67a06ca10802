//! Service maps: frontends and their backend slots (Cilium's layout), the
//! backends, and the reverse-NAT ids the agent allocates per frontend.
//!
//! A service key is `(vip, port, proto, scope, slot)`. Slot 0 holds the
//! frontend (backend count, the first slot of the active generation, the
//! frontend id, flags); slots `base..base+count` hold backend ids; backends
//! live in their own map. Two slot generations (`SLOT_GEN_A`, `SLOT_GEN_B`)
//! let the agent write a complete new backend set beside the old one and
//! then flip the frontend with one map update: make-before-break with no
//! window of stale slots.
use core::{
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr},
};

/// Scope of a frontend entry (Cilium's two scopes): `SCOPE_EXTERNAL` is the
/// entry every client uses; when it carries `svc_flags::TWO_SCOPES`, clients
/// on this node use the `SCOPE_INTERNAL` entry instead.
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
    pub const fn from_wire(addr: [u8; 4], port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self { addr, port, proto, scope, slot, _pad: [0; 2] }
    }
}

impl Svc6Key {
    /// Key from wire-format fields (`port` already in network byte order).
    #[inline(always)]
    pub const fn from_wire(addr: [u8; 16], port: u16, proto: u8, scope: u8, slot: u16) -> Self {
        Self { addr, port, proto, scope, slot, _pad: [0; 2] }
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
    /// Frontend: its id (per family; indexes `REVNAT{4,6}`, keys session
    /// affinity and source ranges). Host order.
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
