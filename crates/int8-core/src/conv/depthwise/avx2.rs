//! The INT8 depthwise kernels for AVX2 (CPUs without AVX-512 VNNI and VBMI).
//!
//! All three work on the plane laid out by [`super::Phased`] (zero padded, split into its stride
//! phases, so every tap is a contiguous run). Forward and input gradient sum all taps of a run of
//! 16 positions in registers: codes widened to 16 bits, two taps' codes interleaved, and
//! multiplied and summed in pairs against the two taps' weights by `vpmaddwd`, so one instruction
//! does eight positions of two taps. The forward pass converts and scales each run straight into
//! the output row; the input gradient gathers (`dx[a] = sum of w[tap] * dy[a - offset(tap)]`, dY
//! behind a zero margin) into the plane's accumulators, which [`Phased`]'s store scales into dX.
//! The weight gradient is a `vpmaddwd` dot product per tap. Exact: a pair's sum is at most
//! `2 * 128^2 = 2^15` in a 32-bit lane.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::{Phased, fill_rows, planes_per_task, weight_grad_loops};
use crate::conv::ConvShape;
use crate::out::Out;

/// Whether this CPU runs these kernels.
pub(super) fn available() -> bool {
    crate::cpu::avx2()
}

/// Whether these kernels take shape `s`: kernels of at most 64 taps (32 pairs in registers).
pub(super) fn takes(s: &ConvShape) -> bool {
    s.kh * s.kw <= 2 * MAX_PAIRS
}

/// Forward: `out[n, c] = scale(c) * sum over taps of w[c, tap] * x[n, c, ...]`.
pub(super) fn forward(s: &ConvShape, x: &[i8], w: &[i8], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
    assert!(available() && takes(s), "the AVX2 depthwise kernel needs AVX2 and at most 64 taps");
    let (p, hw, kk, k, lay) = (s.out_plane(), s.in_plane(), s.kh * s.kw, planes_per_task(s), Phased::new(s));
    out.par_chunks(k * p).zip(x.par_chunks(k * hw)).enumerate().for_each_init(
        // 16 codes past the last run's start stay inside the buffer.
        || vec![0i8; lay.plane(s) + 32],
        |xp, (task, (out, x))| {
            for (j, (out, x)) in out.chunks_exact_mut(p).zip(x.chunks_exact(hw)).enumerate() {
                let c = (task * k + j) % s.c_in;
                // SAFETY: the CPU has AVX2 and the kernel at most 64 taps (asserted above); `xp`
                // is the layout's plane with slack.
                unsafe { forward_plane(s, &lay, (x, xp), &w[c * kk..][..kk], out, scale(c)) };
            }
        },
    );
}

/// Input gradient: `out[n, c] = scale(c) * sum over taps of w[c, tap] * dy[n, c, ...]`,
/// scattered.
pub(super) fn input_grad(s: &ConvShape, w: &[i8], dy: &[i8], out: Out<'_>, scale: impl Fn(usize) -> f32 + Sync) {
    assert!(available() && takes(s), "the AVX2 depthwise kernel needs AVX2 and at most 64 taps");
    let (p, hw, kk, k, lay) = (s.out_plane(), s.in_plane(), s.kh * s.kw, planes_per_task(s), Phased::new(s));
    let (plane, margin) = (lay.plane(s), lay.offsets.iter().copied().max().unwrap_or(0));
    out.par_chunks(k * hw).zip(dy.par_chunks(k * p)).enumerate().for_each_init(
        // dY in rows of `pw` behind a zero margin as long as the largest offset; the
        // accumulators with room for the last run of 16.
        || (vec![0i8; margin + plane + 32], vec![0i32; plane + 16]),
        |(dyp, acc), (task, (out, dy))| {
            for (j, (out, dy)) in out.chunks_exact_mut(hw).zip(dy.chunks_exact(p)).enumerate() {
                let c = (task * k + j) % s.c_in;
                // SAFETY: the CPU has AVX2 and the kernel at most 64 taps (asserted above); the
                // buffers are as made above.
                unsafe { input_grad_plane(s, &lay, (dy, dyp, margin), &w[c * kk..][..kk], acc, (out, scale(c))) };
            }
        },
    );
}

