//! The plain types the control plane passes around: what a frontend is,
//! what it is programmed with, and the desired state as a whole. No
//! Kubernetes rules live here (those are in `model`), and no kernel access
//! (that is `maps`): `diff` and `maps` depend on this module only.
//!
//! Every per-frontend setting travels as one typed value, `Settings`, from
//! the model through the diff into the maps and back at restart (as
//! kube-proxy's `BaseServicePortInfo` carries every per-port setting).
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// IP protocol of a frontend or backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => proxy_common::IPPROTO_TCP,
            Proto::Udp => proxy_common::IPPROTO_UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::IPPROTO_TCP => Some(Proto::Tcp),
            proxy_common::IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    /// The Kubernetes name (`TCP`, `UDP`).
    pub const fn k8s_name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.k8s_name())
    }
}

/// Address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The Kubernetes name (`ipFamilies`, `addressType`).
    pub const fn k8s_name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn from_k8s(s: &str) -> Option<Self> {
        match s {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }

    /// The unspecified address of this family: the address of NodePort
    /// frontends, which answer on every node address of the family.
    pub const fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        }
    }
}

/// Which clients a frontend entry is for (Cilium's two scopes). Most
/// frontends have one entry, `External`, used by every client. When the
/// backends differ by where the client is (traffic policies), a second
/// entry, `Internal`, serves clients on this node (pods, host processes)
/// and the `External` entry carries `Settings::two_scopes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    External,
    Internal,
}

impl Scope {
    pub const fn number(self) -> u8 {
        match self {
            Scope::External => proxy_common::SCOPE_EXTERNAL,
            Scope::Internal => proxy_common::SCOPE_INTERNAL,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            proxy_common::SCOPE_EXTERNAL => Some(Scope::External),
            proxy_common::SCOPE_INTERNAL => Some(Scope::Internal),
            _ => None,
        }
    }
}

/// A service address clients connect to: one entry of the service map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// The service address; the unspecified address for a NodePort (every
    /// node address of the family).
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub scope: Scope,
}

impl Frontend {
    /// An `External`-scope frontend (the common case).
    pub const fn new(addr: IpAddr, port: u16, proto: Proto) -> Self {
        Self { addr, port, proto, scope: Scope::External }
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// The same frontend in scope `scope`.
    #[must_use]
    pub const fn with_scope(self, scope: Scope) -> Self {
        Self { scope, ..self }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            a if a.is_unspecified() => write!(f, "node:{}/{}", self.port, self.proto)?,
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto)?,
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto)?,
        }
        if self.scope == Scope::Internal {
            f.write_str(" (internal)")?;
        }
        Ok(())
    }
}

/// An endpoint a frontend translates to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl Backend {
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
        }
    }
}

/// What kind of Service address a frontend is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    #[default]
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::ClusterIp, Kind::NodePort, Kind::ExternalIp, Kind::LoadBalancer];

    /// The name `dsproxy check --output json` and `inspect` print.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::ClusterIp => "ClusterIP",
            Kind::NodePort => "NodePort",
            Kind::ExternalIp => "ExternalIP",
            Kind::LoadBalancer => "LoadBalancer",
        }
    }
}

/// What a frontend without backends does with a new connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WhenEmpty {
    /// Refuse it: TCP RST, ICMP port unreachable (no endpoint anywhere).
    #[default]
    Reject,
    /// Drop it silently (a Local traffic policy and no endpoint on this
    /// node, while other nodes have some: a load balancer retries elsewhere).
    Drop,
}

impl WhenEmpty {
    pub const fn name(self) -> &'static str {
        match self {
            WhenEmpty::Reject => "reject",
            WhenEmpty::Drop => "drop",
        }
    }
}

