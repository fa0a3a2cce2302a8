//! The training-side selection of Faster R-CNN (Ren et al., NeurIPS 2015) as torchvision does it:
//! the positive/negative sampler (`BalancedPositiveNegativeSampler`, `_utils.py`), the RPN's
//! anchor targets and proposal selection (`RegionProposalNetwork.assign_targets_to_anchors` and
//! `filter_proposals`, `rpn.py`), and the box head's training samples
//! (`RoIHeads.select_training_samples`, `roi_heads.py`).
//!
//! Randomness comes from a [`CounterRng`] the caller gives: the same generator gives the same
//! sample, whatever thread runs it. torchvision draws with `torch.randperm`, so the sampled sets
//! have the same distribution but not the same values.

use int8_core::rng::CounterRng;

use super::boxes::{BoxCoder, check_finite, check_ground_truth, check_scores, clip_to_image, iou_matrix, remove_small};
use super::matching::{BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, Matcher};
use super::nms::{batched_nms, descending_order};
use super::{bad_input, same_len};
use crate::Result;

/// torchvision's `BalancedPositiveNegativeSampler`: per image, up to `batch_size_per_image`
/// elements, of which up to `floor(batch_size_per_image * positive_fraction)` positives (labels
/// >= 1), the rest negatives (labels 0); labels below 0 are never sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalancedSampler {
    batch_size_per_image: usize,
    positive_fraction: f64,
}

/// The elements a sampler chose, each list ascending (the order of torchvision's masks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sampled {
    /// Chosen positives.
    pub positives: Vec<usize>,
    /// Chosen negatives.
    pub negatives: Vec<usize>,
}

impl Sampled {
    /// Positives and negatives together, ascending (torchvision's `where(pos | neg)`).
    pub fn all(&self) -> Vec<usize> {
        let mut all = [self.positives.as_slice(), self.negatives.as_slice()].concat();
        all.sort_unstable();
        all
    }
}

/// Counter offset of the negatives' draws, so that they never reuse the positives' numbers.
const NEGATIVE_STREAM: u64 = 1 << 32;

/// `k` elements of `pool` drawn uniformly without replacement (a partial Fisher-Yates shuffle
/// on `rng`'s numbers from `base` on), ascending.
fn choose(pool: &[usize], k: usize, rng: &CounterRng, base: u64) -> Vec<usize> {
    let mut pool = pool.to_vec();
    for i in 0..k {
        let n = (pool.len() - i) as u128;
        // The top bits of a 64 x 64-bit product: uniform on 0..n up to a bias of n / 2^64.
        let j = i + ((u128::from(rng.bits(base + i as u64)) * n) >> 64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(k);
    pool.sort_unstable();
    pool
}

impl BalancedSampler {
    /// A sampler of `batch_size_per_image` elements with `positive_fraction` in `[0, 1]`.
    pub fn new(batch_size_per_image: usize, positive_fraction: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&positive_fraction) {
            return Err(bad_input("sampler", format!("positive fraction {positive_fraction}: give one in [0, 1]")));
        }
        Ok(Self { batch_size_per_image, positive_fraction })
    }

    /// The RPN's: 256 anchors per image, half positive at most.
    pub fn rpn() -> Self {
        Self { batch_size_per_image: 256, positive_fraction: 0.5 }
    }

    /// The Faster R-CNN box head's: 512 proposals per image, a quarter positive at most.
    pub fn roi_heads() -> Self {
        Self { batch_size_per_image: 512, positive_fraction: 0.25 }
    }

    /// The elements sampled from one image's `labels`, drawing from `rng`; give each image of
    /// each step its own generator (for example one seeded from the run's seed, the step and the
    /// image).
    pub fn sample(&self, labels: &[i64], rng: &CounterRng) -> Sampled {
        let positive: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] >= 1).collect();
        let negative: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == 0).collect();
        // Python's int(batch * fraction): the product in f64, truncated.
        let num_pos = ((self.batch_size_per_image as f64 * self.positive_fraction) as usize).min(positive.len());
        let num_neg = (self.batch_size_per_image - num_pos).min(negative.len());
        Sampled {
            positives: choose(&positive, num_pos, rng, 0),
            negatives: choose(&negative, num_neg, rng, NEGATIVE_STREAM),
        }
    }
}

