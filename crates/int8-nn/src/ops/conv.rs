//! 2-D convolution as a candle custom op, FP32 or INT8 in both passes (Zhu et al., CVPR 2020,
//! Sec. 3, Fig. 2): INT8 quantizes X and W in the forward pass and keeps their codes (one byte per
//! element) for the backward pass, which quantizes dY once with the layer's DSGC clip value (Sec.
//! 4.1) and runs dX and dW on INT8 GEMMs. It records the layer's statistics, DCLR's multiplier
//! among them (Sec. 4.2), for the optimizer to read.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use int8_core::conv::{
    ConvShape, conv2d_dw_f32, conv2d_dw_i8, conv2d_dx_f32, conv2d_dx_i8, conv2d_fwd_f32, conv2d_fwd_i8,
    strided_pointwise, subsample, upsample,
};
use int8_core::gemm::Int8Path;
use int8_core::out::fresh;
use int8_core::quant::{Granularity, QTensor, Rounding, quantize};

use super::{f32_data, input_grad_weight, with_values, zeroed};
use crate::error::to_candle;
use crate::precision::Precision;
use crate::stats::LayerState;

/// Stride, padding, dilation and groups of a convolution (square).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Stride.
    pub stride: usize,
    /// Zero padding (rows, columns), on both sides of each.
    pub padding: (usize, usize),
    /// Dilation.
    pub dilation: usize,
    /// Groups.
    pub groups: usize,
}

impl Default for ConvGeometry {
    fn default() -> Self {
        Self { stride: 1, padding: (0, 0), dilation: 1, groups: 1 }
    }
}

impl ConvGeometry {
    /// The full shape for input dims `x` (`n, c, h, w`) and weight dims `w` (`o, c/g, kh, kw`).
    pub fn shape(&self, name: &str, x: &[usize], w: &[usize]) -> candle_core::Result<ConvShape> {
        let (&[n, c_in, h, wd], &[c_out, c_in_g, kh, kw]) = (x, w) else {
            candle_core::bail!("layer `{name}`: conv input {x:?} and weight {w:?} must both be 4-D (NCHW, OIHW)");
        };
        if c_in_g * self.groups != c_in {
            candle_core::bail!(
                "layer `{name}`: the input has {c_in} channels but the weight expects {} ({c_in_g} per group x {} groups)",
                c_in_g * self.groups,
                self.groups
            );
        }
        let (s, p, d) = (self.stride, self.padding, self.dilation);
        let shape = ConvShape {
            n,
            c_in,
            h,
            w: wd,
            c_out,
            kh,
            kw,
            stride: (s, s),
            pad: p,
            dilation: (d, d),
            groups: self.groups,
        };
        shape.validate().map_err(to_candle)?;
        Ok(shape)
    }
}

/// The INT8 codes the forward pass keeps for the backward pass.
#[derive(Debug)]
struct Saved {
    x: QTensor,
    w: QTensor,
}

/// One application of a conv layer: the op candle records in the graph.
#[derive(Debug)]
pub(crate) struct Conv2dOp {
    pub name: String,
    pub geometry: ConvGeometry,
    pub precision: Precision,
    pub state: Arc<Mutex<LayerState>>,
    pub path: Int8Path,
    saved: Mutex<Option<Saved>>,
}

impl Conv2dOp {
    pub(crate) fn new(
        name: String,
        geometry: ConvGeometry,
        precision: Precision,
        state: Arc<Mutex<LayerState>>,
        path: Int8Path,
    ) -> Self {
        Self { name, geometry, precision, state, path, saved: Mutex::new(None) }
    }

