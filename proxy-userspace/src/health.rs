//! kube-proxy's health endpoints, with its semantics and its JSON bodies.
//!
//! - `/livez`: 200 unless a change has waited `2 × --sync-period` or more
//!   for a successful sync (an idle proxy stays healthy: it is the *queued*
//!   change that ages, not the last sync).
//! - `/healthz`: the same, and 503 while this node is going away: its Node
//!   object is being deleted, carries the cluster autoscaler's
//!   `ToBeDeletedByClusterAutoscaler` taint, or (following the Kubernetes
//!   API) does not exist. Load balancers probe it to drain the node.
//!
//! Bodies are kube-proxy's (`pkg/proxy/healthcheck/proxy_health.go`): keys
//! in its order, times in RFC 3339 with nanoseconds, `nodeEligible` only
//! on /healthz, `status` per IP family once that family has synced.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use serde::Serialize;

use crate::{
    http::{Handler, Response},
    types::Family,
};

/// The cluster autoscaler's taint on a node it is about to delete.
pub const TAINT_TO_BE_DELETED: &str = "ToBeDeletedByClusterAutoscaler";

/// Go's zero time, which kube-proxy prints before the first sync.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// Can this node take traffic from a load balancer, by its Node object?
/// `required`: whether a missing Node means "no" (the Kubernetes API, as
/// kube-proxy) or "no opinion" (a manifest directory without one).
pub fn node_eligible(node: Option<&Node>, required: bool) -> bool {
    let Some(node) = node else { return !required };
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == TAINT_TO_BE_DELETED));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

#[derive(Clone, Copy, Debug, Default)]
struct FamilyState {
    /// Wall-clock time of the last successful sync.
    last_updated: Option<SystemTime>,
    /// When the oldest change still waiting for a sync was queued.
    oldest_pending: Option<Instant>,
}

#[derive(Debug)]
struct State {
    families: BTreeMap<Family, FamilyState>,
    node_eligible: bool,
}

/// The proxy's health, shared by the agent (which reports) and the HTTP
/// server (which answers).
#[derive(Debug)]
pub struct ProxyHealth {
    timeout: Duration,
    state: Mutex<State>,
}

/// `status` entry of one family.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FamilyBody {
    last_updated: String,
    healthy: bool,
}

/// The JSON body, keys in kube-proxy's order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    last_updated: String,
    current_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_eligible: Option<bool>,
    healthy: bool,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    status: BTreeMap<&'static str, FamilyBody>,
}

/// RFC 3339 with nanoseconds, trailing zeros of the fraction trimmed (Go's
/// `time.Time` in JSON, UTC).
pub fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t).map_or_else(|_| ZERO_TIME.to_owned(), |ts| ts.to_string())
}

