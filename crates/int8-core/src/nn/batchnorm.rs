//! Batch normalization over NCHW (Ioffe and Szegedy, 2015), per channel, with an optional ReLU or
//! ReLU6 (a ReLU clamped at a cap, `min(max(y, 0), cap)`) fused into the same pass.
//!
//! Training normalises with the batch's mean and biased variance; evaluation with running
//! statistics. Each `(image, channel)` plane's mean and squared deviations are two-pass (the
//! second from L1), and planes are merged per channel in f64 (Chan, Golub and LeVeque's pairwise
//! update), so the statistics hold for large batches and offset data. Batch norm is memory-bound:
//! every pass reads the tensor in memory order (a channel's planes, one per image, are a page or
//! less each and far apart, which defeats the hardware prefetcher), and the backward pass
//! recomputes the fused ReLU's mask from `x` instead of reading the output. [`forward_train_half`]
//! and [`backward_half`] keep, instead of `x`, the normalised input in half precision and the mask
//! as bits (for an input that came out of an INT8 layer, which carries a larger error already).
//! [`forward_train_sums`] and [`backward_sums`] keep an INT8 convolution's output as its integer
//! sums in 16 bits, which give it back exactly: half the bytes, the same gradients.
//! The reductions run in parallel over fixed blocks of images and channels, merged in one order
//! that depends only on the shape, so results do not depend on the thread count; the elementwise
//! passes run in parallel over planes.

use rayon::prelude::*;

use crate::error::{CoreError, Result};
use crate::out::{Fill, Out};

/// The batch statistics of one training forward pass, needed by the backward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel `1 / sqrt(var + eps)`.
    pub inv_std: Vec<f32>,
    /// Per-channel biased variance (what training normalised with).
    pub var: Vec<f32>,
    /// Per-channel `gamma * inv_std`: the forward pass computed `y = x * scale + shift`.
    pub scale: Vec<f32>,
    /// Per-channel `beta - mean * scale`.
    pub shift: Vec<f32>,
    /// The largest `|y|` of the output written (NaN ignored), where the pass that wrote it found it:
    /// an INT8 consumer's per-tensor clip value without a pass of its own.
    pub max_abs_out: Option<f32>,
}

/// Layout of an NCHW tensor for batch norm: `n` images, `c` channels, `hw` pixels each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NchwDims {
    /// Images.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Pixels per channel plane.
    pub hw: usize,
}

impl NchwDims {
    fn len(&self) -> usize {
        self.n * self.c * self.hw
    }

    fn check(&self, lens: &[(&'static str, usize, usize)]) -> Result<()> {
        if self.n * self.hw == 0 {
            return Err(CoreError::InvalidArgument {
                what: "batch norm input",
                why: format!("{self:?} has no values per channel"),
            });
        }
        for &(what, got, expected) in lens {
            crate::error::check_len(what, got, expected)?;
        }
        Ok(())
    }

    /// The planes of channel `ch`, one per image.
    #[cfg(test)]
    fn planes<'a>(&self, x: &'a [f32], ch: usize) -> impl Iterator<Item = &'a [f32]> {
        (0..self.n).map(move |i| &x[(i * self.c + ch) * self.hw..][..self.hw])
    }
}

/// Blocks of images of the reductions: a fixed number, so that the order of merges depends only
/// on the batch size.
const IMAGE_BLOCKS: usize = 32;

/// Values each reduction task reads per image at least (a run of whole channel planes).
const TASK_RUN: usize = 16 * 1024;

/// A per-channel reduction over every plane, in memory order: `plane(ch, start)` reduces the
/// plane of channel `ch` that starts at `start`, and `merge` folds results, first over a block's
/// images in order, then over the blocks in order. Tasks are (image block, channel run) pairs, so
/// each reads long contiguous runs, and the result does not depend on how rayon schedules them.
fn reduce_planes<A, P, M>(d: NchwDims, plane: P, merge: M) -> Vec<A>
where
    A: Copy + Default + Send,
    P: Fn(usize, usize) -> A + Sync,
    M: Fn(A, A) -> A + Sync,
{
    let run = |i: usize, chs: std::ops::Range<usize>, acc: &mut [A]| {
        for (a, ch) in acc.iter_mut().zip(chs) {
            *a = merge(*a, plane(ch, (i * d.c + ch) * d.hw));
        }
    };
    reduce_runs(d, run, &merge)
}

/// [`reduce_planes`] over an [`Input`]: `plane(ch, start, values)` gets the plane's values too,
/// a run of planes decoded at a time where the input is kept as sums.
fn reduce_input_planes<A, P, M>(d: NchwDims, x: Input<'_>, plane: P, merge: M) -> Vec<A>
where
    A: Copy + Default + Send,
    P: Fn(usize, usize, &[f32]) -> A + Sync,
    M: Fn(A, A) -> A + Sync,
{
    let per = planes_per_task(d);
    let run = |i: usize, chs: std::ops::Range<usize>, acc: &mut [A]| {
        for (k, sub) in acc.chunks_mut(per).enumerate() {
            let ch0 = chs.start + k * per;
            x.with_planes(d, i * d.c + ch0, sub.len(), |xs| {
                for (j, (a, xp)) in sub.iter_mut().zip(xs.chunks(d.hw)).enumerate() {
                    *a = merge(*a, plane(ch0 + j, (i * d.c + ch0 + j) * d.hw, xp));
                }
            });
        }
    };
    reduce_runs(d, run, &merge)
}

/// What [`reduce_planes`] does, with `fold_run(i, chs, acc)` folding image `i`'s planes of channels
/// `chs` into `acc` (one per channel of the run, in order).
fn reduce_runs<A, R, M>(d: NchwDims, fold_run: R, merge: M) -> Vec<A>
where
    A: Copy + Default + Send,
    R: Fn(usize, std::ops::Range<usize>, &mut [A]) + Sync,
    M: Fn(A, A) -> A + Sync,
{
    let blocks = d.n.min(IMAGE_BLOCKS);
    let run = (TASK_RUN / d.hw).clamp(1, d.c.max(1));
    let runs = d.c.div_ceil(run);
    let parts: Vec<Vec<A>> = (0..blocks * runs)
        .into_par_iter()
        .map(|t| {
            let (b, k) = (t / runs, t % runs);
            let chs = k * run..((k + 1) * run).min(d.c);
            let mut acc = vec![A::default(); chs.len()];
            for i in b * d.n / blocks..(b + 1) * d.n / blocks {
                fold_run(i, chs.clone(), &mut acc);
            }
            acc
        })
        .collect();
    let mut out = vec![A::default(); d.c];
    for (t, part) in parts.into_iter().enumerate() {
        for (o, a) in out[(t % runs) * run..].iter_mut().zip(part) {
            *o = merge(*o, a);
        }
    }
    out
}

/// Count, mean and sum of squared deviations from the mean of a set of values, in f64.
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    /// The moments of one plane: its mean, then the squared deviations from it (read from L1).
    fn of_plane(v: &[f32]) -> Self {
        let n = v.len() as f64;
        let mean = plane_moments(v, None) / n;
        let m = mean as f32;
        // The deviations are taken from `m`, the mean rounded to f32; about the exact mean the sum
        // is smaller by `n * (mean - m)^2`.
        let m2 = (plane_moments(v, Some(m)) - n * (mean - m as f64).powi(2)).max(0.0);
        Self { n, mean, m2 }
    }

    /// The moments of the union of two sets (Chan, Golub and LeVeque, 1979).
    fn merge(a: Self, b: Self) -> Self {
        if a.n == 0.0 {
            return b;
        }
        if b.n == 0.0 {
            return a;
        }
        let n = a.n + b.n;
        let delta = b.mean - a.mean;
        Self { n, mean: a.mean + delta * b.n / n, m2: a.m2 + b.m2 + delta * delta * a.n * b.n / n }
    }
}

