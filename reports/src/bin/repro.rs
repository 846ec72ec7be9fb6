//! `cargo repro [--quick] [--scenario NAME] [--rounds N] [--out DIR]`: the
//! one-command reproduction. The last line printed is the report directory.

use std::path::PathBuf;

use clap::Parser;
use reports::repro::{self, Options, SCENARIOS};

#[derive(Parser, Debug)]
#[command(
    name = "repro",
    about = "Reproduce sttproxy's performance claims and write a report with charts"
)]
struct Args {
    /// The short version of the scenario: `quick` for the reference,
    /// `churn-quick` for churn, 100 sessions for 20 s for failover.
    #[arg(long)]
    quick: bool,
    /// Scenario: reference (default), quick, seed, stt, idle-3000, churn,
    /// churn-quick, soak, failover, rolling.
    #[arg(long, default_value = "reference")]
    scenario: String,
    /// Rounds: every system is measured once per round, the order rotated
    /// each round; the report shows medians, ranges and same-round ratios.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
    rounds: u16,
    /// Report directory [default: reports/out/<UTC timestamp>].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the release binaries already built (skip `cargo build --release`).
    #[arg(long)]
    no_build: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// The soak's length (`--scenario soak` only; at least 100s).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<std::time::Duration>,
    /// Internal: run as the guardian that ends the children of a killed repro.
    #[arg(long = "guardian", hide = true)]
    guardian: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.list {
        for s in SCENARIOS {
            println!("{:<10} {}", s.name, s.about);
        }
        println!(
            "{:<10} sttproxy alone for 30 min (--duration): ≈1,000 finite sessions, 1 in 50 misbehaving, \
             backends killed and retargeted; checks rules instead of comparing systems",
            "soak"
        );
        println!(
            "{:<10} sttproxy (resumable backends) and nginx in turn: 300 stt sessions for 60 s (--quick: 100 for 20 s), \
             one of 3 backends SIGKILLed mid-run; charts sessions surviving vs ended",
            "failover"
        );
        println!(
            "{:<10} 2 replicas behind HAProxy: a backend added live, then a rolling upgrade by listener \
             hand-over under 500 streaming sessions and a connect loop (100 with --quick)",
            "rolling"
        );
        return Ok(());
    }
    if args.guardian {
        reports::procs::guardian::serve();
        return Ok(());
    }
    // Children are spawned from this (the main) thread only: their
    // parent-death signal fires when the spawning thread exits.
    reports::procs::start_guardian();
    reports::procs::stop_all_on_interrupt()?;
    let command = std::iter::once("cargo repro".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    if args.scenario == "soak" {
        let duration = args
            .duration
            .unwrap_or(repro::soak::SoakPlan::DEFAULT_DURATION);
        let dir = repro::run_soak(args.out, args.no_build, duration, command)?;
        println!("{}", dir.display());
        return Ok(());
    }
    if args.scenario == "failover" {
        if args.duration.is_some() {
            anyhow::bail!("--duration is for --scenario soak only");
        }
        let plan = if args.quick {
            repro::failover::FailoverPlan::quick()
        } else {
            repro::failover::FailoverPlan::full()
        };
        let dir = repro::run_failover(args.out, args.no_build, plan, command)?;
        println!("{}", dir.display());
        return Ok(());
    }
    if args.duration.is_some() {
        anyhow::bail!("--duration is for --scenario soak only");
    }
    if let name @ ("rolling" | "rolling-quick") = args.scenario.as_str() {
        let quick = args.quick || name == "rolling-quick";
        let dir = repro::rolling::run_rolling(args.out, args.no_build, quick, command)?;
        println!("{}", dir.display());
        return Ok(());
    }
    let name = match (args.quick, args.scenario.as_str()) {
        (false, name) => name.to_string(),
        (true, "reference" | "quick") => "quick".to_string(),
        (true, name) if name.ends_with("-quick") => name.to_string(),
        (true, name) => format!("{name}-quick"),
    };
    let opts = Options {
        scenario: repro::scenario(&name)?,
        rounds: usize::from(args.rounds),
        out: args.out,
        no_build: args.no_build,
        command,
    };
    let dir = repro::run(&opts)?;
    println!("{}", dir.display());
    Ok(())
}
