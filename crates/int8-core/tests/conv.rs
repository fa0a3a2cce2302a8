//! Convolution kernels against the naive f64 reference: FP32 within 1e-5 of the sum of absolute
//! terms, INT8 exact on every instruction-set path this CPU can run.

mod common;
use common::{codes, f64s, floats};

use int8_core::conv::{
    ConvShape, QView, conv2d_dw_f32, conv2d_dw_i8, conv2d_dx_f32, conv2d_dx_i8, conv2d_fwd_f32, conv2d_fwd_i8,
    quantize_subsample, quantize_subsample_with_clip, reference, strided_pointwise, subsample, upsample,
};
use int8_core::gemm::Int8Path;
use int8_core::rng::CounterRng;

/// `base` with a 3x2 kernel, stride (3, 2), dilation (2, 3) and padding (3, 1): every axis different.
fn uneven(base: ConvShape) -> ConvShape {
    ConvShape { kh: 3, kw: 2, stride: (3, 2), dilation: (2, 3), pad: (3, 1), ..base }
}

fn shapes() -> Vec<(&'static str, ConvShape)> {
    let sq = ConvShape::square;
    vec![
        ("3x3 s1 p1", sq(2, 3, 7, 5, 3, 1, 1)),
        ("3x3 s2 p1 odd", sq(2, 4, 9, 6, 3, 2, 1)),
        ("3x3 dilation 2", ConvShape { dilation: (2, 2), pad: (2, 2), ..sq(2, 3, 8, 4, 3, 1, 2) }),
        (
            "1x3 rect stride (1,2)",
            ConvShape { h: 5, w: 8, kh: 1, kw: 3, stride: (1, 2), pad: (0, 1), ..sq(2, 3, 5, 4, 3, 1, 1) },
        ),
        ("groups 2", sq(2, 4, 6, 6, 3, 1, 1).with_groups(2)),
        ("depthwise 3x3 s1", sq(2, 5, 7, 5, 3, 1, 1).with_groups(5)),
        ("depthwise 3x3 s2", sq(3, 4, 9, 4, 3, 2, 1).with_groups(4)),
        (
            "depthwise 5x5 dilated",
            ConvShape { dilation: (2, 1), pad: (4, 2), ..sq(2, 3, 9, 3, 5, 1, 2).with_groups(3) },
        ),
        ("depthwise 3x3 s2 16x16 (even: the stride phases split evenly)", sq(2, 3, 16, 3, 3, 2, 1).with_groups(3)),
        ("depthwise 5x5 s2 p2 7x7", sq(2, 2, 7, 2, 5, 2, 2).with_groups(2)),
        ("depthwise 3x2 stride (3,2) dilation (2,3)", uneven(sq(2, 3, 11, 3, 3, 1, 1).with_groups(3))),
        ("depthwise 2x2 s3: pixels no tap reads", sq(2, 2, 10, 2, 2, 3, 0).with_groups(2)),
        ("depthwise multiplier 2", sq(2, 3, 6, 6, 3, 1, 1).with_groups(3)),
        ("pointwise 1x1", sq(3, 8, 6, 4, 1, 1, 0)),
        ("1x1 stride 2", sq(2, 4, 7, 6, 1, 2, 0)),
        ("batch 1", sq(1, 6, 10, 7, 3, 1, 1)),
        ("batch 9 (weight-gradient tasks of several images)", sq(9, 3, 6, 4, 3, 2, 1)),
        ("3x3 s1 p1 8x8 (planes of whole 32-column panels, packed from the image)", sq(2, 5, 8, 6, 3, 1, 1)),
        ("3x3 s2 p1 16x16 (split planes packed from the image)", sq(2, 3, 16, 4, 3, 2, 1)),
        ("3x3 s2 p1 16x16, 5 outputs (dX phases with partial groups of 4)", sq(2, 3, 16, 5, 3, 2, 1)),
        ("3x3 s2 p1 32x32 (byte planes split into four phases by one permute per 64 bytes)", sq(1, 2, 32, 3, 3, 2, 1)),
        (
            "3x3 s1 p1 8x16, 11 channels (a reduction past one group of 4)",
            ConvShape { h: 8, w: 16, ..sq(2, 11, 8, 9, 3, 1, 1) },
        ),
        ("5x5 to 1x1", sq(2, 2, 5, 3, 5, 1, 0)),
        ("3x3 s1 p1 6x6, 128 channels (two tiles of 64 channels per tap on AMX)", sq(2, 128, 6, 20, 3, 1, 1)),
        (
            "3x3 s1 p1 48x64 (two bands of rows on AMX, the last shorter)",
            ConvShape { h: 48, w: 64, ..sq(2, 5, 8, 20, 3, 1, 1) },
        ),
        ("3x3 s1 p1 3x2100 (bands of one row on AMX)", ConvShape { h: 3, w: 2100, ..sq(1, 4, 8, 4, 3, 1, 1) }),
        (
            "5x3 s1 p(2,1), 40 outputs (on AMX three blocks of 16 at once, the last partial)",
            ConvShape { kh: 5, kw: 3, pad: (2, 1), ..sq(2, 6, 7, 40, 3, 1, 1) },
        ),
        ("wide reduction", sq(2, 40, 5, 70, 3, 1, 1)),
        ("3x3 s2 p1 even", sq(2, 5, 8, 7, 3, 2, 1)),
        ("3x3 s2 p1, rows longer than one vector (71 wide)", sq(1, 2, 71, 3, 3, 2, 1)),
        ("3x3 s2 p1, even rows longer than one vector (70 wide)", sq(1, 2, 70, 3, 3, 2, 1)),
        ("1x1 s2 even (the split input is the operand)", sq(2, 3, 8, 4, 1, 2, 0)),
        ("1x1 s2 16x16, 16->32 (ResNet-20's shortcut)", sq(2, 16, 16, 32, 1, 2, 0)),
        (
            "1x1 8x8, 20->16 (AMX dW: the gradient's rows read in place, a partial block of inputs)",
            sq(3, 20, 8, 16, 1, 1, 0),
        ),
        (
            "1x1 8x16, 40->32 (AMX dW: two blocks each way, rows of two tiles)",
            ConvShape { h: 8, w: 16, ..sq(2, 40, 8, 32, 1, 1, 0) },
        ),
        ("planes of 576 pixels (one image per weight-gradient GEMM)", sq(3, 2, 24, 3, 3, 1, 1)),
        (
            "1x1 groups 2 over 16x16 planes (FP32 weight gradients as dot products along the plane)",
            sq(2, 4, 16, 6, 1, 1, 0).with_groups(2),
        ),
        ("5x5 s2 p2", sq(2, 3, 9, 4, 5, 2, 2)),
        ("2x2 s3: phases no tap reaches", sq(2, 3, 10, 4, 2, 3, 0)),
        ("3x2 stride (3,2) dilation (2,3) groups 2", uneven(sq(2, 4, 11, 6, 3, 1, 1).with_groups(2))),
        ("1x1 pad 1 (padding wider than the kernel)", sq(2, 3, 5, 4, 1, 1, 1)),
    ]
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

/// `|got - want| <= 1e-5 * bound` per element, where `bound` is the sum of absolute terms.
fn assert_close(what: &str, got: &[f32], want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        assert!((g as f64 - w).abs() <= 1e-5 * b + 1e-30, "{what} at {i}: got {g}, want {w} (bound {b})");
    }
}

