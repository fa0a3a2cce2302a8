//! The batch-norm layer: learnable scale and shift, running statistics, and an optional fused
//! ReLU or ReLU6.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use int8_core::nn::batchnorm::BatchStats;

use crate::error::Result;
use crate::ops::batch_norm;
use crate::param::Param;
use crate::tensor::Tensor;

/// Running statistics of a batch-norm layer.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningStats {
    /// Running mean per channel.
    pub mean: Vec<f32>,
    /// Running unbiased variance per channel.
    pub var: Vec<f32>,
}

/// Batch normalization over channels, with learnable scale and shift and running statistics
/// (momentum 0.1, eps 1e-5, as PyTorch), optionally followed by a fused ReLU or ReLU6 (one pass
/// over the data forward and one back, where a separate activation would add a pass each way).
#[derive(Debug)]
pub struct BatchNorm2d {
    name: String,
    gamma: Param,
    beta: Param,
    running: Mutex<RunningStats>,
    eps: f32,
    momentum: f32,
    /// The fused activation's cap: `None`, infinite (ReLU) or 6 (ReLU6).
    relu: Option<f32>,
    training: AtomicBool,
    /// Frozen: evaluation mode whatever the model's mode.
    frozen: bool,
}

impl BatchNorm2d {
    /// A layer over `channels`, with `gamma = 1`, `beta = 0`, running mean 0 and variance 1, and a
    /// fused ReLU when `relu`.
    pub fn new(name: impl Into<String>, channels: usize, relu: bool) -> Result<Self> {
        let name = name.into();
        Ok(Self {
            gamma: Param::new(format!("{name}.gamma"), Tensor::ones(channels), false),
            beta: Param::new(format!("{name}.beta"), Tensor::zeros(channels), false),
            name,
            running: Mutex::new(RunningStats { mean: vec![0.0; channels], var: vec![1.0; channels] }),
            eps: 1e-5,
            momentum: 0.1,
            relu: relu.then_some(f32::INFINITY),
            training: AtomicBool::new(true),
            frozen: false,
        })
    }

    /// The same layer with ReLU6, `min(max(y, 0), 6)`, fused after it (MobileNetV2), in place of
    /// any ReLU.
    pub fn with_relu6(mut self) -> Self {
        self.relu = Some(6.0);
        self
    }

    /// The same layer frozen, as detection backbones train: it always normalises with its running
    /// statistics, and its scale and shift take no gradient and no update (torchvision's
    /// `FrozenBatchNorm2d`); they are still saved and loaded.
    pub fn frozen(mut self) -> Self {
        self.gamma = self.gamma.frozen();
        self.beta = self.beta.frozen();
        self.training = AtomicBool::new(false);
        self.frozen = true;
        self
    }

    /// The same layer with epsilon `eps` (1e-5 by default; Inception v3 uses 1e-3).
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Switches between batch statistics (training) and running statistics (evaluation); a
    /// frozen layer stays in evaluation.
    pub fn set_training(&self, training: bool) {
        self.training.store(training && !self.frozen, Ordering::Relaxed);
    }

    /// Applies the layer; in training mode it also updates the running statistics.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gamma, beta) = (self.gamma.value(), self.beta.value());
        if self.training.load(Ordering::Relaxed) {
            let (y, stats) = batch_norm::train(&self.name, x, &gamma, &beta, self.eps, self.relu)?;
            self.update_running(&stats, x.elem_count() / stats.mean.len().max(1));
            Ok(y)
        } else {
            let r = self.running();
            batch_norm::eval(&self.name, x, &gamma, &beta, (&r.mean, &r.var), self.eps, self.relu)
        }
    }

    fn update_running(&self, st: &BatchStats, per_channel: usize) {
        let mut r = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let m = self.momentum;
        let unbias = per_channel as f32 / (per_channel.max(2) - 1) as f32;
        for c in 0..r.mean.len() {
            r.mean[c] = (1.0 - m) * r.mean[c] + m * st.mean[c];
            r.var[c] = (1.0 - m) * r.var[c] + m * st.var[c] * unbias;
        }
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The learnable scale.
    pub fn gamma(&self) -> &Param {
        &self.gamma
    }

    /// The learnable shift.
    pub fn beta(&self) -> &Param {
        &self.beta
    }

    /// A copy of the running statistics.
    pub fn running(&self) -> RunningStats {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the running statistics (when loading a checkpoint).
    pub fn set_running(&self, stats: RunningStats) {
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = stats;
    }
}
