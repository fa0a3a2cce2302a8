//! Symmetric linear INT8 quantization (Zhu et al., CVPR 2020, Sec. 3, Eq. 1).
//!
//! A value `x` with clipping value `c` is stored as `q = clamp(round(x / s), -127, 127)` with scale
//! `s = c / 127`, and read back as `q * s`. The range is symmetric, so `-128` is never produced and
//! every product of two codes fits the INT8 GEMMs' exactness bounds. Rounding is to the nearest code
//! (ties to even) or stochastic (`floor(x / s + u)`, `u` uniform in `[0, 1)`, which is unbiased
//! inside the clip range). Scales are per tensor, or per output channel (the outermost dimension)
//! for weights.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::error::{CoreError, Result};
use crate::rng::CounterRng;

/// The largest code magnitude: codes lie in `[-QMAX, QMAX]`.
pub const QMAX: f32 = 127.0;

/// Elements per parallel work item; below this a tensor is handled on the calling thread.
const CHUNK: usize = 1 << 15;

/// How a value between two codes is rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// To the nearest code, ties to even.
    Nearest,
    /// Up with probability equal to the fractional part, from a counter-based stream seeded by
    /// `seed` (vary it per step and per tensor); reproducible for a given seed.
    Stochastic {
        /// The stream's seed.
        seed: u64,
    },
}

/// How many scales a tensor gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One scale for the whole tensor.
    PerTensor,
    /// One scale per slice of the outermost dimension (per output channel for weights).
    PerChannel,
}

/// A quantized tensor: INT8 codes and their scales.
#[derive(Debug, Clone, PartialEq)]
pub struct QTensor {
    /// Codes in `[-127, 127]`, in the same layout as the source tensor.
    pub data: Vec<i8>,
    /// One scale (`c / 127`) per channel; a single entry for per-tensor quantization.
    pub scales: Vec<f32>,
    /// How many source values were clipped (|x| beyond the clip value).
    pub saturated: usize,
}

impl QTensor {
    /// Number of channels (1 for per-tensor quantization).
    pub fn channels(&self) -> usize {
        self.scales.len()
    }

    /// Elements per channel.
    pub fn channel_len(&self) -> usize {
        self.data.len() / self.scales.len().max(1)
    }

    /// The scale applying to flat element `index`.
    pub fn scale_of(&self, index: usize) -> f32 {
        self.scales[index / self.channel_len().max(1)]
    }

    /// Fraction of source values that were clipped.
    pub fn saturation_rate(&self) -> f32 {
        if self.data.is_empty() { 0.0 } else { self.saturated as f32 / self.data.len() as f32 }
    }

    /// The dequantized tensor `q * s`.
    pub fn dequantize(&self) -> Vec<f32> {
        let len = self.channel_len().max(1);
        let mut out = vec![0.0; self.data.len()];
        out.par_chunks_mut(len).zip(self.data.par_chunks(len)).zip(&self.scales).for_each(|((o, q), &s)| {
            for (o, &q) in o.iter_mut().zip(q) {
                *o = q as f32 * s;
            }
        });
        out
    }
}

/// The scale for clipping value `clip`: `clip / 127`.
#[inline]
pub fn scale_for_clip(clip: f32) -> f32 {
    clip / QMAX
}

/// Lanes of the elementwise loops: independent accumulators that the compiler keeps in one vector
/// register each, since a single float accumulator is a serial dependency chain.
pub(crate) const LANES: usize = 16;

/// `(max |v|, all finite)` over `c`, vectorised.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(crate) fn max_abs_finite(c: &[f32]) -> (f32, bool) {
    let (mut m, mut z) = ([0.0f32; LANES], [0.0f32; LANES]);
    let mut blocks = c.chunks_exact(LANES);
    for b in blocks.by_ref() {
        for l in 0..LANES {
            m[l] = m[l].max(b[l].abs());
            // `v * 0` is NaN exactly when `v` is NaN or infinite.
            z[l] += b[l] * 0.0;
        }
    }
    for &v in blocks.remainder() {
        m[0] = m[0].max(v.abs());
        z[0] += v * 0.0;
    }
    (m.iter().fold(0.0f32, |a, &b| a.max(b)), z.iter().sum::<f32>() == 0.0)
}

/// The largest magnitude in `x`, or an error naming `name` if `x` holds NaN or an infinity.
pub fn max_abs(name: &str, x: &[f32]) -> Result<f32> {
    let (amax, finite) =
        x.par_chunks(CHUNK).map(max_abs_finite).reduce(|| (0.0, true), |a, b| (a.0.max(b.0), a.1 && b.1));
    if finite { Ok(amax) } else { Err(non_finite(name, x)) }
}

