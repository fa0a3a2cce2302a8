//! One run of one recipe: the training loop (forward, loss, backward, SGD with each INT8 layer's
//! DCLR multiplier), evaluation (top-1/top-5, or mAP for a detector; see `task.rs`), TensorBoard
//! events, checkpoints (at epoch ends, every `train.checkpoint_epochs` of them, and every
//! `train.checkpoint_every` steps), resume from the last checkpoint, divergence detection, and
//! the run's summary.
//!
//! A run folder holds `recipe.toml` (the resolved recipe), the TensorBoard event files,
//! `checkpoints/last.safetensors` and `checkpoints/best.safetensors`, `metrics.json` (one record
//! per epoch) and, once finished, `summary.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use int8_nn::optim::{Schedule, Sgd};
use int8_nn::{Layer, Module};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, EpochRecord, TrainState};
use crate::progress::{Progress, ProgressMode};
use crate::recipe::{PrecisionName, Recipe, Task};
use crate::task::{self, Data, Metrics, Net};
use crate::tensorboard::EventWriter;
use crate::{Result, TrainError, write_atomic};

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run folder.
    pub out: PathBuf,
    /// Continue the run in `out` from its last checkpoint (a finished run is left as it is; an
    /// empty folder starts afresh).
    pub resume: bool,
    /// A data folder searched first.
    pub data_dir: Option<PathBuf>,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// Set (by Ctrl-C) to stop after the current step with a checkpoint.
    pub stop: Arc<AtomicBool>,
    /// Stop after this global step as if killed: no checkpoint is written (for tests of resume).
    #[doc(hidden)]
    pub kill_at_step: Option<u64>,
}

impl RunOptions {
    /// Options for a run folder, with automatic progress display.
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            resume: false,
            data_dir: None,
            progress: ProgressMode::auto(),
            stop: Arc::new(AtomicBool::new(false)),
            kill_at_step: None,
        }
    }
}

/// What a finished run reports (`summary.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// What the model learned.
    #[serde(default, skip_serializing_if = "Task::is_classification")]
    pub task: Task,
    /// Model.
    pub model: String,
    /// Dataset.
    pub dataset: String,
    /// `fp32` or `int8`.
    pub precision: String,
    /// DSGC on (INT8 runs).
    pub dsgc: bool,
    /// DCLR on (INT8 runs).
    pub dclr: bool,
    /// Seed.
    pub seed: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// Final test top-1 (%), classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1: Option<f64>,
    /// Final test top-5 (%), classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top5: Option<f64>,
    /// Best test top-1 (%) over the evaluated epochs, classification.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_top1: Option<f64>,
    /// Final test mAP@0.5 (%, VOC all-point), detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map50: Option<f64>,
    /// Final test mAP@[.5:.95] (%, COCO), detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<f64>,
    /// Best test mAP@0.5 (%) over the evaluated epochs, detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_map50: Option<f64>,
    /// Mean training loss of the last epoch.
    pub final_train_loss: f64,
    /// Seconds spent training (evaluation and checkpoints excluded).
    pub train_seconds: f64,
    /// Mean compute time of a training step (forward, backward, update), in ms.
    pub step_ms: f64,
    /// Training and test images.
    pub images: (usize, usize),
    /// Trainable parameters.
    pub params: usize,
    /// Layers running in INT8.
    pub int8_layers: usize,
}

impl Summary {
    /// One line for people: the model, precision, final and best metric, speed.
    pub fn describe(&self) -> String {
        let metric = match (self.top1, self.map50) {
            (Some(t1), _) => format!("top-1 {t1:.2}% (best {:.2}%)", self.best_top1.unwrap_or(t1)),
            (None, Some(m)) => format!("mAP@0.5 {m:.2}% (best {:.2}%)", self.best_map50.unwrap_or(m)),
            _ => "not evaluated".into(),
        };
        format!(
            "{} {} {metric}, {:.1} ms/step, {:.0} s of training",
            self.model, self.precision, self.step_ms, self.train_seconds
        )
    }
}

