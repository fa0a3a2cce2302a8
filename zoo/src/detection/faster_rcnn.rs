//! Faster R-CNN (Ren et al., "Faster R-CNN: Towards Real-Time Object Detection with Region
//! Proposal Networks", NeurIPS 2015) on ResNet-50-FPN, as torchvision's `fasterrcnn_resnet50_fpn`
//! builds it:
//!
//! - the backbone of [`super::fpn`]: P2..P5 and `pool` (strides 4 to 64), 256 channels each;
//! - the region proposal network's head (`RPNHead`), shared by every level: a 3x3 convolution with
//!   a bias and a ReLU, then 1x1 convolutions to one objectness logit and four box deltas for each
//!   of the 3 anchors per location (one size per level, aspect ratios 0.5, 1 and 2); its
//!   convolutions start as torchvision's, normal with std 0.01 and zero biases;
//! - the box head on regions of interest: `MultiScaleRoIAlign` over P2..P5 (7x7 bins, sampling
//!   ratio 2, `aligned=False`), each region pooled from the level torchvision's `LevelMapper`
//!   picks by its size (Lin et al., CVPR 2017, Eq. 1: `k = floor(4 + log2(sqrt(area) / 224) +
//!   1e-6)`, clamped to levels 2..5), `TwoMLPHead` (fc6 and fc7, 1024 wide, each with a ReLU) and
//!   `FastRCNNPredictor` (class logits, and four box deltas per class).
//!
//! With 91 classes it has 41,755,286 parameters: torchvision's count of `fasterrcnn_resnet50_fpn`
//! with the backbone's batch norm frozen (`FrozenBatchNorm2d`, whose scale and shift are buffers;
//! with `nn.BatchNorm2d`, as torchvision builds it without any pretrained weights, 41,808,406).
//! [`FasterRcnn::new`] freezes it; the registry builds [`BackboneNorm::Trained`], to train from
//! scratch.
//!
//! As a [`Detector`] it trains and detects as torchvision's `GeneralizedRCNN` in training and
//! evaluation mode (`rpn.py`, `roi_heads.py`, `_utils.py`):
//!
//! - the RPN decodes its deltas at the anchors (`AnchorGenerator`: sizes 32..512 on P2..`pool`,
//!   ratios 0.5, 1, 2; coder weights 1), and `filter_proposals` keeps per level the 2000 (1000 in
//!   evaluation) best, clipped, without sides under 1e-3, NMS 0.7 per level, the best 2000 (1000)
//!   per image. The proposals are plain boxes: nothing flows back through them.
//! - RPN loss: anchors matched at 0.7 / 0.3 with low-quality matches, 256 sampled per image at
//!   most half positive; binary cross-entropy with logits over the sampled anchors and smooth L1
//!   (beta 1/9, summed) over the positives' deltas, both divided by the sampled anchors of the
//!   batch (`rpn_objectness`, `rpn_box_regression`).
//! - Box head loss: the ground-truth boxes added to the proposals, matched at 0.5, 512 sampled
//!   per image at most a quarter positive; cross-entropy averaged over the sampled regions and
//!   smooth L1 (beta 1/9, summed) over the positives' deltas of their own class, divided by the
//!   sampled regions (`classification`, `box_regression`); coder weights (10, 10, 5, 5).
//! - Detection: softmax scores, each class's box decoded from its deltas and clipped, scores
//!   above 0.05, sides of at least 1e-2, NMS 0.5 within a class, the best 100 per image.
//!
//! The samplers draw from a generator keyed by the build seed, the batch (its pixels and ground
//! truth) and the current values of the two objectness biases: a pure function of what a
//! checkpoint restores, so a resumed run draws what the uninterrupted one drew, while the draws
//! change from step to step as the weights do (torchvision draws with `torch.randperm`).

