//! End to end in the namespace topology: TCP connect-request-close rate and
//! request-response latency from a client pod through a ClusterIP, for
//! dsproxy and for kube-proxy-style iptables and nftables rulesets (made
//! here, in kube-proxy's shape), against the direct backend address. Each
//! on two node profiles: clean, and carrying kube-proxy's INVALID-drop rule
//! (nftables), with the node's default route through its uplink.
//!
//! The Service measured sits in the middle of the N Services (the iptables
//! chain is scanned linearly: the middle is the average case); it has two
//! backends. The others have endpoints in 198.18.200.0/24 and
//! fd00:0:0:c8::/64 that are never contacted.
use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::vip;
use dsproxy_tests::{
    Cluster,
    echo::Conn,
    manifests::documents,
    netns::{NetNs, sh},
    topo::{Firewall, Profile},
};

/// The node profiles measured, with their names in the report.
pub const PROFILES: [(Profile, &str); 2] =
    [(Profile::Clean, "clean"), (Profile::KubeProxyRules(Firewall::Nftables), "kube-proxy-rules")];

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The node profile: `clean` or `kube-proxy-rules`.
    pub profile: &'static str,
    pub family: &'static str,
    pub system: &'static str,
    pub services: usize,
    /// Completed connect-request-close cycles per second.
    pub conn_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

const TARGET_PORT: u16 = 8080;
const WORKERS: usize = 4;

/// Pod addresses for endpoints that are never contacted: IPv6 ones are
/// unique; IPv4 ones come from a pool of 25,600 (198.18.100.0 to
/// 198.18.199.255: the test range has no room for 100,000 more), so at the
/// largest sizes several Services share a pod, as Services often do.
pub const V4_POOL: usize = 25_600;

/// Endpoint `k` of Service `i` when Services have `per` endpoints.
pub fn fake_endpoint(i: usize, k: usize, per: usize, v6: bool) -> IpAddr {
    let n = i * per + k;
    if v6 {
        IpAddr::V6(std::net::Ipv6Addr::from((0xfd00_0000_0000_00c8_u128 << 64) | (n as u128 + 2)))
    } else {
        let idx = u32::try_from(n % V4_POOL).expect("fits");
        IpAddr::V4(std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(198, 18, 100, 0)) + idx))
    }
}

/// Endpoints of Service `i`: the real backends for the measured one.
fn endpoints(i: usize, measured: usize, real: &[IpAddr], v6: bool) -> Vec<IpAddr> {
    if i == measured { real.to_vec() } else { (0..2).map(|k| fake_endpoint(i, k, 2, v6)).collect() }
}

fn ep_str(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{TARGET_PORT}"),
        IpAddr::V6(a) => format!("[{a}]:{TARGET_PORT}"),
    }
}

/// kube-proxy's iptables-mode nat rules for `n` Services: `KUBE-SERVICES`
/// matches each ClusterIP and jumps to a `KUBE-SVC-*` chain, which picks a
/// `KUBE-SEP-*` chain with `statistic --mode random`; that one DNATs.
pub fn iptables_rules(n: usize, measured: usize, real: &[IpAddr], v6: bool) -> String {
    iptables_rules_with(n, v6, |i| endpoints(i, measured, real, v6))
}

pub fn iptables_rules_with(n: usize, v6: bool, endpoints: impl Fn(usize) -> Vec<IpAddr>) -> String {
    let mut chains = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from("-A PREROUTING -j KUBE-SERVICES\n");
    let plen = if v6 { 128 } else { 32 };
    for i in 0..n {
        let (addr, port) = vip(i, v6);
        let _ = writeln!(chains, ":KUBE-SVC-{i:08X} - [0:0]");
        let _ = writeln!(rules, "-A KUBE-SERVICES -d {addr}/{plen} -p tcp -m tcp --dport {port} -j KUBE-SVC-{i:08X}");
        let eps = endpoints(i);
        for (k, ep) in eps.iter().enumerate() {
            let _ = writeln!(chains, ":KUBE-SEP-{i:08X}{k:02} - [0:0]");
            let left = eps.len() - k;
            if left > 1 {
                let p = 1.0 / left as f64;
                let _ = writeln!(
                    rules,
                    "-A KUBE-SVC-{i:08X} -m statistic --mode random --probability {p:.10} -j KUBE-SEP-{i:08X}{k:02}"
                );
            } else {
                let _ = writeln!(rules, "-A KUBE-SVC-{i:08X} -j KUBE-SEP-{i:08X}{k:02}");
            }
            let _ = writeln!(rules, "-A KUBE-SEP-{i:08X}{k:02} -p tcp -m tcp -j DNAT --to-destination {}", ep_str(*ep));
        }
    }
    chains + &rules + "COMMIT\n"
}

