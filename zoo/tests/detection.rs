//! The zoo's detectors: parameter counts against torchvision's, the default boxes their outputs
//! cover, and gradients for every parameter at both precisions.

use int8_nn::policy::LayerPolicy;
use int8_nn::precision::Int8Config;
use int8_nn::{Module, Tensor};
use int8_zoo::detection::SingleShot;
use int8_zoo::detection::ssd::Ssd300Vgg16;
use int8_zoo::detection::ssdlite::SsdLiteMobileNetV2;

#[test]
fn detectors_have_torchvisions_parameter_counts() {
    // torchvision's ssd300_vgg16(num_classes=91); SSDLite on MobileNetV2 as assembled from
    // torchvision's parts (see the module's header).
    let ssd = Ssd300Vgg16::new(91, &LayerPolicy::fp32(), 0).unwrap();
    assert_eq!(ssd.param_count(), 35_641_826);
    let lite = SsdLiteMobileNetV2::new(91, &LayerPolicy::fp32(), 0).unwrap();
    assert_eq!(lite.param_count(), 4_664_988);
}

/// Runs `m` on two images of its size (batch norm needs two values per channel on 1x1 maps), checks the anchor layout and that every
/// trainable parameter gets a finite, non-zero gradient from a loss over both outputs.
fn check(m: &dyn SingleShot, anchors: usize, sizes: &[(usize, usize)]) {
    let (h, w) = m.image_size();
    let out = m.forward(&Tensor::randn((2, 3, h, w), 5)).unwrap();
    assert_eq!(out.feature_sizes, sizes, "{}", m.name());
    let per_location: usize = out.feature_sizes.iter().zip(m.anchors_per_location()).map(|(s, a)| s.0 * s.1 * a).sum();
    assert_eq!(per_location, anchors, "{}", m.name());
    assert_eq!(out.cls_logits.dims(), &[2, anchors, m.classes()]);
    assert_eq!(out.bbox_regression.dims(), &[2, anchors, 4]);
    let loss = out.cls_logits.mul(&out.cls_logits).unwrap().sum_all().unwrap();
    let loss = int8_nn::ops::add(&loss, &out.bbox_regression.mul(&out.bbox_regression).unwrap().sum_all().unwrap());
    let grads = loss.unwrap().backward().unwrap();
    for t in m.trainables() {
        let g = grads.of(t.param).unwrap_or_else(|| panic!("{}: no gradient for {}", m.name(), t.param.name()));
        let norm: f64 = g.to_vec().iter().map(|&v| f64::from(v).powi(2)).sum();
        assert!(norm.is_finite() && norm > 0.0, "{}: {} has gradient norm {norm}", m.name(), t.param.name());
    }
}

#[test]
fn single_shot_detectors_cover_their_default_boxes_and_train_every_parameter_at_both_precisions() {
    for policy in [LayerPolicy::fp32(), LayerPolicy::paper(Int8Config::default())] {
        // SSD300: 38, 19, 10, 5, 3 and 1 on a side; 8,732 default boxes.
        let ssd = Ssd300Vgg16::new(3, &policy, 1).unwrap();
        check(&ssd, 8732, &[(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]);
        // SSDLite at 320: 20, 10, 5, 3, 2 and 1; 3,234 default boxes.
        let lite = SsdLiteMobileNetV2::new(3, &policy, 1).unwrap();
        check(&lite, 3234, &[(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)]);
    }
}

#[test]
fn the_paper_policy_keeps_each_detectors_stem_and_prediction_layers_in_fp32() {
    // The prediction layers (class logits and box offsets per anchor or region) are a detector's
    // classifiers, kept FP32 as the paper keeps a classifier's last layer; every other
    // convolution and fully connected layer runs in INT8.
    let policy = LayerPolicy::paper(Int8Config::default());
    let options = int8_zoo::detection::DetectorOptions::default();
    let heads = |prefix: &'static str, n: usize| (0..n).map(move |i| format!("{prefix}.{i}"));
    for (name, stem, prediction) in [
        ("ssd300-vgg16", "vgg.conv1_1", heads("head.cls", 6).chain(heads("head.reg", 6)).collect::<Vec<_>>()),
        (
            "ssdlite-mobilenetv2",
            "features.0.conv",
            heads("head.cls", 6).chain(heads("head.reg", 6)).map(|p| format!("{p}.pw")).collect(),
        ),
        (
            "fasterrcnn-resnet50-fpn",
            "backbone.body.conv1",
            [
                "rpn.head.cls_logits",
                "rpn.head.bbox_pred",
                "roi_heads.box_predictor.cls_score",
                "roi_heads.box_predictor.bbox_pred",
            ]
            .map(String::from)
            .to_vec(),
        ),
        (
            "retinanet-resnet50-fpn",
            "backbone.body.conv1",
            ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"].map(String::from).to_vec(),
        ),
    ] {
        let det = int8_zoo::detection::build(name, 3, &policy, 0, &options).unwrap();
        let mut fp32 = Vec::new();
        let mut weighted = 0;
        det.visit(&mut |l| {
            if matches!(l, int8_nn::Layer::Conv(_) | int8_nn::Layer::Linear(_)) {
                weighted += 1;
                if l.int8().is_none() {
                    fp32.push(l.name().to_string());
                }
            }
        });
        let mut want: Vec<String> = std::iter::once(stem.to_string()).chain(prediction).collect();
        want.sort();
        fp32.sort();
        assert_eq!(fp32, want, "{name}: the FP32 layers");
        assert_eq!(det.int8_stats().len(), weighted - want.len(), "{name}: all the others in INT8");
    }
}
