//! The `dsproxy` command line.
use std::{path::PathBuf, time::Duration};

use crate::{
    agent::{self, RunConfig},
    attach::{self, Capacities},
    maps::Maps,
    model,
    source::{self, SourceConfig, kube, manifests},
};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use proxy_common::capacity;

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/dsproxy";

#[derive(Parser)]
#[command(name = "dsproxy", version, about = "Dual-stack Kubernetes service proxy on eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program and attach the datapath, then follow the source until SIGINT/SIGTERM.
    Run {
        /// Directory of Service and EndpointSlice manifests (YAML/JSON), watched
        /// live. Without it the agent follows the Kubernetes API.
        #[arg(long, conflicts_with = "kubeconfig")]
        manifests: Option<PathBuf>,
        /// Kubeconfig for the API server; without it (and without
        /// --manifests) the in-cluster configuration is used.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// This node's name (default: the hostname).
        #[arg(long)]
        node_name: Option<String>,
        /// Interfaces to attach to (shell glob; commas separate alternatives).
        #[arg(long)]
        attach: String,
        /// bpffs directory for pinned maps and links.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// Least time between two syncs, in milliseconds.
        #[arg(long, default_value_t = 100)]
        min_sync_period_ms: u64,
        /// How often to look for interface changes (and to poll the manifest
        /// directory where inotify is not available), in milliseconds.
        #[arg(long, default_value_t = 200)]
        poll_interval_ms: u64,
        /// Handle only Services labelled service.kubernetes.io/service-proxy-name=NAME.
        #[arg(long)]
        service_proxy_name: Option<String>,
        /// Service map entries per family (frontends plus backend slots).
        #[arg(long, default_value_t = capacity::SVC)]
        svc_capacity: u32,
        /// Backends per family.
        #[arg(long, default_value_t = capacity::BACKEND)]
        backend_capacity: u32,
        /// Frontends (reverse-NAT entries) per family.
        #[arg(long, default_value_t = capacity::REVNAT)]
        revnat_capacity: u32,
        /// Conntrack entries per family (two per connection).
        #[arg(long, default_value_t = capacity::CT)]
        ct_capacity: u32,
    },
    /// Load the datapath, pin its maps, attach it to every interface matching
    /// GLOB, print the verifier's figures and exit (the datapath stays).
    Load {
        #[arg(long)]
        attach: String,
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach and unpin everything under the pin directory (like kube-proxy --cleanup).
    Cleanup {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Print the programmed frontends and the datapath counters.
    Status {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Validate manifests and print the frontends they would program; touches no kernel state.
    Check {
        #[arg(long)]
        manifests: PathBuf,
    },
}

/// Parse the command line and run it.
pub fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Run {
            manifests,
            kubeconfig,
            node_name,
            attach,
            pin_dir,
            min_sync_period_ms,
            poll_interval_ms,
            service_proxy_name,
            svc_capacity,
            backend_capacity,
            revnat_capacity,
            ct_capacity,
        } => {
            let poll_interval = Duration::from_millis(poll_interval_ms.max(10));
            let node_name = node_name.unwrap_or_else(hostname);
            let source = match manifests {
                Some(dir) => {
                    SourceConfig::Manifests(manifests::Options { dir, node_name: Some(node_name), poll_interval })
                }
                None => SourceConfig::Kube(kube::Options {
                    kubeconfig,
                    node_name,
                    service_proxy_name: service_proxy_name.clone(),
                }),
            };
            let cfg = RunConfig {
                source,
                attach,
                pin_dir,
                capacities: Capacities {
                    svc: svc_capacity,
                    backend: backend_capacity,
                    revnat: revnat_capacity,
                    ct: ct_capacity,
                },
                min_sync_period: Duration::from_millis(min_sync_period_ms),
                poll_interval,
                model: model::Config { service_proxy_name },
                datapath: proxy_common::DatapathConfig::DEFAULT,
            };
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(agent::run(cfg))
        }
        Command::Load { attach, pin_dir } => {
            let (mut ebpf, _maps) = attach::load(&pin_dir, &Capacities::default())?;
            let (verified, xlated) = attach::program_size(&mut ebpf)?;
            println!(
                "program {}: {verified} instructions verified, {xlated} instructions after translation",
                proxy_common::PROGRAM_NAME
            );
            let (new, errors) = attach::attach_matching(&mut ebpf, &pin_dir, &attach, &mut Vec::new())?;
            for e in &errors {
                eprintln!("error: {e}");
            }
            println!("attached to {} (tcx ingress); maps and links pinned under {}", new.join(", "), pin_dir.display());
            if errors.is_empty() { Ok(()) } else { anyhow::bail!("{} interfaces failed", errors.len()) }
        }
        Command::Cleanup { pin_dir } => {
            let removed = attach::cleanup(&pin_dir)?;
            println!("removed {} pins under {}", removed.len(), pin_dir.display());
            Ok(())
        }
        Command::Status { pin_dir } => status(&pin_dir),
        Command::Check { manifests } => check(&manifests),
    }
}

/// The kernel's hostname: kube-proxy's default node name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

fn status(pin_dir: &std::path::Path) -> anyhow::Result<()> {
    let maps = Maps::open_pinned(&pin_dir.join("maps")).context("is the datapath loaded?")?;
    let prog = maps.read_back()?;
    for (frontend, value) in &prog.frontends {
        let backends = prog.active_backends(frontend).unwrap_or_default();
        let list: Vec<String> = backends.iter().map(ToString::to_string).collect();
        println!("{frontend} rev_nat={} -> [{}]", value.rev_nat_id, list.join(", "));
    }
    for (stat, n) in maps.stats()? {
        println!("{:<20} {n}", stat.name());
    }
    Ok(())
}

fn check(dir: &std::path::Path) -> anyhow::Result<()> {
    let opts = manifests::Options { dir: dir.to_owned(), node_name: None, poll_interval: Duration::from_secs(1) };
    manifests::preflight(&opts)?;
    let mut store = crate::store::Store::default();
    let mut errors = Vec::new();
    for event in manifests::Dir::new(&opts).initial() {
        match event {
            source::Event::Problem { what, reason: Some(reason) } => errors.push(format!("{what}: {reason}")),
            other => {
                store.apply(other);
            }
        }
    }
    let mut cache = model::Cache::default();
    let update = cache.update(&store, &crate::store::Dirty::All, &model::Config::default());
    for (frontend, spec) in &cache.desired.frontends {
        let list: Vec<String> = spec.backends.iter().map(ToString::to_string).collect();
        println!("{frontend} ({}) -> [{}]", spec.owner, list.join(", "));
    }
    for e in &errors {
        println!("error: {e}");
    }
    for r in &update.rejected {
        println!("rejected: {r}");
    }
    if errors.is_empty() && update.rejected.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("{} errors", errors.len() + update.rejected.len())
    }
}
