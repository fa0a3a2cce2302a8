//! FP32 GEMM on the `gemm` crate (AVX-512 / AVX2+FMA kernels chosen at run time), but for products
//! whose operands both run along the inner dimension, which take our dot-product kernels
//! ([`super::f32_dot`]) on the calling thread.

use super::f32_dot::{DotPath, applies, gemm_dot};
use super::{MatMut, MatRef, Parallelism, check_product};
use std::mem::MaybeUninit;

use crate::error::Result;

/// `C = A * B`, or `C += A * B` when `accumulate`.
pub fn gemm_f32(a: MatRef<f32>, b: MatRef<f32>, c: MatMut<f32>, accumulate: bool, par: Parallelism) -> Result<()> {
    check_product(&a, &b, &c)?;
    if c.rows == 0 || c.cols == 0 {
        return Ok(());
    }
    if a.cols == 0 {
        if !accumulate {
            for i in 0..c.rows {
                for j in 0..c.cols {
                    c.data[i * c.row_stride + j * c.col_stride] = 0.0;
                }
            }
        }
        return Ok(());
    }
    if par == Parallelism::None && applies(&a, &b) {
        gemm_dot(DotPath::detect(), a, b, c, accumulate);
        return Ok(());
    }
    // SAFETY: the views were checked on construction to keep every element they address inside
    // their slices, `check_product` checked that the shapes agree, and the output view is borrowed
    // mutably, so it does not alias the inputs.
    unsafe { gemm_crate(&a, &b, c.data.as_mut_ptr(), (c.rows, c.row_stride, c.col_stride), accumulate, par) };
    Ok(())
}

/// `C = A * B` into a view that may start uninitialised (an output no pass has zeroed): every
/// element of the view is written, none read.
pub(crate) fn gemm_f32_overwrite(
    a: MatRef<f32>,
    b: MatRef<f32>,
    c: MatMut<MaybeUninit<f32>>,
    par: Parallelism,
) -> Result<()> {
    check_product(&a, &b, &c)?;
    if c.rows == 0 || c.cols == 0 {
        return Ok(());
    }
    if a.cols == 0 || (par == Parallelism::None && applies(&a, &b)) {
        // An empty reduction, or a product our dot kernels take (in the convolutions, only planes
        // of one pixel, on the calling thread): those kernels read their output, so it is zeroed
        // first.
        return gemm_f32(a, b, c.zeroed(), false, par);
    }
    // SAFETY: as in `gemm_f32`; without `read_dst` the `gemm` crate writes `C` and never reads it
    // (its `alpha` is zero), so the elements need not be initialised.
    unsafe { gemm_crate(&a, &b, c.data.as_mut_ptr().cast(), (c.rows, c.row_stride, c.col_stride), false, par) };
    Ok(())
}

/// The `gemm` crate's `C = A * B` (`C += A * B` when `accumulate`), `C` at `dst` with `rows`
/// rows and the given strides, as many columns as `b`.
///
/// # Safety
/// The shapes must agree, every element of the views must lie in their memory, and `C` must not
/// alias `A` or `B`; `C` need be initialised only when `accumulate`.
unsafe fn gemm_crate(
    a: &MatRef<f32>,
    b: &MatRef<f32>,
    dst: *mut f32,
    (rows, rs, cs): (usize, usize, usize),
    accumulate: bool,
    par: Parallelism,
) {
    let par = match par {
        Parallelism::None => gemm::Parallelism::None,
        Parallelism::Rayon => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            rows,
            b.cols,
            a.cols,
            dst,
            cs as isize,
            rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}
