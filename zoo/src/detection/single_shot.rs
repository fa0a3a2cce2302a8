//! A single-shot network ([`SingleShot`]: SSD300, SSDLite) made a [`Detector`], as torchvision's
//! `SSD` wraps its backbone and head: default boxes over its feature maps, each matched to the
//! ground truth by IoU (0.5, each ground-truth box also taking its best default box), boxes
//! encoded with SSD's variances (0.1, 0.2), and the MultiBox loss (Liu et al., ECCV 2016, Sec.
//! 2.2: cross-entropy with 3 hard negatives per positive plus smooth L1, over the positives).
//! Detection is torchvision's post-processing: softmax scores, per class the boxes above a
//! threshold (at most `topk` of them), decoded and clipped to the image, class-wise NMS, the best
//! `per_image` kept.

use int8_nn::detection::anchors::DefaultBoxGenerator;
use int8_nn::detection::boxes::{BoxCoder, clip_to_image};
use int8_nn::detection::matching::SsdMatcher;
use int8_nn::detection::nms::batched_nms;
use int8_nn::ops::detection::multibox;
use int8_nn::{Layer, Module, Tensor};

use super::{Detections, Detector, SingleShot, Target};
use crate::Result;

/// torchvision's post-processing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostProcess {
    /// Scores at or below this are dropped.
    pub score_thresh: f32,
    /// IoU above which NMS suppresses a box of the same class.
    pub nms_thresh: f64,
    /// Detections kept per image.
    pub per_image: usize,
    /// Candidates kept per class before NMS.
    pub topk: usize,
}

impl PostProcess {
    /// `ssd300_vgg16`'s.
    pub const SSD: Self = Self { score_thresh: 0.01, nms_thresh: 0.45, per_image: 200, topk: 400 };
    /// `ssdlite320_mobilenet_v3_large`'s.
    pub const SSDLITE: Self = Self { score_thresh: 0.001, nms_thresh: 0.55, per_image: 300, topk: 300 };
}

/// A single-shot network with its default boxes, matching, loss and post-processing.
#[derive(Debug)]
pub struct SingleShotDetector {
    net: Box<dyn SingleShot>,
    default_boxes: DefaultBoxGenerator,
    coder: BoxCoder,
    matcher: SsdMatcher,
    /// Hard negatives per positive.
    neg_ratio: usize,
    post: PostProcess,
}

impl SingleShotDetector {
    /// Wraps `net` with its default boxes and post-processing.
    pub fn new(net: Box<dyn SingleShot>, default_boxes: DefaultBoxGenerator, post: PostProcess) -> Result<Self> {
        let (want, have) = (default_boxes.num_anchors_per_location(), net.anchors_per_location());
        if want != have {
            return Err(int8_nn::NnError::Shape(format!(
                "{} predicts {have:?} boxes per location, its default boxes are {want:?}",
                net.name()
            ))
            .into());
        }
        Ok(Self {
            net,
            default_boxes,
            coder: BoxCoder::from_variances(0.1, 0.2),
            matcher: SsdMatcher::new(0.5)?,
            neg_ratio: 3,
            post,
        })
    }

    /// The network.
    pub fn net(&self) -> &dyn SingleShot {
        self.net.as_ref()
    }
}

impl Module for SingleShotDetector {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.net.visit(f);
    }
}

/// The softmax of each `classes`-long row of `logits`.
pub(crate) fn softmax_rows(logits: &[f32], classes: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(classes) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let e: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        out.extend(e.iter().map(|v| v / sum));
    }
    out
}

impl Detector for SingleShotDetector {
    fn name(&self) -> &str {
        self.net.name()
    }

    fn image_size(&self) -> (usize, usize) {
        self.net.image_size()
    }

    fn classes(&self) -> usize {
        self.net.classes()
    }

    fn losses(&self, images: &Tensor, targets: &[Target]) -> Result<Vec<(&'static str, Tensor)>> {
        let n = images.dims()[0];
        if targets.len() != n {
            return Err(int8_nn::NnError::Shape(format!("{n} images but {} targets", targets.len())).into());
        }
        let out = self.net.forward(images)?;
        let anchors = self.default_boxes.boxes(self.image_size(), &out.feature_sizes)?;
        let a = anchors.len();
        let mut labels = vec![0u32; n * a];
        let mut box_targets = vec![0f32; n * a * 4];
        for (i, t) in targets.iter().enumerate() {
            if let Some(&l) = t.labels.iter().find(|&&l| l == 0 || l as usize >= self.classes()) {
                return Err(int8_nn::NnError::BadInput {
                    layer: self.name().into(),
                    why: format!("ground-truth label {l} is not in 1..{} (0 is the background)", self.classes()),
                }
                .into());
            }
            let matches = self.matcher.match_boxes(&t.boxes, &anchors)?;
            for (j, &m) in matches.iter().enumerate() {
                if m >= 0 {
                    let m = m as usize;
                    labels[i * a + j] = t.labels[m];
                    let code = self.coder.encode(&t.boxes[m], &anchors[j]);
                    box_targets[(i * a + j) * 4..(i * a + j) * 4 + 4].copy_from_slice(&code);
                }
            }
        }
        let m = multibox(&out.cls_logits, &out.bbox_regression, &labels, &box_targets, self.neg_ratio)?;
        Ok(vec![("classification", m.classification), ("box_regression", m.box_regression)])
    }

    fn detect(&self, images: &Tensor) -> Result<Vec<Detections>> {
        let out = self.net.forward(images)?;
        let anchors = self.default_boxes.boxes(self.image_size(), &out.feature_sizes)?;
        let (a, k) = (anchors.len(), self.classes());
        let scores = softmax_rows(&out.cls_logits.to_vec(), k);
        let codes = out.bbox_regression.to_vec();
        let p = self.post;
        let mut all = Vec::with_capacity(images.dims()[0]);
        for (i, image_scores) in scores.chunks_exact(a * k).enumerate() {
            let boxes: Vec<[f32; 4]> = (0..a)
                .map(|j| {
                    let c = &codes[(i * a + j) * 4..(i * a + j) * 4 + 4];
                    clip_to_image(&self.coder.decode(&[c[0], c[1], c[2], c[3]], &anchors[j]), self.image_size())
                })
                .collect();
            let (mut cand_boxes, mut cand_scores, mut cand_labels) = (Vec::new(), Vec::new(), Vec::new());
            for label in 1..k {
                let mut kept: Vec<usize> = (0..a).filter(|&j| image_scores[j * k + label] > p.score_thresh).collect();
                // The `topk` best, by descending score, ties in index order (torch's topk on the CPU).
                kept.sort_by(|&x, &y| image_scores[y * k + label].total_cmp(&image_scores[x * k + label]));
                kept.truncate(p.topk);
                for j in kept {
                    cand_boxes.push(boxes[j]);
                    cand_scores.push(image_scores[j * k + label]);
                    cand_labels.push(label as u32);
                }
            }
            let keep = batched_nms(&cand_boxes, &cand_scores, &cand_labels, p.nms_thresh)?;
            let keep = &keep[..keep.len().min(p.per_image)];
            all.push(Detections {
                boxes: keep.iter().map(|&j| cand_boxes[j]).collect(),
                scores: keep.iter().map(|&j| cand_scores[j]).collect(),
                labels: keep.iter().map(|&j| cand_labels[j]).collect(),
            });
        }
        Ok(all)
    }
}
