//! Box arithmetic as torchvision does it: `box_area`, `box_iou`, `clip_boxes_to_image` and
//! `remove_small_boxes` (`torchvision/ops/boxes.py`), and `BoxCoder` (`encode_boxes`,
//! `decode_single` in `torchvision/models/detection/_utils.py`), the parameterisation of Girshick
//! et al. (R-CNN, CVPR 2014) with torchvision's weights and its `bbox_xform_clip`.
//!
//! There is one IoU formula, [`iou_with_offset`], generic over the coordinate type: in `f32` with
//! no offset it is torchvision's `box_iou` and its NMS kernel's overlap, in `f64` with no offset
//! pycocotools' `bbIou`, and in `f64` with an offset of one pixel the Pascal VOC devkit's.

use std::ops::{Add, Div, Mul, Sub};

use super::{bad_input, same_len};
use crate::Result;

/// torchvision's `bbox_xform_clip`, `log(1000 / 16)`: the largest log-scale a decoded box may
/// grow by, so that `exp` cannot overflow on a wild regression.
pub const BBOX_XFORM_CLIP: f32 = 4.135_166_556_742_356_f64 as f32;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// A coordinate type the IoU formula runs in: `f32` (the detectors) or `f64` (evaluation).
pub trait Coord:
    sealed::Sealed + Copy + PartialOrd + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> + Div<Output = Self>
{
    /// Zero.
    const ZERO: Self;
}

impl Coord for f32 {
    const ZERO: f32 = 0.0;
}

impl Coord for f64 {
    const ZERO: f64 = 0.0;
}

fn max<T: Coord>(a: T, b: T) -> T {
    if a < b { b } else { a }
}

fn min<T: Coord>(a: T, b: T) -> T {
    if b < a { b } else { a }
}

/// The area of `[x1, y1, x2, y2]` with `offset` added to each side: torchvision's `box_area` at
/// an offset of zero.
pub fn area_with_offset<T: Coord>(b: &[T; 4], offset: T) -> T {
    (b[2] - b[0] + offset) * (b[3] - b[1] + offset)
}

/// The area of a box, `(x2 - x1) * (y2 - y1)` (torchvision's `box_area`).
pub fn area(b: &[f32; 4]) -> f32 {
    area_with_offset(b, 0.0)
}

/// Intersection over union of two boxes whose sides are measured with `offset` added (0 for
/// continuous coordinates, 1 for the VOC devkit's inclusive pixels): the intersection's sides
/// `min(x2) - max(x1) + offset` clamped at zero, and `inter / (area(a) + area(b) - inter)`, in
/// that order of operations (torchvision's `box_iou` and NMS kernel, pycocotools' `bbIou`).
///
/// Boxes that do not overlap give 0, also when both are empty (torchvision's `0 / 0` would give
/// NaN there, which no comparison against a threshold can tell from 0).
pub fn iou_with_offset<T: Coord>(a: &[T; 4], b: &[T; 4], offset: T) -> T {
    let w = max(min(a[2], b[2]) - max(a[0], b[0]) + offset, T::ZERO);
    let h = max(min(a[3], b[3]) - max(a[1], b[1]) + offset, T::ZERO);
    let inter = w * h;
    if inter > T::ZERO { inter / (area_with_offset(a, offset) + area_with_offset(b, offset) - inter) } else { T::ZERO }
}

/// Intersection over union of two boxes in continuous coordinates (torchvision's `box_iou`).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    iou_with_offset(a, b, 0.0)
}

/// A matrix of match qualities, one row per ground-truth box and one column per prediction
/// (anchor, default box or proposal): torchvision's `match_quality_matrix`.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityMatrix {
    rows: usize,
    cols: usize,
    values: Vec<f32>,
}

impl QualityMatrix {
    /// A `rows x cols` matrix from its values in row-major order.
    pub fn new(rows: usize, cols: usize, values: Vec<f32>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(values.len()) {
            return Err(crate::NnError::Shape(format!(
                "a {rows} x {cols} quality matrix needs {} values, got {}; pass them row by row",
                rows.saturating_mul(cols),
                values.len()
            )));
        }
        Ok(Self { rows, cols, values })
    }

