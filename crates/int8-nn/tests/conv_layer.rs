//! The conv layer on the tape, against independent references: the f64 convolution of
//! `int8-core`, finite differences of it, and for INT8 the f64 convolution of the quantized codes
//! (which an FP32 layer would not match) and the FP32 layer.

use int8_core::conv::{ConvShape, reference};
use int8_core::dclr::Dclr;
use int8_core::dsgc::{ClipMode, cosine_distance};
use int8_core::quant::{Granularity, Rounding, quantize};
use int8_core::rng::CounterRng;
use int8_nn::layers::Conv2d;
use int8_nn::precision::{Int8Config, Precision};
use int8_nn::{ConvGeometry, Tensor};

fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| rng.uniform(i as u64) * 2.0 - 1.0).collect()
}

/// Laplace samples: the sharp, wide shape of real gradients.
fn laplace(n: usize, seed: u64) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n)
        .map(|i| {
            let u = rng.uniform_f64(i as u64) - 0.5;
            (-u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln()) as f32 * 1e-3
        })
        .collect()
}

fn shape_of(x: &[usize], w: &[usize], g: ConvGeometry) -> ConvShape {
    g.shape("test", x, w).unwrap()
}

fn tensor(data: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(data, dims).unwrap()
}

/// An input that wants its gradient.
fn var(data: Vec<f32>, dims: &[usize]) -> Tensor {
    tensor(data, dims).requires_grad()
}

/// Runs `sum(conv(x, w) * r)` forward and backward; returns `(y, dx, dw)`.
fn run(layer: &Conv2d, x: &Tensor, r: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let y = layer.forward(x).unwrap();
    let rt = Tensor::from_vec(r.to_vec(), y.dims()).unwrap();
    let grads = y.mul(&rt).unwrap().sum_all().unwrap().backward().unwrap();
    (y.to_vec(), grads.get(x).unwrap().to_vec(), grads.of(layer.weight()).unwrap().to_vec())
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn fp32_layer_matches_the_f64_reference_and_finite_differences() {
    let cases = [
        ([2, 3, 6, 6], [4, 3, 3, 3], ConvGeometry { padding: (1, 1), ..Default::default() }),
        ([2, 4, 7, 7], [6, 4, 3, 3], ConvGeometry { stride: 2, padding: (1, 1), ..Default::default() }),
        ([2, 4, 7, 7], [6, 4, 1, 1], ConvGeometry { stride: 2, ..Default::default() }),
        ([1, 4, 5, 5], [4, 2, 3, 3], ConvGeometry { padding: (1, 1), groups: 2, ..Default::default() }),
        ([2, 3, 5, 5], [3, 1, 3, 3], ConvGeometry { padding: (1, 1), groups: 3, ..Default::default() }),
    ];
    for (xd, wd, g) in cases {
        let s = shape_of(&xd, &wd, g);
        let (xv, wv, r) = (uniform(s.x_len(), 1), uniform(s.w_len(), 2), uniform(s.y_len(), 3));
        let layer = Conv2d::new("fp32", tensor(wv.clone(), &wd), g, Precision::Fp32).unwrap();
        let x = var(xv.clone(), &xd);
        let (y, dx, dw) = run(&layer, &x, &r);
        let close = |what: &str, got: &[f32], want: &[f64]| {
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
                assert!((a as f64 - b).abs() <= 1e-5 * scale, "{what} {xd:?} at {i}: {a} vs {b}");
            }
        };
        close("y", &y, &reference::conv2d_fwd(&s, &f64s(&xv), &f64s(&wv)));
        close("dx", &dx, &reference::conv2d_dx(&s, &f64s(&wv), &f64s(&r)));
        close("dw", &dw, &reference::conv2d_dw(&s, &f64s(&xv), &f64s(&r)));
        // Central differences of the f64 loss at a few inputs and weights.
        let loss = |x: &[f64], w: &[f64]| -> f64 {
            reference::conv2d_fwd(&s, x, w).iter().zip(&r).map(|(a, &b)| a * b as f64).sum()
        };
        let h = 1e-3;
        for i in [0, s.x_len() / 3, s.x_len() - 1] {
            let (mut xp, mut xm) = (f64s(&xv), f64s(&xv));
            xp[i] += h;
            xm[i] -= h;
            let fd = (loss(&xp, &f64s(&wv)) - loss(&xm, &f64s(&wv))) / (2.0 * h);
            assert!((fd - dx[i] as f64).abs() < 1e-4, "dx[{i}] {xd:?}: finite difference {fd} vs {}", dx[i]);
        }
        for i in [0, s.w_len() / 2, s.w_len() - 1] {
            let (mut wp, mut wm) = (f64s(&wv), f64s(&wv));
            wp[i] += h;
            wm[i] -= h;
            let fd = (loss(&f64s(&xv), &wp) - loss(&f64s(&xv), &wm)) / (2.0 * h);
            assert!((fd - dw[i] as f64).abs() < 1e-4, "dw[{i}] {xd:?}: finite difference {fd} vs {}", dw[i]);
        }
    }
}