/// kube-proxy's nftables-mode ruleset: one verdict map from (address,
/// protocol, port) to a per-Service chain that picks an endpoint chain with
/// `numgen random`.
pub fn nft_rules(n: usize, measured: usize, real: &[IpAddr], v6: bool) -> String {
    nft_rules_with(n, v6, |i| endpoints(i, measured, real, v6))
}

pub fn nft_rules_with(n: usize, v6: bool, endpoints: impl Fn(usize) -> Vec<IpAddr>) -> String {
    let (fam, addr_t, daddr) = if v6 { ("ip6", "ipv6_addr", "ip6 daddr") } else { ("ip", "ipv4_addr", "ip daddr") };
    let mut out = format!("table {fam} kube-proxy {{\n");
    let mut elements = Vec::new();
    for i in 0..n {
        let (addr, port) = vip(i, v6);
        let eps = endpoints(i);
        let picks: Vec<String> = (0..eps.len()).map(|k| format!("{k} : goto endpoint-{i}-{k}")).collect();
        let _ = writeln!(
            out,
            "  chain service-{i} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            eps.len(),
            picks.join(", ")
        );
        for (k, ep) in eps.iter().enumerate() {
            let _ = writeln!(out, "  chain endpoint-{i}-{k} {{\n    meta l4proto tcp dnat to {}\n  }}", ep_str(*ep));
        }
        elements.push(format!("{addr} . tcp . {port} : goto service-{i}"));
    }
    let _ = writeln!(
        out,
        "  map service-ips {{ type {addr_t} . inet_proto . inet_service : verdict ; elements = {{ {} }} }}",
        elements.join(", ")
    );
    let _ = writeln!(out, "  chain services {{\n    {daddr} . meta l4proto . th dport vmap @service-ips\n  }}");
    let _ = writeln!(
        out,
        "  chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}"
    );
    out + "}\n"
}

/// Manifests for `n` dual-stack Services for dsproxy.
pub fn manifests(n: usize, measured: usize, real4: &[IpAddr], real6: &[IpAddr]) -> String {
    documents(&crate::services(n, |i, v6| endpoints(i, measured, if v6 { real6 } else { real4 }, v6)))
}

/// Load a ruleset into the node's namespace with `tool` reading stdin.
pub fn load_rules(node: &NetNs, tool: &str, args: &[&str], rules: &str) -> Duration {
    let path = std::env::temp_dir().join(dsproxy_tests::netns::unique("dsproxy-rules-"));
    std::fs::write(&path, rules).expect("write rules");
    let started = Instant::now();
    let mut cmd = vec!["ip", "netns", "exec", &node.name, tool];
    cmd.extend_from_slice(args);
    let p = path.to_str().expect("utf-8").to_owned();
    cmd.push(&p);
    sh(&cmd);
    let took = started.elapsed();
    let _ = std::fs::remove_file(&path);
    took
}

/// Connect-request-close cycles per second with `WORKERS` clients.
fn conn_rate(ns: &NetNs, target: SocketAddr, secs: f64) -> (f64, u64) {
    let path = format!("/run/netns/{}", ns.name);
    let enter = move || dsproxy_tests::netns::enter(&path);
    dsproxy_tests::sockclient::conn_rate(target, Duration::from_secs_f64(secs), WORKERS, enter)
}

