//! The agent under test, run as a user would: `ip netns exec NODE dsproxy
//! run ...` with its pins on a bpffs outside /sys.
use std::{
    ffi::OsString,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::{
    netns::NetNs,
    topo::{ATTACH_GLOB, DEVICES_GLOB},
};

/// Lines the agent printed, shared with the reader thread.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<String>>,
    /// When each line arrived, in the same order.
    times: Mutex<Vec<Instant>>,
    changed: Condvar,
}

/// A running agent, stopped with SIGTERM on drop.
pub struct Agent {
    child: Child,
    log: Arc<Log>,
    pub pin_dir: PathBuf,
    bin: PathBuf,
    /// Unpin everything on drop (not after `stop`, which models a restart).
    cleanup_on_drop: bool,
}

impl Agent {
    /// Start `bin run` inside `node` on a manifest directory and wait for
    /// its first sync and attach.
    pub fn start(bin: &Path, node: &NetNs, manifests: &Path, pin_dir: &Path) -> Self {
        Self::start_with(bin, node, manifests, pin_dir, &[])
    }

    pub fn start_with(bin: &Path, node: &NetNs, manifests: &Path, pin_dir: &Path, extra: &[&str]) -> Self {
        Self::start_wrapped(&[], bin, node, manifests, pin_dir, extra)
    }

    /// Like `start_with`, with the agent run by `wrapper` (for example
    /// `setpriv --bounding-set=...`), which must exec it in place.
    pub fn start_wrapped(
        wrapper: &[&str],
        bin: &Path,
        node: &NetNs,
        manifests: &Path,
        pin_dir: &Path,
        extra: &[&str],
    ) -> Self {
        let mut args: Vec<OsString> = vec!["--manifests".into(), manifests.into()];
        args.extend(extra.iter().map(OsString::from));
        Self::spawn(wrapper, bin, node, pin_dir, &args)
    }

    /// Start `bin run` following the Kubernetes API described by `kubeconfig`.
    pub fn start_kube(bin: &Path, node: &NetNs, kubeconfig: &Path, node_name: &str, pin_dir: &Path) -> Self {
        Self::start_kube_with(bin, node, kubeconfig, node_name, pin_dir, &[])
    }

    /// `start_kube` with extra arguments for `run`.
    pub fn start_kube_with(
        bin: &Path,
        node: &NetNs,
        kubeconfig: &Path,
        node_name: &str,
        pin_dir: &Path,
        extra: &[&str],
    ) -> Self {
        Self::launch_kube(bin, node, kubeconfig, node_name, pin_dir, extra).started()
    }

    fn spawn(wrapper: &[&str], bin: &Path, node: &NetNs, pin_dir: &Path, source: &[OsString]) -> Self {
        Self::launch(wrapper, bin, node, pin_dir, source).started()
    }

    /// Wait until the agent has attached (or waits for an interface).
    fn started(self) -> Self {
        self.wait_for_line(|l| l.contains("attached to") || l.contains("waiting for one"), Duration::from_secs(20));
        self
    }

    /// Start `bin run` on a manifest directory without waiting for anything
    /// (to kill it in the middle of its work, or to time its start).
    pub fn launch_manifests(bin: &Path, node: &NetNs, manifests: &Path, pin_dir: &Path, extra: &[&str]) -> Self {
        let mut args: Vec<OsString> = vec!["--manifests".into(), manifests.into()];
        args.extend(extra.iter().map(OsString::from));
        Self::launch(&[], bin, node, pin_dir, &args)
    }

    /// `start_kube_with` without waiting for anything.
    pub fn launch_kube(
        bin: &Path,
        node: &NetNs,
        kubeconfig: &Path,
        node_name: &str,
        pin_dir: &Path,
        extra: &[&str],
    ) -> Self {
        let mut args: Vec<OsString> =
            vec!["--kubeconfig".into(), kubeconfig.into(), "--node-name".into(), node_name.into()];
        args.extend(extra.iter().map(OsString::from));
        Self::launch(&[], bin, node, pin_dir, &args)
    }

    fn launch(wrapper: &[&str], bin: &Path, node: &NetNs, pin_dir: &Path, source: &[OsString]) -> Self {
        // Test defaults, unless the caller sets them. No socket programs
        // unless a test names its own cgroup: never the machine's.
        let mut defaults: Vec<&str> = Vec::new();
        for (flag, value) in [("--min-sync-period", "50ms"), ("--poll-interval", "50ms"), ("--cgroup", "none")] {
            if !source.iter().any(|a| a == flag) {
                defaults.extend([flag, value]);
            }
        }
        let mut child = Command::new("ip")
            .args(["netns", "exec", &node.name])
            .args(wrapper)
            .arg(bin)
            .args(["run", "--attach", ATTACH_GLOB, "--devices", DEVICES_GLOB])
            .args(defaults)
            .args(source)
            .arg("--pin-dir")
            .arg(pin_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Log::default());
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("  [dsproxy] {line}");
                let mut lines = sink.lines.lock().expect("log lock");
                sink.times.lock().expect("log lock").push(Instant::now());
                lines.push(line);
                sink.changed.notify_all();
            }
        });
        Self { child, log, pin_dir: pin_dir.to_owned(), bin: bin.to_owned(), cleanup_on_drop: true }
    }

    /// SIGKILL and wait: a crash, pins left as they are.
    pub fn kill(mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = self.child.wait();
        self.cleanup_on_drop = false;
    }

    /// When the first line satisfying `pred` arrived.
    pub fn line_time(&self, pred: impl Fn(&str) -> bool) -> Option<Instant> {
        let lines = self.log.lines.lock().expect("log lock");
        let i = lines.iter().position(|l| pred(l))?;
        self.log.times.lock().expect("log lock").get(i).copied()
    }

    /// Wait until a printed line satisfies `pred`; panic with the log if not.
    pub fn wait_for_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().expect("log lock");
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            assert!(now < deadline, "agent did not print the expected line in {timeout:?}; log:\n{}", lines.join("\n"));
            lines = self.log.changed.wait_timeout(lines, deadline - now).expect("log lock").0;
        }
    }

    /// The agent's process id (`ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Number of syncs so far.
    pub fn generation(&self) -> u64 {
        let lines = self.log.lines.lock().expect("log lock");
        lines.iter().filter(|l| l.contains("synced generation=")).count() as u64
    }

    /// Wait for a sync after generation `after`; returns its log line.
    pub fn wait_for_sync_after(&self, after: u64, timeout: Duration) -> String {
        let needle = format!("synced generation={} ", after + 1);
        self.wait_for_line(|l| l.contains(&needle), timeout)
    }

    /// All lines printed so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lines.lock().expect("log lock").clone()
    }

    /// SIGTERM and wait: the datapath must stay attached and pinned.
    pub fn stop(mut self) {
        self.terminate();
        self.cleanup_on_drop = false;
    }

    fn terminate(&mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `dsproxy cleanup`: what tests call when they finish.
    pub fn cleanup(bin: &Path, pin_dir: &Path) {
        let status = Command::new(bin).arg("cleanup").arg("--pin-dir").arg(pin_dir).stdout(Stdio::null()).status();
        assert!(status.is_ok_and(|s| s.success()), "dsproxy cleanup failed for {}", pin_dir.display());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
        if !self.cleanup_on_drop {
            return;
        }
        // The guard is also the teardown path on panic: unpin.
        let _ =
            Command::new(&self.bin).arg("cleanup").arg("--pin-dir").arg(&self.pin_dir).stdout(Stdio::null()).status();
    }
}