/// A layer-like setting: non-negative (post-ReLU) activations, small weights, and a sharp, wide
/// upstream gradient.
struct LayerLike {
    x: Vec<f32>,
    w: Vec<f32>,
    r: Vec<f32>,
    xd: [usize; 4],
    wd: [usize; 4],
    g: ConvGeometry,
}

fn layer_like(n: usize) -> LayerLike {
    let (xd, wd, g) = ([n, 16, 16, 16], [16, 16, 3, 3], ConvGeometry { padding: (1, 1), ..Default::default() });
    let s = shape_of(&xd, &wd, g);
    let x: Vec<f32> = uniform(s.x_len(), 4).iter().map(|v| v.max(0.0)).collect();
    let w: Vec<f32> = uniform(s.w_len(), 5).iter().map(|v| v * 0.1).collect();
    LayerLike { x, w, r: laplace(s.y_len(), 6), xd, wd, g }
}

#[test]
fn int8_gradients_track_fp32_with_dsgc() {
    let LayerLike { x: xv, w: wv, r, xd, wd, g } = layer_like(8);
    let fp32 = Conv2d::new("conv", tensor(wv.clone(), &wd), g, Precision::Fp32).unwrap();
    let int8 = Conv2d::new("conv", tensor(wv.clone(), &wd), g, Precision::Int8(Int8Config::default())).unwrap();
    let x = var(xv, &xd);
    let (y32, dx32, dw32) = run(&fp32, &x, &r);
    let (y8, dx8, dw8) = run(&int8, &x, &r);
    eprintln!(
        "int8 vs fp32 cosine: y {:.5}, dx {:.5}, dw {:.5}; stats {:?}",
        cosine(&y8, &y32),
        cosine(&dx8, &dx32),
        cosine(&dw8, &dw32),
        int8.quant().stats()
    );
    assert!(cosine(&y8, &y32) >= 0.999, "forward cosine {}", cosine(&y8, &y32));
    assert!(cosine(&dx8, &dx32) >= 0.99, "dx cosine {}", cosine(&dx8, &dx32));
    assert!(cosine(&dw8, &dw32) >= 0.99, "dw cosine {}", cosine(&dw8, &dw32));
    // The FP32 layer records nothing; the INT8 one records its step.
    assert_eq!(fp32.quant().stats().steps, 0);
    let st = int8.quant().stats();
    assert_eq!(st.steps, 1);
    assert!(st.searched, "DSGC searches on the first step");
    assert!(st.clip > 0.0 && st.distance > 0.0 && st.distance < 0.05, "{st:?}");
    assert_eq!(st.phi, Dclr::default().phi(st.distance));
    // DSGC clips some of a Laplace gradient: the fraction reported is the fraction beyond the
    // clip value, counted here.
    let beyond = r.iter().filter(|v| v.abs() > st.clip).count();
    assert!(beyond > 0, "{st:?}");
    assert_eq!(st.saturation_dy, beyond as f32 / r.len() as f32);
    assert_eq!((st.saturation_x, st.saturation_w), (0.0, 0.0));
}

