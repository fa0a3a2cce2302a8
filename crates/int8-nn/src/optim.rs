//! The optimizer: SGD with momentum (optionally Nesterov) and weight decay, with a per-parameter
//! learning-rate multiplier through which DCLR (Zhu et al., CVPR 2020, Sec. 4.2, Eq. 11) scales
//! each INT8 layer's step by `phi(d)`; and the learning-rate schedules.
//!
//! Updates write the parameters in place (see [`Param`]), after the backward pass has released
//! what the graph saved of them.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::error::{NnError, Result};
use crate::param::Param;
use crate::tape::Gradients;
use crate::tensor::Tensor;

/// A parameter with the learning-rate multiplier of its layer: DCLR's `phi(d)` for INT8 layers,
/// 1 otherwise (see [`crate::Module::trainables`]).
#[derive(Debug, Clone, Copy)]
pub struct Trainable<'a> {
    /// The parameter.
    pub param: &'a Param,
    /// The learning-rate multiplier.
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
    /// Gradient clipping by the global norm, as PyTorch's `clip_grad_norm_` before the step: when
    /// the L2 norm of all the step's gradients together exceeds this, each gradient is scaled by
    /// `max / (norm + 1e-6)`. Detectors commonly train with it (MMDetection clips RetinaNet at 35),
    /// since a few large-loss anchors early in training can throw the weights far off.
    pub max_grad_norm: Option<f64>,
}

/// Values per parallel work item of the update.
const CHUNK: usize = 1 << 14;
/// Parameters up to this size update on the calling thread: handing a pass to the pool costs
/// more than the pass (most parameters of the zoo's CIFAR models are below it).
const PAR_MIN: usize = 1 << 16;

/// SGD with momentum buffers kept per parameter name.
#[derive(Debug, Clone)]
pub struct Sgd {
    config: SgdConfig,
    buffers: HashMap<String, Tensor>,
    last_grad_norm: Option<f64>,
}

impl Sgd {
    /// A fresh optimizer.
    pub fn new(config: SgdConfig) -> Self {
        Self { config, buffers: HashMap::new(), last_grad_norm: None }
    }

    /// The momentum buffers by parameter name (for checkpoints).
    pub fn buffers(&self) -> &HashMap<String, Tensor> {
        &self.buffers
    }

    /// Restores momentum buffers from a checkpoint.
    pub fn set_buffers(&mut self, buffers: HashMap<String, Vec<f32>>) {
        self.buffers =
            buffers.into_iter().map(|(k, v)| (k, Tensor::cpu_untracked(v.clone(), v.len().into()))).collect();
    }

    /// One update at learning rate `lr`: for each parameter with a gradient,
    /// `g = grad + wd * w`, `buf = momentum * buf + g` (`g` on the first step),
    /// `d = g + momentum * buf` (Nesterov) or `buf`, and `w -= lr * lr_scale * d`. A gradient or
    /// an updated weight that is not finite stops the update with an error naming the parameter,
    /// and that parameter is left as it was.
    pub fn step(&mut self, params: &[Trainable<'_>], grads: &Gradients, lr: f64) -> Result<()> {
        let cfg = self.config;
        let grad_scale = self.grad_scale(params, grads)?;
        for t in params {
            let p = t.param;
            let Some(grad) = grads.of(p) else { continue };
            #[cfg(feature = "cuda")]
            if let Some(on) = crate::cuda::placement("sgd", &[&p.value(), grad])? {
                self.step_gpu(&on, t, grad, lr)?;
                continue;
            }
            let g = grad.cpu()?;
            let diverged = |why: String| NnError::BadInput { layer: p.name().to_string(), why };
            if g.len() != p.elem_count() {
                return Err(diverged(format!("gradient of {} values for {} weights", g.len(), p.elem_count())));
            }
            let wd = if p.decay() { cfg.weight_decay as f32 } else { 0.0 };
            let (m, lr) = (cfg.momentum as f32, (lr * t.lr_scale) as f32);
            let rule = Rule { gs: grad_scale, wd, m, lr, nesterov: cfg.nesterov };
            let first = !self.buffers.contains_key(p.name());
            let buf = self.buffers.entry(p.name().to_string()).or_insert_with(|| Tensor::zeros(g.len()));
            let b = buf.make_cpu_mut();
            // Check the whole update before writing any of it, so that a refused step changes
            // nothing. A gradient that is not finite makes its weight not finite too.
            let bad = p.update(|w| {
                let bad = find_first(w.len(), |r| {
                    r.clone().find_map(|i| {
                        let (wi, _) = rule.apply(w[i], g[i], b[i], first);
                        (!wi.is_finite()).then_some((i, wi))
                    })
                });
                if bad.is_none() {
                    let write = |(w, (g, b)): (&mut [f32], (&[f32], &mut [f32]))| {
                        for ((wi, &gi), bi) in w.iter_mut().zip(g).zip(b) {
                            (*wi, *bi) = rule.apply(*wi, gi, *bi, first);
                        }
                    };
                    if w.len() <= PAR_MIN {
                        write((w, (g, b)));
                    } else {
                        w.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(b.par_chunks_mut(CHUNK))).for_each(write);
                    }
                }
                bad
            });
            if let Some((i, v)) = bad {
                if first {
                    self.buffers.remove(p.name());
                }
                if let Some(j) = g.iter().position(|v| !v.is_finite()) {
                    return Err(diverged(format!(
                        "gradient value {} at index {j} is not finite: the run has diverged; lower the learning rate",
                        g[j]
                    )));
                }
                return Err(diverged(format!(
                    "the update made weight {i} {v}: the run has diverged; lower the learning rate"
                )));
            }
        }
        Ok(())
    }

