//! The optimizer: SGD with momentum (optionally Nesterov) and weight decay, with a per-parameter
//! learning-rate multiplier through which DCLR (Zhu et al., CVPR 2020, Sec. 4.2, Eq. 11) scales
//! each INT8 layer's step by `phi(d)`; and the learning-rate schedules.
//!
//! Updates run on detached values (read, update, write back with `Var::set`), so the autograd
//! graph never grows across steps.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{NnError, Result};

/// A trainable parameter with what the optimizer needs to know about it.
#[derive(Debug, Clone)]
pub struct Param {
    /// Dotted name, as in checkpoints (`layer1.0.conv1.weight`).
    pub name: String,
    /// The variable.
    pub var: Var,
    /// Whether weight decay applies (not to batch-norm parameters and biases, by default).
    pub decay: bool,
    /// The learning-rate multiplier: DCLR's `phi(d)` for INT8 layers, 1 otherwise.
    pub lr_scale: f64,
}

/// SGD's settings (PyTorch's semantics).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Momentum (0.9 in the paper's recipes).
    pub momentum: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 weight decay, on parameters whose `decay` flag is set.
    pub weight_decay: f64,
}

/// SGD with momentum buffers kept per parameter name.
#[derive(Debug, Clone, Default)]
pub struct Sgd {
    config: Option<SgdConfig>,
    buffers: HashMap<String, Vec<f32>>,
}

impl Sgd {
    /// A fresh optimizer.
    pub fn new(config: SgdConfig) -> Self {
        Self { config: Some(config), buffers: HashMap::new() }
    }

    /// The momentum buffers (for checkpoints).
    pub fn buffers(&self) -> &HashMap<String, Vec<f32>> {
        &self.buffers
    }

    /// Restores momentum buffers from a checkpoint.
    pub fn set_buffers(&mut self, buffers: HashMap<String, Vec<f32>>) {
        self.buffers = buffers;
    }

    /// One update at learning rate `lr`: for each parameter with a gradient,
    /// `g = grad + wd * w`, `buf = momentum * buf + g` (`g` on the first step),
    /// `d = g + momentum * buf` (Nesterov) or `buf`, and `w -= lr * lr_scale * d`.
    pub fn step(&mut self, params: &[Param], grads: &GradStore, lr: f64) -> Result<()> {
        let cfg = self.config.unwrap_or(SgdConfig { momentum: 0.0, nesterov: false, weight_decay: 0.0 });
        for p in params {
            let Some(grad) = grads.get(p.var.as_tensor()) else { continue };
            let g = grad.flatten_all()?.to_vec1::<f32>()?;
            let mut w = p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            if g.len() != w.len() {
                return Err(NnError::BadInput {
                    layer: p.name.clone(),
                    why: format!("gradient of {} values for {} weights", g.len(), w.len()),
                });
            }
            if let Some(i) = g.iter().position(|v| !v.is_finite()) {
                return Err(NnError::BadInput {
                    layer: p.name.clone(),
                    why: format!(
                        "gradient value {} at index {i} is not finite: the run has diverged; lower the learning rate",
                        g[i]
                    ),
                });
            }
            let wd = if p.decay { cfg.weight_decay as f32 } else { 0.0 };
            let (m, step) = (cfg.momentum as f32, (lr * p.lr_scale) as f32);
            let first = !self.buffers.contains_key(&p.name);
            let buf = self.buffers.entry(p.name.clone()).or_insert_with(|| vec![0.0; w.len()]);
            for ((wi, &gi), bi) in w.iter_mut().zip(&g).zip(buf.iter_mut()) {
                let gi = gi + wd * *wi;
                *bi = if first { gi } else { m * *bi + gi };
                let d = if cfg.nesterov { gi + m * *bi } else { *bi };
                *wi -= step * d;
            }
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                return Err(NnError::BadInput {
                    layer: p.name.clone(),
                    why: format!("the update made weight {i} {}: the run has diverged; lower the learning rate", w[i]),
                });
            }
            p.var.set(&Tensor::from_vec(w, p.var.shape(), p.var.device())?)?;
        }
        Ok(())
    }
}

/// How the learning rate changes over training, with an optional linear warmup first.
#[derive(Debug, Clone, PartialEq)]
pub enum ScheduleKind {
    /// The base rate throughout.
    Constant,
    /// Multiplied by `gamma` every `every` epochs.
    Step {
        /// Epochs between decays.
        every: f64,
        /// Decay factor.
        gamma: f64,
    },
    /// Multiplied by `gamma` at each milestone epoch.
    MultiStep {
        /// Epochs at which to decay.
        milestones: Vec<f64>,
        /// Decay factor.
        gamma: f64,
    },
    /// Cosine from the base rate to `min_lr` over `total` epochs.
    Cosine {
        /// Epochs of the whole run.
        total: f64,
        /// The final rate.
        min_lr: f64,
    },
}

/// A learning-rate schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// The base learning rate.
    pub base_lr: f64,
    /// The decay.
    pub kind: ScheduleKind,
    /// Epochs of linear warmup from 0 (0 for none).
    pub warmup: f64,
}

