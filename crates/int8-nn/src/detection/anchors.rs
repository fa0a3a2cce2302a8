//! Anchors and default boxes as torchvision generates them (`anchor_utils.py`):
//! [`AnchorGenerator`], the anchors of Faster R-CNN's RPN (Ren et al., NeurIPS 2015) and of
//! RetinaNet (Lin et al., ICCV 2017) on a feature pyramid, and [`DefaultBoxGenerator`], SSD's
//! default boxes (Liu et al., ECCV 2016, Sec. 2.2 "Choosing scales and aspect ratios"), used by
//! `ssd300_vgg16` and `ssdlite320_mobilenet_v3_large`.
//!
//! Both lay their boxes out level by level, and within a level location by location (rows, then
//! columns), every box of a location before the next location: the order in which the detection
//! heads' outputs are flattened (`N x A*K x H x W` read as `N x HWA x K`).

use super::bad_input;
use crate::Result;

const OP: &str = "anchors";

/// torchvision's anchor generator: per feature level, `sizes x aspect ratios` zero-centred boxes
/// (aspect ratio = height / width), rounded to whole pixels, shifted to every location of the
/// level's grid at the level's stride.
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorGenerator {
    sizes: Vec<Vec<f32>>,
    aspect_ratios: Vec<Vec<f32>>,
    cell_anchors: Vec<Vec<[f32; 4]>>,
}

/// The zero-centred anchors of one level (torchvision's `generate_anchors`), aspect ratio major:
/// `h = sqrt(ratio)`, `w = 1 / h`, sides `w * size` and `h * size`, each half rounded half to
/// even as `torch.round`, all in `f32`.
fn cell_anchors(sizes: &[f32], aspect_ratios: &[f32]) -> Vec<[f32; 4]> {
    let mut out = Vec::with_capacity(sizes.len() * aspect_ratios.len());
    for &ratio in aspect_ratios {
        let h_ratio = ratio.sqrt();
        let w_ratio = 1.0 / h_ratio;
        for &size in sizes {
            let (ws, hs) = (w_ratio * size, h_ratio * size);
            out.push([-ws / 2.0, -hs / 2.0, ws / 2.0, hs / 2.0].map(f32::round_ties_even));
        }
    }
    out
}

impl AnchorGenerator {
    /// A generator with `sizes[level]` (pixels) and `aspect_ratios[level]` (height / width) for
    /// each feature level.
    pub fn new(sizes: Vec<Vec<f32>>, aspect_ratios: Vec<Vec<f32>>) -> Result<Self> {
        if sizes.len() != aspect_ratios.len() || sizes.is_empty() {
            return Err(bad_input(
                OP,
                format!(
                    "{} levels of sizes but {} of aspect ratios; give both for every feature level",
                    sizes.len(),
                    aspect_ratios.len()
                ),
            ));
        }
        let positive = |v: &[Vec<f32>]| v.iter().all(|l| !l.is_empty() && l.iter().all(|&x| x.is_finite() && x > 0.0));
        if !positive(&sizes) || !positive(&aspect_ratios) {
            return Err(bad_input(
                OP,
                "every level needs at least one size and one aspect ratio, all finite and positive",
            ));
        }
        Ok(Self::from_parts(sizes, aspect_ratios))
    }

    fn from_parts(sizes: Vec<Vec<f32>>, aspect_ratios: Vec<Vec<f32>>) -> Self {
        let cell_anchors = sizes.iter().zip(&aspect_ratios).map(|(s, r)| cell_anchors(s, r)).collect();
        Self { sizes, aspect_ratios, cell_anchors }
    }

    /// `fasterrcnn_resnet50_fpn`'s anchors (torchvision's `_default_anchorgen` in
    /// `faster_rcnn.py`): sizes 32, 64, 128, 256 and 512 on the five pyramid levels, aspect
    /// ratios 0.5, 1 and 2 on each.
    pub fn faster_rcnn_fpn() -> Self {
        let sizes = [32.0, 64.0, 128.0, 256.0, 512.0].map(|s| vec![s]).to_vec();
        Self::from_parts(sizes, vec![vec![0.5, 1.0, 2.0]; 5])
    }

