//! Direct depthwise convolution (one input and one output channel per group), FP32 and INT8.
//!
//! A depthwise layer does `kh * kw` multiply-accumulates per output, far too few for a GEMM per
//! channel to pay off, so its forward, input gradient and weight gradient are direct loops over
//! kernel taps and output rows, contiguous along the row when the stride is 1. The paper notes
//! that depthwise layers' gradients behave differently (Zhu et al., CVPR 2020, Sec. 3.2); here they
//! also get their own kernels.

use std::ops::{AddAssign, Mul};

use rayon::prelude::*;

use super::ConvShape;
use super::im2col::{Tap, taps};
use crate::out::Out;

/// A channel plane zero padded by the convolution's padding on every side, so that for stride 1
/// output `(oh, ow)` of tap `(i, j)` reads element `(oh + i*dh) * pw + ow + j*dw`: each tap is one
/// contiguous loop over `out_h * pw` positions (the columns past `out_w` are spare).
struct Padded {
    /// Row length of the padded plane.
    pw: usize,
    /// Offset of each tap into the padded plane, row-major over `(i, j)`.
    offsets: Vec<usize>,
    /// Positions each tap visits: `out_h * pw`, less the spare tail of the last row.
    len: usize,
}

impl Padded {
    /// The layout for a stride-1 shape, or `None` for a strided one.
    fn new(s: &ConvShape) -> Option<Self> {
        if s.stride != (1, 1) {
            return None;
        }
        let pw = s.w + 2 * s.pad.1;
        let mut offsets = Vec::with_capacity(s.kh * s.kw);
        for i in 0..s.kh {
            for j in 0..s.kw {
                offsets.push(i * s.dilation.0 * pw + j * s.dilation.1);
            }
        }
        Some(Self { pw, offsets, len: (s.out_h() - 1) * pw + s.out_w() })
    }

    /// Elements of a padded plane.
    fn plane(&self, s: &ConvShape) -> usize {
        (s.h + 2 * s.pad.0) * self.pw
    }

    /// Copies `x` (`h x w`) into the interior of `dst`, whose border stays zero.
    fn fill<T: Copy>(&self, s: &ConvShape, x: &[T], dst: &mut [T]) {
        for (r, row) in x.chunks_exact(s.w).enumerate() {
            dst[(r + s.pad.0) * self.pw + s.pad.1..][..s.w].copy_from_slice(row);
        }
    }
}

/// `acc[k] += w * x[k]` over the shorter of the two.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn axpy<T: Elem>(acc: &mut [T::Acc], w: T, x: &[T]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += T::mul(w, v);
    }
}

/// `sum over k of a[k] * b[k]` in sixteen independent partial sums, so float sums vectorise.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn dot<T: Elem>(a: &[T], b: &[T]) -> T::Acc {
    let mut acc = [T::Acc::default(); 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in ca.by_ref().zip(cb.by_ref()) {
        for l in 0..16 {
            acc[l] += T::mul(x[l], y[l]);
        }
    }
    for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
        acc[0] += T::mul(x, y);
    }
    let mut sum = T::Acc::default();
    for v in acc {
        sum += v;
    }
    sum
}

/// An element type with its accumulator and its wide accumulator across images.
pub(crate) trait Elem: Copy + Default + Send + Sync {
    /// Accumulator within one image.
    type Acc: Copy + Default + Send + Sync + AddAssign + Mul<Output = Self::Acc>;
    /// Accumulator across images (the weight gradient's batch sum).
    type Wide: Copy + Default + Send + Sync + AddAssign;
    /// Converts to the accumulator type (exactly).
    fn acc(self) -> Self::Acc;
    /// Converts an accumulator to the wide type (exactly).
    fn wide(a: Self::Acc) -> Self::Wide;
    /// The product `a * b` in the accumulator type (exactly).
    fn mul(a: Self, b: Self) -> Self::Acc;
    /// An accumulator as `f32` (exact for `f32`; rounded to nearest for `i32`).
    fn to_f32(a: Self::Acc) -> f32;
}

impl Elem for f32 {
    type Acc = f32;
    type Wide = f64;
    fn acc(self) -> f32 {
        self
    }
    fn wide(a: f32) -> f64 {
        a as f64
    }
    fn mul(a: f32, b: f32) -> f32 {
        a * b
    }
    fn to_f32(a: f32) -> f32 {
        a
    }
}

impl Elem for i8 {
    type Acc = i32;
    type Wide = i64;
    fn acc(self) -> i32 {
        self as i32
    }
    fn wide(a: i32) -> i64 {
        a as i64
    }
    fn mul(a: i8, b: i8) -> i32 {
        // |a * b| <= 127^2 < 2^15: the product is exact in i16, whose multiply is the cheap one.
        (a as i16 * b as i16) as i32
    }
    fn to_f32(a: i32) -> f32 {
        a as f32
    }
}

