//! `cargo xtask sweep`: expands an experiment (`experiments/*.toml`) into runs over recipes x
//! precision x ablation axes x seeds, runs each as its own trainer process (up to `--jobs` at
//! once), skips finished runs and resumes interrupted ones, and writes `results.csv` and
//! `results.md` with the INT8-minus-FP32 accuracy and the INT8/FP32 step-time ratio.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use int8_train::recipe::Recipe;
use int8_train::run::{Summary, finished};
use serde::{Deserialize, Serialize};

/// An experiment file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// What it shows.
    #[serde(default)]
    pub description: String,
    /// Recipe names (from `zoo/recipes`) or paths, each with overrides of its own if needed.
    pub recipes: Vec<RecipeEntry>,
    /// Precisions to run.
    #[serde(default = "both")]
    pub precisions: Vec<String>,
    /// Seeds.
    #[serde(default = "seed0")]
    pub seeds: Vec<u64>,
    /// `key=value` overrides for every run.
    #[serde(default)]
    pub set: Vec<String>,
    /// Ablation axes.
    #[serde(default)]
    pub axis: Vec<Axis>,
    /// Another experiment whose FP32 runs this one's INT8 runs are compared with where this one
    /// has no FP32 run of the same recipe: an INT8-only ablation of an earlier FP32-vs-INT8 grid.
    /// Its runs are read from `runs/<baseline>/`, or else from the published
    /// `experiments/results/<baseline>/` (`plan.json` and `results.csv`); a run pairs only with
    /// one of the same recipe, seed and overrides other than `quant.*`.
    #[serde(default)]
    pub baseline: Option<String>,
}

/// A recipe of an experiment: its name or path, or that with overrides for its runs only (a
/// schedule that fits this recipe's cost, say), applied after the experiment's `set`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RecipeEntry {
    /// A recipe name or path.
    Name(String),
    /// A recipe name or path with overrides.
    WithSet(RecipeWithSet),
}

/// A recipe name or path with overrides for its runs only.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeWithSet {
    /// The recipe name or path.
    pub name: String,
    /// Overrides for this recipe's runs.
    pub set: Vec<String>,
}

impl RecipeEntry {
    fn name(&self) -> &str {
        match self {
            RecipeEntry::Name(n) | RecipeEntry::WithSet(RecipeWithSet { name: n, .. }) => n,
        }
    }
    fn sets(&self) -> &[String] {
        match self {
            RecipeEntry::Name(_) => &[],
            RecipeEntry::WithSet(r) => &r.set,
        }
    }
}

fn both() -> Vec<String> {
    vec!["fp32".into(), "int8".into()]
}
fn seed0() -> Vec<u64> {
    vec![0]
}

/// One ablation axis: a recipe key and its values, or labelled groups of overrides.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Axis {
    /// The label in run names and tables (`dsgc`).
    pub name: String,
    /// The recipe key the plain values set (`quant.dsgc`).
    #[serde(default)]
    pub key: Option<String>,
    /// The values: plain values for `key`, or `{ label = "...", set = ["k=v", ...] }`.
    pub values: Vec<AxisValue>,
    /// Whether the axis applies to INT8 runs only (FP32 runs take none of its values); by
    /// default, axes over `quant.*` keys or with labelled overrides do.
    #[serde(default)]
    pub int8_only: Option<bool>,
}

/// A value of an axis.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum AxisValue {
    /// A labelled group of overrides.
    Labelled {
        /// The label.
        label: String,
        /// Overrides.
        set: Vec<String>,
    },
    /// A plain value of the axis's key.
    Plain(toml::Value),
}

/// One run of a sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedRun {
    /// Folder name under the sweep's output.
    pub name: String,
    /// The recipe file.
    pub recipe: PathBuf,
    /// The recipe's name.
    pub recipe_name: String,
    /// Overrides, in order.
    pub sets: Vec<String>,
    /// Axis labels (name, label), for the tables.
    pub labels: Vec<(String, String)>,
    /// `fp32` or `int8`.
    pub precision: String,
    /// Seed.
    pub seed: u64,
}

