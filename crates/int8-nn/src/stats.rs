//! Per-layer quantization state and the statistics it exposes after each step.

use int8_core::dsgc::{ClipMode, ClipState};

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
