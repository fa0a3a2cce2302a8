//! The INT8 depthwise kernels for AVX-512 with VNNI and VBMI (Ice Lake, Sapphire Rapids, Zen 4).
//!
//! Forward and input gradient: each block of 16 outputs loads the window of codes it reads (two
//! masked 64-byte loads, offset by 128 into the unsigned operand of `vpdpbusd`), gathers each
//! group of four taps' codes into place with one `vpermi2b`, and sums them against the channel's
//! weights with one `vpdpbusd` per group: three for a 3x3 kernel. The 16 sums stay in one
//! register from the first tap to the store, which converts them to f32 and applies the scale, so
//! the pass reads the codes from memory once and writes each output once ([`super::windows`] has
//! the plan).
//!
//! Weight gradient: per channel and block of up to 64 positions of dY (bytes of one register),
//! the window of input codes the block reads is loaded once, and for each tap one `vpermi2b`
//! lays out the code that tap multiplies at each position, one `vpdpbusd` adding the products
//! into an accumulator per tap that stays in a register over a run of images ([`TapPlan`]).
//! Shapes whose windows do not fit lay each plane out in its stride phases instead
//! ([`super::Phased`], codes offset by 128, padding code 0, next to dY in rows of the same length
//! with zero spare columns), where each tap is one dot product of two contiguous runs. The offset
//! adds `128 * sum of dY` to every tap, subtracted at the end.
//!
//! Every sum is exact: a lane adds four products of at most `255 * 128` per instruction, and the
//! weight gradient moves its lanes into `i64` before they could overflow.

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::windows::{TapPlan, WindowPlan, low_bits};
use super::{Phased, planes_per_task};
use crate::conv::ConvShape;
use crate::out::Out;

/// Whether this CPU runs these kernels.
pub(super) fn available() -> bool {
    crate::cpu::allows(crate::cpu::Level::Avx512)
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vbmi")
}

/// The code offset: `code ^ 0x80 = code + 128` for every `i8`, the unsigned byte `vpdpbusd`
/// takes, and the byte of code 0.
const OFFSET: i8 = 0x80u8 as i8;

/// Forward: `out[n, c] = scale(c) * sum over taps of w[c, tap] * x[n, c, ...]`, by `plan` (the
/// forward plan of `s`).
pub(super) fn forward(
    plan: &WindowPlan,
    s: &ConvShape,
    x: &[i8],
    w: &[i8],
    out: Out<'_>,
    scale: impl Fn(usize) -> f32 + Sync,
) {
    assert!(available(), "the AVX-512 VNNI depthwise kernel needs AVX-512 F, BW, VNNI and VBMI");
    let (p, hw, k) = (s.out_plane(), s.in_plane(), planes_per_task(s));
    // SAFETY: the CPU has the features (asserted above).
    let (regs, per) = (unsafe { channel_registers(plan, w, s.kh * s.kw) }, plan.patterns.len() + plan.kinds.len());
    out.par_chunks(k * p).zip(x.par_chunks(k * hw)).enumerate().for_each(|(task, (out, x))| {
        for (j, (out, x)) in out.chunks_exact_mut(p).zip(x.chunks_exact(hw)).enumerate() {
            let c = (task * k + j) % s.c_in;
            // SAFETY: the CPU has the features (asserted above); `plan` is the forward plan of
            // `s`, whose source planes are `x`'s and output planes `out`'s, and `regs` its
            // registers for these weights.
            unsafe { plane(plan, x, &regs[c * per..][..per], out, scale(c)) }
        }
    });
}