/// `(sum v, sum (v - mean)^2)` over a plane in sixteen f32 lanes, carried in f64; the second only
/// when `mean` is given.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn plane_moments(v: &[f32], mean: Option<f32>) -> f64 {
    let mut acc = [0.0f32; 16];
    let (chunks, rest) = v.as_chunks::<16>();
    let m = mean.unwrap_or(0.0);
    let sq = mean.is_some();
    for ch in chunks {
        for l in 0..16 {
            let d = ch[l] - m;
            acc[l] += if sq { d * d } else { ch[l] };
        }
    }
    let tail: f64 = rest.iter().map(|&x| if sq { ((x - m) * (x - m)) as f64 } else { x as f64 }).sum();
    lanes_sum(acc) + tail
}

/// The sum of sixteen f32 lanes in f64, added as a tree (four vector adds): a plane of 16 or 64
/// values (MobileNetV2's last stages) spent more in adding its lanes one after the other than in
/// reading the plane.
#[inline(always)]
fn lanes_sum(a: [f32; 16]) -> f64 {
    let mut v = a.map(f64::from);
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            v[i] += v[i + w];
        }
        w /= 2;
    }
    v[0]
}

/// The fused activation's mask for one channel: `(a, b, cap)` where the forward pass computed
/// `y = x * a + b` and clamped it to `[0, cap]` (`cap` infinite for a plain ReLU).
type Mask = Option<(f32, f32, f32)>;

/// Whether the gradient passes the fused clamp at `x`: `0 < x * a + b < cap`, the forward pass's
/// own arithmetic, so the mask is exactly the forward's.
#[inline(always)]
fn passes(x: f32, (a, b, cap): (f32, f32, f32)) -> bool {
    let t = x * a + b;
    (t > 0.0) & (t < cap)
}

/// `(sum g, sum g * xhat)` over a plane, where `g` is `dy`, masked where the fused activation
/// clipped when `relu` is given; in sixteen f32 lanes carried in f64.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn plane_grad_sums(x: &[f32], dy: &[f32], relu: Mask, mean: f32, inv: f32) -> (f64, f64) {
    let (mut sb, mut sg) = ([0.0f32; 16], [0.0f32; 16]);
    let (xc, xr) = x.as_chunks::<16>();
    let (dc, dr) = dy.as_chunks::<16>();
    let mut tail = (0.0f64, 0.0f64);
    match relu {
        Some(k) => {
            for (xv, dv) in xc.iter().zip(dc) {
                for l in 0..16 {
                    let g = if passes(xv[l], k) { dv[l] } else { 0.0 };
                    sb[l] += g;
                    sg[l] += g * (xv[l] - mean) * inv;
                }
            }
            for (&xv, &g) in xr.iter().zip(dr) {
                let g = if passes(xv, k) { g } else { 0.0 };
                tail.0 += g as f64;
                tail.1 += (g * (xv - mean) * inv) as f64;
            }
        }
        None => {
            for (xv, dv) in xc.iter().zip(dc) {
                for l in 0..16 {
                    sb[l] += dv[l];
                    sg[l] += dv[l] * (xv[l] - mean) * inv;
                }
            }
            for (&xv, &g) in xr.iter().zip(dr) {
                tail.0 += g as f64;
                tail.1 += (g * (xv - mean) * inv) as f64;
            }
        }
    }
    (lanes_sum(sb) + tail.0, lanes_sum(sg) + tail.1)
}

/// `dx = k * (m * g - dbeta - xhat * dgamma)` over a plane, `g` masked as above.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn plane_dx(dx: Fill<'_>, x: &[f32], dy: &[f32], relu: Mask, mean: f32, inv: f32, k: f32, m: f32, db: f32, dg: f32) {
    match relu {
        Some(mk) => dx.zip_map(x, dy, |xv, g| {
            let g = if passes(xv, mk) { g } else { 0.0 };
            k * (m * g - db - (xv - mean) * inv * dg)
        }),
        None => dx.zip_map(x, dy, |xv, g| k * (m * g - db - (xv - mean) * inv * dg)),
    }
}

/// `y = x * a + b`, optionally clamped to `[0, cap]`, over a plane; returns the largest `|y|`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn plane_affine(y: Fill<'_>, x: &[f32], a: f32, b: f32, relu: Option<f32>) -> f32 {
    match relu {
        None => y.map_max_abs(x, |v| v * a + b),
        Some(cap) => y.map_max_abs(x, |v| (v * a + b).max(0.0).min(cap)),
    }
}

/// Training forward: `y = gamma * (x - mean) * inv_std + beta`, then, when `relu` gives a cap,
/// `min(max(y, 0), cap)` (an infinite cap for ReLU, 6 for ReLU6).
pub fn forward_train<'y>(
    d: NchwDims,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    relu: Option<f32>,
    y: impl Into<Out<'y>>,
) -> Result<BatchStats> {
    let y = y.into();
    let mut stats = train_stats(d, x, gamma, beta, eps, y.len())?;
    stats.max_abs_out = Some(affine(d, x, &stats.scale, &stats.shift, relu, y));
    Ok(stats)
}

/// The batch statistics of a training forward pass (`max_abs_out` unset), after checking the
/// lengths.
fn train_stats(d: NchwDims, x: &[f32], gamma: &[f32], beta: &[f32], eps: f32, y_len: usize) -> Result<BatchStats> {
    d.check(&[
        ("batch norm input", x.len(), d.len()),
        ("gamma", gamma.len(), d.c),
        ("beta", beta.len(), d.c),
        ("batch norm output", y_len, d.len()),
    ])?;
    let stats = reduce_planes(d, |_, start| Moments::of_plane(&x[start..][..d.hw]), Moments::merge);
    let mean: Vec<f32> = stats.iter().map(|s| s.mean as f32).collect();
    let var: Vec<f32> = stats.iter().map(|s| (s.m2 / s.n) as f32).collect();
    let inv_std: Vec<f32> = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<f32> = (0..d.c).map(|ch| gamma[ch] * inv_std[ch]).collect();
    let shift: Vec<f32> = (0..d.c).map(|ch| beta[ch] - mean[ch] * scale[ch]).collect();
    Ok(BatchStats { mean, inv_std, var, scale, shift, max_abs_out: None })
}

/// What a training forward pass keeps for its backward pass in place of its f32 input
/// ([`forward_train_half`], for an input that came out of an INT8 layer): the normalised input
/// `xhat = (x - mean) * inv_std` in half precision ([`crate::half`]: 2 bytes a value instead of 4,
/// relative error at most `2^-11`; `|xhat| <= sqrt(count - 1)`, far inside its range), and, with
/// a fused activation, where the gradient passes, one bit a value, from the forward pass's own
/// arithmetic, so that the mask is exactly the forward's.
#[derive(Debug, Clone, PartialEq)]
pub struct HalfSaved {
    /// `xhat` as half-precision bits, in the input's layout.
    pub xhat: Vec<u16>,
    /// With a fused activation: for plane `p` (image-major, `n * c` planes of `hw` values), words
    /// `p * hw.div_ceil(64)..` hold one bit per value, bit `i % 64` of word `i / 64` set where the
    /// gradient passes.
    pub passes: Option<Vec<u64>>,
}

impl HalfSaved {
    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        2 * self.xhat.len() + 8 * self.passes.as_ref().map_or(0, Vec::len)
    }
}

/// [`forward_train`], keeping for the backward pass what [`backward_half`] needs ([`HalfSaved`])
/// instead of `x`, written in the same pass over each plane as the output.
pub fn forward_train_half<'y>(
    d: NchwDims,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    relu: Option<f32>,
    y: impl Into<Out<'y>>,
) -> Result<(BatchStats, HalfSaved)> {
    let y = y.into();
    let mut stats = train_stats(d, x, gamma, beta, eps, y.len())?;
    let words = d.hw.div_ceil(64);
    let mut xhat = Vec::<u16>::with_capacity(d.len());
    // Without an activation there is no mask; one placeholder word per plane keeps the planes'
    // iterators in step.
    let mut passes = vec![0u64; d.n * d.c * if relu.is_some() { words } else { 1 }];
    let max = y
        .par_fills(d.hw)
        .zip(x.par_chunks(d.hw))
        .zip(xhat.spare_capacity_mut()[..d.len()].par_chunks_mut(d.hw))
        .zip(passes.par_chunks_mut(if relu.is_some() { words } else { 1 }))
        .enumerate()
        .map(|(p, (((yp, xp), hp), bp))| {
            let ch = p % d.c;
            let m = plane_affine(yp, xp, stats.scale[ch], stats.shift[ch], relu);
            let mask = relu.map(|cap| (stats.scale[ch], stats.shift[ch], cap));
            plane_keep_half(xp, stats.mean[ch], stats.inv_std[ch], mask, hp, bp);
            m
        })
        .reduce(|| 0.0, f32::max);
    // SAFETY: the capacity is at least `d.len()`, and `plane_keep_half` wrote every element of
    // each plane's chunk (the chunks of `x` and of `xhat` have equal lengths).
    unsafe { xhat.set_len(d.len()) };
    stats.max_abs_out = Some(max);
    Ok((stats, HalfSaved { xhat, passes: relu.is_some().then_some(passes) }))
}

