//! The dropout layer: inverted dropout in training, the identity in evaluation, with masks drawn
//! from a counter-based stream of the layer's seed and its call count, which checkpoints keep, so
//! that resumed runs draw the same masks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{NnError, Result};
use crate::tensor::Tensor;

/// Inverted dropout: in training, each value is zeros with probability `p` and the others are
/// scaled by `1 / (1 - p)`.
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
        crate::ops::dropout::dropout(x, self.p, self.seed ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
}
