//! Per-layer quantization state and the statistics it exposes after each step.

use std::sync::{Arc, Mutex, MutexGuard};

use int8_core::dsgc::{ClipMode, ClipSnapshot, ClipState};
use int8_core::quant::QTensor;

use crate::precision::Int8Config;

/// What one INT8 layer measured on its last step: cheap to read (a copy), for logs and for the
/// optimizer's DCLR multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LayerStats {
    /// Steps (backward passes) seen.
    pub steps: u64,
    /// The output gradient's clip value.
    pub clip: f32,
    /// Cosine distance between the output gradient and its quantized copy.
    pub distance: f64,
    /// DCLR's learning-rate multiplier `phi(distance)` (1 without DCLR).
    pub phi: f64,
    /// Whether this step ran a DSGC search.
    pub searched: bool,
    /// DSGC searches run so far (periodic and stale ones).
    pub searches: u64,
    /// Fraction of input values clipped in the forward pass.
    pub saturation_x: f32,
    /// Fraction of weight values clipped.
    pub saturation_w: f32,
    /// Fraction of output-gradient values clipped.
    pub saturation_dy: f32,
}

/// The mutable INT8 state of one layer: its gradient clip state and its last statistics, and
/// optionally the last output gradient (for histograms).
#[derive(Debug, Clone)]
pub struct LayerState {
    /// The DSGC clip state of the output gradient.
    pub clip: ClipState,
    /// The last step's statistics.
    pub stats: LayerStats,
    /// Whether to keep a copy of each output gradient.
    pub keep_grad: bool,
    /// The last output gradient, when `keep_grad` is set.
    pub last_grad: Option<Vec<f32>>,
}

impl LayerState {
    /// A fresh state for a clip mode.
    pub fn new(mode: ClipMode) -> Self {
        Self {
            clip: ClipState::new(mode),
            stats: LayerStats { phi: 1.0, ..Default::default() },
            keep_grad: false,
            last_grad: None,
        }
    }
}

/// The part of a layer's INT8 state that a checkpoint must keep for a resumed run to continue
/// exactly: the step count (it seeds stochastic rounding) and the clip state (its call count times
/// the next DSGC search; the clip value in force and its reference distance).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QuantSnapshot {
    /// Backward passes seen.
    pub steps: u64,
    /// The gradient clip state.
    pub clip: ClipSnapshot,
}

impl LayerState {
    /// What a checkpoint keeps of this state.
    pub fn snapshot(&self) -> QuantSnapshot {
        QuantSnapshot { steps: self.stats.steps, clip: self.clip.snapshot() }
    }

    /// Restores a snapshot, keeping the clip mode this layer was built with.
    pub fn restore(&mut self, snap: QuantSnapshot) {
        self.clip = ClipState::restore(self.clip.mode(), snap.clip);
        self.stats.steps = snap.steps;
        if let Some(c) = snap.clip.clip {
            self.stats.clip = c;
        }
    }

    /// Quantizes one output gradient of layer `name` with its DSGC clip value (a search when one
    /// is due) and records the step's statistics: clip, cosine distance, DCLR's `phi`, saturation,
    /// and the gradient itself when kept.
    pub fn quantize_grad(&mut self, name: &str, g: &[f32], cfg: &Int8Config) -> int8_core::Result<QTensor> {
        let step = self.stats.steps;
        let (dyq, up) = self.clip.quantize(&format!("{name}.grad_output"), g, cfg.grad_rounding.stream(name, step))?;
        self.stats.steps = step + 1;
        self.stats.clip = up.clip;
        self.stats.distance = up.distance;
        self.stats.searched = up.searched;
        self.stats.searches = self.clip.searches();
        self.stats.phi = cfg.dclr.map_or(1.0, |d| d.phi(up.distance));
        self.stats.saturation_dy = dyq.saturation_rate();
        if self.keep_grad {
            self.last_grad = Some(g.to_vec());
        }
        Ok(dyq)
    }

    /// [`LayerState::quantize_grad`] on a GPU: the same clip state, stream and statistics, the
    /// gradient and its codes on the device (the kept copy of the gradient comes to the host).
    #[cfg(feature = "cuda")]
    pub(crate) fn quantize_grad_gpu(
        &mut self,
        gpu: &int8_core::cuda::Gpu,
        name: &str,
        g: &int8_core::cuda::CudaSlice<f32>,
        cfg: &Int8Config,
    ) -> int8_core::Result<int8_core::cuda::GpuQTensor> {
        let step = self.stats.steps;
        let rounding = cfg.grad_rounding.stream(name, step);
        let (dyq, up) =
            int8_core::cuda::dsgc::clip_quantize(gpu, &mut self.clip, &format!("{name}.grad_output"), g, rounding)?;
        self.stats.steps = step + 1;
        self.stats.clip = up.clip;
        self.stats.distance = up.distance;
        self.stats.searched = up.searched;
        self.stats.searches = self.clip.searches();
        self.stats.phi = cfg.dclr.map_or(1.0, |d| d.phi(up.distance));
        self.stats.saturation_dy = crate::cuda::saturation_rate(&dyq);
        if self.keep_grad {
            self.last_grad = Some(gpu.download(g)?);
        }
        Ok(dyq)
    }
}

/// The INT8 state of one conv or linear layer, shared between the layer and the ops it records
/// (the backward pass quantizes the output gradient with it and records the step's statistics).
#[derive(Debug, Clone)]
pub struct QuantState(Arc<Mutex<LayerState>>);

impl QuantState {
    /// A fresh state for a clip mode.
    pub fn new(mode: ClipMode) -> Self {
        Self(Arc::new(Mutex::new(LayerState::new(mode))))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, LayerState> {
        // A poisoned lock only means another thread panicked mid-update; the state is plain data.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last step's statistics (all zero, with `phi = 1`, before the first INT8 step).
    pub fn stats(&self) -> LayerStats {
        self.lock().stats
    }

    /// What a checkpoint keeps.
    pub fn snapshot(&self) -> QuantSnapshot {
        self.lock().snapshot()
    }

    /// Restores a checkpoint's snapshot.
    pub fn restore(&self, snap: QuantSnapshot) {
        self.lock().restore(snap);
    }

    /// Keeps (or stops keeping) a copy of each output gradient, for histograms.
    pub fn keep_grad(&self, keep: bool) {
        let mut st = self.lock();
        st.keep_grad = keep;
        if !keep {
            st.last_grad = None;
        }
    }

    /// The last output gradient, when kept.
    pub fn last_grad(&self) -> Option<Vec<f32>> {
        self.lock().last_grad.clone()
    }
}