    /// `retinanet_resnet50_fpn`'s anchors (torchvision's `_default_anchorgen` in
    /// `retinanet.py`): on each level `x` in 32, 64, 128, 256, 512, the sizes
    /// `x, int(x * 2^(1/3)), int(x * 2^(2/3))`; aspect ratios 0.5, 1 and 2.
    pub fn retinanet() -> Self {
        let sizes = [32.0f64, 64.0, 128.0, 256.0, 512.0]
            .map(|x| {
                vec![x as f32, (x * 2f64.powf(1.0 / 3.0)).trunc() as f32, (x * 2f64.powf(2.0 / 3.0)).trunc() as f32]
            })
            .to_vec();
        Self::from_parts(sizes, vec![vec![0.5, 1.0, 2.0]; 5])
    }

    /// The sizes of each level.
    pub fn sizes(&self) -> &[Vec<f32>] {
        &self.sizes
    }

    /// The zero-centred anchors of each level, aspect ratio major.
    pub fn cell_anchors(&self) -> &[Vec<[f32; 4]>] {
        &self.cell_anchors
    }

    /// Anchors per location of each level.
    pub fn num_anchors_per_location(&self) -> Vec<usize> {
        self.cell_anchors.iter().map(Vec::len).collect()
    }

    /// Anchors on each level for feature maps of `feature_sizes` (height, width).
    pub fn num_anchors_per_level(&self, feature_sizes: &[(usize, usize)]) -> Vec<usize> {
        feature_sizes.iter().zip(&self.cell_anchors).map(|(&(h, w), c)| h * w * c.len()).collect()
    }

    /// Every anchor, `[x1, y1, x2, y2]` in pixels, for an image batch of `image_size` (height,
    /// width: the padded batch's, as torchvision takes it) and feature maps of `feature_sizes`.
    /// Each level's stride is `image_size / feature_size` in integer division, as torchvision
    /// takes it (a 13-row level of an 800-row image has stride 61).
    pub fn anchors(&self, image_size: (usize, usize), feature_sizes: &[(usize, usize)]) -> Result<Vec<[f32; 4]>> {
        check_levels(self.cell_anchors.len(), feature_sizes)?;
        let mut out = Vec::with_capacity(self.num_anchors_per_level(feature_sizes).iter().sum());
        for (&(fh, fw), cells) in feature_sizes.iter().zip(&self.cell_anchors) {
            let (stride_y, stride_x) = (image_size.0 / fh, image_size.1 / fw);
            for y in 0..fh {
                for x in 0..fw {
                    // torchvision shifts in integers, then adds them to the f32 cell anchors.
                    let (sx, sy) = ((x * stride_x) as f32, (y * stride_y) as f32);
                    out.extend(cells.iter().map(|c| [sx + c[0], sy + c[1], sx + c[2], sy + c[3]]));
                }
            }
        }
        Ok(out)
    }
}

fn check_levels(levels: usize, feature_sizes: &[(usize, usize)]) -> Result<()> {
    if feature_sizes.len() != levels {
        return Err(bad_input(
            OP,
            format!(
                "the generator has {levels} levels but {} feature maps were given; pass one size per level",
                feature_sizes.len()
            ),
        ));
    }
    if feature_sizes.iter().any(|&(h, w)| h == 0 || w == 0) {
        return Err(bad_input(OP, format!("feature sizes {feature_sizes:?} include an empty map; check the backbone")));
    }
    Ok(())
}

/// How SSD's per-level scales are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum DefaultBoxScales {
    /// Evenly from `min_ratio` to `max_ratio` over the levels, then 1 (SSD's Eq. 4, as
    /// torchvision spaces them).
    Range {
        /// The smallest level's scale, as a fraction of the image.
        min_ratio: f64,
        /// The largest level's scale.
        max_ratio: f64,
    },
    /// One scale per level and one more (the last level's `s'` uses it).
    Explicit(Vec<f64>),
}