/// Input gradient: `out[n, c] = scale(c) * sum over taps of w[c, tap] * dy[n, c, ...]`, by `plan`
/// (the input-gradient plan of `s`).
pub(super) fn input_grad(
    plan: &WindowPlan,
    s: &ConvShape,
    w: &[i8],
    dy: &[i8],
    out: Out<'_>,
    scale: impl Fn(usize) -> f32 + Sync,
) {
    assert!(available(), "the AVX-512 VNNI depthwise kernel needs AVX-512 F, BW, VNNI and VBMI");
    let (p, hw, k) = (s.out_plane(), s.in_plane(), planes_per_task(s));
    // SAFETY: the CPU has the features (asserted above).
    let (regs, per) = (unsafe { channel_registers(plan, w, s.kh * s.kw) }, plan.patterns.len() + plan.kinds.len());
    out.par_chunks(k * hw).zip(dy.par_chunks(k * p)).enumerate().for_each(|(task, (out, dy))| {
        for (j, (out, dy)) in out.chunks_exact_mut(hw).zip(dy.chunks_exact(p)).enumerate() {
            let c = (task * k + j) % s.c_in;
            // SAFETY: the CPU has the features (asserted above); `plan` is the input-gradient
            // plan of `s`, whose source planes are `dy`'s and output planes `out`'s, and `regs`
            // its registers for these weights.
            unsafe { plane(plan, dy, &regs[c * per..][..per], out, scale(c)) }
        }
    });
}

/// For each channel of the kernels `w` (`kk` taps each, at most 64), the registers `plane`
/// takes: the weights of each of `plan`'s patterns, then for each kind the offset's contribution,
/// `-128 * sum of the slot weights` per lane, which starts each block's sums. Made once per call:
/// for the 4x4 planes of MobileNetV2 they cost as much as the plane's sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
fn channel_registers(plan: &WindowPlan, w: &[i8], kk: usize) -> Vec<__m512i> {
    let offset = _mm512_set1_epi8(OFFSET);
    let mut regs = Vec::with_capacity(w.len() / kk * (plan.patterns.len() + plan.kinds.len()));
    for w in w.chunks_exact(kk) {
        // SAFETY: the mask limits the load to `w`.
        let taps = unsafe { _mm512_maskz_loadu_epi8(low_bits(kk), w.as_ptr()) };
        let first = regs.len();
        for p in &plan.patterns {
            // SAFETY: `index` is 64 bytes.
            let index = unsafe { _mm512_loadu_si512(p.index.as_ptr().cast()) };
            regs.push(_mm512_maskz_permutexvar_epi8(p.valid, index, taps));
        }
        for kind in &plan.kinds {
            let corr =
                kind.iter().fold(_mm512_setzero_si512(), |acc, &p| _mm512_dpbusd_epi32(acc, offset, regs[first + p]));
            regs.push(_mm512_sub_epi32(_mm512_setzero_si512(), corr));
        }
    }
    regs
}

/// One plane of a planned product: `out[o] = scale * sum over o's taps of w[tap] * src[...]`,
/// with `regs` the channel's registers from [`channel_registers`].
///
/// # Safety
/// The CPU has AVX-512 F, BW, VNNI and VBMI (the plan's loads and stores stay inside planes of
/// its lengths, which `src` and `out` have: asserted).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn plane(plan: &WindowPlan, src: &[i8], regs: &[__m512i], out: &mut [f32], scale: f32) {
    assert_eq!((src.len(), out.len()), (plan.src_len, plan.out_len), "planes of another shape than the plan's");
    let offset = _mm512_set1_epi8(OFFSET);
    let (weights, start) = regs.split_at(plan.patterns.len());
    let scale = _mm512_set1_ps(scale);
    let (src, dst) = (src.as_ptr(), out.as_mut_ptr());
    for b in &plan.blocks {
        // SAFETY: the load masks hold only bytes of the window inside the source plane (the plan
        // was made for this plane's length); masked-off bytes are not accessed.
        let (lo, hi) = unsafe {
            let at = src.wrapping_add(b.win);
            (_mm512_maskz_loadu_epi8(b.load[0], at), _mm512_maskz_loadu_epi8(b.load[1], at.wrapping_add(64)))
        };
        let (lo, hi) = (_mm512_xor_si512(lo, offset), _mm512_xor_si512(hi, offset));
        let mut acc = start[b.kind];
        for (&step, &pattern) in plan.steps[b.step..].iter().zip(&plan.kinds[b.kind]) {
            let perm = &plan.perms[step];
            // SAFETY: `index` is 64 bytes.
            let index = unsafe { _mm512_loadu_si512(perm.index.as_ptr().cast()) };
            // Slots without a source keep their index byte, 0x80: the offset code 0.
            let codes = _mm512_mask2_permutex2var_epi8(lo, index, perm.valid, hi);
            acc = _mm512_dpbusd_epi32(acc, codes, weights[pattern]);
        }
        let y = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), scale);
        // SAFETY: the block's stored lanes are outputs `b.out ..` of this plane.
        unsafe { _mm512_mask_storeu_ps(dst.add(b.out), b.store, y) };
    }
}

