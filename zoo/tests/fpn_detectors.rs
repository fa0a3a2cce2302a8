//! Faster R-CNN and RetinaNet on ResNet-50-FPN: parameter counts against torchvision's, the region
//! level mapping against torchvision's `LevelMapper`, the pyramid's and heads' output layout, and
//! gradients for every trainable parameter (and none for the frozen ones) at both precisions.

use int8_nn::policy::LayerPolicy;
use int8_nn::precision::Int8Config;
use int8_nn::{Layer, Module, Tensor};
use int8_zoo::detection::SingleShot;
use int8_zoo::detection::faster_rcnn::{FasterRcnn, RPN_ANCHORS, roi_level};
use int8_zoo::detection::retinanet::RetinaNet;

/// Every parameter's values, frozen ones included.
fn all_values(m: &dyn Module) -> usize {
    m.layers().iter().flat_map(|l| l.params()).map(|p| p.elem_count()).sum()
}

#[test]
fn fpn_detectors_have_torchvisions_parameter_counts() {
    // Counted with /work/peer/venv (torch 2.15, torchvision 0.29.2), 91 classes:
    // - FrozenBatchNorm2d in the backbone (its scale and shift are buffers), every parameter
    //   trainable (trainable_backbone_layers=5, torchvision's choice without pretrained weights):
    //   sum(p.numel() for p in model.parameters()) = 41,755,286 and 34,014,999;
    // - fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None) and the RetinaNet alike
    //   (nn.BatchNorm2d, trained): 41,808,406 and 34,068,119, the 53,120 batch-norm values more.
    // (With trainable_backbone_layers=3, conv1 and layer1 frozen as for a pretrained backbone,
    // 41,532,886 and 33,792,599 require gradients.)
    let frcnn = FasterRcnn::new(91, &LayerPolicy::fp32(), 0).unwrap();
    assert_eq!(frcnn.param_count(), 41_755_286);
    assert_eq!(all_values(&frcnn), 41_808_406);
    let retina = RetinaNet::new(91, &LayerPolicy::fp32(), 0).unwrap();
    assert_eq!(retina.param_count(), 34_014_999);
    assert_eq!(all_values(&retina), 34_068_119);
    // As the registry builds them, the batch norm trained: torchvision's count without weights.
    let trained = |name: &str| {
        let options = int8_zoo::detection::DetectorOptions::default();
        int8_zoo::detection::build(name, 91, &LayerPolicy::fp32(), 0, &options).unwrap().param_count()
    };
    assert_eq!(trained("fasterrcnn-resnet50-fpn"), 41_808_406);
    assert_eq!(trained("retinanet-resnet50-fpn"), 34_068_119);
    // SSD's default-box scales mean nothing to their anchors: refused, naming the setting.
    for name in ["fasterrcnn-resnet50-fpn", "retinanet-resnet50-fpn"] {
        let options = int8_zoo::detection::DetectorOptions { box_scales: vec![0.05, 0.5], ..Default::default() };
        let err = int8_zoo::detection::build(name, 2, &LayerPolicy::fp32(), 0, &options).unwrap_err().to_string();
        assert!(err.contains("box_scales"), "{name}: {err}");
    }
    // The values not trained are exactly the batch norms' (all of them in the backbone).
    for m in [&frcnn as &dyn Module, &retina] {
        for l in m.layers() {
            let frozen = l.params().iter().any(|p| !p.trainable());
            assert_eq!(frozen, matches!(l, Layer::BatchNorm(_)), "{}", l.name());
            assert!(!frozen || l.name().starts_with("backbone.body."), "{}", l.name());
        }
    }
}

#[test]
fn regions_go_to_the_levels_torchvisions_level_mapper_picks() {
    // torchvision.ops.poolers.LevelMapper(2, 5) on these boxes (float32) gave
    // [0, 0, 1, 1, 1, 2, 2, 3, 3, 0, 0, 1]: the borders of k = floor(4 + log2(sqrt(area) / 224)
    // + 1e-6) at sides 112, 224 and 448, clamping below and above.
    let boxes = [
        [0.0, 0.0, 10.0, 10.0],
        [0.0, 0.0, 111.99, 112.0],
        [0.0, 0.0, 112.0, 112.0],
        [10.0, 10.0, 122.0, 122.0],
        [0.0, 0.0, 223.99, 224.0],
        [0.0, 0.0, 224.0, 224.0],
        [0.0, 0.0, 447.0, 448.0],
        [0.0, 0.0, 448.0, 448.0],
        [0.0, 0.0, 896.0, 896.0],
        [5.0, 5.0, 6.0, 6.0],
        [0.0, 0.0, 160.0, 40.0],
        [0.0, 0.0, 300.0, 90.0],
    ];
    let levels: Vec<usize> = boxes.iter().map(|&b| roi_level(b, 2, 5)).collect();
    assert_eq!(levels, [0, 0, 1, 1, 1, 2, 2, 3, 3, 0, 0, 1]);
}

