//! Fully connected layer, `y = x w^T + b`, FP32 or INT8 in both passes: the same treatment as the
//! convolution (Zhu et al., CVPR 2020, Sec. 3-4), for networks whose last layer is trained in
//! INT8 too.

use int8_core::gemm::{Int8Path, MatMut, MatRef, Parallelism, gemm_f32, gemm_i8_scaled};
use int8_core::quant::{Granularity, QTensor, Rounding, quantize};

use super::{cpu_out, input_grad_weight, zeros};
use crate::error::{NnError, Result};
use crate::precision::{Int8Config, Precision};
use crate::stats::QuantState;
use crate::tape::{Backward, record};
use crate::tensor::Tensor;

/// `(batch, in, out)` from the operand dims, or an error naming the layer.
fn dims(name: &str, x: &[usize], w: &[usize], b: &[usize]) -> Result<(usize, usize, usize)> {
    match (x, w, b) {
        (&[n, i], &[o, wi], &[bo]) if i == wi && o == bo => Ok((n, i, o)),
        _ => Err(NnError::BadInput {
            layer: name.into(),
            why: format!("input {x:?}, weight {w:?} and bias {b:?} do not make a linear layer (n x in, out x in, out)"),
        }),
    }
}

fn op_name(precision: Precision) -> &'static str {
    match precision {
        Precision::Fp32 => "linear",
        Precision::Int8(_) => "int8-linear",
    }
}

/// `x w^T + b` for layer `name`.
pub(crate) fn linear(
    name: &str,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    precision: Precision,
    quant: &QuantState,
    path: Int8Path,
) -> Result<Tensor> {
    let op = op_name(precision);
    let _t = crate::profile::span(op, false);
    let (n, i, o) = dims(name, x.dims(), w.dims(), b.dims())?;
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement(op, &[x, w, b])? {
        return gpu::linear(&on, op, name, (x, w, b), (n, i, o), precision, quant);
    }
    let rec = record(&[x, w, b]);
    let (xv, wv, bv) = (x.cpu()?, w.cpu()?, b.cpu()?);
    let mut y = zeros(n * o);
    let saved = match precision {
        Precision::Fp32 => {
            gemm_f32(
                MatRef::row_major(xv, n, i)?,
                MatRef::row_major(wv, o, i)?.t(),
                MatMut::row_major(&mut y, n, o)?,
                false,
                Parallelism::Rayon,
            )?;
            rec.as_ref().map(|r| Saved::Fp32 { x: r.needs(1).then(|| x.detach()), w: r.needs(0).then(|| w.detach()) })
        }
        Precision::Int8(cfg) => {
            if cfg.fp32_operand.is_some() {
                return Err(NnError::BadInput {
                    layer: name.to_string(),
                    why: "an operand kept in fp32 (quant.keep_fp32) is an ablation of convolutions only; keep this \
                          linear layer fp32 (a quant.rules entry) or leave quant.keep_fp32 unset"
                        .into(),
                });
            }
            let xq = quantize(&format!("{name}.input"), xv, Granularity::PerTensor, 1, Rounding::Nearest)?;
            let wq = quantize(&format!("{name}.weight"), wv, cfg.weight, o, Rounding::Nearest)?;
            // y^T = W x^T, so that per-output-channel weight scales are row scales.
            let sx = xq.scales[0];
            let scales: Vec<f32> = (0..o).map(|r| sx * wq.scales[if wq.channels() == 1 { 0 } else { r }]).collect();
            let a = MatRef::row_major(&wq.data, o, i)?;
            let bm = MatRef::row_major(&xq.data, n, i)?.t();
            gemm_i8_scaled(path, a, bm, MatMut::new(&mut y, o, n, 1, o)?, &scales, Parallelism::Rayon)?;
            {
                let mut st = quant.lock();
                st.stats.saturation_x = xq.saturation_rate();
                st.stats.saturation_w = wq.saturation_rate();
            }
            let w_f32 = (wq.channels() > 1).then(|| w.detach());
            rec.as_ref().map(|_| Saved::Int8 { x: xq, w: wq, w_f32, cfg })
        }
    };
    for row in y.chunks_exact_mut(o) {
        for (v, &bias) in row.iter_mut().zip(bv) {
            *v += bias;
        }
    }
    let y = cpu_out(y, (n, o));
    Ok(match (rec, saved) {
        (Some(r), Some(saved)) => r.output(
            op,
            y,
            LinearBackward { layer: name.to_string(), dims: (n, i, o), path, quant: quant.clone(), saved },
        ),
        _ => y,
    })
}

enum Saved {
    Fp32 { x: Option<Tensor>, w: Option<Tensor> },
    Int8 { x: QTensor, w: QTensor, w_f32: Option<Tensor>, cfg: Int8Config },
}

struct LinearBackward {
    layer: String,
    dims: (usize, usize, usize),
    path: Int8Path,
    quant: QuantState,
    saved: Saved,
}

