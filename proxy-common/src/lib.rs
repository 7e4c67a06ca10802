//! Map keys, values and names shared by the eBPF datapath and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding and a size
//! assertion, so both sides agree on the layout byte for byte. Addresses and
//! ports are stored as on the wire (network byte order); slots, ids, counts
//! and timestamps are host order. One struct per family, never unions.
//!
//! Modules: `svc` (frontends, backend slots, backends), `ct` (connection
//! tracking), `lb` (session affinity, source ranges, NodePort addresses,
//! fragments), `sock` (socket-level load balancing), `config` (runtime
//! settings, interfaces), `stats` (counters). `maps` is the one table of
//! pinned maps that loading, pinning, reading back and error messages all
//! work from.
#![no_std]

pub mod config;
pub mod ct;
pub mod lb;
pub mod sock;
pub mod stats;
pub mod svc;

use core::mem::size_of;

pub use config::{DatapathConfig, IfaceInfo, config_flags, iface_role};
pub use ct::{
    CtFwd, CtFwd4, CtFwd6, CtKey, CtKey4, CtKey6, CtRev, CtRev4, CtRev6, Hop, ROUTE_CACHE_NS, ct_flags, ct_state,
    ct_timeout, hop_flags,
};
pub use lb::{AffMatchKey, AffinityKey, AffinityValue, FragKey4, FragKey6, FragPorts, SrcRange4, SrcRange6};
pub use sock::{
    SockConn, SockConn4, SockConn6, SockFwd, SockFwd4, SockFwd6, SockKey4, SockKey6, SockRev, SockRev4, SockRev6,
    SockRevKey4, SockRevKey6,
};
pub use stats::{Stat, StatSlot};
pub use svc::{
    Backend4, Backend6, FrontendName, MAX_BACKENDS_PER_SVC, RevNat4, RevNat6, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    SLOT_GEN_A, SLOT_GEN_B, Svc4Key, Svc6Key, SvcValue, svc_flags,
};

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Map names. They are a contract with pinned state: a layout change bumps
/// the `_V<n>` suffix so a new agent never reads an old layout.
pub mod names {
    pub const SVC4: &str = "SVC4_V1";
    pub const SVC6: &str = "SVC6_V1";
    pub const BACKEND4: &str = "BACKEND4_V1";
    pub const BACKEND6: &str = "BACKEND6_V1";
    pub const REVNAT4: &str = "REVNAT4_V1";
    pub const REVNAT6: &str = "REVNAT6_V1";
    pub const CT4_FWD: &str = "CT4_FWD_V3";
    pub const CT4_REV: &str = "CT4_REV_V3";
    pub const CT6_FWD: &str = "CT6_FWD_V3";
    pub const CT6_REV: &str = "CT6_REV_V3";
    pub const FRAG4: &str = "FRAG4_V1";
    pub const FRAG6: &str = "FRAG6_V1";
    pub const AFFINITY: &str = "AFFINITY_V1";
    pub const AFFMATCH4: &str = "AFFMATCH4_V1";
    pub const AFFMATCH6: &str = "AFFMATCH6_V1";
    pub const SRCRANGE4: &str = "SRCRANGE4_V1";
    pub const SRCRANGE6: &str = "SRCRANGE6_V1";
    pub const NODEPORT4: &str = "NODEPORT4_V1";
    pub const NODEPORT6: &str = "NODEPORT6_V1";
    pub const SOCK4_FWD: &str = "SOCK4_FWD_V1";
    pub const SOCK4_REV: &str = "SOCK4_REV_V1";
    pub const SOCK6_FWD: &str = "SOCK6_FWD_V1";
    pub const SOCK6_REV: &str = "SOCK6_REV_V1";
    pub const SOCK4_CONN: &str = "SOCK4_CONN_V1";
    pub const SOCK6_CONN: &str = "SOCK6_CONN_V1";
    pub const IFACES: &str = "IFACES_V1";
    pub const STATS: &str = "STATS_V3";
    pub const CONFIG: &str = "CONFIG_V2";
    pub const NAMES4: &str = "NAMES4_V1";
    pub const NAMES6: &str = "NAMES6_V1";
    pub const FILTER4: &str = "FILTER4_V1";
    pub const FILTER6: &str = "FILTER6_V1";
}

