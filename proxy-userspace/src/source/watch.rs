//! One kind's list/watch loop, on kube-rs's client calls (`Api::list`,
//! `Api::watch`), handing over `Relisting`/`Replace`/`Apply`/`Delete`.
//!
//! kube-rs's runtime watcher hides what this loop needs to see: BOOKMARKs
//! (so a silent watch cannot be told from a quiet one), whether the server
//! answered at all (its backoff is reset by its own `Init` marker and grows
//! across the 410 that follows an outage), and it has no fallback from
//! streaming lists. The rules here:
//!
//! - **Initial state and relists**: a streaming list (`sendInitialEvents`,
//!   ended by the `k8s.io/initial-events-end` BOOKMARK) when the server
//!   takes it; a `400`/`422` answer, or initial events that stop without
//!   that BOOKMARK for `idle_timeout`, switch this kind to paged lists for
//!   good. `Relisting(kind)` goes out once when a relist becomes necessary,
//!   `Replace(kind, ..)` when it is complete: the kind's objects may be
//!   stale in between.
//! - **Watching**: from the last resourceVersion seen (object or
//!   BOOKMARK). A watch that ends is resumed at once; an ERROR with code
//!   `410` (expired) relists at once; an undecodable line or another
//!   error resumes from the last resourceVersion after a backoff; a watch
//!   that cannot be started relists (after a backoff).
//! - **Liveness**: BOOKMARKs are asked for on every watch; a watch that
//!   delivers no event and no BOOKMARK for `idle_timeout` is dead: logged
//!   and resumed from the last resourceVersion. Requests that get no answer
//!   within `idle_timeout` fail the same way.
//! - **Backoff**: from `retry_min` doubling to `retry_max`, with jitter,
//!   logged with the time until the next attempt; reset as soon as the
//!   server answers (a list, a watch accepted, any event).
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{Stream, StreamExt as _};
use kube::{
    Api,
    api::{ListParams, WatchEvent, WatchParams},
    core::{DeserializeGuard, Resource},
};

use super::{Event, Object, ObjectKey, ObjectKind, Sender};

/// The BOOKMARK annotation that ends a streaming list's initial events.
pub const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// How the loop talks to the API server.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A watch with no event and no BOOKMARK for this long is dead; a
    /// request unanswered for this long has failed. Real API servers send a
    /// BOOKMARK about once a minute: twice that is the default.
    pub idle_timeout: Duration,
    /// First wait after a failure.
    pub retry_min: Duration,
    /// Longest wait between attempts while the server fails: after an
    /// outage, changes arrive at most this long (plus a list) after the
    /// server answers again.
    pub retry_max: Duration,
    /// Try streaming lists first.
    pub streaming_lists: bool,
    /// Objects per page of a classic list.
    pub page_size: u32,
    /// `timeoutSeconds` of a watch: the server ends it after this long.
    pub watch_timeout_secs: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_mins(2),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(1),
            streaming_lists: true,
            page_size: 500,
            watch_timeout_secs: 290,
        }
    }
}

/// One kind: what it is, how to wrap and slim its objects, and what to
/// select.
pub struct Watched<K> {
    pub kind: ObjectKind,
    pub wrap: fn(K) -> Object,
    pub slim: fn(&mut K),
    pub labels: Option<String>,
    pub fields: Option<String>,
}

/// Exponential backoff that resets when the server answers, and says when
/// the next attempt is due.
struct Backoff {
    kind: ObjectKind,
    min: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
    since: Option<Instant>,
    last_error: String,
    seed: u64,
}

