//! Pooling over NCHW planes: max and average with any window, stride and padding, and global
//! average pooling (`n x c x h x w` to `n x c`).

use int8_core::nn::elementwise;
use int8_core::nn::pool::{self, Pool2d};

use super::{cpu_out, zeros};
use crate::error::{NnError, Result};
use crate::tape::{Backward, record};
use crate::tensor::{Shape, Tensor};

fn nchw(op: &str, x: &Tensor) -> Result<[usize; 4]> {
    match *x.dims() {
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(NnError::Shape(format!("{op} needs an NCHW input, got shape {}", x.shape()))),
    }
}

fn geometry(op: &str, x: &Tensor, k: usize, stride: usize, pad: usize, ceil: bool) -> Result<(Pool2d, [usize; 4])> {
    let [n, c, h, w] = nchw(op, x)?;
    let p = Pool2d { planes: n * c, h, w, k, stride, pad, ceil };
    Ok((p, [n, c, p.out_h(), p.out_w()]))
}

/// Max pooling with a `k x k` window, `stride` and zero padding `pad` (at most `k / 2`).
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    max_pool(x, k, stride, pad, false)
}

/// Max pooling whose output size rounds up (PyTorch's `ceil_mode=True`, as SSD's VGG16 uses).
pub fn max_pool2d_ceil(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    max_pool(x, k, stride, pad, true)
}

fn max_pool(x: &Tensor, k: usize, stride: usize, pad: usize, ceil: bool) -> Result<Tensor> {
    let _t = crate::profile::span("max-pool", false);
    let (p, out) = geometry("max pooling", x, k, stride, pad, ceil)?;
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("max-pool", &[x])? {
        return gpu::max_pool(&on, p, out, x);
    }
    let n: usize = out.iter().product();
    let (mut y, mut argmax) = (zeros(n), vec![0u32; n]);
    pool::max_pool(&p, x.cpu()?, &mut y, &mut argmax)?;
    let y = cpu_out(y, out);
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output("max-pool", y, MaxPoolBackward { p, argmax, x: x.shape().clone() }),
    })
}

/// Keeps each output's argmax.
struct MaxPoolBackward {
    p: Pool2d,
    argmax: Vec<u32>,
    x: Shape,
}

impl Backward for MaxPoolBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut dx = zeros(self.x.elem_count());
        pool::max_pool_backward(&self.p, grad.cpu()?, &self.argmax, &mut dx)?;
        Ok(vec![Some(cpu_out(dx, self.x))])
    }

    fn saved_bytes(&self) -> usize {
        4 * self.argmax.len()
    }
}

/// Average pooling with a `k x k` window, `stride` and zero padding `pad` (counted in the mean).
pub fn avg_pool2d(x: &Tensor, k: usize, stride: usize, pad: usize) -> Result<Tensor> {
    let _t = crate::profile::span("avg-pool", false);
    let (p, out) = geometry("average pooling", x, k, stride, pad, false)?;
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("avg-pool", &[x])? {
        return gpu::avg_pool(&on, p, out, x);
    }
    let mut y = zeros(out.iter().product());
    pool::avg_pool(&p, x.cpu()?, &mut y)?;
    let y = cpu_out(y, out);
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output("avg-pool", y, AvgPoolBackward { p, x: x.shape().clone() }),
    })
}

struct AvgPoolBackward {
    p: Pool2d,
    x: Shape,
}

impl Backward for AvgPoolBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut dx = zeros(self.x.elem_count());
        pool::avg_pool_backward(&self.p, grad.cpu()?, &mut dx)?;
        Ok(vec![Some(cpu_out(dx, self.x))])
    }
}

/// Global average pooling, `n x c x h x w` to `n x c`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    let _t = crate::profile::span("global-avg-pool", false);
    let [n, c, h, w] = nchw("global average pooling", x)?;
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("global-avg-pool", &[x])? {
        return gpu::global_avg_pool(&on, x, [n, c, h, w]);
    }
    let mut y = zeros(n * c);
    elementwise::global_avg_pool(x.cpu()?, h * w, &mut y)?;
    let y = cpu_out(y, (n, c));
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output("global-avg-pool", y, GlobalAvgPoolBackward { x: x.shape().clone(), hw: h * w }),
    })
}

