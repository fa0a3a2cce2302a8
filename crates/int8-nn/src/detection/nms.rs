//! Greedy non-maximum suppression as torchvision's CPU kernel (`torchvision/csrc/ops/cpu/
//! nms_kernel.cpp`) and `batched_nms` (`torchvision/ops/boxes.py`).
//!
//! Boxes are visited by descending score; a visited box that survives is kept and suppresses
//! every later box whose IoU with it is strictly greater than the threshold. The order is a stable
//! sort, as the kernel's `scores.sort(stable=true, descending=true)`: equal scores are visited in
//! index order, so of two identical boxes with equal scores the lower index is kept. The IoU is
//! the `f32` one of [`super::boxes::iou`] and the threshold comparison is in `f64`, as the kernel
//! compares its `float` overlap with a `double` threshold.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::boxes::{check_finite, check_scores, iou};
use super::same_len;
use crate::Result;

/// Indices of `scores` from highest to lowest, equal scores in index order (a stable sort).
pub fn descending_order(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // NaN compares equal here; callers refuse non-finite scores first.
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap_or(Ordering::Equal));
    order
}

/// The greedy pass over `order` (indices into `boxes`, highest priority first): the kept indices
/// in visiting order.
fn greedy(boxes: &[[f32; 4]], order: &[usize], iou_threshold: f64) -> Vec<usize> {
    let mut suppressed = vec![false; order.len()];
    let mut keep = Vec::new();
    for (a, &i) in order.iter().enumerate() {
        if suppressed[a] {
            continue;
        }
        keep.push(i);
        for (b, &j) in order.iter().enumerate().skip(a + 1) {
            if !suppressed[b] && f64::from(iou(&boxes[i], &boxes[j])) > iou_threshold {
                suppressed[b] = true;
            }
        }
    }
    keep
}

fn check(op: &str, boxes: &[[f32; 4]], scores: &[f32]) -> Result<()> {
    same_len(op, ("boxes", boxes.len()), ("scores", scores.len()))?;
    check_finite(op, "box", boxes)?;
    check_scores(op, scores)
}

/// Non-maximum suppression (torchvision's `nms`): the indices of the kept boxes, by descending
/// score (equal scores in index order).
pub fn nms(boxes: &[[f32; 4]], scores: &[f32], iou_threshold: f64) -> Result<Vec<usize>> {
    check("nms", boxes, scores)?;
    Ok(greedy(boxes, &descending_order(scores), iou_threshold))
}

/// Non-maximum suppression within each class (torchvision's `batched_nms`): boxes of different
/// classes never suppress each other. The kept indices come by descending score, equal scores in
/// index order, which is the order of torchvision's coordinate-offset variant.
///
/// It runs one [`nms`] per class rather than offsetting the boxes by class: the offset trick
/// computes IoUs on shifted `f32` coordinates, which round differently when the offsets are
/// large, while a per-class pass is exactly the per-class suppression both variants define.
pub fn batched_nms<C: Copy + Ord>(
    boxes: &[[f32; 4]],
    scores: &[f32],
    classes: &[C],
    iou_threshold: f64,
) -> Result<Vec<usize>> {
    check("batched nms", boxes, scores)?;
    same_len("batched nms", ("boxes", boxes.len()), ("classes", classes.len()))?;
    let order = descending_order(scores);
    let mut per_class: BTreeMap<C, Vec<usize>> = BTreeMap::new();
    for &i in &order {
        per_class.entry(classes[i]).or_default().push(i);
    }
    let mut kept = vec![false; boxes.len()];
    for members in per_class.values() {
        for i in greedy(boxes, members, iou_threshold) {
            kept[i] = true;
        }
    }
    Ok(order.into_iter().filter(|&i| kept[i]).collect())
}

#[cfg(test)]
mod tests {
    use int8_core::rng::CounterRng;

    use super::*;

    fn iou_f64(a: &[f32; 4], b: &[f32; 4]) -> f64 {
        let f = |v: f32| f64::from(v);
        let iw = (f(a[2]).min(f(b[2])) - f(a[0]).max(f(b[0]))).max(0.0);
        let ih = (f(a[3]).min(f(b[3])) - f(a[1]).max(f(b[1]))).max(0.0);
        let inter = iw * ih;
        if inter == 0.0 {
            return 0.0;
        }
        inter / ((f(a[2]) - f(a[0])) * (f(a[3]) - f(a[1])) + (f(b[2]) - f(b[0])) * (f(b[3]) - f(b[1])) - inter)
    }

    /// NMS by its definition, in O(n^2) per pick: take the best remaining box (highest score,
    /// then lowest index), keep it, drop every remaining box of its class that overlaps it by
    /// more than the threshold; repeat.
    fn reference(boxes: &[[f32; 4]], scores: &[f32], classes: &[u8], thr: f64) -> Vec<usize> {
        let mut remaining: Vec<usize> = (0..boxes.len()).collect();
        let mut keep = Vec::new();
        while !remaining.is_empty() {
            let mut best = remaining[0];
            for &i in &remaining {
                if scores[i] > scores[best] || (scores[i] == scores[best] && i < best) {
                    best = i;
                }
            }
            keep.push(best);
            remaining
                .retain(|&i| i != best && !(classes[i] == classes[best] && iou_f64(&boxes[i], &boxes[best]) > thr));
        }
        keep
    }

