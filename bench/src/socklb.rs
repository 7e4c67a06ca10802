//! Socket-level load balancing: TCP connect-request-close rate of a client
//! through a ClusterIP against the same client connecting to the backend
//! directly, both families, 10 and 10,000 Services.
//!
//! - `host`: a process in the node's network namespace (socket LB: its
//!   `connect()` goes straight to the backend) against the backend address.
//! - `pod`: a client pod through the packet path (the default) and with
//!   `--socket-lb-pods` (socket LB for pods too), against the backend
//!   address: the figures behind the default for pods.
//!
//! Direct and ClusterIP windows alternate (one pair at a time, which goes
//! first alternating too), and the
//! ratio reported is the median of the pairs' ratios: on a shared machine
//! the load changes between minutes, less between neighbouring seconds.
//!
//! Every client is a process of its own (`dsproxy-bench --sock-client`,
//! the tests' socket client) in a child cgroup made here, to which alone
//! the agent attaches its socket programs; the direct figures are measured
//! from the same cgroup with the programs attached, so both sides pay the
//! hook.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use serde::Serialize;

use crate::vip;
use dsproxy_tests::{Cluster, cgroup::TestCgroup, netns::NetNs};

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub family: &'static str,
    /// `host` or `pod`.
    pub client: &'static str,
    /// `socket-lb` or `packet`.
    pub path: &'static str,
    pub services: usize,
    /// Through the ClusterIP (median window).
    pub conn_per_sec: f64,
    /// The same client to the backend's address (median window).
    pub direct_per_sec: f64,
    /// Median of the windows' ratios: each ClusterIP window is paired with
    /// a direct window next to it, so both meet the same load of a
    /// shared machine.
    pub ratio: f64,
    pub errors: u64,
}

const TARGET_PORT: u16 = 8080;
const WORKERS: usize = 4;
/// Windows per figure; the median is reported (2 shared cores).
const WINDOWS: usize = 5;

/// The first argument that makes `dsproxy-bench` the socket client.
pub const CLIENT_FLAG: &str = "--sock-client";

/// One connect-request-close rate window of a client process in `ns`,
/// in the cgroup.
fn window(ns: &NetNs, cg: &TestCgroup, target: SocketAddr, ms: u64) -> (f64, u64) {
    let exe = std::env::current_exe().expect("own executable");
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(exe)
        .arg(CLIENT_FLAG)
        .arg("--join")
        .arg(cg.procs())
        .args(["rate", &target.to_string(), &ms.to_string(), &WORKERS.to_string()])
        .output()
        .expect("run the socket client");
    assert!(out.status.success(), "socket client failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("client output");
    (v["conn_per_sec"].as_f64().expect("rate"), v["errors"].as_u64().expect("errors"))
}

struct Bench {
    c: Cluster,
    cg: TestCgroup,
    pod: usize,
    real: [IpAddr; 2],
    ms: u64,
    rows: Vec<Row>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Bench {
    /// Direct and ClusterIP windows in turn, per family.
    fn measure(&mut self, client: &'static str, path: &'static str, services: usize, targets: [SocketAddr; 2]) {
        for (v6, target) in [(false, targets[0]), (true, targets[1])] {
            let ns = if client == "host" { &self.c.topo.node } else { &self.c.topo.pods[self.pod].ns };
            let direct = SocketAddr::new(self.real[usize::from(v6)], TARGET_PORT);
            // Which goes first alternates: a window inherits the TIME_WAIT
            // sockets of the one before (the same backend).
            let pairs: Vec<((f64, u64), (f64, u64))> = (0..WINDOWS)
                .map(|i| {
                    if i % 2 == 0 {
                        let d = window(ns, &self.cg, direct, self.ms);
                        (d, window(ns, &self.cg, target, self.ms))
                    } else {
                        let t = window(ns, &self.cg, target, self.ms);
                        (window(ns, &self.cg, direct, self.ms), t)
                    }
                })
                .collect();
            let rate = median(pairs.iter().map(|p| p.1.0).collect());
            let direct = median(pairs.iter().map(|p| p.0.0).collect());
            let ratio = median(pairs.iter().map(|p| p.1.0 / p.0.0).collect());
            let errors = pairs.iter().map(|p| p.0.1 + p.1.1).sum();
            let family = if v6 { "IPv6" } else { "IPv4" };
            eprintln!(
                "  socklb {family} {client} {path:<9} {services:>6} services: {rate:>8.0} conn/s, direct {direct:>8.0}, \
                 {ratio:.2}x, {errors} errors"
            );
            self.rows.push(Row {
                family,
                client,
                path,
                services,
                conn_per_sec: rate,
                direct_per_sec: direct,
                ratio,
                errors,
            });
        }
    }

    fn start(&mut self, pods: bool) {
        let cgroup = self.cg.as_path().to_str().expect("utf-8").to_owned();
        self.c.start_agent_with(&["--cgroup", &cgroup, "--socket-lb-pods", if pods { "true" } else { "false" }]);
        self.c
            .agent()
            .wait_for_line(|l| l.contains("socket-level load balancing on cgroup"), std::time::Duration::from_mins(1));
    }
}

pub fn measure(agent: &Path, sizes: &[usize], secs: f64) -> Vec<Row> {
    let ms = std::time::Duration::from_secs_f64(secs / WINDOWS as f64).as_millis();
    let ms = u64::try_from(ms).expect("a window of a few seconds");
    let mut c = Cluster::new(agent);
    let pod = c.client();
    let be = c.topo.add_pod("be0", false);
    for v6 in [false, true] {
        let p = &c.topo.pods[be];
        let srv = dsproxy_tests::echo::Backend::start_pool(&p.ns, "be0", SocketAddr::new(p.addr(v6), TARGET_PORT), 4);
        c.servers.push(srv);
    }
    for ns in [&c.topo.node, &c.topo.pods[pod].ns] {
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    }
    let real = [c.addr(be, false), c.addr(be, true)];
    let mut b = Bench { c, cg: TestCgroup::new(), pod, real, ms, rows: Vec::new() };
    for &n in sizes {
        let m = n / 2;
        let targets = [false, true].map(|v6| {
            let (a, p) = vip(m, v6);
            SocketAddr::new(a, p)
        });
        let real = b.real;
        // The measured Service has the one backend; the others have
        // endpoints that are never contacted.
        let objs = crate::services(n, |i, v6| {
            if i == m { vec![real[usize::from(v6)]] } else { vec![crate::e2e::fake_endpoint(i, 0, 1, v6)] }
        });
        b.c.write("services.yaml", &dsproxy_tests::manifests::documents(&objs));
        for pods in [false, true] {
            b.start(pods);
            if pods {
                b.measure("pod", "socket-lb", n, targets);
            } else {
                b.measure("host", "socket-lb", n, targets);
                b.measure("pod", "packet", n, targets);
            }
            // Stop and unpin (the programs leave the cgroup).
            drop(b.c.agent.take());
        }
        b.c.remove("services.yaml");
    }
    b.rows
}
