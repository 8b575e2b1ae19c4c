//! Plots for the reports: accuracy heatmaps and line charts, as SVG and PNG
//! (plotters). Text needs a font: DejaVu Sans from Debian's
//! fonts-dejavu-core is loaded at run time (or the file named by
//! `SNAPKV_FONT`); without one the plots are drawn without text.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a sans-serif font once; false when none could be loaded.
fn fonts() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("SNAPKV_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        log::warn!("no font found (install fonts-dejavu-core or set SNAPKV_FONT): plots without text");
        false
    })
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// One heatmap: rows × columns of values in [0, 1] (`None` = not measured).
pub struct Heatmap<'a> {
    /// Title above the grid.
    pub title: String,
    /// Column labels (x axis).
    pub columns: &'a [String],
    /// Row labels (y axis, top to bottom).
    pub rows: &'a [String],
    /// Axis names: x, y.
    pub axes: (&'a str, &'a str),
    /// `values[row][column]`.
    pub values: Vec<Vec<Option<f64>>>,
}

/// Red (0) → yellow → green (1).
fn colour(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let (r, g) = if v < 0.5 {
        (220.0, 60.0 + 340.0 * v)
    } else {
        (220.0 - 360.0 * (v - 0.5), 230.0)
    };
    RGBColor(r as u8, g.min(230.0) as u8, 70)
}

fn draw_heatmap<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, h: &Heatmap<'_>) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    let text = fonts();
    let (w, ht) = area.dim_in_pixel();
    let (w, ht) = (w as i32, ht as i32);
    let (left, top, right, bottom) = (90, 50, 20, 60);
    let gw = (w - left - right).max(1);
    let gh = (ht - top - bottom).max(1);
    let nc = h.columns.len().max(1) as i32;
    let nr = h.rows.len().max(1) as i32;
    let style = |size: i32| TextStyle::from(("sans-serif", size).into_font()).color(&BLACK);
    if text {
        area.draw(&Text::new(h.title.clone(), (left, 15), style(18)))?;
    }
    for (r, row) in h.values.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            let x0 = left + gw * c as i32 / nc;
            let x1 = left + gw * (c as i32 + 1) / nc;
            let y0 = top + gh * r as i32 / nr;
            let y1 = top + gh * (r as i32 + 1) / nr;
            let fill = v.map_or(RGBColor(200, 200, 200), colour);
            area.draw(&Rectangle::new([(x0, y0), (x1, y1)], fill.filled()))?;
            area.draw(&Rectangle::new([(x0, y0), (x1, y1)], WHITE.stroke_width(2)))?;
            if text {
                let label = v.map_or("–".to_string(), |v| format!("{:.0}%", 100.0 * v));
                let s = style(16).pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Center,
                ));
                area.draw(&Text::new(label, ((x0 + x1) / 2, (y0 + y1) / 2), s))?;
            }
        }
    }
    if text {
        for (c, label) in h.columns.iter().enumerate() {
            let x = left + gw * (2 * c as i32 + 1) / (2 * nc);
            let s = style(14).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ));
            area.draw(&Text::new(label.clone(), (x, top + gh + 6), s))?;
        }
        for (r, label) in h.rows.iter().enumerate() {
            let y = top + gh * (2 * r as i32 + 1) / (2 * nr);
            let s = style(14).pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Right,
                plotters::style::text_anchor::VPos::Center,
            ));
            area.draw(&Text::new(label.clone(), (left - 8, y), s))?;
        }
        let s = style(14).pos(plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Top,
        ));
        area.draw(&Text::new(h.axes.0.to_string(), (left + gw / 2, top + gh + 30), s))?;
        area.draw(&Text::new(h.axes.1.to_string(), (8, top - 22), style(14)))?;
    }
    Ok(())
}

/// Writes a heatmap to `<stem>.svg` and `<stem>.png`; returns the paths.
pub fn heatmap(stem: &Path, h: &Heatmap<'_>) -> DrawResult<Vec<PathBuf>> {
    let w = (160 + 110 * h.columns.len())
        .max(420)
        .max(110 + 10 * h.title.chars().count()) as u32;
    let ht = (130 + 60 * h.rows.len()) as u32;
    let (svg, png) = (with_suffix(stem, "svg"), with_suffix(stem, "png"));
    {
        let root = SVGBackend::new(&svg, (w, ht)).into_drawing_area();
        draw_heatmap(&root, h)?;
        root.present()?;
    }
    {
        let root = BitMapBackend::new(&png, (w, ht)).into_drawing_area();
        draw_heatmap(&root, h)?;
        root.present()?;
    }
    Ok(vec![svg, png])
}

/// A named series of (x, y) points.
pub struct Series {
    /// Legend name.
    pub name: String,
    /// Points, x ascending.
    pub points: Vec<(f64, f64)>,
}

