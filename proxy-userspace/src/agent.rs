//! The run loop: read the source, compute the desired state, sync the maps,
//! keep interfaces attached; exit on SIGINT/SIGTERM leaving the datapath
//! attached and pinned.
use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attach::{self, Capacities},
    diff::Programmed,
    kube_source::{self, KubeSource},
    maps::Maps,
    model, source,
    sync::{self, Report},
};

/// Where the agent reads Services and EndpointSlices from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests, watched for changes.
    Manifests(PathBuf),
    /// The Kubernetes API.
    Kube(kube_source::Options),
}

/// Settings of `dsproxy run`.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub attach: String,
    pub pin_dir: PathBuf,
    pub capacities: Capacities,
    /// Least time between two syncs (kube-proxy's `--min-sync-period`):
    /// changes arriving meanwhile are coalesced into the next one.
    pub min_sync_period: Duration,
    /// How often the source and the interfaces are checked for changes.
    pub poll_interval: Duration,
    pub model: model::Config,
}

/// The agent's state between syncs.
struct Agent {
    maps: Maps,
    programmed: Programmed,
    model: model::Cache,
    /// Look at every frontend and map entry next time (at start, and after
    /// a pass with errors); otherwise only at what changed.
    full: bool,
    generation: u64,
}

impl Agent {
    /// Model, diff and apply one snapshot; log what happened.
    fn sync(&mut self, snap: &source::Snapshot, config: &model::Config) -> Report {
        let started = Instant::now();
        let update = self.model.update(&snap.services, &snap.slices, config);
        let rejected = update.rejected;
        for r in &rejected {
            log::error!("rejected {r}");
        }
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
        log::info!(
            "synced generation={} frontends={} upserted={} removed={} ops={} rejected={} errors={} took={:?}",
            self.generation,
            self.programmed.frontends.len(),
            report.upserted,
            report.removed,
            report.ops,
            rejected.len(),
            report.errors.len(),
            started.elapsed()
        );
        report
    }
}

/// An open source.
enum Source {
    Dir { dir: source::ManifestDir, fingerprint: source::Fingerprint },
    Kube(KubeSource),
}

impl Source {
    /// Open the source and wait for its complete initial state.
    async fn open(cfg: &SourceConfig) -> anyhow::Result<Self> {
        match cfg {
            SourceConfig::Manifests(path) => {
                let dir = source::ManifestDir::new(path);
                let fingerprint = dir.fingerprint()?;
                Ok(Source::Dir { dir, fingerprint })
            }
            SourceConfig::Kube(opts) => {
                let kube = KubeSource::start(opts).await?;
                log::info!("waiting for the initial lists of Services, EndpointSlices and Node {}", opts.node_name);
                kube.wait_ready().await?;
                Ok(Source::Kube(kube))
            }
        }
    }

    /// The current objects. Errors name the objects that could not be read;
    /// `Err` means the source as a whole is unreadable right now.
    fn snapshot(&self) -> anyhow::Result<source::Snapshot> {
        let (snap, errors) = match self {
            Source::Dir { dir, .. } => {
                let (snap, errors) = dir.read()?;
                (snap, errors.iter().map(ToString::to_string).collect())
            }
            Source::Kube(kube) => kube.snapshot(),
        };
        for e in &errors {
            log::error!("source: {e}");
        }
        Ok(snap)
    }

    /// Polled sources: has anything changed since last time?
    fn poll(&mut self) -> bool {
        match self {
            Source::Dir { dir, fingerprint } => match dir.fingerprint() {
                Ok(fp) if fp != *fingerprint => {
                    *fingerprint = fp;
                    true
                }
                Ok(_) => false,
                Err(e) => {
                    log::error!("manifest directory: {e}");
                    false
                }
            },
            Source::Kube(_) => false,
        }
    }

    /// Event-driven sources: resolves on the next change.
    fn changed(&self) -> Option<Arc<tokio::sync::Notify>> {
        match self {
            Source::Dir { .. } => None,
            Source::Kube(kube) => Some(Arc::clone(&kube.changed)),
        }
    }
}

/// `dsproxy run`.
pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let (mut ebpf, maps) = attach::load(&cfg.pin_dir, &cfg.capacities)?;
    let programmed = maps.read_back().context("reading pinned state back")?;
    let (verified, xlated) = attach::program_size(&mut ebpf)?;
    log::info!("program {}: {verified} instructions verified, {xlated} after translation", proxy_common::PROGRAM_NAME);
    log::info!(
        "datapath loaded, pins at {}; restored {} frontends from pinned maps",
        cfg.pin_dir.display(),
        programmed.frontends.len()
    );
    let mut agent = Agent { maps, programmed, model: model::Cache::default(), full: true, generation: 0 };

    // The first sync runs on the complete source, before anything is
    // attached or pruned, so a restart never shrinks a backend set.
    let mut src = Source::open(&cfg.source).await?;
    let snap = src.snapshot()?;
    agent.sync(&snap, &cfg.model);

    let mut attached = Vec::new();
    attach_new(&mut ebpf, &cfg, &mut attached).context("attaching the datapath")?;

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(cfg.poll_interval);
    let notify = src.changed();
    let mut last_sync = Instant::now();
    let mut pending = false;
    loop {
        let changed = async {
            match &notify {
                Some(n) => n.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = changed => pending = true,
            _ = tick.tick() => {
                pending |= src.poll();
                if let Err(e) = attach_new(&mut ebpf, &cfg, &mut attached) {
                    log::error!("attaching: {e}");
                }
            }
        }
        if !pending {
            continue;
        }
        // Coalesce: at most one sync per min_sync_period.
        if let Some(wait) = cfg.min_sync_period.checked_sub(last_sync.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        pending = false;
        last_sync = Instant::now();
        match src.snapshot() {
            Ok(snap) => {
                agent.sync(&snap, &cfg.model);
            }
            // Keep what is programmed: an unreadable source is not an empty one.
            Err(e) => log::error!("source: {e:#}"),
        }
    }
    log::info!("exiting; the datapath stays attached (pins under {})", cfg.pin_dir.display());
    Ok(())
}

/// Attach to interfaces matching the glob that appeared since last time.
fn attach_new(ebpf: &mut aya::Ebpf, cfg: &RunConfig, attached: &mut Vec<String>) -> attach::Result<()> {
    // Forget interfaces that are gone, so a recreated one is attached again.
    let present = attach::interfaces()?;
    attached.retain(|i| present.contains(i));
    let (new, errors) = attach::attach_matching(ebpf, &cfg.pin_dir, &cfg.attach, attached)?;
    for iface in new {
        log::info!("attached to {iface} (tcx ingress)");
    }
    for e in errors {
        log::error!("{e}");
    }
    Ok(())
}
