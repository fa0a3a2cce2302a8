//! The INT8 depthwise convolutions through the public API, on every MobileNetV2 (CIFAR) depthwise
//! layer's shape at a batch of 2, against the naive f64 reference: the integer sums exact, and
//! the scales applied exactly as `conv2d_*_i8` define them (forward `sum * (s_x * s_w[c])`, input
//! gradient `sum * (s_w[c] * s_dy)`, weight gradient `sum * (s_x * s_dy)` in f64), with the weight
//! per tensor and per channel, on the kernel this CPU runs (the kernels' own tests run every
//! kernel the CPU has).

mod common;
use common::{codes, f64s};

use int8_core::conv::{ConvShape, QView, conv2d_dw_i8, conv2d_dx_i8, conv2d_fwd_i8, reference};
use int8_core::gemm::Int8Path;

/// MobileNetV2's depthwise layers with CIFAR strides: (channels, input size, stride).
const LAYERS: [(usize, usize, usize); 10] = [
    (32, 32, 1),
    (96, 32, 1),
    (144, 32, 1),
    (144, 32, 2),
    (192, 16, 1),
    (192, 16, 2),
    (384, 8, 1),
    (576, 8, 1),
    (576, 8, 2),
    (960, 4, 1),
];

#[test]
fn mobilenet_depthwise_layers_are_exact_and_scaled_as_defined() {
    let path = Int8Path::detect();
    for (c, hw, stride) in LAYERS {
        let s = ConvShape::square(2, c, hw, c, 3, stride, 1).with_groups(c);
        let (x, w, dy) = (codes(s.x_len(), 1), codes(s.w_len(), 2), codes(s.y_len(), 3));
        let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
        let (y_sum, dx_sum, dw_sum) = (
            reference::conv2d_fwd(&s, &xd, &wd),
            reference::conv2d_dx(&s, &wd, &dyd),
            reference::conv2d_dw(&s, &xd, &dyd),
        );
        let (sx, sdy) = ([0.0213f32], [0.00071f32]);
        let per_channel: Vec<f32> = (0..c).map(|i| 0.0037 * (1 + i % 7) as f32 + 0.001).collect();
        for sw in [&[0.0119f32][..], &per_channel] {
            let scale_w = |ch: usize| sw[if sw.len() == 1 { 0 } else { ch }];
            let name = format!("depthwise {c} {hw}x{hw} s{stride}, {} weight scales", sw.len());
            let (xq, wq, dyq) =
                (QView { codes: &x, scales: &sx }, QView { codes: &w, scales: sw }, QView { codes: &dy, scales: &sdy });
            let mut y = vec![f32::NAN; s.y_len()];
            conv2d_fwd_i8(path, &s, xq, wq, &mut y).unwrap();
            for (i, (&g, &v)) in y.iter().zip(&y_sum).enumerate() {
                let want = v as f32 * (sx[0] * scale_w(i / s.out_plane() % c));
                assert_eq!(g.to_bits(), want.to_bits(), "{name} forward at {i}: {g} vs {want}");
            }
            let mut dx = vec![f32::NAN; s.x_len()];
            conv2d_dx_i8(path, &s, wq, dyq, &mut dx).unwrap();
            for (i, (&g, &v)) in dx.iter().zip(&dx_sum).enumerate() {
                let want = v as f32 * (scale_w(i / s.in_plane() % c) * sdy[0]);
                assert_eq!(g.to_bits(), want.to_bits(), "{name} input gradient at {i}: {g} vs {want}");
            }
        }
        let mut dw = vec![f32::NAN; s.w_len()];
        conv2d_dw_i8(path, &s, QView { codes: &x, scales: &sx }, QView { codes: &dy, scales: &sdy }, &mut dw).unwrap();
        let sc = sx[0] as f64 * sdy[0] as f64;
        for (i, (&g, &v)) in dw.iter().zip(&dw_sum).enumerate() {
            let want = (v * sc) as f32;
            assert_eq!(g.to_bits(), want.to_bits(), "depthwise {c} {hw}x{hw} s{stride} weight gradient at {i}");
        }
    }
}
