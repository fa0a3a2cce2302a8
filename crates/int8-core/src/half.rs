//! IEEE 754 half precision (binary16) for values kept for a backward pass at two bytes instead of
//! four: round to nearest even, written with integer operations that vectorise (no F16C needed).
//!
//! Only normal numbers are made: magnitudes below the smallest normal, `2^-14`, become a zero of
//! the same sign (an absolute error under `6.2e-5`), those beyond the largest finite value, 65504,
//! saturate to it, as do the infinities, and NaN becomes zero. Callers keep values bounded well
//! inside that range (a batch norm's normalised input is at most `sqrt(count - 1)` in magnitude).
//! [`normalise_into`] converts a slice with AVX-512's `vcvtps2ph` where the CPU has it, after
//! the same flush and saturation, so that both paths give the same bits.

use std::mem::MaybeUninit;

/// The half-precision bits nearest to `v` (ties to even), within the rules above.
#[inline(always)]
pub fn to_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let sign = (b >> 16) & 0x8000;
    let a = b & 0x7fff_ffff;
    // Rebias the exponent (127 -> 15), then round off the 13 mantissa bits that half precision
    // drops: adding 0xfff plus the lowest kept bit carries exactly when the dropped part is over
    // one half, or one half with an odd kept part. A carry out of the mantissa raises the exponent,
    // which is the right result.
    let r = a.wrapping_sub(112 << 23);
    let r = r.wrapping_add(0x0fff + ((r >> 13) & 1));
    let h = (r >> 13).min(0x7bff);
    let h = if (0x3880_0000..=0x7f80_0000).contains(&a) { h } else { 0 };
    (sign | h) as u16
}

/// `out[i] = to_bits((x[i] - mean) * inv)`: a batch norm's normalised input, kept in half
/// precision.
pub fn normalise_into(x: &[f32], mean: f32, inv: f32, out: &mut [MaybeUninit<u16>]) {
    assert_eq!(x.len(), out.len(), "normalise_into: input and output lengths differ");
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::allows(crate::cpu::Level::Avx512) && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, checked above.
        unsafe { normalise_avx512(x, mean, inv, out) };
        return;
    }
    normalise_portable(x, mean, inv, out);
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn normalise_portable(x: &[f32], mean: f32, inv: f32, out: &mut [MaybeUninit<u16>]) {
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(to_bits((v - mean) * inv));
    }
}

/// [`normalise_into`] sixteen values at a time with `vcvtps2ph`, rounding to nearest even; values
/// are first flushed (below `2^-14`, and NaN) and saturated (beyond 65504) as [`to_bits`] does, so
/// that the hardware, which would make subnormals and infinities, gives [`to_bits`]'s bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn normalise_avx512(x: &[f32], mean: f32, inv: f32, out: &mut [MaybeUninit<u16>]) {
    use std::arch::x86_64::*;
    let (xc, xr) = x.as_chunks::<16>();
    let (oc, or) = out.as_chunks_mut::<16>();
    let (m, i) = (_mm512_set1_ps(mean), _mm512_set1_ps(inv));
    let (small, big) = (_mm512_set1_ps(f32::from_bits(0x3880_0000)), _mm512_set1_ps(65504.0));
    for (o, v) in oc.iter_mut().zip(xc) {
        // SAFETY: `v` holds 16 f32 and `o` 16 u16 (256 bits); unaligned load and store.
        unsafe {
            let t = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(v.as_ptr()), m), i);
            let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(t), small);
            // Flushed (and NaN): a zero of the value's sign.
            let sign = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(t), _mm512_set1_epi32(i32::MIN)));
            let t = _mm512_mask_mov_ps(sign, keep, t);
            let t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-65504.0)), big);
            let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            _mm256_storeu_si256(o.as_mut_ptr().cast(), h);
        }
    }
    for (o, &v) in or.iter_mut().zip(xr) {
        o.write(to_bits((v - mean) * inv));
    }
}

