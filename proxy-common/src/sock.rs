//! Socket-level load balancing (cgroup `sock_addr` hooks): per socket, the
//! backend its traffic to a frontend goes to, and back.
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

/// Where it goes: the backend, IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFwd4 {
    pub backend: [u8; 4],
    pub backend_port: u16,
    pub _pad: [u8; 2],
    pub backend_id: u32,
}
const _: () = assert!(size_of::<SockFwd4>() == 12);

/// Where it goes: the backend, IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockFwd6 {
    pub backend: [u8; 16],
    pub backend_port: u16,
    pub _pad: [u8; 2],
    pub backend_id: u32,
}
const _: () = assert!(size_of::<SockFwd6>() == 24);

/// A socket's traffic from a backend, IPv4 (`recvmsg`, `getpeername`).
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

/// The frontend the application sees as its peer, IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRev4 {
    pub frontend: [u8; 4],
    pub frontend_port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SockRev4>() == 8);

/// The frontend the application sees as its peer, IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRev6 {
    pub frontend: [u8; 16],
    pub frontend_port: u16,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<SockRev6>() == 20);
