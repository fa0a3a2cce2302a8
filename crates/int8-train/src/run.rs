//! One run of one recipe: the training loop (forward, loss, backward, SGD with each INT8 layer's
//! DCLR multiplier), evaluation with top-1/top-5, TensorBoard events, checkpoints at epoch ends
//! (and every `train.checkpoint_every` steps), resume from the last checkpoint, divergence
//! detection, and the run's summary.
//!
//! A run folder holds `recipe.toml` (the resolved recipe), the TensorBoard event files,
//! `checkpoints/last.safetensors` and `checkpoints/best.safetensors`, `metrics.json` (one record
//! per epoch) and, once finished, `summary.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use int8_datasets::loader::{Source, epoch_from};
use int8_datasets::open::Opened;
use int8_nn::ops::cross_entropy;
use int8_nn::optim::{Schedule, Sgd};
use int8_nn::{Layer, Tensor, no_grad};
use int8_zoo::Model;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, EpochRecord, TrainState};
use crate::progress::{Progress, ProgressMode};
use crate::recipe::{PrecisionName, Recipe};
use crate::step::train_step;
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
    /// Final test top-1 (%).
    pub top1: f64,
    /// Final test top-5 (%).
    pub top5: f64,
    /// Best test top-1 (%) over the evaluated epochs.
    pub best_top1: f64,
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

