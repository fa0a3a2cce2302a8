//! `cargo xtask plot`, and the pictures the sweep's report step draws beside `results.md`: a
//! sweep's runs drawn from their TensorBoard events (read with [`int8_events::read_run`]), per
//! recipe.
//!
//! - `curves.png`: the test metric (top-1, or mAP@0.5 for detection) by epoch over the whole
//!   schedule and over its last quarter, the training loss (epoch mean) and the test loss
//!   (mAP@[.5:.95] for detection), one colour per configuration (FP32, and INT8 with each setting
//!   of the sweep's axes): each seed a thin line, the seeds' mean a thick one, over the epochs
//!   every seed has reached.
//! - `layers.png`: for one INT8 run of each INT8 configuration (its lowest seed), each INT8
//!   layer's DCLR learning-rate multiplier, the cosine distance between its output gradient and
//!   that gradient's INT8 copy, and its DSGC clip value, over the training steps (Zhu et al., CVPR
//!   2020, sections 4.1-4.2), one line per layer coloured by depth.
//!
//! A sweep of several recipes gets `curves-<recipe>.png` and `layers-<recipe>.png`. Runs without
//! events yet, and runs whose events cannot be read, are left out with a note. Text is drawn with
//! DejaVu Sans embedded in the binary (the `dejavu` crate), so that no installed font is needed.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use int8_events::{Scalars, event_files, read_run};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;
use serde::Deserialize;

/// A run of a sweep, with what the pictures group it by: the fields of a run of the sweep's
/// `plan.json` that they read.
#[derive(Debug, Clone, Deserialize)]
pub struct Run {
    /// Its folder's name in the sweep's folder.
    pub name: String,
    /// The recipe's name.
    pub recipe_name: String,
    /// `fp32` or `int8`.
    pub precision: String,
    /// Axis labels (name, label).
    pub labels: Vec<(String, String)>,
    /// Seed.
    pub seed: u64,
}

/// Width of `curves.png`; each of its four panels is half of it wide.
pub const CURVES_WIDTH: u32 = 1600;
/// Height of a panel of `curves.png`.
pub const CURVES_PANEL_HEIGHT: u32 = 500;
/// Height of the title above `curves.png`'s panels; its legend adds [`CURVES_LEGEND_ROW`] per
/// two configurations.
pub const CURVES_HEADER: u32 = 64;
/// Height of a row of `curves.png`'s legend (two configurations a row).
pub const CURVES_LEGEND_ROW: u32 = 26;
/// Width of a column (one INT8 configuration) of `layers.png`.
pub const LAYERS_COLUMN_WIDTH: u32 = 800;
/// Width of the layer legend at the right of `layers.png`.
pub const LAYERS_LEGEND_WIDTH: u32 = 260;
/// Height of a panel of `layers.png` (three per column).
pub const LAYERS_PANEL_HEIGHT: u32 = 400;
/// Height of the title and the column headings above `layers.png`'s panels.
pub const LAYERS_HEADER: u32 = 100;

/// The font family every text of the pictures asks for.
const FONT: &str = "sans-serif";

/// Colours of FP32 configurations (blues) and INT8 ones (the rest of matplotlib's tab10, grey
/// left out, so that no data line shares a colour with text, axes or grid).
const FP32_COLOURS: [RGBColor; 2] = [RGBColor(31, 119, 180), RGBColor(0, 0, 128)];
const INT8_COLOURS: [RGBColor; 8] = [
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// What was drawn, and what was left out and why.
#[derive(Debug, Default)]
pub struct Pictures {
    /// The PNG files written.
    pub written: Vec<PathBuf>,
    /// Runs left out for having no events yet (not started).
    pub missing: Vec<String>,
    /// Runs or pictures left out for another reason, one line each.
    pub notes: Vec<String>,
}

/// One run with its scalars.
struct RunData<'a> {
    run: &'a Run,
    scalars: Scalars,
    /// The epoch that ends at each step (`epoch/train_loss` is logged once per epoch).
    epoch_of_step: HashMap<u64, usize>,
    /// The recipe's `train.epochs`, from the run's `recipe.toml`.
    schedule: Option<usize>,
    /// The step the first epoch ended at, once it has.
    steps_per_epoch: Option<u64>,
}

impl RunData<'_> {
    /// The points of `tag` logged at the end of an epoch, as (epoch, value).
    fn by_epoch(&self, tag: &str) -> Vec<(f64, f64)> {
        self.scalars
            .get(tag)
            .iter()
            .filter_map(|&(step, v)| self.epoch_of_step.get(&step).map(|&e| (e as f64, v as f64)))
            .collect()
    }

    /// The points of `tag` by step.
    fn by_step(&self, tag: &str) -> Vec<(f64, f64)> {
        self.scalars.get(tag).iter().map(|&(s, v)| (s as f64, v as f64)).collect()
    }
}