/// The value of half-precision bits made by [`to_bits`] (normal numbers and zeros), exactly.
#[inline(always)]
pub fn value(h: u16) -> f32 {
    let h = u32::from(h);
    let a = h & 0x7fff;
    let m = if a == 0 { 0 } else { (a << 13) + (112 << 23) };
    f32::from_bits(((h & 0x8000) << 16) | m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of any half-precision bit pattern, from the format's definition, in f64.
    fn reference(h: u16) -> f64 {
        let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (i32::from((h >> 10) & 0x1f), f64::from(h & 0x3ff));
        sign * if e == 0 { m * 2f64.powi(-24) } else { (1.0 + m / 1024.0) * 2f64.powi(e - 15) }
    }

    #[test]
    fn every_normal_half_and_zero_round_trips_with_its_defined_value() {
        for h in 0..=u16::MAX {
            let a = h & 0x7fff;
            if a != 0 && !(0x0400..=0x7bff).contains(&a) {
                continue;
            }
            assert_eq!(f64::from(value(h)), reference(h), "{h:#06x}");
            assert_eq!(to_bits(value(h)), h, "{h:#06x}");
        }
    }

    /// Against the nearest normal half found by search in f64 (ties to the even pattern), over
    /// values spread across the normal range, the halfway points between neighbours, and the
    /// edges: flush below 2^-14, saturation above 65504.
    #[test]
    fn rounding_is_to_the_nearest_normal_half_ties_to_even() {
        let rng = crate::rng::CounterRng::new(3);
        let mut values: Vec<f32> = (0..200_000u64)
            .map(|i| {
                let e = rng.uniform(2 * i) * 30.0 - 14.0;
                let s = if i % 2 == 0 { 1.0 } else { -1.0 };
                s * 2f32.powf(e) * (1.0 + rng.uniform(2 * i + 1))
            })
            .collect();
        for h in (0x0400u16..0x7bff).step_by(7) {
            let mid = (reference(h) + reference(h + 1)) / 2.0;
            values.push(mid as f32);
            values.push(-(mid as f32));
        }
        // The positive normal halves in order, for a binary search.
        let normals: Vec<f64> = (0x0400u16..=0x7bff).map(reference).collect();
        for v in values {
            let got = to_bits(v);
            let a = v.abs() as f64;
            let want_mag = if a < 2f64.powi(-14) {
                0
            } else {
                let below = 0x0400 + normals.partition_point(|&r| r <= a).saturating_sub(1) as u16;
                let above = (below + 1).min(0x7bff);
                let (db, da) = (a - reference(below), reference(above) - a);
                if da < db || (da == db && above.is_multiple_of(2)) { above } else { below }
            };
            assert_eq!(got & 0x7fff, want_mag, "{v:e}");
            assert_eq!(got & 0x8000 != 0, v.is_sign_negative(), "{v:e}: sign");
        }
        assert_eq!(to_bits(f32::NAN), 0);
        assert_eq!(to_bits(1e-5), 0);
        assert_eq!(to_bits(-1e-5), 0x8000);
        assert_eq!(value(to_bits(7e4)), 65504.0);
        assert_eq!(value(to_bits(f32::NEG_INFINITY)), -65504.0);
    }

    /// [`normalise_into`] (AVX-512 where the CPU has it) gives [`to_bits`]'s bits for every
    /// value: across the range, at the halfway points, below and at the smallest normal, beyond
    /// the largest, zeros, infinities and NaN of both signs, over lengths with a remainder.
    #[test]
    fn the_slice_conversion_gives_the_scalar_bits() {
        let rng = crate::rng::CounterRng::new(5);
        let mut x: Vec<f32> =
            (0..100_003u64).map(|i| (rng.uniform(i) - 0.5) * 2f32.powi((i % 40) as i32 - 20)).collect();
        for h in (0x0400u16..0x7bff).step_by(3) {
            let mid = ((reference(h) + reference(h + 1)) / 2.0) as f32;
            x.extend([mid, -mid, value(h), -value(h)]);
        }
        let edges = [0.0, -0.0, 6.0e-5, -6.0e-5, 6.1e-5, 6.2e-5, -6.2e-5, 65504.0, 65519.0, 65520.0, -7e4, 1e30];
        x.extend(edges);
        x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN, f32::from_bits(0x3880_0000)]);
        for (mean, inv) in [(0.0, 1.0), (0.25, 3.0)] {
            let mut out = vec![MaybeUninit::new(0xdead_u16); x.len()];
            normalise_into(&x, mean, inv, &mut out);
            for (i, (o, &v)) in out.iter().zip(&x).enumerate() {
                // SAFETY: every element was written (initialised above in any case).
                let got = unsafe { o.assume_init() };
                assert_eq!(got, to_bits((v - mean) * inv), "{i}: {v:e} with mean {mean}, inv {inv}");
            }
        }
        #[cfg(target_arch = "x86_64")]
        eprintln!("avx-512 path taken: {}", std::arch::is_x86_feature_detected!("avx512f"));
    }
}
