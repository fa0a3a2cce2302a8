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
    let (oh, ow, (sh, sw)) = (s.out_h(), s.out_w(), s.stride);
    let mut out = vec![T::default(); s.n * s.c_in * oh * ow];
    out.par_chunks_mut(oh * ow).zip(x.par_chunks(s.in_plane())).for_each(|(dst, plane)| {
        for (i, dst) in dst.chunks_exact_mut(ow).enumerate() {
            stride2::gather_strided(&plane[i * sh * s.w..][..s.w], dst, sw);
        }
    });
    out
}

/// The per-tensor INT8 codes of [`subsample`]`(s, x)` at their own largest magnitude, exactly
/// `quantize(name, &subsample(s, x), PerTensor, 1, Nearest)`, with one pass fewer: the gathering
/// pass finds the largest magnitude of each plane it writes (while the plane is in L1), so that
/// the codes need only the quantizing pass. An error names `name` where a pixel read is not finite.
pub fn quantize_subsample(name: &str, s: &ConvShape, x: &[f32]) -> Result<crate::quant::QTensor> {
    use std::mem::MaybeUninit;

    use crate::quant::{Granularity, Rounding, max_abs_finite, quantize, quantize_with_clip};
    use rayon::prelude::*;
    crate::error::check_len("strided 1x1 input", x.len(), s.x_len())?;
    let (oh, ow, (sh, sw)) = (s.out_h(), s.out_w(), s.stride);
    let (plane, n) = (oh * ow, s.n * s.c_in * oh * ow);
    let mut sub = Vec::<f32>::with_capacity(n);
    let (clip, finite) = sub.spare_capacity_mut()[..n]
        .par_chunks_mut(plane)
        .zip(x.par_chunks(s.in_plane()))
        .map(|(dst, src)| {
            // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and initialised values are valid
            // `MaybeUninit` values; the gather only copies.
            let src: &[MaybeUninit<f32>] = unsafe { std::slice::from_raw_parts(src.as_ptr().cast(), src.len()) };
            for (i, row) in dst.chunks_exact_mut(ow).enumerate() {
                let written = stride2::gather_strided(&src[i * sh * s.w..][..s.w], row, sw);
                assert_eq!(written, ow, "quantize_subsample: a row of the subsample was not filled");
            }
            // SAFETY: the rows above wrote all of `dst` (`oh` rows of `ow` pixels, each checked).
            max_abs_finite(unsafe { &*(dst as *const [MaybeUninit<f32>] as *const [f32]) })
        })
        .reduce(|| (0.0, true), |a, b| (a.0.max(b.0), a.1 && b.1));
    // SAFETY: every plane's chunk was written above, and the chunks cover the first `n` values.
    unsafe { sub.set_len(n) };
    if finite {
        quantize_with_clip(name, &sub, clip, Rounding::Nearest)
    } else {
        // `quantize`'s error, which names the first value that is not finite.
        quantize(name, &sub, Granularity::PerTensor, 1, Rounding::Nearest)
    }
}

/// The inverse placement of [`subsample`] for gradients: `dx` (`n x c_in x h x w`) gets `sub` at
/// the pixels the convolution read and zero everywhere else.
pub fn upsample<'x>(s: &ConvShape, sub: &[f32], dx: impl Into<crate::out::Out<'x>>) {
    use rayon::prelude::*;
    let (oh, ow, (sh, sw)) = (s.out_h(), s.out_w(), s.stride);
    // Each plane comes zeroed from `par_chunks`.
    dx.into().par_chunks(s.in_plane()).zip(sub.par_chunks(oh * ow)).for_each(|(plane, src)| {
        for (i, src) in src.chunks_exact(ow).enumerate() {
            stride2::scatter_strided(src, &mut plane[i * sh * s.w..][..s.w], sw);
        }
    });
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
