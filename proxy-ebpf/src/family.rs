//! The one place where IPv4 and IPv6 differ: which maps, which key types,
//! which header rewrite. Every stage is written once, generic over
//! `Family`, and monomorphised into a v4 and a v6 copy. (Cilium writes
//! `lb4_*`/`lb6_*` pairs by hand; a trait gives the same code without the
//! twin bodies.)
//!
//! The maps of one family are only ever reached through that family's
//! impl, so an IPv6 address can never be translated to an IPv4 one.
use aya_ebpf::{
    maps::lpm_trie::Key,
    programs::{SockAddrContext, TcContext},
};
use proxy_common::{
    AffMatchKey, CtFwd, CtKey, CtRev, FragKey4, FragKey6, FragPorts, SockConn, SockFwd, SockKey4, SockKey6, SockRev,
    SockRevKey4, SockRevKey6, SrcRange4, SrcRange6, StatSlot, Svc4Key, Svc6Key, SvcValue, filter,
};

use crate::{
    maps::{
        AFFMATCH4_V1, AFFMATCH6_V1, BACKEND4_V1, BACKEND6_V1, CT4_FWD_V3, CT4_REV_V3, CT6_FWD_V3, CT6_REV_V3,
        FILTER4_V1, FILTER6_V1, FRAG4_V1, FRAG6_V1, NODEPORT4_V1, NODEPORT6_V1, REVNAT4_V1, REVNAT6_V1, SOCK4_CONN_V1,
        SOCK4_FWD_V1, SOCK4_REV_V1, SOCK6_CONN_V1, SOCK6_FWD_V1, SOCK6_REV_V1, SRCRANGE4_V1, SRCRANGE6_V1, SVC4_V1,
        SVC6_V1,
    },
    nat::{self, End, Ends},
    parse::{L4, Verdict},
    reject, route,
    work::{WORK4_V1, WORK6_V1, Work},
};

/// A flow, as its forward entry holds it.
pub type Flow<A> = CtFwd<A>;
/// Where a reply goes back to, as the reverse entry holds it.
pub type Back<A> = CtRev<A>;

pub trait Family: Sized {
    /// Address bytes, network byte order.
    type Addr: Copy + PartialEq + AsRef<[u8]>;
    /// Counters of this family.
    const SLOT: StatSlot;
    /// 4 or 6.
    const NUMBER: u8;
    /// The unspecified address: the address of NodePort frontends.
    const UNSPECIFIED: Self::Addr;
    /// Offsets of the source and destination addresses in the IP header.
    const IP_SADDR: usize;
    const IP_DADDR: usize;
    /// Offset of the header checksum in the IP header (IPv4 only).
    const IP_CSUM: Option<usize>;

    /// This CPU's working state for a packet of this family.
    fn work() -> Option<&'static mut Work<Self>>;

    /// A frontend (slot 0) or one of its backend slots; `port` in network
    /// byte order.
    fn svc(addr: Self::Addr, port: u16, proto: u8, scope: u8, slot: u16) -> Option<SvcValue>;
    /// Backend address and port (network byte order) of backend `id`.
    fn backend(id: u32) -> Option<(Self::Addr, u16)>;
    /// Is `addr` a node address NodePorts answer on?
    fn is_nodeport_addr(addr: &Self::Addr) -> bool;
    /// Is frontend `id` (its reverse-NAT entry) at `addr` and `port`
    /// (network byte order), or a NodePort on `port`? A removed frontend's
    /// entry is cleared.
    fn frontend_at(id: u32, addr: &Self::Addr, port: u16) -> bool;
    /// May `addr` be a frontend's address (or a node address NodePorts
    /// answer on)? `false` is certain; `true` is a filter's answer.
    fn maybe_frontend(addr: &Self::Addr) -> bool;
    /// Is `addr` inside one of the source ranges of frontend `id`?
    fn in_source_range(frontend_id: u32, addr: Self::Addr) -> bool;
    /// Is backend `backend_id` in frontend `frontend_id`'s active set?
    fn affinity_match(frontend_id: u32, backend_id: u32) -> bool;
    /// The address as an affinity client id (zero-padded to 16 bytes).
    fn client_id(addr: Self::Addr) -> [u8; 16];

    fn fwd_get(key: &CtKey<Self::Addr>) -> Option<*mut Flow<Self::Addr>>;
    fn fwd_insert(key: &CtKey<Self::Addr>, flow: &Flow<Self::Addr>, flags: u64) -> Result<(), i32>;
    fn rev_get(key: &CtKey<Self::Addr>) -> Option<*mut Back<Self::Addr>>;
    fn rev_insert(key: &CtKey<Self::Addr>, back: &Back<Self::Addr>, flags: u64) -> Result<(), i32>;
    fn rev_remove(key: &CtKey<Self::Addr>);

