//! `dsproxy run --config FILE`: a kube-proxy configuration file
//! (`KubeProxyConfiguration`, field names of kube-proxy's v1alpha1 and
//! v1alpha2) plus dsproxy's own settings under `dsproxy:`.
//!
//! A field becomes the command-line flag it stands for (`FILE_FLAGS`, one
//! line per field), and the command line is parsed once more with those
//! flags added: a flag given on the command line wins over the file, every
//! value is checked by the same parser whichever way it came, and there is
//! one place that says which field is which flag.
//!
//! - Unknown fields are an error that names them (with line and column).
//! - kube-proxy fields that have no meaning for dsproxy (`iptables.*`,
//!   `ipvs.*`, `mode`, `oomScoreAdj`, ...) are accepted and reported as
//!   ignored, so kube-proxy's own ConfigMap can be used as it is.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
    str::FromStr,
    time::Duration,
};

use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {detail}")]
    Parse { path: String, detail: String },
    #[error("config file {path}: {field}: {detail}")]
    Field { path: String, field: &'static str, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The kube-proxy API versions whose field names the file may use.
pub const API_VERSIONS: [&str; 2] = ["kubeproxy.config.k8s.io/v1alpha1", "kubeproxy.config.k8s.io/v1alpha2"];
pub const KIND: &str = "KubeProxyConfiguration";

/// A Go duration (`30s`, `1h0m0s`, `1.5s`, `250ms`), as kube-proxy's flags
/// and configuration take them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct GoDuration(pub Duration);

impl FromStr for GoDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a duration (examples: 30s, 1h0m0s, 250ms)");
        let t = s.trim();
        if t == "0" {
            return Ok(Self(Duration::ZERO));
        }
        if t.is_empty() || t.starts_with('-') {
            return Err(bad());
        }
        let mut total: u128 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let num_len = rest.find(|c: char| !c.is_ascii_digit() && c != '.').ok_or_else(bad)?;
            let (num, tail) = rest.split_at(num_len);
            let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let nanos_per: u128 = match unit {
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(bad()),
            };
            let (int, frac) = num.split_once('.').unwrap_or((num, ""));
            if int.is_empty() && frac.is_empty() {
                return Err(bad());
            }
            let int: u128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
            let mut part = int.checked_mul(nanos_per).ok_or_else(bad)?;
            // The fraction, digit by digit, to the nanosecond.
            let mut scale = nanos_per;
            for d in frac.chars() {
                let d = u128::from(d.to_digit(10).ok_or_else(bad)?);
                scale /= 10;
                part += d * scale;
            }
            total = total.checked_add(part).ok_or_else(bad)?;
            rest = tail;
        }
        let total = u64::try_from(total).map_err(|_| bad())?;
        Ok(Self(Duration::from_nanos(total)))
    }
}

impl fmt::Display for GoDuration {
    /// Exact, and parseable again: whole seconds as `Ns`, else `Nns`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_nanos() == 0 {
            write!(f, "{}s", self.0.as_secs())
        } else {
            write!(f, "{}ns", self.0.as_nanos())
        }
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// A listen address as kube-proxy takes it: `IP:PORT`, `[IPv6]:PORT`, or
/// an IP alone (then `default_port`); empty means "do not listen".
pub fn bind_address(s: &str, default_port: u16) -> Result<Option<SocketAddr>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Some(a));
    }
    let ip = s.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .map(|ip| Some(SocketAddr::new(ip, default_port)))
        .map_err(|_| format!("{s:?} is not IP:PORT, [IPv6]:PORT or an IP"))
}

/// `clientConnection`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ClientConnection {
    kubeconfig: Option<String>,
    accept_content_types: Option<IgnoredAny>,
    content_type: Option<IgnoredAny>,
    qps: Option<IgnoredAny>,
    burst: Option<IgnoredAny>,
}

/// `logging` (component-base's LoggingConfiguration).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Logging {
    format: Option<String>,
    verbosity: Option<u8>,
    flush_frequency: Option<IgnoredAny>,
    options: Option<IgnoredAny>,
    vmodule: Option<IgnoredAny>,
}