/// How the weight gradient reads a channel's planes.
#[derive(Debug)]
pub(super) enum Layout {
    /// Each block of positions gathers every tap's codes from its window ([`TapPlan`]).
    Windows(TapPlan),
    /// Each plane is laid out in its stride phases first ([`Phased`]).
    Phases,
}

impl Layout {
    /// The windows where they take `s` (measured faster on every MobileNetV2 depthwise layer,
    /// even 32x32 at stride 2, whose blocks hold one output row of 16), else the phases.
    pub(super) fn choose(s: &ConvShape) -> Layout {
        TapPlan::new(s).map_or(Layout::Phases, Layout::Windows)
    }
}

/// Weight gradient: `out[c, tap] = finish(sum over images and pixels of dy * x)`, the sum exact
/// in `i64`, through `layout`.
pub(super) fn weight_grad<O: Send>(
    s: &ConvShape,
    x: &[i8],
    dy: &[i8],
    out: &mut [O],
    finish: impl Fn(i64) -> O + Sync,
    layout: &Layout,
) {
    assert!(available(), "the AVX-512 VNNI depthwise kernel needs AVX-512 F, BW, VNNI and VBMI");
    let (kk, lay) = (s.kh * s.kw, Phased::new(s));
    // A lane adds at most four products of |(x + 128) * dy| <= 255 * 128 per register of
    // positions of an image, so this many images are exact in its 32 bits.
    let registers = match layout {
        Layout::Windows(plan) => plan.blocks.len(),
        Layout::Phases => lay.len.div_ceil(64),
    };
    let run = (i32::MAX as usize / (registers * 4 * 255 * 128)).max(1);
    out.par_chunks_mut(kk).enumerate().for_each(|(c, out)| {
        // The phase layout's padding and unused positions hold code 0 (offset, 0x80); each fill
        // writes the same interior positions. Both buffers have 64 bytes of slack for the last
        // 64-position reads.
        let mut buffers = match layout {
            Layout::Windows(_) => (Vec::new(), Vec::new()),
            Layout::Phases => (vec![OFFSET; lay.plane(s) + 64], vec![0i8; s.out_h() * lay.pw + 64]),
        };
        // Per tap, then the sum of dY.
        let mut total = vec![0i64; kk + 1];
        for n0 in (0..s.n).step_by(run) {
            let planes = Planes { s, x, dy, c, images: n0..s.n.min(n0 + run) };
            let mut taps = |taps: &[usize], sum_dy: bool| {
                let (xp, dyp) = (&mut buffers.0, &mut buffers.1);
                // SAFETY: the CPU has the features (asserted above); the plan is `s`'s, the
                // buffers those of `lay` with their slack; `run` keeps every lane exact.
                unsafe {
                    match (layout, taps.len()) {
                        (Layout::Windows(plan), 9) => {
                            window_run::<9>(&planes, plan, taps.try_into().unwrap(), sum_dy, &mut total)
                        }
                        (Layout::Windows(plan), _) => window_run::<1>(&planes, plan, [taps[0]], sum_dy, &mut total),
                        (Layout::Phases, 9) => {
                            phase_run::<9>(&planes, &lay, taps.try_into().unwrap(), sum_dy, (xp, dyp), &mut total)
                        }
                        (Layout::Phases, _) => phase_run::<1>(&planes, &lay, [taps[0]], sum_dy, (xp, dyp), &mut total),
                    }
                }
            };
            // A 3x3 kernel's taps in registers together; other kernels one tap at a time.
            if kk == 9 {
                taps(&std::array::from_fn::<usize, 9, _>(|t| t), true);
            } else {
                for t in 0..kk {
                    taps(&[t], t == 0);
                }
            }
        }
        let dy_sum = total[kk];
        for (o, &t) in out.iter_mut().zip(&total) {
            *o = finish(t - 128 * dy_sum);
        }
    });
}