/// Weight gradient: the generic loops with the `vpmaddwd` dot product.
pub(super) fn weight_grad<O: Send>(
    s: &ConvShape,
    x: &[i8],
    dy: &[i8],
    out: &mut [O],
    finish: impl Fn(i64) -> O + Sync,
) {
    assert!(available(), "the AVX2 depthwise kernel needs AVX2");
    // SAFETY: the CPU has AVX2 (asserted above).
    weight_grad_loops(s, x, dy, out, finish, |a, b| unsafe { dot_i8(a, b) });
}

/// The most tap pairs a plane's kernel may have.
const MAX_PAIRS: usize = 32;

/// A pair of taps: their weights as a pair of 16-bit values in every 32-bit lane, for
/// `vpmaddwd`, and their offsets.
type Pair = (__m256i, usize, usize);

/// The pairs of taps `t` and `t + 1` of kernel `w` (weight 0 and the first's offset past the last
/// tap), in `pairs`, returning how many.
#[target_feature(enable = "avx2")]
fn pairs(lay: &Phased, w: &[i8], pairs: &mut [Pair; MAX_PAIRS]) -> usize {
    let mut n = 0;
    for ((w, o), pair) in w.chunks(2).zip(lay.offsets.chunks(2)).zip(pairs.iter_mut()) {
        let (w1, o1) = if w.len() == 2 { (w[1], o[1]) } else { (0, o[0]) };
        let both = (w[0] as i16 as u16 as u32 | (w1 as i16 as u16 as u32) << 16) as i32;
        *pair = (_mm256_set1_epi32(both), o[0], o1);
        n += 1;
    }
    n
}

/// `sum over pairs of w0 * at(o0) + w1 * at(o1)` for 16 consecutive positions, where `at(o)` is
/// the 16 codes at `base + o`, as two registers of the positions in order (0-7, 8-15).
///
/// # Safety
/// The CPU has AVX2; 16 bytes from `base + o` are readable for every offset `o` of `pairs`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn sum_pairs(pairs: &[Pair], base: *const i8, sign: isize) -> (__m256i, __m256i) {
    let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for &(wp, o0, o1) in pairs {
        // SAFETY: the caller vouches for these 16-byte reads.
        let (a, b) = unsafe {
            (
                _mm_loadu_si128(base.offset(sign * o0 as isize).cast()),
                _mm_loadu_si128(base.offset(sign * o1 as isize).cast()),
            )
        };
        let (a, b) = (_mm256_cvtepi8_epi16(a), _mm256_cvtepi8_epi16(b));
        // Per 128-bit half: positions 0-3 (8-11) of both taps interleaved, then 4-7 (12-15).
        lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_unpacklo_epi16(a, b), wp));
        hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_unpackhi_epi16(a, b), wp));
    }
    (_mm256_permute2x128_si256::<0x20>(lo, hi), _mm256_permute2x128_si256::<0x31>(lo, hi))
}