impl Backward for LinearBackward {
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let (n, i, o) = self.dims;
        let g = grad.cpu()?;
        let mut db = zeros(o);
        for row in g.chunks_exact(o) {
            for (d, &v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
        let (mut dx, mut dw) = (needs[0].then(|| zeros(n * i)), needs[1].then(|| zeros(o * i)));
        match self.saved {
            Saved::Fp32 { x, w } => {
                if let (Some(dx), Some(w)) = (dx.as_mut(), &w) {
                    let (gm, wm) = (MatRef::row_major(g, n, o)?, MatRef::row_major(w.cpu()?, o, i)?);
                    gemm_f32(gm, wm, MatMut::row_major(dx, n, i)?, false, Parallelism::Rayon)?;
                }
                if let (Some(dw), Some(x)) = (dw.as_mut(), &x) {
                    let (gm, xm) = (MatRef::row_major(g, n, o)?.t(), MatRef::row_major(x.cpu()?, n, i)?);
                    gemm_f32(gm, xm, MatMut::row_major(dw, o, i)?, false, Parallelism::Rayon)?;
                }
            }
            Saved::Int8 { x, w, w_f32, cfg } => {
                let dyq = self.quant.lock().quantize_grad(&self.layer, g, &cfg)?;
                let sdy = dyq.scales[0];
                // dx = dy W, dW = dy^T x, each an exact INT8 product scaled once.
                if let Some(dx) = dx.as_mut() {
                    let wq = input_grad_weight(&self.layer, &w, w_f32.as_ref(), false)?;
                    let (gm, wm) = (MatRef::row_major(&dyq.data, n, o)?, MatRef::row_major(&wq.data, o, i)?);
                    let scales = vec![sdy * wq.scales[0]; n];
                    gemm_i8_scaled(self.path, gm, wm, MatMut::row_major(dx, n, i)?, &scales, Parallelism::Rayon)?;
                }
                if let Some(dw) = dw.as_mut() {
                    let (gm, xm) = (MatRef::row_major(&dyq.data, n, o)?.t(), MatRef::row_major(&x.data, n, i)?);
                    let scales = vec![sdy * x.scales[0]; o];
                    gemm_i8_scaled(self.path, gm, xm, MatMut::row_major(dw, o, i)?, &scales, Parallelism::Rayon)?;
                }
            }
        }
        Ok(vec![dx.map(|v| cpu_out(v, (n, i))), dw.map(|v| cpu_out(v, (o, i))), needs[2].then(|| cpu_out(db, o))])
    }

    fn saved_bytes(&self) -> usize {
        match &self.saved {
            Saved::Fp32 { x, w } => {
                4 * (x.as_ref().map_or(0, Tensor::elem_count) + w.as_ref().map_or(0, Tensor::elem_count))
            }
            Saved::Int8 { x, w, w_f32, .. } => {
                x.data.len() + w.data.len() + 4 * w_f32.as_ref().map_or(0, Tensor::elem_count)
            }
        }
    }
}

/// The linear layer on a GPU. INT8, bit for bit the CPU's: the forward product as a 1x1
/// convolution (its output `(f32)sum * (s_x * s_w[o])` is the CPU's row-scaled product), the
/// input gradient `dY W` and the weight gradient `dY^T X` as exact INT8 products scaled as the CPU
/// scales them. FP32 on cuBLAS (within its rounding of the CPU's sums). The bias is added exactly
/// as on the CPU; its gradient, a column sum of `dY`, is a cuBLAS product (FP32 rounding).
#[cfg(feature = "cuda")]
mod gpu {
    use int8_core::conv::ConvShape;
    use int8_core::cuda::gemm::{Dims, gemm_f32, gemm_i8_scaled, transpose_i8};
    use int8_core::cuda::{CudaSlice, GpuQTensor, conv as kc, nn as kn, quant as kq};
    use int8_core::quant::{Granularity, Rounding};

    use crate::cuda::{On, dev, saturation_rate, zeros};
    use crate::error::{NnError, Result};
    use crate::precision::{Int8Config, Precision};
    use crate::stats::QuantState;
    use crate::tape::{Backward, record};
    use crate::tensor::Tensor;