use int8_core::nn::detection::RoiAlign;
use int8_core::rng::CounterRng;
use int8_nn::detection::anchors::AnchorGenerator;
use int8_nn::detection::boxes::{BoxCoder, check_ground_truth, clip_to_image};
use int8_nn::detection::matching::Matcher;
use int8_nn::detection::nms::batched_nms;
use int8_nn::detection::sampling::{
    BalancedSampler, ProposalConfig, RoiSampling, rpn_anchor_targets, select_proposals, select_training_samples,
};
use int8_nn::layers::{Conv2d, Linear};
use int8_nn::ops::detection::{roi_align, sigmoid_focal, smooth_l1};
use int8_nn::ops::{concat, cross_entropy, relu};
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{Layer, Module, NnError, Tensor};

use super::canvas::Canvas;
use super::fpn::{BackboneNorm, FPN_CHANNELS, ResNet50Fpn};
use super::single_shot::softmax_rows;
use super::{Detections, Detector, Target, same};
use crate::blocks::Builder;
use crate::{Result, init};

/// Anchors per location of each level (one size, three aspect ratios).
pub const RPN_ANCHORS: usize = 3;
/// Width of the box head's two hidden layers (torchvision's `representation_size`).
pub const REPRESENTATION: usize = 1024;
/// The side of each region's pooled features.
pub const POOLED: usize = 7;
/// The pyramid levels regions are pooled from: P2..P5 (torchvision's feature maps `"0"`..`"3"`).
pub const ROI_LEVELS: usize = 4;
/// The side images are resized to unless [`FasterRcnn::with_image_size`] says otherwise:
/// torchvision's `min_size`, on a square.
pub const IMAGE_SIZE: (usize, usize) = (800, 800);
/// The registry name.
pub const NAME: &str = "fasterrcnn-resnet50-fpn";
/// Smooth L1's beta in both losses (torchvision's `1 / 9`).
const BETA: f32 = 1.0 / 9.0;
/// Detection scores at or below this are dropped (`box_score_thresh`).
const SCORE_THRESH: f32 = 0.05;
/// IoU above which a detection suppresses another of its class (`box_nms_thresh`).
const NMS_THRESH: f64 = 0.5;
/// Detections kept per image (`box_detections_per_img`).
const DETECTIONS_PER_IMAGE: usize = 100;
/// Detected boxes with a side under this are dropped (`postprocess_detections`' `min_size`).
const MIN_DETECTION_SIZE: f32 = 1e-2;

/// The level `LevelMapper` pools box `[x1, y1, x2, y2]` from, as an index into the levels
/// `k_min..=k_max` (0 for `k_min`): `floor(4 + log2(sqrt(area) / 224) + 1e-6)` clamped to them,
/// in f32 as torchvision computes it. A box without area goes to the finest level.
pub fn roi_level(b: [f32; 4], k_min: i32, k_max: i32) -> usize {
    let area = (b[2] - b[0]) * (b[3] - b[1]);
    let s = area.max(0.0).sqrt();
    let k = (4.0f32 + (s / 224.0f32).log2() + 1e-6f32).floor();
    // `max` takes k_min over a NaN (from non-finite corners, which roi_align then refuses).
    (k.max(k_min as f32).min(k_max as f32) as i32 - k_min) as usize
}

/// The scale from image to feature map coordinates as torchvision infers it
/// (`MultiScaleRoIAlign`'s `_infer_scale`): the ratio of the heights, rounded to a power of two.
fn infer_scale(feature: usize, image: usize) -> f32 {
    2f32.powf((feature as f32 / image as f32).log2().round())
}

/// A convolution of a head as torchvision starts it: normal with std 0.01, its bias at `bias`;
/// `kind` says whether it is a hidden layer or a prediction layer.
pub(crate) fn head_conv(
    b: &mut Builder,
    name: &str,
    (inp, out): (usize, usize),
    k: usize,
    bias: f32,
    kind: LayerKind,
) -> Result<Conv2d> {
    let w = Tensor::randn((out, inp, k, k), b.next_seed()).scale(0.01)?;
    let precision = b.policy.precision_for(name, kind);
    Ok(Conv2d::new(name, w, same(k), precision)?.with_bias(Tensor::full(out, bias))?)
}

