//! Charts with plotters: each chart is drawn once per backend, as SVG (inline
//! in report.html, no font needed) and as PNG (text with the DejaVu Sans file
//! shipped in `reports/assets`, so no system fontconfig is needed).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

const SIZE: (u32, u32) = (960, 480);

/// Make the bundled font the one PNG text is drawn with. Idempotent.
pub fn register_font() -> anyhow::Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the bundled font could not be loaded"))
}

/// A system's colour, the same in every chart.
pub fn color_of(system: &str) -> RGBColor {
    match system {
        s if s.starts_with("sttproxy") => RGBColor(0xd5, 0x5e, 0x00),
        s if s.starts_with("python") => RGBColor(0x00, 0x72, 0xb2),
        s if s.starts_with("nginx") => RGBColor(0x00, 0x9e, 0x73),
        s if s.contains("Go") => RGBColor(0x56, 0xb4, 0xe9),
        s if s.contains("Python") => RGBColor(0xcc, 0x79, 0xa7),
        _ => RGBColor(0x55, 0x55, 0x55),
    }
}

/// One named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed: a reference level (e.g. the offered rate) next to the
    /// solid measured line of the same system and colour.
    pub dashed: bool,
}

impl Series {
    /// A solid line.
    pub fn line(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            dashed: false,
        }
    }

    /// A dashed line.
    pub fn dashed(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
            dashed: true,
        }
    }
}

/// A chart that can draw itself on any plotters backend.
pub trait Chart {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> anyhow::Result<()>;
}

/// Render `chart` to `<dir>/<name>.svg` and `<dir>/<name>.png`; returns the SVG text.
pub fn render(chart: &impl Chart, dir: &Path, name: &str) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let area = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        chart.draw(&area)?;
        area.present()
            .map_err(|e| anyhow::anyhow!("svg {name}: {e}"))?;
    }
    std::fs::write(dir.join(format!("{name}.svg")), &svg)?;
    let png = dir.join(format!("{name}.png"));
    {
        let area = BitMapBackend::new(&png, SIZE).into_drawing_area();
        chart.draw(&area)?;
        area.present()
            .map_err(|e| anyhow::anyhow!("png {name}: {e}"))?;
    }
    Ok(svg)
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing: {e:?}")
}

/// The legend every chart here draws: the series' labels in a white box
/// with a black border, 14 px text, at `position`.
pub fn draw_legend<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    DB: DrawingBackend + 'a,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(position)
        .draw()
        .map_err(err)
}

/// A legend entry for a line of `color`: a short stroke `width` px wide.
pub fn line_key(color: RGBColor, width: u32) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
}

/// Lines over time, one per system.
#[derive(Debug)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

impl Chart for LineChart {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        area.fill(&WHITE).map_err(err)?;
        let x_max = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .fold(1.0f64, f64::max);
        let y_max = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.1;
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for s in &self.series {
            let color = color_of(&s.name);
            let drawn = if s.dashed {
                chart.draw_series(DashedLineSeries::new(
                    s.points.iter().copied(),
                    8,
                    5,
                    color.stroke_width(2),
                ))
            } else {
                chart.draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
            };
            let dashed = s.dashed;
            drawn
                .map_err(err)?
                .label(&s.name)
                .legend(line_key(color, if dashed { 1 } else { 3 }));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        Ok(())
    }
}

/// One bar: its height and, when the figure varied over rounds, a whisker
/// from `low` to `high` (so a chart shows how far the rounds disagreed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

impl Bar {
    /// A bar without a whisker (a single figure, e.g. a quoted one).
    pub fn point(value: f64) -> Self {
        Self {
            value,
            low: value,
            high: value,
        }
    }

    /// A bar at the median of `s`, its whisker over the range.
    pub fn spread(s: &crate::stats::Spread) -> Self {
        Self {
            value: s.median,
            low: s.min,
            high: s.max,
        }
    }
}

/// Grouped bars: for each category (x), one bar per system.
#[derive(Debug)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    /// (system, one bar per category); a missing value is `None`.
    pub groups: Vec<(String, Vec<Option<Bar>>)>,
    /// Logarithmic y axis (for values spanning orders of magnitude).
    pub log_y: bool,
}