impl Backoff {
    fn new(kind: ObjectKind, settings: &Settings) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::from(d.subsec_nanos()) | 1)
            ^ (kind as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        Self {
            kind,
            min: settings.retry_min,
            max: settings.retry_max.max(settings.retry_min),
            next: settings.retry_min,
            failures: 0,
            since: None,
            last_error: String::new(),
            seed,
        }
    }

    /// A uniform number in [0, 1) (xorshift; the jitter needs no more).
    fn unit(&mut self) -> f64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        #[expect(clippy::cast_precision_loss, reason = "53 bits of randomness are plenty for jitter")]
        let u = (self.seed >> 11) as f64 / (1u64 << 53) as f64;
        u
    }

    /// Record a failure; returns how long to wait, and logs it (the first
    /// failure, then at powers of two or when the error changes).
    fn failed(&mut self, what: &str, error: &str) -> Duration {
        self.failures += 1;
        self.since.get_or_insert_with(Instant::now);
        let wait = self.next.mul_f64(0.5 + 0.5 * self.unit());
        self.next = (self.next * 2).min(self.max);
        if self.failures.is_power_of_two() || error != self.last_error {
            log::warn!(
                "{} {what}: {error}; attempt {} failed, next retry in {} ms",
                self.kind.name(),
                self.failures,
                wait.as_millis()
            );
            error.clone_into(&mut self.last_error);
        }
        wait
    }

    /// The server answered: the next failure starts from the bottom again.
    /// Returns whether it had been failing.
    fn answered(&mut self) -> bool {
        let recovered = self.failures > 0;
        if recovered {
            let took = self.since.map(|s| s.elapsed()).unwrap_or_default();
            log::info!(
                "{}: the API server answers again ({} failed attempts over {} ms)",
                self.kind.name(),
                self.failures,
                took.as_millis()
            );
        }
        self.failures = 0;
        self.since = None;
        self.next = self.min;
        self.last_error.clear();
        recovered
    }
}

/// What the loops of one source share.
#[derive(Default)]
pub struct Shared {
    /// Kinds that have had their first complete list.
    synced: AtomicUsize,
    /// A loop found the server answering again: the others stop waiting
    /// out their backoff.
    back: tokio::sync::Notify,
}

/// How a watch stream ended.
enum Outcome {
    /// The server closed it (its timeout): resume.
    Ended,
    /// No event and no BOOKMARK for `idle_timeout`.
    Idle,
    /// A streaming list's initial events stopped without their end marker.
    InitialStalled,
    /// ERROR 410: the resourceVersion is too old; relist.
    Expired(String),
    /// Anything else: resume after a backoff.
    Failed(String),
    /// The agent is gone.
    Closed,
}

struct Loop<K: Resource<DynamicType = ()>> {
    api: Api<DeserializeGuard<K>>,
    k: Watched<K>,
    settings: Settings,
    tx: Sender,
    shared: Arc<Shared>,
    /// Where watching resumes; `None`: a relist is due.
    rv: Option<String>,
    /// `Relisting` was sent and its `Replace` not yet.
    announced: bool,
    first: bool,
    streaming: bool,
    backoff: Backoff,
    /// When the current list attempt started.
    list_started: Instant,
}

/// An error with its causes (`client error (Connect): tcp connect error:
/// Connection refused`), an API status as `code reason: message`.
fn describe_error(e: &kube::Error) -> String {
    if let kube::Error::Api(s) = e {
        return format!("{} {}: {}", s.code, s.reason, s.message);
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text = format!("{text}: {c_text}");
        }
        cause = c.source();
    }
    text
}

/// A request that failed: the status the API server answered with, if
/// any, and what happened, as text.
struct Failed {
    status: Option<Box<kube::core::Status>>,
    text: String,
}

/// `request`, failed when it gets no answer within `limit`.
async fn within<T>(limit: Duration, request: impl Future<Output = kube::Result<T>>) -> Result<T, Failed> {
    match tokio::time::timeout(limit, request).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => {
            let text = describe_error(&e);
            Err(Failed { status: if let kube::Error::Api(s) = e { Some(s) } else { None }, text })
        }
        Err(_) => Err(Failed { status: None, text: format!("no answer within {} ms", limit.as_millis()) }),
    }
}

