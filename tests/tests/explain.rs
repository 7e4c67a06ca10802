//! `dsproxy inspect conntrack` and `dsproxy explain` against a running
//! agent and real flows, both families: the flow of an open connection with
//! its Service, and the verdict and reason for an established flow, a new
//! one, a refusal, a reply, and traffic that is none of dsproxy's.
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use dsproxy_tests::{
    Cluster,
    echo::Conn,
    manifests::{Port, READY, documents, service, slice},
    topo::{vip4, vip6},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");

/// `dsproxy ARGS --output json --pin-dir PIN`, parsed.
fn json(pin_dir: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN).args(args).args(["--output", "json", "--pin-dir"]).arg(pin_dir).output().expect("run");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?} is not JSON: {e}"))
}

fn manifests(c: &Cluster, backends: &[usize]) -> String {
    let ports = [Port { name: "http", port: 80, proto: "TCP", target: 8080 }];
    let mut objs = vec![
        service("web", &[IpAddr::V4(vip4(10)), IpAddr::V6(vip6(10))], "RequireDualStack", &ports),
        service("empty", &[IpAddr::V4(vip4(11)), IpAddr::V6(vip6(11))], "RequireDualStack", &ports),
    ];
    for (v6, family) in [(false, "IPv4"), (true, "IPv6")] {
        let eps: Vec<_> = backends.iter().map(|b| (c.addr(*b, v6), READY)).collect();
        objs.push(slice(&format!("web-{family}"), "web", family, &[("http", 8080, "TCP")], &eps));
    }
    documents(&objs)
}

#[test]
fn should_show_live_flows_and_explain_each_verdict_from_the_live_maps() {
    let mut c = Cluster::new(Path::new(BIN));
    let client = c.client();
    let be = [c.backend("be0", 8080, false), c.backend("be1", 8080, false)];
    c.write("web.yaml", &manifests(&c, &be));
    c.start_agent();
    let pin = c.bpf.pin_dir();
    let mut open = Vec::new();
    for (v6, vip, empty) in
        [(false, IpAddr::V4(vip4(10)), IpAddr::V4(vip4(11))), (true, vip6(10).into(), vip6(11).into())]
    {
        let target = SocketAddr::new(vip, 80);
        let (mut conn, local, backend) = c.in_pod(client, move || {
            let mut conn = Conn::connect(target).expect("connect");
            let r = conn.request().expect("request");
            let local = conn.local_addr().expect("local address");
            (conn, local, r.local)
        });
        let family = if v6 { "6" } else { "4" };

        // inspect conntrack: the open connection, with its Service.
        let flows = json(&pin, &["inspect", "conntrack", "--family", family]);
        let all = flows["flows"].as_array().expect("flows");
        let flow = all
            .iter()
            .find(|f| f["client"] == local.to_string())
            .unwrap_or_else(|| panic!("the open connection from {local} is listed: {flows}"));
        assert_eq!(flow["frontend"], target.to_string());
        assert_eq!(flow["service"], "default/web:http");
        assert_eq!(flow["backend"], backend.to_string());
        assert_eq!(flow["state"], "established");
        assert_eq!(flow["path"], "bypass", "pod to pod on one node goes past the host stack");
        assert!(flow["expires_in_s"].as_f64().expect("expiry") > 3600.0, "an established flow lives for hours");

        let explain = |src: SocketAddr, dst: SocketAddr| {
            let (s, d) = (src.to_string(), dst.to_string());
            json(&pin, &["explain", "--src", &s, "--dst", &d, "--proto", "tcp"])
        };
        let e = explain(local, target);
        assert_eq!(e["verdict"], "established", "{e}");
        assert!(e["reason"].as_str().expect("reason").contains(&backend.to_string()), "{e}");
        let new_port = SocketAddr::new(local.ip(), local.port().wrapping_add(1).max(1024));
        let e = explain(new_port, target);
        assert_eq!(e["verdict"], "translate", "{e}");
        assert_eq!(e["candidates"].as_array().map(Vec::len), Some(2), "{e}");
        assert_eq!(e["frontend"]["service"], "default/web");
        let e = explain(new_port, SocketAddr::new(empty, 80));
        assert_eq!(e["verdict"], "reject", "{e}");
        let e = explain(backend, local);
        assert_eq!(e["verdict"], "reply", "{e}");
        assert!(e["reason"].as_str().expect("reason").contains(&target.to_string()), "{e}");
        let direct = SocketAddr::new(c.addr(be[1], v6), 8080);
        let e = explain(new_port, direct);
        assert_eq!(e["verdict"], "pass", "{e}");
        conn.request().expect("the connection still works");
        open.push(conn);
    }
    let text = Command::new(BIN).args(["inspect", "conntrack", "--pin-dir"]).arg(&pin).output().expect("inspect");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("default/web:http established bypass") && text.contains("live flows"), "{text}");
}