/// A fully connected layer with PyTorch's default start, at the policy's precision.
fn linear(b: &mut Builder, name: &str, (inp, out): (usize, usize), last: bool) -> Result<Linear> {
    let (w, bias) = init::linear(out, inp, b.next_seed())?;
    Ok(Linear::new(name, w, bias, b.policy.precision_for(name, LayerKind::Linear { last }))?)
}

/// The region proposal network's head, shared by every level.
#[derive(Debug)]
pub struct RpnHead {
    /// The 3x3 convolution (followed by a ReLU).
    pub conv: Conv2d,
    /// The 1x1 convolution to one objectness logit per anchor.
    pub cls_logits: Conv2d,
    /// The 1x1 convolution to four box deltas per anchor.
    pub bbox_pred: Conv2d,
}

impl Module for RpnHead {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv.visit(f);
        self.cls_logits.visit(f);
        self.bbox_pred.visit(f);
    }
}

/// What the region proposal network gives for a batch, per pyramid level (finest first), each
/// level's anchors in torchvision's order (row, column, then anchor).
#[derive(Debug, Clone)]
pub struct RpnOutput {
    /// Per level, `images x HWA` objectness logits.
    pub objectness: Vec<Tensor>,
    /// Per level, `images x HWA x 4` box deltas.
    pub deltas: Vec<Tensor>,
    /// The height and width of each level.
    pub feature_sizes: Vec<(usize, usize)>,
}

/// What the box head gives for a set of regions.
#[derive(Debug, Clone)]
pub struct BoxOutput {
    /// `regions x classes` class logits.
    pub class_logits: Tensor,
    /// `regions x 4*classes` box deltas, four per class.
    pub box_regression: Tensor,
    /// Row `i` of both is region `order[i]` of those given: the regions grouped by the level they
    /// are pooled from, finest first, in their given order within a level.
    pub order: Vec<usize>,
}

/// Faster R-CNN on ResNet-50-FPN.
#[derive(Debug)]
pub struct FasterRcnn {
    classes: usize,
    image_size: (usize, usize),
    /// Keys the samplers' generator.
    seed: u64,
    /// How the box head picks its training regions.
    roi_sampling: RoiSampling,
    /// ResNet-50 with the feature pyramid (P2..P5, `pool`).
    pub backbone: ResNet50Fpn,
    /// The region proposal network's head.
    pub rpn: RpnHead,
    /// The box head's first hidden layer (`roi_heads.box_head.fc6`).
    pub fc6: Linear,
    /// The box head's second hidden layer (`fc7`).
    pub fc7: Linear,
    /// Class logits (`roi_heads.box_predictor.cls_score`; FP32 under the paper's policy).
    pub cls_score: Linear,
    /// Box deltas per class (`roi_heads.box_predictor.bbox_pred`; FP32 under the paper's policy).
    pub bbox_pred: Linear,
}

impl FasterRcnn {
    /// The detector for `classes` classes (the background included; 91 for COCO), its backbone's
    /// batch norm frozen.
    pub fn new(classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        Self::with_norm(classes, policy, seed, BackboneNorm::Frozen)
    }

