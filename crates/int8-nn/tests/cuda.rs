//! The GPU paths of int8-nn's ops against their CPU paths, on a GPU:
//! `cargo test -p int8-nn --features cuda --test cuda` (or `scripts/gpu-check`).
//!
//! - Each op ResNet-20 trains with, forward and backward with the same operands and the same
//!   output gradient on both devices: bit for bit (a zero's sign aside) for the INT8 convolution
//!   (3x3, strided 3x3, strided 1x1, per-channel weights), the INT8 linear layer, batch norm (with
//!   and without its ReLU), add + ReLU, ReLU, global average pooling, max and average pooling and
//!   dropout, with the layer's INT8 statistics (clip value, saturation, DCLR's phi) equal; the
//!   FP32 convolution and linear layer within 1e-5 of the largest value (cuBLAS sums in its own
//!   order), the loss within 1e-12 relative (CUDA's `exp`/`log`).
//! - A ResNet-20 (built here from int8-nn's layers: a 3x3 stem, three stages of three basic
//!   blocks at 16/32/64 channels with projection shortcuts, global pooling, a linear classifier;
//!   He et al. 2016, Sec. 4.2) takes two SGD steps (momentum 0.9, weight decay 5e-4, DCLR's phi)
//!   on each device from the same weights and batch. INT8 (every layer INT8): the first forward
//!   pass's logits bit for bit, the loss within 1e-9 relative; the gradients and updated weights
//!   within 2% (relative L2; an update within 4% of its own size) of the CPU's, since a last-bit
//!   difference of the loss gradient (CUDA's `exp`) can move a gradient's DSGC clip value and so
//!   its codes; the second step's loss within 1e-3 (the bar); the number of gradients
//!   equal bit for bit is printed. FP32: loss within 1e-5 relative, gradients within 1e-3 and
//!   updates within 2e-3 of their size (relative L2).
//! - Errors: tensors on two devices, a CPU-only op given a GPU tensor, and a gradient flowing
//!   back across `to_device`.
//!
//! The CUDA libraries are found as int8-core's GPU test finds them (pip's `nvidia/cu13/lib` when
//! Python has it, else the system's library path).
#![cfg(feature = "cuda")]

use int8_nn::layers::{BatchNorm2d, Conv2d, Linear};
use int8_nn::ops::{self, add_relu, cross_entropy, global_avg_pool, relu};
use int8_nn::optim::{Sgd, SgdConfig};
use int8_nn::precision::{Int8Config, Precision};
use int8_nn::{ConvGeometry, Device, Layer, Module, NnError, Tensor};

/// Loads the CUDA libraries from pip's `nvidia/cu13/lib` by full path where Python has them, so
/// that cudarc's `dlopen` by soname finds them without LD_LIBRARY_PATH (dependencies first).
fn preload_pip_libraries() {
    let script = "import os, nvidia\nfor p in nvidia.__path__: print(os.path.join(p, 'cu13', 'lib'))";
    let Ok(out) = std::process::Command::new("python3").args(["-c", script]).output() else { return };
    for dir in String::from_utf8_lossy(&out.stdout).lines().map(std::path::PathBuf::from) {
        for lib in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13", "libcublasLt.so.13", "libcublas.so.13"] {
            let path = dir.join(lib);
            if !path.is_file() {
                continue;
            }
            let c = std::ffi::CString::new(path.to_string_lossy().into_owned()).expect("a path without NUL");
            // SAFETY: a NUL-terminated path that outlives the call; the handle is never closed.
            unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        }
    }
}

/// GPU 0, opened once (every test's tensors share its context).
fn gpu() -> Device {
    static OPEN: std::sync::Once = std::sync::Once::new();
    OPEN.call_once(|| {
        preload_pip_libraries();
        match int8_nn::cuda::gpu(0) {
            Ok(g) => eprintln!("gpu: {} (sm_{}{})", g.name(), g.arch().0, g.arch().1),
            Err(e) => panic!("these tests need a gpu with cuda 13: {e}"),
        }
    });
    Device::Cuda(0)
}

fn on(t: &Tensor, d: Device) -> Tensor {
    t.to_device(&d).expect("copy between devices")
}

