//! `cargo xtask fuzz`: the datapath fuzzer (`dsproxy_tests::fuzz`) for a
//! number of frames, with a seed that is printed first, so any run can be
//! replayed; `--epoch E` replays one epoch of a run.
use anyhow::{Context as _, bail};
use dsproxy_tests::fuzz::{self, Options};

const USAGE: &str = "usage: dsproxy-fuzz [--seed N] [--frames N] [--epoch E] [--epoch-frames N]";

fn number(s: &str) -> anyhow::Result<u64> {
    let s = s.replace('_', "");
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
    .with_context(|| format!("{s:?} is not a number"))
}

fn main() -> anyhow::Result<()> {
    let mut opts = Options { seed: 0, frames: 1_000_000, epoch_frames: Options::EPOCH_FRAMES, only_epoch: None };
    let mut seed = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().with_context(|| format!("{flag} needs a value; {USAGE}"))?;
        match flag.as_str() {
            "--seed" => seed = Some(number(&value)?),
            "--frames" => opts.frames = number(&value)?,
            "--epoch" => opts.only_epoch = Some(number(&value)?),
            "--epoch-frames" => opts.epoch_frames = number(&value)?.max(1),
            _ => bail!("unknown argument {flag}; {USAGE}"),
        }
    }
    opts.seed = seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        u64::try_from(t.as_nanos() & u128::from(u64::MAX)).unwrap_or(1) ^ u64::from(std::process::id())
    });
    match opts.only_epoch {
        Some(e) => println!("fuzz: seed {:#x}, epoch {e} only ({} frames)", opts.seed, opts.epoch_frames),
        None => println!("fuzz: seed {:#x}, {} frames in epochs of {}", opts.seed, opts.frames, opts.epoch_frames),
    }
    let result = fuzz::run(&opts, |r| {
        println!("fuzz: {} frames, {:.0} frames/s", r.frames, r.frames_per_second());
    });
    match result {
        Ok(report) => {
            print!("{report}");
            println!("fuzz: clean (seed {:#x})", opts.seed);
            Ok(())
        }
        Err(failure) => {
            eprintln!("fuzz: FAILED (seed {:#x})\n{failure}", opts.seed);
            std::process::exit(1)
        }
    }
}