    /// Ports of a fragmented datagram, from its first fragment.
    fn frag_ports(saddr: Self::Addr, daddr: Self::Addr, id: [u8; 4], proto: u8) -> Option<FragPorts>;
    fn frag_record(saddr: Self::Addr, daddr: Self::Addr, id: [u8; 4], proto: u8, ports: FragPorts);

    /// Rewrite address and port at `end` from `old` to `new`, fixing
    /// checksums (the port only when the transport header is present).
    /// Addresses by reference: they usually live in the `Work`, and a copy
    /// of an IPv6 address costs stack the verifier counts.
    fn rewrite(ctx: &TcContext, l4: &L4, end: End, old: Ends<'_, Self::Addr>) -> Result<(), Verdict>;
    /// A router's duties on a packet it forwards: decrement the TTL / hop
    /// limit, and write the next link's MACs when given; `false` when the
    /// TTL would reach zero (the host stack must answer with time
    /// exceeded).
    fn forward(ctx: &TcContext, macs: Option<&[u8; 12]>) -> Result<bool, Verdict>;
    /// FIB lookup for forwarding `src -> dst` in from `ifindex`; the result
    /// is left in `w.fib` / `w.nh`. With `route::SOURCE` in `flags`, the
    /// lookup also finds the source address the node would send from on
    /// that route (`fib_source`).
    fn fib(
        ctx: &TcContext,
        w: &mut Work<Self>,
        src: Self::Addr,
        dst: Self::Addr,
        ifindex: u32,
        flags: u32,
    ) -> route::Fib;
    /// The source address a `route::SOURCE` lookup found, if any.
    fn fib_source(w: &Work<Self>) -> Option<Self::Addr>;
    /// Refuse a new connection to a frontend without backends.
    fn reject(ctx: &TcContext, w: &Work<Self>) -> Verdict;

    /// Socket LB: the backend unconnected socket `cookie` sends to frontend
    /// `fe` (address, port) through.
    fn sock_fwd(cookie: u64, fe: (Self::Addr, u16), proto: u8) -> Option<SockFwd<Self::Addr>>;
    fn sock_fwd_set(cookie: u64, fe: (Self::Addr, u16), proto: u8, fwd: &SockFwd<Self::Addr>);
    /// Socket LB: the frontend socket `cookie` shows for datagrams from
    /// `backend`.
    fn sock_rev(cookie: u64, backend: (Self::Addr, u16), proto: u8) -> Option<SockRev<Self::Addr>>;
    fn sock_rev_set(cookie: u64, backend: (Self::Addr, u16), proto: u8, rev: &SockRev<Self::Addr>);
    /// Socket LB: what the socket of `ctx` connected to (in the socket's
    /// own storage), created from `new` when given.
    fn sock_conn(ctx: &SockAddrContext, new: Option<&mut SockConn<Self::Addr>>) -> Option<*mut SockConn<Self::Addr>>;
}

pub struct V4;
pub struct V6;

/// Read a map value out by copy. Service and backend maps are updated whole
/// by the agent; a concurrent update can at worst hand us the old or the new
/// value of one entry, both valid.
#[inline(always)]
fn copy<T: Copy>(ptr: Option<*const T>) -> Option<T> {
    // SAFETY: the pointer comes from a successful map lookup and stays valid
    // for the rest of this program run (RCU).
    ptr.map(|p| unsafe { *p })
}

/// Fragment keys from the packet's fields.
trait FragKeyNew<A> {
    fn new(saddr: A, daddr: A, id: [u8; 4], proto: u8) -> Self;
}

impl FragKeyNew<[u8; 4]> for FragKey4 {
    #[inline(always)]
    fn new(saddr: [u8; 4], daddr: [u8; 4], id: [u8; 4], proto: u8) -> Self {
        Self { saddr, daddr, id: [id[0], id[1]], proto, _pad: 0 }
    }
}

impl FragKeyNew<[u8; 16]> for FragKey6 {
    #[inline(always)]
    fn new(saddr: [u8; 16], daddr: [u8; 16], id: [u8; 4], proto: u8) -> Self {
        Self { saddr, daddr, id, proto, _pad: [0; 3] }
    }
}

macro_rules! family_impl {
    (
        family: $fam:ty,
        addr: ($addr:ty, $addr_len:expr),
        number: $number:expr,
        slot: $slot:expr,
        work: $work:ident,
        svc: ($svc_key:ty, $svc:ident),
        backend_map: $backend:ident,
        nodeport_map: $nodeport:ident,
        filter_map: $filter:ident,
        revnat_map: $revnat:ident,
        src_range: ($range_ty:ident, $range_map:ident),
        affinity_match_map: $affmatch:ident,
        ct_maps: ($fwd_map:ident, $rev_map:ident),
        frag: ($frag_key:ident, $frag_map:ident),
        ip_offsets: ($ip_saddr:expr, $ip_daddr:expr, $ip_csum:expr),
        rewrite: $rewrite:path,
        ttl: $ttl:path,
        fib: ($fib:path, $fib_source:path),
        reject: $reject:path,
        sock: ($sock_key:ident, $sock_fwd:ident, $sock_rev_key:ident, $sock_rev:ident, $sock_conn:ident) $(,)?
    ) => {
        impl Family for $fam {
            type Addr = $addr;
            const SLOT: StatSlot = $slot;
            const NUMBER: u8 = $number;
            const UNSPECIFIED: $addr = [0; core::mem::size_of::<$addr>()];
            const IP_SADDR: usize = $ip_saddr;
            const IP_DADDR: usize = $ip_daddr;
            const IP_CSUM: Option<usize> = $ip_csum;

            #[inline(always)]
            fn work() -> Option<&'static mut Work<Self>> {
                // SAFETY: per-CPU slot; a run has its CPU's entry to itself
                // (see `work`).
                $work.get_ptr_mut(0).map(|p| unsafe { &mut *p })
            }

            #[inline(always)]
            fn svc(addr: $addr, port: u16, proto: u8, scope: u8, slot: u16) -> Option<SvcValue> {
                copy($svc.get_ptr(&<$svc_key>::from_wire(addr, port, proto, scope, slot)))
            }

            #[inline(always)]
            fn backend(id: u32) -> Option<($addr, u16)> {
                copy($backend.get_ptr(&id)).map(|b| (b.addr, b.port))
            }

            #[inline(always)]
            fn is_nodeport_addr(addr: &$addr) -> bool {
                $nodeport.get_ptr(addr).is_some()
            }

            #[inline(always)]
            fn frontend_at(id: u32, addr: &$addr, port: u16) -> bool {
                $revnat.get(id).is_some_and(|r| r.port == port && (r.addr == *addr || r.addr == Self::UNSPECIFIED))
            }

            #[inline(always)]
            fn maybe_frontend(addr: &$addr) -> bool {
                let bit = filter::bit(addr);
                $filter.get(bit >> 6).is_some_and(|w| w & (1 << (bit & 63)) != 0)
            }

            #[inline(always)]
            fn in_source_range(frontend_id: u32, addr: $addr) -> bool {
                let data = $range_ty { frontend_id: frontend_id.to_be_bytes(), addr };
                // A lookup matches the whole key: the id and every address bit.
                let bits = $range_ty::ID_BITS + 8 * $addr_len;
                $range_map.get(Key::new(bits, data)).is_some()
            }

            #[inline(always)]
            fn affinity_match(frontend_id: u32, backend_id: u32) -> bool {
                $affmatch.get_ptr(&AffMatchKey { frontend_id, backend_id }).is_some()
            }

            #[inline(always)]
            fn client_id(addr: $addr) -> [u8; 16] {
                let mut id = [0u8; 16];
                id[..addr.len()].copy_from_slice(&addr);
                id
            }

            #[inline(always)]
            fn fwd_get(key: &CtKey<$addr>) -> Option<*mut Flow<$addr>> {
                $fwd_map.get_ptr_mut(key)
            }

            #[inline(always)]
            fn fwd_insert(key: &CtKey<$addr>, flow: &Flow<$addr>, flags: u64) -> Result<(), i32> {
                $fwd_map.insert(key, flow, flags).map_err(|e| e as i32)
            }

            #[inline(always)]
            fn rev_get(key: &CtKey<$addr>) -> Option<*mut Back<$addr>> {
                $rev_map.get_ptr_mut(key)
            }

            #[inline(always)]
            fn rev_insert(key: &CtKey<$addr>, back: &Back<$addr>, flags: u64) -> Result<(), i32> {
                $rev_map.insert(key, back, flags).map_err(|e| e as i32)
            }

            #[inline(always)]
            fn rev_remove(key: &CtKey<$addr>) {
                // Already gone (another CPU, LRU eviction) is fine.
                let _ = $rev_map.remove(key);
            }

            #[inline(always)]
            fn frag_ports(saddr: $addr, daddr: $addr, id: [u8; 4], proto: u8) -> Option<FragPorts> {
                copy($frag_map.get_ptr(&$frag_key::new(saddr, daddr, id, proto)))
            }

            #[inline(always)]
            fn frag_record(saddr: $addr, daddr: $addr, id: [u8; 4], proto: u8, ports: FragPorts) {
                // A lost record costs the later fragments their translation
                // (they pass untouched, counted); nothing else.
                let _ = $frag_map.insert(&$frag_key::new(saddr, daddr, id, proto), &ports, 0);
            }

            #[inline(always)]
            fn rewrite(ctx: &TcContext, l4: &L4, end: End, ends: Ends<'_, $addr>) -> Result<(), Verdict> {
                $rewrite(ctx, l4, end, ends)
            }

            #[inline(always)]
            fn forward(ctx: &TcContext, macs: Option<&[u8; 12]>) -> Result<bool, Verdict> {
                $ttl(ctx, macs)
            }

            #[inline(always)]
            fn fib(
                ctx: &TcContext,
                w: &mut Work<Self>,
                src: $addr,
                dst: $addr,
                ifindex: u32,
                flags: u32,
            ) -> route::Fib {
                $fib(ctx, w, src, dst, ifindex, flags)
            }

            #[inline(always)]
            fn fib_source(w: &Work<Self>) -> Option<$addr> {
                let a = $fib_source(&w.fib);
                (a != Self::UNSPECIFIED).then_some(a)
            }

            #[inline(always)]
            fn reject(ctx: &TcContext, w: &Work<Self>) -> Verdict {
                $reject(ctx.skb.skb, &w.pkt)
            }

            #[inline(always)]
            fn sock_fwd(cookie: u64, fe: ($addr, u16), proto: u8) -> Option<SockFwd<$addr>> {
                copy($sock_fwd.get_ptr(&$sock_key::new(cookie, fe.0, fe.1, proto)))
            }

            #[inline(always)]
            fn sock_fwd_set(cookie: u64, fe: ($addr, u16), proto: u8, fwd: &SockFwd<$addr>) {
                // A lost entry costs the socket its backend once: its next
                // datagram picks again.
                let _ = $sock_fwd.insert(&$sock_key::new(cookie, fe.0, fe.1, proto), fwd, 0);
            }

            #[inline(always)]
            fn sock_rev(cookie: u64, backend: ($addr, u16), proto: u8) -> Option<SockRev<$addr>> {
                copy($sock_rev.get_ptr(&$sock_rev_key::new(cookie, backend.0, backend.1, proto)))
            }

            #[inline(always)]
            fn sock_rev_set(cookie: u64, backend: ($addr, u16), proto: u8, rev: &SockRev<$addr>) {
                // A lost entry shows the backend's address to recvmsg() until
                // the socket's next datagram to the frontend writes it again.
                let _ = $sock_rev.insert(&$sock_rev_key::new(cookie, backend.0, backend.1, proto), rev, 0);
            }

            #[inline(always)]
            fn sock_conn(ctx: &SockAddrContext, new: Option<&mut SockConn<$addr>>) -> Option<*mut SockConn<$addr>> {
                // SAFETY: the socket of a sock_addr context is a full socket,
                // valid for this run; the kernel checks the pointer it gets.
                let p = unsafe {
                    match new {
                        Some(v) => $sock_conn.get_or_insert_ptr_mut(ctx, Some(v)),
                        None => $sock_conn.get_ptr_mut(ctx),
                    }
                };
                (!p.is_null()).then_some(p)
            }
        }
    };
}

