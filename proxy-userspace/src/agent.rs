//! The run loop: take the source's changes into the store, recompute what
//! they touched, sync the maps, keep interfaces attached; exit on
//! SIGINT/SIGTERM leaving the datapath attached and pinned.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    attach::{self, Capacities},
    cgroup,
    diff::Programmed,
    host,
    maps::Maps,
    metrics::{self, SyncOutcome},
    model,
    observe::{Listeners, Observer},
    privileges,
    source::{self, Event, SourceConfig},
    store::Store,
    sync::{self, Report},
};

/// Settings of `dsproxy run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    /// Interfaces to attach to, and their roles.
    pub attach: attach::Selection,
    /// The cgroup the socket programs are attached to (`--cgroup`).
    pub cgroup: cgroup::Choice,
    pub pin_dir: PathBuf,
    pub capacities: Capacities,
    /// Where /healthz and /livez are served (`None`: nowhere).
    pub healthz_bind: Option<std::net::SocketAddr>,
    /// Where /metrics is served (`None`: nowhere).
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// kube-proxy's `--sync-period`: /healthz fails when a change waited
    /// twice this long for a successful sync; a failed sync is retried
    /// after it.
    pub sync_period: Duration,
    /// Least time between two syncs (kube-proxy's `--min-sync-period`):
    /// changes arriving meanwhile are coalesced into the next one.
    pub min_sync_period: Duration,
    /// How often interfaces are checked for changes.
    pub poll_interval: Duration,
    pub model: model::Config,
    /// Runtime settings of the datapath (conntrack timeouts).
    pub datapath: proxy_common::DatapathConfig,
}

/// How long Services that appeared during an EndpointSlice relist are held
/// back (see `store`) before they are programmed anyway.
pub const RELIST_HOLD_LIMIT: Duration = Duration::from_secs(30);

/// The agent's state between syncs.
struct Agent {
    maps: Maps,
    programmed: Programmed,
    store: Store,
    model: model::Cache,
    /// Look at every frontend and map entry next time (at start, and after
    /// a pass with errors); otherwise only at what changed.
    full: bool,
    generation: u64,
    /// Objects rejected by the model, as last logged.
    rejected: BTreeSet<String>,
    /// What the model ignored in objects it took, as last logged.
    warnings: BTreeSet<String>,
    /// Problems the source reported, as last logged.
    problems: BTreeMap<String, String>,
    /// Health, metrics, health-check node ports.
    observer: Observer,
    /// When the relist gate started holding Services back.
    holding_since: Option<Instant>,
}

impl Agent {
    /// Take one event from the source; returns whether a sync is needed.
    fn take(&mut self, event: Event) -> bool {
        match event {
            Event::Problem { what, reason: Some(reason) } => {
                log::error!("{what}: {reason}");
                self.problems.insert(what, reason);
                false
            }
            Event::Problem { what, reason: None } => {
                if self.problems.remove(&what).is_some() {
                    log::info!("{what}: problem resolved");
                }
                false
            }
            Event::Relisting(kind) => {
                log::info!("relisting {}s", kind.name());
                self.store.apply(Event::Relisting(kind))
            }
            other => {
                let change = Observer::before(&other);
                let changed = self.store.apply(other);
                self.observer.after(change, changed, &self.store);
                self.watch_gate();
                changed
            }
        }
    }

    /// Log the relist gate opening and closing; start its time limit.
    fn watch_gate(&mut self) {
        match (self.store.held(), self.holding_since) {
            (0, Some(since)) => {
                log::info!(
                    "EndpointSlice relist complete after {} ms; held Services released",
                    since.elapsed().as_millis()
                );
                self.holding_since = None;
            }
            (0, None) | (_, Some(_)) => {}
            (n, None) => {
                log::info!("holding {n} new Services until the EndpointSlice relist is complete");
                self.holding_since = Some(Instant::now());
            }
        }
    }

    /// When held Services are let in whatever the slices' relist does.
    fn hold_deadline(&self) -> Option<Instant> {
        self.holding_since.map(|since| since + RELIST_HOLD_LIMIT)
    }

    /// The hold limit passed: program the held Services without waiting.
    fn release_held(&mut self) -> bool {
        let n = self.store.release_held();
        log::warn!(
            "the EndpointSlice relist did not complete within {} s; programming {n} held Services anyway",
            RELIST_HOLD_LIMIT.as_secs()
        );
        self.holding_since = None;
        n > 0
    }