/// Writes a plane's `xhat` in half precision and, with a fused activation (`mask`), its pass
/// bits.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn plane_keep_half(
    x: &[f32],
    mean: f32,
    inv: f32,
    mask: Mask,
    xhat: &mut [std::mem::MaybeUninit<u16>],
    bits: &mut [u64],
) {
    assert_eq!(x.len(), xhat.len(), "plane_keep_half: input and output lengths differ");
    crate::half::normalise_into(x, mean, inv, xhat);
    let Some(k) = mask else { return };
    let (xc, xr) = x.as_chunks::<16>();
    // `bits` comes zeroed; each group of 16 values sets its quarter of a word.
    for (g, v) in xc.iter().enumerate() {
        let mut b = 0u32;
        for l in 0..16 {
            b |= u32::from(passes(v[l], k)) << l;
        }
        bits[g / 4] |= u64::from(b) << (16 * (g % 4));
    }
    let g = xc.len();
    let b = xr.iter().enumerate().fold(0u32, |b, (l, &v)| b | (u32::from(passes(v, k)) << l));
    if let Some(w) = bits.get_mut(g / 4) {
        *w |= u64::from(b) << (16 * (g % 4));
    }
}

/// What a training forward pass keeps for its backward pass in place of its f32 input when that
/// input is an INT8 convolution's output ([`forward_train_sums`]). Each such value is the
/// convolution's integer sum times its output channel's scale (`sum as f32 * scale`, as the INT8
/// kernels write it), so its sum gives it back bit for bit: the sums are kept in 16 bits, and the
/// few values that are not such a product, or whose sum does not fit, are kept as they are,
/// beside them. The backward pass ([`backward_sums`]) rebuilds each plane of the input exactly, so
/// it, and training, are those of the f32 input, at 2 bytes a value instead of 4.
#[derive(Debug, Clone, PartialEq)]
pub struct SumsSaved {
    /// Each value's integer sum, in the input's layout (meaningless where `others` holds the value).
    pub sums: Vec<i16>,
    /// Per channel, the scale the sums are multiplied by.
    pub scales: Vec<f32>,
    /// `(index, value)` of the values the sums do not give back, by increasing index.
    pub others: Vec<(u32, f32)>,
}

impl SumsSaved {
    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        2 * self.sums.len() + 4 * self.scales.len() + 8 * self.others.len()
    }

    /// The input it was made from, bit for bit (the backward pass decodes a plane at a time).
    #[cfg(test)]
    fn restore(&self, d: NchwDims) -> Result<Vec<f32>> {
        self.check(d)?;
        let mut x = Vec::new();
        self.decode_planes(d, 0, d.n * d.c, &mut x);
        Ok(x)
    }

    fn check(&self, d: NchwDims) -> Result<()> {
        crate::error::check_len("batch norm saved sums", self.sums.len(), d.len())?;
        crate::error::check_len("batch norm sum scales", self.scales.len(), d.c)
    }

    /// Planes `p..p + k` of the input (counting planes image-major), into `out`.
    fn decode_planes(&self, d: NchwDims, p: usize, k: usize, out: &mut Vec<f32>) {
        let (start, len) = (p * d.hw, k * d.hw);
        out.resize(len, 0.0);
        for (j, o) in out.chunks_mut(d.hw).enumerate() {
            decode_sums(&self.sums[start + j * d.hw..][..d.hw], self.scales[(p + j) % d.c], o);
        }
        let first = self.others.partition_point(|o| (o.0 as usize) < start);
        for &(i, v) in self.others[first..].iter().take_while(|o| (o.0 as usize) < start + len) {
            out[i as usize - start] = v;
        }
    }
}

/// `out[i] = sums[i] as f32 * s`, as the INT8 kernels wrote the values.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn decode_sums(sums: &[i16], s: f32, out: &mut [f32]) {
    for (o, &q) in out.iter_mut().zip(sums) {
        *o = f32::from(q) * s;
    }
}

/// Where a backward pass reads its input, a plane at a time: the f32 values, or
/// [`SumsSaved`] decoded into a buffer of the thread's.
#[derive(Clone, Copy)]
enum Input<'a> {
    F32(&'a [f32]),
    Sums(&'a SumsSaved),
}

thread_local! {
    /// The planes [`Input::Sums`] decodes into (a plane, or a run of small ones, is a few KiB: it
    /// stays in L1).
    static PLANE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Input<'_> {
    fn len(&self) -> usize {
        match self {
            Input::F32(x) => x.len(),
            Input::Sums(s) => s.sums.len(),
        }
    }

    /// `f` of the values of planes `p..p + k`.
    fn with_planes<R>(&self, d: NchwDims, p: usize, k: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        match self {
            Input::F32(x) => f(&x[p * d.hw..][..k * d.hw]),
            Input::Sums(s) => PLANE.with(|b| {
                let mut b = b.borrow_mut();
                s.decode_planes(d, p, k, &mut b);
                f(&b)
            }),
        }
    }
}

/// At most this fraction of a tensor's values may lie outside the 16-bit sums
/// ([`forward_train_sums`]); beyond it, keeping the f32 input is as small.
const MAX_OTHERS: usize = 16;

/// [`forward_train`] for an input whose values are INT8 sums times `scales` (one per channel),
/// keeping for the backward pass [`SumsSaved`] instead of `x`, written in the same pass over each
/// plane as the output. The second result is `None` where the input is not such a tensor after
/// all (more than a sixteenth of its values outside the sums): the caller then keeps `x`.
#[allow(clippy::too_many_arguments)]
pub fn forward_train_sums<'y>(
    d: NchwDims,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    relu: Option<f32>,
    scales: &[f32],
    y: impl Into<Out<'y>>,
) -> Result<(BatchStats, Option<SumsSaved>)> {
    let y = y.into();
    let mut stats = train_stats(d, x, gamma, beta, eps, y.len())?;
    crate::error::check_len("batch norm sum scales", scales.len(), d.c)?;
    if u32::try_from(d.len()).is_err() {
        stats.max_abs_out = Some(affine(d, x, &stats.scale, &stats.shift, relu, y));
        return Ok((stats, None));
    }
    let mut sums = Vec::<i16>::with_capacity(d.len());
    let per = planes_per_task(d);
    let parts: Vec<(f32, Vec<(u32, f32)>)> = y
        .par_fills(per * d.hw)
        .zip(x.par_chunks(per * d.hw))
        .zip(sums.spare_capacity_mut()[..d.len()].par_chunks_mut(per * d.hw))
        .enumerate()
        .map(|(t, ((ys, xs), ss))| {
            let (mut max, mut others) = (0.0f32, Vec::new());
            for (j, ((yp, xp), sp)) in ys.chunks(d.hw).zip(xs.chunks(d.hw)).zip(ss.chunks_mut(d.hw)).enumerate() {
                let p = t * per + j;
                let ch = p % d.c;
                max = max.max(plane_affine(yp, xp, stats.scale[ch], stats.shift[ch], relu));
                plane_keep_sums(xp, scales[ch], sp, p * d.hw, &mut others);
            }
            (max, others)
        })
        .collect();
    let max = parts.iter().fold(0.0f32, |m, p| m.max(p.0));
    let others: Vec<(u32, f32)> = parts.into_iter().flat_map(|p| p.1).collect();
    // SAFETY: the capacity is at least `d.len()`, and `plane_keep_sums` wrote every element of
    // each plane's chunk (the chunks of `x` and of `sums` have equal lengths).
    unsafe { sums.set_len(d.len()) };
    stats.max_abs_out = Some(max);
    let keep = others.len() <= d.len() / MAX_OTHERS;
    Ok((stats, keep.then(|| SumsSaved { sums, scales: scales.to_vec(), others })))
}