#[test]
fn dsgc_distance_is_below_clipping_at_max_on_the_layer_gradient() {
    let LayerLike { x: xv, w: wv, r, xd, wd, g } = layer_like(4);
    let amax = r.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let maxclip = Precision::Int8(Int8Config { clip: ClipMode::MaxAbs, ..Default::default() });
    let layers = [
        Conv2d::new("dsgc", tensor(wv.clone(), &wd), g, Precision::Int8(Int8Config::default())).unwrap(),
        Conv2d::new("max", tensor(wv, &wd), g, maxclip).unwrap(),
    ];
    let x = var(xv, &xd);
    for l in &layers {
        l.quant().keep_grad(true);
        run(l, &x, &r);
    }
    let (dsgc, max) = (layers[0].quant().stats(), layers[1].quant().stats());
    assert_eq!(max.clip, amax);
    assert!((max.distance - cosine_distance(&r, amax)).abs() < 1e-9);
    assert!(dsgc.distance < max.distance, "dsgc {} vs clip-at-max {}", dsgc.distance, max.distance);
    assert!(dsgc.clip < amax);
    assert!(dsgc.phi > max.phi, "a closer gradient keeps more of its learning rate");
    assert_eq!(layers[0].quant().last_grad().as_deref(), Some(&r[..]));
}

#[test]
fn a_non_finite_gradient_is_an_error_naming_the_layer() {
    let LayerLike { x: xv, w: wv, mut r, xd, wd, g } = layer_like(2);
    r[17] = f32::NAN;
    let layer = Conv2d::new("layer1.0.conv1", tensor(wv, &wd), g, Precision::Int8(Int8Config::default())).unwrap();
    let x = var(xv, &xd);
    let y = layer.forward(&x).unwrap();
    let rt = Tensor::from_vec(r, y.dims()).unwrap();
    let err = y.mul(&rt).unwrap().sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("layer1.0.conv1.grad_output"), "{err}");
}

#[test]
fn mismatched_channels_are_a_clear_error() {
    let layer =
        Conv2d::new("stem", tensor(vec![0.0; 4 * 3 * 9], &[4, 3, 3, 3]), ConvGeometry::default(), Precision::Fp32)
            .unwrap();
    let x = Tensor::zeros((1, 5, 8, 8));
    let err = layer.forward(&x).unwrap_err().to_string();
    assert!(err.contains("stem") && err.contains("5 channels"), "{err}");
}

#[test]
fn per_channel_weights_still_track_fp32() {
    let LayerLike { x: xv, w: wv, r, xd, wd, g } = layer_like(4);
    // Give the output channels very different weight ranges, where per-channel scales matter.
    let wv: Vec<f32> = wv.iter().enumerate().map(|(i, v)| v * (1 + i / (16 * 9)) as f32).collect();
    let cfg = Int8Config { weight: int8_core::quant::Granularity::PerChannel, ..Default::default() };
    let fp32 = Conv2d::new("conv", tensor(wv.clone(), &wd), g, Precision::Fp32).unwrap();
    let int8 = Conv2d::new("conv", tensor(wv, &wd), g, Precision::Int8(cfg)).unwrap();
    let x = var(xv, &xd);
    let (y32, dx32, dw32) = run(&fp32, &x, &r);
    let (y8, dx8, dw8) = run(&int8, &x, &r);
    for (what, a, b) in [("y", &y8, &y32), ("dx", &dx8, &dx32), ("dw", &dw8, &dw32)] {
        assert!(cosine(a, b) >= 0.99, "{what} cosine {}", cosine(a, b));
    }
}

/// A depthwise layer's input channels each take one output channel's gradient, so its input
/// gradient keeps the per-channel weight scales: a channel with weights 100x smaller than the
/// others' gets an input gradient as good as theirs, where one scale for the tensor leaves its
/// weights a few codes.
#[test]
fn depthwise_input_gradient_keeps_per_channel_weight_scales() {
    let (n, c) = (4, 16);
    let (xd, wd) = ([n, c, 16, 16], [c, 1, 3, 3]);
    let g = ConvGeometry { padding: (1, 1), groups: c, ..Default::default() };
    let s = shape_of(&xd, &wd, g);
    assert!(s.is_depthwise());
    let xv: Vec<f32> = uniform(s.x_len(), 4).iter().map(|v| v.max(0.0)).collect();
    let wv: Vec<f32> =
        uniform(s.w_len(), 5).iter().enumerate().map(|(i, v)| if i < 9 { v * 1e-3 } else { v * 0.1 }).collect();
    let r = laplace(s.y_len(), 6);
    let x = var(xv, &xd);
    let (_, dx32, _) = run(&Conv2d::new("dw", tensor(wv.clone(), &wd), g, Precision::Fp32).unwrap(), &x, &r);
    // The input gradient of channel 0 (the small one) of every image.
    let plane = 16 * 16;
    let channel0 = |dx: &[f32]| -> Vec<f32> { dx.chunks(c * plane).flat_map(|img| img[..plane].to_vec()).collect() };
    let cos0 = |weight| {
        let cfg = Int8Config { weight, ..Default::default() };
        let (_, dx8, _) = run(&Conv2d::new("dw", tensor(wv.clone(), &wd), g, Precision::Int8(cfg)).unwrap(), &x, &r);
        (cosine(&channel0(&dx8), &channel0(&dx32)), cosine(&dx8, &dx32))
    };
    let (per_channel, per_channel_all) = cos0(int8_core::quant::Granularity::PerChannel);
    let (per_tensor, _) = cos0(int8_core::quant::Granularity::PerTensor);
    eprintln!("channel 0 dx cosine: per-channel {per_channel:.5}, per-tensor {per_tensor:.5}");
    assert!(per_channel >= 0.99 && per_channel_all >= 0.99, "per-channel: {per_channel}, {per_channel_all}");
    assert!(per_tensor < 0.99, "per-tensor scales should leave channel 0 a few codes: {per_tensor}");
}

