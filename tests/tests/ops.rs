//! Operating dsproxy like kube-proxy: early, named failures (capabilities,
//! source configuration), the least-privilege DaemonSet, and the manifests
//! under deploy/ checked offline against the Kubernetes schemas.
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use dsproxy_tests::{
    Cluster, TempDir,
    echo::{tcp_request, udp_request},
    fakeapi::FakeApi,
    http::{Reply, count, get, sample},
    manifests::{Port, READY, documents, service, slice},
    netns::{BpfFs, NetNs},
    topo::{ATTACH_GLOB, vip4, vip6},
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// Every document of every manifest under deploy/.
fn deploy_documents() -> Vec<(PathBuf, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy"))
        .expect("deploy/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read manifest");
        let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        out.extend(docs.into_iter().filter(|d| !d.is_null()).map(|d| (f.clone(), d)));
    }
    assert!(!out.is_empty(), "no manifests under deploy/");
    out
}

fn find<'a>(docs: &'a [(PathBuf, Value)], kind: &str) -> &'a Value {
    docs.iter().map(|(_, d)| d).find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} under deploy/"))
}

/// The capabilities the DaemonSet grants, as setpriv names them (`bpf`).
fn daemonset_capabilities() -> Vec<String> {
    let docs = deploy_documents();
    let ds = find(&docs, "DaemonSet");
    let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], Value::Bool(false), "the DaemonSet must not be privileged");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let add = sc["capabilities"]["add"].as_array().expect("capabilities.add");
    add.iter().map(|c| c.as_str().expect("capability name").to_ascii_lowercase()).collect()
}

/// `kubernetes-validate`, as `cargo xtask setup` installs it.
fn kubernetes_validate() -> PathBuf {
    if let Some(p) = std::env::var_os("DSPROXY_KUBERNETES_VALIDATE") {
        return PathBuf::from(p);
    }
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("kubernetes-validate"))
        .find(|p| p.is_file());
    found.expect("kubernetes-validate is not installed: run `cargo xtask setup` (it installs it from PyPI)")
}

fn validate(files: &[PathBuf], version: &str) -> Output {
    Command::new(kubernetes_validate())
        .args(["--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .expect("run kubernetes-validate")
}

#[test]
fn every_manifest_under_deploy_is_valid_for_kubernetes_1_30_and_1_34() {
    let files: Vec<PathBuf> =
        deploy_documents().into_iter().map(|(f, _)| f).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for version in ["1.30.0", "1.34.0"] {
        let out = validate(&files, version);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("{text}");
        assert!(out.status.success(), "deploy/ is not valid for Kubernetes {version}:\n{text}");
        for f in &files {
            assert!(text.contains(&*f.to_string_lossy()), "{} was not validated:\n{text}", f.display());
        }
    }
    // The validator must catch a misspelt field (strict), or the check above proves nothing.
    let dir = TempDir::new("dsproxy-deploy-");
    let broken = dir.0.join("daemonset.yaml");
    let text = std::fs::read_to_string(repo().join("deploy/daemonset.yaml")).expect("read");
    std::fs::write(&broken, text.replace("mountPropagation:", "mountPropagaton:")).expect("write");
    let out = validate(&[broken], "1.34.0");
    assert!(!out.status.success(), "kubernetes-validate accepted a misspelt field");
}

#[test]
fn the_shipped_configuration_is_accepted_by_the_agent() {
    let docs = deploy_documents();
    let cm =
        docs.iter().map(|(_, d)| d).find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == "dsproxy-config");
    let text = cm.expect("ConfigMap dsproxy-config")["data"]["config.yaml"].as_str().expect("config.yaml").to_owned();
    let parsed = dsproxy::config::parse("dsproxy-config/config.yaml", &text).expect("the shipped config parses");
    assert!(parsed.ignored.is_empty(), "the shipped config sets fields dsproxy ignores: {:?}", parsed.ignored);
    let flags: Vec<&str> = parsed.flags.iter().map(|(f, _)| *f).collect();
    assert!(flags.contains(&"--attach") && flags.contains(&"--healthz-bind-address"), "{flags:?}");
    // The DaemonSet points the agent at that file and probes what it serves.
    let ds = find(&docs, "DaemonSet");
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(c["args"].as_array().expect("args").iter().any(|a| a == "--config=/etc/dsproxy/config.yaml"));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["volumeMounts"][0]["mountPropagation"], "HostToContainer");
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert!(!ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_null());
    let env_from = &c["envFrom"][0]["configMapRef"]["name"];
    assert_eq!(env_from, "dsproxy-apiserver", "the API server address comes from a ConfigMap");
    assert!(!serde_json::to_string(ds).expect("json").contains("REPLACE"), "no placeholders in the DaemonSet");
}

