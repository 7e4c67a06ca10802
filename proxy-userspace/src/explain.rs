//! `dsproxy explain`: what the datapath would do with a packet, and why,
//! answered from the live maps: the frontend it meets (address, NodePort,
//! scope), an existing flow or a new one, the candidate backends, session
//! affinity, source ranges, refusal or drop, source translation; or the
//! flow it is a reply of. The decision follows the datapath's own order
//! (`lb::lookup`, then conntrack, then `lb::select`).
use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use crate::{
    diff::Programmed,
    flows::{self, Flow, FlowView},
    inspect::{self, BackendView, FrontendView},
    maps::{self, Maps},
    types::{Family, Frontend, Kind, Proto, Scope, WhenEmpty},
};

/// Where the packet enters the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum From {
    /// A pod interface: a client on this node.
    Pod,
    /// A node device: an external client.
    Device,
}

/// The packet to explain.
#[derive(Clone, Copy, Debug)]
pub struct Query {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: Proto,
    pub from: From,
}

/// What the live maps hold, as `explain` needs it.
#[derive(Default)]
pub struct Snapshot {
    pub prog: Programmed,
    pub flows: Vec<Flow>,
    /// Addresses NodePorts answer on.
    pub nodeport_addrs: BTreeSet<IpAddr>,
    /// Sticky backends: (frontend id, client) -> (backend id, seconds since
    /// the client's last new connection).
    pub affinity: HashMap<(u32, IpAddr), (u32, u64)>,
}

impl Snapshot {
    /// Read everything `explain` needs from the pinned maps.
    pub fn read(maps: &Maps) -> Result<Self, maps::Error> {
        let now = flows::monotonic_ns();
        let mut nodeport_addrs = BTreeSet::new();
        nodeport_addrs.extend(maps.nodeport4.keys().flatten().map(IpAddr::from));
        nodeport_addrs.extend(maps.nodeport6.keys().flatten().map(IpAddr::from));
        let mut affinity = HashMap::new();
        for (k, v) in maps.affinity.iter().flatten() {
            let client = match k.family {
                4 if k.by_cookie == 0 => IpAddr::from(<[u8; 4]>::try_from(&k.client[..4]).unwrap_or_default()),
                6 if k.by_cookie == 0 => IpAddr::from(k.client),
                _ => continue,
            };
            let age_s = now.saturating_sub(v.last_used_ns) / 1_000_000_000;
            affinity.insert((k.frontend_id, client), (v.backend_id, age_s));
        }
        Ok(Self { prog: maps.read_back()?, flows: flows::read(maps, None)?, nodeport_addrs, affinity })
    }
}

