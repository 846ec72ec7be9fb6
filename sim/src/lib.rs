//! `sim`: a deterministic fault simulation of sttproxy's pool, reconcile
//! worker and sessions.
//!
//! It drives the production code — `sttproxy_pool::ConnPool`, the
//! `ReconcileWorker`, the health checks and the session relay with its fencing
//! (`sttproxy::session::run_leased`) — under a virtual clock (tokio's paused
//! time on a current-thread runtime) over in-memory transports that inject
//! faults, everything drawn from one seed. A naive pool built as the reference
//! write-up's first design runs the same scenarios behind the same trait, so
//! its failures show beside ours.
//!
//! Modules, one concern each: `runtime` (clock, runtime, seeded randomness),
//! `tasks` (the task-count guard), `transport` (in-memory links), `backend`
//! (backend emulation), `client` (client emulation), `sessions` (routing and
//! the production session), `pools` (the pools under test), `truth` and
//! `world` (what really happened), `checker`, `invariants` and `ledger` (what must
//! hold), `trace`, `scenario`, `runner`, `report`, `sweep`; the binary is the CLI.

pub mod backend;
pub mod checker;
pub mod client;
pub mod invariants;
pub mod ledger;
pub mod pools;
pub mod report;
pub mod runner;
pub mod runtime;
pub mod scenario;
pub mod sessions;
pub mod sweep;
pub mod tasks;
pub mod trace;
pub mod transport;
pub mod truth;
pub mod world;

pub use pools::PoolKind;
pub use report::RunReport;
pub use runner::{RunSpec, run};