/// `conntrack`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Conntrack {
    tcp_established_timeout: Option<GoDuration>,
    tcp_close_wait_timeout: Option<GoDuration>,
    udp_timeout: Option<GoDuration>,
    max_per_core: Option<IgnoredAny>,
    min: Option<IgnoredAny>,
    tcp_be_liberal: Option<IgnoredAny>,
    udp_stream_timeout: Option<IgnoredAny>,
}

/// `iptables`, `ipvs`, `nftables`: v1alpha1 keeps the sync periods here.
/// Everything else in them is about rules dsproxy does not write.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModeSection {
    sync_period: Option<GoDuration>,
    min_sync_period: Option<GoDuration>,
    #[serde(flatten)]
    other: std::collections::BTreeMap<String, serde_json::Value>,
}

/// `linux` (v1alpha2): conntrack moved here.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Linux {
    conntrack: Option<Conntrack>,
    masquerade_all: Option<IgnoredAny>,
    oom_score_adj: Option<IgnoredAny>,
}

/// `dsproxy`: settings kube-proxy does not have.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Own {
    manifests: Option<String>,
    attach: Option<String>,
    devices: Option<String>,
    pin_dir: Option<String>,
    /// The cgroup of socket-level load balancing (`none`: off).
    cgroup: Option<String>,
    #[serde(rename = "socketLBPods")]
    socket_lb_pods: Option<bool>,
    poll_interval: Option<GoDuration>,
    service_proxy_name: Option<String>,
    /// The API server's `--service-cluster-ip-range` (one CIDR per family).
    #[serde(rename = "serviceClusterIPRange")]
    service_cluster_ip_range: Option<String>,
    /// Allowed external and load-balancer IPs (CIDRs).
    #[serde(rename = "externalIPCIDRs")]
    external_ip_cidrs: Option<Vec<String>>,
    /// The API server's `--service-node-port-range`.
    service_node_port_range: Option<String>,
    watch_idle_timeout: Option<GoDuration>,
    api_retry_max: Option<GoDuration>,
    streaming_lists: Option<bool>,
    capacities: Option<Capacities>,
    conntrack: Option<OwnConntrack>,
}

/// `dsproxy.conntrack`: the datapath's timeouts kube-proxy has no field for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OwnConntrack {
    tcp_syn_timeout: Option<GoDuration>,
    tcp_close_timeout: Option<GoDuration>,
}

/// `dsproxy.capacities`: map sizes per family.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Capacities {
    svc: Option<u32>,
    backend: Option<u32>,
    revnat: Option<u32>,
    ct: Option<u32>,
    affinity: Option<u32>,
    sock: Option<u32>,
}

/// The file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    api_version: Option<String>,
    kind: Option<String>,
    bind_address: Option<String>,
    healthz_bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    hostname_override: Option<String>,
    client_connection: Option<ClientConnection>,
    logging: Option<Logging>,
    node_port_addresses: Option<Vec<String>>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    sync_period: Option<GoDuration>,
    min_sync_period: Option<GoDuration>,
    conntrack: Option<Conntrack>,
    linux: Option<Linux>,
    mode: Option<String>,
    iptables: Option<ModeSection>,
    ipvs: Option<ModeSection>,
    nftables: Option<ModeSection>,
    dsproxy: Option<Own>,
    // kube-proxy fields without a meaning for dsproxy.
    feature_gates: Option<IgnoredAny>,
    bind_address_hard_fail: Option<IgnoredAny>,
    enable_profiling: Option<IgnoredAny>,
    show_hidden_metrics_for_version: Option<IgnoredAny>,
    oom_score_adj: Option<IgnoredAny>,
    config_sync_period: Option<IgnoredAny>,
    port_range: Option<IgnoredAny>,
    detect_local_mode: Option<IgnoredAny>,
    detect_local: Option<IgnoredAny>,
    winkernel: Option<IgnoredAny>,
    windows_run_as_service: Option<IgnoredAny>,
}

/// What a configuration file says, as command-line flags.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileFlags {
    /// `(flag, value)`: `("--sync-period", "30s")`.
    pub flags: Vec<(&'static str, String)>,
    /// Fields that were read and have no effect in dsproxy, with why.
    pub ignored: Vec<String>,
}