#[test]
fn fp32_forward_and_gradients_match_f64() {
    for (name, s) in shapes() {
        let (x, w, dy) = (floats(s.x_len(), 1), floats(s.w_len(), 2), floats(s.y_len(), 3));
        let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
        let mut y = vec![f32::NAN; s.y_len()];
        conv2d_fwd_f32(&s, &x, &w, &mut y).unwrap();
        let bound = reference::conv2d_fwd(&s, &abs(&xd), &abs(&wd));
        assert_close(&format!("{name} fwd"), &y, &reference::conv2d_fwd(&s, &xd, &wd), &bound);

        let mut dx = vec![f32::NAN; s.x_len()];
        conv2d_dx_f32(&s, &w, &dy, &mut dx).unwrap();
        let bound = reference::conv2d_dx(&s, &abs(&wd), &abs(&dyd));
        assert_close(&format!("{name} dx"), &dx, &reference::conv2d_dx(&s, &wd, &dyd), &bound);

        let mut dw = vec![f32::NAN; s.w_len()];
        conv2d_dw_f32(&s, &x, &dy, &mut dw).unwrap();
        let bound = reference::conv2d_dw(&s, &abs(&xd), &abs(&dyd));
        assert_close(&format!("{name} dw"), &dw, &reference::conv2d_dw(&s, &xd, &dyd), &bound);
    }
}

