//! SSD300 on VGG-16 (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016), as
//! torchvision's `ssd300_vgg16` builds it: VGG-16's convolutions to conv4_3 (the third pooling in
//! ceil mode, so 300 pixels give 38x38), its L2-normalised output with a learned scale (20 at
//! first) as the first feature map; conv5, a 3x3 stride-1 pooling, the dilated fc6 and fc7 as
//! convolutions (19x19), and four extra blocks (10, 5, 3 and 1 on a side) as the others; on each,
//! a 3x3 convolution for class logits and one for box offsets, with 4, 6, 6, 6, 4 and 4 default
//! boxes per location. With 91 classes it has torchvision's 35,641,826 parameters. Weights start
//! as torchvision's: He normal (fan-out) to conv4_3, Xavier uniform from conv5_1 on and in the
//! heads, biases at 0.

use int8_nn::layers::{Conv2d, L2Norm};
use int8_nn::ops::{max_pool2d, max_pool2d_ceil, relu};
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{ConvGeometry, Layer, Module, Tensor};

use super::{Dense, Init, SingleShot, biased_conv as conv, same, scoring_head};
use crate::Result;
use crate::blocks::Builder;

/// The kind of every convolution but the first and the prediction layers.
const HIDDEN: LayerKind = LayerKind::Conv { first: false };

/// Default boxes per location of each of the six feature maps.
const ANCHORS: [usize; 6] = [4, 6, 6, 6, 4, 4];
/// Channels of each feature map.
const CHANNELS: [usize; 6] = [512, 1024, 512, 256, 256, 256];

/// SSD300 on VGG-16.
#[derive(Debug)]
pub struct Ssd300Vgg16 {
    classes: usize,
    /// conv1_1 .. conv4_3.
    pub vgg: Vec<Conv2d>,
    /// conv4_3's normalisation with its learned per-channel scale.
    pub l2norm: L2Norm,
    /// conv5_1 .. conv5_3, fc6 (3x3, dilation 6) and fc7 (1x1).
    pub fc: Vec<Conv2d>,
    /// The extra blocks: a 1x1 and a 3x3 convolution each.
    pub extra: Vec<(Conv2d, Conv2d)>,
    /// Per feature map: the class-logit convolution.
    pub cls: Vec<Conv2d>,
    /// Per feature map: the box-offset convolution.
    pub reg: Vec<Conv2d>,
}

impl Ssd300Vgg16 {
    /// The detector for `classes` classes (the background included; 91 for COCO).
    pub fn new(classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let mut b = Builder { policy, seed, count: 0 };
        // VGG-16's configuration D up to conv4_3.
        let widths = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)];
        let names = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3"];
        let mut vgg = Vec::new();
        for (i, (&io, name)) in widths.iter().zip(names).enumerate() {
            vgg.push(conv(
                &mut b,
                &format!("vgg.{name}"),
                io,
                3,
                same(3),
                LayerKind::Conv { first: i == 0 },
                Init::HeFanOut,
            )?);
        }
        for (io, name) in [((256, 512), "conv4_1"), ((512, 512), "conv4_2"), ((512, 512), "conv4_3")] {
            vgg.push(conv(&mut b, &format!("vgg.{name}"), io, 3, same(3), HIDDEN, Init::HeFanOut)?);
        }
        let l2norm = L2Norm::new("l2norm", 512, 20.0);
        let mut fc = Vec::new();
        for name in ["conv5_1", "conv5_2", "conv5_3"] {
            fc.push(conv(&mut b, &format!("vgg.{name}"), (512, 512), 3, same(3), HIDDEN, Init::Xavier)?);
        }
        let dilated = ConvGeometry { padding: (6, 6), dilation: 6, ..Default::default() };
        fc.push(conv(&mut b, "fc6", (512, 1024), 3, dilated, HIDDEN, Init::Xavier)?);
        fc.push(conv(&mut b, "fc7", (1024, 1024), 1, same(1), HIDDEN, Init::Xavier)?);
        let stride2 = ConvGeometry { stride: 2, padding: (1, 1), ..Default::default() };
        let valid = ConvGeometry::default();
        let mut extra = Vec::new();
        for (i, (inp, mid, out, g)) in
            [(1024, 256, 512, stride2), (512, 128, 256, stride2), (256, 128, 256, valid), (256, 128, 256, valid)]
                .into_iter()
                .enumerate()
        {
            let reduce = conv(&mut b, &format!("extra.{i}.conv1"), (inp, mid), 1, same(1), HIDDEN, Init::Xavier)?;
            extra.push((reduce, conv(&mut b, &format!("extra.{i}.conv2"), (mid, out), 3, g, HIDDEN, Init::Xavier)?));
        }
        let (mut cls, mut reg) = (Vec::new(), Vec::new());
        for (i, (&c, &a)) in CHANNELS.iter().zip(&ANCHORS).enumerate() {
            cls.push(conv(
                &mut b,
                &format!("head.cls.{i}"),
                (c, classes * a),
                3,
                same(3),
                LayerKind::Prediction,
                Init::Xavier,
            )?);
            reg.push(conv(
                &mut b,
                &format!("head.reg.{i}"),
                (c, 4 * a),
                3,
                same(3),
                LayerKind::Prediction,
                Init::Xavier,
            )?);
        }
        Ok(Self { classes, vgg, l2norm, fc, extra, cls, reg })
    }

    /// The six feature maps of a batch.
    fn features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut h = x.clone();
        for (i, c) in self.vgg.iter().enumerate() {
            h = relu(&c.forward(&h)?)?;
            // Pools after conv1_2, conv2_2 and conv3_3, the third in ceil mode (75 -> 38).
            h = match i {
                1 | 3 => max_pool2d(&h, 2, 2, 0)?,
                6 => max_pool2d_ceil(&h, 2, 2, 0)?,
                _ => h,
            };
        }
        let mut maps = vec![self.l2norm.forward(&h)?];
        h = max_pool2d(&h, 2, 2, 0)?;
        for (i, c) in self.fc.iter().enumerate() {
            if i == 3 {
                // The modified pool5 before fc6.
                h = max_pool2d(&h, 3, 1, 1)?;
            }
            h = relu(&c.forward(&h)?)?;
        }
        maps.push(h.clone());
        for (reduce, conv) in &self.extra {
            h = relu(&conv.forward(&relu(&reduce.forward(&h)?)?)?)?;
            maps.push(h.clone());
        }
        Ok(maps)
    }
}

impl Module for Ssd300Vgg16 {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.vgg.visit(f);
        self.l2norm.visit(f);
        self.fc.visit(f);
        self.extra.visit(f);
        self.cls.visit(f);
        self.reg.visit(f);
    }
}

impl SingleShot for Ssd300Vgg16 {
    fn name(&self) -> &str {
        "ssd300-vgg16"
    }

    fn image_size(&self) -> (usize, usize) {
        (300, 300)
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
        let cls: Vec<_> = self.cls.iter().map(|c| move |t: &Tensor| Ok(c.forward(t)?)).collect();
        let reg: Vec<_> = self.reg.iter().map(|c| move |t: &Tensor| Ok(c.forward(t)?)).collect();
        Ok(Dense {
            cls_logits: scoring_head(&cls, &maps, self.classes)?,
            bbox_regression: scoring_head(&reg, &maps, 4)?,
            feature_sizes,
        })
    }
}
