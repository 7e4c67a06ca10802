//! Prometheus metrics on `--metrics-bind-address` (`/metrics`, OpenMetrics
//! text), with the `prometheus-client` crate.
//!
//! kube-proxy's names where the meaning is the same (`kubeproxy_*`,
//! `pkg/proxy/metrics`), so dashboards and alerts keep working, and
//! dsproxy's own (`dsproxy_*`): the datapath's packet counters by reason
//! and family, BPF map fill, conntrack entries, rejected objects, source
//! problems. What the agent knows is updated as it happens; what the
//! kernel knows (counters, map entries) is read from the pinned maps at
//! each scrape, on the blocking pool.
use std::{
    collections::BTreeSet,
    fmt,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, text},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets, linear_buckets},
    },
    registry::Registry,
};
use proxy_common::{MapSpec, Stat, StatSlot, maps as spec};

use crate::{
    diff::Programmed,
    health::Probes,
    http::{Handler, Response},
    maps::Maps,
    types::{Desired, Family as IpFamily, Kind, Scope, WhenEmpty},
};

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type Histograms = Family<Labels1, Histogram, fn() -> Histogram>;
type Seconds = Gauge<f64, AtomicU64>;

fn ip_family(f: IpFamily) -> Labels1 {
    [("ip_family", f.k8s_name())]
}

