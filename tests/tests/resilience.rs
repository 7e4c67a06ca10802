//! The agent's own failures and load (real agent, real datapath, traffic
//! on both families): SIGKILLs in the middle of a 10,000-Service sync
//! converge exactly; repeated restarts (SIGTERM and SIGKILL) under load fail
//! no connection and move no established one; EndpointSlice churn under
//! load fails no connection and keeps memory flat; `--min-sync-period`
//! coalesces a burst of changes into one sync.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use dsproxy::{
    maps::Maps,
    model,
    source::manifests,
    store::{Dirty, Store},
};
use dsproxy_tests::{
    Cluster,
    agent::Agent,
    manifests::{Port, READY, documents, service, slice},
    probe::{TARGET, rss_kib, still_on_their_backends, vip},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");

fn cluster(backends: usize) -> (Cluster, usize, Vec<usize>) {
    let mut c = Cluster::new(Path::new(BIN));
    let client = c.client();
    let be = (0..backends).map(|i| c.backend(&format!("be{i}"), TARGET, false)).collect();
    (c, client, be)
}

/// Service `bulk-I` (I < 16,384) on its own VIP pair, port 80/TCP, with
/// one slice per family over endpoints `eps` (numbers; addresses that
/// receive no traffic).
fn bulk_service(i: usize, eps: &[usize]) -> Vec<Value> {
    let n = u32::try_from(i).expect("small");
    let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 64, 0)) + n);
    let v6 = Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 1, 0)) + u128::from(n));
    let name = format!("bulk-{i}");
    let ports = [Port { name: "tcp", port: 80, proto: "TCP", target: 8080 }];
    let mut objs = vec![service(&name, &[v4.into(), v6.into()], "RequireDualStack", &ports)];
    for v6 in [false, true] {
        let list: Vec<(IpAddr, _)> = eps
            .iter()
            .map(|e| {
                let e = u32::try_from(*e).expect("small");
                let addr: IpAddr = if v6 {
                    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0, 0, 0xff, 0, 0, 0, 0)) + u128::from(e)).into()
                } else {
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 100, 0)) + e).into()
                };
                (addr, READY)
            })
            .collect();
        let fam = if v6 { "IPv6" } else { "IPv4" };
        objs.push(slice(&format!("{name}-{fam}"), &name, fam, &[("tcp", 8080, "TCP")], &list));
    }
    objs
}

/// The maps under `pin_dir` hold exactly what the manifests in `dir` ask
/// for: the same frontends with the same settings and backends, only the
/// active generation's slots, no backend that no slot uses.
fn assert_converged(pin_dir: &Path, dir: &Path) {
    let opts = manifests::Options { dir: dir.to_owned(), node_name: None, poll_interval: Duration::from_secs(1) };
    let mut store = Store::default();
    for e in manifests::Dir::new(&opts).initial() {
        store.apply(e);
    }
    let mut cache = model::Cache::default();
    let update = cache.update(&store, &Dirty::All, &model::Config::default());
    assert!(update.rejected.is_empty(), "{:?}", update.rejected);
    let desired = &cache.desired.frontends;
    let maps = Maps::open_pinned(&pin_dir.join("maps")).expect("open the pinned maps");
    let prog = maps.read_back().expect("read the maps back");
    let stale: Vec<_> = prog.frontends.keys().filter(|f| !desired.contains_key(f)).take(5).collect();
    let missing: Vec<_> = desired.keys().filter(|f| !prog.frontends.contains_key(f)).take(5).collect();
    assert!(stale.is_empty() && missing.is_empty(), "stale frontends {stale:?}, missing frontends {missing:?}");
    let mut used: BTreeSet<(bool, u32)> = BTreeSet::new();
    for (f, spec) in desired {
        let value = &prog.frontends[f];
        assert_eq!(value.settings, spec.settings, "settings of {f}");
        let mut got = prog.active_backends(f).unwrap_or_else(|| panic!("{f}: an active slot is missing"));
        got.sort();
        assert_eq!(got, spec.backends, "backends of {f}");
        let slots = prog.slots.get(f).map_or(0, std::collections::BTreeMap::len);
        assert_eq!(slots, usize::from(value.count), "{f}: slots of the inactive generation are left");
        for id in prog.slots.get(f).into_iter().flat_map(|s| s.values()) {
            used.insert((f.addr.is_ipv6(), *id));
        }
    }
    for (v6, fam) in [(false, &prog.v4), (true, &prog.v6)] {
        let orphans: Vec<_> =
            fam.backends().map(|(id, _)| id).filter(|id| !used.contains(&(v6, *id))).take(5).collect();
        assert!(orphans.is_empty(), "backends no slot uses (v6={v6}): {orphans:?}");
    }
    eprintln!(
        "  converged: {} frontends, {} backends",
        desired.len(),
        prog.v4.backends().count() + prog.v6.backends().count()
    );
}

