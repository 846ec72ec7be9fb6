//! The progress report on stderr: a live line redrawn in place on a terminal,
//! and one plain line every few seconds otherwise (CI logs, `repro`'s log
//! files), so a long run is never silent.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a plain line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(crate) enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { next: Instant },
}

impl Progress {
    /// `None` when progress is not wanted.
    pub(crate) fn new(enabled: bool) -> Option<Self> {
        if !enabled {
            return None;
        }
        if !std::io::stderr().is_terminal() {
            return Some(Self::Lines {
                next: Instant::now() + LINE_EVERY,
            });
        }
        let pb = indicatif::ProgressBar::with_draw_target(
            None,
            indicatif::ProgressDrawTarget::stderr_with_hz(2),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg}") {
            pb.set_style(style);
        }
        pb.set_message("connecting...");
        pb.enable_steady_tick(Duration::from_millis(500));
        Some(Self::Bar(pb))
    }

    /// Show `line` (called once a second): redrawn on a terminal, printed when
    /// the last plain line is `LINE_EVERY` old.
    pub(crate) fn update(&mut self, line: String) {
        match self {
            Self::Bar(pb) => pb.set_message(line),
            Self::Lines { next } => {
                let now = Instant::now();
                if now >= *next {
                    eprintln!("loadgen: {}", line.trim_start());
                    *next = now + LINE_EVERY;
                }
            }
        }
    }

    pub(crate) fn finish(self) {
        if let Self::Bar(pb) = self {
            pb.finish_and_clear();
        }
    }
}
