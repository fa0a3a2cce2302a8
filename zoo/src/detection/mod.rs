//! Detectors: models whose output is, for every default box (anchor) of every image, class
//! logits and a box regression. They are named structs built by name with a layer policy, as the
//! classifiers are; their heads' convolutions run at the policy's precision (INT8 in the paper's
//! setting, the first convolution of the backbone in FP32).
//!
//! - [`ssd`]: SSD300 on VGG-16 (Liu et al., ECCV 2016), as torchvision's `ssd300_vgg16` builds it.
//! - [`ssdlite`]: SSDLite on MobileNetV2 (Sandler et al., CVPR 2018, Sec. 6.2), with
//!   torchvision's SSDLite head and extra layers.
//! - [`fpn`], [`faster_rcnn`], [`retinanet`]: ResNet-50 with a feature pyramid (Lin et al., CVPR
//!   2017), and the two-stage Faster R-CNN (Ren et al., NeurIPS 2015) and one-stage RetinaNet (Lin
//!   et al., ICCV 2017) on it, as torchvision builds them; the registry trains the backbone's
//!   batch norm (torchvision's choice without pretrained weights), the parameter counts of the
//!   issue's convention freeze it.
//!
//! Every detector is a [`Detector`]: it computes its own training losses from ground-truth boxes
//! and its own post-processed detections, as torchvision's detection models do, so that the
//! trainer treats them alike.

mod canvas;
pub mod faster_rcnn;
pub mod fpn;
pub mod retinanet;
pub mod single_shot;
pub mod ssd;
pub mod ssdlite;

use int8_nn::layers::Conv2d;
use int8_nn::ops::concat;
use int8_nn::policy::LayerKind;
use int8_nn::{ConvGeometry, Module, Tensor};

use crate::blocks::Builder;
use crate::{Result, init};

/// The detectors the registry can build, with the input size each takes (height, width).
pub const DETECTORS: &[(&str, (usize, usize))] = &[
    ("ssd300-vgg16", (300, 300)),
    ("ssdlite-mobilenetv2", (320, 320)),
    (faster_rcnn::NAME, faster_rcnn::IMAGE_SIZE),
    (retinanet::NAME, retinanet::IMAGE_SIZE),
];

/// The input size (height, width) of detector `name`.
pub fn input_size(name: &str) -> Result<(usize, usize)> {
    DETECTORS.iter().find(|d| d.0 == name).map(|d| d.1).ok_or_else(|| crate::ZooError::UnknownModel(name.into()))
}

/// The input size (height, width) detector `name` takes with `options`: the options' size where
/// the detector can take it, its own otherwise.
pub fn image_size(name: &str, options: &DetectorOptions) -> Result<(usize, usize)> {
    let own = input_size(name)?;
    let Some((h, w)) = options.image_size else { return Ok(own) };
    let bad = |why: String| {
        Err(crate::ZooError::Nn(int8_nn::NnError::BadInput { layer: format!("{name} detector.image_size"), why }))
    };
    // SSD300's default boxes are laid out with fixed steps for 300 pixels (its last extra layers
    // shrink 3x3 maps to 1x1 without padding), so it takes no other size, as in torchvision.
    if name == "ssd300-vgg16" && (h, w) != own {
        return bad(format!("is {h}x{w}, but SSD300 takes 300x300 only: remove [detector] image_size"));
    }
    // The backbones downsample by 32 (the pyramid's top-down path adds maps of halved sizes, and
    // torchvision pads images to a multiple of 32 for the same reason).
    if !(64..=2048).contains(&h) || !(64..=2048).contains(&w) || h % 32 != 0 || w % 32 != 0 {
        return bad(format!("is {h}x{w}; give [height, width], each a multiple of 32 from 64 to 2048"));
    }
    Ok((h, w))
}

/// What a recipe may change of a registry detector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DetectorOptions {
    /// The default boxes' scales as fractions of the image (SSD, SSDLite): two values, the
    /// smallest and largest level's (spaced evenly between, as SSD's Eq. 4), or one per level and
    /// one more; empty for the model's own. Objects much smaller than the smallest default box
    /// match none well (tree crowns are 5-15% of a tile; SSDLite's smallest box is 20%).
    pub box_scales: Vec<f64>,
    /// The input size (height, width) the images are resized to, for the model's own when `None`
    /// (see [`image_size`] for the sizes each detector takes). Smaller inputs train faster;
    /// objects then shrink with them, against anchors of fixed pixel sizes (Faster R-CNN,
    /// RetinaNet) or of fixed fractions of the image (SSDLite).
    pub image_size: Option<(usize, usize)>,
}