/// With unit scales the INT8 outputs are the integer sums themselves, exact in f32 below 2^24.
#[test]
fn int8_forward_and_gradients_are_exact_on_every_path() {
    let one = [1.0f32];
    for path in Int8Path::available() {
        for (name, s) in shapes() {
            let (x, w, dy) = (codes(s.x_len(), 4), codes(s.w_len(), 5), codes(s.y_len(), 6));
            let (xq, wq, dyq) = (
                QView { codes: &x, scales: &one },
                QView { codes: &w, scales: &one },
                QView { codes: &dy, scales: &one },
            );
            let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
            let exact = |what: &str, got: &[f32], want: Vec<f64>| {
                assert!(want.iter().all(|v| v.abs() < (1 << 24) as f64), "{name}: test sums too large for exact f32");
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g as f64, w, "{} {name} {what} at {i}", path.name());
                }
            };
            let mut y = vec![f32::NAN; s.y_len()];
            conv2d_fwd_i8(path, &s, xq, wq, &mut y).unwrap();
            exact("fwd", &y, reference::conv2d_fwd(&s, &xd, &wd));
            let mut dx = vec![f32::NAN; s.x_len()];
            conv2d_dx_i8(path, &s, wq, dyq, &mut dx).unwrap();
            exact("dx", &dx, reference::conv2d_dx(&s, &wd, &dyd));
            let mut dw = vec![f32::NAN; s.w_len()];
            conv2d_dw_i8(path, &s, xq, dyq, &mut dw).unwrap();
            exact("dw", &dw, reference::conv2d_dw(&s, &xd, &dyd));
        }
    }
}

/// A strided 1x1 convolution is its subsample followed by a stride-1 one: forward, input gradient
/// (placed back, zero at the pixels never read, by `upsample` and by the strided shape's own
/// kernel) and weight gradient, in INT8 exactly and in f64.
#[test]
fn strided_pointwise_is_a_subsample_then_a_pointwise_convolution() {
    let sq = ConvShape::square;
    let one = [1.0f32];
    for s in [
        sq(2, 4, 7, 6, 1, 2, 0),
        sq(2, 3, 8, 5, 1, 2, 0),
        ConvShape { stride: (3, 2), h: 10, w: 9, ..sq(2, 3, 9, 4, 1, 1, 0) },
        sq(1, 2, 70, 3, 1, 2, 0),
    ] {
        let p = strided_pointwise(&s).expect("applies");
        assert!(p.is_pointwise() && (p.h, p.w) == (s.out_h(), s.out_w()));
        assert!(strided_pointwise(&p).is_none() && strided_pointwise(&sq(1, 2, 5, 2, 3, 2, 1)).is_none());
        let (x, w, dy) = (codes(s.x_len(), 7), codes(s.w_len(), 8), codes(s.y_len(), 9));
        let sub = subsample(&s, &x);
        assert_eq!(sub.len(), p.x_len());
        let (xq, wq, dyq) = (
            QView { codes: &sub, scales: &one },
            QView { codes: &w, scales: &one },
            QView { codes: &dy, scales: &one },
        );
        let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
        let path = Int8Path::detect();
        let mut y = vec![f32::NAN; p.y_len()];
        conv2d_fwd_i8(path, &p, xq, wq, &mut y).unwrap();
        assert_eq!(f64s(&y), reference::conv2d_fwd(&s, &xd, &wd), "{s:?} fwd");
        let mut dx_sub = vec![f32::NAN; p.x_len()];
        conv2d_dx_i8(path, &p, wq, dyq, &mut dx_sub).unwrap();
        let mut dx = vec![f32::NAN; s.x_len()];
        upsample(&s, &dx_sub, &mut dx);
        assert_eq!(f64s(&dx), reference::conv2d_dx(&s, &wd, &dyd), "{s:?} dx");
        // The kernel of the strided shape places its gradient itself, every pixel written.
        let mut placed = vec![f32::NAN; s.x_len()];
        conv2d_dx_i8(path, &s, wq, dyq, &mut placed).unwrap();
        assert_eq!(placed, dx, "{s:?} dx placed by the kernel");
        let mut dw = vec![f32::NAN; s.w_len()];
        conv2d_dw_i8(path, &p, xq, dyq, &mut dw).unwrap();
        assert_eq!(f64s(&dw), reference::conv2d_dw(&s, &xd, &dyd), "{s:?} dw");
    }
}

