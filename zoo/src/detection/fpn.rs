//! ResNet-50 with a feature pyramid network (Lin et al., "Feature Pyramid Networks for Object
//! Detection", CVPR 2017), as torchvision's `resnet_fpn_backbone` / `_resnet_fpn_extractor`
//! builds it for `fasterrcnn_resnet50_fpn` and `retinanet_resnet50_fpn`.
//!
//! - The body is ResNet-50 (He et al., CVPR 2016) without its classifier; it returns the outputs
//!   of `layer1`..`layer4` (C2..C5, strides 4, 8, 16, 32). Its batch norms are [`BackboneNorm`]:
//!   frozen (torchvision's `FrozenBatchNorm2d`: running statistics always, scale and shift not
//!   trained), as for a pretrained backbone and as the parameter-count convention counts it, or
//!   trained (`nn.BatchNorm2d`), as torchvision builds the detectors without pretrained weights
//!   (`norm_layer = FrozenBatchNorm2d if is_trained else nn.BatchNorm2d`): from scratch a frozen
//!   batch norm is the identity, and a ResNet-50 without normalisation does not train.
//! - The pyramid has 256 channels: a 1x1 lateral convolution with a bias on each returned level,
//!   a top-down path that adds the coarser merged map upsampled by nearest neighbour to the
//!   lateral's exact size (`F.interpolate(size=..., mode="nearest")`), and a 3x3 output
//!   convolution with a bias on each merged map. Its convolutions start as torchvision's:
//!   `kaiming_uniform_(a=1)` weights, zero biases.
//! - Extra levels: Faster R-CNN's `LastLevelMaxPool` (a 1x1 max pooling of stride 2 over P5, the
//!   level torchvision names `pool`), or RetinaNet's `LastLevelP6P7(256, 256)`, whose input is P5
//!   (torchvision takes P5 when the channel counts agree, as they do here, C5 otherwise): P6 a 3x3
//!   stride-2 convolution of P5, P7 one of `relu(P6)`. RetinaNet returns C3..C5 only
//!   (`returned_layers=[2, 3, 4]`; C2 would give too many anchors).
//!
//! torchvision trains only `layer2`..`layer4` of a pretrained backbone
//! (`trainable_backbone_layers=3`) but every layer of one built from scratch (it asks for 5 when no
//! weights are given); the zoo has no pretrained weights and trains them all. Its parameter counts
//! with [`BackboneNorm::Frozen`] are torchvision's with `FrozenBatchNorm2d`, whose scale and shift
//! are buffers, not parameters; with [`BackboneNorm::Trained`] they include them.

use int8_nn::layers::{BatchNorm2d, Conv2d};
use int8_nn::ops::detection::upsample_nearest;
use int8_nn::ops::{add, max_pool2d, relu};
use int8_nn::policy::LayerKind;
use int8_nn::{ConvGeometry, Layer, Module, Tensor};

use super::same;
use crate::Result;
use crate::blocks::{Bottleneck, Builder};

/// Channels of every pyramid level.
pub const FPN_CHANNELS: usize = 256;

/// What the backbone's batch norms do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackboneNorm {
    /// `FrozenBatchNorm2d`: running statistics, scale and shift not trained (for pretrained
    /// weights; the parameter counts of the convention).
    Frozen,
    /// `nn.BatchNorm2d`: batch statistics in training, scale and shift trained (torchvision's
    /// choice without pretrained weights; what the registry builds).
    Trained,
}

impl BackboneNorm {
    fn apply(self, bn: BatchNorm2d) -> BatchNorm2d {
        match self {
            BackboneNorm::Frozen => bn.frozen(),
            BackboneNorm::Trained => bn,
        }
    }
}

/// ResNet-50 without its pooling and classifier.
#[derive(Debug)]
pub struct ResNet50Body {
    /// The 7x7 stride-2 stem (FP32 under the paper's policy).
    pub conv1: Conv2d,
    /// The stem's batch norm with the ReLU fused.
    pub bn1: BatchNorm2d,
    /// `layer1`..`layer4`: 3, 4, 6 and 3 bottlenecks of 64, 128, 256 and 512 planes.
    pub layers: [Vec<Bottleneck>; 4],
}

