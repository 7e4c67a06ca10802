//! `cargo xtask bench`: datapath cost per packet, end-to-end connection
//! rate and latency against kube-proxy-style rulesets, and control-plane
//! programming time, in one run. Writes `results.json`, `report.md` and
//! SVG plots.
#![expect(
    clippy::cast_precision_loss,
    clippy::many_single_char_names,
    clippy::too_many_lines,
    clippy::similar_names,
    clippy::manual_midpoint,
    reason = "measurement and report code: counts become f64 figures, formulas read best with short names"
)]
pub mod control;
pub mod datapath;
pub mod e2e;
pub mod reliability;
pub mod socklb;
pub mod svg;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::Serialize;

/// ClusterIP `i` of a family and its port: distinct (address, port) pairs
/// for up to several hundred thousand Services, inside 198.19.0.0/16 and
/// fd00:ffff::/64.
pub fn vip(i: usize, v6: bool) -> (IpAddr, u16) {
    let port = 80 + u16::try_from(i / 65_536).expect("few ports");
    let n = u16::try_from(i % 65_536).expect("16 bits");
    if v6 {
        (IpAddr::V6(Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 1, n)), port)
    } else {
        let [a, b] = n.to_be_bytes();
        (IpAddr::V4(Ipv4Addr::new(198, 19, a, b)), port)
    }
}

/// `n` dual-stack ClusterIP Services (`svc-I` on `vip(I)`, one TCP port to
/// 8080) with one slice per family, whose endpoints `endpoints(i, v6)` gives.
pub fn services(n: usize, endpoints: impl Fn(usize, bool) -> Vec<IpAddr>) -> Vec<serde_json::Value> {
    use dsproxy_tests::manifests::{Port, READY, service, slice};
    let mut objs = Vec::with_capacity(n * 3);
    for i in 0..n {
        let (a4, port) = vip(i, false);
        let (a6, _) = vip(i, true);
        let name = format!("svc-{i}");
        objs.push(service(
            &name,
            &[a4, a6],
            "RequireDualStack",
            &[Port { name: "tcp", port, proto: "TCP", target: 8080 }],
        ));
        for v6 in [false, true] {
            let eps: Vec<_> = endpoints(i, v6).into_iter().map(|e| (e, READY)).collect();
            let fam = if v6 { "IPv6" } else { "IPv4" };
            objs.push(slice(&format!("{name}-{fam}"), &name, fam, &[("tcp", 8080, "TCP")], &eps));
        }
    }
    objs
}

/// What a run measures.
pub struct Plan {
    pub quick: bool,
    pub datapath_sizes: Vec<usize>,
    pub datapath_samples: usize,
    pub e2e_sizes: Vec<usize>,
    pub e2e_secs: f64,
    pub e2e_requests: usize,
    /// Services in the socket-level load balancing comparison.
    pub socklb_sizes: Vec<usize>,
    /// The main control-plane size (targets, ruleset comparison).
    pub control_services: usize,
    /// Every control-plane size measured, `control_services` among them.
    pub control_sizes: Vec<usize>,
    pub control_endpoints: usize,
    pub control_changes: usize,
    /// Services in the `nft -f` comparison: nft needs minutes for 10,000
    /// Services x 10 endpoints, too long for a quick run.
    pub nft_services: usize,
    /// Load the iptables and nft rulesets of the IPv6 family too (the full
    /// run); the quick run loads IPv4 only and doubles the time.
    pub rules_both_families: bool,
}

impl Plan {
    pub fn new(quick: bool) -> Self {
        Self {
            quick,
            datapath_sizes: std::env::var("DSPROXY_BENCH_DP_SIZES").map_or_else(
                |_| vec![10, 1_000, 10_000, 100_000],
                |v| {
                    v.split(',')
                        .map(|n| {
                            n.trim().parse().unwrap_or_else(|_| panic!("DSPROXY_BENCH_DP_SIZES: {n:?} is not a number"))
                        })
                        .collect()
                },
            ),
            datapath_samples: if quick { 1_500 } else { 20_000 },
            e2e_sizes: vec![10, 1_000, 10_000],
            e2e_secs: if quick { 0.75 } else { 5.0 },
            e2e_requests: if quick { 1_000 } else { 20_000 },
            socklb_sizes: vec![10, 10_000],
            control_services: 10_000,
            control_sizes: if quick { vec![1_000, 10_000] } else { vec![1_000, 10_000, 100_000] },
            control_endpoints: 10,
            control_changes: if quick { 30 } else { 200 },
            nft_services: if quick { 1_000 } else { 10_000 },
            rules_both_families: !quick,
        }
    }
}

