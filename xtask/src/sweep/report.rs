//! The sweep's tables: `results.csv` and `results.md` from the finished runs' `summary.json`
//! files, with INT8 paired against FP32 by seed (or against a baseline experiment's FP32 runs).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::experiment::PlannedRun;
use super::write_atomic;

/// What the tables show of a finished run: the fields of its `summary.json` (written by the
/// trainer) that they read.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Finished {
    /// Model.
    pub model: String,
    /// Dataset.
    pub dataset: String,
    /// `fp32` or `int8`.
    pub precision: String,
    /// DSGC on.
    pub dsgc: bool,
    /// DCLR on.
    pub dclr: bool,
    /// Seed.
    pub seed: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// `detection`, or absent for classification.
    #[serde(default)]
    pub task: Option<String>,
    /// Final test top-1 (%), classification.
    #[serde(default)]
    pub top1: Option<f64>,
    /// Best test top-1 (%), classification.
    #[serde(default)]
    pub best_top1: Option<f64>,
    /// Final test mAP@0.5 (%), detection.
    #[serde(default)]
    pub map50: Option<f64>,
    /// Best test mAP@0.5 (%), detection.
    #[serde(default)]
    pub best_map50: Option<f64>,
    /// Final test mAP@[.5:.95] (%), detection.
    #[serde(default)]
    pub map: Option<f64>,
    /// Mean training loss of the last epoch.
    pub final_train_loss: f64,
    /// Seconds spent training.
    pub train_seconds: f64,
    /// Mean compute time of a step (ms).
    pub step_ms: f64,
}

impl Finished {
    /// Whether the run trained a detector.
    pub fn detection(&self) -> bool {
        self.task.as_deref() == Some("detection")
    }

    /// The number the run is judged by (top-1, or mAP@0.5, in %), and its best over the run.
    pub fn score(&self) -> (f64, f64) {
        let (last, best) = if self.detection() { (self.map50, self.best_map50) } else { (self.top1, self.best_top1) };
        let last = last.unwrap_or(0.0);
        (last, best.unwrap_or(last))
    }

    /// For progress lines: `top-1 91.20% (best 91.50%)`, or the same with mAP@0.5.
    pub fn describe(&self) -> String {
        let (last, best) = self.score();
        let name = if self.detection() { "mAP@0.5" } else { "top-1" };
        format!("{name} {last:.2}% (best {best:.2}%)")
    }
}

/// The summary of a finished run in `dir`, if it has one.
pub fn finished(dir: &Path) -> Option<Finished> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).ok()?).ok()
}

/// The FP32 runs of a baseline experiment, for the INT8-against-FP32 table.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// The experiment's name.
    pub name: String,
    /// The folder its runs were read from, relative to the workspace root.
    pub dir: PathBuf,
    /// Its finished FP32 runs and their top-1.
    pub fp32: Vec<(PlannedRun, f64)>,
}

impl Baseline {
    /// Reads baseline `name`'s finished FP32 runs from `runs/<name>/`, or else from
    /// `experiments/results/<name>/`, whichever holds both `plan.json` and `results.csv`.
    pub fn load(root: &Path, name: &str) -> Result<Self> {
        let candidates = [root.join("runs").join(name), root.join("experiments").join("results").join(name)];
        let Some(dir) = candidates.iter().find(|d| d.join("plan.json").is_file() && d.join("results.csv").is_file())
        else {
            bail!(
                "baseline experiment {name}: neither {} nor {} holds plan.json and results.csv; run \
                 `cargo xtask sweep {name}` first, or fix the experiment's `baseline`",
                candidates[0].display(),
                candidates[1].display()
            );
        };
        let plan_path = dir.join("plan.json");
        #[derive(Deserialize)]
        struct Plan {
            runs: Vec<PlannedRun>,
        }
        let plan: Plan = serde_json::from_str(
            &std::fs::read_to_string(&plan_path).with_context(|| format!("cannot read {}", plan_path.display()))?,
        )
        .with_context(|| format!("{}: not a sweep plan", plan_path.display()))?;
        let csv_path = dir.join("results.csv");
        let csv = std::fs::read_to_string(&csv_path).with_context(|| format!("cannot read {}", csv_path.display()))?;
        let mut lines = csv.lines();
        let header = lines.next();
        if header != Some(CSV_HEADER) && header != Some(CSV_HEADER_DETECTION) {
            bail!("{}: the header is not `{CSV_HEADER}`; rerun its sweep to rewrite it", csv_path.display());
        }
        let mut fp32 = Vec::new();
        for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let cells: Vec<&str> = line.split(',').collect();
            let bad = || anyhow::anyhow!("{} line {}: not a results row: {line}", csv_path.display(), i + 2);
            let [run, _, _, precision, _, _, _, _, top1, ..] = cells[..] else { return Err(bad()) };
            if precision != "fp32" {
                continue;
            }
            let top1: f64 = top1.parse().map_err(|_| bad())?;
            let planned = plan.runs.iter().find(|r| r.name == run).with_context(|| {
                format!("{}: run {run} is not in {}; rerun its sweep", csv_path.display(), plan_path.display())
            })?;
            fp32.push((planned.clone(), top1));
        }
        let dir = dir.strip_prefix(root).unwrap_or(dir).to_path_buf();
        Ok(Self { name: name.to_string(), dir, fp32 })
    }

    /// The FP32 run `run` (an INT8 run of another experiment) compares with: the same recipe,
    /// seed and overrides other than `quant.*` and the seed's.
    fn partner(&self, run: &PlannedRun) -> Option<f64> {
        let schedule = |r: &PlannedRun| -> Vec<String> {
            r.sets.iter().filter(|s| !s.starts_with("quant.") && !s.starts_with("train.seed=")).cloned().collect()
        };
        let want = schedule(run);
        self.fp32
            .iter()
            .find(|(r, _)| r.recipe_name == run.recipe_name && r.seed == run.seed && schedule(r) == want)
            .map(|&(_, top1)| top1)
    }
}

