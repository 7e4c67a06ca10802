//! Builders and a compact rendering of the desired state for the model's
//! tests.
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use serde_json::{Value, json};

use super::{Config, LABEL_SERVICE_NAME, Rejected, Warning, desired};
use crate::types::{Desired, Scope, WhenEmpty};

/// This node's name in the tests.
pub const NODE: &str = "node-a";

/// A Service `ns/name` with `spec` (and `status`, when given as
/// `{"spec": .., "status": ..}`).
pub fn service(ns_name: &str, spec: Value) -> Service {
    let (ns, name) = ns_name.split_once('/').expect("ns/name");
    let (spec, status) = match spec.get("spec") {
        Some(s) => (s.clone(), spec.get("status").cloned().unwrap_or(Value::Null)),
        None => (spec, Value::Null),
    };
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}, "spec": spec, "status": status}))
        .expect("valid Service")
}

/// An endpoint: address, conditions (`R`eady, `S`erving, `T`erminating;
/// unlisted ones false) or `None` for no conditions at all, node name.
pub fn ep(addr: &str, flags: Option<&str>, node: Option<&str>) -> Value {
    let mut e = json!({"addresses": [addr]});
    if let Some(f) = flags {
        e["conditions"] = json!({"ready": f.contains('R'), "serving": f.contains('S'), "terminating": f.contains('T')});
    }
    if let Some(n) = node {
        e["nodeName"] = json!(n);
    }
    e
}

/// A slice `ns/name` of Service `svc` with `ports` (`[{name, port,
/// protocol}]`) and endpoints.
#[expect(clippy::needless_pass_by_value, reason = "tests build these inline")]
pub fn slice(ns_name: &str, svc: &str, family: &str, ports: Value, endpoints: Vec<Value>) -> EndpointSlice {
    let (ns, name) = ns_name.split_once('/').expect("ns/name");
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {LABEL_SERVICE_NAME: svc}},
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    }))
    .expect("valid EndpointSlice")
}

/// This node's Node object with `addresses` (InternalIP) and a zone.
pub fn node(zone: Option<&str>, addresses: &[&str]) -> Node {
    let labels = zone.map_or_else(|| json!({}), |z| json!({super::LABEL_ZONE: z}));
    let addrs: Vec<Value> = addresses.iter().map(|a| json!({"type": "InternalIP", "address": a})).collect();
    serde_json::from_value(json!({"metadata": {"name": NODE, "labels": labels}, "status": {"addresses": addrs}}))
        .expect("valid Node")
}

/// A config for this node, with the node port range wide open (kube-proxy
/// has no range check; cases transcribed from its tests use low ports).
pub fn config() -> Config {
    Config {
        node_name: Some(NODE.into()),
        node_port_range: super::PortRange { first: 1, last: 65535 },
        ..Config::default()
    }
}

/// Run the model.
pub fn run(services: &[Service], slices: &[EndpointSlice], node: Option<&Node>, cfg: &Config) -> Model {
    let (desired, rejected, warnings) = desired(services, slices, node, cfg);
    Model { desired, rejected, warnings }
}

/// The model's output.
pub struct Model {
    pub desired: Desired,
    pub rejected: Vec<Rejected>,
    pub warnings: Vec<Warning>,
}

impl Model {
    /// One line per entry: `frontend kind [flags] -> backends`, with the
    /// backends' addresses, or `reject`/`drop` when there are none.
    pub fn rows(&self) -> Vec<String> {
        self.desired
            .frontends
            .iter()
            .map(|(f, s)| {
                let st = &s.settings;
                let mut flags = Vec::new();
                if st.external_local {
                    flags.push("local".to_owned());
                }
                if st.two_scopes {
                    flags.push("two-scopes".to_owned());
                }
                if let Some(t) = st.affinity_timeout {
                    flags.push(format!("affinity={t}"));
                }
                if !st.source_ranges.is_empty() {
                    let r: Vec<String> = st.source_ranges.iter().map(ToString::to_string).collect();
                    flags.push(format!("ranges={}", r.join(",")));
                }
                let flags = if flags.is_empty() { String::new() } else { format!(" {}", flags.join(" ")) };
                let to = if s.backends.is_empty() {
                    st.when_empty.name().to_owned()
                } else {
                    assert_eq!(st.when_empty, WhenEmpty::Reject, "{f}: when_empty is only set when empty");
                    let b: Vec<String> = s.backends.iter().map(|b| b.addr.to_string()).collect();
                    b.join(" ")
                };
                format!("{f} {}{flags} -> {to}", st.kind.name())
            })
            .collect()
    }

    /// The backends (or `reject`/`drop`) a client meets at
    /// `addr:port/proto`: `local` clients (pods, host processes on this
    /// node) use the `Internal` entry when the `External` one has
    /// `two_scopes`. `addr` is `node` for a node port.
    pub fn serve(&self, addr: &str, port: u16, proto: &str, local: bool) -> String {
        let want = if addr == "node" { None } else { Some(addr) };
        let hit = |scope: Scope| {
            self.desired.frontends.iter().find(|(f, _)| {
                f.scope == scope
                    && f.port == port
                    && f.proto.k8s_name() == proto
                    && match want {
                        None => f.addr.is_unspecified(),
                        Some(a) => f.addr.to_string() == a,
                    }
            })
        };
        let Some((_, ext)) = hit(Scope::External) else { return "no frontend".into() };
        let spec = if local && ext.settings.two_scopes {
            hit(Scope::Internal).map(|(_, s)| s).expect("two_scopes without an internal entry")
        } else {
            ext
        };
        if spec.backends.is_empty() {
            return spec.settings.when_empty.name().into();
        }
        let b: Vec<String> = spec.backends.iter().map(|b| format!("{}:{}", b.addr, b.port)).collect();
        b.join(", ")
    }

    pub fn rejected_names(&self) -> Vec<String> {
        self.rejected.iter().map(|r| format!("{} {}", r.kind, r.name)).collect()
    }
}