/// The frontend-address filter: one bit per hash of an address, set for
/// every frontend address and every node address NodePorts answer on (a
/// Bloom filter with one hash, per family, in an array map of `WORDS`
/// 64-bit words). A packet whose destination's bit is clear is addressed
/// to no frontend, and skips the service and NodePort lookups; a set bit
/// may be another address's (then the lookups answer). The agent sets an
/// address's bit before the first entry that needs it and clears it only
/// once no entry does.
pub mod filter {
    /// log2 of the bits per family.
    pub const BITS_LOG2: u32 = 18;
    /// 64-bit words per family (32 KiB).
    pub const WORDS: u32 = 1 << (BITS_LOG2 - 6);

    /// The bit of an address (network byte order): its 32-bit words folded
    /// by XOR, then a multiplicative (Fibonacci) hash.
    #[inline(always)]
    pub fn bit<const N: usize>(addr: &[u8; N]) -> u32 {
        let mut folded = 0u32;
        let mut i = 0;
        while i + 4 <= N {
            folded ^= u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
            i += 4;
        }
        folded.wrapping_mul(0x9E37_79B1) >> (32 - BITS_LOG2)
    }
}

/// Program names in the object file.
pub mod programs {
    /// TC ingress of pod-facing interfaces: clients here are on this node.
    pub const FROM_POD: &str = "dsproxy_from_pod";
    /// TC ingress of node devices (uplinks): clients here are external.
    pub const FROM_DEVICE: &str = "dsproxy_from_device";
    /// TC egress of every attached interface: replies of flows the host
    /// stack forwarded, and ICMP errors about them.
    pub const EGRESS: &str = "dsproxy_egress";
    /// Benchmark floor: parse and one lookup (never attached).
    pub const FLOOR: &str = "dsproxy_floor";
    /// Benchmark floors of one stage each (never attached): parse and the
    /// flow's conntrack lookup; parse, the service lookup and a new flow's
    /// two conntrack inserts.
    pub const FLOOR_FLOW: &str = "dsproxy_floor_flow";
    pub const FLOOR_NEW: &str = "dsproxy_floor_new";
    /// Socket-level load balancing (cgroup `sock_addr` hooks), by hook.
    pub const SOCK: [(&str, &str); 8] = [
        ("connect4", "dsproxy_connect4"),
        ("connect6", "dsproxy_connect6"),
        ("sendmsg4", "dsproxy_sendmsg4"),
        ("sendmsg6", "dsproxy_sendmsg6"),
        ("recvmsg4", "dsproxy_recvmsg4"),
        ("recvmsg6", "dsproxy_recvmsg6"),
        ("getpeername4", "dsproxy_getpeername4"),
        ("getpeername6", "dsproxy_getpeername6"),
    ];
}

/// Default capacities; the agent overrides them at load time.
pub mod capacity {
    /// Service map entries per family (frontends plus backend slots).
    pub const SVC: u32 = 131_072;
    /// Backends per family.
    pub const BACKEND: u32 = 65_536;
    /// Reverse-NAT ids per family (one per frontend).
    pub const REVNAT: u32 = 65_536;
    /// Conntrack flows per family (one forward and one reverse entry each).
    pub const CT: u32 = 262_144;
    /// Session-affinity clients, both families.
    pub const AFFINITY: u32 = 65_536;
    /// Socket-level translations per family.
    pub const SOCK: u32 = 65_536;
    /// Fragmented datagrams in flight per family.
    pub const FRAG: u32 = 8_192;
    /// loadBalancerSourceRanges entries per family.
    pub const SRCRANGE: u32 = 16_384;
    /// Node addresses NodePorts answer on, per family.
    pub const NODEPORT: u32 = 256;
    /// Attached interfaces.
    pub const IFACES: u32 = 4_096;
}

/// What sets a map's capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sizing {
    /// Service map entries per family (frontends plus backend slots).
    Svc,
    /// Backends per family (also sizes the affinity-membership map).
    Backend,
    /// Frontends (reverse-NAT ids) per family.
    RevNat,
    /// Conntrack flows per family.
    Ct,
    /// Session-affinity clients.
    Affinity,
    /// Socket-level translations per family.
    Sock,
    /// Fixed by the datapath: not configurable.
    Fixed,
}

impl Sizing {
    /// Every configurable sizing, in the order the agent reports them.
    pub const CONFIGURABLE: [Sizing; 6] =
        [Sizing::Svc, Sizing::Backend, Sizing::RevNat, Sizing::Ct, Sizing::Affinity, Sizing::Sock];

