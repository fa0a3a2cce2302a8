//! MobileNetV2 (Sandler et al., CVPR 2018) as torchvision builds it: a stride-2 3x3 stem of 32
//! channels, inverted residual blocks (1x1 expansion, 3x3 depthwise, 1x1 linear projection, each
//! with batch norm; ReLU6 after the first two; a residual add where shape allows), a 1x1 conv to
//! 1280 channels and a linear classifier (torchvision's dropout before it is not modelled; it
//! has no parameters). With 1000 classes it has torchvision's 3,504,872 parameters. The CIFAR
//! variant keeps the stem and the second stage at stride 1, so that 32x32 inputs end at 4x4.

use int8_nn::layers::{BatchNorm2d, Conv2d, Linear};
use int8_nn::ops::{add, global_avg_pool};
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{ConvGeometry, Layer, Module, Tensor};

use crate::blocks::Builder;
use crate::{Model, Result, init};

/// A convolution followed by batch norm, with or without ReLU6.
#[derive(Debug)]
pub struct ConvBn {
    /// The convolution.
    pub conv: Conv2d,
    /// Its batch norm, with the ReLU6 fused into it where one follows.
    pub bn: BatchNorm2d,
    /// Whether ReLU6 follows.
    pub relu6: bool,
}

impl ConvBn {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.bn.forward(&self.conv.forward(x)?)?)
    }
}

impl Module for ConvBn {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv.visit(f);
        self.bn.visit(f);
    }
}

/// One inverted residual block.
#[derive(Debug)]
pub struct InvertedResidual {
    /// 1x1 expansion (absent when the expansion factor is 1).
    pub expand: Option<ConvBn>,
    /// 3x3 depthwise convolution (carries the block's stride).
    pub depthwise: ConvBn,
    /// 1x1 linear projection.
    pub project: ConvBn,
    /// Whether the block adds its input to its output.
    pub residual: bool,
}

impl InvertedResidual {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_tapped(x)?.1)
    }

    /// The block's expansion (its input where it has none) and its output: SSDLite taps the
    /// expansion of the block that enters stride 32.
    pub(crate) fn forward_tapped(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let expanded = match &self.expand {
            Some(e) => e.forward(x)?,
            None => x.clone(),
        };
        let h = self.project.forward(&self.depthwise.forward(&expanded)?)?;
        Ok((expanded, if self.residual { add(&h, x)? } else { h }))
    }
}

impl Module for InvertedResidual {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.expand.visit(f);
        self.depthwise.visit(f);
        self.project.visit(f);
    }
}

/// MobileNetV2 with width multiplier 1.
#[derive(Debug)]
pub struct MobileNetV2 {
    name: String,
    /// The 3x3 stem (FP32 under the paper's policy).
    pub stem: ConvBn,
    /// The inverted residual blocks.
    pub blocks: Vec<InvertedResidual>,
    /// The 1x1 convolution to 1280 channels.
    pub head: ConvBn,
    /// The classifier (FP32 under the paper's policy).
    pub classifier: Linear,
}

/// MobileNetV2's conv + batch norm units, built with the zoo's shared layer builder.
impl Builder<'_> {
    pub(crate) fn conv_bn(
        &mut self,
        name: &str,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        groups: usize,
        relu6: bool,
    ) -> Result<ConvBn> {
        let w = init::conv_weight(out, inp / groups, k, self.next_seed())?;
        let g = ConvGeometry { stride, padding: (k / 2, k / 2), dilation: 1, groups };
        let conv = Conv2d::new(
            format!("{name}.conv"),
            w,
            g,
            self.policy.precision_for(&format!("{name}.conv"), LayerKind::Conv { first: self.count == 1 }),
        )?;
        let bn = BatchNorm2d::new(format!("{name}.bn"), out, false)?;
        Ok(ConvBn { conv, bn: if relu6 { bn.with_relu6() } else { bn }, relu6 })
    }
}

/// MobileNetV2's feature layers: the stem, the inverted residual blocks and the 1x1 convolution to
/// 1280 channels; `cifar` keeps the stem and the second stage at stride 1.
pub(crate) fn features(b: &mut Builder, cifar: bool) -> Result<(ConvBn, Vec<InvertedResidual>, ConvBn)> {
    let stem = b.conv_bn("features.0", 3, 32, 3, if cifar { 1 } else { 2 }, 1, true)?;
    let cfg = [
        (1, 16, 1, 1),
        (6, 24, 2, if cifar { 1 } else { 2 }),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ];
    let (mut inp, mut blocks) = (32, Vec::new());
    for (t, c, n, s) in cfg {
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let (idx, hidden) = (blocks.len() + 1, inp * t);
            let name = format!("features.{idx}");
            let expand =
                if t != 1 { Some(b.conv_bn(&format!("{name}.expand"), inp, hidden, 1, 1, 1, true)?) } else { None };
            let depthwise = b.conv_bn(&format!("{name}.dw"), hidden, hidden, 3, stride, hidden, true)?;
            let project = b.conv_bn(&format!("{name}.project"), hidden, c, 1, 1, 1, false)?;
            blocks.push(InvertedResidual { expand, depthwise, project, residual: stride == 1 && inp == c });
            inp = c;
        }
    }
    let head = b.conv_bn(&format!("features.{}", blocks.len() + 1), inp, 1280, 1, 1, 1, true)?;
    Ok((stem, blocks, head))
}

impl MobileNetV2 {
    /// The network for `classes` classes; `cifar` keeps the stem and the second stage at stride 1.
    pub fn new(name: &str, classes: usize, cifar: bool, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let mut b = Builder { policy, seed, count: 0 };
        let (stem, blocks, head) = features(&mut b, cifar)?;
        let (w, bias) = init::linear(classes, 1280, seed.wrapping_mul(1000).wrapping_add(999))?;
        let classifier =
            Linear::new("classifier", w, bias, policy.precision_for("classifier", LayerKind::Linear { last: true }))?;
        Ok(Self { name: name.to_string(), stem, blocks, head, classifier })
    }
}

impl Module for MobileNetV2 {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.stem.visit(f);
        self.blocks.visit(f);
        self.head.visit(f);
        self.classifier.visit(f);
    }
}

impl Model for MobileNetV2 {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.stem.forward(x)?;
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        Ok(self.classifier.forward(&global_avg_pool(&self.head.forward(&h)?)?)?)
    }
}
