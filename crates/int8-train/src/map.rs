//! Detection evaluation: Pascal VOC average precision per class (Everingham et al., IJCV 2010, as
//! the devkit's `VOCevaldet` and py-faster-rcnn's `voc_eval.py` compute it) and COCO's AP over
//! IoU 0.5:0.95 (Lin et al., ECCV 2014, as pycocotools' `COCOeval` computes it for boxes), each
//! with the mean over the classes that have ground truth.
//!
//! Boxes are `[x1, y1, x2, y2]` in pixels and are evaluated in `f64`, with the one IoU formula of
//! `int8_nn::detection::boxes`. Both evaluations measure boxes in continuous coordinates (a side
//! is `x2 - x1`), as pycocotools and torchvision do. The VOC devkit measured inclusive pixels (a
//! side is `x2 - x1 + 1`); [`PixelConvention::PlusOne`] gives its numbers.
//!
//! A `difficult` ground-truth box is neither counted nor penalised: in VOC a detection whose best
//! box is difficult is ignored (the devkit's rule); in COCO a difficult box is an ignored one, as
//! `COCOeval` ignores a box outside the area range (a detection matched to it is ignored, regular
//! boxes are preferred to it, and it takes one detection only). COCO's crowd boxes and area ranges
//! other than "all" are not implemented; at most 100 detections per image and class count, as
//! `maxDets = 100`.

use std::collections::{BTreeMap, BTreeSet};

use int8_nn::detection::boxes::iou_with_offset;

use crate::{Result, TrainError};

/// A ground-truth box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GtBox {
    /// `[x1, y1, x2, y2]` in pixels.
    pub bbox: [f32; 4],
    /// Its class.
    pub class: u32,
    /// Whether it is marked difficult (neither counted nor penalised).
    pub difficult: bool,
}

/// A detection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetBox {
    /// `[x1, y1, x2, y2]` in pixels.
    pub bbox: [f32; 4],
    /// Its class.
    pub class: u32,
    /// Its confidence; higher is better.
    pub score: f32,
}

/// One image's ground truth and detections.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageEval {
    /// The ground-truth boxes.
    pub ground_truth: Vec<GtBox>,
    /// The detections, in any order.
    pub detections: Vec<DetBox>,
}

/// How VOC turns a precision-recall curve into one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// VOC2007's: the mean of the best precision at recall at least 0, 0.1, ..., 1.
    ElevenPoint,
    /// VOC2010 on: the area under the precision envelope at every recall reached.
    AllPoint,
}

/// How a box's sides are measured for the IoU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelConvention {
    /// `x2 - x1`: continuous coordinates (pycocotools, torchvision).
    Continuous,
    /// `x2 - x1 + 1`: inclusive pixel indices (the VOC devkit).
    PlusOne,
}

/// The settings of a VOC evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VocParams {
    /// A detection is a true positive only if its IoU with a box exceeds this (strictly).
    pub iou_threshold: f64,
    /// The interpolation of the precision-recall curve.
    pub interpolation: Interpolation,
    /// How sides are measured.
    pub convention: PixelConvention,
}

impl Default for VocParams {
    /// IoU 0.5, all-point interpolation, continuous coordinates.
    fn default() -> Self {
        Self { iou_threshold: 0.5, interpolation: Interpolation::AllPoint, convention: PixelConvention::Continuous }
    }
}

/// Average precision per class and its mean.
#[derive(Debug, Clone, PartialEq)]
pub struct ApReport {
    /// AP of each class that has a ground-truth box that is not difficult.
    pub per_class: BTreeMap<u32, f64>,
    /// The mean over those classes.
    pub mean: f64,
}

/// COCO's numbers for one class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CocoClassAp {
    /// AP averaged over IoU 0.50, 0.55, ..., 0.95.
    pub ap: f64,
    /// AP at IoU 0.5.
    pub ap50: f64,
    /// AP at IoU 0.75.
    pub ap75: f64,
}

/// COCO's AP per class and the means over the classes with ground truth: `map` is COCOeval's
/// first statistic, `map50` and `map75` its second and third.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoReport {
    /// The numbers of each class that has a ground-truth box that is not difficult.
    pub per_class: BTreeMap<u32, CocoClassAp>,
    /// Mean AP@[.5:.95].
    pub map: f64,
    /// Mean AP@0.5.
    pub map50: f64,
    /// Mean AP@0.75.
    pub map75: f64,
}

