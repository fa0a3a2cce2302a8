//! Batch normalization over channels (FP32 at both precisions), optionally with a ReLU or ReLU6
//! fused into the same pass. Training normalises with the batch's statistics, which the backward
//! object keeps with the input, or, where an INT8 convolution that asked for it
//! (`Int8Config::f16_batch_norm_input`) wrote the input, with the normalised input in half
//! precision; evaluation with the running statistics the layer passes in.

use int8_core::nn::batchnorm::{self, BatchStats, NchwDims};
use int8_core::out::fresh;

use super::cpu_out;
use crate::error::{NnError, Result};
use crate::tape::{Backward, record};
use crate::tensor::Tensor;

fn dims(name: &str, x: &Tensor) -> Result<NchwDims> {
    match *x.dims() {
        [n, c, h, w] => Ok(NchwDims { n, c, hw: h * w }),
        [n, c] => Ok(NchwDims { n, c, hw: 1 }),
        _ => {
            Err(NnError::BadInput { layer: name.into(), why: format!("needs an NCHW or NC input, got {}", x.shape()) })
        }
    }
}

/// Training forward of layer `name` on `x` with scale `gamma` and shift `beta`, and the fused
/// activation's cap (`None`, infinite for ReLU, 6 for ReLU6): the output and the batch
/// statistics (for the layer's running averages).
pub(crate) fn train(
    name: &str,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    relu: Option<f32>,
) -> Result<(Tensor, BatchStats)> {
    let _t = crate::profile::span("batch-norm", false);
    let d = dims(name, x)?;
    if d.n * d.hw == 1 {
        // Normalising one value gives 0 and no gradient: every layer before it would silently stop
        // learning (PyTorch refuses this too).
        return Err(NnError::BadInput {
            layer: name.into(),
            why: format!(
                "got one value per channel ({}) in training, which normalises to 0; use a batch of at least 2",
                x.shape()
            ),
        });
    }
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("batch-norm", &[x, gamma, beta])? {
        return gpu::train(&on, d, x, gamma, beta, eps, relu);
    }
    let (xv, gv, bv) = (x.cpu()?, gamma.cpu()?, beta.cpu()?);
    let rec = record(&[x, gamma, beta]);
    // Only a recorded pass keeps anything. An input an INT8 convolution wrote is kept as its
    // 16-bit sums, which give it back exactly, or in half precision where its layer asked for it.
    let sums = x.sum_scales().filter(|s| rec.is_some() && s.len() == d.c);
    let (y, (stats, kept)) = if rec.is_some() && x.f16_ok() {
        let (y, (stats, half)) = fresh(x.elem_count(), |y| batchnorm::forward_train_half(d, xv, gv, bv, eps, relu, y))?;
        (y, (stats, Some(Kept::Half(half))))
    } else if let Some(scales) = sums {
        let (y, (stats, sums)) =
            fresh(x.elem_count(), |y| batchnorm::forward_train_sums(d, xv, gv, bv, eps, relu, scales, y))?;
        (y, (stats, sums.map(Kept::Sums)))
    } else {
        let (y, stats) = fresh(x.elem_count(), |y| batchnorm::forward_train(d, xv, gv, bv, eps, relu, y))?;
        (y, (stats, None))
    };
    let y = cpu_out(y, x.shape());
    let y = match stats.max_abs_out {
        Some(m) => y.with_max_abs(m),
        None => y,
    };
    let y = match rec {
        None => y,
        Some(r) => {
            let input = kept.unwrap_or_else(|| Kept::Input(x.detach()));
            let saved =
                TrainBackward { d, shape: x.shape().clone(), input, gamma: gamma.detach(), relu, stats: stats.clone() };
            r.output("batch-norm", y, saved)
        }
    };
    Ok((y, stats))
}

/// What a training batch norm keeps of its input.
enum Kept {
    /// The input itself; the fused activation's mask is recomputed from it.
    Input(Tensor),
    /// The normalised input in half precision and the mask's bits
    /// (`int8_core::nn::batchnorm::HalfSaved`).
    Half(batchnorm::HalfSaved),
    /// The input as an INT8 convolution's 16-bit sums, which give it back exactly
    /// (`int8_core::nn::batchnorm::SumsSaved`).
    Sums(batchnorm::SumsSaved),
}