/// A strided 1x1 layer (a ResNet projection shortcut) quantizes only the pixels it reads: INT8
/// tracks FP32, and both leave the input gradient exactly zero at the pixels never read.
#[test]
fn int8_strided_pointwise_layer_tracks_fp32_and_leaves_unread_pixels_zero() {
    let (xd, wd, g) = ([4, 8, 9, 9], [12, 8, 1, 1], ConvGeometry { stride: 2, ..Default::default() });
    let s = shape_of(&xd, &wd, g);
    let xv: Vec<f32> = uniform(s.x_len(), 11).iter().map(|v| v.max(0.0)).collect();
    let wv: Vec<f32> = uniform(s.w_len(), 12).iter().map(|v| v * 0.1).collect();
    let r = laplace(s.y_len(), 13);
    let fp32 = Conv2d::new("shortcut", tensor(wv.clone(), &wd), g, Precision::Fp32).unwrap();
    let int8 = Conv2d::new("shortcut", tensor(wv, &wd), g, Precision::Int8(Int8Config::default())).unwrap();
    let x = var(xv, &xd);
    let (y32, dx32, dw32) = run(&fp32, &x, &r);
    let (y8, dx8, dw8) = run(&int8, &x, &r);
    assert!(cosine(&y8, &y32) >= 0.999, "forward cosine {}", cosine(&y8, &y32));
    assert!(cosine(&dx8, &dx32) >= 0.99, "dx cosine {}", cosine(&dx8, &dx32));
    assert!(cosine(&dw8, &dw32) >= 0.99, "dw cosine {}", cosine(&dw8, &dw32));
    for (i, (&a, &b)) in dx8.iter().zip(&dx32).enumerate() {
        let (row, col) = ((i / 9) % 9, i % 9);
        if row % 2 == 1 || col % 2 == 1 {
            assert_eq!((a, b), (0.0, 0.0), "pixel {i} is never read");
        } else {
            assert!(b != 0.0, "pixel {i} is read");
        }
    }
}

/// A residual block's strided 1x1 shortcut that runs after the block's first INT8 convolution of
/// the same input takes that convolution's codes of it: its output and its gradients (of the
/// weight, and through X of the add that wrote X) are exactly those of the shortcut alone.
#[test]
fn a_shortcut_after_its_blocks_first_convolution_computes_the_same() {
    let xd = [2, 8, 9, 9];
    let n: usize = xd.iter().product();
    let (av, bv) = (uniform(n, 21), uniform(n, 22));
    let (w3, w1) = (uniform(8 * 8 * 9, 23), uniform(12 * 8, 24));
    let r = laplace(2 * 12 * 5 * 5, 25);
    let int8 = Precision::Int8(Int8Config::default());
    let go = |first_conv: bool| {
        let g3 = ConvGeometry { stride: 2, padding: (1, 1), ..Default::default() };
        let conv1 = Conv2d::new("conv1", tensor(w3.clone(), &[8, 8, 3, 3]), g3, int8).unwrap();
        let g1 = ConvGeometry { stride: 2, ..Default::default() };
        let shortcut = Conv2d::new("shortcut", tensor(w1.clone(), &[12, 8, 1, 1]), g1, int8).unwrap();
        let a = var(av.clone(), &xd);
        // `add_relu` records max|X|, at which INT8 convolutions quantize X.
        let x = int8_nn::ops::add_relu(&a, &tensor(bv.clone(), &xd)).unwrap();
        if first_conv {
            conv1.forward(&x).unwrap();
        }
        let y = shortcut.forward(&x).unwrap();
        let rt = Tensor::from_vec(r.clone(), y.dims()).unwrap();
        let grads = y.mul(&rt).unwrap().sum_all().unwrap().backward().unwrap();
        (y.to_vec(), grads.get(&a).unwrap().to_vec(), grads.of(shortcut.weight()).unwrap().to_vec())
    };
    let (alone, after) = (go(false), go(true));
    assert!(alone.0.iter().any(|&v| v != 0.0) && alone.2.iter().any(|&v| v != 0.0));
    assert_eq!(after, alone);
}

