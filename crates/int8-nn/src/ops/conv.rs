//! 2-D convolution, FP32 or INT8 in both passes (Zhu et al., CVPR 2020, Sec. 3, Fig. 2): INT8
//! quantizes X and W in the forward pass and keeps their codes (one byte per element) for the
//! backward pass, which quantizes dY once with the layer's DSGC clip value (Sec. 4.1) and runs dX
//! and dW on INT8 GEMMs. It records the layer's statistics, DCLR's multiplier among them (Sec.
//! 4.2), for the optimizer to read. Also the per-channel bias add of convolutions with a bias.

use int8_core::conv::{
    ConvShape, conv2d_dw_f32, conv2d_dw_i8, conv2d_dx_f32, conv2d_dx_i8, conv2d_fwd_f32, conv2d_fwd_i8, output_scale,
    quantize_subsample, quantize_subsample_with_clip, strided_pointwise, subsample, upsample,
};
use int8_core::gemm::Int8Path;
use int8_core::out::fresh;
use std::sync::Arc;

use int8_core::quant::{Granularity, QTensor, Rounding, quantize, quantize_with_clip};

use super::{cpu_out, input_grad_weight, zeros};
use crate::error::{NnError, Result};
use crate::precision::{Int8Config, Operand, Precision};
use crate::stats::QuantState;
use crate::tape::{Backward, record};
use crate::tensor::{Shape, Tensor};

/// Stride, padding, dilation and groups of a convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Stride (rows and columns).
    pub stride: usize,
    /// Zero padding (rows, columns), on both sides of each.
    pub padding: (usize, usize),
    /// Dilation (rows and columns).
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
    pub fn shape(&self, name: &str, x: &[usize], w: &[usize]) -> Result<ConvShape> {
        let bad = |why: String| NnError::BadInput { layer: name.into(), why };
        let (&[n, c_in, h, wd], &[c_out, c_in_g, kh, kw]) = (x, w) else {
            return Err(bad(format!("conv input {x:?} and weight {w:?} must both be 4-D (NCHW, OIHW)")));
        };
        if c_in_g * self.groups != c_in {
            return Err(bad(format!(
                "the input has {c_in} channels but the weight expects {} ({c_in_g} per group x {} groups)",
                c_in_g * self.groups,
                self.groups
            )));
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
        shape.validate().map_err(|e| bad(e.to_string()))?;
        Ok(shape)
    }
}

/// What a convolution needs besides its operands: the layer's name, geometry, precision, INT8
/// state and GEMM path.
#[derive(Debug, Clone)]
pub(crate) struct ConvArgs<'a> {
    pub name: &'a str,
    pub geometry: ConvGeometry,
    pub precision: Precision,
    pub quant: &'a QuantState,
    pub path: Int8Path,
}

/// The op's name in the step breakdown: what ran.
fn op_name(precision: Precision, depthwise: bool) -> &'static str {
    match (precision, depthwise) {
        (Precision::Fp32, false) => "conv2d",
        (Precision::Fp32, true) => "depthwise-conv2d",
        (Precision::Int8(_), false) => "int8-conv2d",
        (Precision::Int8(_), true) => "int8-depthwise-conv2d",
    }
}

