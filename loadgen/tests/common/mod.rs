//! The load generator's test backends: `echo-backend` on 127.0.0.1:0, in echo or stt mode,
//! with its test faults (`drop_every`, `swap`, `stall_all_for`) where a test needs a server
//! that misbehaves in a way the load generator must report.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use echo_backend::{Admission, Config, EchoBackend, Faults, Mode, Stt};

/// What the backend does with data messages.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Echo every message.
    Echo,
    /// Echo every message; the test stalls the whole backend with
    /// [`EchoBackend::stall_all_for`] when it likes.
    Stall,
    /// Echo all but every `n`th data message of each connection.
    DropEvery(u64),
    /// Answer each data message with the previous data message the backend received, from
    /// whichever connection it came.
    Swap,
    /// stt mode, GPU-like: a partial per 20 ms of audio (one per loadgen chunk, numbered per
    /// session from 0) on 64 shared inference slots, a final on session.end.
    Stt,
    /// Every handshake refused with HTTP 503 (no connection may be open).
    Refuse503,
}

#[derive(Debug)]
pub struct Server {
    pub url: String,
    pub backend: EchoBackend,
}

impl Server {
    /// Data messages deliberately not answered.
    pub fn dropped(&self) -> u64 {
        self.backend.stats().dropped_messages
    }
}

pub fn backend_config(behaviour: Behaviour) -> Config {
    let mut config = Config::default();
    match behaviour {
        Behaviour::Echo | Behaviour::Stall => {}
        Behaviour::DropEvery(n) => {
            config.faults = Faults {
                drop_every: Some(n),
                ..Faults::default()
            };
        }
        Behaviour::Swap => {
            config.faults = Faults {
                swap: true,
                ..Faults::default()
            };
        }
        Behaviour::Stt => {
            config.mode = Mode::Stt;
            config.stt = Stt {
                slots: Some(64),
                partial_every: Some(Duration::from_millis(20)),
                ..Stt::default()
            };
        }
        Behaviour::Refuse503 => {
            config.admission = Admission {
                max_connections: Some(0),
                ..Admission::default()
            };
        }
    }
    config
}

pub async fn start(behaviour: Behaviour) -> Server {
    let backend = echo_backend::spawn("127.0.0.1:0".parse().unwrap(), backend_config(behaviour))
        .await
        .unwrap();
    Server {
        url: format!("{}/v1/stream", backend.url()),
        backend,
    }
}

/// A small, fast configuration: `sessions` × 50 msg/s × 1 KiB for `secs` seconds.
pub fn config(url: &str, sessions: usize, secs: u64) -> loadgen::LoadConfig {
    let mut c = loadgen::LoadConfig::new(vec![url.to_owned()]);
    c.sessions = sessions;
    c.rate = 50.0;
    c.size = 1024;
    c.duration = Duration::from_secs(secs);
    c.drain_timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_secs(2);
    c
}

/// Runs the load with an overall bound.
pub async fn run(config: loadgen::LoadConfig) -> loadgen::LoadReport {
    tokio::time::timeout(
        Duration::from_secs(60),
        loadgen::run(config, std::future::pending()),
    )
    .await
    .expect("the run is bounded")
    .expect("the run succeeds")
}