/// Read and check `path`.
pub fn read(path: &Path) -> Result<FileFlags> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: shown.clone(), source })?;
    parse(&shown, &text)
}

/// Check `text` (the content of `path`) and turn it into flags.
pub fn parse(path: &str, text: &str) -> Result<FileFlags> {
    let file: File = if text.trim().is_empty() {
        File::default()
    } else {
        // One line per error: the message, its line and column.
        let mut options = serde_saphyr::Options::default();
        options.with_snippet = false;
        serde_saphyr::from_str_with_options(text, options)
            .map_err(|e| Error::Parse { path: path.to_owned(), detail: e.to_string() })?
    };
    let field = |field: &'static str, detail: String| Error::Field { path: path.to_owned(), field, detail };
    if let Some(v) = &file.api_version
        && !API_VERSIONS.contains(&v.as_str())
    {
        return Err(field("apiVersion", format!("{v:?} is not one of {}", API_VERSIONS.join(", "))));
    }
    if let Some(k) = &file.kind
        && k != KIND
    {
        return Err(field("kind", format!("{k:?} is not {KIND}")));
    }
    if let Some(f) = file.logging.as_ref().and_then(|l| l.format.as_deref())
        && !matches!(f, "" | "text" | "json")
    {
        return Err(field("logging.format", format!("{f:?} is not text or json")));
    }
    Ok(file_flags(&file))
}

/// The one table of field -> flag.
fn file_flags(file: &File) -> FileFlags {
    let mut out = FileFlags::default();
    // As kube-proxy's defaulting: an empty string or a zero duration in the
    // file means "the default" (kube-proxy's own ConfigMap writes every
    // field out), so it sets no flag.
    let mut flag = |name: &'static str, value: Option<String>| {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            out.flags.push((name, v));
        }
    };
    let own = file.dsproxy.as_ref();
    let caps = own.and_then(|o| o.capacities.as_ref());
    let logging = file.logging.as_ref();
    let own_ct = own.and_then(|o| o.conntrack.as_ref());
    // v1alpha2 keeps conntrack under `linux`; v1alpha1 at the top.
    let conntrack = file.conntrack.as_ref().or_else(|| file.linux.as_ref().and_then(|l| l.conntrack.as_ref()));
    // v1alpha1 keeps the sync periods in the section of the mode.
    let mode_section = match file.mode.as_deref() {
        Some("ipvs") => file.ipvs.as_ref(),
        Some("nftables") => file.nftables.as_ref(),
        _ => file.iptables.as_ref(),
    };
    let text = |s: &Option<String>| s.clone();
    let dur = |d: Option<GoDuration>| d.filter(|d| !d.0.is_zero()).map(|d| d.to_string());

    flag("--bind-address", text(&file.bind_address));
    flag("--healthz-bind-address", text(&file.healthz_bind_address));
    flag("--metrics-bind-address", text(&file.metrics_bind_address));
    flag("--hostname-override", text(&file.hostname_override));
    flag("--kubeconfig", file.client_connection.as_ref().and_then(|c| c.kubeconfig.clone()));
    flag("--log-format", logging.and_then(|l| l.format.clone()));
    flag("-v", logging.and_then(|l| l.verbosity).map(|v| v.to_string()));
    flag("--sync-period", dur(file.sync_period.or_else(|| mode_section.and_then(|m| m.sync_period))));
    flag("--min-sync-period", dur(file.min_sync_period.or_else(|| mode_section.and_then(|m| m.min_sync_period))));
    flag("--conntrack-tcp-timeout-established", dur(conntrack.and_then(|c| c.tcp_established_timeout)));
    flag("--conntrack-tcp-timeout-syn", dur(own_ct.and_then(|c| c.tcp_syn_timeout)));
    flag("--conntrack-tcp-timeout-close", dur(own_ct.and_then(|c| c.tcp_close_timeout)));
    flag("--conntrack-udp-timeout", dur(conntrack.and_then(|c| c.udp_timeout)));
    flag("--manifests", own.and_then(|o| o.manifests.clone()));
    flag("--attach", own.and_then(|o| o.attach.clone()));
    flag("--devices", own.and_then(|o| o.devices.clone()));
    flag("--pin-dir", own.and_then(|o| o.pin_dir.clone()));
    flag("--cgroup", own.and_then(|o| o.cgroup.clone()));
    flag("--socket-lb-pods", own.and_then(|o| o.socket_lb_pods).map(|b| b.to_string()));
    flag("--poll-interval", dur(own.and_then(|o| o.poll_interval)));
    flag("--service-proxy-name", own.and_then(|o| o.service_proxy_name.clone()));
    flag("--nodeport-addresses", file.node_port_addresses.as_ref().map(|a| a.join(",")));
    flag("--service-cluster-ip-range", own.and_then(|o| o.service_cluster_ip_range.clone()));
    flag("--external-ip-cidrs", own.and_then(|o| o.external_ip_cidrs.as_ref().map(|c| c.join(","))));
    flag("--service-node-port-range", own.and_then(|o| o.service_node_port_range.clone()));
    flag("--watch-idle-timeout", dur(own.and_then(|o| o.watch_idle_timeout)));
    flag("--api-retry-max", dur(own.and_then(|o| o.api_retry_max)));
    flag("--streaming-lists", own.and_then(|o| o.streaming_lists).map(|b| b.to_string()));
    flag("--svc-capacity", caps.and_then(|c| c.svc).map(|n| n.to_string()));
    flag("--backend-capacity", caps.and_then(|c| c.backend).map(|n| n.to_string()));
    flag("--revnat-capacity", caps.and_then(|c| c.revnat).map(|n| n.to_string()));
    flag("--ct-capacity", caps.and_then(|c| c.ct).map(|n| n.to_string()));
    flag("--affinity-capacity", caps.and_then(|c| c.affinity).map(|n| n.to_string()));
    flag("--sock-capacity", caps.and_then(|c| c.sock).map(|n| n.to_string()));
    out.ignored = ignored_fields(file);
    out
}