/// A line chart.
pub struct LineChart<'a> {
    /// Title.
    pub title: String,
    /// Axis names: x, y.
    pub axes: (&'a str, &'a str),
    /// The series.
    pub series: Vec<Series>,
    /// Draw x on a base-2 logarithmic axis (for budgets that double);
    /// every x must then be positive.
    pub log2_x: bool,
    /// The top of the y axis (`None`: a little above the highest point).
    pub y_max: Option<f64>,
}

const PALETTE: [RGBColor; 7] = [
    RGBColor(200, 60, 50),
    RGBColor(40, 110, 200),
    RGBColor(40, 160, 80),
    RGBColor(150, 80, 180),
    RGBColor(220, 140, 30),
    RGBColor(30, 160, 170),
    RGBColor(90, 90, 90),
];

/// Width in pixels of a line chart's plot (axes included).
const PLOT_WIDTH: u32 = 640;

/// Width in pixels of the legend strip right of a line chart's plot, sized
/// for its longest series name (none without fonts, which draw no legend).
fn legend_width(c: &LineChart<'_>) -> u32 {
    if !fonts() {
        return 0;
    }
    let longest = c.series.iter().map(|s| s.name.chars().count()).max().unwrap_or(0) as u32;
    (longest * 7 + 50).min(PLOT_WIDTH * 3 / 5)
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, c: &LineChart<'_>) -> DrawResult<()>
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    let text = fonts();
    // The legend gets a strip of its own beside the plot, so that no corner
    // of the plot has to be free of points for it.
    let (plot_area, legend_area) = if text {
        let titled = area.titled(&c.title, ("sans-serif", 20))?;
        let (plot, legend) = titled.split_horizontally(PLOT_WIDTH);
        (plot, Some(legend))
    } else {
        (area.clone(), None)
    };
    let to_axis = |x: f64| if c.log2_x { x.log2() } else { x };
    let series: Vec<Vec<(f64, f64)>> = c
        .series
        .iter()
        .map(|s| s.points.iter().map(|&(x, y)| (to_axis(x), y)).collect())
        .collect();
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for &(x, y) in series.iter().flatten() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (0.0, 1.0);
    }
    if x0 == x1 {
        x1 = x0 + 1.0;
    }
    let pad = (x1 - x0) * 0.05;
    let mut builder = ChartBuilder::on(&plot_area);
    builder.margin(15);
    if text {
        builder.x_label_area_size(45).y_label_area_size(60);
    }
    let y_top = c.y_max.unwrap_or((y1 * 1.1).max(1.0));
    let mut chart = builder.build_cartesian_2d((x0 - pad)..(x1 + pad), 0.0..y_top)?;
    // Fractions (a ratio axis) need decimals; counts do not.
    let decimals = if x1 - x0 < 5.0 { 2 } else { 0 };
    if text {
        chart
            .configure_mesh()
            .x_desc(c.axes.0)
            .y_desc(c.axes.1)
            .label_style(("sans-serif", 14))
            .x_labels(if c.log2_x {
                4 * (x1 - x0).ceil() as usize + 1
            } else {
                10
            })
            .x_label_formatter(&|&x| {
                if !c.log2_x {
                    format!("{x:.decimals$}")
                } else if (x - x.round()).abs() < 1e-6 {
                    // Label the powers of two only.
                    format!("{:.0}", x.round().exp2())
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
    } else {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0)
            .draw()?;
    }
    for (i, points) in series.iter().enumerate() {
        let col = PALETTE[i % PALETTE.len()];
        chart.draw_series(LineSeries::new(points.iter().copied(), col.stroke_width(3)))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, col.filled())))?;
    }
    if let Some(legend) = legend_area {
        for (i, s) in c.series.iter().enumerate() {
            let col = PALETTE[i % PALETTE.len()];
            let y = 30 + 24 * i as i32;
            legend.draw(&PathElement::new(vec![(5, y), (30, y)], col.stroke_width(3)))?;
            legend.draw(&Text::new(
                s.name.clone(),
                (38, y - 7),
                ("sans-serif", 14).into_font().color(&BLACK),
            ))?;
        }
    }
    Ok(())
}

/// Writes a line chart to `<stem>.svg` and `<stem>.png`; returns the paths.
pub fn line_chart(stem: &Path, c: &LineChart<'_>) -> DrawResult<Vec<PathBuf>> {
    let (svg, png) = (with_suffix(stem, "svg"), with_suffix(stem, "png"));
    let size = (PLOT_WIDTH + legend_width(c), 480);
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw_lines(&root, c)?;
        root.present()?;
    }
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw_lines(&root, c)?;
        root.present()?;
    }
    Ok(vec![svg, png])
}

/// `<stem>.<ext>`, keeping any dots already in the stem (model names such
/// as `SmolLM2-135M-Instruct.Q4_1`).
fn with_suffix(stem: &Path, ext: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Logs a plotting failure instead of failing the run (the numbers are in
/// the JSON either way).
pub fn report(result: DrawResult<Vec<PathBuf>>) {
    match result {
        Ok(paths) => {
            for p in paths {
                eprintln!("wrote {}", p.display());
            }
        }
        Err(e) => eprintln!("warning: plot failed: {e}"),
    }
}