/// Keeps the input (or its half-precision form), gamma and the batch statistics.
struct TrainBackward {
    d: NchwDims,
    shape: crate::tensor::Shape,
    input: Kept,
    gamma: Tensor,
    relu: Option<f32>,
    stats: BatchStats,
}

impl Backward for TrainBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (g, gamma) = (grad.cpu()?, self.gamma.cpu()?);
        let n = self.shape.elem_count();
        let (dx, (dgamma, dbeta)) = match &self.input {
            Kept::Input(x) => {
                let x = x.cpu()?;
                fresh(n, |dx| batchnorm::backward(self.d, x, self.relu, g, gamma, &self.stats, dx))?
            }
            Kept::Half(h) => fresh(n, |dx| batchnorm::backward_half(self.d, h, g, gamma, &self.stats, dx))?,
            Kept::Sums(s) => fresh(n, |dx| batchnorm::backward_sums(self.d, s, self.relu, g, gamma, &self.stats, dx))?,
        };
        Ok(vec![
            Some(cpu_out(dx, self.shape.clone())),
            Some(cpu_out(dgamma, self.gamma.shape())),
            Some(cpu_out(dbeta, self.gamma.shape())),
        ])
    }

    fn saved_bytes(&self) -> usize {
        let input = match &self.input {
            Kept::Input(x) => 4 * x.elem_count(),
            Kept::Half(h) => h.bytes(),
            Kept::Sums(s) => s.bytes(),
        };
        input + 4 * 5 * self.stats.mean.len()
    }
}

/// Evaluation forward with running statistics `mean` and `var` (which take no gradient): a batch
/// norm in evaluation mode, or a frozen one training in a detection backbone.
pub(crate) fn eval(
    name: &str,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    (mean, var): (&[f32], &[f32]),
    eps: f32,
    relu: Option<f32>,
) -> Result<Tensor> {
    let _t = crate::profile::span("batch-norm-eval", false);
    let d = dims(name, x)?;
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("batch-norm-eval", &[x, gamma, beta])? {
        return gpu::eval(&on, d, x, gamma, beta, (mean, var), eps, relu);
    }
    let (xv, gv, bv) = (x.cpu()?, gamma.cpu()?, beta.cpu()?);
    let (y, max_abs) = fresh(x.elem_count(), |y| batchnorm::forward_eval(d, xv, gv, bv, mean, var, eps, relu, y))?;
    let y = cpu_out(y, x.shape()).with_max_abs(max_abs);
    Ok(match record(&[x, gamma, beta]) {
        None => y,
        Some(r) => {
            let saved = EvalBackward {
                d,
                x: x.detach(),
                gamma: gamma.detach(),
                beta: beta.detach(),
                running: (mean.to_vec(), var.to_vec()),
                eps,
                relu,
            };
            r.output("batch-norm-eval", y, saved)
        }
    })
}

/// Keeps the input, the affine parameters and the running statistics the forward used.
struct EvalBackward {
    d: NchwDims,
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    running: (Vec<f32>, Vec<f32>),
    eps: f32,
    relu: Option<f32>,
}

impl Backward for EvalBackward {
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (x, g, gamma, beta) = (self.x.cpu()?, grad.cpu()?, self.gamma.cpu()?, self.beta.cpu()?);
        let running = (&self.running.0[..], &self.running.1[..]);
        let (dx, (dgamma, dbeta)) = fresh(self.x.elem_count(), |dx| {
            batchnorm::backward_eval(self.d, x, self.relu, g, gamma, beta, running, self.eps, dx)
        })?;
        Ok(vec![
            needs[0].then(|| cpu_out(dx, self.x.shape())),
            needs[1].then(|| cpu_out(dgamma, self.gamma.shape())),
            needs[2].then(|| cpu_out(dbeta, self.gamma.shape())),
        ])
    }

    fn saved_bytes(&self) -> usize {
        4 * (self.x.elem_count() + 4 * self.running.0.len())
    }
}

/// Batch norm on a GPU (`int8_core::cuda::nn`, bit for bit the CPU's): the same passes, the
/// batch statistics kept on the device for the backward pass; the mean and variance come to the
/// host for the layer's running averages, which live there.
#[cfg(feature = "cuda")]
mod gpu {
    use int8_core::cuda::nn::{self as kn, GpuBatchStats};
    use int8_core::nn::batchnorm::{BatchStats, NchwDims};

