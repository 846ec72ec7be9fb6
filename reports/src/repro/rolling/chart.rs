//! The rolling scenario's chart: streaming sessions open (top) and short
//! sessions a second, completed and failed (bottom), over the run, each
//! hand-over shaded from the new process's start to its ready line and the
//! backend add marked.

use plotters::coord::Shift;
use plotters::prelude::*;

use super::load::Sample;
use crate::charts::{Chart, color_of, draw_legend, line_key};

/// A span of the run to shade and name.
#[derive(Debug, Clone)]
pub struct Span {
    pub label: String,
    pub from: f64,
    pub to: f64,
}

#[derive(Debug)]
pub struct RollingChart {
    pub title: String,
    pub samples: Vec<Sample>,
    pub spans: Vec<Span>,
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e:?}")
}

/// Per sample interval: (end of the interval, completed connects a second,
/// failed connects a second).
pub fn connect_rates(samples: &[Sample]) -> Vec<(f64, f64, f64)> {
    samples
        .windows(2)
        .filter(|w| w[1].t > w[0].t)
        .map(|w| {
            let dt = w[1].t - w[0].t;
            (
                w[1].t,
                (w[1].connects_ok - w[0].connects_ok) as f64 / dt,
                (w[1].connects_failed - w[0].connects_failed) as f64 / dt,
            )
        })
        .collect()
}

/// A panel's line: its legend, colour and points.
type Line<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

const FAILED: RGBColor = RGBColor(0xcc, 0x00, 0x00);
const SPAN: RGBColor = RGBColor(0x99, 0x99, 0x99);

impl RollingChart {
    /// The run's length, plus room for the last span's label.
    fn x_max(&self) -> f64 {
        self.samples.last().map_or(1.0, |s| s.t).max(1.0) * 1.08
    }

    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        caption: Option<&str>,
        y_label: &str,
        lines: &[Line<'_>],
    ) -> anyhow::Result<()> {
        let y_max = lines
            .iter()
            .flat_map(|l| l.2.iter().map(|p| p.1))
            .fold(1.0f64, f64::max)
            * 1.2;
        let mut builder = ChartBuilder::on(area);
        builder
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70);
        if let Some(c) = caption {
            builder.caption(c, ("sans-serif", 22));
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..self.x_max(), 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("seconds since the load started")
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for s in &self.spans {
            // A hand-over takes well under a second: at least a visible band.
            let to = s.to.max(s.from + self.x_max() / 300.0);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(s.from, 0.0), (to, y_max)],
                    SPAN.mix(0.35).filled(),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    s.label.clone(),
                    (to, y_max * 0.97),
                    ("sans-serif", 13),
                )))
                .map_err(err)?;
        }
        for (name, color, points) in lines {
            let color = *color;
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(*name)
                .legend(line_key(color, 3));
        }
        draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        Ok(())
    }
}

impl Chart for RollingChart {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        area.fill(&WHITE).map_err(err)?;
        let (top, bottom) = area.split_vertically(area.dim_in_pixel().1 / 2);
        let open: Vec<(f64, f64)> = self.samples.iter().map(|s| (s.t, s.open as f64)).collect();
        let lost: Vec<(f64, f64)> = self.samples.iter().map(|s| (s.t, s.lost as f64)).collect();
        self.panel(
            &top,
            Some(&self.title),
            "sessions",
            &[
                ("streaming sessions open", color_of("sttproxy"), open),
                ("sessions lost (total)", FAILED, lost),
            ],
        )?;
        let rates = connect_rates(&self.samples);
        self.panel(
            &bottom,
            None,
            "connects / s",
            &[
                (
                    "short sessions completed / s",
                    color_of("python"),
                    rates.iter().map(|r| (r.0, r.1)).collect(),
                ),
                (
                    "failed / s",
                    FAILED,
                    rates.iter().map(|r| (r.0, r.2)).collect(),
                ),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_rates_are_per_second_over_each_interval() {
        let s = |t, ok, failed| Sample {
            t,
            open: 0,
            connects_ok: ok,
            connects_failed: failed,
            lost: 0,
        };
        let r = connect_rates(&[s(0.0, 0, 0), s(0.5, 10, 0), s(1.0, 30, 1)]);
        assert_eq!(r, vec![(0.5, 20.0, 0.0), (1.0, 40.0, 2.0)]);
    }

    #[test]
    fn the_chart_renders() {
        let tmp = tempfile::tempdir().unwrap();
        crate::charts::register_font().unwrap();
        let samples = (0..10)
            .map(|i| Sample {
                t: f64::from(i) * 0.5,
                open: 5,
                connects_ok: u64::from(i as u32) * 10,
                connects_failed: 0,
                lost: 0,
            })
            .collect();
        let chart = RollingChart {
            title: "test".into(),
            samples,
            spans: vec![Span {
                label: "r0".into(),
                from: 1.0,
                to: 1.2,
            }],
        };
        let svg = crate::charts::render(&chart, tmp.path(), "rolling").unwrap();
        assert!(svg.contains("streaming sessions open"));
        assert!(tmp.path().join("rolling.png").is_file());
    }
}