/// Request-response latency on one connection: p50 and p99 in µs.
fn latency(ns: &NetNs, target: SocketAddr, requests: usize) -> (f64, f64) {
    let mut us: Vec<f64> = ns.run(move || {
        let mut c = Conn::connect(target).expect("connect for latency");
        for _ in 0..100 {
            c.request().expect("warm-up");
        }
        (0..requests)
            .map(|_| {
                let t = Instant::now();
                c.request().expect("request");
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect()
    });
    us.sort_by(f64::total_cmp);
    (us[us.len() / 2], us[us.len() * 99 / 100])
}

struct Bench {
    profile: &'static str,
    c: Cluster,
    client: usize,
    real4: Vec<IpAddr>,
    real6: Vec<IpAddr>,
    secs: f64,
    requests: usize,
    rows: Vec<Row>,
}

/// Windows per connection-rate measurement: the median window is reported,
/// so one disturbed window (2 shared cores) does not decide a figure.
const WINDOWS: usize = 5;

impl Bench {
    fn measure(&mut self, system: &'static str, services: usize, targets: [SocketAddr; 2]) {
        for (v6, target) in [(false, targets[0]), (true, targets[1])] {
            let ns = &self.c.topo.pods[self.client].ns;
            let mut windows: Vec<(f64, u64)> =
                (0..WINDOWS).map(|_| conn_rate(ns, target, self.secs / WINDOWS as f64)).collect();
            windows.sort_by(|a, b| a.0.total_cmp(&b.0));
            let rate = windows[WINDOWS / 2].0;
            let errors = windows.iter().map(|w| w.1).sum::<u64>();
            let (p50, p99) = latency(ns, target, self.requests);
            let family = if v6 { "IPv6" } else { "IPv4" };
            eprintln!(
                "  e2e {} {family} {system:<8} {services:>6} services: {rate:>8.0} conn/s, p50 {p50:.1} µs, p99 {p99:.1} µs, {errors} errors",
                self.profile
            );
            let profile = self.profile;
            self.rows.push(Row {
                profile,
                family,
                system,
                services,
                conn_per_sec: rate,
                p50_us: p50,
                p99_us: p99,
                errors,
            });
        }
    }
}

pub fn measure(agent: &Path, sizes: &[usize], secs: f64, requests: usize) -> Vec<Row> {
    PROFILES.iter().flat_map(|(profile, name)| measure_on(agent, *profile, name, sizes, secs, requests)).collect()
}

fn measure_on(
    agent: &Path,
    profile: Profile,
    name: &'static str,
    sizes: &[usize],
    secs: f64,
    requests: usize,
) -> Vec<Row> {
    let mut c = Cluster::with_profile(agent, profile);
    let client = c.client();
    let backends: Vec<usize> = (0..2).map(|i| c.topo.add_pod(&format!("be{i}"), false)).collect();
    for (i, b) in backends.iter().enumerate() {
        for v6 in [false, true] {
            let pod = &c.topo.pods[*b];
            let srv = dsproxy_tests::echo::Backend::start_pool(
                &pod.ns,
                &format!("be{i}"),
                SocketAddr::new(pod.addr(v6), TARGET_PORT),
                4,
            );
            c.servers.push(srv);
        }
    }
    let cli = &c.topo.pods[client].ns;
    cli.sysctl("net.ipv4.tcp_tw_reuse", "1");
    cli.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
    let real4: Vec<IpAddr> = backends.iter().map(|b| c.addr(*b, false)).collect();
    let real6: Vec<IpAddr> = backends.iter().map(|b| c.addr(*b, true)).collect();
    let direct = [SocketAddr::new(real4[0], TARGET_PORT), SocketAddr::new(real6[0], TARGET_PORT)];
    let mut b = Bench { profile: name, c, client, real4, real6, secs, requests, rows: Vec::new() };
    b.measure("direct", 0, direct);
    for &n in sizes {
        let m = n / 2;
        let targets = [0, 1].map(|f| {
            let (a, p) = vip(m, f == 1);
            SocketAddr::new(a, p)
        });
        b.c.write("services.yaml", &manifests(n, m, &b.real4, &b.real6));
        b.c.start_agent();
        b.measure("dsproxy", n, targets);
        drop(b.c.agent.take());
        b.c.remove("services.yaml");

        let node = &b.c.topo.node;
        load_rules(node, "iptables-restore", &[], &iptables_rules(n, m, &b.real4, false));
        load_rules(node, "ip6tables-restore", &[], &iptables_rules(n, m, &b.real6, true));
        b.measure("iptables", n, targets);
        flush(&b.c, profile);

        let node = &b.c.topo.node;
        load_rules(node, "nft", &["-f"], &nft_rules(n, m, &b.real4, false));
        load_rules(node, "nft", &["-f"], &nft_rules(n, m, &b.real6, true));
        b.measure("nftables", n, targets);
        flush(&b.c, profile);
    }
    b.rows
}

/// Remove the measured rulesets (iptables-restore here is iptables-nft:
/// one flush clears both) and dress the node as `profile` again.
fn flush(c: &Cluster, profile: Profile) {
    let node = &c.topo.node;
    sh(&["ip", "netns", "exec", &node.name, "nft", "flush", "ruleset"]);
    profile.apply(node, "dsn-n2");
}