/// Rounds `t` (already clamped to `[-127, 127]`) to the nearest integer, ties to even, and returns
/// it as `i8`. Adding `1.5 * 2^23` leaves the rounded integer in the low mantissa bits, which
/// vectorises where a float-to-int cast does not; NaN gives an arbitrary code and is reported by
/// the caller's finiteness check.
#[inline(always)]
pub(crate) fn round_code(t: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0;
    ((t + MAGIC).to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32) as i8
}

/// Builds the error for the first non-finite value of `x`.
fn non_finite(name: &str, x: &[f32]) -> CoreError {
    let index = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    CoreError::NonFinite { name: name.to_string(), value: x.get(index).copied().unwrap_or(f32::NAN), index }
}

/// What one quantizing pass learns besides the codes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct PassStats {
    /// Values beyond the clip value.
    pub saturated: usize,
    /// Whether every value was finite.
    pub finite: bool,
    /// `sum g * q` over the codes `q` (only when asked for).
    pub gq: f64,
    /// `sum q * q`.
    pub qq: f64,
    /// `sum g * g`.
    pub gg: f64,
}

impl PassStats {
    fn merge(self, o: PassStats) -> PassStats {
        PassStats {
            saturated: self.saturated + o.saturated,
            finite: self.finite && o.finite,
            gq: self.gq + o.gq,
            qq: self.qq + o.qq,
            gg: self.gg + o.gg,
        }
    }
}

/// Quantizes `x` with clipping value `clip` into `out` (as long as `x`; every element is
/// written), starting the stochastic stream at `offset`. Counts saturation and checks finiteness
/// on the way; with `TERMS` it also sums the products that DSGC's cosine distance needs (in f32
/// lanes, carried in f64 every 1024 values), so the distance costs no pass of its own. `clip <= 0`
/// maps everything to zero.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(crate) fn quantize_slice<const TERMS: bool>(
    x: &[f32],
    clip: f32,
    rounding: Rounding,
    offset: usize,
    out: &mut [MaybeUninit<i8>],
) -> PassStats {
    assert_eq!(x.len(), out.len(), "quantize_slice: input and output lengths differ");
    let inv = if clip > 0.0 { QMAX / clip } else { 0.0 };
    let (mut sat, mut z) = ([0u32; LANES], [0.0f32; LANES]);
    let mut stats = PassStats::default();
    let rng = match rounding {
        Rounding::Nearest => None,
        Rounding::Stochastic { seed } => Some(CounterRng::new(seed)),
    };
    for (b, (xb, ob)) in x.chunks(1024).zip(out.chunks_mut(1024)).enumerate() {
        let (mut a, mut q2, mut e) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
        let base = offset + b * 1024;
        let n = xb.len() / LANES * LANES;
        for (i, (o, v)) in ob[..n].chunks_exact_mut(LANES).zip(xb[..n].chunks_exact(LANES)).enumerate() {
            for l in 0..LANES {
                let t = v[l] * inv;
                let t = match rng {
                    None => t,
                    Some(r) => (t + r.uniform((base + i * LANES + l) as u64)).floor(),
                };
                let code = round_code(t.clamp(-QMAX, QMAX));
                sat[l] += (v[l].abs() > clip) as u32;
                z[l] += v[l] * 0.0;
                o[l] = MaybeUninit::new(code);
                if TERMS {
                    let q = code as f32;
                    a[l] += v[l] * q;
                    q2[l] += q * q;
                    e[l] += v[l] * v[l];
                }
            }
        }
        for (i, (o, &v)) in ob[n..].iter_mut().zip(&xb[n..]).enumerate() {
            let t = v * inv;
            let t = match rng {
                None => t,
                Some(r) => (t + r.uniform((base + n + i) as u64)).floor(),
            };
            let code = round_code(t.clamp(-QMAX, QMAX));
            sat[0] += (v.abs() > clip) as u32;
            z[0] += v * 0.0;
            *o = MaybeUninit::new(code);
            if TERMS {
                let q = code as f32;
                a[0] += v * q;
                q2[0] += q * q;
                e[0] += v * v;
            }
        }
        if TERMS {
            stats.gq += a.iter().map(|&v| v as f64).sum::<f64>();
            stats.qq += q2.iter().map(|&v| v as f64).sum::<f64>();
            stats.gg += e.iter().map(|&v| v as f64).sum::<f64>();
        }
    }
    stats.saturated = sat.iter().map(|&c| c as usize).sum();
    stats.finite = z.iter().sum::<f32>() == 0.0;
    stats
}

