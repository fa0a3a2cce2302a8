//! FP32 kernels of the detection heads: RoIAlign (He et al., "Mask R-CNN", ICCV 2017, with
//! torchvision's semantics: adaptive or fixed sampling grid, the half-pixel `aligned` offset,
//! samples past the border dropped and those on it clamped), nearest-neighbour upsampling to an
//! exact size (torch's `interpolate(mode="nearest")`: the source index is `floor(dst * in / out)`
//! in f32), and SSD's channel-wise L2 normalisation with a learned scale (Liu et al., ECCV 2016,
//! torchvision's `F.normalize` with eps 1e-12). Each with its gradient.

use rayon::prelude::*;

use crate::error::{CoreError, Result, check_len};

/// An NCHW tensor's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nchw {
    /// Images.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
}

impl Nchw {
    /// The number of values.
    pub fn len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// RoIAlign's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoiAlign {
    /// Output height and width of each region.
    pub pooled: (usize, usize),
    /// Scale from box coordinates to the feature map's (1/16 for a stride-16 map).
    pub spatial_scale: f32,
    /// Sample points per bin along each axis; 0 for `ceil(roi size / pooled size)`.
    pub sampling_ratio: usize,
    /// Shift box coordinates by half a pixel (torchvision's `aligned=True`).
    pub aligned: bool,
}

/// One bilinear sample: four (index in the plane, weight) pairs; all weights zero for a sample
/// that falls past the border.
type Sample = [(usize, f32); 4];

/// The bilinear sample at `(y, x)` of an `h x w` plane, as torchvision takes it.
fn bilinear(h: usize, w: usize, y: f32, x: f32) -> Sample {
    if !(y >= -1.0 && y <= h as f32 && x >= -1.0 && x <= w as f32) {
        return [(0, 0.0); 4];
    }
    let (mut y, mut x) = (y.max(0.0), x.max(0.0));
    let (mut y_low, mut x_low) = (y as usize, x as usize);
    let (y_high, x_high);
    if y_low >= h - 1 {
        y_low = h - 1;
        y_high = h - 1;
        y = y_low as f32;
    } else {
        y_high = y_low + 1;
    }
    if x_low >= w - 1 {
        x_low = w - 1;
        x_high = w - 1;
        x = x_low as f32;
    } else {
        x_high = x_low + 1;
    }
    let (ly, lx) = (y - y_low as f32, x - x_low as f32);
    let (hy, hx) = (1.0 - ly, 1.0 - lx);
    [
        (y_low * w + x_low, hy * hx),
        (y_low * w + x_high, hy * lx),
        (y_high * w + x_low, ly * hx),
        (y_high * w + x_high, ly * lx),
    ]
}

impl RoiAlign {
    /// The image of region `roi` (`[batch index, x1, y1, x2, y2]`) and its samples over an
    /// `h x w` map, grouped by output bin (`pooled.0 * pooled.1` bins, each with the same number
    /// of samples), and the divisor of each bin's mean.
    fn samples(&self, roi: &[f32; 5], n: usize, h: usize, w: usize) -> Result<(usize, Vec<Sample>, f32)> {
        let bad = |why: String| CoreError::InvalidArgument { what: "region of interest", why };
        if roi.iter().any(|v| !v.is_finite()) {
            return Err(bad(format!("{roi:?} holds a non-finite value")));
        }
        let image = roi[0] as usize;
        if roi[0] < 0.0 || roi[0].fract() != 0.0 || image >= n {
            return Err(bad(format!("{roi:?} names image {} of {n}", roi[0])));
        }
        let (ph, pw) = self.pooled;
        let offset = if self.aligned { 0.5 } else { 0.0 };
        let (x1, y1) = (roi[1] * self.spatial_scale - offset, roi[2] * self.spatial_scale - offset);
        let (x2, y2) = (roi[3] * self.spatial_scale - offset, roi[4] * self.spatial_scale - offset);
        let (mut rw, mut rh) = (x2 - x1, y2 - y1);
        if !self.aligned {
            // Malformed regions become 1x1, as torchvision makes them.
            rw = rw.max(1.0);
            rh = rh.max(1.0);
        }
        let (bh, bw) = (rh / ph as f32, rw / pw as f32);
        let grid = |size: f32, pooled: usize| -> usize {
            if self.sampling_ratio > 0 { self.sampling_ratio } else { (size / pooled as f32).ceil().max(0.0) as usize }
        };
        let (gh, gw) = (grid(rh, ph), grid(rw, pw));
        let count = (gh * gw).max(1) as f32;
        let mut out = Vec::with_capacity(ph * pw * gh * gw);
        for py in 0..ph {
            for px in 0..pw {
                for iy in 0..gh {
                    let y = y1 + py as f32 * bh + (iy as f32 + 0.5) * bh / gh as f32;
                    for ix in 0..gw {
                        let x = x1 + px as f32 * bw + (ix as f32 + 0.5) * bw / gw as f32;
                        out.push(bilinear(h, w, y, x));
                    }
                }
            }
        }
        Ok((image, out, count))
    }

