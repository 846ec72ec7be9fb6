//! Configuration: static settings (a TOML file and flags), the backend table
//! in a database (SQLite by default, PostgreSQL for fleets), and the live sync
//! that applies the table to the running pools.

pub mod db;
pub mod settings;
pub mod sync;

pub use settings::{BackendEntry, ConfigError, LogFormat, Settings, StickySettings};
