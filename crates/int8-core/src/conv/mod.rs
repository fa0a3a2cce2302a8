//! 2-D convolution in NCHW, forward, input gradient (dX) and weight gradient (dW), FP32 and INT8.
//!
//! The three products of a training step of a conv layer (Zhu et al., CVPR 2020, Sec. 3):
//! `Y = W * X`, `dX = W^T * dY`, `dW = dY * X^T`. General convolutions lower to GEMMs per image and
//! group through im2col (skipped for 1x1 stride-1 convolutions); depthwise convolutions run direct
//! loops ([`depthwise`]); on AMX, stride-1 INT8 convolutions multiply tiles read straight from
//! the codes ([`amx`]). INT8 kernels take quantized codes, multiply them with exact INT32
//! accumulation and apply the scales once at the end; the weight gradient, which sums over batch x
//! H x W, accumulates each image's INT32 partial sums in `i64` so it never overflows.
//! [`reference`] holds the naive f64 loops that define all of them.

mod amx;
mod depthwise;
mod fp32;
mod im2col;
mod int8;
mod phase;
pub mod reference;
mod stride2;

pub use fp32::{conv2d_dw_f32, conv2d_dx_f32, conv2d_fwd_f32};
pub use int8::{QView, conv2d_dw_i8, conv2d_dx_i8, conv2d_fwd_i8, output_scale};

use crate::error::{CoreError, Result};
use crate::gemm::{self, MAX_K_I8};

/// The geometry of one convolution: input `n x c_in x h x w`, weight
/// `c_out x (c_in / groups) x kh x kw`, output `n x c_out x out_h x out_w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub c_in: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub c_out: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (rows, columns).
    pub stride: (usize, usize),
    /// Zero padding (rows, columns), on both sides.
    pub pad: (usize, usize),
    /// Dilation (rows, columns).
    pub dilation: (usize, usize),
    /// Groups: input and output channels split into this many independent convolutions.
    pub groups: usize,
}

impl ConvShape {
    /// A square convolution with kernel `k`, stride `s`, padding `p`, no dilation, one group.
    pub fn square(n: usize, c_in: usize, hw: usize, c_out: usize, k: usize, s: usize, p: usize) -> Self {
        Self { n, c_in, h: hw, w: hw, c_out, kh: k, kw: k, stride: (s, s), pad: (p, p), dilation: (1, 1), groups: 1 }
    }

    /// The same shape with `groups` groups.
    pub fn with_groups(self, groups: usize) -> Self {
        Self { groups, ..self }
    }

    /// Checks that the shape is meaningful: positive sizes, channels divisible by the groups, a
    /// kernel that fits the padded input, and a reduction short enough for exact INT8.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(CoreError::InvalidArgument { what: "convolution shape", why });
        let sizes = [self.n, self.c_in, self.h, self.w, self.c_out, self.kh, self.kw, self.groups];
        if sizes.contains(&0) || [self.stride.0, self.stride.1, self.dilation.0, self.dilation.1].contains(&0) {
            return bad(format!("{self:?} has a zero size, stride, dilation or group count"));
        }
        if !self.c_in.is_multiple_of(self.groups) || !self.c_out.is_multiple_of(self.groups) {
            return bad(format!(
                "{} input and {} output channels do not split into {} groups",
                self.c_in, self.c_out, self.groups
            ));
        }
        let span_h = self.dilation.0 * (self.kh - 1) + 1;
        let span_w = self.dilation.1 * (self.kw - 1) + 1;
        if span_h > self.h + 2 * self.pad.0 || span_w > self.w + 2 * self.pad.1 {
            return bad(format!(
                "a {}x{} kernel (dilated span {span_h}x{span_w}) is larger than the padded {}x{} input",
                self.kh, self.kw, self.h, self.w
            ));
        }
        if self.k_group() > MAX_K_I8 || self.out_plane() > MAX_K_I8 {
            return bad(format!(
                "reductions of {} or {} terms exceed the exact int8 limit {MAX_K_I8}",
                self.k_group(),
                self.out_plane()
            ));
        }
        Ok(())
    }

    /// Output height (0 for a shape whose kernel does not fit; see [`ConvShape::validate`]).
    pub fn out_h(&self) -> usize {
        out_len(self.h, self.pad.0, self.dilation.0, self.kh, self.stride.0)
    }

    /// Output width (0 for a shape whose kernel does not fit).
    pub fn out_w(&self) -> usize {
        out_len(self.w, self.pad.1, self.dilation.1, self.kw, self.stride.1)
    }

    /// Output pixels per channel.
    pub fn out_plane(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Input pixels per channel.
    pub fn in_plane(&self) -> usize {
        self.h * self.w
    }

    /// Input channels per group.
    pub fn c_in_group(&self) -> usize {
        self.c_in / self.groups.max(1)
    }

    /// Output channels per group.
    pub fn c_out_group(&self) -> usize {
        self.c_out / self.groups.max(1)
    }

    /// The GEMM reduction depth of one group: `c_in_group * kh * kw`.
    pub fn k_group(&self) -> usize {
        self.c_in_group() * self.kh * self.kw
    }

    /// Elements of the input.
    pub fn x_len(&self) -> usize {
        self.n * self.c_in * self.in_plane()
    }

    /// Elements of the output.
    pub fn y_len(&self) -> usize {
        self.n * self.c_out * self.out_plane()
    }

    /// Elements of the weight.
    pub fn w_len(&self) -> usize {
        self.c_out * self.k_group()
    }

    /// Whether this is a depthwise convolution (one input and one output channel per group), which
    /// runs the direct kernels.
    pub fn is_depthwise(&self) -> bool {
        self.groups == self.c_in && self.c_out == self.c_in && self.groups > 1
    }

    /// Whether im2col is the identity (1x1 kernel, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == (1, 1) && self.pad == (0, 0)
    }

    /// Multiply-accumulates of the forward pass (the same for dX and dW).
    pub fn macs(&self) -> usize {
        self.n * self.c_out * self.out_plane() * self.k_group()
    }
}

