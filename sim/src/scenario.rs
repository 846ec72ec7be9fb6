//! The scenarios: each names a load and the faults injected while the fault
//! phase lasts. After it, faults stop (backends back up, knobs off), the load
//! stops, and the run checks that every pool settles at its target within the
//! stated bound and that shutdown leaves nothing behind.

use std::time::Duration;

use crate::backend::{BackendSpec, Faults, Mode};

/// Client arrivals and behaviour.
#[derive(Debug, Clone)]
pub struct Load {
    /// Poisson arrivals per second during the fault phase.
    pub arrivals_per_s: f64,
    /// Clients arriving all at once when the fault phase starts.
    pub herd: usize,
    /// Audio chunks per session, uniform.
    pub chunks: (u32, u32),
    /// Milliseconds between chunks, uniform per session.
    pub interval_ms: (u64, u64),
    pub chunk_bytes: usize,
    /// Clients that vanish mid-stream / send a Close mid-stream / vanish
    /// right after `session.end`; the rest end gracefully.
    pub vanish_p: f64,
    pub close_p: f64,
    pub vanish_in_finish_p: f64,
    /// Graceful clients that forge a `session.ended` right before their
    /// `session.end` (`client::Forge`, one shape each, uniform).
    pub forge_p: f64,
}

/// Backends crashing and coming back.
#[derive(Debug, Clone, Copy)]
pub struct Crashes {
    pub up_mean: Duration,
    pub down_mean: Duration,
}

