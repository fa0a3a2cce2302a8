//! Seeded parameter initialisation: He (Kaiming) normal for convolutions, PyTorch's uniform
//! default for fully connected layers.

use int8_core::rng::CounterRng;
use int8_nn::Tensor;

use crate::Result;

/// A conv weight `out x in x k x k`, He normal with fan-in (He et al., 2015), as the reference
/// CIFAR ResNets use.
pub fn conv_weight(out: usize, inp: usize, k: usize, seed: u64) -> Result<Tensor> {
    conv_weight_rect(out, inp, (k, k), seed)
}

/// A conv weight `out x in x kh x kw`, He normal with fan-in.
pub fn conv_weight_rect(out: usize, inp: usize, (kh, kw): (usize, usize), seed: u64) -> Result<Tensor> {
    let std = (2.0 / (inp * kh * kw) as f32).sqrt();
    Ok(Tensor::randn((out, inp, kh, kw), seed).scale(std)?)
}

/// A conv weight `out x in x k x k`, He normal with fan-out (torchvision's VGG and ResNet:
/// `kaiming_normal_(mode="fan_out", nonlinearity="relu")`).
pub fn conv_weight_fan_out(out: usize, inp: usize, k: usize, seed: u64) -> Result<Tensor> {
    let std = (2.0 / (out * k * k) as f32).sqrt();
    Ok(Tensor::randn((out, inp, k, k), seed).scale(std)?)
}

/// A conv weight `out x in x k x k`, Xavier (Glorot) uniform: `+-sqrt(6 / (fan_in + fan_out))`.
pub fn conv_weight_xavier(out: usize, inp: usize, k: usize, seed: u64) -> Result<Tensor> {
    let bound = (6.0 / ((inp + out) * k * k) as f64).sqrt() as f32;
    let rng = CounterRng::new(seed);
    let v: Vec<f32> = (0..(out * inp * k * k) as u64).map(|i| (rng.uniform(i) * 2.0 - 1.0) * bound).collect();
    Ok(Tensor::from_vec(v, (out, inp, k, k))?)
}

/// A conv weight `out x in x k x k`, normal with standard deviation `std`.
pub fn conv_weight_normal(out: usize, inp: usize, k: usize, std: f32, seed: u64) -> Result<Tensor> {
    Ok(Tensor::randn((out, inp, k, k), seed).scale(std)?)
}

/// `n` values uniform in `+-bound` (PyTorch's default for biases, with `bound = 1/sqrt(fan_in)`).
pub fn uniform(n: usize, bound: f32, seed: u64) -> Result<Tensor> {
    let rng = CounterRng::new(seed);
    let v: Vec<f32> = (0..n as u64).map(|i| (rng.uniform(i) * 2.0 - 1.0) * bound).collect();
    Ok(Tensor::from_vec(v, n)?)
}

/// A linear weight `out x in` and bias `out`, uniform in `+-1/sqrt(in)` (PyTorch's default).
pub fn linear(out: usize, inp: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let bound = 1.0 / (inp as f32).sqrt();
    let rng = CounterRng::new(seed);
    let mut u = (0..).map(|i| (rng.uniform(i) * 2.0 - 1.0) * bound);
    let w: Vec<f32> = u.by_ref().take(out * inp).collect();
    let b: Vec<f32> = u.take(out).collect();
    Ok((Tensor::from_vec(w, (out, inp))?, Tensor::from_vec(b, out)?))
}
