//! FP32 convolution: im2col + GEMM per image and group on the `gemm` crate, depthwise direct.
//! This is the baseline every INT8 speed-up is measured against, so it is made as fast as the
//! INT8 path: images run in parallel, each with its own im2col buffer, and 1x1 convolutions skip
//! im2col.

use rayon::prelude::*;

use super::im2col::Lowering;
use super::{ConvShape, batch_run, check, depthwise, dx_as_forward, flip_transpose, phase, weight_grad_run};
use crate::error::Result;
use crate::gemm::{MatMut, MatRef, Parallelism, gemm_f32, gemm_f32_overwrite};
use crate::out::Out;

/// Parallelism inside each image's GEMM: images already run in parallel unless there are fewer
/// images than threads.
pub(super) fn inner_parallelism(s: &ConvShape) -> Parallelism {
    if s.n < rayon::current_num_threads() { Parallelism::Rayon } else { Parallelism::None }
}

/// Forward: `y = conv(x, w)`, overwriting `y`.
pub fn conv2d_fwd_f32<'y>(s: &ConvShape, x: &[f32], w: &[f32], y: impl Into<Out<'y>>) -> Result<()> {
    let y = y.into();
    check(
        s,
        &[("conv input", x.len(), s.x_len()), ("conv weight", w.len(), s.w_len()), ("conv output", y.len(), s.y_len())],
    )?;
    if s.is_depthwise() {
        depthwise::forward(s, x, w, y, |_| 1.0);
        return Ok(());
    }
    let lower = Lowering::new(s);
    let (p, kg, cig, cog) = (s.out_plane(), s.k_group(), s.c_in_group(), s.c_out_group());
    let par = inner_parallelism(s);
    let col_len = if s.is_pointwise() { 0 } else { lower.buffer_len() };
    // SAFETY: each image's chunk is written whole: the groups' rows tile it, and each group's
    // GEMM writes every element of its view (`gemm_f32_overwrite`).
    let chunks = unsafe { y.par_chunks_unzeroed(s.c_out * p) };
    chunks.zip(x.par_chunks(s.c_in * s.in_plane())).try_for_each_init(
        || vec![0f32; col_len],
        |col, (y, x)| {
            for g in 0..s.groups {
                let xg = &x[g * cig * s.in_plane()..][..cig * s.in_plane()];
                let b = if s.is_pointwise() {
                    MatRef::row_major(xg, kg, p)?
                } else {
                    MatRef::row_major(lower.run(xg, col), kg, p)?
                };
                let a = MatRef::row_major(&w[g * cog * kg..][..cog * kg], cog, kg)?;
                gemm_f32_overwrite(a, b, MatMut::row_major(&mut y[g * cog * p..][..cog * p], cog, p)?, par)?;
            }
            Ok(())
        },
    )
}

/// Input gradient: `dx = conv_transpose(dy, w)`, overwriting `dx`.
pub fn conv2d_dx_f32<'x>(s: &ConvShape, w: &[f32], dy: &[f32], dx: impl Into<Out<'x>>) -> Result<()> {
    let dx = dx.into();
    check(
        s,
        &[
            ("conv weight", w.len(), s.w_len()),
            ("conv output gradient", dy.len(), s.y_len()),
            ("conv input gradient", dx.len(), s.x_len()),
        ],
    )?;
    if s.is_depthwise() {
        depthwise::input_grad(s, w, dy, dx, |_| 1.0);
        return Ok(());
    }
    if let Some(t) = dx_as_forward(s) {
        return conv2d_fwd_f32(&t, dy, &flip_transpose(s, w), dx);
    }
    let (p, kg, cig, cog) = (s.out_plane(), s.k_group(), s.c_in_group(), s.c_out_group());
    let par = inner_parallelism(s);
    if s.is_pointwise() {
        // SAFETY: as in `conv2d_fwd_f32`: the groups' rows tile each image's chunk, and each GEMM
        // writes every element of its view.
        let chunks = unsafe { dx.par_chunks_unzeroed(s.c_in * s.in_plane()) };
        return chunks.zip(dy.par_chunks(s.c_out * p)).try_for_each(|(dx, dy)| {
            for g in 0..s.groups {
                let a = MatRef::row_major(&w[g * cog * kg..][..cog * kg], cog, kg)?.t();
                let b = MatRef::row_major(&dy[g * cog * p..][..cog * p], cog, p)?;
                let out = MatMut::row_major(&mut dx[g * cig * s.in_plane()..][..cig * s.in_plane()], kg, p)?;
                gemm_f32_overwrite(a, b, out, par)?;
            }
            Ok(())
        });
    }
    // Strided (or over-padded) convolutions: one GEMM per phase of the input (see [`phase`]).
    let phases = phase::phases(s);
    let weights: Vec<Vec<Vec<f32>>> =
        (0..s.groups).map(|g| phases.iter().map(|ph| phase::phase_weight(s, w, g, ph)).collect()).collect();
    let (col_len, out_len) = phase::buffer_lens(s, &phases);
    dx.par_chunks(s.c_in * s.in_plane()).zip(dy.par_chunks(s.c_out * p)).try_for_each_init(
        || (vec![0f32; col_len], vec![0f32; out_len]),
        |(col, out), (dx, dy)| {
            for (g, weights) in weights.iter().enumerate() {
                let dyg = &dy[g * cog * p..][..cog * p];
                let dxg = &mut dx[g * cig * s.in_plane()..][..cig * s.in_plane()];
                phase::input_grad_image(
                    s,
                    &phases,
                    dyg,
                    dxg,
                    (col, out),
                    |i, b, c| gemm_f32(MatRef::row_major(&weights[i], cig, b.rows())?, b, c, false, par),
                    None,
                )?;
            }
            Ok(())
        },
    )
}

/// Weight gradient: `dw = sum over the batch of dy * im2col(x)^T`, overwriting `dw`.
pub fn conv2d_dw_f32(s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) -> Result<()> {
    check(
        s,
        &[
            ("conv input", x.len(), s.x_len()),
            ("conv output gradient", dy.len(), s.y_len()),
            ("conv weight gradient", dw.len(), s.w_len()),
        ],
    )?;
    if s.is_depthwise() {
        depthwise::weight_grad(s, x, dy, dw, |v| v as f32);
        return Ok(());
    }
    let lower = Lowering::new(s);
    let p = s.out_plane();
    let par = inner_parallelism(s);
    let col_len = if s.is_pointwise() { 0 } else { lower.buffer_len() };
    let (x_len, y_len) = (s.c_in * s.in_plane(), s.c_out * p);
    let run = batch_run(s.n);
    // The tasks' partial sums are added in task order, so that a run's FP32 weight gradients do
    // not depend on which thread finished first.
    let partials = x
        .par_chunks(run * x_len)
        .zip(dy.par_chunks(run * y_len))
        .map_init(
            || vec![0f32; col_len],
            |col, (xs, dys)| {
                let mut acc = vec![0f32; s.w_len()];
                weight_grad_run(s, &lower, (xs, dys), col, &mut acc, |a, b, c, accumulate| {
                    gemm_f32(a, b, c, accumulate, par)
                })?;
                Ok(acc)
            },
        )
        .collect::<Result<Vec<_>>>()?;
    let mut total = vec![0f32; s.w_len()];
    for acc in &partials {
        total.iter_mut().zip(acc).for_each(|(t, a)| *t += a);
    }
    dw.copy_from_slice(&total);
    Ok(())
}