    /// The detector for `classes` classes with the backbone's batch norm as `norm` says.
    pub fn with_norm(classes: usize, policy: &LayerPolicy, seed: u64, norm: BackboneNorm) -> Result<Self> {
        if classes < 2 {
            return Err(NnError::BadInput {
                layer: NAME.into(),
                why: format!("{classes} classes: give at least 2 (the background and one object class)"),
            }
            .into());
        }
        let mut b = Builder { policy, seed, count: 0 };
        let backbone = ResNet50Fpn::faster_rcnn(&mut b, norm)?;
        let c = FPN_CHANNELS;
        let rpn = RpnHead {
            conv: head_conv(&mut b, "rpn.head.conv", (c, c), 3, 0.0, LayerKind::Conv { first: false })?,
            cls_logits: head_conv(&mut b, "rpn.head.cls_logits", (c, RPN_ANCHORS), 1, 0.0, LayerKind::Prediction)?,
            bbox_pred: head_conv(&mut b, "rpn.head.bbox_pred", (c, 4 * RPN_ANCHORS), 1, 0.0, LayerKind::Prediction)?,
        };
        let pooled = c * POOLED * POOLED;
        Ok(Self {
            classes,
            image_size: IMAGE_SIZE,
            seed,
            roi_sampling: RoiSampling::faster_rcnn(),
            backbone,
            rpn,
            fc6: linear(&mut b, "roi_heads.box_head.fc6", (pooled, REPRESENTATION), false)?,
            fc7: linear(&mut b, "roi_heads.box_head.fc7", (REPRESENTATION, REPRESENTATION), false)?,
            cls_score: linear(&mut b, "roi_heads.box_predictor.cls_score", (REPRESENTATION, classes), true)?,
            bbox_pred: linear(&mut b, "roi_heads.box_predictor.bbox_pred", (REPRESENTATION, 4 * classes), true)?,
        })
    }

    /// The same detector for images of `size` (height, width).
    pub fn with_image_size(mut self, size: (usize, usize)) -> Self {
        self.image_size = size;
        self
    }

    /// The same detector sampling `regions` training regions per image for its box head, a
    /// quarter of them positive at most (torchvision's `box_batch_size_per_image`, 512 by
    /// default; the box head's cost grows with it).
    pub fn with_box_batch_size_per_image(mut self, regions: usize) -> Result<Self> {
        if regions == 0 {
            return Err(NnError::BadInput {
                layer: NAME.into(),
                why: "0 training regions per image: give at least 1 (torchvision's default is 512)".into(),
            }
            .into());
        }
        self.roi_sampling.sampler = BalancedSampler::new(regions, 0.25)?;
        Ok(self)
    }

    /// The input size (height, width) images are resized to.
    pub fn image_size(&self) -> (usize, usize) {
        self.image_size
    }

    /// Classes, the background included.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The pyramid of a batch `images x 3 x h x w`: P2, P3, P4, P5 and `pool`.
    pub fn features(&self, images: &Tensor) -> Result<Vec<Tensor>> {
        self.backbone.forward(images)
    }

    /// The region proposal network's outputs on every level of `features`. The head runs once on
    /// the levels packed into one canvas (see [`super::canvas`]: per-level calls would let one
    /// level's all-zero gradient zero the others' under INT8 gradient clipping); its 3x3
    /// convolution is followed by pointwise layers only, so the gaps need no masking.
    pub fn rpn_forward(&self, features: &[Tensor]) -> Result<RpnOutput> {
        if features.is_empty() || features.iter().any(|f| f.rank() != 4) {
            let shapes: Vec<String> = features.iter().map(|f| f.shape().to_string()).collect();
            return Err(NnError::Shape(format!("the RPN needs NCHW feature maps, got shapes {shapes:?}")).into());
        }
        let feature_sizes: Vec<(usize, usize)> = features.iter().map(|f| (f.dims()[2], f.dims()[3])).collect();
        let canvas = Canvas::new(features[0].dims()[0], &feature_sizes);
        let h = relu(&self.rpn.conv.forward(&canvas.pack(features)?)?)?;
        let objectness = canvas
            .unpack(&self.rpn.cls_logits.forward(&h)?, 1)?
            .iter()
            .map(|o| Ok(o.reshape([o.dims()[0], o.dims()[1]])?))
            .collect::<Result<Vec<_>>>()?;
        let deltas = canvas.unpack(&self.rpn.bbox_pred.forward(&h)?, 4)?;
        Ok(RpnOutput { objectness, deltas, feature_sizes })
    }