/// An address prefix: `addr/len`, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    /// A prefix; host bits are cleared.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        Some(Self { addr, len })
    }

    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family() && Cidr::new(ip, self.len).is_some_and(|c| c.addr == self.addr)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| format!("{s:?} is not an address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l.trim().parse::<u8>().map_err(|_| format!("{s:?}: bad prefix length"))?,
            None => max,
        };
        Cidr::new(addr, len).ok_or_else(|| format!("{s:?}: prefix length above {max}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Every per-frontend setting besides its backends. One value, compared
/// whole by the diff, written whole into the frontend's slot 0 (and the
/// source-range map) and read back whole at restart.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Settings {
    pub kind: Kind,
    /// ClientIP session affinity: seconds a client stays on its backend
    /// after its last new connection.
    pub affinity_timeout: Option<u32>,
    /// What a new connection meets when there are no backends.
    pub when_empty: WhenEmpty,
    /// `loadBalancerSourceRanges` of this frontend's family: when not
    /// empty, only clients inside them are admitted.
    pub source_ranges: Vec<Cidr>,
    /// An `Internal`-scope entry exists for this frontend: clients on this
    /// node use it (set on the `External` entry only).
    pub two_scopes: bool,
    /// `externalTrafficPolicy: Local`: external clients keep their address
    /// (no masquerade).
    pub external_local: bool,
}

impl Settings {
    /// Encode as the `flags` and `affinity_timeout` of the frontend's slot 0.
    pub fn to_flags(&self) -> (u32, u32) {
        use proxy_common::svc_flags as f;
        let mut flags = match self.kind {
            Kind::ClusterIp => f::KIND_CLUSTER_IP,
            Kind::NodePort => f::KIND_NODE_PORT,
            Kind::ExternalIp => f::KIND_EXTERNAL_IP,
            Kind::LoadBalancer => f::KIND_LOAD_BALANCER,
        };
        if self.affinity_timeout.is_some() {
            flags |= f::AFFINITY;
        }
        if self.when_empty == WhenEmpty::Drop {
            flags |= f::DROP_WHEN_EMPTY;
        }
        if !self.source_ranges.is_empty() {
            flags |= f::SOURCE_RANGES;
        }
        if self.two_scopes {
            flags |= f::TWO_SCOPES;
        }
        if self.external_local {
            flags |= f::EXTERNAL_LOCAL;
        }
        (flags, self.affinity_timeout.unwrap_or(0))
    }

    /// Decode slot 0's `flags` and `affinity_timeout` (source ranges live in
    /// a map of their own and are filled in by the caller).
    pub fn from_flags(flags: u32, affinity_timeout: u32) -> Self {
        use proxy_common::svc_flags as f;
        let kind = match flags & f::KIND_MASK {
            f::KIND_NODE_PORT => Kind::NodePort,
            f::KIND_EXTERNAL_IP => Kind::ExternalIp,
            f::KIND_LOAD_BALANCER => Kind::LoadBalancer,
            _ => Kind::ClusterIp,
        };
        Self {
            kind,
            affinity_timeout: (flags & f::AFFINITY != 0).then_some(affinity_timeout),
            when_empty: if flags & f::DROP_WHEN_EMPTY != 0 { WhenEmpty::Drop } else { WhenEmpty::Reject },
            source_ranges: Vec::new(),
            two_scopes: flags & f::TWO_SCOPES != 0,
            external_local: flags & f::EXTERNAL_LOCAL != 0,
        }
    }
}

/// Where an endpoint runs and in what state: shown by `check` and
/// `inspect`, never programmed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    /// `nodeName` of the endpoint, when the slice says (shared by every
    /// endpoint on that node).
    pub node: Option<std::sync::Arc<str>>,
    pub terminating: bool,
}

/// What one frontend should be programmed with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendSpec {
    /// `namespace/name:port` of the Service port.
    pub owner: String,
    /// The Service port's name ("" when unnamed); for display.
    pub port_name: String,
    pub settings: Settings,
    /// Sorted, without duplicates; all of the frontend's family.
    pub backends: Vec<Backend>,
    /// One entry per backend, in the same order; for display only.
    pub info: Vec<EndpointInfo>,
}

impl FrontendSpec {
    /// A spec with default settings: a ClusterIP that refuses when empty.
    pub fn new(owner: impl Into<String>, backends: Vec<Backend>) -> Self {
        let info = vec![EndpointInfo::default(); backends.len()];
        Self { owner: owner.into(), port_name: String::new(), settings: Settings::default(), backends, info }
    }
}

/// A `healthCheckNodePort` this node serves (externalTrafficPolicy Local
/// LoadBalancer Services): HTTP 200 while `local_endpoints > 0`, else 503.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Ready endpoints of the Service on this node: the larger of the
    /// per-family counts (a dual-stack pod has one address of each).
    pub local_endpoints: usize,
    /// Distinct ready local endpoint addresses per family the Service has
    /// a ClusterIP of (kube-proxy runs one health server per family, each
    /// counting its own family).
    pub by_family: Vec<(Family, usize)>,
}

/// The desired state of the datapath.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub frontends: BTreeMap<Frontend, FrontendSpec>,
    /// The node addresses NodePort frontends answer on (both families,
    /// after `--nodeport-addresses`).
    pub nodeport_addresses: Vec<IpAddr>,
    /// healthCheckNodePort -> what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// Where the healthCheckNodePort servers listen: `None` for every
    /// address (no `--nodeport-addresses`), else the node addresses it
    /// selects, as kube-proxy's health servers.
    pub health_check_addresses: Option<Vec<IpAddr>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_survive_the_flags_encoding() {
        for kind in Kind::ALL {
            for affinity_timeout in [None, Some(0), Some(10_800)] {
                for when_empty in [WhenEmpty::Reject, WhenEmpty::Drop] {
                    for (two_scopes, external_local) in [(false, false), (true, false), (true, true)] {
                        let s = Settings {
                            kind,
                            affinity_timeout,
                            when_empty,
                            source_ranges: Vec::new(),
                            two_scopes,
                            external_local,
                        };
                        let (flags, timeout) = s.to_flags();
                        assert_eq!(Settings::from_flags(flags, timeout), s);
                    }
                }
            }
        }
    }

    #[test]
    fn cidrs_parse_clear_host_bits_and_match_by_family() {
        let c: Cidr = "198.51.100.7/24".parse().expect("cidr");
        assert_eq!(c.to_string(), "198.51.100.0/24");
        assert!(c.contains("198.51.100.200".parse().expect("ip")));
        assert!(!c.contains("198.51.101.1".parse().expect("ip")));
        assert!(!c.contains("2001:db8::1".parse().expect("ip")), "never across families");
        let h: Cidr = "2001:db8::1".parse().expect("host");
        assert_eq!(h.len, 128);
        let z: Cidr = "0.0.0.0/0".parse().expect("all");
        assert!(z.contains("203.0.113.9".parse().expect("ip")));
        assert!("198.51.100.0/33".parse::<Cidr>().is_err());
        assert!("bogus/8".parse::<Cidr>().is_err());
    }
}
