//! The datapath fuzzer: generated and mutated frames through the real TC
//! programs (BPF_PROG_TEST_RUN), each checked against a reference model
//! (`model`) for its verdict and every byte that comes out. Used by
//! `cargo xtask fuzz` (a million frames) and by a quick slice in the packet
//! tests.
//!
//! A run is a sequence of epochs of `epoch_frames` frames; each epoch loads
//! the datapath afresh (empty conntrack) with its own seed, derived from
//! the run's seed, so a failure replays from the start of its epoch:
//! `cargo xtask fuzz --seed S --epoch E`.
pub mod generate;
pub mod model;
pub mod scene;

use std::{
    collections::BTreeMap,
    fmt::{self, Write as _},
    time::{Duration, Instant},
};

use std::net::IpAddr;

use dsproxy::attach::Capacities;
use proxy_common::AffMatchKey;

use crate::packet::Env;
use generate::Gen;
use model::{Hook, Model, Outcome};
use scene::Scene;

pub struct Options {
    pub seed: u64,
    pub frames: u64,
    pub epoch_frames: u64,
    /// Run this epoch only (a replay).
    pub only_epoch: Option<u64>,
}

impl Options {
    pub const EPOCH_FRAMES: u64 = 50_000;
}

/// Counts of a run.
#[derive(Default)]
pub struct Report {
    pub frames: u64,
    pub outcomes: BTreeMap<Outcome, u64>,
    /// Per generator kind and hook.
    pub kinds: BTreeMap<(&'static str, &'static str), u64>,
    pub elapsed: Duration,
    pub epochs: u64,
    /// The datapath's own counters (`STATS`), summed over both families.
    pub counters: BTreeMap<&'static str, u64>,
}

impl Report {
    pub fn count(&self, o: Outcome) -> u64 {
        self.outcomes.get(&o).copied().unwrap_or(0)
    }

    pub fn frames_per_second(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "a rate for people")]
        let f = self.frames as f64;
        f / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} frames in {} epochs, {:.1} s, {:.0} frames/s",
            self.frames,
            self.epochs,
            self.elapsed.as_secs_f64(),
            self.frames_per_second()
        )?;
        for (o, n) in &self.outcomes {
            writeln!(f, "  {:<22} {n:>9}", o.name())?;
        }
        writeln!(f, "datapath counters:")?;
        for (name, n) in self.counters.iter().filter(|(_, n)| **n > 0) {
            writeln!(f, "  {name:<22} {n:>9}")?;
        }
        writeln!(f, "by kind and hook:")?;
        for ((kind, hook), n) in &self.kinds {
            writeln!(f, "  {kind:<46} {hook:<18} {n:>9}")?;
        }
        Ok(())
    }
}

/// A frame the datapath got wrong.
pub struct Failure {
    pub seed: u64,
    pub epoch: u64,
    /// Frame number within the epoch.
    pub index: u64,
    pub hook: Hook,
    pub kind: &'static str,
    pub input: Vec<u8>,
    pub verdict: Option<i32>,
    pub output: Vec<u8>,
    pub message: String,
}

fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, x) in b.iter().enumerate() {
        if i > 0 && i % 32 == 0 {
            s.push('\n');
        }
        let _ = write!(s, "{x:02x}");
    }
    s
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "frame {} of epoch {} ({}, {:?}): {}", self.index, self.epoch, self.kind, self.hook, self.message)?;
        writeln!(f, "input ({} bytes):\n{}", self.input.len(), hex(&self.input))?;
        writeln!(f, "verdict {:?}, output ({} bytes):\n{}", self.verdict, self.output.len(), hex(&self.output))?;
        write!(f, "replay: cargo xtask fuzz --seed {:#x} --epoch {}", self.seed, self.epoch)
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The seed of epoch `epoch` of a run seeded `seed` (splitmix64).
pub fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let mut z = seed.wrapping_add(epoch.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The datapath with the scene programmed: the agent's own sync for the
/// frontends, and the configuration.
///
/// The agent does not write the NodePort addresses (`NODEPORT4/6`) nor the
/// affinity membership (`AFFMATCH4/6`) yet; the fuzzer writes the
/// datapath's side of that contract itself, so the datapath's NodePort and
/// ClientIP affinity paths are checked all the same.
pub fn load(scene: &Scene) -> Env {
    let caps = Capacities { svc: 4096, backend: 1024, revnat: 1024, ct: 131_072, ..Capacities::default() };
    let mut env = Env::with_capacities(&caps);
    let desired = scene.desired();
    env.program_desired(&desired);
    let (IpAddr::V4(n4), IpAddr::V6(n6)) = (scene.v4.node, scene.v6.node) else { unreachable!("families") };
    env.maps.nodeport4.insert(n4.octets(), 1, 0).expect("node address (IPv4)");
    env.maps.nodeport6.insert(n6.octets(), 1, 0).expect("node address (IPv6)");
    for (f, spec) in desired.frontends.iter().filter(|(_, s)| s.settings.affinity_timeout.is_some()) {
        let frontend_id = env.prog.frontends[f].rev_nat_id;
        for b in &spec.backends {
            let key =
                AffMatchKey { frontend_id, backend_id: env.prog.family(b.family()).id_of(b).expect("backend written") };
            let map = if f.addr.is_ipv6() { &mut env.maps.affmatch6 } else { &mut env.maps.affmatch4 };
            map.insert(key, 1, 0).expect("affinity membership");
        }
    }
    env.maps.set_config(&scene.config()).expect("datapath configuration");
    env
}

/// Run `opts.frames` frames; `progress` is told after each epoch.
pub fn run(opts: &Options, mut progress: impl FnMut(&Report)) -> Result<Report, Box<Failure>> {
    let scene = Scene::new();
    let mut report = Report::default();
    let start = Instant::now();
    let epochs = opts.frames.div_ceil(opts.epoch_frames);
    let range = match opts.only_epoch {
        Some(e) => e..e + 1,
        None => 0..epochs,
    };
    for epoch in range {
        let n = opts.epoch_frames.min(opts.frames - (epoch * opts.epoch_frames).min(opts.frames));
        let n = if opts.only_epoch.is_some() { opts.epoch_frames } else { n };
        run_epoch(opts.seed, epoch, n, &scene, &mut report)?;
        report.epochs += 1;
        report.elapsed = start.elapsed();
        progress(&report);
    }
    Ok(report)
}

/// Frames between two backend changes.
const CHURN_EVERY: u64 = 4_000;

fn run_epoch(seed: u64, epoch: u64, frames: u64, scene: &Scene, report: &mut Report) -> Result<(), Box<Failure>> {
    let mut env = load(scene);
    let mut model = Model::new(scene.clone());
    let mut source = Gen::new(epoch_seed(seed, epoch), scene.clone());
    let churned = scene.churned();
    let mut outcomes: BTreeMap<Outcome, u64> = BTreeMap::new();
    for index in 0..frames {
        if index % CHURN_EVERY == CHURN_EVERY - 1 {
            // Endpoints change under live flows, and change back.
            let now = if (index / CHURN_EVERY).is_multiple_of(2) { &churned } else { scene };
            env.program_desired(&now.desired());
            model.set_scene(now.clone());
        }
        let frame = source.draw();
        let got = env.try_run_prog(frame.hook.program(), &frame.bytes);
        let result = match &got {
            Ok(out) => model.check(frame.hook, &frame.bytes, Some((out.verdict, &out.frame))),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => model.check(frame.hook, &frame.bytes, None),
            Err(e) => Err(format!("BPF_PROG_TEST_RUN: {e}")),
        };
        match result {
            Ok(outcome) => {
                report.frames += 1;
                *outcomes.entry(outcome).or_default() += 1;
                *report.kinds.entry((frame.kind, hook_name(frame.hook))).or_default() += 1;
            }
            Err(message) => {
                let (verdict, output) = match got {
                    Ok(out) => (Some(out.verdict), out.frame),
                    Err(_) => (None, Vec::new()),
                };
                return Err(Box::new(Failure {
                    seed,
                    epoch,
                    index,
                    hook: frame.hook,
                    kind: frame.kind,
                    input: frame.bytes,
                    verdict,
                    output,
                    message,
                }));
            }
        }
    }
    check_counters(&env, epoch, &outcomes, report);
    for (o, n) in outcomes {
        *report.outcomes.entry(o).or_default() += n;
    }
    let (flows, frags) = model.sizes();
    // Far below the maps' capacity: LRU eviction never has to be modelled.
    assert!(flows < 65_536 && frags < 4_096, "epoch {epoch}: {flows} flows, {frags} fragment records");
    Ok(())
}

/// The datapath counted what the model saw: every translation, refusal
/// and drop, and no failed rewrite, conntrack insert or masquerade port.
fn check_counters(env: &Env, epoch: u64, outcomes: &BTreeMap<Outcome, u64>, report: &mut Report) {
    let mut counters: BTreeMap<&'static str, u64> = BTreeMap::new();
    for (_, stat, n) in env.maps.stats().expect("datapath counters") {
        *counters.entry(stat.name()).or_default() += n;
    }
    let got = |name: &str| counters.get(name).copied().unwrap_or(0);
    let saw = |o: Outcome| outcomes.get(&o).copied().unwrap_or(0);
    for (name, want) in [
        ("dnat_new", saw(Outcome::NewFlow)),
        ("dnat_established", saw(Outcome::Established)),
        ("rev_nat", saw(Outcome::Reply)),
        ("icmp_xlate", saw(Outcome::IcmpError)),
        ("reject_no_backend", saw(Outcome::Refused)),
        ("drop_no_local_backend", saw(Outcome::Dropped)),
        ("masquerade_no_route", saw(Outcome::NoRoute)),
        ("drop_rewrite", 0),
        ("ct_insert_failed", 0),
        ("snat_no_port", 0),
    ] {
        assert_eq!(got(name), want, "epoch {epoch}: the datapath counted {name} {} times, the model {want}", got(name));
    }
    for (name, n) in counters {
        *report.counters.entry(name).or_default() += n;
    }
}

fn hook_name(h: Hook) -> &'static str {
    match h {
        Hook::FromPod => "ingress (pod)",
        Hook::FromDevice => "ingress (device)",
        Hook::Egress => "egress",
    }
}