/// kube-proxy's sync buckets: 1 ms doubling up to 16 s.
fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// kube-proxy's network programming buckets: 0.25 s to 300 s.
fn programming_histogram() -> Histogram {
    Histogram::new(
        linear_buckets(0.25, 0.25, 2)
            .chain(linear_buckets(1.0, 1.0, 59))
            .chain(linear_buckets(60.0, 5.0, 12))
            .chain(linear_buckets(120.0, 30.0, 7)),
    )
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// What one sync did, as the metrics see it.
pub struct SyncOutcome {
    pub took: Duration,
    pub full: bool,
    /// Steps that failed (frontends not programmed).
    pub errors: usize,
}

/// Every metric the agent updates.
pub struct Metrics {
    registry: Registry,
    sync_duration: Histograms,
    sync_full_duration: Histograms,
    sync_partial_duration: Histograms,
    network_programming: Histograms,
    last_sync: Family<Labels1, Seconds>,
    last_queued: Family<Labels1, Seconds>,
    endpoint_changes_pending: Gauge,
    endpoint_changes_total: Counter,
    service_changes_pending: Gauge,
    service_changes_total: Counter,
    no_local_endpoints: Family<Labels2, Gauge>,
    healthz_total: Family<Labels1, Counter>,
    livez_total: Family<Labels1, Counter>,
    frontends: Family<Labels2, Gauge>,
    rejected_objects: Gauge,
    source_problems: Gauge,
    sync_errors_total: Counter,
    /// Services with changes since the last sync.
    pending_services: Mutex<BTreeSet<String>>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// The registry with every metric; `datapath` adds the kernel's view.
    pub fn new(datapath: Option<Datapath>) -> Self {
        let mut registry = Registry::default();
        let m = Self {
            sync_duration: Family::new_with_constructor(sync_histogram),
            sync_full_duration: Family::new_with_constructor(sync_histogram),
            sync_partial_duration: Family::new_with_constructor(sync_histogram),
            network_programming: Family::new_with_constructor(programming_histogram),
            last_sync: Family::default(),
            last_queued: Family::default(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz_total: Family::default(),
            livez_total: Family::default(),
            frontends: Family::default(),
            rejected_objects: Gauge::default(),
            source_problems: Gauge::default(),
            sync_errors_total: Counter::default(),
            pending_services: Mutex::new(BTreeSet::new()),
            registry: Registry::default(),
        };
        m.register_kube_proxys(registry.sub_registry_with_prefix("kubeproxy"));
        m.register_own(registry.sub_registry_with_prefix("dsproxy"), datapath);
        Self { registry, ..m }
    }

    /// kube-proxy's metrics, with its names and help texts.
    fn register_kube_proxys(&self, k: &mut Registry) {
        let m = self;
        {
            k.register(
                "sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
                m.sync_duration.clone(),
            );
            k.register(
                "sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
                m.sync_full_duration.clone(),
            );
            k.register(
                "sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
                m.sync_partial_duration.clone(),
            );
            k.register(
                "network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
                m.network_programming.clone(),
            );
            k.register(
                "sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                m.last_sync.clone(),
            );
            k.register(
                "sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                m.last_queued.clone(),
            );
            k.register(
                "sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                m.endpoint_changes_pending.clone(),
            );
            k.register(
                "sync_proxy_rules_endpoint_changes",
                "Cumulative proxy rules Endpoint changes",
                m.endpoint_changes_total.clone(),
            );
            k.register(
                "sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                m.service_changes_pending.clone(),
            );
            k.register(
                "sync_proxy_rules_service_changes",
                "Cumulative proxy rules Service changes",
                m.service_changes_total.clone(),
            );
            k.register(
                "sync_proxy_rules_no_local_endpoints_total",
                "Number of services with a Local traffic policy and no endpoints",
                m.no_local_endpoints.clone(),
            );
            k.register("proxy_healthz", "Cumulative proxy healthz HTTP status", m.healthz_total.clone());
            k.register("proxy_livez", "Cumulative proxy livez HTTP status", m.livez_total.clone());
        }
    }

    /// dsproxy's own metrics.
    fn register_own(&self, d: &mut Registry, datapath: Option<Datapath>) {
        let m = self;
        {
            d.register("frontends", "Frontends programmed in the datapath, by family and kind", m.frontends.clone());
            d.register(
                "rejected_objects",
                "Services and EndpointSlices the model refused (logged once each, by name)",
                m.rejected_objects.clone(),
            );
            d.register(
                "source_problems",
                "Objects or files the source could not read (their last good version stays)",
                m.source_problems.clone(),
            );
            d.register(
                "sync_errors",
                "Frontends a sync failed to program (map full, ...); retried",
                m.sync_errors_total.clone(),
            );
            if let Some(dp) = datapath {
                d.register_collector(Box::new(dp));
            }
        }
    }

    /// A Service or EndpointSlice change reached the store.
    pub fn changed(&self, endpoint_slice: bool, service: &str) {
        if endpoint_slice {
            self.endpoint_changes_total.inc();
            self.endpoint_changes_pending.inc();
        } else {
            self.service_changes_total.inc();
        }
        let mut pending = self.pending_services.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        pending.insert(service.to_owned());
        self.service_changes_pending.set(i64::try_from(pending.len()).unwrap_or(i64::MAX));
    }

    /// A sync was queued.
    pub fn queued(&self, wall: SystemTime) {
        for f in IpFamily::ALL {
            self.last_queued.get_or_create(&ip_family(f)).set(unix_seconds(wall));
        }
    }

    /// A sync ran. `triggers`: when the EndpointSlice changes it programmed
    /// were made (their `endpoints.kubernetes.io/last-change-trigger-time`).
    pub fn synced(&self, outcome: &SyncOutcome, wall: SystemTime, triggers: &[(IpFamily, SystemTime)]) {
        let secs = outcome.took.as_secs_f64();
        let by_kind = if outcome.full { &self.sync_full_duration } else { &self.sync_partial_duration };
        for f in IpFamily::ALL {
            self.sync_duration.get_or_create(&ip_family(f)).observe(secs);
            by_kind.get_or_create(&ip_family(f)).observe(secs);
        }
        self.sync_errors_total.inc_by(outcome.errors as u64);
        self.endpoint_changes_pending.set(0);
        self.service_changes_pending.set(0);
        self.pending_services.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        if outcome.errors > 0 {
            return;
        }
        for f in IpFamily::ALL {
            self.last_sync.get_or_create(&ip_family(f)).set(unix_seconds(wall));
        }
        for (f, at) in triggers {
            if let Ok(d) = wall.duration_since(*at) {
                self.network_programming.get_or_create(&ip_family(*f)).observe(d.as_secs_f64());
            }
        }
    }

    /// The state after a sync: frontends by family and kind, Local
    /// policies left without endpoints, rejected objects, source problems.
    pub fn state(&self, programmed: &Programmed, desired: &Desired, rejected: usize, problems: usize) {
        self.frontends.clear();
        for (f, v) in &programmed.frontends {
            let kind = if f.scope == Scope::Internal { "ClusterIP (internal)" } else { v.settings.kind.name() };
            self.frontends.get_or_create(&[("ip_family", f.family().k8s_name()), ("kind", kind)]).inc();
        }
        // kube-proxy counts Service ports whose Local policy leaves this
        // node without endpoints: in dsproxy, frontends that drop when
        // empty and are empty, by the scope the policy governs.
        let mut internal: BTreeSet<(IpFamily, &str)> = BTreeSet::new();
        let mut external: BTreeSet<(IpFamily, &str)> = BTreeSet::new();
        for (f, s) in &desired.frontends {
            if s.backends.is_empty() && s.settings.when_empty == WhenEmpty::Drop {
                let set = if f.scope == Scope::Internal || s.settings.kind == Kind::ClusterIp {
                    &mut internal
                } else {
                    &mut external
                };
                set.insert((f.family(), s.owner.as_str()));
            }
        }
        for fam in IpFamily::ALL {
            for (policy, set) in [("internal", &internal), ("external", &external)] {
                let n = set.iter().filter(|(f, _)| *f == fam).count();
                self.no_local_endpoints
                    .get_or_create(&[("ip_family", fam.k8s_name()), ("traffic_policy", policy)])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        self.rejected_objects.set(i64::try_from(rejected).unwrap_or(i64::MAX));
        self.source_problems.set(i64::try_from(problems).unwrap_or(i64::MAX));
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = text::encode(&mut out, &self.registry) {
            log::error!("encoding metrics: {e}");
        }
        out
    }
}

impl Probes for Metrics {
    fn probed(&self, path: &'static str, code: u16) {
        let family = if path == "/healthz" { &self.healthz_total } else { &self.livez_total };
        let code = if code == 200 { "200" } else { "503" };
        family.get_or_create(&[("code", code)]).inc();
    }
}

/// The handler for `--metrics-bind-address`: `/metrics`, and `/proxyMode`
/// as kube-proxy serves it.
pub fn handler(metrics: Arc<Metrics>) -> Handler {
    Arc::new(move |path| match path {
        "/metrics" => {
            Response::new(200, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.encode())
        }
        "/proxyMode" => Response::new(200, "text/plain; charset=utf-8", "ebpf".into()),
        _ => Response::not_found(),
    })
}

/// The kernel's view, read at each scrape from a handle on the pinned maps
/// (none until the datapath is loaded: the agent loads it while its source
/// reads the initial state, and serves /metrics from the start).
#[derive(Clone, Default)]
pub struct Datapath {
    maps: Arc<Mutex<Option<Maps>>>,
}

impl Datapath {
    /// Scrapes read the kernel's counters from `maps` from now on.
    pub fn set(&self, maps: Maps) {
        *self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(maps);
    }
}

impl fmt::Debug for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Datapath")
    }
}

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let guard = self.maps.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(maps) = guard.as_ref() else { return Ok(()) };
        let packets: Family<Labels2, Counter> = Family::default();
        let socket_lb: Family<Labels1, Counter> = Family::default();
        match maps.stats() {
            Ok(stats) => {
                for (slot, stat, n) in stats {
                    packets.get_or_create(&[("family", slot.name()), ("reason", stat.name())]).inc_by(n);
                    if stat == Stat::SockXlate && slot != StatSlot::Other {
                        socket_lb.get_or_create(&[("ip_family", slot.name())]).inc_by(n);
                    }
                }
            }
            Err(e) => log::warn!("metrics: {e}"),
        }
        let entries: Family<Labels1, Gauge> = Family::default();
        let capacity: Family<Labels1, Gauge> = Family::default();
        let conntrack: Family<Labels1, Gauge> = Family::default();
        for m in &spec::ALL {
            match maps.fill(m) {
                Ok((n, max)) => {
                    entries.get_or_create(&[("map", m.name)]).set(i64::from(n));
                    capacity.get_or_create(&[("map", m.name)]).set(i64::from(max));
                    if let Some(f) = ct_family(m) {
                        conntrack.get_or_create(&[("ip_family", f.k8s_name())]).inc_by(i64::from(n));
                    }
                }
                Err(e) => log::warn!("metrics: {e}"),
            }
        }
        drop(guard);
        let describe = [
            (
                "datapath_packets",
                "Packets the datapath handled, by family (IPv4, IPv6, other) and what it did",
                &packets as &dyn prometheus_client::encoding::EncodeMetric,
            ),
            ("bpf_map_entries", "Entries in use in each pinned BPF map (arrays: entries in use)", &entries),
            ("bpf_map_capacity", "Most entries each pinned BPF map holds", &capacity),
            ("conntrack_entries", "Conntrack entries, two per tracked flow (forward and reverse map)", &conntrack),
            (
                "socket_lb_translations",
                "connect() and sendmsg() calls socket load balancing sent to a backend (datapath_packets reason sock_xlate)",
                &socket_lb,
            ),
        ];
        for (name, help, metric) in describe {
            let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(e)?;
        }
        Ok(())
    }
}

