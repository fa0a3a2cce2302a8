//! Assigning ground truth to predictions (anchors, default boxes, proposals) by IoU, as
//! torchvision's `Matcher` and `SSDMatcher` (`torchvision/models/detection/_utils.py`).
//!
//! A match is an `i64` per prediction: the index of its ground-truth box, or
//! [`BELOW_LOW_THRESHOLD`] (-1, background) or [`BETWEEN_THRESHOLDS`] (-2, ignored), as
//! torchvision's tensors hold them. Qualities are compared with the thresholds in `f32`, as torch
//! compares an `f32` tensor with a Python float. Where several ground-truth boxes share a
//! prediction's best quality, the first wins (`torch.max(dim)` returns the first maximum).

use super::bad_input;
use super::boxes::{QualityMatrix, check_finite, check_ground_truth, iou_matrix};
use crate::Result;

/// The match of a prediction whose best quality is below the low threshold: background.
pub const BELOW_LOW_THRESHOLD: i64 = -1;
/// The match of a prediction whose best quality is between the thresholds: ignored in training.
pub const BETWEEN_THRESHOLDS: i64 = -2;

const OP: &str = "matcher";

/// torchvision's `Matcher`: each prediction gets its best ground truth if that quality is at
/// least `high`, -2 if it is in `[low, high)`, -1 below `low`; with low-quality matches allowed,
/// every prediction that is some ground truth's best (ties included) keeps its best ground truth
/// whatever the quality.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Matcher {
    high_threshold: f32,
    low_threshold: f32,
    allow_low_quality_matches: bool,
}

fn check_thresholds(high: f32, low: f32) -> Result<()> {
    if !(high.is_finite() && low.is_finite() && low <= high) {
        return Err(bad_input(OP, format!("thresholds high {high}, low {low}: need finite ones with low <= high")));
    }
    Ok(())
}

fn check_quality(q: &QualityMatrix) -> Result<()> {
    if q.rows() == 0 || q.cols() == 0 {
        return Err(bad_input(
            OP,
            format!(
                "a {} x {} quality matrix: matching needs ground truth and predictions; handle images without either before matching",
                q.rows(),
                q.cols()
            ),
        ));
    }
    if let Some(v) = q.values().iter().find(|v| !v.is_finite()) {
        return Err(bad_input(OP, format!("a quality of {v}; check the boxes for non-finite or empty ones")));
    }
    Ok(())
}

/// For each prediction (column), its best quality and the first ground truth (row) with it.
fn best_per_prediction(q: &QualityMatrix) -> (Vec<f32>, Vec<i64>) {
    let mut vals = q.row(0).to_vec();
    let mut matches = vec![0i64; q.cols()];
    for r in 1..q.rows() {
        for (c, &v) in q.row(r).iter().enumerate() {
            if v > vals[c] {
                vals[c] = v;
                matches[c] = r as i64;
            }
        }
    }
    (vals, matches)
}

/// The first column holding the largest value of `row` (non-empty).
fn first_argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (c, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = c;
        }
    }
    best
}

impl Matcher {
    /// A matcher with thresholds `high >= low`.
    pub fn new(high_threshold: f32, low_threshold: f32, allow_low_quality_matches: bool) -> Result<Self> {
        check_thresholds(high_threshold, low_threshold)?;
        Ok(Self { high_threshold, low_threshold, allow_low_quality_matches })
    }

    /// Faster R-CNN's RPN: positive from 0.7, background below 0.3, low-quality matches allowed.
    pub fn rpn() -> Self {
        Self { high_threshold: 0.7, low_threshold: 0.3, allow_low_quality_matches: true }
    }

    /// Faster R-CNN's box head: positive from 0.5, background below it.
    pub fn roi_heads() -> Self {
        Self { high_threshold: 0.5, low_threshold: 0.5, allow_low_quality_matches: false }
    }

    /// RetinaNet: positive from 0.5, background below 0.4, low-quality matches allowed.
    pub fn retinanet() -> Self {
        Self { high_threshold: 0.5, low_threshold: 0.4, allow_low_quality_matches: true }
    }