    /// The box head's outputs for `rois` (`[image index, x1, y1, x2, y2]` in pixels of images of
    /// `image_size` (height, width)), pooled from the first [`ROI_LEVELS`] levels of `features`.
    pub fn box_forward(&self, features: &[Tensor], image_size: (usize, usize), rois: &[[f32; 5]]) -> Result<BoxOutput> {
        let bad = |why: String| NnError::BadInput { layer: "roi_heads.box_roi_pool".into(), why };
        if features.len() < ROI_LEVELS || features[..ROI_LEVELS].iter().any(|f| f.rank() != 4) {
            let shapes: Vec<String> = features.iter().map(|f| f.shape().to_string()).collect();
            return Err(bad(format!("needs the {ROI_LEVELS} NCHW levels P2..P5, got shapes {shapes:?}")).into());
        }
        if image_size.0 == 0 || image_size.1 == 0 {
            return Err(bad(format!("the image size {image_size:?} must be positive")).into());
        }
        if rois.is_empty() {
            return Err(bad("no regions of interest; give at least one".into()).into());
        }
        let scales: Vec<f32> = features[..ROI_LEVELS].iter().map(|f| infer_scale(f.dims()[2], image_size.0)).collect();
        let (k_min, k_max) = (-scales[0].log2() as i32, -scales[ROI_LEVELS - 1].log2() as i32);
        let levels: Vec<usize> = rois.iter().map(|r| roi_level([r[1], r[2], r[3], r[4]], k_min, k_max)).collect();
        let (mut parts, mut order) = (Vec::new(), Vec::with_capacity(rois.len()));
        for (level, (feature, &spatial_scale)) in features.iter().zip(&scales).enumerate() {
            let idx: Vec<usize> = (0..rois.len()).filter(|&i| levels[i] == level).collect();
            if idx.is_empty() {
                continue;
            }
            let chosen: Vec<[f32; 5]> = idx.iter().map(|&i| rois[i]).collect();
            let cfg = RoiAlign { pooled: (POOLED, POOLED), spatial_scale, sampling_ratio: 2, aligned: false };
            parts.push(roi_align(feature, &chosen, cfg)?);
            order.extend(idx);
        }
        let x = concat(&parts, 0)?.flatten_from(1)?;
        let h = relu(&self.fc7.forward(&relu(&self.fc6.forward(&x)?)?)?)?;
        Ok(BoxOutput { class_logits: self.cls_score.forward(&h)?, box_regression: self.bbox_pred.forward(&h)?, order })
    }
}

impl Module for FasterRcnn {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.backbone.visit(f);
        self.rpn.visit(f);
        self.fc6.visit(f);
        self.fc7.visit(f);
        self.cls_score.visit(f);
        self.bbox_pred.visit(f);
    }
}

