//! One training step, the same for the trainer and the benches: forward pass, loss, backward pass
//! and SGD update (with each INT8 layer's DCLR multiplier), timed by phase; for a classifier
//! (cross-entropy) or a detector (the sum of its own loss terms). Run it on a worker of rayon's
//! pool ([`int8_nn::threads::in_pool`]), as the trainer does.

use std::time::{Duration, Instant};

use int8_nn::ops::{add, cross_entropy};
use int8_nn::optim::Sgd;
use int8_nn::{Module, Tensor};
use int8_zoo::Model;
use int8_zoo::detection::{Detector, Target};

use crate::Result;

/// What a step did.
#[derive(Debug, Clone)]
pub struct Step {
    /// The batch's mean loss (for a detector, the sum of its terms).
    pub loss: f64,
    /// Correct top-1 predictions (classification).
    pub hits: Option<usize>,
    /// The detector's loss terms, by name.
    pub terms: Vec<(&'static str, f64)>,
    /// Wall time of the forward pass and loss.
    pub forward: Duration,
    /// Wall time of the backward pass.
    pub backward: Duration,
    /// Wall time of the update.
    pub update: Duration,
}

/// What a forward pass gives a step: the loss to differentiate and what to report of it.
struct Forward {
    loss: Tensor,
    value: f64,
    hits: Option<usize>,
    terms: Vec<(&'static str, f64)>,
}

/// Runs `forward`, the backward pass from its loss and the update of `module`'s parameters at
/// learning rate `lr`. The outer error is a failure to compute; the inner one says why the run
/// diverged (a loss that is not finite, or an update SGD refused), with the model left as it was
/// before the update.
fn step(
    module: &dyn Module,
    sgd: &mut Sgd,
    lr: f64,
    forward: impl FnOnce() -> Result<Forward>,
) -> Result<std::result::Result<Step, String>> {
    let t0 = Instant::now();
    let f = forward()?;
    if !f.value.is_finite() {
        let terms: Vec<String> = f.terms.iter().map(|(n, v)| format!("{n} {v}")).collect();
        let detail = if terms.is_empty() { String::new() } else { format!(" ({})", terms.join(", ")) };
        return Ok(Err(format!("the loss is {}{detail}", f.value)));
    }
    let t1 = Instant::now();
    let grads = f.loss.backward()?;
    drop(f.loss);
    let t2 = Instant::now();
    if let Err(e) = sgd.step(&module.trainables(), &grads, lr) {
        return Ok(Err(e.to_string()));
    }
    let t3 = Instant::now();
    Ok(Ok(Step { loss: f.value, hits: f.hits, terms: f.terms, forward: t1 - t0, backward: t2 - t1, update: t3 - t2 }))
}

/// One step of classifier `model` on `images` with `labels` at learning rate `lr` (see [`step`]
/// for the two kinds of error).
pub fn train_step(
    model: &dyn Model,
    sgd: &mut Sgd,
    images: &Tensor,
    labels: &[u32],
    lr: f64,
) -> Result<std::result::Result<Step, String>> {
    step(model, sgd, lr, || {
        let (loss, report) = cross_entropy(&model.forward(images)?, labels)?;
        Ok(Forward { loss, value: report.loss, hits: Some(report.top1), terms: Vec::new() })
    })
}

/// One step of `detector` on `images` with their ground truth at learning rate `lr`: the sum of
/// its loss terms is trained, each term reported.
pub fn detection_step(
    detector: &dyn Detector,
    sgd: &mut Sgd,
    images: &Tensor,
    targets: &[Target],
    lr: f64,
) -> Result<std::result::Result<Step, String>> {
    step(detector, sgd, lr, || {
        let losses = detector.losses(images, targets)?;
        let mut terms = Vec::with_capacity(losses.len());
        let mut total: Option<Tensor> = None;
        for (name, t) in losses {
            terms.push((name, f64::from(t.to_vec()[0])));
            total = Some(match total {
                None => t,
                Some(sum) => add(&sum, &t)?,
            });
        }
        let loss = total.ok_or_else(|| crate::TrainError::Recipe {
            path: detector.name().into(),
            why: "the detector gave no loss terms".into(),
        })?;
        let value = terms.iter().map(|t| t.1).sum();
        Ok(Forward { loss, value, hits: None, terms })
    })
}