    /// The stride-1 shape that an INT8 strided 1x1 convolution runs on, over its input's
    /// subsample; `None` for other convolutions and at FP32.
    fn int8_pointwise(&self, full: &ConvShape) -> Option<ConvShape> {
        strided_pointwise(full).filter(|_| matches!(self.precision, Precision::Int8(_)))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, LayerState> {
        // A poisoned lock only means another thread panicked mid-update; the state is plain data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "int8-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let _t = crate::profile::span(self.name(), false);
        let x = f32_data(s1, l1, &format!("layer `{}` input", self.name))?;
        let w = f32_data(s2, l2, &format!("layer `{}` weight", self.name))?;
        let full = self.geometry.shape(&self.name, l1.dims(), l2.dims())?;
        // A strided 1x1 convolution reads a subsample of its input: in INT8 only that is
        // quantized (and kept for the backward pass). FP32 reads the pixels in place, which is
        // faster for it than copying them out.
        let pointwise = self.int8_pointwise(&full);
        let s = pointwise.unwrap_or(full);
        let sub = pointwise.map(|_| subsample(&full, x));
        let x = sub.as_deref().unwrap_or(x);
        let y = match self.precision {
            Precision::Fp32 => fresh(s.y_len(), |y| conv2d_fwd_f32(&s, x, w, y)).map_err(to_candle)?.0,
            Precision::Int8(cfg) => {
                let xq = quantize(&format!("{}.input", self.name), x, Granularity::PerTensor, 1, Rounding::Nearest)
                    .map_err(to_candle)?;
                let wq = quantize(&format!("{}.weight", self.name), w, cfg.weight, s.c_out, Rounding::Nearest)
                    .map_err(to_candle)?;
                let (y, ()) = fresh(s.y_len(), |y| conv2d_fwd_i8(self.path, &s, (&xq).into(), (&wq).into(), y))
                    .map_err(to_candle)?;
                {
                    let mut st = self.state();
                    st.stats.saturation_x = xq.saturation_rate();
                    st.stats.saturation_w = wq.saturation_rate();
                }
                *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved { x: xq, w: wq });
                y
            }
        };
        Ok((CpuStorage::F32(y), Shape::from((full.n, full.c_out, full.out_h(), full.out_w()))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _t = crate::profile::span(self.name(), true);
        let full = self.geometry.shape(&self.name, x.dims(), w.dims())?;
        // See the forward pass: in INT8 a strided 1x1 convolution works on its input's subsample,
        // and its input gradient is zero at the pixels it never read.
        let pointwise = self.int8_pointwise(&full);
        let s = pointwise.unwrap_or(full);
        let (mut dx, mut dw) = (Vec::new(), zeroed(s.w_len()));
        with_values(grad, "output gradient", |g| {
            match self.precision {
                Precision::Fp32 => with_values(x, "input", |xv| {
                    with_values(w, "weight", |wv| {
                        dx = fresh(s.x_len(), |dx| conv2d_dx_f32(&s, wv, g, dx)).map_err(to_candle)?.0;
                        conv2d_dw_f32(&s, xv, g, &mut dw).map_err(to_candle)
                    })
                })?,
                Precision::Int8(cfg) => {
                    let dyq = self.state().quantize_grad(&self.name, g, &cfg).map_err(to_candle)?;
                    let saved = self.saved.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(saved) = saved.as_ref() else {
                        candle_core::bail!("layer `{}`: backward ran without a forward pass on the cpu", self.name);
                    };
                    let wq = input_grad_weight(&self.name, &saved.w, w, s.is_depthwise())?;
                    dx = fresh(s.x_len(), |dx| conv2d_dx_i8(self.path, &s, (&*wq).into(), (&dyq).into(), dx))
                        .map_err(to_candle)?
                        .0;
                    conv2d_dw_i8(self.path, &s, (&saved.x).into(), (&dyq).into(), &mut dw).map_err(to_candle)?;
                }
            }
            Ok(())
        })?;
        if pointwise.is_some() {
            // `upsample` writes every pixel, the ones the convolution never read as zero.
            dx = fresh(full.x_len(), |placed| {
                upsample(&full, &dx, placed);
                Ok(())
            })
            .map_err(to_candle)?
            .0;
        }
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}
