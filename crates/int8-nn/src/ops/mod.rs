//! candle custom ops whose forward and backward run on `int8-core`'s kernels.

pub(crate) mod basic;
pub(crate) mod conv;
pub(crate) mod linear;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout};

/// The contiguous f32 data of a custom op's operand, or an error naming it.
pub(crate) fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what} must be f32, got {:?}; convert it with .to_dtype(DType::F32)", s.dtype());
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what} must be contiguous; call .contiguous() on it first"),
    }
}

/// Runs `f` on the f32 contents of `t`, borrowed from its storage without a copy when the tensor
/// is contiguous on the cpu (the usual case in a backward pass), copied otherwise.
pub(crate) fn with_values<R>(
    t: &candle_core::Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), true) = (&*storage, layout.is_contiguous()) {
            return f(f32_data(cpu, layout, what)?);
        }
    }
    f(&t.flatten_all()?.to_vec1::<f32>()?)
}

/// The weight codes an input gradient needs: the forward pass's codes when they have one scale or
/// `per_channel_ok` (a depthwise convolution, whose input channels each take the gradient of one
/// output channel), else `w` quantized again per tensor (the input gradient sums over output
/// channels, so it cannot apply one scale per output channel).
pub(crate) fn input_grad_weight<'a>(
    name: &str,
    saved: &'a int8_core::quant::QTensor,
    w: &candle_core::Tensor,
    per_channel_ok: bool,
) -> candle_core::Result<std::borrow::Cow<'a, int8_core::quant::QTensor>> {
    use int8_core::quant::{Granularity, Rounding, quantize};
    if saved.channels() == 1 || per_channel_ok {
        return Ok(std::borrow::Cow::Borrowed(saved));
    }
    with_values(w, "weight", |wv| {
        quantize(&format!("{name}.weight"), wv, Granularity::PerTensor, 1, Rounding::Nearest)
            .map(std::borrow::Cow::Owned)
            .map_err(crate::error::to_candle)
    })
}

/// A buffer of `n` zeros for an op's output or gradient, zeroed by all of rayon's threads.
///
/// `vec![0f32; n]` zeroes in `calloc` on one thread; with the process keeping freed memory
/// ([`crate::alloc`]) that is a `memset` of every output and gradient of the step, up to 8 MB each,
/// at the speed of one core. Spread over the cores, `int8-bench step` measured FP32 311-326 ms and
/// INT8 205 ms against 342-362 ms and 235-258 ms with `calloc`, alternating the two binaries.
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
