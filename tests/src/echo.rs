//! Backend servers and clients over real sockets. A backend answers every
//! request line (TCP) or datagram (UDP) with `NAME LOCAL PEER`: who it is,
//! the address it was reached on, and the client address it saw.
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::netns::NetNs;

pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// What a backend said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub backend: String,
    /// The address the backend was reached on (after DNAT).
    pub local: SocketAddr,
    /// The client address the backend saw.
    pub peer: SocketAddr,
}

impl std::str::FromStr for Reply {
    type Err = std::io::Error;

    fn from_str(line: &str) -> std::io::Result<Self> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad reply {line:?}"));
        let mut it = line.split_whitespace();
        let backend = it.next().ok_or_else(bad)?.to_owned();
        let local = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let peer = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        Ok(Self { backend, local, peer })
    }
}

/// A TCP and a UDP echo server on one address and port, stopped on drop.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    fds: Vec<i32>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Serve TCP and UDP on `addr` inside `ns`.
    pub fn start(ns: &NetNs, name: &str, addr: SocketAddr) -> Self {
        let (tcp, udp) = ns.run(move || {
            let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
            let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
            (tcp, udp)
        });
        let fds = vec![tcp.as_raw_fd(), udp.as_raw_fd()];
        let n1 = name.to_owned();
        let tcp_thread = thread::spawn(move || {
            // accept fails once `Drop` shuts the listener down.
            while let Ok((stream, peer)) = tcp.accept() {
                let name = n1.clone();
                thread::spawn(move || serve_tcp(&name, stream, peer));
            }
        });
        let n2 = name.to_owned();
        let udp_thread = thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            // recv returns 0 bytes from an unconnected peer once shut down.
            while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                if n == 0 {
                    break;
                }
                let msg = format!("{n2} {} {peer}", udp.local_addr().expect("local addr"));
                // As long as the request, so a large request gets a large
                // (fragmented) answer.
                let _ = udp.send_to(padded(msg, n).as_bytes(), peer);
            }
        });
        Self { name: name.to_owned(), addr, fds, threads: vec![tcp_thread, udp_thread] }
    }
}

impl Backend {
    /// A TCP server for load tests: `workers` threads accept on one
    /// listener and serve each connection inline (no thread per
    /// connection), answering like `start`.
    pub fn start_pool(ns: &NetNs, name: &str, addr: SocketAddr, workers: usize) -> Self {
        let tcp = ns.run(move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}")));
        let fds = vec![tcp.as_raw_fd()];
        let tcp = std::sync::Arc::new(tcp);
        let threads = (0..workers)
            .map(|_| {
                let (tcp, name) = (std::sync::Arc::clone(&tcp), name.to_owned());
                thread::spawn(move || {
                    while let Ok((stream, peer)) = tcp.accept() {
                        serve_tcp(&name, stream, peer);
                    }
                })
            })
            .collect();
        Self { name: name.to_owned(), addr, fds, threads }
    }
}

/// `line` and a newline, padded with a field of dots to `len` bytes.
fn padded(mut line: String, len: usize) -> String {
    if len > line.len() + 2 {
        line.push(' ');
        line.extend(std::iter::repeat_n('.', len - line.len() - 1));
    }
    line.push('\n');
    line
}