/// `dsproxy run` inside `ns` under `setpriv` with `bounding`, expected to fail.
fn run_failing(ns: &NetNs, setpriv: &[&str], args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "setpriv"])
        .args(setpriv)
        .args(["--", BIN, "run"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("run the agent");
    assert!(!out.status.success(), "the agent must refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn should_name_a_missing_capability_in_one_line_and_load_nothing() {
    let ns = NetNs::new("caps");
    let bpf = BpfFs::new();
    let dir = TempDir::new("dsproxy-caps-");
    let pin = bpf.pin_dir();
    let args = ["--manifests", dir.0.to_str().expect("utf-8"), "--attach", ATTACH_GLOB, "--pin-dir"];
    for (cap, name) in [("bpf", "CAP_BPF"), ("perfmon", "CAP_PERFMON"), ("net_admin", "CAP_NET_ADMIN")] {
        // CAP_SYS_ADMIN would stand in for CAP_BPF and CAP_PERFMON.
        let bounding = format!("--bounding-set=-{cap},-sys_admin");
        let mut all = args.to_vec();
        all.push(pin.to_str().expect("utf-8"));
        let err = run_failing(&ns, &[&bounding, "--inh-caps=-all"], &all);
        eprintln!("without {name}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line, not a verifier dump:\n{err}");
        assert!(lines[0].contains(name) && lines[0].contains("missing"), "must name {name}: {err}");
        assert!(!pin.exists(), "nothing may be loaded or pinned before the check");
    }
}

#[test]
fn should_run_and_serve_with_only_the_capabilities_of_the_daemonset() {
    let caps = daemonset_capabilities();
    assert_eq!(caps, ["bpf", "net_admin", "perfmon"]);
    let bounding =
        format!("--bounding-set=-all,{}", caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(","));
    let mut c = Cluster::new(Path::new(BIN));
    let client = c.client();
    let be = c.backend("be0", 8080, false);
    let ips = [vip4(30).into(), vip6(30).into()];
    let port = [
        Port { name: "tcp", port: 80, proto: "TCP", target: 8080 },
        Port { name: "udp", port: 80, proto: "UDP", target: 8080 },
    ];
    let mut objs = vec![service("web", &ips, "RequireDualStack", &port)];
    for (v6, fam) in [(false, "IPv4"), (true, "IPv6")] {
        let eps = [(c.addr(be, v6), READY)];
        objs.push(slice(&format!("web-{fam}"), "web", fam, &[("tcp", 8080, "TCP"), ("udp", 8080, "UDP")], &eps));
    }
    c.write("web.yaml", &documents(&objs));
    c.start_agent_wrapped(&["setpriv", &bounding, "--inh-caps=-all", "--"], &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.agent().pid())).expect("agent status");
    let eff = status.lines().find(|l| l.starts_with("CapEff:")).expect("CapEff");
    // CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39) and nothing else.
    assert_eq!(u64::from_str_radix(eff[7..].trim(), 16), Ok((1 << 12) | (1 << 38) | (1 << 39)), "{eff}");
    for v6 in [false, true] {
        let vip = std::net::SocketAddr::new(ips[usize::from(v6)], 80);
        let tcp = c.in_pod(client, move || tcp_request(vip)).expect("TCP through the VIP");
        let udp = c.in_pod(client, move || udp_request(vip)).expect("UDP through the VIP");
        assert_eq!((tcp.backend.as_str(), udp.backend.as_str()), ("be0", "be0"));
    }
}

#[test]
fn should_refuse_a_source_it_cannot_use_before_loading_anything() {
    let ns = NetNs::new("src");
    let bpf = BpfFs::new();
    let pin = bpf.pin_dir();
    let pin = pin.to_str().expect("utf-8");
    let err = run_failing(&ns, &[], &["--attach", ATTACH_GLOB, "--pin-dir", pin]);
    assert!(err.contains("KUBERNETES_SERVICE_HOST is not set") && err.contains("--kubeconfig"), "{err}");
    let err =
        run_failing(&ns, &[], &["--attach", ATTACH_GLOB, "--pin-dir", pin, "--kubeconfig", "/nonexistent/kubeconfig"]);
    assert!(err.contains("/nonexistent/kubeconfig"), "must name the kubeconfig: {err}");
    let err = run_failing(&ns, &[], &["--attach", ATTACH_GLOB, "--pin-dir", pin, "--manifests", "/nonexistent/dir"]);
    assert!(err.contains("/nonexistent/dir"), "must name the directory: {err}");
    assert!(!Path::new(pin).exists(), "nothing may be loaded or pinned before the source is checked");
}

#[test]
fn status_and_inspect_without_privileges_say_which_they_need() {
    for args in [&["status"][..], &["inspect", "services"], &["inspect", "stats", "--output", "json"]] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--", BIN])
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run as nobody");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("CAP_BPF") && err.contains("root") && err.lines().count() == 1, "{args:?}: {err}");
    }
    let bpf = BpfFs::new();
    let out =
        Command::new(BIN).args(["inspect", "services", "--pin-dir"]).arg(bpf.pin_dir()).output().expect("inspect");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nothing is pinned under"), "{err}");
}