impl ProxyHealth {
    /// `sync_period`: kube-proxy's `--sync-period`; the health timeout is twice it.
    pub fn new(sync_period: Duration, node_eligible: bool) -> Self {
        Self { timeout: sync_period * 2, state: Mutex::new(State { families: BTreeMap::new(), node_eligible }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A change is waiting for a sync (kube-proxy's `QueuedUpdate`): the
    /// first one starts the clock.
    pub fn queued(&self, now: Instant) {
        let mut st = self.lock();
        for f in Family::ALL {
            st.families.entry(f).or_default().oldest_pending.get_or_insert(now);
        }
    }

    /// A sync succeeded (kube-proxy's `Updated`).
    pub fn updated(&self, now: Instant, wall: SystemTime) {
        let mut st = self.lock();
        for f in Family::ALL {
            let fam = st.families.entry(f).or_default();
            fam.last_updated = Some(wall);
            // Changes queued after `now` are not covered by this sync, but
            // the agent takes every queued change into each sync.
            if fam.oldest_pending.is_some_and(|t| t <= now) {
                fam.oldest_pending = None;
            }
        }
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// Status code and body of /healthz (`with_node`) or /livez.
    pub fn report(&self, with_node: bool, now: Instant, wall: SystemTime) -> (u16, String) {
        let st = self.lock();
        let mut healthy = true;
        let mut status = BTreeMap::new();
        let mut last = None;
        for (f, s) in &st.families {
            let Some(updated) = s.last_updated else {
                if s.oldest_pending.is_some_and(|t| now.duration_since(t) >= self.timeout) {
                    healthy = false;
                }
                continue;
            };
            let fam_healthy = s.oldest_pending.is_none_or(|t| now.duration_since(t) < self.timeout);
            healthy &= fam_healthy;
            last = last.max(Some(updated));
            status.insert(f.k8s_name(), FamilyBody { last_updated: rfc3339(updated), healthy: fam_healthy });
        }
        let node_eligible = st.node_eligible;
        drop(st);
        let ok = healthy && (!with_node || node_eligible);
        // kube-proxy reports "now" as the last update when healthy.
        let last_updated = if ok { rfc3339(wall) } else { last.map_or_else(|| ZERO_TIME.to_owned(), rfc3339) };
        let body = Body {
            last_updated,
            current_time: rfc3339(wall),
            node_eligible: with_node.then_some(node_eligible),
            healthy,
            status,
        };
        (if ok { 200 } else { 503 }, serde_json::to_string(&body).unwrap_or_default())
    }

    /// Whether the proxy itself is healthy, node eligibility aside (what the
    /// health-check node ports report as `serviceProxyHealthy`).
    pub fn healthy(&self) -> bool {
        self.report(false, Instant::now(), SystemTime::now()).0 == 200
    }
}

/// What /healthz and /livez answer are counted by code.
pub trait Probes: Send + Sync {
    fn probed(&self, path: &'static str, code: u16);
}

/// The handler for `--healthz-bind-address`.
pub fn handler(health: Arc<ProxyHealth>, probes: Arc<dyn Probes>) -> Handler {
    Arc::new(move |path| {
        let (path, with_node) = match path {
            "/healthz" => ("/healthz", true),
            "/livez" => ("/livez", false),
            _ => return Response::not_found(),
        };
        let (code, body) = health.report(with_node, Instant::now(), SystemTime::now());
        probes.probed(path, code);
        Response::new(code, "application/json", body)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).expect("node")
    }

    fn body(h: &ProxyHealth, with_node: bool, now: Instant, wall: SystemTime) -> (u16, serde_json::Value) {
        let (code, text) = h.report(with_node, now, wall);
        (code, serde_json::from_str(&text).expect("json"))
    }

    #[test]
    fn an_idle_proxy_stays_healthy_and_a_stale_change_fails_both_probes() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = ProxyHealth::new(Duration::from_secs(30), true);
        // Before the first sync, nothing is queued: healthy, no status yet.
        let (code, b) = body(&h, true, t0, wall);
        assert_eq!(code, 200);
        assert!(b.get("status").is_none(), "{b}");
        h.updated(t0, wall);
        // Long idle: still healthy.
        assert_eq!(h.report(true, t0 + Duration::from_hours(1), wall).0, 200);
        h.queued(t0 + Duration::from_secs(10));
        h.queued(t0 + Duration::from_secs(50)); // does not restart the clock
        assert_eq!(h.report(true, t0 + Duration::from_secs(69), wall).0, 200, "59 s < 2 x 30 s");
        let (code, b) = body(&h, false, t0 + Duration::from_secs(70), wall);
        assert_eq!(code, 503, "60 s >= 2 x 30 s: /livez fails too");
        assert_eq!(b["healthy"], false);
        assert_eq!(b["status"]["IPv4"]["healthy"], false);
        assert_eq!(b["lastUpdated"], "2023-11-14T22:13:20Z", "the last successful sync when unhealthy");
        h.updated(t0 + Duration::from_secs(71), wall);
        assert_eq!(h.report(true, t0 + Duration::from_secs(72), wall).0, 200);
    }

    #[test]
    fn bodies_are_kube_proxys() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::new(1_735_787_045, 123_456_789);
        let h = ProxyHealth::new(Duration::from_secs(30), true);
        h.updated(t0, wall);
        let (_, text) = h.report(true, t0, wall);
        assert_eq!(
            text,
            r#"{"lastUpdated":"2025-01-02T03:04:05.123456789Z","currentTime":"2025-01-02T03:04:05.123456789Z","nodeEligible":true,"healthy":true,"status":{"IPv4":{"lastUpdated":"2025-01-02T03:04:05.123456789Z","healthy":true},"IPv6":{"lastUpdated":"2025-01-02T03:04:05.123456789Z","healthy":true}}}"#
        );
        let (_, livez) = h.report(false, t0, wall + Duration::from_millis(500));
        assert!(!livez.contains("nodeEligible"), "{livez}");
        assert!(livez.contains(r#""currentTime":"2025-01-02T03:04:05.623456789Z""#), "trailing zeros trimmed: {livez}");
    }

    #[test]
    fn a_leaving_node_fails_healthz_but_not_livez() {
        let t0 = Instant::now();
        let h = ProxyHealth::new(Duration::from_secs(30), true);
        h.updated(t0, SystemTime::now());
        h.set_node_eligible(false);
        let (code, b) = body(&h, true, t0, SystemTime::now());
        assert_eq!((code, &b["nodeEligible"], &b["healthy"]), (503, &false.into(), &true.into()));
        assert_eq!(h.report(false, t0, SystemTime::now()).0, 200);
        assert!(h.healthy(), "serviceProxyHealthy leaves the node out");
    }

    #[test]
    fn deleting_tainted_or_missing_nodes_are_not_eligible() {
        let ready = node(serde_json::json!({"metadata": {"name": "n"}}));
        let deleting =
            node(serde_json::json!({"metadata": {"name": "n", "deletionTimestamp": "2025-01-01T00:00:00Z"}}));
        let tainted = node(serde_json::json!({"metadata": {"name": "n"},
            "spec": {"taints": [{"key": TAINT_TO_BE_DELETED, "effect": "NoSchedule"}]}}));
        assert!(node_eligible(Some(&ready), true));
        assert!(!node_eligible(Some(&deleting), true));
        assert!(!node_eligible(Some(&tainted), true));
        assert!(!node_eligible(None, true), "the API has no Node of that name");
        assert!(node_eligible(None, false), "a manifest directory without a Node");
    }
}