/// The f64 values of the codes `quantize` gives `v` per tensor (or per output channel).
fn dequantized(v: &[f32], granularity: Granularity, channels: usize) -> Vec<f64> {
    quantize("t", v, granularity, channels, Rounding::Nearest).unwrap().dequantize().iter().map(|&x| x as f64).collect()
}

/// An INT8 layer computes exactly the convolutions of the codes it quantized, in the forward pass
/// and both gradients, over a table of geometries: the f64 reference convolution of the
/// dequantized codes matches its results to f32 rounding, where an FP32 layer would be off by the
/// quantization error. Weights are per tensor except for the depthwise case (per output channel,
/// which its input gradient keeps); the gradient is clipped at its maximum (no DSGC), so its codes
/// are plain per-tensor quantization too.
#[test]
fn int8_layer_computes_exactly_the_convolutions_of_its_codes() {
    let cases = [
        ("3x3 s1", [2, 8, 9, 9], [12, 8, 3, 3], ConvGeometry { padding: (1, 1), ..Default::default() }),
        ("3x3 s2", [2, 8, 9, 9], [12, 8, 3, 3], ConvGeometry { stride: 2, padding: (1, 1), ..Default::default() }),
        ("1x1 s2", [2, 8, 9, 9], [12, 8, 1, 1], ConvGeometry { stride: 2, ..Default::default() }),
        ("7x7 s2 p3", [1, 3, 15, 15], [8, 3, 7, 7], ConvGeometry { stride: 2, padding: (3, 3), ..Default::default() }),
        ("dilation 2", [2, 4, 9, 9], [6, 4, 3, 3], ConvGeometry { padding: (2, 2), dilation: 2, ..Default::default() }),
        ("groups 2", [2, 8, 7, 7], [6, 4, 3, 3], ConvGeometry { padding: (1, 1), groups: 2, ..Default::default() }),
        ("1x3 rect", [2, 4, 6, 6], [5, 4, 1, 3], ConvGeometry { padding: (0, 1), ..Default::default() }),
        ("depthwise", [2, 6, 8, 8], [6, 1, 3, 3], ConvGeometry { padding: (1, 1), groups: 6, ..Default::default() }),
    ];
    for (what, xd, wd, g) in cases {
        let s = shape_of(&xd, &wd, g);
        let xv: Vec<f32> = uniform(s.x_len(), 21).iter().map(|v| v.max(0.0)).collect();
        let wv: Vec<f32> =
            uniform(s.w_len(), 22).iter().enumerate().map(|(i, v)| v * (1 + i % 3) as f32 * 0.1).collect();
        let r = laplace(s.y_len(), 23);
        let weight = if s.is_depthwise() { Granularity::PerChannel } else { Granularity::PerTensor };
        let cfg = Int8Config { weight, clip: ClipMode::MaxAbs, ..Int8Config::default() };
        let layer = Conv2d::new("conv", tensor(wv.clone(), &wd), g, Precision::Int8(cfg)).unwrap();
        let x = var(xv.clone(), &xd);
        let (y, dx, dw) = run(&layer, &x, &r);
        // A strided 1x1 layer quantizes the pixels it reads, whose range may be smaller than the
        // whole input's: the reference reads the same subsample.
        let xq = if s.kh == 1 && s.kw == 1 && g.stride > 1 {
            let sub = int8_core::conv::subsample(&s, &xv);
            let q = dequantized(&sub, Granularity::PerTensor, 1);
            let mut full = vec![0.0; s.x_len()];
            let (ho, wo) = (s.out_h(), s.out_w());
            for (k, v) in q.into_iter().enumerate() {
                let (plane, p) = (k / (ho * wo), k % (ho * wo));
                full[plane * s.h * s.w + (p / wo) * g.stride * s.w + (p % wo) * g.stride] = v;
            }
            full
        } else {
            dequantized(&xv, Granularity::PerTensor, 1)
        };
        let (wq, dyq) = (dequantized(&wv, weight, s.c_out), dequantized(&r, Granularity::PerTensor, 1));
        let check = |name: &str, got: &[f32], want: Vec<f64>| {
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (i, (&a, b)) in got.iter().zip(&want).enumerate() {
                assert!((a as f64 - b).abs() <= 2e-6 * scale, "{what} {name}[{i}]: {a} vs {b} (scale {scale})");
            }
        };
        check("y", &y, reference::conv2d_fwd(&s, &xq, &wq));
        let dx_want = reference::conv2d_dx(&s, &wq, &dyq);
        if s.kh == 1 && s.kw == 1 && g.stride > 1 {
            // Pixels the layer never read get exactly zero.
            for (i, (&a, b)) in dx.iter().zip(&dx_want).enumerate() {
                if *b == 0.0 {
                    assert_eq!(a, 0.0, "{what} dx[{i}]");
                }
            }
        }
        check("dx", &dx, dx_want);
        check("dw", &dw, reference::conv2d_dw(&s, &xq, &dyq));
        // The unquantized convolution is measurably elsewhere.
        let exact = reference::conv2d_fwd(&s, &f64s(&xv), &f64s(&wv));
        let want = reference::conv2d_fwd(&s, &xq, &wq);
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let gap = exact.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
        assert!(gap > 1e-4 * scale, "{what}: quantization must change the result ({gap})");
    }
}