impl Chart for BarChart {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        area.fill(&WHITE).map_err(err)?;
        let values = self
            .groups
            .iter()
            .flat_map(|g| g.1.iter().flatten().flat_map(|b| [b.value, b.low, b.high]));
        // Headroom for the legend above the tallest bar: on a log axis a
        // factor is a distance, so it takes a larger one.
        let headroom = if self.log_y { 12.0 } else { 1.3 };
        let y_max = values.clone().fold(0.0f64, f64::max).max(1e-6) * headroom;
        let y_min = values.filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
        let n_cat = self.categories.len().max(1);
        let n_grp = self.groups.len().max(1);
        let categories = self.categories.clone();
        let label = move |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < categories.len() {
                categories[i as usize].clone()
            } else {
                String::new()
            }
        };
        let width = 0.8 / n_grp as f64;
        macro_rules! draw_bars {
            ($chart:expr, $floor:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .disable_x_mesh()
                    .x_labels(n_cat * 2 + 1)
                    .x_label_formatter(&label)
                    .y_desc(&self.y_label)
                    .label_style(("sans-serif", 14))
                    .draw()
                    .map_err(err)?;
                for (g, (system, vals)) in self.groups.iter().enumerate() {
                    let color = color_of(system);
                    let x0 = |c: usize| c as f64 - 0.4 + g as f64 * width;
                    let bars = vals.iter().enumerate().filter_map(|(c, b)| {
                        let b = (*b)?;
                        Some(Rectangle::new(
                            [(x0(c), $floor), (x0(c) + width * 0.92, b.value.max($floor))],
                            color.filled(),
                        ))
                    });
                    chart
                        .draw_series(bars)
                        .map_err(err)?
                        .label(system)
                        .legend(move |(x, y)| {
                            Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled())
                        });
                    let whiskers = vals.iter().enumerate().filter_map(|(c, b)| {
                        let b = (*b).filter(|b| b.high > b.low)?;
                        let (mid, cap) = (x0(c) + width * 0.46, width * 0.2);
                        let (lo, hi) = (b.low.max($floor), b.high.max($floor));
                        Some(PathElement::new(
                            vec![
                                (mid - cap, lo),
                                (mid + cap, lo),
                                (mid, lo),
                                (mid, hi),
                                (mid - cap, hi),
                                (mid + cap, hi),
                            ],
                            BLACK.stroke_width(2),
                        ))
                    });
                    chart.draw_series(whiskers).map_err(err)?;
                }
                draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
            }};
        }
        let x_range = -0.6..(n_cat as f64 - 0.4);
        if self.log_y && y_min.is_finite() {
            let floor = y_min / 3.0;
            let chart = ChartBuilder::on(area)
                .caption(&self.title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x_range, (floor..y_max).log_scale())
                .map_err(err)?;
            draw_bars!(chart, floor);
        } else {
            let chart = ChartBuilder::on(area)
                .caption(&self.title, ("sans-serif", 22))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x_range, 0.0..y_max)
                .map_err(err)?;
            draw_bars!(chart, 0.0);
        }
        Ok(())
    }
}

/// Latency by percentile, one curve per system, on the usual HdrHistogram
/// scale: x is `1/(1-p)` on a log axis, so 90, 99, 99.9 and 99.99 % are
/// equally far apart and the tail is not squeezed into the right edge.
/// Points are `(1/(1-p), ms)` ([`crate::hlog::curve`]).
#[derive(Debug)]
pub struct PercentileChart {
    pub title: String,
    pub series: Vec<Series>,
}

/// The percentile (in %) at `x = 1/(1-p)`, as an axis label: `99.9%`.
pub fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x.max(1.0));
    let text = format!("{p:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

impl Chart for PercentileChart {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        use plotters::coord::combinators::BindKeyPoints;
        area.fill(&WHITE).map_err(err)?;
        let points = || self.series.iter().flat_map(|s| s.points.iter());
        let x_max = points().map(|p| p.0).fold(100.0f64, f64::max);
        let y_max = points().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.1;
        let keys: Vec<f64> = [1.0, 2.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6]
            .into_iter()
            .filter(|k| *k <= x_max * 1.0001)
            .collect();
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, ("sans-serif", 22))
            .margin(12)
            .margin_right(36)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((1.0..x_max).log_scale().with_key_points(keys), 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("ms")
            .x_label_formatter(&|x| percentile_label(*x))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for s in &self.series {
            let color = color_of(&s.name);
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(err)?
                .label(&s.name)
                .legend(line_key(color, 3));
        }
        draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        Ok(())
    }
}

/// Bar charts side by side under one title: quantities in different units
/// (cores, MB) each on their own axis, never one shared axis.
#[derive(Debug)]
pub struct Panels {
    pub title: String,
    pub panels: Vec<BarChart>,
}

impl Chart for Panels {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> anyhow::Result<()> {
        area.fill(&WHITE).map_err(err)?;
        let inner = area.titled(&self.title, ("sans-serif", 22)).map_err(err)?;
        let cells = inner.split_evenly((1, self.panels.len().max(1)));
        for (panel, cell) in self.panels.iter().zip(&cells) {
            panel.draw(cell)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels_read_as_percentiles() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(2.0), "50%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(1000.0), "99.9%");
        assert_eq!(percentile_label(10_000.0), "99.99%");
    }
}