    /// Ground-truth boxes (rows).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Predictions (columns).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The quality of ground truth `r` with prediction `c`.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.values[r * self.cols + c]
    }

    /// Row `r`: ground truth `r` against every prediction.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.values[r * self.cols..(r + 1) * self.cols]
    }

    /// All values, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }
}

/// The IoU of every ground-truth box (rows) with every prediction (columns): torchvision's
/// `box_iou(gt, predictions)`.
pub fn iou_matrix(gt: &[[f32; 4]], predictions: &[[f32; 4]]) -> QualityMatrix {
    let values = gt.iter().flat_map(|g| predictions.iter().map(move |p| iou(g, p))).collect();
    QualityMatrix { rows: gt.len(), cols: predictions.len(), values }
}

/// `b` clamped into an image of `(height, width)` pixels: x into `[0, width]`, y into
/// `[0, height]` (torchvision's `clip_boxes_to_image`).
pub fn clip_to_image(b: &[f32; 4], (height, width): (usize, usize)) -> [f32; 4] {
    let (h, w) = (height as f32, width as f32);
    let clamp = |v: f32, hi: f32| {
        if v < 0.0 {
            0.0
        } else if v > hi {
            hi
        } else {
            v
        }
    };
    [clamp(b[0], w), clamp(b[1], h), clamp(b[2], w), clamp(b[3], h)]
}

/// The indices, ascending, of the boxes whose width and height are both at least `min_size`
/// (torchvision's `remove_small_boxes`).
pub fn remove_small(boxes: &[[f32; 4]], min_size: f32) -> Vec<usize> {
    boxes
        .iter()
        .enumerate()
        .filter(|(_, b)| b[2] - b[0] >= min_size && b[3] - b[1] >= min_size)
        .map(|(i, _)| i)
        .collect()
}

/// Checks that every coordinate of `boxes` is finite.
pub fn check_finite(op: &str, what: &str, boxes: &[[f32; 4]]) -> Result<()> {
    match boxes.iter().position(|b| b.iter().any(|v| !v.is_finite())) {
        None => Ok(()),
        Some(i) => Err(bad_input(
            op,
            format!("{what} {i} is {:?}, which is not finite; check the model's outputs and the data", boxes[i]),
        )),
    }
}

/// Checks ground-truth boxes as torchvision's detectors do in training: finite, with positive
/// width and height.
pub fn check_ground_truth(op: &str, boxes: &[[f32; 4]]) -> Result<()> {
    check_finite(op, "ground-truth box", boxes)?;
    match boxes.iter().position(|b| !(b[2] > b[0] && b[3] > b[1])) {
        None => Ok(()),
        Some(i) => Err(bad_input(
            op,
            format!(
                "ground-truth box {i} is {:?}, without positive width and height; drop or fix it in the data",
                boxes[i]
            ),
        )),
    }
}

/// Checks that every score is finite.
pub fn check_scores(op: &str, scores: &[f32]) -> Result<()> {
    match scores.iter().position(|s| !s.is_finite()) {
        None => Ok(()),
        Some(i) => Err(bad_input(op, format!("score {i} is {}, not finite; check the model's outputs", scores[i]))),
    }
}

/// torchvision's `BoxCoder`: a box relative to a reference box (anchor, default box or proposal)
/// as `(dx, dy, dw, dh) = (wx (cx - cx_a) / w_a, wy (cy - cy_a) / h_a, ww ln(w / w_a),
/// wh ln(h / h_a))`, in `f32` in torchvision's order of operations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxCoder {
    /// `(wx, wy, ww, wh)`: (1, 1, 1, 1) in the RPN and RetinaNet, (10, 10, 5, 5) in the Faster
    /// R-CNN box head and SSD.
    pub weights: [f32; 4],
    /// The largest `dw` and `dh` decoding takes, after dividing by the weights.
    pub xform_clip: f32,
}