/// torchvision's `DefaultBoxGenerator`: SSD's default boxes. On level `k` with scale `s_k`, the
/// width-height pairs `(s_k, s_k)`, `(s'_k, s'_k)` with `s'_k = sqrt(s_k s_{k+1})`, and for each
/// aspect ratio `a` the pair `(s_k sqrt(a), s_k / sqrt(a))` and its transpose; centred at
/// `((j + 0.5) / f_x, (i + 0.5) / f_y)` with `f = image / step` when steps are given and the
/// feature size otherwise. Sizes are clipped into `[0, 1]` when `clip` is set; centres never are.
#[derive(Debug, Clone, PartialEq)]
pub struct DefaultBoxGenerator {
    aspect_ratios: Vec<Vec<f64>>,
    scales: Vec<f64>,
    steps: Option<Vec<usize>>,
    clip: bool,
    wh_pairs: Vec<Vec<[f32; 2]>>,
}

impl DefaultBoxGenerator {
    /// A generator with the extra aspect ratios of each level (2 and 3 give 1/2 and 1/3 too),
    /// its scales and, optionally, a step (pixels between centres) per level.
    pub fn new(
        aspect_ratios: Vec<Vec<f64>>,
        scales: DefaultBoxScales,
        steps: Option<Vec<usize>>,
        clip: bool,
    ) -> Result<Self> {
        let levels = aspect_ratios.len();
        if levels == 0 {
            return Err(bad_input(OP, "default boxes need at least one level of aspect ratios"));
        }
        if aspect_ratios.iter().flatten().any(|&a| !(a.is_finite() && a > 0.0)) {
            return Err(bad_input(OP, "aspect ratios must be finite and positive"));
        }
        if let Some(steps) = &steps
            && (steps.len() != levels || steps.contains(&0))
        {
            return Err(bad_input(OP, format!("{levels} levels need {levels} positive steps, got {steps:?}")));
        }
        let scales = match scales {
            DefaultBoxScales::Range { min_ratio, max_ratio } => range_scales(levels, min_ratio, max_ratio),
            DefaultBoxScales::Explicit(s) => s,
        };
        if scales.len() < levels + 1 || scales.iter().any(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err(bad_input(
                OP,
                format!("{levels} levels need {} finite, non-negative scales, got {scales:?}", levels + 1),
            ));
        }
        Ok(Self::from_parts(aspect_ratios, scales, steps, clip))
    }

    fn from_parts(aspect_ratios: Vec<Vec<f64>>, scales: Vec<f64>, steps: Option<Vec<usize>>, clip: bool) -> Self {
        let wh_pairs = aspect_ratios
            .iter()
            .enumerate()
            .map(|(k, ratios)| {
                // Computed in f64 as torchvision's Python does, stored as f32 as its tensor is.
                let (s_k, s_prime) = (scales[k], (scales[k] * scales[k + 1]).sqrt());
                let mut pairs = vec![[s_k as f32; 2], [s_prime as f32; 2]];
                for &ar in ratios {
                    let (w, h) = (scales[k] * ar.sqrt(), scales[k] / ar.sqrt());
                    pairs.push([w as f32, h as f32]);
                    pairs.push([h as f32, w as f32]);
                }
                pairs
            })
            .collect();
        Self { aspect_ratios, scales, steps, clip, wh_pairs }
    }

    /// `ssd300_vgg16`'s default boxes: extra aspect ratios `[2], [2, 3], [2, 3], [2, 3], [2],
    /// [2]`, scales 0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05, steps 8, 16, 32, 64, 100, 300
    /// (8,732 boxes on the 38, 19, 10, 5, 3 and 1 maps of a 300x300 image).
    pub fn ssd300() -> Self {
        let ratios = [vec![2.0], vec![2.0, 3.0], vec![2.0, 3.0], vec![2.0, 3.0], vec![2.0], vec![2.0]].to_vec();
        let scales = vec![0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05];
        Self::from_parts(ratios, scales, Some(vec![8, 16, 32, 64, 100, 300]), true)
    }