#[test]
fn should_converge_exactly_after_sigkills_in_the_middle_of_a_10000_service_sync() {
    let (mut c, client, be) = cluster(2);
    let set = |which: usize| -> String {
        let mut objs = Vec::new();
        for i in 0..10_000 {
            // A: every Service on endpoints 2i, 2i+1. B: 1,000 fewer, 500
            // new, every slice changed. C: another cut and change.
            let eps = match which {
                0 => vec![2 * i, 2 * i + 1],
                1 if i < 9_000 => vec![2 * i + 1, 2 * i + 2],
                1 => continue,
                _ if i < 500 => continue,
                _ => vec![2 * i, 2 * i + 2, 2 * i + 3],
            };
            objs.extend(bulk_service(i, &eps));
        }
        if which == 1 {
            for i in 10_000..10_500 {
                objs.extend(bulk_service(i, &[2 * i]));
            }
        }
        let web: Vec<usize> = if which == 1 { vec![be[1]] } else { vec![be[0], be[1]] };
        objs.extend(c.dual_stack("web", 10, &web));
        documents(&objs)
    };
    let sets = [set(0), set(1), set(2)];
    let pin_dir = c.bpf.pin_dir();
    let launch = |c: &Cluster| Agent::launch_manifests(&c.bin, &c.topo.node, &c.manifests.0, &pin_dir, &[]);
    let waiting = |l: &str| l.contains("waiting for the complete initial state");
    let synced = |l: &str| l.contains("synced generation=1 ");

    // Calibration: how long the first sync of set A takes; killed after it
    // (the first of six SIGKILLs).
    c.write("objects.yaml", &sets[0]);
    let a = launch(&c);
    a.wait_for_line(synced, Duration::from_mins(2));
    let sync_time = a.line_time(synced).expect("synced") - a.line_time(waiting).expect("waiting");
    eprintln!("  first sync of 10,000 Services: {sync_time:?}");
    a.kill();
    Agent::cleanup(&c.bin, &pin_dir);

    // Kills at fractions of that time after the sync starts, switching the
    // manifests between runs: each restart finds a half-written mix.
    // (A sync over a full state writes less: later kills come earlier.)
    for (set, fraction) in [(0, 0.0), (0, 0.5), (1, 0.15), (2, 0.3), (0, 0.2)] {
        c.write("objects.yaml", &sets[set]);
        let a = launch(&c);
        a.wait_for_line(waiting, Duration::from_mins(2));
        let at = a.line_time(waiting).expect("waiting") + sync_time.mul_f64(fraction);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let done = a.log().iter().any(|l| synced(l));
        a.kill();
        eprintln!("  SIGKILL at {fraction} of the sync of set {set} (sync finished before: {done})");
    }

    c.write("objects.yaml", &sets[2]);
    c.start_agent();
    assert_converged(&pin_dir, &c.manifests.0);
    c.served_by(client, 10, &["be0", "be1"], Duration::from_secs(2));
}

