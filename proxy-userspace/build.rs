//! Builds the eBPF datapath (`proxy-ebpf`, nightly, bpfel-unknown-none) with
//! aya-build; `attach.rs` embeds the object from OUT_DIR.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "proxy-ebpf")
        .ok_or_else(|| anyhow!("proxy-ebpf package not found"))?;
    let root_dir =
        ebpf.manifest_path.parent().ok_or_else(|| anyhow!("proxy-ebpf manifest has no parent"))?.as_str().to_owned();
    aya_build::build_ebpf(
        [Package { name: "proxy-ebpf", root_dir: &root_dir, ..Default::default() }],
        Toolchain::default(),
    )
    .context("building the eBPF datapath: run `cargo xtask setup` if the nightly toolchain, rust-src or bpf-linker is missing")
}
