//! Control-plane integration tests: Services and EndpointSlices changed
//! live, through the manifest directory and through the Kubernetes API
//! (fake API server, real kube-rs watchers); traffic must follow on both
//! families. Each step prints how long it took; the time itself is measured
//! by the control benchmark, not bounded here.
use std::{
    cell::RefCell,
    collections::BTreeMap,
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use dsproxy_tests::{
    Cluster, TempDir,
    echo::{Conn, tcp_request, tcp_request_within, udp_request_within},
    fakeapi::{self, FakeApi},
    manifests::{Cond, Port, READY, TERMINATING, documents, service, slice},
    topo::{vip4, vip6},
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");
const PORT: u16 = 80;
const TARGET: u16 = 8080;

/// Where the test writes the objects: a manifest file or the API server.
trait Driver {
    /// Make `objs` the complete set of objects.
    fn set(&self, objs: &[Value]);
}

struct Files<'a>(&'a Cluster);

impl Driver for Files<'_> {
    fn set(&self, objs: &[Value]) {
        self.0.write("objects.yaml", &documents(objs));
    }
}

struct Api {
    api: FakeApi,
    current: RefCell<BTreeMap<String, Value>>,
}

fn key(o: &Value) -> String {
    format!("{}/{}", o["kind"], o["metadata"]["name"])
}

impl Driver for Api {
    fn set(&self, objs: &[Value]) {
        let mut current = self.current.borrow_mut();
        let keep: Vec<String> = objs.iter().map(key).collect();
        for (k, old) in current.iter() {
            if !keep.contains(k) {
                self.api.delete(old);
            }
        }
        current.retain(|k, _| keep.contains(k));
        for o in objs {
            if current.get(&key(o)) != Some(o) {
                self.api.apply(o);
            }
            current.insert(key(o), o.clone());
        }
    }
}

/// How long a change may take to show before a test gives up.
const DEADLINE: Duration = Duration::from_secs(10);

struct World {
    c: Cluster,
    client: usize,
    be: Vec<usize>,
}

fn ports() -> [Port<'static>; 2] {
    [
        Port { name: "tcp", port: PORT, proto: "TCP", target: TARGET },
        Port { name: "udp", port: PORT, proto: "UDP", target: TARGET },
    ]
}

impl World {
    fn new() -> Self {
        let mut c = Cluster::new(Path::new(BIN));
        let client = c.client();
        let be = (0..3).map(|i| c.backend(&format!("be{i}"), TARGET, false)).collect();
        Self { c, client, be }
    }

    fn vip(v6: bool) -> SocketAddr {
        SocketAddr::new(if v6 { IpAddr::V6(vip6(10)) } else { IpAddr::V4(vip4(10)) }, PORT)
    }

    /// Service `web` with `families` (IPv4 first unless reversed) and one
    /// slice per family over `eps` (backend index, condition).
    fn objects(&self, dual: bool, eps: &[(usize, Cond)]) -> Vec<Value> {
        let (ips, policy): (Vec<IpAddr>, _) = if dual {
            (vec![vip4(10).into(), vip6(10).into()], "PreferDualStack")
        } else {
            (vec![vip4(10).into()], "SingleStack")
        };
        let mut objs = vec![service("web", &ips, policy, &ports())];
        for v6 in [false, true] {
            let list: Vec<_> = eps.iter().map(|(b, c)| (self.c.addr(self.be[*b], v6), *c)).collect();
            let (name, fam) = if v6 { ("web-v6", "IPv6") } else { ("web-v4", "IPv4") };
            objs.push(slice(name, "web", fam, &[("tcp", TARGET, "TCP"), ("udp", TARGET, "UDP")], &list));
        }
        objs
    }

    /// Backends that answered `n` TCP and `n` UDP requests to a VIP, or the
    /// error of the first failing one.
    fn sample(&self, v6: bool, n: usize, tcp: bool) -> Result<Vec<String>, std::io::Error> {
        let target = Self::vip(v6);
        self.c.in_pod(self.client, move || {
            let mut out = Vec::new();
            for _ in 0..n {
                if tcp {
                    // A short connect timeout: a SYN sent just before the
                    // change lands must not hold the sample for a whole
                    // retransmission timeout.
                    out.push(tcp_request_within(target, Duration::from_millis(200))?.backend);
                }
                // The same for a datagram in flight when the change lands:
                // its answer may be lost (its reverse NAT went with the
                // frontend), and must not hold the sample for seconds.
                out.push(udp_request_within(target, Duration::from_millis(200))?.backend);
            }
            Ok(out)
        })
    }

