//! Direct depthwise convolution (one input and one output channel per group), FP32 and INT8.
//!
//! A depthwise layer does `kh * kw` multiply-accumulates per output, far too few for a GEMM per
//! channel to pay off, so its forward, input gradient and weight gradient are direct loops, one
//! contiguous run per kernel tap over a channel plane laid out by [`Phased`]: zero padded and, for
//! a strided convolution, split into its stride phases, so that no loop reads with a stride. The
//! paper notes that depthwise layers' gradients behave differently (Zhu et al., CVPR 2020,
//! Sec. 3.2); here they also get their own kernels.

use std::ops::{AddAssign, Mul};

use rayon::prelude::*;

use super::ConvShape;
use super::stride2::gather_strided;
use crate::out::Out;

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

/// `sum over k of a[k] * b[k]` for INT8 codes, over the shorter of the two, with AVX2: each
/// 32-code block is widened to 16 bits and multiplied and summed in pairs by `vpmaddwd` into
/// 32-bit lanes. Exact for every `i8` value (a pair's sum is at most `2 * 128^2 = 2^15`), and
/// about twice as fast as the compiler's AVX2 loop (`vpmovsxbd` and `vpmulld`, eight codes at a
/// time) on an AMD EPYC with AVX2 only.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_avx2(a: &[i8], b: &[i8]) -> i32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (mut acc0, mut acc1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut k = 0;
    while k + 32 <= n {
        // SAFETY: `k + 32 <= n`, so the 32 bytes from `k` lie inside both slices.
        let (a0, a1, b0, b1) = unsafe {
            let (pa, pb) = (a.as_ptr().add(k), b.as_ptr().add(k));
            (
                _mm_loadu_si128(pa.cast()),
                _mm_loadu_si128(pa.add(16).cast()),
                _mm_loadu_si128(pb.cast()),
                _mm_loadu_si128(pb.add(16).cast()),
            )
        };
        let p0 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(a0), _mm256_cvtepi8_epi16(b0));
        let p1 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(a1), _mm256_cvtepi8_epi16(b1));
        acc0 = _mm256_add_epi32(acc0, p0);
        acc1 = _mm256_add_epi32(acc1, p1);
        k += 32;
    }
    let mut lanes = [0i32; 8];
    // SAFETY: `lanes` holds the 32 bytes stored.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), _mm256_add_epi32(acc0, acc1)) };
    let tail: i32 = a[k..n].iter().zip(&b[k..n]).map(|(&x, &y)| x as i32 * y as i32).sum();
    lanes.iter().sum::<i32>() + tail
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
    #[inline(always)]
    fn dot(a: &[i8], b: &[i8]) -> i32 {
        // Measured faster on a CPU with AVX2 only; where AVX-512 BW is there, the compiler's loop
        // runs 512 bits wide and this has not been measured against it, so it stays.
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && !is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX2 (checked above).
            return unsafe { dot_i8_avx2(a, b) };
        }
        dot_lanes(a, b)
    }
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
fn weight_grad_plane<T: Elem>(
    s: &ConvShape,
    lay: &Phased,
    (xp, dyp): &mut Scratch<T, T>,
    x: &[T],
    dy: &[T],
    wide: &mut [T::Wide],
) {
    lay.fill(s, x, xp);
    fill_rows(lay, dy, dyp);
    for (wd, &off) in wide.iter_mut().zip(&lay.offsets) {
        *wd += T::wide(T::dot(&dyp[..lay.len], &xp[off..off + lay.len]));
    }
}

/// Forward: `out[n, c] = scale(c) * sum over taps of w[c, tap] * x[n, c, ...]`.
pub(crate) fn forward<T: Elem>(s: &ConvShape, x: &[T], w: &[T], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
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

/// Input gradient: `out[n, c] = scale(c) * sum over taps of w[c, tap] * dy[n, c, ...] scattered`.
pub(crate) fn input_grad<T: Elem>(s: &ConvShape, w: &[T], dy: &[T], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
    let (p, kk, lay) = (s.out_plane(), s.kh * s.kw, Phased::new(s));
    out.par_chunks(s.in_plane()).zip(dy.par_chunks(p)).enumerate().for_each_init(
        || (vec![T::default(); s.out_h() * lay.pw], vec![T::Acc::default(); lay.plane(s)]),
        |scratch, (nc, (out, dy))| {
            let c = nc % s.c_in;
            input_grad_plane(s, &lay, scratch, dy, &w[c * kk..(c + 1) * kk], out, scale(c));
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
    let (p, kk, lay) = (s.out_plane(), s.kh * s.kw, Phased::new(s));
    out.par_chunks_mut(kk).enumerate().for_each(|(c, out)| {
        let mut scratch = (vec![T::default(); lay.plane(s)], vec![T::default(); s.out_h() * lay.pw]);
        let mut wide = vec![T::Wide::default(); kk];
        for n in 0..s.n {
            let (x, dy) = (&x[(n * s.c_in + c) * s.in_plane()..][..s.in_plane()], &dy[(n * s.c_in + c) * p..][..p]);
            weight_grad_plane(s, &lay, &mut scratch, x, dy, &mut wide);
        }
        for (o, &v) in out.iter_mut().zip(&wide) {
            *o = finish(v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row copies of every length up to 70, into a longer row whose tail must stay untouched.
    #[test]
    fn row_copies_write_exactly_the_row() {
        for n in 0..=70usize {
            let src: Vec<i32> = (0..n as i32).map(|v| v * 7 + 1).collect();
            let mut dst = vec![-1i32; n + 5];
            copy_row(&mut dst, &src);
            assert_eq!(&dst[..n], &src[..], "length {n}");
            assert!(dst[n..].iter().all(|&v| v == -1), "length {n} wrote past the row");
        }
    }

    /// The INT8 dot product (the portable loop, and the AVX2 kernel where the CPU has AVX2)
    /// equals the naive `i64` sum at every length up to 100 (whole 32-code blocks and tails), for
    /// random codes and for the extremes -128 and 127, whose products are the largest.
    #[test]
    fn int8_dot_is_exact_at_every_length() {
        let rng = crate::rng::CounterRng::new(7);
        let random: Vec<i8> = (0..200).map(|i| rng.bits(i) as u8 as i8).collect();
        let lows = [-128i8; 100];
        let highs = [127i8; 100];
        for n in 0..=100 {
            for (a, b) in [(&random[..n], &random[100..100 + n]), (&lows[..n], &lows[..n]), (&lows[..n], &highs[..n])] {
                let want: i64 = a.iter().zip(b).map(|(&x, &y)| x as i64 * y as i64).sum();
                assert_eq!(<i8 as Elem>::dot(a, b) as i64, want, "length {n}");
                assert_eq!(dot_lanes(a, b) as i64, want, "length {n}, portable loop");
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked above).
                    assert_eq!(unsafe { dot_i8_avx2(a, b) } as i64, want, "length {n}, AVX2");
                }
            }
        }
        // The shorter operand sets the length.
        assert_eq!(<i8 as Elem>::dot(&highs[..40], &highs[..33]), 33 * 127 * 127);
    }
}