/// `h` with `v` mixed in (SplitMix64's finaliser over the sum).
fn mix(h: u64, v: u64) -> u64 {
    let mut z = h.rotate_left(17) ^ v.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The RPN's outputs for a batch with its anchors and each image's proposals.
struct RpnPass {
    /// The anchors of one image, level after level.
    anchors: Vec<[f32; 4]>,
    /// `images x anchors` objectness logits.
    objectness: Tensor,
    /// `images x anchors x 4` deltas.
    deltas: Tensor,
    /// Each image's proposals, best first.
    proposals: Vec<Vec<[f32; 4]>>,
}

impl FasterRcnn {
    /// The RPN on `features` of images of `image_size`, with proposals selected as `cfg` says.
    fn rpn_pass(&self, features: &[Tensor], image_size: (usize, usize), cfg: &ProposalConfig) -> Result<RpnPass> {
        let out = self.rpn_forward(features)?;
        let generator = AnchorGenerator::faster_rcnn_fpn();
        let anchors = generator.anchors(image_size, &out.feature_sizes)?;
        let per_level = generator.num_anchors_per_level(&out.feature_sizes);
        let objectness = concat(&out.objectness, 1)?;
        let deltas = concat(&out.deltas, 1)?;
        let (logits, codes) = (objectness.to_vec(), deltas.to_vec());
        let a = anchors.len();
        let coder = BoxCoder::new([1.0; 4]);
        let proposals = (0..objectness.dims()[0])
            .map(|i| {
                let decoded: Vec<[f32; 4]> = (0..a)
                    .map(|j| {
                        let c = &codes[(i * a + j) * 4..(i * a + j) * 4 + 4];
                        coder.decode(&[c[0], c[1], c[2], c[3]], &anchors[j])
                    })
                    .collect();
                Ok(select_proposals(&decoded, &logits[i * a..(i + 1) * a], &per_level, image_size, cfg)?.boxes)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RpnPass { anchors, objectness, deltas, proposals })
    }

    /// The samplers' key for one step: the seed, the batch and the objectness biases.
    fn draw_key(&self, images: &Tensor, targets: &[Target]) -> u64 {
        let mut h = mix(0x4652_5343_4E4E, self.seed);
        for v in images.to_vec() {
            h = mix(h, u64::from(v.to_bits()));
        }
        for t in targets {
            for (b, &l) in t.boxes.iter().zip(&t.labels) {
                h = b.iter().fold(mix(h, u64::from(l)), |h, v| mix(h, u64::from(v.to_bits())));
            }
            h = mix(h, t.boxes.len() as u64);
        }
        for layer in [Layer::Conv(&self.rpn.cls_logits), Layer::Linear(&self.cls_score)] {
            for p in layer.params() {
                h = p.value().to_vec().iter().fold(h, |h, v| mix(h, u64::from(v.to_bits())));
            }
        }
        h
    }

    /// Checks the ground truth of a batch of `n` images.
    fn check_targets(&self, n: usize, targets: &[Target]) -> Result<()> {
        let bad = |why: String| NnError::BadInput { layer: NAME.into(), why };
        if targets.len() != n {
            return Err(NnError::Shape(format!("{n} images but {} targets; pass one per image", targets.len())).into());
        }
        for t in targets {
            if t.boxes.len() != t.labels.len() {
                return Err(bad(format!(
                    "{} boxes but {} labels; give one label per box",
                    t.boxes.len(),
                    t.labels.len()
                ))
                .into());
            }
            if let Some(&l) = t.labels.iter().find(|&&l| l == 0 || l as usize >= self.classes) {
                return Err(
                    bad(format!("ground-truth label {l} is not in 1..{} (0 is the background)", self.classes)).into()
                );
            }
            check_ground_truth(NAME, &t.boxes)?;
        }
        Ok(())
    }
}

/// Checks that `order` is a permutation of `0..regions`.
fn check_order(order: &[usize], regions: usize) -> Result<()> {
    let mut seen = vec![false; regions];
    if order.len() == regions && order.iter().all(|&i| i < regions && !std::mem::replace(&mut seen[i], true)) {
        return Ok(());
    }
    Err(NnError::Shape(format!("the box head's row order {order:?} is not a permutation of 0..{regions}")).into())
}

/// The height and width of an `n x 3 x h x w` batch.
fn batch_dims(images: &Tensor) -> Result<(usize, (usize, usize))> {
    match *images.dims() {
        [n, 3, h, w] if n > 0 && h > 0 && w > 0 => Ok((n, (h, w))),
        _ => Err(NnError::Shape(format!("{NAME} takes images x 3 x h x w, got shape {}", images.shape())).into()),
    }
}

impl Detector for FasterRcnn {
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
        let (n, image_size) = batch_dims(images)?;
        self.check_targets(n, targets)?;
        let key = self.draw_key(images, targets);
        let features = self.features(images)?;
        let rpn = self.rpn_pass(&features, image_size, &ProposalConfig::faster_rcnn_training())?;

        // The RPN: sampled anchors over the batch, ascending (torchvision's `where(pos | neg)`
        // over the concatenated images), and the positives among them.
        let (a, rpn_coder, sampler) = (rpn.anchors.len(), BoxCoder::new([1.0; 4]), BalancedSampler::rpn());
        let (mut sampled, mut objectness_targets, mut positives, mut rpn_targets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, t) in targets.iter().enumerate() {
            let at = rpn_anchor_targets(&rpn.anchors, &t.boxes, &Matcher::rpn())?;
            let s = sampler.sample(&at.labels, &CounterRng::new(mix(key, 2 * i as u64)));
            for j in s.all() {
                sampled.push(i * a + j);
                objectness_targets.push(if at.labels[j] >= 1 { 1.0 } else { 0.0 });
            }
            for &j in &s.positives {
                positives.push(i * a + j);
                rpn_targets.extend(rpn_coder.encode(&at.matched_gt_boxes[j], &rpn.anchors[j]));
            }
        }
        let per_anchor = 1.0 / sampled.len().max(1) as f32;
        let logits = rpn.objectness.reshape([n * a, 1])?.select_rows(&sampled)?;
        // A negative alpha and no focusing: binary cross-entropy with logits, summed.
        let rpn_objectness = sigmoid_focal(&logits, &objectness_targets, -1.0, 0.0)?.scale(per_anchor)?;
        let deltas = rpn.deltas.reshape([n * a, 4])?.select_rows(&positives)?;
        let rpn_box_regression = smooth_l1(&deltas, &rpn_targets, BETA)?.scale(per_anchor)?;

        // The box head on each image's sampled proposals.
        let cfg = self.roi_sampling;
        let (mut rois, mut labels, mut box_targets) = (Vec::new(), Vec::new(), Vec::new());
        for (i, t) in targets.iter().enumerate() {
            let gt_labels: Vec<i64> = t.labels.iter().map(|&l| i64::from(l)).collect();
            let rng = CounterRng::new(mix(key, 2 * i as u64 + 1));
            let s = select_training_samples(&rpn.proposals[i], &t.boxes, &gt_labels, &cfg, &rng)?;
            for (k, p) in s.proposals.iter().enumerate() {
                rois.push([i as f32, p[0], p[1], p[2], p[3]]);
                // The sampler draws labels >= 0 only.
                labels.push(s.labels[k].max(0) as u32);
                box_targets.push(s.regression_targets[k]);
            }
        }
        let out = self.box_forward(&features, image_size, &rois)?;
        let (classification, box_regression) = self.box_losses(&out, &labels, &box_targets)?;
        Ok(vec![
            ("rpn_objectness", rpn_objectness),
            ("rpn_box_regression", rpn_box_regression),
            ("classification", classification),
            ("box_regression", box_regression),
        ])
    }

    fn detect(&self, images: &Tensor) -> Result<Vec<Detections>> {
        let (n, image_size) = batch_dims(images)?;
        let features = self.features(images)?;
        let rpn = self.rpn_pass(&features, image_size, &ProposalConfig::faster_rcnn_testing())?;
        let rois: Vec<[f32; 5]> = rpn
            .proposals
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.iter().map(move |b| [i as f32, b[0], b[1], b[2], b[3]]))
            .collect();
        if rois.is_empty() {
            return Ok(vec![Detections::default(); n]);
        }
        let out = self.box_forward(&features, image_size, &rois)?;
        self.postprocess(&out, &rois, n, image_size)
    }
}