    /// Wait until `ok` holds for samples on both families; panic with the
    /// last sample after `DEADLINE`. How fast changes are followed is a
    /// benchmark figure (`cargo xtask bench`, control part), not a test
    /// bound: a loaded CI machine must not fail correct behaviour.
    fn eventually(&self, what: &str, families: &[bool], ok: impl Fn(&Result<Vec<String>, std::io::Error>) -> bool) {
        self.eventually_by(what, families, true, ok);
    }

    /// A VIP without a frontend is checked over UDP only: the node answers
    /// with ICMP administratively prohibited, which a UDP socket reports at
    /// once, while a TCP connect treats it as a soft error and retries its
    /// SYN for a second.
    fn gone_eventually(&self, what: &str, families: &[bool]) {
        self.eventually_by(
            what,
            families,
            false,
            |s| matches!(s, Err(e) if e.kind() == ErrorKind::PermissionDenied || e.raw_os_error() == Some(113)),
        );
    }

    fn eventually_by(
        &self,
        what: &str,
        families: &[bool],
        tcp: bool,
        ok: impl Fn(&Result<Vec<String>, std::io::Error>) -> bool,
    ) {
        let start = Instant::now();
        for &v6 in families {
            loop {
                let s = self.sample(v6, 4, tcp);
                if ok(&s) {
                    break;
                }
                assert!(start.elapsed() < DEADLINE, "{what} (v6={v6}) not true after {DEADLINE:?}: last sample {s:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        eprintln!("  {what}: followed in {:?}", start.elapsed());
    }
}

fn only(names: &'static [&'static str]) -> impl Fn(&Result<Vec<String>, std::io::Error>) -> bool {
    move |s| s.as_ref().is_ok_and(|v| v.iter().all(|b| names.contains(&b.as_str())))
}

fn refused(s: &Result<Vec<String>, std::io::Error>) -> bool {
    matches!(s, Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

/// The scenario both sources must pass.
fn live_changes(w: &World, d: &dyn Driver) {
    let both = [false, true];
    w.eventually("initial backends", &both, only(&["be0", "be1"]));
    let target = World::vip(false);
    let (mut conn, first) = w.c.in_pod(w.client, move || {
        let mut c = Conn::connect(target).expect("connect");
        let b = c.request().expect("request").backend;
        (c, b)
    });

    d.set(&w.objects(true, &[(0, READY), (1, READY), (2, READY)]));
    w.eventually("scale-up reaches be2", &both, |s| s.as_ref().is_ok_and(|v| v.iter().any(|b| b == "be2")));
    assert_eq!(conn.request().expect("established connection after scale-up").backend, first);

    d.set(&w.objects(true, &[(2, READY)]));
    w.eventually("scale-down to be2", &both, only(&["be2"]));

    d.set(&w.objects(true, &[(1, READY), (2, TERMINATING)]));
    w.eventually("terminating be2 gets no new connections", &both, only(&["be1"]));

    d.set(&w.objects(true, &[(0, TERMINATING), (2, TERMINATING)]));
    w.eventually("only terminating endpoints left: they serve", &both, only(&["be0", "be2"]));

    d.set(&w.objects(true, &[]));
    w.eventually("no endpoints: refused", &both, refused);

    d.set(&w.objects(false, &[(0, READY)]));
    w.eventually("SingleStack IPv4 serves IPv4", &[false], only(&["be0"]));
    w.gone_eventually("SingleStack IPv4 has no IPv6 VIP", &[true]);

    d.set(&w.objects(true, &[(0, READY)]));
    w.eventually("PreferDualStack adds the IPv6 VIP", &both, only(&["be0"]));

    d.set(&[]);
    w.gone_eventually("Service deleted", &both);
}

#[test]
fn should_follow_manifest_changes() {
    let mut w = World::new();
    let objs = w.objects(true, &[(0, READY), (1, READY)]);
    w.c.write("objects.yaml", &documents(&objs));
    w.c.start_agent();
    live_changes(&w, &Files(&w.c));
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "z1"}}})
}

