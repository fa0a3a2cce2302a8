//! RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) on ResNet-50-FPN, as
//! torchvision's `retinanet_resnet50_fpn` (the first version, without group norm in its head)
//! builds it:
//!
//! - the backbone of [`super::fpn`]: P3..P5 from C3..C5, P6 and P7 by 3x3 stride-2 convolutions
//!   from P5 (strides 8 to 128), 256 channels each;
//! - a classification subnet and a box subnet, each shared by every level: four 3x3 convolutions
//!   of 256 channels with biases and ReLUs, then a 3x3 convolution to `9 x classes` logits (its
//!   bias `-log((1 - 0.01) / 0.01)`, so that every anchor starts at probability 0.01) or to
//!   `9 x 4` box deltas; nine anchors per location (three sizes, three aspect ratios). The
//!   convolutions start as torchvision's: normal with std 0.01, zero biases.
//!
//! With 91 classes it has 34,014,999 parameters: torchvision's count of `retinanet_resnet50_fpn`
//! with the backbone's batch norm frozen (`FrozenBatchNorm2d`, whose scale and shift are buffers;
//! with `nn.BatchNorm2d`, as torchvision builds it without any pretrained weights, 34,068,119).
//! [`RetinaNet::new`] freezes it; the registry builds [`BackboneNorm::Trained`], to train from
//! scratch.
//!
//! As a [`Detector`] it trains and detects as torchvision's `RetinaNet` (`retinanet.py`):
//!
//! - anchors (`AnchorGenerator`: sizes `x, x 2^(1/3), x 2^(2/3)` for `x` = 32..512 on P3..P7,
//!   ratios 0.5, 1, 2) matched at 0.5 / 0.4 with low-quality matches;
//! - `classification`: the sigmoid focal loss (alpha 0.25, gamma 2), summed over every class
//!   logit of the anchors that are matched or background (those between the thresholds left
//!   out), one-hot targets of the matched box's class;
//! - `box_regression`: L1 (torchvision's default `_box_loss` type) between the foreground
//!   anchors' deltas and their matched boxes encoded with weights (1, 1, 1, 1), summed;
//! - each divided by the image's foreground anchors (at least 1), then averaged over the images;
//! - detection: sigmoid scores per level, those above 0.05, the best 1000 of each level, decoded
//!   and clipped, NMS 0.5 within a class, the best 300 per image. Index 0 is never a target, so
//!   its scores only fall; it is not reported (classes are 1-based).

use int8_nn::detection::anchors::AnchorGenerator;
use int8_nn::detection::boxes::{BoxCoder, check_ground_truth, clip_to_image};
use int8_nn::detection::matching::{BETWEEN_THRESHOLDS, Matcher};
use int8_nn::detection::nms::{batched_nms, descending_order};
use int8_nn::layers::Conv2d;
use int8_nn::ops::detection::{sigmoid_focal, smooth_l1};
use int8_nn::ops::{add, relu};
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{Layer, Module, NnError, Tensor};

use super::canvas::Canvas;
use super::faster_rcnn::head_conv;
use super::fpn::{BackboneNorm, FPN_CHANNELS, ResNet50Fpn};
use super::{Dense, Detections, Detector, SingleShot, Target};
use crate::Result;
use crate::blocks::Builder;

/// Anchors per location of each level.
pub const ANCHORS: usize = 9;
/// The pyramid levels (P3..P7).
pub const LEVELS: usize = 5;
/// The side images are resized to unless [`RetinaNet::with_image_size`] says otherwise:
/// torchvision's `min_size`, on a square.
pub const IMAGE_SIZE: (usize, usize) = (800, 800);
/// The probability every anchor's class logits start at.
const PRIOR: f32 = 0.01;
/// The registry name.
pub const NAME: &str = "retinanet-resnet50-fpn";
/// The focal loss's alpha and gamma.
const FOCAL: (f32, f32) = (0.25, 2.0);
/// Detection scores at or below this are dropped.
const SCORE_THRESH: f32 = 0.05;
/// Candidates kept per level before NMS.
const TOPK_CANDIDATES: usize = 1000;
/// IoU above which a detection suppresses another of its class.
const NMS_THRESH: f64 = 0.5;
/// Detections kept per image.
const DETECTIONS_PER_IMAGE: usize = 300;