/// Checks that every trainable parameter of `m` gets a finite, non-zero gradient and no frozen one
/// gets any.
fn check_gradients(name: &str, m: &dyn Module, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    for l in m.layers() {
        for p in l.params() {
            match grads.of(p) {
                Some(g) if p.trainable() => {
                    let norm: f64 = g.to_vec().iter().map(|&v| f64::from(v).powi(2)).sum();
                    assert!(norm.is_finite() && norm > 0.0, "{name}: {} has gradient norm {norm}", p.name());
                }
                Some(_) => panic!("{name}: the frozen {} got a gradient", p.name()),
                None => assert!(!p.trainable(), "{name}: no gradient for {}", p.name()),
            }
        }
    }
}

/// `sum(x^2)` over each tensor, summed.
fn sum_of_squares(parts: &[&Tensor]) -> Tensor {
    let mut total: Option<Tensor> = None;
    for t in parts {
        let s = t.mul(t).unwrap().sum_all().unwrap();
        total = Some(match total {
            None => s,
            Some(acc) => int8_nn::ops::add(&acc, &s).unwrap(),
        });
    }
    total.unwrap()
}

#[test]
fn faster_rcnn_lays_out_its_heads_and_trains_every_parameter_at_both_precisions() {
    let classes = 5;
    let images = Tensor::randn((2, 3, 256, 256), 5);
    // Regions of each level (sides about 50, 150, 230 and 512 pixels), out of level order.
    let rois = [
        [1.0, 0.0, 0.0, 512.0, 512.0],
        [0.0, 10.0, 10.0, 60.0, 60.0],
        [0.0, 20.0, 20.0, 250.0, 250.0],
        [1.0, 30.0, 40.0, 180.0, 190.0],
        [1.0, 100.0, 120.0, 140.0, 150.0],
    ];
    for policy in [LayerPolicy::fp32(), LayerPolicy::paper(Int8Config::default())] {
        let m = FasterRcnn::new(classes, &policy, 1).unwrap();
        let features = m.features(&images).unwrap();
        let sides = [64, 32, 16, 8, 4];
        assert_eq!(features.len(), sides.len());
        for (f, &s) in features.iter().zip(&sides) {
            assert_eq!(f.dims(), &[2, 256, s, s]);
        }
        // `pool` is P5 subsampled: max pooling with a 1x1 window and stride 2.
        let (p5, pool) = (features[3].to_vec(), features[4].to_vec());
        for plane in 0..2 * 256 {
            for (i, j) in (0..4).flat_map(|i| (0..4).map(move |j| (i, j))) {
                assert_eq!(pool[plane * 16 + i * 4 + j], p5[plane * 64 + 2 * i * 8 + 2 * j]);
            }
        }
        let rpn = m.rpn_forward(&features).unwrap();
        assert_eq!(rpn.feature_sizes, sides.iter().map(|&s| (s, s)).collect::<Vec<_>>());
        for ((o, d), &s) in rpn.objectness.iter().zip(&rpn.deltas).zip(&sides) {
            assert_eq!(o.dims(), &[2, s * s * RPN_ANCHORS]);
            assert_eq!(d.dims(), &[2, s * s * RPN_ANCHORS, 4]);
        }
        let boxes = m.box_forward(&features, (256, 256), &rois).unwrap();
        assert_eq!(boxes.class_logits.dims(), &[rois.len(), classes]);
        assert_eq!(boxes.box_regression.dims(), &[rois.len(), 4 * classes]);
        // Grouped by level (P2: region 1 and 4; P3: 3; P4: 2; P5: 0), in order within a level.
        assert_eq!(boxes.order, [1, 4, 3, 2, 0]);
        let mut outputs: Vec<&Tensor> = rpn.objectness.iter().chain(&rpn.deltas).collect();
        outputs.extend([&boxes.class_logits, &boxes.box_regression]);
        check_gradients("faster-rcnn", &m, &sum_of_squares(&outputs));
    }
}

#[test]
fn retinanet_lays_out_its_heads_and_trains_every_parameter_at_both_precisions() {
    let classes = 5;
    let images = Tensor::randn((2, 3, 256, 256), 6);
    for policy in [LayerPolicy::fp32(), LayerPolicy::paper(Int8Config::default())] {
        let m = RetinaNet::new(classes, &policy, 1).unwrap().with_image_size((256, 256));
        let out = m.forward(&images).unwrap();
        // P3..P7: strides 8 to 128.
        assert_eq!(out.feature_sizes, [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]);
        let anchors: usize = out.feature_sizes.iter().zip(m.anchors_per_location()).map(|(s, a)| s.0 * s.1 * a).sum();
        assert_eq!(anchors, 9 * (1024 + 256 + 64 + 16 + 4));
        assert_eq!(out.cls_logits.dims(), &[2, anchors, classes]);
        assert_eq!(out.bbox_regression.dims(), &[2, anchors, 4]);
        check_gradients("retinanet", &m, &sum_of_squares(&[&out.cls_logits, &out.bbox_regression]));
    }
}