/// `dsproxy explain`: the text or JSON to print.
pub fn run(pin_dir: &std::path::Path, q: &Query, json: bool) -> Result<String, Error> {
    let maps = inspect::open(pin_dir, "dsproxy explain")?;
    let e = explain(q, &Snapshot::read(&maps)?)?;
    Ok(if json { inspect::to_json(&serde_json::to_value(&e)?) } else { text(&e) })
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    pub family: &'static str,
    /// `translate` (a new flow), `established` (a live flow keeps its
    /// backend), `reject`, `drop`, `reply` (translated back to the
    /// frontend), or `pass` (untouched).
    pub verdict: &'static str,
    pub reason: String,
    pub frontend: Option<FrontendView>,
    /// Backends a new connection may get.
    pub candidates: Vec<BackendView>,
    pub flow: Option<FlowView>,
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--src {src} and --dst {dst} are of different families: dsproxy never translates across families")]
    MixedFamilies { src: SocketAddr, dst: SocketAddr },
    #[error(transparent)]
    Inspect(#[from] inspect::Error),
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error("encoding the answer: {0}")]
    Json(#[from] serde_json::Error),
}

/// The frontend entry a packet to `q.dst` meets, as `lb::lookup` finds it.
fn lookup(q: &Query, snap: &Snapshot) -> Option<Frontend> {
    let mut f = Frontend::new(q.dst.ip(), q.dst.port(), q.proto);
    if !snap.prog.frontends.contains_key(&f) && snap.nodeport_addrs.contains(&q.dst.ip()) {
        f = Frontend::new(Family::of(q.dst.ip()).unspecified(), q.dst.port(), q.proto);
    }
    let value = snap.prog.frontends.get(&f)?;
    if q.from == From::Pod && value.settings.two_scopes {
        let internal = f.with_scope(Scope::Internal);
        if snap.prog.frontends.contains_key(&internal) {
            return Some(internal);
        }
    }
    Some(f)
}

fn name_of(snap: &Snapshot, family: Family, id: u32) -> String {
    snap.prog.family(family).names.get(&id).cloned().unwrap_or_default()
}

/// Explain `q` against `snap`.
pub fn explain(q: &Query, snap: &Snapshot) -> Result<Explanation, Error> {
    if q.src.is_ipv4() != q.dst.is_ipv4() {
        return Err(Error::MixedFamilies { src: q.src, dst: q.dst });
    }
    let family = Family::of(q.dst.ip());
    let mut e = Explanation {
        family: family.k8s_name(),
        verdict: "pass",
        reason: String::new(),
        frontend: None,
        candidates: Vec::new(),
        flow: None,
        notes: Vec::new(),
    };
    let live = |f: &&Flow| f.live() && f.proto == q.proto;
    let Some(front) = lookup(q, snap) else {
        // Not a frontend: a reply of a flow of ours, or nothing of ours.
        if let Some(f) = snap.flows.iter().filter(live).find(|f| f.backend == q.src && f.seen_source == q.dst) {
            e.verdict = "reply";
            e.reason = format!(
                "a reply of the flow {} -> {}: it is rewritten to come from {}",
                f.client, f.frontend, f.frontend
            );
            e.flow = Some(FlowView::new(f, &name_of(snap, family, f.frontend_id)));
        } else {
            e.reason = format!("{} is no frontend, and this is no reply of a tracked flow: it passes untouched", q.dst);
        }
        return Ok(e);
    };
    let value = &snap.prog.frontends[&front];
    let s = &value.settings;
    e.frontend = inspect::services(&snap.prog, Some(family)).into_iter().find(|v| {
        v.rev_nat_id == value.rev_nat_id
            && v.scope == if front.scope == Scope::Internal { "internal" } else { "external" }
            && v.port == front.port
    });
    let backends = snap.prog.active_backends(&front).unwrap_or_default();
    e.candidates = backends.iter().map(|b| BackendView { address: b.addr, port: b.port }).collect();
    if let Some(f) = snap.flows.iter().filter(live).find(|f| f.client == q.src && f.frontend == q.dst) {
        e.verdict = "established";
        e.reason = format!("a live flow ({}): it keeps its backend {}", f.state_name(), f.backend);
        if matches!(f.state_name(), "closed" | "reset") {
            e.notes.push("the flow has ended: a new SYN from this port opens a new flow with a fresh backend".into());
        }
        e.flow = Some(FlowView::new(f, &name_of(snap, family, f.frontend_id)));
        return Ok(e);
    }
    if q.proto == Proto::Tcp {
        e.notes.push(
            "explained as a new connection (a SYN); any other TCP segment without a flow of ours is left to the host \
             stack (a connection another proxy set up)"
                .into(),
        );
    }
    if !s.source_ranges.is_empty() && !s.source_ranges.iter().any(|c| c.contains(q.src.ip())) {
        e.verdict = "drop";
        e.reason = format!("{} is outside loadBalancerSourceRanges", q.src.ip());
        return Ok(e);
    }
    if backends.is_empty() {
        (e.verdict, e.reason) = match s.when_empty {
            WhenEmpty::Reject => {
                ("reject", "no usable endpoint anywhere: answered with a TCP RST / ICMP port unreachable".to_owned())
            }
            WhenEmpty::Drop => (
                "drop",
                "a Local traffic policy and no endpoint on this node: dropped, so a load balancer retries elsewhere"
                    .to_owned(),
            ),
        };
        return Ok(e);
    }
    e.verdict = "translate";
    e.reason = format!("a new flow: one of {} backends at random", backends.len());
    if let Some(timeout) = s.affinity_timeout {
        let sticky = snap.affinity.get(&(value.rev_nat_id, q.src.ip())).filter(|(_, age)| *age < u64::from(timeout));
        let id_backend =
            sticky.and_then(|(id, _)| snap.prog.family(family).backend(*id)).filter(|b| backends.contains(b));
        match id_backend {
            Some(b) => {
                e.reason = format!(
                    "session affinity: this client's backend {} (sticky for {timeout} s after its last new connection)",
                    SocketAddr::new(b.addr, b.port)
                );
                e.candidates = vec![BackendView { address: b.addr, port: b.port }];
            }
            None => e.notes.push(format!("session affinity: the backend picked stays this client's for {timeout} s")),
        }
    }
    if backends.iter().any(|b| b.addr == q.src.ip()) {
        e.notes.push(format!("hairpin: when the client gets itself, the flow comes from {}", q.dst.ip()));
    }
    if q.from == From::Device && !s.external_local && s.kind != Kind::ClusterIp {
        e.notes.push("externalTrafficPolicy Cluster: the source is translated to this node's address".into());
    }
    Ok(e)
}

/// The text form.
pub fn text(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "verdict: {} ({})", e.verdict, e.family);
    let _ = writeln!(out, "why: {}", e.reason);
    if let Some(f) = &e.frontend {
        let name = if f.port_name.is_empty() { f.service.clone() } else { format!("{}:{}", f.service, f.port_name) };
        let _ = writeln!(out, "frontend: {name} {} {}:{}/{} ({})", f.kind, f.address, f.port, f.protocol, f.scope);
    }
    if !e.candidates.is_empty() && e.verdict == "translate" {
        let list: Vec<String> = e.candidates.iter().map(|b| SocketAddr::new(b.address, b.port).to_string()).collect();
        let _ = writeln!(out, "backends: {}", list.join(", "));
    }
    if let Some(f) = &e.flow {
        let _ = writeln!(out, "flow: {}", f.text());
    }
    for n in &e.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        diff::Op,
        maps::Kernel,
        sync,
        types::{Backend, Cidr, Desired, FrontendSpec, Settings},
    };

    struct Null;

    impl Kernel for Null {
        fn apply_all(&mut self, _: &[Op]) -> Vec<(usize, maps::Error)> {
            Vec::new()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn backend(a: &str) -> Backend {
        Backend { addr: ip(a), port: 8080, proto: Proto::Tcp }
    }

    /// web (two backends, affinity 60 s), empty (no backends, refuses),
    /// local (no local backends, drops), ranged (source ranges).
    fn snapshot() -> Snapshot {
        let mut d = Desired::default();
        let mut web = FrontendSpec::new("shop/web:http", vec![backend("198.18.2.2"), backend("198.18.3.2")]);
        web.settings.affinity_timeout = Some(60);
        d.frontends.insert(Frontend::new(ip("198.19.0.10"), 80, Proto::Tcp), web);
        d.frontends
            .insert(Frontend::new(ip("198.19.0.11"), 80, Proto::Tcp), FrontendSpec::new("shop/empty:http", vec![]));
        let mut local = FrontendSpec::new("shop/local:http", vec![]);
        local.settings = Settings {
            kind: Kind::LoadBalancer,
            when_empty: WhenEmpty::Drop,
            external_local: true,
            ..Settings::default()
        };
        d.frontends.insert(Frontend::new(ip("198.19.1.1"), 80, Proto::Tcp), local);
        let mut ranged = FrontendSpec::new("shop/ranged:http", vec![backend("198.18.2.2")]);
        ranged.settings.kind = Kind::LoadBalancer;
        ranged.settings.source_ranges = vec![Cidr { addr: ip("198.18.250.0"), len: 24 }];
        d.frontends.insert(Frontend::new(ip("198.19.1.2"), 80, Proto::Tcp), ranged);
        let mut np = FrontendSpec::new("shop/web:http", vec![backend("198.18.2.2")]);
        np.settings.kind = Kind::NodePort;
        d.frontends.insert(Frontend::new(ip("0.0.0.0"), 30080, Proto::Tcp), np);
        let mut snap = Snapshot::default();
        assert!(sync::sync(&mut Null, &mut snap.prog, &d).errors.is_empty());
        snap.nodeport_addrs.insert(ip("198.18.251.2"));
        snap
    }

    fn ask(snap: &Snapshot, src: &str, dst: &str, from: From) -> Explanation {
        explain(&Query { src: sa(src), dst: sa(dst), proto: Proto::Tcp, from }, snap).expect("same family")
    }

    fn web_id(snap: &Snapshot) -> u32 {
        snap.prog.frontends[&Frontend::new(ip("198.19.0.10"), 80, Proto::Tcp)].rev_nat_id
    }

    #[test]
    fn each_verdict_says_why() {
        let snap = snapshot();
        let e = ask(&snap, "198.18.1.2:40000", "198.19.0.10:80", From::Pod);
        assert_eq!((e.verdict, e.candidates.len()), ("translate", 2), "{e:?}");
        assert_eq!(e.frontend.as_ref().map(|f| f.service.as_str()), Some("shop/web"));
        assert!(e.notes.iter().any(|n| n.contains("session affinity")), "{:?}", e.notes);
        assert_eq!(ask(&snap, "198.18.1.2:40000", "198.19.0.11:80", From::Pod).verdict, "reject");
        let drop = ask(&snap, "198.18.251.1:40000", "198.19.1.1:80", From::Device);
        assert!(drop.verdict == "drop" && drop.reason.contains("Local"), "{drop:?}");
        let outside = ask(&snap, "198.18.251.1:40000", "198.19.1.2:80", From::Device);
        assert!(outside.verdict == "drop" && outside.reason.contains("loadBalancerSourceRanges"), "{outside:?}");
        assert_eq!(ask(&snap, "198.18.250.9:40000", "198.19.1.2:80", From::Device).verdict, "translate");
        let np = ask(&snap, "198.18.251.1:40000", "198.18.251.2:30080", From::Device);
        assert_eq!(np.frontend.as_ref().map(|f| (f.kind, f.address.as_str())), Some(("NodePort", "node")));
        assert!(np.notes.iter().any(|n| n.contains("this node's address")), "masquerade: {:?}", np.notes);
        let pass = ask(&snap, "198.18.1.2:40000", "198.18.9.9:80", From::Pod);
        assert!(pass.verdict == "pass" && pass.reason.contains("untouched"), "{pass:?}");
        let hairpin = ask(&snap, "198.18.2.2:40000", "198.19.0.10:80", From::Pod);
        assert!(hairpin.notes.iter().any(|n| n.contains("hairpin")), "{:?}", hairpin.notes);
        let mixed = explain(
            &Query { src: sa("[fd00::1]:1"), dst: sa("198.19.0.10:80"), proto: Proto::Tcp, from: From::Pod },
            &snap,
        );
        assert!(mixed.is_err());
    }

    #[test]
    fn a_live_flow_keeps_its_backend_and_its_replies_are_known() {
        let mut snap = snapshot();
        let id = web_id(&snap);
        snap.flows.push(Flow {
            proto: Proto::Tcp,
            client: sa("198.18.1.2:40000"),
            frontend: sa("198.19.0.10:80"),
            backend: sa("198.18.3.2:8080"),
            seen_source: sa("198.18.1.2:40000"),
            frontend_id: id,
            backend_id: 2,
            state: proxy_common::ct_state::SEEN_REPLY,
            flags: 0,
            expires_in: Duration::from_secs(100),
            idle: Duration::from_secs(1),
        });
        let e = ask(&snap, "198.18.1.2:40000", "198.19.0.10:80", From::Pod);
        assert_eq!(e.verdict, "established");
        assert!(e.reason.contains("198.18.3.2:8080"), "{e:?}");
        assert_eq!(e.flow.as_ref().map(|f| f.service.as_str()), Some("shop/web:http"));
        let r = ask(&snap, "198.18.3.2:8080", "198.18.1.2:40000", From::Pod);
        assert!(r.verdict == "reply" && r.reason.contains("come from 198.19.0.10:80"), "{r:?}");
        // An expired entry is no flow.
        snap.flows[0].expires_in = Duration::ZERO;
        assert_eq!(ask(&snap, "198.18.1.2:40000", "198.19.0.10:80", From::Pod).verdict, "translate");
    }

    #[test]
    fn a_fresh_sticky_backend_is_the_only_candidate() {
        let mut snap = snapshot();
        let id = web_id(&snap);
        let b3 = snap.prog.v4.id_of(&backend("198.18.3.2")).expect("backend id");
        snap.affinity.insert((id, ip("198.18.1.2")), (b3, 10));
        let e = ask(&snap, "198.18.1.2:40001", "198.19.0.10:80", From::Pod);
        assert_eq!(e.candidates, vec![BackendView { address: ip("198.18.3.2"), port: 8080 }], "{e:?}");
        snap.affinity.insert((id, ip("198.18.1.2")), (b3, 61));
        assert_eq!(ask(&snap, "198.18.1.2:40001", "198.19.0.10:80", From::Pod).candidates.len(), 2, "stale after 60 s");
    }
}