/// One subnet: four 3x3 convolutions with ReLUs, then the prediction.
#[derive(Debug)]
pub struct Subnet {
    /// The four hidden convolutions.
    pub conv: Vec<Conv2d>,
    /// The prediction convolution.
    pub out: Conv2d,
}

impl Subnet {
    fn new(b: &mut Builder, name: &str, out_name: &str, outputs: usize, bias: f32) -> Result<Self> {
        let c = FPN_CHANNELS;
        let hidden = LayerKind::Conv { first: false };
        let conv =
            (0..4).map(|i| head_conv(b, &format!("{name}.conv.{i}"), (c, c), 3, 0.0, hidden)).collect::<Result<_>>()?;
        let out = head_conv(b, &format!("{name}.{out_name}"), (c, outputs), 3, bias, LayerKind::Prediction)?;
        Ok(Self { conv, out })
    }

    /// The subnet on `x`, the levels packed on `canvas`: the gaps zeroed again after each hidden
    /// convolution, so that the next 3x3 convolution reads zeros beyond every level's border.
    fn forward(&self, x: &Tensor, canvas: &Canvas) -> Result<Tensor> {
        let mut h = x.clone();
        let mask = canvas.mask(FPN_CHANNELS)?;
        for c in &self.conv {
            h = relu(&c.forward(&h)?)?.mul(&mask)?;
        }
        Ok(self.out.forward(&h)?)
    }
}

impl Module for Subnet {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv.visit(f);
        self.out.visit(f);
    }
}

/// RetinaNet on ResNet-50-FPN.
#[derive(Debug)]
pub struct RetinaNet {
    classes: usize,
    image_size: (usize, usize),
    /// ResNet-50 with the feature pyramid (P3..P7).
    pub backbone: ResNet50Fpn,
    /// The classification subnet (`head.classification_head`).
    pub classification: Subnet,
    /// The box subnet (`head.regression_head`).
    pub regression: Subnet,
}

impl RetinaNet {
    /// The detector for `classes` classes, the background's index 0 included (91 for COCO): as in
    /// torchvision, each anchor has a sigmoid logit for every index, and that of index 0 is never
    /// a target.
    /// Its backbone's batch norm is frozen.
    pub fn new(classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        Self::with_norm(classes, policy, seed, BackboneNorm::Frozen)
    }

    /// The detector for `classes` classes with the backbone's batch norm as `norm` says.
    pub fn with_norm(classes: usize, policy: &LayerPolicy, seed: u64, norm: BackboneNorm) -> Result<Self> {
        let mut b = Builder { policy, seed, count: 0 };
        let backbone = ResNet50Fpn::retinanet(&mut b, norm)?;
        let prior = -((1.0 - PRIOR) / PRIOR).ln();
        let classification = Subnet::new(&mut b, "head.classification_head", "cls_logits", ANCHORS * classes, prior)?;
        let regression = Subnet::new(&mut b, "head.regression_head", "bbox_reg", ANCHORS * 4, 0.0)?;
        Ok(Self { classes, image_size: IMAGE_SIZE, backbone, classification, regression })
    }

    /// The same detector for images of `size` (height, width).
    pub fn with_image_size(mut self, size: (usize, usize)) -> Self {
        self.image_size = size;
        self
    }
}

impl Module for RetinaNet {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.backbone.visit(f);
        self.classification.visit(f);
        self.regression.visit(f);
    }
}

impl SingleShot for RetinaNet {
    fn name(&self) -> &str {
        NAME
    }

