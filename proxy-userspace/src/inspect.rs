//! `dsproxy inspect services|backends|conntrack|stats`: the live datapath,
//! read from the pinned maps (as `cilium-dbg service list`, `bpf lb list`
//! and `bpf ct list`), as text or JSON. Frontends carry the name of their Service port, which the
//! agent pins beside each reverse-NAT entry (`NAMES{4,6}`).
use std::{fmt::Write as _, net::IpAddr, path::Path};

use serde::Serialize;

use crate::{
    diff::Programmed,
    maps::{self, Maps},
    privileges,
    types::{Backend, Family, Frontend, Scope},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Privileges(#[from] privileges::Error),
    #[error("nothing is pinned under {0}: is `dsproxy run` running with this --pin-dir?")]
    NotPinned(String),
    #[error("reading the pinned maps under {dir} was refused ({detail}): run as root")]
    Denied { dir: String, detail: String },
    #[error(transparent)]
    Maps(#[from] maps::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// Frontends with their Service port, kind, settings and backends.
    Services,
    /// Backends by id, with the number of frontends using each.
    Backends,
    /// Live flows: client, frontend and its Service, backend, the source
    /// the backend sees, state, path, idle time and expiry.
    Conntrack,
    /// Datapath counters, and the fill of every map.
    Stats,
}

/// Open the maps pinned under `pin_dir`, saying why not in words.
pub fn open(pin_dir: &Path, command: &'static str) -> Result<Maps> {
    privileges::check(command, &privileges::READ)?;
    let dir = pin_dir.join("maps");
    if !dir.exists() {
        return Err(Error::NotPinned(pin_dir.display().to_string()));
    }
    Maps::open_pinned(&dir).map_err(|e| match &e {
        maps::Error::OpenPinned { source: aya::maps::MapError::SyscallError(s), .. }
            if matches!(s.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES)) =>
        {
            Error::Denied { dir: dir.display().to_string(), detail: s.io_error.to_string() }
        }
        maps::Error::OpenPinned { source: aya::maps::MapError::SyscallError(s), .. }
            if s.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Error::NotPinned(pin_dir.display().to_string())
        }
        _ => Error::Maps(e),
    })
}

/// A backend of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: u16,
}

/// One frontend, as `inspect services --output json` prints it (the shape
/// of `dsproxy check --output json`, plus what only the maps know).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendView {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The Service port's name (empty when it has none).
    pub port_name: String,
    pub family: &'static str,
    pub kind: &'static str,
    /// The service address; `"node"` for a NodePort (every node address).
    pub address: String,
    pub port: u16,
    pub protocol: &'static str,
    /// `external` (every client) or `internal` (clients on this node).
    pub scope: &'static str,
    pub backends: Vec<BackendView>,
    /// What a new connection meets when there are no backends; `null`
    /// when there are some.
    pub when_empty: Option<&'static str>,
    pub affinity_timeout_s: Option<u32>,
    pub source_ranges: Vec<String>,
    pub external_local: bool,
    pub rev_nat_id: u32,
}

/// The view of `frontend` as programmed.
fn frontend_view(prog: &Programmed, f: &Frontend) -> Option<FrontendView> {
    let v = prog.frontends.get(f)?;
    let owner = prog.family(f.family()).names.get(&v.rev_nat_id).map_or("", String::as_str);
    let (service, port_name) = owner.rsplit_once(':').unwrap_or((owner, ""));
    let backends: Vec<BackendView> = prog
        .active_backends(f)
        .unwrap_or_default()
        .iter()
        .map(|b| BackendView { address: b.addr, port: b.port })
        .collect();
    let s = &v.settings;
    Some(FrontendView {
        service: service.to_owned(),
        port_name: port_name.to_owned(),
        family: f.family().k8s_name(),
        kind: s.kind.name(),
        address: if f.addr.is_unspecified() { "node".into() } else { f.addr.to_string() },
        port: f.port,
        protocol: f.proto.k8s_name(),
        scope: if f.scope == Scope::Internal { "internal" } else { "external" },
        when_empty: backends.is_empty().then(|| s.when_empty.name()),
        backends,
        affinity_timeout_s: s.affinity_timeout,
        source_ranges: s.source_ranges.iter().map(ToString::to_string).collect(),
        external_local: s.external_local,
        rev_nat_id: v.rev_nat_id,
    })
}

/// One backend of the backend table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendEntry {
    pub family: &'static str,
    pub id: u32,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    /// Frontends whose active backends include it.
    pub frontends: usize,
}

/// One counter of the datapath.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Counter {
    /// `any` while the counters are not split by family.
    pub family: &'static str,
    pub reason: &'static str,
    pub packets: u64,
}