    /// The factor every gradient of this step is multiplied by: 1, or, when the global norm of
    /// the gradients comes to [`SgdConfig::max_grad_norm`], `max / (norm + 1e-6)` where that is
    /// below 1 (PyTorch's
    /// `clip_grad_norm_`; the norm summed in f64). Its last value is [`Sgd::last_grad_norm`].
    fn grad_scale(&mut self, params: &[Trainable<'_>], grads: &Gradients) -> Result<f32> {
        let Some(max) = self.config.max_grad_norm else { return Ok(1.0) };
        let mut sum = 0f64;
        for g in params.iter().filter_map(|t| grads.of(t.param)) {
            if g.device() != crate::Device::Cpu {
                return Err(NnError::BadInput {
                    layer: "sgd".into(),
                    why: "clipping gradients by their norm (optim.max_grad_norm) runs on the CPU only so far: \
                          remove it from the recipe or train on the CPU"
                        .into(),
                });
            }
            sum += g.cpu()?.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>();
        }
        let norm = sum.sqrt();
        self.last_grad_norm = Some(norm);
        // A norm that is not finite clips nothing: the update then refuses the gradient by name.
        let coef = max / (norm + 1e-6);
        Ok(if norm.is_finite() && coef < 1.0 { coef as f32 } else { 1.0 })
    }

    /// The global gradient norm of the last step, where [`SgdConfig::max_grad_norm`] is set.
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_grad_norm
    }
}