fn serve_tcp(name: &str, stream: TcpStream, peer: SocketAddr) {
    let local = stream.local_addr().expect("local addr");
    let mut writer = stream.try_clone().expect("clone stream");
    for line in BufReader::new(stream).lines() {
        if line.is_err() {
            break;
        }
        if writer.write_all(format!("{name} {local} {peer}\n").as_bytes()).is_err() {
            break;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        for fd in &self.fds {
            // SAFETY: the sockets are still owned by the server threads;
            // shutdown only wakes their blocking calls.
            unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP request: connect, send a line, read the answer, close.
pub fn tcp_request(target: SocketAddr) -> std::io::Result<Reply> {
    tcp_request_within(target, IO_TIMEOUT)
}

/// `tcp_request` with a connect timeout of its own.
pub fn tcp_request_within(target: SocketAddr, connect_timeout: Duration) -> std::io::Result<Reply> {
    let stream = TcpStream::connect_timeout(&target, connect_timeout)?;
    let mut conn = Conn::from_stream(stream)?;
    conn.request()
}

/// One UDP request from a socket connected to `target`: the kernel only
/// accepts an answer whose source is exactly `target`, so a reply that was
/// not rewritten back to the VIP times out.
pub fn udp_request(target: SocketAddr) -> std::io::Result<Reply> {
    udp_request_within(target, IO_TIMEOUT)
}

/// `udp_request` with an answer timeout of its own.
pub fn udp_request_within(target: SocketAddr, timeout: Duration) -> std::io::Result<Reply> {
    udp_exchange(SocketAddr::new(unspecified(target), 0), target, 6, timeout)
}

/// One TCP or UDP request to `target` from the local address `from` (any
/// port), connected (TCP) or answered (UDP) within `timeout`.
pub fn request_from(
    from: std::net::IpAddr,
    target: SocketAddr,
    udp: bool,
    timeout: Duration,
) -> std::io::Result<Reply> {
    let local = SocketAddr::new(from, 0);
    if udp {
        return udp_exchange(local, target, 6, timeout);
    }
    let sock = socket2::Socket::new(socket2::Domain::for_address(target), socket2::Type::STREAM, None)?;
    sock.bind(&local.into())?;
    sock.connect_timeout(&target.into(), timeout)?;
    Conn::from_stream(sock.into())?.request()
}

/// `udp_request` from local port `port` (0: any) with a datagram of `size`
/// bytes, answered by one as large: above the link MTU both travel as
/// fragments.
pub fn udp_request_on(port: u16, target: SocketAddr, size: usize) -> std::io::Result<Reply> {
    udp_exchange(SocketAddr::new(unspecified(target), port), target, size, IO_TIMEOUT)
}

fn udp_exchange(local: SocketAddr, target: SocketAddr, size: usize, timeout: Duration) -> std::io::Result<Reply> {
    let sock = UdpSocket::bind(local)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.connect(target)?;
    sock.send(padded("hello".to_owned(), size).as_bytes())?;
    let mut buf = vec![0u8; 65536];
    let n = sock.recv(&mut buf)?;
    // A padded request gets an answer of its own size.
    if size > 100 && n != size {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("sent {size} bytes, got {n} back")));
    }
    String::from_utf8_lossy(&buf[..n]).trim().parse()
}

/// The wildcard address of `target`'s family.
fn unspecified(target: SocketAddr) -> std::net::IpAddr {
    if target.is_ipv6() { std::net::Ipv6Addr::UNSPECIFIED.into() } else { std::net::Ipv4Addr::UNSPECIFIED.into() }
}

/// One TCP request from local port `port`, bound with SO_REUSEADDR (a port
/// whose earlier connection is in TIME_WAIT can connect elsewhere). With
/// `abort` the connection ends with a RST instead of a FIN.
pub fn tcp_request_from(port: u16, target: SocketAddr, abort: bool) -> std::io::Result<Reply> {
    let domain = if target.is_ipv6() { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 };
    let sock = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::new(unspecified(target), port).into())?;
    sock.connect_timeout(&target.into(), IO_TIMEOUT)?;
    if abort {
        sock.set_linger(Some(Duration::ZERO))?;
    }
    Conn::from_stream(sock.into())?.request()
}

/// A TCP connection that stays open for several requests.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn connect(target: SocketAddr) -> std::io::Result<Self> {
        Self::from_stream(TcpStream::connect_timeout(&target, IO_TIMEOUT)?)
    }

    pub fn from_stream(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Self { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    /// The address the client's socket believes it is connected to.
    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.writer.peer_addr()
    }

    /// Send one request line of `len` bytes and read the answer, waiting
    /// up to `timeout` for it.
    pub fn upload(&mut self, len: usize, timeout: Duration) -> std::io::Result<Reply> {
        self.writer.set_read_timeout(Some(timeout))?;
        self.writer.set_write_timeout(Some(timeout))?;
        self.writer.write_all(padded("upload".to_owned(), len).as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        line.trim().parse()
    }

    /// The local address of the client's socket.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    pub fn request(&mut self) -> std::io::Result<Reply> {
        self.writer.write_all(b"hello\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        line.trim().parse()
    }
}