impl BoxCoder {
    /// A coder with `weights` and torchvision's clip, `log(1000 / 16)`.
    pub const fn new(weights: [f32; 4]) -> Self {
        Self { weights, xform_clip: BBOX_XFORM_CLIP }
    }

    /// SSD's "variance" coding (Liu et al., 2016): centre offsets divided by `center` and log
    /// sizes by `size` (0.1 and 0.2 in SSD), which is the coder with weights
    /// `(1/center, 1/center, 1/size, 1/size)`: torchvision's SSD uses (10, 10, 5, 5).
    pub fn from_variances(center: f32, size: f32) -> Self {
        let (c, s) = ((1.0 / f64::from(center)) as f32, (1.0 / f64::from(size)) as f32);
        Self::new([c, c, s, s])
    }

    /// The code of `gt` relative to `reference` (torchvision's `encode_boxes`).
    pub fn encode(&self, gt: &[f32; 4], reference: &[f32; 4]) -> [f32; 4] {
        let [wx, wy, ww, wh] = self.weights;
        let (ex_w, ex_h) = (reference[2] - reference[0], reference[3] - reference[1]);
        let (ex_cx, ex_cy) = (reference[0] + 0.5 * ex_w, reference[1] + 0.5 * ex_h);
        let (gt_w, gt_h) = (gt[2] - gt[0], gt[3] - gt[1]);
        let (gt_cx, gt_cy) = (gt[0] + 0.5 * gt_w, gt[1] + 0.5 * gt_h);
        [wx * (gt_cx - ex_cx) / ex_w, wy * (gt_cy - ex_cy) / ex_h, ww * (gt_w / ex_w).ln(), wh * (gt_h / ex_h).ln()]
    }

    /// The box that `code` describes relative to `reference` (torchvision's `decode_single`):
    /// `dw` and `dh` are clamped from above at [`BoxCoder::xform_clip`] before `exp`.
    pub fn decode(&self, code: &[f32; 4], reference: &[f32; 4]) -> [f32; 4] {
        let [wx, wy, ww, wh] = self.weights;
        let (w, h) = (reference[2] - reference[0], reference[3] - reference[1]);
        let (cx, cy) = (reference[0] + 0.5 * w, reference[1] + 0.5 * h);
        // torch.clamp(max=...) passes NaN through, as this does.
        let clip = |d: f32| if d > self.xform_clip { self.xform_clip } else { d };
        let (dx, dy, dw, dh) = (code[0] / wx, code[1] / wy, clip(code[2] / ww), clip(code[3] / wh));
        let (pcx, pcy) = (dx * w + cx, dy * h + cy);
        let (half_w, half_h) = (0.5 * (dw.exp() * w), 0.5 * (dh.exp() * h));
        [pcx - half_w, pcy - half_h, pcx + half_w, pcy + half_h]
    }

    /// [`BoxCoder::encode`] of each ground-truth box against its reference box.
    pub fn encode_all(&self, gt: &[[f32; 4]], references: &[[f32; 4]]) -> Result<Vec<[f32; 4]>> {
        same_len("box encoding", ("ground-truth boxes", gt.len()), ("reference boxes", references.len()))?;
        Ok(gt.iter().zip(references).map(|(g, r)| self.encode(g, r)).collect())
    }

    /// [`BoxCoder::decode`] of each code against its reference box.
    pub fn decode_all(&self, codes: &[[f32; 4]], references: &[[f32; 4]]) -> Result<Vec<[f32; 4]>> {
        same_len("box decoding", ("codes", codes.len()), ("reference boxes", references.len()))?;
        Ok(codes.iter().zip(references).map(|(c, r)| self.decode(c, r)).collect())
    }
}

#[cfg(test)]
mod tests {
    use int8_core::rng::CounterRng;

    use super::*;
    use crate::detection::random_box;

