//! Figures over rounds: medians, spreads, same-round ratios and the order the
//! systems are measured in. Pure functions, so the arithmetic a report's claims
//! rest on is unit-tested apart from the machine it ran on.

use serde::{Deserialize, Serialize};

/// The median and the range (min–max) of one figure over the rounds.
///
/// Identical runs on a small VM differ by 15–25 %, so a single value says
/// little; the median resists one bad round, the range shows how much the
/// rounds disagreed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many rounds the figure was computed from.
    pub n: usize,
}

impl Spread {
    /// The spread of the finite values of `values`; `None` when there is none
    /// (a figure no round produced, e.g. a memory base a system does not have).
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let (first, last) = (*v.first()?, *v.last()?);
        Some(Self {
            median: median_of_sorted(&v)?,
            min: first,
            max: last,
            n: v.len(),
        })
    }

    /// `median (min–max)` with `digits` decimals; the median alone for one round,
    /// where a range would only repeat it.
    pub fn display(&self, digits: usize) -> String {
        if self.n <= 1 {
            format!("{:.digits$}", self.median)
        } else {
            format!(
                "{:.digits$} ({:.digits$}–{:.digits$})",
                self.median, self.min, self.max
            )
        }
    }
}

/// The median of sorted values: the middle one, or the mean of the two middle
/// ones for an even count (so two rounds give their mean, not either one).
fn median_of_sorted(sorted: &[f64]) -> Option<f64> {
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

/// The index (into `values`) of the round at the median: the lower middle one
/// for an even count. Charts that draw one run per system (time series) use
/// that round, a real run rather than an average of runs.
pub fn median_index(values: &[f64]) -> Option<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    idx.get(values.len().checked_sub(1)? / 2).copied()
}

/// The order the `systems` are measured in, in round `round` (0-based): a
/// rotation starting with system `round mod systems`.
///
/// Measured always in the same order, the first system would always be the
/// one measured cold and any drift of the machine would always favour the same
/// one; rotating gives each system each position equally often over
/// `systems` rounds.
pub fn round_order(systems: usize, round: usize) -> Vec<usize> {
    if systems == 0 {
        return Vec::new();
    }
    (0..systems).map(|i| (round + i) % systems).collect()
}

/// `ours / theirs` for every round both were measured in, as `(round, ratio)`.
///
/// A ratio within one round compares systems under the same state of the
/// machine; the VM's drift between rounds cancels out of it, which it does not
/// from a ratio of two medians. Rounds where `theirs` is not positive are left
/// out (no meaningful ratio).
pub fn same_round_ratios(ours: &[(usize, f64)], theirs: &[(usize, f64)]) -> Vec<(usize, f64)> {
    ours.iter()
        .filter_map(|&(round, a)| {
            let &(_, b) = theirs.iter().find(|(r, _)| *r == round)?;
            (b > 0.0 && a.is_finite() && b.is_finite()).then_some((round, a / b))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_an_odd_count_takes_the_middle_value() {
        let s = Spread::of([3.0, 1.0, 2.0]);
        assert_eq!(
            s,
            Some(Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0,
                n: 3
            })
        );
    }

    #[test]
    fn spread_of_an_even_count_takes_the_mean_of_the_middle_two() {
        let s = Spread::of([4.0, 1.0, 2.0, 10.0]);
        assert_eq!(
            s.map(|s| (s.median, s.min, s.max, s.n)),
            Some((3.0, 1.0, 10.0, 4))
        );
    }

    #[test]
    fn spread_ignores_non_finite_values_and_is_none_without_values() {
        assert_eq!(Spread::of([]), None);
        assert_eq!(Spread::of([f64::NAN, f64::INFINITY]), None);
        assert_eq!(
            Spread::of([f64::NAN, 5.0]).map(|s| (s.median, s.n)),
            Some((5.0, 1))
        );
    }

    #[test]
    fn spread_display_shows_the_range_only_for_several_rounds() {
        let one = Spread::of([1.234]);
        assert_eq!(one.map(|s| s.display(2)), Some("1.23".to_string()));
        let three = Spread::of([1.0, 2.0, 4.0]);
        assert_eq!(
            three.map(|s| s.display(1)),
            Some("2.0 (1.0–4.0)".to_string())
        );
    }

    #[test]
    fn median_index_points_at_the_median_round() {
        assert_eq!(median_index(&[]), None);
        assert_eq!(median_index(&[7.0]), Some(0));
        assert_eq!(median_index(&[9.0, 1.0, 5.0]), Some(2));
        // Even count: the lower middle one.
        assert_eq!(median_index(&[9.0, 1.0, 5.0, 3.0]), Some(3));
    }

    #[test]
    fn round_order_rotates_the_first_system() {
        assert_eq!(round_order(3, 0), vec![0, 1, 2]);
        assert_eq!(round_order(3, 1), vec![1, 2, 0]);
        assert_eq!(round_order(3, 2), vec![2, 0, 1]);
        assert_eq!(round_order(3, 3), vec![0, 1, 2]);
        assert_eq!(round_order(1, 5), vec![0]);
        assert_eq!(round_order(0, 1), Vec::<usize>::new());
    }

    #[test]
    fn round_order_puts_each_system_in_each_position_once_per_cycle() {
        let k = 4;
        for pos in 0..k {
            let mut at: Vec<usize> = (0..k).map(|r| round_order(k, r)[pos]).collect();
            at.sort_unstable();
            assert_eq!(at, (0..k).collect::<Vec<_>>());
        }
    }

    #[test]
    fn same_round_ratios_pair_rounds_and_skip_missing_or_zero() {
        let ours = [(1, 2.0), (2, 3.0), (3, 4.0)];
        let theirs = [(3, 2.0), (1, 4.0), (2, 0.0)];
        assert_eq!(same_round_ratios(&ours, &theirs), vec![(1, 0.5), (3, 2.0)]);
        assert_eq!(same_round_ratios(&ours, &[]), vec![]);
    }
}