/// Runs of one recipe with the same precision and axis labels: they differ by seed only.
struct Config<'a> {
    label: String,
    int8: bool,
    colour: RGBColor,
    runs: Vec<&'a RunData<'a>>,
}

/// Draws the pictures of the sweep in `out` (the runs of `runs` that have events) and returns
/// what it wrote; `name` (the experiment's) goes in the titles.
pub fn plot_sweep(out: &Path, name: &str, runs: &[Run]) -> Result<Pictures> {
    register_font()?;
    let mut pictures = Pictures::default();
    let mut data = Vec::new();
    for run in runs {
        let dir = out.join(&run.name);
        if !dir.is_dir() || event_files(&dir)?.is_empty() {
            pictures.missing.push(run.name.clone());
            continue;
        }
        match read_run(&dir) {
            Ok(scalars) => data.push(run_data(run, scalars, &dir)),
            Err(e) => pictures.notes.push(format!("{}: left out: {e:#}", run.name)),
        }
    }
    let mut recipes: Vec<&str> = Vec::new();
    for d in &data {
        if !recipes.contains(&d.run.recipe_name.as_str()) {
            recipes.push(&d.run.recipe_name);
        }
    }
    let several = runs.iter().any(|r| r.recipe_name != runs[0].recipe_name);
    for recipe in recipes {
        let suffix = if several { format!("-{recipe}") } else { String::new() };
        let configs = configs(data.iter().filter(|d| d.run.recipe_name == recipe));
        let title = if several { format!("{name}: {recipe}") } else { name.to_string() };
        let path = out.join(format!("curves{suffix}.png"));
        write_png(&path, curves(&title, &configs)?)?;
        pictures.written.push(path);
        if configs.iter().any(|c| c.int8 && c.runs.iter().any(|r| has_layers(r))) {
            let path = out.join(format!("layers{suffix}.png"));
            write_png(&path, layers(&title, &configs)?)?;
            pictures.written.push(path);
        } else {
            pictures.notes.push(format!("{recipe}: no INT8 run with per-layer scalars, so no layers picture"));
        }
    }
    Ok(pictures)
}

/// Reads `runs` from the sweep folder's `plan.json` and draws its pictures.
pub fn plot_folder(out: &Path, name: &str) -> Result<Pictures> {
    let plan_path = out.join("plan.json");
    let text = std::fs::read_to_string(&plan_path).with_context(|| {
        format!(
            "cannot read {}: give the folder of a sweep that has started (`--out` as given to the sweep)",
            plan_path.display()
        )
    })?;
    #[derive(Deserialize)]
    struct Plan {
        runs: Vec<Run>,
    }
    let plan: Plan =
        serde_json::from_str(&text).with_context(|| format!("{}: not a sweep plan", plan_path.display()))?;
    let pictures = plot_sweep(out, name, &plan.runs)?;
    if pictures.written.is_empty() {
        bail!("no run in {} has TensorBoard events yet: nothing to draw", out.display());
    }
    Ok(pictures)
}

/// Makes DejaVu Sans the `sans-serif` of plotters' text (once).
fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok =
        *DONE.get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok { Ok(()) } else { Err(anyhow!("the embedded DejaVu Sans font did not load; this is a bug in xtask")) }
}

fn run_data<'a>(run: &'a Run, scalars: Scalars, dir: &Path) -> RunData<'a> {
    let epoch_of_step = scalars.get("epoch/train_loss").iter().enumerate().map(|(i, p)| (p.0, i + 1)).collect();
    let schedule = std::fs::read_to_string(dir.join("recipe.toml"))
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("train")?.get("epochs")?.as_integer())
        .and_then(|e| usize::try_from(e).ok());
    let steps_per_epoch = scalars.get("epoch/train_loss").first().map(|p| p.0);
    RunData { run, scalars, epoch_of_step, schedule, steps_per_epoch }
}