    fn iou_f64(a: &[f32; 4], b: &[f32; 4]) -> f64 {
        let a: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
        let b: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
        let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let inter = iw * ih;
        inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)
    }

    #[test]
    fn iou_matches_hand_values_and_the_f64_definition() {
        // Two 2x2 squares overlapping in a 1x2 strip: 2 / (4 + 4 - 2) = 1/3.
        assert_eq!(iou(&[0.0, 0.0, 2.0, 2.0], &[1.0, 0.0, 3.0, 2.0]), 1.0 / 3.0);
        // A box inside another: its area over the outer one's, 4 / 16.
        assert_eq!(iou(&[1.0, 1.0, 3.0, 3.0], &[0.0, 0.0, 4.0, 4.0]), 0.25);
        // Touching edges and disjoint boxes overlap in nothing; two empty boxes give 0, not NaN.
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[1.0, 0.0, 2.0, 1.0]), 0.0);
        assert_eq!(iou(&[0.0, 0.0, 1.0, 1.0], &[5.0, 5.0, 6.0, 6.0]), 0.0);
        assert_eq!(iou(&[1.0, 1.0, 1.0, 1.0], &[1.0, 1.0, 1.0, 1.0]), 0.0);
        // The devkit's +1: [0, 0, 1, 1] covers 2x2 pixels, [1, 0, 2, 1] too, sharing a 1x2
        // column: 2 / (4 + 4 - 2).
        assert_eq!(iou_with_offset(&[0.0f64, 0.0, 1.0, 1.0], &[1.0, 0.0, 2.0, 1.0], 1.0), 1.0 / 3.0);
        let r = CounterRng::new(3);
        for i in 0..2000 {
            let (a, b) = (random_box(&r, 2 * i), random_box(&r, 2 * i + 1));
            let (got, want) = (iou(&a, &b), iou_f64(&a, &b));
            assert!((f64::from(got) - want).abs() <= 1e-6, "{a:?} {b:?}: {got} vs {want}");
            assert_eq!(got, iou(&b, &a), "iou is symmetric to the bit");
        }
    }

    #[test]
    fn the_iou_matrix_is_gt_by_prediction() {
        let r = CounterRng::new(4);
        let gt: Vec<_> = (0..3).map(|i| random_box(&r, i)).collect();
        let pred: Vec<_> = (3..8).map(|i| random_box(&r, i)).collect();
        let m = iou_matrix(&gt, &pred);
        assert_eq!((m.rows(), m.cols()), (3, 5));
        for (g, gb) in gt.iter().enumerate() {
            for (p, pb) in pred.iter().enumerate() {
                assert_eq!(m.get(g, p), iou(gb, pb));
            }
        }
        assert!(QualityMatrix::new(2, 3, vec![0.0; 5]).is_err());
    }

    #[test]
    fn clipping_and_small_box_removal() {
        // Image 10 high and 20 wide: x clamps into [0, 20], y into [0, 10].
        assert_eq!(clip_to_image(&[-5.0, -1.0, 25.0, 12.0], (10, 20)), [0.0, 0.0, 20.0, 10.0]);
        assert_eq!(clip_to_image(&[1.0, 2.0, 3.0, 4.0], (10, 20)), [1.0, 2.0, 3.0, 4.0]);
        let boxes = [[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 2.0], [0.0, 0.0, 2.0, 0.999], [3.0, 3.0, 4.0, 5.0]];
        // Sides equal to min_size are kept (torchvision's >=).
        assert_eq!(remove_small(&boxes, 1.0), vec![0, 3]);
    }

    #[test]
    fn the_clip_is_log_1000_over_16() {
        assert_eq!(BBOX_XFORM_CLIP, (1000.0f64 / 16.0).ln() as f32);
    }

    #[test]
    fn coder_matches_the_f64_formulas_and_round_trips() {
        let r = CounterRng::new(5);
        for weights in [[1.0, 1.0, 1.0, 1.0], [10.0, 10.0, 5.0, 5.0], [2.0, 3.0, 0.5, 4.0]] {
            let coder = BoxCoder::new(weights);
            for i in 0..500 {
                let (gt, anchor) = (random_box(&r, 2 * i), random_box(&r, 2 * i + 1));
                let code = coder.encode(&gt, &anchor);
                let f = |v: f32| f64::from(v);
                let (aw, ah) = (f(anchor[2]) - f(anchor[0]), f(anchor[3]) - f(anchor[1]));
                let (gw, gh) = (f(gt[2]) - f(gt[0]), f(gt[3]) - f(gt[1]));
                let want = [
                    f(weights[0]) * ((f(gt[0]) + gw / 2.0) - (f(anchor[0]) + aw / 2.0)) / aw,
                    f(weights[1]) * ((f(gt[1]) + gh / 2.0) - (f(anchor[1]) + ah / 2.0)) / ah,
                    f(weights[2]) * (gw / aw).ln(),
                    f(weights[3]) * (gh / ah).ln(),
                ];
                for k in 0..4 {
                    assert!((f(code[k]) - want[k]).abs() <= 2e-4 * (1.0 + want[k].abs()), "{k}: {code:?} {want:?}");
                }
                let back = coder.decode(&code, &anchor);
                for k in 0..4 {
                    assert!((back[k] - gt[k]).abs() <= 2e-4, "{back:?} vs {gt:?}");
                }
            }
        }
    }

    #[test]
    fn decoding_clamps_the_log_scale() {
        let coder = BoxCoder::new([1.0, 1.0, 1.0, 1.0]);
        // A 10x10 anchor centred at (5, 5) told to grow by e^100 grows by 1000/16 = 62.5 only.
        let b = coder.decode(&[0.0, 0.0, 100.0, 100.0], &[0.0, 0.0, 10.0, 10.0]);
        let half = 0.5 * (BBOX_XFORM_CLIP.exp() * 10.0);
        assert_eq!(b, [5.0 - half, 5.0 - half, 5.0 + half, 5.0 + half]);
        assert!((half - 312.5).abs() < 1e-3);
        assert!(coder.decode(&[0.0, 0.0, f32::NAN, 0.0], &[0.0, 0.0, 1.0, 1.0])[0].is_nan());
    }

    #[test]
    fn ssd_variances_are_the_coder_with_weights_10_10_5_5() {
        let ssd = BoxCoder::from_variances(0.1, 0.2);
        assert_eq!(ssd, BoxCoder::new([10.0, 10.0, 5.0, 5.0]));
        // The classic formulation on (cx, cy, w, h), in f64: g_cx = (cx - d_cx) / (0.1 d_w),
        // g_w = ln(w / d_w) / 0.2.
        let r = CounterRng::new(6);
        for i in 0..300 {
            let (gt, d) = (random_box(&r, 2 * i), random_box(&r, 2 * i + 1));
            let c = |b: &[f32; 4]| {
                let b: Vec<f64> = b.iter().map(|&v| f64::from(v)).collect();
                [(b[0] + b[2]) / 2.0, (b[1] + b[3]) / 2.0, b[2] - b[0], b[3] - b[1]]
            };
            let (g, p) = (c(&gt), c(&d));
            let want = [
                (g[0] - p[0]) / (0.1 * p[2]),
                (g[1] - p[1]) / (0.1 * p[3]),
                (g[2] / p[2]).ln() / 0.2,
                (g[3] / p[3]).ln() / 0.2,
            ];
            let got = ssd.encode(&gt, &d);
            for k in 0..4 {
                assert!((f64::from(got[k]) - want[k]).abs() <= 1e-3 * (1.0 + want[k].abs()), "{got:?} {want:?}");
            }
        }
    }

    #[test]
    fn bad_input_is_refused() {
        let coder = BoxCoder::new([1.0; 4]);
        assert!(coder.encode_all(&[[0.0, 0.0, 1.0, 1.0]], &[]).is_err());
        assert!(coder.decode_all(&[], &[[0.0, 0.0, 1.0, 1.0]]).is_err());
        assert!(check_finite("t", "box", &[[0.0, f32::INFINITY, 1.0, 1.0]]).is_err());
        assert!(check_ground_truth("t", &[[0.0, 0.0, 0.0, 1.0]]).is_err());
        assert!(check_ground_truth("t", &[[0.0, 0.0, 1.0, 1.0]]).is_ok());
        assert!(check_scores("t", &[0.5, f32::NAN]).is_err());
    }
}
