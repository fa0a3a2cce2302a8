//! Direct depthwise convolution (one input and one output channel per group), FP32 and INT8.
//!
//! A depthwise layer does `kh * kw` multiply-accumulates per output, far too few for a GEMM per
//! channel to pay off, so its forward, input gradient and weight gradient are direct loops, one
//! contiguous run per kernel tap over a channel plane laid out by [`Phased`]: zero padded and, for
//! a strided convolution, split into its stride phases, so that no loop reads with a stride. The
//! paper notes that depthwise layers' gradients behave differently (Zhu et al., CVPR 2020,
//! Sec. 3.2); here they also get their own kernels.
//!
//! The loops here are generic over the element type and serve FP32, and INT8 as the portable
//! reference path. INT8 runs instruction-set kernels where the CPU has them ([`Kernel`], chosen
//! at run time): [`avx512`] (VNNI: four taps per `vpdpbusd`, the sums kept in registers from the
//! first tap to the scaled f32 store) and [`avx2`] (`vpmaddwd` over pairs of taps). All three
//! paths give the same exact integer sums, so the same outputs bit for bit.

use std::ops::{AddAssign, Mul};

use rayon::prelude::*;

use super::ConvShape;
use super::stride2::gather_strided;
use crate::out::Out;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(test)]
mod tests;
mod windows;

/// The instruction set the INT8 depthwise kernels run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX-512 F, BW, VNNI and VBMI ([`avx512`]).
    Avx512Vnni,
    /// AVX2 ([`avx2`]).
    Avx2,
    /// The generic loops, on any CPU.
    Portable,
}

impl Kernel {
    /// Every kernel, fastest first.
    const ALL: [Kernel; 3] = [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Portable];

    /// Whether this CPU runs the kernel.
    fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => avx512::available(),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => avx2::available(),
            Kernel::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The kernels this CPU runs, fastest first.
    pub(crate) fn available() -> Vec<Kernel> {
        Self::ALL.into_iter().filter(|k| k.is_available()).collect()
    }

    /// The fastest kernel this CPU runs (detected once).
    pub(crate) fn detect() -> Kernel {
        static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Self::available()[0])
    }
}

/// A channel plane split into its `sh x sw` stride phases (the pixels `(rh + sh * u, rw + sw * v)`
/// of the zero-padded plane, for `rh < sh`, `rw < sw`), each phase its own zero-bordered plane of
/// `rows x pw`, one after the other. Output `(oh, ow)` of tap `(i, j)` reads phase
/// `(i*dh mod sh, j*dw mod sw)` at `(oh + i*dh / sh, ow + j*dw / sw)`, so each tap, at any stride,
/// is one contiguous loop over `out_h * pw` positions (the columns past `out_w` are spare). At
/// stride 1 there is one phase, the padded plane itself.
struct Phased {
    /// Row length of each phase plane.
    pw: usize,
    /// Rows of each phase plane.
    rows: usize,
    /// Offset of each tap into the phase planes, row-major over `(i, j)`.
    offsets: Vec<usize>,
    /// Positions each tap visits: `out_h * pw`, less the spare tail of the last row.
    len: usize,
    /// The output's row length (`s.out_w()`, kept here: the plane kernels use it per row).
    out_w: usize,
    /// For each input row, where its phase row starts.
    row_starts: Vec<usize>,
    /// For each of the first `sw` input columns: where its column class starts in a phase row's
    /// phase set (phase offset plus column), and that column.
    col_starts: Vec<(usize, usize)>,
}