impl Schedule {
    /// The learning rate at (fractional) epoch `epoch`.
    pub fn lr(&self, epoch: f64) -> f64 {
        let decayed = match &self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Step { every, gamma } => self.base_lr * gamma.powi((epoch / every).floor() as i32),
            ScheduleKind::MultiStep { milestones, gamma } => {
                self.base_lr * gamma.powi(milestones.iter().filter(|&&m| epoch >= m).count() as i32)
            }
            ScheduleKind::Cosine { total, min_lr } => {
                let t = (epoch / total).clamp(0.0, 1.0);
                min_lr + (self.base_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        };
        if epoch < self.warmup { decayed * epoch / self.warmup } else { decayed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn param(name: &str, w: &[f32], decay: bool, lr_scale: f64) -> Param {
        let var = Var::from_tensor(&Tensor::from_vec(w.to_vec(), w.len(), &Device::Cpu).unwrap()).unwrap();
        Param { name: name.into(), var, decay, lr_scale }
    }

    /// Runs three steps with gradient `grad(w) = w * c` (from a loss `c/2 * sum w^2`) and returns
    /// the weights.
    fn run(cfg: SgdConfig, p: &Param, c: f32, lr: f64) -> Vec<f32> {
        let mut sgd = Sgd::new(cfg);
        for _ in 0..3 {
            let loss = (p.var.as_tensor().sqr().unwrap().sum_all().unwrap() * (c as f64 / 2.0)).unwrap();
            let grads = loss.backward().unwrap();
            sgd.step(std::slice::from_ref(p), &grads, lr).unwrap();
        }
        p.var.as_tensor().to_vec1::<f32>().unwrap()
    }

    /// The same three steps in f64, written out from PyTorch's definition.
    fn reference(cfg: SgdConfig, w0: f64, c: f64, lr: f64, decay: bool) -> f64 {
        let (mut w, mut buf) = (w0, 0.0);
        for step in 0..3 {
            let g = c * w + if decay { cfg.weight_decay * w } else { 0.0 };
            buf = if step == 0 { g } else { cfg.momentum * buf + g };
            let d = if cfg.nesterov { g + cfg.momentum * buf } else { buf };
            w -= lr * d;
        }
        w
    }

    #[test]
    fn sgd_follows_pytorch_semantics() {
        for nesterov in [false, true] {
            for decay in [false, true] {
                let cfg = SgdConfig { momentum: 0.9, nesterov, weight_decay: 5e-4 };
                let p = param("w", &[1.0, -2.0, 0.5], decay, 1.0);
                let got = run(cfg, &p, 0.3, 0.1);
                for (g, w0) in got.iter().zip([1.0, -2.0, 0.5]) {
                    let want = reference(cfg, w0, 0.3, 0.1, decay);
                    assert!((*g as f64 - want).abs() < 1e-6, "nesterov={nesterov} decay={decay}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn dclr_scales_a_layers_step_by_exactly_phi() {
        let cfg = SgdConfig { momentum: 0.0, nesterov: false, weight_decay: 0.0 };
        let phi = 0.37;
        // From zero weights and gradients of 1 and -2, the new weights are exactly the steps.
        let (a, b) = (param("a", &[0.0, 0.0], true, 1.0), param("b", &[0.0, 0.0], true, phi));
        let coef = Tensor::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let loss = ((a.var.as_tensor() * &coef).unwrap().sum_all().unwrap()
            + (b.var.as_tensor() * &coef).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        Sgd::new(cfg).step(&[a.clone(), b.clone()], &grads, 0.5).unwrap();
        let (wa, wb) = (a.var.as_tensor().to_vec1::<f32>().unwrap(), b.var.as_tensor().to_vec1::<f32>().unwrap());
        assert_eq!(wa, vec![-0.5, 1.0]);
        let step = (0.5 * phi) as f32;
        assert_eq!(wb, vec![-step, 2.0 * step]);
    }

    #[test]
    fn a_non_finite_gradient_stops_the_step_with_the_parameter_name() {
        let p = param("layer2.0.conv1.weight", &[1.0], true, 1.0);
        let loss = (p.var.as_tensor().sqrt().unwrap() * f64::NAN).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let err = Sgd::new(SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 0.0 })
            .step(std::slice::from_ref(&p), &grads, 0.1)
            .unwrap_err();
        assert!(err.to_string().contains("layer2.0.conv1.weight"), "{err}");
        assert_eq!(p.var.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0], "a refused step changes nothing");
    }

    #[test]
    fn an_update_that_overflows_is_refused() {
        let p = param("fc.weight", &[1.0, 2.0], true, 1.0);
        let loss = (p.var.as_tensor() * 1e30).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let err = Sgd::new(SgdConfig { momentum: 0.0, nesterov: false, weight_decay: 0.0 })
            .step(std::slice::from_ref(&p), &grads, 1e30)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fc.weight") && err.contains("diverged"), "{err}");
        assert_eq!(p.var.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn schedules() {
        let s = |kind, warmup| Schedule { base_lr: 0.1, kind, warmup };
        assert_eq!(s(ScheduleKind::Constant, 0.0).lr(7.0), 0.1);
        let st = s(ScheduleKind::Step { every: 30.0, gamma: 0.1 }, 0.0);
        assert!((st.lr(29.9) - 0.1).abs() < 1e-12 && (st.lr(30.0) - 0.01).abs() < 1e-12);
        let ms = s(ScheduleKind::MultiStep { milestones: vec![100.0, 150.0], gamma: 0.1 }, 0.0);
        assert!((ms.lr(120.0) - 0.01).abs() < 1e-12 && (ms.lr(150.0) - 0.001).abs() < 1e-12);
        let cos = s(ScheduleKind::Cosine { total: 10.0, min_lr: 0.0 }, 1.0);
        assert!((cos.lr(0.5) - 0.5 * 0.1 * 0.5 * (1.0 + (std::f64::consts::PI * 0.05).cos())).abs() < 1e-12);
        assert!((cos.lr(5.0) - 0.05).abs() < 1e-12 && cos.lr(10.0).abs() < 1e-12);
    }
}
