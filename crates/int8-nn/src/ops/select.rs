//! Picking rows of a tensor by index, with a gradient: PyTorch's `x[idx]` / `index_select(0, idx)`
//! on the first dimension. The detectors' losses need it where torchvision indexes a tensor that
//! carries a gradient: the RPN's objectness and box deltas at the sampled anchors, and the Faster
//! R-CNN box head's deltas of each positive region's own class (`rpn.py`, `roi_heads.py`).
//!
//! The backward pass adds each output row's gradient into the row it came from, so an index given
//! twice receives the sum of both gradients, as PyTorch's `index_select` backward (`index_add_`)
//! does.

use rayon::prelude::*;

use super::{cpu_out, zeros};
use crate::error::{NnError, Result};
use crate::tape::{Backward, record};
use crate::tensor::{Shape, Tensor};

/// Rows `rows` of `x` along its first dimension, in the order given (repeats allowed): a tensor of
/// shape `rows.len() x x.dims()[1..]`. An index out of range is an error.
pub fn select_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let _t = crate::profile::span("select-rows", false);
    let Some((&n, rest)) = x.dims().split_first() else {
        return Err(NnError::Shape("select_rows needs a tensor of rank 1 or more, got a scalar".into()));
    };
    if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
        return Err(NnError::Shape(format!(
            "select_rows: row {bad} of a tensor of shape {} with {n} rows; pass indices below {n}",
            x.shape()
        )));
    }
    let width: usize = rest.iter().product();
    let src = x.cpu()?;
    let mut y = zeros(rows.len() * width);
    if width > 0 {
        y.par_chunks_mut(width).zip(rows.par_iter()).for_each(|(dst, &r)| {
            dst.copy_from_slice(&src[r * width..(r + 1) * width]);
        });
    }
    let mut dims = vec![rows.len()];
    dims.extend_from_slice(rest);
    let y = cpu_out(y, dims);
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output("select-rows", y, SelectRowsBackward { rows: rows.to_vec(), width, x: x.shape().clone() }),
    })
}

struct SelectRowsBackward {
    rows: Vec<usize>,
    width: usize,
    x: Shape,
}

impl Backward for SelectRowsBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let g = grad.cpu()?;
        let mut dx = zeros(self.x.elem_count());
        // Sequential: repeated indices add into one row, and the order of additions stays fixed.
        for (k, &r) in self.rows.iter().enumerate() {
            let (dst, src) = (&mut dx[r * self.width..(r + 1) * self.width], &g[k * self.width..(k + 1) * self.width]);
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        }
        Ok(vec![Some(cpu_out(dx, self.x))])
    }

    fn saved_bytes(&self) -> usize {
        8 * self.rows.len()
    }
}

impl Tensor {
    /// Rows `rows` of `self` along the first dimension ([`select_rows`]).
    pub fn select_rows(&self, rows: &[usize]) -> Result<Tensor> {
        select_rows(self, rows)
    }
}

#[cfg(test)]
mod tests {
    use int8_core::rng::CounterRng;

    use super::*;

    fn uniform(n: usize, seed: u64) -> Vec<f32> {
        let r = CounterRng::new(seed);
        (0..n).map(|i| r.uniform(i as u64) * 2.0 - 1.0).collect()
    }

    /// `sum(select_rows(x, rows) * w)` in f64 by plain loops over the indices.
    fn reference(x: &[f32], width: usize, rows: &[usize], w: &[f32]) -> f64 {
        let mut s = 0.0;
        for (k, &r) in rows.iter().enumerate() {
            for c in 0..width {
                s += f64::from(x[r * width + c]) * f64::from(w[k * width + c]);
            }
        }
        s
    }

    #[test]
    fn forward_copies_the_named_rows_in_order() {
        let x = uniform(5 * 2 * 3, 1);
        let t = Tensor::from_vec(x.clone(), [5, 2, 3]).unwrap();
        let rows = [4, 0, 4, 2];
        let y = select_rows(&t, &rows).unwrap();
        assert_eq!(y.dims(), &[4, 2, 3]);
        let want: Vec<f32> = rows.iter().flat_map(|&r| x[r * 6..(r + 1) * 6].to_vec()).collect();
        assert_eq!(y.to_vec(), want);
        assert_eq!(select_rows(&t, &[]).unwrap().dims(), &[0, 2, 3]);
        assert!(select_rows(&t, &[5]).is_err(), "row 5 of 5 is out of range");
        assert!(select_rows(&Tensor::scalar(1.0), &[0]).is_err());
    }

    #[test]
    fn gradient_matches_finite_differences_and_adds_repeated_rows() {
        let (n, width) = (6, 4);
        let x = uniform(n * width, 2);
        // Row 3 twice, row 1 and 5 never: theirs must get exactly zero.
        let rows = [3, 0, 3, 2, 4];
        let w = uniform(rows.len() * width, 3);
        let wt = Tensor::from_vec(w.clone(), [rows.len(), width]).unwrap();
        let f = |t: &Tensor| select_rows(t, &rows).unwrap().mul(&wt).unwrap().sum_all().unwrap();
        let xt = Tensor::from_vec(x.clone(), [n, width]).unwrap().requires_grad();
        let y = f(&xt);
        assert!((f64::from(y.to_scalar().unwrap()) - reference(&x, width, &rows, &w)).abs() < 1e-5);
        let g = y.backward().unwrap().get(&xt).unwrap().to_vec();
        for i in 0..x.len() {
            // The loss is linear in x, so central differences are exact up to rounding.
            let at = |d: f64| {
                let mut v = x.clone();
                v[i] += d as f32;
                reference(&v, width, &rows, &w)
            };
            let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
            assert!((fd - f64::from(g[i])).abs() < 1e-4, "x[{i}]: {fd} vs {}", g[i]);
        }
        for r in [1, 5] {
            assert!(g[r * width..(r + 1) * width].iter().all(|&v| v == 0.0));
        }
        let r3: Vec<f32> = (0..width).map(|c| w[c] + w[2 * width + c]).collect();
        assert_eq!(&g[3 * width..4 * width], r3.as_slice(), "row 3's two gradients add");
    }
}
