//! Elementwise arithmetic: the residual add without activation (MobileNetV2), and the multiply,
//! scale and sum that losses written in tests and tools are made of; and how the tape adds
//! gradients into one another.

use int8_core::nn::elementwise;
use int8_core::out::fresh;

use super::cpu_out;
use crate::error::{NnError, Result};
use crate::tape::{Backward, record};
use crate::tensor::Tensor;

fn same_shape(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(NnError::Shape(format!("{op} of shapes {} and {}: they must match", a.shape(), b.shape())));
    }
    Ok(())
}

/// `a + b`, elementwise, for tensors of one shape.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _t = crate::profile::span("add", false);
    same_shape("add", a, b)?;
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("add", &[a, b])? {
        let mut y = crate::cuda::zeros(&on, a.elem_count())?;
        int8_core::cuda::nn::add(&on, crate::cuda::dev(a)?, crate::cuda::dev(b)?, &mut y)?;
        let y = on.out(y, a.shape());
        return Ok(match record(&[a, b]) {
            None => y,
            Some(r) => r.output("add", y, AddBackward),
        });
    }
    let (av, bv) = (a.cpu()?, b.cpu()?);
    let (y, max_abs) = fresh(a.elem_count(), |y| elementwise::add(av, bv, y))?;
    let y = cpu_out(y, a.shape()).with_max_abs(max_abs);
    Ok(match record(&[a, b]) {
        None => y,
        Some(r) => r.output("add", y, AddBackward),
    })
}

struct AddBackward;

impl Backward for AddBackward {
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        // Both operands take the output's gradient as it is (the tape copies before adding into
        // a gradient that is shared).
        Ok(vec![needs[0].then(|| grad.clone()), needs[1].then_some(grad)])
    }
}

/// `a * b`, elementwise, for tensors of one shape.
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    let _op = crate::profile::naming("mul");
    same_shape("mul", a, b)?;
    let y: Vec<f32> = a.cpu()?.iter().zip(b.cpu()?).map(|(x, y)| x * y).collect();
    let y = cpu_out(y, a.shape());
    Ok(match record(&[a, b]) {
        None => y,
        Some(r) => {
            let (sa, sb) = (r.needs(1).then(|| a.detach()), r.needs(0).then(|| b.detach()));
            r.output("mul", y, MulBackward { a: sa, b: sb })
        }
    })
}

/// Each operand is kept only where the other's gradient needs it.
struct MulBackward {
    a: Option<Tensor>,
    b: Option<Tensor>,
}

fn times(g: &Tensor, by: &Option<Tensor>) -> Result<Option<Tensor>> {
    let Some(by) = by else { return Ok(None) };
    let v: Vec<f32> = g.cpu()?.iter().zip(by.cpu()?).map(|(x, y)| x * y).collect();
    Ok(Some(cpu_out(v, g.shape())))
}

impl Backward for MulBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![times(&grad, &self.b)?, times(&grad, &self.a)?])
    }

    fn saved_bytes(&self) -> usize {
        4 * (self.a.as_ref().map_or(0, Tensor::elem_count) + self.b.as_ref().map_or(0, Tensor::elem_count))
    }
}

/// `x * c` for a constant `c`.
pub fn scale(x: &Tensor, c: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    let _op = crate::profile::naming("scale");
    let y = cpu_out(x.cpu()?.iter().map(|v| v * c).collect(), x.shape());
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output("scale", y, ScaleBackward(c)),
    })
}

struct ScaleBackward(f32);

impl Backward for ScaleBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(cpu_out(grad.cpu()?.iter().map(|v| v * self.0).collect(), grad.shape()))])
    }
}

/// The sum of every value, as a scalar (summed in f64).
pub fn sum_all(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    let _op = crate::profile::naming("sum");
    let s = x.cpu()?.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
    let y = cpu_out(vec![s], ());
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output("sum", y, SumBackward { shape: x.shape().clone() }),
    })
}

struct SumBackward {
    shape: crate::tensor::Shape,
}

impl Backward for SumBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(Tensor::full(self.shape, grad.to_scalar()?))])
    }
}

impl Tensor {
    /// `self + other`, elementwise ([`add`]).
    pub fn add(&self, other: &Tensor) -> Result<Tensor> {
        add(self, other)
    }

    /// `self * other`, elementwise ([`mul`]).
    pub fn mul(&self, other: &Tensor) -> Result<Tensor> {
        mul(self, other)
    }

    /// `self * c` ([`scale`]).
    pub fn scale(&self, c: f32) -> Result<Tensor> {
        scale(self, c)
    }

    /// The sum of every value ([`sum_all`]).
    pub fn sum_all(&self) -> Result<Tensor> {
        sum_all(self)
    }
}

/// `acc += g`: in place when `acc`'s storage is its own, else into `g`'s when that is, else into
/// a new buffer, so that a gradient shared with another value (an add's two operands get one
/// tensor) is never changed under it. Floating-point addition is commutative, so each way gives
/// the same values.
pub(crate) fn add_into(acc: &mut Tensor, mut g: Tensor) -> Result<()> {
    if acc.shape() != g.shape() {
        return Err(NnError::Shape(format!(
            "cannot add a gradient of shape {} into one of {}",
            g.shape(),
            acc.shape()
        )));
    }
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("gradient accumulation", &[acc, &g])? {
        return add_into_gpu(&on, acc, g);
    }
    if let Some(a) = acc.unique_cpu_mut() {
        elementwise::add_assign(a, g.cpu()?)?;
        return Ok(());
    }
    if let Some(b) = g.unique_cpu_mut() {
        elementwise::add_assign(b, acc.cpu()?)?;
        *acc = g;
        return Ok(());
    }
    let (av, gv) = (acc.cpu()?, g.cpu()?);
    let (sum, _) = fresh(acc.elem_count(), |y| elementwise::add(av, gv, y))?;
    *acc = cpu_out(sum, acc.shape());
    Ok(())
}

/// [`add_into`] on a GPU: the same three ways, with `int8_core::cuda::nn`'s bit-exact additions.
#[cfg(feature = "cuda")]
fn add_into_gpu(on: &crate::cuda::On, acc: &mut Tensor, mut g: Tensor) -> Result<()> {
    use crate::cuda::dev;
    use crate::tensor::Storage;
    use int8_core::cuda::nn as kn;
    let gv = dev(&g)?;
    if let Some(Storage::Cuda(a)) = acc.unique_storage_mut() {
        kn::add_assign(on, &mut a.data, gv)?;
        return Ok(());
    }
    let av = dev(acc)?;
    if let Some(Storage::Cuda(b)) = g.unique_storage_mut() {
        kn::add_assign(on, &mut b.data, av)?;
        *acc = g;
        return Ok(());
    }
    let mut sum = crate::cuda::zeros(on, acc.elem_count())?;
    kn::add(on, av, dev(&g)?, &mut sum)?;
    *acc = on.out(sum, acc.shape());
    Ok(())
}