#[cfg(feature = "cuda")]
impl Sgd {
    /// [`Sgd::step`] for one parameter on a GPU (`int8_core::cuda::nn::sgd_step`, bit for bit the
    /// CPU's rule, checked whole before anything is written), its momentum buffer on the device.
    fn step_gpu(&mut self, on: &crate::cuda::On, t: &Trainable<'_>, grad: &Tensor, lr: f64) -> Result<()> {
        use crate::tensor::Storage;
        let (p, cfg) = (t.param, self.config);
        let diverged = |why: String| NnError::BadInput { layer: p.name().to_string(), why };
        if grad.elem_count() != p.elem_count() {
            return Err(diverged(format!("gradient of {} values for {} weights", grad.elem_count(), p.elem_count())));
        }
        let rule =
            int8_core::cuda::nn::SgdRule::new(cfg.momentum, cfg.nesterov, cfg.weight_decay, p.decay(), lr, t.lr_scale);
        let first = !self.buffers.contains_key(p.name());
        let buf = match self.buffers.remove(p.name()) {
            Some(b) => b.to_device(&grad.device())?,
            None => on.out(crate::cuda::zeros(on, grad.elem_count())?, grad.elem_count()),
        };
        let mut buf = buf.detach();
        let g = crate::cuda::dev(grad)?;
        let done = p.update_tensor(|w| match (w.make_storage_mut(), buf.make_storage_mut()) {
            (Storage::Cuda(wb), Storage::Cuda(bb)) => {
                int8_core::cuda::nn::sgd_step(on, p.name(), &mut wb.data, g, &mut bb.data, first, rule)
            }
            _ => Err(int8_core::CoreError::InvalidArgument {
                what: "sgd operands",
                why: "a parameter and its momentum buffer on different devices".into(),
            }),
        });
        match done {
            Ok(()) => {
                self.buffers.insert(p.name().to_string(), buf);
                Ok(())
            }
            Err(int8_core::CoreError::NonFinite { name, value, index }) => {
                // As on the CPU: a refused first step leaves no buffer, a later one its old buffer.
                if !first {
                    self.buffers.insert(p.name().to_string(), buf);
                }
                Err(diverged(if name.ends_with("(gradient)") {
                    format!(
                        "gradient value {value} at index {index} is not finite: the run has diverged; \
                         lower the learning rate"
                    )
                } else {
                    format!("the update made weight {index} {value}: the run has diverged; lower the learning rate")
                }))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The first `Some` that `f` finds over the index ranges of `0..n`: in one call up to
/// [`PAR_MIN`] values, over chunks in parallel above that.
fn find_first<T: Send>(n: usize, f: impl Fn(std::ops::Range<usize>) -> Option<T> + Sync) -> Option<T> {
    if n <= PAR_MIN {
        return f(0..n);
    }
    (0..n.div_ceil(CHUNK)).into_par_iter().find_map_first(|k| f(k * CHUNK..((k + 1) * CHUNK).min(n)))
}

/// One parameter's update rule, in f32 as PyTorch computes it.
#[derive(Debug, Clone, Copy)]
struct Rule {
    /// The gradient's factor (1 unless clipped by norm; `g * 1.0` is exactly `g`).
    gs: f32,
    wd: f32,
    m: f32,
    lr: f32,
    nesterov: bool,
}

impl Rule {
    /// The new weight and momentum buffer of one value.
    #[inline(always)]
    fn apply(self, w: f32, g: f32, buf: f32, first: bool) -> (f32, f32) {
        let g = g * self.gs + self.wd * w;
        let buf = if first { g } else { self.m * buf + g };
        let d = if self.nesterov { g + self.m * buf } else { buf };
        (w - self.lr * d, buf)
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

    fn param(name: &str, w: &[f32], decay: bool) -> Param {
        Param::new(name, Tensor::from_vec(w.to_vec(), w.len()).unwrap(), decay)
    }

    /// Runs three steps with gradient `grad(w) = w * c` (from a loss `c/2 * sum w^2`) and returns
    /// the weights.
    fn run(cfg: SgdConfig, p: &Param, c: f32, lr: f64) -> Vec<f32> {
        let mut sgd = Sgd::new(cfg);
        for _ in 0..3 {
            let w = p.value();
            let loss = w.mul(&w).unwrap().sum_all().unwrap().scale(c / 2.0).unwrap();
            let grads = loss.backward().unwrap();
            sgd.step(&[Trainable { param: p, lr_scale: 1.0 }], &grads, lr).unwrap();
        }
        p.to_vec()
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
                let cfg = SgdConfig { momentum: 0.9, nesterov, weight_decay: 5e-4, max_grad_norm: None };
                let p = param("w", &[1.0, -2.0, 0.5], decay);
                let got = run(cfg, &p, 0.3, 0.1);
                for (g, w0) in got.iter().zip([1.0, -2.0, 0.5]) {
                    let want = reference(cfg, w0, 0.3, 0.1, decay);
                    assert!((*g as f64 - want).abs() < 1e-6, "nesterov={nesterov} decay={decay}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn long_parameters_update_every_value_as_short_ones_do() {
        // Past several parallel chunks, and not a multiple of one: each value must get exactly
        // the update it gets alone.
        let n = 3 * CHUNK + 17;
        let w0: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
        let cfg = SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 5e-4, max_grad_norm: None };
        let long = param("long", &w0, true);
        let got = run(cfg, &long, 0.3, 0.1);
        for i in [0, 1, CHUNK - 1, CHUNK, 2 * CHUNK + 5, n - 1] {
            let short = param("short", &w0[i..=i], true);
            assert_eq!(got[i], run(cfg, &short, 0.3, 0.1)[0], "value {i}");
        }
    }

    #[test]
    fn dclr_scales_a_layers_step_by_exactly_phi() {
        let cfg = SgdConfig { momentum: 0.0, nesterov: false, weight_decay: 0.0, max_grad_norm: None };
        let phi = 0.37;
        // From zero weights and gradients of 1 and -2, the new weights are exactly the steps.
        let (a, b) = (param("a", &[0.0, 0.0], true), param("b", &[0.0, 0.0], true));
        let coef = Tensor::from_vec(vec![1.0f32, -2.0], 2).unwrap();
        let loss =
            a.value().mul(&coef).unwrap().sum_all().unwrap().add(&b.value().mul(&coef).unwrap().sum_all().unwrap());
        let grads = loss.unwrap().backward().unwrap();
        let ps = [Trainable { param: &a, lr_scale: 1.0 }, Trainable { param: &b, lr_scale: phi }];
        Sgd::new(cfg).step(&ps, &grads, 0.5).unwrap();
        assert_eq!(a.to_vec(), vec![-0.5, 1.0]);
        let step = (0.5 * phi) as f32;
        assert_eq!(b.to_vec(), vec![-step, 2.0 * step]);
    }

    #[test]
    fn clipping_by_norm_scales_every_gradient_as_pytorchs_clip_grad_norm() {
        // Two parameters, loss = sum(coef_a * a) + sum(coef_b * b): the gradients are the
        // coefficients, global norm sqrt(9 + 16 + 144) = 13.
        let run = |max: Option<f64>| {
            let cfg = SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 0.1, max_grad_norm: max };
            let (a, b) = (param("a", &[1.0, 1.0], true), param("b", &[2.0], false));
            let ca = Tensor::from_vec(vec![3.0f32, 4.0], 2).unwrap();
            let cb = Tensor::from_vec(vec![12.0f32], 1).unwrap();
            let loss = a.value().mul(&ca).unwrap().sum_all().unwrap();
            let loss = loss.add(&b.value().mul(&cb).unwrap().sum_all().unwrap()).unwrap();
            let grads = loss.backward().unwrap();
            let mut sgd = Sgd::new(cfg);
            sgd.step(&[Trainable { param: &a, lr_scale: 1.0 }, Trainable { param: &b, lr_scale: 0.5 }], &grads, 0.1)
                .unwrap();
            (a.to_vec(), b.to_vec(), sgd.last_grad_norm())
        };
        // torch: coef = 6.5 / (13 + 1e-6); grads scaled, then weight decay (only a's) added.
        let coef = 6.5 / (13.0 + 1e-6);
        let (a, b, norm) = run(Some(6.5));
        assert_eq!(norm, Some(13.0));
        for (got, g) in a.iter().zip([3.0, 4.0]) {
            let want = 1.0 - 0.1 * (g * coef + 0.1 * 1.0);
            assert!((f64::from(*got) - want).abs() < 1e-6, "{got} vs {want}");
        }
        assert!((f64::from(b[0]) - (2.0 - 0.05 * 12.0 * coef)).abs() < 1e-6, "{b:?}");
        // A norm at or under the limit changes nothing, bit for bit.
        assert_eq!(run(Some(13.5)).0, run(None).0);
        assert_eq!(run(None).2, None);
    }

    #[test]
    fn a_non_finite_gradient_stops_the_step_with_the_parameter_name() {
        let p = param("layer2.0.conv1.weight", &[1.0], true);
        let grads = p.value().scale(f32::NAN).unwrap().sum_all().unwrap().backward().unwrap();
        let err = Sgd::new(SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 0.0, max_grad_norm: None })
            .step(&[Trainable { param: &p, lr_scale: 1.0 }], &grads, 0.1)
            .unwrap_err();
        assert!(err.to_string().contains("layer2.0.conv1.weight"), "{err}");
        assert_eq!(p.to_vec(), vec![1.0], "a refused step changes nothing");
    }

    #[test]
    fn an_update_that_overflows_is_refused() {
        let p = param("fc.weight", &[1.0, 2.0], true);
        let grads = p.value().scale(1e30).unwrap().sum_all().unwrap().backward().unwrap();
        let err = Sgd::new(SgdConfig { momentum: 0.0, nesterov: false, weight_decay: 0.0, max_grad_norm: None })
            .step(&[Trainable { param: &p, lr_scale: 1.0 }], &grads, 1e30)
            .unwrap_err()
            .to_string();
        assert!(err.contains("fc.weight") && err.contains("diverged"), "{err}");
        assert_eq!(p.to_vec(), vec![1.0, 2.0]);
    }

    #[test]
    fn a_value_held_elsewhere_is_not_changed_by_the_update() {
        let p = param("w", &[1.0, 2.0, 3.0], true);
        let before = p.value();
        let grads = p.value().sum_all().unwrap().backward().unwrap();
        let mut sgd = Sgd::new(SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 0.0, max_grad_norm: None });
        sgd.step(&[Trainable { param: &p, lr_scale: 1.0 }], &grads, 0.5).unwrap();
        assert_eq!(before.to_vec(), vec![1.0, 2.0, 3.0]);
        assert_eq!(p.to_vec(), vec![0.5, 1.5, 2.5]);
        assert!(!p.value().shares_storage(&before));
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
