//! Runtime settings the datapath reads, and the interfaces it is on.
use core::mem::size_of;

use crate::ct::ct_timeout;

/// Runtime settings: the one entry of `CONFIG`. The agent writes it at
/// start; a zero timeout means the built-in default (`ct_timeout`).
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
    /// Cookie of the node's network namespace: socket-level load balancing
    /// tells host clients from pod clients by it.
    pub host_netns_cookie: u64,
    /// `config_flags::*`.
    pub flags: u32,
    /// Generation of the routes flows cache (`Hop`): the agent bumps it
    /// whenever it writes this configuration or the interfaces it handles
    /// change, and every cached route is looked up again.
    pub route_gen: u32,
}
const _: () = assert!(size_of::<DatapathConfig>() == 48);

/// `DatapathConfig::flags`.
pub mod config_flags {
    /// Socket-level load balancing for pods too, not only host clients.
    pub const SOCKET_LB_PODS: u32 = 1 << 0;
}

impl DatapathConfig {
    /// The built-in timeouts, host clients only.
    pub const DEFAULT: Self = Self {
        tcp_syn_ns: ct_timeout::TCP_SYN,
        tcp_established_ns: ct_timeout::TCP_ESTABLISHED,
        tcp_close_ns: ct_timeout::TCP_CLOSE,
        udp_ns: ct_timeout::UDP,
        host_netns_cookie: 0,
        flags: 0,
        route_gen: 0,
    };
}

/// An attached interface (`IFACES`, keyed by ifindex).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IfaceInfo {
    /// `iface_role::*`.
    pub role: u32,
}
const _: () = assert!(size_of::<IfaceInfo>() == 4);

/// What an attached interface faces.
pub mod iface_role {
    /// A pod (the host side of its veth): its clients are on this node.
    pub const POD: u32 = 1;
    /// A node device (uplink): other nodes and external clients.
    pub const DEVICE: u32 = 2;
}
