//! INT8 convolution: the three GEMMs of a conv layer on INT8 codes with exact INT32 accumulation
//! (Zhu et al., CVPR 2020, Sec. 3, Fig. 2), scales applied once per output.
//!
//! Inputs are quantized once by the caller ([`crate::quant`]) and stay one byte per element, so the
//! im2col that feeds the GEMMs moves bytes, not floats. Scales: the input and the output gradient
//! are per tensor (the gradient's clip value comes from DSGC); the weight may be per output channel
//! in the forward pass, while the input gradient, which sums over output channels, needs one weight
//! scale (quantize the weight per tensor for it).

use rayon::prelude::*;

use super::fp32::inner_parallelism;
use super::im2col::{LoweredPanels, Lowering};
use super::{
    ConvShape, amx, batch_run, check, depthwise, dx_as_forward, flip_transpose, phase, strided_pointwise,
    upsample_plane, weight_grad_run,
};
use crate::error::{CoreError, Result};
use crate::gemm::{
    Int8Path, MatMut, MatRef, PackedA, Parallelism, gemm_i8, gemm_i8_scaled_packed, gemm_i8_scaled_packed_from,
};
use crate::out::Out;
use crate::quant::QTensor;

/// A borrowed quantized tensor: codes in `[-127, 127]` and one scale, or one per outermost slice.
#[derive(Debug, Clone, Copy)]
pub struct QView<'a> {
    /// The codes, in the tensor's layout.
    pub codes: &'a [i8],
    /// The scales.
    pub scales: &'a [f32],
}

impl<'a> From<&'a QTensor> for QView<'a> {
    fn from(q: &'a QTensor) -> Self {
        QView { codes: &q.data, scales: &q.scales }
    }
}

/// `wide += acc`, elementwise, widening to `i64`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn widen_add(wide: &mut [i64], acc: &[i32]) {
    for (w, &a) in wide.iter_mut().zip(acc) {
        *w += a as i64;
    }
}

/// The single scale of a per-tensor quantized operand.
fn tensor_scale(what: &'static str, q: &QView) -> Result<f32> {
    match q.scales {
        [s] => Ok(*s),
        _ => Err(CoreError::InvalidArgument {
            what,
            why: format!("needs one per-tensor scale, got {}; quantize it per tensor", q.scales.len()),
        }),
    }
}

/// The scale the forward pass multiplies output channel `co`'s integer sums by: `s_x * s_w[co]`,
/// with one weight scale for every channel or one per channel. Whatever keeps those sums (a batch
/// norm after the convolution) computes it here, so that it is the kernels' bit for bit.
pub fn output_scale(x_scale: f32, w_scales: &[f32], co: usize) -> f32 {
    x_scale * w_scales[if w_scales.len() == 1 { 0 } else { co }]
}

/// Forward: `y = (s_x * s_w[co]) * conv(xq, wq)`, overwriting `y`. The weight may have one scale
/// or one per output channel.
pub fn conv2d_fwd_i8<'y>(path: Int8Path, s: &ConvShape, x: QView, w: QView, y: impl Into<Out<'y>>) -> Result<()> {
    let y = y.into();
    check(
        s,
        &[
            ("conv input", x.codes.len(), s.x_len()),
            ("conv weight", w.codes.len(), s.w_len()),
            ("conv output", y.len(), s.y_len()),
        ],
    )?;
    let sx = tensor_scale("conv input", &x)?;
    if w.scales.len() != 1 && w.scales.len() != s.c_out {
        return Err(CoreError::InvalidArgument {
            what: "conv weight scales",
            why: format!(
                "{} scales for {} output channels; give one, or one per output channel",
                w.scales.len(),
                s.c_out
            ),
        });
    }
    let scale = |co: usize| output_scale(sx, w.scales, co);
    if s.is_depthwise() {
        depthwise::forward(s, x.codes, w.codes, y, scale);
        return Ok(());
    }
    let row_scales: Vec<f32> = (0..s.c_out).map(scale).collect();
    if amx::applies(path, s) && path.is_available() {
        return amx::forward(s, x.codes, w.codes, y, &row_scales);
    }
    let lower = Lowering::new(s);
    let (p, kg, cig, cog) = (s.out_plane(), s.k_group(), s.c_in_group(), s.c_out_group());
    let par = inner_parallelism(s);
    let col_len = if s.is_pointwise() { 0 } else { lower.buffer_len() };
    // The weight is packed once per group and serves every image of the batch.
    let packed = (0..s.groups)
        .map(|g| {
            PackedA::new(path, MatRef::row_major(&w.codes[g * cog * kg..][..cog * kg], cog, kg)?, Parallelism::Rayon)
        })
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: each image's chunk is written whole: the groups' rows tile it, and each group's
    // GEMM writes every element of its view (`gemm_i8_scaled_packed_from`).
    let chunks = unsafe { y.par_chunks_unzeroed(s.c_out * p) };
    chunks.zip(x.codes.par_chunks(s.c_in * s.in_plane())).try_for_each_init(
        || vec![0i8; col_len],
        |col, (y, x)| {
            for (g, a) in packed.iter().enumerate() {
                let xg = &x[g * cig * s.in_plane()..][..cig * s.in_plane()];
                let out = MatMut::row_major(&mut y[g * cog * p..][..cog * p], cog, p)?;
                let scales = &row_scales[g * cog..(g + 1) * cog];
                if s.is_pointwise() {
                    gemm_i8_scaled_packed_from(a, &MatRef::row_major(xg, kg, p)?, out, scales, par)?;
                    continue;
                }
                // The operand is packed straight from the image where it can be.
                if let Some(src) = lower.panels(xg, col) {
                    gemm_i8_scaled_packed_from(a, &src, out, scales, par)?;
                    continue;
                }
                gemm_i8_scaled_packed_from(a, &MatRef::row_major(lower.run(xg, col), kg, p)?, out, scales, par)?;
            }
            Ok(())
        },
    )
}

