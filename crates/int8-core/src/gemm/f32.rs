//! FP32 GEMM on the `gemm` crate (AVX-512 / AVX2+FMA kernels chosen at run time), but for products
//! whose operands both run along the inner dimension, which take our dot-product kernels
//! ([`super::f32_dot`]) on the calling thread.

use super::f32_dot::{DotPath, applies, gemm_dot};
use super::{MatMut, MatRef, Parallelism, check_product};
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
    let par = match par {
        Parallelism::None => gemm::Parallelism::None,
        Parallelism::Rayon => gemm::Parallelism::Rayon(rayon::current_num_threads()),
    };
    // SAFETY: the views were checked on construction to keep every element they address inside
    // their slices, `check_product` checked that the shapes agree, and the output view is borrowed
    // mutably, so it does not alias the inputs.
    unsafe {
        gemm::gemm(
            c.rows,
            c.cols,
            a.cols,
            c.data.as_mut_ptr(),
            c.col_stride as isize,
            c.row_stride as isize,
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
    Ok(())
}
