//! candle custom ops for the FP32 layers around the convolutions, on `int8-core::nn` kernels:
//! batch norm (with a fused ReLU), residual add + ReLU, global average pooling, cross-entropy.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use int8_core::nn::batchnorm::{self, BatchStats, NchwDims};
use int8_core::nn::elementwise;
use int8_core::nn::loss::{CrossEntropy, softmax_cross_entropy};
use int8_core::nn::pool::{self, Pool2d};
use int8_core::out::fresh;

use super::{f32_data, with_values, zeroed};
use crate::error::to_candle;

/// The flattened f32 contents of a tensor.
pub(crate) fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

fn nchw(name: &str, dims: &[usize]) -> candle_core::Result<NchwDims> {
    match *dims {
        [n, c, h, w] => Ok(NchwDims { n, c, hw: h * w }),
        [n, c] => Ok(NchwDims { n, c, hw: 1 }),
        _ => candle_core::bail!("layer `{name}`: batch norm needs an NCHW or NC input, got {dims:?}"),
    }
}

/// Training-mode batch norm on `(x, gamma, beta)`; keeps the batch statistics for its backward
/// pass and hands them to the layer for the running averages.
#[derive(Debug)]
pub(crate) struct BatchNormTrain {
    pub name: String,
    pub eps: f32,
    /// The fused activation's cap (see [`batchnorm::forward_train`]).
    pub relu: Option<f32>,
    pub stats: Arc<Mutex<Option<BatchStats>>>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = crate::profile::span(self.name(), false);
        let d = nchw(&self.name, l1.dims())?;
        let x = f32_data(s1, l1, &format!("layer `{}` input", self.name))?;
        let gamma = f32_data(s2, l2, &format!("layer `{}` gamma", self.name))?;
        let beta = f32_data(s3, l3, &format!("layer `{}` beta", self.name))?;
        let (y, st) = fresh(x.len(), |y| batchnorm::forward_train(d, x, gamma, beta, self.eps, self.relu, y))
            .map_err(to_candle)?;
        *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = Some(st);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = crate::profile::span(self.name(), true);
        let d = nchw(&self.name, x.dims())?;
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let Some(st) = stats.as_ref() else {
            candle_core::bail!("layer `{}`: backward ran without a training forward pass", self.name);
        };
        let (dx, (dgamma, dbeta)) = with_values(x, "batch norm input", |xv| {
            with_values(gamma, "gamma", |gv| {
                with_values(grad, "batch norm output gradient", |dy| {
                    fresh(xv.len(), |dx| batchnorm::backward(d, xv, self.relu, dy, gv, st, dx)).map_err(to_candle)
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dgamma, gamma.shape(), gamma.device())?),
            Some(Tensor::from_vec(dbeta, gamma.shape(), gamma.device())?),
        ))
    }
}

/// `max(a + b, 0)`, the end of a residual block.
#[derive(Debug)]
pub(crate) struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = crate::profile::span(self.name(), false);
        if l1.dims() != l2.dims() {
            candle_core::bail!("residual add of shapes {:?} and {:?}: they must match", l1.dims(), l2.dims());
        }
        let (a, b) = (f32_data(s1, l1, "residual branch")?, f32_data(s2, l2, "shortcut")?);
        let (y, ()) = fresh(a.len(), |y| elementwise::add_relu(a, b, y)).map_err(to_candle)?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = crate::profile::span(self.name(), true);
        let (d, ()) = with_values(res, "residual output", |y| {
            with_values(grad, "residual output gradient", |g| {
                fresh(y.len(), |d| elementwise::relu_backward(y, g, d)).map_err(to_candle)
            })
        })?;
        let d = Tensor::from_vec(d, a.shape(), a.device())?;
        Ok((Some(d.clone()), Some(d)))
    }
}

/// Global average pooling, `n x c x h x w` to `n x c`.
#[derive(Debug)]
pub(crate) struct GlobalAvgPool;