/// Builds detector `name` for `classes` classes (the background included) with `policy`,
/// initialised from `seed`, changed as `options` say.
pub fn build(
    name: &str,
    classes: usize,
    policy: &int8_nn::policy::LayerPolicy,
    seed: u64,
    options: &DetectorOptions,
) -> Result<Box<dyn Detector>> {
    use int8_nn::detection::anchors::{DefaultBoxGenerator, DefaultBoxScales};
    use single_shot::{PostProcess, SingleShotDetector};
    let size = image_size(name, options)?;
    // The model's own default boxes, or its aspect ratios and steps at the recipe's scales.
    let boxes = |own: DefaultBoxGenerator, ratios: Vec<Vec<f64>>, steps: Option<Vec<usize>>| {
        let s = &options.box_scales;
        let scales = match s.len() {
            0 => return Ok(own),
            2 => DefaultBoxScales::Range { min_ratio: s[0], max_ratio: s[1] },
            _ => DefaultBoxScales::Explicit(s.clone()),
        };
        DefaultBoxGenerator::new(ratios, scales, steps, true).map_err(|e| {
            crate::ZooError::Nn(int8_nn::NnError::BadInput {
                layer: format!("{name} detector.box_scales"),
                why: format!("{e}; give two values (smallest and largest) or one per feature map and one more"),
            })
        })
    };
    Ok(match name {
        "ssd300-vgg16" => {
            let ratios = vec![vec![2.0], vec![2.0, 3.0], vec![2.0, 3.0], vec![2.0, 3.0], vec![2.0], vec![2.0]];
            let steps = Some(vec![8, 16, 32, 64, 100, 300]);
            Box::new(SingleShotDetector::new(
                Box::new(ssd::Ssd300Vgg16::new(classes, policy, seed)?),
                boxes(DefaultBoxGenerator::ssd300(), ratios, steps)?,
                PostProcess::SSD,
            )?)
        }
        "ssdlite-mobilenetv2" => Box::new(SingleShotDetector::new(
            Box::new(ssdlite::SsdLiteMobileNetV2::new(classes, policy, seed)?.with_image_size(size)),
            boxes(DefaultBoxGenerator::ssdlite(), vec![vec![2.0, 3.0]; 6], None)?,
            PostProcess::SSDLITE,
        )?),
        faster_rcnn::NAME => {
            no_box_scales(name, options)?;
            Box::new(
                faster_rcnn::FasterRcnn::with_norm(classes, policy, seed, fpn::BackboneNorm::Trained)?
                    .with_image_size(size),
            )
        }
        retinanet::NAME => {
            no_box_scales(name, options)?;
            Box::new(
                retinanet::RetinaNet::with_norm(classes, policy, seed, fpn::BackboneNorm::Trained)?
                    .with_image_size(size),
            )
        }
        _ => return Err(crate::ZooError::UnknownModel(name.into())),
    })
}

/// Refuses `options.box_scales` for detector `name`, whose anchors are not SSD's default boxes.
fn no_box_scales(name: &str, options: &DetectorOptions) -> Result<()> {
    if options.box_scales.is_empty() {
        return Ok(());
    }
    Err(crate::ZooError::Nn(int8_nn::NnError::BadInput {
        layer: format!("{name} detector.box_scales"),
        why: "sets SSD's default boxes; this detector has fixed anchors (torchvision's sizes 32 to 512): remove \
              [detector] box_scales from the recipe"
            .into(),
    }))
}

/// The ground truth of one image: boxes as `[x1, y1, x2, y2]` in pixels of the image the detector
/// is given (after resizing), and their classes, 1-based (0 is the background).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    /// The boxes.
    pub boxes: Vec<[f32; 4]>,
    /// Each box's class, in `1..classes`.
    pub labels: Vec<u32>,
}

/// The detections of one image, best first: boxes as `[x1, y1, x2, y2]` in pixels of the image the
/// detector was given, their scores in `[0, 1]` and classes (1-based).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Detections {
    /// The boxes.
    pub boxes: Vec<[f32; 4]>,
    /// Each box's score.
    pub scores: Vec<f32>,
    /// Each box's class.
    pub labels: Vec<u32>,
}