struct GlobalAvgPoolBackward {
    x: Shape,
    hw: usize,
}

impl Backward for GlobalAvgPoolBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut dx = zeros(self.x.elem_count());
        elementwise::global_avg_pool_backward(grad.cpu()?, self.hw, &mut dx)?;
        Ok(vec![Some(cpu_out(dx, self.x))])
    }
}

/// Pooling on a GPU (`int8_core::cuda::nn`, bit for bit the CPU's: the same windows, the first
/// maximum's index, the same averages).
#[cfg(feature = "cuda")]
mod gpu {
    use int8_core::cuda::CudaSlice;
    use int8_core::cuda::nn as kn;
    use int8_core::nn::pool::Pool2d;

    use crate::cuda::{On, dev, zeros};
    use crate::error::Result;
    use crate::tape::{Backward, record};
    use crate::tensor::{Shape, Tensor};

    pub(super) fn max_pool(on: &On, p: Pool2d, out: [usize; 4], x: &Tensor) -> Result<Tensor> {
        let n: usize = out.iter().product();
        let (mut y, mut argmax) = (zeros(on, n)?, on.zeros::<u32>(n)?);
        kn::max_pool(on, &p, dev(x)?, &mut y, &mut argmax)?;
        let y = on.out(y, out);
        Ok(match record(&[x]) {
            None => y,
            Some(r) => r.output("max-pool", y, MaxPoolBackward { on: on.clone(), p, argmax, x: x.shape().clone() }),
        })
    }

    struct MaxPoolBackward {
        on: On,
        p: Pool2d,
        argmax: CudaSlice<u32>,
        x: Shape,
    }

    impl Backward for MaxPoolBackward {
        fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let grad = self.on.bring(&grad)?;
            let mut dx = zeros(&self.on, self.x.elem_count())?;
            kn::max_pool_backward(&self.on, &self.p, dev(&grad)?, &self.argmax, &mut dx)?;
            Ok(vec![Some(self.on.out(dx, self.x))])
        }

        fn saved_bytes(&self) -> usize {
            4 * self.argmax.len()
        }
    }

    pub(super) fn avg_pool(on: &On, p: Pool2d, out: [usize; 4], x: &Tensor) -> Result<Tensor> {
        let mut y = zeros(on, out.iter().product())?;
        kn::avg_pool(on, &p, dev(x)?, &mut y)?;
        let y = on.out(y, out);
        Ok(match record(&[x]) {
            None => y,
            Some(r) => r.output("avg-pool", y, AvgPoolBackward { on: on.clone(), p, x: x.shape().clone() }),
        })
    }

    struct AvgPoolBackward {
        on: On,
        p: Pool2d,
        x: Shape,
    }

    impl Backward for AvgPoolBackward {
        fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let grad = self.on.bring(&grad)?;
            let mut dx = zeros(&self.on, self.x.elem_count())?;
            kn::avg_pool_backward(&self.on, &self.p, dev(&grad)?, &mut dx)?;
            Ok(vec![Some(self.on.out(dx, self.x))])
        }
    }

    pub(super) fn global_avg_pool(on: &On, x: &Tensor, [n, c, h, w]: [usize; 4]) -> Result<Tensor> {
        let mut y = zeros(on, n * c)?;
        kn::global_avg_pool(on, dev(x)?, h * w, &mut y)?;
        let y = on.out(y, (n, c));
        Ok(match record(&[x]) {
            None => y,
            Some(r) => r.output(
                "global-avg-pool",
                y,
                GlobalAvgPoolBackward { on: on.clone(), x: x.shape().clone(), hw: h * w },
            ),
        })
    }

    struct GlobalAvgPoolBackward {
        on: On,
        x: Shape,
        hw: usize,
    }

    impl Backward for GlobalAvgPoolBackward {
        fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let grad = self.on.bring(&grad)?;
            let mut dx = zeros(&self.on, self.x.elem_count())?;
            kn::global_avg_pool_backward(&self.on, dev(&grad)?, self.hw, &mut dx)?;
            Ok(vec![Some(self.on.out(dx, self.x))])
        }
    }
}
