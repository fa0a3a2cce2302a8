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

use int8_core::nn::detection::RoiAlign;
use int8_nn::layers::{Conv2d, Linear};
use int8_nn::ops::detection::roi_align;
use int8_nn::ops::{concat, relu};
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{Layer, Module, NnError, Tensor};

use super::fpn::{FPN_CHANNELS, ResNet50Fpn};
use super::{same, scoring_head};
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

/// A convolution of a head as torchvision starts it: normal with std 0.01, a zero bias.
pub(crate) fn head_conv(
    b: &mut Builder,
    name: &str,
    (inp, out): (usize, usize),
    k: usize,
    bias: f32,
) -> Result<Conv2d> {
    let w = Tensor::randn((out, inp, k, k), b.next_seed()).scale(0.01)?;
    let precision = b.policy.precision_for(name, LayerKind::Conv { first: false });
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
    /// The detector for `classes` classes (the background included; 91 for COCO).
    pub fn new(classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let mut b = Builder { policy, seed, count: 0 };
        let backbone = ResNet50Fpn::faster_rcnn(&mut b)?;
        let c = FPN_CHANNELS;
        let rpn = RpnHead {
            conv: head_conv(&mut b, "rpn.head.conv", (c, c), 3, 0.0)?,
            cls_logits: head_conv(&mut b, "rpn.head.cls_logits", (c, RPN_ANCHORS), 1, 0.0)?,
            bbox_pred: head_conv(&mut b, "rpn.head.bbox_pred", (c, 4 * RPN_ANCHORS), 1, 0.0)?,
        };
        let pooled = c * POOLED * POOLED;
        Ok(Self {
            classes,
            image_size: IMAGE_SIZE,
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

    /// The region proposal network's outputs on every level of `features`.
    pub fn rpn_forward(&self, features: &[Tensor]) -> Result<RpnOutput> {
        let mut out = RpnOutput { objectness: Vec::new(), deltas: Vec::new(), feature_sizes: Vec::new() };
        let cls = [|t: &Tensor| Ok(self.rpn.cls_logits.forward(t)?)];
        let reg = [|t: &Tensor| Ok(self.rpn.bbox_pred.forward(t)?)];
        for f in features {
            let h = [relu(&self.rpn.conv.forward(f)?)?];
            let objectness = scoring_head(&cls, &h, 1)?;
            let (n, anchors) = (objectness.dims()[0], objectness.dims()[1]);
            out.objectness.push(objectness.reshape([n, anchors])?);
            out.deltas.push(scoring_head(&reg, &h, 4)?);
            out.feature_sizes.push((h[0].dims()[2], h[0].dims()[3]));
        }
        Ok(out)
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
