//! RetinaNet's training losses and post-processing against torchvision's own
//! (`RetinaNet.compute_loss` and `postprocess_detections`, torchvision 0.29): the same head
//! outputs (formulas rounded to f32 on both sides) for two 64x64 images with three and one
//! ground-truth boxes, 774 anchors each on P3..P7. The reference numbers are printed by
//! tests/fixtures/retinanet_loss.py and pasted here.

mod common;

use int8_nn::Tensor;
use int8_nn::policy::LayerPolicy;
use int8_zoo::detection::retinanet::RetinaNet;
use int8_zoo::detection::{Dense, Target};

#[test]
fn retinanet_losses_and_gradients_equal_torchvisions() {
    let (k, n, a) = (3, 2, 774);
    let m = RetinaNet::new(k, &LayerPolicy::fp32(), 0).unwrap();
    let cls: Vec<f32> = (0..n * a * k).map(|i| (2.0 * (0.37 * i as f64).sin()) as f32).collect();
    let reg: Vec<f32> = (0..n * a * 4).map(|i| (0.5 * (0.11 * i as f64 + 1.0).sin()) as f32).collect();
    let cls = Tensor::from_vec(cls, [n, a, k]).unwrap().requires_grad();
    let reg = Tensor::from_vec(reg, [n, a, 4]).unwrap().requires_grad();
    let out = Dense {
        cls_logits: cls.clone(),
        bbox_regression: reg.clone(),
        feature_sizes: vec![(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)],
    };
    let targets = [
        Target {
            boxes: vec![[10.0, 12.0, 30.0, 40.0], [33.0, 5.0, 60.0, 20.0], [2.0, 40.0, 9.0, 47.0]],
            labels: vec![1, 2, 1],
        },
        Target { boxes: vec![[20.0, 20.0, 52.0, 60.0]], labels: vec![2] },
    ];
    let losses = m.dense_losses(&out, (64, 64), &targets).unwrap();
    assert_eq!(losses.iter().map(|l| l.0).collect::<Vec<_>>(), ["classification", "box_regression"]);
    let close = |what: &str, got: f64, want: f64| {
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: {got} against torchvision's {want}");
    };
    close("classification", f64::from(losses[0].1.to_scalar().unwrap()), 34.2596664);
    close("box_regression", f64::from(losses[1].1.to_scalar().unwrap()), 1.9535626);
    let grads = losses[0].1.add(&losses[1].1).unwrap().backward().unwrap();
    let l1 = |t: &Tensor| grads.get(t).unwrap().to_vec().iter().map(|&v| f64::from(v.abs())).sum::<f64>();
    close("class logits' gradient", l1(&cls), 29.8080254);
    close("box deltas' gradient", l1(&reg), 3.9999998);
}

#[test]
fn retinanet_detections_equal_torchvisions() {
    let (k, n, a) = (3, 2, 774);
    let m = RetinaNet::new(k, &LayerPolicy::fp32(), 0).unwrap();
    // Class logits spread evenly over [-3, 3], class 0's at -10; the deltas as above.
    let cls: Vec<f32> = (0..n * a * k)
        .map(|i| if i % k == 0 { -10.0 } else { (-3.0 + 6.0 * ((i as f64 * 0.6180339887498949) % 1.0)) as f32 })
        .collect();
    let reg: Vec<f32> = (0..n * a * 4).map(|i| (0.5 * (0.11 * i as f64 + 1.0).sin()) as f32).collect();
    let out = Dense {
        cls_logits: Tensor::from_vec(cls, [n, a, k]).unwrap(),
        bbox_regression: Tensor::from_vec(reg, [n, a, 4]).unwrap(),
        feature_sizes: vec![(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)],
    };
    let dets = m.dense_detect(&out, (64, 64)).unwrap();
    // Per image: count, score sum, coordinate sum, label sum, and the best three.
    let want: [common::Summary; 2] = [
        (
            297,
            193.894806,
            17627.6074,
            447,
            [
                ([15.2948, 0.0, 45.9293, 24.5367], 0.952252, 2),
                ([0.0, 23.9023, 29.2509, 64.0], 0.952128, 2),
                ([0.0, 0.0, 17.0336, 10.5535], 0.951927, 1),
            ],
        ),
        (
            300,
            189.182617,
            17941.4375,
            453,
            [
                ([0.0, 0.0, 22.5809, 34.7543], 0.952527, 1),
                ([17.5112, 23.2016, 64.0, 54.495], 0.952404, 1),
                ([0.0, 0.0, 35.1038, 64.0], 0.952281, 1),
            ],
        ),
    ];
    common::check_against_torchvision(&dets, &want, |i, scores, coords, w| {
        assert!((scores - w.1).abs() < 1e-3, "image {i}: score sum {scores} against {}", w.1);
        assert!((coords - w.2).abs() < 0.05, "image {i}: coordinate sum {coords} against {}", w.2);
    });
}
