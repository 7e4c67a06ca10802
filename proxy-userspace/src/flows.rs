//! The live flows of the datapath, read from the pinned conntrack maps: one
//! neutral view per forward entry, for `inspect conntrack` and `explain`.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use proxy_common::{CtFwd, CtKey, DatapathConfig, ct_flags, ct_state, ct_timeout};
use serde::Serialize;

use crate::{
    maps::{self, Maps},
    types::{Family, Proto},
};

/// A flow as its forward conntrack entry holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub proto: Proto,
    /// The client's own address.
    pub client: SocketAddr,
    /// The address the client connected to.
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
    /// The source the backend sees: the client, or a translated source.
    pub seen_source: SocketAddr,
    pub frontend_id: u32,
    pub backend_id: u32,
    /// `ct_state::*`.
    pub state: u8,
    /// `ct_flags::*`.
    pub flags: u8,
    /// Time left before the entry expires (zero: expired, awaiting reuse).
    pub expires_in: Duration,
    /// Time since the last packet, from the state's timeout.
    pub idle: Duration,
}

impl Flow {
    pub fn family(&self) -> Family {
        Family::of(self.client.ip())
    }

    pub fn live(&self) -> bool {
        !self.expires_in.is_zero()
    }

    /// The state in words.
    pub fn state_name(&self) -> &'static str {
        let closed = ct_state::FIN_FWD | ct_state::FIN_REV;
        match (self.proto, self.state) {
            (_, s) if s & ct_state::RST != 0 => "reset",
            (_, s) if s & closed == closed => "closed",
            (_, s) if s & closed != 0 => "closing",
            (Proto::Tcp, s) if s & ct_state::SEEN_REPLY != 0 => "established",
            (Proto::Tcp, _) => "syn-sent",
            (Proto::Udp, s) if s & ct_state::SEEN_REPLY != 0 => "replied",
            (Proto::Udp, _) => "unreplied",
        }
    }

    /// The flags in words.
    pub fn flag_names(&self) -> Vec<&'static str> {
        [(ct_flags::SNAT, "snat"), (ct_flags::HAIRPIN, "hairpin"), (ct_flags::EXTERNAL, "external")]
            .into_iter()
            .filter(|(bit, _)| self.flags & bit != 0)
            .map(|(_, name)| name)
            .collect()
    }

    /// How its packets travel: redirected past the host stack, or through it.
    pub fn path(&self) -> &'static str {
        if self.flags & ct_flags::BYPASS != 0 { "bypass" } else { "host-stack" }
    }
}

/// An address type of the conntrack maps.
trait Addr: Copy {
    fn ip(self) -> IpAddr;
}

impl Addr for [u8; 4] {
    fn ip(self) -> IpAddr {
        IpAddr::from(self)
    }
}

impl Addr for [u8; 16] {
    fn ip(self) -> IpAddr {
        IpAddr::from(self)
    }
}

fn sock<A: Addr>(a: A, port_be: u16) -> SocketAddr {
    SocketAddr::new(a.ip(), u16::from_be(port_be))
}

/// The timeout of an entry in `state` under `cfg` (0: the built-in one).
fn timeout(cfg: &DatapathConfig, proto: Proto, state: u8) -> u64 {
    let or = |v: u64, d: u64| if v == 0 { d } else { v };
    let closed = ct_state::FIN_FWD | ct_state::FIN_REV;
    if proto == Proto::Udp {
        or(cfg.udp_ns, ct_timeout::UDP)
    } else if state & ct_state::RST != 0 || state & closed == closed {
        or(cfg.tcp_close_ns, ct_timeout::TCP_CLOSE)
    } else if state & ct_state::SEEN_REPLY != 0 {
        or(cfg.tcp_established_ns, ct_timeout::TCP_ESTABLISHED)
    } else {
        or(cfg.tcp_syn_ns, ct_timeout::TCP_SYN)
    }
}

/// The view of one forward entry at `now_ns` (CLOCK_MONOTONIC, the clock
/// the datapath reads at tick resolution); `None` for a protocol the
/// datapath never tracks.
fn flow<A: Addr>(k: &CtKey<A>, v: &CtFwd<A>, cfg: &DatapathConfig, now_ns: u64) -> Option<Flow> {
    let proto = Proto::from_number(k.proto)?;
    let left = v.expires.saturating_sub(now_ns);
    let idle = timeout(cfg, proto, v.state).saturating_sub(left);
    Some(Flow {
        proto,
        client: sock(k.saddr, k.sport),
        frontend: sock(k.daddr, k.dport),
        backend: sock(v.backend, v.backend_port),
        seen_source: sock(v.nat, v.nat_port),
        frontend_id: v.frontend_id,
        backend_id: v.backend_id,
        state: v.state,
        flags: v.flags,
        expires_in: Duration::from_nanos(left),
        idle: Duration::from_nanos(if left == 0 { 0 } else { idle }),
    })
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid out-pointer for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Every forward entry of `family` (or both), expired ones included.
pub fn read(maps: &Maps, family: Option<Family>) -> maps::Result<Vec<Flow>> {
    let cfg = maps.config()?;
    let now = monotonic_ns();
    let mut out = Vec::new();
    if family.is_none_or(|f| f == Family::V4) {
        for (k, v) in maps.ct4_fwd.iter().flatten() {
            out.extend(flow(&k, &v, &cfg, now));
        }
    }
    if family.is_none_or(|f| f == Family::V6) {
        for (k, v) in maps.ct6_fwd.iter().flatten() {
            out.extend(flow(&k, &v, &cfg, now));
        }
    }
    out.sort_by_key(|f| (f.family(), f.frontend, f.client));
    Ok(out)
}

/// One flow, as `inspect conntrack --output json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowView {
    pub family: &'static str,
    pub protocol: &'static str,
    pub client: SocketAddr,
    pub frontend: SocketAddr,
    /// `ns/name:port` of the frontend's Service port (empty when unknown).
    pub service: String,
    pub backend: SocketAddr,
    pub seen_source: SocketAddr,
    pub state: &'static str,
    pub flags: Vec<&'static str>,
    /// `bypass` (redirected past the host stack) or `host-stack`.
    pub path: &'static str,
    pub idle_s: f64,
    pub expires_in_s: f64,
}

