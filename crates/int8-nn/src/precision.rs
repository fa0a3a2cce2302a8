//! How a layer computes: FP32, or INT8 in the forward and the backward pass with the paper's
//! gradient treatment (Zhu et al., CVPR 2020, Sec. 4: DSGC clipping, DCLR scaling).

use int8_core::dclr::Dclr;
use int8_core::dsgc::ClipMode;
use int8_core::quant::{Granularity, Rounding};

/// INT8 settings of one layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Int8Config {
    /// Weight scales per tensor or per output channel (the input gradient always uses one scale).
    pub weight: Granularity,
    /// Rounding of the output gradient's codes; activations and weights round to nearest.
    pub grad_rounding: GradRounding,
    /// How the output gradient's clip value is chosen (DSGC, or clip at max|g|).
    pub clip: ClipMode,
    /// DCLR's learning-rate scaling, or none.
    pub dclr: Option<Dclr>,
}

/// Rounding of gradient codes. Stochastic rounding draws a fresh stream every step from the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradRounding {
    /// To the nearest code.
    Nearest,
    /// Stochastic, seeded.
    Stochastic {
        /// The layer's base seed; step `t` uses a stream derived from it and `t`.
        seed: u64,
    },
}

impl GradRounding {
    /// The quantizer's rounding for step `step`.
    pub fn at_step(self, step: u64) -> Rounding {
        match self {
            GradRounding::Nearest => Rounding::Nearest,
            GradRounding::Stochastic { seed } => {
                Rounding::Stochastic { seed: seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) }
            }
        }
    }
}

impl Default for Int8Config {
    /// The paper's setting: per-tensor weights, nearest rounding, DSGC every 100 iterations, DCLR
    /// with alpha = 20 and beta = 0.1.
    fn default() -> Self {
        Self {
            weight: Granularity::PerTensor,
            grad_rounding: GradRounding::Nearest,
            clip: ClipMode::dsgc(100),
            dclr: Some(Dclr::default()),
        }
    }
}

/// A layer's precision.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Precision {
    /// FP32 forward and backward.
    #[default]
    Fp32,
    /// INT8 forward and backward.
    Int8(Int8Config),
}
