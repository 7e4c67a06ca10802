//! `cargo xtask`: set-up, build, test, demo and bench for dsproxy.
//!
//! xtask depends on nothing of the project, so it builds on a fresh machine
//! before the eBPF toolchain exists; `setup` then installs what is missing.
use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod image;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (idempotent).
    Setup,
    /// Build the eBPF object and print its path.
    BuildEbpf,
    /// Build, load, attach to every interface matching GLOB in the current
    /// network namespace, and pin maps and links.
    BuildAndLoad {
        #[arg(long)]
        attach: String,
        #[arg(long, default_value = "/sys/fs/bpf/dsproxy")]
        pin_dir: PathBuf,
    },
    /// `cargo fmt --check`, then clippy twice (as aya-template's CI does):
    /// the workspace, then the eBPF crate with `-C panic=abort`.
    Lint,
    /// Unit tests, BPF_PROG_TEST_RUN packet tests and network-namespace tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`: test filters).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A dual-stack Service end to end in throw-away namespaces, with a transcript.
    Demo,
    /// The datapath fuzzer: generated and mutated frames through the real
    /// programs (BPF_PROG_TEST_RUN), each checked against a reference model.
    Fuzz {
        /// Frames to run.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// The run's seed (decimal or 0x-hex); a fresh one is drawn and
        /// printed when absent.
        #[arg(long)]
        seed: Option<String>,
        /// Replay one epoch of a run (each epoch starts from an empty
        /// datapath, with a seed derived from the run's).
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// A FROM scratch image of a static dsproxy, built offline with buildah
    /// and smoke-tested inside (part of `test`).
    Image {
        #[arg(long, default_value = image::DEFAULT_TAG)]
        tag: String,
    },
    /// Benchmarks against kube-proxy-style iptables and nftables rulesets;
    /// results, report and plots under target/bench/<run>/.
    Bench {
        /// A shorter run (under 3 minutes).
        #[arg(long)]
        quick: bool,
        /// Run one part alone and print it: datapath, e2e, socklb, control or reliability.
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => {
            setup()?;
            let obj = build_ebpf()?;
            println!("{}", obj.display());
            Ok(())
        }
        Cmd::BuildAndLoad { attach, pin_dir } => {
            setup()?;
            let bin = build_bin("proxy-userspace", "dsproxy", false)?;
            run(Command::new(bin).arg("load").arg("--attach").arg(attach).arg("--pin-dir").arg(pin_dir))
        }
        Cmd::Lint => lint(),
        Cmd::Test { args } => {
            setup()?;
            let mut cmd = cargo();
            // The default members: everything but the eBPF crate, which only
            // builds for the BPF target.
            cmd.args(["test", "--no-fail-fast"]);
            cmd.env("DSPROXY_KUBERNETES_VALIDATE", kubernetes_validate()?);
            let filtered = !args.is_empty();
            if filtered {
                cmd.arg("--").args(args);
            }
            run_tests(&mut cmd)?;
            if filtered {
                println!("image: not built (a test filter was given); `cargo xtask image` builds and checks it");
                return Ok(());
            }
            build_image(image::DEFAULT_TAG)
        }
        Cmd::Image { tag } => {
            setup()?;
            build_image(&tag)
        }
        Cmd::Bench { quick, only } => {
            setup()?;
            let agent = build_bin("proxy-userspace", "dsproxy", true)?;
            let bench = build_bin("dsproxy-bench", "dsproxy-bench", true)?;
            let mut cmd = Command::new(bench);
            let out = target_dir()?.join("bench").join(run_name(quick));
            cmd.arg("--agent").arg(agent).arg("--out").arg(&out);
            if quick {
                cmd.arg("--quick");
            }
            if let Some(part) = only {
                cmd.arg("--only").arg(part);
            }
            run(&mut cmd)
        }
        Cmd::Fuzz { frames, seed, epoch } => {
            setup()?;
            let fuzz = build_bin("dsproxy-tests", "dsproxy-fuzz", false)?;
            let mut cmd = Command::new(fuzz);
            cmd.arg("--frames").arg(frames.to_string());
            if let Some(seed) = seed {
                cmd.arg("--seed").arg(seed);
            }
            if let Some(epoch) = epoch {
                cmd.arg("--epoch").arg(epoch.to_string());
            }
            run(&mut cmd)
        }
        Cmd::Demo => {
            setup()?;
            let agent = build_bin("proxy-userspace", "dsproxy", false)?;
            let demo = build_bin("dsproxy-tests", "dsproxy-demo", false)?;
            run(Command::new(demo).arg("--agent").arg(agent))
        }
    }
}

