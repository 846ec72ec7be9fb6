//! Backends: what they are (spec), how we reach them (dialing), the fencing
//! protocol spoken on reused connections, and how their health is judged.

pub mod conn;
pub mod fence;
pub mod health;
pub mod pool;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use conn::{BackendConn, DialError, WsDialer};
pub use health::{Health, HealthThresholds};
pub use pool::{BackendPool, PoolTuning};

/// Whether a backend's connections are reused across sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Reuse {
    /// Sessions are fenced with `session.start` / `session.end` … `session.ended`,
    /// and a connection returns to the pool only after a clean fence.
    #[default]
    Fenced,
    /// Fenced as above, and the backend also speaks `resume`: it tags results
    /// with audio offsets and can take over a session another backend lost
    /// (docs/failover.md). Sessions on such backends fail over; sessions are
    /// only ever moved to such backends.
    Resumable,
    /// The backend does not speak the fencing protocol: each pre-warmed
    /// connection carries one session, then is closed.
    None,
}

impl Reuse {
    /// Sessions are fenced on this backend's connections.
    pub fn fenced(self) -> bool {
        self != Reuse::None
    }
}

impl fmt::Display for Reuse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reuse::Fenced => "fenced",
            Reuse::Resumable => "resumable",
            Reuse::None => "none",
        })
    }
}

impl FromStr for Reuse {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fenced" => Ok(Reuse::Fenced),
            "resumable" => Ok(Reuse::Resumable),
            "none" => Ok(Reuse::None),
            other => Err(format!(
                "unknown reuse mode {other:?} (expected fenced, resumable or none)"
            )),
        }
    }
}

/// The largest `max_size` a backend may have: a pool's idle queue is allocated
/// up front for its whole capacity, and the process's file descriptors run out
/// long before this anyway.
pub const MAX_POOL_SIZE: usize = 65_536;

/// The longest backend id (it is a metrics label and a log field).
pub const MAX_ID_LEN: usize = 200;

/// The longest backend group name.
pub const MAX_GROUP_LEN: usize = 100;

/// One backend row: where it is and how big its pool should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSpec {
    pub id: String,
    pub url: String,
    pub target_size: usize,
    pub max_size: usize,
    pub weight: u32,
    pub enabled: bool,
    pub reuse: Reuse,
    /// The group it serves (docs/pool.md, "Groups and sticky routing"):
    /// a session is routed only among the backends of its group.
    pub group: String,
}

impl BackendSpec {
    /// A spec with the default sizes for `url`, its id derived from the URL.
    pub fn from_url(url: &str, target_size: usize, max_size: usize) -> Self {
        Self {
            id: url
                .trim_start_matches("wss://")
                .trim_start_matches("ws://")
                .trim_end_matches('/')
                .to_string(),
            url: url.to_string(),
            target_size,
            max_size: max_size.max(target_size),
            weight: 1,
            enabled: true,
            reuse: Reuse::Fenced,
            group: crate::route::DEFAULT_GROUP.to_string(),
        }
    }

    /// Reject what cannot work, with a reason an operator can act on.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("empty id".into());
        }
        if self.id.len() > MAX_ID_LEN {
            return Err(format!("id longer than {MAX_ID_LEN} bytes"));
        }
        if self.id.chars().any(char::is_control) {
            return Err("id contains control characters".into());
        }
        conn::BackendAddr::parse(&self.url).map_err(|e| e.to_string())?;
        if self.max_size < self.target_size {
            return Err(format!(
                "max_size {} < target_size {}",
                self.max_size, self.target_size
            ));
        }
        if self.max_size == 0 {
            return Err("max_size is 0".into());
        }
        if self.max_size > MAX_POOL_SIZE {
            return Err(format!(
                "max_size {} is above the limit of {MAX_POOL_SIZE}",
                self.max_size
            ));
        }
        if self.weight == 0 {
            return Err("weight is 0".into());
        }
        validate_group(&self.group)
    }
}

/// A group name: a short printable word, as clients name it in a query parameter.
pub fn validate_group(group: &str) -> Result<(), String> {
    if group.is_empty() {
        return Err("empty group".into());
    }
    if group.len() > MAX_GROUP_LEN {
        return Err(format!("group longer than {MAX_GROUP_LEN} bytes"));
    }
    if !group
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(format!(
            "group {group:?} may hold only ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}