#[derive(Serialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub kernel: String,
    pub date: String,
}

#[derive(Serialize)]
pub struct Results {
    pub quick: bool,
    pub machine: Machine,
    pub datapath: Vec<datapath::Row>,
    pub e2e: Vec<e2e::Row>,
    pub socklb: Vec<socklb::Row>,
    pub control: control::Result,
    pub reliability: reliability::Result,
}

fn first_line(path: &str, key: &str) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with(key)).and_then(|l| l.split(':').nth(1)).map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

pub fn machine() -> Machine {
    let out = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    Machine {
        cpu: first_line("/proc/cpuinfo", "model name"),
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        kernel: out("uname", &["-r"]),
        date: out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    }
}

/// Run one part of `plan` and print its results.
pub fn run_part(plan: &Plan, agent: &Path, part: &str) -> anyhow::Result<()> {
    match part {
        "datapath" => {
            for &n in &plan.datapath_sizes {
                for row in datapath::measure(n, plan.datapath_samples) {
                    println!("{row:?}");
                }
            }
        }
        "e2e" => {
            for row in e2e::measure(agent, &plan.e2e_sizes, plan.e2e_secs, plan.e2e_requests) {
                println!("{row:?}");
            }
        }
        "socklb" => {
            for row in socklb::measure(agent, &plan.socklb_sizes, plan.e2e_secs) {
                println!("{row:?}");
            }
        }
        "control" => {
            let c = control::measure(agent, plan, 0);
            println!("{c:?}");
        }
        "reliability" => println!("{:?}", reliability::measure(agent, plan.quick)),
        other => anyhow::bail!("unknown part {other}: datapath, e2e, socklb, control or reliability"),
    }
    Ok(())
}

/// Run everything in `plan`; `agent` is the dsproxy binary.
pub fn run(plan: &Plan, agent: &Path) -> Results {
    let machine = machine();
    let mut dp = Vec::new();
    for &n in &plan.datapath_sizes {
        eprintln!("datapath: {n} Services per family");
        for row in datapath::measure(n, plan.datapath_samples) {
            eprintln!(
                "  {} {:>6}: new {:.0} ns, established {:.0} ns (host stack {:.0}), reply {:.0} ns, other {:.0} ns, \
                 floor {:.0} ns (flow lookup {:.0}, new-flow inserts {:.0})",
                row.family,
                row.services,
                row.new_flow,
                row.established,
                row.established_stack,
                row.reply,
                row.non_service,
                row.floor,
                row.floor_flow,
                row.floor_new
            );
            dp.push(row);
        }
    }
    eprintln!("end to end");
    let e2e = e2e::measure(agent, &plan.e2e_sizes, plan.e2e_secs, plan.e2e_requests);
    eprintln!("socket-level load balancing");
    let socklb = socklb::measure(agent, &plan.socklb_sizes, plan.e2e_secs);
    eprintln!("control plane: {:?} Services x {} endpoints per family", plan.control_sizes, plan.control_endpoints);
    let control = control::measure(agent, plan, plan.nft_services);
    eprintln!("  {control:?}");
    eprintln!("reliability: API outage and recovery, pathological manifests");
    let reliability = reliability::measure(agent, plan.quick);
    eprintln!("  {reliability:?}");
    Results { quick: plan.quick, machine, datapath: dp, e2e, socklb, control, reliability }
}

fn pct(a: f64, b: f64) -> f64 {
    100.0 * a / b
}

/// A verdict line: met, or missed and by how much.
fn target(ok: bool, what: &str, detail: &str) -> String {
    format!("| {} | {what} | {detail} |\n", if ok { "met" } else { "**missed**" })
}

/// One cell of the control-plane table, from its row.
type Cell = fn(&control::Row) -> String;

