//! The one place where IPv4 and IPv6 differ: which maps, which key types,
//! which rewrite. Every stage is written once, generic over `Family`, and
//! monomorphised into a v4 and a v6 copy. (Cilium writes `lb4_*`/`lb6_*`
//! pairs by hand; a trait gives the same code without the twin bodies.)
//!
//! The maps of one family are only ever reached through that family's impl,
//! so an IPv6 VIP can never be translated to an IPv4 backend.
use aya_ebpf::programs::TcContext;
use proxy_common::{Ct4Key, Ct4Value, Ct6Key, Ct6Value, Svc4Key, Svc6Key, SvcValue};

use crate::{
    maps::{BACKEND4_V1, BACKEND6_V1, CT4_V1, CT6_V1, REVNAT4_V1, REVNAT6_V1, SVC4_V1, SVC6_V1},
    nat::{self, End},
    parse::{L4, Pkt, Verdict},
    reject,
};

/// Mutable view of a conntrack value.
pub struct CtRef<'a, A> {
    pub expires: &'a mut u64,
    pub state: &'a mut u8,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// Backend address and port, network byte order.
    pub backend: (A, u16),
}

pub trait Family {
    /// Address bytes, network byte order.
    type Addr: Copy + PartialEq;
    type SvcKey: Copy;
    type CtKey: Copy;
    type CtValue: Copy;

    /// `port` in network byte order.
    fn svc_key(addr: Self::Addr, port: u16, proto: u8, slot: u16) -> Self::SvcKey;
    fn svc_get(key: &Self::SvcKey) -> Option<SvcValue>;
    /// Backend address and port (network byte order) of backend `id`.
    fn backend(id: u32) -> Option<(Self::Addr, u16)>;
    /// Service address and port (network byte order) of reverse-NAT `id`.
    fn revnat(id: u32) -> Option<(Self::Addr, u16)>;

    fn ct_key(src: (Self::Addr, u16), dst: (Self::Addr, u16), proto: u8, dir: u8) -> Self::CtKey;
    fn ct_get(key: &Self::CtKey) -> Option<*mut Self::CtValue>;
    fn ct_insert(key: &Self::CtKey, value: &Self::CtValue, flags: u64) -> Result<(), i32>;
    fn ct_value(expires: u64, backend_id: u32, rev_nat_id: u32, backend: (Self::Addr, u16), state: u8)
    -> Self::CtValue;
    fn ct_ref(value: &mut Self::CtValue) -> CtRef<'_, Self::Addr>;

    /// Refuse a new connection to a frontend without backends.
    fn reject(ctx: &TcContext, pkt: &Pkt<Self::Addr>) -> Verdict;

    /// Rewrite address and port at `end` from `old` to `new`, fixing checksums.
    fn rewrite(
        ctx: &TcContext,
        l4: &L4,
        end: End,
        old: (Self::Addr, u16),
        new: (Self::Addr, u16),
    ) -> Result<(), Verdict>;
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

macro_rules! family_impl {
    ($fam:ty, $addr:ty, $svc_key:ty, $ct_key:ty, $ct_value:ty,
     $svc:ident, $backend:ident, $revnat:ident, $ct:ident, $rewrite:path, $reject:path) => {
        impl Family for $fam {
            type Addr = $addr;
            type SvcKey = $svc_key;
            type CtKey = $ct_key;
            type CtValue = $ct_value;

            #[inline(always)]
            fn svc_key(addr: $addr, port: u16, proto: u8, slot: u16) -> $svc_key {
                <$svc_key>::from_wire(addr, port, proto, slot)
            }

            #[inline(always)]
            fn svc_get(key: &$svc_key) -> Option<SvcValue> {
                copy($svc.get_ptr(key))
            }

            #[inline(always)]
            fn backend(id: u32) -> Option<($addr, u16)> {
                copy($backend.get_ptr(&id)).map(|b| (b.addr, b.port))
            }

            #[inline(always)]
            fn revnat(id: u32) -> Option<($addr, u16)> {
                // A cleared entry (port 0) belongs to a removed frontend.
                copy($revnat.get_ptr(id)).filter(|r| r.port != 0).map(|r| (r.addr, r.port))
            }

            #[inline(always)]
            fn ct_key(src: ($addr, u16), dst: ($addr, u16), proto: u8, dir: u8) -> $ct_key {
                <$ct_key>::from_wire(src, dst, proto, dir)
            }

            #[inline(always)]
            fn ct_get(key: &$ct_key) -> Option<*mut $ct_value> {
                $ct.get_ptr_mut(key)
            }

            #[inline(always)]
            fn ct_insert(key: &$ct_key, value: &$ct_value, flags: u64) -> Result<(), i32> {
                $ct.insert(key, value, flags).map_err(|e| e as i32)
            }

            #[inline(always)]
            fn ct_value(expires: u64, backend_id: u32, rev_nat_id: u32, backend: ($addr, u16), state: u8) -> $ct_value {
                Self::CtValue {
                    expires,
                    backend_id,
                    rev_nat_id,
                    backend_addr: backend.0,
                    backend_port: backend.1,
                    state,
                    ..Default::default()
                }
            }

            #[inline(always)]
            fn ct_ref(v: &mut $ct_value) -> CtRef<'_, $addr> {
                CtRef {
                    backend_id: v.backend_id,
                    rev_nat_id: v.rev_nat_id,
                    backend: (v.backend_addr, v.backend_port),
                    expires: &mut v.expires,
                    state: &mut v.state,
                }
            }

            #[inline(always)]
            fn reject(ctx: &TcContext, pkt: &Pkt<$addr>) -> Verdict {
                $reject(ctx.skb.skb, pkt)
            }

            #[inline(always)]
            fn rewrite(
                ctx: &TcContext,
                l4: &L4,
                end: End,
                old: ($addr, u16),
                new: ($addr, u16),
            ) -> Result<(), Verdict> {
                $rewrite(ctx, l4, end, old, new)
            }
        }
    };
}

family_impl!(
    V4,
    [u8; 4],
    Svc4Key,
    Ct4Key,
    Ct4Value,
    SVC4_V1,
    BACKEND4_V1,
    REVNAT4_V1,
    CT4_V1,
    nat::rewrite_v4,
    reject::reject_v4
);
family_impl!(
    V6,
    [u8; 16],
    Svc6Key,
    Ct6Key,
    Ct6Value,
    SVC6_V1,
    BACKEND6_V1,
    REVNAT6_V1,
    CT6_V1,
    nat::rewrite_v6,
    reject::reject_v6
);