    fn check(&self, d: Nchw) -> Result<()> {
        if self.pooled.0 == 0
            || self.pooled.1 == 0
            || d.h == 0
            || d.w == 0
            || self.spatial_scale.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return Err(CoreError::InvalidArgument {
                what: "RoIAlign",
                why: format!("{self:?} over {d:?}: the output, the map and the scale must be non-empty and positive"),
            });
        }
        Ok(())
    }
}

/// RoIAlign of the NCHW map `x` (`d`) over `rois`: `y` is `rois x c x pooled.0 x pooled.1`.
pub fn roi_align(cfg: &RoiAlign, d: Nchw, x: &[f32], rois: &[[f32; 5]], y: &mut [f32]) -> Result<()> {
    cfg.check(d)?;
    let bins = cfg.pooled.0 * cfg.pooled.1;
    check_len("RoIAlign input", x.len(), d.len())?;
    check_len("RoIAlign output", y.len(), rois.len() * d.c * bins)?;
    let plane = d.h * d.w;
    y.par_chunks_mut((d.c * bins).max(1)).zip(rois.par_iter()).try_for_each(|(out, roi)| -> Result<()> {
        let (image, samples, count) = cfg.samples(roi, d.n, d.h, d.w)?;
        let per_bin = samples.len() / bins;
        for (c, out) in out.chunks_mut(bins).enumerate() {
            let p = &x[(image * d.c + c) * plane..][..plane];
            for (b, o) in out.iter_mut().enumerate() {
                let mut v = 0.0f32;
                for s in &samples[b * per_bin..(b + 1) * per_bin] {
                    v += s[0].1 * p[s[0].0] + s[1].1 * p[s[1].0] + s[2].1 * p[s[2].0] + s[3].1 * p[s[3].0];
                }
                *o = v / count;
            }
        }
        Ok(())
    })
}

/// The gradient of [`roi_align`]: each bin's gradient spread over its samples' four pixels with
/// their weights, summed into `dx` (which it overwrites). Planes are filled in parallel, each
/// summing its regions in their order, so the result does not depend on the thread count.
pub fn roi_align_backward(cfg: &RoiAlign, d: Nchw, dy: &[f32], rois: &[[f32; 5]], dx: &mut [f32]) -> Result<()> {
    cfg.check(d)?;
    let bins = cfg.pooled.0 * cfg.pooled.1;
    check_len("RoIAlign output gradient", dy.len(), rois.len() * d.c * bins)?;
    check_len("RoIAlign input gradient", dx.len(), d.len())?;
    let regions = rois.iter().map(|r| cfg.samples(r, d.n, d.h, d.w)).collect::<Result<Vec<_>>>()?;
    let plane = d.h * d.w;
    dx.par_chunks_mut(plane.max(1)).enumerate().for_each(|(pi, out)| {
        out.fill(0.0);
        let (image, c) = (pi / d.c, pi % d.c);
        for (r, (img, samples, count)) in regions.iter().enumerate() {
            if *img != image {
                continue;
            }
            let per_bin = samples.len() / bins;
            let g = &dy[(r * d.c + c) * bins..][..bins];
            for (b, &gb) in g.iter().enumerate() {
                for s in &samples[b * per_bin..(b + 1) * per_bin] {
                    for &(i, wt) in s {
                        out[i] += gb * wt / count;
                    }
                }
            }
        }
    });
    Ok(())
}

