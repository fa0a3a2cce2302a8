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