/// Writes a plane's sums at scale `s` (`x[i] == sums[i] as f32 * s`, bit for bit) and appends to
/// `others` the indices (`base` + plane offset) and values of those that have none in 16 bits
/// (whose written sums mean nothing).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn plane_keep_sums(
    x: &[f32],
    s: f32,
    sums: &mut [std::mem::MaybeUninit<i16>],
    base: usize,
    others: &mut Vec<(u32, f32)>,
) {
    assert_eq!(x.len(), sums.len(), "plane_keep_sums: input and output lengths differ");
    // `v * inv` is within a few units in the last place of the sum, which any rounding absorbs for
    // every sum that fits; the check below is what guarantees the value. Clamped with plain
    // compares (one `maxps` and one `minps`; NaN goes to the bottom), the rounded value converts
    // without saturating. A zero scale (all-zero codes) has the sums 0.
    let inv = if s > 0.0 { 1.0 / s } else { 0.0 };
    let code = |v: f32| {
        let t = v * inv;
        let t = if t > -32767.0 { t } else { -32767.0 };
        let t = if t < 32767.0 { t } else { 32767.0 };
        // SAFETY: `t` is in [-32767, 32767], never NaN, after the clamp above, and so is its
        // rounding.
        let q = unsafe { t.round_ties_even().to_int_unchecked::<i32>() } as i16;
        (q, (f32::from(q) * s).to_bits() != v.to_bits())
    };
    // Lane-wise flags, looked at once per plane: a plane with a value outside the sums (rare) is
    // searched again for it, in L1.
    let mut bad = [0u32; 16];
    let (xc, xr) = x.as_chunks::<16>();
    let (sc, sr) = sums.as_chunks_mut::<16>();
    for (xv, sv) in xc.iter().zip(sc) {
        for l in 0..16 {
            let (q, b) = code(xv[l]);
            sv[l].write(q);
            bad[l] |= u32::from(b);
        }
    }
    for (l, (&v, o)) in xr.iter().zip(sr).enumerate() {
        let (q, b) = code(v);
        o.write(q);
        bad[l] |= u32::from(b);
    }
    if bad.iter().any(|&b| b != 0) {
        for (i, &v) in x.iter().enumerate() {
            if code(v).1 {
                others.push(((base + i) as u32, v));
            }
        }
    }
}

/// Planes per task of the passes that run over whole planes in memory order: enough for a few
/// thousand values, since at MobileNetV2's 4x4 planes a task per plane costs more than its work.
fn planes_per_task(d: NchwDims) -> usize {
    (4096 / d.hw).max(1)
}

/// Evaluation forward with running statistics; returns the largest `|y|` written (NaN ignored).
pub fn forward_eval<'y>(
    d: NchwDims,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    relu: Option<f32>,
    y: impl Into<Out<'y>>,
) -> Result<f32> {
    let y = y.into();
    d.check(&[
        ("batch norm input", x.len(), d.len()),
        ("gamma", gamma.len(), d.c),
        ("beta", beta.len(), d.c),
        ("running mean", running_mean.len(), d.c),
        ("running variance", running_var.len(), d.c),
        ("batch norm output", y.len(), d.len()),
    ])?;
    let scale: Vec<f32> = (0..d.c).map(|ch| gamma[ch] / (running_var[ch] + eps).sqrt()).collect();
    let shift: Vec<f32> = (0..d.c).map(|ch| beta[ch] - running_mean[ch] * scale[ch]).collect();
    Ok(affine(d, x, &scale, &shift, relu, y))
}

/// `y = x * scale[c] + shift[c]`, optionally clamped to `[0, cap]`, per plane in parallel; returns
/// the largest `|y|` (NaN ignored; a maximum, so the same whatever the threads' order).
fn affine(d: NchwDims, x: &[f32], scale: &[f32], shift: &[f32], relu: Option<f32>, y: Out<'_>) -> f32 {
    let per = planes_per_task(d);
    y.par_fills(per * d.hw)
        .zip(x.par_chunks(per * d.hw))
        .enumerate()
        .map(|(t, (ys, xs))| {
            ys.chunks(d.hw).zip(xs.chunks(d.hw)).enumerate().fold(0.0f32, |m, (j, (yp, xp))| {
                let ch = (t * per + j) % d.c;
                m.max(plane_affine(yp, xp, scale[ch], shift[ch], relu))
            })
        })
        .reduce(|| 0.0, f32::max)
}

/// Gradients of a training forward pass: returns `(dgamma, dbeta)` and writes `dx`. With a fused
/// activation (`relu`, the forward's cap), `dy` is masked where the forward pass clipped,
/// recomputed from `x` and the forward's `scale` and `shift` with the same arithmetic, so the mask
/// is exactly the forward's.
pub fn backward<'x>(
    d: NchwDims,
    x: &[f32],
    relu: Option<f32>,
    dy: &[f32],
    gamma: &[f32],
    stats: &BatchStats,
    dx: impl Into<Out<'x>>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    backward_from(d, Input::F32(x), relu, dy, gamma, stats, dx.into())
}

/// [`backward`] from what [`forward_train_sums`] kept, which gives the input back exactly: the
/// same gradients, bit for bit, each plane decoded where it is read.
pub fn backward_sums<'x>(
    d: NchwDims,
    saved: &SumsSaved,
    relu: Option<f32>,
    dy: &[f32],
    gamma: &[f32],
    stats: &BatchStats,
    dx: impl Into<Out<'x>>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    saved.check(d)?;
    backward_from(d, Input::Sums(saved), relu, dy, gamma, stats, dx.into())
}

fn backward_from(
    d: NchwDims,
    x: Input<'_>,
    relu: Option<f32>,
    dy: &[f32],
    gamma: &[f32],
    stats: &BatchStats,
    dx: Out<'_>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    d.check(&[
        ("batch norm input", x.len(), d.len()),
        ("batch norm output gradient", dy.len(), d.len()),
        ("batch norm input gradient", dx.len(), d.len()),
    ])?;
    crate::error::check_len("batch norm statistics", stats.scale.len(), d.c)?;
    let mask = |ch: usize| relu.map(|cap| (stats.scale[ch], stats.shift[ch], cap));
    let m = (d.n * d.hw) as f32;
    // Per channel: dbeta = sum(g), dgamma = sum(g * xhat), g = dy masked by the ReLU.
    let sums = reduce_input_planes(
        d,
        x,
        |ch, start, xp| plane_grad_sums(xp, &dy[start..][..d.hw], mask(ch), stats.mean[ch], stats.inv_std[ch]),
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    // dx = gamma * inv_std / m * (m * g - dbeta - xhat * dgamma).
    let per = planes_per_task(d);
    dx.par_fills(per * d.hw).enumerate().for_each(|(t, dxs)| {
        let planes = dxs.len() / d.hw;
        x.with_planes(d, t * per, planes, |xs| {
            for (j, (dxp, xp)) in dxs.chunks(d.hw).zip(xs.chunks(d.hw)).enumerate() {
                let p = t * per + j;
                let (ch, dyp) = (p % d.c, &dy[p * d.hw..][..d.hw]);
                let inv = stats.inv_std[ch];
                plane_dx(dxp, xp, dyp, mask(ch), stats.mean[ch], inv, gamma[ch] * inv / m, m, dbeta[ch], dgamma[ch]);
            }
        });
    });
    Ok((dgamma, dbeta))
}

