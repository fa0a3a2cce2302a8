//! Fully connected layer as a candle custom op, FP32 or INT8 in both passes: the same treatment
//! as the conv op (Zhu et al., CVPR 2020, Sec. 3-4), for networks whose last layer is trained in
//! INT8 too.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use int8_core::gemm::{Int8Path, MatMut, MatRef, Parallelism, gemm_f32, gemm_i8_scaled};
use int8_core::quant::{Granularity, QTensor, Rounding, quantize};

use super::basic::values;
use super::zeroed;
use super::{f32_data, input_grad_weight};
use crate::error::to_candle;
use crate::precision::Precision;
use crate::stats::LayerState;

#[derive(Debug)]
struct Saved {
    x: QTensor,
    w: QTensor,
}

/// One application of a linear layer on `(x, w, b)`: `y = x w^T + b`.
#[derive(Debug)]
pub(crate) struct LinearOp {
    pub name: String,
    pub precision: Precision,
    pub state: Arc<Mutex<LayerState>>,
    pub path: Int8Path,
    saved: Mutex<Option<Saved>>,
}

impl LinearOp {
    pub(crate) fn new(name: String, precision: Precision, state: Arc<Mutex<LayerState>>, path: Int8Path) -> Self {
        Self { name, precision, state, path, saved: Mutex::new(None) }
    }
}

/// A row-major view, with a shape error carried as a candle error.
fn mm<T: Copy>(v: &[T], rows: usize, cols: usize) -> candle_core::Result<MatRef<'_, T>> {
    MatRef::row_major(v, rows, cols).map_err(to_candle)
}

/// `(batch, in, out)` from the operand dims, or an error naming the layer.
fn dims(name: &str, x: &[usize], w: &[usize], b: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    match (x, w, b) {
        (&[n, i], &[o, wi], &[bo]) if i == wi && o == bo => Ok((n, i, o)),
        _ => candle_core::bail!(
            "layer `{name}`: input {x:?}, weight {w:?} and bias {b:?} do not make a linear layer (n x in, out x in, out)"
        ),
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "int8-linear"
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
        let (n, i, o) = dims(&self.name, l1.dims(), l2.dims(), l3.dims())?;
        let x = f32_data(s1, l1, &format!("layer `{}` input", self.name))?;
        let w = f32_data(s2, l2, &format!("layer `{}` weight", self.name))?;
        let b = f32_data(s3, l3, &format!("layer `{}` bias", self.name))?;
        let mut y = zeroed(n * o);
        match self.precision {
            Precision::Fp32 => {
                let (xm, wm) =
                    (MatRef::row_major(x, n, i).map_err(to_candle)?, MatRef::row_major(w, o, i).map_err(to_candle)?);
                gemm_f32(xm, wm.t(), MatMut::row_major(&mut y, n, o).map_err(to_candle)?, false, Parallelism::Rayon)
                    .map_err(to_candle)?;
            }
            Precision::Int8(cfg) => {
                let xq = quantize(&format!("{}.input", self.name), x, Granularity::PerTensor, 1, Rounding::Nearest)
                    .map_err(to_candle)?;
                let wq = quantize(&format!("{}.weight", self.name), w, cfg.weight, o, Rounding::Nearest)
                    .map_err(to_candle)?;
                // y^T = W x^T, so that per-output-channel weight scales are row scales.
                let sx = xq.scales[0];
                let scales: Vec<f32> = (0..o).map(|r| sx * wq.scales[if wq.channels() == 1 { 0 } else { r }]).collect();
                let a = MatRef::row_major(&wq.data, o, i).map_err(to_candle)?;
                let bm = MatRef::row_major(&xq.data, n, i).map_err(to_candle)?.t();
                let c = MatMut::new(&mut y, o, n, 1, o).map_err(to_candle)?;
                gemm_i8_scaled(self.path, a, bm, c, &scales, Parallelism::Rayon).map_err(to_candle)?;
                {
                    let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                    st.stats.saturation_x = xq.saturation_rate();
                    st.stats.saturation_w = wq.saturation_rate();
                }
                *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved { x: xq, w: wq });
            }
        }
        for row in y.chunks_exact_mut(o) {
            for (v, &bias) in row.iter_mut().zip(b) {
                *v += bias;
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _t = crate::profile::span(self.name(), true);
        let (n, i, o) = dims(&self.name, x.dims(), w.dims(), b.dims())?;
        let g = values(grad)?;
        let (mut dx, mut dw) = (zeroed(n * i), zeroed(o * i));
        let mut db = zeroed(o);
        for row in g.chunks_exact(o) {
            for (d, &v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
        match self.precision {
            Precision::Fp32 => {
                let (xv, wv) = (values(x)?, values(w)?);
                gemm_f32(
                    mm(&g, n, o)?,
                    mm(&wv, o, i)?,
                    MatMut::row_major(&mut dx, n, i).map_err(to_candle)?,
                    false,
                    Parallelism::Rayon,
                )
                .map_err(to_candle)?;
                gemm_f32(
                    mm(&g, n, o)?.t(),
                    mm(&xv, n, i)?,
                    MatMut::row_major(&mut dw, o, i).map_err(to_candle)?,
                    false,
                    Parallelism::Rayon,
                )
                .map_err(to_candle)?;
            }
            Precision::Int8(cfg) => {
                let dyq = self
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .quantize_grad(&self.name, &g, &cfg)
                    .map_err(to_candle)?;
                let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
                let Some(saved) = saved.as_ref() else {
                    candle_core::bail!("layer `{}`: backward ran without a forward pass on the cpu", self.name);
                };
                let wq = input_grad_weight(&self.name, &saved.w, w, false)?;
                let sdy = dyq.scales[0];
                // dx = dy W, dW = dy^T x, each an exact INT8 product scaled once.
                gemm_i8_scaled(
                    self.path,
                    mm(&dyq.data, n, o)?,
                    mm(&wq.data, o, i)?,
                    MatMut::row_major(&mut dx, n, i).map_err(to_candle)?,
                    &vec![sdy * wq.scales[0]; n],
                    Parallelism::Rayon,
                )
                .map_err(to_candle)?;
                gemm_i8_scaled(
                    self.path,
                    mm(&dyq.data, n, o)?.t(),
                    mm(&saved.x.data, n, i)?,
                    MatMut::row_major(&mut dw, o, i).map_err(to_candle)?,
                    &vec![sdy * saved.x.scales[0]; o],
                    Parallelism::Rayon,
                )
                .map_err(to_candle)?;
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}
