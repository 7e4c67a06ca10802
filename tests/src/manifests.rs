//! Service and EndpointSlice manifests for tests, written as JSON documents
//! (JSON is YAML) in the shape the Kubernetes API serves them.
use std::net::IpAddr;

use serde_json::{Value, json};

/// A Service port: name, port, protocol, targetPort.
pub struct Port<'a> {
    pub name: &'a str,
    pub port: u16,
    pub proto: &'a str,
    pub target: u16,
}

pub fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// A ClusterIP Service with `cluster_ips` (families in that order).
pub fn service(name: &str, cluster_ips: &[IpAddr], policy: &str, ports: &[Port<'_>]) -> Value {
    let families: Vec<&str> = cluster_ips.iter().map(|ip| family(*ip)).collect();
    let ips: Vec<String> = cluster_ips.iter().map(ToString::to_string).collect();
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": p.name, "port": p.port, "protocol": p.proto, "targetPort": p.target}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ips.first(),
            "clusterIPs": ips,
            "ipFamilies": families,
            "ipFamilyPolicy": policy,
            "ports": ports,
        }
    })
}

/// Conditions of an endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Cond {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

pub const READY: Cond = Cond { ready: true, serving: true, terminating: false };
pub const TERMINATING: Cond = Cond { ready: false, serving: true, terminating: true };

/// An EndpointSlice of `service` for `address_type` with the given ports
/// (name, port, protocol) and endpoints.
pub fn slice(
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[(IpAddr, Cond)],
) -> Value {
    let endpoints: Vec<Value> = endpoints.iter().map(|(ip, c)| endpoint(*ip, *c)).collect();
    slice_of(name, service, address_type, ports, &endpoints)
}

/// An endpoint of a slice (callers may add `nodeName`, `zone`, `hints`).
pub fn endpoint(ip: IpAddr, c: Cond) -> Value {
    json!({
        "addresses": [ip.to_string()],
        "conditions": {"ready": c.ready, "serving": c.serving, "terminating": c.terminating},
    })
}

/// `slice` with endpoints given as objects (`endpoint`).
pub fn slice_of(
    name: &str,
    service: &str,
    address_type: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[Value],
) -> Value {
    let ports: Vec<Value> =
        ports.iter().map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto})).collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "dsproxy-tests"},
        },
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// A Node object named `name` with InternalIP `addresses` and, when given,
/// the zone label kube-proxy reads topology from.
pub fn node(name: &str, zone: Option<&str>, addresses: &[IpAddr]) -> Value {
    let addresses: Vec<Value> =
        addresses.iter().map(|a| json!({"type": "InternalIP", "address": a.to_string()})).collect();
    let mut n = json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name},
        "status": {"addresses": addresses},
    });
    if let Some(z) = zone {
        n["metadata"]["labels"] = json!({"topology.kubernetes.io/zone": z});
    }
    n
}

/// Several objects as one multi-document YAML text.
pub fn documents(objs: &[Value]) -> String {
    let mut out = String::new();
    for o in objs {
        out.push_str("---\n");
        out.push_str(&o.to_string());
        out.push('\n');
    }
    out
}

/// About `bytes` of YAML documents of a kind the agent does not read
/// (ConfigMaps with 1 KB of data each): a huge manifest that is valid.
pub fn filler(bytes: usize) -> String {
    use std::fmt::Write as _;
    let data = "x".repeat(1000);
    let mut out = String::with_capacity(bytes + 2048);
    let mut i = 0;
    while out.len() < bytes {
        let _ =
            write!(out, "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i}}}\ndata: {{k: \"{data}\"}}\n");
        i += 1;
    }
    out
}

/// `depth` nested flow sequences (`[[[...]]]`): YAML that costs parsers
/// the square of its depth unless they bound it.
pub fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}
