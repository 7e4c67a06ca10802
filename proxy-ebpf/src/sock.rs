//! Socket-level load balancing: cgroup `sock_addr` hooks that turn a
//! frontend into a backend when a socket connects or sends (`connect4/6`,
//! `sendmsg4/6`) and show the frontend again wherever the application reads
//! its peer (`getpeername4/6`, `recvmsg4/6`). Clients in the node's own
//! network namespace send no packet through a pod interface, so the TC
//! programs never see them; this is how they reach Services.
//!
//! The frontend lookup and the backend choice are the packet path's (`lb`):
//! the client is on this node (internal scope), and for session affinity it
//! is its network namespace (no source address is chosen at connect time).
//!
//! - `connect()` (TCP, connected UDP): a backend per call; what the socket
//!   connected to is kept in the socket (`SockConn`, socket storage).
//! - `sendmsg()` with an address (unconnected UDP): one backend per socket
//!   and frontend while the socket lives (`SOCK{4,6}_FWD`), picked again
//!   only when that backend is gone; the way back in `SOCK{4,6}_REV`.
//! - A frontend without backends fails the call with ECONNREFUSED, as the
//!   packet path answers with a RST or port unreachable; where the packet
//!   path drops (a Local policy and no endpoint here, a source outside
//!   loadBalancerSourceRanges) the call fails with EHOSTUNREACH at once.
//!   Anything else (not a frontend, not TCP/UDP, not our client) proceeds
//!   untouched.
//!
//! Who: clients in the agent's network namespace (`host_netns_cookie`);
//! pods too with `config_flags::SOCKET_LB_PODS` (a pod socket that socket
//! LB cannot decide for, a frontend with source ranges, is left to the
//! packet path, which sees its real source).
//!
//! Families never mix: an AF_INET6 socket naming an IPv4-mapped address
//! (`::ffff:a.b.c.d`) talks IPv4 on the wire, so it takes the IPv4 path and
//! gets an IPv4 backend, mapped back (as Cilium's `sock6_xlate_v4_in_v6`).
//! An unconnected AF_INET6 socket sending to a mapped address meets the
//! `sendmsg4` hook (Linux hands such datagrams to IPv4 before `sendmsg6`
//! runs; `sendmsg6` maps them too, should a kernel not); the replies meet
//! `recvmsg6`, mapped. Tests check both on this kernel.
//!
//! `bpf_sock_addr` fields are read and written four bytes at a time, with
//! volatile accesses the compiler cannot narrow or merge (the verifier
//! allows only those widths on every kernel).
use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP, SockConn, SockFwd, SockRev, Stat, SvcValue, config_flags, svc_flags};

use crate::{
    conntrack,
    family::{Family, V4, V6},
    lb::{self, Chosen, Client, Frontend},
    maps::CONFIG_V2,
    stats,
};

/// Let the call proceed (with the address as the program left it).
const PROCEED: i32 = 1;
/// Fail the call with the errno set by `bpf_set_retval`.
const REJECT: i32 = 0;

const EHOSTUNREACH: i32 = 113;
const ECONNREFUSED: i32 = 111;

/// What the forward hooks decided.
enum Xlate<A> {
    /// Not ours: untouched.
    Pass,
    /// To this backend (address, port in network byte order).
    To(A, u16),
    /// Fail the call with this errno.
    Fail(i32),
}

// Context access. `user_port` holds the port in network byte order in its
// first two bytes; `user_ip4` and `user_ip6` hold the address as on the wire.

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
fn proto(ctx: &SockAddrContext) -> u8 {
    // SAFETY: the context pointer is valid for this run; a 4-byte read of
    // `protocol` is what the verifier allows.
    let p = unsafe { core::ptr::read_volatile(&raw const (*sa(ctx)).protocol) };
    u8::try_from(p).unwrap_or(0)
}

#[inline(always)]
fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as in `proto`.
    let p = unsafe { core::ptr::read_volatile(&raw const (*sa(ctx)).user_port) };
    #[expect(clippy::cast_possible_truncation, reason = "the port is the low 16 bits, as stored")]
    let port = p as u16;
    port
}

#[inline(always)]
fn set_port(ctx: &SockAddrContext, port: u16) {
    // SAFETY: as in `proto`; `user_port` is writable in every hook used here.
    unsafe { core::ptr::write_volatile(&raw mut (*sa(ctx)).user_port, u32::from(port)) };
}

#[inline(always)]
fn ip4(ctx: &SockAddrContext) -> [u8; 4] {
    // SAFETY: as in `proto`.
    unsafe { core::ptr::read_volatile(&raw const (*sa(ctx)).user_ip4) }.to_ne_bytes()
}

