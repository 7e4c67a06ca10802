//! dsproxy agent: a dual-stack Kubernetes service proxy on eBPF.
//!
//! Functional core, imperative shell:
//! - `source`, `kube_source`: where Services and EndpointSlices come from
//!   (a manifest directory, or the Kubernetes API);
//! - `model`: pure, objects -> desired frontends and backends;
//! - `diff`: pure, desired vs programmed -> ordered map operations;
//! - `sync`: applies the operations, step by step, with roll-back;
//! - `maps`: the only code that touches the BPF maps;
//! - `attach`: loading, TCX attachment, pinning, clean-up;
//! - `agent`: the run loop tying them together.
pub mod agent;
pub mod attach;
pub mod cli;
pub mod diff;
pub mod frames;
pub mod maps;
pub mod model;
pub mod rand;
pub mod source;
pub mod store;
pub mod sync;
pub mod testrun;
pub mod types;