/// For a stride-1 convolution, the input gradient is itself a forward convolution of the output
/// gradient with the flipped, transposed weight (see [`flip_transpose`]) and padding
/// `dilation * (k - 1) - pad`. Returns that convolution's shape, or `None` where it does not apply
/// (strided or depthwise convolutions, 1x1 convolutions that need no im2col, padding wider than
/// the kernel's span).
pub(crate) fn dx_as_forward(s: &ConvShape) -> Option<ConvShape> {
    let span = (s.dilation.0 * (s.kh - 1), s.dilation.1 * (s.kw - 1));
    if s.stride != (1, 1) || s.is_depthwise() || s.is_pointwise() || s.pad.0 > span.0 || s.pad.1 > span.1 {
        return None;
    }
    Some(ConvShape {
        c_in: s.c_out,
        c_out: s.c_in,
        h: s.out_h(),
        w: s.out_w(),
        pad: (span.0 - s.pad.0, span.1 - s.pad.1),
        ..*s
    })
}

/// The weight of [`dx_as_forward`]: `w'[ci][co_g][i][j] = w[g * cog + co_g][ci_g][kh-1-i][kw-1-j]`.
pub(crate) fn flip_transpose<T: Copy + Default>(s: &ConvShape, w: &[T]) -> Vec<T> {
    let (cig, cog, kk) = (s.c_in_group(), s.c_out_group(), s.kh * s.kw);
    let mut out = vec![T::default(); w.len()];
    for co in 0..s.c_out {
        let (g, co_g) = (co / cog, co % cog);
        for ci_g in 0..cig {
            let ci = g * cig + ci_g;
            for t in 0..kk {
                out[(ci * cog + co_g) * kk + (kk - 1 - t)] = w[(co * cig + ci_g) * kk + t];
            }
        }
    }
    out
}

/// A 1x1 convolution without padding but with a stride reads only the pixels on its stride's grid,
/// so it is that subsample of the input followed by a 1x1 stride-1 convolution. Returns the
/// stride-1 shape over the subsampled input ([`subsample`]), or `None` where this does not apply.
/// Quantizing only the subsample (a quarter of the input at stride 2) is where INT8 gains.
pub fn strided_pointwise(s: &ConvShape) -> Option<ConvShape> {
    (s.kh == 1 && s.kw == 1 && s.pad == (0, 0) && s.stride != (1, 1)).then(|| ConvShape {
        h: s.out_h(),
        w: s.out_w(),
        stride: (1, 1),
        dilation: (1, 1),
        ..*s
    })
}