#[inline(always)]
fn set_ip4(ctx: &SockAddrContext, addr: [u8; 4]) {
    // SAFETY: as in `set_port`.
    unsafe { core::ptr::write_volatile(&raw mut (*sa(ctx)).user_ip4, u32::from_ne_bytes(addr)) };
}

#[inline(always)]
fn ip6(ctx: &SockAddrContext) -> [u8; 16] {
    let mut a = [0u8; 16];
    for (i, chunk) in a.chunks_exact_mut(4).enumerate() {
        // SAFETY: as in `proto`; one 4-byte word at a time.
        let w = unsafe { core::ptr::read_volatile(&raw const (*sa(ctx)).user_ip6[i]) };
        chunk.copy_from_slice(&w.to_ne_bytes());
    }
    a
}

#[inline(always)]
fn set_ip6(ctx: &SockAddrContext, addr: &[u8; 16]) {
    for (i, chunk) in addr.chunks_exact(4).enumerate() {
        let w = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        // SAFETY: as in `set_port`; one 4-byte word at a time.
        unsafe { core::ptr::write_volatile(&raw mut (*sa(ctx)).user_ip6[i], w) };
    }
}

/// The IPv4 address inside an IPv4-mapped IPv6 address.
#[inline(always)]
fn unmapped(a: &[u8; 16]) -> Option<[u8; 4]> {
    let prefix = a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff;
    prefix.then(|| [a[12], a[13], a[14], a[15]])
}

#[inline(always)]
fn mapped(a: [u8; 4]) -> [u8; 16] {
    let mut m = [0u8; 16];
    m[10] = 0xff;
    m[11] = 0xff;
    m[12..].copy_from_slice(&a);
    m
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper reading the context's socket.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The call's outcome for the kernel.
#[inline(always)]
fn verdict<A>(x: &Xlate<A>) -> i32 {
    match x {
        Xlate::Fail(errno) => {
            // SAFETY: helper setting the syscall's return value.
            unsafe { bpf_set_retval(-errno) };
            REJECT
        }
        Xlate::Pass | Xlate::To(..) => PROCEED,
    }
}

/// `connect4` (`unconnected == false`) and `sendmsg4`.
#[inline(always)]
pub fn forward4(ctx: &SockAddrContext, unconnected: bool) -> i32 {
    let x = forward::<V4>(ctx, (ip4(ctx), port(ctx)), unconnected);
    if let Xlate::To(addr, port) = x {
        set_ip4(ctx, addr);
        set_port(ctx, port);
    }
    verdict(&x)
}

/// `connect6` (`unconnected == false`) and `sendmsg6`.
#[inline(always)]
pub fn forward6(ctx: &SockAddrContext, unconnected: bool) -> i32 {
    let (addr, p) = (ip6(ctx), port(ctx));
    if let Some(v4) = unmapped(&addr) {
        let x = forward::<V4>(ctx, (v4, p), unconnected);
        if let Xlate::To(addr, port) = x {
            set_ip6(ctx, &mapped(addr));
            set_port(ctx, port);
        }
        return verdict(&x);
    }
    let x = forward::<V6>(ctx, (addr, p), unconnected);
    if let Xlate::To(addr, port) = &x {
        set_ip6(ctx, addr);
        set_port(ctx, *port);
    }
    verdict(&x)
}

/// `getpeername4` (`datagram == false`) and `recvmsg4`.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext, datagram: bool) -> i32 {
    if let Some((addr, port)) = reverse::<V4>(ctx, (ip4(ctx), port(ctx)), datagram) {
        set_ip4(ctx, addr);
        set_port(ctx, port);
    }
    PROCEED
}

/// `getpeername6` (`datagram == false`) and `recvmsg6`.
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext, datagram: bool) -> i32 {
    let (addr, p) = (ip6(ctx), port(ctx));
    if let Some(v4) = unmapped(&addr) {
        if let Some((addr, port)) = reverse::<V4>(ctx, (v4, p), datagram) {
            set_ip6(ctx, &mapped(addr));
            set_port(ctx, port);
        }
    } else if let Some((addr, port)) = reverse::<V6>(ctx, (addr, p), datagram) {
        set_ip6(ctx, &addr);
        set_port(ctx, port);
    }
    PROCEED
}

/// Who the client is, if socket LB serves it: its network namespace cookie
/// and whether that is the node's own.
#[inline(always)]
fn client(ctx: &SockAddrContext) -> Option<(u64, bool)> {
    let cfg = CONFIG_V2.get_ptr(0)?;
    // SAFETY: helper reading the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: pointer from a successful lookup, valid for this run.
    let (host_netns, flags) = unsafe { ((*cfg).host_netns_cookie, (*cfg).flags) };
    let host = host_netns != 0 && netns == host_netns;
    (host || flags & config_flags::SOCKET_LB_PODS != 0).then_some((netns, host))
}