/// Writes one output plane, `dst` (rows of `width`), as `scale` times the accumulators: row `r`
/// comes from `src[first + r * stride..][..width]` (the accumulators may have padded rows). A
/// loop that vectorises; a per-element closure call did not, and cost more than the convolution.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn store_scaled<T: Elem>(dst: &mut [f32], width: usize, src: &[T::Acc], (first, stride): (usize, usize), scale: f32) {
    for (r, row) in dst.chunks_exact_mut(width).enumerate() {
        for (d, &a) in row.iter_mut().zip(&src[first + r * stride..][..width]) {
            *d = T::to_f32(a) * scale;
        }
    }
}

/// The first input row and column that tap `tap` reads for output row `oh`.
#[inline(always)]
fn origin(s: &ConvShape, tap: &Tap, oh: usize) -> (usize, usize) {
    let ih = ((oh * s.stride.0) as isize + tap.row_off) as usize;
    let iw0 = ((tap.cols.start * s.stride.1) as isize + tap.col_off) as usize;
    (ih, iw0)
}

/// One channel plane of the forward pass: `acc += sum over taps of w[tap] * x[...]`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward_plane<T: Elem>(s: &ConvShape, taps: &[Tap], x: &[T], w: &[T], acc: &mut [T::Acc]) {
    let (ow_n, sw) = (s.out_w(), s.stride.1);
    for (tap, &wt) in taps.iter().zip(w) {
        let wv = wt.acc();
        for oh in tap.rows.clone() {
            let (ih, iw0) = origin(s, tap, oh);
            let src = &x[ih * s.w..(ih + 1) * s.w];
            let dst = &mut acc[oh * ow_n..][tap.cols.clone()];
            if sw == 1 {
                for (d, &v) in dst.iter_mut().zip(&src[iw0..]) {
                    *d += wv * v.acc();
                }
            } else {
                for (k, d) in dst.iter_mut().enumerate() {
                    *d += wv * src[iw0 + k * sw].acc();
                }
            }
        }
    }
}

/// One channel plane of the input gradient: `acc[...] += w[tap] * dy`, scattered.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn input_grad_plane<T: Elem>(s: &ConvShape, taps: &[Tap], dy: &[T], w: &[T], acc: &mut [T::Acc]) {
    let (ow_n, sw) = (s.out_w(), s.stride.1);
    for (tap, &wt) in taps.iter().zip(w) {
        let wv = wt.acc();
        for oh in tap.rows.clone() {
            let (ih, iw0) = origin(s, tap, oh);
            let src = &dy[oh * ow_n..][tap.cols.clone()];
            let dst = &mut acc[ih * s.w..(ih + 1) * s.w];
            if sw == 1 {
                for (d, &v) in dst[iw0..].iter_mut().zip(src) {
                    *d += wv * v.acc();
                }
            } else {
                for (k, &v) in src.iter().enumerate() {
                    dst[iw0 + k * sw] += wv * v.acc();
                }
            }
        }
    }
}

/// One image's contribution to one channel's weight gradient: `wide[tap] += sum of dy * x`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn weight_grad_plane<T: Elem>(s: &ConvShape, taps: &[Tap], x: &[T], dy: &[T], wide: &mut [T::Wide]) {
    let (ow_n, sw) = (s.out_w(), s.stride.1);
    for (tap, w) in taps.iter().zip(wide.iter_mut()) {
        let mut acc = [T::Acc::default(); 16];
        for oh in tap.rows.clone() {
            let (ih, iw0) = origin(s, tap, oh);
            let g = &dy[oh * ow_n..][tap.cols.clone()];
            let src = &x[ih * s.w..(ih + 1) * s.w];
            if sw == 1 {
                // Sixteen independent partial sums, so float sums vectorise.
                for (k, (&a, &b)) in g.iter().zip(&src[iw0..]).enumerate() {
                    acc[k % 16] += a.acc() * b.acc();
                }
            } else {
                for (k, &a) in g.iter().enumerate() {
                    acc[k % 16] += a.acc() * src[iw0 + k * sw].acc();
                }
            }
        }
        let mut sum = T::Acc::default();
        for a in acc {
            sum += a;
        }
        *w += T::wide(sum);
    }
}

/// Forward: `out[n, c] = scale(c) * sum over taps of w[c, tap] * x[n, c, ...]`.
pub(crate) fn forward<T: Elem>(s: &ConvShape, x: &[T], w: &[T], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
    let (p, kk) = (s.out_plane(), s.kh * s.kw);
    if let Some(pad) = Padded::new(s) {
        // The accumulator has padded rows; only the first `out_w` columns of each are kept.
        out.par_chunks(p).zip(x.par_chunks(s.in_plane())).enumerate().for_each_init(
            || (vec![T::default(); pad.plane(s)], vec![T::Acc::default(); s.out_h() * pad.pw]),
            |(xp, acc), (nc, (out, x))| {
                let c = nc % s.c_in;
                pad.fill(s, x, xp);
                acc.fill(T::Acc::default());
                for (&off, &wt) in pad.offsets.iter().zip(&w[c * kk..(c + 1) * kk]) {
                    axpy(&mut acc[..pad.len], wt, &xp[off..]);
                }
                store_scaled::<T>(out, s.out_w(), acc, (0, pad.pw), scale(c));
            },
        );
        return;
    }
    let taps = taps(s);
    out.par_chunks(p).zip(x.par_chunks(s.in_plane())).enumerate().for_each_init(
        || vec![T::Acc::default(); p],
        |acc, (nc, (out, x))| {
            let c = nc % s.c_in;
            acc.fill(T::Acc::default());
            forward_plane(s, &taps, x, &w[c * kk..(c + 1) * kk], acc);
            store_scaled::<T>(out, s.out_w(), acc, (0, s.out_w()), scale(c));
        },
    );
}

