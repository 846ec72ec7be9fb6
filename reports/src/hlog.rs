//! loadgen's latency interval logs (`<system>-r<round>.hlog`, HdrHistogram
//! interval log format, one V2-deflate histogram a second, values in µs), read
//! back and merged, and the percentile curve a report draws from them.
//!
//! The JSON result holds only five percentiles; the log holds every recorded
//! latency, so the curve can show the tail between them (99.9 → 99.99 %).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

/// Why an interval log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HlogError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an interval log: {what}")]
    Format { path: PathBuf, what: String },
    #[error("{path}: a histogram does not decode: {what}")]
    Histogram { path: PathBuf, what: String },
}

/// The percentiles a curve is drawn at: from 0 to 99.999 %, denser towards the
/// tail so every decade of `1/(1-p)` has points.
pub const CURVE_PERCENTILES: [f64; 20] = [
    0.0, 10.0, 25.0, 50.0, 60.0, 70.0, 75.0, 80.0, 85.0, 90.0, 93.0, 95.0, 97.0, 99.0, 99.5, 99.7,
    99.9, 99.95, 99.99, 99.999,
];

/// Every interval of the log at `path`, merged into one histogram (µs).
pub fn load(path: &Path) -> Result<Histogram<u64>, HlogError> {
    let bytes = std::fs::read(path).map_err(|source| HlogError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes).map_err(|e| match e {
        ParseError::Format(what) => HlogError::Format {
            path: path.to_path_buf(),
            what,
        },
        ParseError::Histogram(what) => HlogError::Histogram {
            path: path.to_path_buf(),
            what,
        },
    })
}

enum ParseError {
    Format(String),
    Histogram(String),
}

fn parse(bytes: &[u8]) -> Result<Histogram<u64>, ParseError> {
    let mut total = Histogram::<u64>::new(3).map_err(|e| ParseError::Histogram(e.to_string()))?;
    let mut deserializer = Deserializer::new();
    for entry in IntervalLogIterator::new(bytes) {
        let entry = entry.map_err(|e| ParseError::Format(format!("{e:?}")))?;
        let LogEntry::Interval(interval) = entry else {
            continue;
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(interval.encoded_histogram())
            .map_err(|e| ParseError::Histogram(e.to_string()))?;
        let h: Histogram<u64> = deserializer
            .deserialize(&mut raw.as_slice())
            .map_err(|e| ParseError::Histogram(format!("{e:?}")))?;
        total
            .add(&h)
            .map_err(|e| ParseError::Histogram(format!("{e:?}")))?;
    }
    Ok(total)
}

/// The x of percentile `p` (in %) on the usual log scale: `1 / (1 − p)`, so
/// 90 % is 10, 99 % is 100, 99.9 % is 1000.
pub fn percentile_x(p: f64) -> f64 {
    1.0 / (1.0 - p / 100.0)
}

/// The curve of a histogram of µs: `(1/(1-p), latency ms)` at each of
/// [`CURVE_PERCENTILES`] the histogram has samples to resolve (a percentile
/// finer than 1/count repeats the maximum, so it is left out). Empty for an
/// empty histogram.
pub fn curve(hist: &Histogram<u64>) -> Vec<(f64, f64)> {
    let n = hist.len();
    if n == 0 {
        return Vec::new();
    }
    CURVE_PERCENTILES
        .iter()
        .filter(|&&p| (1.0 - p / 100.0) * n as f64 >= 1.0 - 1e-9)
        .map(|&p| {
            let us = hist.value_at_quantile(p / 100.0);
            (percentile_x(p), us as f64 / 1000.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::V2DeflateSerializer;
    use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
    use std::time::{Duration, SystemTime};

    /// An interval log as loadgen writes it, of `seconds` (µs values).
    fn log(seconds: &[&[u64]]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ser = V2DeflateSerializer::new();
        {
            let mut writer = IntervalLogWriterBuilder::new()
                .with_start_time(SystemTime::UNIX_EPOCH)
                .with_max_value_divisor(1000.0)
                .begin_log_with(&mut out, &mut ser)
                .unwrap();
            for (i, values) in seconds.iter().enumerate() {
                let mut h = Histogram::<u64>::new(3).unwrap();
                for v in *values {
                    h.record(*v).unwrap();
                }
                writer
                    .write_histogram(
                        &h,
                        Duration::from_secs(i as u64),
                        Duration::from_secs(1),
                        None,
                    )
                    .unwrap();
            }
        }
        out
    }

    #[test]
    fn every_interval_is_merged() {
        let h = match parse(&log(&[&[1000, 2000], &[3000], &[]])) {
            Ok(h) => h,
            Err(_) => panic!("the log parses"),
        };
        assert_eq!(h.len(), 3);
        assert_eq!(h.max(), h.highest_equivalent(3000));
    }

    #[test]
    fn the_curve_is_in_ms_on_the_inverse_tail_scale_and_stops_at_the_resolution() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let c = curve(&h);
        let at = |x: f64| c.iter().find(|p| (p.0 / x - 1.0).abs() < 1e-9).map(|p| p.1);
        assert!((at(2.0).unwrap() - 500.0).abs() < 1.0, "{c:?}");
        assert!((at(100.0).unwrap() - 990.0).abs() < 1.0, "{c:?}");
        assert!(at(1000.0).is_some(), "99.9 % resolves with 1000 samples");
        assert!(at(10_000.0).is_none(), "99.99 % does not: {c:?}");
        assert!(curve(&Histogram::<u64>::new(3).unwrap()).is_empty());
        assert!((percentile_x(99.9) - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn garbage_is_an_error_not_an_empty_curve() {
        assert!(
            parse(b"#[StartTime: 1.0 (seconds since epoch)]\n0.0,1.0,1.0,!!notbase64\n").is_err()
        );
    }
}