family_impl!(
    family: V4,
    addr: ([u8; 4], 4),
    number: 4,
    slot: StatSlot::V4,
    work: WORK4_V1,
    svc: (Svc4Key, SVC4_V1),
    backend_map: BACKEND4_V1,
    nodeport_map: NODEPORT4_V1,
    filter_map: FILTER4_V1,
    revnat_map: REVNAT4_V1,
    src_range: (SrcRange4, SRCRANGE4_V1),
    affinity_match_map: AFFMATCH4_V1,
    ct_maps: (CT4_FWD_V3, CT4_REV_V3),
    frag: (FragKey4, FRAG4_V1),
    ip_offsets: (12, 16, Some(10)),
    rewrite: nat::rewrite_v4,
    ttl: nat::forward_v4,
    fib: (route::fib_v4, route::source_v4),
    reject: reject::reject_v4,
    sock: (SockKey4, SOCK4_FWD_V1, SockRevKey4, SOCK4_REV_V1, SOCK4_CONN_V1),
);
family_impl!(
    family: V6,
    addr: ([u8; 16], 16),
    number: 6,
    slot: StatSlot::V6,
    work: WORK6_V1,
    svc: (Svc6Key, SVC6_V1),
    backend_map: BACKEND6_V1,
    nodeport_map: NODEPORT6_V1,
    filter_map: FILTER6_V1,
    revnat_map: REVNAT6_V1,
    src_range: (SrcRange6, SRCRANGE6_V1),
    affinity_match_map: AFFMATCH6_V1,
    ct_maps: (CT6_FWD_V3, CT6_REV_V3),
    frag: (FragKey6, FRAG6_V1),
    ip_offsets: (8, 24, None),
    rewrite: nat::rewrite_v6,
    ttl: nat::forward_v6,
    fib: (route::fib_v6, route::source_v6),
    reject: reject::reject_v6,
    sock: (SockKey6, SOCK6_FWD_V1, SockRevKey6, SOCK6_REV_V1, SOCK6_CONN_V1),
);
