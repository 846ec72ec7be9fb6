//! `sim`: the command line of the fault simulation (docs/architecture.md).
//!
//! ```text
//! sim list
//! sim run   --scenario NAME --seed N [--duration 1h] [--pool ours|naive]
//! sim sweep --scenario NAME --seeds N [--pool ours|naive]
//! ```
//! Without `--pool`, both designs run. Exit status 1 on any invariant
//! violation of `ours` (the naive design's are expected and only reported).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sim::pools::PoolKind;
use sim::scenario::{self, Scenario};
use sim::{RunSpec, run, sweep};

#[derive(Debug, Parser)]
#[command(
    name = "sim",
    about = "Deterministic fault simulation of sttproxy's pool, reconcile worker and sessions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the scenario names, one a line.
    List {
        /// Also print what each scenario injects.
        #[arg(long)]
        verbose: bool,
    },
    /// Run one scenario with one seed.
    Run {
        #[arg(long)]
        scenario: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Length of the fault phase (default: the scenario's).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Pool design (default: both, side by side).
        #[arg(long, value_enum)]
        pool: Option<PoolKind>,
        /// Do not print the event trace of violations.
        #[arg(long)]
        quiet: bool,
    },
    /// Run seeds 1..=N across cores and print the side-by-side table.
    Sweep {
        /// A scenario name, or `all`.
        #[arg(long)]
        scenario: String,
        #[arg(long)]
        seeds: u64,
        #[arg(long, value_enum)]
        pool: Option<PoolKind>,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        /// Also print the first violations (with their traces) of the naive pool.
        #[arg(long)]
        verbose: bool,
    },
}

fn scenarios(name: &str) -> Result<Vec<Scenario>, String> {
    if name == "all" {
        return Ok(scenario::all());
    }
    scenario::find(name)
        .map(|s| vec![s])
        .ok_or_else(|| format!("unknown scenario {name:?}; `sim list` prints them"))
}

fn pools(p: Option<PoolKind>) -> Vec<PoolKind> {
    match p {
        Some(p) => vec![p],
        None => vec![PoolKind::Naive, PoolKind::Ours],
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::List { verbose } => {
            for s in scenario::all() {
                if verbose {
                    println!("{:<14} {}", s.name, s.about);
                } else {
                    println!("{}", s.name);
                }
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            scenario,
            seed,
            duration,
            pool,
            quiet,
        } => {
            let sc = match scenarios(&scenario) {
                Ok(mut v) if v.len() == 1 => v.remove(0),
                Ok(_) => {
                    eprintln!("sim run takes one scenario");
                    return ExitCode::from(2);
                }
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let mut failed = false;
            for kind in pools(pool) {
                let spec = RunSpec {
                    duration: duration.unwrap_or(sc.duration),
                    scenario: sc.clone(),
                    seed,
                    pool: kind,
                };
                match run(&spec) {
                    Ok(r) => {
                        print!("{}", r.render(!quiet));
                        if kind == PoolKind::Ours && r.total_violations() > 0 {
                            failed = true;
                        }
                    }
                    Err(e) => {
                        eprintln!("cannot build the runtime: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Sweep {
            scenario,
            seeds,
            pool,
            duration,
            threads,
            verbose,
        } => {
            let scs = match scenarios(&scenario) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let threads = threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let reports = sweep::sweep(&scs, &pools(pool), 1..=seeds.max(1), duration, threads);
            print!("{}", sweep::summarize(&reports));
            let mut failed = false;
            for r in &reports {
                if r.total_violations() == 0 {
                    continue;
                }
                if r.pool == PoolKind::Ours {
                    failed = true;
                    println!("\nOURS VIOLATED an invariant:");
                    print!("{}", r.render(true));
                }
            }
            if verbose {
                for r in reports
                    .iter()
                    .filter(|r| r.pool == PoolKind::Naive && r.total_violations() > 0)
                {
                    println!();
                    print!("{}", r.render(true));
                }
            }
            let mut naive: Vec<(String, Vec<u64>, String)> = Vec::new();
            for r in reports
                .iter()
                .filter(|r| r.pool == PoolKind::Naive && r.total_violations() > 0)
            {
                match naive.iter_mut().find(|(s, _, _)| *s == r.scenario) {
                    Some((_, seeds, _)) => seeds.push(r.seed),
                    None => naive.push((r.scenario.clone(), vec![r.seed], r.replay())),
                }
            }
            if !naive.is_empty() {
                println!("\nnaive failures (expected; `--verbose` prints their traces):");
                for (scenario, seeds, replay) in naive {
                    let list: Vec<String> = seeds.iter().take(10).map(u64::to_string).collect();
                    let more = if seeds.len() > 10 { " ..." } else { "" };
                    println!(
                        "  {scenario}: {} seeds ({}{more}); replay the first: {replay}",
                        seeds.len(),
                        list.join(" "),
                    );
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
