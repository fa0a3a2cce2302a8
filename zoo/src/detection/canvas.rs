//! One canvas for the levels of a feature pyramid, so that a head shared by every level (Faster
//! R-CNN's `RPNHead`, RetinaNet's subnets) runs each of its layers once per step rather than once
//! per level.
//!
//! Why: under the paper's INT8 training each layer quantizes its output gradient with a clip value
//! that Direction Sensitive Gradient Clipping (Zhu et al., CVPR 2020, Sec. 4.1) searches on one of
//! the layer's backward calls and keeps for the next ones. Called once per level, a layer would
//! search on one level's gradient and apply the value to the others; a level without a sampled or
//! matched anchor has an all-zero gradient, whose clip value is 0, and that zeroes the gradient of
//! every other level until the next search (so the RPN's box regression never trained in INT8).
//! On one canvas the layer sees the gradient of all levels at once, as a single layer should.
//!
//! The layout: the finest level in the first column; the others stacked in a second column, one
//! zero row between two of them, one zero column between the columns; zeros elsewhere. A 3x3
//! convolution with a padding of 1 reads zeros beyond each level's border exactly as it does on
//! the level alone, so the levels' outputs are those of per-level calls (FP32: the same values,
//! INT8: one scale for all levels). Between two such convolutions the canvas's gaps must be zeroed
//! again ([`Canvas::mask`]); pointwise layers need nothing.

use int8_nn::ops::concat;
use int8_nn::{NnError, Tensor};

use crate::Result;

/// Where each level lies on a canvas.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Canvas {
    images: usize,
    height: usize,
    width: usize,
    /// Per level: top row, left column, height and width.
    places: Vec<(usize, usize, usize, usize)>,
}

impl Canvas {
    /// The layout for `images` images of levels of `sizes` (height, width), finest first.
    pub(crate) fn new(images: usize, sizes: &[(usize, usize)]) -> Self {
        let mut places = Vec::with_capacity(sizes.len());
        let Some(&(h0, w0)) = sizes.first() else {
            return Self { images, height: 0, width: 0, places };
        };
        places.push((0, 0, h0, w0));
        let (mut height, mut width) = (h0, w0);
        if sizes.len() > 1 {
            let left = w0 + 1;
            let mut row = 0;
            for &(h, w) in &sizes[1..] {
                places.push((row, left, h, w));
                row += h + 1;
                width = width.max(left + w);
            }
            height = height.max(row - 1);
        }
        Self { images, height, width, places }
    }

    /// `levels` (each `images x c x h x w`, as laid out) on one `images x c x H x W` canvas, zeros
    /// around them; gradients flow back to each level.
    pub(crate) fn pack(&self, levels: &[Tensor]) -> Result<Tensor> {
        if levels.len() != self.places.len() {
            return Err(NnError::Shape(format!("{} levels for a canvas of {}", levels.len(), self.places.len())).into());
        }
        if levels.len() == 1 {
            return Ok(levels[0].clone());
        }
        let c = levels[0].dims()[1];
        let n = self.images;
        for (l, &(_, _, h, w)) in levels.iter().zip(&self.places) {
            if l.dims() != [n, c, h, w] {
                return Err(NnError::Shape(format!(
                    "a level of shape {} where {n}x{c}x{h}x{w} was laid out",
                    l.shape()
                ))
                .into());
            }
        }
        let zeros = |h: usize, w: usize| Tensor::zeros((n, c, h, w));
        // `x` with zeros below to `rows` rows and to the right to `cols` columns.
        let pad = |x: &Tensor, rows: usize, cols: usize| -> Result<Tensor> {
            let (h, w) = (x.dims()[2], x.dims()[3]);
            let x = if cols > w { concat(&[x.clone(), zeros(h, cols - w)], 3)? } else { x.clone() };
            Ok(if rows > h { concat(&[x, zeros(rows - h, cols)], 2)? } else { x })
        };
        let right = self.width - self.places[1].1;
        let mut column = Vec::new();
        for (i, l) in levels.iter().enumerate().skip(1) {
            if i > 1 {
                column.push(zeros(1, right));
            }
            column.push(pad(l, l.dims()[2], right)?);
        }
        let column = pad(&concat(&column, 2)?, self.height, right)?;
        let first = pad(&levels[0], self.height, self.places[0].3)?;
        Ok(concat(&[first, zeros(self.height, 1), column], 3)?)
    }