/// An object that could not be read, by name.
fn problem<K: Resource<DynamicType = ()>>(invalid: &kube::core::error_boundary::InvalidObject) -> Event {
    let ns = invalid.metadata.namespace.as_deref().unwrap_or("");
    let name = invalid.metadata.name.as_deref().unwrap_or("");
    let what = if ns.is_empty() { format!("{} {name}", K::kind(&())) } else { format!("{} {ns}/{name}", K::kind(&())) };
    Event::Problem { what, reason: Some(format!("unreadable, its last good version stays: {}", invalid.error)) }
}

impl<K> Loop<K>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    fn send(&self, e: Event) -> bool {
        self.tx.send(e).is_ok()
    }

    fn key(&self, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectKey {
        let namespace = match self.k.kind {
            ObjectKind::Node => String::new(),
            _ => meta.namespace.clone().unwrap_or_else(|| "default".into()),
        };
        ObjectKey { kind: self.k.kind, namespace, name: meta.name.clone().unwrap_or_default() }
    }

    fn watch_params(&self) -> WatchParams {
        let mut wp = WatchParams::default().timeout(self.settings.watch_timeout_secs);
        wp.label_selector.clone_from(&self.k.labels);
        wp.field_selector.clone_from(&self.k.fields);
        wp
    }

    /// Hand over a complete list; the first one counts towards `Synced`.
    fn replace(&mut self, objects: Vec<Object>, rv: String) -> bool {
        log::info!(
            "{}: {} objects listed in {} ms ({})",
            self.k.kind.name(),
            objects.len(),
            self.list_started.elapsed().as_millis(),
            if self.streaming { "streaming list" } else { "paged list" }
        );
        self.announced = false;
        self.rv = Some(rv);
        if !self.send(Event::Replace(self.k.kind, objects)) {
            return false;
        }
        if std::mem::take(&mut self.first)
            && self.shared.synced.fetch_add(1, Ordering::SeqCst) + 1 == ObjectKind::ALL.len()
        {
            return self.send(Event::Synced);
        }
        true
    }

    async fn run(mut self) {
        loop {
            let alive = match self.rv.clone() {
                None => self.relist().await,
                Some(rv) => self.watch(rv).await,
            };
            if !alive {
                return; // the agent is gone
            }
        }
    }

    /// A relist is due: say so once (the kind may be stale from now on).
    fn stale(&mut self) -> bool {
        self.rv = None;
        if self.announced {
            return true;
        }
        self.announced = true;
        self.send(Event::Relisting(self.k.kind))
    }

    /// Wait out the backoff after a failure, or until another loop finds
    /// the server answering again.
    async fn sleep_after(&mut self, what: &str, error: &str) {
        let wait = self.backoff.failed(what, error);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = self.shared.back.notified() => {}
        }
    }

    /// The server answered: reset the backoff, and wake the other loops if
    /// it had been failing.
    fn answered(&mut self) {
        if self.backoff.answered() {
            self.shared.back.notify_waiters();
        }
    }

    /// Get the complete state: a streaming list or a paged list.
    async fn relist(&mut self) -> bool {
        if !self.stale() {
            return false;
        }
        self.list_started = Instant::now();
        if self.streaming { self.streaming_list().await } else { self.list().await }
    }

    async fn list(&mut self) -> bool {
        let mut lp = ListParams::default().limit(self.settings.page_size);
        lp.label_selector.clone_from(&self.k.labels);
        lp.field_selector.clone_from(&self.k.fields);
        let limit = self.settings.idle_timeout.max(Duration::from_mins(1));
        let mut objects = Vec::new();
        loop {
            let page = match within(limit, self.api.list(&lp)).await {
                Ok(page) => page,
                Err(e) => {
                    self.sleep_after("list", &e.text).await;
                    return true;
                }
            };
            self.answered();
            for guard in page.items {
                match guard.0 {
                    Ok(mut obj) => {
                        (self.k.slim)(&mut obj);
                        objects.push((self.k.wrap)(obj));
                    }
                    Err(invalid) => {
                        if !self.send(problem::<K>(&invalid)) {
                            return false;
                        }
                    }
                }
            }
            let Some(token) = page.metadata.continue_.filter(|c| !c.is_empty()) else {
                let rv = page.metadata.resource_version.unwrap_or_default();
                return self.replace(objects, rv);
            };
            lp.continue_token = Some(token);
        }
    }

    async fn streaming_list(&mut self) -> bool {
        let mut wp = self.watch_params();
        wp.send_initial_events = true;
        let limit = self.settings.idle_timeout;
        // resourceVersion "" with NotOlderThan: a consistent read.
        let stream = match within(limit, self.api.watch(&wp, "")).await {
            Ok(stream) => stream,
            Err(e) if e.status.as_ref().is_some_and(|s| matches!(s.code, 400 | 422)) => {
                log::warn!(
                    "{}: the API server refuses streaming lists ({}); using paged lists",
                    self.k.kind.name(),
                    e.text
                );
                self.answered();
                self.streaming = false;
                return true;
            }
            Err(e) => {
                self.sleep_after("streaming list", &e.text).await;
                return true;
            }
        };
        self.answered();
        self.follow(stream, Some(BTreeMap::new())).await
    }

    async fn watch(&mut self, rv: String) -> bool {
        let limit = self.settings.idle_timeout;
        let stream = match within(limit, self.api.watch(&self.watch_params(), &rv)).await {
            Ok(stream) => stream,
            // An apiserver sends 410 in the stream, but a proxy may not.
            Err(Failed { status: Some(s), .. }) if s.code == 410 => {
                return self.expired(&format!("{}: {}", s.reason, s.message));
            }
            Err(e) => {
                // What changed meanwhile is unknown: relist once the server
                // answers again (the kind is stale until then).
                if !self.stale() {
                    return false;
                }
                self.sleep_after("watch", &e.text).await;
                return true;
            }
        };
        self.answered();
        self.follow(stream, None).await
    }

    fn expired(&mut self, why: &str) -> bool {
        let rv = self.rv.clone().unwrap_or_default();
        log::info!("{}: resourceVersion {rv} expired ({why}); relisting now", self.k.kind.name());
        self.stale()
    }

    /// Read a watch stream to its end and act on how it ended. `initial`:
    /// a streaming list's objects so far (until its end marker).
    async fn follow(
        &mut self,
        stream: impl Stream<Item = kube::Result<WatchEvent<DeserializeGuard<K>>>>,
        initial: Option<BTreeMap<ObjectKey, Object>>,
    ) -> bool {
        let outcome = self.read(stream, initial).await;
        let kind = self.k.kind.name();
        match outcome {
            Outcome::Closed => false,
            Outcome::Ended => true,
            Outcome::Idle => {
                log::warn!(
                    "{kind} watch: no event or bookmark for {} ms; the watch is dead, re-watching from resourceVersion {}",
                    self.settings.idle_timeout.as_millis(),
                    self.rv.as_deref().unwrap_or("")
                );
                true
            }
            Outcome::InitialStalled => {
                log::warn!(
                    "{kind}: the streaming list's initial events stopped for {} ms without their end \
                     ({INITIAL_EVENTS_END}); the API server does not support streaming lists, using paged lists",
                    self.settings.idle_timeout.as_millis()
                );
                self.streaming = false;
                true
            }
            Outcome::Expired(why) => self.expired(&why),
            Outcome::Failed(error) => {
                self.sleep_after("watch", &error).await;
                true
            }
        }
    }

    async fn read(
        &mut self,
        stream: impl Stream<Item = kube::Result<WatchEvent<DeserializeGuard<K>>>>,
        mut initial: Option<BTreeMap<ObjectKey, Object>>,
    ) -> Outcome {
        let mut stream = std::pin::pin!(stream);
        let idle = self.settings.idle_timeout;
        let mut deadline = tokio::time::Instant::now() + idle;
        let mut received = false;
        loop {
            let item = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) if initial.is_some() => return Outcome::InitialStalled,
                Err(_) => return Outcome::Idle,
                Ok(None) if initial.is_some() => {
                    return Outcome::Failed("the stream ended before its initial events did".into());
                }
                Ok(None) if !received => return Outcome::Failed("the watch ended without a single event".into()),
                Ok(None) => return Outcome::Ended,
                Ok(Some(Err(e))) => return Outcome::Failed(describe_error(&e)),
                Ok(Some(Ok(item))) => item,
            };
            received = true;
            self.answered();
            // Progress: an object, the end of the initial events, or (while
            // watching) any BOOKMARK. A plain BOOKMARK during the initial
            // events is not progress: a server that ignores
            // `sendInitialEvents` sends those and never the end marker.
            let progress = match item {
                WatchEvent::Added(guard) | WatchEvent::Modified(guard) => {
                    let rv = guard.meta().resource_version.clone();
                    let event = match guard.0 {
                        Ok(mut obj) => {
                            (self.k.slim)(&mut obj);
                            let obj = (self.k.wrap)(obj);
                            match &mut initial {
                                Some(buf) => {
                                    buf.insert(obj.key(), obj);
                                    None
                                }
                                None => Some(Event::Apply(obj)),
                            }
                        }
                        Err(invalid) => Some(problem::<K>(&invalid)),
                    };
                    if initial.is_none() && rv.is_some() {
                        self.rv = rv;
                    }
                    if let Some(e) = event
                        && !self.send(e)
                    {
                        return Outcome::Closed;
                    }
                    true
                }
                WatchEvent::Deleted(guard) => {
                    let key = self.key(guard.meta());
                    if let Some(buf) = &mut initial {
                        buf.remove(&key);
                    } else {
                        if let Some(rv) = guard.meta().resource_version.clone() {
                            self.rv = Some(rv);
                        }
                        if !self.send(Event::Delete(key)) {
                            return Outcome::Closed;
                        }
                    }
                    true
                }
                WatchEvent::Bookmark(bm) => match initial.take() {
                    Some(buf) if bm.metadata.annotations.contains_key(INITIAL_EVENTS_END) => {
                        if !self.replace(buf.into_values().collect(), bm.metadata.resource_version) {
                            return Outcome::Closed;
                        }
                        true
                    }
                    Some(buf) => {
                        initial = Some(buf);
                        false
                    }
                    None => {
                        self.rv = Some(bm.metadata.resource_version);
                        true
                    }
                },
                WatchEvent::Error(s) if s.code == 410 => {
                    return Outcome::Expired(format!("{}: {}", s.reason, s.message));
                }
                WatchEvent::Error(s) => return Outcome::Failed(format!("{} {}: {}", s.code, s.reason, s.message)),
            };
            if progress {
                deadline = tokio::time::Instant::now() + idle;
            }
        }
    }
}