/// kube-proxy fields the file set that have no effect in dsproxy, with why.
fn ignored_fields(file: &File) -> Vec<String> {
    let mut out = Vec::new();
    let conntrack = file.conntrack.as_ref().or_else(|| file.linux.as_ref().and_then(|l| l.conntrack.as_ref()));
    let mut ignored = |name: &str, set: bool, why: &str| {
        if set {
            out.push(format!("{name}: {why}"));
        }
    };
    let no_rules = "dsproxy writes no iptables, IPVS or nftables rules";
    ignored("mode", file.mode.as_deref().is_some_and(|m| !m.is_empty()), "dsproxy has one mode, eBPF");
    for (name, section) in [("iptables", &file.iptables), ("ipvs", &file.ipvs), ("nftables", &file.nftables)] {
        if let Some(s) = section
            && !s.other.is_empty()
        {
            let keys: Vec<&str> = s.other.keys().map(String::as_str).collect();
            ignored(&format!("{name}.{{{}}}", keys.join(",")), true, no_rules);
        }
    }
    ignored("clusterCIDR", file.cluster_cidr.is_some(), "dsproxy tells pods from external clients by interface");
    if let Some(c) = conntrack {
        let size = "dsproxy's conntrack is its own map: size it with dsproxy.capacities.ct (--ct-capacity)";
        ignored("conntrack.maxPerCore", c.max_per_core.is_some(), size);
        ignored("conntrack.min", c.min.is_some(), size);
        ignored(
            "conntrack.tcpCloseWaitTimeout",
            c.tcp_close_wait_timeout.is_some(),
            "the datapath has no separate half-closed state: such flows keep tcpEstablishedTimeout",
        );
        ignored("conntrack.tcpBeLiberal", c.tcp_be_liberal.is_some(), "no netfilter conntrack involved");
        ignored("conntrack.udpStreamTimeout", c.udp_stream_timeout.is_some(), "one UDP timeout: conntrack.udpTimeout");
    }
    let unused = "no meaning for dsproxy";
    for (name, set) in [
        ("featureGates", file.feature_gates.is_some()),
        ("bindAddressHardFail", file.bind_address_hard_fail.is_some()),
        ("enableProfiling", file.enable_profiling.is_some()),
        ("showHiddenMetricsForVersion", file.show_hidden_metrics_for_version.is_some()),
        ("oomScoreAdj", file.oom_score_adj.is_some()),
        ("configSyncPeriod", file.config_sync_period.is_some()),
        ("portRange", file.port_range.is_some()),
        ("detectLocalMode", file.detect_local_mode.is_some()),
        ("detectLocal", file.detect_local.is_some()),
        ("winkernel", file.winkernel.is_some()),
        ("windowsRunAsService", file.windows_run_as_service.is_some()),
        ("linux.masqueradeAll", file.linux.as_ref().is_some_and(|l| l.masquerade_all.is_some())),
        ("linux.oomScoreAdj", file.linux.as_ref().is_some_and(|l| l.oom_score_adj.is_some())),
    ] {
        ignored(name, set, unused);
    }
    let client = file.client_connection.as_ref();
    let api_client = "the agent's API client keeps its own settings";
    for (name, set) in [
        ("clientConnection.acceptContentTypes", client.is_some_and(|c| c.accept_content_types.is_some())),
        ("clientConnection.contentType", client.is_some_and(|c| c.content_type.is_some())),
        ("clientConnection.qps", client.is_some_and(|c| c.qps.is_some())),
        ("clientConnection.burst", client.is_some_and(|c| c.burst.is_some())),
    ] {
        ignored(name, set, api_client);
    }
    if let Some(l) = &file.logging {
        for (name, set) in [
            ("logging.flushFrequency", l.flush_frequency.is_some()),
            ("logging.options", l.options.is_some()),
            ("logging.vmodule", l.vmodule.is_some()),
        ] {
            ignored(name, set, "use RUST_LOG for per-module levels");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(text: &str) -> Vec<(&'static str, String)> {
        parse("test.yaml", text).expect("parses").flags
    }

    #[test]
    fn go_durations_parse_as_kube_proxy_writes_them() {
        let d = |s: &str| s.parse::<GoDuration>().map(|d| d.0);
        assert_eq!(d("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(d("24h0m0s"), Ok(Duration::from_hours(24)));
        assert_eq!(d("1h30m"), Ok(Duration::from_mins(90)));
        assert_eq!(d("1.5s"), Ok(Duration::from_millis(1_500)));
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("0"), Ok(Duration::ZERO));
        assert_eq!(d("0s"), Ok(Duration::ZERO));
        assert_eq!(d("10us"), Ok(Duration::from_micros(10)));
        for bad in ["", "30", "5x", "-1s", "s", "1.2.3s", "ms10"] {
            assert!(d(bad).is_err(), "{bad:?} must not parse");
        }
        for s in ["30s", "1500ms", "0s", "1ns"] {
            let g: GoDuration = s.parse().expect("parse");
            assert_eq!(g.to_string().parse::<GoDuration>(), Ok(g), "{s} round-trips");
        }
    }

    #[test]
    fn a_kube_proxy_configuration_becomes_flags() {
        let text = "\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
hostnameOverride: node-a
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
logging:
  format: json
  verbosity: 4
mode: iptables
iptables:
  masqueradeBit: 14
  syncPeriod: 30s
  minSyncPeriod: 1s
conntrack:
  maxPerCore: 32768
  tcpEstablishedTimeout: 24h0m0s
  tcpCloseWaitTimeout: 1h0m0s
  udpTimeout: 30s
nodePortAddresses: [primary]
dsproxy:
  attach: veth*,eth0
  pinDir: /sys/fs/bpf/dsproxy
  serviceClusterIPRange: 10.96.0.0/12,fd00:96::/108
  externalIPCIDRs: [203.0.113.0/24, 2001:db8::/48]
  serviceNodePortRange: 30000-32767
  capacities: {ct: 1048576}
";
        let out = parse("kube-proxy.yaml", text).expect("parses");
        let want: Vec<(&str, &str)> = vec![
            ("--bind-address", "0.0.0.0"),
            ("--healthz-bind-address", "0.0.0.0:10256"),
            ("--metrics-bind-address", "127.0.0.1:10249"),
            ("--hostname-override", "node-a"),
            ("--kubeconfig", "/var/lib/kube-proxy/kubeconfig.conf"),
            ("--log-format", "json"),
            ("-v", "4"),
            ("--sync-period", "30s"),
            ("--min-sync-period", "1s"),
            ("--conntrack-tcp-timeout-established", "86400s"),
            ("--conntrack-udp-timeout", "30s"),
            ("--attach", "veth*,eth0"),
            ("--pin-dir", "/sys/fs/bpf/dsproxy"),
            ("--nodeport-addresses", "primary"),
            ("--service-cluster-ip-range", "10.96.0.0/12,fd00:96::/108"),
            ("--external-ip-cidrs", "203.0.113.0/24,2001:db8::/48"),
            ("--service-node-port-range", "30000-32767"),
            ("--ct-capacity", "1048576"),
        ];
        let got: Vec<(&str, &str)> = out.flags.iter().map(|(f, v)| (*f, v.as_str())).collect();
        assert_eq!(got, want);
        let ignored = out.ignored.join("\n");
        for name in [
            "mode",
            "iptables.{masqueradeBit}",
            "conntrack.maxPerCore",
            "conntrack.tcpCloseWaitTimeout",
            "clientConnection.qps",
        ] {
            assert!(ignored.contains(name), "{name} must be reported as ignored:\n{ignored}");
        }
    }

    #[test]
    fn v1alpha2_keeps_sync_periods_on_top_and_conntrack_under_linux() {
        let got = flags(
            "apiVersion: kubeproxy.config.k8s.io/v1alpha2\nkind: KubeProxyConfiguration\nsyncPeriod: 10s\n\
             linux:\n  conntrack:\n    udpTimeout: 2m\n",
        );
        assert_eq!(got, vec![("--sync-period", "10s".into()), ("--conntrack-udp-timeout", "120s".into())]);
    }

    #[test]
    fn the_api_watch_settings_become_flags() {
        let got = flags("dsproxy:\n  watchIdleTimeout: 90s\n  apiRetryMax: 2s\n  streamingLists: false\n");
        assert_eq!(
            got,
            vec![
                ("--watch-idle-timeout", "90s".into()),
                ("--api-retry-max", "2s".into()),
                ("--streaming-lists", "false".into())
            ]
        );
    }

    #[test]
    fn unknown_fields_are_errors_that_name_them() {
        for (text, name) in [
            ("healthzBindAdress: 0.0.0.0:10256\n", "healthzBindAdress"),
            ("conntrack:\n  tcpTimeout: 1s\n", "tcpTimeout"),
            ("dsproxy:\n  pindir: /x\n", "pindir"),
            ("dsproxy:\n  capacities:\n    services: 5\n", "services"),
        ] {
            let e = parse("bad.yaml", text).expect_err("unknown field").to_string();
            assert!(e.contains("bad.yaml") && e.contains(name), "{text:?}: error must name {name}: {e}");
        }
    }

    #[test]
    fn bad_values_are_errors_that_name_the_field() {
        for (text, name) in [
            ("syncPeriod: soon\n", "soon"),
            ("kind: KubeletConfiguration\n", "kind"),
            ("apiVersion: v1\n", "apiVersion"),
            ("logging:\n  format: xml\n", "logging.format"),
            ("dsproxy:\n  capacities:\n    ct: -1\n", "line 3, column 9"),
        ] {
            let e = parse("bad.yaml", text).expect_err("bad value").to_string();
            assert!(e.contains(name), "{text:?}: error must name {name}: {e}");
        }
    }

    #[test]
    fn bind_addresses_take_kube_proxy_forms() {
        let a = |s: &str| bind_address(s, 10_256);
        assert_eq!(a("0.0.0.0:10256"), Ok(Some("0.0.0.0:10256".parse().expect("addr"))));
        assert_eq!(a("127.0.0.1"), Ok(Some("127.0.0.1:10256".parse().expect("addr"))));
        assert_eq!(a("[::]:9"), Ok(Some("[::]:9".parse().expect("addr"))));
        assert_eq!(a("::1"), Ok(Some("[::1]:10256".parse().expect("addr"))));
        assert_eq!(a(""), Ok(None));
        assert!(a("localhost:1").is_err());
    }

    #[test]
    fn an_empty_file_sets_nothing() {
        assert_eq!(parse("empty.yaml", "\n").expect("parses"), FileFlags::default());
    }
}