/// The runs grouped by precision and axis labels, in plan order, each group with its colour.
fn configs<'a>(data: impl Iterator<Item = &'a RunData<'a>>) -> Vec<Config<'a>> {
    let mut out: Vec<Config> = Vec::new();
    let mut keys: Vec<(&str, &[(String, String)])> = Vec::new();
    for d in data {
        let key = (d.run.precision.as_str(), d.run.labels.as_slice());
        if let Some(i) = keys.iter().position(|k| *k == key) {
            out[i].runs.push(d);
            continue;
        }
        let int8 = d.run.precision != "fp32";
        let n = out.iter().filter(|c| c.int8 == int8).count();
        let colour = if int8 { INT8_COLOURS[n % INT8_COLOURS.len()] } else { FP32_COLOURS[n % FP32_COLOURS.len()] };
        let mut label = d.run.precision.to_uppercase();
        if !d.run.labels.is_empty() {
            let labels: Vec<String> = d.run.labels.iter().map(|(a, l)| format!("{a}={l}")).collect();
            label += &format!(" ({})", labels.join(", "));
        }
        keys.push(key);
        out.push(Config { label, int8, colour, runs: vec![d] });
    }
    out
}

fn has_layers(d: &RunData) -> bool {
    d.scalars.tags().iter().any(|t| t.starts_with("quant/") && t.ends_with("/phi"))
}

/// A colour mixed with white: `amount` 0 is white, 1 the colour.
fn lighter(c: RGBColor, amount: f64) -> RGBColor {
    let mix = |v: u8| (255.0 - (255.0 - v as f64) * amount).round() as u8;
    RGBColor(mix(c.0), mix(c.1), mix(c.2))
}

/// A line of a panel.
struct Line {
    points: Vec<(f64, f64)>,
    colour: RGBColor,
    width: u32,
    /// Dots at the points, for a series short enough that its points matter.
    dots: bool,
}

/// How a panel's y axis maps values.
#[derive(Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log,
}

/// One chart of a picture.
struct Panel {
    caption: String,
    x_desc: String,
    y_desc: String,
    x: Range<f64>,
    y: Range<f64>,
    scale: Scale,
    lines: Vec<Line>,
}

impl Panel {
    /// A panel whose y range fits the points of `lines` within the x range, on a log scale if
    /// `scale` asks for one and the values span enough for it to help.
    fn fitted(caption: &str, x_desc: &str, y_desc: &str, x: Range<f64>, scale: Scale, lines: Vec<Line>) -> Self {
        let ys: Vec<f64> = lines
            .iter()
            .flat_map(|l| l.points.iter())
            .filter(|p| p.0 >= x.start && p.0 <= x.end)
            .map(|p| p.1)
            .collect();
        let (scale, y) = fit_y(&ys, scale);
        Panel { caption: caption.into(), x_desc: x_desc.into(), y_desc: y_desc.into(), x, y, scale, lines }
    }

    /// Whether any line has a point.
    fn has_data(&self) -> bool {
        self.lines.iter().any(|l| !l.points.is_empty())
    }
}

/// The y scale and range for `values`: a log scale only where asked and the positive values span
/// a factor of 5 or more (below that its ticks would be too few to read).
fn fit_y(values: &[f64], scale: Scale) -> (Scale, Range<f64>) {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let positive: Vec<f64> = finite.iter().copied().filter(|v| *v > 0.0).collect();
    let (lo, hi) = positive.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if scale == Scale::Log && positive.len() == finite.len() && hi / lo >= 5.0 {
        (Scale::Log, log_range(&positive))
    } else {
        (Scale::Linear, nice_range(&finite))
    }
}

/// A y range a little wider than `values`, with ends on round numbers.
fn nice_range(values: &[f64]) -> Range<f64> {
    let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if lo > hi {
        return 0.0..1.0;
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) * 0.1 };
    let raw = span / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let lo = ((lo - 0.04 * span) / step).floor() * step;
    let hi = ((hi + 0.04 * span) / step).ceil() * step;
    lo..hi
}

/// A log-scale range around the positive `values`.
fn log_range(values: &[f64]) -> Range<f64> {
    let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if lo > hi {
        return 0.1..1.0;
    }
    let (lo, hi) = (lo / 1.25, hi * 1.25);
    if hi / lo < 3.0 { lo.min(hi / 3.0)..hi } else { lo..hi }
}

/// Tick values of a log axis over `range`: 1, 2 and 5 times the powers of ten within it, or every
/// digit where those are too few; and every digit for the light grid lines.
fn log_ticks(range: &Range<f64>) -> (Vec<f64>, Vec<f64>) {
    let within = |digits: &[f64]| -> Vec<f64> {
        let (lo, hi) = (range.start.log10().floor() as i32, range.end.log10().ceil() as i32);
        (lo..=hi).flat_map(|k| digits.iter().map(move |d| d * 10f64.powi(k))).filter(|v| range.contains(v)).collect()
    };
    let every: Vec<f64> = within(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]);
    let bold = within(&[1.0, 2.0, 5.0]);
    if bold.len() >= 3 { (bold, every) } else { (every.clone(), every) }
}