    /// The match of each prediction (column of `quality`, rows being ground truth). An empty
    /// matrix is refused, as torchvision refuses it.
    pub fn apply(&self, quality: &QualityMatrix) -> Result<Vec<i64>> {
        check_quality(quality)?;
        let (vals, all_matches) = best_per_prediction(quality);
        let mut matches: Vec<i64> = vals
            .iter()
            .zip(&all_matches)
            .map(|(&v, &m)| {
                if v < self.low_threshold {
                    BELOW_LOW_THRESHOLD
                } else if v < self.high_threshold {
                    BETWEEN_THRESHOLDS
                } else {
                    m
                }
            })
            .collect();
        if self.allow_low_quality_matches {
            // torchvision's set_low_quality_matches_: for each ground truth, every prediction
            // tying for its best quality gets back its own best match. A ground truth that
            // overlaps nothing has best quality 0, so this restores every prediction that
            // overlaps it by 0, as torchvision does.
            for r in 0..quality.rows() {
                let row = quality.row(r);
                let best = row[first_argmax(row)];
                for (c, &v) in row.iter().enumerate() {
                    if v == best {
                        matches[c] = all_matches[c];
                    }
                }
            }
        }
        Ok(matches)
    }

    /// Matches `predictions` to `gt` by IoU. Without ground truth every prediction is
    /// background (-1, as torchvision's SSD and RetinaNet set it); without predictions the
    /// result is empty.
    pub fn match_boxes(&self, gt: &[[f32; 4]], predictions: &[[f32; 4]]) -> Result<Vec<i64>> {
        match_with(gt, predictions, |q| self.apply(q))
    }
}

fn match_with(
    gt: &[[f32; 4]],
    predictions: &[[f32; 4]],
    apply: impl FnOnce(&QualityMatrix) -> Result<Vec<i64>>,
) -> Result<Vec<i64>> {
    check_ground_truth(OP, gt)?;
    check_finite(OP, "prediction", predictions)?;
    if predictions.is_empty() {
        return Ok(Vec::new());
    }
    if gt.is_empty() {
        return Ok(vec![BELOW_LOW_THRESHOLD; predictions.len()]);
    }
    apply(&iou_matrix(gt, predictions))
}

/// torchvision's `SSDMatcher`: a [`Matcher`] with one threshold and no low-quality matches, then
/// each ground truth, in order, forced onto its best prediction (the first, on ties), so that
/// every ground-truth box has at least one default box. Where two ground-truth boxes share a best
/// prediction the later one keeps it, as torch's sequential index assignment on the CPU leaves it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SsdMatcher {
    threshold: f32,
}

impl SsdMatcher {
    /// A matcher with IoU `threshold` (0.5 in SSD).
    pub fn new(threshold: f32) -> Result<Self> {
        check_thresholds(threshold, threshold)?;
        Ok(Self { threshold })
    }

    /// The match of each prediction (column of `quality`).
    pub fn apply(&self, quality: &QualityMatrix) -> Result<Vec<i64>> {
        let base =
            Matcher { high_threshold: self.threshold, low_threshold: self.threshold, allow_low_quality_matches: false };
        let mut matches = base.apply(quality)?;
        for r in 0..quality.rows() {
            matches[first_argmax(quality.row(r))] = r as i64;
        }
        Ok(matches)
    }

    /// Matches default boxes to `gt` by IoU; without ground truth all are background (-1).
    pub fn match_boxes(&self, gt: &[[f32; 4]], default_boxes: &[[f32; 4]]) -> Result<Vec<i64>> {
        match_with(gt, default_boxes, |q| self.apply(q))
    }
}

#[cfg(test)]
mod tests {
    use int8_core::rng::CounterRng;

    use super::*;

    fn matrix(rows: &[&[f32]]) -> QualityMatrix {
        QualityMatrix::new(rows.len(), rows[0].len(), rows.concat()).expect("matrix")
    }

    /// torchvision's matcher by its description, prediction by prediction: the first ground
    /// truth of highest quality; thresholds; then, with low-quality matches, the prediction keeps
    /// that ground truth if for some ground truth no prediction has a higher quality than it.
    fn reference(q: &[Vec<f32>], high: f32, low: f32, allow_low: bool) -> Vec<i64> {
        let cols = q[0].len();
        (0..cols)
            .map(|c| {
                let col: Vec<f32> = q.iter().map(|row| row[c]).collect();
                let best = col.iter().cloned().fold(f32::MIN, f32::max);
                let first = col.iter().position(|&v| v == best).unwrap_or(0) as i64;
                let is_someones_best = q.iter().any(|row| row.iter().all(|&v| v <= row[c]));
                if allow_low && is_someones_best {
                    first
                } else if best < low {
                    -1
                } else if best < high {
                    -2
                } else {
                    first
                }
            })
            .collect()
    }

