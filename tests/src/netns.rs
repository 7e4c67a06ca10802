//! Network namespaces and bpffs mounts as RAII guards: unique names, torn
//! down on `Drop`, so also when a test panics.
use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for names: process id and a counter.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}-{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed))
}

/// Run a command, panicking with its output when it fails.
pub fn sh(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fail loudly unless we are root with BPF: the tests never skip.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "these tests need root (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN); run them as root via `cargo xtask test`"
    );
    assert!(
        Path::new("/sys/fs/bpf").exists() || Path::new("/sys/kernel/btf/vmlinux").exists(),
        "this kernel exposes no BPF filesystem or BTF; dsproxy needs both"
    );
}

/// A network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(role: &str) -> Self {
        require_root();
        let name = unique(&format!("dsp-{role}-"));
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        // No duplicate address detection: addresses are unique by
        // construction, and DAD would hold link-local addresses tentative
        // (no neighbour discovery) for the first second or two.
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut cmd = vec!["ip", "-n", &self.name];
        cmd.extend_from_slice(args);
        sh(&cmd)
    }

    /// Run a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        sh(&full)
    }

    /// Set a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) {
        sh(&["ip", "netns", "exec", &self.name, "sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Run `f` on a thread that has entered this namespace. Sockets made
    /// there stay in this namespace wherever they are used afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

/// Move the calling thread into the network namespace at `path`
/// (`/run/netns/NAME`). Only for threads made for that purpose.
pub fn enter(path: impl AsRef<Path>) {
    let path = path.as_ref();
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a valid namespace fd; it changes only this thread's
    // network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(rc == 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its interfaces, veth peers included.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A private bpffs mounted outside /sys in the host mount namespace, so
/// pins survive `ip netns exec` (which remounts /sys) and agent restarts.
pub struct BpfFs {
    pub mount: PathBuf,
}

impl BpfFs {
    pub fn new() -> Self {
        require_root();
        let mount = PathBuf::from("/run/dsproxy-test").join(unique("bpf-"));
        std::fs::create_dir_all(&mount).expect("create bpffs mount point");
        sh(&["mount", "-t", "bpf", "bpf", mount.to_str().expect("utf-8 path")]);
        Self { mount }
    }

    /// The pin directory to pass to the agent.
    pub fn pin_dir(&self) -> PathBuf {
        self.mount.join("dsproxy")
    }
}

impl Default for BpfFs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        // Unmounting drops every pin on it: links detach, maps are freed.
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}
