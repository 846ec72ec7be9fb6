//! `runs.json`: what a reproduction measured, round by round, so `report DIR`
//! can re-render the report from the loadgen results it names.

use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::pool_metrics::PoolRound;
use crate::report::RunNotes;
use crate::results::{MemoryBase, SystemRounds, SystemRun, load_result};

/// The layout version of `runs.json`. 2: rounds, memory bases per system
/// (version 1, without the field, held one run per system).
pub const SCHEMA: u32 = 2;

/// The file (in the report directory) of one round of one system, e.g.
/// `sttproxy-r2.json`; `ext` is `json` (loadgen's result) or `hlog` (its
/// latency interval log).
pub fn round_file(system: &str, round: usize, ext: &str) -> String {
    format!("{system}-r{round}.{ext}")
}

/// The contents of `runs.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunIndex {
    /// [`SCHEMA`]; 0 when the field is missing (a version-1 file).
    #[serde(default)]
    pub schema: u32,
    /// Scenario, command, rounds and their order, skipped systems, notes.
    #[serde(flatten)]
    pub notes: RunNotes,
    pub systems: Vec<SystemEntry>,
}

/// One system: its memory bases and every round it was measured in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemEntry {
    pub name: String,
    pub memory: MemoryBase,
    pub runs: Vec<RoundEntry>,
}

/// One round of one system.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundEntry {
    pub round: usize,
    pub position: usize,
    /// loadgen's result, relative to the report directory.
    pub json: String,
    pub idle_rss_mb: Option<f64>,
    /// sttproxy's pool during the round (absent for other systems and in
    /// files written before it was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolRound>,
}

impl RunIndex {
    /// The index of measured `systems` (each system's memory bases are those of
    /// its first run: they are measured once per start).
    pub fn new(notes: &RunNotes, systems: &[SystemRounds]) -> Self {
        Self {
            schema: SCHEMA,
            notes: notes.clone(),
            systems: systems
                .iter()
                .map(|s| SystemEntry {
                    name: s.name.clone(),
                    memory: s.runs.first().map(|r| r.memory).unwrap_or_default(),
                    runs: s
                        .runs
                        .iter()
                        .map(|r| RoundEntry {
                            round: r.round,
                            position: r.position,
                            json: round_file(&s.name, r.round, "json"),
                            idle_rss_mb: r.idle_rss_mb,
                            pool: r.pool,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join("runs.json");
        std::fs::write(&path, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Read `dir/runs.json`; an older layout is an error that says what to do,
    /// rather than a report silently missing its rounds.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("runs.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let schema = value.get("schema").and_then(serde_json::Value::as_u64);
        if schema != Some(u64::from(SCHEMA)) {
            bail!(
                "{} has schema {} but this report reads schema {SCHEMA} (rounds); run `cargo repro` again to measure with rounds",
                path.display(),
                schema.map_or_else(|| "1 (no schema field)".to_string(), |s| s.to_string())
            );
        }
        serde_json::from_value(value).with_context(|| format!("parsing {}", path.display()))
    }

    /// Every system's rounds, their loadgen results read from `dir`; and one
    /// line for each round whose result is missing or unreadable. Such a round
    /// is left out (the report says so) rather than failing the whole report:
    /// the other systems' figures are still worth reading.
    pub fn systems(&self, dir: &Path) -> (Vec<SystemRounds>, Vec<String>) {
        let mut missing = Vec::new();
        let systems = self
            .systems
            .iter()
            .map(|s| {
                let runs = s
                    .runs
                    .iter()
                    .filter_map(|r| match load_result(&dir.join(&r.json)) {
                        Ok(result) => Some(SystemRun {
                            name: s.name.clone(),
                            round: r.round,
                            position: r.position,
                            result,
                            idle_rss_mb: r.idle_rss_mb,
                            memory: s.memory,
                            pool: r.pool,
                        }),
                        Err(e) => {
                            missing.push(format!(
                                "result of {} round {}: {e:#}; the round is left out",
                                s.name, r.round
                            ));
                            None
                        }
                    })
                    .collect();
                SystemRounds {
                    name: s.name.clone(),
                    runs,
                }
            })
            .collect();
        (systems, missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_files_are_named_by_system_and_round() {
        assert_eq!(round_file("nginx", 3, "hlog"), "nginx-r3.hlog");
    }

    #[test]
    fn a_version_1_runs_json_is_refused_with_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let v1 = r#"{"scenario":"quick","command":"cargo repro","systems":[{"name":"sttproxy","json":"sttproxy.json","idle_rss_mb":1.0}],"skipped":[],"notes":[]}"#;
        if let Err(e) = std::fs::write(dir.join("runs.json"), v1) {
            panic!("writing runs.json: {e}");
        }
        let err = match RunIndex::load(dir) {
            Ok(_) => panic!("a version-1 file must be refused"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("run `cargo repro` again"), "{err}");
    }

    #[test]
    fn an_index_survives_save_and_load() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let index = RunIndex {
            schema: SCHEMA,
            notes: RunNotes {
                scenario: "quick".into(),
                command: "cargo repro --quick --rounds 2".into(),
                rounds: 2,
                orders: vec![
                    vec!["sttproxy".into(), "nginx".into()],
                    vec!["nginx".into(), "sttproxy".into()],
                ],
                skipped: vec![],
                notes: vec!["a note".into()],
                missing: vec![],
            },
            systems: vec![SystemEntry {
                name: "sttproxy".into(),
                memory: MemoryBase {
                    no_backends_mb: Some(8.0),
                    warm_pool_mb: Some(12.0),
                },
                runs: vec![RoundEntry {
                    round: 2,
                    position: 1,
                    json: round_file("sttproxy", 2, "json"),
                    idle_rss_mb: Some(13.0),
                    pool: None,
                }],
            }],
        };
        if let Err(e) = index.save(dir) {
            panic!("saving: {e:#}");
        }
        let back = match RunIndex::load(dir) {
            Ok(b) => b,
            Err(e) => panic!("loading: {e:#}"),
        };
        assert_eq!(back.notes.rounds, 2);
        assert_eq!(back.notes.orders, index.notes.orders);
        assert_eq!(back.notes.notes, ["a note"]);
        assert_eq!(back.systems[0].memory, index.systems[0].memory);
        assert_eq!(back.systems[0].runs[0].json, "sttproxy-r2.json");
    }
}
