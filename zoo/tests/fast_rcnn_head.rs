//! The Faster R-CNN box head's loss and post-processing against torchvision's own
//! (`roi_heads.fastrcnn_loss` and `RoIHeads.postprocess_detections`, torchvision 0.29): the same
//! outputs (formulas rounded to f32 on both sides) for 40 regions of two 96x128 images and 4
//! classes, with the head's rows in another order than the regions' (as `box_forward` groups them
//! by pyramid level). The reference numbers are printed by tests/fixtures/fast_rcnn_head.py and
//! pasted here.

mod common;

use int8_nn::Tensor;
use int8_nn::policy::LayerPolicy;
use int8_zoo::detection::faster_rcnn::{BoxOutput, FasterRcnn};

const K: usize = 4;
const R: usize = 40;

fn golden(i: usize) -> f64 {
    (i as f64 * 0.6180339887498949) % 1.0
}

/// Region `r`: image `r % 2`, a box from the golden-ratio sequence.
fn rois() -> Vec<[f32; 5]> {
    (0..R)
        .map(|r| {
            let (x1, y1) = (100.0 * golden(4 * r), 70.0 * golden(4 * r + 1));
            let (x2, y2) = (x1 + 5.0 + 40.0 * golden(4 * r + 2), y1 + 5.0 + 40.0 * golden(4 * r + 3));
            [(r % 2) as f32, x1 as f32, y1 as f32, x2 as f32, y2 as f32]
        })
        .collect()
}

/// The head's outputs with row `i` holding region `order[i]`: the region's logits and deltas.
fn outputs(order: &[usize]) -> (BoxOutput, Tensor, Tensor) {
    let logits: Vec<f32> = (0..R * K).map(|i| (2.5 * (0.7 * i as f64 + 0.3).sin()) as f32).collect();
    let deltas: Vec<f32> = (0..R * 4 * K).map(|i| (0.8 * (0.23 * i as f64).sin()) as f32).collect();
    let rows =
        |v: &[f32], w: usize| -> Vec<f32> { order.iter().flat_map(|&r| v[r * w..(r + 1) * w].to_vec()).collect() };
    let class_logits = Tensor::from_vec(rows(&logits, K), [R, K]).unwrap().requires_grad();
    let box_regression = Tensor::from_vec(rows(&deltas, 4 * K), [R, 4 * K]).unwrap().requires_grad();
    let out =
        BoxOutput { class_logits: class_logits.clone(), box_regression: box_regression.clone(), order: order.to_vec() };
    (out, class_logits, box_regression)
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    assert!((got - want).abs() <= tol * want.abs().max(1.0), "{what}: {got} against torchvision's {want}");
}

#[test]
fn box_head_loss_equals_torchvisions_fastrcnn_loss() {
    let m = FasterRcnn::new(K, &LayerPolicy::fp32(), 0).unwrap();
    let order: Vec<usize> = (0..R).rev().collect();
    let (out, logits, deltas) = outputs(&order);
    let labels: Vec<u32> = (0..R).map(|r| if r % 3 == 0 { ((r * 7) % K) as u32 } else { 0 }).collect();
    let targets: Vec<[f32; 4]> =
        (0..R).map(|r| [0, 1, 2, 3].map(|c| (0.6 * (0.19 * (4 * r + c) as f64).cos()) as f32)).collect();
    let (cls, boxes) = m.box_losses(&out, &labels, &targets).unwrap();
    close("classification", f64::from(cls.to_scalar().unwrap()), 2.0256722, 1e-5);
    close("box_regression", f64::from(boxes.to_scalar().unwrap()), 0.4784457, 1e-5);
    let grads = cls.add(&boxes).unwrap().backward().unwrap();
    let l1 = |t: &Tensor| grads.get(t).unwrap().to_vec().iter().map(|&v| f64::from(v.abs())).sum::<f64>();
    close("class logits' gradient", l1(&logits), 1.4107172, 1e-5);
    close("box deltas' gradient", l1(&deltas), 0.9525490, 1e-5);
    // A row order that is no permutation, and a label beyond the classes, are refused.
    let (mut bad, _, _) = outputs(&order);
    bad.order[0] = bad.order[1];
    assert!(m.box_losses(&bad, &labels, &targets).is_err());
    let mut wrong = labels.clone();
    wrong[0] = K as u32;
    assert!(m.box_losses(&out, &wrong, &targets).is_err());
}

#[test]
fn box_head_detections_equal_torchvisions_postprocess_detections() {
    let m = FasterRcnn::new(K, &LayerPolicy::fp32(), 0).unwrap();
    // Rows in another order than the regions: odd regions first.
    let order: Vec<usize> = (0..R).filter(|r| r % 2 == 1).chain((0..R).filter(|r| r % 2 == 0)).collect();
    let (out, _, _) = outputs(&order);
    let dets = m.postprocess(&out, &rois(), 2, (96, 128)).unwrap();
    let want: [common::Summary; 2] = [
        (
            40,
            11.883335,
            8923.5752,
            79,
            [
                ([34.0849, 66.8325, 59.9769, 78.0816], 0.799025, 3),
                ([82.9978, 30.3596, 90.9626, 64.9102], 0.790664, 3),
                ([88.664, 34.5982, 97.464, 65.984], 0.754470, 3),
            ],
        ),
        (
            36,
            9.952813,
            7907.9512,
            69,
            [
                ([57.4303, 13.3904, 90.3378, 33.4062], 0.800047, 3),
                ([8.1405, 49.2517, 28.7915, 96.0], 0.795962, 3),
                ([64.4165, 18.0971, 99.1081, 39.2015], 0.706939, 3),
            ],
        ),
    ];
    common::check_against_torchvision(&dets, &want, |i, scores, coords, w| {
        close(&format!("image {i} score sum"), scores, w.1, 1e-5);
        close(&format!("image {i} coordinate sum"), coords, w.2, 1e-5);
    });
    assert!(m.postprocess(&out, &rois(), 1, (96, 128)).is_err(), "regions of image 1 in a batch of one");
}