/// The static agent in a FROM scratch image, smoke-tested; buildah comes
/// from Debian (no registry is needed: the image has no base).
fn build_image(tag: &str) -> Result<()> {
    if !have("buildah") {
        apt_install(&["buildah"]).context("buildah is needed for the image and could not be installed")?;
    }
    let bin = image::build_static()?;
    let size = std::fs::metadata(&bin)?.len();
    println!("image: static dsproxy {} ({} KiB)", bin.display(), size / 1024);
    let id = image::build(&bin, tag, &workspace_root())?;
    println!("image: {tag} {id} ({}), smoke test passed", image::size(tag).unwrap_or_default());
    Ok(())
}

/// `cargo fmt --check` and clippy on every crate, warnings denied.
fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
        "--",
        "--deny",
        "warnings",
    ]))?;
    // The eBPF crate for the host, as aya-template's CI checks it: the
    // verifier-facing code gets the same lints as the rest.
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "clippy", "--package", "proxy-ebpf", "--all-targets"])
        .args(["--", "--deny", "warnings", "-C", "panic=abort", "-Zpanic_abort_tests"]))
}

/// The cargo target directory, as cargo reports it.
fn target_dir() -> Result<PathBuf> {
    let out = cargo().args(["metadata", "--format-version", "1", "--no-deps"]).output().context("cargo metadata")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text.find("\"target_directory\":\"").context("no target_directory in cargo metadata")? + 20;
    let end = start + text[start..].find('"').context("unterminated target_directory")?;
    Ok(PathBuf::from(&text[start..end]))
}

/// A name for a bench run: its UTC time and size.
fn run_name(quick: bool) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{secs}-{}", if quick { "quick" } else { "full" })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

