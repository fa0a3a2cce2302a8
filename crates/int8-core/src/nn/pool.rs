//! Max and average pooling over NCHW planes, any kernel, stride and zero padding, with their
//! gradients. Max pooling routes each output's gradient to the first maximum of its window (the
//! whole gradient, not a fraction of it); average pooling divides by the full window, padding
//! included (PyTorch's `count_include_pad` default).

use rayon::prelude::*;

use crate::error::{CoreError, Result, check_len};

/// A pooling window over planes of `h x w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2d {
    /// Number of planes (images x channels).
    pub planes: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Window size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub pad: usize,
    /// Round the output size up rather than down, as PyTorch's `ceil_mode` (SSD's VGG16 pools
    /// 75 to 38): the last window may overhang the input, but still starts inside it.
    pub ceil: bool,
}

impl Pool2d {
    /// Output height.
    pub fn out_h(&self) -> usize {
        self.out_len(self.h)
    }

    /// Output width.
    pub fn out_w(&self) -> usize {
        self.out_len(self.w)
    }

    fn out_len(&self, len: usize) -> usize {
        let (span, s) = ((len + 2 * self.pad).saturating_sub(self.k), self.stride.max(1));
        if !self.ceil {
            return span / s + 1;
        }
        let out = span.div_ceil(s) + 1;
        // A last window starting in the right padding or past it is dropped.
        if (out - 1) * s >= len + self.pad { out - 1 } else { out }
    }

    fn validate(&self) -> Result<()> {
        if self.k == 0
            || self.stride == 0
            || self.h + 2 * self.pad < self.k
            || self.w + 2 * self.pad < self.k
            || 2 * self.pad > self.k
        {
            return Err(CoreError::InvalidArgument {
                what: "pooling window",
                why: format!(
                    "{self:?}: the window must be at least 1, fit the padded input, and be at least twice the padding"
                ),
            });
        }
        Ok(())
    }

    /// The input rows (or columns) of output position `o` along an axis of length `len`.
    fn span(&self, o: usize, len: usize) -> std::ops::Range<usize> {
        let start = (o * self.stride) as isize - self.pad as isize;
        (start.max(0) as usize)..((start + self.k as isize).min(len as isize) as usize)
    }
}

/// Max pooling; `argmax` receives the flat in-plane index of each output's maximum.
pub fn max_pool(p: &Pool2d, x: &[f32], y: &mut [f32], argmax: &mut [u32]) -> Result<()> {
    p.validate()?;
    let (oh, ow) = (p.out_h(), p.out_w());
    check_len("pooling input", x.len(), p.planes * p.h * p.w)?;
    check_len("pooling output", y.len(), p.planes * oh * ow)?;
    check_len("pooling argmax", argmax.len(), y.len())?;
    y.par_chunks_mut(oh * ow).zip(argmax.par_chunks_mut(oh * ow)).zip(x.par_chunks(p.h * p.w)).for_each(
        |((y, am), x)| {
            for i in 0..oh {
                let rows = p.span(i, p.h);
                for j in 0..ow {
                    let cols = p.span(j, p.w);
                    let (mut best, mut at) = (f32::NEG_INFINITY, rows.start * p.w + cols.start);
                    for r in rows.clone() {
                        for c in cols.clone() {
                            let v = x[r * p.w + c];
                            // `>` keeps the first maximum; NaN propagates as the maximum.
                            if v > best || v.is_nan() && !best.is_nan() {
                                (best, at) = (v, r * p.w + c);
                            }
                        }
                    }
                    y[i * ow + j] = best;
                    am[i * ow + j] = at as u32;
                }
            }
        },
    );
    Ok(())
}

/// The gradient of [`max_pool`]: each output's gradient goes, whole, to its maximum.
pub fn max_pool_backward(p: &Pool2d, dy: &[f32], argmax: &[u32], dx: &mut [f32]) -> Result<()> {
    let (oh, ow) = (p.out_h(), p.out_w());
    check_len("pooling output gradient", dy.len(), p.planes * oh * ow)?;
    check_len("pooling argmax", argmax.len(), dy.len())?;
    check_len("pooling input gradient", dx.len(), p.planes * p.h * p.w)?;
    dx.par_chunks_mut(p.h * p.w).zip(dy.par_chunks(oh * ow)).zip(argmax.par_chunks(oh * ow)).for_each(
        |((dx, dy), am)| {
            dx.fill(0.0);
            for (&g, &a) in dy.iter().zip(am) {
                dx[a as usize] += g;
            }
        },
    );
    Ok(())
}

