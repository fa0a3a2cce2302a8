//! Activations where they cannot be fused into the batch norm before them: ReLU, ReLU6, and the
//! residual add + ReLU that ends a ResNet block (one pass forward and one back).

use int8_core::nn::elementwise;
use int8_core::out::fresh;

use super::cpu_out;
use crate::error::{NnError, Result};
use crate::tape::{Backward, record};
use crate::tensor::Tensor;

/// `max(a + b, 0)`: the end of a residual block.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _t = crate::profile::span("add-relu", false);
    if a.shape() != b.shape() {
        return Err(NnError::Shape(format!("residual add of shapes {} and {}: they must match", a.shape(), b.shape())));
    }
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("add-relu", &[a, b])? {
        return gpu::add_relu(&on, a, b);
    }
    let (av, bv) = (a.cpu()?, b.cpu()?);
    Ok(match record(&[a, b]) {
        None => {
            let (y, max_abs) = fresh(a.elem_count(), |y| elementwise::add_relu(av, bv, y))?;
            cpu_out(y, a.shape()).with_max_abs(max_abs)
        }
        Some(r) => {
            let mut positive = vec![0u64; a.elem_count().div_ceil(64)];
            let (y, max_abs) = fresh(a.elem_count(), |y| elementwise::add_relu_positive(av, bv, y, &mut positive))?;
            let y = cpu_out(y, a.shape()).with_max_abs(max_abs);
            r.output("add-relu", y, AddReluBackward { positive, len: a.elem_count() })
        }
    })
}

/// Keeps the output's sign bits: where it is positive, the gradient passes. The output itself
/// is not kept: an INT8 convolution that reads it keeps its 8-bit codes, and the sign bits are a
/// 32nd of its bytes.
struct AddReluBackward {
    positive: Vec<u64>,
    len: usize,
}

impl Backward for AddReluBackward {
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let g = grad.cpu()?;
        let (d, ()) = fresh(self.len, |d| elementwise::relu_backward_positive(&self.positive, g, d))?;
        let d = cpu_out(d, grad.shape());
        Ok(vec![needs[0].then(|| d.clone()), needs[1].then_some(d)])
    }

    fn saved_bytes(&self) -> usize {
        8 * self.positive.len()
    }
}

/// ReLU, `max(x, 0)`.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    clamp_relu(x, f32::INFINITY)
}

/// ReLU6, `min(max(x, 0), 6)` (MobileNetV2 fuses it into batch norm instead:
/// [`crate::layers::BatchNorm2d::with_relu6`]).
pub fn relu6(x: &Tensor) -> Result<Tensor> {
    clamp_relu(x, 6.0)
}

fn clamp_name(cap: f32) -> &'static str {
    if cap.is_finite() { "relu6" } else { "relu" }
}

/// `min(max(x, 0), cap)`.
fn clamp_relu(x: &Tensor, cap: f32) -> Result<Tensor> {
    let name = clamp_name(cap);
    let _t = crate::profile::span(name, false);
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement(name, &[x])? {
        return gpu::clamp_relu(&on, name, x, cap);
    }
    let xv = x.cpu()?;
    let (y, ()) = fresh(x.elem_count(), |y| elementwise::clamp_relu(xv, cap, y))?;
    let y = cpu_out(y, x.shape());
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output(name, y, ClampBackward { x: x.detach(), cap }),
    })
}

/// Keeps the input: the gradient passes where it lies strictly inside `(0, cap)`.
struct ClampBackward {
    x: Tensor,
    cap: f32,
}

impl Backward for ClampBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (x, g) = (self.x.cpu()?, grad.cpu()?);
        let (dx, ()) = fresh(self.x.elem_count(), |dx| elementwise::clamp_relu_backward(x, self.cap, g, dx))?;
        Ok(vec![Some(cpu_out(dx, self.x.shape()))])
    }

    fn saved_bytes(&self) -> usize {
        4 * self.x.elem_count()
    }
}

/// The activations on a GPU (`int8_core::cuda::nn`, bit for bit the CPU's).
#[cfg(feature = "cuda")]
mod gpu {
    use int8_core::cuda::nn as kn;

    use crate::cuda::{On, dev, zeros};
    use crate::error::Result;
    use crate::tape::{Backward, record};
    use crate::tensor::Tensor;

    pub(super) fn add_relu(on: &On, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let mut y = zeros(on, a.elem_count())?;
        kn::add_relu(on, dev(a)?, dev(b)?, &mut y)?;
        let y = on.out(y, a.shape());
        Ok(match record(&[a, b]) {
            None => y,
            Some(r) => {
                let saved = y.clone();
                r.output("add-relu", y, AddReluBackward { on: on.clone(), y: saved })
            }
        })
    }

    struct AddReluBackward {
        on: On,
        y: Tensor,
    }

    impl Backward for AddReluBackward {
        fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let grad = self.on.bring(&grad)?;
            let mut d = zeros(&self.on, self.y.elem_count())?;
            kn::relu_backward(&self.on, dev(&self.y)?, dev(&grad)?, &mut d)?;
            let d = self.on.out(d, self.y.shape());
            Ok(vec![needs[0].then(|| d.clone()), needs[1].then_some(d)])
        }

        fn saved_bytes(&self) -> usize {
            4 * self.y.elem_count()
        }
    }

    pub(super) fn clamp_relu(on: &On, name: &'static str, x: &Tensor, cap: f32) -> Result<Tensor> {
        let mut y = zeros(on, x.elem_count())?;
        kn::clamp_relu(on, dev(x)?, cap, &mut y)?;
        let y = on.out(y, x.shape());
        Ok(match record(&[x]) {
            None => y,
            Some(r) => r.output(name, y, ClampBackward { on: on.clone(), x: x.detach(), cap }),
        })
    }

    struct ClampBackward {
        on: On,
        x: Tensor,
        cap: f32,
    }

    impl Backward for ClampBackward {
        fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let grad = self.on.bring(&grad)?;
            let mut dx = zeros(&self.on, self.x.elem_count())?;
            kn::clamp_relu_backward(&self.on, dev(&self.x)?, self.cap, dev(&grad)?, &mut dx)?;
            Ok(vec![Some(self.on.out(dx, self.x.shape()))])
        }

        fn saved_bytes(&self) -> usize {
            4 * self.x.elem_count()
        }
    }
}
