//! The Kubernetes API source under faults (fake API server, real kube-rs
//! client, real agent, real datapath, traffic on both families): an outage
//! with a compacted restart, a watch that goes silent, cut chunks, garbage
//! and 500s, and API servers without streaming lists. What was programmed
//! keeps serving throughout; what changed meanwhile is applied once the
//! server answers again.
use std::{
    io::ErrorKind,
    path::Path,
    time::{Duration, Instant},
};

use dsproxy_tests::{
    Cluster, TempDir,
    echo::udp_request,
    fakeapi::{ENDPOINTSLICES, FakeApi, Fault, SERVICES, StreamingLists},
    probe::{Held, TARGET, still_on_their_backends, vip},
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");
const NODE: &str = "node1";

/// A node with a client and backends, a fake API server and the agent
/// following it.
struct Kube {
    c: Cluster,
    api: FakeApi,
    client: usize,
    be: Vec<usize>,
    dir: TempDir,
}

impl Kube {
    fn new(backends: usize) -> Self {
        let mut c = Cluster::new(Path::new(BIN));
        let client = c.client();
        let be = (0..backends).map(|i| c.backend(&format!("be{i}"), TARGET, false)).collect();
        let api = FakeApi::start(&c.topo.node);
        api.apply(&json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}));
        Self { c, api, client, be, dir: TempDir::new("dsproxy-kubeconfig-") }
    }

    /// `new`, Service `web` on VIP 10 over be0, the agent started and
    /// serving it.
    fn started(backends: usize, extra: &[&str]) -> Self {
        let mut k = Self::new(backends);
        k.apply(&k.service("web", 10, &[0]));
        k.start(extra);
        k.served_by(10, &["be0"], Duration::from_secs(5));
        k
    }

    fn start(&mut self, extra: &[&str]) {
        let kubeconfig = self.dir.0.join("kubeconfig");
        std::fs::write(&kubeconfig, self.api.kubeconfig()).expect("write kubeconfig");
        self.c.start_kube_agent_with(&kubeconfig, NODE, extra);
    }

    fn pods(&self, backends: &[usize]) -> Vec<usize> {
        backends.iter().map(|b| self.be[*b]).collect()
    }

    /// Service `name` on VIP `n` over backends `eps`, with its slices.
    fn service(&self, name: &str, n: u8, eps: &[usize]) -> Vec<Value> {
        self.c.dual_stack(name, n, &self.pods(eps))
    }

    fn slices(&self, name: &str, eps: &[usize]) -> Vec<Value> {
        self.c.dual_slices(name, &self.pods(eps))
    }

    fn apply(&self, objs: &[Value]) {
        for o in objs {
            self.api.apply(o);
        }
    }

    fn sample(&self, n: u8, v6: bool) -> std::io::Result<Vec<String>> {
        self.c.sample(self.client, n, v6)
    }

    fn served_by(&self, n: u8, names: &[&str], limit: Duration) -> Duration {
        self.c.served_by(self.client, n, names, limit)
    }

    fn connect(&self, n: u8) -> Vec<Held> {
        self.c.connect_both(self.client, n)
    }

    fn log(&self) -> Vec<String> {
        self.c.agent().log()
    }

    fn logged(&self, pred: impl Fn(&str) -> bool) -> bool {
        self.log().iter().any(|l| pred(l))
    }
}