    /// The `dsproxy run` flag that sets it.
    pub const fn flag(self) -> Option<&'static str> {
        match self {
            Sizing::Svc => Some("--svc-capacity"),
            Sizing::Backend => Some("--backend-capacity"),
            Sizing::RevNat => Some("--revnat-capacity"),
            Sizing::Ct => Some("--ct-capacity"),
            Sizing::Affinity => Some("--affinity-capacity"),
            Sizing::Sock => Some("--sock-capacity"),
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
            Sizing::Affinity => capacity::AFFINITY,
            Sizing::Sock => capacity::SOCK,
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
        AffMatchKey, AffinityKey, AffinityValue, Backend4, Backend6, CtFwd4, CtFwd6, CtKey4, CtKey6, CtRev4, CtRev6,
        DatapathConfig, FragKey4, FragKey6, FragPorts, FrontendName, IfaceInfo, MapSpec, RevNat4, RevNat6, Sizing,
        SockFwd4, SockFwd6, SockKey4, SockKey6, SockRev4, SockRev6, SockRevKey4, SockRevKey6, SrcRange4, SrcRange6,
        StatSlot, Svc4Key, Svc6Key, SvcValue, capacity, filter, names, size_of,
    };

    pub const SVC4: MapSpec = spec!(names::SVC4, Svc4Key, SvcValue, Sizing::Svc, capacity::SVC);
    pub const SVC6: MapSpec = spec!(names::SVC6, Svc6Key, SvcValue, Sizing::Svc, capacity::SVC);
    pub const BACKEND4: MapSpec = spec!(names::BACKEND4, u32, Backend4, Sizing::Backend, capacity::BACKEND);
    pub const BACKEND6: MapSpec = spec!(names::BACKEND6, u32, Backend6, Sizing::Backend, capacity::BACKEND);
    pub const REVNAT4: MapSpec = spec!(names::REVNAT4, u32, RevNat4, Sizing::RevNat, capacity::REVNAT);
    pub const REVNAT6: MapSpec = spec!(names::REVNAT6, u32, RevNat6, Sizing::RevNat, capacity::REVNAT);
    pub const CT4_FWD: MapSpec = spec!(names::CT4_FWD, CtKey4, CtFwd4, Sizing::Ct, capacity::CT);
    pub const CT4_REV: MapSpec = spec!(names::CT4_REV, CtKey4, CtRev4, Sizing::Ct, capacity::CT);
    pub const CT6_FWD: MapSpec = spec!(names::CT6_FWD, CtKey6, CtFwd6, Sizing::Ct, capacity::CT);
    pub const CT6_REV: MapSpec = spec!(names::CT6_REV, CtKey6, CtRev6, Sizing::Ct, capacity::CT);
    pub const FRAG4: MapSpec = spec!(names::FRAG4, FragKey4, FragPorts, Sizing::Fixed, capacity::FRAG);
    pub const FRAG6: MapSpec = spec!(names::FRAG6, FragKey6, FragPorts, Sizing::Fixed, capacity::FRAG);
    pub const AFFINITY: MapSpec =
        spec!(names::AFFINITY, AffinityKey, AffinityValue, Sizing::Affinity, capacity::AFFINITY);
    pub const AFFMATCH4: MapSpec = spec!(names::AFFMATCH4, AffMatchKey, u8, Sizing::Backend, capacity::BACKEND);
    pub const AFFMATCH6: MapSpec = spec!(names::AFFMATCH6, AffMatchKey, u8, Sizing::Backend, capacity::BACKEND);
    pub const SRCRANGE4: MapSpec = spec!(names::SRCRANGE4, SrcRange4, u8, Sizing::Fixed, capacity::SRCRANGE);
    pub const SRCRANGE6: MapSpec = spec!(names::SRCRANGE6, SrcRange6, u8, Sizing::Fixed, capacity::SRCRANGE);
    pub const NODEPORT4: MapSpec = spec!(names::NODEPORT4, [u8; 4], u8, Sizing::Fixed, capacity::NODEPORT);
    pub const NODEPORT6: MapSpec = spec!(names::NODEPORT6, [u8; 16], u8, Sizing::Fixed, capacity::NODEPORT);
    pub const SOCK4_FWD: MapSpec = spec!(names::SOCK4_FWD, SockKey4, SockFwd4, Sizing::Sock, capacity::SOCK);
    pub const SOCK4_REV: MapSpec = spec!(names::SOCK4_REV, SockRevKey4, SockRev4, Sizing::Sock, capacity::SOCK);
    pub const SOCK6_FWD: MapSpec = spec!(names::SOCK6_FWD, SockKey6, SockFwd6, Sizing::Sock, capacity::SOCK);
    pub const SOCK6_REV: MapSpec = spec!(names::SOCK6_REV, SockRevKey6, SockRev6, Sizing::Sock, capacity::SOCK);
    pub const IFACES: MapSpec = spec!(names::IFACES, u32, IfaceInfo, Sizing::Fixed, capacity::IFACES);
    pub const STATS: MapSpec = spec!(names::STATS, u32, u64, Sizing::Fixed, StatSlot::ENTRIES);
    pub const CONFIG: MapSpec = spec!(names::CONFIG, u32, DatapathConfig, Sizing::Fixed, 1);
    pub const NAMES4: MapSpec = spec!(names::NAMES4, u32, FrontendName, Sizing::RevNat, capacity::REVNAT);
    pub const NAMES6: MapSpec = spec!(names::NAMES6, u32, FrontendName, Sizing::RevNat, capacity::REVNAT);
    pub const FILTER4: MapSpec = spec!(names::FILTER4, u32, u64, Sizing::Fixed, filter::WORDS);
    pub const FILTER6: MapSpec = spec!(names::FILTER6, u32, u64, Sizing::Fixed, filter::WORDS);

