//! The manifest-directory source under faults (real agent, real datapath,
//! traffic on both families): a file rewritten in place and observed half
//! written, a symlink loop, a file the agent may not read, the same objects
//! in two files, and huge or deeply nested files beside an unrelated change.
//! A file that cannot be read or parsed keeps the objects it contributed
//! last; only a file that parses changes them.
use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use dsproxy_tests::{
    Cluster,
    manifests::{documents, filler, nested},
    probe::TARGET,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_dsproxy-under-test");

struct Files {
    c: Cluster,
    client: usize,
    be: Vec<usize>,
}

impl Files {
    fn new(backends: usize) -> Self {
        let mut c = Cluster::new(Path::new(BIN));
        let client = c.client();
        let be = (0..backends).map(|i| c.backend(&format!("be{i}"), TARGET, false)).collect();
        Self { c, client, be }
    }

    /// `backends` backends, web.yaml with Service `web` on VIP 10 over
    /// be0, the agent started (through `wrapper`) and serving it.
    fn started(backends: usize, wrapper: &[&str]) -> Self {
        let mut w = Self::new(backends);
        w.c.write("web.yaml", &documents(&w.service("web", 10, &[0])));
        w.c.start_agent_wrapped(wrapper, &[]);
        w.served_by(10, &["be0"], Duration::from_secs(5));
        w
    }

    /// Service `name` on VIP `n` over backends `eps`, with its slices.
    fn service(&self, name: &str, n: u8, eps: &[usize]) -> Vec<Value> {
        let pods: Vec<usize> = eps.iter().map(|b| self.be[*b]).collect();
        self.c.dual_stack(name, n, &pods)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.c.manifests.0.join(name)
    }

    fn served_by(&self, n: u8, names: &[&str], limit: Duration) -> Duration {
        self.c.served_by(self.client, n, names, limit)
    }

    fn stays_served_by(&self, n: u8, names: &[&str], period: Duration) {
        self.c.stays_served_by(self.client, n, names, period);
    }

    /// Wait for a log line naming file `name` that satisfies `pred`.
    fn logged_about(&self, name: &str, pred: impl Fn(&str) -> bool) -> String {
        let path = self.path(name).display().to_string();
        self.c.agent().wait_for_line(|l| l.contains(&path) && pred(l), Duration::from_secs(5))
    }
}

#[test]
fn should_keep_serving_the_old_endpoints_while_a_file_is_rewritten_in_place() {
    let w = Files::started(2, &[]);

    // An editor writing in place: truncate, write half, keep the file open.
    let text = documents(&w.service("web", 10, &[1]));
    let half = text.len() / 2;
    assert!(!text[..half].ends_with('\n'), "the cut falls inside a document");
    let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(w.path("web.yaml")).expect("open");
    f.write_all(&text.as_bytes()[..half]).expect("write half");
    f.sync_data().expect("sync");
    w.stays_served_by(10, &["be0"], Duration::from_secs(1));

    // Finished and closed: traffic follows.
    f.write_all(&text.as_bytes()[half..]).expect("write the rest");
    drop(f);
    let took = w.served_by(10, &["be1"], Duration::from_secs(2));
    eprintln!("  in-place rewrite applied {took:?} after close");
}

#[test]
fn should_keep_a_files_objects_while_it_is_a_symlink_loop() {
    let w = Files::started(2, &[]);

    // web.yaml -> web.yaml, renamed into place.
    let tmp = w.path(".web.yaml.loop");
    std::os::unix::fs::symlink("web.yaml", &tmp).expect("symlink");
    std::fs::rename(&tmp, w.path("web.yaml")).expect("rename");
    let line = w.logged_about("web.yaml", |l| l.contains("keeping its last good objects (3)"));
    assert!(line.contains("symbolic links"), "the reason is given: {line}");
    w.stays_served_by(10, &["be0"], Duration::from_secs(1));

    w.c.write("web.yaml", &documents(&w.service("web", 10, &[1])));
    w.served_by(10, &["be1"], Duration::from_secs(2));
    w.logged_about("web.yaml", |l| l.contains("problem resolved"));
}

/// The capability bits of `CapEff` in /proc/PID/status.
fn effective_caps(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff").trim();
    u64::from_str_radix(hex, 16).expect("hex caps")
}

#[test]
fn should_keep_a_files_objects_while_a_capability_dropped_agent_may_not_read_it() {
    // Root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: file modes bite.
    let w = Files::started(2, &["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]);
    let caps = effective_caps(w.c.agent().pid());
    assert_eq!(caps & 0b110, 0, "the agent runs without DAC override and DAC read-search: CapEff {caps:x}");

    let path = w.path("web.yaml");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).expect("chmod 000");
    let line = w.logged_about("web.yaml", |l| l.contains("keeping its last good objects (3)"));
    assert!(line.contains("Permission denied"), "the reason is given: {line}");
    w.stays_served_by(10, &["be0"], Duration::from_secs(1));

    // Changed while unreadable (this test runs with DAC override), then
    // made readable: the new content applies.
    std::fs::write(&path, documents(&w.service("web", 10, &[1]))).expect("rewrite");
    w.stays_served_by(10, &["be0"], Duration::from_millis(500));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod 644");
    w.served_by(10, &["be1"], Duration::from_secs(2));
    w.logged_about("web.yaml", |l| l.contains("problem resolved"));
}

#[test]
fn should_keep_the_first_definition_of_an_object_defined_in_two_files_and_name_both() {
    let mut w = Files::new(3);
    w.c.write("a.yaml", &documents(&w.service("web", 10, &[0])));
    w.c.start_agent();
    w.served_by(10, &["be0"], Duration::from_secs(5));

    // b.yaml defines the same Service and slices, c.yaml the same slices:
    // the definitions in effect stay, nothing is merged, both files named.
    w.c.write("b.yaml", &documents(&w.service("web", 10, &[1])));
    let slices_only: Vec<Value> =
        w.service("web", 10, &[2]).into_iter().filter(|o| o["kind"] == json!("EndpointSlice")).collect();
    w.c.write("c.yaml", &documents(&slices_only));
    let a = w.path("a.yaml").display().to_string();
    for (file, what) in [
        ("b.yaml", "Service default/web"),
        ("b.yaml", "EndpointSlice default/web-IPv4"),
        ("b.yaml", "EndpointSlice default/web-IPv6"),
        ("c.yaml", "EndpointSlice default/web-IPv4"),
        ("c.yaml", "EndpointSlice default/web-IPv6"),
    ] {
        let line = w.logged_about(file, |l| l.contains(&format!("duplicate {what}")));
        assert!(line.contains(&format!("the definition in {a} stays")), "{line}");
    }
    w.stays_served_by(10, &["be0"], Duration::from_secs(1));

    // The holder lets go: the next file in name order takes over.
    w.c.remove("a.yaml");
    w.served_by(10, &["be1"], Duration::from_secs(2));
    let b = w.path("b.yaml").display().to_string();
    let line = w.logged_about("c.yaml", |l| l.contains("duplicate EndpointSlice default/web-IPv4") && l.contains(&b));
    assert!(line.contains(&format!("the definition in {b} stays")), "{line}");
}

#[test]
fn should_apply_an_unrelated_change_quickly_beside_huge_and_deeply_nested_files() {
    let w = Files::started(2, &[]);

    // 200 KB of nested flow sequences: refused by the depth budget.
    let started = Instant::now();
    w.c.write("nested.yaml", &nested(100_000));
    w.logged_about("nested.yaml", |l| l.contains("not valid YAML"));
    eprintln!("  a 200 KB nested file refused in {:?}", started.elapsed());

    // 50 MB of ConfigMaps (not ours) and, at its end, Service `bulk`.
    let mut huge = filler(50 << 20);
    huge.push_str(&documents(&w.service("bulk", 12, &[1])));
    let started = Instant::now();
    w.c.write("huge.yaml", &huge);
    w.served_by(12, &["be1"], Duration::from_mins(2));
    eprintln!("  a {} MB file read in {:?}", huge.len() >> 20, started.elapsed());
    drop(huge);

    // An unrelated change: only web.yaml is read again.
    let started = Instant::now();
    w.c.change_and_sync(|| w.c.write("web.yaml", &documents(&w.service("web", 10, &[1]))));
    let synced = started.elapsed();
    // Not a timed test: a sanity bound, orders of magnitude above the cost.
    assert!(synced < Duration::from_secs(5), "an unrelated change took {synced:?}");
    w.served_by(10, &["be1"], Duration::from_secs(2));
    eprintln!("  unrelated change synced {synced:?} after the write (traffic: {:?})", started.elapsed());
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.c.agent().pid())).expect("status");
    let hwm = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap_or("VmHWM: ?");
    eprintln!("  agent peak memory: {hwm}");
    let nested_reads = w.c.agent().log().iter().filter(|l| l.contains("nested.yaml")).count();
    assert_eq!(nested_reads, 1, "the nested file was refused once, not read again for each change");
}