/// One forward plane: `x` laid out in `xp`, then each output row in runs of 16, summed over
/// the taps in registers, converted, scaled and stored.
///
/// # Safety
/// The CPU has AVX2; `xp` is `lay`'s plane with at least 32 bytes of slack, `x` the input plane,
/// `out` the output plane (`out_h x out_w`), `w` at most 64 taps.
#[target_feature(enable = "avx2")]
unsafe fn forward_plane(
    s: &ConvShape,
    lay: &Phased,
    (x, xp): (&[i8], &mut [i8]),
    w: &[i8],
    out: &mut [f32],
    scale: f32,
) {
    lay.fill(s, x, xp);
    let mut buf = [(_mm256_setzero_si256(), 0, 0); MAX_PAIRS];
    let n = pairs(lay, w, &mut buf);
    let pairs = &buf[..n];
    let max_off = lay.offsets.iter().copied().max().unwrap_or(0);
    let ow = lay.out_w;
    assert!(max_off + lay.len + 31 <= xp.len(), "the forward layout lacks its slack");
    let scale = _mm256_set1_ps(scale);
    for (r, row) in out.chunks_exact_mut(ow).enumerate() {
        for c0 in (0..ow).step_by(16) {
            // SAFETY: the run's reads end at `r * pw + c0 + 15 + offset`, at most 31 past the
            // last position a tap reads (asserted above).
            let (a, b) = unsafe { sum_pairs(pairs, xp.as_ptr().add(r * lay.pw + c0), 1) };
            let (a, b) = (_mm256_mul_ps(_mm256_cvtepi32_ps(a), scale), _mm256_mul_ps(_mm256_cvtepi32_ps(b), scale));
            let n = (ow - c0).min(16);
            let dst = row[c0..].as_mut_ptr();
            // SAFETY: the masks keep the stores to the `n` outputs left in the row.
            unsafe {
                _mm256_maskstore_ps(dst, lane_mask(n), a);
                _mm256_maskstore_ps(dst.wrapping_add(8), lane_mask(n.saturating_sub(8)), b);
            }
        }
    }
}

/// One input-gradient plane: `dy` copied into `dyp` after its margin, then the layout's
/// accumulators gathered, `acc[a] = sum over taps of w[tap] * dyp[margin + a - offset(tap)]`, and
/// stored into `out` times `scale`.
///
/// # Safety
/// The CPU has AVX2; `dyp` holds `margin` zeros (at least the largest offset), room for dY in
/// rows of `pw`, zeros after them and 32 bytes of slack past the plane; `acc` is the layout's
/// plane with 16 of slack; `w` at most 64 taps.
#[target_feature(enable = "avx2")]
unsafe fn input_grad_plane(
    s: &ConvShape,
    lay: &Phased,
    (dy, dyp, margin): (&[i8], &mut [i8], usize),
    w: &[i8],
    acc: &mut [i32],
    (out, scale): (&mut [f32], f32),
) {
    fill_rows(lay, dy, &mut dyp[margin..]);
    let mut buf = [(_mm256_setzero_si256(), 0, 0); MAX_PAIRS];
    let n = pairs(lay, w, &mut buf);
    let pairs = &buf[..n];
    let plane = acc.len() - 16;
    assert!(lay.offsets.iter().all(|&o| o <= margin) && margin + plane + 31 <= dyp.len(), "dY lacks its margins");
    for a in (0..plane).step_by(16) {
        // SAFETY: reads `dyp[margin + a - offset ..][..16]`, from `margin - offset >= 0` to at
        // most `margin + plane + 31` (asserted above).
        let (lo, hi) = unsafe { sum_pairs(pairs, dyp.as_ptr().add(margin + a), -1) };
        // SAFETY: `a + 16 <= plane + 16 = acc.len()`.
        unsafe {
            _mm256_storeu_si256(acc.as_mut_ptr().add(a).cast(), lo);
            _mm256_storeu_si256(acc.as_mut_ptr().add(a + 8).cast(), hi);
        }
    }
    lay.store::<i8>(s, acc, out, scale);
}

/// Lanes `0..n` of eight set (`n <= 8`), for the masked stores.
#[target_feature(enable = "avx2")]
fn lane_mask(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// `sum over k of a[k] * b[k]` for INT8 codes, over the shorter of the two: each 32-code block
/// widened to 16 bits and multiplied and summed in pairs by `vpmaddwd` into 32-bit lanes. Exact
/// for every `i8` value (a pair's sum is at most `2 * 128^2 = 2^15`), and about twice as fast as
/// the compiler's AVX2 loop (`vpmovsxbd` and `vpmulld`, eight codes at a time) on an AMD EPYC
/// with AVX2 only.
///
/// # Safety
/// The CPU has AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
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
