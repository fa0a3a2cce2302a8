//! A counter-based random generator for stochastic rounding.
//!
//! Each random number is a pure function of `(seed, index)`, so a tensor rounds the same way however
//! the work is split across threads, with no shared state and no lock. The mixing function is
//! SplitMix64's finaliser (Steele, Lea and Flood, 2014), which passes BigCrush when fed a counter.

/// A seeded, stateless stream of uniform numbers indexed by position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterRng {
    key: u64,
}

impl CounterRng {
    /// A stream for `seed`. Different seeds give independent-looking streams.
    pub fn new(seed: u64) -> Self {
        Self { key: mix(seed ^ 0x6A09_E667_F3BC_C909) }
    }

    /// The 64 random bits at position `index`.
    #[inline(always)]
    pub fn bits(&self, index: u64) -> u64 {
        mix(self.key.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }

    /// A uniform number in `[0, 1)` at position `index`, with 24 bits of resolution (every value is
    /// exactly representable as `f32`, so the mean is exactly 1/2 - 2^-25).
    #[inline(always)]
    pub fn uniform(&self, index: u64) -> f32 {
        (self.bits(index) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// A uniform number in `[0, 1)` at `index`, in `f64` with 53 bits of resolution.
    #[inline(always)]
    pub fn uniform_f64(&self, index: u64) -> f64 {
        (self.bits(index) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// SplitMix64 (Steele, Lea and Flood, 2014) of `z`: a pure function of its input, the stream the
/// data loader shuffles and augments with.
#[inline(always)]
pub fn splitmix64(z: u64) -> u64 {
    mix(z.wrapping_add(0x9E37_79B9_7F4A_7C15))
}

#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The reference generator's state advances by the golden gamma and each output is
        // splitmix64(state); from seed 0 its first outputs are these (Vigna's splitmix64.c).
        let outs: Vec<u64> = (0..3u64).map(|i| splitmix64(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))).collect();
        assert_eq!(outs, [0xE220_A839_7B1D_CDAF, 0x6E78_9E6A_A1B9_65F4, 0x06C4_5D18_8009_454F]);
    }

    #[test]
    fn uniform_is_in_range_and_has_the_right_moments() {
        let rng = CounterRng::new(7);
        let n = 200_000;
        let (mut sum, mut sum_sq) = (0.0f64, 0.0f64);
        for i in 0..n {
            let u = rng.uniform(i) as f64;
            assert!((0.0..1.0).contains(&u));
            sum += u;
            sum_sq += u * u;
        }
        let mean = sum / n as f64;
        let var = sum_sq / n as f64 - mean * mean;
        // Standard error of the mean is sqrt(1/12/n) = 6.5e-4; allow five of them.
        assert!((mean - 0.5).abs() < 3.3e-3, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 2e-3, "variance {var}");
    }

    #[test]
    fn streams_depend_on_seed_and_are_reproducible() {
        let a = CounterRng::new(1);
        let b = CounterRng::new(2);
        assert_eq!(a.bits(5), CounterRng::new(1).bits(5));
        let same = (0..1000).filter(|&i| a.bits(i) == b.bits(i)).count();
        assert_eq!(same, 0);
    }
}
