//! Control plane: programming N Services x E endpoints per family from
//! cold, one endpoint change at that scale, the agent binary from start to
//! its first sync and its peak memory in both source modes (a manifest
//! directory, and the Kubernetes API through the fake API server), at
//! several sizes; and the same ruleset loaded by `iptables-restore` and
//! `nft -f`.
use std::{
    net::IpAddr,
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use dsproxy::{
    attach::{self, Capacities},
    diff::Programmed,
    model::{self, Config},
    source::{Event, Object, ObjectKind},
    store::Store,
    sync,
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    e2e::{self, fake_endpoint},
    reliability::peak_rss_mib,
};
use dsproxy_tests::{
    TempDir,
    agent::Agent,
    fakeapi::FakeApi,
    manifests::documents,
    netns::{BpfFs, NetNs},
};

/// Services per manifest file in manifests mode.
const SERVICES_PER_FILE: usize = 1_000;

/// The agent binary from start to its first complete sync.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct AgentRun {
    pub start_to_synced_ms: f64,
    /// `VmHWM` right after the first sync.
    pub peak_rss_mib: f64,
}

/// One size.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub services: usize,
    pub endpoints_per_family: usize,
    /// In-process, from empty maps: model, then map writes.
    pub cold_model_ms: f64,
    pub cold_sync_ms: f64,
    pub cold_total_ms: f64,
    /// One endpoint changed: store + model + diff + map writes.
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    /// A sync with nothing changed, the floor under `change_*`.
    pub unchanged_sync_ms: f64,
    /// Kernel memory of the BPF maps (memlock), all maps.
    pub bpf_maps_mib: f64,
    /// The objects as manifest files of `SERVICES_PER_FILE` Services
    /// (YAML parsing included).
    pub manifests: AgentRun,
    /// The objects served by the fake API server (list or streaming list,
    /// JSON decoding included).
    pub kube: AgentRun,
}

#[derive(Clone, Debug, Serialize)]
pub struct Result {
    /// One row per size, smallest first.
    pub rows: Vec<Row>,
    /// Services in the ruleset comparison (the plan's main size).
    pub services: usize,
    /// The equivalent rulesets, IPv4 plus IPv6.
    pub iptables_restore_ms: f64,
    pub nft_ms: f64,
    /// Services in the nft comparison (fewer than `services` in quick runs).
    pub nft_services: usize,
    /// false: the rulesets were loaded for IPv4 only and the time doubled.
    pub rules_both_families: bool,
}

impl Result {
    /// The row at `n` Services.
    pub fn at(&self, n: usize) -> Option<&Row> {
        self.rows.iter().find(|r| r.services == n)
    }
}

fn objects(n: usize, per: usize) -> Vec<Value> {
    crate::services(n, |i, v6| (0..per).map(|k| fake_endpoint(i, k, per, v6)).collect())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sum of `memlock` over this process's BPF map fds.
fn bpf_map_memory() -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/fdinfo").into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else { continue };
        if !text.contains("map_type:") {
            continue;
        }
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn percentile(v: &mut [f64], p: usize) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * p / 100).min(v.len() - 1)]
}

fn capacities(n: usize, per: usize) -> Capacities {
    Capacities {
        svc: u32::try_from(n * (per + 1) * 2 + 1024).expect("fits"),
        backend: u32::try_from(n * per).expect("fits") + 1024,
        revnat: u32::try_from(n).expect("fits") + 16,
        ct: 65_536,
        ..Capacities::default()
    }
}