/// A bottleneck with each of its batch norms as `norm` says.
fn bottleneck(
    b: &mut Builder,
    name: &str,
    (inp, planes, stride): (usize, usize, usize),
    norm: BackboneNorm,
) -> Result<Bottleneck> {
    let Bottleneck { conv1, bn1, conv2, bn2, conv3, bn3, shortcut } = Bottleneck::new(b, name, inp, planes, stride)?;
    Ok(Bottleneck {
        conv1,
        bn1: norm.apply(bn1),
        conv2,
        bn2: norm.apply(bn2),
        conv3,
        bn3: norm.apply(bn3),
        shortcut: shortcut.map(|(conv, bn)| (conv, norm.apply(bn))),
    })
}

impl ResNet50Body {
    /// The body, its layers named `<prefix>conv1`, `<prefix>layer1.0.conv1`, ...
    pub(crate) fn new(b: &mut Builder, prefix: &str, norm: BackboneNorm) -> Result<Self> {
        let conv1 = b.conv(&format!("{prefix}conv1"), 3, 64, 7, 2, true)?;
        let bn1 = norm.apply(BatchNorm2d::new(format!("{prefix}bn1"), 64, true)?);
        let mut inp = 64;
        let mut stage = |idx: usize, planes: usize, n: usize, stride: usize| -> Result<Vec<Bottleneck>> {
            (0..n)
                .map(|i| {
                    let name = format!("{prefix}layer{idx}.{i}");
                    let block = bottleneck(b, &name, (inp, planes, if i == 0 { stride } else { 1 }), norm)?;
                    inp = planes * 4;
                    Ok(block)
                })
                .collect()
        };
        let layers = [stage(1, 64, 3, 1)?, stage(2, 128, 4, 2)?, stage(3, 256, 6, 2)?, stage(4, 512, 3, 2)?];
        Ok(Self { conv1, bn1, layers })
    }

    /// C2..C5 of a batch `n x 3 x h x w`: 256, 512, 1024 and 2048 channels at strides 4 to 32.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = max_pool2d(&self.bn1.forward(&self.conv1.forward(x)?)?, 3, 2, 1)?;
        let mut out = Vec::with_capacity(4);
        for stage in &self.layers {
            for block in stage {
                h = block.forward(&h)?;
            }
            out.push(h.clone());
        }
        Ok(out)
    }
}

impl Module for ResNet50Body {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        self.layers.visit(f);
    }
}

/// A convolution of the pyramid as torchvision starts it: `kaiming_uniform_(a=1)` (uniform in
/// `+-sqrt(3 / fan_in)`), a zero bias.
fn fpn_conv(b: &mut Builder, name: &str, inp: usize, k: usize, geometry: ConvGeometry) -> Result<Conv2d> {
    let fan_in = inp * k * k;
    let bound = (3.0 / fan_in as f32).sqrt();
    let w = Tensor::uniform((FPN_CHANNELS, inp, k, k), -bound, bound, b.next_seed());
    let precision = b.policy.precision_for(name, LayerKind::Conv { first: false });
    Ok(Conv2d::new(name, w, geometry, precision)?.with_bias(Tensor::zeros(FPN_CHANNELS))?)
}

/// The levels the pyramid adds above its coarsest merged map.
#[derive(Debug)]
pub enum ExtraLevels {
    /// Faster R-CNN's `LastLevelMaxPool`: P5 subsampled by a 1x1 max pooling of stride 2.
    MaxPool,
    /// RetinaNet's `LastLevelP6P7`: P6 a 3x3 stride-2 convolution of P5, P7 one of `relu(P6)`.
    P6P7 {
        /// P5 to P6.
        p6: Box<Conv2d>,
        /// `relu(P6)` to P7.
        p7: Box<Conv2d>,
    },
}

