//! Socket-level load balancing (cgroup `sock_addr` hooks): the backend a
//! socket's traffic to a frontend goes to, and the frontend its peer is
//! shown as.
//!
//! - A **connected** socket (TCP, connected UDP) gets its backend at
//!   `connect()`. What it connected to is kept in the socket itself
//!   (`SOCK{4,6}_CONN`, socket-local storage that dies with the socket),
//!   for `getpeername()` and `recvmsg()`: no LRU can evict it while the
//!   socket lives.
//! - An **unconnected** UDP socket gets a backend per frontend it sends to
//!   (`SOCK{4,6}_FWD`, by socket cookie and frontend), kept while the
//!   socket lives so a conversation stays on one backend, and the way back
//!   (`SOCK{4,6}_REV`, by socket cookie and backend) for `recvmsg()`.
//!   Socket cookies are never reused while the system runs: an entry of a
//!   closed socket is harmless until the LRU evicts it.
use core::mem::size_of;

/// A socket's traffic to a frontend, IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey4 {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// The frontend address and port the application used, network order.
    pub frontend: [u8; 4],
    pub frontend_port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<SockKey4>() == 16);

/// A socket's traffic to a frontend, IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey6 {
    pub cookie: u64,
    pub frontend: [u8; 16],
    pub frontend_port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<SockKey6>() == 32);

impl SockKey4 {
    #[inline(always)]
    pub const fn new(cookie: u64, frontend: [u8; 4], frontend_port: u16, proto: u8) -> Self {
        Self { cookie, frontend, frontend_port, proto, _pad: 0 }
    }
}

impl SockKey6 {
    #[inline(always)]
    pub const fn new(cookie: u64, frontend: [u8; 16], frontend_port: u16, proto: u8) -> Self {
        Self { cookie, frontend, frontend_port, proto, _pad: [0; 5] }
    }
}

/// Where it goes: the backend. `A` is the family's address type.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFwd<A> {
    /// Network byte order.
    pub backend: A,
    pub backend_port: u16,
    pub _pad: [u8; 2],
    /// The backend's id in `BACKEND{4,6}`: an entry whose id no longer
    /// names this backend is stale.
    pub backend_id: u32,
}
pub type SockFwd4 = SockFwd<[u8; 4]>;
pub type SockFwd6 = SockFwd<[u8; 16]>;
const _: () = assert!(size_of::<SockFwd4>() == 12);
const _: () = assert!(size_of::<SockFwd6>() == 24);

/// A socket's traffic from a backend, IPv4 (`recvmsg` of unconnected UDP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey4 {
    pub cookie: u64,
    pub backend: [u8; 4],
    pub backend_port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<SockRevKey4>() == 16);

/// A socket's traffic from a backend, IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey6 {
    pub cookie: u64,
    pub backend: [u8; 16],
    pub backend_port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(size_of::<SockRevKey6>() == 32);

impl SockRevKey4 {
    #[inline(always)]
    pub const fn new(cookie: u64, backend: [u8; 4], backend_port: u16, proto: u8) -> Self {
        Self { cookie, backend, backend_port, proto, _pad: 0 }
    }
}

impl SockRevKey6 {
    #[inline(always)]
    pub const fn new(cookie: u64, backend: [u8; 16], backend_port: u16, proto: u8) -> Self {
        Self { cookie, backend, backend_port, proto, _pad: [0; 5] }
    }
}

/// The frontend the application sees as its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRev<A> {
    /// Network byte order.
    pub frontend: A,
    pub frontend_port: u16,
    pub _pad: [u8; 2],
}
pub type SockRev4 = SockRev<[u8; 4]>;
pub type SockRev6 = SockRev<[u8; 16]>;
const _: () = assert!(size_of::<SockRev4>() == 8);
const _: () = assert!(size_of::<SockRev6>() == 20);

/// What a connected socket connected to (`SOCK{4,6}_CONN`, socket-local
/// storage): the frontend it named and the backend it reached instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockConn<A> {
    /// Network byte order.
    pub frontend: A,
    pub frontend_port: u16,
    pub backend: A,
    pub backend_port: u16,
}
pub type SockConn4 = SockConn<[u8; 4]>;
pub type SockConn6 = SockConn<[u8; 16]>;
const _: () = assert!(size_of::<SockConn4>() == 12);
const _: () = assert!(size_of::<SockConn6>() == 36);