/// The RPN's training targets for one image's anchors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnchorTargets {
    /// 1 for a positive anchor, 0 for background, -1 for one to ignore.
    pub labels: Vec<i64>,
    /// Each anchor's matched ground-truth box (the first box for background and ignored
    /// anchors, zeros when the image has none), to encode as its regression target.
    pub matched_gt_boxes: Vec<[f32; 4]>,
}

/// torchvision's `assign_targets_to_anchors` for one image: the anchors matched to `gt_boxes` by
/// `matcher` ([`Matcher::rpn`] in Faster R-CNN). Without ground truth every anchor is background.
pub fn rpn_anchor_targets(anchors: &[[f32; 4]], gt_boxes: &[[f32; 4]], matcher: &Matcher) -> Result<AnchorTargets> {
    let matches = matcher.match_boxes(gt_boxes, anchors)?;
    if gt_boxes.is_empty() {
        return Ok(AnchorTargets { labels: vec![0; anchors.len()], matched_gt_boxes: vec![[0.0; 4]; anchors.len()] });
    }
    let labels = matches
        .iter()
        .map(|&m| match m {
            BELOW_LOW_THRESHOLD => 0,
            BETWEEN_THRESHOLDS => -1,
            _ => 1,
        })
        .collect();
    let matched_gt_boxes = matches.iter().map(|&m| gt_boxes[m.max(0) as usize]).collect();
    Ok(AnchorTargets { labels, matched_gt_boxes })
}

/// How the RPN turns its decoded anchors into proposals (torchvision's `filter_proposals`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProposalConfig {
    /// Proposals kept per feature level before NMS, by objectness.
    pub pre_nms_top_n: usize,
    /// Proposals kept per image after NMS.
    pub post_nms_top_n: usize,
    /// NMS IoU threshold, applied per level.
    pub nms_threshold: f64,
    /// Proposals with an objectness probability below this are dropped.
    pub score_threshold: f32,
    /// Proposals with a side shorter than this (pixels) are dropped.
    pub min_size: f32,
}

impl ProposalConfig {
    /// `fasterrcnn_resnet50_fpn` in training: 2000 per level before NMS, 2000 after, NMS at 0.7,
    /// no score threshold, sides of at least 1e-3.
    pub fn faster_rcnn_training() -> Self {
        Self { pre_nms_top_n: 2000, post_nms_top_n: 2000, nms_threshold: 0.7, score_threshold: 0.0, min_size: 1e-3 }
    }

    /// `fasterrcnn_resnet50_fpn` in evaluation: 1000 before NMS and 1000 after.
    pub fn faster_rcnn_testing() -> Self {
        Self { pre_nms_top_n: 1000, post_nms_top_n: 1000, ..Self::faster_rcnn_training() }
    }
}

/// One image's proposals, best first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Proposals {
    /// The boxes, clipped to the image.
    pub boxes: Vec<[f32; 4]>,
    /// Their objectness probabilities.
    pub scores: Vec<f32>,
}