impl CustomOp1 for GlobalAvgPool {
    fn name(&self) -> &'static str {
        "global-avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = crate::profile::span(self.name(), false);
        let &[n, c, h, w] = l.dims() else {
            candle_core::bail!("global average pooling needs an NCHW input, got {:?}", l.dims());
        };
        let x = f32_data(s, l, "pooling input")?;
        let mut y = zeroed(n * c);
        elementwise::global_avg_pool(x, h * w, &mut y).map_err(to_candle)?;
        Ok((CpuStorage::F32(y), Shape::from((n, c))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _t = crate::profile::span(self.name(), true);
        let &[_, _, h, w] = x.dims() else { candle_core::bail!("global average pooling input must be NCHW") };
        let mut dx = zeroed(x.elem_count());
        elementwise::global_avg_pool_backward(&values(grad)?, h * w, &mut dx).map_err(to_candle)?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// Mean softmax cross-entropy of `batch x classes` logits against fixed labels; the result is a
/// scalar whose backward pass is the saved `(softmax - onehot) / batch`.
#[derive(Debug)]
pub(crate) struct CrossEntropyOp {
    pub labels: Vec<u32>,
    pub result: Arc<Mutex<Option<CrossEntropy>>>,
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "softmax-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = crate::profile::span(self.name(), false);
        let &[_, classes] = l.dims() else {
            candle_core::bail!("cross-entropy needs batch x classes logits, got {:?}", l.dims());
        };
        let ce = softmax_cross_entropy(f32_data(s, l, "logits")?, classes, &self.labels).map_err(to_candle)?;
        let loss = ce.loss as f32;
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(ce);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _t = crate::profile::span(self.name(), true);
        let scale = grad.to_scalar::<f32>()?;
        let result = self.result.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ce) = result.as_ref() else { candle_core::bail!("cross-entropy backward ran without a forward pass") };
        let g: Vec<f32> = ce.grad.iter().map(|&v| v * scale).collect();
        Ok(Some(Tensor::from_vec(g, logits.shape(), logits.device())?))
    }
}

/// Max pooling; keeps each output's argmax for the backward pass.
#[derive(Debug)]
pub(crate) struct MaxPool {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub argmax: Mutex<Vec<u32>>,
}

/// Average pooling.
#[derive(Debug)]
pub(crate) struct AvgPool {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

fn pool_geometry(dims: &[usize], k: usize, stride: usize, pad: usize) -> candle_core::Result<(Pool2d, [usize; 4])> {
    let &[n, c, h, w] = dims else { candle_core::bail!("pooling needs an NCHW input, got {dims:?}") };
    let p = Pool2d { planes: n * c, h, w, k, stride, pad };
    Ok((p, [n, c, p.out_h(), p.out_w()]))
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = crate::profile::span(self.name(), false);
        let (p, out) = pool_geometry(l.dims(), self.k, self.stride, self.pad)?;
        let x = f32_data(s, l, "pooling input")?;
        let n: usize = out.iter().product();
        let (mut y, mut am) = (zeroed(n), vec![0u32; n]);
        pool::max_pool(&p, x, &mut y, &mut am).map_err(to_candle)?;
        *self.argmax.lock().unwrap_or_else(|e| e.into_inner()) = am;
        Ok((CpuStorage::F32(y), Shape::from(out.to_vec())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _t = crate::profile::span(self.name(), true);
        let (p, _) = pool_geometry(x.dims(), self.k, self.stride, self.pad)?;
        let am = self.argmax.lock().unwrap_or_else(|e| e.into_inner());
        let mut dx = zeroed(x.elem_count());
        with_values(grad, "pooling output gradient", |g| {
            pool::max_pool_backward(&p, g, &am, &mut dx).map_err(to_candle)
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "avg-pool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = crate::profile::span(self.name(), false);
        let (p, out) = pool_geometry(l.dims(), self.k, self.stride, self.pad)?;
        let mut y = zeroed(out.iter().product());
        pool::avg_pool(&p, f32_data(s, l, "pooling input")?, &mut y).map_err(to_candle)?;
        Ok((CpuStorage::F32(y), Shape::from(out.to_vec())))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _t = crate::profile::span(self.name(), true);
        let (p, _) = pool_geometry(x.dims(), self.k, self.stride, self.pad)?;
        let mut dx = zeroed(x.elem_count());
        with_values(grad, "pooling output gradient", |g| pool::avg_pool_backward(&p, g, &mut dx).map_err(to_candle))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `min(max(x, 0), cap)`: ReLU with `cap` infinite, ReLU6 with `cap = 6`.
#[derive(Debug)]
pub(crate) struct ClampRelu {
    pub cap: f32,
}

impl CustomOp1 for ClampRelu {
    fn name(&self) -> &'static str {
        if self.cap.is_finite() { "relu6" } else { "relu" }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = crate::profile::span(self.name(), false);
        let x = f32_data(s, l, "relu input")?;
        let (y, ()) = fresh(x.len(), |y| elementwise::clamp_relu(x, self.cap, y)).map_err(to_candle)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _t = crate::profile::span(self.name(), true);
        let (dx, ()) = with_values(x, "relu input", |xv| {
            with_values(grad, "relu output gradient", |g| {
                fresh(xv.len(), |dx| elementwise::clamp_relu_backward(xv, self.cap, g, dx)).map_err(to_candle)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}