/// The channel planes of a run of images.
struct Planes<'a> {
    s: &'a ConvShape,
    x: &'a [i8],
    dy: &'a [i8],
    c: usize,
    images: std::ops::Range<usize>,
}

/// Adds, for each of `taps`, `sum over the run's images and positions of dy * (x + 128)` to
/// `total[tap]`, and with `sum_dy` the sum of dY to `total[kk]`.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VNNI and VBMI; `xp` and `dyp` are `lay`'s buffers for the shape of
/// `planes` with 64 bytes of slack each, `xp` holding the offset code 0 outside what a fill writes
/// and `dyp` zeros; no image of the run adds more than `i32::MAX` to a lane.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn phase_run<const K: usize>(
    planes: &Planes,
    lay: &Phased,
    taps: [usize; K],
    sum_dy: bool,
    (xp, dyp): (&mut [i8], &mut [i8]),
    total: &mut [i64],
) {
    let s = planes.s;
    let (p, hw) = (s.out_plane(), s.in_plane());
    let offs = taps.map(|t| lay.offsets[t]);
    assert!(offs.iter().all(|&o| o + lay.len.next_multiple_of(64) <= xp.len()), "phase buffer without its slack");
    assert!(lay.len.next_multiple_of(64) <= dyp.len(), "dY buffer without its slack");
    let (ones, mut acc, mut acc_dy) = (_mm512_set1_epi8(1), [_mm512_setzero_si512(); K], _mm512_setzero_si512());
    for n in planes.images.clone() {
        let plane = n * s.c_in + planes.c;
        // The planes of one channel lie a whole image apart, too far for the hardware's
        // prefetcher: fetch those of the image after next while this one is summed.
        let ahead = (n + 2) * s.c_in + planes.c;
        prefetch(planes.x.get(ahead * hw..(ahead + 1) * hw));
        prefetch(planes.dy.get(ahead * p..(ahead + 1) * p));
        // SAFETY: the CPU has the features (this function's contract).
        unsafe {
            fill_x(s, lay, &planes.x[plane * hw..][..hw], xp);
            fill_dy(lay, &planes.dy[plane * p..][..p], dyp);
        }
        let (xp, dyp) = (xp.as_ptr(), dyp.as_ptr());
        for q in (0..lay.len).step_by(64) {
            // SAFETY: `q + 64 <= len` rounded up to 64, inside both buffers (asserted above).
            unsafe {
                let d = _mm512_maskz_loadu_epi8(low_bits(lay.len - q), dyp.add(q));
                if sum_dy {
                    acc_dy = _mm512_dpbusd_epi32(acc_dy, ones, d);
                }
                for k in 0..K {
                    acc[k] = _mm512_dpbusd_epi32(acc[k], _mm512_loadu_si512(xp.add(offs[k] + q).cast()), d);
                }
            }
        }
    }
    for (&t, &a) in taps.iter().zip(&acc) {
        total[t] += sum_lanes(a);
    }
    if sum_dy {
        total[total.len() - 1] += sum_lanes(acc_dy);
    }
}

