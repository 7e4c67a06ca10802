//! `cargo xtask image`: a `FROM scratch` image of a static `dsproxy`, built
//! offline with buildah (no base image, no registry), then smoke-tested
//! inside the image with `buildah run --isolation chroot`.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The static agent: glibc's static libraries, `+crt-static`, for the
/// explicit host target so the flag reaches neither build scripts nor the
/// eBPF crate (which keeps its own profile and BTF).
const TARGET: &str = "x86_64-unknown-linux-gnu";
pub const DEFAULT_TAG: &str = "localhost/dsproxy:latest";
const BIN_IN_IMAGE: &str = "/usr/local/bin/dsproxy";

/// Build the static binary and return its path.
pub fn build_static() -> Result<PathBuf> {
    let out = super::cargo()
        .args(["build", "--release", "--target", TARGET, "--package", "proxy-userspace", "--bin", "dsproxy"])
        .arg("--message-format=json-render-diagnostics")
        .env(
            format!("CARGO_TARGET_{}_RUSTFLAGS", TARGET.to_uppercase().replace('-', "_")),
            "-C target-feature=+crt-static",
        )
        .stderr(Stdio::inherit())
        .output()
        .context("build the static dsproxy")?;
    if !out.status.success() {
        bail!("building the static dsproxy failed");
    }
    let bin = super::executable(&out.stdout, "dsproxy").context("cargo did not report the dsproxy executable")?;
    if !is_static(&bin)? {
        bail!(
            "{} is dynamically linked (it has an ELF interpreter); a FROM scratch image cannot run it",
            bin.display()
        );
    }
    Ok(bin)
}

/// The program header type of an ELF loader request.
const PT_INTERP: u32 = 3;

/// An ELF executable without a `PT_INTERP` program header needs no loader.
fn is_static(path: &Path) -> Result<bool> {
    let elf = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        bail!("{}: truncated ELF header", path.display());
    };
    let phoff = usize::try_from(phoff)?;
    for i in 0..usize::from(phnum) {
        let at = phoff + i * usize::from(phentsize);
        let kind = elf.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
        if kind == Some(PT_INTERP) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn buildah(args: &[&str]) -> Result<String> {
    let out = Command::new("buildah").args(args).output().with_context(|| format!("run buildah {args:?}"))?;
    if !out.status.success() {
        bail!("buildah {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A working container, removed on drop (also when a step fails).
struct Working(String);

impl Working {
    fn from(image: &str) -> Result<Self> {
        Ok(Self(buildah(&["from", "--pull-never", image])?))
    }

    /// `buildah run --isolation chroot` in it.
    fn run(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = Command::new("buildah")
            .args(["run", "--isolation", "chroot", &self.0, "--"])
            .args(args)
            .output()
            .context("buildah run")?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok((out.status.success(), text))
    }
}

impl Drop for Working {
    fn drop(&mut self) {
        let _ = Command::new("buildah").args(["rm", &self.0]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// Build the image `tag` from the static binary `bin`, smoke-test it, and
/// return its id.
pub fn build(bin: &Path, tag: &str, root: &Path) -> Result<String> {
    let version = env!("CARGO_PKG_VERSION");
    let staging = format!("localhost/dsproxy:staging-{}", std::process::id());
    let ctr = Working(buildah(&["from", "scratch"])?);
    buildah(&["copy", "--chmod", "0755", &ctr.0, &bin.to_string_lossy(), BIN_IN_IMAGE])?;
    let entrypoint = format!("[\"{BIN_IN_IMAGE}\"]");
    buildah(&[
        "config",
        "--entrypoint",
        &entrypoint,
        "--cmd",
        "run --config /etc/dsproxy/config.yaml",
        "--label",
        "org.opencontainers.image.title=dsproxy",
        "--label",
        &format!("org.opencontainers.image.version={version}"),
        "--label",
        "org.opencontainers.image.description=Dual-stack Kubernetes service proxy on eBPF",
        &ctr.0,
    ])?;
    buildah(&["commit", "--quiet", &ctr.0, &staging])?;
    drop(ctr);

    let result = smoke_test(&staging, root, version);
    if let Err(e) = result {
        let _ = buildah(&["rmi", &staging]);
        return Err(e.context(format!("smoke test of {staging}")));
    }
    // Move the tag; the image it named before goes if nothing else uses it.
    let previous = buildah(&["images", "--quiet", "--no-trunc", tag]).ok();
    buildah(&["tag", &staging, tag])?;
    buildah(&["rmi", &staging])?;
    let id = buildah(&["images", "--quiet", "--no-trunc", tag])?;
    if let Some(old) = previous.filter(|p| !p.is_empty() && *p != id) {
        let _ = buildah(&["rmi", &old]);
    }
    Ok(id)
}

/// Inside the image: the binary runs, and checks the example manifests
/// (and refuses a broken one, so the check is known to look).
fn smoke_test(image: &str, root: &Path, version: &str) -> Result<()> {
    let t = Working::from(image)?;
    let (ok, out) = t.run(&[BIN_IN_IMAGE, "--version"])?;
    println!("image: dsproxy --version: {}", out.trim());
    if !ok || out.trim() != format!("dsproxy {version}") {
        bail!("`dsproxy --version` in the image printed {out:?}");
    }
    let examples = root.join("docs/examples");
    buildah(&["copy", &t.0, &examples.to_string_lossy(), "/examples"])?;
    let (ok, out) = t.run(&[BIN_IN_IMAGE, "check", "--manifests", "/examples"])?;
    println!("image: dsproxy check --manifests /examples:\n{}", out.trim_end());
    if !ok || !out.contains("shop/web:http") || !out.contains("[fd00:ffff::a]:80/TCP") {
        bail!("`dsproxy check` in the image did not program the example Service: {out}");
    }
    let broken = std::env::temp_dir().join(format!("dsproxy-image-broken-{}", std::process::id()));
    std::fs::create_dir_all(&broken)?;
    std::fs::write(
        broken.join("bad.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: 5}\n",
    )?;
    let copied = buildah(&["copy", &t.0, &broken.to_string_lossy(), "/broken"]);
    let _ = std::fs::remove_dir_all(&broken);
    copied?;
    let (ok, out) = t.run(&[BIN_IN_IMAGE, "check", "--manifests", "/broken"])?;
    if ok || !out.contains("bad") {
        bail!("`dsproxy check` in the image accepted a broken manifest: {out}");
    }
    Ok(())
}

/// The image's size, as buildah reports it.
pub fn size(tag: &str) -> Result<String> {
    buildah(&["images", "--format", "{{.Size}}", tag])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_is_told_from_a_static_one() {
        // This test binary is dynamically linked (the default target).
        let me = std::env::current_exe().expect("test binary");
        assert!(!is_static(&me).expect("read ELF"));
    }
}