    /// Model, diff and apply what changed; log what happened.
    fn sync(&mut self, config: &model::Config) -> Report {
        let started = Instant::now();
        let dirty = if self.full { crate::store::Dirty::All } else { self.store.take_dirty() };
        if self.full {
            self.store.take_dirty();
        }
        let update = self.model.update(&self.store, &dirty, config);
        self.log_rejected(&update.rejected);
        self.log_warnings(&update.warnings);
        let desired = &self.model.desired;
        let report = if self.full {
            sync::sync(&mut self.maps, &mut self.programmed, desired)
        } else {
            sync::sync_dirty(&mut self.maps, &mut self.programmed, desired, &update.dirty)
        };
        self.full = !report.errors.is_empty();
        for e in &report.errors {
            log::error!("not programmed: {e}");
        }
        self.generation += 1;
        let outcome = SyncOutcome {
            took: started.elapsed(),
            full: dirty == crate::store::Dirty::All,
            errors: report.errors.len(),
        };
        let counts = (self.rejected.len(), self.problems.len());
        self.observer.synced(started, &outcome, &self.programmed, &self.model.desired, counts);
        log::info!(
            "synced generation={} frontends={} recomputed={} upserted={} removed={} ops={} rejected={} errors={} took={:?}",
            self.generation,
            self.programmed.frontends.len(),
            update.recomputed,
            report.upserted,
            report.removed,
            report.ops,
            update.rejected.len(),
            report.errors.len(),
            started.elapsed()
        );
        report
    }

    /// Log a rejection when it appears and when it goes, not on every sync.
    fn log_rejected(&mut self, rejected: &[model::Rejected]) {
        let now: BTreeSet<String> = rejected.iter().map(ToString::to_string).collect();
        for r in now.difference(&self.rejected) {
            log::error!("rejected {r}");
        }
        for r in self.rejected.difference(&now) {
            log::info!("no longer rejected: {r}");
        }
        self.rejected = now;
    }

    /// Log a warning when it appears, not on every sync.
    fn log_warnings(&mut self, warnings: &[model::Warning]) {
        let now: BTreeSet<String> = warnings.iter().map(ToString::to_string).collect();
        for w in now.difference(&self.warnings) {
            log::warn!("{w}");
        }
        self.warnings = now;
    }
}

/// The model's settings with the host facts it needs (interface
/// addresses, and the API server's address when the agent follows the
/// API); the flags left unset are named once.
async fn model_config(cfg: &RunConfig) -> anyhow::Result<model::Config> {
    for w in model::startup_warnings(&cfg.model) {
        log::warn!("{w}");
    }
    let ifs = host::interface_addresses()?;
    let api_servers = match &cfg.source {
        SourceConfig::Kube(opts) => source::kube::api_server_addresses(opts).await?,
        SourceConfig::Manifests(_) => Vec::new(),
    };
    let host = model::HostAddresses { interfaces: ifs.addresses, broadcasts: ifs.broadcasts, api_servers };
    log::info!(
        "no Service may claim this node's {} interface addresses{}",
        host.interfaces.len(),
        if host.api_servers.is_empty() {
            String::new()
        } else {
            format!(" or the API server's {:?}", host.api_servers)
        }
    );
    Ok(model::Config { host, ..cfg.model.clone() })
}

/// Re-read the interface addresses; true when they changed (every
/// Service is then checked again).
fn refresh_interfaces(host: &mut model::HostAddresses) -> BTreeSet<std::net::IpAddr> {
    match host::interface_addresses() {
        Ok(ifs) => {
            let before: BTreeSet<_> = host.interfaces.iter().chain(&host.broadcasts).copied().collect();
            let after: BTreeSet<_> = ifs.addresses.iter().chain(&ifs.broadcasts).copied().collect();
            host.interfaces = ifs.addresses;
            host.broadcasts = ifs.broadcasts;
            before.symmetric_difference(&after).copied().collect()
        }
        Err(e) => {
            log::error!("{e}");
            BTreeSet::new()
        }
    }
}