/// The markdown report; also returns the SVG files to write beside it.
pub fn report(r: &Results) -> (String, Vec<(String, String)>) {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# dsproxy benchmark report\n");
    let _ = writeln!(
        md,
        "{} run on {} ({} cores), Linux {}, {}.\n",
        if r.quick { "Quick" } else { "Full" },
        m.cpu,
        m.cores,
        m.kernel,
        m.date
    );

    // Targets.
    let mut t = String::from("| verdict | target | measured |\n|---|---|---|\n");
    for fam in ["IPv4", "IPv6"] {
        let rows: Vec<_> = r.datapath.iter().filter(|x| x.family == fam).collect();
        if let (Some(small), Some(big)) =
            (rows.iter().find(|x| x.services == 10), rows.iter().max_by_key(|x| x.services))
        {
            for (case, limit, x) in [("new flow", 3.5, small.new_flow), ("established", 2.0, small.established)] {
                t += &target(
                    x / small.floor <= limit,
                    &format!("{fam} {case} / floor at 10 Services <= {limit:.1}"),
                    &format!("{x:.0} / {:.0} ns = {:.2}", small.floor, x / small.floor),
                );
            }
            for (case, a, b) in [
                ("new flow", small.new_flow - small.floor, big.new_flow - big.floor),
                ("established", small.established - small.floor, big.established - big.floor),
                ("reply", small.reply - small.floor, big.reply - big.floor),
            ] {
                let ratio = b / a;
                t += &target(
                    ratio <= 1.10,
                    &format!("{fam} {case}: (ns - floor) at {} Services / at 10 <= 1.10", big.services),
                    &format!("{b:.0} / {a:.0} ns = {ratio:.2}"),
                );
            }
        }
        for (_, profile) in e2e::PROFILES {
            let rows = || r.e2e.iter().filter(move |x| x.family == fam && x.profile == profile);
            let direct = rows().find(|x| x.system == "direct").map_or(f64::NAN, |x| x.conn_per_sec);
            for e in rows().filter(|x| x.system == "dsproxy") {
                t += &target(
                    e.conn_per_sec >= direct,
                    &format!(
                        "{fam} conn/s through a ClusterIP >= direct pod to pod ({profile}, {} Services)",
                        e.services
                    ),
                    &format!("{:.0} vs {direct:.0} ({:.0}%)", e.conn_per_sec, pct(e.conn_per_sec, direct)),
                );
            }
            let at = |sys: &str| {
                rows().filter(|x| x.system == sys).max_by_key(|x| x.services).map(|x| (x.services, x.conn_per_sec))
            };
            if let (Some((n, ds)), Some((_, ipt))) = (at("dsproxy"), at("iptables")) {
                t += &target(
                    ds >= 3.0 * ipt,
                    &format!("{fam} conn/s >= 3x the iptables ruleset at {n} Services ({profile})"),
                    &format!("{ds:.0} vs {ipt:.0} ({:.2}x)", ds / ipt),
                );
            }
        }
    }
    t += &socklb_targets(&r.socklb);
    let c = &r.control;
    if let Some(m) = c.at(c.services) {
        let (n, per) = (m.services, m.endpoints_per_family);
        t += &target(
            m.change_p99_ms <= 5.0,
            &format!("one endpoint change programmed in <= 5 ms p99 ({n} x {per})"),
            &format!("p50 {:.2} ms, p99 {:.2} ms", m.change_p50_ms, m.change_p99_ms),
        );
        t += &target(
            m.unchanged_sync_ms <= 1.0,
            &format!("a sync with nothing changed <= 1 ms ({n} Services)"),
            &format!("{:.3} ms", m.unchanged_sync_ms),
        );
        t += &target(
            m.cold_total_ms <= 300.0,
            &format!("cold programming of {n} x {per} per family, both families, <= 0.3 s"),
            &format!("{:.0} ms (model {:.0} + maps {:.0})", m.cold_total_ms, m.cold_model_ms, m.cold_sync_ms),
        );
        for (mode, run) in [("manifests", &m.manifests), ("kube", &m.kube)] {
            t += &target(
                run.start_to_synced_ms <= 1000.0,
                &format!("agent start to first complete sync <= 1.0 s ({n} x {per} dual-stack, {mode} mode)"),
                &format!("{:.0} ms", run.start_to_synced_ms),
            );
            t += &target(
                run.peak_rss_mib <= 100.0,
                &format!("agent peak RSS <= 100 MiB ({n} x {per} dual-stack, {mode} mode)"),
                &format!("{:.1} MiB", run.peak_rss_mib),
            );
        }
        t += &target(
            m.cold_total_ms * 10.0 <= c.iptables_restore_ms,
            "cold programming >= 10x faster than iptables-restore",
            &format!(
                "{:.0} ms vs {:.0} ms ({:.1}x)",
                m.cold_total_ms,
                c.iptables_restore_ms,
                c.iptables_restore_ms / m.cold_total_ms
            ),
        );
    }
    if let (Some(small), Some(large)) = (c.rows.first(), c.rows.last())
        && large.services > small.services
    {
        t += &target(
            large.change_p99_ms <= 1.2 * small.change_p99_ms,
            &format!("one endpoint change p99 at {} Services <= 1.2x at {}", large.services, small.services),
            &format!(
                "{:.2} vs {:.2} ms ({:.2}x)",
                large.change_p99_ms,
                small.change_p99_ms,
                large.change_p99_ms / small.change_p99_ms
            ),
        );
    }
    let rel = &r.reliability;
    t += &target(
        rel.applied_after_restart_ms <= 2000.0 && rel.new_service_refused == 0,
        &format!(
            "changes made during a {:.0} s API outage applied <= 2 s after the server answers again ({} Services, \
             history compacted), a new Service never programmed without its endpoints",
            rel.outage_s, rel.services
        ),
        &format!(
            "{:.0} ms; refused probes of the new Service: {}",
            rel.applied_after_restart_ms, rel.new_service_refused
        ),
    );
    t += &target(
        rel.unrelated_change_ms < 100.0,
        "manifests: an unrelated change under 100 ms beside a 50 MB and a 200 KB nested file",
        &format!(
            "{:.1} ms (the 50 MB file itself: {:.0} ms, agent peak RSS {:.0} MiB)",
            rel.unrelated_change_ms, rel.huge_file_ms, rel.huge_file_peak_rss_mib
        ),
    );
    let _ = writeln!(md, "## Targets\n\n{t}");

    // Datapath table and plot.
    let _ = writeln!(md, "## Datapath, ns per packet (BPF_PROG_TEST_RUN, median)\n");
    let _ = writeln!(
        md,
        "| family | Services | new flow | established | est. (host stack) | reply | non-service | floor | \
         new - floor | est. - floor | new/floor | est./floor | floor: flow lookup | floor: new-flow inserts | \
         flow lookup/floor | new-flow inserts/floor |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for x in &r.datapath {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} \
             | {:.2} | {:.2} |",
            x.family,
            x.services,
            x.new_flow,
            x.established,
            x.established_stack,
            x.reply,
            x.non_service,
            x.floor,
            x.new_flow - x.floor,
            x.established - x.floor,
            x.new_flow / x.floor,
            x.established / x.floor,
            x.floor_flow,
            x.floor_new,
            x.floor_flow / x.floor,
            x.floor_new / x.floor
        );
    }
    let mut svgs = Vec::new();
    for fam in ["IPv4", "IPv6"] {
        let rows: Vec<_> = r.datapath.iter().filter(|x| x.family == fam).collect();
        let line = |name: &str, f: fn(&datapath::Row) -> f64| -> (String, Vec<(f64, f64)>) {
            (name.to_owned(), rows.iter().map(|x| (x.services as f64, f(x))).collect())
        };
        let series = vec![
            line("new flow", |x| x.new_flow),
            line("established", |x| x.established),
            line("reply", |x| x.reply),
            line("non-service", |x| x.non_service),
            line("floor", |x| x.floor),
        ];
        let name = format!("datapath-{}.svg", fam.to_lowercase());
        svgs.push((name.clone(), svg::chart(&format!("dsproxy ns/packet, {fam}"), "Services", "ns/packet", &series)));
        let _ = writeln!(md, "\n![{fam} ns/packet]({name})");
    }

    // End to end.
    let _ = writeln!(md, "\n## End to end: TCP connect-request-close rate and request latency\n");
    let _ = writeln!(md, "| node profile | family | system | Services | conn/s | p50 µs | p99 µs | errors |");
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|");
    for x in &r.e2e {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {} |",
            x.profile, x.family, x.system, x.services, x.conn_per_sec, x.p50_us, x.p99_us, x.errors
        );
    }
    for (fam, (_, profile)) in ["IPv4", "IPv6"].into_iter().flat_map(|f| e2e::PROFILES.map(|p| (f, p))) {
        let rows = || r.e2e.iter().filter(move |x| x.family == fam && x.profile == profile);
        let sizes: Vec<usize> = {
            let mut v: Vec<usize> = rows().filter(|x| x.services > 0).map(|x| x.services).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let mut series = Vec::new();
        for sys in ["direct", "dsproxy", "iptables", "nftables"] {
            let pts: Vec<(f64, f64)> = if sys == "direct" {
                let d = rows().find(|x| x.system == "direct").map_or(0.0, |x| x.conn_per_sec);
                sizes.iter().map(|n| (*n as f64, d)).collect()
            } else {
                rows().filter(|x| x.system == sys).map(|x| (x.services as f64, x.conn_per_sec)).collect()
            };
            series.push((sys.to_owned(), pts));
        }
        let name = format!("conn-rate-{}-{profile}.svg", fam.to_lowercase());
        let title = format!("TCP connections/s through a ClusterIP, {fam}, {profile} node");
        svgs.push((name.clone(), svg::chart(&title, "Services", "conn/s", &series)));
        let _ = writeln!(md, "\n![{fam} connection rate, {profile} node]({name})");
    }

    let _ = writeln!(md, "\n## Socket-level load balancing: TCP connect-request-close rate\n");
    let _ = writeln!(md, "| family | client | path | Services | conn/s | direct conn/s | ratio | errors |");
    let _ = writeln!(md, "|---|---|---|---:|---:|---:|---:|---:|");
    for x in &r.socklb {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.2}x | {} |",
            x.family, x.client, x.path, x.services, x.conn_per_sec, x.direct_per_sec, x.ratio, x.errors
        );
    }

    let _ = writeln!(md, "\n## Control plane\n");
    let mut head = String::from("| Services x endpoints per family |");
    for r in &c.rows {
        let _ = write!(head, " {} x {} |", r.services, r.endpoints_per_family);
    }
    let _ = writeln!(md, "{head}\n|---|{}", "---:|".repeat(c.rows.len()));
    let lines: [(&str, Cell); 11] = [
        ("cold: model (ms)", |r| format!("{:.1}", r.cold_model_ms)),
        ("cold: map writes (ms)", |r| format!("{:.1}", r.cold_sync_ms)),
        ("cold: total (ms)", |r| format!("{:.1}", r.cold_total_ms)),
        ("one endpoint change, p50 (ms)", |r| format!("{:.3}", r.change_p50_ms)),
        ("one endpoint change, p99 (ms)", |r| format!("{:.3}", r.change_p99_ms)),
        ("a sync with nothing changed (ms)", |r| format!("{:.3}", r.unchanged_sync_ms)),
        ("manifests mode: start to first sync (ms)", |r| format!("{:.0}", r.manifests.start_to_synced_ms)),
        ("manifests mode: agent peak RSS (MiB)", |r| format!("{:.1}", r.manifests.peak_rss_mib)),
        ("kube mode: start to first sync (ms)", |r| format!("{:.0}", r.kube.start_to_synced_ms)),
        ("kube mode: agent peak RSS (MiB)", |r| format!("{:.1}", r.kube.peak_rss_mib)),
        ("BPF maps, kernel memory (MiB)", |r| format!("{:.1}", r.bpf_maps_mib)),
    ];
    for (k, f) in lines {
        let mut line = format!("| {k} |");
        for r in &c.rows {
            let _ = write!(line, " {} |", f(r));
        }
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(md, "\n| ruleset, {} Services | ms |\n|---|---:|", c.services);
    let _ = writeln!(
        md,
        "| iptables-restore + ip6tables-restore | {:.0}{} |",
        c.iptables_restore_ms,
        if c.rules_both_families { "" } else { " (IPv4 only, x2 estimated)" }
    );
    let _ = writeln!(md, "| nft -f, both families, {} Services | {:.0} |", c.nft_services, c.nft_ms);
    (md, svgs)
}

/// Host clients through socket LB at least as fast as connecting to the
/// backend directly.
fn socklb_targets(rows: &[socklb::Row]) -> String {
    let mut t = String::new();
    for x in rows.iter().filter(|x| x.client == "host" && x.path == "socket-lb") {
        t += &target(
            x.ratio >= 1.0,
            &format!("{} host-client conn/s through socket LB >= 1.0x direct ({} Services)", x.family, x.services),
            &format!("{:.0} vs {:.0} ({:.2}x, median of paired windows)", x.conn_per_sec, x.direct_per_sec, x.ratio),
        );
    }
    t
}