/// The source index of output index `o` when nearest-upsampling a side of `from` values to `to`.
fn nearest(o: usize, from: usize, to: usize) -> usize {
    let scale = from as f32 / to as f32;
    ((o as f32 * scale).floor() as usize).min(from - 1)
}

/// Nearest-neighbour resize of each plane of `x` (`d`) to `out.0 x out.1`, into `y`.
pub fn upsample_nearest(d: Nchw, out: (usize, usize), x: &[f32], y: &mut [f32]) -> Result<()> {
    check_len("upsampling input", x.len(), d.len())?;
    check_len("upsampling output", y.len(), d.n * d.c * out.0 * out.1)?;
    if d.h == 0 || d.w == 0 {
        return Err(CoreError::InvalidArgument { what: "upsampling input", why: format!("{d:?} has empty planes") });
    }
    let (rows, cols): (Vec<usize>, Vec<usize>) =
        ((0..out.0).map(|o| nearest(o, d.h, out.0)).collect(), (0..out.1).map(|o| nearest(o, d.w, out.1)).collect());
    y.par_chunks_mut((out.0 * out.1).max(1)).zip(x.par_chunks(d.h * d.w)).for_each(|(yp, xp)| {
        for (oy, &sy) in rows.iter().enumerate() {
            for (ox, &sx) in cols.iter().enumerate() {
                yp[oy * out.1 + ox] = xp[sy * d.w + sx];
            }
        }
    });
    Ok(())
}

/// The gradient of [`upsample_nearest`]: each source pixel sums the gradients of the outputs it
/// was copied to (overwriting `dx`).
pub fn upsample_nearest_backward(d: Nchw, out: (usize, usize), dy: &[f32], dx: &mut [f32]) -> Result<()> {
    check_len("upsampling output gradient", dy.len(), d.n * d.c * out.0 * out.1)?;
    check_len("upsampling input gradient", dx.len(), d.len())?;
    if d.h == 0 || d.w == 0 {
        return Err(CoreError::InvalidArgument { what: "upsampling input", why: format!("{d:?} has empty planes") });
    }
    let (rows, cols): (Vec<usize>, Vec<usize>) =
        ((0..out.0).map(|o| nearest(o, d.h, out.0)).collect(), (0..out.1).map(|o| nearest(o, d.w, out.1)).collect());
    dx.par_chunks_mut(d.h * d.w).zip(dy.par_chunks((out.0 * out.1).max(1))).for_each(|(xp, gp)| {
        xp.fill(0.0);
        for (oy, &sy) in rows.iter().enumerate() {
            for (ox, &sx) in cols.iter().enumerate() {
                xp[sy * d.w + sx] += gp[oy * out.1 + ox];
            }
        }
    });
    Ok(())
}

/// F.normalize's floor on the norm.
const L2_EPS: f32 = 1e-12;