/// The summary of a finished run in `out`, if there is one.
pub fn finished(out: &Path) -> Option<Summary> {
    let text = std::fs::read_to_string(out.join("summary.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// The TensorBoard scalars of each INT8 layer: clip value, cosine distance, DCLR phi, saturation,
/// and the DSGC searches run so far.
fn layer_scalars(model: &dyn Module) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for (name, s) in model.int8_stats() {
        out.push((format!("quant/{name}/clip"), s.clip as f64));
        out.push((format!("quant/{name}/cosine_distance"), s.distance));
        out.push((format!("quant/{name}/phi"), s.phi));
        out.push((format!("quant/{name}/saturation_x"), s.saturation_x as f64));
        out.push((format!("quant/{name}/saturation_w"), s.saturation_w as f64));
        out.push((format!("quant/{name}/saturation_dy"), s.saturation_dy as f64));
        out.push((format!("quant/{name}/searches"), s.searches as f64));
    }
    out
}

/// Histograms of every parameter and of each INT8 convolution's last output gradient.
fn histograms(tb: &mut EventWriter, step: u64, model: &dyn Module) -> Result<()> {
    for layer in model.layers() {
        for p in layer.params() {
            tb.histogram(step, &format!("weights/{}", p.name()), &p.to_vec())?;
        }
        if let (Layer::Conv(c), Some(g)) = (layer, layer.quant().and_then(|q| q.last_grad())) {
            tb.histogram(step, &format!("grads/{}.grad_output", c.name()), &g)?;
        }
    }
    Ok(())
}

/// Whether each INT8 convolution keeps its next output gradient (for the histograms).
fn keep_grads(model: &dyn Module, keep: bool) {
    for layer in model.layers() {
        if let (Layer::Conv(_), Some(q)) = (layer, layer.int8()) {
            q.keep_grad(keep);
        }
    }
}

/// The error for resuming a run folder with a recipe other than the one it was started with.
fn different_recipe(out: &Path) -> TrainError {
    TrainError::Recipe {
        path: out.join("recipe.toml"),
        why: "the run was started with a different recipe; resume it with the same recipe and --set values, or \
              choose another --out"
            .into(),
    }
}

/// Whether `saved` (a run folder's `recipe.toml`) describes the run `recipe` does: the same
/// recipe but for `train.device`, since a run may resume on another device.
fn same_run(saved: &str, recipe: &Recipe, out: &Path) -> bool {
    let on_cpu = |r: &Recipe| {
        let mut r = r.clone();
        r.train.device = "cpu".into();
        r.to_toml()
    };
    match Recipe::parse(saved, &out.join("recipe.toml"), &[]) {
        Ok(s) => on_cpu(&s) == on_cpu(recipe),
        Err(_) => saved == recipe.to_toml(),
    }
}

/// Runs `recipe` in `opts.out`, or resumes it; returns the summary, also written as
/// `summary.json`.
pub fn run(recipe: &Recipe, opts: &RunOptions) -> Result<Summary> {
    let out = &opts.out;
    let resolved = recipe.to_toml();
    let last = out.join("checkpoints/last.safetensors");
    if let Ok(saved) = std::fs::read_to_string(out.join("recipe.toml"))
        && opts.resume
        && !same_run(&saved, recipe, out)
    {
        return Err(different_recipe(out));
    }
    if opts.resume
        && let Some(s) = finished(out)
    {
        return Ok(s);
    }
    if !opts.resume && (last.exists() || out.join("summary.json").exists()) {
        return Err(TrainError::Recipe {
            path: out.clone(),
            why: "already holds a run; pass --resume to continue it, or choose another --out".into(),
        });
    }
    let (model, data) = task::build(recipe, opts.data_dir.as_deref())?;
    let mut sgd = Sgd::new(recipe.sgd());
    let mut state = TrainState { recipe: resolved.clone(), ..Default::default() };
    let resuming = opts.resume && last.exists();
    let mut start = if resuming { "resuming".to_string() } else { "starting".to_string() };
    if opts.resume && !resuming {
        // The run stopped before its first checkpoint (or never ran): it starts again from step
        // 0, and what the stopped session logged goes, so that TensorBoard shows one run.
        let removed = remove_stale_logs(out)?;
        start = format!(
            "starting from step 0: --resume found no checkpoint in {} (the run stopped before its first){}",
            out.display(),
            if removed > 0 { format!("; removed the {removed} log file(s) it left") } else { String::new() }
        );
    }
    if resuming {
        let ck = checkpoint::load(&last)?;
        state = checkpoint::restore_all(&model, &mut sgd, &ck, &last)?;
        if state.recipe != resolved && !same_run(&state.recipe, recipe, out) {
            return Err(different_recipe(out));
        }
    } else if let Some(init) = &recipe.train.init {
        let ck = checkpoint::load(init)?;
        checkpoint::restore_weights(&model, &ck, init)?;
    }
    write_atomic(&out.join("recipe.toml"), resolved.as_bytes())?;
    let mut trainer = Trainer { recipe, opts, model, sgd, state, data, schedule: recipe.schedule() };
    trainer.train(resuming, &start)
}

/// Removes the TensorBoard event files and metrics a run folder holds; returns how many.
fn remove_stale_logs(out: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(0) };
    let mut removed = 0;
    for e in entries {
        let path = e.map_err(TrainError::io(out))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("events.out.tfevents.") || name == "metrics.json" {
            std::fs::remove_file(&path).map_err(TrainError::io(&path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

struct Trainer<'a> {
    recipe: &'a Recipe,
    opts: &'a RunOptions,
    model: Net,
    sgd: Sgd,
    state: TrainState,
    data: Data,
    schedule: Schedule,
}

impl Trainer<'_> {
    fn checkpoint(&self, name: &str) -> Result<PathBuf> {
        let path = self.opts.out.join("checkpoints").join(name);
        checkpoint::save(&path, &self.model, &self.sgd, &self.state)?;
        Ok(path)
    }

    /// Makes `best.safetensors` the file `last.safetensors` is now, atomically.
    fn link_best_to_last(&self) -> Result<()> {
        let dir = self.opts.out.join("checkpoints");
        let (last, best) = (dir.join("last.safetensors"), dir.join("best.safetensors"));
        let tmp = dir.join(format!("best.safetensors.tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(&last, &tmp).is_err() {
            std::fs::copy(&last, &tmp).map_err(TrainError::io(&tmp))?;
        }
        std::fs::rename(&tmp, &best).map_err(TrainError::io(&best))
    }

    fn diverged(&self, epoch: usize, why: String) -> TrainError {
        let last = self.opts.out.join("checkpoints/last.safetensors");
        let kept = if last.exists() {
            format!("the last good checkpoint is {}", last.display())
        } else {
            "no checkpoint had been written yet".into()
        };
        TrainError::Diverged { epoch, step: self.state.global_step + 1, why, kept }
    }

    fn train(&mut self, resuming: bool, start: &str) -> Result<Summary> {
        let r = self.recipe;
        let (epochs, batch) = (r.train.epochs, r.train.batch);
        let steps_per_epoch = self.data.train_len().div_ceil(batch);
        let total = (epochs * steps_per_epoch) as u64;
        let mut tb = EventWriter::create(&self.opts.out, &format!("{}", self.state.global_step))?;
        if resuming {
            // Readers drop events at or after the start mark's step: those the killed session
            // logged past its checkpoint.
            tb.session_start(self.state.global_step + 1)?;
        } else {
            tb.text(0, "recipe", &format!("```toml\n{}```", self.state.recipe))?;
        }
        let int8_layers = self.model.int8_stats().len();
        // Which CPU kernels the INT8 layers run on: it sets the step times. Their integer sums
        // are the same on every path (the FP32 layers' sums may differ in the last bits).
        let kernels = match self.model.device() {
            int8_nn::Device::Cpu if int8_layers > 0 => {
                format!(" ({} kernels)", int8_core::gemm::Int8Path::detect().name())
            }
            _ => String::new(),
        };
        let params = self.model.param_count();
        let mut progress = Progress::new(self.opts.progress, total, self.state.global_step);
        progress.message(&format!(
            "{} on {} ({} train / {} test images, {} class{}), {} on {} at {}: {} parameters, {} INT8 layers{}; {} -> {}",
            r.model,
            r.dataset,
            self.data.train_len(),
            self.data.test_len(),
            self.data.classes(),
            if self.data.classes() == 1 { "" } else { "es" },
            r.quant.precision,
            self.model.device(),
            self.data.root().display(),
            params,
            int8_layers,
            kernels,
            if resuming { format!("resuming at step {}", self.state.global_step) } else { start.to_string() },
            self.opts.out.display()
        ));
        self.model.set_training(true);
        let mut first_step_of_session = true;
        while self.state.epochs_done < epochs {
            let epoch = self.state.epochs_done;
            let skip = self.state.step_in_epoch;
            let batches = self.data.train_epoch(batch, r.train.seed, epoch as u64, skip)?;
            let mut waited = Instant::now();
            for b in batches {
                let b = b?;
                let lr = self.schedule.lr(epoch as f64 + self.state.step_in_epoch as f64 / steps_per_epoch as f64);
                let step = self.state.global_step + 1;
                let hist_due = r.train.histogram_every > 0 && step.is_multiple_of(r.train.histogram_every as u64);
                if hist_due {
                    keep_grads(&self.model, true);
                }
                let n = b.len();
                // Forward, backward and update run on a worker of rayon's pool, so that the
                // kernels' many parallel calls do not each hand over to it (see `int8_nn::threads`).
                let (model, sgd) = (&self.model, &mut self.sgd);
                let stepped = int8_nn::threads::in_pool(|| task::step(model, sgd, b, lr))?;
                let done = match stepped {
                    Ok(done) => done,
                    Err(why) => return Err(self.diverged(epoch + 1, why)),
                };
                let dt = (done.forward + done.backward + done.update).as_secs_f64();
                if !first_step_of_session {
                    self.state.step_seconds += dt;
                    self.state.steps_timed += 1;
                }
                first_step_of_session = false;
                let wall = waited.elapsed().as_secs_f64();
                self.state.train_seconds += wall;
                self.state.epoch_seconds += wall;
                self.state.global_step = step;
                self.state.step_in_epoch += 1;
                self.state.epoch_loss_sum += done.loss * n as f64;
                self.state.epoch_hits += done.hits.unwrap_or(0) as u64;
                self.state.epoch_seen += n as u64;
                for &(term, v) in &done.terms {
                    *self.state.epoch_terms.entry(term.to_string()).or_default() += v * n as f64;
                }

                if step.is_multiple_of(r.train.log_every as u64) || step == 1 {
                    let mut s = vec![("train/loss".to_string(), done.loss)];
                    if let Some(hits) = done.hits {
                        s.push(("train/top1".to_string(), 100.0 * hits as f64 / n as f64));
                    }
                    s.extend(done.terms.iter().map(|(term, v)| (format!("train/{term}"), *v)));
                    s.extend([
                        ("train/lr".to_string(), lr),
                        ("train/images_per_s".to_string(), n as f64 / wall),
                        ("train/step_ms".to_string(), dt * 1e3),
                    ]);
                    // The gradients' global norm before clipping, where the recipe clips.
                    s.extend(self.sgd.last_grad_norm().map(|g| ("train/grad_norm".to_string(), g)));
                    s.extend(layer_scalars(&self.model));
                    tb.scalars(step, &s)?;
                    tb.flush()?;
                }
                if hist_due {
                    histograms(&mut tb, step, &self.model)?;
                    keep_grads(&self.model, false);
                }
                progress.step(step, epoch + 1, epochs, done.loss);
                if self.opts.kill_at_step == Some(step) {
                    let checkpoint = self.opts.out.join("checkpoints/last.safetensors");
                    return Err(TrainError::Interrupted { step, checkpoint });
                }
                let mid_epoch = self.state.step_in_epoch < steps_per_epoch;
                if self.opts.stop.load(Ordering::Relaxed) && mid_epoch {
                    tb.flush()?;
                    let checkpoint = self.checkpoint("last.safetensors")?;
                    progress.finish();
                    return Err(TrainError::Interrupted { step, checkpoint });
                }
                if mid_epoch && r.train.checkpoint_every > 0 && step.is_multiple_of(r.train.checkpoint_every as u64) {
                    self.checkpoint("last.safetensors")?;
                }
                waited = Instant::now();
            }
            self.end_epoch(&mut tb, &progress)?;
            if self.opts.stop.load(Ordering::Relaxed) && self.state.epochs_done < epochs {
                progress.finish();
                let checkpoint = self.opts.out.join("checkpoints/last.safetensors");
                return Err(TrainError::Interrupted { step: self.state.global_step, checkpoint });
            }
        }
        progress.finish();
        self.summary(params, int8_layers)
    }

    /// Closes an epoch: test metrics when due, TensorBoard, history, checkpoints.
    fn end_epoch(&mut self, tb: &mut EventWriter, progress: &Progress) -> Result<()> {
        let r = self.recipe;
        let epoch = self.state.epochs_done + 1;
        let seen = self.state.epoch_seen.max(1) as f64;
        let train_loss = self.state.epoch_loss_sum / seen;
        let classifying = matches!(self.model, Net::Classifier(_));
        let train_top1 = classifying.then(|| 100.0 * self.state.epoch_hits as f64 / seen);
        let train_terms: std::collections::BTreeMap<String, f64> =
            std::mem::take(&mut self.state.epoch_terms).into_iter().map(|(k, v)| (k, v / seen)).collect();
        let images_per_s = seen / self.state.epoch_seconds.max(1e-9);
        let lr = self.schedule.lr(epoch as f64);
        let due = epoch.is_multiple_of(r.train.eval_every) || epoch == r.train.epochs;
        let test: Option<Metrics> =
            if due { Some(task::evaluate(&self.model, &self.data, r.train.eval_batch)?) } else { None };
        let step = self.state.global_step;
        let mut s = vec![("epoch/train_loss".to_string(), train_loss)];
        s.extend(train_top1.map(|t| ("epoch/train_top1".to_string(), t)));
        s.extend(train_terms.iter().map(|(k, v)| (format!("epoch/train_{k}"), *v)));
        s.push(("epoch/images_per_s".to_string(), images_per_s));
        s.extend(test.iter().flat_map(Metrics::scalars));
        tb.scalars(step, &s)?;
        tb.flush()?;
        let terms_line: String = train_terms.iter().map(|(k, v)| format!(" {k} {v:.4}")).collect();
        self.state.history.push(EpochRecord {
            epoch,
            lr,
            train_loss,
            train_top1,
            train_terms,
            test_loss: test.and_then(|t| t.loss),
            test_top1: test.and_then(|t| t.top1),
            test_top5: test.and_then(|t| t.top5),
            test_map50: test.and_then(|t| t.map50),
            test_map: test.and_then(|t| t.map),
            images_per_s,
        });
        let improved = test.is_some_and(|t| t.headline() > self.state.best || epoch == 1);
        if let Some(t) = test {
            self.state.best = self.state.best.max(t.headline());
        }
        self.state.epochs_done = epoch;
        self.state.step_in_epoch = 0;
        self.state.epoch_loss_sum = 0.0;
        self.state.epoch_hits = 0;
        self.state.epoch_seen = 0;
        self.state.epoch_seconds = 0.0;
        progress.message(&format!(
            "epoch {epoch}/{}: train loss {train_loss:.4}{}{terms_line}{} | {images_per_s:.0} img/s",
            r.train.epochs,
            train_top1.map_or(String::new(), |t| format!(" top-1 {t:.2}%")),
            test.map_or(String::new(), |t| format!(" | {}", t.describe())),
        ));
        let saving = epoch.is_multiple_of(r.train.checkpoint_epochs) || epoch == r.train.epochs;
        if saving {
            self.checkpoint("last.safetensors")?;
        }
        if improved {
            if saving {
                // The same state as last: a second name for its file (a later last is a new file
                // renamed over the name, so best keeps this one), copied where links are refused.
                self.link_best_to_last()?;
            } else {
                self.checkpoint("best.safetensors")?;
            }
        }
        let metrics = serde_json::to_vec_pretty(&self.state.history).unwrap_or_default();
        write_atomic(&self.opts.out.join("metrics.json"), &metrics)
    }

    fn summary(&self, params: usize, int8_layers: usize) -> Result<Summary> {
        let r = self.recipe;
        let last = self.state.history.iter().rev().find(|h| h.test_top1.is_some() || h.test_map50.is_some());
        let int8 = r.quant.precision == PrecisionName::Int8;
        let (classify, detect) = (r.task == Task::Classification, r.task == Task::Detection);
        let summary = Summary {
            task: r.task,
            model: r.model.clone(),
            dataset: r.dataset.clone(),
            precision: r.quant.precision.to_string(),
            dsgc: int8 && r.quant.dsgc,
            dclr: int8 && r.quant.dclr,
            seed: r.train.seed,
            epochs: self.state.epochs_done,
            top1: classify.then(|| last.and_then(|h| h.test_top1).unwrap_or(0.0)),
            top5: classify.then(|| last.and_then(|h| h.test_top5).unwrap_or(0.0)),
            best_top1: classify.then_some(self.state.best),
            map50: detect.then(|| last.and_then(|h| h.test_map50).unwrap_or(0.0)),
            map: detect.then(|| last.and_then(|h| h.test_map).unwrap_or(0.0)),
            best_map50: detect.then_some(self.state.best),
            final_train_loss: self.state.history.last().map_or(f64::NAN, |h| h.train_loss),
            train_seconds: self.state.train_seconds,
            step_ms: 1e3 * self.state.step_seconds / self.state.steps_timed.max(1) as f64,
            images: (self.data.train_len(), self.data.test_len()),
            params,
            int8_layers,
        };
        let json = serde_json::to_vec_pretty(&summary).unwrap_or_default();
        write_atomic(&self.opts.out.join("summary.json"), &json)?;
        Ok(summary)
    }
}