/// The exact header of `results.csv` of a classification sweep.
pub const CSV_HEADER: &str =
    "run,model,dataset,precision,dsgc,dclr,seed,epochs,top1,best_top1,final_train_loss,train_seconds,step_ms";
/// The exact header of `results.csv` of a detection sweep: the metric in the same column.
pub const CSV_HEADER_DETECTION: &str =
    "run,model,dataset,precision,dsgc,dclr,seed,epochs,map50,best_map50,map,final_train_loss,train_seconds,step_ms";

fn mean_std(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = (v.len() > 1).then(|| (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (mean, std)
}

/// Writes `results.csv` and `results.md` from the finished runs' summaries.
///
/// INT8 runs compare with this sweep's FP32 run of the same recipe and seed, or, where the sweep
/// has no FP32 run of that recipe, with `baseline`'s. `jobs_threads` is how this sweep ran its
/// runs (runs at once, threads each), unknown when the tables are rewritten without running.
pub fn write_results(
    out: &Path,
    runs: &[PlannedRun],
    baseline: Option<&Baseline>,
    jobs_threads: Option<(usize, usize)>,
) -> Result<()> {
    let rows: Vec<(&PlannedRun, Finished)> =
        runs.iter().filter_map(|r| finished(&out.join(&r.name)).map(|s| (r, s))).collect();
    let detection = rows.iter().any(|(_, s)| s.detection());
    if detection && rows.iter().any(|(_, s)| !s.detection()) {
        bail!(
            "the sweep in {} mixes classification and detection runs; give each task an experiment of its own",
            out.display()
        );
    }
    let (metric, metric_md) = if detection { ("mAP@0.5", "mAP@0.5 %") } else { ("Top-1", "top-1 %") };
    let onoff = |r: &PlannedRun, v: bool| {
        if r.precision == "fp32" {
            "n/a"
        } else if v {
            "on"
        } else {
            "off"
        }
    };
    // The same cells in both files.
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(r, s)| {
            vec![
                r.name.clone(),
                s.model.clone(),
                s.dataset.clone(),
                s.precision.clone(),
                onoff(r, s.dsgc).into(),
                onoff(r, s.dclr).into(),
                s.seed.to_string(),
                s.epochs.to_string(),
                format!("{:.2}", s.score().0),
                format!("{:.2}", s.score().1),
            ]
            .into_iter()
            .chain(detection.then(|| format!("{:.2}", s.map.unwrap_or(0.0))))
            .chain([
                format!("{:.4}", s.final_train_loss),
                format!("{:.1}", s.train_seconds),
                format!("{:.2}", s.step_ms),
            ])
            .collect()
        })
        .collect();
    let mut csv = format!("{}\n", if detection { CSV_HEADER_DETECTION } else { CSV_HEADER });
    for c in &cells {
        csv.push_str(&c.join(","));
        csv.push('\n');
    }
    write_atomic(&out.join("results.csv"), csv.as_bytes())?;

    let mut md = String::from("# Results\n\n");
    let how = match jobs_threads {
        Some((jobs, threads)) => {
            let threads = if threads == 1 { "1 thread".to_string() } else { format!("{threads} threads") };
            if jobs == 1 {
                format!("Runs ran one at a time with {threads}")
            } else {
                format!("Runs ran {jobs} at a time with {threads} each")
            }
        }
        None => "Tables rewritten from the finished runs (`--tables`); each run's train.log says how it ran".into(),
    };
    md.push_str(&format!(
        "{} of {} runs finished. {how}; step_ms is the mean compute time of a training step (forward, \
         backward, update).\n\n",
        rows.len(),
        runs.len()
    ));
    let extra = if detection { " mAP@[.5:.95] % |" } else { "" };
    md.push_str(&format!(
        "| run | model | dataset | precision | dsgc | dclr | seed | epochs | {metric_md} | best {metric_md} |{extra} \
         final train loss | train s | step ms |\n"
    ));
    md.push_str(&format!(
        "| --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: |{} ---: | ---: | ---: |\n",
        if detection { " ---: |" } else { "" }
    ));
    for c in &cells {
        md.push_str(&format!("| {} |\n", c.join(" | ")));
    }
    // INT8 against FP32, per recipe and INT8 ablation setting, paired by seed.
    let mut groups: BTreeMap<(String, String), Vec<&(&PlannedRun, Finished)>> = BTreeMap::new();
    for row in &rows {
        if row.0.precision == "int8" {
            let ablation = row.0.labels.iter().map(|(a, l)| format!("{a}={l}")).collect::<Vec<_>>().join(", ");
            let ablation = if ablation.is_empty() { "default".to_string() } else { ablation };
            groups.entry((row.0.recipe_name.clone(), ablation)).or_default().push(row);
        }
    }
    md.push_str(&format!(
        "\n## INT8 against FP32\n\n{metric} difference (INT8 minus FP32, percentage points) over the seeds both \
         precisions finished, mean and standard deviation, and the ratio of mean step times."
    ));
    if let Some(b) = baseline {
        md.push_str(&format!(
            " Where this sweep has no FP32 run of a recipe, the FP32 runs are those of the baseline experiment \
             `{}` ({}) with the same recipe, seed and overrides other than `quant.*`.",
            b.name,
            b.dir.display()
        ));
    }
    md.push_str("\n\n");
    md.push_str(&format!(
        "| recipe | INT8 setting | seeds | INT8 - FP32 {} (pp) | INT8 / FP32 step time |\n| --- | --- | ---: | ---: | ---: |\n",
        if detection { "mAP@0.5" } else { "top-1" }
    ));
    for ((recipe, ablation), int8_rows) in &groups {
        // INT8 top-1, FP32 top-1, and the INT8 and FP32 step ms of runs of this sweep, of each seed
        // with both: the step times of another sweep's runs are not compared, as they may have run
        // on another machine or beside other work.
        type Pair = (f64, f64, Option<(f64, f64)>);
        let fp32: HashMap<u64, &Finished> = rows
            .iter()
            .filter(|(r, _)| r.precision == "fp32" && &r.recipe_name == recipe)
            .map(|(r, s)| (r.seed, s))
            .collect();
        let pairs: Vec<Pair> = if fp32.is_empty()
            && let Some(b) = baseline
        {
            int8_rows.iter().filter_map(|(r, s)| b.partner(r).map(|top1| (s.score().0, top1, None))).collect()
        } else {
            int8_rows
                .iter()
                .filter_map(|(r, s)| {
                    fp32.get(&r.seed).map(|f| (s.score().0, f.score().0, Some((s.step_ms, f.step_ms))))
                })
                .collect()
        };
        if pairs.is_empty() {
            md.push_str(&format!("| {recipe} | {ablation} | 0 | no FP32 run to compare | |\n"));
            continue;
        }
        let diffs: Vec<f64> = pairs.iter().map(|p| p.0 - p.1).collect();
        let (m, sd) = mean_std(&diffs);
        let steps: Option<Vec<(f64, f64)>> = pairs.iter().map(|p| p.2).collect();
        let ratio = steps.map_or("not compared (FP32 from the baseline)".to_string(), |st| {
            format!("{:.2}", st.iter().map(|p| p.0).sum::<f64>() / st.iter().map(|p| p.1).sum::<f64>())
        });
        md.push_str(&format!(
            "| {recipe} | {ablation} | {} | {m:+.2}{} | {ratio} |\n",
            pairs.len(),
            sd.map_or(String::new(), |s| format!(" ± {s:.2}"))
        ));
    }
    write_atomic(&out.join("results.md"), md.as_bytes())?;
    println!("results: {} and {}", out.join("results.csv").display(), out.join("results.md").display());
    draw_pictures(out, runs);
    std::io::stdout().flush().ok();
    Ok(())
}

/// The pictures of the runs' curves beside the tables (`cargo xtask plot`): runs without events
/// yet are left out, and a picture that cannot be drawn is a note, never a failed sweep.
fn draw_pictures(out: &Path, runs: &[PlannedRun]) {
    let plan: Vec<crate::plot::Run> = runs
        .iter()
        .map(|r| crate::plot::Run {
            name: r.name.clone(),
            recipe_name: r.recipe_name.clone(),
            precision: r.precision.clone(),
            labels: r.labels.clone(),
            seed: r.seed,
        })
        .collect();
    let name = out.file_name().map_or_else(|| "sweep".into(), |n| n.to_string_lossy().into_owned());
    match crate::plot::plot_sweep(out, &name, &plan) {
        Ok(p) => {
            if p.written.is_empty() {
                println!("pictures: none yet, no run has TensorBoard events");
            } else {
                let files: Vec<String> = p.written.iter().map(|w| w.display().to_string()).collect();
                let missing = match p.missing.len() {
                    0 => String::new(),
                    n => format!(" ({n} runs without events yet left out)"),
                };
                println!("pictures: {}{missing}", files.join(" and "));
            }
            for note in p.notes {
                println!("pictures: {note}");
            }
        }
        Err(e) => println!("pictures: not drawn: {e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::experiment::{Experiment, plan};

    /// Writes a finished run's summary under `out`.
    fn finish(out: &Path, run: &PlannedRun, top1: f64, step_ms: f64) {
        // The fields the trainer writes (those the tables read, and some they do not).
        let s = serde_json::json!({
            "model": "cnn-small",
            "dataset": "fashion-mnist",
            "precision": run.precision,
            "dsgc": true,
            "dclr": true,
            "seed": run.seed,
            "epochs": 2,
            "top1": top1,
            "top5": 99.0,
            "best_top1": top1,
            "final_train_loss": 0.5,
            "train_seconds": 10.0,
            "step_ms": step_ms,
            "images": [100, 10],
            "params": 1000,
            "int8_layers": 2,
        });
        std::fs::create_dir_all(out.join(&run.name)).unwrap();
        std::fs::write(out.join(&run.name).join("summary.json"), serde_json::to_string(&s).unwrap()).unwrap();
    }

    #[test]
    fn int8_runs_pair_with_the_baseline_s_fp32_runs_of_the_same_schedule_and_seed() {
        let root = tempfile::tempdir().unwrap();
        let exp = |text: &str| -> Experiment { toml::from_str(text).unwrap() };
        // The baseline grid: FP32 and INT8, seeds 0 and 1, published under experiments/results.
        let base = exp(r#"
            recipes = ["cnn-small-fashion-mnist"]
            seeds = [0, 1]
            set = ["train.epochs=2"]
            "#);
        let base_runs = plan(&base, &[]).unwrap();
        let base_out = root.path().join("experiments/results/base");
        for r in &base_runs {
            let top1 = if r.precision == "fp32" { 70.0 + 2.0 * r.seed as f64 } else { 60.0 };
            finish(&base_out, r, top1, 100.0);
        }
        std::fs::write(base_out.join("plan.json"), serde_json::json!({ "runs": base_runs }).to_string()).unwrap();
        write_results(&base_out, &base_runs, None, Some((1, 2))).unwrap();

        // An INT8-only ablation of it: its runs pair with the baseline's FP32 runs by seed.
        let ablation = exp(r#"
            recipes = ["cnn-small-fashion-mnist"]
            precisions = ["int8"]
            seeds = [0, 1]
            set = ["train.epochs=2", "quant.weights=\"per-channel\""]
            baseline = "base"
            "#);
        let runs = plan(&ablation, &[]).unwrap();
        let out = root.path().join("runs/ablation");
        finish(&out, &runs[0], 71.0, 50.0);
        finish(&out, &runs[1], 74.0, 50.0);
        let b = Baseline::load(root.path(), ablation.baseline.as_deref().unwrap()).unwrap();
        assert_eq!(b.dir, Path::new("experiments/results/base"));
        assert_eq!(b.fp32.len(), 2);
        write_results(&out, &runs, Some(&b), None).unwrap();
        let md = std::fs::read_to_string(out.join("results.md")).unwrap();
        // Seeds 0 and 1: 71 - 70 and 74 - 72 points; step times of another sweep are not compared.
        assert!(
            md.contains(
                "| cnn-small-fashion-mnist | default | 2 | +1.50 ± 0.71 | not compared (FP32 from the baseline) |"
            ),
            "{md}"
        );
        assert!(md.contains("`base`"), "{md}");
        assert!(md.contains("rewritten from the finished runs"), "{md}");
        // Without the baseline there is nothing to compare with.
        write_results(&out, &runs, None, Some((1, 2))).unwrap();
        let md = std::fs::read_to_string(out.join("results.md")).unwrap();
        assert!(md.contains("| 0 | no FP32 run to compare |"), "{md}");
        assert!(md.contains("Runs ran one at a time with 2 threads;"), "{md}");
        write_results(&out, &runs, None, Some((2, 1))).unwrap();
        let md = std::fs::read_to_string(out.join("results.md")).unwrap();
        assert!(md.contains("Runs ran 2 at a time with 1 thread each;"), "{md}");

        // A run on another schedule, or of a seed the baseline lacks, has no partner.
        let mut other = runs[0].clone();
        other.sets.push("train.epochs=3".into());
        assert_eq!(b.partner(&other), None);
        let mut other = runs[0].clone();
        other.seed = 5;
        assert_eq!(b.partner(&other), None);
        assert_eq!(b.partner(&runs[1]), Some(72.0));

        // A baseline that is nowhere, or whose table is not a results table, is an error that
        // names the place.
        let e = Baseline::load(root.path(), "missing").unwrap_err().to_string();
        assert!(e.contains("baseline experiment missing") && e.contains("experiments/results/missing"), "{e}");
        std::fs::write(base_out.join("results.csv"), "run,top1\nx,1\n").unwrap();
        let e = Baseline::load(root.path(), "base").unwrap_err().to_string();
        assert!(e.contains("results.csv") && e.contains("header"), "{e}");
    }

    #[test]
    fn detection_sweeps_report_map_in_the_metric_columns() {
        let root = tempfile::tempdir().unwrap();
        let e: Experiment = toml::from_str(
            r#"
            recipes = ["ssdlite-mobilenetv2-deepforest-trees"]
            seeds = [0, 1]
            set = ["train.epochs=2"]
            "#,
        )
        .unwrap();
        let runs = plan(&e, &[]).unwrap();
        let out = root.path().join("runs/det");
        for r in &runs {
            let (m, best) = if r.precision == "fp32" { (40.0 + r.seed as f64, 45.0) } else { (39.5, 44.0) };
            let s = serde_json::json!({
                "task": "detection", "model": "ssdlite-mobilenetv2", "dataset": "deepforest-trees",
                "precision": r.precision, "dsgc": true, "dclr": true, "seed": r.seed, "epochs": 2,
                "map50": m, "map": m / 3.0, "best_map50": best, "final_train_loss": 3.0,
                "train_seconds": 10.0, "step_ms": 100.0, "images": [44, 12], "params": 1000, "int8_layers": 2,
            });
            std::fs::create_dir_all(out.join(&r.name)).unwrap();
            std::fs::write(out.join(&r.name).join("summary.json"), s.to_string()).unwrap();
        }
        write_results(&out, &runs, None, Some((1, 2))).unwrap();
        let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
        assert_eq!(csv.lines().next(), Some(CSV_HEADER_DETECTION));
        assert!(csv.contains(",2,40.00,45.00,13.33,3.0000,"), "{csv}");
        let md = std::fs::read_to_string(out.join("results.md")).unwrap();
        assert!(md.contains("| mAP@0.5 % | best mAP@0.5 % | mAP@[.5:.95] % |"), "{md}");
        // Seeds 0 and 1: 39.5 - 40 and 39.5 - 41.
        assert!(md.contains("INT8 - FP32 mAP@0.5 (pp)"), "{md}");
        assert!(md.contains("| ssdlite-mobilenetv2-deepforest-trees | default | 2 | -1.00 ± 0.71 | 1.00 |"), "{md}");
        // A classification run among them is refused.
        finish(&out, &runs[0], 70.0, 1.0);
        let err = write_results(&out, &runs, None, None).unwrap_err().to_string();
        assert!(err.contains("mixes classification and detection"), "{err}");
    }
}