/// Load (or reuse) the pinned datapath, write its settings, read back what
/// a previous run programmed.
fn load_datapath(cfg: &RunConfig) -> anyhow::Result<(aya::Ebpf, Maps, Programmed)> {
    let (mut ebpf, mut maps) = attach::load(&cfg.pin_dir, &cfg.capacities)?;
    // Host clients are the ones in this network namespace.
    let host_netns_cookie = cgroup::netns_cookie().context("reading this network namespace's cookie")?;
    maps.set_config(&proxy_common::DatapathConfig { host_netns_cookie, ..cfg.datapath })?;
    let programmed = maps.read_back().context("reading pinned state back")?;
    // Before any program of this version is attached: the frontends a
    // previous run programmed are looked up only once their filter bits
    // are set.
    maps.rebuild_filter(&programmed).context("writing the frontend-address filter")?;
    for (name, verified, xlated) in attach::program_sizes(&mut ebpf)? {
        log::info!("program {name}: {verified} instructions verified, {xlated} after translation");
    }
    log::info!(
        "datapath loaded, pins at {}; restored {} frontends from pinned maps",
        cfg.pin_dir.display(),
        programmed.frontends.len()
    );
    Ok((ebpf, maps, programmed))
}

type Loaded = (aya::Ebpf, Maps, Programmed);

/// Load the datapath (the verifier's work) on a thread of its own, so it
/// overlaps the source's reading of the initial state.
fn load_in_background(cfg: &RunConfig) -> anyhow::Result<tokio::sync::oneshot::Receiver<anyhow::Result<Loaded>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cfg = cfg.clone();
    std::thread::Builder::new()
        .name("load".into())
        .spawn(move || tx.send(load_datapath(&cfg)))
        .context("starting the datapath loader")?;
    Ok(rx)
}

/// Wait for both the source's complete initial state (its events, up to
/// `Synced`) and the datapath; a failed load ends the wait at once.
async fn initial_state(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    mut loading: tokio::sync::oneshot::Receiver<anyhow::Result<Loaded>>,
) -> anyhow::Result<(Vec<Event>, Loaded)> {
    let (mut events, mut synced, mut datapath) = (Vec::new(), false, None);
    while !synced || datapath.is_none() {
        tokio::select! {
            event = rx.recv(), if !synced => {
                match event.context("the source ended before its initial state was complete")? {
                    Event::Synced => synced = true,
                    event => events.push(event),
                }
            }
            done = &mut loading, if datapath.is_none() => {
                datapath = Some(done.context("the datapath loader ended without an answer")??);
            }
        }
    }
    Ok((events, datapath.expect("the loop waits for the datapath")))
}

/// `dsproxy run`.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    // What can fail without touching the kernel fails first.
    source::preflight(&cfg.source)?;
    privileges::check("dsproxy run", &privileges::RUN)?;
    attach::check_bpffs(&cfg.pin_dir)?;
    let cgroup_dir = cgroup::resolve(&cfg.cgroup)?;
    let listeners = Listeners::bind(cfg.healthz_bind, cfg.metrics_bind).await?;
    let mut model_cfg = model_config(&cfg).await?;
    let loading = load_in_background(&cfg)?;
    // /metrics reads the kernel's counters through a handle of its own.
    let scrape = cfg.metrics_bind.map(|_| metrics::Datapath::default());
    let node_required = matches!(cfg.source, SourceConfig::Kube(_));
    let observer = Observer::start(listeners, cfg.sync_period, node_required, scrape.clone());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let _source = source::start(&cfg.source, tx).await?;
    // The first sync runs on the complete source, before anything is
    // attached or pruned, so a restart never shrinks a backend set.
    log::info!("waiting for the complete initial state of the source");
    let (initial, (mut ebpf, maps, programmed)) = initial_state(&mut rx, loading).await?;
    if let Some(scrape) = &scrape {
        scrape.set(Maps::open_pinned(&cfg.pin_dir.join("maps"))?);
    }
    let mut agent = Agent {
        maps,
        programmed,
        store: Store::default(),
        model: model::Cache::default(),
        full: true,
        generation: 0,
        rejected: BTreeSet::new(),
        warnings: BTreeSet::new(),
        problems: BTreeMap::new(),
        observer,
        holding_since: None,
    };
    for event in initial {
        agent.take(event);
    }
    let first = agent.sync(&model_cfg);

    let mut attached = Vec::new();
    attach_all(&mut ebpf, &mut agent.maps, &cfg, cgroup_dir.as_deref(), &mut attached)?;

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(cfg.poll_interval);
    let mut last_sync = Instant::now();
    let mut pending = false;
    // A sync that failed is tried again after --sync-period.
    let mut retry = (!first.errors.is_empty()).then(|| Instant::now() + cfg.sync_period);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            event = rx.recv() => match event {
                Some(event) => {
                    pending |= agent.take(event);
                    // Take everything already queued before syncing.
                    while let Ok(event) = rx.try_recv() {
                        pending |= agent.take(event);
                    }
                }
                None => anyhow::bail!("the source stopped"),
            },
            () = sleep_until(retry), if retry.is_some() => {
                retry = None;
                pending = true;
            }
            () = sleep_until(agent.hold_deadline()), if agent.hold_deadline().is_some() => {
                pending |= agent.release_held();
            }
            _ = tick.tick() => {
                if let Err(e) = reattach(&mut ebpf, &mut agent.maps, &cfg, &mut attached) {
                    log::error!("attaching: {e}");
                }
                // Only Services naming an address that came or went can
                // change their verdict.
                let changed = refresh_interfaces(&mut model_cfg.host);
                for name in model::services_naming(&agent.store, &changed) {
                    log::info!("interface addresses changed: checking Service {name} again");
                    agent.store.mark_service(&name);
                    pending = true;
                }
            }
        }
        if !pending {
            continue;
        }
        agent.observer.queued();
        // Coalesce: at most one sync per min_sync_period.
        if let Some(wait) = cfg.min_sync_period.checked_sub(last_sync.elapsed()) {
            tokio::time::sleep(wait).await;
            while let Ok(event) = rx.try_recv() {
                agent.take(event);
            }
        }
        pending = false;
        last_sync = Instant::now();
        let report = agent.sync(&model_cfg);
        retry = (!report.errors.is_empty()).then(|| Instant::now() + cfg.sync_period);
    }
    log::info!("exiting; the datapath stays attached (pins under {})", cfg.pin_dir.display());
    Ok(())
}