/// Quantizes `x` with clip value `clip` into a per-tensor [`QTensor`], in parallel, returning the
/// pass's statistics too (with the distance terms when `TERMS`).
pub(crate) fn quantize_pass<const TERMS: bool>(
    name: &str,
    x: &[f32],
    clip: f32,
    rounding: Rounding,
) -> Result<(QTensor, PassStats)> {
    if !clip.is_finite() || clip < 0.0 {
        return Err(CoreError::InvalidArgument {
            what: "clip value",
            why: format!("{clip} for tensor `{name}`; it must be finite and >= 0"),
        });
    }
    let mut data = Vec::with_capacity(x.len());
    let stats = data.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .map(|(i, (o, c))| quantize_slice::<TERMS>(c, clip, rounding, i * CHUNK, o))
        .reduce(|| PassStats { finite: true, ..Default::default() }, PassStats::merge);
    // SAFETY: the capacity is at least `x.len()`, and `quantize_slice` wrote every element of each
    // chunk (chunks of `x` and of the output have equal lengths, which it asserts).
    unsafe { data.set_len(x.len()) };
    if !stats.finite {
        return Err(non_finite(name, x));
    }
    Ok((QTensor { data, scales: vec![scale_for_clip(clip)], saturated: stats.saturated }, stats))
}

/// Quantizes `x` with a given clipping value (for example the DSGC clip of a gradient) into a
/// per-tensor [`QTensor`], or an error naming `name` if `x` holds NaN or an infinity.
pub fn quantize_with_clip(name: &str, x: &[f32], clip: f32, rounding: Rounding) -> Result<QTensor> {
    Ok(quantize_pass::<false>(name, x, clip, rounding)?.0)
}

