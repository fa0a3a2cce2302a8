//! How a layer computes: FP32, or INT8 in the forward and the backward pass with the paper's
//! gradient treatment (Zhu et al., CVPR 2020, Sec. 4: DSGC clipping, DCLR scaling).

use int8_core::dclr::Dclr;
use int8_core::dsgc::ClipMode;
use int8_core::quant::{Granularity, Rounding};
use int8_core::rng::CounterRng;

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
    /// An operand a convolution leaves in FP32 (an ablation that finds which operand's
    /// quantization costs accuracy; the paper quantizes all three): none, the paper's.
    pub fp32_operand: Option<Operand>,
    /// Whether the batch norm that reads this convolution's output keeps it for the backward
    /// pass in half precision (normalised, 2 bytes a value, and a bit a value for a fused
    /// activation's mask) instead of f32: a batch norm's input is the largest thing an INT8
    /// network keeps once its convolutions keep 8-bit codes. The forward pass is unchanged; the
    /// backward pass's normalised input gets a relative error of at most 2^-11, under the INT8
    /// product's own. Off by default (the paper keeps batch norm in FP32): an accuracy sweep
    /// decides. CPU only: a GPU batch norm keeps f32.
    pub f16_batch_norm_input: bool,
}

/// An operand of an INT8 convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// The input X (forward pass and weight gradient).
    Input,
    /// The weights W (forward pass and input gradient).
    Weight,
    /// The output gradient dY (input and weight gradients); without its quantization there is
    /// no DSGC search and DCLR's multiplier stays 1.
    Grad,
}

/// Rounding of gradient codes. Stochastic rounding draws a fresh stream for every layer at every
/// step, derived from the seed, the layer's name and the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradRounding {
    /// To the nearest code.
    Nearest,
    /// Stochastic, seeded.
    Stochastic {
        /// The run's base seed; layer `name` at step `t` uses a stream derived from it, `name`
        /// and `t`.
        seed: u64,
    },
}

impl GradRounding {
    /// The quantizer's rounding for layer `layer` at step `step`. Streams of different layers
    /// are independent, so two layers round entries at the same position independently (layers
    /// whose gradients have one shape, as a depthwise convolution and the expansion before it,
    /// would otherwise make correlated rounding errors at every step).
    pub fn stream(self, layer: &str, step: u64) -> Rounding {
        match self {
            GradRounding::Nearest => Rounding::Nearest,
            GradRounding::Stochastic { seed } => {
                Rounding::Stochastic { seed: CounterRng::new(seed ^ fnv1a(layer.as_bytes())).bits(step) }
            }
        }
    }
}

/// FNV-1a, 64 bits: a hash of a layer's name that is the same on every machine and every run
/// (unlike the standard library's), so that a resumed run draws the same streams.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3))
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
            fp32_operand: None,
            f16_batch_norm_input: false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use int8_core::quant::quantize_with_clip;

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference test suite (Fowler, Noll and Vo).
        assert_eq!(fnv1a(b""), 0xCBF2_9CE4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xAF63_DC4C_8601_EC8C);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_F739_67E8);
    }

    #[test]
    fn nearest_rounding_is_the_same_for_every_layer_and_step() {
        assert_eq!(GradRounding::Nearest.stream("a", 0), Rounding::Nearest);
        assert_eq!(GradRounding::Nearest.stream("b", 7), Rounding::Nearest);
    }

    #[test]
    fn stochastic_streams_are_reproducible_and_differ_by_layer_step_and_seed() {
        let r = GradRounding::Stochastic { seed: 3 };
        assert_eq!(r.stream("features.1.dw.conv", 5), r.stream("features.1.dw.conv", 5));
        let all = [
            r.stream("features.1.dw.conv", 5),
            r.stream("features.1.expand.conv", 5),
            r.stream("features.1.dw.conv", 6),
            GradRounding::Stochastic { seed: 4 }.stream("features.1.dw.conv", 5),
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn two_layers_round_one_gradient_independently() {
        // Every entry lies half-way between two codes, so each layer rounds it up with
        // probability 1/2; with independent streams two layers agree on about half of the
        // entries, with one shared stream they would agree on all of them.
        let n = 20_000;
        let x = vec![0.5f32; n];
        let r = GradRounding::Stochastic { seed: 11 };
        let a = quantize_with_clip("a", &x, 127.0, r.stream("features.2.expand.conv", 9)).unwrap();
        let b = quantize_with_clip("b", &x, 127.0, r.stream("features.2.dw.conv", 9)).unwrap();
        let agree = a.data.iter().zip(&b.data).filter(|(p, q)| p == q).count() as f64 / n as f64;
        // Binomial(20000, 1/2): the standard deviation of the fraction is 0.0035.
        assert!((agree - 0.5).abs() < 0.02, "agreement {agree}");
    }
}