/// Wait until `at` (forever when `None`; the select! guard keeps it off).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// First attachment: the interfaces there are, and the socket programs.
fn attach_all(
    ebpf: &mut aya::Ebpf,
    maps: &mut Maps,
    cfg: &RunConfig,
    cgroup_dir: Option<&std::path::Path>,
    attached: &mut Vec<attach::Attached>,
) -> anyhow::Result<()> {
    reattach(ebpf, maps, cfg, attached).context("attaching the datapath")?;
    if attached.is_empty() {
        // Not an error: a node without pods yet. The interfaces are watched.
        log::info!("no interface matches ({}) yet; waiting for one", cfg.attach.describe());
    }
    attach_sockets(ebpf, cfg, cgroup_dir).context("attaching the socket programs")
}

/// Attach the socket programs to the cgroup (or say that they are off).
fn attach_sockets(ebpf: &mut aya::Ebpf, cfg: &RunConfig, dir: Option<&std::path::Path>) -> cgroup::Result<()> {
    let Some(dir) = dir else {
        log::warn!(
            "--cgroup none: no socket-level load balancing; processes in this network namespace reach no Service"
        );
        return Ok(());
    };
    let done = cgroup::attach(ebpf, &attach::cgroup_links_dir(&cfg.pin_dir), dir)?;
    let list: Vec<String> = done.iter().map(|(name, how)| format!("{name} {how:?}").to_lowercase()).collect();
    let who = if cfg.datapath.flags & proxy_common::config_flags::SOCKET_LB_PODS == 0 {
        "clients in this network namespace"
    } else {
        "clients in this network namespace and pods"
    };
    log::info!("socket-level load balancing on cgroup {} for {who} ({})", dir.display(), list.join(", "));
    Ok(())
}

/// Attach to interfaces that appeared since last time, let go of the ones
/// that are gone; log every change.
fn reattach(
    ebpf: &mut aya::Ebpf,
    maps: &mut Maps,
    cfg: &RunConfig,
    attached: &mut Vec<attach::Attached>,
) -> attach::Result<()> {
    let changes = attach::reconcile(ebpf, maps, &cfg.pin_dir, &cfg.attach, attached)?;
    for a in &changes.attached {
        log::info!("attached to {} (ifindex {}, {}; tcx ingress and egress)", a.name, a.ifindex, a.role.name());
    }
    for a in &changes.gone {
        log::info!("interface {} (ifindex {}) is gone; its links and pins are removed", a.name, a.ifindex);
    }
    for e in changes.errors {
        log::error!("{e}");
    }
    Ok(())
}