/// The codes of a strided 1x1 convolution's input, made straight from X, are those of quantizing
/// its subsample, at its own maximum or at a given clip value: codes, scale and saturation count,
/// for strides 2 and 3 and odd sizes; a value that is not finite among the pixels read is the
/// same error, and one outside them is no error.
#[test]
fn the_subsample_is_quantized_as_its_copy_would_be() {
    use int8_core::quant::{Granularity, Rounding, quantize, quantize_with_clip};
    let sq = ConvShape::square;
    for s in [
        sq(3, 4, 7, 6, 1, 2, 0),
        sq(2, 16, 32, 32, 1, 2, 0),
        ConvShape { stride: (3, 2), h: 10, w: 9, ..sq(2, 3, 9, 4, 1, 1, 0) },
    ] {
        let r = CounterRng::new(s.x_len() as u64);
        let mut x: Vec<f32> = (0..s.x_len()).map(|i| (r.uniform(i as u64) - 0.5) * 8.0).collect();
        // The largest magnitude sits off the grid, so that a quantizer of all of X would differ.
        x[1] = 100.0;
        let want = quantize("x", &subsample(&s, &x), Granularity::PerTensor, 1, Rounding::Nearest).unwrap();
        let got = quantize_subsample("x", &s, &x).unwrap();
        assert_eq!(got, want, "{s:?}");
        assert!(got.scales[0] < 100.0 / 127.0, "{s:?}: the off-grid maximum must not set the scale");
        // At a given clip value (X's maximum, or one that saturates some codes).
        for clip in [100.0, 1.5] {
            let want = quantize_with_clip("x", &subsample(&s, &x), clip, Rounding::Nearest).unwrap();
            let got = quantize_subsample_with_clip("x", &s, &x, clip).unwrap();
            assert_eq!(got, want, "{s:?} at clip {clip}");
            assert_eq!(got.saturated > 0, clip < 4.0, "{s:?} at clip {clip}");
        }
        assert!(quantize_subsample_with_clip("x", &s, &x, f32::NAN).is_err());
        x[1] = f32::NAN;
        assert!(quantize_subsample("x", &s, &x).is_ok(), "{s:?}: a NaN the convolution never reads");
        assert!(quantize_subsample_with_clip("x", &s, &x, 100.0).is_ok(), "{s:?}: the same at a clip value");
        x[s.w * s.stride.0 + s.stride.1] = f32::INFINITY;
        let want = quantize("x", &subsample(&s, &x), Granularity::PerTensor, 1, Rounding::Nearest).unwrap_err();
        let got = quantize_subsample("x", &s, &x).unwrap_err();
        assert_eq!(got.to_string(), want.to_string(), "{s:?}");
        let want = quantize_with_clip("x", &subsample(&s, &x), 100.0, Rounding::Nearest).unwrap_err();
        let got = quantize_subsample_with_clip("x", &s, &x, 100.0).unwrap_err();
        assert_eq!(got.to_string(), want.to_string(), "{s:?} at a clip value");
    }
    assert!(quantize_subsample("x", &sq(1, 2, 5, 2, 1, 2, 0), &[0.0; 3]).is_err());
}

#[test]
fn int8_scales_apply_per_tensor_and_per_output_channel() {
    let s = ConvShape::square(2, 3, 6, 4, 3, 1, 1);
    let (x, w, dy) = (codes(s.x_len(), 7), codes(s.w_len(), 8), codes(s.y_len(), 9));
    let (sx, sdy) = ([0.03f32], [0.002f32]);
    let sw = [0.5f32, 0.25, 0.125, 1.5];
    let path = Int8Path::detect();
    let mut y = vec![0.0; s.y_len()];
    conv2d_fwd_i8(path, &s, QView { codes: &x, scales: &sx }, QView { codes: &w, scales: &sw }, &mut y).unwrap();
    // Dequantize first, then convolve in f64: the same numbers.
    let xd: Vec<f64> = x.iter().map(|&v| v as f64 * sx[0] as f64).collect();
    let wd: Vec<f64> = w.iter().enumerate().map(|(i, &v)| v as f64 * sw[i / s.k_group()] as f64).collect();
    let want = reference::conv2d_fwd(&s, &xd, &wd);
    for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
        assert!((g as f64 - w).abs() <= 1e-6 * w.abs().max(1.0), "fwd at {i}: {g} vs {w}");
    }
    let mut dw = vec![0.0; s.w_len()];
    conv2d_dw_i8(path, &s, QView { codes: &x, scales: &sx }, QView { codes: &dy, scales: &sdy }, &mut dw).unwrap();
    let dyd: Vec<f64> = dy.iter().map(|&v| v as f64 * sdy[0] as f64).collect();
    for (i, (&g, &w)) in dw.iter().zip(&reference::conv2d_dw(&s, &xd, &dyd)).enumerate() {
        assert!((g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3), "dw at {i}: {g} vs {w}");
    }
    // The input gradient sums over output channels, so per-channel weight scales are refused.
    let mut dx = vec![0.0; s.x_len()];
    let err = conv2d_dx_i8(path, &s, QView { codes: &w, scales: &sw }, QView { codes: &dy, scales: &sdy }, &mut dx)
        .unwrap_err();
    assert!(err.to_string().contains("per tensor"), "{err}");

    // A depthwise convolution's input channels each take one output channel's gradient, so there
    // per-channel weight scales apply to the input gradient too (one per channel, no other count).
    for s in
        [ConvShape::square(2, 4, 7, 4, 3, 1, 1).with_groups(4), ConvShape::square(2, 4, 8, 4, 3, 2, 1).with_groups(4)]
    {
        assert!(s.is_depthwise());
        let (w, dy) = (codes(s.w_len(), 10), codes(s.y_len(), 11));
        let wd: Vec<f64> = w.iter().enumerate().map(|(i, &v)| v as f64 * sw[i / s.k_group()] as f64).collect();
        let dyd: Vec<f64> = dy.iter().map(|&v| v as f64 * sdy[0] as f64).collect();
        let mut dx = vec![f32::NAN; s.x_len()];
        conv2d_dx_i8(path, &s, QView { codes: &w, scales: &sw }, QView { codes: &dy, scales: &sdy }, &mut dx).unwrap();
        for (i, (&g, &w)) in dx.iter().zip(&reference::conv2d_dx(&s, &wd, &dyd)).enumerate() {
            assert!((g as f64 - w).abs() <= 1e-6 * w.abs().max(1e-3), "depthwise {s:?} dx at {i}: {g} vs {w}");
        }
        let three = QView { codes: &w, scales: &sw[..3] };
        let err = conv2d_dx_i8(path, &s, three, QView { codes: &dy, scales: &sdy }, &mut dx).unwrap_err();
        assert!(err.to_string().contains("one scale or one per channel (4), got 3"), "{err}");
    }
}

