//! A cgroup of the test's own for socket-level load balancing: cgroup v2
//! mounted on a directory made here (`ip netns exec` hides /sys/fs/cgroup),
//! and one child cgroup under it that holds only processes the test starts.
//! The socket programs are attached to that child, never to the root: a
//! program on the root would touch every connection of the machine.
//!
//! Dropping the guard ends the test's processes still in the child (by
//! their PIDs), removes the child and unmounts.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::netns::{require_root, sh, unique};

pub struct TestCgroup {
    mount: PathBuf,
    /// The child cgroup: give it to the agent (`--cgroup`).
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> Self {
        require_root();
        let mount = PathBuf::from("/run/dsproxy-test").join(unique("cg-"));
        std::fs::create_dir_all(&mount).expect("create cgroup mount point");
        sh(&["mount", "-t", "cgroup2", "none", mount.to_str().expect("utf-8 path")]);
        let path = mount.join(unique("dsproxy-test-"));
        if let Err(e) = std::fs::create_dir(&path) {
            let _ = Command::new("umount").arg(&mount).status();
            panic!("create child cgroup {}: {e}", path.display());
        }
        Self { mount, path }
    }

    /// The file a process writes `0` to to move itself into the child.
    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// The processes in the child cgroup.
    pub fn members(&self) -> Vec<u32> {
        std::fs::read_to_string(self.procs())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn as_path(&self) -> &Path {
        &self.path
    }
}

impl Default for TestCgroup {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Only the test's own client processes ever join the child; any
        // still there (a test that panicked mid-way) are ended by PID.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.members();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                if let Ok(pid) = i32::try_from(pid) {
                    // SAFETY: signalling a process this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir(&self.path);
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
    }
}