/// The pixels of `x` (`n x c_in x h x w`) that a [`strided_pointwise`] convolution `s` reads:
/// `out[n][c][i][j] = x[n][c][i * sh][j * sw]`, `out_h x out_w` per plane.
pub fn subsample<T: Copy + Default + Send + Sync>(s: &ConvShape, x: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::default(); s.n * s.c_in * s.out_plane()];
    out.par_chunks_mut(s.out_plane()).zip(x.par_chunks(s.in_plane())).for_each(|(dst, plane)| {
        subsample_plane(s, plane, dst);
    });
    out
}

/// One plane of [`subsample`]: `dst` (`out_h x out_w`) gets the pixels of `plane` on `s`'s grid.
fn subsample_plane<T: Copy>(s: &ConvShape, plane: &[T], dst: &mut [T]) {
    let (oh, ow, (sh, sw)) = (s.out_h(), s.out_w(), s.stride);
    if (sh, sw) == (2, 2) {
        return stride2::gather_plane(plane, s.w, oh, ow, dst);
    }
    for (i, row) in dst[..oh * ow].chunks_exact_mut(ow).enumerate() {
        let written = stride2::gather_strided(&plane[i * sh * s.w..][..s.w], row, sw);
        assert_eq!(written, ow, "subsample: a row of the subsample was not filled");
    }
}

/// The per-tensor INT8 codes of [`subsample`]`(s, x)` at their own largest magnitude, exactly
/// `quantize(name, &subsample(s, x), PerTensor, 1, Nearest)`, without the subsample in memory:
/// one pass gathers each plane into a buffer that stays in L1 and finds its largest magnitude,
/// a second gathers it again and quantizes it from there. An error names `name` where a pixel
/// read is not finite.
pub fn quantize_subsample(name: &str, s: &ConvShape, x: &[f32]) -> Result<crate::quant::QTensor> {
    use crate::quant::{Granularity, Rounding, max_abs_finite, quantize};
    use rayon::prelude::*;
    crate::error::check_len("strided 1x1 input", x.len(), s.x_len())?;
    let plane = s.out_plane();
    let (clip, finite) = x
        .par_chunks(s.in_plane())
        .map_init(
            || vec![0f32; plane],
            |buf, src| {
                subsample_plane(s, src, buf);
                max_abs_finite(buf)
            },
        )
        .reduce(|| (0.0, true), |a, b| (a.0.max(b.0), a.1 && b.1));
    if !finite {
        // `quantize`'s error, which names the first value that is not finite.
        return quantize(name, &subsample(s, x), Granularity::PerTensor, 1, Rounding::Nearest);
    }
    quantize_subsample_with_clip(name, s, x, clip)
}

/// The codes of [`subsample`]`(s, x)` at clip value `clip`, exactly `quantize_with_clip(name,
/// &subsample(s, x), clip, Nearest)`, in one pass over the pixels read: what a strided 1x1
/// convolution quantizes when the op that wrote X found max|X| (the paper's per-tensor scale of
/// X; the subsample's own maximum may be smaller). An error names `name` where a pixel read is not
/// finite, or where `clip` is not a finite value >= 0.
pub fn quantize_subsample_with_clip(name: &str, s: &ConvShape, x: &[f32], clip: f32) -> Result<crate::quant::QTensor> {
    use crate::quant::{QTensor, Rounding, quantize_slice, quantize_with_clip, scale_for_clip};
    use rayon::prelude::*;
    crate::error::check_len("strided 1x1 input", x.len(), s.x_len())?;
    if !clip.is_finite() || clip < 0.0 {
        // `quantize_with_clip`'s error for such a clip value.
        return quantize_with_clip(name, &[], clip, Rounding::Nearest);
    }
    let (plane, n) = (s.out_plane(), s.n * s.c_in * s.out_plane());
    let mut data = Vec::with_capacity(n);
    let (saturated, finite) = data.spare_capacity_mut()[..n]
        .par_chunks_mut(plane)
        .zip(x.par_chunks(s.in_plane()))
        .enumerate()
        .map_init(
            || vec![0f32; plane],
            |buf, (i, (codes, src))| {
                subsample_plane(s, src, buf);
                let stats = quantize_slice::<false>(buf, clip, Rounding::Nearest, i * plane, codes);
                (stats.saturated, stats.finite)
            },
        )
        .reduce(|| (0, true), |a, b| (a.0 + b.0, a.1 && b.1));
    if !finite {
        // `quantize_with_clip`'s error, which names the first value that is not finite.
        return quantize_with_clip(name, &subsample(s, x), clip, Rounding::Nearest);
    }
    // SAFETY: `quantize_slice` wrote every code of each plane's chunk (it asserts equal lengths),
    // and the chunks cover the first `n`.
    unsafe { data.set_len(n) };
    Ok(QTensor { data, scales: vec![scale_for_clip(clip)], saturated })
}