/// Detections per image and class that COCO counts (`maxDets`).
pub const COCO_MAX_DETECTIONS: usize = 100;

fn bad(why: String) -> TrainError {
    TrainError::Evaluation(why)
}

fn check_box(image: usize, what: &str, b: &[f32; 4]) -> Result<()> {
    if b.iter().any(|v| !v.is_finite()) || b[2] < b[0] || b[3] < b[1] {
        return Err(bad(format!(
            "image {image}: {what} {b:?} is not a finite box with x2 >= x1 and y2 >= y1; fix the data or the model's output"
        )));
    }
    Ok(())
}

fn check(images: &[ImageEval]) -> Result<BTreeSet<u32>> {
    for (i, im) in images.iter().enumerate() {
        im.ground_truth.iter().try_for_each(|g| check_box(i, "a ground-truth box", &g.bbox))?;
        for d in &im.detections {
            check_box(i, "a detection", &d.bbox)?;
            if !d.score.is_finite() {
                return Err(bad(format!("image {i}: a detection scores {}; check the model's outputs", d.score)));
            }
        }
    }
    let classes: BTreeSet<u32> =
        images.iter().flat_map(|im| im.ground_truth.iter().filter(|g| !g.difficult).map(|g| g.class)).collect();
    if classes.is_empty() {
        return Err(bad(
            "no image has a ground-truth box that is not difficult; evaluate on images with ground truth".into()
        ));
    }
    Ok(classes)
}

fn wide(b: &[f32; 4]) -> [f64; 4] {
    b.map(f64::from)
}

/// The indices of `scores` from highest to lowest, equal scores in their order (a stable sort:
/// numpy's mergesort in pycocotools).
fn by_score(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(std::cmp::Ordering::Equal));
    order
}

fn mean(values: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = values.into_iter().fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n as f64
}

/// Pascal VOC AP of every class with ground truth, as `voc_eval.py`: a class's detections over
/// all images by descending score (equal scores in image order, then in their order within the
/// image); each is a true positive if its IoU with its best box of the class exceeds the threshold,
/// that box is not difficult and was not taken by a better detection; ignored if the box is
/// difficult; a false positive otherwise.
pub fn voc_ap(images: &[ImageEval], params: &VocParams) -> Result<ApReport> {
    let classes = check(images)?;
    let per_class: BTreeMap<u32, f64> = classes
        .iter()
        .map(|&c| {
            let (recall, precision) = voc_curve(images, c, params);
            (c, interpolate(&recall, &precision, params.interpolation))
        })
        .collect();
    let mean = mean(per_class.values().copied());
    Ok(ApReport { per_class, mean })
}

/// Recall and precision after each of `class`'s detections, by descending score.
fn voc_curve(images: &[ImageEval], class: u32, params: &VocParams) -> (Vec<f64>, Vec<f64>) {
    let offset = match params.convention {
        PixelConvention::Continuous => 0.0,
        PixelConvention::PlusOne => 1.0,
    };
    let gts: Vec<Vec<&GtBox>> =
        images.iter().map(|im| im.ground_truth.iter().filter(|g| g.class == class).collect()).collect();
    let npos = gts.iter().flatten().filter(|g| !g.difficult).count() as f64;
    let dets: Vec<(usize, &DetBox)> = images
        .iter()
        .enumerate()
        .flat_map(|(i, im)| im.detections.iter().filter(|d| d.class == class).map(move |d| (i, d)))
        .collect();
    let order = by_score(&dets.iter().map(|(_, d)| d.score).collect::<Vec<_>>());
    let mut taken: Vec<Vec<bool>> = gts.iter().map(|g| vec![false; g.len()]).collect();
    let (mut tp, mut fp) = (0.0, 0.0);
    let (mut recall, mut precision) = (Vec::with_capacity(order.len()), Vec::with_capacity(order.len()));
    for k in order {
        let (image, det) = dets[k];
        // The first box of highest IoU (numpy's argmax).
        let mut best: Option<(usize, f64)> = None;
        for (j, g) in gts[image].iter().enumerate() {
            let o = iou_with_offset(&wide(&det.bbox), &wide(&g.bbox), offset);
            if best.is_none_or(|(_, b)| o > b) {
                best = Some((j, o));
            }
        }
        match best {
            Some((j, o)) if o > params.iou_threshold => {
                if !gts[image][j].difficult {
                    if taken[image][j] {
                        fp += 1.0;
                    } else {
                        taken[image][j] = true;
                        tp += 1.0;
                    }
                }
            }
            _ => fp += 1.0,
        }
        recall.push(tp / npos);
        precision.push(tp / f64::max(tp + fp, f64::EPSILON));
    }
    (recall, precision)
}