/// `~/.cargo/bin`, where `cargo install` puts bpf-linker.
fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// PATH with `~/.cargo/bin` first, for every child process.
fn path_env() -> OsString {
    let mut paths = vec![cargo_bin_dir()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("valid PATH")
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.env("PATH", path_env());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.env("PATH", path_env()).status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Run `cargo test`, passing its output through, and close with one
/// summary line over every test binary: `N passed, M failed`.
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd.env("PATH", path_env()).stdout(Stdio::piped()).spawn().context("spawn cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word).map(|n| {
                            n.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").parse().unwrap_or(0)
                        })
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.env("PATH", path_env()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn have(program: &str) -> bool {
    env::split_paths(&path_env()).any(|d| d.join(program).is_file())
}

/// Install Debian packages, running `apt-get update` first.
fn apt_install(packages: &[&str]) -> Result<()> {
    println!("setup: installing {} (apt-get)", packages.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

fn setup() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { geteuid() } != 0 {
        bail!("dsproxy's set-up and tests need root (package installs, BPF, network namespaces)");
    }
    // The eBPF crate builds with the nightly toolchain and its rust-src.
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        bail!("the nightly toolchain is missing: `rustup toolchain install nightly` (the eBPF crate needs it)");
    }
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output()?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        println!("setup: adding rust-src to the nightly toolchain");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    let mut missing: Vec<&str> = Vec::new();
    // The tests dress nodes as real ones are (kube-proxy's rules in three
    // firewalls, a masquerade) and the bench compares against rulesets.
    for (program, package) in [
        ("ip", "iproute2"),
        ("sysctl", "procps"),
        ("mount", "mount"),
        ("setpriv", "util-linux"),
        ("python3", "python3"),
        ("iptables-legacy", "iptables"),
        ("nft", "nftables"),
        ("conntrack", "conntrack"),
    ] {
        if !have(program) {
            missing.push(package);
        }
    }
    if !have("bpf-linker") && !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        missing.push("llvm-22-dev");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    if !have("bpf-linker") {
        println!("setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes)");
        let mut path = vec![Path::new(LLVM_PREFIX).join("bin")];
        path.extend(env::split_paths(&path_env()));
        run(cargo()
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", env::join_paths(path)?))?;
    }
    install_kubernetes_validate()?;
    if !is_bpffs("/sys/fs/bpf") {
        println!("setup: mounting bpffs on /sys/fs/bpf");
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    Ok(())
}

/// kubernetes-validate (PyPI) validates deploy/ offline; it lives in a
/// virtualenv under the target directory, out of the system's Python.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

fn tools_venv() -> Result<PathBuf> {
    Ok(target_dir()?.join("tools").join("venv"))
}

fn kubernetes_validate() -> Result<PathBuf> {
    Ok(tools_venv()?.join("bin").join("kubernetes-validate"))
}

fn install_kubernetes_validate() -> Result<()> {
    if kubernetes_validate()?.is_file() {
        return Ok(());
    }
    let venv = tools_venv()?;
    if !succeeds(Command::new("python3").args(["-c", "import ensurepip, venv"])) {
        apt_install(&["python3-venv"])?;
    }
    println!("setup: installing {KUBERNETES_VALIDATE} into {}", venv.display());
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin").join("pip")).args(["install", "--quiet", KUBERNETES_VALIDATE]))
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

fn is_bpffs(path: &str) -> bool {
    // `stat -f -c %T` prints "bpf_fs" for a bpffs.
    Command::new("stat")
        .args(["-f", "-c", "%T", path])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "bpf_fs")
}

/// Build one binary and return its path, as cargo reports it (no guessing
/// at target/ layouts).
fn build_bin(package: &str, bin: &str, release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", package, "--bin", bin, "--message-format=json-render-diagnostics"]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd.stderr(Stdio::inherit()).output().with_context(|| format!("build {bin}"))?;
    if !out.status.success() {
        bail!("building {bin} failed");
    }
    executable(&out.stdout, bin).with_context(|| format!("cargo did not report the {bin} executable"))
}

/// The `"executable"` of the compiler-artifact message for target `name`.
fn executable(json_lines: &[u8], name: &str) -> Option<PathBuf> {
    let text = String::from_utf8_lossy(json_lines);
    let needle = format!("\"name\":\"{name}\"");
    text.lines().filter(|l| l.contains("\"reason\":\"compiler-artifact\"") && l.contains(&needle)).find_map(|l| {
        let start = l.find("\"executable\":\"")? + "\"executable\":\"".len();
        let end = start + l[start..].find('"')?;
        Some(PathBuf::from(&l[start..end]))
    })
}

/// Build the eBPF object the way the agent embeds it (proxy-userspace's
/// build script runs aya-build) and return its path: one object, one set
/// of flags, never a second copy.
fn build_ebpf() -> Result<PathBuf> {
    let out = cargo()
        .args(["build", "--package", "proxy-userspace", "--lib", "--message-format=json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("build proxy-userspace")?;
    if !out.status.success() {
        bail!("building the eBPF object failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text
        .lines()
        .filter(|l| l.contains("\"reason\":\"build-script-executed\"") && l.contains("proxy-userspace"))
        .find_map(|l| {
            let start = l.find("\"out_dir\":\"")? + "\"out_dir\":\"".len();
            let end = start + l[start..].find('"')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .context("cargo did not report proxy-userspace's build script output")?;
    let obj = dir.join("dsproxy-tc");
    if !obj.exists() {
        bail!("{} is missing after the build", obj.display());
    }
    Ok(obj)
}
