//! Inputs and conversions shared by int8-core's kernel tests.
#![allow(dead_code)] // each test binary uses its own part of this module

use int8_core::rng::CounterRng;

/// `n` values uniform in `[-1, 1)`, the same for the same seed.
pub fn floats(n: usize, seed: u64) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| rng.uniform(i as u64) * 2.0 - 1.0).collect()
}

/// `n` INT8 codes uniform in `[-127, 127]`, the same for the same seed.
pub fn codes(n: usize, seed: u64) -> Vec<i8> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| ((rng.bits(i as u64) % 255) as i32 - 127) as i8).collect()
}

/// `v` as f64, for the reference kernels.
pub fn f64s<T: Copy + Into<f64>>(v: &[T]) -> Vec<f64> {
    v.iter().map(|&x| x.into()).collect()
}