/// The weight gradient sums over batch x H x W: here 64 x 64 x 64 = 262,144 products of 127 x 127,
/// 4.2e9 in all, beyond i32. The batch sum must still be exact.
#[test]
fn int8_weight_gradient_does_not_overflow_over_a_large_batch() {
    // Large planes (one image per GEMM), and 4x4 planes (many images side by side per GEMM).
    let sq = ConvShape::square;
    for s in
        [sq(64, 1, 64, 1, 1, 1, 0), sq(64, 1, 64, 2, 3, 1, 1), sq(9000, 1, 4, 1, 1, 1, 0), sq(9000, 1, 4, 2, 3, 1, 1)]
    {
        let x = vec![127i8; s.x_len()];
        let dy = vec![127i8; s.y_len()];
        let one = [1.0f32];
        let want = reference::conv2d_dw(&s, &f64s(&x), &f64s(&dy));
        assert!(want.iter().any(|&v| v > i32::MAX as f64));
        for path in Int8Path::available() {
            let mut dw = vec![0.0; s.w_len()];
            conv2d_dw_i8(path, &s, QView { codes: &x, scales: &one }, QView { codes: &dy, scales: &one }, &mut dw)
                .unwrap();
            for (&g, &w) in dw.iter().zip(&want) {
                assert_eq!(g, w as f32, "{}", path.name());
            }
        }
    }
}

#[test]
fn bad_shapes_and_buffers_are_clear_errors() {
    let ok = ConvShape::square(1, 4, 5, 4, 3, 1, 1);
    let cases = [
        (ConvShape { groups: 3, ..ok }, "groups"),
        (ConvShape::square(1, 4, 2, 4, 5, 1, 0), "larger than the padded"),
        (ConvShape { stride: (0, 1), ..ok }, "zero"),
    ];
    for (s, needle) in cases {
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
        let mut y = vec![0.0; 1];
        assert!(conv2d_fwd_f32(&s, &[0.0], &[0.0], &mut y).is_err());
    }
    let mut y = vec![0.0; ok.y_len()];
    let err = conv2d_fwd_f32(&ok, &vec![0.0; ok.x_len() - 1], &vec![0.0; ok.w_len()], &mut y).unwrap_err();
    assert!(err.to_string().contains("conv input"), "{err}");
    let x = vec![0i8; ok.x_len()];
    let w = vec![0i8; ok.w_len()];
    let err = conv2d_fwd_i8(
        Int8Path::Portable,
        &ok,
        QView { codes: &x, scales: &[1.0, 2.0] },
        QView { codes: &w, scales: &[1.0] },
        &mut y,
    )
    .unwrap_err();
    assert!(err.to_string().contains("per tensor"), "{err}");
}
