//! Seeded parameter initialisation: He (Kaiming) normal for convolutions, PyTorch's uniform
//! default for fully connected layers.

use candle_core::{Device, Tensor, Var};
use int8_core::rng::CounterRng;

use crate::Result;

/// Standard normal samples from a counter-based stream (Box-Muller).
fn normal(n: usize, seed: u64) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n)
        .map(|i| {
            let (u1, u2) = (rng.uniform_f64(2 * i as u64).max(1e-300), rng.uniform_f64(2 * i as u64 + 1));
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

/// A conv weight `out x in x k x k`, He normal with fan-in (He et al., 2015), as the reference
/// CIFAR ResNets use.
pub fn conv_weight(out: usize, inp: usize, k: usize, seed: u64) -> Result<Var> {
    conv_weight_rect(out, inp, (k, k), seed)
}

/// A conv weight `out x in x kh x kw`, He normal with fan-in.
pub fn conv_weight_rect(out: usize, inp: usize, (kh, kw): (usize, usize), seed: u64) -> Result<Var> {
    let std = (2.0 / (inp * kh * kw) as f32).sqrt();
    let w: Vec<f32> = normal(out * inp * kh * kw, seed).into_iter().map(|v| v * std).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(w, (out, inp, kh, kw), &Device::Cpu)?)?)
}

/// `n` values uniform in `+-bound` (PyTorch's default for biases, with `bound = 1/sqrt(fan_in)`).
pub fn uniform(n: usize, bound: f32, seed: u64) -> Result<Var> {
    let rng = CounterRng::new(seed);
    let v: Vec<f32> = (0..n as u64).map(|i| (rng.uniform(i) * 2.0 - 1.0) * bound).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, n, &Device::Cpu)?)?)
}

/// A linear weight `out x in` and bias `out`, uniform in `+-1/sqrt(in)` (PyTorch's default).
pub fn linear(out: usize, inp: usize, seed: u64) -> Result<(Var, Var)> {
    let bound = 1.0 / (inp as f32).sqrt();
    let rng = CounterRng::new(seed);
    let mut u = (0..).map(|i| (rng.uniform(i) * 2.0 - 1.0) * bound);
    let w: Vec<f32> = u.by_ref().take(out * inp).collect();
    let b: Vec<f32> = u.take(out).collect();
    Ok((
        Var::from_tensor(&Tensor::from_vec(w, (out, inp), &Device::Cpu)?)?,
        Var::from_tensor(&Tensor::from_vec(b, out, &Device::Cpu)?)?,
    ))
}