/// [`backward`] from what [`forward_train_half`] kept: `xhat` in half precision and the pass
/// bits of a fused activation (the same masking as [`backward`], from the bits).
pub fn backward_half<'x>(
    d: NchwDims,
    saved: &HalfSaved,
    dy: &[f32],
    gamma: &[f32],
    stats: &BatchStats,
    dx: impl Into<Out<'x>>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let dx = dx.into();
    let words = d.hw.div_ceil(64);
    d.check(&[
        ("batch norm saved input", saved.xhat.len(), d.len()),
        ("batch norm output gradient", dy.len(), d.len()),
        ("batch norm input gradient", dx.len(), d.len()),
    ])?;
    if let Some(p) = &saved.passes {
        crate::error::check_len("batch norm pass bits", p.len(), d.n * d.c * words)?;
    }
    crate::error::check_len("batch norm statistics", stats.inv_std.len(), d.c)?;
    let bits = |plane: usize| saved.passes.as_ref().map(|p| &p[plane * words..][..words]);
    let m = (d.n * d.hw) as f32;
    let sums = reduce_planes(
        d,
        |_, start| {
            let r = start..start + d.hw;
            plane_grad_sums_half(&saved.xhat[r.clone()], &dy[r], bits(start / d.hw))
        },
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    dx.par_chunks(d.hw).enumerate().for_each(|(p, dxp)| {
        let ch = p % d.c;
        let r = p * d.hw..(p + 1) * d.hw;
        let k = gamma[ch] * stats.inv_std[ch] / m;
        plane_dx_half(dxp, &saved.xhat[r.clone()], &dy[r], bits(p), k, m, dbeta[ch], dgamma[ch]);
    });
    Ok((dgamma, dbeta))
}

/// `(sum g, sum g * xhat)` over a plane as [`plane_grad_sums`], `xhat` in half precision and `g`
/// masked by the pass bits when given.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn plane_grad_sums_half(xhat: &[u16], dy: &[f32], bits: Option<&[u64]>) -> (f64, f64) {
    let (mut sb, mut sg) = ([0.0f32; 16], [0.0f32; 16]);
    let n = xhat.len().min(dy.len());
    let (hc, hr) = xhat[..n].as_chunks::<16>();
    let (dc, dr) = dy[..n].as_chunks::<16>();
    for (b, (hv, dv)) in hc.iter().zip(dc).enumerate() {
        let m = lane_bits(bits, b);
        for l in 0..16 {
            let g = if (m >> l) & 1 != 0 { dv[l] } else { 0.0 };
            sb[l] += g;
            sg[l] += g * crate::half::value(hv[l]);
        }
    }
    let (m, mut tail) = (lane_bits(bits, hc.len()), (0.0f64, 0.0f64));
    for (l, (&h, &g)) in hr.iter().zip(dr).enumerate() {
        let g = if (m >> l) & 1 != 0 { g } else { 0.0 };
        tail.0 += g as f64;
        tail.1 += (g * crate::half::value(h)) as f64;
    }
    (lanes_sum(sb) + tail.0, lanes_sum(sg) + tail.1)
}

/// The pass bits of values `16 * group..16 * group + 16` of a plane (all set without a mask),
/// in the low half of a `u32`: a lane's bit is then a 32-bit shift, which vectorises.
#[inline(always)]
fn lane_bits(bits: Option<&[u64]>, group: usize) -> u32 {
    match bits {
        None => u32::MAX,
        Some(w) => w.get(group / 4).map_or(0, |&w| (w >> (16 * (group % 4))) as u32 & 0xffff),
    }
}

/// `dx = k * (m * g - dbeta - xhat * dgamma)` over a plane as [`plane_dx`], `xhat` in half
/// precision and `g` masked by the pass bits when given.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn plane_dx_half(dx: &mut [f32], xhat: &[u16], dy: &[f32], bits: Option<&[u64]>, k: f32, m: f32, db: f32, dg: f32) {
    let n = dx.len().min(xhat.len()).min(dy.len());
    let (oc, or) = dx[..n].as_chunks_mut::<16>();
    let (hc, hr) = xhat[..n].as_chunks::<16>();
    let (dc, dr) = dy[..n].as_chunks::<16>();
    for (b, ((o, hv), dv)) in oc.iter_mut().zip(hc).zip(dc).enumerate() {
        let mask = lane_bits(bits, b);
        for l in 0..16 {
            let g = if (mask >> l) & 1 != 0 { dv[l] } else { 0.0 };
            o[l] = k * (m * g - db - crate::half::value(hv[l]) * dg);
        }
    }
    let mask = lane_bits(bits, oc.len());
    for (l, ((o, &h), &g)) in or.iter_mut().zip(hr).zip(dr).enumerate() {
        let g = if (mask >> l) & 1 != 0 { g } else { 0.0 };
        *o = k * (m * g - db - crate::half::value(h) * dg);
    }
}

