//! Ops that move values without computing: reshape and flatten (which share storage),
//! concatenation along a dimension (Inception's branches), and permutation of dimensions (a
//! detection head's `N x A*K x H x W` output read as `N x HWA x K`).

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

impl Tensor {
    /// The dimensions reordered: output dimension `i` is input dimension `order[i]` (a
    /// permutation of `0..rank`), the values copied into the new order.
    pub fn permute(&self, order: &[usize]) -> Result<Tensor> {
        let _t = crate::profile::span("permute", false);
        let rank = self.rank();
        let mut seen = vec![false; rank];
        if order.len() != rank || order.iter().any(|&d| d >= rank || std::mem::replace(&mut seen[d], true)) {
            return Err(NnError::Shape(format!(
                "{order:?} is not a permutation of the {rank} dimensions of {}",
                self.shape()
            )));
        }
        let y = cpu_out(
            permuted(self.cpu()?, self.dims(), order),
            order.iter().map(|&d| self.dims()[d]).collect::<Vec<_>>(),
        );
        Ok(match record(&[self]) {
            None => y,
            Some(r) => {
                let mut inverse = vec![0; rank];
                for (i, &d) in order.iter().enumerate() {
                    inverse[d] = i;
                }
                r.output("permute", y, Permute { inverse, dims: y_dims(self.dims(), order) })
            }
        })
    }
}

fn y_dims(dims: &[usize], order: &[usize]) -> Vec<usize> {
    order.iter().map(|&d| dims[d]).collect()
}

/// `x` (of `dims`) with its dimensions in `order`, as a new buffer.
fn permuted(x: &[f32], dims: &[usize], order: &[usize]) -> Vec<f32> {
    let rank = dims.len();
    let mut strides = vec![1usize; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * dims[d + 1];
    }
    let out_dims = y_dims(dims, order);
    let out_strides: Vec<usize> = order.iter().map(|&d| strides[d]).collect();
    let mut y = vec![0f32; x.len()];
    let inner = out_dims.last().copied().unwrap_or(1).max(1);
    y.par_chunks_mut(inner).enumerate().for_each(|(row, out)| {
        // The input offset of this output row's first value.
        let (mut rem, mut at) = (row, 0);
        for d in (0..rank.saturating_sub(1)).rev() {
            at += (rem % out_dims[d]) * out_strides[d];
            rem /= out_dims[d];
        }
        let step = out_strides.last().copied().unwrap_or(1);
        for (k, o) in out.iter_mut().enumerate() {
            *o = x[at + k * step];
        }
    });
    y
}

/// The backward pass of a permutation: the gradient permuted back.
struct Permute {
    inverse: Vec<usize>,
    dims: Vec<usize>,
}

impl Backward for Permute {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let back = permuted(grad.cpu()?, &self.dims, &self.inverse);
        Ok(vec![Some(cpu_out(back, y_dims(&self.dims, &self.inverse)))])
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