/// A number for an axis: short, in scientific notation where fixed would not be.
fn tick(v: &f64) -> String {
    let a = v.abs();
    if *v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.1e}");
        s.replace(".0e", "e")
    } else {
        let decimals = (2 - a.log10().floor() as i32).clamp(0, 4) as usize;
        let s = format!("{v:.decimals$}");
        if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn draw_panel(area: &Area, p: &Panel) -> Result<()> {
    match p.scale {
        Scale::Linear => draw_panel_in(area, p, p.y.clone()),
        Scale::Log => {
            let (bold, light) = log_ticks(&p.y);
            draw_panel_in(area, p, p.y.clone().log_scale().with_key_points(bold).with_light_points(light))
        }
    }
}

fn draw_panel_in<Y>(area: &Area, p: &Panel, y: Y) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    // Epochs are whole: at most one label each (plotters picks round steps for the count asked),
    // and none between them.
    let epochs = p.x_desc == "epoch";
    let x_labels = if epochs { ((p.x.end - p.x.start) as usize + 1).clamp(2, 10) } else { 10 };
    let x_tick = |v: &f64| if epochs && v.fract() != 0.0 { String::new() } else { tick(v) };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.caption, (FONT, 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(p.x.clone(), y)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(238, 238, 238))
        .bold_line_style(RGBColor(210, 210, 210))
        .x_desc(&p.x_desc)
        .y_desc(&p.y_desc)
        .axis_desc_style((FONT, 16))
        .label_style((FONT, 14))
        .x_labels(x_labels)
        .y_labels(8)
        .x_label_formatter(&x_tick)
        .y_label_formatter(&tick)
        .draw()?;
    for line in &p.lines {
        // Points outside the panel would be drawn on its border: plotters clamps them.
        let points: Vec<(f64, f64)> = line
            .points
            .iter()
            .copied()
            .filter(|q| q.1.is_finite() && (p.scale == Scale::Linear || q.1 > 0.0))
            .filter(|q| q.0 >= p.x.start && q.0 <= p.x.end && q.1 >= p.y.start && q.1 <= p.y.end)
            .collect();
        chart.draw_series(LineSeries::new(points.iter().copied(), line.colour.stroke_width(line.width)))?;
        if line.dots {
            chart.draw_series(points.iter().map(|&q| Circle::new(q, line.width + 1, line.colour.filled())))?;
        }
    }
    if p.lines.iter().all(|l| l.points.is_empty()) {
        let (w, h) = area.dim_in_pixel();
        area.draw_text("no data yet", &(FONT, 18).into_text_style(area), (w as i32 / 2 - 50, h as i32 / 2))?;
    }
    Ok(())
}

/// The mean over runs of `series` at the x values every run has.
fn mean_line(series: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let Some(first) = series.first() else { return Vec::new() };
    first
        .iter()
        .filter_map(|&(x, _)| {
            let ys: Option<Vec<f64>> = series.iter().map(|s| s.iter().find(|p| p.0 == x).map(|p| p.1)).collect();
            ys.map(|ys| (x, ys.iter().sum::<f64>() / ys.len() as f64))
        })
        .collect()
}

/// Each run of each configuration as a thin line and their mean as a thick one (a lone run is
/// its own mean).
fn config_lines(configs: &[Config], series: impl Fn(&RunData) -> Vec<(f64, f64)>) -> Vec<Line> {
    let mut thin = Vec::new();
    let mut thick = Vec::new();
    for c in configs {
        let all: Vec<Vec<(f64, f64)>> = c.runs.iter().map(|r| series(r)).collect();
        if all.len() > 1 {
            for points in &all {
                thin.push(Line { points: points.clone(), colour: lighter(c.colour, 0.45), width: 1, dots: false });
            }
        }
        let mean = mean_line(&all);
        // A line of one or two points is hard to see without them.
        let dots = mean.len() <= 2;
        thick.push(Line { points: mean, colour: c.colour, width: 3, dots });
    }
    // Means on top of every seed's line.
    thin.extend(thick);
    thin
}

/// Encodes an RGB buffer as PNG and moves it into place, so that a reader never sees half a
/// picture.
fn write_png(path: &Path, (width, height, rgb): (u32, u32, Vec<u8>)) -> Result<()> {
    use std::io::Write as _;
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(&rgb).and_then(|()| w.finish()))
        .with_context(|| format!("cannot encode {}", path.display()))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(&png).with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("cannot move {} into place", path.display()))?;
    Ok(())
}