fn ct_family(m: &MapSpec) -> Option<IpFamily> {
    match m.name {
        n if n == spec::CT4_FWD.name || n == spec::CT4_REV.name => Some(IpFamily::V4),
        n if n == spec::CT6_FWD.name || n == spec::CT6_REV.name => Some(IpFamily::V6),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
        let prefix = if labels.is_empty() { format!("{name} ") } else { format!("{name}{{{labels}}} ") };
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
    }
    use crate::types::{Frontend, FrontendSpec, Proto, Settings};

    #[test]
    fn kube_proxy_names_are_exposed() {
        let m = Metrics::new(None);
        m.changed(true, "ns/a");
        m.changed(false, "ns/a");
        m.changed(true, "ns/b");
        m.queued(SystemTime::now());
        let wall = SystemTime::now();
        let outcome = SyncOutcome { took: Duration::from_millis(3), full: false, errors: 0 };
        m.synced(&outcome, wall, &[(IpFamily::V6, wall - Duration::from_secs(2))]);
        m.probed("/healthz", 503);
        let text = m.encode();
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\",ip_family=\"IPv4\"} 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 2",
            "kubeproxy_sync_proxy_rules_service_changes_total 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 0",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"2.0\",ip_family=\"IPv6\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\",ip_family=\"IPv6\"} 0",
            "kubeproxy_proxy_healthz_total{code=\"503\"} 1",
            "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "# TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge",
            "# EOF",
        ] {
            assert!(text.contains(name), "missing {name:?} in:\n{text}");
        }
        let last = sample(&text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds", "ip_family=\"IPv4\"");
        assert!(last.is_some_and(|t| (t - unix_seconds(wall)).abs() < 1e-3), "{last:?}");
    }

    #[test]
    fn a_failed_sync_does_not_move_the_last_success() {
        let m = Metrics::new(None);
        let failed = SyncOutcome { took: Duration::from_millis(1), full: true, errors: 2 };
        m.synced(&failed, SystemTime::now(), &[]);
        let text = m.encode();
        assert_eq!(sample(&text, "dsproxy_sync_errors_total", ""), Some(2.0));
        assert!(!text.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds{"), "{text}");
        assert!(text.contains("kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1"));
    }

    #[test]
    fn local_policies_without_endpoints_are_counted_per_service_port_and_family() {
        let m = Metrics::new(None);
        let mut desired = Desired::default();
        let drop = Settings { when_empty: WhenEmpty::Drop, ..Settings::default() };
        let lb = Settings { kind: Kind::LoadBalancer, when_empty: WhenEmpty::Drop, ..Settings::default() };
        let add = |d: &mut Desired, f: Frontend, owner: &str, settings: &Settings| {
            d.frontends.insert(f, FrontendSpec { settings: settings.clone(), ..FrontendSpec::new(owner, Vec::new()) });
        };
        let v4 = |a: [u8; 4], p| Frontend::new(std::net::Ipv4Addr::from(a).into(), p, Proto::Tcp);
        add(&mut desired, v4([198, 19, 0, 1], 80), "ns/a:http", &drop);
        add(&mut desired, v4([198, 19, 0, 1], 80).with_scope(Scope::Internal), "ns/a:http", &drop);
        add(&mut desired, v4([198, 19, 0, 9], 80), "ns/b:http", &lb);
        add(&mut desired, v4([198, 19, 0, 2], 80), "ns/c:http", &Settings::default());
        m.state(&Programmed::default(), &desired, 3, 1);
        let text = m.encode();
        let at = |fam: &str, policy: &str| {
            sample(
                &text,
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                &format!("ip_family=\"{fam}\",traffic_policy=\"{policy}\""),
            )
        };
        assert_eq!(at("IPv4", "internal"), Some(1.0), "one Service port, however many frontends:\n{text}");
        assert_eq!(at("IPv4", "external"), Some(1.0));
        assert_eq!(at("IPv6", "internal"), Some(0.0));
        assert_eq!(sample(&text, "dsproxy_rejected_objects", ""), Some(3.0));
        assert_eq!(sample(&text, "dsproxy_source_problems", ""), Some(1.0));
    }
}