/// Input gradient: `out[n, c] = scale * sum over taps of w[c, tap] * dy[n, c, ...] scattered`.
pub(crate) fn input_grad<T: Elem>(s: &ConvShape, w: &[T], dy: &[T], out: Out<'_>, scale: f32) {
    let (p, kk) = (s.out_plane(), s.kh * s.kw);
    if let Some(pad) = Padded::new(s) {
        // dY is laid out with padded rows whose spare columns are zero, so scattering whole runs
        // into the padded input gradient adds nothing where it spills; its interior is the result.
        out.par_chunks(s.in_plane()).zip(dy.par_chunks(p)).enumerate().for_each_init(
            || (vec![T::default(); s.out_h() * pad.pw], vec![T::Acc::default(); pad.plane(s) + pad.pw]),
            |(dyp, acc), (nc, (out, dy))| {
                let c = nc % s.c_in;
                for (drow, row) in dyp.chunks_exact_mut(pad.pw).zip(dy.chunks_exact(s.out_w())) {
                    drow[..s.out_w()].copy_from_slice(row);
                }
                acc.fill(T::Acc::default());
                for (&off, &wt) in pad.offsets.iter().zip(&w[c * kk..(c + 1) * kk]) {
                    axpy(&mut acc[off..off + pad.len], wt, &dyp[..pad.len]);
                }
                store_scaled::<T>(out, s.w, acc, (s.pad.0 * pad.pw + s.pad.1, pad.pw), scale);
            },
        );
        return;
    }
    let taps = taps(s);
    out.par_chunks(s.in_plane()).zip(dy.par_chunks(p)).enumerate().for_each_init(
        || vec![T::Acc::default(); s.in_plane()],
        |acc, (nc, (out, dy))| {
            let c = nc % s.c_in;
            acc.fill(T::Acc::default());
            input_grad_plane(s, &taps, dy, &w[c * kk..(c + 1) * kk], acc);
            store_scaled::<T>(out, s.w, acc, (0, s.w), scale);
        },
    );
}

/// Weight gradient: `out[c, tap] = finish(sum over images of (sum over pixels dy * x))`, each
/// image's sum in the accumulator type and the batch sum in the wide type.
pub(crate) fn weight_grad<T: Elem, O: Send>(
    s: &ConvShape,
    x: &[T],
    dy: &[T],
    out: &mut [O],
    finish: impl Fn(T::Wide) -> O + Sync,
) {
    let (p, kk) = (s.out_plane(), s.kh * s.kw);
    if let Some(pad) = Padded::new(s) {
        // Both operands padded: dY's spare columns are zero, so each tap is one long dot product.
        out.par_chunks_mut(kk).enumerate().for_each(|(c, out)| {
            let mut xp = vec![T::default(); pad.plane(s)];
            let mut dyp = vec![T::default(); s.out_h() * pad.pw];
            let mut wide = vec![T::Wide::default(); kk];
            for n in 0..s.n {
                pad.fill(s, &x[(n * s.c_in + c) * s.in_plane()..][..s.in_plane()], &mut xp);
                let dy = &dy[(n * s.c_in + c) * p..][..p];
                for (drow, row) in dyp.chunks_exact_mut(pad.pw).zip(dy.chunks_exact(s.out_w())) {
                    drow[..s.out_w()].copy_from_slice(row);
                }
                for (wd, &off) in wide.iter_mut().zip(&pad.offsets) {
                    *wd += T::wide(dot(&dyp[..pad.len], &xp[off..off + pad.len]));
                }
            }
            for (o, &v) in out.iter_mut().zip(&wide) {
                *o = finish(v);
            }
        });
        return;
    }
    let taps = taps(s);
    out.par_chunks_mut(kk).enumerate().for_each(|(c, out)| {
        let mut wide = vec![T::Wide::default(); kk];
        for n in 0..s.n {
            let x = &x[(n * s.c_in + c) * s.in_plane()..][..s.in_plane()];
            let dy = &dy[(n * s.c_in + c) * p..][..p];
            weight_grad_plane(s, &taps, x, dy, &mut wide);
        }
        for (o, &v) in out.iter_mut().zip(&wide) {
            *o = finish(v);
        }
    });
}