/// Adds, for each of `taps`, `sum over the run's images and positions of dy * (x + 128)` to
/// `total[tap]`, and with `sum_dy` the sum of dY to `total[kk]`, gathering each block's codes
/// from its window by `plan`.
///
/// # Safety
/// The CPU has AVX-512 F, BW, VNNI and VBMI (the plan's loads stay inside planes of its lengths,
/// which `planes` has: asserted); no image of the run adds more than `i32::MAX` to a lane.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx512vbmi")]
unsafe fn window_run<const K: usize>(
    planes: &Planes,
    plan: &TapPlan,
    taps: [usize; K],
    sum_dy: bool,
    total: &mut [i64],
) {
    let s = planes.s;
    let (p, hw, kk) = (s.out_plane(), s.in_plane(), s.kh * s.kw);
    assert_eq!((hw, p), (plan.src_len, plan.positions), "planes of another shape than the plan's");
    let (offset, ones) = (_mm512_set1_epi8(OFFSET), _mm512_set1_epi8(1));
    let (mut acc, mut acc_dy) = ([_mm512_setzero_si512(); K], _mm512_setzero_si512());
    for n in planes.images.clone() {
        let plane = n * s.c_in + planes.c;
        // As in `phase_run`: the image after next's planes, while this one is summed.
        let ahead = (n + 2) * s.c_in + planes.c;
        prefetch(planes.x.get(ahead * hw..(ahead + 1) * hw));
        prefetch(planes.dy.get(ahead * p..(ahead + 1) * p));
        let (x, dy) = (planes.x[plane * hw..][..hw].as_ptr(), planes.dy[plane * p..][..p].as_ptr());
        for b in &plan.blocks {
            // SAFETY: the block's positions lie inside the dY plane, and its load masks hold only
            // bytes of the window inside the input plane (the plan is this shape's).
            let (d, lo, hi) = unsafe {
                let at = x.wrapping_add(b.win);
                (
                    _mm512_maskz_loadu_epi8(b.positions, dy.add(b.first)),
                    _mm512_maskz_loadu_epi8(b.load[0], at),
                    _mm512_maskz_loadu_epi8(b.load[1], at.wrapping_add(64)),
                )
            };
            let (lo, hi) = (_mm512_xor_si512(lo, offset), _mm512_xor_si512(hi, offset));
            if sum_dy {
                acc_dy = _mm512_dpbusd_epi32(acc_dy, ones, d);
            }
            let steps = &plan.steps[b.step..][..kk];
            for k in 0..K {
                let perm = &plan.perms[steps[taps[k]]];
                // SAFETY: `index` is 64 bytes.
                let index = unsafe { _mm512_loadu_si512(perm.index.as_ptr().cast()) };
                // Slots whose source is padding keep their index byte, 0x80: the offset code 0.
                let codes = _mm512_mask2_permutex2var_epi8(lo, index, perm.valid, hi);
                acc[k] = _mm512_dpbusd_epi32(acc[k], codes, d);
            }
        }
    }
    for (&t, &a) in taps.iter().zip(&acc) {
        total[t] += sum_lanes(a);
    }
    if sum_dy {
        total[kk] += sum_lanes(acc_dy);
    }
}

/// Asks for the cache lines of `v` (if any) to be loaded into L1.
#[inline(always)]
fn prefetch(v: Option<&[i8]>) {
    let v = v.unwrap_or_default();
    // Every 64th byte and the last, so every line the slice touches.
    for at in v.iter().step_by(64).chain(v.last()) {
        // SAFETY: every x86-64 CPU has SSE, and a prefetch only reads (it never faults).
        unsafe { _mm_prefetch::<_MM_HINT_T0>((at as *const i8).cast()) };
    }
}

/// The sum of the 16 `i32` lanes of `a`, in `i64`.
#[target_feature(enable = "avx512f")]
fn sum_lanes(a: __m512i) -> i64 {
    let lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a));
    let hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64::<1>(a));
    _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi))
}

/// Byte `2k` (even) and `2k + 1` (odd) of a 128-byte pair of registers, for `vpermt2b`.
const EVEN_ODD: [[u8; 64]; 2] = {
    let mut t = [[0u8; 64]; 2];
    let mut k = 0;
    while k < 64 {
        t[0][k] = 2 * k as u8;
        t[1][k] = 2 * k as u8 + 1;
        k += 1;
    }
    t
};