    fn image_size(&self) -> (usize, usize) {
        self.image_size
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn anchors_per_location(&self) -> Vec<usize> {
        vec![ANCHORS; LEVELS]
    }

    /// Class logits `images x anchors x classes` and box deltas `images x anchors x 4` over P3..P7,
    /// each level's anchors in torchvision's order (row, column, then anchor). Each subnet runs
    /// once on the levels packed into one canvas (see [`super::canvas`]: per-level calls would
    /// let one level's all-zero gradient zero the others' under INT8 gradient clipping).
    fn forward(&self, x: &Tensor) -> Result<Dense> {
        let maps = self.backbone.forward(x)?;
        let feature_sizes: Vec<(usize, usize)> = maps.iter().map(|m| (m.dims()[2], m.dims()[3])).collect();
        let canvas = Canvas::new(x.dims()[0], &feature_sizes);
        let packed = canvas.pack(&maps)?;
        let logits = canvas.unpack(&self.classification.forward(&packed, &canvas)?, self.classes)?;
        let deltas = canvas.unpack(&self.regression.forward(&packed, &canvas)?, 4)?;
        Ok(Dense {
            cls_logits: int8_nn::ops::concat(&logits, 1)?,
            bbox_regression: int8_nn::ops::concat(&deltas, 1)?,
            feature_sizes,
        })
    }
}

/// `1 / (1 + e^-x)`.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl RetinaNet {
    /// The training losses of head outputs `out` for images of `image_size` (height, width) with
    /// ground truth `targets`, one per image: what [`Detector::losses`] computes after the
    /// forward pass.
    pub fn dense_losses(
        &self,
        out: &Dense,
        image_size: (usize, usize),
        targets: &[Target],
    ) -> Result<Vec<(&'static str, Tensor)>> {
        let n = out.cls_logits.dims().first().copied().unwrap_or(0);
        if targets.len() != n {
            return Err(NnError::Shape(format!("{n} images but {} targets; pass one per image", targets.len())).into());
        }
        let k = self.classes;
        for t in targets {
            if t.boxes.len() != t.labels.len() {
                let why = format!("{} boxes but {} labels; give one label per box", t.boxes.len(), t.labels.len());
                return Err(NnError::BadInput { layer: NAME.into(), why }.into());
            }
            if let Some(&l) = t.labels.iter().find(|&&l| l == 0 || l as usize >= k) {
                let why = format!("ground-truth label {l} is not in 1..{k} (0 is the background)");
                return Err(NnError::BadInput { layer: NAME.into(), why }.into());
            }
            check_ground_truth(NAME, &t.boxes)?;
        }
        let anchors = AnchorGenerator::retinanet().anchors(image_size, &out.feature_sizes)?;
        let a = anchors.len();
        check_dense(out, a, k)?;
        let (logits, deltas) = (out.cls_logits.reshape([n * a, k])?, out.bbox_regression.reshape([n * a, 4])?);
        let coder = BoxCoder::new([1.0; 4]);
        let (mut classification, mut box_regression): (Option<Tensor>, Option<Tensor>) = (None, None);
        let sum = |acc: Option<Tensor>, t: Tensor| -> Result<Option<Tensor>> {
            Ok(Some(match acc {
                None => t,
                Some(acc) => add(&acc, &t)?,
            }))
        };
        for (i, t) in targets.iter().enumerate() {
            // Without ground truth every anchor is background (-1).
            let matches = Matcher::retinanet().match_boxes(&t.boxes, &anchors)?;
            let (mut valid, mut cls_targets, mut foreground, mut box_targets) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (j, &m) in matches.iter().enumerate() {
                if m == BETWEEN_THRESHOLDS {
                    continue;
                }
                valid.push(i * a + j);
                let first = cls_targets.len();
                cls_targets.resize(first + k, 0.0);
                if m >= 0 {
                    let m = m as usize;
                    cls_targets[first + t.labels[m] as usize] = 1.0;
                    foreground.push(i * a + j);
                    box_targets.extend(coder.encode(&t.boxes[m], &anchors[j]));
                }
            }
            let per_image = 1.0 / (foreground.len().max(1) * n) as f32;
            let (alpha, gamma) = FOCAL;
            let focal = sigmoid_focal(&logits.select_rows(&valid)?, &cls_targets, alpha, gamma)?;
            classification = sum(classification, focal.scale(per_image)?)?;
            // L1: smooth L1 with beta 0.
            let l1 = smooth_l1(&deltas.select_rows(&foreground)?, &box_targets, 0.0)?;
            box_regression = sum(box_regression, l1.scale(per_image)?)?;
        }
        let (Some(classification), Some(box_regression)) = (classification, box_regression) else {
            return Err(NnError::Shape("a batch without images".into()).into());
        };
        Ok(vec![("classification", classification), ("box_regression", box_regression)])
    }
}