impl Phased {
    /// The layout for shape `s`.
    fn new(s: &ConvShape) -> Self {
        let ((sh, sw), (dh, dw), (ph, pw_)) = (s.stride, s.dilation, s.pad);
        // Each phase holds every input pixel of its class (the fill writes them all) and every
        // position a valid output reads.
        let pw = (s.out_w() + (s.kw - 1) * dw / sw).max((s.w + pw_).div_ceil(sw));
        let rows = (s.out_h() + (s.kh - 1) * dh / sh).max((s.h + ph).div_ceil(sh));
        let mut offsets = Vec::with_capacity(s.kh * s.kw);
        for i in 0..s.kh {
            for j in 0..s.kw {
                let (r, c) = (i * dh, j * dw);
                offsets.push(((r % sh) * sw + c % sw) * rows * pw + (r / sh) * pw + c / sw);
            }
        }
        // The positions of the input's pixels, worked out once: a division per row cost more
        // than copying the row.
        let phase = rows * pw;
        let row_starts = (0..s.h).map(|r| ((r + ph) % sh) * sw * phase + (r + ph) / sh * pw).collect();
        let col_starts =
            (0..sw.min(s.w)).map(|c0| (((c0 + pw_) % sw) * phase + (c0 + pw_) / sw, (c0 + pw_) / sw)).collect();
        Self { pw, rows, offsets, len: (s.out_h() - 1) * pw + s.out_w(), out_w: s.out_w(), row_starts, col_starts }
    }

    /// Elements of all the phase planes together.
    fn plane(&self, s: &ConvShape) -> usize {
        s.stride.0 * s.stride.1 * self.rows * self.pw
    }

    /// Copies `x` (`h x w`) into the interiors of the phase planes in `dst`, whose borders stay
    /// zero (every call writes the same positions).
    #[inline(always)]
    fn fill<T: Copy>(&self, s: &ConvShape, x: &[T], dst: &mut [T]) {
        let sw = s.stride.1;
        for (row, &start) in x.chunks_exact(s.w).zip(&self.row_starts) {
            for (c0, &(col, v0)) in self.col_starts.iter().enumerate() {
                // The phase row from the column of `c0` to its end.
                let d = &mut dst[start + col..start + col - v0 + self.pw];
                if sw == 1 {
                    copy_row(d, row);
                } else if s.w >= 32 {
                    gather_strided(&row[c0..], d, sw);
                } else {
                    // A call per short row costs more than its few moves.
                    for (d, &v) in d.iter_mut().zip(row[c0..].iter().step_by(sw)) {
                        *d = v;
                    }
                }
            }
        }
    }

    /// Writes one input-gradient plane `dst` (`h x w`) as `scale` times the accumulators of the
    /// padded-plane pixels, which `acc` holds in this layout.
    #[inline(always)]
    fn store<T: Elem>(&self, s: &ConvShape, acc: &[T::Acc], dst: &mut [f32], scale: f32) {
        if s.stride == (1, 1) {
            return store_scaled::<T>(dst, s.w, acc, (s.pad.0 * self.pw + s.pad.1, self.pw), scale);
        }
        let sw = s.stride.1;
        for (row, &start) in dst.chunks_exact_mut(s.w).zip(&self.row_starts) {
            for (c0, &(col, _)) in self.col_starts.iter().enumerate() {
                store_strided::<T>(&mut row[c0..], sw, &acc[start + col..], scale);
            }
        }
    }
}

/// `dst[..src.len()] = src`, for the short rows of a channel plane (4 to 32 values in
/// MobileNetV2 on CIFAR): in blocks of fixed length, which compile to register moves, the last
/// block overlapping the one before it. `copy_from_slice` calls `memmove`, and in `perf` that call
/// was a third of the depthwise weight gradient's samples.
#[inline(always)]
fn copy_row<T: Copy>(dst: &mut [T], src: &[T]) {
    #[inline(always)]
    fn blocks<T: Copy, const B: usize>(dst: &mut [T], src: &[T]) {
        let n = src.len();
        let mut i = 0;
        loop {
            // The last block ends at `n`, overlapping the one before where `n` is not a multiple.
            let at = i.min(n - B);
            let block: [T; B] = src[at..at + B].try_into().expect("a block of B values");
            dst[at..at + B].copy_from_slice(&block);
            if at + B == n {
                break;
            }
            i += B;
        }
    }
    let n = src.len();
    match n {
        16.. => blocks::<T, 16>(dst, src),
        4..16 => blocks::<T, 4>(dst, src),
        _ => {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = v;
            }
        }
    }
}

