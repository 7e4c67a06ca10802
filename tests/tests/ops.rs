//! Operating dsproxy like kube-proxy: early, named failures (capabilities,
//! source configuration), the least-privilege DaemonSet, and the manifests
//! under deploy/ checked offline against the Kubernetes schemas.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use dsproxy_tests::{
    Cluster, TempDir,
    echo::{tcp_request, udp_request},
    manifests::{Port, READY, documents, service, slice},
    netns::{BpfFs, NetNs},
    topo::{ATTACH_GLOB, vip4, vip6},
};
use serde_json::Value;

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
fn status_without_privileges_says_which_it_needs() {
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--", BIN, "status"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run status");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_BPF") && err.contains("root"), "{err}");
}