    /// Every pinned map, in the order the agent reports them.
    pub const ALL: [MapSpec; 30] = [
        SVC4, SVC6, BACKEND4, BACKEND6, REVNAT4, REVNAT6, CT4_FWD, CT4_REV, CT6_FWD, CT6_REV, FRAG4, FRAG6, AFFINITY,
        AFFMATCH4, AFFMATCH6, SRCRANGE4, SRCRANGE6, NODEPORT4, NODEPORT6, SOCK4_FWD, SOCK4_REV, SOCK6_FWD, SOCK6_REV,
        IFACES, STATS, CONFIG, NAMES4, NAMES6, FILTER4, FILTER6,
    ];

    /// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`, key: a socket,
    /// value: `SockConn4`/`SockConn6`): pinned beside the others so a new
    /// agent keeps what connected sockets connected to, but not in `ALL`:
    /// its entries live in the sockets and cannot be listed or sized.
    pub const SOCKET_STORAGE: [&str; 2] = [names::SOCK4_CONN, names::SOCK6_CONN];

    /// The spec of the map called `name`.
    pub fn by_name(name: &str) -> Option<&'static MapSpec> {
        ALL.iter().find(|m| m.name == name)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type is #[repr(C)], Copy, made only of integers and byte
    // arrays, with explicit padding, so any bit pattern is valid and there
    // are no implicit padding bytes.
    macro_rules! pod {
        ($($t:ty),* $(,)?) => { $(unsafe impl aya::Pod for $t {})* };
    }
    use super::{
        AffMatchKey, AffinityKey, AffinityValue, Backend4, Backend6, CtFwd4, CtFwd6, CtKey4, CtKey6, CtRev4, CtRev6,
        DatapathConfig, FragKey4, FragKey6, FragPorts, FrontendName, IfaceInfo, RevNat4, RevNat6, SockFwd4, SockFwd6,
        SockKey4, SockKey6, SockRev4, SockRev6, SockRevKey4, SockRevKey6, SrcRange4, SrcRange6, Svc4Key, Svc6Key,
        SvcValue,
    };
    pod!(
        Svc4Key,
        Svc6Key,
        SvcValue,
        Backend4,
        Backend6,
        RevNat4,
        RevNat6,
        CtKey4,
        CtKey6,
        CtFwd4,
        CtFwd6,
        CtRev4,
        CtRev6,
        FragKey4,
        FragKey6,
        FragPorts,
        AffinityKey,
        AffinityValue,
        AffMatchKey,
        SrcRange4,
        SrcRange6,
        SockKey4,
        SockKey6,
        SockFwd4,
        SockFwd6,
        SockRevKey4,
        SockRevKey6,
        SockRev4,
        SockRev6,
        IfaceInfo,
        DatapathConfig,
        FrontendName,
    );
}