impl Module for ExtraLevels {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        if let ExtraLevels::P6P7 { p6, p7 } = self {
            p6.visit(f);
            p7.visit(f);
        }
    }
}

/// ResNet-50 with a feature pyramid.
#[derive(Debug)]
pub struct ResNet50Fpn {
    /// The ResNet-50.
    pub body: ResNet50Body,
    /// The first of C2..C5 the pyramid takes (0 for C2: Faster R-CNN; 1 for C3: RetinaNet).
    first: usize,
    /// The 1x1 lateral convolutions, finest level first.
    pub inner_blocks: Vec<Conv2d>,
    /// The 3x3 output convolutions, finest level first.
    pub layer_blocks: Vec<Conv2d>,
    /// The extra levels.
    pub extra: ExtraLevels,
}

impl ResNet50Fpn {
    /// Faster R-CNN's backbone: P2..P5 and `pool` (P6 by max pooling).
    pub(crate) fn faster_rcnn(b: &mut Builder, norm: BackboneNorm) -> Result<Self> {
        Self::new(b, 0, false, norm)
    }

    /// RetinaNet's backbone: P3..P5, P6 and P7 by convolutions.
    pub(crate) fn retinanet(b: &mut Builder, norm: BackboneNorm) -> Result<Self> {
        Self::new(b, 1, true, norm)
    }

    fn new(b: &mut Builder, first: usize, p6p7: bool, norm: BackboneNorm) -> Result<Self> {
        let body = ResNet50Body::new(b, "backbone.body.", norm)?;
        let (mut inner_blocks, mut layer_blocks) = (Vec::new(), Vec::new());
        for (i, level) in (first..4).enumerate() {
            let inp = 256 << level;
            inner_blocks.push(fpn_conv(b, &format!("backbone.fpn.inner_blocks.{i}"), inp, 1, same(1))?);
            layer_blocks.push(fpn_conv(b, &format!("backbone.fpn.layer_blocks.{i}"), FPN_CHANNELS, 3, same(3))?);
        }
        let extra = if p6p7 {
            let stride2 = ConvGeometry { stride: 2, padding: (1, 1), ..Default::default() };
            ExtraLevels::P6P7 {
                p6: Box::new(fpn_conv(b, "backbone.fpn.extra_blocks.p6", FPN_CHANNELS, 3, stride2)?),
                p7: Box::new(fpn_conv(b, "backbone.fpn.extra_blocks.p7", FPN_CHANNELS, 3, stride2)?),
            }
        } else {
            ExtraLevels::MaxPool
        };
        Ok(Self { body, first, inner_blocks, layer_blocks, extra })
    }

    /// The pyramid of a batch, finest level first, each `n x 256 x h x w`: P2, P3, P4, P5 and
    /// `pool` for Faster R-CNN (strides 4 to 64), P3 to P7 for RetinaNet (strides 8 to 128).
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let c = self.body.forward(x)?;
        let c = &c[self.first..];
        let last = c.len() - 1;
        let mut merged = self.inner_blocks[last].forward(&c[last])?;
        let mut out = vec![self.layer_blocks[last].forward(&merged)?];
        for i in (0..last).rev() {
            let lateral = self.inner_blocks[i].forward(&c[i])?;
            let size = (lateral.dims()[2], lateral.dims()[3]);
            merged = add(&lateral, &upsample_nearest(&merged, size)?)?;
            out.push(self.layer_blocks[i].forward(&merged)?);
        }
        out.reverse();
        let p5 = out[last].clone();
        match &self.extra {
            ExtraLevels::MaxPool => out.push(max_pool2d(&p5, 1, 2, 0)?),
            ExtraLevels::P6P7 { p6, p7 } => {
                let p6 = p6.forward(&p5)?;
                let p7 = p7.forward(&relu(&p6)?)?;
                out.extend([p6, p7]);
            }
        }
        Ok(out)
    }
}

impl Module for ResNet50Fpn {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.body.visit(f);
        self.inner_blocks.visit(f);
        self.layer_blocks.visit(f);
        self.extra.visit(f);
    }
}
