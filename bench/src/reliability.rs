//! Reliability figures: how soon changes made during an API-server outage
//! reach the datapath once the server answers again (its history
//! compacted, so every watch relists), and what a huge and a deeply nested
//! manifest cost an unrelated change.
use std::{
    io::ErrorKind,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::json;

use crate::{e2e::fake_endpoint, services, vip};
use dsproxy_tests::{
    Cluster, TempDir,
    echo::tcp_request_within,
    fakeapi::FakeApi,
    manifests::{documents, filler, nested},
};

#[derive(Clone, Debug, Serialize)]
pub struct Result {
    /// Services in the API server (dual-stack, one endpoint per family).
    pub services: usize,
    pub outage_s: f64,
    /// From the server's restart to both changes made during the outage
    /// (an endpoint moved, a new Service) served on both families.
    pub applied_after_restart_ms: f64,
    /// Probes of the new Service refused (programmed without endpoints)
    /// before it served.
    pub new_service_refused: u64,
    /// Manifests: an unrelated one-file change, from the write to the end
    /// of its sync, with a 50 MB and a 200 KB nested file beside it.
    pub unrelated_change_ms: f64,
    /// Manifests: reading the 50 MB file (ConfigMaps and one Service).
    pub huge_file_ms: f64,
    /// The agent's peak RSS after that.
    pub huge_file_peak_rss_mib: f64,
}

/// The backends answering a TCP request to Service `i` (both families),
/// or the first error.
fn probe(c: &Cluster, client: usize, i: usize) -> Vec<std::io::Result<String>> {
    let targets: Vec<SocketAddr> = [false, true].iter().map(|&v6| vip(i, v6)).map(|(a, p)| (a, p).into()).collect();
    c.in_pod(client, move || {
        targets.iter().map(|t| tcp_request_within(*t, Duration::from_millis(100)).map(|r| r.backend)).collect()
    })
}

/// `VmHWM` of process `pid`, MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Outage, restart with compacted history, time to applied.
fn api_outage(agent: &Path, n: usize, outage: Duration) -> (f64, u64) {
    let mut c = Cluster::new(agent);
    let client = c.client();
    let be = [c.backend("be0", 8080, false), c.backend("be1", 8080, false)];
    let api = FakeApi::start(&c.topo.node);
    api.apply(&json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}));
    let pods: Vec<[std::net::IpAddr; 2]> = be.iter().map(|b| [c.addr(*b, false), c.addr(*b, true)]).collect();
    let addr = |b: usize, v6: bool| pods[b][usize::from(v6)];
    let objs = services(n + 1, |i, v6| match i {
        0 => vec![addr(0, v6)],
        i if i == n => vec![addr(1, v6)],
        i => vec![fake_endpoint(i, 0, 1, v6)],
    });
    // Service 0 exists; Service n appears during the outage.
    let (now, later): (Vec<_>, Vec<_>) =
        objs.into_iter().partition(|o| o["metadata"]["name"] != json!(format!("svc-{n}")) && !is_slice_of(o, n));
    for o in &now {
        api.apply(o);
    }
    let dir = TempDir::new("dsproxy-bench-kubeconfig-");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
    c.start_kube_agent(&kubeconfig, "node1");
    let served = |i: usize, by: &str| probe(&c, client, i).iter().all(|r| r.as_ref().is_ok_and(|b| b == by));
    let deadline = Instant::now() + Duration::from_mins(2);
    while !served(0, "be0") {
        assert!(Instant::now() < deadline, "Service 0 not served");
        std::thread::sleep(Duration::from_millis(50));
    }

    api.stop();
    for o in now.iter().filter(|o| is_slice_of(o, 0)) {
        let mut moved = o.clone();
        let v6 = o["addressType"] == json!("IPv6");
        moved["endpoints"][0]["addresses"] = json!([addr(1, v6).to_string()]);
        api.apply(&moved);
    }
    for o in &later {
        api.apply(o);
    }
    std::thread::sleep(outage);
    let back = Instant::now();
    api.restart(true);
    let mut refused = 0;
    loop {
        let new = probe(&c, client, n);
        refused += new.iter().filter(|r| matches!(r, Err(e) if e.kind() == ErrorKind::ConnectionRefused)).count();
        if new.iter().all(|r| r.as_ref().is_ok_and(|b| b == "be1")) && served(0, "be1") {
            break;
        }
        assert!(back.elapsed() < Duration::from_mins(2), "the outage's changes were not applied");
        std::thread::sleep(Duration::from_millis(10));
    }
    (ms(back.elapsed()), refused as u64)
}

fn is_slice_of(o: &serde_json::Value, i: usize) -> bool {
    o["kind"] == json!("EndpointSlice")
        && o["metadata"]["labels"]["kubernetes.io/service-name"] == json!(format!("svc-{i}"))
}

/// A huge and a nested manifest, then an unrelated change.
fn manifests(agent: &Path) -> (f64, f64, f64) {
    let mut c = Cluster::new(agent);
    let _client = c.client();
    c.write("web.yaml", &documents(&services(1, |_, v6| vec![fake_endpoint(0, 0, 1, v6)])));
    c.start_agent();
    c.write("nested.yaml", &nested(100_000));
    let mut huge = filler(50 << 20);
    let mut last = services(2, |_, v6| vec![fake_endpoint(1, 0, 1, v6)]);
    last.retain(|o| o["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("svc-1")));
    huge.push_str(&documents(&last));
    let tmp = c.manifests.0.join(".huge.yaml.tmp");
    std::fs::write(&tmp, &huge).expect("write huge.yaml");
    let started = Instant::now();
    c.change_and_sync(|| std::fs::rename(&tmp, c.manifests.0.join("huge.yaml")).expect("rename"));
    let huge_ms = ms(started.elapsed());
    drop(huge);
    let rss = peak_rss_mib(c.agent().pid());
    let changed = services(1, |_, v6| vec![fake_endpoint(0, 1, 2, v6)]);
    let started = Instant::now();
    c.change_and_sync(|| c.write("web.yaml", &documents(&changed)));
    (ms(started.elapsed()), huge_ms, rss)
}

pub fn measure(agent: &Path, quick: bool) -> Result {
    let (n, outage) = if quick { (1_000, Duration::from_secs(5)) } else { (10_000, Duration::from_secs(30)) };
    let (applied, refused) = api_outage(agent, n, outage);
    let (unrelated, huge, rss) = manifests(agent);
    Result {
        services: n,
        outage_s: outage.as_secs_f64(),
        applied_after_restart_ms: applied,
        new_service_refused: refused,
        unrelated_change_ms: unrelated,
        huge_file_ms: huge,
        huge_file_peak_rss_mib: rss,
    }
}
