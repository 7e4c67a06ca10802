//! dsproxy agent: a dual-stack Kubernetes service proxy on eBPF.
//!
//! Functional core, imperative shell:
//! - `source`: where Services, EndpointSlices and the Node come from (a
//!   manifest directory, or the Kubernetes API), handed over as changes;
//! - `store`: the objects, indexed by Service, and what changed;
//! - `types`: the plain types of frontends, settings and desired state;
//! - `model`: pure, the Kubernetes rules: objects -> desired frontends;
//! - `diff`: pure, desired vs programmed -> ordered map operations;
//! - `sync`: applies the operations, step by step, with roll-back;
//! - `maps`: the only code that touches the BPF maps;
//! - `attach`: loading, TCX attachment, pinning, clean-up;
//! - `cgroup`: the socket programs' cgroup attachment (socket-level load
//!   balancing for the node's own processes);
//! - `host`: this host's interface addresses (for the address policy);
//! - `agent`: the run loop tying them together;
//! - `config`: the configuration file, as flags;
//! - `privileges`: the capabilities each command needs, checked first;
//! - `http`, `health`, `metrics`: /healthz, /livez and /metrics as
//!   kube-proxy serves them; `service_health`: the healthCheckNodePorts;
//!   `observe`: what the run loop reports to them;
//! - `inspect`: the live datapath from the pinned maps, as text or JSON;
//!   `flows`: its conntrack entries; `explain`: what it would do with a
//!   packet, and why;
//! - `frames`, `testrun`, `rand` (feature `test-helpers`): crafted frames,
//!   BPF_PROG_TEST_RUN and a seeded generator for tests and benchmarks.
pub mod agent;
pub mod attach;
pub mod batch;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod diff;
pub mod explain;
pub mod filter;
pub mod flows;
#[cfg(any(test, feature = "test-helpers"))]
pub mod frames;
pub mod health;
pub mod host;
pub mod http;
pub mod inspect;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod observe;
pub mod privileges;
#[cfg(any(test, feature = "test-helpers"))]
pub mod rand;
pub mod service_health;
pub mod source;
pub mod store;
pub mod sync;
#[cfg(any(test, feature = "test-helpers"))]
pub mod testrun;
pub mod types;