/// `conv(x, w)` for `x` (`n x c x h x w`) and `w` (`out x in/groups x kh x kw`).
pub(crate) fn conv2d(x: &Tensor, w: &Tensor, a: ConvArgs<'_>) -> Result<Tensor> {
    let full = a.geometry.shape(a.name, x.dims(), w.dims())?;
    let name = op_name(a.precision, full.is_depthwise());
    let _t = crate::profile::span(name, false);
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement(name, &[x, w])? {
        return gpu::conv2d(&on, x, w, a, full, name);
    }
    let rec = record(&[x, w]);
    // A strided 1x1 convolution reads a subsample of its input: in INT8 only that is quantized
    // (and kept for the backward pass). FP32 reads the pixels in place, which is faster for it
    // than copying them out.
    let pointwise = strided_pointwise(&full).filter(|_| matches!(a.precision, Precision::Int8(_)));
    let s = pointwise.unwrap_or(full);
    let (xv, wv) = (x.cpu()?, w.cpu()?);
    // Only the operand ablation reads the subsample's f32 values; the codes are made from X
    // directly.
    let ablation = matches!(a.precision, Precision::Int8(cfg) if cfg.fp32_operand.is_some());
    let sub = pointwise.filter(|_| ablation).map(|_| subsample(&full, xv));
    let xv = sub.as_deref().unwrap_or(xv);
    let out_shape = Shape::from([full.n, full.c_out, full.out_h(), full.out_w()]);
    let (y, saved, sum_scales) = match a.precision {
        Precision::Fp32 => {
            let y = fresh(s.y_len(), |y| conv2d_fwd_f32(&s, xv, wv, y))?.0;
            // dX reads W, dW reads X: keep each only if the other's gradient is wanted.
            let saved = rec
                .as_ref()
                .map(|r| Saved::Fp32 { x: r.needs(1).then(|| x.detach()), w: r.needs(0).then(|| w.detach()) });
            (y, saved, None)
        }
        Precision::Int8(cfg) => {
            // The op that wrote X may have found max|X| on the way (batch norm and the residual
            // add do): the codes are then one pass, and the same as `quantize`'s. A strided 1x1
            // convolution then quantizes the pixels it reads at X's scale, as the convolution
            // beside it on the same input does (the subsample's own maximum, when it is not known,
            // takes a pass of its own).
            // Codes made at X's maximum are kept with X, so that a residual block's strided 1x1
            // shortcut takes the subsample of its first convolution's codes (the same values at
            // the same scale, none saturated) rather than reading X again.
            let xname = format!("{}.input", a.name);
            let xq = match (x.known_max_abs(), pointwise) {
                (Some(clip), Some(_)) if sub.is_none() => match x.known_codes(clip) {
                    Some(codes) => Arc::new(QTensor {
                        data: subsample(&full, &codes.data),
                        scales: codes.scales.clone(),
                        saturated: 0,
                    }),
                    None => Arc::new(quantize_subsample_with_clip(&xname, &full, xv, clip)?),
                },
                (_, Some(_)) if sub.is_none() => Arc::new(quantize_subsample(&xname, &full, xv)?),
                (Some(clip), None) => {
                    x.codes_at_max(clip, || Ok(quantize_with_clip(&xname, xv, clip, Rounding::Nearest)?))?
                }
                _ => Arc::new(quantize(&xname, xv, Granularity::PerTensor, 1, Rounding::Nearest)?),
            };
            let wq = quantize(&format!("{}.weight", a.name), wv, cfg.weight, s.c_out, Rounding::Nearest)?;
            {
                let mut st = a.quant.lock();
                st.stats.saturation_x = xq.saturation_rate();
                st.stats.saturation_w = wq.saturation_rate();
            }
            if let Some(keep) = cfg.fp32_operand {
                // The ablation: FP32 convolutions of the dequantized codes, with the operand
                // `keep` as it is.
                let xs = if keep == Operand::Input { xv.to_vec() } else { xq.dequantize() };
                let ws = if keep == Operand::Weight { wv.to_vec() } else { wq.dequantize() };
                let y = fresh(s.y_len(), |y| conv2d_fwd_f32(&s, &xs, &ws, y))?.0;
                let saved = rec.as_ref().map(|_| Saved::Simulated { x: xs, w: wq, w_f32: w.detach(), cfg, keep });
                (y, saved, None)
            } else {
                let (y, ()) = fresh(s.y_len(), |y| conv2d_fwd_i8(a.path, &s, (&*xq).into(), (&wq).into(), y))?;
                // The input gradient needs the f32 weights only to quantize them per tensor again.
                let keep_w = wq.channels() > 1 && !s.is_depthwise();
                // Each output value is an integer sum times its channel's scale: a batch norm that
                // reads the output in a recorded pass keeps the sums.
                let sum_scales = rec.as_ref().map(|_| -> std::sync::Arc<[f32]> {
                    (0..s.c_out).map(|co| output_scale(xq.scales[0], &wq.scales, co)).collect()
                });
                let saved = rec.as_ref().map(|_| Saved::Int8 { x: xq, w: wq, w_f32: keep_w.then(|| w.detach()), cfg });
                (y, saved, sum_scales)
            }
        }
    };
    let y = cpu_out(y, out_shape);
    let y = match a.precision {
        Precision::Int8(cfg) if cfg.f16_batch_norm_input => y.with_f16_ok(),
        _ => y,
    };
    let y = match sum_scales {
        Some(scales) => y.with_sum_scales(scales),
        None => y,
    };
    Ok(match (rec, saved) {
        (Some(r), Some(saved)) => r.output(
            name,
            y,
            ConvBackward { layer: a.name.to_string(), full, pointwise, path: a.path, quant: a.quant.clone(), saved },
        ),
        _ => y,
    })
}