impl FlowView {
    pub fn new(f: &Flow, service: &str) -> Self {
        Self {
            family: f.family().k8s_name(),
            protocol: f.proto.k8s_name(),
            client: f.client,
            frontend: f.frontend,
            service: service.to_owned(),
            backend: f.backend,
            seen_source: f.seen_source,
            state: f.state_name(),
            flags: f.flag_names(),
            path: f.path(),
            idle_s: f.idle.as_secs_f64(),
            expires_in_s: f.expires_in.as_secs_f64(),
        }
    }

    /// One line of text.
    pub fn text(&self) -> String {
        let flags = if self.flags.is_empty() { String::new() } else { format!(" [{}]", self.flags.join(",")) };
        let seen = if self.seen_source == self.client { String::new() } else { format!(" (as {})", self.seen_source) };
        format!(
            "{} {} {} -> {} => {}{seen} {} {} {}{flags} idle {:.0}s expires in {:.0}s",
            self.family,
            self.protocol,
            self.client,
            self.frontend,
            self.backend,
            if self.service.is_empty() { "-" } else { &self.service },
            self.state,
            self.path,
            self.idle_s,
            self.expires_in_s
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: u8, flags: u8, expires: u64) -> (CtKey<[u8; 4]>, CtFwd<[u8; 4]>) {
        let k = CtKey::new(([198, 18, 1, 2], 40000u16.to_be()), ([198, 19, 0, 10], 80u16.to_be()), 6);
        let v = CtFwd {
            expires,
            backend_id: 3,
            frontend_id: 1,
            backend: [198, 18, 2, 2],
            backend_port: 8080u16.to_be(),
            nat: [198, 19, 0, 10],
            nat_port: 33000u16.to_be(),
            state,
            flags,
            ..CtFwd::default()
        };
        (k, v)
    }

    #[test]
    fn a_flow_shows_its_tuples_state_flags_and_times() {
        let s = 1_000_000_000;
        let cfg = DatapathConfig::DEFAULT;
        let now = 1000 * s;
        let expires = now + ct_timeout::TCP_ESTABLISHED - 5 * s;
        let (k, v) = entry(ct_state::SEEN_REPLY, ct_flags::SNAT | ct_flags::HAIRPIN | ct_flags::BYPASS, expires);
        let f = flow(&k, &v, &cfg, now).expect("tcp");
        assert_eq!(f.client, "198.18.1.2:40000".parse().expect("addr"));
        assert_eq!(f.frontend, "198.19.0.10:80".parse().expect("addr"));
        assert_eq!(f.backend, "198.18.2.2:8080".parse().expect("addr"));
        assert_eq!(f.seen_source, "198.19.0.10:33000".parse().expect("addr"));
        assert_eq!((f.state_name(), f.path()), ("established", "bypass"));
        assert_eq!(f.flag_names(), ["snat", "hairpin"]);
        assert_eq!(f.idle, Duration::from_secs(5), "idle since the last packet");
        let text = FlowView::new(&f, "shop/web:http").text();
        assert!(text.contains("(as 198.19.0.10:33000)") && text.contains("shop/web:http established bypass"), "{text}");
    }

    #[test]
    fn states_are_named_for_each_protocol() {
        let cfg = DatapathConfig::DEFAULT;
        let name = |state: u8, proto: u8| {
            let (mut k, v) = entry(state, 0, 1);
            k.proto = proto;
            flow(&k, &v, &cfg, 0).expect("tracked").state_name()
        };
        assert_eq!(name(0, 6), "syn-sent");
        assert_eq!(name(ct_state::FIN_FWD | ct_state::SEEN_REPLY, 6), "closing");
        assert_eq!(name(ct_state::FIN_FWD | ct_state::FIN_REV, 6), "closed");
        assert_eq!(name(ct_state::RST, 6), "reset");
        assert_eq!(name(0, 17), "unreplied");
        assert_eq!(name(ct_state::SEEN_REPLY, 17), "replied");
        let (k, v) = entry(0, 0, 10);
        assert!(!flow(&k, &v, &cfg, 20).expect("tracked").live(), "expired");
    }
}