/// With one operand kept in FP32 (the ablation `Int8Config::fp32_operand`), the layer computes
/// the convolutions of that operand as it is and of the others' codes: each pass against the f64
/// reference on exactly those values, and each unlike the fully quantized layer's where the
/// operand enters. Without gradient quantization DCLR's multiplier stays 1.
#[test]
fn an_operand_kept_in_fp32_enters_its_convolutions_unquantized() {
    use int8_nn::precision::Operand;
    let (xd, wd) = ([2, 8, 9, 9], [12, 8, 3, 3]);
    let g = ConvGeometry { padding: (1, 1), ..Default::default() };
    let s = shape_of(&xd, &wd, g);
    let xv: Vec<f32> = uniform(s.x_len(), 31).iter().map(|v| v.max(0.0)).collect();
    let wv: Vec<f32> = uniform(s.w_len(), 32).iter().enumerate().map(|(i, v)| v * (1 + i % 3) as f32 * 0.1).collect();
    let r = laplace(s.y_len(), 33);
    let (xq, wq, dyq) = (
        dequantized(&xv, Granularity::PerTensor, 1),
        dequantized(&wv, Granularity::PerTensor, 1),
        dequantized(&r, Granularity::PerTensor, 1),
    );
    let check = |what: &str, got: &[f32], want: Vec<f64>| {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (&a, b)) in got.iter().zip(&want).enumerate() {
            assert!((a as f64 - b).abs() <= 2e-6 * scale, "{what}[{i}]: {a} vs {b} (scale {scale})");
        }
    };
    let differs = |what: &str, a: &[f32], b: &[f32]| {
        let gap = a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(gap > 1e-4 * scale, "{what}: keeping the operand in fp32 must change it ({gap})");
    };
    let layer = |keep: Option<Operand>| {
        let cfg = Int8Config { clip: ClipMode::MaxAbs, fp32_operand: keep, ..Int8Config::default() };
        Conv2d::new("conv", tensor(wv.clone(), &wd), g, Precision::Int8(cfg)).unwrap()
    };
    let (y8, dx8, dw8) = run(&layer(None), &var(xv.clone(), &xd), &r);
    for keep in [Operand::Input, Operand::Weight, Operand::Grad] {
        let l = layer(Some(keep));
        let (y, dx, dw) = run(&l, &var(xv.clone(), &xd), &r);
        let x = if keep == Operand::Input { f64s(&xv) } else { xq.clone() };
        let w = if keep == Operand::Weight { f64s(&wv) } else { wq.clone() };
        let dy = if keep == Operand::Grad { f64s(&r) } else { dyq.clone() };
        let what = format!("{keep:?}");
        check(&format!("{what} y"), &y, reference::conv2d_fwd(&s, &x, &w));
        check(&format!("{what} dx"), &dx, reference::conv2d_dx(&s, &w, &dy));
        check(&format!("{what} dw"), &dw, reference::conv2d_dw(&s, &x, &dy));
        match keep {
            Operand::Input => (differs("Input y", &y, &y8), differs("Input dw", &dw, &dw8)),
            Operand::Weight => (differs("Weight y", &y, &y8), differs("Weight dx", &dx, &dx8)),
            Operand::Grad => (differs("Grad dx", &dx, &dx8), differs("Grad dw", &dw, &dw8)),
        };
        let stats = l.quant().stats();
        if keep == Operand::Grad {
            assert_eq!((stats.distance, stats.phi), (0.0, 1.0));
        } else {
            assert!(stats.distance > 0.0 && stats.phi < 1.0, "{what}: {stats:?}");
        }
    }
}