/// The inverse placement of [`subsample`] for gradients: `dx` (`n x c_in x h x w`) gets `sub` at
/// the pixels the convolution read and zero everywhere else, each value written once.
pub fn upsample<'x>(s: &ConvShape, sub: &[f32], dx: impl Into<crate::out::Out<'x>>) {
    use rayon::prelude::*;
    // SAFETY: `upsample_plane` writes every value of each plane.
    let planes = unsafe { dx.into().par_chunks_unzeroed(s.in_plane()) };
    planes.zip(sub.par_chunks(s.out_plane())).for_each(|(plane, src)| upsample_plane(s, src, plane));
}

/// One plane of [`upsample`]: every pixel of `dst` (`h x w`), `src`'s values on `s`'s grid.
fn upsample_plane(s: &ConvShape, src: &[f32], dst: &mut [std::mem::MaybeUninit<f32>]) {
    let (oh, ow, (sh, sw)) = (s.out_h(), s.out_w(), s.stride);
    if (sh, sw) == (2, 2) {
        return stride2::place_plane(src, oh, ow, s.h, s.w, dst);
    }
    for (r, row) in dst[..s.in_plane()].chunks_exact_mut(s.w).enumerate() {
        let from = (r % sh == 0).then(|| &src[r / sh * ow..][..ow]);
        for (j, d) in row.iter_mut().enumerate() {
            d.write(match from {
                Some(from) if j % sw == 0 => from[j / sw],
                _ => 0.0,
            });
        }
    }
}

/// The weight-gradient products of a run of images (`xs`, `dys`: whole images, one after the
/// other): for each image and group, `product(dY_g, lowered(x_g)^T, acc_g, accumulate)`, where
/// `accumulate` is false for the run's first image (which overwrites `acc`).
fn weight_grad_run<T: im2col::ZeroDefault, A: Copy>(
    s: &ConvShape,
    lower: &im2col::Lowering,
    (xs, dys): (&[T], &[T]),
    col: &mut [T],
    acc: &mut [A],
    mut product: impl FnMut(gemm::MatRef<T>, gemm::MatRef<T>, gemm::MatMut<A>, bool) -> Result<()>,
) -> Result<()> {
    use gemm::{MatMut, MatRef};
    let (p, kg, cig, cog) = (s.out_plane(), s.k_group(), s.c_in_group(), s.c_out_group());
    let (x_len, y_len) = (s.c_in * s.in_plane(), s.c_out * p);
    for (i, (x, dy)) in xs.chunks_exact(x_len).zip(dys.chunks_exact(y_len)).enumerate() {
        for g in 0..s.groups {
            let xg = &x[g * cig * s.in_plane()..][..cig * s.in_plane()];
            let b = if s.is_pointwise() {
                MatRef::row_major(xg, kg, p)?.t()
            } else {
                MatRef::row_major(lower.run(xg, col), kg, p)?.t()
            };
            let a = MatRef::row_major(&dy[g * cog * p..][..cog * p], cog, p)?;
            product(a, b, MatMut::row_major(&mut acc[g * cog * kg..][..cog * kg], cog, kg)?, i > 0)?;
        }
    }
    Ok(())
}

/// How many images of a batch of `n` one weight-gradient task sums before adding its partial sum
/// to the total: about two tasks per worker thread, so that a descheduled thread's share can be
/// taken over, while each task's buffers are made and summed once (per image, zeroed buffers and
/// their reduction cost a few percent of a small layer's time).
fn batch_run(n: usize) -> usize {
    n.div_ceil(2 * rayon::current_num_threads()).max(1)
}

/// Output length along one axis; total, so that sizes of invalid shapes can be computed (and
/// reported) before validation.
fn out_len(input: usize, pad: usize, dilation: usize, k: usize, stride: usize) -> usize {
    let span = dilation * k.saturating_sub(1) + 1;
    (input + 2 * pad).checked_sub(span).map_or(0, |v| v / stride.max(1) + 1)
}

/// Validates the shape and the lengths of the buffers named in `lens` (`(what, got, expected)`).
fn check(shape: &ConvShape, lens: &[(&'static str, usize, usize)]) -> Result<()> {
    shape.validate()?;
    for &(what, got, expected) in lens {
        crate::error::check_len(what, got, expected)?;
    }
    Ok(())
}