/// `y[n, c, p] = weight[c] * x[n, c, p] / max(||x[n, :, p]||, 1e-12)`: each pixel's channel
/// vector scaled to unit length, then by a learned per-channel weight. Returns the norms (one per
/// pixel of each image, in f32) for the backward pass.
pub fn l2norm(d: Nchw, x: &[f32], weight: &[f32], y: &mut [f32]) -> Result<Vec<f32>> {
    check_len("L2Norm input", x.len(), d.len())?;
    check_len("L2Norm weight", weight.len(), d.c)?;
    check_len("L2Norm output", y.len(), d.len())?;
    let hw = d.h * d.w;
    let mut norms = vec![0f32; d.n * hw];
    y.par_chunks_mut((d.c * hw).max(1))
        .zip(x.par_chunks((d.c * hw).max(1)))
        .zip(norms.par_chunks_mut(hw.max(1)))
        .for_each(|((yi, xi), ni)| {
            for (p, nrm) in ni.iter_mut().enumerate() {
                let sq: f64 = (0..d.c).map(|c| f64::from(xi[c * hw + p]).powi(2)).sum();
                *nrm = sq.sqrt() as f32;
                let inv = 1.0 / nrm.max(L2_EPS);
                for c in 0..d.c {
                    yi[c * hw + p] = weight[c] * xi[c * hw + p] * inv;
                }
            }
        });
    Ok(norms)
}