/// [`Phased::fill`] of one input plane `x`, each code offset by 128 (`^ 0x80`).
///
/// # Safety
/// The CPU has AVX-512 F and BW (VBMI for stride 2); `xp` is at least `lay.plane(s)` long.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn fill_x(s: &ConvShape, lay: &Phased, x: &[i8], xp: &mut [i8]) {
    let (sw, w, offset) = (s.stride.1, s.w, _mm512_set1_epi8(OFFSET));
    for (row, &start) in x.chunks_exact(w).zip(&lay.row_starts) {
        if sw == 1 {
            let d = &mut xp[start + lay.col_starts[0].0..][..w];
            for k in (0..w).step_by(64) {
                let m = low_bits(w - k);
                // SAFETY: the mask keeps the load inside `row` and the store inside `d`.
                unsafe {
                    let v = _mm512_maskz_loadu_epi8(m, row.as_ptr().add(k));
                    _mm512_mask_storeu_epi8(d.as_mut_ptr().add(k), m, _mm512_xor_si512(v, offset));
                }
            }
        } else if sw == 2 && w >= 2 {
            // The even and the odd columns, each to its phase's row.
            let (ne, no) = (w.div_ceil(2), w / 2);
            let (e0, o0) = (start + lay.col_starts[0].0, start + lay.col_starts[1].0);
            assert!(e0 + ne <= xp.len() && o0 + no <= xp.len(), "phase rows outside the buffer");
            let base = xp.as_mut_ptr();
            let (even, odd) = (base.wrapping_add(e0), base.wrapping_add(o0));
            // SAFETY: the tables are 64 bytes each.
            let (ie, io) = unsafe {
                (_mm512_loadu_si512(EVEN_ODD[0].as_ptr().cast()), _mm512_loadu_si512(EVEN_ODD[1].as_ptr().cast()))
            };
            for k in (0..ne).step_by(64) {
                let left = w - 2 * k;
                // SAFETY: the masks keep the loads inside `row` (`left` codes from `2k`) and the
                // stores inside the phase rows (`ne - k` and `no - k` codes from `k`).
                unsafe {
                    let a = _mm512_maskz_loadu_epi8(low_bits(left), row.as_ptr().add(2 * k));
                    let b = _mm512_maskz_loadu_epi8(
                        low_bits(left.saturating_sub(64)),
                        row.as_ptr().add(2 * k).wrapping_add(64),
                    );
                    let e = _mm512_xor_si512(_mm512_permutex2var_epi8(a, ie, b), offset);
                    let o = _mm512_xor_si512(_mm512_permutex2var_epi8(a, io, b), offset);
                    _mm512_mask_storeu_epi8(even.wrapping_add(k), low_bits(ne - k), e);
                    _mm512_mask_storeu_epi8(odd.wrapping_add(k), low_bits(no.saturating_sub(k)), o);
                }
            }
        } else {
            for (c0, &(col, _)) in lay.col_starts.iter().enumerate() {
                for (d, &v) in xp[start + col..].iter_mut().zip(row[c0..].iter().step_by(sw)) {
                    *d = v ^ OFFSET;
                }
            }
        }
    }
}

/// Copies one dY plane (`out_h x out_w`) into `dyp`, rows of `lay.pw` whose spare columns stay
/// zero.
///
/// # Safety
/// The CPU has AVX-512 F and BW; `dyp` holds at least `out_h` rows of `lay.pw`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn fill_dy(lay: &Phased, dy: &[i8], dyp: &mut [i8]) {
    let ow = lay.out_w;
    for (r, row) in dy.chunks_exact(ow).enumerate() {
        let d = &mut dyp[r * lay.pw..][..ow];
        for k in (0..ow).step_by(64) {
            let m = low_bits(ow - k);
            // SAFETY: the mask keeps the load inside `row` and the store inside `d`.
            unsafe {
                _mm512_mask_storeu_epi8(d.as_mut_ptr().add(k), m, _mm512_maskz_loadu_epi8(m, row.as_ptr().add(k)))
            };
        }
    }
}
