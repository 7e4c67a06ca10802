//! What the agent shows the outside while it runs: /healthz and /livez,
//! /metrics, and the healthCheckNodePort servers. The run loop tells an
//! `Observer` what happens (a change arrived, a sync was queued, a sync
//! ran); the observer keeps health, metrics and servers up to date.
use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    diff::Programmed,
    health::{self, ProxyHealth},
    http,
    metrics::{self, Metrics, SyncOutcome},
    service_health,
    source::{Event, Object, ObjectKind},
    store::{Store, ns_name},
    types::{Desired, Family},
};

/// kube-proxy's network programming latency starts at this annotation of
/// an EndpointSlice: when the change that produced it happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The listeners, bound before anything is loaded so that a taken port
/// stops the agent at once.
pub struct Listeners {
    healthz: Option<TcpListener>,
    metrics: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(healthz: Option<SocketAddr>, metrics: Option<SocketAddr>) -> Result<Self, http::Error> {
        let healthz = match healthz {
            Some(a) => Some(http::bind(a, "/healthz and /livez (--healthz-bind-address)").await?),
            None => None,
        };
        let metrics = match metrics {
            Some(a) => Some(http::bind(a, "/metrics (--metrics-bind-address)").await?),
            None => None,
        };
        Ok(Self { healthz, metrics })
    }
}

/// What an event changes, read before it goes into the store.
pub struct Change {
    /// A relist: counted only when it changed something.
    relist: bool,
    slice: bool,
    service: String,
    trigger: Option<(Family, SystemTime)>,
}

/// Health, metrics and health-check servers of a running agent.
pub struct Observer {
    pub health: Arc<ProxyHealth>,
    pub metrics: Arc<Metrics>,
    services: service_health::Servers,
    /// A missing Node means "not eligible" (the Kubernetes API) or
    /// nothing (a manifest directory).
    node_required: bool,
    /// Trigger times of the EndpointSlice changes not yet synced.
    triggers: Vec<(Family, SystemTime)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Observer {
    /// Start serving on `listeners`. `datapath`: where /metrics reads the
    /// kernel's counters at each scrape, once the datapath is loaded.
    pub fn start(
        listeners: Listeners,
        sync_period: std::time::Duration,
        node_required: bool,
        datapath: Option<metrics::Datapath>,
    ) -> Self {
        let health = Arc::new(ProxyHealth::new(sync_period, health::node_eligible(None, node_required)));
        let metrics = Arc::new(Metrics::new(datapath));
        let mut tasks = Vec::new();
        if let Some(l) = listeners.healthz {
            log::info!(
                "serving /healthz and /livez on {}",
                l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string())
            );
            let probes: Arc<dyn health::Probes> = metrics.clone();
            tasks.push(http::serve(l, health::handler(Arc::clone(&health), probes)));
        }
        if let Some(l) = listeners.metrics {
            log::info!("serving /metrics on {}", l.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()));
            tasks.push(http::serve(l, metrics::handler(Arc::clone(&metrics))));
        }
        let services = service_health::Servers::new(Arc::clone(&health));
        Self { health, metrics, services, node_required, triggers: Vec::new(), tasks }
    }

    /// Look at an event before the store takes it.
    pub fn before(event: &Event) -> Option<Change> {
        let mut relist = false;
        let (slice, service, trigger) = match event {
            Event::Apply(Object::Service(s)) => (false, ns_name(&s.metadata), None),
            Event::Apply(Object::Slice(s)) => {
                let service = crate::store::owner(s)?;
                let at = s.meta.annotation(TRIGGER_TIME_ANNOTATION);
                let at = at.and_then(|t| t.parse::<jiff::Timestamp>().ok()).map(SystemTime::from);
                (true, service, Family::from_k8s(s.address_type()).zip(at))
            }
            Event::Delete(k) if k.kind != ObjectKind::Node => (k.kind == ObjectKind::EndpointSlice, k.ns_name(), None),
            Event::Replace(kind @ (ObjectKind::Service | ObjectKind::EndpointSlice), _) => {
                relist = true;
                (*kind == ObjectKind::EndpointSlice, format!("(relist of {}s)", kind.name()), None)
            }
            _ => return None,
        };
        Some(Change { relist, slice, service, trigger })
    }

    /// The store took an event: count it, and follow the Node. Sources
    /// hand over only changes, one by one; a relist counts when it changed
    /// something.
    pub fn after(&mut self, change: Option<Change>, changed: bool, store: &Store) {
        if let Some(c) = change.filter(|c| changed || !c.relist) {
            self.metrics.changed(c.slice, &c.service);
            self.triggers.extend(c.trigger);
        }
        self.health.set_node_eligible(health::node_eligible(store.node(), self.node_required));
    }

    /// A sync is waiting to run.
    pub fn queued(&self) {
        self.health.queued(Instant::now());
        self.metrics.queued(SystemTime::now());
    }

    /// A sync ran (`started` is when).
    pub fn synced(
        &mut self,
        started: Instant,
        outcome: &SyncOutcome,
        programmed: &Programmed,
        desired: &Desired,
        counts: (usize, usize),
    ) {
        let wall = SystemTime::now();
        self.metrics.synced(outcome, wall, &std::mem::take(&mut self.triggers));
        self.metrics.state(programmed, desired, counts.0, counts.1);
        if outcome.errors == 0 {
            self.health.updated(started, wall);
        }
        self.services.listen_on(desired.health_check_addresses.as_deref());
        self.services.sync(&desired.health_checks);
    }
}
