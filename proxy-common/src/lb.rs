//! Load-balancing side tables: session affinity, source ranges, the node
//! addresses NodePorts answer on, and fragments of service flows.
use core::mem::size_of;

/// A client stuck to a backend of one frontend (ClientIP session
/// affinity), both families in one map. The client is its address (packet
/// path) or its network namespace cookie (socket path, where the source
/// address is not chosen yet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The frontend's id (`SvcValue::rev_nat_id`), host order.
    pub frontend_id: u32,
    /// 4 or 6.
    pub family: u8,
    /// 1 when `client` holds a netns cookie (8 bytes, host order).
    pub by_cookie: u8,
    pub _pad: [u8; 2],
    /// The client's address, network byte order, zero-padded; or a cookie.
    pub client: [u8; 16],
}
const _: () = assert!(size_of::<AffinityKey>() == 24);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// When the client last opened a connection, CLOCK_MONOTONIC ns (coarse).
    pub last_used_ns: u64,
    /// The backend, by id.
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<AffinityValue>() == 16);

/// `(frontend, backend)` is in the frontend's active backend set: lets the
/// datapath tell a sticky backend that left its Service (kept by the agent
/// for frontends with session affinity, as Cilium's `affinity_match`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffMatchKey {
    pub frontend_id: u32,
    pub backend_id: u32,
}
const _: () = assert!(size_of::<AffMatchKey>() == 8);

/// An LPM trie key: prefix length in bits, then the data (kernel layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LpmKey<T> {
    pub prefix_len: u32,
    pub data: T,
}

/// Source-range data, IPv4: the frontend id (big-endian, always covered
/// by the prefix) then the client address. A stored range has prefix
/// length `32 + cidr`; a lookup uses `64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcRange4 {
    pub frontend_id: [u8; 4],
    pub addr: [u8; 4],
}
const _: () = assert!(size_of::<LpmKey<SrcRange4>>() == 12);

/// Source-range data, IPv6 (see `SrcRange4`; lookups use `32 + 128`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcRange6 {
    pub frontend_id: [u8; 4],
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<LpmKey<SrcRange6>>() == 24);

impl SrcRange4 {
    /// Bits of the key before the address.
    pub const ID_BITS: u32 = 32;
}

impl SrcRange6 {
    /// Bits of the key before the address.
    pub const ID_BITS: u32 = 32;
}

/// A fragmented IPv4 datagram: `(saddr, daddr, id, proto)` as the packet
/// carries them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    /// Identification, network byte order.
    pub id: [u8; 2],
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragKey4>() == 12);

/// A fragmented IPv6 datagram (fragment header identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Identification, network byte order.
    pub id: [u8; 4],
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<FragKey6>() == 40);

/// The ports of a fragmented datagram, from its first fragment (network
/// byte order): later fragments carry no transport header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
}
const _: () = assert!(size_of::<FragPorts>() == 4);