/// The summary of a finished run in `out`, if there is one.
pub fn finished(out: &Path) -> Option<Summary> {
    let text = std::fs::read_to_string(out.join("summary.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn tensor(images: Vec<f32>, dims: [usize; 4]) -> Result<Tensor> {
    Ok(Tensor::from_vec(images, dims)?)
}

/// Test loss, top-1 and top-5 (%) of `model` on `test` (whose transform is the evaluation one),
/// in evaluation mode and recording nothing.
pub fn evaluate(model: &dyn Model, test: &Arc<dyn Source>, batch: usize) -> Result<(f64, f64, f64)> {
    model.set_training(false);
    let (mut loss, mut top1, mut top5, mut n) = (0.0, 0usize, 0usize, 0usize);
    for b in epoch_from(test.clone(), batch, false, 0, 0, 2, 0)? {
        let b = b?;
        let x = tensor(b.images, b.dims)?;
        let (_, r) = no_grad(|| -> Result<_> { Ok(cross_entropy(&model.forward(&x)?, &b.labels)?) })?;
        loss += r.loss * b.labels.len() as f64;
        top1 += r.top1;
        top5 += r.top5;
        n += b.labels.len();
    }
    model.set_training(true);
    let n = n.max(1) as f64;
    Ok((loss / n, 100.0 * top1 as f64 / n, 100.0 * top5 as f64 / n))
}

/// The TensorBoard scalars of each INT8 layer: clip value, cosine distance, DCLR phi, saturation,
/// and the DSGC searches run so far.
fn layer_scalars(model: &dyn Model) -> Vec<(String, f64)> {
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
fn histograms(tb: &mut EventWriter, step: u64, model: &dyn Model) -> Result<()> {
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
fn keep_grads(model: &dyn Model, keep: bool) {
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

/// Runs `recipe` in `opts.out`, or resumes it; returns the summary, also written as
/// `summary.json`.
pub fn run(recipe: &Recipe, opts: &RunOptions) -> Result<Summary> {
    let out = &opts.out;
    let resolved = recipe.to_toml();
    let last = out.join("checkpoints/last.safetensors");
    if let Ok(saved) = std::fs::read_to_string(out.join("recipe.toml"))
        && saved != resolved
        && opts.resume
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
    let data = int8_datasets::open::open(&recipe.data_spec(opts.data_dir.as_deref()))?;
    let model = int8_zoo::build(&recipe.model, data.classes, &recipe.policy(), recipe.train.seed)?;
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
        state = checkpoint::restore_all(model.as_ref(), &mut sgd, &ck, &last)?;
        if state.recipe != resolved {
            return Err(different_recipe(out));
        }
    } else if let Some(init) = &recipe.train.init {
        let ck = checkpoint::load(init)?;
        checkpoint::restore_weights(model.as_ref(), &ck, init)?;
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
    model: Box<dyn Model>,
    sgd: Sgd,
    state: TrainState,
    data: Opened,
    schedule: Schedule,
}

impl Trainer<'_> {
    fn checkpoint(&self, name: &str) -> Result<PathBuf> {
        let path = self.opts.out.join("checkpoints").join(name);
        checkpoint::save(&path, self.model.as_ref(), &self.sgd, &self.state)?;
        Ok(path)
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
        let steps_per_epoch = self.data.train.len().div_ceil(batch);
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
        let params = self.model.param_count();
        let mut progress = Progress::new(self.opts.progress, total, self.state.global_step);
        progress.message(&format!(
            "{} on {} ({} train / {} test images, {} classes), {} at {}: {} parameters, {} INT8 layers; {} -> {}",
            r.model,
            r.dataset,
            self.data.train.len(),
            self.data.test.len(),
            self.data.classes,
            r.quant.precision,
            self.data.root.display(),
            params,
            int8_layers,
            if resuming { format!("resuming at step {}", self.state.global_step) } else { start.to_string() },
            self.opts.out.display()
        ));
        self.model.set_training(true);
        let mut first_step_of_session = true;
        while self.state.epochs_done < epochs {
            let epoch = self.state.epochs_done;
            let skip = self.state.step_in_epoch;
            let batches = epoch_from(self.data.train.clone(), batch, true, r.train.seed, epoch as u64, 3, skip)?;
            let mut waited = Instant::now();
            for b in batches {
                let b = b?;
                let lr = self.schedule.lr(epoch as f64 + self.state.step_in_epoch as f64 / steps_per_epoch as f64);
                let step = self.state.global_step + 1;
                let hist_due = r.train.histogram_every > 0 && step.is_multiple_of(r.train.histogram_every as u64);
                if hist_due {
                    keep_grads(self.model.as_ref(), true);
                }
                let n = b.labels.len();
                let images = tensor(b.images, b.dims)?;
                // Forward, backward and update run on a worker of rayon's pool, so that the
                // kernels' many parallel calls do not each hand over to it (see `int8_nn::threads`).
                let (model, sgd, labels) = (self.model.as_ref(), &mut self.sgd, &b.labels);
                let stepped = int8_nn::threads::in_pool(|| train_step(model, sgd, &images, labels, lr))?;
                let done = match stepped {
                    Ok(done) => done,
                    Err(why) => return Err(self.diverged(epoch + 1, why)),
                };
                let (report, dt) = (done.report, (done.forward + done.backward + done.update).as_secs_f64());
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
                self.state.epoch_loss_sum += report.loss * n as f64;
                self.state.epoch_hits += report.top1 as u64;
                self.state.epoch_seen += n as u64;

                if step.is_multiple_of(r.train.log_every as u64) || step == 1 {
                    let mut s = vec![
                        ("train/loss".to_string(), report.loss),
                        ("train/top1".to_string(), 100.0 * report.top1 as f64 / n as f64),
                        ("train/lr".to_string(), lr),
                        ("train/images_per_s".to_string(), n as f64 / wall),
                        ("train/step_ms".to_string(), dt * 1e3),
                    ];
                    s.extend(layer_scalars(self.model.as_ref()));
                    tb.scalars(step, &s)?;
                    tb.flush()?;
                }
                if hist_due {
                    histograms(&mut tb, step, self.model.as_ref())?;
                    keep_grads(self.model.as_ref(), false);
                }
                progress.step(step, epoch + 1, epochs, report.loss);
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
        let (train_loss, train_top1) = (self.state.epoch_loss_sum / seen, 100.0 * self.state.epoch_hits as f64 / seen);
        let images_per_s = seen / self.state.epoch_seconds.max(1e-9);
        let lr = self.schedule.lr(epoch as f64);
        let due = epoch.is_multiple_of(r.train.eval_every) || epoch == r.train.epochs;
        let test = if due { Some(evaluate(self.model.as_ref(), &self.data.test, r.train.eval_batch)?) } else { None };
        let step = self.state.global_step;
        let mut s = vec![
            ("epoch/train_loss".to_string(), train_loss),
            ("epoch/train_top1".to_string(), train_top1),
            ("epoch/images_per_s".to_string(), images_per_s),
        ];
        if let Some((l, t1, t5)) = test {
            s.extend([("test/loss".into(), l), ("test/top1".into(), t1), ("test/top5".into(), t5)]);
        }
        tb.scalars(step, &s)?;
        tb.flush()?;
        self.state.history.push(EpochRecord {
            epoch,
            lr,
            train_loss,
            train_top1,
            test_loss: test.map(|t| t.0),
            test_top1: test.map(|t| t.1),
            test_top5: test.map(|t| t.2),
            images_per_s,
        });
        let improved = test.is_some_and(|t| t.1 > self.state.best_top1 || epoch == 1);
        if let Some((_, t1, _)) = test {
            self.state.best_top1 = self.state.best_top1.max(t1);
        }
        self.state.epochs_done = epoch;
        self.state.step_in_epoch = 0;
        self.state.epoch_loss_sum = 0.0;
        self.state.epoch_hits = 0;
        self.state.epoch_seen = 0;
        self.state.epoch_seconds = 0.0;
        progress.message(&format!(
            "epoch {epoch}/{}: train loss {train_loss:.4} top-1 {train_top1:.2}%{} | {images_per_s:.0} img/s",
            r.train.epochs,
            test.map_or(String::new(), |(l, t1, t5)| format!(" | test loss {l:.4} top-1 {t1:.2}% top-5 {t5:.2}%")),
        ));
        self.checkpoint("last.safetensors")?;
        if improved {
            self.checkpoint("best.safetensors")?;
        }
        let metrics = serde_json::to_vec_pretty(&self.state.history).unwrap_or_default();
        write_atomic(&self.opts.out.join("metrics.json"), &metrics)
    }

    fn summary(&self, params: usize, int8_layers: usize) -> Result<Summary> {
        let r = self.recipe;
        let last_test = self.state.history.iter().rev().find_map(|h| h.test_top1.zip(h.test_top5));
        let int8 = r.quant.precision == PrecisionName::Int8;
        let summary = Summary {
            model: r.model.clone(),
            dataset: r.dataset.clone(),
            precision: r.quant.precision.to_string(),
            dsgc: int8 && r.quant.dsgc,
            dclr: int8 && r.quant.dclr,
            seed: r.train.seed,
            epochs: self.state.epochs_done,
            top1: last_test.map_or(0.0, |t| t.0),
            top5: last_test.map_or(0.0, |t| t.1),
            best_top1: self.state.best_top1,
            final_train_loss: self.state.history.last().map_or(f64::NAN, |h| h.train_loss),
            train_seconds: self.state.train_seconds,
            step_ms: 1e3 * self.state.step_seconds / self.state.steps_timed.max(1) as f64,
            images: (self.data.train.len(), self.data.test.len()),
            params,
            int8_layers,
        };
        let json = serde_json::to_vec_pretty(&summary).unwrap_or_default();
        write_atomic(&self.opts.out.join("summary.json"), &json)?;
        Ok(summary)
    }
}