impl Detector for RetinaNet {
    fn name(&self) -> &str {
        NAME
    }

    fn image_size(&self) -> (usize, usize) {
        self.image_size
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn losses(&self, images: &Tensor, targets: &[Target]) -> Result<Vec<(&'static str, Tensor)>> {
        let (_, image_size) = batch_dims(images)?;
        let out = SingleShot::forward(self, images)?;
        self.dense_losses(&out, image_size, targets)
    }

    fn detect(&self, images: &Tensor) -> Result<Vec<Detections>> {
        let (_, image_size) = batch_dims(images)?;
        let out = SingleShot::forward(self, images)?;
        self.dense_detect(&out, image_size)
    }
}

impl RetinaNet {
    /// The post-processed detections of head outputs `out` for images of `image_size` (height,
    /// width): what [`Detector::detect`] gives after the forward pass.
    pub fn dense_detect(&self, out: &Dense, image_size: (usize, usize)) -> Result<Vec<Detections>> {
        let n = out.cls_logits.dims().first().copied().unwrap_or(0);
        let generator = AnchorGenerator::retinanet();
        let anchors = generator.anchors(image_size, &out.feature_sizes)?;
        let per_level = generator.num_anchors_per_level(&out.feature_sizes);
        let (a, k) = (anchors.len(), self.classes);
        check_dense(out, a, k)?;
        let (logits, codes) = (out.cls_logits.to_vec(), out.bbox_regression.to_vec());
        let coder = BoxCoder::new([1.0; 4]);
        let mut all = Vec::with_capacity(n);
        for i in 0..n {
            let (mut boxes, mut scores, mut labels) = (Vec::new(), Vec::new(), Vec::new());
            let mut start = 0;
            for &count in &per_level {
                // Scores of this level, anchor-major and class-minor, as torchvision flattens them.
                let level = &logits[(i * a + start) * k..(i * a + start + count) * k];
                let kept: Vec<usize> =
                    (0..level.len()).filter(|&f| f % k != 0 && sigmoid(level[f]) > SCORE_THRESH).collect();
                let level_scores: Vec<f32> = kept.iter().map(|&f| sigmoid(level[f])).collect();
                for o in descending_order(&level_scores).into_iter().take(TOPK_CANDIDATES) {
                    let (j, label) = (start + kept[o] / k, kept[o] % k);
                    let c = &codes[(i * a + j) * 4..(i * a + j) * 4 + 4];
                    boxes.push(clip_to_image(&coder.decode(&[c[0], c[1], c[2], c[3]], &anchors[j]), image_size));
                    scores.push(level_scores[o]);
                    labels.push(label as u32);
                }
                start += count;
            }
            let keep = batched_nms(&boxes, &scores, &labels, NMS_THRESH)?;
            let keep = &keep[..keep.len().min(DETECTIONS_PER_IMAGE)];
            all.push(Detections {
                boxes: keep.iter().map(|&j| boxes[j]).collect(),
                scores: keep.iter().map(|&j| scores[j]).collect(),
                labels: keep.iter().map(|&j| labels[j]).collect(),
            });
        }
        Ok(all)
    }
}

/// Checks that `out` holds `classes` logits and 4 deltas for each of `anchors` anchors per image.
fn check_dense(out: &Dense, anchors: usize, classes: usize) -> Result<()> {
    let n = out.cls_logits.dims().first().copied().unwrap_or(0);
    if out.cls_logits.dims() != [n, anchors, classes] || out.bbox_regression.dims() != [n, anchors, 4] {
        return Err(NnError::Shape(format!(
            "head outputs of shapes {} and {} for {anchors} anchors of {classes} classes per image",
            out.cls_logits.shape(),
            out.bbox_regression.shape()
        ))
        .into());
    }
    Ok(())
}

/// The count and the height and width of an `n x 3 x h x w` batch.
fn batch_dims(images: &Tensor) -> Result<(usize, (usize, usize))> {
    match *images.dims() {
        [n, 3, h, w] if n > 0 && h > 0 && w > 0 => Ok((n, (h, w))),
        _ => Err(NnError::Shape(format!("{NAME} takes images x 3 x h x w, got shape {}", images.shape())).into()),
    }
}