/// `curves.png` of one recipe's configurations.
fn curves(title: &str, configs: &[Config]) -> Result<(u32, u32, Vec<u8>)> {
    let detection = configs.iter().flat_map(|c| &c.runs).any(|r| !r.scalars.get("test/map50").is_empty());
    let (metric_tag, metric) = if detection { ("test/map50", "mAP@0.5") } else { ("test/top1", "top-1") };
    let last_epoch = configs
        .iter()
        .flat_map(|c| &c.runs)
        .flat_map(|r| r.epoch_of_step.values().copied().chain(r.schedule))
        .max()
        .unwrap_or(1);
    let seen_epoch = configs.iter().flat_map(|c| &c.runs).map(|r| r.epoch_of_step.len()).max().unwrap_or(0);
    let x_all = if last_epoch > 1 { 1.0..last_epoch as f64 } else { 0.5..1.5 };
    // The zoom: the last quarter of the epochs any run has reached.
    let zoom_from = seen_epoch.saturating_sub((seen_epoch / 4).max(2) - 1).max(1);
    let x_zoom = if seen_epoch > zoom_from { zoom_from as f64..seen_epoch as f64 } else { x_all.clone() };

    let legend: Vec<(String, RGBColor)> = configs
        .iter()
        .map(|c| {
            let seeds: Vec<String> = c.runs.iter().map(|r| r.run.seed.to_string()).collect();
            let who =
                if seeds.len() == 1 { format!("seed {}", seeds[0]) } else { format!("seeds {}", seeds.join(", ")) };
            let all: Vec<Vec<(f64, f64)>> = c.runs.iter().map(|r| r.by_epoch(metric_tag)).collect();
            let what = match mean_line(&all).last() {
                Some(&(e, v)) => {
                    let mean = if seeds.len() > 1 { "mean " } else { "" };
                    let of =
                        c.runs.iter().filter_map(|r| r.schedule).max().map_or(String::new(), |s| format!(" of {s}"));
                    format!("{mean}{metric} {v:.2}% after epoch {e}{of}")
                }
                None => "no test result yet".into(),
            };
            (format!("{}: {who}, {what}", c.label), c.colour)
        })
        .collect();
    let header = CURVES_HEADER + CURVES_LEGEND_ROW * legend.len().div_ceil(2) as u32;
    let (width, height) = (CURVES_WIDTH, header + 2 * CURVES_PANEL_HEIGHT);
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, body) = root.split_vertically(header);
        let heading = format!("{title}: test {metric} and losses by epoch");
        top.draw_text(&heading, &(FONT, 26).into_text_style(&top), (20, 12))?;
        if configs.iter().any(|c| c.runs.len() > 1) {
            let note = "thin: each seed; thick: the seeds' mean";
            top.draw_text(note, &(FONT, 15).into_text_style(&top), (width as i32 - 320, 20))?;
        }
        for (i, (text, colour)) in legend.iter().enumerate() {
            let (col, row) = ((i % 2) as i32, (i / 2) as i32);
            let (x, y) = (20 + col * (width as i32 / 2), 54 + row * CURVES_LEGEND_ROW as i32);
            top.draw(&PathElement::new(vec![(x, y + 9), (x + 36, y + 9)], colour.stroke_width(3)))?;
            top.draw_text(text, &(FONT, 16).into_text_style(&top), (x + 46, y))?;
        }
        let panels = body.split_evenly((2, 2));
        let metric_lines = config_lines(configs, |r| r.by_epoch(metric_tag));
        let metric_desc = format!("test {metric} (%)");
        let full = Panel::fitted(
            &format!("test {metric}, whole schedule"),
            "epoch",
            &metric_desc,
            x_all.clone(),
            Scale::Linear,
            metric_lines,
        );
        let mut full = full;
        // Percentages: never past 100.
        full.y = full.y.start.max(0.0)..full.y.end.min(100.0);
        draw_panel(&panels[0], &full)?;
        let zoom_caption = format!("test {metric}, epochs {}-{}", x_zoom.start, x_zoom.end);
        let zoom = Panel::fitted(
            &zoom_caption,
            "epoch",
            &metric_desc,
            x_zoom,
            Scale::Linear,
            config_lines(configs, |r| r.by_epoch(metric_tag)),
        );
        draw_panel(&panels[1], &zoom)?;
        let loss = Panel::fitted(
            "training loss, mean over each epoch",
            "epoch",
            "train loss",
            x_all.clone(),
            Scale::Log,
            config_lines(configs, |r| r.by_epoch("epoch/train_loss")),
        );
        draw_panel(&panels[2], &loss)?;
        let fourth = if detection {
            Panel::fitted(
                "test mAP@[.5:.95]",
                "epoch",
                "test mAP@[.5:.95] (%)",
                x_all,
                Scale::Linear,
                config_lines(configs, |r| r.by_epoch("test/map")),
            )
        } else {
            Panel::fitted(
                "test loss",
                "epoch",
                "test loss",
                x_all,
                Scale::Log,
                config_lines(configs, |r| r.by_epoch("test/loss")),
            )
        };
        draw_panel(&panels[3], &fourth)?;
        root.present()?;
    }
    Ok((width, height, rgb))
}