    /// `ssdlite320_mobilenet_v3_large`'s default boxes: extra aspect ratios 2 and 3 on six
    /// levels, scales from 0.2 to 0.95, no steps (3,234 boxes on the 20, 10, 5, 3, 2 and 1 maps
    /// of the MobileNetV2 SSDLite at 320x320).
    pub fn ssdlite() -> Self {
        Self::from_parts(vec![vec![2.0, 3.0]; 6], range_scales(6, 0.2, 0.95), None, true)
    }

    /// The scales, one per level and one more.
    pub fn scales(&self) -> &[f64] {
        &self.scales
    }

    /// The width-height pairs of each level, as fractions of the image, before clipping.
    pub fn wh_pairs(&self) -> &[Vec<[f32; 2]>] {
        &self.wh_pairs
    }

    /// Default boxes per location of each level: 2 + 2 per extra aspect ratio.
    pub fn num_anchors_per_location(&self) -> Vec<usize> {
        self.wh_pairs.iter().map(Vec::len).collect()
    }

    /// Every default box as `[cx, cy, w, h]` in fractions of the image (torchvision's
    /// `_grid_default_boxes`), for an image of `image_size` (height, width) and feature maps of
    /// `feature_sizes` (height, width).
    pub fn normalized_boxes(
        &self,
        image_size: (usize, usize),
        feature_sizes: &[(usize, usize)],
    ) -> Result<Vec<[f32; 4]>> {
        check_levels(self.wh_pairs.len(), feature_sizes)?;
        let mut out = Vec::new();
        for (k, (&(fh, fw), pairs)) in feature_sizes.iter().zip(&self.wh_pairs).enumerate() {
            // torchvision divides the f32 centres by a Python number: the image size over the
            // step (a float) or the feature size (an int), cast to f32.
            let (f_y, f_x) = match &self.steps {
                Some(steps) => {
                    ((image_size.0 as f64 / steps[k] as f64) as f32, (image_size.1 as f64 / steps[k] as f64) as f32)
                }
                None => (fh as f32, fw as f32),
            };
            let clamp = |v: f32| v.clamp(0.0, 1.0);
            for i in 0..fh {
                let cy = (i as f32 + 0.5) / f_y;
                for j in 0..fw {
                    let cx = (j as f32 + 0.5) / f_x;
                    out.extend(pairs.iter().map(|&[w, h]| {
                        let (w, h) = if self.clip { (clamp(w), clamp(h)) } else { (w, h) };
                        [cx, cy, w, h]
                    }));
                }
            }
        }
        Ok(out)
    }

    /// Every default box as `[x1, y1, x2, y2]` in pixels (torchvision's
    /// `DefaultBoxGenerator.forward`): `(c - 0.5 * size) * image side` and `(c + 0.5 * size) *
    /// image side`, in `f32`.
    pub fn boxes(&self, image_size: (usize, usize), feature_sizes: &[(usize, usize)]) -> Result<Vec<[f32; 4]>> {
        let (ih, iw) = (image_size.0 as f32, image_size.1 as f32);
        Ok(self
            .normalized_boxes(image_size, feature_sizes)?
            .into_iter()
            .map(|[cx, cy, w, h]| {
                let (hw, hh) = (0.5 * w, 0.5 * h);
                [(cx - hw) * iw, (cy - hh) * ih, (cx + hw) * iw, (cy + hh) * ih]
            })
            .collect())
    }
}

