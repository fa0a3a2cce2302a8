//! Ops that move values without computing: reshape and flatten (which share storage) and
//! concatenation along a dimension (Inception's branches).

use rayon::prelude::*;

use super::cpu_out;
use crate::error::{NnError, Result};
use crate::tape::{Backward, record};
use crate::tensor::{Shape, Tensor};

impl Tensor {
    /// The same values under another shape of the same size; gradients are reshaped back.
    pub fn reshape(&self, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.elem_count() != self.elem_count() {
            return Err(NnError::Shape(format!(
                "cannot reshape a tensor of shape {} ({} values) to {shape} ({} values)",
                self.shape(),
                self.elem_count(),
                shape.elem_count()
            )));
        }
        let out = self.detach().with_shape(shape);
        Ok(match record(&[self]) {
            None => out,
            Some(rec) => rec.output("reshape", out, Reshape { shape: self.shape().clone() }),
        })
    }

    /// The dimensions from `dim` on merged into one (`n x c x h x w` to `n x chw` for `dim = 1`).
    pub fn flatten_from(&self, dim: usize) -> Result<Tensor> {
        if dim >= self.rank().max(1) {
            return Err(NnError::Shape(format!(
                "cannot flatten a tensor of shape {} from dimension {dim}",
                self.shape()
            )));
        }
        let mut dims = self.dims()[..dim].to_vec();
        dims.push(self.dims()[dim..].iter().product());
        self.reshape(dims)
    }
}

/// The backward pass of a reshape: the gradient takes the input's shape back.
pub(crate) struct Reshape {
    pub(crate) shape: Shape,
}

impl Backward for Reshape {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(grad.detach().reshape(self.shape)?)])
    }
}

/// The tensors joined along dimension `dim` (channels of NCHW images for `dim = 1`); every other
/// dimension must agree.
pub fn concat(parts: &[Tensor], dim: usize) -> Result<Tensor> {
    let _t = crate::profile::span("concat", false);
    let Some(first) = parts.first() else {
        return Err(NnError::Shape("concat of no tensors".into()));
    };
    if dim >= first.rank() {
        return Err(NnError::Shape(format!("concat along dimension {dim} of tensors of shape {}", first.shape())));
    }
    for p in parts {
        let (a, b) = (p.dims(), first.dims());
        if a.len() != b.len() || a.iter().zip(b).enumerate().any(|(i, (x, y))| i != dim && x != y) {
            return Err(NnError::Shape(format!(
                "concat along dimension {dim} of shapes {} and {}: the other dimensions must match",
                first.shape(),
                p.shape()
            )));
        }
    }
    // Each part is `outer` blocks of `inner_i` contiguous values; the output interleaves them.
    let outer: usize = first.dims()[..dim].iter().product();
    let inners: Vec<usize> = parts.iter().map(|p| p.elem_count() / outer.max(1)).collect();
    let row: usize = inners.iter().sum();
    let mut y = super::zeros(outer * row);
    let sources = parts.iter().map(|p| p.cpu()).collect::<Result<Vec<_>>>()?;
    y.par_chunks_mut(row.max(1)).enumerate().for_each(|(o, dst)| {
        let mut at = 0;
        for (src, &inner) in sources.iter().zip(&inners) {
            dst[at..at + inner].copy_from_slice(&src[o * inner..(o + 1) * inner]);
            at += inner;
        }
    });
    let mut dims = first.dims().to_vec();
    dims[dim] = parts.iter().map(|p| p.dims()[dim]).sum();
    let y = cpu_out(y, dims);
    let refs: Vec<&Tensor> = parts.iter().collect();
    Ok(match record(&refs) {
        None => y,
        Some(r) => {
            let shapes = parts.iter().map(|p| p.shape().clone()).collect();
            r.output("concat", y, ConcatBackward { outer, inners, shapes })
        }
    })
}

struct ConcatBackward {
    outer: usize,
    inners: Vec<usize>,
    shapes: Vec<Shape>,
}

impl Backward for ConcatBackward {
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let g = grad.cpu()?;
        let row: usize = self.inners.iter().sum();
        let mut at = 0;
        let mut out = Vec::with_capacity(self.inners.len());
        for ((&inner, shape), &need) in self.inners.iter().zip(self.shapes).zip(needs) {
            if need {
                let mut d = super::zeros(self.outer * inner);
                d.par_chunks_mut(inner.max(1)).enumerate().for_each(|(o, dst)| {
                    dst.copy_from_slice(&g[o * row + at..o * row + at + inner]);
                });
                out.push(Some(cpu_out(d, shape)));
            } else {
                out.push(None);
            }
            at += inner;
        }
        Ok(out)
    }
}