/// Quantizes `x` clipping at its own largest magnitude, per tensor or per channel (the outermost
/// dimension, `channels` slices of equal length), so nothing saturates.
pub fn quantize(
    name: &str,
    x: &[f32],
    granularity: Granularity,
    channels: usize,
    rounding: Rounding,
) -> Result<QTensor> {
    match granularity {
        Granularity::PerTensor => {
            let clip = max_abs(name, x)?;
            quantize_with_clip(name, x, clip, rounding)
        }
        Granularity::PerChannel => {
            if channels == 0 || !x.len().is_multiple_of(channels) {
                return Err(CoreError::InvalidArgument {
                    what: "channel count",
                    why: format!("{} elements of `{name}` do not split into {channels} channels", x.len()),
                });
            }
            let len = x.len() / channels;
            max_abs(name, x)?;
            let mut data = Vec::with_capacity(x.len());
            let results: Vec<(f32, usize)> = data.spare_capacity_mut()[..x.len()]
                .par_chunks_mut(len.max(1))
                .zip(x.par_chunks(len.max(1)))
                .enumerate()
                .map(|(ch, (o, c))| {
                    let clip = max_abs_finite(c).0;
                    (scale_for_clip(clip), quantize_slice::<false>(c, clip, rounding, ch * len, o).saturated)
                })
                .collect();
            // SAFETY: the capacity is at least `x.len()`, and `quantize_slice` wrote every element
            // of each channel's chunk (equal lengths of input and output, which it asserts).
            unsafe { data.set_len(x.len()) };
            let scales = results.iter().map(|r| r.0).collect();
            let saturated = results.iter().map(|r| r.1).sum();
            Ok(QTensor { data, scales, saturated })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 0.7311).sin() * 3.0) + 0.01 * i as f32).collect()
    }

    #[test]
    fn nearest_matches_the_formula_in_f64() {
        let x = ramp(100_003);
        let q = quantize("x", &x, Granularity::PerTensor, 1, Rounding::Nearest).unwrap();
        let c = x.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
        let s = c / 127.0;
        for (i, &v) in x.iter().enumerate() {
            let want = (v as f64 / s).round().clamp(-127.0, 127.0);
            // Ties and the f32 division may differ from f64 by one code at exact half-way points.
            assert!((q.data[i] as f64 - want).abs() <= 1.0, "element {i}");
            assert!((q.data[i] as f64 * s - v as f64).abs() <= s * 0.5 + 1e-6 * c, "element {i}");
        }
        assert_eq!(q.saturated, 0);
        assert!(q.data.iter().any(|&v| v == 127 || v == -127));
        assert!(q.data.iter().all(|&v| v != -128));
    }

    #[test]
    fn clipping_saturates_and_counts() {
        let x = vec![-10.0, -1.0, -0.5, 0.0, 0.5, 1.0, 10.0];
        let q = quantize_with_clip("x", &x, 1.0, Rounding::Nearest).unwrap();
        assert_eq!(q.data, vec![-127, -127, -64, 0, 64, 127, 127]);
        assert_eq!(q.saturated, 2);
        assert!((q.saturation_rate() - 2.0 / 7.0).abs() < 1e-7);
        let zero = quantize_with_clip("z", &x, 0.0, Rounding::Nearest).unwrap();
        assert!(zero.data.iter().all(|&v| v == 0));
    }

    #[test]
    fn stochastic_rounding_is_unbiased_inside_the_clip_range() {
        // Values spread over the range, each quantized with 400 seeds: the mean of q*s estimates x.
        let x: Vec<f32> = (0..512).map(|i| (i as f32 / 511.0 - 0.5) * 1.9).collect();
        let clip = 1.0f32;
        let s = scale_for_clip(clip) as f64;
        let seeds = 400;
        let mut mean = vec![0.0f64; x.len()];
        for seed in 0..seeds {
            let q = quantize_with_clip("x", &x, clip, Rounding::Stochastic { seed }).unwrap();
            for (m, &v) in mean.iter_mut().zip(&q.data) {
                *m += v as f64 * s / seeds as f64;
            }
        }
        // Each code is floor or ceil, so the per-element standard error is <= s/2/sqrt(400) = s/40.
        let mut total_bias = 0.0;
        for (i, (&m, &v)) in mean.iter().zip(&x).enumerate() {
            assert!((m - v as f64).abs() < 5.0 * s / 40.0, "element {i}: mean {m} vs {v}");
            total_bias += m - v as f64;
        }
        // The average bias over 512 independent elements is tighter still.
        assert!((total_bias / x.len() as f64).abs() < 5.0 * s / 40.0 / (x.len() as f64).sqrt());
        // Nearest rounding of the same values is biased on most elements, which the test must see.
        let q = quantize_with_clip("x", &x, clip, Rounding::Nearest).unwrap();
        let nearest_err: f64 = x.iter().zip(&q.data).map(|(&v, &c)| (c as f64 * s - v as f64).abs()).sum();
        assert!(nearest_err / x.len() as f64 > s / 8.0);
    }

    #[test]
    fn stochastic_rounding_is_reproducible_and_independent_of_chunking() {
        let x = ramp(3 * CHUNK + 17);
        let a = quantize_with_clip("x", &x, 2.0, Rounding::Stochastic { seed: 9 }).unwrap();
        let b = quantize_with_clip("x", &x, 2.0, Rounding::Stochastic { seed: 9 }).unwrap();
        assert_eq!(a, b);
        let mut serial = vec![MaybeUninit::new(0i8); x.len()];
        quantize_slice::<false>(&x, 2.0, Rounding::Stochastic { seed: 9 }, 0, &mut serial);
        // SAFETY: every element was initialised (to zero) before the pass.
        assert_eq!(a.data, serial.iter().map(|v| unsafe { v.assume_init() }).collect::<Vec<i8>>());
        let c = quantize_with_clip("x", &x, 2.0, Rounding::Stochastic { seed: 10 }).unwrap();
        assert_ne!(a.data, c.data);
    }

    #[test]
    fn per_channel_scales_follow_each_channel() {
        let channels = 4;
        let x: Vec<f32> = (0..channels * 50).map(|i| ((i % 50) as f32 - 25.0) * (1 + i / 50) as f32).collect();
        let q = quantize("w", &x, Granularity::PerChannel, channels, Rounding::Nearest).unwrap();
        assert_eq!(q.channels(), 4);
        for ch in 0..channels {
            let amax = x[ch * 50..(ch + 1) * 50].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!((q.scales[ch] - amax / 127.0).abs() <= 1e-6 * amax);
        }
        let back = q.dequantize();
        for (i, (&b, &v)) in back.iter().zip(&x).enumerate() {
            assert!((b - v).abs() <= q.scale_of(i) * 0.5 + 1e-5, "element {i}");
        }
        assert!(quantize("w", &x, Granularity::PerChannel, 3, Rounding::Nearest).is_err());
    }

    #[test]
    fn non_finite_values_are_an_error_naming_the_tensor() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = ramp(100_000);
            x[77_777] = bad;
            let err = quantize("layer3.conv2.grad", &x, Granularity::PerTensor, 1, Rounding::Nearest).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("layer3.conv2.grad") && msg.contains("77777"), "{msg}");
            assert!(quantize_with_clip("g", &x, 1.0, Rounding::Nearest).is_err());
            assert!(quantize("w", &x, Granularity::PerChannel, 10, Rounding::Nearest).is_err());
        }
        assert!(quantize_with_clip("g", &[1.0], f32::NAN, Rounding::Nearest).is_err());
    }
}