#[test]
fn should_follow_the_kubernetes_api() {
    let mut w = World::new();
    let api = Api { api: FakeApi::start(&w.c.topo.node), current: RefCell::new(BTreeMap::new()) };
    api.api.apply(&node("node1"));
    // Another proxy's Service: kube-proxy's label selector keeps it out.
    let mut foreign = service("foreign", &[vip4(20).into()], "SingleStack", &ports());
    foreign["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "other"});
    api.api.apply(&foreign);
    api.set(&w.objects(true, &[(0, READY), (1, READY)]));
    let dir = TempDir::new("dsproxy-kubeconfig-");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.api.kubeconfig()).expect("write kubeconfig");
    w.c.start_kube_agent(&kubeconfig, "node1");

    let deadline = Instant::now() + Duration::from_secs(5);
    while !api.api.requests().iter().any(|r| r.contains("endpointslices?") && r.contains("watch=true")) {
        assert!(Instant::now() < deadline, "slices are not watched: {:?}", api.api.requests());
        std::thread::sleep(Duration::from_millis(20));
    }
    let reqs = api.api.requests();
    let services_list = reqs.iter().find(|r| r.starts_with("GET /api/v1/services?")).expect("a Services list");
    assert!(
        services_list.contains("service.kubernetes.io%2Fservice-proxy-name")
            || services_list.contains("service.kubernetes.io/service-proxy-name"),
        "{services_list}"
    );
    assert!(
        reqs.iter().any(|r| r.contains("/api/v1/nodes?") && r.contains("node1")),
        "the Node is watched by name: {reqs:?}"
    );
    assert!(
        reqs.iter().any(|r| r.contains("endpointslices?") && r.contains("watch=true")),
        "slices are watched: {reqs:?}"
    );
    let foreign_vip = SocketAddr::new(vip4(20).into(), PORT);
    let r = w.c.in_pod(w.client, move || tcp_request(foreign_vip));
    assert!(r.is_err(), "another proxy's Service must not be programmed: {r:?}");

    live_changes(&w, &api);

    // Expired resourceVersion: every watch is dropped and history is
    // compacted. The watchers get 410 Gone, relist, and carry on; the
    // datapath is not disturbed meanwhile.
    api.set(&w.objects(true, &[(0, READY), (1, READY)]));
    w.eventually("back to be0 and be1", &[false, true], only(&["be0", "be1"]));
    let target = World::vip(true);
    let (mut conn, first) = w.c.in_pod(w.client, move || {
        let mut c = Conn::connect(target).expect("connect");
        let b = c.request().expect("request").backend;
        (c, b)
    });
    let lists_before = api.api.lists(fakeapi::SERVICES);
    api.api.compact_and_disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while api.api.lists(fakeapi::SERVICES) == lists_before {
        assert!(Instant::now() < deadline, "the watcher did not relist after 410 Gone: {:?}", api.api.requests());
        assert_eq!(conn.request().expect("established connection while the watch is down").backend, first);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(conn.request().expect("established connection after the relist").backend, first);
    w.eventually("still be0 and be1 after the relist", &[false, true], only(&["be0", "be1"]));
    api.set(&w.objects(true, &[(1, READY)]));
    w.eventually("changes after the relist still arrive", &[false, true], only(&["be1"]));
}

#[test]
fn should_report_services_that_do_not_fit_and_keep_the_rest() {
    let mut w = World::new();
    // `web` takes 2 ports x (frontend + 2 slots) = 6 service-map entries per
    // family; `big` would need 2 x 4 more, and the map holds 8.
    let mut objs = w.objects(true, &[(0, READY), (1, READY)]);
    let big_ips: Vec<IpAddr> = vec![vip4(30).into(), vip6(30).into()];
    objs.push(service("big", &big_ips, "PreferDualStack", &ports()));
    for v6 in [false, true] {
        let eps: Vec<_> = (0..3).map(|b| (w.c.addr(w.be[b], v6), READY)).collect();
        let (name, fam) = if v6 { ("big-v6", "IPv6") } else { ("big-v4", "IPv4") };
        objs.push(slice(name, "big", fam, &[("tcp", TARGET, "TCP"), ("udp", TARGET, "UDP")], &eps));
    }
    w.c.write("objects.yaml", &documents(&objs));
    w.c.start_agent_with(&["--svc-capacity", "8"]);
    let log = w.c.agent().log().join("\n");
    for family_vip in ["198.19.0.30:80/TCP", "[fd00:ffff::1e]:80/TCP"] {
        assert!(
            log.lines().any(|l| l.contains("not programmed: default/big:tcp")
                && l.contains(family_vip)
                && l.contains("SVC")
                && l.contains("map is full")),
            "the Service that does not fit must be named, with its map ({family_vip}):\n{log}"
        );
    }
    w.eventually("what fits is served", &[false, true], only(&["be0", "be1"]));
}