/// Viridis (matplotlib's default colour map) at `t` in [0, 1], cut at 0.85 so that the last
/// layers stay dark enough to read on white.
fn depth_colour(t: f64) -> RGBColor {
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [68.0, 1.0, 84.0]),
        (0.25, [59.0, 82.0, 139.0]),
        (0.5, [33.0, 145.0, 140.0]),
        (0.75, [94.0, 201.0, 98.0]),
        (1.0, [253.0, 231.0, 37.0]),
    ];
    let t = t.clamp(0.0, 1.0) * 0.85;
    let i = STOPS.iter().rposition(|s| s.0 <= t).unwrap_or(0).min(STOPS.len() - 2);
    let (a, b) = (STOPS[i], STOPS[i + 1]);
    let f = (t - a.0) / (b.0 - a.0);
    let c = |k: usize| (a.1[k] + (b.1[k] - a.1[k]) * f).round() as u8;
    RGBColor(c(0), c(1), c(2))
}

/// `layers.png`: a column per INT8 configuration (its lowest seed with per-layer scalars), three
/// panels each, and the layers' colours at the right.
fn layers(title: &str, configs: &[Config]) -> Result<(u32, u32, Vec<u8>)> {
    let columns: Vec<(&Config, &RunData)> = configs
        .iter()
        .filter(|c| c.int8)
        .filter_map(|c| c.runs.iter().filter(|r| has_layers(r)).min_by_key(|r| r.run.seed).map(|r| (c, *r)))
        .collect();
    // The layers in the model's order (the order their tags were first logged), of every column.
    let mut names: Vec<String> = Vec::new();
    for (_, r) in &columns {
        for t in r.scalars.tags() {
            if let Some(name) = t.strip_prefix("quant/").and_then(|t| t.strip_suffix("/phi"))
                && !names.iter().any(|n| n == name)
            {
                names.push(name.to_string());
            }
        }
    }
    let colour = |i: usize| depth_colour(if names.len() > 1 { i as f64 / (names.len() - 1) as f64 } else { 0.0 });
    let width = LAYERS_COLUMN_WIDTH * columns.len() as u32 + LAYERS_LEGEND_WIDTH;
    let height = LAYERS_HEADER + 3 * LAYERS_PANEL_HEIGHT;
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let (top, body) = root.split_vertically(LAYERS_HEADER);
        // Each run's lines are running means over about an epoch of its logged points.
        let windows: Vec<usize> = columns.iter().map(|(_, r)| smoothing_window(r)).collect();
        let spans: Vec<u64> = columns.iter().zip(&windows).map(|((_, r), &k)| k as u64 * log_spacing(r)).collect();
        top.draw_text(
            &format!("{title}: per-layer DCLR multiplier, gradient cosine distance and clip value"),
            &(FONT, 22).into_text_style(&top),
            (20, 10),
        )?;
        // On a line of its own: with one column the picture is too narrow for both.
        if let Some(&s) = spans.iter().max().filter(|&&s| s > 1) {
            top.draw_text(
                &format!("lines are running means over {s} steps"),
                &(FONT, 16).into_text_style(&top),
                (20, 40),
            )?;
        }
        for (col, (c, r)) in columns.iter().enumerate() {
            let x = 80 + col as i32 * LAYERS_COLUMN_WIDTH as i32;
            top.draw_text(&format!("{}, seed {}", c.label, r.run.seed), &(FONT, 20).into_text_style(&top), (x, 66))?;
        }
        let (charts, legend) = body.split_horizontally(LAYERS_COLUMN_WIDTH * columns.len() as u32);
        let cells = charts.split_evenly((3, columns.len()));
        let what = [
            ("phi", "DCLR learning-rate multiplier", "multiplier", Scale::Linear),
            (
                "cosine_distance",
                "cosine distance of the output gradient dY to its INT8 copy",
                "cosine distance",
                Scale::Log,
            ),
            ("clip", "DSGC clip value of dY", "clip value", Scale::Log),
        ];
        // One x range for every column: the schedule's steps where known, so that a run part-way
        // shows where it is.
        let last_step = columns
            .iter()
            .flat_map(|(_, r)| {
                let scheduled = r.steps_per_epoch.zip(r.schedule).map(|(s, e)| s * e as u64);
                r.scalars.get("train/loss").last().map(|p| p.0).into_iter().chain(scheduled)
            })
            .max()
            .unwrap_or(1)
            .max(1);
        let per_epoch = columns.iter().find_map(|(_, r)| r.steps_per_epoch);
        let x_desc = per_epoch.map_or("step".to_string(), |s| format!("step ({s} per epoch)"));
        for (row, (tag, caption, y_desc, scale)) in what.iter().enumerate() {
            let mut panels = Vec::new();
            for (col, (_, r)) in columns.iter().enumerate() {
                let raw: Vec<Vec<(f64, f64)>> = names.iter().map(|n| r.by_step(&format!("quant/{n}/{tag}"))).collect();
                let lines: Vec<Line> = raw
                    .iter()
                    .enumerate()
                    .map(|(i, points)| Line {
                        points: running_mean(points, windows[col]),
                        colour: colour(i),
                        width: 1,
                        dots: false,
                    })
                    .collect();
                panels.push(Panel::fitted(caption, &x_desc, y_desc, 0.0..last_step as f64, *scale, lines));
            }
            // One y scale and range a row, so that the columns compare at a glance.
            let ys: Vec<f64> =
                panels.iter().flat_map(|p: &Panel| p.lines.iter().flat_map(|l| l.points.iter().map(|q| q.1))).collect();
            let (row_scale, row_y) = fit_y(&ys, *scale);
            for (col, mut panel) in panels.into_iter().enumerate() {
                if panel.has_data() {
                    (panel.scale, panel.y) = (row_scale, row_y.clone());
                }
                draw_panel(&cells[row * columns.len() + col], &panel)?;
            }
        }
        // The layer legend: every layer when they fit, else every k-th with the last.
        let room = (3 * LAYERS_PANEL_HEIGHT - 60) as usize;
        let every = names.len().div_ceil(room / 16).max(1);
        let row_h = (room / names.len().div_ceil(every).max(1)).min(22) as i32;
        legend.draw_text("layers, first to last", &(FONT, 16).into_text_style(&legend), (10, 20))?;
        let mut y = 50;
        for (i, n) in names.iter().enumerate() {
            if i % every != 0 && i + 1 != names.len() {
                continue;
            }
            legend
                .draw(&PathElement::new(vec![(10, y + row_h / 3), (34, y + row_h / 3)], colour(i).stroke_width(3)))?;
            legend.draw_text(n, &(FONT, (row_h - 6).clamp(10, 14)).into_text_style(&legend), (40, y))?;
            y += row_h;
        }
        root.present()?;
    }
    Ok((width, height, rgb))
}