/// The gradients of [`l2norm`] given its `norms`: `dx` (overwritten) and the weight's gradient.
/// With `u = x / n` and `g = dy * weight`: `dx = (g - u (u . g)) / n` where the norm `n` is above
/// the floor (the floor is a constant where it is not: `dx = g / 1e-12`), `dweight[c] = sum dy u`.
pub fn l2norm_backward(
    d: Nchw,
    x: &[f32],
    weight: &[f32],
    norms: &[f32],
    dy: &[f32],
    dx: &mut [f32],
) -> Result<Vec<f32>> {
    check_len("L2Norm input", x.len(), d.len())?;
    check_len("L2Norm norms", norms.len(), d.n * d.h * d.w)?;
    check_len("L2Norm output gradient", dy.len(), d.len())?;
    check_len("L2Norm input gradient", dx.len(), d.len())?;
    let hw = d.h * d.w;
    let per_image: Vec<Vec<f64>> = dx
        .par_chunks_mut((d.c * hw).max(1))
        .zip(x.par_chunks((d.c * hw).max(1)))
        .zip(dy.par_chunks((d.c * hw).max(1)))
        .zip(norms.par_chunks(hw.max(1)))
        .map(|(((dxi, xi), gi), ni)| {
            let mut dw = vec![0f64; d.c];
            for (p, &nrm) in ni.iter().enumerate() {
                let n = nrm.max(L2_EPS);
                let mut ug = 0f64;
                for c in 0..d.c {
                    let u = xi[c * hw + p] / n;
                    dw[c] += f64::from(gi[c * hw + p] * u);
                    ug += f64::from(u * gi[c * hw + p] * weight[c]);
                }
                for c in 0..d.c {
                    let (u, g) = (xi[c * hw + p] / n, gi[c * hw + p] * weight[c]);
                    dxi[c * hw + p] = if nrm > L2_EPS { (g - u * ug as f32) / n } else { g / n };
                }
            }
            dw
        })
        .collect();
    Ok((0..d.c).map(|c| per_image.iter().map(|v| v[c]).sum::<f64>() as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::CounterRng;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let r = CounterRng::new(seed);
        (0..n).map(|i| r.uniform(i as u64) * 2.0 - 1.0).collect()
    }

    /// The bilinear value of a plane at `(y, x)` in f64, by torchvision's rules, written from
    /// their description rather than with [`bilinear`].
    fn bilinear_f64(p: &[f32], h: usize, w: usize, y: f64, x: f64) -> f64 {
        if y < -1.0 || y > h as f64 || x < -1.0 || x > w as f64 {
            return 0.0;
        }
        let (y, x) = (y.max(0.0).min((h - 1) as f64), x.max(0.0).min((w - 1) as f64));
        let (y0, x0) = (y.floor() as usize, x.floor() as usize);
        let (y1, x1) = ((y0 + 1).min(h - 1), (x0 + 1).min(w - 1));
        let (ly, lx) = (y - y0 as f64, x - x0 as f64);
        let v = |r: usize, c: usize| f64::from(p[r * w + c]);
        (1.0 - ly) * (1.0 - lx) * v(y0, x0)
            + (1.0 - ly) * lx * v(y0, x1)
            + ly * (1.0 - lx) * v(y1, x0)
            + ly * lx * v(y1, x1)
    }

    #[test]
    fn roi_align_matches_the_f64_definition_and_its_gradient_is_the_adjoint() {
        let d = Nchw { n: 2, c: 3, h: 7, w: 9 };
        let x = data(d.len(), 1);
        // Inside, over the border, tiny and malformed (x2 < x1) regions, at two scales.
        let rois = [
            [0.0, 1.0, 1.5, 10.0, 9.0],
            [1.0, -3.0, -2.0, 20.0, 15.0],
            [1.0, 4.2, 3.1, 4.4, 3.3],
            [0.0, 6.0, 5.0, 2.0, 1.0],
        ];
        for (aligned, ratio, scale) in [(false, 0, 0.5f32), (true, 2, 0.5), (true, 0, 0.75), (false, 3, 1.0)] {
            let cfg = RoiAlign { pooled: (3, 2), spatial_scale: scale, sampling_ratio: ratio, aligned };
            let mut y = vec![0.0; rois.len() * d.c * 6];
            roi_align(&cfg, d, &x, &rois, &mut y).unwrap();
            for (r, roi) in rois.iter().enumerate() {
                let off = if aligned { 0.5 } else { 0.0 };
                let s = f64::from(scale);
                let (x1, y1) = (f64::from(roi[1]) * s - off, f64::from(roi[2]) * s - off);
                let (mut rw, mut rh) = (f64::from(roi[3]) * s - off - x1, f64::from(roi[4]) * s - off - y1);
                if !aligned {
                    rw = rw.max(1.0);
                    rh = rh.max(1.0);
                }
                let (bh, bw) = (rh / 3.0, rw / 2.0);
                let grid = |v: f64, p: f64| if ratio > 0 { ratio } else { (v / p).ceil().max(0.0) as usize };
                let (gh, gw) = (grid(rh, 3.0), grid(rw, 2.0));
                for c in 0..d.c {
                    let plane = &x[((roi[0] as usize) * d.c + c) * 63..][..63];
                    for py in 0..3 {
                        for px in 0..2 {
                            let mut v = 0.0;
                            for iy in 0..gh {
                                for ix in 0..gw {
                                    let yy = y1 + py as f64 * bh + (iy as f64 + 0.5) * bh / gh as f64;
                                    let xx = x1 + px as f64 * bw + (ix as f64 + 0.5) * bw / gw as f64;
                                    v += bilinear_f64(plane, 7, 9, yy, xx);
                                }
                            }
                            let want = v / (gh * gw).max(1) as f64;
                            let got = y[((r * d.c + c) * 3 + py) * 2 + px];
                            assert!(
                                (f64::from(got) - want).abs() < 1e-5,
                                "{cfg:?} roi {r} c{c} ({py},{px}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
            // The backward pass is the forward's adjoint: <roi_align(x), g> = <x, backward(g)>.
            let g = data(y.len(), 2);
            let mut dx = vec![f32::NAN; d.len()];
            roi_align_backward(&cfg, d, &g, &rois, &mut dx).unwrap();
            let lhs: f64 = y.iter().zip(&g).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "{cfg:?}: {lhs} vs {rhs}");
        }
        let cfg = RoiAlign { pooled: (2, 2), spatial_scale: 1.0, sampling_ratio: 0, aligned: true };
        let mut y = vec![0.0; d.c * 4];
        let err = roi_align(&cfg, d, &x, &[[2.0, 0.0, 0.0, 1.0, 1.0]], &mut y).unwrap_err().to_string();
        assert!(err.contains("image 2 of 2"), "{err}");
        assert!(roi_align(&cfg, d, &x, &[[0.0, f32::NAN, 0.0, 1.0, 1.0]], &mut y).is_err());
    }

    #[test]
    fn nearest_upsampling_copies_and_its_gradient_sums() {
        let d = Nchw { n: 1, c: 2, h: 3, w: 5 };
        let x: Vec<f32> = (0..d.len()).map(|v| v as f32).collect();
        // To an exact size that is no multiple (as FPN's top-down path needs), and to twice.
        for out in [(5usize, 8usize), (6, 10), (3, 5)] {
            let mut y = vec![0.0; d.c * out.0 * out.1];
            upsample_nearest(d, out, &x, &mut y).unwrap();
            for c in 0..d.c {
                for oy in 0..out.0 {
                    for ox in 0..out.1 {
                        // floor(dst * in / out) in exact arithmetic agrees with torch's f32 here.
                        let (sy, sx) = (oy * d.h / out.0, ox * d.w / out.1);
                        assert_eq!(y[(c * out.0 + oy) * out.1 + ox], x[(c * d.h + sy) * d.w + sx], "{out:?}");
                    }
                }
            }
            let g = data(y.len(), 3);
            let mut dx = vec![f32::NAN; d.len()];
            upsample_nearest_backward(d, out, &g, &mut dx).unwrap();
            let lhs: f64 = y.iter().zip(&g).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let rhs: f64 = x.iter().zip(&dx).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            assert!((lhs - rhs).abs() < 1e-4, "{out:?}: {lhs} vs {rhs}");
        }
    }

    #[test]
    fn l2norm_and_its_gradients_match_finite_differences() {
        let d = Nchw { n: 2, c: 4, h: 2, w: 3 };
        let mut x = data(d.len(), 5);
        // One pixel of image 0 all zeros: the norm's floor.
        for c in 0..d.c {
            x[c * 6 + 2] = 0.0;
        }
        let w = [20.0f32, 10.0, 5.0, 1.0];
        let r = data(d.len(), 6);
        let loss = |x: &[f64], w: &[f64]| -> f64 {
            let mut t = 0.0;
            for n in 0..d.n {
                for p in 0..6 {
                    let nrm = (0..d.c).map(|c| x[(n * d.c + c) * 6 + p].powi(2)).sum::<f64>().sqrt().max(1e-12);
                    for c in 0..d.c {
                        let k = (n * d.c + c) * 6 + p;
                        t += w[c] * x[k] / nrm * f64::from(r[k]);
                    }
                }
            }
            t
        };
        let mut y = vec![0.0; d.len()];
        let norms = l2norm(d, &x, &w, &mut y).unwrap();
        let mut dx = vec![0.0; d.len()];
        let dw = l2norm_backward(d, &x, &w, &norms, &r, &mut dx).unwrap();
        let (x64, w64): (Vec<f64>, Vec<f64>) =
            (x.iter().map(|&v| v as f64).collect(), w.iter().map(|&v| v as f64).collect());
        let h = 1e-6;
        for i in 0..d.len() {
            if i < 24 && i % 6 == 2 {
                // The zero pixel: its loss is not differentiable at 0 (the floor); its gradient is
                // the constant-norm one.
                assert_eq!(dx[i], r[i] * w[(i / 6) % 4] / 1e-12);
                continue;
            }
            let (mut p, mut m) = (x64.clone(), x64.clone());
            p[i] += h;
            m[i] -= h;
            let fd = (loss(&p, &w64) - loss(&m, &w64)) / (2.0 * h);
            assert!((fd - f64::from(dx[i])).abs() < 1e-3 * fd.abs().max(1.0), "dx[{i}]: {fd} vs {}", dx[i]);
        }
        for c in 0..d.c {
            let (mut p, mut m) = (w64.clone(), w64.clone());
            p[c] += h;
            m[c] -= h;
            let fd = (loss(&x64, &p) - loss(&x64, &m)) / (2.0 * h);
            assert!((fd - f64::from(dw[c])).abs() < 1e-4, "dweight[{c}]: {fd} vs {}", dw[c]);
        }
    }
}