/// Input gradient: `dx = (s_w * s_dy) * conv_transpose(dyq, wq)`, overwriting `dx`. Both operands
/// need one scale each, except that a depthwise weight may have one per channel: there each input
/// channel's gradient comes from its own output channel alone.
pub fn conv2d_dx_i8<'x>(path: Int8Path, s: &ConvShape, w: QView, dy: QView, dx: impl Into<Out<'x>>) -> Result<()> {
    let dx = dx.into();
    check(
        s,
        &[
            ("conv weight", w.codes.len(), s.w_len()),
            ("conv output gradient", dy.codes.len(), s.y_len()),
            ("conv input gradient", dx.len(), s.x_len()),
        ],
    )?;
    if s.is_depthwise() {
        let sdy = tensor_scale("conv output gradient", &dy)?;
        match *w.scales {
            [sw] => depthwise::input_grad(s, w.codes, dy.codes, dx, |_| sw * sdy),
            ref sw if sw.len() == s.c_out => depthwise::input_grad(s, w.codes, dy.codes, dx, |c| sw[c] * sdy),
            ref sw => {
                return Err(CoreError::InvalidArgument {
                    what: "depthwise conv weight (for the input gradient)",
                    why: format!("needs one scale or one per channel ({}), got {}", s.c_out, sw.len()),
                });
            }
        }
        return Ok(());
    }
    let sc = tensor_scale("conv weight (for the input gradient)", &w)? * tensor_scale("conv output gradient", &dy)?;
    if let Some(t) = dx_as_forward(s) {
        let flipped = flip_transpose(s, w.codes);
        return conv2d_fwd_i8(path, &t, dy, QView { codes: &flipped, scales: w.scales }, dx);
    }
    if let Some(k) = strided_pointwise(s) {
        // The stride-1 input gradient over the subsample, placed back with zeros between: each
        // image's goes through a buffer that stays in cache, so the full gradient is written once.
        let pointwise = pointwise_dx(path, &k, w, sc)?;
        // SAFETY: `upsample_plane` writes every value of each image's planes.
        let chunks = unsafe { dx.par_chunks_unzeroed(s.c_in * s.in_plane()) };
        return chunks.zip(dy.codes.par_chunks(s.c_out * k.out_plane())).try_for_each_init(
            || vec![0f32; k.c_in * k.in_plane()],
            |sub, (dx, dy)| {
                // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and the GEMM writes only values.
                let out = unsafe { std::slice::from_raw_parts_mut(sub.as_mut_ptr().cast(), sub.len()) };
                pointwise.image(dy, out)?;
                for (src, plane) in sub.chunks_exact(k.in_plane()).zip(dx.chunks_exact_mut(s.in_plane())) {
                    upsample_plane(s, src, plane);
                }
                Ok(())
            },
        );
    }
    let (p, cig, cog) = (s.out_plane(), s.c_in_group(), s.c_out_group());
    let par = inner_parallelism(s);
    let row_scales = vec![sc; cig];
    if s.is_pointwise() {
        let pointwise = pointwise_dx(path, s, w, sc)?;
        // SAFETY: as in `conv2d_fwd_i8`: each GEMM writes every element of its image's chunk.
        let chunks = unsafe { dx.par_chunks_unzeroed(s.c_in * s.in_plane()) };
        return chunks.zip(dy.codes.par_chunks(s.c_out * p)).try_for_each(|(dx, dy)| pointwise.image(dy, dx));
    }
    // Strided (or over-padded) convolutions: one GEMM per phase of the input (see [`phase`]),
    // each phase's weight packed once for the batch.
    let phases = phase::phases(s);
    let packed = (0..s.groups)
        .map(|g| {
            phases
                .iter()
                .map(|ph| {
                    let a = phase::phase_weight(s, w.codes, g, ph);
                    PackedA::new(path, MatRef::row_major(&a, cig, cog * ph.taps.len())?, Parallelism::Rayon)
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<Vec<_>>>()?;
    let (col_len, out_len) = phase::buffer_lens(s, &phases);
    dx.par_chunks(s.c_in * s.in_plane()).zip(dy.codes.par_chunks(s.c_out * p)).try_for_each_init(
        || (vec![0i8; col_len], vec![0f32; out_len]),
        |(col, out), (dx, dy)| {
            for (g, packed) in packed.iter().enumerate() {
                let dyg = &dy[g * cog * p..][..cog * p];
                let dxg = &mut dx[g * cig * s.in_plane()..][..cig * s.in_plane()];
                // Each phase's operand is packed straight from dY where it can be.
                let mut direct = |i: usize, b: &LoweredPanels, c: MatMut<f32>| {
                    gemm_i8_scaled_packed_from(&packed[i], b, c.into_uninit(), &row_scales, par)
                };
                let direct: Option<phase::PanelProduct> = Some(&mut direct);
                phase::input_grad_image(
                    s,
                    &phases,
                    dyg,
                    dxg,
                    (col, out),
                    |i, b, c| gemm_i8_scaled_packed(&packed[i], b, c, &row_scales, par),
                    direct,
                )?;
            }
            Ok(())
        },
    )
}

/// The input gradient of a 1x1 stride-1 convolution `s`, one image at a time: per group,
/// `dX_g = scale * W_g^T dY_g`, the transposed weight packed once per group for the whole batch.
struct PointwiseDx<'a> {
    s: &'a ConvShape,
    packed: Vec<PackedA>,
    row_scales: Vec<f32>,
    par: Parallelism,
}

fn pointwise_dx<'a>(path: Int8Path, s: &'a ConvShape, w: QView, scale: f32) -> Result<PointwiseDx<'a>> {
    let (kg, cog) = (s.k_group(), s.c_out_group());
    let packed = (0..s.groups)
        .map(|g| {
            PackedA::new(
                path,
                MatRef::row_major(&w.codes[g * cog * kg..][..cog * kg], cog, kg)?.t(),
                Parallelism::Rayon,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PointwiseDx { s, packed, row_scales: vec![scale; s.c_in_group()], par: inner_parallelism(s) })
}

impl PointwiseDx<'_> {
    /// One image: `dy` its output gradient's codes, `dx` its `c_in x plane` input gradient, every
    /// element of which is written.
    fn image(&self, dy: &[i8], dx: &mut [std::mem::MaybeUninit<f32>]) -> Result<()> {
        let (p, cig, cog) = (self.s.out_plane(), self.s.c_in_group(), self.s.c_out_group());
        for (g, a) in self.packed.iter().enumerate() {
            let b = MatRef::row_major(&dy[g * cog * p..][..cog * p], cog, p)?;
            let out = MatMut::row_major(&mut dx[g * cig * p..][..cig * p], cig, p)?;
            gemm_i8_scaled_packed_from(a, &b, out, &self.row_scales, self.par)?;
        }
        Ok(())
    }
}

/// Weight gradient: `dw = (s_dy * s_x) * sum over the batch of dyq * im2col(xq)^T`, overwriting
/// `dw`. Each image's sums are exact in `i32`; the batch sum is carried in `i64`.
pub fn conv2d_dw_i8(path: Int8Path, s: &ConvShape, x: QView, dy: QView, dw: &mut [f32]) -> Result<()> {
    check(
        s,
        &[
            ("conv input", x.codes.len(), s.x_len()),
            ("conv output gradient", dy.codes.len(), s.y_len()),
            ("conv weight gradient", dw.len(), s.w_len()),
        ],
    )?;
    let sc = tensor_scale("conv input", &x)? as f64 * tensor_scale("conv output gradient", &dy)? as f64;
    if s.is_depthwise() {
        depthwise::weight_grad(s, x.codes, dy.codes, dw, |v| (v as f64 * sc) as f32);
        return Ok(());
    }
    if amx::applies(path, s) && path.is_available() {
        return amx::weight_grad(s, x.codes, dy.codes, dw, sc);
    }
    if amx::pointwise_weight_grad_applies(path, s) && path.is_available() {
        return amx::pointwise_weight_grad(s, x.codes, dy.codes, dw, sc);
    }
    let par = inner_parallelism(s);
    if s.is_pointwise() && s.out_plane() < SIDE_BY_SIDE_BELOW {
        // One product per run of images and group, over the run's positions laid side by side
        // (`dW_g = dY_g X_g^T`, the sum over images being the sum over those positions): on small
        // planes a product per image cost more in packing and calls than in multiplying.
        let (p, cig, cog) = (s.out_plane(), s.c_in_group(), s.c_out_group());
        return weight_grad_in_runs(
            s,
            (x.codes, dy.codes),
            dw,
            sc,
            || (Vec::new(), Vec::new(), vec![0i32; s.w_len()]),
            |(xs_row, dys_row, acc), xs, dys| {
                let k = xs.len() / s.c_in;
                side_by_side(xs, s.c_in, p, xs_row);
                side_by_side(dys, s.c_out, p, dys_row);
                for g in 0..s.groups {
                    let a = MatRef::row_major(&dys_row[g * cog * k..][..cog * k], cog, k)?;
                    let b = MatRef::row_major(&xs_row[g * cig * k..][..cig * k], cig, k)?.t();
                    let c = MatMut::row_major(&mut acc[g * cog * cig..][..cog * cig], cog, cig)?;
                    gemm_i8(path, a, b, c, false, par)?;
                }
                Ok(())
            },
            |(_, _, acc), total| widen_add(total, acc),
        );
    }
    let lower = Lowering::new(s);
    let col_len = if s.is_pointwise() { 0 } else { lower.buffer_len() };
    weight_grad_in_runs(
        s,
        (x.codes, dy.codes),
        dw,
        sc,
        || (vec![0i8; col_len], vec![0i32; s.w_len()]),
        |(col, acc), xs, dys| {
            // The GEMM accumulates the run's images in place, the first overwriting.
            weight_grad_run(s, &lower, (xs, dys), col, acc, |a, b, c, accumulate| {
                gemm_i8(path, a, b, c, accumulate, par)
            })
        },
        |(_, acc), total| widen_add(total, acc),
    )
}

/// Planes (of positions) below which a 1x1 weight gradient off AMX multiplies a run of images laid
/// side by side rather than each image: measured on the VNNI path, the copies cost less than the
/// per-image calls at 4x4 planes, as much at 16x16, more at 32x32 (`docs/performance.md`).
const SIDE_BY_SIDE_BELOW: usize = 256;

/// Lays whole images of `rows x plane` values side by side: `out[r][i * plane + q] =
/// images[i][r][q]`, a `rows x (images * plane)` matrix.
fn side_by_side(images: &[i8], rows: usize, plane: usize, out: &mut Vec<i8>) {
    let k = images.len() / rows;
    out.resize(images.len(), 0);
    for (i, image) in images.chunks_exact(rows * plane).enumerate() {
        for (r, row) in image.chunks_exact(plane).enumerate() {
            out[r * k + i * plane..][..plane].copy_from_slice(row);
        }
    }
}

/// The batch loop of an INT8 weight gradient: `dw = scale * sum over the batch`, each sum exact.
/// The images go in runs, one per task: `sum_run` sums a run's images (whole images, one after
/// the other) into its state's INT32 sums, and `widen` adds those to the i64 total (in `dw`'s
/// layout) when the run ends. One image adds at most `plane * 127^2` to each sum, so a run is
/// never longer than INT32 holds exactly (at 32x32 planes, 130 images: more than a task takes).
pub(super) fn weight_grad_in_runs<S: Send>(
    s: &ConvShape,
    (x, dy): (&[i8], &[i8]),
    dw: &mut [f32],
    scale: f64,
    init: impl Fn() -> S + Sync + Send,
    sum_run: impl Fn(&mut S, &[i8], &[i8]) -> Result<()> + Sync + Send,
    widen: impl Fn(&S, &mut [i64]) + Sync + Send,
) -> Result<()> {
    let p = s.out_plane();
    let per_i32 = (i32::MAX as usize / (p * 127 * 127)).max(1);
    let run = batch_run(s.n).min(per_i32);
    let (x_len, y_len) = (s.c_in * s.in_plane(), s.c_out * p);
    let total = std::sync::Mutex::new(vec![0i64; s.w_len()]);
    x.par_chunks(run * x_len).zip(dy.par_chunks(run * y_len)).try_for_each_init(init, |state, (xs, dys)| {
        sum_run(state, xs, dys)?;
        widen(state, &mut total.lock().unwrap_or_else(|e| e.into_inner()));
        Ok::<_, CoreError>(())
    })?;
    let total = total.into_inner().unwrap_or_else(|e| e.into_inner());
    for (o, &v) in dw.iter_mut().zip(&total) {
        *o = (v as f64 * scale) as f32;
    }
    Ok(())
}