    use crate::cuda::{On, dev, zeros};
    use crate::error::Result;
    use crate::tape::{Backward, record};
    use crate::tensor::Tensor;

    pub(super) fn train(
        on: &On,
        d: NchwDims,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        eps: f32,
        relu: Option<f32>,
    ) -> Result<(Tensor, BatchStats)> {
        let mut y = zeros(on, x.elem_count())?;
        let st = kn::batchnorm_forward_train(on, d, dev(x)?, dev(gamma)?, dev(beta)?, eps, relu, &mut y)?;
        // The running averages read the mean and the variance only.
        let host = BatchStats {
            mean: on.download(&st.mean)?,
            inv_std: Vec::new(),
            var: on.download(&st.var)?,
            scale: Vec::new(),
            shift: Vec::new(),
            max_abs_out: None,
        };
        let y = on.out(y, x.shape());
        let y = match record(&[x, gamma, beta]) {
            None => y,
            Some(r) => {
                let saved = TrainBackward { on: on.clone(), d, x: x.detach(), gamma: gamma.detach(), relu, stats: st };
                r.output("batch-norm", y, saved)
            }
        };
        Ok((y, host))
    }

    struct TrainBackward {
        on: On,
        d: NchwDims,
        x: Tensor,
        gamma: Tensor,
        relu: Option<f32>,
        stats: GpuBatchStats,
    }

    impl Backward for TrainBackward {
        fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let on = &self.on;
            let grad = on.bring(&grad)?;
            let mut dx = zeros(on, self.x.elem_count())?;
            let (dgamma, dbeta) = kn::batchnorm_backward(
                on,
                self.d,
                dev(&self.x)?,
                self.relu,
                dev(&grad)?,
                dev(&self.gamma)?,
                &self.stats,
                &mut dx,
            )?;
            Ok(vec![
                Some(on.out(dx, self.x.shape())),
                Some(on.out(dgamma, self.gamma.shape())),
                Some(on.out(dbeta, self.gamma.shape())),
            ])
        }

        fn saved_bytes(&self) -> usize {
            4 * (self.x.elem_count() + 5 * self.d.c)
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn eval(
        on: &On,
        d: NchwDims,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        (mean, var): (&[f32], &[f32]),
        eps: f32,
        relu: Option<f32>,
    ) -> Result<Tensor> {
        let (rmean, rvar) = (on.upload(mean)?, on.upload(var)?);
        let mut y = zeros(on, x.elem_count())?;
        kn::batchnorm_forward_eval(on, d, dev(x)?, dev(gamma)?, dev(beta)?, &rmean, &rvar, eps, relu, &mut y)?;
        let y = on.out(y, x.shape());
        Ok(match record(&[x, gamma, beta]) {
            None => y,
            Some(r) => {
                let saved = EvalBackward {
                    on: on.clone(),
                    d,
                    x: x.detach(),
                    gamma: gamma.detach(),
                    beta: beta.detach(),
                    running: (rmean, rvar),
                    eps,
                    relu,
                };
                r.output("batch-norm-eval", y, saved)
            }
        })
    }

    struct EvalBackward {
        on: On,
        d: NchwDims,
        x: Tensor,
        gamma: Tensor,
        beta: Tensor,
        running: (int8_core::cuda::CudaSlice<f32>, int8_core::cuda::CudaSlice<f32>),
        eps: f32,
        relu: Option<f32>,
    }

    impl Backward for EvalBackward {
        fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let on = &self.on;
            let grad = on.bring(&grad)?;
            let mut dx = zeros(on, self.x.elem_count())?;
            let (dgamma, dbeta) = kn::batchnorm_backward_eval(
                on,
                self.d,
                dev(&self.x)?,
                self.relu,
                dev(&grad)?,
                dev(&self.gamma)?,
                dev(&self.beta)?,
                (&self.running.0, &self.running.1),
                self.eps,
                &mut dx,
            )?;
            Ok(vec![
                needs[0].then(|| on.out(dx, self.x.shape())),
                needs[1].then(|| on.out(dgamma, self.gamma.shape())),
                needs[2].then(|| on.out(dbeta, self.gamma.shape())),
            ])
        }

        fn saved_bytes(&self) -> usize {
            4 * (self.x.elem_count() + 4 * self.d.c)
        }
    }
}