/// In-process, at `n` Services: cold programming, a sync with nothing
/// changed, then `changes` single endpoint changes.
fn in_process(objs: &[Value], n: usize, per: usize, changes: usize) -> Row {
    let mut services: Vec<Service> = Vec::new();
    let mut slices: Vec<EndpointSlice> = Vec::new();
    for o in objs {
        // As the API server sends them: every object has a resourceVersion,
        // which the store compares.
        let mut o = o.clone();
        o["metadata"]["resourceVersion"] = json!("1");
        if o["kind"] == "Service" {
            services.push(serde_json::from_value(o).expect("Service"));
        } else {
            slices.push(serde_json::from_value(o).expect("EndpointSlice"));
        }
    }
    let bpf = BpfFs::new();
    let (_ebpf, mut maps) = attach::load(&bpf.pin_dir(), &capacities(n, per)).expect("load datapath");
    let cfg = Config::default();
    let mut cache = model::Cache::default();
    let mut store = Store::default();
    // The objects as a source hands them over (slices already compact):
    // making them is the source's work, not the store's or the model's.
    let service_objects = services.iter().map(|s| Object::Service(Arc::new(s.clone()))).collect();
    let slice_objects = slices.iter().map(|s| Object::slice(s.clone())).collect();
    let t = Instant::now();
    store.apply(Event::Replace(ObjectKind::Service, service_objects));
    store.apply(Event::Replace(ObjectKind::EndpointSlice, slice_objects));
    let dirty = store.take_dirty();
    let update = cache.update(&store, &dirty, &cfg);
    let cold_model = t.elapsed();
    assert!(update.rejected.is_empty(), "{:?}", update.rejected);
    drop(services);
    let mut prog = Programmed::default();
    let t = Instant::now();
    let report = sync::sync(&mut maps, &mut prog, &cache.desired);
    let cold_sync = t.elapsed();
    assert!(report.errors.is_empty(), "{:?}", &report.errors[..report.errors.len().min(3)]);
    let bpf_bytes = bpf_map_memory();

    // The part of a change that does not depend on the change: a sync
    // with nothing changed.
    let t = Instant::now();
    let dirty = store.take_dirty();
    let idle = cache.update(&store, &dirty, &cfg);
    let r = sync::sync_dirty(&mut maps, &mut prog, &cache.desired, &idle.dirty);
    let unchanged = t.elapsed();
    assert_eq!(r.ops, 0);
    assert!(idle.dirty.is_empty(), "nothing changed");
    let mut lat = Vec::with_capacity(changes);
    for c in 0..changes {
        let j = (c * 7919) % slices.len();
        let v6 = slices[j].address_type == "IPv6";
        // Move one endpoint to a fresh address, as a pod replaced elsewhere.
        slices[j].endpoints[0].addresses = vec![fake_endpoint(n + c, 0, per, v6).to_string()];
        slices[j].metadata.resource_version = Some((2 + c).to_string());
        let t = Instant::now();
        store.apply(Event::Apply(Object::slice(slices[j].clone())));
        let dirty = store.take_dirty();
        let update = cache.update(&store, &dirty, &cfg);
        let r = sync::sync_dirty(&mut maps, &mut prog, &cache.desired, &update.dirty);
        lat.push(ms(t.elapsed()));
        assert!(r.errors.is_empty() && r.upserted <= 1, "at most one frontend changes: {r:?}");
    }
    Row {
        services: n,
        endpoints_per_family: per,
        cold_model_ms: ms(cold_model),
        cold_sync_ms: ms(cold_sync),
        cold_total_ms: ms(cold_model + cold_sync),
        change_p50_ms: percentile(&mut lat, 50),
        change_p99_ms: percentile(&mut lat, 99),
        unchanged_sync_ms: ms(unchanged),
        bpf_maps_mib: bpf_bytes as f64 / (1024.0 * 1024.0),
        manifests: AgentRun { start_to_synced_ms: f64::NAN, peak_rss_mib: f64::NAN },
        kube: AgentRun { start_to_synced_ms: f64::NAN, peak_rss_mib: f64::NAN },
    }
}

/// Run `launch` (which starts the agent) and time it to its first sync.
fn agent_run(launch: impl FnOnce() -> Agent, n: usize) -> AgentRun {
    let t = Instant::now();
    let a = launch();
    // Generous: 100,000 Services take tens of seconds on a loaded machine.
    a.wait_for_line(
        |l| l.contains("synced generation=1 "),
        Duration::from_mins(2) + Duration::from_millis(n as u64 * 6),
    );
    let start_to_synced = t.elapsed();
    let run = AgentRun { start_to_synced_ms: ms(start_to_synced), peak_rss_mib: peak_rss_mib(a.pid()) };
    drop(a);
    run
}

