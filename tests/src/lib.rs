//! Test harness for dsproxy: network namespaces, veth topologies, the agent
//! as a process, echo backends and clients over real sockets. Used by the
//! integration tests in `tests/` and by `cargo xtask demo`.
//!
//! Safety rule: every address is in 198.18.0.0/15 or fd00::/8, every packet
//! stays inside namespaces made here, and every namespace, mount and pin is
//! removed by a guard's `Drop`, also when a test fails.
pub mod agent;
pub mod cgroup;
pub mod echo;
pub mod fakeapi;
pub mod fuzz;
pub mod http;
pub mod manifests;
pub mod netns;
pub mod packet;
pub mod probe;
pub mod sockclient;
pub mod topo;

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use agent::Agent;
use echo::Backend;
use netns::BpfFs;
use topo::Topology;

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(netns::unique(prefix));
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One node with pods, the agent and its manifests. Field order is drop
/// order: agent (unpins), servers, bpffs, namespaces, files.
pub struct Cluster {
    pub agent: Option<Agent>,
    pub servers: Vec<Backend>,
    pub bpf: BpfFs,
    pub topo: Topology,
    pub manifests: TempDir,
    pub bin: PathBuf,
}

impl Cluster {
    /// `bin` is the dsproxy binary to run.
    pub fn new(bin: &Path) -> Self {
        Self::with_profile(bin, topo::Profile::Clean)
    }

    /// A node dressed as `profile` says.
    pub fn with_profile(bin: &Path, profile: topo::Profile) -> Self {
        netns::require_root();
        assert!(bin.exists(), "agent binary {} does not exist", bin.display());
        Self {
            agent: None,
            servers: Vec::new(),
            bpf: BpfFs::new(),
            topo: Topology::with_profile(profile),
            manifests: TempDir::new("dsproxy-manifests-"),
            bin: bin.to_owned(),
        }
    }

    /// Add a client pod; returns its index.
    pub fn client(&mut self) -> usize {
        self.topo.add_pod("cli", false)
    }

    /// Add a backend pod named `name` serving TCP and UDP on `port` on both
    /// of its addresses; `remote` puts it behind the second node.
    pub fn backend(&mut self, name: &str, port: u16, remote: bool) -> usize {
        let i = self.topo.add_pod(name, remote);
        let pod = &self.topo.pods[i];
        for v6 in [false, true] {
            let addr = SocketAddr::new(pod.addr(v6), port);
            self.servers.push(Backend::start(&pod.ns, name, addr));
        }
        i
    }

    pub fn addr(&self, pod: usize, v6: bool) -> IpAddr {
        self.topo.pods[pod].addr(v6)
    }

    /// Write `text` to the manifest file `name`, atomically (the agent never
    /// sees half a file).
    pub fn write(&self, name: &str, text: &str) {
        let tmp = self.manifests.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write manifest");
        std::fs::rename(&tmp, self.manifests.0.join(name)).expect("rename manifest");
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.manifests.0.join(name)).expect("remove manifest");
    }

    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Start the agent on the Kubernetes API described by `kubeconfig`.
    pub fn start_kube_agent(&mut self, kubeconfig: &Path, node_name: &str) {
        self.start_kube_agent_with(kubeconfig, node_name, &[]);
    }

    pub fn start_kube_agent_with(&mut self, kubeconfig: &Path, node_name: &str, extra: &[&str]) {
        assert!(self.agent.is_none(), "agent already running");
        let pin_dir = self.bpf.pin_dir();
        self.agent = Some(Agent::start_kube_with(&self.bin, &self.topo.node, kubeconfig, node_name, &pin_dir, extra));
    }

    /// Start the agent run by `wrapper` (which execs it in place).
    pub fn start_agent_wrapped(&mut self, wrapper: &[&str], extra: &[&str]) {
        assert!(self.agent.is_none(), "agent already running");
        let (node, dir, pin_dir) = (&self.topo.node, &self.manifests.0, self.bpf.pin_dir());
        self.agent = Some(Agent::start_wrapped(wrapper, &self.bin, node, dir, &pin_dir, extra));
    }

    pub fn start_agent_with(&mut self, extra: &[&str]) {
        self.start_agent_wrapped(&[], extra);
    }

    /// Stop the agent as a restart would: SIGTERM, pins left in place.
    pub fn stop_agent(&mut self) {
        if let Some(a) = self.agent.take() {
            a.stop();
        }
    }

    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    /// Run `change` (typically a manifest write) and wait for the agent to
    /// sync it.
    pub fn change_and_sync(&self, change: impl FnOnce()) -> String {
        let g = self.agent().generation();
        change();
        self.agent().wait_for_sync_after(g, Duration::from_secs(10))
    }

    /// A datapath counter, summed over families and CPUs, read from the
    /// agent's pinned maps.
    pub fn stat(&self, stat: proxy_common::Stat) -> u64 {
        let maps = dsproxy::maps::Maps::open_pinned(&self.bpf.pin_dir().join("maps")).expect("open pinned maps");
        maps.stat(stat).expect("read counters")
    }

    /// Every non-zero datapath counter, one per line, for failure messages.
    pub fn stats_dump(&self) -> String {
        let maps = dsproxy::maps::Maps::open_pinned(&self.bpf.pin_dir().join("maps")).expect("open pinned maps");
        let stats = maps.stats().expect("read counters");
        let mut out = String::new();
        for (slot, stat, n) in stats.iter().filter(|(_, _, n)| *n > 0) {
            let _ = writeln!(out, "{slot:?} {stat:?} {n}");
        }
        out
    }

    /// Run `f` in the namespace of pod `i`.
    pub fn in_pod<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.topo.pods[i].ns.run(f)
    }
}
