//! The FP32 layers around the convolutions: batch norm (optionally fused with ReLU), the residual
//! add + ReLU, global average pooling and the loss.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Tensor, Var};
use int8_core::nn::batchnorm::BatchStats;

use crate::error::{NnError, Result};
use crate::ops::basic::{AddRelu, AvgPool, BatchNormTrain, ClampRelu, CrossEntropyOp, GlobalAvgPool, MaxPool, values};

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
    gamma: Var,
    beta: Var,
    running: Arc<Mutex<RunningStats>>,
    eps: f32,
    momentum: f32,
    /// The fused activation's cap: `None`, infinite (ReLU) or 6 (ReLU6).
    relu: Option<f32>,
    training: AtomicBool,
}

impl BatchNorm2d {
    /// A layer over `channels`, with `gamma = 1`, `beta = 0`, running mean 0 and variance 1, and a
    /// fused ReLU when `relu`.
    pub fn new(name: impl Into<String>, channels: usize, relu: bool) -> Result<Self> {
        let dev = candle_core::Device::Cpu;
        Ok(Self {
            name: name.into(),
            gamma: Var::ones(channels, candle_core::DType::F32, &dev)?,
            beta: Var::zeros(channels, candle_core::DType::F32, &dev)?,
            running: Arc::new(Mutex::new(RunningStats { mean: vec![0.0; channels], var: vec![1.0; channels] })),
            eps: 1e-5,
            momentum: 0.1,
            relu: relu.then_some(f32::INFINITY),
            training: AtomicBool::new(true),
        })
    }

    /// The same layer with ReLU6, `min(max(y, 0), 6)`, fused after it (MobileNetV2), in place of
    /// any ReLU.
    pub fn with_relu6(mut self) -> Self {
        self.relu = Some(6.0);
        self
    }

    /// The same layer with epsilon `eps` (1e-5 by default; Inception v3 uses 1e-3).
    pub fn with_eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }

    /// Switches between batch statistics (training) and running statistics (evaluation).
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        if self.training.load(Ordering::Relaxed) {
            let slot = Arc::new(Mutex::new(None));
            let op = BatchNormTrain { name: self.name.clone(), eps: self.eps, relu: self.relu, stats: slot.clone() };
            let y = x.apply_op3(self.gamma.as_tensor(), self.beta.as_tensor(), op)?;
            let stats = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(st) = stats {
                self.update_running(&st, x.elem_count() / st.mean.len().max(1));
            }
            Ok(y)
        } else {
            let running = self.running.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let (g, b) = (values(self.gamma.as_tensor())?, values(self.beta.as_tensor())?);
            let dims = x.dims().to_vec();
            let d = match dims[..] {
                [n, c, h, w] => int8_core::nn::batchnorm::NchwDims { n, c, hw: h * w },
                _ => {
                    return Err(NnError::BadInput {
                        layer: self.name.clone(),
                        why: format!("needs an NCHW input, got {dims:?}"),
                    });
                }
            };
            let mut y = vec![0f32; x.elem_count()];
            int8_core::nn::batchnorm::forward_eval(
                d,
                &values(&x)?,
                &g,
                &b,
                &running.mean,
                &running.var,
                self.eps,
                self.relu,
                &mut y,
            )?;
            Ok(Tensor::from_vec(y, x.shape(), x.device())?)
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
    pub fn gamma(&self) -> &Var {
        &self.gamma
    }

    /// The learnable shift.
    pub fn beta(&self) -> &Var {
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

/// `max(a + b, 0)`: the end of a residual block, one pass forward and back.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)?)
}

/// ReLU, for where it cannot be fused into the batch norm or residual add before it.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(ClampRelu { cap: f32::INFINITY })?)
}

/// ReLU6, `min(max(x, 0), 6)`, for where it cannot be fused into the batch norm before it
/// ([`BatchNorm2d::with_relu6`], as MobileNetV2 does).
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(ClampRelu { cap: 6.0 })?)
}

/// Global average pooling, `n x c x h x w` to `n x c`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(GlobalAvgPool)?)
}

/// Max pooling with a `k x k` window, `stride` and zero padding `pad` (at most `k / 2`).
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(MaxPool { k, stride, pad, argmax: Mutex::new(Vec::new()) })?)
}

/// Average pooling with a `k x k` window, `stride` and zero padding `pad` (counted in the mean).
pub fn avg_pool2d(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(AvgPool { k, stride, pad })?)
}

/// Inverted dropout: in training, each value is zeroed with probability `p` and the others are
/// scaled by `1 / (1 - p)`; in evaluation it is the identity. Masks come from a counter-based
/// stream of the layer's seed and its call count, which checkpoints keep, so resumed runs draw
/// the same masks.
#[derive(Debug)]
pub struct Dropout {
    name: String,
    p: f32,
    seed: u64,
    calls: AtomicU64,
    training: AtomicBool,
}

impl Dropout {
    /// A layer dropping with probability `p` in `[0, 1)`.
    pub fn new(name: impl Into<String>, p: f32, seed: u64) -> Result<Self> {
        let name = name.into();
        if !(0.0..1.0).contains(&p) {
            return Err(NnError::BadInput { layer: name, why: format!("the dropout rate must be in [0, 1), got {p}") });
        }
        Ok(Self { name, p, seed, calls: AtomicU64::new(0), training: AtomicBool::new(true) })
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Training (drop) or evaluation (identity).
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }

    /// Masks drawn so far (for checkpoints).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Restores the mask count from a checkpoint.
    pub fn set_calls(&self, calls: u64) {
        self.calls.store(calls, Ordering::Relaxed);
    }

    /// Applies the layer.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !self.training.load(Ordering::Relaxed) || self.p == 0.0 {
            return Ok(x.clone());
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let rng = int8_core::rng::CounterRng::new(self.seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let keep = 1.0 / (1.0 - self.p);
        let mask: Vec<f32> =
            (0..x.elem_count()).map(|i| if rng.uniform(i as u64) >= self.p { keep } else { 0.0 }).collect();
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?)?)
    }
}

/// What a loss pass reports besides the loss tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossReport {
    /// The mean loss.
    pub loss: f64,
    /// Correct top-1 predictions in the batch.
    pub top1: usize,
    /// Correct top-5 predictions in the batch.
    pub top5: usize,
}

/// Mean softmax cross-entropy of `logits` (`batch x classes`) against `labels`: the scalar loss
/// to call `backward` on, and the batch's loss and hits.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<(Tensor, LossReport)> {
    let slot = Arc::new(Mutex::new(None));
    let loss = logits.contiguous()?.apply_op1(CrossEntropyOp { labels: labels.to_vec(), result: slot.clone() })?;
    let result = slot.lock().unwrap_or_else(|e| e.into_inner());
    let ce = result
        .as_ref()
        .ok_or_else(|| NnError::BadInput { layer: "loss".into(), why: "the loss was not computed".into() })?;
    Ok((loss, LossReport { loss: ce.loss, top1: ce.top1, top5: ce.top5 }))
}