/// What the forward pass keeps for the backward pass.
enum Saved {
    /// FP32: the operands the wanted gradients read.
    Fp32 { x: Option<Tensor>, w: Option<Tensor> },
    /// INT8: the codes of X (its subsample for a strided 1x1) and W, and the f32 weights when
    /// the input gradient must quantize them again.
    Int8 { x: Arc<QTensor>, w: QTensor, w_f32: Option<Tensor>, cfg: Int8Config },
    /// INT8 with one operand in FP32 (`Int8Config::fp32_operand`): X as the forward pass read
    /// it, W's codes and its f32 values.
    Simulated { x: Vec<f32>, w: QTensor, w_f32: Tensor, cfg: Int8Config, keep: Operand },
}

struct ConvBackward {
    layer: String,
    full: ConvShape,
    pointwise: Option<ConvShape>,
    path: Int8Path,
    quant: QuantState,
    saved: Saved,
}

impl Backward for ConvBackward {
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let Self { layer, full, pointwise, path, quant, saved } = *self;
        let s = pointwise.unwrap_or(full);
        let g = grad.cpu()?;
        let (dx, dw) = match saved {
            Saved::Fp32 { x, w } => {
                let dx = match &w {
                    Some(w) => {
                        let wv = w.cpu()?;
                        Some(fresh(s.x_len(), |dx| conv2d_dx_f32(&s, wv, g, dx))?.0)
                    }
                    None => None,
                };
                let dw = match &x {
                    Some(x) => {
                        let mut dw = zeros(s.w_len());
                        conv2d_dw_f32(&s, x.cpu()?, g, &mut dw)?;
                        Some(dw)
                    }
                    None => None,
                };
                (dx, dw)
            }
            Saved::Int8 { x, w, w_f32, cfg } => {
                // dY is quantized (and the layer's DSGC state advanced) whatever is wanted of it.
                let dyq = quant.lock().quantize_grad(&layer, g, &cfg)?;
                let dx = if needs[0] {
                    let wq = input_grad_weight(&layer, &w, w_f32.as_ref(), s.is_depthwise())?;
                    // A strided 1x1 convolution's kernel places its gradient back itself.
                    Some(fresh(full.x_len(), |dx| conv2d_dx_i8(path, &full, (&*wq).into(), (&dyq).into(), dx))?.0)
                } else {
                    None
                };
                let dw = if needs[1] {
                    let mut dw = zeros(s.w_len());
                    conv2d_dw_i8(path, &s, (&*x).into(), (&dyq).into(), &mut dw)?;
                    Some(dw)
                } else {
                    None
                };
                (dx, dw)
            }
            Saved::Simulated { x, w, w_f32, cfg, keep } => {
                let gs = if keep == Operand::Grad {
                    // No quantization, so no deviation: DCLR leaves the layer's rate alone.
                    let mut st = quant.lock();
                    st.stats.steps += 1;
                    (st.stats.distance, st.stats.phi) = (0.0, 1.0);
                    g.to_vec()
                } else {
                    quant.lock().quantize_grad(&layer, g, &cfg)?.dequantize()
                };
                let dx = if needs[0] {
                    let ws = if keep == Operand::Weight {
                        w_f32.cpu()?.to_vec()
                    } else {
                        input_grad_weight(&layer, &w, Some(&w_f32), s.is_depthwise())?.dequantize()
                    };
                    let dx = fresh(s.x_len(), |dx| conv2d_dx_f32(&s, &ws, &gs, dx))?.0;
                    Some(match pointwise {
                        // `upsample` writes every pixel, the ones the convolution never read as
                        // zero.
                        Some(_) => {
                            fresh(full.x_len(), |placed| {
                                upsample(&full, &dx, placed);
                                Ok(())
                            })?
                            .0
                        }
                        None => dx,
                    })
                } else {
                    None
                };
                let dw = if needs[1] {
                    let mut dw = zeros(s.w_len());
                    conv2d_dw_f32(&s, &x, &gs, &mut dw)?;
                    Some(dw)
                } else {
                    None
                };
                (dx, dw)
            }
        };
        let x_shape = Shape::from([full.n, full.c_in, full.h, full.w]);
        let w_shape = Shape::from([full.c_out, full.c_in / full.groups, full.kh, full.kw]);
        Ok(vec![dx.map(|v| cpu_out(v, x_shape)), dw.map(|v| cpu_out(v, w_shape))])
    }

    fn saved_bytes(&self) -> usize {
        match &self.saved {
            Saved::Fp32 { x, w } => {
                4 * (x.as_ref().map_or(0, Tensor::elem_count) + w.as_ref().map_or(0, Tensor::elem_count))
            }
            Saved::Int8 { x, w, w_f32, .. } => {
                x.data.len() + w.data.len() + 4 * w_f32.as_ref().map_or(0, Tensor::elem_count)
            }
            Saved::Simulated { x, w, w_f32, .. } => 4 * x.len() + w.data.len() + 4 * w_f32.elem_count(),
        }
    }
}