fn value_label(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Boolean(true) => "on".into(),
        toml::Value::Boolean(false) => "off".into(),
        other => other.to_string(),
    }
}

/// A point of the axis grid: its (axis, label) pairs and its overrides.
type Combo = (Vec<(String, String)>, Vec<String>);

/// Expands an experiment into runs; `cli_sets` apply last.
pub fn plan(exp: &Experiment, cli_sets: &[String]) -> Result<Vec<PlannedRun>> {
    let mut runs = Vec::new();
    for p in &exp.precisions {
        if p != "fp32" && p != "int8" {
            bail!("precision `{p}` is not fp32 or int8");
        }
    }
    for entry in &exp.recipes {
        let recipe = entry.name();
        let path = int8_zoo::find_recipe(recipe).with_context(|| {
            let names: Vec<String> = int8_zoo::recipes().into_iter().map(|r| r.0).collect();
            format!("no recipe `{recipe}`; the zoo has: {}", names.join(", "))
        })?;
        let path = std::path::absolute(&path).with_context(|| format!("cannot resolve {}", path.display()))?;
        let recipe_name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("run").to_string();
        for precision in &exp.precisions {
            // The grid of axis values that apply at this precision.
            let mut combos: Vec<Combo> = vec![(vec![], vec![])];
            for axis in &exp.axis {
                let labelled = axis.values.iter().any(|v| matches!(v, AxisValue::Labelled { .. }));
                let int8_only =
                    axis.int8_only.unwrap_or(labelled || axis.key.as_deref().is_some_and(|k| k.starts_with("quant.")));
                if int8_only && precision == "fp32" {
                    continue;
                }
                let mut next = Vec::new();
                for (labels, sets) in &combos {
                    for v in &axis.values {
                        let (label, extra) = match v {
                            AxisValue::Labelled { label, set } => (label.clone(), set.clone()),
                            AxisValue::Plain(val) => {
                                let key = axis.key.as_ref().with_context(|| {
                                    format!("axis `{}` has plain values, so it needs a `key`", axis.name)
                                })?;
                                (value_label(val), vec![format!("{key}={val}")])
                            }
                        };
                        let mut l = labels.clone();
                        l.push((axis.name.clone(), label));
                        let mut s = sets.clone();
                        s.extend(extra);
                        next.push((l, s));
                    }
                }
                combos = next;
            }
            for (labels, axis_sets) in combos {
                for &seed in &exp.seeds {
                    let mut name = format!("{recipe_name}-{precision}");
                    for (a, l) in &labels {
                        name.push_str(&format!("-{a}_{l}"));
                    }
                    name.push_str(&format!("-s{seed}"));
                    let mut sets = exp.set.clone();
                    sets.extend(entry.sets().iter().cloned());
                    sets.extend(axis_sets.iter().cloned());
                    sets.push(format!("quant.precision=\"{precision}\""));
                    sets.push(format!("train.seed={seed}"));
                    sets.extend(cli_sets.iter().cloned());
                    runs.push(PlannedRun {
                        name: name.replace(|c: char| !(c.is_ascii_alphanumeric() || "-_.".contains(c)), "_"),
                        recipe: path.clone(),
                        recipe_name: recipe_name.clone(),
                        sets,
                        labels: labels.clone(),
                        precision: precision.clone(),
                        seed,
                    });
                }
            }
        }
    }
    let mut names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
    names.sort();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("two runs would share the folder `{}`; give the axes distinct labels", w[0]);
    }
    Ok(runs)
}

/// The unfinished runs' indices in the order they start: seed by seed, each seed's runs in plan
/// order. A grid stopped part-way (runs of hours, finished over several sittings) then holds
/// whole seeds, FP32 and INT8 side by side, rather than every FP32 seed and no INT8 one.
fn start_order(runs: &[PlannedRun], is_finished: impl Fn(&PlannedRun) -> bool) -> Vec<usize> {
    let mut todo: Vec<usize> = (0..runs.len()).filter(|&i| !is_finished(&runs[i])).collect();
    todo.sort_by_key(|&i| runs[i].seed);
    todo
}