/// Scripted crashes, one cycle every `period` of the fault phase: in cycle
/// `n`, `at` into it, backends `n`, `n+1`, … (mod the count) crash in turn,
/// `crashes` of them, `gap_ms` apart (uniform); all come back `down` after the
/// first crash.
#[derive(Debug, Clone, Copy)]
pub struct CrashCycle {
    pub period: Duration,
    pub at: Duration,
    pub crashes: usize,
    pub gap_ms: (u64, u64),
    pub down: Duration,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub backends: usize,
    pub target: usize,
    pub max: usize,
    pub backend: BackendSpec,
    /// With `backend.resume`: the last this many backends do not speak
    /// `resume` (they are `fenced`).
    pub fenced_backends: usize,
    pub load: Load,
    /// Milliseconds between live target changes (uniform), if any.
    pub storm_ms: Option<(u64, u64)>,
    pub crashes: Option<Crashes>,
    pub crash_cycle: Option<CrashCycle>,
    /// Overrides the proxy's default `failover_timeout` (5 s).
    pub failover_timeout: Option<Duration>,
    /// No load, no faults: pools warm up.
    pub warmup: Duration,
    /// Default length of the fault phase (`--duration` overrides).
    pub duration: Duration,
    pub health_interval: Duration,
    pub health_timeout: Duration,
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn base() -> Scenario {
    Scenario {
        name: "",
        about: "",
        backends: 2,
        target: 8,
        max: 12,
        backend: BackendSpec {
            mode: Mode::Echo,
            dial_ms: (1, 20),
            result_ms: (5, 60),
            reflect_json: false,
            resume: false,
            resume_from_zero: false,
            faults: Faults::default(),
        },
        fenced_backends: 0,
        load: Load {
            arrivals_per_s: 1.5,
            herd: 0,
            chunks: (4, 24),
            interval_ms: (250, 600),
            chunk_bytes: 160,
            vanish_p: 0.0,
            close_p: 0.0,
            vanish_in_finish_p: 0.0,
            forge_p: 0.0,
        },
        storm_ms: None,
        crashes: None,
        crash_cycle: None,
        failover_timeout: None,
        warmup: secs(10),
        duration: secs(600),
        health_interval: secs(10),
        health_timeout: secs(2),
    }
}

/// Every scenario, in `sim list` order.
pub fn all() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "steady",
            about: "baseline: steady sessions, no faults",
            ..base()
        },
        Scenario {
            name: "dial-faults",
            about: "dials refused (40%), slow (up to 2 s extra) or hanging (5%); idle connections die to force redials",
            backend: BackendSpec {
                faults: Faults {
                    dial_fail_p: 0.4,
                    dial_delay_ms: (0, 2000),
                    dial_hang_p: 0.05,
                    idle_death_mean: Some(secs(40)),
                    ..Faults::default()
                },
                ..base().backend
            },
            ..base()
        },
        Scenario {
            name: "conn-deaths",
            about: "connections die idle (reset or EOF) and leased (15% of sessions); finals too late for the drain timeout (5%)",
            backend: BackendSpec {
                mode: Mode::Stt,
                result_ms: (50, 400),
                faults: Faults {
                    idle_death_mean: Some(secs(30)),
                    leased_death_p: 0.15,
                    late_final_p: 0.05,
                    late_final_ms: (4000, 9000),
                    ..Faults::default()
                },
                ..base().backend
            },
            ..base()
        },
        Scenario {
            name: "late-pongs",
            about: "health checks every 1 s race busy sessions: 30% of pongs late (0.1-0.6 s vs a 0.3 s timeout), 2% of pinged connections stall for good",
            backend: BackendSpec {
                faults: Faults {
                    late_pong_p: 0.3,
                    pong_delay_ms: (100, 600),
                    stall_p: 0.02,
                    ..Faults::default()
                },
                ..base().backend
            },
            load: Load {
                arrivals_per_s: 3.0,
                chunks: (2, 10),
                ..base().load
            },
            health_interval: secs(1),
            health_timeout: Duration::from_millis(300),
            ..base()
        },
        Scenario {
            name: "backend-crash",
            about: "3 backends crash (all connections drop, dials refused) and come back: up ~40 s, down ~10 s",
            backends: 3,
            crashes: Some(Crashes {
                up_mean: secs(40),
                down_mean: secs(10),
            }),
            ..base()
        },
        Scenario {
            name: "config-storm",
            about: "a live target change every 10-30 ms (~3,000 per simulated minute) while sessions come and go",
            max: 16,
            storm_ms: Some((10, 30)),
            load: Load {
                arrivals_per_s: 2.0,
                ..base().load
            },
            ..base()
        },
        Scenario {
            name: "client-churn",
            about: "8 sessions/s on small, saturated pools (target 4, max 6): 30% vanish mid-stream, 15% close mid-stream, 15% vanish right after session.end; waiters take the connections they hand back",
            target: 4,
            max: 6,
            load: Load {
                arrivals_per_s: 8.0,
                chunks: (1, 8),
                interval_ms: (100, 300),
                vanish_p: 0.3,
                close_p: 0.15,
                vanish_in_finish_p: 0.15,
                ..base().load
            },
            ..base()
        },
        Scenario {
            name: "cold-start",
            about: "thundering herd: 400 clients arrive at once on cold pools (target 32, max 48, dials 50-300 ms)",
            target: 32,
            max: 48,
            warmup: Duration::ZERO,
            backend: BackendSpec {
                dial_ms: (50, 300),
                ..base().backend
            },
            load: Load {
                herd: 400,
                arrivals_per_s: 2.0,
                ..base().load
            },
            ..base()
        },
        Scenario {
            name: "chaos",
            about: "everything at once, milder: dial faults, deaths, late pongs, crashes, a target change every 0.2-2 s, churn",
            backends: 3,
            max: 16,
            backend: BackendSpec {
                mode: Mode::Stt,
                result_ms: (20, 300),
                faults: Faults {
                    dial_fail_p: 0.2,
                    dial_delay_ms: (0, 800),
                    dial_hang_p: 0.02,
                    idle_death_mean: Some(secs(60)),
                    leased_death_p: 0.05,
                    late_pong_p: 0.2,
                    pong_delay_ms: (500, 3000),
                    stall_p: 0.01,
                    late_final_p: 0.03,
                    late_final_ms: (4000, 8000),
                    ..Faults::default()
                },
                ..base().backend
            },
            load: Load {
                arrivals_per_s: 3.0,
                vanish_p: 0.1,
                close_p: 0.05,
                vanish_in_finish_p: 0.05,
                ..base().load
            },
            storm_ms: Some((200, 2000)),
            crashes: Some(Crashes {
                up_mean: secs(60),
                down_mean: secs(8),
            }),
            health_interval: secs(3),
            ..base()
        },
        Scenario {
            name: "forged-fence",
            about: "40% of clients forge a session.ended of their own right before session.end (plain, with a guessed fence, keys reordered, \\u-escaped, as binary); backends reflect client JSON back as text; small pools reuse every connection",
            target: 6,
            max: 8,
            backend: BackendSpec {
                reflect_json: true,
                ..base().backend
            },
            load: Load {
                arrivals_per_s: 2.0,
                chunks: (0, 10),
                interval_ms: (100, 400),
                forge_p: 0.4,
                ..base().load
            },
            ..base()
        },
        Scenario {
            name: "late-frame",
            about: "backends send one more frame of a session after its session.ended: in the same write (20%), or 1 ms-3 s later onto the idle connection (20%); small pools reuse every connection",
            target: 6,
            max: 8,
            backend: BackendSpec {
                faults: Faults {
                    late_after_ended_p: 0.2,
                    late_idle_p: 0.2,
                    late_idle_ms: (1, 3000),
                    ..Faults::default()
                },
                ..base().backend
            },
            load: Load {
                arrivals_per_s: 2.0,
                chunks: (1, 10),
                interval_ms: (100, 400),
                ..base().load
            },
            ..base()
        },
        Scenario {
            name: "failover-crash",
            about: "failover: every 30 s one backend crashes with sessions in flight (10 s down); 3 resumable backends and 1 fenced one; sessions on a resumable one carry on on another",
            backends: 4,
            fenced_backends: 1,
            crash_cycle: Some(CrashCycle {
                crashes: 1,
                ..failover_cycle()
            }),
            ..failover_base()
        },
        Scenario {
            name: "failover-twice",
            about: "failover: every 30 s two of 3 resumable backends crash in turn, 0.2-1.5 s apart; sessions moved to the second move again, to the third",
            crash_cycle: Some(CrashCycle {
                crashes: 2,
                gap_ms: (200, 1500),
                ..failover_cycle()
            }),
            ..failover_base()
        },
        Scenario {
            name: "failover-down",
            about: "failover: every 30 s both resumable backends crash, 0-1 s apart: no healthy backend, every session in flight gets 1014 within failover_timeout (2 s here, below acquire_timeout: the relay's own deadline ends the wait)",
            backends: 2,
            failover_timeout: Some(secs(2)),
            crash_cycle: Some(CrashCycle {
                crashes: 2,
                gap_ms: (0, 1000),
                ..failover_cycle()
            }),
            ..failover_base()
        },
        Scenario {
            name: "failover-chaos",
            about: "failover under everything: leased connections die (20%), idle ones die, dials fail, late finals, late pongs, two of 3 backends crashing 0-4 s apart every 30 s, a target change every 0.5-3 s",
            max: 16,
            backend: BackendSpec {
                faults: Faults {
                    dial_fail_p: 0.2,
                    dial_delay_ms: (0, 800),
                    idle_death_mean: Some(secs(60)),
                    leased_death_p: 0.2,
                    late_pong_p: 0.2,
                    pong_delay_ms: (500, 3000),
                    late_final_p: 0.03,
                    late_final_ms: (4000, 8000),
                    ..Faults::default()
                },
                ..failover_base().backend
            },
            storm_ms: Some((500, 3000)),
            crash_cycle: Some(CrashCycle {
                crashes: 2,
                gap_ms: (0, 4000),
                ..failover_cycle()
            }),
            health_interval: secs(3),
            ..failover_base()
        },
    ]
}

/// The failover scenarios' common ground: resumable stt backends, clients
/// streaming 2-12 s of audio (5% each vanish or close mid-stream, or vanish
/// right after `session.end`), a crash cycle every 30 s.
fn failover_base() -> Scenario {
    Scenario {
        backends: 3,
        backend: BackendSpec {
            mode: Mode::Stt,
            result_ms: (5, 120),
            resume: true,
            ..base().backend
        },
        load: Load {
            arrivals_per_s: 2.0,
            chunks: (8, 24),
            interval_ms: (250, 500),
            vanish_p: 0.05,
            close_p: 0.05,
            vanish_in_finish_p: 0.05,
            ..base().load
        },
        duration: secs(300),
        ..base()
    }
}

fn failover_cycle() -> CrashCycle {
    CrashCycle {
        period: secs(30),
        at: secs(10),
        crashes: 1,
        gap_ms: (0, 0),
        down: secs(10),
    }
}

/// The scenario called `name`.
pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}