/// `dst[k * stride] = scale * src[k]` for every `k` inside both.
#[inline(always)]
fn store_strided<T: Elem>(dst: &mut [f32], stride: usize, src: &[T::Acc], scale: f32) {
    for (d, &a) in dst.iter_mut().step_by(stride).zip(src) {
        *d = T::to_f32(a) * scale;
    }
}

/// `acc[k] += w * x[k]` over the shorter of the two.
#[inline(always)]
fn axpy<T: Elem>(acc: &mut [T::Acc], w: T, x: &[T]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += T::mul(w, v);
    }
}

/// `sum over k of a[k] * b[k]` in sixteen independent partial sums, so float sums vectorise.
#[inline(always)]
fn dot_lanes<T: Elem>(a: &[T], b: &[T]) -> T::Acc {
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
    /// Converts an accumulator to the wide type (exactly).
    fn wide(a: Self::Acc) -> Self::Wide;
    /// The product `a * b` in the accumulator type (exactly).
    fn mul(a: Self, b: Self) -> Self::Acc;
    /// An accumulator as `f32` (exact for `f32`; rounded to nearest for `i32`).
    fn to_f32(a: Self::Acc) -> f32;
    /// `sum over k of a[k] * b[k]`, over the shorter of the two.
    #[inline(always)]
    fn dot(a: &[Self], b: &[Self]) -> Self::Acc {
        dot_lanes(a, b)
    }
    /// [`forward`] for this type: the generic loops unless the type has kernels of its own.
    fn forward(s: &ConvShape, x: &[Self], w: &[Self], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
        forward_loops(s, x, w, out, scale);
    }
    /// [`input_grad`] for this type.
    fn input_grad(s: &ConvShape, w: &[Self], dy: &[Self], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
        input_grad_loops(s, w, dy, out, scale);
    }
    /// [`weight_grad`] for this type.
    fn weight_grad<O: Send>(
        s: &ConvShape,
        x: &[Self],
        dy: &[Self],
        out: &mut [O],
        finish: impl Fn(Self::Wide) -> O + Sync,
    ) {
        weight_grad_loops(s, x, dy, out, finish, Self::dot);
    }
}

impl Elem for f32 {
    type Acc = f32;
    type Wide = f64;
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
    fn forward(s: &ConvShape, x: &[i8], w: &[i8], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
        forward_i8(Kernel::detect(), s, x, w, out, scale);
    }
    fn input_grad(s: &ConvShape, w: &[i8], dy: &[i8], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
        input_grad_i8(Kernel::detect(), s, w, dy, out, scale);
    }
    fn weight_grad<O: Send>(s: &ConvShape, x: &[i8], dy: &[i8], out: &mut [O], finish: impl Fn(i64) -> O + Sync) {
        weight_grad_i8(Kernel::detect(), s, x, dy, out, finish);
    }
}

/// The INT8 forward pass on `kernel` (which this CPU must run), or on the next kernel down where
/// it does not take the shape (AVX-512's windows or AVX2's registers too small for it); returns
/// the kernel that ran.
pub(crate) fn forward_i8(
    kernel: Kernel,
    s: &ConvShape,
    x: &[i8],
    w: &[i8],
    out: Out<'_>,
    scale: impl Fn(usize) -> f32 + Sync,
) -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Vnni
        && let Some(plan) = windows::WindowPlan::new(s, windows::Product::Forward)
    {
        avx512::forward(&plan, s, x, w, out, scale);
        return Kernel::Avx512Vnni;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable && avx2::takes(s) {
        avx2::forward(s, x, w, out, scale);
        return Kernel::Avx2;
    }
    forward_loops(s, x, w, out, scale);
    Kernel::Portable
}

/// The INT8 input gradient on `kernel`, as [`forward_i8`].
pub(crate) fn input_grad_i8(
    kernel: Kernel,
    s: &ConvShape,
    w: &[i8],
    dy: &[i8],
    out: Out<'_>,
    scale: impl Fn(usize) -> f32 + Sync,
) -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Vnni
        && let Some(plan) = windows::WindowPlan::new(s, windows::Product::InputGrad)
    {
        avx512::input_grad(&plan, s, w, dy, out, scale);
        return Kernel::Avx512Vnni;
    }
    #[cfg(target_arch = "x86_64")]
    if kernel != Kernel::Portable && avx2::takes(s) {
        avx2::input_grad(s, w, dy, out, scale);
        return Kernel::Avx2;
    }
    input_grad_loops(s, w, dy, out, scale);
    Kernel::Portable
}