/// Gradients of the evaluation forward pass ([`forward_eval`]: running statistics, which take no
/// gradient; a frozen batch norm, as detection backbones train with): returns `(dgamma, dbeta)`
/// and writes `dx = g * gamma / sqrt(var + eps)`, `g` being `dy` masked where the fused activation
/// clipped (recomputed from `x` with the forward's own arithmetic).
pub fn backward_eval<'x>(
    d: NchwDims,
    x: &[f32],
    relu: Option<f32>,
    dy: &[f32],
    gamma: &[f32],
    beta: &[f32],
    (running_mean, running_var): (&[f32], &[f32]),
    eps: f32,
    dx: impl Into<Out<'x>>,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let dx = dx.into();
    d.check(&[
        ("batch norm input", x.len(), d.len()),
        ("batch norm output gradient", dy.len(), d.len()),
        ("batch norm input gradient", dx.len(), d.len()),
        ("gamma", gamma.len(), d.c),
        ("beta", beta.len(), d.c),
        ("running mean", running_mean.len(), d.c),
        ("running variance", running_var.len(), d.c),
    ])?;
    // The forward's scale and shift, computed as forward_eval computes them.
    let scale: Vec<f32> = (0..d.c).map(|ch| gamma[ch] / (running_var[ch] + eps).sqrt()).collect();
    let shift: Vec<f32> = (0..d.c).map(|ch| beta[ch] - running_mean[ch] * scale[ch]).collect();
    let inv: Vec<f32> = running_var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    let mask = |ch: usize| relu.map(|cap| (scale[ch], shift[ch], cap));
    let sums = reduce_planes(
        d,
        |ch, start| {
            let r = start..start + d.hw;
            plane_grad_sums(&x[r.clone()], &dy[r], mask(ch), running_mean[ch], inv[ch])
        },
        |a, b| (a.0 + b.0, a.1 + b.1),
    );
    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    // dx = scale * g: plane_dx's formula with m = 1 and no statistics terms.
    dx.par_fills(d.hw).enumerate().for_each(|(p, dxp)| {
        let ch = p % d.c;
        let r = p * d.hw..(p + 1) * d.hw;
        plane_dx(dxp, &x[r.clone()], &dy[r], mask(ch), running_mean[ch], inv[ch], scale[ch], 1.0, 0.0, 0.0);
    });
    Ok((dgamma, dbeta))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::CounterRng;

    #[test]
    fn evaluation_backward_matches_finite_differences_of_the_f64_forward() {
        let d = NchwDims { n: 2, c: 3, hw: 9 };
        for relu in [None, Some(f32::INFINITY), Some(1.0)] {
            let x = data(d.len(), 11, 0.5);
            let (gamma, beta) = (data(d.c, 12, 1.0), data(d.c, 13, 0.0));
            let (mean, var) = (data(d.c, 14, 0.2), data(d.c, 15, 3.0));
            let r = data(d.len(), 16, 0.0);
            let eps = 1e-5f32;
            let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
                let mut total = 0.0;
                for (k, &xv) in x.iter().enumerate() {
                    let ch = (k / d.hw) % d.c;
                    let mut y = g[ch] * (xv - mean[ch] as f64) / (var[ch] as f64 + eps as f64).sqrt() + b[ch];
                    if let Some(cap) = relu {
                        y = y.max(0.0).min(cap as f64);
                    }
                    total += y * r[k] as f64;
                }
                total
            };
            let mut y = vec![0.0; d.len()];
            forward_eval(d, &x, &gamma, &beta, &mean, &var, eps, relu, &mut y).unwrap();
            if let Some(cap) = relu.filter(|c| c.is_finite()) {
                assert!(y.contains(&0.0) && y.contains(&cap), "the data must reach both clamps");
            }
            let mut dx = vec![0.0; d.len()];
            let (dgamma, dbeta) = backward_eval(d, &x, relu, &r, &gamma, &beta, (&mean, &var), eps, &mut dx).unwrap();
            let f64s = |v: &[f32]| v.iter().map(|&a| a as f64).collect::<Vec<f64>>();
            let (x64, g64, b64) = (f64s(&x), f64s(&gamma), f64s(&beta));
            let h = 1e-4;
            let fd = |i: usize, which: usize| {
                let (mut p, mut m) = ([x64.clone(), g64.clone(), b64.clone()], [x64.clone(), g64.clone(), b64.clone()]);
                p[which][i] += h;
                m[which][i] -= h;
                (loss(&p[0], &p[1], &p[2]) - loss(&m[0], &m[1], &m[2])) / (2.0 * h)
            };
            for i in 0..d.len() {
                // Away from the clamps' kinks the loss is smooth in x.
                let yv = y[i];
                if relu.is_some() && (yv.abs() < 1e-3 || relu.is_some_and(|c| (yv - c).abs() < 1e-3)) {
                    continue;
                }
                assert!((fd(i, 0) - dx[i] as f64).abs() < 1e-3, "dx[{i}] {relu:?}: {} vs {}", fd(i, 0), dx[i]);
            }
            for ch in 0..d.c {
                assert!((fd(ch, 1) - dgamma[ch] as f64).abs() < 1e-3, "dgamma[{ch}] {relu:?}");
                assert!((fd(ch, 2) - dbeta[ch] as f64).abs() < 1e-3, "dbeta[{ch}] {relu:?}");
            }
        }
    }

    fn data(n: usize, seed: u64, offset: f32) -> Vec<f32> {
        let r = CounterRng::new(seed);
        (0..n).map(|i| r.uniform(i as u64) * 4.0 - 2.0 + offset).collect()
    }

    /// The loss `sum(r * bn(x))` in f64, straight from the definition.
    fn loss_f64(d: NchwDims, x: &[f64], gamma: &[f64], beta: &[f64], eps: f64, relu: Option<f32>, r: &[f32]) -> f64 {
        let mut total = 0.0;
        for ch in 0..d.c {
            let idx: Vec<usize> =
                (0..d.n).flat_map(|i| ((i * d.c + ch) * d.hw)..((i * d.c + ch) * d.hw + d.hw)).collect();
            let m = idx.len() as f64;
            let mean = idx.iter().map(|&k| x[k]).sum::<f64>() / m;
            let var = idx.iter().map(|&k| (x[k] - mean).powi(2)).sum::<f64>() / m;
            for &k in &idx {
                let mut y = gamma[ch] * (x[k] - mean) / (var + eps).sqrt() + beta[ch];
                if let Some(cap) = relu {
                    y = y.max(0.0).min(cap as f64);
                }
                total += y * r[k] as f64;
            }
        }
        total
    }

    #[test]
    fn training_forward_and_backward_match_f64_and_finite_differences() {
        let d = NchwDims { n: 3, c: 4, hw: 10 };
        // No activation, ReLU, and a clamp at 1 (ReLU6's shape) that clips many values.
        for relu in [None, Some(f32::INFINITY), Some(1.0)] {
            // An offset of 100 checks the two-pass statistics.
            let x = data(d.len(), 1, 100.0);
            let (gamma, beta) = (data(d.c, 2, 1.0), data(d.c, 3, 0.0));
            let r = data(d.len(), 4, 0.0);
            let eps = 1e-5;
            let mut y = vec![0.0; d.len()];
            let st = forward_train(d, &x, &gamma, &beta, eps, relu, &mut y).unwrap();
            // Forward against f64.
            for ch in 0..d.c {
                let vals: Vec<f64> = d.planes(&x, ch).flatten().map(|&v| v as f64).collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                assert!((st.mean[ch] as f64 - mean).abs() < 1e-4, "mean");
                assert!((st.var[ch] as f64 - var).abs() < 1e-3 * var, "var {} vs {var}", st.var[ch]);
            }
            // The backward pass's ReLU mask, recomputed from x, is the forward output's.
            for (k, (&xv, &yv)) in x.iter().zip(&y).enumerate() {
                let Some(cap) = relu else { break };
                let ch = (k / d.hw) % d.c;
                assert_eq!(passes(xv, (st.scale[ch], st.shift[ch], cap)), yv > 0.0 && yv < cap, "mask at {k}");
            }
            if let Some(cap) = relu.filter(|c| c.is_finite()) {
                let (low, high) = (y.iter().filter(|&&v| v == 0.0).count(), y.iter().filter(|&&v| v == cap).count());
                assert!(low > 0 && high > 0, "the test data must reach both clamps: {low} at 0, {high} at {cap}");
            }
            let mut dx = vec![0.0; d.len()];
            let (dgamma, dbeta) = backward(d, &x, relu, &r, &gamma, &st, &mut dx).unwrap();
            let f = |x: &[f64], g: &[f64], b: &[f64]| loss_f64(d, x, g, b, eps as f64, relu, &r);
            let (x64, g64, b64): (Vec<f64>, Vec<f64>, Vec<f64>) = (
                x.iter().map(|&v| v as f64).collect(),
                gamma.iter().map(|&v| v as f64).collect(),
                beta.iter().map(|&v| v as f64).collect(),
            );
            let h = 1e-4;
            for i in [0, 7, 19, d.len() - 1] {
                let (mut p, mut q) = (x64.clone(), x64.clone());
                p[i] += h;
                q[i] -= h;
                let fd = (f(&p, &g64, &b64) - f(&q, &g64, &b64)) / (2.0 * h);
                assert!(
                    (fd - dx[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                    "relu={relu:?} dx[{i}]: {fd} vs {}",
                    dx[i]
                );
            }
            for ch in 0..d.c {
                let (mut p, mut q) = (g64.clone(), g64.clone());
                p[ch] += h;
                q[ch] -= h;
                let fd = (f(&x64, &p, &b64) - f(&x64, &q, &b64)) / (2.0 * h);
                assert!(
                    (fd - dgamma[ch] as f64).abs() < 1e-3 * (1.0 + fd.abs()),
                    "dgamma[{ch}]: {fd} vs {}",
                    dgamma[ch]
                );
                let (mut p, mut q) = (b64.clone(), b64.clone());
                p[ch] += h;
                q[ch] -= h;
                let fd = (f(&x64, &g64, &p) - f(&x64, &g64, &q)) / (2.0 * h);
                assert!((fd - dbeta[ch] as f64).abs() < 1e-3 * (1.0 + fd.abs()), "dbeta[{ch}]: {fd} vs {}", dbeta[ch]);
            }
        }
    }

    /// A shape whose reductions span several image blocks of unequal size (40 images in 32
    /// blocks) and several channel runs (16, 16 and 8 planes of 1000 values), against f64 sums
    /// straight from the definitions, and the same bits whatever the number of threads.
    #[test]
    fn blocked_reductions_match_f64_and_do_not_depend_on_threads() {
        let d = NchwDims { n: 40, c: 40, hw: 1000 };
        assert!(d.n > IMAGE_BLOCKS && d.c * d.hw > TASK_RUN && !d.c.is_multiple_of(TASK_RUN / d.hw));
        let x = data(d.len(), 6, 50.0);
        let dy = data(d.len(), 7, 0.0);
        let (gamma, beta) = (data(d.c, 8, 1.0), data(d.c, 9, 0.0));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut y = vec![0.0; d.len()];
                let st = forward_train(d, &x, &gamma, &beta, 1e-5, Some(6.0), &mut y).unwrap();
                let mut dx = vec![0.0; d.len()];
                let (dgamma, dbeta) = backward(d, &x, Some(6.0), &dy, &gamma, &st, &mut dx).unwrap();
                (st, y, dx, dgamma, dbeta)
            })
        };
        let one = run(1);
        assert!(one == run(3), "results differ between 1 and 3 threads");
        let (st, _, _, dgamma, dbeta) = one;
        for ch in 0..d.c {
            let vals: Vec<f64> = d.planes(&x, ch).flatten().map(|&v| v as f64).collect();
            let m = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / m;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m;
            assert!((st.mean[ch] as f64 - mean).abs() < 1e-5 * mean.abs(), "mean[{ch}] {} vs {mean}", st.mean[ch]);
            assert!((st.var[ch] as f64 - var).abs() < 1e-5 * var, "var[{ch}] {} vs {var}", st.var[ch]);
            // dbeta and dgamma: sums of the masked gradient and of its product with x-hat.
            let (mut db, mut dg) = (0.0f64, 0.0f64);
            for (xp, gp) in d.planes(&x, ch).zip(d.planes(&dy, ch)) {
                for (&xv, &g) in xp.iter().zip(gp) {
                    let xhat = (xv as f64 - mean) / (var + 1e-5).sqrt();
                    // The forward's own mask (checked against its output in the test above): an
                    // f64 clamp would differ at values within rounding of 0 or 6.
                    if passes(xv, (st.scale[ch], st.shift[ch], 6.0)) {
                        db += g as f64;
                        dg += g as f64 * xhat;
                    }
                }
            }
            assert!((dbeta[ch] as f64 - db).abs() < 1e-4 * (1.0 + db.abs()), "dbeta[{ch}] {} vs {db}", dbeta[ch]);
            assert!((dgamma[ch] as f64 - dg).abs() < 1e-4 * (1.0 + dg.abs()), "dgamma[{ch}] {} vs {dg}", dgamma[ch]);
        }
    }

    /// Keeping `xhat` in half precision: the forward pass's output and statistics are
    /// [`forward_train`]'s bit for bit; the kept `xhat` is within half precision's rounding of the
    /// f64 definition and the pass bits are the forward's mask; the gradients are within 2e-3
    /// of the largest (relative to [`backward`]'s from the f32 input, and to f64 sums from the
    /// definitions), the same whatever the thread count; planes of lengths below, at and above
    /// a multiple of 64.
    #[test]
    fn keeping_xhat_in_half_precision_changes_only_the_gradients_rounding() {
        for (d, seed) in [
            (NchwDims { n: 3, c: 4, hw: 10 }, 1),
            (NchwDims { n: 5, c: 3, hw: 64 }, 2),
            (NchwDims { n: 4, c: 6, hw: 1000 }, 3),
            (NchwDims { n: 40, c: 5, hw: 49 }, 4),
        ] {
            for relu in [None, Some(f32::INFINITY), Some(1.0)] {
                let x = data(d.len(), seed, 30.0);
                let dy = data(d.len(), seed + 10, 0.0);
                let (gamma, beta) = (data(d.c, seed + 20, 1.0), data(d.c, seed + 30, 0.0));
                let mut y_ref = vec![0.0; d.len()];
                let st_ref = forward_train(d, &x, &gamma, &beta, 1e-5, relu, &mut y_ref).unwrap();
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    pool.install(|| {
                        let mut y = vec![0.0; d.len()];
                        let (st, saved) = forward_train_half(d, &x, &gamma, &beta, 1e-5, relu, &mut y).unwrap();
                        let mut dx = vec![0.0; d.len()];
                        let (dg, db) = backward_half(d, &saved, &dy, &gamma, &st, &mut dx).unwrap();
                        (y, st, saved, dx, dg, db)
                    })
                };
                let one = run(1);
                assert!(one == run(3), "{d:?} {relu:?}: results differ between 1 and 3 threads");
                let (y, st, saved, dx, dgamma, dbeta) = one;
                let what = format!("{d:?} {relu:?}");
                assert!(y.iter().zip(&y_ref).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: output");
                assert_eq!(st, st_ref, "{what}: statistics");
                assert_eq!(saved.bytes(), 2 * d.len() + relu.map_or(0, |_| 8 * d.n * d.c * d.hw.div_ceil(64)));
                let words = d.hw.div_ceil(64);
                for (k, &xv) in x.iter().enumerate() {
                    let ch = (k / d.hw) % d.c;
                    let exact = (xv as f64 - st.mean[ch] as f64) * st.inv_std[ch] as f64;
                    let kept = crate::half::value(saved.xhat[k]) as f64;
                    assert!((kept - exact).abs() <= exact.abs() * 2f64.powi(-11) + 1e-6, "{what}: xhat[{k}]");
                    if let (Some(cap), Some(bits)) = (relu, &saved.passes) {
                        let (p, i) = (k / d.hw, k % d.hw);
                        let bit = (bits[p * words + i / 64] >> (i % 64)) & 1 == 1;
                        assert_eq!(bit, passes(xv, (st.scale[ch], st.shift[ch], cap)), "{what}: pass bit {k}");
                    }
                }
                let mut dx_ref = vec![0.0; d.len()];
                let (dg_ref, db_ref) = backward(d, &x, relu, &dy, &gamma, &st, &mut dx_ref).unwrap();
                let close = |what: &str, got: &[f32], want: &[f32]| {
                    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
                    for (i, (g, w)) in got.iter().zip(want).enumerate() {
                        assert!((g - w).abs() <= 2e-3 * scale, "{what}[{i}]: {g} vs {w} (largest {scale})");
                    }
                };
                close(&format!("{what}: dx"), &dx, &dx_ref);
                close(&format!("{what}: dgamma"), &dgamma, &dg_ref);
                close(&format!("{what}: dbeta"), &dbeta, &db_ref);
                // dbeta and dgamma from the definitions in f64.
                for ch in 0..d.c {
                    let vals: Vec<f64> = d.planes(&x, ch).flatten().map(|&v| v as f64).collect();
                    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                    let (mut db, mut dg, mut scale) = (0.0f64, 0.0f64, 0.0f64);
                    for (xp, gp) in d.planes(&x, ch).zip(d.planes(&dy, ch)) {
                        for (&xv, &g) in xp.iter().zip(gp) {
                            if relu.is_none_or(|cap| passes(xv, (st.scale[ch], st.shift[ch], cap))) {
                                db += g as f64;
                                dg += g as f64 * (xv as f64 - mean) / (var + 1e-5).sqrt();
                                scale += (g as f64).abs();
                            }
                        }
                    }
                    assert!((dbeta[ch] as f64 - db).abs() <= 1e-5 * scale + 1e-6, "{what}: dbeta[{ch}]");
                    assert!((dgamma[ch] as f64 - dg).abs() <= 2e-3 * scale + 1e-6, "{what}: dgamma[{ch}]");
                }
            }
        }
        let d = NchwDims { n: 2, c: 2, hw: 3 };
        let saved = HalfSaved { xhat: vec![0; 5], passes: None };
        let err = backward_half(d, &saved, &[0.0; 12], &[1.0; 2], &st_for(d), &mut [0.0; 12]).unwrap_err();
        assert!(err.to_string().contains("saved input"), "{err}");
        let saved = HalfSaved { xhat: vec![0; 12], passes: Some(vec![0; 3]) };
        let err = backward_half(d, &saved, &[0.0; 12], &[1.0; 2], &st_for(d), &mut [0.0; 12]).unwrap_err();
        assert!(err.to_string().contains("pass bits"), "{err}");
    }

    fn st_for(d: NchwDims) -> BatchStats {
        let x = data(d.len(), 9, 0.0);
        forward_train(d, &x, &vec![1.0; d.c], &vec![0.0; d.c], 1e-5, None, &mut vec![0.0; d.len()]).unwrap()
    }

    #[test]
    fn eval_uses_running_statistics() {
        let d = NchwDims { n: 2, c: 2, hw: 3 };
        let x = data(d.len(), 5, 0.0);
        let mut y = vec![0.0; d.len()];
        forward_eval(d, &x, &[2.0, 1.0], &[0.5, -1.0], &[1.0, -1.0], &[4.0, 0.25], 0.0, None, &mut y).unwrap();
        for (k, (&yv, &xv)) in y.iter().zip(&x).enumerate() {
            let ch = (k / d.hw) % d.c;
            let want = if ch == 0 { 2.0 * (xv - 1.0) / 2.0 + 0.5 } else { (xv + 1.0) / 0.5 - 1.0 };
            assert!((yv - want).abs() < 1e-5);
        }
        assert!(forward_eval(d, &x, &[1.0], &[0.0, 0.0], &[0.0; 2], &[1.0; 2], 1e-5, None, &mut y).is_err());
    }

    /// The largest |y| the output pass reports is the quantizer's own `max_abs` of the output,
    /// exactly, at every activation and at planes of odd lengths (the 16-lane loop's remainder).
    #[test]
    fn the_reported_output_maximum_is_the_quantizers_own() {
        for (d, seed) in [(NchwDims { n: 3, c: 5, hw: 49 }, 1), (NchwDims { n: 2, c: 3, hw: 16 }, 2)] {
            let x = data(d.len(), seed, 0.3);
            let gamma: Vec<f32> = (0..d.c).map(|c| if c == 1 { -1.7 } else { 0.5 + c as f32 }).collect();
            let beta: Vec<f32> = (0..d.c).map(|c| 0.2 * c as f32 - 0.4).collect();
            for relu in [None, Some(f32::INFINITY), Some(6.0), Some(0.25)] {
                let mut y = vec![0.0; d.len()];
                let st = forward_train(d, &x, &gamma, &beta, 1e-5, relu, &mut y).unwrap();
                let want = crate::quant::max_abs("y", &y).unwrap();
                assert_eq!(st.max_abs_out.unwrap().to_bits(), want.to_bits(), "{d:?} {relu:?}");
                let (rm, rv) = (vec![0.1; d.c], vec![0.7; d.c]);
                let got = forward_eval(d, &x, &gamma, &beta, &rm, &rv, 1e-5, relu, &mut y).unwrap();
                assert_eq!(got.to_bits(), crate::quant::max_abs("y", &y).unwrap().to_bits(), "{d:?} {relu:?}");
            }
        }
    }

    /// A plane's sums (`plane_keep_sums`) against an f64 search of each value's sum, at every
    /// alignment of the sums and at plane lengths around the 16-value steps, with NaN, infinities,
    /// -0.0, values off the grid and wide sums among the values: each value with a 16-bit sum gets
    /// it, the others are listed (with the index base added).
    #[test]
    fn plane_sums_are_each_values_sum_at_every_alignment() {
        let s = 0.0123f32;
        let r = CounterRng::new(11);
        let x: Vec<f32> = (0..300)
            .map(|i| match i % 37 {
                3 => f32::NAN,
                5 => f32::INFINITY,
                7 => -0.0,
                11 => 0.77,
                13 => 50000.0 * s,
                _ => (((r.uniform(i as u64) - 0.5) * 60000.0) as i32) as f32 * s,
            })
            .collect();
        let sum_of = |v: f32| {
            let near = (v as f64 / s as f64).round();
            [near - 1.0, near, near + 1.0]
                .into_iter()
                .find(|&q| q.abs() <= 32767.0 && (f32::from(q as i16) * s).to_bits() == v.to_bits())
                .map(|q| q as i16)
        };
        let mut checked = (0, 0);
        for start in 0..32 {
            for len in [0, 1, 15, 16, 17, 31, 32, 33, 100, 200] {
                let xs = &x[start..start + len];
                let mut buf = vec![std::mem::MaybeUninit::new(0i16); 300];
                let mut others = Vec::new();
                plane_keep_sums(xs, s, &mut buf[start..start + len], 9, &mut others);
                let mut want_others = Vec::new();
                for (i, &v) in xs.iter().enumerate() {
                    match sum_of(v) {
                        // SAFETY: the buffer was initialised when made.
                        Some(q) => assert_eq!(unsafe { buf[start + i].assume_init() }, q, "{start} {len} {i}"),
                        None => want_others.push((9 + i as u32, v.to_bits())),
                    }
                }
                let got: Vec<_> = others.iter().map(|&(i, v)| (i, v.to_bits())).collect();
                assert_eq!(got, want_others, "start {start}, len {len}");
                checked = (checked.0 + len - want_others.len(), checked.1 + want_others.len());
            }
        }
        assert!(checked.0 > 4 * checked.1 && checked.1 > 0, "{checked:?}");
    }

    /// An INT8 convolution's output kept as its 16-bit sums gives the input back bit for bit:
    /// sums that fit, sums beyond 16 bits, values that are no sum times the scale, and a zero
    /// scale (an all-zero input) among them, at planes of odd lengths; the output and the
    /// statistics are forward_train's exactly, and so are the backward pass's gradients. An input
    /// of arbitrary floats is not kept this way.
    #[test]
    fn sums_give_the_convolution_output_back_exactly() {
        // The second shape takes several tasks of the passes over runs of planes, and more
        // images than the reductions have blocks.
        for d in [NchwDims { n: 3, c: 4, hw: 37 }, NchwDims { n: 45, c: 4, hw: 37 }] {
            sums_give_back_exactly(d);
        }
    }

    fn sums_give_back_exactly(d: NchwDims) {
        let r = CounterRng::new(7);
        let scales = [0.013f32, 2.5e-6, 0.0, 1.0 / 3.0];
        let mut x: Vec<f32> = (0..d.len())
            .map(|i| {
                let ch = (i / d.hw) % d.c;
                // Sums of a 3x3 convolution over 64 channels reach 2.3 million; most are far smaller.
                let u = r.uniform(i as u64);
                let sum = if u < 0.02 { (u * 1.0e8) as i32 - 1_000_000 } else { ((u - 0.5) * 60000.0) as i32 };
                // A zero scale comes of all-zero codes, whose sums are 0.
                if scales[ch] == 0.0 { 0.0 } else { sum as f32 * scales[ch] }
            })
            .collect();
        let odd = [(5usize, 0.1234f32), (d.hw + 3, 1e30), (2 * d.hw, -0.0), (d.len() - 1, 7.77)];
        for &(i, v) in &odd {
            x[i] = v;
        }
        let (gamma, beta) = (data(d.c, 3, 1.0), data(d.c, 4, 0.0));
        for relu in [None, Some(f32::INFINITY), Some(6.0)] {
            let (mut y, mut want_y) = (vec![0.0; d.len()], vec![0.0; d.len()]);
            let want = forward_train(d, &x, &gamma, &beta, 1e-5, relu, &mut want_y).unwrap();
            let (st, kept) = forward_train_sums(d, &x, &gamma, &beta, 1e-5, relu, &scales, &mut y).unwrap();
            assert_eq!(st, want, "{relu:?}");
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want_y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            let kept = kept.expect("an INT8 convolution's output is kept as sums");
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&kept.restore(d).unwrap()), bits(&x));
            // The backward pass from the sums is the f32 input's, bit for bit.
            let dy = data(d.len(), 5, 0.0);
            let (mut want_dx, mut dx) = (vec![0.0; d.len()], vec![0.0; d.len()]);
            let want = backward(d, &x, relu, &dy, &gamma, &st, &mut want_dx).unwrap();
            let got = backward_sums(d, &kept, relu, &dy, &gamma, &st, &mut dx).unwrap();
            assert_eq!((bits(&got.0), bits(&got.1), bits(&dx)), (bits(&want.0), bits(&want.1), bits(&want_dx)));
            // Beside the sums: exactly the values that are no 16-bit sum times their scale, by an
            // f64 search of the nearest sums.
            let beside: Vec<u32> = (0..d.len() as u32)
                .filter(|&i| {
                    let (v, s) = (x[i as usize], scales[(i as usize / d.hw) % d.c]);
                    // A zero scale's sums are 0 (all-zero codes): its one value is +0.0.
                    let near = if s > 0.0 { (v as f64 / s as f64).round() } else { 0.0 };
                    let tries = if s > 0.0 { [near - 1.0, near, near + 1.0] } else { [0.0; 3] };
                    !tries.iter().any(|&q| q.abs() <= 32767.0 && ((q as f32) * s).to_bits() == v.to_bits())
                })
                .collect();
            assert_eq!(kept.others.iter().map(|o| o.0).collect::<Vec<_>>(), beside, "{relu:?}");
            assert!(beside.len() > odd.len(), "the data must hold wide sums too");
            assert!(kept.others.windows(2).all(|w| w[0].0 < w[1].0), "by increasing index");
            assert!(kept.bytes() < 4 * d.len() * 3 / 4);
        }
        let noise = data(d.len(), 9, 0.0);
        let (_, kept) =
            forward_train_sums(d, &noise, &gamma, &beta, 1e-5, None, &scales, &mut vec![0.0; d.len()]).unwrap();
        assert!(kept.is_none(), "arbitrary floats are not sums");
        assert!(forward_train_sums(d, &x, &gamma, &beta, 1e-5, None, &scales[..3], &mut vec![0.0; d.len()]).is_err());
    }
}
