//! The ops: forward and backward of everything the models compute, on `int8-core`'s kernels, each
//! recorded on the tape (see [`crate::tape`]) with a backward object that owns what it saved.
//!
//! One file per kind of op: [`conv`] and [`linear`] (FP32 or INT8 in both passes, Zhu et al.,
//! CVPR 2020), [`batch_norm`] (with a fused ReLU or ReLU6), [`activation`] (ReLU, ReLU6, the
//! residual add + ReLU), [`pool`] (max, average, global average), [`dropout`], [`loss`] (softmax
//! cross-entropy), [`shape`] (reshape, concat), [`arith`] (add, multiply, scale, sum) and
//! [`detection`] (RoIAlign, upsampling, L2Norm, the detectors' losses). The layers of
//! [`crate::layers`] call them with their parameters; models call the parameterless ones
//! directly.

pub mod activation;
pub mod arith;
pub(crate) mod batch_norm;
pub(crate) mod conv;
pub mod detection;
pub mod dropout;
pub(crate) mod linear;
pub mod loss;
pub mod pool;
pub mod select;
pub mod shape;

pub use activation::{add_relu, relu, relu6};
pub use arith::add;
pub use loss::{LossReport, cross_entropy};
pub use pool::{avg_pool2d, global_avg_pool, max_pool2d, max_pool2d_ceil};
pub use shape::concat;

use crate::tensor::{Shape, Tensor};

/// An op's output: `values` on the CPU under `shape` (whose size the kernel wrote).
pub(crate) fn cpu_out(values: Vec<f32>, shape: impl Into<Shape>) -> Tensor {
    Tensor::cpu_untracked(values, shape.into())
}

/// A buffer of `n` zeros for an op's output or gradient (see [`int8_core::out::zeros`]).
pub(crate) use int8_core::out::zeros;

/// The weight codes an INT8 input gradient needs: the forward pass's codes when they have one
/// scale or `per_channel_ok` (a depthwise convolution, whose input channels each take the gradient
/// of one output channel), else `w` quantized again per tensor (the input gradient sums over
/// output channels, so it cannot apply one scale per output channel).
pub(crate) fn input_grad_weight<'a>(
    name: &str,
    saved: &'a int8_core::quant::QTensor,
    w: Option<&Tensor>,
    per_channel_ok: bool,
) -> crate::Result<std::borrow::Cow<'a, int8_core::quant::QTensor>> {
    use int8_core::quant::{Granularity, Rounding, quantize};
    if saved.channels() == 1 || per_channel_ok {
        return Ok(std::borrow::Cow::Borrowed(saved));
    }
    let Some(w) = w else {
        return Err(crate::NnError::Graph(format!(
            "layer `{name}`: the f32 weights for its input gradient were not kept; this is a bug in int8-nn"
        )));
    };
    Ok(std::borrow::Cow::Owned(quantize(
        &format!("{name}.weight"),
        w.cpu()?,
        Granularity::PerTensor,
        1,
        Rounding::Nearest,
    )?))
}
