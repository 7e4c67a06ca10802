//! Dual-stack Services on numbered VIPs and traffic probes against them,
//! shared by the reliability tests: which backends serve a VIP, wait until
//! the expected ones do, and long-lived connections that must keep their
//! backend.
use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    Cluster,
    echo::{Conn, tcp_request_within, udp_request, udp_request_within},
    manifests::{Port, READY, service, slice},
    topo::{vip4, vip6},
};

/// Service port and backend (target) port of every probed Service.
pub const PORT: u16 = 80;
pub const TARGET: u16 = 8080;

/// VIP number `n` of a family, with the Service port.
pub fn vip(n: u8, v6: bool) -> SocketAddr {
    SocketAddr::new(if v6 { IpAddr::V6(vip6(u16::from(n))) } else { IpAddr::V4(vip4(n)) }, PORT)
}

/// An established connection and the backend that answered it.
pub type Held = (Conn, String);

impl Cluster {
    /// `RequireDualStack` Service `name` on VIP `n` (TCP and UDP on `PORT`)
    /// and its two slices over the backend pods `pods`.
    pub fn dual_stack(&self, name: &str, n: u8, pods: &[usize]) -> Vec<Value> {
        let ports = [
            Port { name: "tcp", port: PORT, proto: "TCP", target: TARGET },
            Port { name: "udp", port: PORT, proto: "UDP", target: TARGET },
        ];
        let mut objs = vec![service(name, &[vip4(n).into(), vip6(u16::from(n)).into()], "RequireDualStack", &ports)];
        objs.extend(self.dual_slices(name, pods));
        objs
    }

    /// Slices `NAME-IPv4` and `NAME-IPv6` of Service `name` over `pods`.
    pub fn dual_slices(&self, name: &str, pods: &[usize]) -> Vec<Value> {
        [false, true]
            .iter()
            .map(|&v6| {
                let list: Vec<_> = pods.iter().map(|p| (self.addr(*p, v6), READY)).collect();
                let fam = if v6 { "IPv6" } else { "IPv4" };
                slice(&format!("{name}-{fam}"), name, fam, &[("tcp", TARGET, "TCP"), ("udp", TARGET, "UDP")], &list)
            })
            .collect()
    }

    /// Backends answering 3 TCP and 3 UDP requests from pod `client` to VIP
    /// `n`, or the first error.
    pub fn sample(&self, client: usize, n: u8, v6: bool) -> std::io::Result<Vec<String>> {
        self.sample_within(client, n, v6, crate::echo::IO_TIMEOUT)
    }

    /// `sample` where each request gets an answer within `timeout`. Short
    /// while waiting for a change: a SYN or a datagram in flight when the
    /// change lands may go unanswered, and must not hold the sample for a
    /// retransmission or seconds.
    pub fn sample_within(&self, client: usize, n: u8, v6: bool, timeout: Duration) -> std::io::Result<Vec<String>> {
        let target = vip(n, v6);
        self.in_pod(client, move || {
            let mut out = Vec::new();
            for _ in 0..3 {
                out.push(tcp_request_within(target, timeout)?.backend);
                out.push(udp_request_within(target, timeout)?.backend);
            }
            Ok(out)
        })
    }

    /// Wait until VIP `n` is served by `names` only, on both families;
    /// returns how long it took.
    pub fn served_by(&self, client: usize, n: u8, names: &[&str], limit: Duration) -> Duration {
        let start = Instant::now();
        for v6 in [false, true] {
            loop {
                let s = self.sample_within(client, n, v6, Duration::from_millis(200));
                if s.as_ref().is_ok_and(|v| v.iter().all(|b| names.contains(&b.as_str()))) {
                    break;
                }
                assert!(start.elapsed() < limit, "VIP {n} (v6={v6}) not served by {names:?} after {limit:?}: {s:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        start.elapsed()
    }

    /// Assert that VIP `n` is served by `names` only, on both families, for
    /// `period`.
    pub fn stays_served_by(&self, client: usize, n: u8, names: &[&str], period: Duration) {
        let start = Instant::now();
        while start.elapsed() < period {
            for v6 in [false, true] {
                let s = self.sample(client, n, v6);
                assert!(
                    s.as_ref().is_ok_and(|v| v.iter().all(|b| names.contains(&b.as_str()))),
                    "VIP {n} (v6={v6}) must stay served by {names:?}; after {:?}: {s:?}",
                    start.elapsed()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One established TCP connection to VIP `n` per family.
    pub fn connect_both(&self, client: usize, n: u8) -> Vec<Held> {
        self.connect_to(client, vec![vip(n, false), vip(n, true)])
    }

    /// One established TCP connection from pod `client` to each target,
    /// with the backend that answered it.
    pub fn connect_to(&self, client: usize, targets: Vec<SocketAddr>) -> Vec<Held> {
        self.in_pod(client, move || {
            targets
                .iter()
                .map(|t| {
                    let mut c = Conn::connect(*t).expect("connect");
                    let b = c.request().expect("request").backend;
                    (c, b)
                })
                .collect()
        })
    }
}

/// Every connection still answers, from the backend it started with.
pub fn still_on_their_backends(conns: &mut [Held], when: &str) {
    for (c, b) in conns {
        let r = c.request().unwrap_or_else(|e| panic!("established connection {when}: {e}"));
        assert_eq!(&r.backend, b, "established connection moved {when}");
    }
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub ok: u64,
    pub failed: u64,
    /// The first few errors, with the target.
    pub errors: Vec<String>,
}

/// Requests in a loop from a pod until `finish`: one thread per target,
/// alternating a TCP connect-request-close and a UDP request.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<LoadStats>>,
}

impl Load {
    /// Stop and add up.
    pub fn finish(self) -> LoadStats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = LoadStats::default();
        for t in self.threads {
            let s = t.join().expect("load thread");
            total.ok += s.ok;
            total.failed += s.failed;
            total.errors.extend(s.errors);
        }
        total.errors.truncate(10);
        total
    }
}

impl Cluster {
    /// Start a load from pod `client` against `targets`.
    pub fn load(&self, client: usize, targets: &[SocketAddr]) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ns = std::path::PathBuf::from("/run/netns").join(&self.topo.pods[client].ns.name);
        let threads = targets
            .iter()
            .map(|&target| {
                let (stop, ns) = (std::sync::Arc::clone(&stop), ns.clone());
                std::thread::spawn(move || {
                    crate::netns::enter(&ns);
                    let mut s = LoadStats::default();
                    let mut tcp = true;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = if tcp { crate::echo::tcp_request(target) } else { udp_request(target) };
                        match r {
                            Ok(_) => s.ok += 1,
                            Err(e) => {
                                s.failed += 1;
                                if s.errors.len() < 10 {
                                    s.errors.push(format!("{} {target}: {e}", if tcp { "tcp" } else { "udp" }));
                                }
                            }
                        }
                        tcp = !tcp;
                    }
                    s
                })
            })
            .collect();
        Load { stop, threads }
    }
}

/// The agent's resident memory (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}
