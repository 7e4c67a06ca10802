//! Packet counters: one per reason and family, in a per-CPU array indexed
//! `slot * Stat::COUNT + stat`. Numbers are stable: never renumber, only
//! append (Cilium never renumbers a drop reason).

/// Why a packet was counted.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stat {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    PassNotIp = 0,
    /// IPv4/IPv6 but not TCP, UDP or an ICMP error about a tracked flow.
    PassNotL4 = 1,
    /// A fragment of no tracked datagram (its first fragment was not seen).
    PassFragment = 2,
    /// Headers shorter than they claim, or not understood.
    PassMalformed = 3,
    /// TCP/UDP not addressed to a service and not a reply of a tracked flow.
    PassNoService = 4,
    /// A RST to a frontend without backends: never answered.
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
    /// A reverse entry whose flow is gone (closed, expired, replaced):
    /// the packet passed untouched.
    PassStaleRevNat = 11,
    /// New connection to a frontend without backends: answered with a TCP
    /// RST or ICMP port unreachable.
    RejectNoBackend = 12,
    /// UDP flow whose backend was removed: moved to a live backend.
    UdpRepick = 13,
    /// The refusal (RST / ICMP) could not be built; the packet passed.
    RejectFailed = 14,
    /// A Local traffic policy and no endpoint on this node: dropped (socket
    /// LB: connect() or sendmsg() failed with EHOSTUNREACH).
    DropNoLocalBackend = 15,
    /// Client outside the frontend's loadBalancerSourceRanges: dropped
    /// (socket LB: connect() or sendmsg() failed with EHOSTUNREACH).
    DropSourceRange = 16,
    /// TCP segment that is not a SYN, of no tracked flow: left to the host
    /// stack (connections that another proxy translated before dsproxy).
    PassTakeover = 17,
    /// Delivered straight into the destination pod's namespace.
    RedirectPeer = 18,
    /// Redirected to an interface; the kernel resolved the neighbour.
    RedirectNeigh = 19,
    /// Redirected to an interface with the MACs of the FIB lookup.
    Redirect = 20,
    /// A translated packet handed to the host stack to forward.
    Stack = 21,
    /// A later fragment translated with its first fragment's ports.
    FragTracked = 22,
    /// An ICMP error about a service flow translated.
    IcmpXlate = 23,
    /// No free source port for a SNAT flow: dropped.
    SnatNoPort = 24,
    /// A pod reached its own Service: its source was translated.
    Hairpin = 25,
    /// A new connection went to its client's sticky backend.
    AffinityHit = 26,
    /// Socket LB translated a connect() or sendmsg().
    SockXlate = 27,
    /// Socket LB refused a connect() or sendmsg() (no backends):
    /// ECONNREFUSED.
    SockReject = 28,
    /// Socket LB showed the service address to recvmsg() or getpeername().
    SockRevXlate = 29,
    /// A new external flow to an externalTrafficPolicy Cluster frontend
    /// whose backend is not reached through one of our interfaces (or has
    /// no source address to masquerade to): dropped, its replies could not
    /// come back through this node.
    MasqueradeNoRoute = 30,
}

impl Stat {
    pub const COUNT: u32 = 31;
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
        Stat::RejectFailed,
        Stat::DropNoLocalBackend,
        Stat::DropSourceRange,
        Stat::PassTakeover,
        Stat::RedirectPeer,
        Stat::RedirectNeigh,
        Stat::Redirect,
        Stat::Stack,
        Stat::FragTracked,
        Stat::IcmpXlate,
        Stat::SnatNoPort,
        Stat::Hairpin,
        Stat::AffinityHit,
        Stat::SockXlate,
        Stat::SockReject,
        Stat::SockRevXlate,
        Stat::MasqueradeNoRoute,
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
            Stat::RejectFailed => "reject_failed",
            Stat::DropNoLocalBackend => "drop_no_local_backend",
            Stat::DropSourceRange => "drop_source_range",
            Stat::PassTakeover => "pass_takeover",
            Stat::RedirectPeer => "redirect_peer",
            Stat::RedirectNeigh => "redirect_neigh",
            Stat::Redirect => "redirect",
            Stat::Stack => "stack",
            Stat::FragTracked => "frag_tracked",
            Stat::IcmpXlate => "icmp_xlate",
            Stat::SnatNoPort => "snat_no_port",
            Stat::Hairpin => "hairpin",
            Stat::AffinityHit => "affinity_hit",
            Stat::SockXlate => "sock_xlate",
            Stat::SockReject => "sock_reject",
            Stat::SockRevXlate => "sock_rev_xlate",
            Stat::MasqueradeNoRoute => "masquerade_no_route",
        }
    }
}

/// Which family a counter is for.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatSlot {
    V4 = 0,
    V6 = 1,
    /// Not an IP packet.
    Other = 2,
}

impl StatSlot {
    pub const ALL: [StatSlot; 3] = [StatSlot::V4, StatSlot::V6, StatSlot::Other];
    /// Entries of the `STATS` array.
    pub const ENTRIES: u32 = 3 * Stat::COUNT;

    /// The label metrics and `status` use.
    pub const fn name(self) -> &'static str {
        match self {
            StatSlot::V4 => "IPv4",
            StatSlot::V6 => "IPv6",
            StatSlot::Other => "other",
        }
    }

    /// Index of `stat` for this slot in `STATS`.
    #[inline(always)]
    pub const fn index(self, stat: Stat) -> u32 {
        self as u32 * Stat::COUNT + stat as u32
    }
}