impl FasterRcnn {
    /// torchvision's `fastrcnn_loss` of the box head's outputs `out` for regions whose classes
    /// (0 for background) and regression targets are `labels` and `targets`, in the order the
    /// regions were given: cross-entropy averaged over the regions, and smooth L1 (beta 1/9) of
    /// the positives' deltas of their own class, summed and divided by the regions.
    pub fn box_losses(&self, out: &BoxOutput, labels: &[u32], targets: &[[f32; 4]]) -> Result<(Tensor, Tensor)> {
        let (r, k) = (labels.len(), self.classes);
        let bad = |why: String| NnError::BadInput { layer: NAME.into(), why };
        if targets.len() != r || out.order.len() != r || out.class_logits.dims() != [r, k] {
            return Err(bad(format!(
                "{r} labels, {} targets and {} rows of class logits of shape {}; give one of each per region",
                targets.len(),
                out.order.len(),
                out.class_logits.shape()
            ))
            .into());
        }
        check_order(&out.order, r)?;
        if let Some(&l) = labels.iter().find(|&&l| l as usize >= k) {
            return Err(bad(format!("region label {l} is not in 0..{k}")).into());
        }
        let row_labels: Vec<u32> = out.order.iter().map(|&i| labels[i]).collect();
        let (classification, _) = cross_entropy(&out.class_logits, &row_labels)?;
        let (mut own_class, mut targets_of_positives) = (Vec::new(), Vec::new());
        for (row, &i) in out.order.iter().enumerate() {
            if labels[i] > 0 {
                own_class.push(row * k + labels[i] as usize);
                targets_of_positives.extend(targets[i]);
            }
        }
        let deltas = out.box_regression.reshape([r * k, 4])?.select_rows(&own_class)?;
        let box_regression = smooth_l1(&deltas, &targets_of_positives, BETA)?.scale(1.0 / r as f32)?;
        Ok((classification, box_regression))
    }