/// Average pooling (padding counts as zeros in the window).
pub fn avg_pool(p: &Pool2d, x: &[f32], y: &mut [f32]) -> Result<()> {
    p.validate()?;
    if p.ceil {
        // PyTorch divides an overhanging window by its clipped size; this divides by k * k.
        return Err(CoreError::InvalidArgument {
            what: "pooling window",
            why: "average pooling rounds its output size down; ceil mode is for max pooling".into(),
        });
    }
    let (oh, ow) = (p.out_h(), p.out_w());
    check_len("pooling input", x.len(), p.planes * p.h * p.w)?;
    check_len("pooling output", y.len(), p.planes * oh * ow)?;
    let inv = 1.0 / (p.k * p.k) as f32;
    y.par_chunks_mut(oh * ow).zip(x.par_chunks(p.h * p.w)).for_each(|(y, x)| {
        for i in 0..oh {
            for j in 0..ow {
                let mut s = 0.0f32;
                for r in p.span(i, p.h) {
                    s += x[r * p.w..][p.span(j, p.w)].iter().sum::<f32>();
                }
                y[i * ow + j] = s * inv;
            }
        }
    });
    Ok(())
}

/// The gradient of [`avg_pool`].
pub fn avg_pool_backward(p: &Pool2d, dy: &[f32], dx: &mut [f32]) -> Result<()> {
    let (oh, ow) = (p.out_h(), p.out_w());
    check_len("pooling output gradient", dy.len(), p.planes * oh * ow)?;
    check_len("pooling input gradient", dx.len(), p.planes * p.h * p.w)?;
    let inv = 1.0 / (p.k * p.k) as f32;
    dx.par_chunks_mut(p.h * p.w).zip(dy.par_chunks(oh * ow)).for_each(|(dx, dy)| {
        dx.fill(0.0);
        for i in 0..oh {
            for j in 0..ow {
                let g = dy[i * ow + j] * inv;
                for r in p.span(i, p.h) {
                    for v in &mut dx[r * p.w..][p.span(j, p.w)] {
                        *v += g;
                    }
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::CounterRng;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let r = CounterRng::new(seed);
        (0..n).map(|i| r.uniform(i as u64) * 2.0 - 1.0).collect()
    }

    /// Windows from the definition, with explicit padding (`None` for a padded cell).
    fn window(p: &Pool2d, i: usize, j: usize) -> Vec<Option<usize>> {
        let mut v = Vec::new();
        for a in 0..p.k {
            for b in 0..p.k {
                let (r, c) =
                    ((i * p.stride + a) as isize - p.pad as isize, (j * p.stride + b) as isize - p.pad as isize);
                v.push(
                    (r >= 0 && c >= 0 && (r as usize) < p.h && (c as usize) < p.w)
                        .then(|| r as usize * p.w + c as usize),
                );
            }
        }
        v
    }

    #[test]
    fn both_poolings_and_gradients_match_the_definition_on_odd_shapes() {
        for p in [
            Pool2d { planes: 3, h: 7, w: 5, k: 2, stride: 2, pad: 0, ceil: false },
            Pool2d { planes: 2, h: 9, w: 9, k: 3, stride: 2, pad: 1, ceil: false },
            Pool2d { planes: 2, h: 6, w: 7, k: 3, stride: 1, pad: 0, ceil: false },
            Pool2d { planes: 1, h: 5, w: 5, k: 5, stride: 3, pad: 2, ceil: false },
        ] {
            let x = data(p.planes * p.h * p.w, 1);
            let dy = data(p.planes * p.out_h() * p.out_w(), 2);
            let n = p.out_h() * p.out_w();
            let (mut y, mut am, mut dx) = (vec![0.0; p.planes * n], vec![0u32; p.planes * n], vec![9.0; x.len()]);
            max_pool(&p, &x, &mut y, &mut am).unwrap();
            max_pool_backward(&p, &dy, &am, &mut dx).unwrap();
            let (mut ya, mut dxa) = (vec![0.0; p.planes * n], vec![9.0; x.len()]);
            avg_pool(&p, &x, &mut ya).unwrap();
            avg_pool_backward(&p, &dy, &mut dxa).unwrap();
            let (mut want_dx, mut want_dxa) = (vec![0.0f64; x.len()], vec![0.0f64; x.len()]);
            for q in 0..p.planes {
                for i in 0..p.out_h() {
                    for j in 0..p.out_w() {
                        let o = q * n + i * p.out_w() + j;
                        let win: Vec<usize> =
                            window(&p, i, j).into_iter().flatten().map(|k| q * p.h * p.w + k).collect();
                        let (best_at, best) = win
                            .iter()
                            .map(|&k| (k, x[k]))
                            .fold((win[0], f32::NEG_INFINITY), |m, (k, v)| if v > m.1 { (k, v) } else { m });
                        assert_eq!(y[o], best, "{p:?} max at {o}");
                        want_dx[best_at] += dy[o] as f64;
                        let s: f64 = win.iter().map(|&k| x[k] as f64).sum();
                        assert!((ya[o] as f64 - s / (p.k * p.k) as f64).abs() < 1e-6, "{p:?} avg at {o}");
                        for &k in &win {
                            want_dxa[k] += dy[o] as f64 / (p.k * p.k) as f64;
                        }
                    }
                }
            }
            for k in 0..x.len() {
                assert!((dx[k] as f64 - want_dx[k]).abs() < 1e-6, "{p:?} max grad at {k}: {} vs {}", dx[k], want_dx[k]);
                assert!((dxa[k] as f64 - want_dxa[k]).abs() < 1e-6, "{p:?} avg grad at {k}");
            }
        }
    }

    #[test]
    fn ceil_mode_rounds_the_output_up_and_keeps_windows_starting_inside() {
        let p =
            |h: usize, k: usize, stride: usize, pad: usize| Pool2d { planes: 1, h, w: h, k, stride, pad, ceil: true };
        // PyTorch's sizes: SSD's VGG16 pools 75 to 38 where floor gives 37.
        for (h, k, s, pad, want) in
            [(75, 2, 2, 0, 38), (8, 3, 2, 0, 4), (7, 3, 2, 0, 3), (6, 3, 2, 1, 4), (5, 2, 2, 1, 3)]
        {
            assert_eq!(p(h, k, s, pad).out_h(), want, "{h} k{k} s{s} p{pad}");
        }
        // The overhanging last window takes the maximum of what it covers.
        let q = p(5, 2, 2, 0);
        let x: Vec<f32> = (0..25).map(|v| v as f32).collect();
        let (mut y, mut am) = (vec![0.0; 9], vec![0u32; 9]);
        max_pool(&q, &x, &mut y, &mut am).unwrap();
        assert_eq!(y, [6.0, 8.0, 9.0, 16.0, 18.0, 19.0, 21.0, 23.0, 24.0]);
        assert!(avg_pool(&q, &x, &mut y).is_err());
    }

    #[test]
    fn max_pooling_passes_the_whole_gradient_and_bad_windows_are_errors() {
        // The whole gradient goes to the maximum (1, not a quarter of it spread over the window).
        let p = Pool2d { planes: 1, h: 2, w: 2, k: 2, stride: 2, pad: 0, ceil: false };
        let (mut y, mut am, mut dx) = ([0.0], [0u32], [0.0; 4]);
        max_pool(&p, &[1.0, 4.0, 3.0, 2.0], &mut y, &mut am).unwrap();
        max_pool_backward(&p, &[1.0], &am, &mut dx).unwrap();
        assert_eq!((y, dx), ([4.0], [0.0, 1.0, 0.0, 0.0]));
        let bad = Pool2d { k: 3, ..p };
        assert!(max_pool(&bad, &[0.0; 4], &mut y, &mut am).is_err());
    }
}