/// `1 / (1 + e^-x)` in `f32`.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// torchvision's `filter_proposals` for one image: `proposals` (the decoded anchors) and their
/// `objectness` logits, level after level with `anchors_per_level` of each, in an image of
/// `image_size` (height, width). Per level the `pre_nms_top_n` highest logits (equal ones in index
/// order; torch's `topk` leaves ties unspecified); then, in that order, boxes clipped to the
/// image, small ones and low scores dropped, NMS per level, the best `post_nms_top_n` kept.
pub fn select_proposals(
    proposals: &[[f32; 4]],
    objectness: &[f32],
    anchors_per_level: &[usize],
    image_size: (usize, usize),
    cfg: &ProposalConfig,
) -> Result<Proposals> {
    const OP: &str = "proposal selection";
    same_len(OP, ("proposals", proposals.len()), ("objectness logits", objectness.len()))?;
    same_len(OP, ("proposals", proposals.len()), ("anchors over the levels", anchors_per_level.iter().sum()))?;
    check_finite(OP, "proposal", proposals)?;
    check_scores(OP, objectness)?;
    let mut chosen = Vec::new();
    let mut offset = 0;
    for (level, &n) in anchors_per_level.iter().enumerate() {
        let order = descending_order(&objectness[offset..offset + n]);
        chosen.extend(order.into_iter().take(cfg.pre_nms_top_n).map(|i| (offset + i, level)));
        offset += n;
    }
    let boxes: Vec<[f32; 4]> = chosen.iter().map(|&(i, _)| clip_to_image(&proposals[i], image_size)).collect();
    let keep: Vec<usize> = remove_small(&boxes, cfg.min_size)
        .into_iter()
        .filter(|&k| sigmoid(objectness[chosen[k].0]) >= cfg.score_threshold)
        .collect();
    let boxes: Vec<[f32; 4]> = keep.iter().map(|&k| boxes[k]).collect();
    let scores: Vec<f32> = keep.iter().map(|&k| sigmoid(objectness[chosen[k].0])).collect();
    let levels: Vec<usize> = keep.iter().map(|&k| chosen[k].1).collect();
    let kept = batched_nms(&boxes, &scores, &levels, cfg.nms_threshold)?;
    let kept = &kept[..kept.len().min(cfg.post_nms_top_n)];
    Ok(Proposals { boxes: kept.iter().map(|&k| boxes[k]).collect(), scores: kept.iter().map(|&k| scores[k]).collect() })
}

/// How the box head picks its training proposals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoiSampling {
    /// Matches proposals to ground truth.
    pub matcher: Matcher,
    /// Chooses positives and negatives.
    pub sampler: BalancedSampler,
    /// Encodes the regression targets.
    pub box_coder: BoxCoder,
}

impl RoiSampling {
    /// `fasterrcnn_resnet50_fpn`'s: IoU 0.5 for both thresholds, 512 samples a quarter positive,
    /// box coder weights (10, 10, 5, 5).
    pub fn faster_rcnn() -> Self {
        Self {
            matcher: Matcher::roi_heads(),
            sampler: BalancedSampler::roi_heads(),
            box_coder: BoxCoder::new([10.0, 10.0, 5.0, 5.0]),
        }
    }
}

/// The box head's training samples of one image.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoiSamples {
    /// The sampled proposals (the ground-truth boxes themselves among the candidates).
    pub proposals: Vec<[f32; 4]>,
    /// Each one's matched ground-truth box (0 for background, or when there is none).
    pub matched_gt: Vec<usize>,
    /// Each one's class: the matched box's label for positives, 0 for background.
    pub labels: Vec<i64>,
    /// Each one's regression target: its matched ground-truth box encoded against it. Only the
    /// positives' are meaningful; for background proposals they describe the first ground-truth
    /// box (or an empty box, whose log-size is minus infinity, when the image has none), as
    /// torchvision's are.
    pub regression_targets: Vec<[f32; 4]>,
}