/// Run the loop for `K` until the agent goes away. The loops of a source
/// share `shared`: the last kind to complete its first list sends
/// `Synced`, and the first to find the server back wakes the others.
pub async fn run<K>(api: Api<DeserializeGuard<K>>, k: Watched<K>, settings: Settings, tx: Sender, shared: Arc<Shared>)
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let backoff = Backoff::new(k.kind, &settings);
    let streaming = settings.streaming_lists;
    let list_started = Instant::now();
    Loop { api, k, settings, tx, shared, rv: None, announced: false, first: true, streaming, backoff, list_started }
        .run()
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_when_the_server_answers() {
        let settings = Settings {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(800),
            ..Settings::default()
        };
        let mut b = Backoff::new(ObjectKind::Service, &settings);
        let waits: Vec<Duration> = (0..6).map(|_| b.failed("watch", "connection refused")).collect();
        // Jitter: each wait is between half and all of its step.
        for (w, step) in waits.iter().zip([100, 200, 400, 800, 800, 800]) {
            let step = Duration::from_millis(step);
            assert!(*w >= step / 2 && *w <= step, "{w:?} not in [{:?}, {step:?}]", step / 2);
        }
        b.answered();
        let w = b.failed("watch", "connection refused");
        assert!(w <= Duration::from_millis(100), "reset to the first step: {w:?}");
    }
}
