//! A client for socket-level load balancing tests and benchmarks: a whole
//! process (cgroup membership is per process), started inside a network
//! namespace with `ip netns exec` and, with `--join`, moved into a test
//! cgroup before it opens a socket. Each operation prints one JSON line.
//!
//! `dsproxy-sock-client [--join CGROUP.PROCS] OP...`, where OP is
//! - `tcp ADDR`: connect, one request, getpeername;
//! - `udp ADDR`: connected UDP, one request, getpeername;
//! - `udpfrom ADDR N`: one unconnected UDP socket, N sendto/recvfrom;
//! - `hold ADDR`: connect, print, wait for a line on stdin, then
//!   getpeername and one request on the same connection;
//! - `loop ADDR MS`: TCP requests one after the other for MS ms;
//! - `rate ADDR MS WORKERS`: connect-request-close cycles from WORKERS
//!   threads for MS ms (benchmarks).
//!
//! A failed call prints its errno, so a test can tell ECONNREFUSED from a
//! timeout.
use std::{
    io::BufRead as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::echo::{Conn, IO_TIMEOUT, Reply, tcp_request_within};

/// Run the client with `args` (without the program name); returns the
/// process's exit code.
pub fn main(args: &[String]) -> i32 {
    let mut args = args.iter();
    let mut ops: Vec<&str> = Vec::new();
    while let Some(a) = args.next() {
        if a == "--join" {
            let path = args.next().expect("--join needs a path");
            // Writing 0 moves this whole process (every thread) there.
            if let Err(e) = std::fs::write(path, "0") {
                eprintln!("joining {path}: {e}");
                return 2;
            }
        } else {
            ops.push(a);
        }
    }
    let mut ops = ops.into_iter();
    while let Some(op) = ops.next() {
        let mut arg = || ops.next().unwrap_or_else(|| panic!("{op} needs more arguments"));
        let addr: SocketAddr = arg().parse().expect("a socket address");
        let out = match op {
            "tcp" => tcp(addr),
            "udp" => udp(addr),
            "udpfrom" => udp_from(addr, arg().parse().expect("a count")),
            "hold" => hold(addr),
            "loop" => run_loop(addr, Duration::from_millis(arg().parse().expect("ms"))),
            "rate" => {
                let ms = Duration::from_millis(arg().parse().expect("ms"));
                rate(addr, ms, arg().parse().expect("workers"))
            }
            other => panic!("unknown operation {other}"),
        };
        println!("{out}");
    }
    0
}

fn failure(e: &std::io::Error) -> Value {
    json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()})
}

fn reply(r: &Reply, peer: SocketAddr) -> Value {
    json!({"ok": true, "backend": r.backend, "local": r.local.to_string(), "seen": r.peer.to_string(),
           "peer": peer.to_string()})
}

fn tcp(addr: SocketAddr) -> Value {
    let run = || -> std::io::Result<Value> {
        let mut c = Conn::connect(addr)?;
        let peer = c.peer_addr()?;
        Ok(reply(&c.request()?, peer))
    };
    run().unwrap_or_else(|e| failure(&e))
}

fn unspecified(addr: SocketAddr) -> SocketAddr {
    if addr.is_ipv6() { "[::]:0".parse().expect("addr") } else { "0.0.0.0:0".parse().expect("addr") }
}

fn udp(addr: SocketAddr) -> Value {
    let run = || -> std::io::Result<Value> {
        let sock = UdpSocket::bind(unspecified(addr))?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        sock.connect(addr)?;
        sock.send(b"hello\n")?;
        let mut buf = [0u8; 2048];
        let n = sock.recv(&mut buf)?;
        let r = parse(&buf[..n])?;
        Ok(reply(&r, sock.peer_addr()?))
    };
    run().unwrap_or_else(|e| failure(&e))
}

fn parse(buf: &[u8]) -> std::io::Result<Reply> {
    String::from_utf8_lossy(buf).trim().parse()
}

/// `n` datagrams from one unconnected socket: one JSON array of replies
/// with the source `recvfrom` reported.
fn udp_from(addr: SocketAddr, n: usize) -> Value {
    let run = || -> std::io::Result<Value> {
        let sock = UdpSocket::bind(unspecified(addr))?;
        sock.set_read_timeout(Some(IO_TIMEOUT))?;
        let mut out = Vec::new();
        for _ in 0..n {
            sock.send_to(b"hello\n", addr)?;
            let mut buf = [0u8; 2048];
            let (len, from) = sock.recv_from(&mut buf)?;
            out.push(reply(&parse(&buf[..len])?, from));
        }
        Ok(json!({"ok": true, "replies": out}))
    };
    run().unwrap_or_else(|e| failure(&e))
}

fn hold(addr: SocketAddr) -> Value {
    let mut c = match Conn::connect(addr) {
        Ok(c) => c,
        Err(e) => return failure(&e),
    };
    println!("{}", json!({"ok": true, "held": true}));
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let mut run = || -> std::io::Result<Value> {
        let peer = c.peer_addr()?;
        Ok(reply(&c.request()?, peer))
    };
    run().unwrap_or_else(|e| failure(&e))
}

/// Requests one after the other: how many succeeded, how many failed, the
/// first failure, and every peer address shown.
fn run_loop(addr: SocketAddr, time: Duration) -> Value {
    let deadline = Instant::now() + time;
    let (mut ok, mut failed, mut first) = (0u64, 0u64, None);
    let mut peers = std::collections::BTreeSet::new();
    while Instant::now() < deadline {
        let r = TcpStream::connect_timeout(&addr, IO_TIMEOUT).and_then(|s| {
            peers.insert(s.peer_addr()?.to_string());
            Conn::from_stream(s)?.request()
        });
        match r {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
    json!({"ok": failed == 0, "done": ok, "failed": failed, "first_error": first, "peers": peers})
}

/// Connect-request-close cycles per second from `workers` threads.
fn rate(addr: SocketAddr, time: Duration, workers: usize) -> Value {
    let (per_sec, errors) = conn_rate(addr, time, workers, || ());
    json!({"ok": true, "conn_per_sec": per_sec, "errors": errors})
}

/// Connect-request-close cycles to `addr` from `workers` threads for
/// `time`, each thread first running `setup` (e.g. entering a network
/// namespace): completed cycles per second and failed ones.
pub fn conn_rate(
    addr: SocketAddr,
    time: Duration,
    workers: usize,
    setup: impl Fn() + Clone + Send + 'static,
) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + time;
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let (done, errors, setup) = (Arc::clone(&done), Arc::clone(&errors), setup.clone());
            std::thread::spawn(move || {
                setup();
                while Instant::now() < deadline {
                    match tcp_request_within(addr, Duration::from_secs(1)) {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker");
    }
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let per_sec = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    (per_sec, errors.load(Ordering::Relaxed))
}