/// The INT8 weight gradient on `kernel` (every kernel takes every shape); returns it.
pub(crate) fn weight_grad_i8<O: Send>(
    kernel: Kernel,
    s: &ConvShape,
    x: &[i8],
    dy: &[i8],
    out: &mut [O],
    finish: impl Fn(i64) -> O + Sync,
) -> Kernel {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => avx512::weight_grad(s, x, dy, out, finish, &avx512::Layout::choose(s)),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => avx2::weight_grad(s, x, dy, out, finish),
        _ => weight_grad_loops(s, x, dy, out, finish, dot_lanes::<i8>),
    }
    kernel
}

/// Writes one output plane, `dst` (rows of `width`), as `scale` times the accumulators: row `r`
/// comes from `src[first + r * stride..][..width]` (the accumulators may have padded rows). A
/// loop that vectorises; a per-element closure call did not, and cost more than the convolution.
#[inline(always)]
fn store_scaled<T: Elem>(dst: &mut [f32], width: usize, src: &[T::Acc], (first, stride): (usize, usize), scale: f32) {
    for (r, row) in dst.chunks_exact_mut(width).enumerate() {
        for (d, &a) in row.iter_mut().zip(&src[first + r * stride..][..width]) {
            *d = T::to_f32(a) * scale;
        }
    }
}

/// Copies `dy` (`out_h x out_w`) into `dyp`, rows of `lay.pw` whose spare columns stay zero.
#[inline(always)]
fn fill_rows<T: Copy>(lay: &Phased, dy: &[T], dyp: &mut [T]) {
    for (drow, row) in dyp.chunks_exact_mut(lay.pw).zip(dy.chunks_exact(lay.out_w)) {
        copy_row(drow, row);
    }
}

/// Planes per parallel task of the INT8 kernels: about 2048 outputs, so that the 4x4 and 8x8
/// planes of MobileNetV2 do not each pay for a task and for zeroing their few outputs.
fn planes_per_task(s: &ConvShape) -> usize {
    (2048 / s.out_plane().max(s.in_plane())).max(1)
}

/// Buffers of one channel plane's work: the input in the layout and the accumulators (or, for
/// the weight gradient, dY in rows of `pw`).
type Scratch<T, A> = (Vec<T>, Vec<A>);

/// One channel plane of the forward pass: `out = scale * sum over taps of w[tap] * x[...]`. One
/// function per plane, so that the instruction-set dispatch happens once per plane and the loops
/// inside are inlined: on the 4x4 and 8x8 planes of MobileNetV2 a dispatched call per tap cost
/// more than its work.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn forward_plane<T: Elem>(
    s: &ConvShape,
    lay: &Phased,
    (xp, acc): &mut Scratch<T, T::Acc>,
    x: &[T],
    w: &[T],
    out: &mut [f32],
    scale: f32,
) {
    lay.fill(s, x, xp);
    acc.fill(T::Acc::default());
    for (&off, &wt) in lay.offsets.iter().zip(w) {
        axpy(&mut acc[..lay.len], wt, &xp[off..]);
    }
    store_scaled::<T>(out, lay.out_w, acc, (0, lay.pw), scale);
}

/// One channel plane of the input gradient: `out = scale * sum over taps of w[tap] * dy`,
/// scattered. dY is laid out in rows of `pw` whose spare columns are zero, so scattering whole
/// runs into the phase planes adds nothing where it spills; their interiors are the result.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn input_grad_plane<T: Elem>(
    s: &ConvShape,
    lay: &Phased,
    (dyp, acc): &mut Scratch<T, T::Acc>,
    dy: &[T],
    w: &[T],
    out: &mut [f32],
    scale: f32,
) {
    fill_rows(lay, dy, dyp);
    acc.fill(T::Acc::default());
    for (&off, &wt) in lay.offsets.iter().zip(w) {
        axpy(&mut acc[off..off + lay.len], wt, &dyp[..lay.len]);
    }
    lay.store::<T>(s, acc, out, scale);
}