/// The fill of one map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapFill {
    pub name: &'static str,
    pub entries: u32,
    pub capacity: u32,
}

fn wanted(family: Option<Family>, f: Family) -> bool {
    family.is_none_or(|w| w == f)
}

/// Frontends of `family` (or all), sorted.
pub fn services(prog: &Programmed, family: Option<Family>) -> Vec<FrontendView> {
    let mut frontends: Vec<&Frontend> = prog.frontends.keys().filter(|f| wanted(family, f.family())).collect();
    frontends.sort();
    frontends.into_iter().filter_map(|f| frontend_view(prog, f)).collect()
}

/// Backends of `family` (or all), by id.
pub fn backends(prog: &Programmed, family: Option<Family>) -> Vec<BackendEntry> {
    let mut users: std::collections::HashMap<Backend, usize> = std::collections::HashMap::new();
    for f in prog.frontends.keys() {
        for b in prog.active_backends(f).unwrap_or_default() {
            *users.entry(b).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    for fam in Family::ALL.into_iter().filter(|f| wanted(family, *f)) {
        let mut ids: Vec<(u32, &Backend)> = prog.family(fam).backends().collect();
        ids.sort();
        for (id, b) in ids {
            out.push(BackendEntry {
                family: fam.k8s_name(),
                id,
                address: b.addr,
                port: b.port,
                protocol: b.proto.k8s_name(),
                frontends: users.get(b).copied().unwrap_or(0),
            });
        }
    }
    out
}

/// The datapath's counters and every map's fill.
pub fn stats(maps: &Maps) -> Result<(Vec<Counter>, Vec<MapFill>)> {
    let counters = maps
        .stats()?
        .into_iter()
        .map(|(slot, stat, packets)| Counter { family: slot.name(), reason: stat.name(), packets })
        .collect();
    let mut fill = Vec::new();
    for m in &proxy_common::maps::ALL {
        let (entries, capacity) = maps.fill(m)?;
        fill.push(MapFill { name: m.name, entries, capacity });
    }
    Ok((counters, fill))
}

/// The text form of the frontends.
pub fn services_text(views: &[FrontendView]) -> String {
    let mut out = String::new();
    for v in views {
        let addr =
            if v.family == "IPv6" && v.address != "node" { format!("[{}]", v.address) } else { v.address.clone() };
        let name = if v.port_name.is_empty() { v.service.clone() } else { format!("{}:{}", v.service, v.port_name) };
        let list: Vec<String> = v
            .backends
            .iter()
            .map(|b| {
                if b.address.is_ipv6() {
                    format!("[{}]:{}", b.address, b.port)
                } else {
                    format!("{}:{}", b.address, b.port)
                }
            })
            .collect();
        let mut extra = String::new();
        if v.scope == "internal" {
            extra.push_str(" internal");
        }
        if let Some(t) = v.affinity_timeout_s {
            let _ = write!(extra, " affinity={t}s");
        }
        if let Some(w) = v.when_empty {
            let _ = write!(extra, " when-empty={w}");
        }
        if !v.source_ranges.is_empty() {
            let _ = write!(extra, " source-ranges={}", v.source_ranges.join(","));
        }
        if v.external_local {
            extra.push_str(" external-local");
        }
        let _ =
            writeln!(out, "{name:<40} {:<12} {addr}:{}/{}{extra} -> [{}]", v.kind, v.port, v.protocol, list.join(", "));
    }
    out
}

/// The text form of the backend table.
pub fn backends_text(entries: &[BackendEntry]) -> String {
    let mut out = String::new();
    for b in entries {
        let addr = if b.address.is_ipv6() { format!("[{}]", b.address) } else { b.address.to_string() };
        let _ = writeln!(out, "{} {:>6} {addr}:{}/{} frontends={}", b.family, b.id, b.port, b.protocol, b.frontends);
    }
    out
}

/// The text form of the counters and the map fill.
pub fn stats_text(counters: &[Counter], fill: &[MapFill]) -> String {
    let mut out = String::new();
    for c in counters {
        let _ = writeln!(out, "{:<4} {:<20} {}", c.family, c.reason, c.packets);
    }
    for m in fill {
        let _ = writeln!(out, "map {:<12} {:>8} / {}", m.name, m.entries, m.capacity);
    }
    out
}

/// `dsproxy inspect`: the text or JSON to print.
pub fn run(pin_dir: &Path, what: What, family: Option<Family>, json: bool) -> Result<String> {
    let maps = open(pin_dir, "dsproxy inspect")?;
    let text = match what {
        What::Services => {
            let views = services(&maps.read_back()?, family);
            if json { to_json(&serde_json::json!({ "frontends": views })) } else { services_text(&views) }
        }
        What::Backends => {
            let entries = backends(&maps.read_back()?, family);
            if json { to_json(&serde_json::json!({ "backends": entries })) } else { backends_text(&entries) }
        }
        What::Conntrack => {
            let prog = maps.read_back()?;
            let all = crate::flows::read(&maps, family)?;
            let expired = all.iter().filter(|f| !f.live()).count();
            let views: Vec<crate::flows::FlowView> = all
                .iter()
                .filter(|f| f.live())
                .map(|f| {
                    let name = prog.family(f.family()).names.get(&f.frontend_id).map_or("", String::as_str);
                    crate::flows::FlowView::new(f, name)
                })
                .collect();
            if json {
                to_json(&serde_json::json!({ "flows": views, "expired": expired }))
            } else {
                let mut out: String = views.iter().map(|v| v.text() + "\n").collect();
                let _ = writeln!(out, "{} live flows, {expired} expired entries awaiting reuse", views.len());
                out
            }
        }
        What::Stats => {
            let (counters, fill) = stats(&maps)?;
            if json {
                to_json(&serde_json::json!({ "counters": counters, "maps": fill }))
            } else {
                stats_text(&counters, &fill)
            }
        }
    };
    Ok(text)
}

pub(crate) fn to_json(v: &serde_json::Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        diff::Op,
        maps::Kernel,
        sync,
        types::{Desired, FrontendSpec, Kind, Proto, Settings, WhenEmpty},
    };

    /// A kernel that only counts: the mirror is what `inspect` reads.
    struct Null;

    impl Kernel for Null {
        fn apply_all(&mut self, _: &[Op]) -> Vec<(usize, maps::Error)> {
            Vec::new()
        }
    }

    fn programmed() -> Programmed {
        let mut d = Desired::default();
        let b = |a: &str| Backend { addr: a.parse().expect("ip"), port: 8080, proto: Proto::Tcp };
        let f4 = Frontend::new("198.19.0.10".parse().expect("ip"), 80, Proto::Tcp);
        let f6 = Frontend::new("fd00:ffff::a".parse().expect("ip"), 80, Proto::Tcp);
        let np = Frontend::new(Family::V4.unspecified(), 30_080, Proto::Tcp);
        d.frontends.insert(f4, FrontendSpec::new("shop/web:http", vec![b("198.18.2.2"), b("198.18.3.2")]));
        d.frontends.insert(f6, FrontendSpec::new("shop/web:http", vec![b("fd00::2")]));
        let mut spec = FrontendSpec::new("shop/web:http", Vec::new());
        spec.settings = Settings { kind: Kind::NodePort, when_empty: WhenEmpty::Drop, ..Settings::default() };
        d.frontends.insert(np, spec);
        let mut prog = Programmed::default();
        let r = sync::sync(&mut Null, &mut prog, &d);
        assert!(r.errors.is_empty());
        prog
    }

    #[test]
    fn frontends_show_their_service_port_kind_and_backends() {
        let prog = programmed();
        let all = services(&prog, None);
        assert_eq!(all.len(), 3);
        let v4: Vec<_> = services(&prog, Some(Family::V4));
        assert_eq!(v4.len(), 2, "--family 4");
        let web = v4.iter().find(|v| v.port == 80).expect("ClusterIP");
        assert_eq!((web.service.as_str(), web.port_name.as_str(), web.kind), ("shop/web", "http", "ClusterIP"));
        assert_eq!(web.address, "198.19.0.10");
        assert_eq!(web.backends.len(), 2);
        assert_eq!(web.when_empty, None, "has backends");
        let np = v4.iter().find(|v| v.port == 30_080).expect("NodePort");
        assert_eq!((np.address.as_str(), np.kind, np.when_empty), ("node", "NodePort", Some("drop")));
        let json = serde_json::to_value(web).expect("json");
        for key in ["service", "port_name", "family", "kind", "address", "port", "protocol", "backends", "when_empty"] {
            assert!(json.get(key).is_some(), "{key} missing in {json}");
        }
        let text = services_text(&all);
        assert!(text.contains("shop/web:http") && text.contains("[fd00:ffff::a]:80/TCP -> [[fd00::2]:8080]"), "{text}");
    }

    #[test]
    fn backends_count_the_frontends_using_them() {
        let prog = programmed();
        let b = backends(&prog, Some(Family::V6));
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].family, b[0].frontends), ("IPv6", 1));
        assert_eq!(backends(&prog, None).len(), 3);
    }
}
