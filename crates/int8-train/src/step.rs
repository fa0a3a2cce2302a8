//! One training step, the same for the trainer and the benches: forward pass, loss, backward pass
//! and SGD update (with each INT8 layer's DCLR multiplier), timed by phase. Run it on a worker of
//! rayon's pool ([`int8_nn::threads::in_pool`]), as the trainer does.

use std::time::{Duration, Instant};

use int8_nn::Tensor;
use int8_nn::ops::{LossReport, cross_entropy};
use int8_nn::optim::Sgd;
use int8_zoo::Model;

use crate::Result;

/// What a step did.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// The batch's loss and hits.
    pub report: LossReport,
    /// Wall time of the forward pass and loss.
    pub forward: Duration,
    /// Wall time of the backward pass.
    pub backward: Duration,
    /// Wall time of the update.
    pub update: Duration,
}

/// One step of `model` on `images` with `labels` at learning rate `lr`. The outer error is a
/// failure to compute; the inner one says why the run diverged (a loss that is not finite, or an
/// update SGD refused), with the model left as it was before the update.
pub fn train_step(
    model: &dyn Model,
    sgd: &mut Sgd,
    images: &Tensor,
    labels: &[u32],
    lr: f64,
) -> Result<std::result::Result<Step, String>> {
    let t0 = Instant::now();
    let (loss, report) = cross_entropy(&model.forward(images)?, labels)?;
    if !report.loss.is_finite() {
        return Ok(Err(format!("the loss is {}", report.loss)));
    }
    let t1 = Instant::now();
    let grads = loss.backward()?;
    drop(loss);
    let t2 = Instant::now();
    if let Err(e) = sgd.step(&model.trainables(), &grads, lr) {
        return Ok(Err(e.to_string()));
    }
    let t3 = Instant::now();
    Ok(Ok(Step { report, forward: t1 - t0, backward: t2 - t1, update: t3 - t2 }))
}