/// `voc_ap` of `voc_eval.py`.
fn interpolate(recall: &[f64], precision: &[f64], interpolation: Interpolation) -> f64 {
    match interpolation {
        Interpolation::ElevenPoint => {
            let mut ap = 0.0;
            for t in 0..11 {
                // numpy's arange(0, 1.1, 0.1) gives i * 0.1 (0.30000000000000004, ...).
                let t = f64::from(t) * 0.1;
                let p = recall.iter().zip(precision).filter(|(r, _)| **r >= t).map(|(_, p)| *p).fold(0.0, f64::max);
                ap += p / 11.0;
            }
            ap
        }
        Interpolation::AllPoint => {
            let mrec: Vec<f64> = [0.0].into_iter().chain(recall.iter().copied()).chain([1.0]).collect();
            let mut mpre: Vec<f64> = [0.0].into_iter().chain(precision.iter().copied()).chain([0.0]).collect();
            for i in (1..mpre.len()).rev() {
                mpre[i - 1] = mpre[i - 1].max(mpre[i]);
            }
            (0..mrec.len() - 1).filter(|&i| mrec[i + 1] != mrec[i]).map(|i| (mrec[i + 1] - mrec[i]) * mpre[i + 1]).sum()
        }
    }
}

/// COCOeval's IoU thresholds, `np.linspace(.5, .95, 10)`: `i * step + 0.5`, the last exactly 0.95.
fn iou_thresholds() -> [f64; 10] {
    let step = (0.95 - 0.5) / 9.0;
    let mut t: [f64; 10] = std::array::from_fn(|i| i as f64 * step + 0.5);
    t[9] = 0.95;
    t
}

/// COCOeval's recall thresholds, `np.linspace(0, 1, 101)`.
fn recall_thresholds() -> [f64; 101] {
    let mut r: [f64; 101] = std::array::from_fn(|i| i as f64 * 0.01);
    r[100] = 1.0;
    r
}

/// One image's detections of one class as `COCOeval.evaluateImg` leaves them.
struct ImageMatches {
    /// The scores of the counted detections, best first.
    scores: Vec<f32>,
    /// Per IoU threshold, per detection: matched to a box.
    matched: Vec<Vec<bool>>,
    /// Per IoU threshold, per detection: matched to an ignored (difficult) box.
    ignored: Vec<Vec<bool>>,
    /// Ground-truth boxes that count (not difficult).
    counted: usize,
}

/// `evaluateImg` for one image and class: detections best first (at most 100), boxes regular
/// before ignored; per threshold, each detection takes the free box of highest IoU at least the
/// threshold (later boxes win ties), preferring regular boxes: once it holds a regular one it does
/// not look at ignored ones.
fn coco_image(gts: &[&GtBox], dets: &[&DetBox], thresholds: &[f64]) -> ImageMatches {
    let order = by_score(&dets.iter().map(|d| d.score).collect::<Vec<_>>());
    let dets: Vec<&DetBox> = order.into_iter().take(COCO_MAX_DETECTIONS).map(|k| dets[k]).collect();
    let mut gts: Vec<&GtBox> = gts.to_vec();
    gts.sort_by_key(|g| g.difficult);
    let ious: Vec<Vec<f64>> = dets
        .iter()
        .map(|d| gts.iter().map(|g| iou_with_offset(&wide(&d.bbox), &wide(&g.bbox), 0.0)).collect())
        .collect();
    let mut matched = vec![vec![false; dets.len()]; thresholds.len()];
    let mut ignored = vec![vec![false; dets.len()]; thresholds.len()];
    for (t, &threshold) in thresholds.iter().enumerate() {
        let mut taken = vec![false; gts.len()];
        for d in 0..dets.len() {
            let mut best_iou = threshold.min(1.0 - 1e-10);
            let mut m: Option<usize> = None;
            for g in 0..gts.len() {
                if taken[g] {
                    continue;
                }
                if m.is_some_and(|m| !gts[m].difficult) && gts[g].difficult {
                    break;
                }
                if ious[d][g] < best_iou {
                    continue;
                }
                best_iou = ious[d][g];
                m = Some(g);
            }
            if let Some(m) = m {
                ignored[t][d] = gts[m].difficult;
                matched[t][d] = true;
                taken[m] = true;
            }
        }
    }
    ImageMatches {
        scores: dets.iter().map(|d| d.score).collect(),
        matched,
        ignored,
        counted: gts.iter().filter(|g| !g.difficult).count(),
    }
}