/// The agent binary on `objs` as manifest files.
fn manifests_run(agent: &Path, node: &NetNs, objs: &[Value], caps: &[&str], n: usize) -> AgentRun {
    let dir = TempDir::new("dsproxy-bench-manifests-");
    // A Service's documents are consecutive (the Service, then its slices).
    for (k, chunk) in objs.chunks(3 * SERVICES_PER_FILE).enumerate() {
        std::fs::write(dir.0.join(format!("services-{k:03}.yaml")), documents(chunk)).expect("write manifests");
    }
    let bpf = BpfFs::new();
    agent_run(|| Agent::launch_manifests(agent, node, &dir.0, &bpf.pin_dir(), caps), n)
}

/// The agent binary on `objs` served by the fake API server.
fn kube_run(agent: &Path, node: &NetNs, objs: &[Value], caps: &[&str], n: usize) -> AgentRun {
    let api = FakeApi::start(node);
    api.apply(&json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bench-node"}}));
    for o in objs {
        api.apply(o);
    }
    let dir = TempDir::new("dsproxy-bench-kubeconfig-");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
    let bpf = BpfFs::new();
    agent_run(|| Agent::launch_kube(agent, node, &kubeconfig, "bench-node", &bpf.pin_dir(), caps), n)
}

pub fn measure(agent: &Path, plan: &crate::Plan, nft_services: usize) -> Result {
    let (main, per, changes) = (plan.control_services, plan.control_endpoints, plan.control_changes);
    let node = NetNs::new("ctl");
    node.ip(&["link", "add", "dsp0", "type", "veth", "peer", "name", "dsp1"]);
    let mut rows = Vec::new();
    for &n in &plan.control_sizes {
        eprintln!("  {n} Services x {per} endpoints per family");
        let objs = objects(n, per);
        let mut row = in_process(&objs, n, per, changes);
        let caps = capacities(n, per);
        let caps_args = [
            "--svc-capacity".to_owned(),
            caps.svc.to_string(),
            "--backend-capacity".to_owned(),
            caps.backend.to_string(),
            "--revnat-capacity".to_owned(),
            caps.revnat.to_string(),
        ];
        let caps_args: Vec<&str> = caps_args.iter().map(String::as_str).collect();
        row.manifests = manifests_run(agent, &node, &objs, &caps_args, n);
        row.kube = kube_run(agent, &node, &objs, &caps_args, n);
        eprintln!("  {row:?}");
        rows.push(row);
    }

    // iptables-restore and nft -f of the same Services, both families.
    let n = main;
    let eps = |v6: bool| move |i: usize| -> Vec<IpAddr> { (0..per).map(|k| fake_endpoint(i, k, per, v6)).collect() };
    // Quick runs load IPv4 only and count it twice: the IPv6 ruleset has
    // the same shape and size.
    let both = plan.rules_both_families;
    let ipt4 = e2e::load_rules(&node, "iptables-restore", &[], &e2e::iptables_rules_with(n, false, eps(false)));
    let ipt = if both {
        ipt4 + e2e::load_rules(&node, "ip6tables-restore", &[], &e2e::iptables_rules_with(n, true, eps(true)))
    } else {
        ipt4 * 2
    };
    let nft = if nft_services == 0 {
        Duration::ZERO
    } else {
        let nft4 = e2e::load_rules(&node, "nft", &["-f"], &e2e::nft_rules_with(nft_services, false, eps(false)));
        if both {
            nft4 + e2e::load_rules(&node, "nft", &["-f"], &e2e::nft_rules_with(nft_services, true, eps(true)))
        } else {
            nft4 * 2
        }
    };
    let _ = Command::new("ip").args(["netns", "exec", &node.name, "nft", "flush", "ruleset"]).status();

    Result {
        rows,
        services: main,
        iptables_restore_ms: ms(ipt),
        nft_ms: ms(nft),
        nft_services,
        rules_both_families: both,
    }
}