/// torchvision's scales from a range: `min + (max - min) * k / (levels - 1)` for each level, then
/// 1; a single level gets `[min, max]`.
fn range_scales(levels: usize, min_ratio: f64, max_ratio: f64) -> Vec<f64> {
    if levels <= 1 {
        return vec![min_ratio, max_ratio];
    }
    let range = max_ratio - min_ratio;
    let mut scales: Vec<f64> = (0..levels).map(|k| min_ratio + range * k as f64 / (levels as f64 - 1.0)).collect();
    scales.push(1.0);
    scales
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SSD's default boxes in pixels, computed in f64 straight from torchvision's formulas
    /// (`DefaultBoxGenerator.__init__`, `_generate_wh_pairs`, `_grid_default_boxes`, `forward`).
    fn ssd_reference(
        ratios: &[&[f64]],
        scales: &[f64],
        steps: Option<&[f64]>,
        image: (usize, usize),
        maps: &[(usize, usize)],
    ) -> Vec<[f64; 4]> {
        let mut out = Vec::new();
        for (k, &(fh, fw)) in maps.iter().enumerate() {
            let mut wh =
                vec![(scales[k], scales[k]), ((scales[k] * scales[k + 1]).sqrt(), (scales[k] * scales[k + 1]).sqrt())];
            for &a in ratios[k] {
                wh.push((scales[k] * a.sqrt(), scales[k] / a.sqrt()));
                wh.push((scales[k] / a.sqrt(), scales[k] * a.sqrt()));
            }
            let (fx, fy) = match steps {
                Some(s) => (image.1 as f64 / s[k], image.0 as f64 / s[k]),
                None => (fw as f64, fh as f64),
            };
            for i in 0..fh {
                for j in 0..fw {
                    let (cx, cy) = ((j as f64 + 0.5) / fx, (i as f64 + 0.5) / fy);
                    for &(w, h) in &wh {
                        let (w, h) = (w.clamp(0.0, 1.0), h.clamp(0.0, 1.0));
                        let (iw, ih) = (image.1 as f64, image.0 as f64);
                        out.push([(cx - w / 2.0) * iw, (cy - h / 2.0) * ih, (cx + w / 2.0) * iw, (cy + h / 2.0) * ih]);
                    }
                }
            }
        }
        out
    }

    fn assert_close(got: &[[f32; 4]], want: &[[f64; 4]], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            for k in 0..4 {
                assert!((f64::from(g[k]) - w[k]).abs() <= tol, "box {i}: {g:?} vs {w:?}");
            }
        }
    }

    #[test]
    fn ssd300_default_boxes_match_torchvision() {
        let g = DefaultBoxGenerator::ssd300();
        let maps = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)];
        let boxes = g.boxes((300, 300), &maps).expect("boxes");
        assert_eq!(g.num_anchors_per_location(), vec![4, 6, 6, 6, 4, 4]);
        assert_eq!(boxes.len(), 8732);
        let ratios: [&[f64]; 6] = [&[2.0], &[2.0, 3.0], &[2.0, 3.0], &[2.0, 3.0], &[2.0], &[2.0]];
        let scales = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05];
        let want = ssd_reference(&ratios, &scales, Some(&[8.0, 16.0, 32.0, 64.0, 100.0, 300.0]), (300, 300), &maps);
        assert_close(&boxes, &want, 1e-3);
        // By hand: the first box sits at (0.5 / (300 / 8)) * 300 = 4 px with side 0.07 * 300 =
        // 21, so [4 - 10.5, 4 - 10.5, 4 + 10.5, 4 + 10.5].
        assert_close(&boxes[..1], &[[-6.5, -6.5, 14.5, 14.5]], 1e-4);
        // The last is the 1x1 map's 1:2 box at the centre: 0.87 * sqrt(2) = 1.23 clips to 1
        // (300 px tall), 0.87 / sqrt(2) * 300 = 184.55 wide, so x = 150 -+ 92.28.
        let half = 0.87 / 2f64.sqrt() * 150.0;
        assert_close(&boxes[8731..], &[[150.0 - half, 0.0, 150.0 + half, 300.0]], 1e-3);
    }

    #[test]
    fn ssdlite_default_boxes_match_torchvision() {
        let g = DefaultBoxGenerator::ssdlite();
        // 0.2 + 0.75 k / 5, then 1.
        for (got, want) in g.scales().iter().zip([0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0]) {
            assert!((got - want).abs() < 1e-12, "{:?}", g.scales());
        }
        let maps = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)];
        let boxes = g.boxes((320, 320), &maps).expect("boxes");
        assert_eq!(boxes.len(), 3234);
        let scales = [0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0];
        let ratios: [&[f64]; 6] = [&[2.0, 3.0]; 6];
        let want = ssd_reference(&ratios, &scales, None, (320, 320), &maps);
        assert_close(&boxes, &want, 1e-3);
        // By hand: the first centre is 0.5 / 20 * 320 = 8 px, side 0.2 * 320 = 64.
        assert_close(&boxes[..1], &[[-24.0, -24.0, 40.0, 40.0]], 1e-4);
        // The last: the 1x1 map's 1:3 box, 0.95 * sqrt(3) clipped to 1 tall and
        // 0.95 / sqrt(3) * 320 wide around x = 160.
        let half = 0.95 / 3f64.sqrt() * 160.0;
        assert_close(&boxes[3233..], &[[160.0 - half, 0.0, 160.0 + half, 320.0]], 1e-3);
    }

    #[test]
    fn unclipped_non_square_default_boxes_use_width_for_x() {
        let g = DefaultBoxGenerator::new(
            vec![vec![2.0], vec![3.0]],
            DefaultBoxScales::Range { min_ratio: 0.3, max_ratio: 1.2 },
            Some(vec![16, 40]),
            false,
        )
        .expect("generator");
        let maps = [(6, 10), (2, 4)];
        let boxes = g.boxes((96, 160), &maps).expect("boxes");
        // Two levels from 0.3 to 1.2, then 1; the 1.2-scale boxes are wider than the image and,
        // unclipped, stay so.
        let scales = [0.3, 1.2, 1.0];
        let mut want = Vec::new();
        for (k, &(fh, fw)) in maps.iter().enumerate() {
            let a: f64 = [2.0, 3.0][k];
            let step = [16.0, 40.0][k];
            let s: f64 = scales[k];
            let sp = (scales[k] * scales[k + 1]).sqrt();
            let wh = [(s, s), (sp, sp), (s * a.sqrt(), s / a.sqrt()), (s / a.sqrt(), s * a.sqrt())];
            for i in 0..fh {
                for j in 0..fw {
                    let (cx, cy) = ((j as f64 + 0.5) / (160.0 / step), (i as f64 + 0.5) / (96.0 / step));
                    for (w, h) in wh {
                        want.push([
                            (cx - w / 2.0) * 160.0,
                            (cy - h / 2.0) * 96.0,
                            (cx + w / 2.0) * 160.0,
                            (cy + h / 2.0) * 96.0,
                        ]);
                    }
                }
            }
        }
        assert_close(&boxes, &want, 1e-3);
    }

    /// torchvision's anchors in f64: cell anchors `round(+-ratio-scaled size / 2)`, half to even,
    /// shifted by `index * (image // feature)`.
    fn anchor_reference(sizes: &[Vec<f64>], image: (usize, usize), maps: &[(usize, usize)]) -> Vec<[f64; 4]> {
        let mut out = Vec::new();
        for (level, &(fh, fw)) in maps.iter().enumerate() {
            let mut cells = Vec::new();
            for ratio in [0.5f64, 1.0, 2.0] {
                for &s in &sizes[level] {
                    let (w, h) = (s / ratio.sqrt(), s * ratio.sqrt());
                    cells.push([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0].map(f64::round_ties_even));
                }
            }
            let (sy, sx) = ((image.0 / fh) as f64, (image.1 / fw) as f64);
            for i in 0..fh {
                for j in 0..fw {
                    for c in &cells {
                        let (x, y) = (j as f64 * sx, i as f64 * sy);
                        out.push([x + c[0], y + c[1], x + c[2], y + c[3]]);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn faster_rcnn_anchors_match_torchvision() {
        let g = AnchorGenerator::faster_rcnn_fpn();
        // By hand, size 32: ratio 0.5 is 32 sqrt(2) = 45.25 wide, 22.63 tall, halves 22.63 and
        // 11.31, rounded 23 and 11; ratio 1 is +-16; ratio 2 the transpose of 0.5.
        assert_eq!(
            g.cell_anchors()[0],
            vec![[-23.0, -11.0, 23.0, 11.0], [-16.0, -16.0, 16.0, 16.0], [-11.0, -23.0, 11.0, 23.0]]
        );
        let maps = [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)];
        let anchors = g.anchors((800, 1216), &maps).expect("anchors");
        assert_eq!(anchors.len(), 3 * (200 * 304 + 100 * 152 + 50 * 76 + 25 * 38 + 13 * 19));
        assert_eq!(g.num_anchors_per_level(&maps).iter().sum::<usize>(), anchors.len());
        let sizes: Vec<Vec<f64>> = [32.0, 64.0, 128.0, 256.0, 512.0].iter().map(|&s| vec![s]).collect();
        let want = anchor_reference(&sizes, (800, 1216), &maps);
        assert_close(&anchors, &want, 0.0);
        // The pool level: 800 // 13 = 61 (not 64) between rows, 1216 // 19 = 64 between columns;
        // the first anchor of its second row is the 0.5 one at (0, 61).
        let start = anchors.len() - 3 * 13 * 19;
        assert_eq!(anchors[start + 3 * 19], [-362.0, 61.0 - 181.0, 362.0, 61.0 + 181.0]);
    }

    #[test]
    fn retinanet_anchors_match_torchvision() {
        let g = AnchorGenerator::retinanet();
        // int(x * 2^(1/3)), int(x * 2^(2/3)) for x = 32, 64, 128, 256, 512.
        let want_sizes = [
            [32.0, 40.0, 50.0],
            [64.0, 80.0, 101.0],
            [128.0, 161.0, 203.0],
            [256.0, 322.0, 406.0],
            [512.0, 645.0, 812.0],
        ];
        for (got, want) in g.sizes().iter().zip(want_sizes) {
            assert_eq!(got, &want);
        }
        // By hand, ratio 0.5: halves 32 / sqrt(2) * ... = (22.63, 11.31) -> (23, 11), size 40:
        // (28.28, 14.14) -> (28, 14), size 50: (35.36, 17.68) -> (35, 18).
        assert_eq!(
            &g.cell_anchors()[0][..3],
            &[[-23.0, -11.0, 23.0, 11.0], [-28.0, -14.0, 28.0, 14.0], [-35.0, -18.0, 35.0, 18.0]]
        );
        assert_eq!(g.num_anchors_per_location(), vec![9; 5]);
        let maps = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)];
        let anchors = g.anchors((800, 1216), &maps).expect("anchors");
        let sizes: Vec<Vec<f64>> = want_sizes.iter().map(|s| s.iter().map(|&v| f64::from(v)).collect()).collect();
        assert_close(&anchors, &anchor_reference(&sizes, (800, 1216), &maps), 0.0);
    }

    #[test]
    fn bad_configurations_and_sizes_are_refused() {
        assert!(AnchorGenerator::new(vec![vec![32.0]], vec![]).is_err());
        assert!(AnchorGenerator::new(vec![vec![32.0]], vec![vec![-1.0]]).is_err());
        assert!(AnchorGenerator::new(vec![vec![32.0]], vec![vec![1.0]]).is_ok());
        let g = AnchorGenerator::faster_rcnn_fpn();
        assert!(g.anchors((800, 800), &[(200, 200)]).is_err());
        assert!(g.anchors((800, 800), &[(200, 200), (100, 100), (50, 50), (25, 0), (13, 13)]).is_err());
        assert!(
            DefaultBoxGenerator::new(vec![vec![2.0]; 2], DefaultBoxScales::Explicit(vec![0.1, 0.2]), None, true)
                .is_err()
        );
        assert!(
            DefaultBoxGenerator::new(
                vec![vec![2.0]; 2],
                DefaultBoxScales::Explicit(vec![0.1, 0.2, 0.3]),
                Some(vec![8]),
                true
            )
            .is_err()
        );
        assert!(DefaultBoxGenerator::ssdlite().boxes((320, 320), &[(20, 20)]).is_err());
    }
}
