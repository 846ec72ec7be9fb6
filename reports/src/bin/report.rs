//! `report DIR`: re-render the report of an earlier `cargo repro` run from its
//! `runs.json` and loadgen results.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "report",
    about = "Re-render a reproduction report from its results"
)]
struct Args {
    /// A report directory written by `cargo repro`.
    dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    reports::repro::rerender(&args.dir)?;
    println!("{}", args.dir.display());
    Ok(())
}
