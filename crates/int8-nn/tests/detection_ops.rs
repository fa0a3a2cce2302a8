//! The detection ops on the tape: each one's gradient, reached through the tape's backward pass,
//! against central differences of its own forward pass.

use int8_core::nn::detection::RoiAlign;
use int8_core::rng::CounterRng;
use int8_nn::Tensor;
use int8_nn::ops::detection::{l2norm, multibox, roi_align, sigmoid_focal, smooth_l1, upsample_nearest};

fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let r = CounterRng::new(seed);
    (0..n).map(|i| (r.uniform(i as u64) * 2.0 - 1.0) * scale).collect()
}

/// Checks the tape's gradient of `f` at `x` against central differences, at every input.
fn check(what: &str, x: &[f32], dims: &[usize], f: impl Fn(&Tensor) -> Tensor, tol: f64) {
    let xt = Tensor::from_vec(x.to_vec(), dims).unwrap().requires_grad();
    let g = f(&xt).backward().unwrap().get(&xt).unwrap().to_vec();
    for i in 0..x.len() {
        let at = |d: f32| {
            let mut v = x.to_vec();
            v[i] += d;
            f64::from(f(&Tensor::from_vec(v, dims).unwrap()).to_scalar().unwrap())
        };
        let fd = (at(1e-2) - at(-1e-2)) / 2e-2;
        assert!((fd - f64::from(g[i])).abs() < tol * fd.abs().max(1.0), "{what}[{i}]: {fd} vs {}", g[i]);
    }
}

#[test]
fn roi_align_upsampling_and_l2norm_gradients_match_finite_differences() {
    let dims = [2, 3, 6, 7];
    let x = uniform(2 * 3 * 6 * 7, 1, 1.0);
    let rois = [[0.0, 1.3, 0.7, 9.1, 8.2], [1.0, 2.0, 2.0, 5.5, 4.5]];
    let cfg = RoiAlign { pooled: (2, 3), spatial_scale: 0.5, sampling_ratio: 2, aligned: true };
    let r = Tensor::from_vec(uniform(2 * 3 * 2 * 3, 2, 1.0), [2, 3, 2, 3]).unwrap();
    // Piecewise linear in x: finite differences are exact away from the sample grid's cells.
    check("roi-align", &x, &dims, |t| roi_align(t, &rois, cfg).unwrap().mul(&r).unwrap().sum_all().unwrap(), 1e-3);
    let ru = Tensor::from_vec(uniform(2 * 3 * 11 * 13, 3, 1.0), [2, 3, 11, 13]).unwrap();
    check("upsample", &x, &dims, |t| upsample_nearest(t, (11, 13)).unwrap().mul(&ru).unwrap().sum_all().unwrap(), 1e-3);
    let w = Tensor::from_vec(vec![20.0, 10.0, 2.0], 3).unwrap();
    let rl = Tensor::from_vec(uniform(x.len(), 4, 1.0), dims).unwrap();
    check("l2norm", &x, &dims, |t| l2norm(t, &w).unwrap().mul(&rl).unwrap().sum_all().unwrap(), 2e-2);
    // The weight's gradient too.
    let xt = Tensor::from_vec(x.clone(), dims).unwrap();
    check(
        "l2norm weight",
        &[20.0, 10.0, 2.0],
        &[3],
        |wt| l2norm(&xt, wt).unwrap().mul(&rl).unwrap().sum_all().unwrap(),
        1e-3,
    );
}

#[test]
fn the_losses_gradients_match_finite_differences() {
    let p = uniform(24, 5, 2.0);
    let t = uniform(24, 6, 2.0);
    check("smooth-l1", &p, &[6, 4], |x| smooth_l1(x, &t, 1.0 / 9.0).unwrap(), 2e-2);
    let targets: Vec<f32> = (0..24).map(|i| f32::from(u8::from(i % 5 == 0))).collect();
    check("focal", &p, &[6, 4], |x| sigmoid_focal(x, &targets, 0.25, 2.0).unwrap(), 1e-3);
    // MultiBox over a tracked head: gradients reach both the logits and the boxes.
    let (images, anchors, classes) = (2, 6, 3);
    let logits = uniform(images * anchors * classes, 7, 2.0);
    let reg = uniform(images * anchors * 4, 8, 1.0);
    let targets = uniform(images * anchors * 4, 9, 1.0);
    let mut labels = vec![0u32; images * anchors];
    labels[2] = 1;
    labels[anchors + 4] = 2;
    let regt = Tensor::from_vec(reg.clone(), [images, anchors, 4]).unwrap();
    check(
        "multibox logits",
        &logits,
        &[images, anchors, classes],
        |l| multibox(l, &regt, &labels, &targets, 3).unwrap().classification,
        1e-3,
    );
    let lt = Tensor::from_vec(logits, [images, anchors, classes]).unwrap();
    let boxes = |b: &Tensor| multibox(&lt, b, &labels, &targets, 3).unwrap().box_regression;
    check("multibox boxes", &reg, &[images, anchors, 4], boxes, 1e-2);
    let m = multibox(&lt, &regt, &labels, &targets, 3).unwrap();
    assert_eq!(m.positives, 2);
    // The two parts are the kernel's, which sum to the loss it is checked for.
    let whole =
        int8_core::nn::detection_loss::multibox((images, anchors, classes), &lt.to_vec(), &reg, &labels, &targets, 3)
            .unwrap();
    let parts = [m.classification.to_scalar().unwrap(), m.box_regression.to_scalar().unwrap()];
    assert_eq!(parts.map(f64::from), [whole.cls_loss as f32, whole.box_loss as f32].map(f64::from));
    assert!(whole.box_loss > 0.0 && whole.cls_loss > 0.0);
    assert!(multibox(&lt, &lt, &labels, &targets, 3).is_err(), "box regression of the wrong shape");
}