/// Equal bit patterns, except that +0 and -0 are taken as equal, and any two NaNs.
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0) || (a.is_nan() && b.is_nan())
}

fn assert_bits(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    if let Some(i) = (0..gpu.len()).find(|&i| !same(gpu[i], cpu[i])) {
        let bad = (0..gpu.len()).filter(|&i| !same(gpu[i], cpu[i])).count();
        panic!(
            "{what}: {bad} of {} values differ; first at {i}: gpu {:e} ({:#x}), cpu {:e} ({:#x})",
            gpu.len(),
            gpu[i],
            gpu[i].to_bits(),
            cpu[i],
            cpu[i].to_bits()
        );
    }
}

/// `max |a - b| <= tol * max |b|`.
fn assert_close(what: &str, gpu: &[f32], cpu: &[f32], tol: f64) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    let scale = cpu.iter().map(|&v| f64::from(v).abs()).fold(0.0, f64::max);
    let (i, err) = gpu
        .iter()
        .zip(cpu)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).abs())
        .enumerate()
        .fold((0, 0.0), |m, (i, e)| if e > m.1 { (i, e) } else { m });
    assert!(err <= tol * scale, "{what}: |gpu - cpu| = {err:e} at {i}, above {tol:e} x {scale:e}");
}

/// `||a - b||_2 / ||b||_2`.
fn relative_l2(gpu: &[f32], cpu: &[f32]) -> f64 {
    let d: f64 = gpu.iter().zip(cpu).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
    let n: f64 = cpu.iter().map(|&b| f64::from(b).powi(2)).sum();
    if n == 0.0 { d.sqrt() } else { (d / n).sqrt() }
}

/// `sum(y * r)` on the CPU, whatever `y`'s device: its gradient with respect to `y` is exactly
/// `r`, copied back to `y`'s device by `to_device`'s backward pass.
fn probe(y: &Tensor, r: &Tensor) -> Tensor {
    on(y, Device::Cpu).mul(r).and_then(|p| p.sum_all()).expect("probe loss")
}

fn int8() -> Precision {
    Precision::Int8(Int8Config::default())
}

fn int8_per_channel() -> Precision {
    Precision::Int8(Int8Config { weight: int8_core::quant::Granularity::PerChannel, ..Int8Config::default() })
}

/// He-normal weights of `shape` (fan-in from the trailing dimensions).
fn he(shape: &[usize], seed: u64) -> Tensor {
    let fan_in: usize = shape[1..].iter().product();
    Tensor::randn(shape.to_vec(), seed).scale((2.0 / fan_in as f32).sqrt()).expect("scale")
}

// ---------------------------------------------------------------------------------------------
// Single ops, same operands and output gradient on both devices

/// Runs a conv layer forward and backward on `dev` (its weight moved there) with output
/// gradient `r`: `(y, dx, dw, clip, phi, saturation of dy)`.
#[allow(clippy::type_complexity)]
fn conv_pass(layer: &Conv2d, x: &Tensor, r: &Tensor, dev: Device) -> (Vec<f32>, Vec<f32>, Vec<f32>, (f32, f64, f32)) {
    layer.weight().to_device(&dev).expect("weight to device");
    let xd = on(x, dev).requires_grad();
    let y = layer.forward(&xd).expect("conv forward");
    let grads = probe(&y, r).backward().expect("backward");
    let st = layer.quant().stats();
    (
        y.to_vec(),
        grads.get(&xd).expect("dx").to_vec(),
        grads.of(layer.weight()).expect("dw").to_vec(),
        (st.clip, st.phi, st.saturation_dy),
    )
}

