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
}

/// Calls `f(oh, ih, cols, first_input_col)` for every output row that tap `tap` reads.
#[inline(always)]
fn rows(s: &ConvShape, tap: &Tap, mut f: impl FnMut(usize, usize, std::ops::Range<usize>, usize)) {
    for oh in tap.rows.clone() {
        let ih = ((oh * s.stride.0) as isize + tap.row_off) as usize;
        let iw0 = ((tap.cols.start * s.stride.1) as isize + tap.col_off) as usize;
        f(oh, ih, tap.cols.clone(), iw0);
    }
}

/// Forward: `out[n, c] = finish(c, sum over taps of w[c, tap] * x[n, c, ...])`.
pub(crate) fn forward<T: Elem, O: Send>(
    s: &ConvShape,
    x: &[T],
    w: &[T],
    out: &mut [O],
    finish: impl Fn(usize, T::Acc) -> O + Sync,
) {
    let taps = taps(s);
    let (p, ow_n, sw, kk) = (s.out_plane(), s.out_w(), s.stride.1, s.kh * s.kw);
    out.par_chunks_mut(p).zip(x.par_chunks(s.in_plane())).enumerate().for_each_init(
        || vec![T::Acc::default(); p],
        |acc, (nc, (out, x))| {
            let c = nc % s.c_in;
            acc.fill(T::Acc::default());
            for (t, tap) in taps.iter().enumerate() {
                let wv = w[c * kk + t].acc();
                rows(s, tap, |oh, ih, cols, iw0| {
                    let src = &x[ih * s.w..(ih + 1) * s.w];
                    let dst = &mut acc[oh * ow_n..][cols];
                    if sw == 1 {
                        for (d, &v) in dst.iter_mut().zip(&src[iw0..]) {
                            *d += wv * v.acc();
                        }
                    } else {
                        for (k, d) in dst.iter_mut().enumerate() {
                            *d += wv * src[iw0 + k * sw].acc();
                        }
                    }
                });
            }
            for (o, &a) in out.iter_mut().zip(acc.iter()) {
                *o = finish(c, a);
            }
        },
    );
}

/// Input gradient: `out[n, c] = finish(sum over taps of w[c, tap] * dy[n, c, ...] scattered)`.
pub(crate) fn input_grad<T: Elem, O: Send>(
    s: &ConvShape,
    w: &[T],
    dy: &[T],
    out: &mut [O],
    finish: impl Fn(T::Acc) -> O + Sync,
) {
    let taps = taps(s);
    let (p, ow_n, sw, kk) = (s.out_plane(), s.out_w(), s.stride.1, s.kh * s.kw);
    out.par_chunks_mut(s.in_plane()).zip(dy.par_chunks(p)).enumerate().for_each_init(
        || vec![T::Acc::default(); s.in_plane()],
        |acc, (nc, (out, dy))| {
            let c = nc % s.c_in;
            acc.fill(T::Acc::default());
            for (t, tap) in taps.iter().enumerate() {
                let wv = w[c * kk + t].acc();
                rows(s, tap, |oh, ih, cols, iw0| {
                    let src = &dy[oh * ow_n..][cols];
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
                });
            }
            for (o, &a) in out.iter_mut().zip(acc.iter()) {
                *o = finish(a);
            }
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
    let taps = taps(s);
    let (p, ow_n, sw, kk) = (s.out_plane(), s.out_w(), s.stride.1, s.kh * s.kw);
    out.par_chunks_mut(kk).enumerate().for_each(|(c, out)| {
        let mut wide = vec![T::Wide::default(); kk];
        for n in 0..s.n {
            let x = &x[(n * s.c_in + c) * s.in_plane()..][..s.in_plane()];
            let dy = &dy[(n * s.c_in + c) * p..][..p];
            for (t, tap) in taps.iter().enumerate() {
                let mut acc = T::Acc::default();
                rows(s, tap, |oh, ih, cols, iw0| {
                    let g = &dy[oh * ow_n..][cols];
                    let src = &x[ih * s.w..(ih + 1) * s.w];
                    if sw == 1 {
                        for (&a, &b) in g.iter().zip(&src[iw0..]) {
                            acc += a.acc() * b.acc();
                        }
                    } else {
                        for (k, &a) in g.iter().enumerate() {
                            acc += a.acc() * src[iw0 + k * sw].acc();
                        }
                    }
                });
                wide[t] += T::wide(acc);
            }
        }
        for (o, &v) in out.iter_mut().zip(&wide) {
            *o = finish(v);
        }
    });
}
