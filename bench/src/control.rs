//! Control plane: programming N Services x E endpoints per family from
//! cold, one endpoint change at that scale, the agent's peak memory, and
//! the same ruleset loaded by `iptables-restore` and `nft -f`.
use std::{
    net::IpAddr,
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
use serde_json::Value;

use crate::e2e::{self, fake_endpoint};
use dsproxy_tests::{
    TempDir,
    agent::Agent,
    manifests::documents,
    netns::{BpfFs, NetNs},
};

#[derive(Clone, Debug, Serialize)]
pub struct Result {
    pub services: usize,
    pub endpoints_per_family: usize,
    /// In-process, from empty maps: model, then map writes.
    pub cold_model_ms: f64,
    pub cold_sync_ms: f64,
    pub cold_total_ms: f64,
    /// One endpoint changed: model + diff + map writes.
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    /// A sync with nothing changed: the scan of every object's
    /// resourceVersion, the floor under `change_*`.
    pub unchanged_sync_ms: f64,
    /// The `dsproxy` binary from start to its first complete sync, reading
    /// the same objects as manifests (YAML parsing included).
    pub agent_start_to_synced_ms: f64,
    pub agent_peak_rss_mib: f64,
    /// Kernel memory of the BPF maps (memlock), all maps.
    pub bpf_maps_mib: f64,
    /// The equivalent rulesets, IPv4 plus IPv6.
    pub iptables_restore_ms: f64,
    pub nft_ms: f64,
    /// Services in the nft comparison (fewer than `services` in quick runs).
    pub nft_services: usize,
    /// false: the rulesets were loaded for IPv4 only and the time doubled.
    pub rules_both_families: bool,
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

pub fn measure(agent: &std::path::Path, plan: &crate::Plan, nft_services: usize) -> Result {
    let (n, per, changes) = (plan.control_services, plan.control_endpoints, plan.control_changes);
    let objs = objects(n, per);
    let mut services: Vec<Service> = Vec::new();
    let mut slices: Vec<EndpointSlice> = Vec::new();
    for o in &objs {
        // As the API server sends them: every object has a resourceVersion,
        // which the model's cache keys on.
        let mut o = o.clone();
        o["metadata"]["resourceVersion"] = serde_json::json!("1");
        if o["kind"] == "Service" {
            services.push(serde_json::from_value(o).expect("Service"));
        } else {
            slices.push(serde_json::from_value(o).expect("EndpointSlice"));
        }
    }
    let total = u32::try_from(n * per).expect("fits");
    let slots = u32::try_from(n * (per + 1) * 2 + 1024).expect("fits");
    let caps = Capacities {
        svc: slots,
        backend: total + 1024,
        revnat: u32::try_from(n).expect("fits") + 16,
        ct: 65_536,
        ..Capacities::default()
    };

    // In-process: cold programming, then single endpoint changes.
    let bpf = BpfFs::new();
    let (_ebpf, mut maps) = attach::load(&bpf.pin_dir(), &caps).expect("load datapath");
    let cfg = Config::default();
    let mut cache = model::Cache::default();
    let mut store = Store::default();
    let t = Instant::now();
    store.apply(Event::Replace(
        ObjectKind::Service,
        services.iter().map(|s| Object::Service(Arc::new(s.clone()))).collect(),
    ));
    store.apply(Event::Replace(ObjectKind::EndpointSlice, slices.iter().map(|s| Object::slice(s.clone())).collect()));
    let dirty = store.take_dirty();
    let update = cache.update(&store, &dirty, &cfg);
    let cold_model = t.elapsed();
    assert!(update.rejected.is_empty(), "{:?}", update.rejected);
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
    let scan = t.elapsed();
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
    drop(maps);
    drop(bpf);

    // The real agent on the same objects as manifests.
    let node = NetNs::new("ctl");
    node.ip(&["link", "add", "dsp0", "type", "veth", "peer", "name", "dsp1"]);
    let dir = TempDir::new("dsproxy-bench-manifests-");
    std::fs::write(dir.0.join("services.yaml"), documents(&objs)).expect("write manifests");
    let bpf = BpfFs::new();
    let caps_args = [
        "--svc-capacity".to_owned(),
        caps.svc.to_string(),
        "--backend-capacity".to_owned(),
        caps.backend.to_string(),
        "--revnat-capacity".to_owned(),
        caps.revnat.to_string(),
    ];
    let extra: Vec<&str> = caps_args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let a = Agent::start_with(agent, &node, &dir.0, &bpf.pin_dir(), &extra);
    a.wait_for_line(|l| l.contains("synced generation=1 "), Duration::from_mins(2));
    let start_to_synced = t.elapsed();
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", a.pid()))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").trim().to_owned()))
        })
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    drop(a);

    // iptables-restore and nft -f of the same Services, both families.
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
        services: n,
        endpoints_per_family: per,
        cold_model_ms: ms(cold_model),
        cold_sync_ms: ms(cold_sync),
        cold_total_ms: ms(cold_model + cold_sync),
        change_p50_ms: percentile(&mut lat, 50),
        change_p99_ms: percentile(&mut lat, 99),
        unchanged_sync_ms: ms(scan),
        agent_start_to_synced_ms: ms(start_to_synced),
        agent_peak_rss_mib: rss_kib / 1024.0,
        bpf_maps_mib: bpf_bytes as f64 / (1024.0 * 1024.0),
        iptables_restore_ms: ms(ipt),
        nft_ms: ms(nft),
        nft_services,
        rules_both_families: both,
    }
}