#[test]
fn should_apply_changes_made_during_an_api_outage_once_the_server_is_back_with_compacted_history() {
    let k = Kube::started(3, &[]);
    let reqs = k.api.requests();
    assert!(
        reqs.iter().any(|r| r.contains("/api/v1/services?") && r.contains("sendInitialEvents=true"))
            && !reqs.iter().any(|r| r.contains("/api/v1/services?") && !r.contains("watch=true")),
        "the initial state comes from a streaming list where the server supports it: {reqs:?}"
    );
    let mut conns = k.connect(10);

    k.api.stop();
    // Changed during the outage: web moves to be1; a new Service `late`
    // appears on be2. The slices' relist after the restart will lag behind
    // the Services' (500s), so `late` arrives before its endpoints.
    k.apply(&k.slices("web", &[1]));
    k.apply(&k.service("late", 11, &[2]));
    k.api.inject(Some(ENDPOINTSLICES), Fault::Error500, 3);
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(4) {
        // Nothing programmed is lost while the server is away.
        assert_eq!(k.sample(10, false).expect("web during the outage, IPv4"), vec!["be0"; 6]);
        assert_eq!(k.sample(10, true).expect("web during the outage, IPv6"), vec!["be0"; 6]);
        std::thread::sleep(Duration::from_millis(200));
    }
    still_on_their_backends(&mut conns, "during the outage");
    assert!(
        k.logged(|l| l.contains("Service watch:") && l.contains("next retry in")),
        "failures are logged with the time of the next retry"
    );

    let back = Instant::now();
    let before = k.log().len();
    k.api.restart(true);
    // `late` is never programmed without its endpoints: until it serves,
    // its VIP is absent (ICMP prohibited), never refused.
    let udp = |v6: bool| {
        let target = vip(11, v6);
        k.c.in_pod(k.client, move || udp_request(target))
    };
    for v6 in [false, true] {
        loop {
            match udp(v6) {
                Ok(r) => {
                    assert_eq!(r.backend, "be2");
                    break;
                }
                Err(e) => {
                    assert!(
                        e.kind() != ErrorKind::ConnectionRefused,
                        "late (v6={v6}) was programmed without its endpoints: refused {:?} after the restart",
                        back.elapsed()
                    );
                    assert!(back.elapsed() < Duration::from_secs(20), "late (v6={v6}) not served: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    k.served_by(10, &["be1"], Duration::from_secs(20));
    k.served_by(11, &["be2"], Duration::from_secs(1));
    eprintln!("  outage changes applied {:?} after the server came back (3 injected 500s on slices)", back.elapsed());
    still_on_their_backends(&mut conns, "after the outage");
    assert!(
        k.log()[before..]
            .iter()
            .any(|l| l.contains("holding 1 new Services until the EndpointSlice relist is complete")),
        "the new Service was held back"
    );
    assert!(k.logged(|l| l.contains("EndpointSlice") && l.contains("500 InternalError")));
    assert!(k.logged(|l| l.contains("the API server answers again")));
}

#[test]
fn should_declare_a_silent_watch_dead_and_resume_it() {
    let mut k = Kube::new(2);
    k.api.set_bookmark_interval(Duration::from_millis(300));
    k.apply(&k.service("web", 10, &[0]));
    k.start(&["--watch-idle-timeout", "1500ms"]);
    k.served_by(10, &["be0"], Duration::from_secs(5));

    // The slices' next watch answers with headers, then nothing.
    k.api.inject(Some(ENDPOINTSLICES), Fault::HangWatch, 1);
    k.api.disconnect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while k.api.pending_faults() > 0 {
        assert!(Instant::now() < deadline, "the agent did not watch slices again");
        std::thread::sleep(Duration::from_millis(10));
    }
    let changed = Instant::now();
    k.apply(&k.slices("web", &[1]));
    k.served_by(10, &["be1"], Duration::from_secs(10));
    eprintln!("  change through a hung watch applied after {:?} (idle bound 1.5 s)", changed.elapsed());
    let dead: Vec<String> = k.log().into_iter().filter(|l| l.contains("the watch is dead")).collect();
    assert!(
        dead.iter().any(|l| l.contains("EndpointSlice watch: no event or bookmark for 1500 ms")),
        "the silent watch is named: {dead:?}"
    );
    // Quiet watches that get bookmarks are alive.
    assert!(dead.iter().all(|l| l.contains("EndpointSlice")), "only the hung watch is dead: {dead:?}");
    assert!(
        k.api.requests().iter().filter(|r| r.contains("watch=true")).all(|r| r.contains("allowWatchBookmarks=true")),
        "every watch asks for bookmarks"
    );
}

#[test]
fn should_recover_from_cut_chunks_garbage_and_server_errors() {
    let k = Kube::started(3, &[]);
    let mut conns = k.connect(10);

    // The event carrying the change breaks off mid-chunk.
    k.api.inject(Some(ENDPOINTSLICES), Fault::CutChunk, 1);
    k.apply(&k.slices("web", &[1]));
    let took = k.served_by(10, &["be1"], Duration::from_secs(10));
    eprintln!("  change in a cut chunk applied after {took:?}");
    assert_eq!(k.api.pending_faults(), 0, "the chunk was cut");

    // A line that is not JSON comes before the next event.
    k.api.inject(Some(ENDPOINTSLICES), Fault::Garbage, 1);
    k.apply(&k.slices("web", &[2]));
    let took = k.served_by(10, &["be2"], Duration::from_secs(10));
    eprintln!("  change after a garbage line applied after {took:?}");
    assert!(k.logged(|l| l.contains("EndpointSlice watch:") && l.contains("Error deserializing")));

    // Every request fails for a while; watches are dropped.
    k.api.inject(None, Fault::Error500, 8);
    k.api.disconnect();
    k.apply(&k.slices("web", &[0, 1]));
    let took = k.served_by(10, &["be0", "be1"], Duration::from_secs(20));
    eprintln!("  change during 500s applied after {took:?}");
    assert_eq!(k.api.pending_faults(), 0, "every 500 was served");
    assert!(k.logged(|l| l.contains("500 InternalError: injected fault; attempt 1 failed, next retry in")));
    still_on_their_backends(&mut conns, "after the faults");
}

#[test]
fn should_fall_back_to_paged_lists_where_streaming_lists_are_refused_or_ignored() {
    let mut k = Kube::new(2);
    k.apply(&k.service("web", 10, &[0]));

    // The WatchList feature gate is off: 422 Invalid.
    k.api.set_streaming_lists(StreamingLists::Refused);
    k.start(&["--watch-idle-timeout", "1500ms"]);
    k.served_by(10, &["be0"], Duration::from_secs(5));
    assert!(k.logged(|l| l.contains("Service: the API server refuses streaming lists (422 Invalid")));
    assert!(
        k.api.requests().iter().any(|r| r.starts_with("GET /api/v1/services?") && r.contains("limit=500")),
        "a paged list instead: {:?}",
        k.api.requests()
    );
    k.apply(&k.slices("web", &[1]));
    k.served_by(10, &["be1"], Duration::from_secs(2));
    k.c.stop_agent();

    // A server before 1.27 ignores sendInitialEvents: initial events, but
    // never their end marker.
    k.api.set_streaming_lists(StreamingLists::Ignored);
    let lists = k.api.lists(SERVICES);
    k.start(&["--watch-idle-timeout", "1500ms"]);
    k.served_by(10, &["be1"], Duration::from_secs(5));
    assert!(k.logged(|l| l.contains("Service: the streaming list's initial events stopped for 1500 ms")));
    assert!(k.api.lists(SERVICES) >= lists + 2, "a streaming list, then a paged one");
    k.apply(&k.slices("web", &[0]));
    k.served_by(10, &["be0"], Duration::from_secs(2));
}