    /// `x w^T` as a 1x1 convolution of `n` images of `i` channels into `o` channels.
    fn pointwise((n, i, o): (usize, usize, usize)) -> ConvShape {
        ConvShape {
            n,
            c_in: i,
            h: 1,
            w: 1,
            c_out: o,
            kh: 1,
            kw: 1,
            stride: (1, 1),
            pad: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }

    /// `rows` copies of the row `b` (a product with a column of ones: one exact term each).
    fn broadcast_rows(on: &On, b: &CudaSlice<f32>, rows: usize) -> Result<CudaSlice<f32>> {
        let ones = on.upload(&vec![1.0f32; rows])?;
        let mut out = zeros(on, rows * b.len())?;
        gemm_f32(on, &ones, b, Dims { m: rows, n: b.len(), k: 1 }, &mut out, false)?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear(
        on: &On,
        op: &'static str,
        name: &str,
        (x, w, b): (&Tensor, &Tensor, &Tensor),
        (n, i, o): (usize, usize, usize),
        precision: Precision,
        quant: &QuantState,
    ) -> Result<Tensor> {
        let rec = record(&[x, w, b]);
        let (xv, wv, bv) = (dev(x)?, dev(w)?, dev(b)?);
        let s = pointwise((n, i, o));
        let mut xw = zeros(on, n * o)?;
        let saved = match precision {
            Precision::Fp32 => {
                kc::conv2d_fwd_f32(on, &s, xv, wv, &mut xw)?;
                rec.as_ref()
                    .map(|r| Saved::Fp32 { x: r.needs(1).then(|| x.detach()), w: r.needs(0).then(|| w.detach()) })
            }
            Precision::Int8(cfg) => {
                if cfg.fp32_operand.is_some() {
                    return Err(NnError::CpuOnly {
                        op: "int8-linear with an operand kept in fp32",
                        device: x.device().to_string(),
                    });
                }
                let (pt, near) = (Granularity::PerTensor, Rounding::Nearest);
                let xq = kq::quantize(on, &format!("{name}.input"), xv, pt, 1, near)?;
                let wq = kq::quantize(on, &format!("{name}.weight"), wv, cfg.weight, o, near)?;
                kc::conv2d_fwd_i8(on, &s, xq.view(), wq.view(), &mut xw)?;
                {
                    let mut st = quant.lock();
                    st.stats.saturation_x = saturation_rate(&xq);
                    st.stats.saturation_w = saturation_rate(&wq);
                }
                let w_f32 = (wq.scales.len() > 1).then(|| w.detach());
                rec.as_ref().map(|_| Saved::Int8 { x: xq, w: wq, w_f32, cfg })
            }
        };
        let mut y = zeros(on, n * o)?;
        kn::add(on, &xw, &broadcast_rows(on, bv, n)?, &mut y)?;
        let y = on.out(y, (n, o));
        Ok(match (rec, saved) {
            (Some(r), Some(saved)) => r.output(
                op,
                y,
                LinearBackward {
                    on: on.clone(),
                    layer: name.to_string(),
                    dims: (n, i, o),
                    quant: quant.clone(),
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

    struct LinearBackward {
        on: On,
        layer: String,
        dims: (usize, usize, usize),
        quant: QuantState,
        saved: Saved,
    }

    impl Backward for LinearBackward {
        fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
            let (n, i, o) = self.dims;
            let on = &self.on;
            let grad = on.bring(&grad)?;
            let g = dev(&grad)?;
            let db = if needs[2] {
                let ones = on.upload(&vec![1.0f32; n])?;
                let mut db = zeros(on, o)?;
                gemm_f32(on, &ones, g, Dims { m: 1, n: o, k: n }, &mut db, false)?;
                Some(db)
            } else {
                None
            };
            let (mut dx, mut dw) = (None, None);
            match self.saved {
                Saved::Fp32 { x, w } => {
                    if let (true, Some(w)) = (needs[0], &w) {
                        let mut d = zeros(on, n * i)?;
                        gemm_f32(on, g, dev(w)?, Dims { m: n, n: i, k: o }, &mut d, false)?;
                        dx = Some(d);
                    }
                    if let (true, Some(x)) = (needs[1], &x) {
                        let mut d = zeros(on, o * i)?;
                        kc::conv2d_dw_f32(on, &pointwise(self.dims), dev(x)?, g, &mut d)?;
                        dw = Some(d);
                    }
                }
                Saved::Int8 { x, w, w_f32, cfg } => {
                    let dyq = self.quant.lock().quantize_grad_gpu(on, &self.layer, g, &cfg)?;
                    let sdy = dyq.scales[0];
                    if needs[0] {
                        let requantized;
                        let wq = if w.scales.len() == 1 {
                            &w
                        } else {
                            let Some(w_f32) = &w_f32 else {
                                return Err(NnError::Graph(format!(
                                    "layer `{}`: the f32 weights for its input gradient were not kept; \
                                     this is a bug in int8-nn",
                                    self.layer
                                )));
                            };
                            let (pt, near) = (Granularity::PerTensor, Rounding::Nearest);
                            requantized =
                                kq::quantize(on, &format!("{}.weight", self.layer), dev(w_f32)?, pt, 1, near)?;
                            &requantized
                        };
                        let scales = vec![sdy * wq.scales[0]; n];
                        dx = Some(gemm_i8_scaled(on, &dyq.codes, &wq.codes, Dims { m: n, n: i, k: o }, &scales)?);
                    }
                    if needs[1] {
                        let dyt = transpose_i8(on, &dyq.codes, n, o)?;
                        let scales = vec![sdy * x.scales[0]; o];
                        dw = Some(gemm_i8_scaled(on, &dyt, &x.codes, Dims { m: o, n: i, k: n }, &scales)?);
                    }
                }
            }
            Ok(vec![dx.map(|v| on.out(v, (n, i))), dw.map(|v| on.out(v, (o, i))), db.map(|v| on.out(v, o))])
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