/// `COCOeval.accumulate` for one class: per IoU threshold, the interpolated precision at the 101
/// recall thresholds.
fn coco_precision(results: &[ImageMatches], thresholds: usize) -> Vec<[f64; 101]> {
    let npig: usize = results.iter().map(|r| r.counted).sum();
    let scores: Vec<f32> = results.iter().flat_map(|r| r.scores.iter().copied()).collect();
    let order = by_score(&scores);
    let recall_thresholds = recall_thresholds();
    (0..thresholds)
        .map(|t| {
            let matched: Vec<bool> = results.iter().flat_map(|r| r.matched[t].iter().copied()).collect();
            let ignored: Vec<bool> = results.iter().flat_map(|r| r.ignored[t].iter().copied()).collect();
            let (mut tp, mut fp) = (0.0f64, 0.0f64);
            let mut recall = Vec::with_capacity(order.len());
            let mut precision = Vec::with_capacity(order.len());
            for &k in &order {
                if !ignored[k] {
                    if matched[k] {
                        tp += 1.0;
                    } else {
                        fp += 1.0;
                    }
                }
                recall.push(tp / npig as f64);
                // np.spacing(1): the gap from 1 to the next double.
                precision.push(tp / (fp + tp + f64::EPSILON));
            }
            for i in (1..precision.len()).rev() {
                if precision[i] > precision[i - 1] {
                    precision[i - 1] = precision[i];
                }
            }
            // np.searchsorted(recall, thresholds, side="left"); past the end the precision is 0.
            recall_thresholds.map(|r| {
                let i = recall.partition_point(|&x| x < r);
                precision.get(i).copied().unwrap_or(0.0)
            })
        })
        .collect()
}

