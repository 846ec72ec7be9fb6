//! Reports for sttproxy's performance claims: read loadgen results, chart them
//! (plotters: SVG, and PNG with a bundled font), write `report.md` /
//! `report.html`; and the `repro` orchestrator behind `cargo repro`.

pub mod charts;
pub mod hlog;
pub mod procs;
pub mod report;
pub mod repro;
pub mod results;
pub mod stats;