/// `dsproxy inspect ARGS --output json --pin-dir PIN`, parsed.
fn inspect_json(pin_dir: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .arg("inspect")
        .args(args)
        .args(["--output", "json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .expect("run inspect");
    assert!(out.status.success(), "inspect {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("inspect {args:?} is not JSON: {e}"))
}

#[test]
fn inspect_shows_the_live_frontends_with_their_service_names_also_after_a_restart() {
    let mut c = Cluster::new(Path::new(BIN));
    let client = c.client();
    let be = [c.backend("be0", 8080, false), c.backend("be1", 8080, false)];
    c.write("web.yaml", &documents(&web(&c, "web", 70, &be, None)));
    c.start_agent();
    let pin = c.bpf.pin_dir();
    let addrs: Vec<(IpAddr, IpAddr)> = be.iter().map(|b| (c.addr(*b, false), c.addr(*b, true))).collect();
    let check = |doc: &Value, families: &[&str]| {
        let frontends = doc["frontends"].as_array().expect("frontends");
        assert_eq!(frontends.len(), 2 * families.len(), "two ports per family: {doc:#}");
        for f in frontends {
            assert_eq!(f["service"], "default/web", "{f}");
            assert!(f["port_name"] == "tcp" || f["port_name"] == "udp", "{f}");
            assert!(families.contains(&f["family"].as_str().expect("family")), "{f}");
            assert_eq!(
                (f["kind"].as_str(), f["port"].as_u64(), f["scope"].as_str()),
                (Some("ClusterIP"), Some(80), Some("external"))
            );
            let v6 = f["family"] == "IPv6";
            assert_eq!(f["address"], if v6 { vip6(70).to_string() } else { vip4(70).to_string() });
            let mut got: Vec<String> = f["backends"]
                .as_array()
                .expect("backends")
                .iter()
                .map(|b| b["address"].as_str().expect("address").to_owned())
                .collect();
            got.sort();
            let mut want: Vec<String> = addrs.iter().map(|(a4, a6)| if v6 { a6 } else { a4 }.to_string()).collect();
            want.sort();
            assert_eq!(got, want, "{f}");
            assert!(f["when_empty"].is_null() && f["affinity_timeout_s"].is_null(), "{f}");
        }
    };
    check(&inspect_json(&pin, &["services"]), &["IPv4", "IPv6"]);
    check(&inspect_json(&pin, &["services", "--family", "6"]), &["IPv6"]);
    let backends = inspect_json(&pin, &["backends", "--family", "4"]);
    let list = backends["backends"].as_array().expect("backends");
    assert_eq!(list.len(), 4, "two pods x TCP and UDP: {backends:#}");
    assert!(list.iter().all(|b| b["family"] == "IPv4" && b["frontends"] == 1), "{backends:#}");

    let vip = SocketAddr::new(vip4(70).into(), 80);
    c.in_pod(client, move || tcp_request(vip)).expect("TCP through the VIP");
    let stats = inspect_json(&pin, &["stats"]);
    let dnat =
        stats["counters"].as_array().expect("counters").iter().find(|c| c["reason"] == "dnat_new").expect("dnat_new");
    assert!(dnat["packets"].as_u64() >= Some(1), "{stats:#}");
    let names4 = stats["maps"].as_array().expect("maps").iter().find(|m| m["name"] == "NAMES4_V1").expect("NAMES4_V1");
    assert_eq!(names4["entries"], 2, "one name per IPv4 frontend: {stats:#}");

    // The names are pinned: an agent that stops leaves them, a new one reads them back and writes nothing.
    c.stop_agent();
    check(&inspect_json(&pin, &["services"]), &["IPv4", "IPv6"]);
    c.start_agent();
    let log = c.agent().log().join("\n");
    assert!(log.contains("restored 4 frontends") && log.contains("upserted=0 removed=0 ops=0"), "{log}");
    let text = Command::new(BIN).args(["inspect", "services", "--pin-dir"]).arg(&pin).output().expect("inspect");
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(
        text.lines().filter(|l| l.starts_with("default/web:tcp ") || l.starts_with("default/web:udp ")).count(),
        4,
        "{text}"
    );
}

const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";

fn ports() -> [Port<'static>; 2] {
    [
        Port { name: "tcp", port: 80, proto: "TCP", target: 8080 },
        Port { name: "udp", port: 80, proto: "UDP", target: 8080 },
    ]
}

/// Service `name` on VIP number `n` of both families, with one slice per
/// family over `backends`; `trigger`: the slices' change trigger time.
fn web(c: &Cluster, name: &str, n: u8, backends: &[usize], trigger: Option<&str>) -> Vec<Value> {
    let ips: [IpAddr; 2] = [vip4(n).into(), vip6(n.into()).into()];
    let mut objs = vec![service(name, &ips, "RequireDualStack", &ports())];
    for (v6, fam) in [(false, "IPv4"), (true, "IPv6")] {
        let eps: Vec<_> = backends.iter().map(|b| (c.addr(*b, v6), READY)).collect();
        let mut s = slice(&format!("{name}-{fam}"), name, fam, &[("tcp", 8080, "TCP"), ("udp", 8080, "UDP")], &eps);
        if let Some(t) = trigger {
            s["metadata"]["annotations"] = json!({"endpoints.kubernetes.io/last-change-trigger-time": t});
        }
        objs.push(s);
    }
    objs
}

fn probe(c: &Cluster, addr: &str, path: &str) -> Reply {
    get(&c.topo.node, addr.parse().expect("addr"), path).unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"))
}

fn metrics(c: &Cluster) -> String {
    let r = probe(c, METRICS, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|t| t.starts_with("application/openmetrics-text")), "{r:?}");
    r.body
}

/// Poll `probe` until `ok` holds; panic with the last reply after `within`.
fn wait_for(what: &str, within: Duration, mut probe: impl FnMut() -> Reply, ok: impl Fn(&Reply) -> bool) -> Reply {
    let deadline = Instant::now() + within;
    loop {
        let r = probe();
        if ok(&r) {
            return r;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}; last reply {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn healthz_and_livez_answer_as_kube_proxy_and_fail_when_a_change_cannot_be_synced() {
    let mut c = Cluster::new(Path::new(BIN));
    let be = c.backend("be0", 8080, false);
    c.write("web.yaml", &documents(&web(&c, "web", 40, &[be], None)));
    // The settings come from a config file: health on another port, JSON logs.
    let cfg = c.manifests.0.with_extension("config.yaml");
    std::fs::write(&cfg, "healthzBindAddress: 0.0.0.0:10266\nsyncPeriod: 2s\nlogging: {format: json}\n")
        .expect("config");
    // `web` takes 2 ports x (frontend + 1 slot) = 4 entries per family.
    c.start_agent_with(&["--config", cfg.to_str().expect("utf-8"), "--svc-capacity", "5"]);
    let health = "127.0.0.1:10266";
    let log = c.agent().log();
    let line = log.iter().find(|l| l.contains("synced generation=1")).expect("first sync logged");
    let json: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("--log-format json from the file ({e}): {line}"));
    assert!(json["ts"].is_f64() && json["level"] == "info" && json["msg"].as_str().is_some(), "{json}");

    let healthz = probe(&c, health, "/healthz");
    assert_eq!(healthz.status, 200, "{healthz:?}");
    assert_eq!(healthz.header("content-type"), Some("application/json"));
    assert_eq!(healthz.header("x-content-type-options"), Some("nosniff"));
    let body = healthz.json();
    let at = |key: &str| healthz.body.find(&format!("\"{key}\":")).unwrap_or_else(|| panic!("no {key}: {body}"));
    let order = ["lastUpdated", "currentTime", "nodeEligible", "healthy", "status"].map(at);
    assert!(order.is_sorted(), "kube-proxy's keys in kube-proxy's order: {}", healthz.body);
    assert_eq!((body["nodeEligible"].clone(), body["healthy"].clone()), (json!(true), json!(true)));
    for fam in ["IPv4", "IPv6"] {
        assert_eq!(body["status"][fam]["healthy"], true, "{body}");
        assert!(body["status"][fam]["lastUpdated"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
    }
    let livez = probe(&c, health, "/livez");
    assert_eq!(livez.status, 200);
    assert!(livez.json().get("nodeEligible").is_none(), "livez has no nodeEligible: {}", livez.body);
    assert_eq!(probe(&c, health, "/other").status, 404);

    // A Service that does not fit: the change waits, unsynced; both probes
    // fail once it has waited 2 x syncPeriod (4 s), not before.
    let mut objs = web(&c, "web", 40, &[be], None);
    objs.extend(web(&c, "big", 41, &[be], None));
    let written = Instant::now();
    c.change_and_sync(|| c.write("web.yaml", &documents(&objs)));
    assert!(c.agent().log().iter().any(|l| l.contains("not programmed: default/big")), "big must not fit");
    let early = probe(&c, health, "/healthz");
    if written.elapsed() < Duration::from_secs(4) {
        assert_eq!(early.status, 200, "a change younger than 2 x syncPeriod keeps /healthz up: {early:?}");
    }
    let stale =
        wait_for("/healthz fails", Duration::from_secs(20), || probe(&c, health, "/healthz"), |r| r.status == 503);
    assert!(written.elapsed() >= Duration::from_secs(4), "503 after {:?}, before 2 x syncPeriod", written.elapsed());
    assert_eq!(stale.json()["healthy"], false);
    assert_eq!(stale.json()["status"]["IPv4"]["healthy"], false);
    assert_eq!(probe(&c, health, "/livez").status, 503, "livez fails on a stale sync too");
    let m = metrics(&c);
    assert!(count(&m, "dsproxy_sync_errors_total", "").is_some_and(|n| n >= 2), "failed syncs are retried: {m}");
    assert!(count(&m, "kubeproxy_proxy_healthz_total", "code=\"503\"").is_some_and(|n| n >= 1), "{m}");

    // Back to what fits: the next sync succeeds and both recover. A retry of
    // the failed change may land between the write and the watcher's event,
    // so wait for a sync without errors rather than for the next one.
    let g = c.agent().generation();
    c.write("web.yaml", &documents(&web(&c, "web", 40, &[be], None)));
    let clean = |l: &str| {
        l.contains(" errors=0 ")
            && l.split("synced generation=").nth(1).and_then(|r| r.split(' ').next()?.parse::<u64>().ok()) > Some(g)
    };
    c.agent().wait_for_line(clean, Duration::from_secs(15));
    assert_eq!(probe(&c, health, "/healthz").status, 200);
    assert_eq!(probe(&c, health, "/livez").status, 200);
    assert!(probe(&c, METRICS, "/proxyMode").body == "ebpf");
}

#[test]
fn metrics_move_when_services_change_and_packets_flow() {
    let mut c = Cluster::new(Path::new(BIN));
    let client = c.client();
    let be = c.backend("be0", 8080, false);
    c.write("web.yaml", &documents(&web(&c, "web", 50, &[be], None)));
    c.start_agent();
    let m0 = metrics(&c);
    let v = |m: &str, name: &str, labels: &str| {
        count(m, name, labels).unwrap_or_else(|| panic!("no {name}{{{labels}}}:\n{m}"))
    };
    let secs = |m: &str, fam: &str| {
        sample(m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", &format!("ip_family=\"{fam}\""))
            .unwrap_or_else(|| panic!("no last sync timestamp:\n{m}"))
    };
    let frontends = |m: &str| v(m, "dsproxy_frontends", "ip_family=\"IPv6\",kind=\"ClusterIP\"");
    assert_eq!(frontends(&m0), 2, "two ports, one IPv6 ClusterIP each");
    assert_eq!(v(&m0, "dsproxy_bpf_map_entries", "map=\"SVC6_V1\""), 4, "2 frontends + 2 slots");
    assert_eq!(v(&m0, "dsproxy_bpf_map_capacity", "map=\"SVC6_V1\""), 131_072);
    // An array's entries in use, read in batches of 4,096.
    assert_eq!(v(&m0, "dsproxy_bpf_map_entries", "map=\"REVNAT6_V1\""), 2, "one reverse-NAT entry per frontend");
    let last0 = secs(&m0, "IPv4");

    // A second Service whose slices say when their change was triggered.
    let trigger = dsproxy::health::rfc3339(std::time::SystemTime::now() - Duration::from_secs(3));
    let mut objs = web(&c, "web", 50, &[be], None);
    objs.extend(web(&c, "api", 51, &[be], Some(&trigger)));
    c.change_and_sync(|| c.write("web.yaml", &documents(&objs)));
    let m1 = metrics(&c);
    assert!(
        v(&m1, "kubeproxy_sync_proxy_rules_service_changes_total", "")
            > v(&m0, "kubeproxy_sync_proxy_rules_service_changes_total", "")
    );
    assert!(
        v(&m1, "kubeproxy_sync_proxy_rules_endpoint_changes_total", "")
            >= v(&m0, "kubeproxy_sync_proxy_rules_endpoint_changes_total", "") + 2
    );
    assert_eq!(v(&m1, "kubeproxy_sync_proxy_rules_endpoint_changes_pending", ""), 0, "synced");
    assert_eq!(frontends(&m1), 4);
    assert!(secs(&m1, "IPv4") > last0);
    for fam in ["IPv4", "IPv6"] {
        let labels = format!("le=\"2.0\",ip_family=\"{fam}\"");
        assert_eq!(v(&m1, "kubeproxy_network_programming_duration_seconds_bucket", &labels), 0, "3 s ago is above 2 s");
        let labels = format!("le=\"10.0\",ip_family=\"{fam}\"");
        assert_eq!(
            v(&m1, "kubeproxy_network_programming_duration_seconds_bucket", &labels),
            1,
            "one slice per family:\n{m1}"
        );
    }

    // Packets: new flows are translated, both families tracked.
    let packets = |m: &str, reason: &str| {
        ["IPv4", "IPv6"]
            .iter()
            .map(|f| v(m, "dsproxy_datapath_packets_total", &format!("family=\"{f}\",reason=\"{reason}\"")))
            .sum::<u64>()
    };
    let before = packets(&m1, "dnat_new");
    for v6 in [false, true] {
        let vip = SocketAddr::new(if v6 { IpAddr::V6(vip6(50)) } else { IpAddr::V4(vip4(50)) }, 80);
        for _ in 0..3 {
            c.in_pod(client, move || tcp_request(vip)).expect("TCP through the VIP");
        }
    }
    let m2 = metrics(&c);
    assert!(packets(&m2, "dnat_new") >= before + 6, "six new flows:\n{m2}");
    assert!(packets(&m2, "rev_nat") > packets(&m1, "rev_nat"));
    for fam in ["IPv4", "IPv6"] {
        assert!(
            v(&m2, "dsproxy_conntrack_entries", &format!("ip_family=\"{fam}\"")) >= 6,
            "two entries per flow:\n{m2}"
        );
    }
    // The probes are counted by code.
    probe(&c, HEALTHZ, "/healthz");
    probe(&c, HEALTHZ, "/livez");
    let m3 = metrics(&c);
    assert!(v(&m3, "kubeproxy_proxy_healthz_total", "code=\"200\"") >= 1);
    assert!(v(&m3, "kubeproxy_proxy_livez_total", "code=\"200\"") >= 1);
    for name in [
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_endpoint_changes",
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "kubeproxy_sync_proxy_rules_service_changes",
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "kubeproxy_proxy_healthz",
        "kubeproxy_proxy_livez",
        "dsproxy_frontends",
        "dsproxy_rejected_objects",
        "dsproxy_source_problems",
        "dsproxy_sync_errors",
        "dsproxy_datapath_packets",
        "dsproxy_bpf_map_entries",
        "dsproxy_bpf_map_capacity",
        "dsproxy_conntrack_entries",
        "dsproxy_socket_lb_translations",
    ] {
        assert!(m3.contains(&format!("# TYPE {name} ")), "{name} is not exposed:\n{m3}");
    }
}

fn node_object(name: &str, deleting: bool) -> Value {
    let mut n = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
    if deleting {
        n["metadata"]["deletionTimestamp"] = json!("2025-01-01T00:00:00Z");
        n["metadata"]["finalizers"] = json!(["example.com/hold"]);
    }
    n
}

#[test]
fn healthz_fails_while_the_node_is_deleted_and_livez_does_not() {
    let mut c = Cluster::new(Path::new(BIN));
    let be = c.backend("be0", 8080, false);
    let api = FakeApi::start(&c.topo.node);
    api.apply(&node_object("node-a", false));
    for o in web(&c, "web", 60, &[be], None) {
        api.apply(&o);
    }
    let dir = TempDir::new("dsproxy-kubeconfig-");
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).expect("write kubeconfig");
    c.start_kube_agent(&kubeconfig, "node-a");
    let healthz = || probe(&c, HEALTHZ, "/healthz");
    let h = wait_for("/healthz up", Duration::from_secs(5), healthz, |r| r.status == 200);
    assert_eq!(h.json()["nodeEligible"], true);

    api.apply(&node_object("node-a", true));
    let h = wait_for("/healthz down while deleting", Duration::from_secs(5), healthz, |r| r.status == 503);
    assert_eq!((h.json()["nodeEligible"].clone(), h.json()["healthy"].clone()), (json!(false), json!(true)));
    assert_eq!(probe(&c, HEALTHZ, "/livez").status, 200, "livez ignores the node");

    api.delete(&node_object("node-a", true));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(healthz().status, 503, "a deleted node stays ineligible");
    assert_eq!(probe(&c, HEALTHZ, "/livez").status, 200, "and the agent stays alive");

    api.apply(&node_object("node-a", false));
    wait_for("/healthz back with the node", Duration::from_secs(5), healthz, |r| r.status == 200);

    // RBAC: exactly what the agent asked the API server for.
    let mut used: std::collections::BTreeSet<(String, &str)> = std::collections::BTreeSet::new();
    for r in api.requests() {
        let path = r.trim_start_matches("GET ").split('?').next().unwrap_or("").to_owned();
        let verb = if r.contains("watch=true") { "watch" } else { "list" };
        let resource = path.rsplit('/').next().unwrap_or("").to_owned();
        // A streaming list (sendInitialEvents) is a list delivered as a
        // watch: it needs list too, as does the fallback to paged lists.
        if r.contains("sendInitialEvents=true") {
            used.insert((resource.clone(), "list"));
        }
        used.insert((resource, verb));
    }
    let docs = deploy_documents();
    let role = find(&docs, "ClusterRole");
    let mut granted = std::collections::BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for res in rule["resources"].as_array().expect("resources") {
            for verb in rule["verbs"].as_array().expect("verbs") {
                granted.insert((res.as_str().expect("resource").to_owned(), verb.as_str().expect("verb")));
            }
        }
    }
    assert_eq!(used, granted, "the ClusterRole must grant exactly what the agent uses");
}

#[test]
fn health_check_node_ports_come_and_go_with_the_desired_state() {
    use dsproxy::{
        health::ProxyHealth,
        service_health::Servers,
        types::{Family, HealthCheck},
    };
    use std::{collections::BTreeMap, sync::Arc};
    /// What the servers are to serve, and where.
    type Wanted = (BTreeMap<u16, HealthCheck>, Option<Vec<std::net::IpAddr>>);
    let ns = NetNs::new("hcnp");
    let (port_a, port_b) = (30_210, 30_211);
    let check = |n, by_family| HealthCheck { service: "shop/front".into(), local_endpoints: n, by_family };
    // The servers run on a runtime whose thread lives in the namespace.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Wanted>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Vec<(u16, Family)>>();
    let path = PathBuf::from("/run/netns").join(&ns.name);
    let server = std::thread::spawn(move || {
        dsproxy_tests::netns::enter(&path);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let proxy = Arc::new(ProxyHealth::new(Duration::from_secs(30), true));
            proxy.updated(Instant::now(), std::time::SystemTime::now());
            let mut servers = Servers::new(proxy);
            while let Some((wanted, addrs)) = rx.recv().await {
                servers.listen_on(addrs.as_deref());
                servers.sync(&wanted);
                done_tx.send(servers.ports()).expect("report");
            }
        });
    });
    let sync_on = |wanted: BTreeMap<u16, HealthCheck>, addrs: Option<Vec<std::net::IpAddr>>| {
        tx.send((wanted, addrs)).expect("send");
        done_rx.recv().expect("synced")
    };
    let sync = |wanted| sync_on(wanted, None);
    let at = |ip: &str, port: u16| get(&ns, format!("{ip}:{port}").parse().expect("addr"), "/any/path");
    let (v4, v6) = ("198.18.77.1", "[fd00:77::1]");
    ns.ip(&["addr", "add", "198.18.77.1/32", "dev", "lo"]);
    ns.ip(&["addr", "add", "fd00:77::1/128", "dev", "lo"]);
    // A dual-stack Service with two ready local endpoints of each family,
    // and one with none.
    let dual = |n| check(n, vec![(Family::V4, n), (Family::V6, n)]);
    let both = |p| [(p, Family::V4), (p, Family::V6)];
    let ports = sync(BTreeMap::from([(port_a, dual(2)), (port_b, dual(0))]));
    assert_eq!(ports, [both(port_a), both(port_b)].concat());
    for ip in [v4, v6] {
        let r = at(ip, port_a).expect("port a answers");
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-load-balancing-endpoint-weight"), Some("2"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(
            r.body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"front\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        let r = at(ip, port_b).expect("port b answers");
        assert_eq!((r.status, r.header("x-load-balancing-endpoint-weight")), (503, Some("0")));
    }
    // Each family counts its own endpoints; the count moves without
    // reopening; port b goes away.
    sync(BTreeMap::from([(port_a, check(1, vec![(Family::V4, 1), (Family::V6, 0)]))]));
    assert_eq!(at(v4, port_a).expect("port a, IPv4").status, 200);
    assert_eq!(at(v6, port_a).expect("port a, IPv6").status, 503);
    let gone = at(v4, port_b);
    assert!(gone.is_err(), "port {port_b} must be closed: {gone:?}");
    // A Service that became IPv6-only is served on IPv6 only.
    assert_eq!(sync(BTreeMap::from([(port_a, check(1, vec![(Family::V6, 1)]))])), vec![(port_a, Family::V6)]);
    assert_eq!(at(v6, port_a).expect("port a, IPv6").status, 200);
    assert!(at(v4, port_a).is_err(), "no IPv4 server for an IPv6-only Service");
    // --nodeport-addresses narrows where they listen, as kube-proxy's.
    ns.ip(&["addr", "add", "198.18.77.2/32", "dev", "lo"]);
    let narrowed = vec!["198.18.77.2".parse().expect("ip"), "fd00:77::1".parse().expect("ip")];
    sync_on(BTreeMap::from([(port_a, dual(1))]), Some(narrowed));
    assert_eq!(at("198.18.77.2", port_a).expect("a selected address").status, 200);
    assert_eq!(at(v6, port_a).expect("a selected address").status, 200);
    assert!(at(v4, port_a).is_err(), "{v4} is not selected: nothing listens there");
    sync(BTreeMap::from([(port_a, dual(1))]));
    assert_eq!(at(v4, port_a).expect("every address again").status, 200);
    assert!(sync(BTreeMap::new()).is_empty());
    drop(tx);
    server.join().expect("server thread");
}

#[test]
fn a_local_load_balancer_service_gets_a_health_check_node_port_that_follows_its_endpoints() {
    let mut c = Cluster::new(Path::new(BIN));
    let be = [c.backend("be0", 8080, false), c.backend("be1", 8080, false)];
    let base = web(&c, "lb", 80, &be, None);
    let lb = |nodes: [&str; 2]| {
        let mut objs = base.clone();
        let spec = &mut objs[0]["spec"];
        spec["type"] = json!("LoadBalancer");
        spec["externalTrafficPolicy"] = json!("Local");
        spec["internalTrafficPolicy"] = json!("Local");
        spec["healthCheckNodePort"] = json!(30_300);
        spec["ports"][0]["nodePort"] = json!(30_080);
        spec["ports"][1]["nodePort"] = json!(30_080);
        for slice in &mut objs[1..] {
            for (ep, node) in slice["endpoints"].as_array_mut().expect("endpoints").iter_mut().zip(nodes) {
                ep["nodeName"] = json!(node);
            }
        }
        objs.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"}}));
        documents(&objs)
    };
    c.write("lb.yaml", &lb(["node-a", "node-b"]));
    c.start_agent_with(&["--hostname-override", "node-a"]);
    let hc = |ip: &str| probe(&c, &format!("{ip}:30300"), "/");
    // kube-proxy's gauge of Service ports whose Local policy leaves this node without endpoints.
    let no_local = |c: &Cluster, fam: &str, policy: &str| {
        let labels = format!("ip_family=\"{fam}\",traffic_policy=\"{policy}\"");
        count(&metrics(c), "kubeproxy_sync_proxy_rules_no_local_endpoints_total", &labels)
    };
    for (fam, policy) in [("IPv4", "internal"), ("IPv6", "external")] {
        assert_eq!(no_local(&c, fam, policy), Some(0), "{fam} {policy}");
    }
    for ip in ["127.0.0.1", "[::1]"] {
        let r = hc(ip);
        assert_eq!((r.status, r.header("x-load-balancing-endpoint-weight")), (200, Some("1")), "{ip}: {r:?}");
        assert!(r.body.contains("\"namespace\": \"default\"") && r.body.contains("\"name\": \"lb\""), "{}", r.body);
    }
    // The local endpoint moves to the other node: this node has none.
    c.change_and_sync(|| c.write("lb.yaml", &lb(["node-b", "node-b"])));
    for ip in ["127.0.0.1", "[::1]"] {
        let r = hc(ip);
        assert_eq!((r.status, r.header("x-load-balancing-endpoint-weight")), (503, Some("0")), "{ip}: {r:?}");
    }
    for fam in ["IPv4", "IPv6"] {
        for policy in ["internal", "external"] {
            assert_eq!(no_local(&c, fam, policy), Some(2), "{fam} {policy}: two Service ports (tcp, udp)");
        }
    }
    // The Service goes: so does its port.
    c.change_and_sync(|| c.remove("lb.yaml"));
    let gone = get(&c.topo.node, "127.0.0.1:30300".parse().expect("addr"), "/");
    assert!(gone.is_err(), "the health-check node port must close with its Service: {gone:?}");
}