/// A socket connecting or sending to `dst` (address, port): the backend it
/// goes to instead, a failure, or nothing to do.
#[inline(always)]
fn forward<F: Family>(ctx: &SockAddrContext, dst: (F::Addr, u16), unconnected: bool) -> Xlate<F::Addr> {
    let proto = proto(ctx);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Xlate::Pass;
    }
    let Some((netns, host)) = client(ctx) else { return Xlate::Pass };
    let mut fe = Frontend { addr: dst.0, port: 0, proto: 0, scope: 0, svc: SvcValue::default() };
    if !lb::lookup::<F>(&mut fe, &dst.0, dst.1, proto, true) {
        return Xlate::Pass;
    }
    let svc = fe.svc;
    if svc.flags & svc_flags::SOURCE_RANGES != 0 {
        if !host {
            // A pod's packets meet the source ranges at its interface.
            return Xlate::Pass;
        }
        // A host socket has no source address yet at connect time, and
        // the datapath knows no single address of the node to check in its
        // place (masquerade takes the route's source): a frontend behind
        // source ranges is not for the node's own sockets.
        stats::count(F::SLOT, Stat::DropSourceRange);
        return Xlate::Fail(EHOSTUNREACH);
    }
    let client = Client::Cookie(netns);
    let chosen = if unconnected {
        sticky::<F>(socket_cookie(ctx), &fe, dst, client)
    } else {
        lb::select::<F>(&fe, client, conntrack::now())
    };
    let Some(chosen) = chosen else {
        if svc.flags & svc_flags::DROP_WHEN_EMPTY != 0 {
            stats::count(F::SLOT, Stat::DropNoLocalBackend);
            return Xlate::Fail(EHOSTUNREACH);
        }
        // No backend of this family (never borrow one of the other).
        stats::count(F::SLOT, Stat::SockReject);
        return Xlate::Fail(ECONNREFUSED);
    };
    let (backend, backend_port) = chosen.backend;
    if !unconnected {
        let mut conn = SockConn { frontend: dst.0, frontend_port: dst.1, backend, backend_port };
        // Storage only fails when the kernel is out of memory: the socket
        // then shows the backend as its peer.
        if let Some(p) = F::sock_conn(ctx, Some(&mut conn)) {
            // SAFETY: pointer into this socket's storage, valid for this run;
            // an existing entry (an earlier connect()) is overwritten.
            unsafe { *p = conn };
        }
    }
    stats::count(F::SLOT, Stat::SockXlate);
    Xlate::To(backend, backend_port)
}

/// The backend of an unconnected socket (`cookie`) sending to frontend
/// `fe` at `dst`: the one it had while that still names the same backend,
/// else a new choice; the way back is recorded.
#[inline(always)]
fn sticky<F: Family>(
    cookie: u64,
    fe: &Frontend<F::Addr>,
    dst: (F::Addr, u16),
    client: Client<F::Addr>,
) -> Option<Chosen<F::Addr>> {
    let proto = fe.proto;
    let kept = F::sock_fwd(cookie, dst, proto).and_then(|f| {
        let backend = (f.backend, f.backend_port);
        (F::backend(f.backend_id) == Some(backend)).then_some(Chosen { id: f.backend_id, backend })
    });
    let chosen = if let Some(c) = kept {
        c
    } else {
        let c = lb::select::<F>(fe, client, conntrack::now())?;
        let fwd = SockFwd { backend: c.backend.0, backend_port: c.backend.1, _pad: [0; 2], backend_id: c.id };
        F::sock_fwd_set(cookie, dst, proto, &fwd);
        c
    };
    let rev = SockRev { frontend: dst.0, frontend_port: dst.1, _pad: [0; 2] };
    // Written only when missing or different: no write per datagram.
    if F::sock_rev(cookie, chosen.backend, proto) != Some(rev) {
        F::sock_rev_set(cookie, chosen.backend, proto, &rev);
    }
    Some(chosen)
}

/// The frontend to show for `peer` (address, port): what the socket
/// connected to, or (`datagram`: recvmsg) where its unconnected datagrams
/// to a frontend went.
#[inline(always)]
fn reverse<F: Family>(ctx: &SockAddrContext, peer: (F::Addr, u16), datagram: bool) -> Option<(F::Addr, u16)> {
    if let Some(p) = F::sock_conn(ctx, None) {
        // SAFETY: pointer into this socket's storage, valid for this run.
        let conn = unsafe { *p };
        if (conn.backend, conn.backend_port) == peer {
            stats::count(F::SLOT, Stat::SockRevXlate);
            return Some((conn.frontend, conn.frontend_port));
        }
    }
    if !datagram {
        return None;
    }
    let rev = F::sock_rev(socket_cookie(ctx), peer, proto(ctx))?;
    stats::count(F::SLOT, Stat::SockRevXlate);
    Some((rev.frontend, rev.frontend_port))
}