    #[test]
    fn hand_examples() {
        let q = matrix(&[&[0.9, 0.5, 0.2, 0.0], &[0.1, 0.6, 0.35, 0.0]]);
        // Thresholds 0.7 / 0.3: 0.9 matches gt 0; 0.6 (gt 1) is between; 0.35 between; 0 below.
        assert_eq!(Matcher::new(0.7, 0.3, false).expect("m").apply(&q).expect("apply"), vec![0, -2, -2, -1]);
        // Low-quality: prediction 1 is gt 1's best (0.6) and keeps it; prediction 2 is nobody's
        // best and stays between.
        assert_eq!(Matcher::rpn().apply(&q).expect("apply"), vec![0, 1, -2, -1]);
        // Qualities equal to a threshold count as at least it.
        let q = matrix(&[&[0.5, 0.4, 0.39]]);
        assert_eq!(
            Matcher::retinanet().apply(&matrix(&[&[0.5, 0.4, 0.39, 0.45]])).expect("apply"),
            vec![0, -2, -1, -2]
        );
        assert_eq!(Matcher::new(0.5, 0.4, false).expect("m").apply(&q).expect("apply"), vec![0, -2, -1]);
        // A tie between two ground truths goes to the first.
        assert_eq!(Matcher::roi_heads().apply(&matrix(&[&[0.8], &[0.8]])).expect("apply"), vec![0]);
        // A ground truth overlapping nothing has best quality 0: with low-quality matches every
        // prediction at 0 with it gets its own best match back, here gt 0 at 0.1 (torchvision's
        // behaviour).
        let q = matrix(&[&[0.1, 0.0], &[0.0, 0.0]]);
        assert_eq!(Matcher::rpn().apply(&q).expect("apply"), vec![0, 0]);
        assert!(Matcher::new(0.3, 0.7, false).is_err());
    }

    #[test]
    fn random_matrices_match_the_reference() {
        let r = CounterRng::new(11);
        let mut k = 0;
        for case in 0..400 {
            let mut u = || {
                k += 1;
                r.uniform(k)
            };
            let (rows, cols) = (1 + (u() * 5.0) as usize, 1 + (u() * 12.0) as usize);
            // Values on a grid of tenths, so that ties and threshold hits are common.
            let q: Vec<Vec<f32>> =
                (0..rows).map(|_| (0..cols).map(|_| (u() * 11.0).floor() / 10.0).collect()).collect();
            let m = QualityMatrix::new(rows, cols, q.concat()).expect("matrix");
            for (high, low) in [(0.7, 0.3), (0.5, 0.5), (0.5, 0.4)] {
                for allow in [false, true] {
                    let got = Matcher::new(high, low, allow).expect("m").apply(&m).expect("apply");
                    assert_eq!(got, reference(&q, high, low, allow), "case {case}: {q:?} {high} {low} {allow}");
                }
            }
        }
    }

    #[test]
    fn ssd_matcher_forces_every_ground_truth_onto_its_best_box() {
        // gt 0 overlaps best at prediction 2 (0.3, under 0.5) and is forced there; prediction 0
        // matches gt 1 at 0.6 on its own; gt 1's best is prediction 0 too.
        let q = matrix(&[&[0.1, 0.0, 0.3], &[0.6, 0.2, 0.0]]);
        assert_eq!(SsdMatcher::new(0.5).expect("m").apply(&q).expect("apply"), vec![1, -1, 0]);
        // Two ground truths with the same best prediction: the later keeps it.
        let q = matrix(&[&[0.4, 0.1], &[0.3, 0.2]]);
        assert_eq!(SsdMatcher::new(0.5).expect("m").apply(&q).expect("apply"), vec![1, -1]);
    }

    #[test]
    fn boxes_are_matched_by_iou_and_bad_input_refused() {
        let gt = [[0.0, 0.0, 10.0, 10.0]];
        let anchors = [[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]];
        // IoUs 1, 1/3, 0.
        assert_eq!(Matcher::rpn().match_boxes(&gt, &anchors).expect("match"), vec![0, -2, -1]);
        assert_eq!(SsdMatcher::new(0.5).expect("m").match_boxes(&[], &anchors).expect("match"), vec![-1; 3]);
        assert!(Matcher::rpn().match_boxes(&gt, &[]).expect("match").is_empty());
        assert!(Matcher::rpn().match_boxes(&[[0.0, 0.0, 0.0, 10.0]], &anchors).is_err());
        assert!(Matcher::rpn().match_boxes(&gt, &[[f32::NAN, 0.0, 1.0, 1.0]]).is_err());
        assert!(Matcher::rpn().apply(&QualityMatrix::new(0, 3, vec![]).expect("m")).is_err());
        assert!(Matcher::rpn().apply(&matrix(&[&[f32::NAN]])).is_err());
    }
}