/// A convolution to compare: name, input, weight, stride, padding, precision.
type ConvCase = (&'static str, [usize; 4], [usize; 4], usize, usize, Precision);

#[test]
fn int8_convolutions_match_the_cpu_bit_for_bit() {
    let dev = gpu();
    let cases: [ConvCase; 5] = [
        ("3x3", [4, 16, 12, 12], [16, 16, 3, 3], 1, 1, int8()),
        ("3x3 stride 2", [4, 16, 12, 12], [32, 16, 3, 3], 2, 1, int8()),
        ("1x1 stride 2 (subsampled)", [4, 16, 12, 12], [32, 16, 1, 1], 2, 0, int8()),
        ("3x3 per-channel weights", [3, 8, 9, 9], [12, 8, 3, 3], 1, 1, int8_per_channel()),
        ("stem 3x3, fp32", [4, 3, 16, 16], [16, 3, 3, 3], 1, 1, Precision::Fp32),
    ];
    for (i, (what, xs, ws, stride, pad, precision)) in cases.into_iter().enumerate() {
        let seed = 100 * i as u64;
        let geometry = ConvGeometry { stride, padding: (pad, pad), ..ConvGeometry::default() };
        let make = || Conv2d::new("probe.conv", he(&ws, seed + 1), geometry, precision).expect("conv layer");
        let (cpu_layer, gpu_layer) = (make(), make());
        let x = Tensor::randn(xs.to_vec(), seed + 2);
        let out_shape = cpu_layer.forward(&x).expect("shape").dims().to_vec();
        let r = Tensor::randn(out_shape, seed + 3).scale(1e-2).expect("scale");
        // Two passes: the first searches the clip value (DSGC), the second uses it.
        for pass in 0..2 {
            let c = conv_pass(&cpu_layer, &x, &r, Device::Cpu);
            let g = conv_pass(&gpu_layer, &x, &r, dev);
            let what = format!("{what}, pass {pass}");
            if matches!(precision, Precision::Fp32) {
                assert_close(&format!("{what}: y"), &g.0, &c.0, 1e-5);
                assert_close(&format!("{what}: dx"), &g.1, &c.1, 1e-5);
                assert_close(&format!("{what}: dw"), &g.2, &c.2, 1e-5);
            } else {
                assert_bits(&format!("{what}: y"), &g.0, &c.0);
                assert_bits(&format!("{what}: dx"), &g.1, &c.1);
                assert_bits(&format!("{what}: dw"), &g.2, &c.2);
                assert_eq!(g.3, c.3, "{what}: (clip, phi, saturation of dy)");
                assert_eq!(gpu_layer.quant().snapshot(), cpu_layer.quant().snapshot(), "{what}: dsgc state");
            }
        }
    }
}

#[test]
fn linear_layers_match_the_cpu() {
    let dev = gpu();
    for (what, precision) in [("int8", int8()), ("int8 per-channel", int8_per_channel()), ("fp32", Precision::Fp32)] {
        let (n, i, o) = (8, 64, 10);
        let make = || {
            let b = Tensor::randn(o, 7).scale(0.1).expect("scale");
            Linear::new("probe.fc", he(&[o, i], 5), b, precision).expect("linear layer")
        };
        let (cpu_layer, gpu_layer) = (make(), make());
        let x = Tensor::randn((n, i), 6);
        let r = Tensor::randn((n, o), 8);
        let run = |layer: &Linear, d: Device| {
            layer.weight().to_device(&d).expect("weight");
            layer.bias().to_device(&d).expect("bias");
            let xd = on(&x, d).requires_grad();
            let y = layer.forward(&xd).expect("forward");
            let grads = probe(&y, &r).backward().expect("backward");
            let get = |t: Option<&Tensor>| t.expect("gradient").to_vec();
            (y.to_vec(), get(grads.get(&xd)), get(grads.of(layer.weight())), get(grads.of(layer.bias())))
        };
        for pass in 0..2 {
            let (c, g) = (run(&cpu_layer, Device::Cpu), run(&gpu_layer, dev));
            let what = format!("{what}, pass {pass}");
            if matches!(precision, Precision::Fp32) {
                assert_close(&format!("{what}: y"), &g.0, &c.0, 1e-5);
                assert_close(&format!("{what}: dx"), &g.1, &c.1, 1e-5);
                assert_close(&format!("{what}: dw"), &g.2, &c.2, 1e-5);
            } else {
                assert_bits(&format!("{what}: y"), &g.0, &c.0);
                assert_bits(&format!("{what}: dx"), &g.1, &c.1);
                assert_bits(&format!("{what}: dw"), &g.2, &c.2);
                assert_eq!(gpu_layer.quant().stats(), cpu_layer.quant().stats(), "{what}: int8 statistics");
            }
            // The bias gradient is a column sum: cuBLAS's order at both precisions.
            assert_close(&format!("{what}: db"), &g.3, &c.3, 1e-5);
        }
    }
}

#[test]
fn batch_norm_activations_and_pooling_match_the_cpu_bit_for_bit() {
    let dev = gpu();
    let x = Tensor::randn([4, 8, 6, 6], 11).scale(3.0).expect("scale");
    let x2 = Tensor::randn([4, 8, 6, 6], 12);
    for fused in [false, true] {
        let make = || BatchNorm2d::new("probe.bn", 8, fused).expect("batch norm");
        let (cpu_bn, gpu_bn) = (make(), make());
        let r = Tensor::randn([4, 8, 6, 6], 13);
        let run = |bn: &BatchNorm2d, d: Device| {
            bn.gamma().to_device(&d).expect("gamma");
            bn.beta().to_device(&d).expect("beta");
            let xd = on(&x, d).requires_grad();
            let y = bn.forward(&xd).expect("forward");
            let grads = probe(&y, &r).backward().expect("backward");
            let get = |t: Option<&Tensor>| t.expect("gradient").to_vec();
            (y.to_vec(), get(grads.get(&xd)), get(grads.of(bn.gamma())), get(grads.of(bn.beta())))
        };
        let (c, g) = (run(&cpu_bn, Device::Cpu), run(&gpu_bn, dev));
        for (k, what) in ["y", "dx", "dgamma", "dbeta"].iter().enumerate() {
            let (a, b) = match k {
                0 => (&g.0, &c.0),
                1 => (&g.1, &c.1),
                2 => (&g.2, &c.2),
                _ => (&g.3, &c.3),
            };
            assert_bits(&format!("batch norm (relu {fused}): {what}"), a, b);
        }
        assert_eq!(gpu_bn.running(), cpu_bn.running(), "running statistics");
    }
    // add + relu, relu, global average pooling.
    let r = Tensor::randn([4, 8, 6, 6], 14);
    let rp = Tensor::randn([4, 8], 15);
    let run = |d: Device| {
        let (a, b) = (on(&x, d).requires_grad(), on(&x2, d).requires_grad());
        let s = add_relu(&a, &b).expect("add relu");
        let t = relu(&on(&x2, d).requires_grad()).expect("relu");
        let p = global_avg_pool(&s).expect("pool");
        let loss = probe(&t, &r).add(&probe(&p, &rp)).expect("sum");
        let grads = loss.backward().expect("backward");
        (s.to_vec(), t.to_vec(), p.to_vec(), grads.get(&a).expect("da").to_vec(), grads.get(&b).expect("db").to_vec())
    };
    let (c, g) = (run(Device::Cpu), run(dev));
    assert_bits("add relu", &g.0, &c.0);
    assert_bits("relu", &g.1, &c.1);
    assert_bits("global average pooling", &g.2, &c.2);
    assert_bits("add relu + pooling: da", &g.3, &c.3);
    assert_bits("add relu + pooling: db", &g.4, &c.4);
}

/// The ops beyond ResNet-20 that have GPU kernels: max pooling (with and without ceil mode),
/// average pooling and dropout, forward and backward.
#[test]
fn pooling_and_dropout_match_the_cpu_bit_for_bit() {
    let dev = gpu();
    let x = Tensor::randn([2, 3, 9, 9], 31);
    type Op = fn(&Tensor) -> int8_nn::Result<Tensor>;
    let cases: [(&str, Op); 4] = [
        ("max pool 3x3 stride 2 pad 1", |t| ops::max_pool2d(t, 3, 2, 1)),
        ("max pool 2x2 stride 2 ceil", |t| ops::max_pool2d_ceil(t, 2, 2, 0)),
        ("average pool 3x3 stride 2 pad 1", |t| ops::avg_pool2d(t, 3, 2, 1)),
        ("dropout 0.3", |t| ops::dropout::dropout(t, 0.3, 99)),
    ];
    for (what, op) in cases {
        let run = |d: Device| {
            let xd = on(&x, d).requires_grad();
            let y = op(&xd).expect("forward");
            let r = Tensor::randn(y.dims().to_vec(), 32);
            let grads = probe(&y, &r).backward().expect("backward");
            (y.to_vec(), grads.get(&xd).expect("dx").to_vec())
        };
        let (c, g) = (run(Device::Cpu), run(dev));
        assert_bits(&format!("{what}: y"), &g.0, &c.0);
        assert_bits(&format!("{what}: dx"), &g.1, &c.1);
    }
}

#[test]
fn the_loss_matches_the_cpu() {
    let dev = gpu();
    let logits = Tensor::randn((16, 10), 21).scale(4.0).expect("scale");
    let labels: Vec<u32> = (0..16).map(|i| (i * 7 % 10) as u32).collect();
    let run = |d: Device| {
        let l = on(&logits, d).requires_grad();
        let (loss, report) = cross_entropy(&l, &labels).expect("loss");
        let grads = loss.backward().expect("backward");
        (report, grads.get(&l).expect("gradient").to_vec())
    };
    let (c, g) = (run(Device::Cpu), run(dev));
    assert!((g.0.loss - c.0.loss).abs() <= 1e-12 * c.0.loss.abs(), "loss {} against {}", g.0.loss, c.0.loss);
    assert_eq!((g.0.top1, g.0.top5), (c.0.top1, c.0.top5), "hits");
    // CUDA's exp: within one f32 ulp of the CPU's gradient.
    for (i, (&a, &b)) in g.1.iter().zip(&c.1).enumerate() {
        assert!((a.to_bits() as i64 - b.to_bits() as i64).abs() <= 1, "gradient {i}: gpu {a:e}, cpu {b:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// ResNet-20

/// A basic block: two 3x3 convolutions with batch norm, a projection shortcut where the shape
/// changes, add + ReLU.
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    shortcut: Option<(Conv2d, BatchNorm2d)>,
}

/// ResNet-20 for CIFAR-10 (272,474 parameters with projection shortcuts).
struct ResNet20 {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    blocks: Vec<Block>,
    fc: Linear,
}

impl ResNet20 {
    fn new(precision: Precision) -> Self {
        let mut seed = 1000;
        let mut conv = |name: String, cin: usize, cout: usize, k: usize, stride: usize| {
            seed += 1;
            let g = ConvGeometry { stride, padding: (k / 2, k / 2), ..ConvGeometry::default() };
            Conv2d::new(name, he(&[cout, cin, k, k], seed), g, precision).expect("conv")
        };
        let bn = |name: String, c: usize, relu: bool| BatchNorm2d::new(name, c, relu).expect("batch norm");
        let conv1 = conv("conv1".into(), 3, 16, 3, 1);
        let mut blocks = Vec::new();
        let mut cin = 16;
        for (stage, cout) in [(1, 16), (2, 32), (3, 64)] {
            for i in 0..3 {
                let stride = if i == 0 && stage > 1 { 2 } else { 1 };
                let name = format!("layer{stage}.{i}");
                let shortcut = (stride != 1 || cin != cout).then(|| {
                    (
                        conv(format!("{name}.shortcut.conv"), cin, cout, 1, stride),
                        bn(format!("{name}.shortcut.bn"), cout, false),
                    )
                });
                blocks.push(Block {
                    conv1: conv(format!("{name}.conv1"), cin, cout, 3, stride),
                    bn1: bn(format!("{name}.bn1"), cout, true),
                    conv2: conv(format!("{name}.conv2"), cout, cout, 3, 1),
                    bn2: bn(format!("{name}.bn2"), cout, false),
                    shortcut,
                });
                cin = cout;
            }
        }
        let fc_w = Tensor::uniform((10, 64), -0.125, 0.125, 77);
        let fc_b = Tensor::uniform(10, -0.125, 0.125, 78);
        let fc = Linear::new("fc", fc_w, fc_b, precision).expect("fc");
        Self { conv1, bn1: bn("bn1".into(), 16, true), blocks, fc }
    }

    fn forward(&self, x: &Tensor) -> int8_nn::Result<Tensor> {
        let mut h = self.bn1.forward(&self.conv1.forward(x)?)?;
        for b in &self.blocks {
            let y = b.bn2.forward(&b.conv2.forward(&b.bn1.forward(&b.conv1.forward(&h)?)?)?)?;
            let s = match &b.shortcut {
                Some((c, n)) => n.forward(&c.forward(&h)?)?,
                None => h.clone(),
            };
            h = add_relu(&y, &s)?;
        }
        self.fc.forward(&global_avg_pool(&h)?)
    }
}

impl Module for ResNet20 {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        for b in &self.blocks {
            b.conv1.visit(f);
            b.bn1.visit(f);
            b.conv2.visit(f);
            b.bn2.visit(f);
            if let Some((c, n)) = &b.shortcut {
                c.visit(f);
                n.visit(f);
            }
        }
        self.fc.visit(f);
    }
}

/// What one training step gives: the logits, the loss, each parameter's gradient and updated
/// value (by name, in visiting order).
struct Step {
    logits: Vec<f32>,
    loss: f64,
    grads: Vec<(String, Vec<f32>)>,
    values: Vec<(String, Vec<f32>)>,
}

fn train_step(model: &ResNet20, sgd: &mut Sgd, x: &Tensor, labels: &[u32], d: Device) -> Step {
    let logits = model.forward(&on(x, d)).expect("forward");
    let (loss, report) = cross_entropy(&logits, labels).expect("loss");
    let grads = loss.backward().expect("backward");
    let params: Vec<_> = model.layers().iter().flat_map(|l| l.params()).collect();
    let grads_of: Vec<_> = params
        .iter()
        .map(|p| (p.name().to_string(), grads.of(p).expect("every parameter has a gradient").to_vec()))
        .collect();
    let logits = logits.to_vec();
    sgd.step(&model.trainables(), &grads, 0.1).expect("sgd step");
    let values = params.iter().map(|p| (p.name().to_string(), p.to_vec())).collect();
    Step { logits, loss: report.loss, grads: grads_of, values }
}

fn compare_steps(what: &str, precision: Precision) {
    let dev = gpu();
    let (cpu_model, gpu_model) = (ResNet20::new(precision), ResNet20::new(precision));
    gpu_model.to_device(&dev).expect("model to the gpu");
    assert_eq!(cpu_model.param_count(), 272_474, "ResNet-20's parameters");
    let cfg = SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 5e-4, max_grad_norm: None };
    let (mut cpu_sgd, mut gpu_sgd) = (Sgd::new(cfg), Sgd::new(cfg));
    let int8 = matches!(precision, Precision::Int8(_));
    // The weights before each step: an update is compared with its own size, since some
    // parameters start at 0 (batch norms' shifts) and others are far larger than their steps.
    let mut before: Vec<Vec<f32>> = cpu_model.layers().iter().flat_map(|l| l.params()).map(|p| p.to_vec()).collect();
    for step in 0..2u64 {
        let x = Tensor::randn([8, 3, 32, 32], 500 + step);
        let labels: Vec<u32> = (0..8).map(|i| ((i * 3 + step as usize) % 10) as u32).collect();
        let c = train_step(&cpu_model, &mut cpu_sgd, &x, &labels, Device::Cpu);
        let g = train_step(&gpu_model, &mut gpu_sgd, &x, &labels, dev);
        let what = format!("{what}, step {step}");
        let rel_loss = (g.loss - c.loss).abs() / c.loss.abs();
        eprintln!("{what}: loss gpu {} cpu {} (relative difference {rel_loss:e})", g.loss, c.loss);
        // The first INT8 forward pass is exact up to the loss's exp and log; after an update
        // the weights may differ as the gradients do, and the bar is 1e-3.
        let loss_tol = match (int8, step) {
            (true, 0) => 1e-9,
            (true, _) => 1e-3,
            (false, _) => 1e-5,
        };
        if int8 && step == 0 {
            assert_bits(&format!("{what}: logits"), &g.logits, &c.logits);
        }
        assert!(rel_loss <= loss_tol, "{what}: loss differs by {rel_loss:e} (relative)");
        let grad_tol = if int8 { 2e-2 } else { 1e-3 };
        let mut exact = 0;
        for ((name, gg), (_, cg)) in g.grads.iter().zip(&c.grads) {
            exact += usize::from(gg.iter().zip(cg).all(|(&a, &b)| same(a, b)));
            let e = relative_l2(gg, cg);
            assert!(e <= grad_tol, "{what}: gradient of {name} differs by {e:e} (relative l2)");
        }
        eprintln!("{what}: {exact} of {} gradients equal bit for bit", g.grads.len());
        // Each step adds at most the gradients' relative difference to the weights' (the SGD rule
        // itself is bit for bit the CPU's): within twice the gradients' bound of this update.
        for (((name, gv), (_, cv)), old) in g.values.iter().zip(&c.values).zip(&before) {
            let diff: f64 = gv.iter().zip(cv).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
            let step_size: f64 = cv.iter().zip(old).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
            let e = if step_size == 0.0 { diff.sqrt() } else { (diff / step_size).sqrt() };
            assert!(e <= 2.0 * grad_tol, "{what}: updated {name} differs by {e:e} of its update (relative l2)");
        }
        before = c.values.into_iter().map(|(_, v)| v).collect();
    }
    // The INT8 layers' statistics (DCLR's phi scaled each step) on both devices.
    for ((name, gs), (_, cs)) in gpu_model.int8_stats().iter().zip(cpu_model.int8_stats()) {
        assert_eq!(gs.steps, cs.steps, "{name}: steps");
        assert!((gs.phi - cs.phi).abs() <= 2e-2 * cs.phi, "{name}: phi gpu {} cpu {}", gs.phi, cs.phi);
    }
}

#[test]
fn resnet20_trains_a_step_on_the_gpu_as_on_the_cpu_fp32() {
    compare_steps("resnet-20 fp32", Precision::Fp32);
}

#[test]
fn resnet20_trains_a_step_on_the_gpu_as_on_the_cpu_int8() {
    compare_steps("resnet-20 int8", int8());
}

// ---------------------------------------------------------------------------------------------
// Devices and errors

#[test]
fn tensors_on_two_devices_are_an_error_naming_the_op() {
    let dev = gpu();
    let layer = Conv2d::new("probe.conv", he(&[4, 3, 3, 3], 1), ConvGeometry::default(), int8()).expect("conv");
    layer.weight().to_device(&dev).expect("weight to the gpu");
    let x = Tensor::randn([2, 3, 5, 5], 2);
    match layer.forward(&x) {
        Err(e @ NnError::MixedDevices { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("int8-conv2d") && msg.contains("cpu") && msg.contains("cuda:0"), "{msg}");
        }
        other => panic!("expected a mixed-device error, got {other:?}"),
    }
    let a = on(&Tensor::ones([2, 2]), dev);
    match ops::add(&a, &Tensor::ones([2, 2])) {
        Err(NnError::MixedDevices { op, .. }) => assert_eq!(op, "add"),
        other => panic!("expected a mixed-device error, got {other:?}"),
    }
}

#[test]
fn an_op_without_a_gpu_path_says_it_runs_on_the_cpu_only() {
    let dev = gpu();
    let x = on(&Tensor::randn([1, 2, 4, 4], 3), dev);
    match ops::concat(&[x.clone(), x], 1) {
        Err(e @ NnError::CpuOnly { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("concat") && msg.contains("cpu only") && msg.contains("cuda:0"), "{msg}");
        }
        other => panic!("expected a cpu-only error, got {other:?}"),
    }
}

#[test]
fn values_and_gradients_cross_devices() {
    let dev = gpu();
    let v = Tensor::randn([3, 5], 4);
    assert_eq!(on(&on(&v, dev), Device::Cpu).to_vec(), v.to_vec(), "round trip");
    assert_eq!(on(&v, dev).device(), dev);
    // d/dx sum(relu(x) * r) = r where x > 0, computed on the gpu, read back on the cpu.
    let x = v.requires_grad();
    let r = Tensor::randn([3, 5], 5);
    let y = relu(&on(&x, dev)).expect("relu");
    let grads = probe(&y, &r).backward().expect("backward");
    let dx = grads.get(&x).expect("a gradient for the cpu leaf");
    assert_eq!(dx.device(), Device::Cpu);
    let want: Vec<f32> = v.to_vec().iter().zip(r.to_vec()).map(|(&a, b)| if a > 0.0 { b } else { 0.0 }).collect();
    assert_bits("gradient across to_device", &dx.to_vec(), &want);
}