    /// A random case: boxes clustered around a few centres so that many overlap, scores on a
    /// coarse grid so that some tie, up to three classes.
    fn case(seed: u64) -> (Vec<[f32; 4]>, Vec<f32>, Vec<u8>, f64) {
        let r = CounterRng::new(seed);
        let mut k = 0u64;
        let mut u = || {
            k += 1;
            r.uniform_f64(k)
        };
        let n = (u() * 60.0) as usize;
        let centres: Vec<(f64, f64)> = (0..3).map(|_| (u() * 50.0, u() * 50.0)).collect();
        let mut boxes = Vec::new();
        let mut scores = Vec::new();
        let mut classes = Vec::new();
        for _ in 0..n {
            let (cx, cy) = centres[(u() * 3.0) as usize % 3];
            let (x, y) = (cx + u() * 10.0, cy + u() * 10.0);
            let (w, h) = (5.0 + u() * 20.0, 5.0 + u() * 20.0);
            boxes.push([x as f32, y as f32, (x + w) as f32, (y + h) as f32]);
            scores.push(((u() * 8.0).floor() / 8.0) as f32);
            classes.push((u() * 3.0) as u8 % 3);
        }
        (boxes, scores, classes, 0.1 + u() * 0.8)
    }

    #[test]
    fn hand_examples() {
        // B overlaps A by 0.6 and goes; C overlaps only B, which is gone, so C stays.
        let boxes = [[0.0, 0.0, 10.0, 10.0], [2.5, 0.0, 12.5, 10.0], [11.0, 0.0, 21.0, 10.0]];
        assert!((iou(&boxes[0], &boxes[1]) - 0.6).abs() < 1e-6);
        assert_eq!(nms(&boxes, &[0.9, 0.8, 0.7], 0.5).expect("nms"), vec![0, 2]);
        // Output by score, not by index: C first, then A, which suppresses B.
        assert_eq!(nms(&boxes, &[0.7, 0.1, 0.9], 0.5).expect("nms"), vec![2, 0]);
        // Equal scores: the lower index wins, as torch's stable sort orders them.
        let twins = [[0.0, 0.0, 1.0, 1.0]; 3];
        assert_eq!(nms(&twins, &[0.5, 0.5, 0.5], 0.5).expect("nms"), vec![0]);
        // IoU exactly at the threshold does not suppress (strictly greater does): 2 / 4.
        let half = [[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0]];
        assert_eq!(nms(&half, &[0.9, 0.8], 0.5).expect("nms"), vec![0, 1]);
        assert_eq!(nms(&half, &[0.9, 0.8], 0.49).expect("nms"), vec![0]);
        // Per class: the same pair in different classes both stay.
        assert_eq!(batched_nms(&half, &[0.9, 0.8], &[1, 2], 0.3).expect("batched"), vec![0, 1]);
        assert_eq!(batched_nms(&half, &[0.8, 0.9], &[1, 1], 0.3).expect("batched"), vec![1]);
        assert!(nms(&[], &[], 0.5).expect("empty").is_empty());
    }

    #[test]
    fn random_cases_match_the_naive_definition() {
        for seed in 0..600 {
            let (boxes, scores, classes, thr) = case(seed);
            let single = vec![0u8; boxes.len()];
            assert_eq!(
                nms(&boxes, &scores, thr).expect("nms"),
                reference(&boxes, &scores, &single, thr),
                "seed {seed}"
            );
            let got = batched_nms(&boxes, &scores, &classes, thr).expect("batched");
            assert_eq!(got, reference(&boxes, &scores, &classes, thr), "seed {seed}");
            // Properties: by descending score; no two kept boxes of a class overlap by more
            // than the threshold; every dropped box overlaps a kept one of its class that
            // comes before it.
            assert!(got.windows(2).all(|w| scores[w[0]] >= scores[w[1]]));
            for (a, &i) in got.iter().enumerate() {
                for &j in &got[a + 1..] {
                    assert!(classes[i] != classes[j] || f64::from(iou(&boxes[i], &boxes[j])) <= thr);
                }
            }
            let position = |i: usize| descending_order(&scores).iter().position(|&o| o == i);
            for i in (0..boxes.len()).filter(|i| !got.contains(i)) {
                assert!(
                    got.iter().any(|&k| classes[k] == classes[i]
                        && position(k) < position(i)
                        && f64::from(iou(&boxes[k], &boxes[i])) > thr),
                    "seed {seed}: box {i} dropped without a reason"
                );
            }
        }
    }

    #[test]
    fn bad_input_is_refused() {
        let b = [[0.0, 0.0, 1.0, 1.0]];
        assert!(nms(&b, &[], 0.5).is_err());
        assert!(nms(&b, &[f32::NAN], 0.5).is_err());
        assert!(nms(&[[0.0, 0.0, f32::INFINITY, 1.0]], &[1.0], 0.5).is_err());
        assert!(batched_nms(&b, &[1.0], &[0u8, 1], 0.5).is_err());
    }
}
