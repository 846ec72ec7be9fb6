//! Many seeds across cores: a thread per core, each running one simulation
//! at a time on its own current-thread runtime.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pools::PoolKind;
use crate::report::{Row, RunReport, table};
use crate::runner::{RunSpec, run};
use crate::scenario::Scenario;

/// Run every (scenario, pool, seed) and return the reports, in job order.
pub fn sweep(
    scenarios: &[Scenario],
    pools: &[PoolKind],
    seeds: std::ops::RangeInclusive<u64>,
    duration: Option<Duration>,
    threads: usize,
) -> Vec<RunReport> {
    let mut jobs = Vec::new();
    for sc in scenarios {
        for &pool in pools {
            for seed in seeds.clone() {
                jobs.push(RunSpec {
                    scenario: sc.clone(),
                    seed,
                    pool,
                    duration: duration.unwrap_or(sc.duration),
                });
            }
        }
    }
    let jobs = Arc::new(jobs);
    let next = Arc::new(AtomicUsize::new(0));
    let results: Arc<Mutex<Vec<(usize, RunReport)>>> = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let jobs = jobs.clone();
            let next = next.clone();
            let results = results.clone();
            std::thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { return };
                    match run(job) {
                        Ok(r) => {
                            eprintln!(
                                "  {} {} seed {}: {} violations, {:.1} s",
                                r.pool.as_str(),
                                r.scenario,
                                r.seed,
                                r.total_violations(),
                                r.wall_secs
                            );
                            let mut g = match results.lock() {
                                Ok(g) => g,
                                Err(p) => p.into_inner(),
                            };
                            g.push((i, r));
                        }
                        Err(e) => {
                            eprintln!("  could not build a runtime for {}: {e}", job.scenario.name)
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let mut out = match Arc::try_unwrap(results) {
        Ok(m) => match m.into_inner() {
            Ok(v) => v,
            Err(p) => p.into_inner(),
        },
        Err(shared) => match shared.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        },
    };
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// The side-by-side table of `reports`.
pub fn summarize(reports: &[RunReport]) -> String {
    let mut rows: BTreeMap<(String, PoolKind), Row> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for r in reports {
        if !order.contains(&r.scenario) {
            order.push(r.scenario.clone());
        }
        rows.entry((r.scenario.clone(), r.pool)).or_default().add(r);
    }
    table(&rows, &order)
}
