//! `cargo xtask bench [--quick]`: measures and writes results.json, report.md
//! and SVG plots to `--out` (xtask: target/bench/<run>/).
use std::path::PathBuf;

use dsproxy_bench as bench;

// The agent's allocator: the in-process control-plane figures (cold
// programming, one change) then measure the code as the agent runs it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let all: Vec<String> = std::env::args().skip(1).collect();
    if all.first().map(String::as_str) == Some(bench::socklb::CLIENT_FLAG) {
        // A socket-LB client process (see `socklb`).
        std::process::exit(dsproxy_tests::sockclient::main(&all[1..]));
    }
    let mut quick = false;
    let mut agent = None;
    let mut out = PathBuf::from("target/bench/manual");
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--agent" => agent = args.next().map(PathBuf::from),
            "--out" => out = args.next().map(PathBuf::from).unwrap_or(out),
            // Run one part alone (datapath, e2e, socklb, control or reliability) and print it;
            // no report is written.
            "--only" => only = args.next(),
            other => anyhow::bail!("unknown argument {other}; usage: dsproxy-bench --agent PATH [--quick] [--out DIR]"),
        }
    }
    let agent = agent.ok_or_else(|| anyhow::anyhow!("--agent PATH-TO-DSPROXY is required"))?;
    let started = std::time::Instant::now();
    if let Some(part) = only {
        bench::run_part(&bench::Plan::new(quick), &agent, &part)?;
        eprintln!("{part} finished in {:.0?}", started.elapsed());
        return Ok(());
    }
    let results = bench::run(&bench::Plan::new(quick), &agent);
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    let (md, svgs) = bench::report(&results);
    std::fs::write(out.join("report.md"), &md)?;
    for (name, svg) in svgs {
        std::fs::write(out.join(name), svg)?;
    }
    println!("{md}");
    eprintln!("bench finished in {:.0?}; results in {}", started.elapsed(), out.display());
    Ok(())
}