#[test]
fn should_fail_no_connection_through_repeated_restarts_under_load() {
    let (mut c, client, be) = cluster(3);
    c.write("web.yaml", &documents(&c.dual_stack("web", 10, &be)));
    c.start_agent();
    c.served_by(client, 10, &["be0", "be1", "be2"], Duration::from_secs(5));
    let mut conns = c.connect_both(client, 10);
    let load = c.load(client, &[vip(10, false), vip(10, true)]);
    for i in 0..10 {
        if i % 2 == 0 {
            c.stop_agent();
        } else {
            c.agent.take().expect("agent").kill();
        }
        std::thread::sleep(Duration::from_millis(200));
        c.start_agent();
        still_on_their_backends(&mut conns, &format!("after restart {i}"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let stats = load.finish();
    eprintln!("  10 restarts (5 SIGTERM, 5 SIGKILL): {} requests, {} failed", stats.ok + stats.failed, stats.failed);
    assert!(stats.ok > 100, "the load ran: {stats:?}");
    assert_eq!(stats.failed, 0, "no request may fail across restarts: {:?}", stats.errors);
    still_on_their_backends(&mut conns, "after the restarts");
}

#[test]
fn should_fail_no_connection_and_keep_memory_flat_while_endpoint_slices_churn() {
    let (mut c, client, be) = cluster(3);
    let subsets: Vec<Vec<usize>> = vec![
        vec![be[0], be[1]],
        vec![be[1], be[2]],
        vec![be[0], be[2]],
        vec![be[0]],
        vec![be[1]],
        vec![be[2]],
        be.clone(),
    ];
    let texts: Vec<String> = subsets.iter().map(|s| documents(&c.dual_stack("web", 10, s))).collect();
    c.write("web.yaml", &texts[6]);
    c.start_agent();
    c.served_by(client, 10, &["be0", "be1", "be2"], Duration::from_secs(5));
    let mut conns = c.connect_both(client, 10);
    let load = c.load(client, &[vip(10, false), vip(10, true)]);
    let pid = c.agent().pid();
    let mut rewrites = 0;
    let churn = |c: &Cluster, n: usize, rewrites: &mut usize| {
        for _ in 0..n {
            c.write("web.yaml", &texts[*rewrites % texts.len()]);
            *rewrites += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Warm up (allocator pools, conntrack), then measure over 300 rewrites.
    churn(&c, 60, &mut rewrites);
    let before = rss_kib(pid);
    let g = c.agent().generation();
    churn(&c, 300, &mut rewrites);
    let after = rss_kib(pid);
    let syncs = c.agent().generation() - g;
    let stats = load.finish();
    eprintln!(
        "  {rewrites} rewrites ({syncs} syncs measured), {} requests, {} failed; RSS {before} -> {after} KiB",
        stats.ok + stats.failed,
        stats.failed
    );
    assert!(syncs >= 100, "the churn reached the agent: {syncs} syncs");
    assert!(stats.ok > 100, "the load ran: {stats:?}");
    assert_eq!(stats.failed, 0, "no request may fail while slices churn: {:?}", stats.errors);
    assert!(after <= before + 1024, "memory grew from {before} to {after} KiB over 300 rewrites");
    still_on_their_backends(&mut conns, "after the churn");
}

#[test]
fn should_coalesce_a_burst_of_changes_into_one_sync_per_min_sync_period() {
    let (mut c, client, be) = cluster(2);
    c.write("web.yaml", &documents(&c.dual_stack("web", 10, &[be[0]])));
    c.start_agent_with(&["--min-sync-period", "2s"]);
    c.served_by(client, 10, &["be0"], Duration::from_secs(5));
    // Long after the last sync: the next change is synced at once.
    std::thread::sleep(Duration::from_millis(2200));
    let g = c.agent().generation();
    let texts = [documents(&c.dual_stack("web", 10, &[be[1]])), documents(&c.dual_stack("web", 10, &[be[0]]))];
    let first = Instant::now();
    for k in 0..10 {
        c.write("web.yaml", &texts[k % 2]);
        std::thread::sleep(Duration::from_millis(50));
    }
    // The burst ends on be0 after passing through be1: one sync at once
    // (be1), one when the period is over (be0), none in between.
    let agent = c.agent();
    let line = |n: u64| move |l: &str| l.contains(&format!("synced generation={} ", g + n));
    agent.wait_for_line(line(1), Duration::from_secs(2));
    let one = agent.line_time(line(1)).expect("first sync");
    assert!(one - first < Duration::from_secs(1), "an isolated change waits for nothing: {:?}", one - first);
    agent.wait_for_line(line(2), Duration::from_secs(5));
    let two = agent.line_time(line(2)).expect("second sync");
    eprintln!("  10 changes in {:?}: syncs after {:?} and {:?}", Duration::from_millis(500), one - first, two - first);
    assert!(two - one >= Duration::from_millis(1950), "syncs {:?} apart, under the 2 s period", two - one);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(agent.generation(), g + 2, "the burst took exactly two syncs");
    c.served_by(client, 10, &["be0"], Duration::from_millis(500));
}