/// The convolution on a GPU: the CPU path's steps on `int8-core`'s CUDA kernels (the same
/// quantization, codes kept for the backward pass, DSGC and DCLR state), so that the outputs,
/// gradients and statistics are the CPU's (bit for bit at INT8; FP32 within cuBLAS's rounding).
#[cfg(feature = "cuda")]
mod gpu {
    use int8_core::conv::{ConvShape, strided_pointwise};
    use int8_core::cuda::{GpuQTensor, conv as kc, quant as kq};
    use int8_core::quant::{Granularity, Rounding};

    use super::ConvArgs;
    use crate::cuda::{On, dev, saturation_rate, zeros};
    use crate::error::{NnError, Result};
    use crate::precision::{Int8Config, Precision};
    use crate::stats::QuantState;
    use crate::tape::{Backward, record};
    use crate::tensor::{Shape, Tensor};

    pub(super) fn conv2d(
        on: &On,
        x: &Tensor,
        w: &Tensor,
        a: ConvArgs<'_>,
        full: ConvShape,
        name: &'static str,
    ) -> Result<Tensor> {
        let rec = record(&[x, w]);
        let pointwise = strided_pointwise(&full).filter(|_| matches!(a.precision, Precision::Int8(_)));
        let s = pointwise.unwrap_or(full);
        let (xv, wv) = (dev(x)?, dev(w)?);
        let mut y = zeros(on, s.y_len())?;
        let saved = match a.precision {
            Precision::Fp32 => {
                kc::conv2d_fwd_f32(on, &s, xv, wv, &mut y)?;
                rec.as_ref()
                    .map(|r| Saved::Fp32 { x: r.needs(1).then(|| x.detach()), w: r.needs(0).then(|| w.detach()) })
            }
            Precision::Int8(cfg) => {
                if cfg.fp32_operand.is_some() {
                    return Err(NnError::CpuOnly {
                        op: "int8-conv2d with an operand kept in fp32",
                        device: x.device().to_string(),
                    });
                }
                let sub = pointwise.map(|_| kc::subsample_f32(on, &full, xv)).transpose()?;
                let xs = sub.as_ref().unwrap_or(xv);
                let (pt, near) = (Granularity::PerTensor, Rounding::Nearest);
                let xq = kq::quantize(on, &format!("{}.input", a.name), xs, pt, 1, near)?;
                let wq = kq::quantize(on, &format!("{}.weight", a.name), wv, cfg.weight, s.c_out, near)?;
                kc::conv2d_fwd_i8(on, &s, xq.view(), wq.view(), &mut y)?;
                {
                    let mut st = a.quant.lock();
                    st.stats.saturation_x = saturation_rate(&xq);
                    st.stats.saturation_w = saturation_rate(&wq);
                }
                let keep_w = wq.scales.len() > 1 && !s.is_depthwise();
                rec.as_ref().map(|_| Saved::Int8 { x: xq, w: wq, w_f32: keep_w.then(|| w.detach()), cfg })
            }
        };
        let y = on.out(y, [full.n, full.c_out, full.out_h(), full.out_w()]);
        Ok(match (rec, saved) {
            (Some(r), Some(saved)) => r.output(
                name,
                y,
                ConvBackward {
                    on: on.clone(),
                    layer: a.name.to_string(),
                    full,
                    pointwise,
                    quant: a.quant.clone(),
                    saved,
                },
            ),
            _ => y,
        })
    }

    // One per recorded op, inside the tape's boxed backward object: its size does not matter.
    #[allow(clippy::large_enum_variant)]
    enum Saved {
        Fp32 { x: Option<Tensor>, w: Option<Tensor> },
        Int8 { x: GpuQTensor, w: GpuQTensor, w_f32: Option<Tensor>, cfg: Int8Config },
    }

    struct ConvBackward {
        on: On,
        layer: String,
        full: ConvShape,
        pointwise: Option<ConvShape>,
        quant: QuantState,
        saved: Saved,
    }