/// The steps between two logged points of a run (`train.log_every`): the most common gap.
fn log_spacing(r: &RunData) -> u64 {
    let mut gaps: Vec<u64> = r.scalars.get("train/loss").windows(2).map(|w| w[1].0.saturating_sub(w[0].0)).collect();
    gaps.sort_unstable();
    gaps.get(gaps.len() / 2).copied().unwrap_or(1).max(1)
}

/// How many logged points the running means of a run's per-layer lines take: about an epoch's
/// worth, so that twenty layers' lines stay apart where each step's value jumps, but at most a
/// tenth of the points, so that a short run keeps its shape; odd, so that a mean is centred.
fn smoothing_window(r: &RunData) -> usize {
    let points = r.scalars.get("train/loss").len();
    let per_epoch = r.steps_per_epoch.map_or(points / 40, |s| (s / log_spacing(r)) as usize);
    per_epoch.min(points / 10) | 1
}

/// Centred running means over `k` points (fewer at the ends).
fn running_mean(points: &[(f64, f64)], k: usize) -> Vec<(f64, f64)> {
    let half = k / 2;
    (0..points.len())
        .map(|i| {
            let (a, b) = (i.saturating_sub(half), (i + half + 1).min(points.len()));
            (points[i].0, points[a..b].iter().map(|p| p.1).sum::<f64>() / (b - a) as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_their_values_with_round_ends() {
        let r = nice_range(&[36.59, 86.56, 80.37]);
        assert!(r.start <= 36.59 && r.end >= 86.56, "{r:?}");
        assert_eq!((r.start % 5.0, r.end % 5.0), (0.0, 0.0), "{r:?}");
        let r = nice_range(&[0.5, 0.5]);
        assert!(r.start < 0.5 && r.end > 0.5, "{r:?}");
        let r = log_range(&[2e-5, 8e-4]);
        assert!(r.start < 2e-5 && r.end > 8e-4 && r.start > 0.0, "{r:?}");
    }

    #[test]
    fn the_mean_line_has_the_epochs_every_seed_has() {
        let a = vec![(1.0, 10.0), (2.0, 20.0), (3.0, 30.0)];
        let b = vec![(1.0, 20.0), (2.0, 40.0)];
        assert_eq!(mean_line(&[a.clone(), b]), vec![(1.0, 15.0), (2.0, 30.0)]);
        assert_eq!(mean_line(std::slice::from_ref(&a)), a);
    }

    #[test]
    fn depth_colours_run_from_dark_purple_and_stay_readable_on_white() {
        assert_eq!(depth_colour(0.0), RGBColor(68, 1, 84));
        let last = depth_colour(1.0);
        // Luma below white's by a clear margin.
        let luma = 0.299 * last.0 as f64 + 0.587 * last.1 as f64 + 0.114 * last.2 as f64;
        assert!(luma < 200.0, "{last:?}");
        assert_ne!(depth_colour(0.4), depth_colour(0.6));
    }

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
    }

    /// Every scalar tag of `dir` with its (step, value) points, as TensorBoard's `EventAccumulator`
    /// reads them (`crates/int8-train/tests/read_events.py`).
    fn tensorboard_scalars(dir: &Path) -> serde_json::Map<String, serde_json::Value> {
        let script = root().join("crates/int8-train/tests/read_events.py");
        let out = std::process::Command::new("python3").arg(&script).arg(dir).output().expect("python3 runs");
        assert!(
            out.status.success(),
            "TensorBoard's reader failed (install it with `pip install tensorboard`; the README's set-up does it):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["scalars"].as_object().unwrap().clone()
    }

    /// A one-epoch INT8 run of the small CNN on 384 Fashion-MNIST images (12 steps), killed after
    /// step 6 with its checkpoint of step 4, then resumed to the end: two event files, the first
    /// with points past step 4 that TensorBoard drops. The reader's own cases (damaged and cut
    /// records, files that are not event files) are int8-events' tests; this one checks what the
    /// pictures read of a real run.
    #[test]
    fn a_killed_and_resumed_trainer_run_reads_as_tensorboard_reads_it() {
        assert!(
            Path::new("/usr/share/datasets/fashion-mnist").exists(),
            "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (the README's set-up does it)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let trainer = crate::sweep::build_trainer(&root(), false).unwrap();
        let sets = [
            "data.train_limit=384",
            "data.test_limit=500",
            "train.epochs=1",
            "train.batch=32",
            "train.eval_batch=250",
            "train.checkpoint_every=4",
            "train.log_every=1",
            "train.histogram_every=5",
            "quant.precision=\"int8\"",
        ];
        let mut cmd = std::process::Command::new(&trainer);
        cmd.current_dir(root()).args(["cnn-small-fashion-mnist", "--progress", "quiet", "--out"]).arg(&dir);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let killed = cmd.env("INT8_TRAIN_KILL_AT_STEP", "6").output().unwrap();
        assert!(!killed.status.success(), "{}", String::from_utf8_lossy(&killed.stderr));
        let resumed = cmd.env_remove("INT8_TRAIN_KILL_AT_STEP").arg("--resume").output().unwrap();
        assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
        assert_eq!(event_files(&dir).unwrap().len(), 2, "one event file per session");

        let ours = read_run(&dir).unwrap();
        let theirs = tensorboard_scalars(&dir);
        let mut tags: Vec<&String> = ours.tags().iter().collect();
        tags.sort();
        assert_eq!(tags, theirs.keys().collect::<Vec<_>>());
        for (tag, points) in &theirs {
            let want: Vec<(u64, f32)> = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
                .collect();
            assert_eq!(ours.get(tag), want.as_slice(), "{tag}");
        }
        // Every step once: the killed session's steps 5 and 6 are dropped for the resumed ones.
        let steps: Vec<u64> = ours.get("train/loss").iter().map(|p| p.0).collect();
        assert_eq!(steps, (1..=12).collect::<Vec<_>>());
        assert_eq!(ours.get("test/top1").len(), 1);
        // Per-layer tags come in the model's order of layers.
        let clips: Vec<&str> = ours.tags().iter().filter(|t| t.ends_with("/clip")).map(String::as_str).collect();
        assert_eq!(clips, ["quant/conv2/clip", "quant/conv3/clip"]);
    }
}
