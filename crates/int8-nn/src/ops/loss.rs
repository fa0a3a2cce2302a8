//! The classification loss: mean softmax cross-entropy, with the batch's hits.

use int8_core::nn::loss::softmax_cross_entropy;

use super::cpu_out;
use crate::error::{NnError, Result};
use crate::tape::{Backward, record};
use crate::tensor::{Shape, Tensor};

/// What a loss pass reports besides the loss tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossReport {
    /// The mean loss.
    pub loss: f64,
    /// Correct top-1 predictions in the batch.
    pub top1: usize,
    /// Correct top-5 predictions in the batch.
    pub top5: usize,
}

/// Mean softmax cross-entropy of `logits` (`batch x classes`) against `labels`: the scalar loss
/// to call [`Tensor::backward`] on, and the batch's loss and hits.
pub fn cross_entropy(logits: &Tensor, labels: &[u32]) -> Result<(Tensor, LossReport)> {
    let _t = crate::profile::span("softmax-cross-entropy", false);
    let &[_, classes] = logits.dims() else {
        return Err(NnError::Shape(format!(
            "cross-entropy needs batch x classes logits, got shape {}",
            logits.shape()
        )));
    };
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("softmax-cross-entropy", &[logits])? {
        return gpu::cross_entropy(&on, logits, classes, labels);
    }
    let ce = softmax_cross_entropy(logits.cpu()?, classes, labels)?;
    let report = LossReport { loss: ce.loss, top1: ce.top1, top5: ce.top5 };
    let loss = cpu_out(vec![ce.loss as f32], ());
    let loss = match record(&[logits]) {
        None => loss,
        Some(r) => {
            r.output("softmax-cross-entropy", loss, LossBackward { grad: ce.grad, shape: logits.shape().clone() })
        }
    };
    Ok((loss, report))
}

/// Keeps the gradient of the mean loss, `(softmax - onehot) / batch`.
struct LossBackward {
    grad: Vec<f32>,
    shape: Shape,
}

impl Backward for LossBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let scale = grad.to_scalar()?;
        let mut g = self.grad;
        for v in &mut g {
            *v *= scale;
        }
        Ok(vec![Some(cpu_out(g, self.shape))])
    }

    fn saved_bytes(&self) -> usize {
        4 * self.grad.len()
    }
}

/// The loss on a GPU (`int8_core::cuda::nn::softmax_cross_entropy`: the CPU's gradient and hits;
/// `exp` and `log` are CUDA's, so the loss agrees to about 1e-15 relative and a gradient value
/// can differ in its last bit). The loss comes to the host (the report), and its tensor is on the
/// GPU like the logits.
#[cfg(feature = "cuda")]
mod gpu {
    use int8_core::cuda::CudaSlice;
    use int8_core::cuda::nn as kn;

    use super::LossReport;
    use crate::cuda::{On, dev};
    use crate::error::Result;
    use crate::tape::{Backward, record};
    use crate::tensor::{Shape, Tensor};

    pub(super) fn cross_entropy(
        on: &On,
        logits: &Tensor,
        classes: usize,
        labels: &[u32],
    ) -> Result<(Tensor, LossReport)> {
        let ce = kn::softmax_cross_entropy(on, dev(logits)?, classes, labels)?;
        let report = LossReport { loss: ce.loss, top1: ce.top1, top5: ce.top5 };
        let loss = on.out(on.upload(&[ce.loss as f32])?, ());
        let loss = match record(&[logits]) {
            None => loss,
            Some(r) => r.output(
                "softmax-cross-entropy",
                loss,
                LossBackward { on: on.clone(), grad: ce.grad, shape: logits.shape().clone() },
            ),
        };
        Ok((loss, report))
    }

    struct LossBackward {
        on: On,
        grad: CudaSlice<f32>,
        shape: Shape,
    }

    impl Backward for LossBackward {
        fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let scale = grad.try_to_vec()?.first().copied().unwrap_or(1.0);
            if scale == 1.0 {
                // The tape's seed: `v * 1 = v` for every f32, so the CPU's multiplication is skipped.
                return Ok(vec![Some(self.on.out(self.grad, self.shape))]);
            }
            // A scaled loss (rare): the CPU's multiplication, on the host.
            let mut g = self.on.download(&self.grad)?;
            for v in &mut g {
                *v *= scale;
            }
            Ok(vec![Some(self.on.out(self.on.upload(&g)?, self.shape))])
        }

        fn saved_bytes(&self) -> usize {
            4 * self.grad.len()
        }
    }
}
