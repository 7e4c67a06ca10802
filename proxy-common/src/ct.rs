//! Connection tracking: two LRU maps per family, one entry in each per
//! flow.
//!
//! - The **forward** entry, keyed by the client's packet as it arrives
//!   (client -> frontend), holds the flow's state: backend, the source the
//!   backend sees (the client, or a SNAT address), TCP state, expiry and
//!   how the flow is delivered.
//! - The **reverse** entry, keyed by the backend's reply as it arrives
//!   (backend -> the address it answers), says who the reply goes back to.
//!   It is only valid while the forward entry of the same flow lives and
//!   still names this backend: nothing of a closed or expired flow touches
//!   a later connection that reuses the tuple.
use core::mem::size_of;

/// Conntrack key: the 5-tuple as the packet carries it. `A` is the
/// address type of the family (`CtKey4`, `CtKey6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey<A> {
    /// Network byte order.
    pub saddr: A,
    /// Network byte order.
    pub daddr: A,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Conntrack key, IPv4.
pub type CtKey4 = CtKey<[u8; 4]>;
/// Conntrack key, IPv6.
pub type CtKey6 = CtKey<[u8; 16]>;
const _: () = assert!(size_of::<CtKey4>() == 16);
const _: () = assert!(size_of::<CtKey6>() == 40);

impl<A: Copy> CtKey<A> {
    /// Key from wire-format `(address, port)` pairs.
    #[inline(always)]
    pub const fn new(src: (A, u16), dst: (A, u16), proto: u8) -> Self {
        Self { saddr: src.0, daddr: dst.0, sport: src.1, dport: dst.1, proto, _pad: [0; 3] }
    }
}

/// Forward entry: the flow's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtFwd<A> {
    /// Expiry, CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_coarse_ns`).
    pub expires: u64,
    /// The backend's id in `BACKEND{4,6}`.
    pub backend_id: u32,
    /// The frontend's id (`SvcValue::rev_nat_id`).
    pub frontend_id: u32,
    /// Backend address and port, network byte order.
    pub backend: A,
    pub backend_port: u16,
    /// The source the backend sees: the client's own address and port, or
    /// the SNAT address and port (`ct_flags::SNAT`). Network byte order.
    pub nat: A,
    pub nat_port: u16,
    /// `ct_state::*`.
    pub state: u8,
    /// `ct_flags::*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// The route towards the backend of a flow delivered past the host
    /// stack (`ct_flags::BYPASS`), cached from the FIB lookup of an earlier
    /// packet. (The way back is in the reverse entry: each direction reads
    /// one entry's cache lines.)
    pub to_backend: Hop,
}

/// Forward entry, IPv4.
pub type CtFwd4 = CtFwd<[u8; 4]>;
/// Forward entry, IPv6.
pub type CtFwd6 = CtFwd<[u8; 16]>;
const _: () = assert!(size_of::<CtFwd4>() == 64);
const _: () = assert!(size_of::<CtFwd6>() == 88);

/// A route cached in a flow: where its packets in one direction leave
/// and with which MACs. Used while `until` is in the future and `gen` is
/// the configuration's `route_gen` (the agent bumps it whenever the
/// interfaces it handles change); otherwise the next packet looks the
/// route up again and caches it anew. So a changed route or neighbour
/// reaches a flow within `ROUTE_CACHE_NS`, an interface dsproxy stops
/// handling at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Hop {
    /// CLOCK_MONOTONIC time (coarse) until which the route holds; 0: none cached.
    pub until: u64,
    /// `DatapathConfig::route_gen` when it was cached.
    pub route_gen: u32,
    /// The interface the packets leave by (one of ours).
    pub ifindex: u32,
    /// Its MTU, for the check the FIB lookup made on the first packet.
    pub mtu: u16,
    /// `hop_flags::*`.
    pub flags: u16,
    /// Destination MAC, then source MAC: the Ethernet header's first 12
    /// bytes.
    pub macs: [u8; 12],
}
const _: () = assert!(size_of::<Hop>() == 32);

/// `Hop::flags`.
pub mod hop_flags {
    /// The interface faces a pod: `bpf_redirect_peer` into its namespace.
    pub const POD: u16 = 1 << 0;
}

/// How long a flow keeps a route it looked up: one FIB lookup per second
/// and direction of a flow, instead of one per packet.
pub const ROUTE_CACHE_NS: u64 = 1_000_000_000;

/// Reverse entry: where a reply goes back to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtRev<A> {
    /// The client's own address and port, network byte order.
    pub client: A,
    pub client_port: u16,
    /// The address and port the client connected to, network byte order:
    /// the reply's new source, and with the client the forward entry's key.
    pub frontend: A,
    pub frontend_port: u16,
    /// `ct_flags::*`, as the forward entry had them at creation.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// The route back to the client of a flow delivered past the host
    /// stack, cached as `CtFwd::to_backend` is.
    pub to_client: Hop,
}

/// Reverse entry, IPv4.
pub type CtRev4 = CtRev<[u8; 4]>;
/// Reverse entry, IPv6.
pub type CtRev6 = CtRev<[u8; 16]>;
const _: () = assert!(size_of::<CtRev4>() == 48);
const _: () = assert!(size_of::<CtRev6>() == 72);

/// TCP state bits (`CtFwd*::state`).
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

/// How a flow travels (`CtFwd*::flags`, `CtRev*::flags`).
pub mod ct_flags {
    /// Redirected past the host stack (BPF host routing): replies are
    /// translated at TC ingress and redirected too. Without it the host
    /// stack forwards the flow, already translated both ways, and replies
    /// are translated at TC egress towards the client.
    pub const BYPASS: u8 = 1 << 0;
    /// The source is translated too (`nat` is not the client).
    pub const SNAT: u8 = 1 << 1;
    /// The client is its own backend (a pod reaching its own Service).
    pub const HAIRPIN: u8 = 1 << 2;
    /// The client came in through a node device (external traffic).
    pub const EXTERNAL: u8 = 1 << 3;
}

/// Default conntrack timeouts, nanoseconds of CLOCK_MONOTONIC; the agent's
/// configuration overrides them (`CONFIG`).
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