/// A detector as the trainer sees it.
pub trait Detector: Module + Send + Sync + std::fmt::Debug {
    /// The registry name.
    fn name(&self) -> &str;
    /// The input size the detector takes (height, width); the trainer resizes images to it.
    fn image_size(&self) -> (usize, usize);
    /// Classes, the background included.
    fn classes(&self) -> usize;
    /// The training losses for a batch of `images x 3 x h x w` and their ground truth, one target
    /// per image: named scalar terms (e.g. `"classification"`, `"box_regression"`) whose sum is
    /// trained; each is logged under its name.
    fn losses(&self, images: &Tensor, targets: &[Target]) -> Result<Vec<(&'static str, Tensor)>>;
    /// Post-processed detections for a batch, one per image (run under `no_grad`, in evaluation
    /// mode).
    fn detect(&self, images: &Tensor) -> Result<Vec<Detections>>;
}

/// What a single-shot detector gives for a batch of images.
#[derive(Debug, Clone)]
pub struct Dense {
    /// `images x anchors x classes` (class 0 is the background).
    pub cls_logits: Tensor,
    /// `images x anchors x 4`: the encoded box offsets of each default box.
    pub bbox_regression: Tensor,
    /// The height and width of each feature map the default boxes are laid over, in order.
    pub feature_sizes: Vec<(usize, usize)>,
}

/// A detector that predicts at every default box in one pass (SSD, SSDLite).
pub trait SingleShot: Module + Send + Sync + std::fmt::Debug {
    /// The registry name.
    fn name(&self) -> &str;
    /// The input side the detector is built for (height, width).
    fn image_size(&self) -> (usize, usize);
    /// Classes, the background included.
    fn classes(&self) -> usize;
    /// Default boxes per location of each feature map.
    fn anchors_per_location(&self) -> Vec<usize>;
    /// Head outputs for a batch of `images x 3 x h x w`.
    fn forward(&self, x: &Tensor) -> Result<Dense>;
}

/// Runs one prediction conv per feature map and lays the outputs out anchor-major: each map's
/// `N x A*K x H x W` becomes `N x HWA x K`, and the maps are joined along the anchors.
pub(crate) fn scoring_head(
    convs: &[impl Fn(&Tensor) -> Result<Tensor>],
    features: &[Tensor],
    columns: usize,
) -> Result<Tensor> {
    let mut parts = Vec::with_capacity(features.len());
    for (conv, f) in convs.iter().zip(features) {
        let y = conv(f)?;
        let &[n, ak, h, w] = y.dims() else {
            return Err(int8_nn::NnError::Shape(format!("a prediction conv gave shape {}", y.shape())).into());
        };
        let y = y.reshape([n, ak / columns, columns, h, w])?.permute(&[0, 3, 4, 1, 2])?;
        parts.push(y.reshape([n, h * w * (ak / columns), columns])?);
    }
    Ok(concat(&parts, 1)?)
}

/// How a detector's convolution starts, as torchvision starts it; its bias starts at 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Init {
    /// He normal with fan-out (VGG's convolutions).
    HeFanOut,
    /// Xavier uniform (SSD's extra layers and heads).
    Xavier,
    /// Normal with this standard deviation (SSDLite's heads: 0.03).
    Normal(f32),
}

/// A dense (ungrouped) `k x k` convolution with a bias, at the policy's precision for `name`.
pub(crate) fn biased_conv(
    b: &mut Builder,
    name: &str,
    (inp, out): (usize, usize),
    k: usize,
    geometry: ConvGeometry,
    kind: LayerKind,
    start: Init,
) -> Result<Conv2d> {
    let seed = b.next_seed();
    let w = match start {
        Init::HeFanOut => init::conv_weight_fan_out(out, inp, k, seed)?,
        Init::Xavier => init::conv_weight_xavier(out, inp, k, seed)?,
        Init::Normal(std) => init::conv_weight_normal(out, inp, k, std, seed)?,
    };
    let precision = b.policy.precision_for(name, kind);
    Ok(Conv2d::new(name, w, geometry, precision)?.with_bias(Tensor::zeros(out))?)
}

/// Stride 1 with "same" padding for an odd `k`.
pub(crate) fn same(k: usize) -> ConvGeometry {
    ConvGeometry { padding: (k / 2, k / 2), ..Default::default() }
}
