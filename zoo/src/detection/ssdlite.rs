//! SSDLite on MobileNetV2 (Sandler et al., "MobileNetV2", CVPR 2018, Sec. 6.2), with the head and
//! extra layers torchvision's `ssdlite320_mobilenet_v3_large` uses, on MobileNetV2 in place of
//! MobileNetV3 (torchvision has no MobileNetV2 SSDLite): 320x320 inputs; the first feature map is
//! the expansion (576 channels, stride 16, 20x20) of the block that enters stride 32, the second
//! the 1x1 convolution to 1280 channels (10x10); four extra blocks (a 1x1 reduction to half the
//! width, a 3x3 depthwise stride-2 convolution, a 1x1 expansion, each with batch norm and ReLU6)
//! give 512, 256, 256 and 128 channels at 5, 3, 2 and 1 on a side. Each prediction is SSDLite's:
//! a 3x3 depthwise convolution with batch norm and ReLU6, then a 1x1 convolution with a bias;
//! six default boxes per location (torchvision's `DefaultBoxGenerator([[2, 3]] * 6, 0.2, 0.95)`);
//! the prediction convolutions start normal with standard deviation 0.03, as torchvision's.
//! With 91 classes it has 4,664,988 parameters, batch norm counted: the count of the same network
//! assembled from torchvision's `mobilenet_v2` features, `_extra_block` and `SSDLiteHead`.

use int8_nn::layers::Conv2d;
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{Layer, Module, Tensor};

use super::{Dense, Init, SingleShot, biased_conv, same, scoring_head};
use crate::Result;
use crate::blocks::Builder;
use crate::mobilenetv2::{ConvBn, InvertedResidual, features};

/// Default boxes per location of each of the six feature maps.
pub const ANCHORS: [usize; 6] = [6; 6];
/// The block (an index into the inverted residual blocks) whose expansion is the first feature
/// map: the first block of the 160-channel stage, which takes stride 16 to 32.
const TAP: usize = 13;

/// One prediction: a depthwise 3x3 with batch norm and ReLU6, then a 1x1 with a bias.
#[derive(Debug)]
pub struct Prediction {
    /// The depthwise 3x3 convolution with its batch norm and ReLU6.
    pub depthwise: ConvBn,
    /// The 1x1 convolution to the outputs.
    pub pointwise: Conv2d,
}

impl Prediction {
    fn new(b: &mut Builder, name: &str, inp: usize, out: usize) -> Result<Self> {
        let depthwise = b.conv_bn(&format!("{name}.dw"), inp, inp, 3, 1, inp, true)?;
        Ok(Self {
            depthwise,
            pointwise: biased_conv(
                b,
                &format!("{name}.pw"),
                (inp, out),
                1,
                same(1),
                LayerKind::Prediction,
                Init::Normal(0.03),
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.pointwise.forward(&self.depthwise.forward(x)?)?)
    }
}

impl Module for Prediction {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.depthwise.visit(f);
        self.pointwise.visit(f);
    }
}

/// SSDLite on MobileNetV2, 320x320 unless [`SsdLiteMobileNetV2::with_image_size`] says otherwise.
#[derive(Debug)]
pub struct SsdLiteMobileNetV2 {
    classes: usize,
    image_size: (usize, usize),
    /// MobileNetV2's stem (FP32 under the paper's policy).
    pub stem: ConvBn,
    /// MobileNetV2's inverted residual blocks.
    pub blocks: Vec<InvertedResidual>,
    /// The 1x1 convolution to 1280 channels.
    pub head: ConvBn,
    /// The extra blocks: reduction, depthwise stride 2, expansion.
    pub extra: Vec<[ConvBn; 3]>,
    /// Per feature map: the class-logit prediction.
    pub cls: Vec<Prediction>,
    /// Per feature map: the box-offset prediction.
    pub reg: Vec<Prediction>,
}

impl SsdLiteMobileNetV2 {
    /// The detector for `classes` classes (the background included; 91 for COCO).
    pub fn new(classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let mut b = Builder { policy, seed, count: 0 };
        let (stem, blocks, head) = features(&mut b, false)?;
        let mut extra = Vec::new();
        let mut inp = 1280;
        for (i, out) in [512, 256, 256, 128].into_iter().enumerate() {
            let name = format!("extra.{i}");
            let mid = out / 2;
            extra.push([
                b.conv_bn(&format!("{name}.reduce"), inp, mid, 1, 1, 1, true)?,
                b.conv_bn(&format!("{name}.dw"), mid, mid, 3, 2, mid, true)?,
                b.conv_bn(&format!("{name}.expand"), mid, out, 1, 1, 1, true)?,
            ]);
            inp = out;
        }
        let (mut cls, mut reg) = (Vec::new(), Vec::new());
        for (i, (c, a)) in [576, 1280, 512, 256, 256, 128].into_iter().zip(ANCHORS).enumerate() {
            cls.push(Prediction::new(&mut b, &format!("head.cls.{i}"), c, classes * a)?);
            reg.push(Prediction::new(&mut b, &format!("head.reg.{i}"), c, 4 * a)?);
        }
        Ok(Self { classes, image_size: (320, 320), stem, blocks, head, extra, cls, reg })
    }

    /// The same detector for images of `size` (height, width). Its default boxes are fractions
    /// of the image, laid over whatever feature maps the size gives.
    pub fn with_image_size(mut self, size: (usize, usize)) -> Self {
        self.image_size = size;
        self
    }

    /// The six feature maps of a batch.
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = self.stem.forward(x)?;
        let mut maps = Vec::with_capacity(6);
        for (i, block) in self.blocks.iter().enumerate() {
            if i == TAP {
                let (expanded, out) = block.forward_tapped(&h)?;
                maps.push(expanded);
                h = out;
            } else {
                h = block.forward(&h)?;
            }
        }
        h = self.head.forward(&h)?;
        maps.push(h.clone());
        for [reduce, dw, expand] in &self.extra {
            h = expand.forward(&dw.forward(&reduce.forward(&h)?)?)?;
            maps.push(h.clone());
        }
        Ok(maps)
    }
}

impl Module for SsdLiteMobileNetV2 {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.stem.visit(f);
        self.blocks.visit(f);
        self.head.visit(f);
        self.extra.visit(f);
        self.cls.visit(f);
        self.reg.visit(f);
    }
}

impl SingleShot for SsdLiteMobileNetV2 {
    fn name(&self) -> &str {
        "ssdlite-mobilenetv2"
    }

    fn image_size(&self) -> (usize, usize) {
        self.image_size
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn anchors_per_location(&self) -> Vec<usize> {
        ANCHORS.to_vec()
    }

    fn forward(&self, x: &Tensor) -> Result<Dense> {
        let maps = self.features(x)?;
        let feature_sizes = maps.iter().map(|m| (m.dims()[2], m.dims()[3])).collect();
        let cls: Vec<_> = self.cls.iter().map(|p| move |t: &Tensor| p.forward(t)).collect();
        let reg: Vec<_> = self.reg.iter().map(|p| move |t: &Tensor| p.forward(t)).collect();
        Ok(Dense {
            cls_logits: scoring_head(&cls, &maps, self.classes)?,
            bbox_regression: scoring_head(&reg, &maps, 4)?,
            feature_sizes,
        })
    }
}