    /// `images x channels x H x W`: 1 where a level lies, 0 in the gaps.
    pub(crate) fn mask(&self, channels: usize) -> Result<Tensor> {
        let plane = self.height * self.width;
        let mut m = vec![0f32; plane];
        for &(top, left, h, w) in &self.places {
            for r in top..top + h {
                m[r * self.width + left..r * self.width + left + w].fill(1.0);
            }
        }
        let all: Vec<f32> = std::iter::repeat_n(m, self.images * channels).flatten().collect();
        Ok(Tensor::from_vec(all, (self.images, channels, self.height, self.width))?)
    }

    /// A prediction on the canvas, `images x A*K x H x W`, read back per level as `images x HWA x
    /// K` (each level's locations row by row, `A` predictions of `K` values at each), the
    /// layout of [`super::scoring_head`].
    pub(crate) fn unpack(&self, y: &Tensor, columns: usize) -> Result<Vec<Tensor>> {
        let &[n, ak, height, width] = y.dims() else {
            return Err(NnError::Shape(format!("a canvas prediction of shape {}", y.shape())).into());
        };
        if (n, height, width) != (self.images, self.height, self.width) || columns == 0 || ak % columns != 0 {
            return Err(NnError::Shape(format!(
                "a prediction of shape {} ({columns} values each) on a canvas of {}x{}x{}",
                y.shape(),
                self.images,
                self.height,
                self.width
            ))
            .into());
        }
        let a = ak / columns;
        let pixels = y
            .reshape([n, a, columns, height, width])?
            .permute(&[0, 3, 4, 1, 2])?
            .reshape([n * height * width, a * columns])?;
        self.places
            .iter()
            .map(|&(top, left, h, w)| {
                let rows: Vec<usize> = (0..n)
                    .flat_map(|i| {
                        (top..top + h).flat_map(move |r| (left..left + w).map(move |c| (i * height + r) * width + c))
                    })
                    .collect();
                Ok(pixels.select_rows(&rows)?.reshape([n, h * w * a, columns])?)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use int8_nn::ConvGeometry;
    use int8_nn::layers::Conv2d;
    use int8_nn::precision::Precision;

    use super::*;

    #[test]
    fn a_shared_convolution_on_the_canvas_gives_each_levels_own_output_and_gradient() {
        let sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)];
        let canvas = Canvas::new(2, &sizes);
        // The first level and a gap column, then the others stacked with gaps: 4 + 1 + 2 + 1 + 1 + 1 + 1 rows.
        assert_eq!((canvas.height, canvas.width), (11, 13));
        let levels: Vec<Tensor> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(h, w))| Tensor::randn((2, 3, h, w), 10 + i as u64).requires_grad())
            .collect();
        let same = ConvGeometry { padding: (1, 1), ..Default::default() };
        let conv = Conv2d::new("c", Tensor::randn((5 * 2, 3, 3, 3), 1), same, Precision::Fp32)
            .unwrap()
            .with_bias(Tensor::randn(10, 2))
            .unwrap();
        // Per level, as scoring_head lays it out, against the canvas.
        let head = |x: &Tensor| -> Result<Tensor> { Ok(conv.forward(x)?) };
        let want: Vec<Tensor> =
            levels.iter().map(|l| super::super::scoring_head(&[head], std::slice::from_ref(l), 2).unwrap()).collect();
        let got = canvas.unpack(&conv.forward(&canvas.pack(&levels).unwrap()).unwrap(), 2).unwrap();
        let weights: Vec<Tensor> =
            want.iter().enumerate().map(|(i, w)| Tensor::randn(w.dims(), 50 + i as u64)).collect();
        let loss = |outs: &[Tensor]| {
            let mut total = outs[0].mul(&weights[0]).unwrap().sum_all().unwrap();
            for (o, w) in outs.iter().zip(&weights).skip(1) {
                total = total.add(&o.mul(w).unwrap().sum_all().unwrap()).unwrap();
            }
            total
        };
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.dims(), w.dims());
            for (a, b) in g.to_vec().iter().zip(w.to_vec()) {
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
        let (gw, gg) = (loss(&want).backward().unwrap(), loss(&got).backward().unwrap());
        for l in &levels {
            for (a, b) in gg.get(l).unwrap().to_vec().iter().zip(gw.get(l).unwrap().to_vec()) {
                assert!((a - b).abs() < 1e-4, "level gradient {a} vs {b}");
            }
        }
        // The mask is 1 exactly on the levels' pixels.
        let m = canvas.mask(1).unwrap().to_vec();
        let ones = m.iter().filter(|&&v| v == 1.0).count();
        assert_eq!(ones, 2 * sizes.iter().map(|s| s.0 * s.1).sum::<usize>());
    }
}