/// Options of `cargo xtask sweep`.
#[derive(Debug)]
pub struct SweepOptions {
    /// The experiment file.
    pub experiment: PathBuf,
    /// The output folder.
    pub out: PathBuf,
    /// Runs at once.
    pub jobs: usize,
    /// Print the plan only.
    pub dry_run: bool,
    /// Rewrite the results tables from the finished runs only.
    pub tables: bool,
    /// Build the trainer again and replace the sweep's copy.
    pub rebuild: bool,
    /// Overrides for every run.
    pub sets: Vec<String>,
    /// A data folder searched first.
    pub data_dir: Option<PathBuf>,
}

/// The live state of one run, for the progress lines.
#[derive(Debug, Clone, Default)]
struct Live {
    step: u64,
    steps: u64,
    epoch: u64,
    epochs: u64,
    loss: Option<f64>,
    eta_s: Option<f64>,
}

/// Runs a sweep.
pub fn sweep(root: &Path, opts: &SweepOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let text = std::fs::read_to_string(&opts.experiment)
        .with_context(|| format!("cannot read the experiment {}", opts.experiment.display()))?;
    let exp: Experiment =
        toml::from_str(&text).with_context(|| format!("{}: not a valid experiment", opts.experiment.display()))?;
    let runs = plan(&exp, &opts.sets).with_context(|| format!("{}", opts.experiment.display()))?;
    // Type every recipe before anything runs, so that a typo fails in a second, not an hour in.
    let mut resolved = Vec::new();
    // (model, rule patterns) already checked: the seeds of a recipe share them.
    let mut checked_rules = std::collections::HashSet::new();
    for r in &runs {
        let recipe = Recipe::load(&r.recipe, &r.sets).with_context(|| format!("run {}", r.name))?;
        // Layer rules are checked against the model's layer names, which takes building it.
        let policy = recipe.policy();
        let patterns: Vec<&str> = policy.rules.iter().map(|rule| rule.pattern.as_str()).collect();
        if !patterns.is_empty() && checked_rules.insert((recipe.model.clone(), patterns.join("\n"))) {
            int8_zoo::build(&recipe.model, 10, &policy, 0).with_context(|| format!("run {}", r.name))?;
        }
        // A run folder made with another recipe (the experiment changed since) is not reused.
        let saved = opts.out.join(&r.name).join("recipe.toml");
        if let Ok(text) = std::fs::read_to_string(&saved)
            && text != recipe.to_toml()
        {
            bail!(
                "{} was made with a different recipe than this experiment now gives run {}; \
                 move or delete that folder, or pass another --out",
                saved.display(),
                r.name
            );
        }
        resolved.push(recipe);
    }
    // The baseline is read before anything runs, so that a wrong name fails now, not at the end.
    let baseline = exp.baseline.as_deref().map(|name| Baseline::load(root, name)).transpose()?;
    println!("{} runs in {} (jobs: {}):", runs.len(), opts.out.display(), opts.jobs);
    if let Some(b) = &baseline {
        println!("INT8 runs compare with the FP32 runs of {} ({} found in {})", b.name, b.fp32.len(), b.dir.display());
    }
    for (r, recipe) in runs.iter().zip(&resolved) {
        let state = match finished(&opts.out.join(&r.name)) {
            Some(_) => "finished",
            None if opts.out.join(&r.name).join("checkpoints/last.safetensors").exists() => "to resume",
            None => "to run",
        };
        println!(
            "  {:<48} {} {} epochs={} batch={} [{state}]",
            r.name, recipe.model, recipe.dataset, recipe.train.epochs, recipe.train.batch
        );
    }
    if opts.dry_run {
        return Ok(());
    }
    if opts.tables {
        if !opts.out.is_dir() {
            bail!("{} does not exist: no run of this sweep has started; run it without --tables", opts.out.display());
        }
        return write_results(&opts.out, &runs, baseline.as_ref(), None);
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let plan_json = serde_json::json!({ "experiment": exp, "cli_set": opts.sets, "runs": runs });
    write_atomic(&opts.out.join("plan.json"), serde_json::to_string_pretty(&plan_json)?.as_bytes())?;
    std::fs::copy(&opts.experiment, opts.out.join("experiment.toml")).context("cannot copy the experiment")?;

    // The runs start from a copy of the trainer made when the sweep first ran, so that neither a
    // rebuild while the sweep goes on (other work in the same checkout) nor a change of the code
    // before it is resumed gives one sweep's runs different code; `--rebuild` takes the
    // workspace's current code (after a fix, say).
    let trainer = opts.out.join(format!(".int8-train{}", std::env::consts::EXE_SUFFIX));
    if opts.rebuild || !trainer.is_file() {
        let built = build_trainer(root)?;
        let part = opts.out.join(".int8-train.part");
        std::fs::copy(&built, &part)
            .and_then(|_| std::fs::rename(&part, &trainer))
            .with_context(|| format!("cannot copy the trainer {} into {}", built.display(), opts.out.display()))?;
        println!("trainer: built from the workspace, copied to {}", trainer.display());
    } else {
        println!(
            "trainer: this sweep's copy {} (made {}), so that all its runs run the same code; \
             --rebuild takes the workspace's current code",
            trainer.display(),
            age(&trainer)
        );
    }
    let threads = (std::thread::available_parallelism().map_or(1, |n| n.get()) / opts.jobs).max(1);
    let todo = start_order(&runs, |r| finished(&opts.out.join(&r.name)).is_some());
    let skipped = runs.len() - todo.len();
    if skipped > 0 {
        println!("{skipped} finished runs skipped");
    }
    let live: Arc<Mutex<HashMap<String, Live>>> = Arc::default();
    let mut queue = todo.into_iter();
    let mut active: Vec<(usize, Child, Instant)> = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    let mut done = skipped;
    let started = Instant::now();
    let mut last_status = Instant::now();
    let mut forwarded = false;
    loop {
        while active.len() < opts.jobs && !stop.load(Ordering::Relaxed) {
            let Some(i) = queue.next() else { break };
            let r = &runs[i];
            let dir = opts.out.join(&r.name);
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("train.log"))
                .with_context(|| format!("cannot open {}", dir.join("train.log").display()))?;
            let mut cmd = Command::new(&trainer);
            // Runs work from the workspace root, where recipes' relative data paths point.
            cmd.current_dir(root);
            cmd.arg(&r.recipe).arg("--out").arg(&dir).args(["--resume", "--progress", "json"]);
            for s in &r.sets {
                cmd.arg("--set").arg(s);
            }
            if let Some(d) = &opts.data_dir {
                cmd.arg("--data-dir").arg(d);
            }
            cmd.env("RAYON_NUM_THREADS", threads.to_string()).stdout(Stdio::piped()).stderr(log);
            // Each run in its own process group: a Ctrl-C at the terminal reaches the sweep only,
            // which passes it on once, so that each run stops with a checkpoint.
            #[cfg(unix)]
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
            let mut child = cmd.spawn().with_context(|| format!("cannot start {}", trainer.display()))?;
            let stdout = child.stdout.take().context("no stdout from the trainer")?;
            let (live2, name) = (live.clone(), r.name.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                        let l = Live {
                            step: v["step"].as_u64().unwrap_or(0),
                            steps: v["steps"].as_u64().unwrap_or(0),
                            epoch: v["epoch"].as_u64().unwrap_or(0),
                            epochs: v["epochs"].as_u64().unwrap_or(0),
                            loss: v["loss"].as_f64(),
                            eta_s: v["eta_s"].as_f64(),
                        };
                        live2.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone(), l);
                    }
                }
            });
            println!("[{}/{}] started {}", done + active.len() + 1, runs.len(), r.name);
            active.push((i, child, Instant::now()));
        }
        if active.is_empty() {
            break;
        }
        if stop.load(Ordering::Relaxed) && !forwarded {
            forwarded = true;
            println!("stopping: each running run saves a checkpoint and exits; no new runs start");
            for (_, child, _) in &active {
                let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut k = 0;
        while k < active.len() {
            let (i, child, t0) = &mut active[k];
            if let Some(status) = child.try_wait()? {
                let r = &runs[*i];
                let dir = opts.out.join(&r.name);
                done += 1;
                match finished(&dir) {
                    Some(s) if status.success() => println!(
                        "[{done}/{}] finished {} in {}: top-1 {:.2}% (best {:.2}%), {:.1} ms/step",
                        runs.len(),
                        r.name,
                        fmt_secs(t0.elapsed().as_secs_f64()),
                        s.top1,
                        s.best_top1,
                        s.step_ms
                    ),
                    _ if stop.load(Ordering::Relaxed) => {
                        println!("[{done}/{}] interrupted {} (its checkpoint resumes it)", runs.len(), r.name);
                    }
                    _ => {
                        let tail = last_lines(&dir.join("train.log"), 3);
                        println!("[{done}/{}] FAILED {} ({status}): {tail}", runs.len(), r.name);
                        failed.push((r.name.clone(), tail));
                    }
                }
                live.lock().unwrap_or_else(|e| e.into_inner()).remove(&r.name);
                active.remove(k);
            } else {
                k += 1;
            }
        }
        if last_status.elapsed() >= Duration::from_secs(15) && !active.is_empty() {
            let l = live.lock().unwrap_or_else(|e| e.into_inner());
            for (i, _, _) in &active {
                let name = &runs[*i].name;
                match l.get(name) {
                    Some(p) => println!(
                        "  {name}: epoch {}/{} step {}/{} loss {} eta {}",
                        p.epoch,
                        p.epochs,
                        p.step,
                        p.steps,
                        p.loss.map_or("?".into(), |v| format!("{v:.3}")),
                        p.eta_s.map_or("?".into(), fmt_secs)
                    ),
                    None => println!("  {name}: loading data and building the model"),
                }
            }
            let left = runs.len() - done;
            println!(
                "  total: {done}/{} runs ended, {left} to go, {} elapsed",
                runs.len(),
                fmt_secs(started.elapsed().as_secs_f64())
            );
            last_status = Instant::now();
        }
    }
    write_results(&opts.out, &runs, baseline.as_ref(), Some((opts.jobs, threads)))?;
    if stop.load(Ordering::Relaxed) {
        bail!("stopped by Ctrl-C; run the same command again to finish the sweep (finished runs are kept)");
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} runs failed (their train.log says why): {}; they resume with this sweep's trainer \
             copy, so after a fix of the code run it again with --rebuild",
            failed.len(),
            runs.len(),
            failed.iter().map(|f| f.0.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// How long ago `file` was last written, or `?`.
fn age(file: &Path) -> String {
    std::fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or_else(|| "?".into(), |d| format!("{} ago", fmt_secs(d.as_secs_f64())))
}

/// Builds the trainer in release mode and returns its path.
pub fn build_trainer(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the trainer in release mode...");
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "--quiet", "--package", "int8-train", "--bin", "int8-train"])
        .status()
        .context("cannot start cargo to build the trainer")?;
    if !status.success() {
        bail!("building the trainer failed ({status}); the compiler's message is above");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("release").join(format!("int8-train{}", std::env::consts::EXE_SUFFIX)))
}

fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// `1h02m`, `3m05s` or `12s`.
pub fn fmt_secs(s: f64) -> String {
    int8_train::progress::format_secs(s)
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    int8_train::write_atomic(path, bytes).map_err(anyhow::Error::from)
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
        if lines.next() != Some(CSV_HEADER) {
            bail!("{}: the header is not `{CSV_HEADER}`; rerun its sweep to rewrite it", csv_path.display());
        }
        let mut fp32 = Vec::new();
        for (i, line) in lines.enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let cells: Vec<&str> = line.split(',').collect();
            let bad = || anyhow::anyhow!("{} line {}: not a results row: {line}", csv_path.display(), i + 2);
            let [run, _, _, precision, _, _, _, _, top1, _, _, _, _] = cells[..] else { return Err(bad()) };
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

/// The exact header of `results.csv`.
pub const CSV_HEADER: &str =
    "run,model,dataset,precision,dsgc,dclr,seed,epochs,top1,best_top1,final_train_loss,train_seconds,step_ms";

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
    let rows: Vec<(&PlannedRun, Summary)> =
        runs.iter().filter_map(|r| finished(&out.join(&r.name)).map(|s| (r, s))).collect();
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
                format!("{:.2}", s.top1),
                format!("{:.2}", s.best_top1),
                format!("{:.4}", s.final_train_loss),
                format!("{:.1}", s.train_seconds),
                format!("{:.2}", s.step_ms),
            ]
        })
        .collect();
    let mut csv = format!("{CSV_HEADER}\n");
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
    md.push_str("| run | model | dataset | precision | dsgc | dclr | seed | epochs | top-1 % | best top-1 % | final train loss | train s | step ms |\n");
    md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |\n");
    for c in &cells {
        md.push_str(&format!("| {} |\n", c.join(" | ")));
    }
    // INT8 against FP32, per recipe and INT8 ablation setting, paired by seed.
    let mut groups: BTreeMap<(String, String), Vec<&(&PlannedRun, Summary)>> = BTreeMap::new();
    for row in &rows {
        if row.0.precision == "int8" {
            let ablation = row.0.labels.iter().map(|(a, l)| format!("{a}={l}")).collect::<Vec<_>>().join(", ");
            let ablation = if ablation.is_empty() { "default".to_string() } else { ablation };
            groups.entry((row.0.recipe_name.clone(), ablation)).or_default().push(row);
        }
    }
    md.push_str("\n## INT8 against FP32\n\nTop-1 difference (INT8 minus FP32, percentage points) over the seeds both precisions \
                 finished, mean and standard deviation, and the ratio of mean step times.");
    if let Some(b) = baseline {
        md.push_str(&format!(
            " Where this sweep has no FP32 run of a recipe, the FP32 runs are those of the baseline experiment \
             `{}` ({}) with the same recipe, seed and overrides other than `quant.*`.",
            b.name,
            b.dir.display()
        ));
    }
    md.push_str("\n\n");
    md.push_str("| recipe | INT8 setting | seeds | INT8 - FP32 top-1 (pp) | INT8 / FP32 step time |\n| --- | --- | ---: | ---: | ---: |\n");
    for ((recipe, ablation), int8_rows) in &groups {
        // INT8 top-1, FP32 top-1, and the INT8 and FP32 step ms of runs of this sweep, of each seed
        // with both: the step times of another sweep's runs are not compared, as they may have run
        // on another machine or beside other work.
        type Pair = (f64, f64, Option<(f64, f64)>);
        let fp32: HashMap<u64, &Summary> = rows
            .iter()
            .filter(|(r, _)| r.precision == "fp32" && &r.recipe_name == recipe)
            .map(|(r, s)| (r.seed, s))
            .collect();
        let pairs: Vec<Pair> = if fp32.is_empty()
            && let Some(b) = baseline
        {
            int8_rows.iter().filter_map(|(r, s)| b.partner(r).map(|top1| (s.top1, top1, None))).collect()
        } else {
            int8_rows
                .iter()
                .filter_map(|(r, s)| fp32.get(&r.seed).map(|f| (s.top1, f.top1, Some((s.step_ms, f.step_ms)))))
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
    std::io::stdout().flush().ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_s_own_overrides_apply_to_its_runs_only_after_the_experiment_s() {
        let exp: Experiment = toml::from_str(
            r#"
            recipes = ["cnn-small-fashion-mnist", { name = "resnet20-cifar10", set = ["train.epochs=4"] }]
            seeds = [1]
            set = ["train.epochs=2"]
            [[axis]]
            name = "dsgc"
            key = "quant.dsgc"
            values = [false]
            "#,
        )
        .unwrap();
        let runs = plan(&exp, &["optim.lr=0.5".into()]).unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cnn-small-fashion-mnist-fp32-s1",
                "cnn-small-fashion-mnist-int8-dsgc_off-s1",
                "resnet20-cifar10-fp32-s1",
                "resnet20-cifar10-int8-dsgc_off-s1",
            ]
        );
        assert_eq!(runs[0].sets, ["train.epochs=2", "quant.precision=\"fp32\"", "train.seed=1", "optim.lr=0.5"]);
        assert_eq!(
            runs[3].sets,
            [
                "train.epochs=2",
                "train.epochs=4",
                "quant.dsgc=false",
                "quant.precision=\"int8\"",
                "train.seed=1",
                "optim.lr=0.5"
            ]
        );
        // A misspelt field is an error, not a silently ignored override.
        let bad = toml::from_str::<Experiment>(r#"recipes = [{ name = "resnet20-cifar10", sets = ["a=1"] }]"#);
        assert!(bad.is_err());
    }

    #[test]
    fn runs_start_seed_by_seed_and_finished_ones_are_left_out() {
        let exp: Experiment = toml::from_str(
            r#"
            recipes = ["cnn-small-fashion-mnist"]
            precisions = ["fp32", "int8"]
            seeds = [0, 1, 2]
            "#,
        )
        .unwrap();
        let runs = plan(&exp, &[]).unwrap();
        let order = start_order(&runs, |r| r.name.ends_with("fp32-s1"));
        let names: Vec<&str> = order.iter().map(|&i| runs[i].name.as_str()).collect();
        assert_eq!(
            names,
            [
                "cnn-small-fashion-mnist-fp32-s0",
                "cnn-small-fashion-mnist-int8-s0",
                "cnn-small-fashion-mnist-int8-s1",
                "cnn-small-fashion-mnist-fp32-s2",
                "cnn-small-fashion-mnist-int8-s2",
            ]
        );
    }

    /// Writes a finished run's summary under `out`.
    fn finish(out: &Path, run: &PlannedRun, top1: f64, step_ms: f64) {
        let s = Summary {
            model: "cnn-small".into(),
            dataset: "fashion-mnist".into(),
            precision: run.precision.clone(),
            dsgc: true,
            dclr: true,
            seed: run.seed,
            epochs: 2,
            top1,
            top5: 99.0,
            best_top1: top1,
            final_train_loss: 0.5,
            train_seconds: 10.0,
            step_ms,
            images: (100, 10),
            params: 1000,
            int8_layers: 2,
        };
        std::fs::create_dir_all(out.join(&run.name)).unwrap();
        std::fs::write(out.join(&run.name).join("summary.json"), serde_json::to_string(&s).unwrap()).unwrap();
    }

    #[test]
    fn every_committed_experiment_plans_with_valid_recipes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("experiments"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        assert!(files.len() >= 10, "{files:?}");
        let out = tempfile::tempdir().unwrap();
        for experiment in files {
            let dest = out.path().join(experiment.file_stem().unwrap());
            dry_run(&root, &experiment, &dest).unwrap_or_else(|e| panic!("{}: {e:#}", experiment.display()));
        }
    }

    /// `cargo xtask sweep EXPERIMENT --dry-run --out OUT`, run from `root`.
    fn dry_run(root: &Path, experiment: &Path, out: &Path) -> Result<()> {
        let opts = SweepOptions {
            experiment: experiment.to_path_buf(),
            out: out.to_path_buf(),
            jobs: 1,
            dry_run: true,
            tables: false,
            rebuild: false,
            sets: vec![],
            data_dir: None,
        };
        sweep(root, &opts, Arc::new(AtomicBool::new(false)))
    }

    #[test]
    fn a_layer_rule_that_names_no_layer_fails_the_sweep_before_any_run() {
        let dir = tempfile::tempdir().unwrap();
        let experiment = dir.path().join("typo.toml");
        std::fs::write(
            &experiment,
            r#"
            recipes = ["resnet20-cifar10", "mobilenetv2-cifar10"]
            precisions = ["int8"]
            set = ['quant.rules=[{ pattern = "*.dw.conv", int8 = false }]']
            "#,
        )
        .unwrap();
        let out = dir.path().join("out");
        let err = format!("{:#}", dry_run(Path::new("."), &experiment, &out).unwrap_err());
        assert!(err.contains("resnet20-cifar10-int8-s0") && err.contains("`*.dw.conv`"), "{err}");
        assert!(!out.exists(), "nothing was written");
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
}