/// An INT8 convolution of a batch norm's output quantizes it with the maximum the batch norm
/// found while writing it (no pass of its own): the output and both gradients are bit for bit
/// those of the same convolution of a copy of the values, whose maximum it must find itself, in
/// training and in evaluation mode, with a fused ReLU or without.
#[test]
fn an_int8_conv_of_a_batch_norm_output_is_the_conv_of_its_values() {
    use int8_nn::layers::BatchNorm2d;
    let (xd, wd) = ([2, 3, 7, 7], [4, 3, 3, 3]);
    let g = ConvGeometry { padding: (1, 1), ..Default::default() };
    let r = uniform(2 * 4 * 7 * 7, 3);
    for relu in [false, true] {
        for training in [true, false] {
            let bn = BatchNorm2d::new("bn", 3, relu).unwrap();
            bn.set_training(training);
            let x = tensor(uniform(2 * 3 * 7 * 7, 1).iter().map(|v| 3.0 * v + 0.5).collect(), &xd);
            let y = bn.forward(&x).unwrap().detach().requires_grad();
            let copy = var(y.to_vec(), &xd);
            let conv =
                || Conv2d::new("c", tensor(uniform(108, 2), &wd), g, Precision::Int8(Int8Config::default())).unwrap();
            let (a, b) = (run(&conv(), &y, &r), run(&conv(), &copy, &r));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.0), bits(&b.0), "output, relu {relu} training {training}");
            assert_eq!(bits(&a.1), bits(&b.1), "dx, relu {relu} training {training}");
            assert_eq!(bits(&a.2), bits(&b.2), "dw, relu {relu} training {training}");
        }
    }
}

/// The batch norm output `y` of `conv` and `bn` on `x`, then the gradients of `sum(r * y)` for
/// `x`, the convolution's weight, and the batch norm's gamma and beta.
fn conv_bn_grads(conv: &Conv2d, bn: &int8_nn::layers::BatchNorm2d, x: &Tensor, y: Tensor, r: &[f32]) -> Vec<Vec<f32>> {
    let rt = Tensor::from_vec(r.to_vec(), y.dims()).unwrap();
    let grads = y.mul(&rt).unwrap().sum_all().unwrap().backward().unwrap();
    let of = |p: &int8_nn::Param| grads.of(p).unwrap().to_vec();
    vec![y.to_vec(), grads.get(x).unwrap().to_vec(), of(conv.weight()), of(bn.gamma()), of(bn.beta())]
}

