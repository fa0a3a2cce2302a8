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

use int8_nn::layers::Conv2d;
use int8_nn::ops::relu;
use int8_nn::policy::LayerPolicy;
use int8_nn::{Layer, Module, Tensor};

use super::faster_rcnn::head_conv;
use super::fpn::{FPN_CHANNELS, ResNet50Fpn};
use super::{Dense, SingleShot, scoring_head};
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
        let conv = (0..4).map(|i| head_conv(b, &format!("{name}.conv.{i}"), (c, c), 3, 0.0)).collect::<Result<_>>()?;
        Ok(Self { conv, out: head_conv(b, &format!("{name}.{out_name}"), (c, outputs), 3, bias)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for c in &self.conv {
            h = relu(&c.forward(&h)?)?;
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
    pub fn new(classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let mut b = Builder { policy, seed, count: 0 };
        let backbone = ResNet50Fpn::retinanet(&mut b)?;
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
        "retinanet-resnet50-fpn"
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
    /// each level's anchors in torchvision's order (row, column, then anchor).
    fn forward(&self, x: &Tensor) -> Result<Dense> {
        let maps = self.backbone.forward(x)?;
        let feature_sizes = maps.iter().map(|m| (m.dims()[2], m.dims()[3])).collect();
        let cls = [|t: &Tensor| self.classification.forward(t)];
        let reg = [|t: &Tensor| self.regression.forward(t)];
        // One subnet for every level: scoring_head pairs convolutions with maps, so it gets one
        // map at a time and the levels are joined after.
        let (mut logits, mut deltas) = (Vec::new(), Vec::new());
        for m in &maps {
            let m = std::slice::from_ref(m);
            logits.push(scoring_head(&cls, m, self.classes)?);
            deltas.push(scoring_head(&reg, m, 4)?);
        }
        Ok(Dense {
            cls_logits: int8_nn::ops::concat(&logits, 1)?,
            bbox_regression: int8_nn::ops::concat(&deltas, 1)?,
            feature_sizes,
        })
    }
}