    /// torchvision's `postprocess_detections` of the box head's outputs `out` for `rois`
    /// (`[image index, x1, y1, x2, y2]`) of `images` images of `image_size`: softmax scores, each
    /// class's box decoded and clipped, scores above 0.05, sides of at least 1e-2, NMS 0.5 within a
    /// class, the best 100 per image.
    pub fn postprocess(
        &self,
        out: &BoxOutput,
        rois: &[[f32; 5]],
        images: usize,
        image_size: (usize, usize),
    ) -> Result<Vec<Detections>> {
        let k = self.classes;
        let (r, bad_image) = (rois.len(), rois.iter().find(|roi| !(roi[0] >= 0.0 && (roi[0] as usize) < images)));
        if out.order.len() != r || out.class_logits.dims() != [r, k] || out.box_regression.dims() != [r, 4 * k] {
            return Err(NnError::Shape(format!(
                "box head outputs of shapes {} and {} for {r} regions of {k} classes",
                out.class_logits.shape(),
                out.box_regression.shape()
            ))
            .into());
        }
        check_order(&out.order, r)?;
        if let Some(roi) = bad_image {
            let why = format!("region {roi:?} names an image outside 0..{images}");
            return Err(NnError::BadInput { layer: NAME.into(), why }.into());
        }
        let mut all = vec![Detections::default(); images];
        let scores = softmax_rows(&out.class_logits.to_vec(), k);
        let codes = out.box_regression.to_vec();
        let mut row_of = vec![0; rois.len()];
        for (row, &r) in out.order.iter().enumerate() {
            row_of[r] = row;
        }
        let coder = self.roi_sampling.box_coder;
        // Candidates per image in torchvision's order: proposal by proposal, class by class.
        let mut candidates = vec![Detections::default(); images];
        for (r, roi) in rois.iter().enumerate() {
            let (row, proposal) = (row_of[r], [roi[1], roi[2], roi[3], roi[4]]);
            let c = &mut candidates[roi[0] as usize];
            for label in 1..k {
                let score = scores[row * k + label];
                if score <= SCORE_THRESH {
                    continue;
                }
                let d = &codes[row * 4 * k + 4 * label..row * 4 * k + 4 * label + 4];
                let b = clip_to_image(&coder.decode(&[d[0], d[1], d[2], d[3]], &proposal), image_size);
                if b[2] - b[0] >= MIN_DETECTION_SIZE && b[3] - b[1] >= MIN_DETECTION_SIZE {
                    c.boxes.push(b);
                    c.scores.push(score);
                    c.labels.push(label as u32);
                }
            }
        }
        for (d, Detections { boxes, scores, labels }) in all.iter_mut().zip(candidates) {
            let keep = batched_nms(&boxes, &scores, &labels, NMS_THRESH)?;
            let keep = &keep[..keep.len().min(DETECTIONS_PER_IMAGE)];
            *d = Detections {
                boxes: keep.iter().map(|&j| boxes[j]).collect(),
                scores: keep.iter().map(|&j| scores[j]).collect(),
                labels: keep.iter().map(|&j| labels[j]).collect(),
            };
        }
        Ok(all)
    }
}
