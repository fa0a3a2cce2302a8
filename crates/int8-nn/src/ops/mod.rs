//! The ops: forward and backward of everything the models compute, on `int8-core`'s kernels, each
//! recorded on the tape (see [`crate::tape`]) with a backward object that owns what it saved.
//!
//! One file per kind of op: [`conv`] and [`linear`] (FP32 or INT8 in both passes, Zhu et al.,
//! CVPR 2020), [`batch_norm`] (with a fused ReLU or ReLU6), [`activation`] (ReLU, ReLU6, the
//! residual add + ReLU), [`pool`] (max, average, global average), [`dropout`], [`loss`] (softmax
//! cross-entropy), [`shape`] (reshape, concat) and [`arith`] (add, multiply, scale, sum). The
//! layers of [`crate::layers`] call them with their parameters; models call the parameterless ones
//! directly.

pub mod activation;
pub mod arith;
pub(crate) mod batch_norm;
pub(crate) mod conv;
pub mod dropout;
pub(crate) mod linear;
pub mod loss;
pub mod pool;
pub mod shape;

pub use activation::{add_relu, relu, relu6};
pub use arith::add;
pub use loss::{LossReport, cross_entropy};
pub use pool::{avg_pool2d, global_avg_pool, max_pool2d};
pub use shape::concat;

use crate::tensor::{Shape, Tensor};

/// An op's output: `values` on the CPU under `shape` (whose size the kernel wrote).
pub(crate) fn cpu_out(values: Vec<f32>, shape: impl Into<Shape>) -> Tensor {
    Tensor::cpu_untracked(values, shape.into())
}

/// A buffer of `n` zeros for an op's output or gradient, zeroed by all of rayon's threads.
///
/// `vec![0f32; n]` zeroes in `calloc` on one thread; with the process keeping freed memory
/// ([`crate::alloc`]) that is a `memset` of every output and gradient of the step, up to 8 MB each,
/// at the speed of one core.
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    // Below this, one thread zeroes it faster than rayon can share it out.
    const CHUNK: usize = 1 << 14;
    if n <= CHUNK {
        return vec![0f32; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(CHUNK).for_each(|c| {
        for e in c {
            e.write(0.0);
        }
    });
    // SAFETY: the capacity is at least `n`, and the loop above wrote all of the first `n` elements.
    unsafe { v.set_len(n) };
    v
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn zeroed_buffers_have_the_length_asked_for_and_only_zeros() {
        for n in [0, 1, (1 << 14) - 1, 1 << 14, (1 << 14) + 1, 5 * (1 << 14) + 7] {
            let v = super::zeroed(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x.to_bits() == 0), "n = {n}");
        }
    }
}