/// torchvision's `select_training_samples` for one image: the ground-truth boxes appended to
/// `proposals`, every candidate matched to the ground truth (labels from `gt_labels`, which must
/// be at least 1; 0 for background, -1 between the thresholds), a balanced sample drawn with
/// `rng`, and the regression targets encoded. Samples come in ascending candidate order.
pub fn select_training_samples(
    proposals: &[[f32; 4]],
    gt_boxes: &[[f32; 4]],
    gt_labels: &[i64],
    cfg: &RoiSampling,
    rng: &CounterRng,
) -> Result<RoiSamples> {
    const OP: &str = "roi training samples";
    same_len(OP, ("ground-truth boxes", gt_boxes.len()), ("labels", gt_labels.len()))?;
    check_ground_truth(OP, gt_boxes)?;
    check_finite(OP, "proposal", proposals)?;
    if let Some(l) = gt_labels.iter().find(|&&l| l < 1) {
        return Err(bad_input(OP, format!("ground-truth label {l}: classes start at 1 (0 is the background)")));
    }
    let candidates = [proposals, gt_boxes].concat();
    let (matched, labels): (Vec<usize>, Vec<i64>) = if gt_boxes.is_empty() {
        (vec![0; candidates.len()], vec![0; candidates.len()])
    } else {
        cfg.matcher
            .apply(&iou_matrix(gt_boxes, &candidates))?
            .into_iter()
            .map(|m| match m {
                BELOW_LOW_THRESHOLD => (0, 0),
                BETWEEN_THRESHOLDS => (0, -1),
                m => (m as usize, gt_labels[m as usize]),
            })
            .collect()
    };
    let sampled = cfg.sampler.sample(&labels, rng).all();
    let gt_of = |m: usize| gt_boxes.get(m).copied().unwrap_or([0.0; 4]);
    Ok(RoiSamples {
        proposals: sampled.iter().map(|&i| candidates[i]).collect(),
        matched_gt: sampled.iter().map(|&i| matched[i]).collect(),
        labels: sampled.iter().map(|&i| labels[i]).collect(),
        regression_targets: sampled.iter().map(|&i| cfg.box_coder.encode(&gt_of(matched[i]), &candidates[i])).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detection::boxes::iou;
    use crate::detection::random_box;

    #[test]
    fn sampler_counts_follow_torchvision() {
        let s = BalancedSampler::new(10, 0.3).expect("sampler");
        let r = CounterRng::new(1);
        // 10 * 0.3 = 3 positives at most, the rest negatives; -1 and -2 are never drawn.
        for (npos, nneg, nign) in [(0, 0, 5), (1, 20, 3), (5, 20, 0), (5, 2, 4), (50, 50, 0)] {
            let labels: Vec<i64> = std::iter::repeat_n(2, npos)
                .chain(std::iter::repeat_n(0, nneg))
                .chain(std::iter::repeat_n(-1, nign))
                .chain(std::iter::repeat_n(-2, nign))
                .collect();
            let got = s.sample(&labels, &r);
            let want_pos = npos.min(3);
            let want_neg = (10 - want_pos).min(nneg);
            assert_eq!((got.positives.len(), got.negatives.len()), (want_pos, want_neg));
            assert!(got.positives.iter().all(|&i| labels[i] >= 1));
            assert!(got.negatives.iter().all(|&i| labels[i] == 0));
            assert!(got.positives.windows(2).all(|w| w[0] < w[1]) && got.negatives.windows(2).all(|w| w[0] < w[1]));
            assert_eq!(got, s.sample(&labels, &r), "the same generator gives the same sample");
        }
        // int(512 * 0.25) = 128, int(256 * 0.5) = 128.
        let many = vec![1i64; 1000];
        assert_eq!(BalancedSampler::roi_heads().sample(&many, &r).positives.len(), 128);
        assert_eq!(BalancedSampler::rpn().sample(&many, &r).positives.len(), 128);
        assert!(BalancedSampler::new(4, 1.5).is_err());
    }

    #[test]
    fn sampler_draws_uniformly() {
        // 3 of 10 negatives per draw over 20,000 generators: each is chosen with probability
        // 0.3, so 6000 times, standard deviation sqrt(20000 * 0.3 * 0.7) = 65; allow 5 of them.
        // Pairs are chosen with probability 3/10 * 2/9 = 1/15.
        let s = BalancedSampler::new(3, 0.0).expect("sampler");
        let labels = vec![0i64; 10];
        let mut counts = [0usize; 10];
        let mut pair01 = 0;
        for seed in 0..20_000 {
            let got = s.sample(&labels, &CounterRng::new(seed));
            got.negatives.iter().for_each(|&i| counts[i] += 1);
            pair01 += usize::from(got.negatives.contains(&0) && got.negatives.contains(&1));
        }
        for c in counts {
            assert!((c as f64 - 6000.0).abs() < 5.0 * 65.0, "{counts:?}");
        }
        // 20000 / 15 = 1333, standard deviation 35.
        assert!((pair01 as f64 - 1333.3).abs() < 5.0 * 35.3, "{pair01}");
    }

    #[test]
    fn rpn_anchor_targets_label_by_iou() {
        let gt = [[0.0, 0.0, 10.0, 10.0]];
        // IoUs 1, 1/3 (between 0.3 and 0.7), 0.
        let anchors = [[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0]];
        let t = rpn_anchor_targets(&anchors, &gt, &Matcher::rpn()).expect("targets");
        assert_eq!(t.labels, vec![1, -1, 0]);
        assert_eq!(t.matched_gt_boxes, vec![gt[0]; 3]);
        let t = rpn_anchor_targets(&anchors, &[], &Matcher::rpn()).expect("targets");
        assert_eq!(t.labels, vec![0; 3]);
        assert_eq!(t.matched_gt_boxes, vec![[0.0; 4]; 3]);
    }

    /// `filter_proposals` written out plainly: per level a full sort of the logits (stable),
    /// the top ones, clipping by hand, the filters, then greedy NMS per level by its definition.
    fn proposals_reference(
        props: &[[f32; 4]],
        logits: &[f32],
        levels: &[usize],
        size: (usize, usize),
        cfg: &ProposalConfig,
    ) -> Vec<([f32; 4], f32)> {
        let mut cand: Vec<(usize, [f32; 4], f32)> = Vec::new();
        let mut start = 0;
        for (lvl, &n) in levels.iter().enumerate() {
            let mut idx: Vec<usize> = (start..start + n).collect();
            idx.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal));
            for &i in idx.iter().take(cfg.pre_nms_top_n) {
                let p = props[i];
                let (w, h) = (size.1 as f32, size.0 as f32);
                let b = [p[0].clamp(0.0, w), p[1].clamp(0.0, h), p[2].clamp(0.0, w), p[3].clamp(0.0, h)];
                let score = 1.0 / (1.0 + (-logits[i]).exp());
                if b[2] - b[0] >= cfg.min_size && b[3] - b[1] >= cfg.min_size && score >= cfg.score_threshold {
                    cand.push((lvl, b, score));
                }
            }
            start += n;
        }
        let mut out: Vec<(usize, [f32; 4], f32)> = Vec::new();
        let mut remaining: Vec<usize> = (0..cand.len()).collect();
        while let Some(&first) = remaining.first() {
            let best = remaining.iter().copied().fold(first, |b, i| if cand[i].2 > cand[b].2 { i } else { b });
            out.push(cand[best]);
            remaining.retain(|&i| {
                i != best
                    && !(cand[i].0 == cand[best].0 && f64::from(iou(&cand[i].1, &cand[best].1)) > cfg.nms_threshold)
            });
        }
        out.into_iter().take(cfg.post_nms_top_n).map(|(_, b, s)| (b, s)).collect()
    }

    #[test]
    fn proposal_selection_matches_the_plain_reference() {
        for seed in 0..40 {
            let r = CounterRng::new(100 + seed);
            let levels = [30usize, 12, 5];
            let n: usize = levels.iter().sum();
            // Boxes spilling over a 60 x 80 image, some thinner than min_size.
            let props: Vec<[f32; 4]> = (0..n as u64)
                .map(|i| {
                    let b = random_box(&r, i);
                    let thin = if i % 7 == 0 { 0.0 } else { 1.0 };
                    [b[0] - 20.0, b[1] - 20.0, b[0] - 20.0 + (b[2] - b[0]) * thin, b[3] - 20.0]
                })
                .collect();
            let logits: Vec<f32> =
                (0..n as u64).map(|i| ((r.uniform(10_000 + i) * 12.0).floor() - 6.0) / 2.0).collect();
            let cfg = ProposalConfig {
                pre_nms_top_n: 8,
                post_nms_top_n: 12,
                nms_threshold: 0.5,
                score_threshold: 0.1,
                min_size: 0.5,
            };
            let got = select_proposals(&props, &logits, &levels, (60, 80), &cfg).expect("proposals");
            let want = proposals_reference(&props, &logits, &levels, (60, 80), &cfg);
            assert_eq!(got.boxes, want.iter().map(|w| w.0).collect::<Vec<_>>(), "seed {seed}");
            assert_eq!(got.scores, want.iter().map(|w| w.1).collect::<Vec<_>>(), "seed {seed}");
            assert!(!got.boxes.is_empty());
        }
        let cfg = ProposalConfig::faster_rcnn_testing();
        assert_eq!((cfg.pre_nms_top_n, cfg.post_nms_top_n, cfg.nms_threshold), (1000, 1000, 0.7));
        assert!(select_proposals(&[[0.0; 4]], &[0.0], &[2], (10, 10), &cfg).is_err());
        assert!(select_proposals(&[[0.0; 4]], &[f32::NAN], &[1], (10, 10), &cfg).is_err());
    }

    #[test]
    fn roi_training_samples_follow_torchvision() {
        let r = CounterRng::new(7);
        let gt = [[10.0, 10.0, 40.0, 40.0], [50.0, 10.0, 90.0, 30.0]];
        let labels = [3i64, 5];
        let proposals: Vec<[f32; 4]> = (0..300).map(|i| random_box(&r, i)).collect();
        let cfg = RoiSampling {
            matcher: Matcher::new(0.5, 0.1, false).expect("matcher"),
            sampler: BalancedSampler::new(64, 0.25).expect("sampler"),
            box_coder: BoxCoder::new([10.0, 10.0, 5.0, 5.0]),
        };
        let s = select_training_samples(&proposals, &gt, &labels, &cfg, &CounterRng::new(9)).expect("samples");
        let candidates = [proposals.as_slice(), &gt].concat();
        let npos = s.labels.iter().filter(|&&l| l > 0).count();
        // Both ground-truth boxes are candidates matching themselves at IoU 1, so positives exist.
        // Counts by the IoUs in f64: positives from 0.5, negatives below 0.1.
        let best_iou = |p: &[f32; 4]| gt.iter().map(|g| f64::from(iou(g, p))).fold(0.0, f64::max);
        let cand_pos = candidates.iter().filter(|p| best_iou(p) >= 0.5).count();
        let cand_neg = candidates.iter().filter(|p| best_iou(p) < 0.1).count();
        assert!(cand_pos >= 2);
        assert_eq!(npos, cand_pos.min(16));
        assert_eq!(s.labels.len() - npos, (64 - npos).min(cand_neg));
        for k in 0..s.labels.len() {
            let p = s.proposals[k];
            let ious: Vec<f64> = gt.iter().map(|g| f64::from(iou(g, &p))).collect();
            let best = if ious[1] > ious[0] { 1 } else { 0 };
            if s.labels[k] > 0 {
                assert!(ious[best] >= 0.5);
                assert_eq!((s.matched_gt[k], s.labels[k]), (best, labels[best]));
                let back = cfg.box_coder.decode(&s.regression_targets[k], &p);
                for c in 0..4 {
                    assert!((back[c] - gt[best][c]).abs() < 1e-3, "{back:?} vs {:?}", gt[best]);
                }
            } else {
                assert_eq!((s.labels[k], s.matched_gt[k]), (0, 0));
                assert!(ious[best] < 0.1, "background below the low threshold");
            }
            assert!(candidates.contains(&p));
        }
        assert_eq!(s, select_training_samples(&proposals, &gt, &labels, &cfg, &CounterRng::new(9)).expect("again"));
        // An image without ground truth: every candidate is background, matched to 0.
        let s = select_training_samples(&proposals, &[], &[], &RoiSampling::faster_rcnn(), &r).expect("samples");
        assert_eq!(s.labels, vec![0; 300]);
        assert!(s.regression_targets.iter().all(|t| t[2] == f32::NEG_INFINITY));
        assert!(select_training_samples(&proposals, &gt, &[0, 1], &cfg, &r).is_err());
        assert!(select_training_samples(&proposals, &gt, &[1], &cfg, &r).is_err());
    }
}