/// COCO's AP of every class with ground truth, as pycocotools' `COCOeval` with `iouType="bbox"`,
/// area range "all" and `maxDets` 100: for each IoU threshold 0.50, 0.55, ..., 0.95 the precision
/// interpolated at 101 recall points, averaged; per image, detections are matched greedily by
/// descending score (equal scores in their order within the image), and pooled over images by
/// descending score (equal scores in image order).
pub fn coco_map(images: &[ImageEval]) -> Result<CocoReport> {
    let classes = check(images)?;
    let thresholds = iou_thresholds();
    let mut per_class = BTreeMap::new();
    for &c in &classes {
        let results: Vec<ImageMatches> = images
            .iter()
            .map(|im| {
                let gts: Vec<&GtBox> = im.ground_truth.iter().filter(|g| g.class == c).collect();
                let dets: Vec<&DetBox> = im.detections.iter().filter(|d| d.class == c).collect();
                coco_image(&gts, &dets, &thresholds)
            })
            .collect();
        let precision = coco_precision(&results, thresholds.len());
        let ap_at = |t: usize| mean(precision[t].iter().copied());
        let ap = mean(precision.iter().flatten().copied());
        per_class.insert(c, CocoClassAp { ap, ap50: ap_at(0), ap75: ap_at(5) });
    }
    Ok(CocoReport {
        map: mean(per_class.values().map(|a| a.ap)),
        map50: mean(per_class.values().map(|a| a.ap50)),
        map75: mean(per_class.values().map(|a| a.ap75)),
        per_class,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(bbox: [f32; 4], difficult: bool) -> GtBox {
        GtBox { bbox, class: 1, difficult }
    }

    fn det(bbox: [f32; 4], score: f32) -> DetBox {
        DetBox { bbox, class: 1, score }
    }

    #[test]
    fn thresholds_are_numpys() {
        let t = iou_thresholds();
        assert_eq!((t[0], t[9]), (0.5, 0.95));
        assert!((t[5] - 0.75).abs() < 1e-15);
        let r = recall_thresholds();
        assert_eq!((r[0], r[100]), (0.0, 1.0));
        assert_eq!(r[3], 3.0 * 0.01);
    }

    #[test]
    fn hand_computed_voc_and_coco() {
        // Two boxes; three detections: a hit on box A (0.9), a duplicate of it (0.8), a miss
        // (0.7). Box B is never found. Recall 1/2 at precision 1, then precision 1/2 and 1/3.
        let a = [0.0, 0.0, 10.0, 10.0];
        let b = [20.0, 20.0, 30.0, 30.0];
        let images = [ImageEval {
            ground_truth: vec![gt(a, false), gt(b, false)],
            detections: vec![det(a, 0.9), det([0.0, 0.0, 10.0, 9.0], 0.8), det([50.0, 50.0, 60.0, 60.0], 0.7)],
        }];
        // All-point: the envelope is 1 up to recall 1/2, then 0: AP = 1/2.
        let r = voc_ap(&images, &VocParams::default()).expect("voc");
        assert!((r.mean - 0.5).abs() < 1e-12, "{r:?}");
        // 11-point: precision 1 at recall >= 0, 0.1, ..., 0.5 (six points), 0 after: 6/11.
        let p = VocParams { interpolation: Interpolation::ElevenPoint, ..VocParams::default() };
        assert!((voc_ap(&images, &p).expect("voc").mean - 6.0 / 11.0).abs() < 1e-12);
        // COCO at every threshold: recall thresholds 0..0.5 (51 of 101) at precision 1.
        let c = coco_map(&images).expect("coco");
        assert!((c.map50 - 51.0 / 101.0).abs() < 1e-12, "{c:?}");
        assert!((c.map - 51.0 / 101.0).abs() < 1e-12, "the duplicate at IoU 0.9 is a second miss everywhere");
    }

    #[test]
    fn difficult_boxes_are_ignored() {
        // A detection on a difficult box changes nothing; without it the AP is the same.
        let a = [0.0, 0.0, 10.0, 10.0];
        let hard = [20.0, 20.0, 30.0, 30.0];
        let with = [ImageEval {
            ground_truth: vec![gt(a, false), gt(hard, true)],
            detections: vec![det(hard, 0.95), det(a, 0.9)],
        }];
        let without = [ImageEval { ground_truth: vec![gt(a, false), gt(hard, true)], detections: vec![det(a, 0.9)] }];
        for p in [VocParams::default(), VocParams { interpolation: Interpolation::ElevenPoint, ..VocParams::default() }]
        {
            assert!((voc_ap(&with, &p).expect("voc").mean - 1.0).abs() < 1e-12);
            assert!((voc_ap(&without, &p).expect("voc").mean - 1.0).abs() < 1e-12);
        }
        assert!((coco_map(&with).expect("coco").map - 1.0).abs() < 1e-12);
        // Only difficult ground truth: nothing to evaluate.
        let only_hard = [ImageEval { ground_truth: vec![gt(hard, true)], detections: vec![] }];
        assert!(voc_ap(&only_hard, &VocParams::default()).is_err());
    }

    #[test]
    fn plus_one_changes_the_iou() {
        // [0, 0, 1, 1] against [0, 0, 2, 1]: continuous IoU 1/2 (not above 0.5), inclusive
        // pixels 4 / 6 (above).
        let images = [ImageEval {
            ground_truth: vec![gt([0.0, 0.0, 2.0, 1.0], false)],
            detections: vec![det([0.0, 0.0, 1.0, 1.0], 1.0)],
        }];
        assert_eq!(voc_ap(&images, &VocParams::default()).expect("voc").mean, 0.0);
        let p = VocParams { convention: PixelConvention::PlusOne, ..VocParams::default() };
        assert_eq!(voc_ap(&images, &p).expect("voc").mean, 1.0);
    }

    #[test]
    fn bad_input_is_refused() {
        let bad_box = [ImageEval { ground_truth: vec![gt([0.0, 0.0, f32::NAN, 1.0], false)], detections: vec![] }];
        assert!(coco_map(&bad_box).is_err());
        let bad_score = [ImageEval {
            ground_truth: vec![gt([0.0, 0.0, 1.0, 1.0], false)],
            detections: vec![det([0.0, 0.0, 1.0, 1.0], f32::INFINITY)],
        }];
        assert!(voc_ap(&bad_score, &VocParams::default()).is_err());
        let inverted = [ImageEval { ground_truth: vec![gt([2.0, 0.0, 1.0, 1.0], false)], detections: vec![] }];
        assert!(coco_map(&inverted).is_err());
        assert!(coco_map(&[]).is_err());
    }
}