    impl Backward for ConvBackward {
        fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let Self { on, layer, full, pointwise, quant, saved } = *self;
            let s = pointwise.unwrap_or(full);
            let grad = on.bring(&grad)?;
            let g = dev(&grad)?;
            let (mut dx, dw) = match saved {
                Saved::Fp32 { x, w } => {
                    let dx = match &w {
                        Some(w) => {
                            let mut dx = zeros(&on, s.x_len())?;
                            kc::conv2d_dx_f32(&on, &s, dev(w)?, g, &mut dx)?;
                            Some(dx)
                        }
                        None => None,
                    };
                    let dw = match &x {
                        Some(x) => {
                            let mut dw = zeros(&on, s.w_len())?;
                            kc::conv2d_dw_f32(&on, &s, dev(x)?, g, &mut dw)?;
                            Some(dw)
                        }
                        None => None,
                    };
                    (dx, dw)
                }
                Saved::Int8 { x, w, w_f32, cfg } => {
                    let dyq = quant.lock().quantize_grad_gpu(&on, &layer, g, &cfg)?;
                    let dx = if needs[0] {
                        // The input gradient takes one weight scale (see `input_grad_weight`).
                        let requantized;
                        let wq = if w.scales.len() == 1 || s.is_depthwise() {
                            &w
                        } else {
                            let Some(w_f32) = &w_f32 else {
                                return Err(NnError::Graph(format!(
                                    "layer `{layer}`: the f32 weights for its input gradient were not kept; \
                                     this is a bug in int8-nn"
                                )));
                            };
                            let (pt, near) = (Granularity::PerTensor, Rounding::Nearest);
                            requantized = kq::quantize(&on, &format!("{layer}.weight"), dev(w_f32)?, pt, 1, near)?;
                            &requantized
                        };
                        let mut dx = zeros(&on, s.x_len())?;
                        kc::conv2d_dx_i8(&on, &s, wq.view(), dyq.view(), &mut dx)?;
                        Some(dx)
                    } else {
                        None
                    };
                    let dw = if needs[1] {
                        let mut dw = zeros(&on, s.w_len())?;
                        kc::conv2d_dw_i8(&on, &s, x.view(), dyq.view(), &mut dw)?;
                        Some(dw)
                    } else {
                        None
                    };
                    (dx, dw)
                }
            };
            if let (Some(_), Some(sub)) = (pointwise, dx.as_ref()) {
                // `upsample` writes every pixel, the ones the convolution never read as zero.
                let mut placed = zeros(&on, full.x_len())?;
                kc::upsample(&on, &full, sub, &mut placed)?;
                dx = Some(placed);
            }
            let x_shape = Shape::from([full.n, full.c_in, full.h, full.w]);
            let w_shape = Shape::from([full.c_out, full.c_in / full.groups, full.kh, full.kw]);
            Ok(vec![dx.map(|v| on.out(v, x_shape)), dw.map(|v| on.out(v, w_shape))])
        }

        fn saved_bytes(&self) -> usize {
            match &self.saved {
                Saved::Fp32 { x, w } => {
                    4 * (x.as_ref().map_or(0, Tensor::elem_count) + w.as_ref().map_or(0, Tensor::elem_count))
                }
                Saved::Int8 { x, w, w_f32, .. } => {
                    x.codes.len() + w.codes.len() + 4 * w_f32.as_ref().map_or(0, Tensor::elem_count)
                }
            }
        }
    }
}

/// `y + b[c]` for NCHW `y` and a bias `b` of one value per channel.
pub(crate) fn add_channel_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _t = crate::profile::span("bias", false);
    let &[n, c, h, w] = y.dims() else {
        return Err(NnError::Shape(format!("a channel bias needs an NCHW input, got {}", y.shape())));
    };
    if b.dims() != [c] {
        return Err(NnError::Shape(format!("a bias of shape {} for {c} channels", b.shape())));
    }
    let (yv, bv, hw) = (y.cpu()?, b.cpu()?, h * w);
    let mut out = zeros(n * c * hw);
    for (p, (o, i)) in out.chunks_mut(hw.max(1)).zip(yv.chunks(hw.max(1))).enumerate() {
        let bias = bv[p % c];
        for (o, &i) in o.iter_mut().zip(i) {
            *o = i + bias;
        }
    }
    let out = cpu_out(out, y.shape());
    Ok(match record(&[y, b]) {
        None => out,
        Some(r) => r.output("bias", out, BiasBackward { c, hw }),
    })
}

struct BiasBackward {
    c: usize,
    hw: usize,
}

impl Backward for BiasBackward {
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let db = needs[1].then(|| -> Result<Tensor> {
            let mut db = vec![0f64; self.c];
            for (p, plane) in grad.cpu()?.chunks(self.hw.max(1)).enumerate() {
                db[p % self.c] += plane.iter().map(|&v| f64::from(v)).sum::<f64>();
            }
            Ok(cpu_out(db.into_iter().map(|v| v as f32).collect(), self.c))
        });
        Ok(vec![needs[0].then(|| grad.clone()), db.transpose()?])
    }
}