/// One image's contribution to one channel's weight gradient: `wide[tap] += sum of dy * x`. Both
/// operands are in the layout and dY's spare columns are zero, so each tap is one dot product.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn weight_grad_plane<T: Elem, D: Fn(&[T], &[T]) -> T::Acc>(
    s: &ConvShape,
    lay: &Phased,
    (xp, dyp): &mut Scratch<T, T>,
    (x, dy): (&[T], &[T]),
    wide: &mut [T::Wide],
    dot: &D,
) {
    lay.fill(s, x, xp);
    fill_rows(lay, dy, dyp);
    for (wd, &off) in wide.iter_mut().zip(&lay.offsets) {
        *wd += T::wide(dot(&dyp[..lay.len], &xp[off..off + lay.len]));
    }
}

/// Forward: `out[n, c] = scale(c) * sum over taps of w[c, tap] * x[n, c, ...]`.
pub(crate) fn forward<T: Elem>(s: &ConvShape, x: &[T], w: &[T], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
    T::forward(s, x, w, out, scale);
}

/// Input gradient: `out[n, c] = scale(c) * sum over taps of w[c, tap] * dy[n, c, ...] scattered`.
pub(crate) fn input_grad<T: Elem>(s: &ConvShape, w: &[T], dy: &[T], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
    T::input_grad(s, w, dy, out, scale);
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
    T::weight_grad(s, x, dy, out, finish);
}

/// [`forward`] by the generic loops.
fn forward_loops<T: Elem>(s: &ConvShape, x: &[T], w: &[T], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
    let (p, kk, lay) = (s.out_plane(), s.kh * s.kw, Phased::new(s));
    // The accumulator has rows of `pw`; only the first `out_w` columns of each are kept.
    out.par_chunks(p).zip(x.par_chunks(s.in_plane())).enumerate().for_each_init(
        || (vec![T::default(); lay.plane(s)], vec![T::Acc::default(); s.out_h() * lay.pw]),
        |scratch, (nc, (out, x))| {
            let c = nc % s.c_in;
            forward_plane(s, &lay, scratch, x, &w[c * kk..(c + 1) * kk], out, scale(c));
        },
    );
}

/// [`input_grad`] by the generic loops.
fn input_grad_loops<T: Elem>(s: &ConvShape, w: &[T], dy: &[T], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
    let (p, kk, lay) = (s.out_plane(), s.kh * s.kw, Phased::new(s));
    out.par_chunks(s.in_plane()).zip(dy.par_chunks(p)).enumerate().for_each_init(
        || (vec![T::default(); s.out_h() * lay.pw], vec![T::Acc::default(); lay.plane(s)]),
        |scratch, (nc, (out, dy))| {
            let c = nc % s.c_in;
            input_grad_plane(s, &lay, scratch, dy, &w[c * kk..(c + 1) * kk], out, scale(c));
        },
    );
}

/// [`weight_grad`] by the generic loops, each image's sums by `dot`.
fn weight_grad_loops<T: Elem, O: Send>(
    s: &ConvShape,
    x: &[T],
    dy: &[T],
    out: &mut [O],
    finish: impl Fn(T::Wide) -> O + Sync,
    dot: impl Fn(&[T], &[T]) -> T::Acc + Sync,
) {
    let (p, kk, lay) = (s.out_plane(), s.kh * s.kw, Phased::new(s));
    out.par_chunks_mut(kk).enumerate().for_each(|(c, out)| {
        let mut scratch = (vec![T::default(); lay.plane(s)], vec![T::default(); s.out_h() * lay.pw]);
        let mut wide = vec![T::Wide::default(); kk];
        for n in 0..s.n {
            let (x, dy) = (&x[(n * s.c_in + c) * s.in_plane()..][..s.in_plane()], &dy[(n * s.c_in + c) * p..][..p]);
            weight_grad_plane(s, &lay, &mut scratch, (x, dy), &mut wide, &dot);
        }
        for (o, &v) in out.iter_mut().zip(&wide) {
            *o = finish(v);
        }
    });
}