/// A batch norm after an INT8 convolution keeps the convolution's output as 16-bit integer sums,
/// and nothing changes: the output and the gradients of the convolution's input and weights and
/// of gamma and beta are bit for bit those of the same layers where the batch norm reads an
/// untagged copy of the output (a reshape to the same shape) and keeps it in f32, with a fused
/// ReLU or without, for per-tensor and per-channel weight scales (`tests/memory.rs` checks that
/// it keeps the sums, in a binary of its own: the byte counters are the process's).
#[test]
fn a_batch_norm_after_an_int8_conv_keeps_its_sums_and_changes_nothing() {
    use int8_nn::layers::BatchNorm2d;
    let (xd, wd) = ([4, 3, 9, 9], [8, 3, 3, 3]);
    let g = ConvGeometry { padding: (1, 1), ..Default::default() };
    let r = uniform(4 * 8 * 9 * 9, 3);
    // One large weight and one large input value set the scales, so that the other codes are
    // small, as a trained network's are: most sums then fit in 16 bits (the few beyond are kept
    // beside them).
    let mut wv = uniform(216, 2);
    wv[5] = 8.0;
    let mut xv: Vec<f32> = uniform(4 * 3 * 9 * 9, 1).iter().map(|v| 3.0 * v + 0.5).collect();
    xv[7] = 40.0;
    let pass = |precision: Precision, relu: bool, copy: bool| {
        let conv = Conv2d::new("c", tensor(wv.clone(), &wd), g, precision).unwrap();
        let bn = BatchNorm2d::new("bn", 8, relu).unwrap();
        let x = var(xv.clone(), &xd);
        let h = conv.forward(&x).unwrap();
        let h = if copy { h.reshape(h.dims().to_vec()).unwrap() } else { h };
        conv_bn_grads(&conv, &bn, &x, bn.forward(&h).unwrap(), &r)
    };
    let per_tensor = Int8Config { clip: ClipMode::MaxAbs, ..Int8Config::default() };
    let per_channel = Int8Config { weight: Granularity::PerChannel, ..per_tensor };
    for cfg in [per_tensor, per_channel] {
        for relu in [false, true] {
            let (got, want) = (pass(Precision::Int8(cfg), relu, false), pass(Precision::Int8(cfg), relu, true));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for (what, (g, w)) in ["output", "dx", "dw", "dgamma", "dbeta"].iter().zip(got.iter().zip(&want)) {
                assert_eq!(bits(g), bits(w), "{what}, relu {relu}, {:?}", cfg.weight);
            }
        }
    }
}

/// `f16_batch_norm_input`: the batch norm after the INT8 convolution keeps its input in half
/// precision for the backward pass, and nothing else changes: the forward output is bit for bit
/// that of the same layers without it, and the gradients of the convolution's input and weights
/// and of the batch norm's gamma and beta are within 2e-3 of the largest of theirs (half
/// precision's 2^-11 on the normalised input, through the INT8 codes of the gradient), with a
/// fused ReLU or without (`tests/memory.rs` checks what it keeps).
#[test]
fn a_batch_norm_after_an_int8_conv_may_keep_its_input_in_half_precision() {
    use int8_nn::layers::BatchNorm2d;
    let (xd, wd) = ([4, 3, 9, 9], [8, 3, 3, 3]);
    let g = ConvGeometry { padding: (1, 1), ..Default::default() };
    let r = uniform(4 * 8 * 9 * 9, 3);
    let pass = |precision: Precision, relu: bool| {
        let conv = Conv2d::new("c", tensor(uniform(216, 2), &wd), g, precision).unwrap();
        let bn = BatchNorm2d::new("bn", 8, relu).unwrap();
        let x = var(uniform(4 * 3 * 9 * 9, 1).iter().map(|v| 3.0 * v + 0.5).collect(), &xd);
        conv_bn_grads(&conv, &bn, &x, bn.forward(&conv.forward(&x).unwrap()).unwrap(), &r)
    };
    let int8 = Int8Config { clip: ClipMode::MaxAbs, ..Int8Config::default() };
    let half = Int8Config { f16_batch_norm_input: true, ..int8 };
    for relu in [false, true] {
        let (want, got) = (pass(Precision::Int8(int8), relu), pass(Precision::Int8(half), relu));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got[0]), bits(&want[0]), "output, relu {relu}");
        let mut differs = false;
        for (what, (g, w)) in ["dx", "dw", "dgamma", "dbeta"].iter().zip(got.iter().zip(&want).skip(1)) {
            let largest = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in g.iter().zip(w).enumerate() {
                assert!((a - b).abs() <= 2e-3 * largest, "{what}[{i}], relu {relu}: {a} vs {b} (largest {largest})");
            }
            differs |= bits(g) != bits(w);
        }
        assert!(differs, "relu {relu}: the gradients must come from the half-precision input");
    }
}
