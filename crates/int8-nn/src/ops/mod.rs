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

/// The weight codes an input gradient needs: the forward pass's codes when they have one scale,
/// else `w` quantized again per tensor (the input gradient sums over output channels, so it cannot
/// apply one scale per output channel).
pub(crate) fn per_tensor_weight<'a>(
    name: &str,
    saved: &'a int8_core::quant::QTensor,
    w: &candle_core::Tensor,
) -> candle_core::Result<std::borrow::Cow<'a, int8_core::quant::QTensor>> {
    use int8_core::quant::{Granularity, Rounding, quantize};
    if saved.channels() == 1 {
        return Ok(std::borrow::Cow::Borrowed(saved));
    }
    with_values(w, "weight", |wv| {
        quantize(&format!("{name}.weight"), wv, Granularity::PerTensor, 1, Rounding::Nearest)
            .map(std::borrow::Cow::Owned)
            .map_err(crate::error::to_candle)
    })
}
