//! The FP32 layers and the linear layer on the tape: a small residual network's gradients against
//! finite differences of its own forward pass, batch-norm statistics, the loss, pooling, concat and
//! reshape, and INT8 linear against the exact products of its codes.

use int8_core::quant::{Granularity, Rounding, quantize};
use int8_core::rng::CounterRng;
use int8_nn::layers::{BatchNorm2d, Conv2d, Linear};
use int8_nn::ops::{add_relu, concat, cross_entropy, global_avg_pool, relu6};
use int8_nn::precision::{Int8Config, Precision};
use int8_nn::{ConvGeometry, Module, Param, Tensor};

fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| (rng.uniform(i as u64) * 2.0 - 1.0) * scale).collect()
}

fn tensor(data: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(data, dims).unwrap()
}

/// A residual block and a classifier head, small enough for finite differences.
struct Tiny {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    fc: Linear,
}

impl Tiny {
    fn new(precision: Precision) -> Self {
        let g = ConvGeometry { padding: (1, 1), ..Default::default() };
        Tiny {
            conv1: Conv2d::new("conv1", tensor(uniform(4 * 4 * 9, 1, 0.3), &[4, 4, 3, 3]), g, precision).unwrap(),
            bn1: BatchNorm2d::new("bn1", 4, true).unwrap(),
            conv2: Conv2d::new("conv2", tensor(uniform(4 * 4 * 9, 2, 0.3), &[4, 4, 3, 3]), g, precision).unwrap(),
            bn2: BatchNorm2d::new("bn2", 4, false).unwrap(),
            fc: Linear::new(
                "fc",
                tensor(uniform(3 * 4, 3, 0.5), &[3, 4]),
                tensor(uniform(3, 4, 0.1), &[3]),
                Precision::Fp32,
            )
            .unwrap(),
        }
    }

    fn loss(&self, x: &Tensor, labels: &[u32]) -> Tensor {
        let h = self.bn1.forward(&self.conv1.forward(x).unwrap()).unwrap();
        let h = self.bn2.forward(&self.conv2.forward(&h).unwrap()).unwrap();
        let h = add_relu(&h, x).unwrap();
        let logits = self.fc.forward(&global_avg_pool(&h).unwrap()).unwrap();
        cross_entropy(&logits, labels).unwrap().0
    }
}

impl Module for Tiny {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(int8_nn::Layer<'a>)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        self.conv2.visit(f);
        self.bn2.visit(f);
        self.fc.visit(f);
    }
}

#[test]
fn residual_network_gradients_match_finite_differences() {
    let net = Tiny::new(Precision::Fp32);
    let input = Param::new("input", tensor(uniform(3 * 4 * 5 * 5, 5, 1.0), &[3, 4, 5, 5]), false);
    let labels = [0u32, 2, 1];
    let loss = net.loss(&input.value(), &labels);
    let grads = loss.backward().unwrap();
    let params: [&Param; 7] = [
        &input,
        net.conv1.weight(),
        net.bn1.gamma(),
        net.conv2.weight(),
        net.bn2.beta(),
        net.fc.weight(),
        net.fc.bias(),
    ];
    for p in params {
        let name = p.name();
        let g = grads.of(p).unwrap_or_else(|| panic!("no gradient for {name}")).to_vec();
        let base = p.to_vec();
        let h = 1e-2f32;
        for i in [0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                p.set_values(v).unwrap();
                let l = net.loss(&input.value(), &labels).to_scalar().unwrap() as f64;
                p.set_values(base.clone()).unwrap();
                l
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
            assert!(
                (fd - g[i] as f64).abs() < 2e-3 + 2e-2 * fd.abs(),
                "{name}[{i}]: finite difference {fd} vs backward {}",
                g[i]
            );
        }
    }
}

#[test]
fn batch_norm_tracks_running_statistics_and_evaluates_with_them() {
    let bn = BatchNorm2d::new("bn", 2, false).unwrap();
    // Channel 0 is all 1s and 3s (mean 2, variance 1); channel 1 all 10s.
    let x: Vec<f32> = (0..2).flat_map(|_| [1.0, 3.0, 1.0, 3.0, 10.0, 10.0, 10.0, 10.0]).collect();
    let xt = Tensor::from_vec(x, (2, 2, 2, 2)).unwrap();
    let y = bn.forward(&xt).unwrap().to_vec();
    assert!((y[0] + 1.0).abs() < 1e-4 && (y[1] - 1.0).abs() < 1e-4 && y[4].abs() < 1e-6, "{y:?}");
    let r = bn.running();
    assert!((r.mean[0] - 0.2).abs() < 1e-6 && (r.mean[1] - 1.0).abs() < 1e-6);
    // Unbiased variance over 8 values: 8/7; running = 0.9 * 1 + 0.1 * 8/7.
    assert!((r.var[0] - (0.9 + 0.1 * 8.0 / 7.0)).abs() < 1e-5, "{:?}", r.var);
    bn.set_training(false);
    let y = int8_nn::no_grad(|| bn.forward(&xt)).unwrap().to_vec();
    let want = (1.0 - 0.2) / (r.var[0] + 1e-5).sqrt();
    assert!((y[0] - want).abs() < 1e-5);
    assert!(bn.forward(&Tensor::zeros((2, 2, 2))).is_err());
    // One value per channel in training normalises to 0 with no gradient: refused, saying why.
    bn.set_training(true);
    let e = bn.forward(&Tensor::zeros((1, 2, 1, 1))).unwrap_err().to_string();
    assert!(e.contains("`bn`") && e.contains("batch of at least 2"), "{e}");
    assert!(int8_nn::no_grad(|| bn.forward(&Tensor::zeros((2, 2, 1, 1)))).is_ok());
}

#[test]
fn batch_norm_with_fused_relu6_is_batch_norm_then_relu6_bit_for_bit() {
    let dims = [3, 4, 5, 5];
    // Values spread enough that many outputs clip at 0 and at 6.
    let x = uniform(300, 21, 8.0);
    let r = Tensor::from_vec(uniform(300, 22, 1.0), dims).unwrap();
    let run = |fused: bool| {
        let bn = BatchNorm2d::new("bn", 4, false).unwrap();
        let bn = if fused { bn.with_relu6() } else { bn };
        bn.gamma().set_values(vec![4.0f32, 3.0, 5.0, 2.5]).unwrap();
        bn.beta().set_values(vec![3.0f32, 1.0, -0.5, 2.0]).unwrap();
        let xv = tensor(x.clone(), &dims).requires_grad();
        let h = bn.forward(&xv).unwrap();
        let y = if fused { h } else { relu6(&h).unwrap() };
        let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = [g.get(&xv), g.of(bn.gamma()), g.of(bn.beta())].map(|t| t.unwrap().to_vec());
        bn.set_training(false);
        let eval = int8_nn::no_grad(|| {
            let h = bn.forward(&xv).unwrap();
            if fused { h } else { relu6(&h).unwrap() }
        });
        (y.to_vec(), grads, eval.to_vec())
    };
    let (fused, separate) = (run(true), run(false));
    let y = &fused.0;
    assert!(y.contains(&0.0) && y.contains(&6.0) && y.iter().any(|&v| v > 0.0 && v < 6.0));
    assert_eq!(fused, separate);
}

#[test]
fn cross_entropy_reports_loss_and_hits() {
    let logits = Tensor::from_vec(vec![3.0f32, 0.0, 0.0, 0.0, 0.0, 5.0], (2, 3)).unwrap();
    let (loss, report) = cross_entropy(&logits, &[0, 1]).unwrap();
    assert_eq!(report.top1, 1);
    assert!((loss.to_scalar().unwrap() as f64 - report.loss).abs() < 1e-6);
    assert!(cross_entropy(&logits, &[0, 7]).unwrap_err().to_string().contains("label 7"));
}

/// The f64 product `a b^T` of row-major `a` (`n x k`) and `b` (`m x k`).
fn matmul_t(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k).map(|t| a[i * k + t] * b[j * k + t]).sum();
        }
    }
    out
}

fn transpose(a: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..cols * rows).map(|i| a[(i % rows) * cols + i / rows]).collect()
}

/// An INT8 linear layer computes exactly the products of the codes it quantized, scaled: its
/// output and gradients match f64 products of the dequantized codes (the f32 results round those
/// once), which an FP32 layer would not (its values differ by the quantization error).
#[test]
fn int8_linear_computes_the_exact_products_of_its_codes() {
    let (n, i, o) = (64, 128, 10);
    let (w, b, x) = (uniform(o * i, 7, 0.1), uniform(o, 8, 0.1), uniform(n * i, 9, 1.0));
    let r = uniform(n * o, 10, 1.0);
    let cfg = Int8Config { clip: int8_core::dsgc::ClipMode::MaxAbs, ..Int8Config::default() };
    let fc = Linear::new("fc", tensor(w.clone(), &[o, i]), tensor(b.clone(), &[o]), Precision::Int8(cfg)).unwrap();
    let xt = tensor(x.clone(), &[n, i]).requires_grad();
    let y = fc.forward(&xt).unwrap();
    let g = y.mul(&tensor(r.clone(), &[n, o])).unwrap().sum_all().unwrap().backward().unwrap();
    let deq = |v: &[f32], what| -> Vec<f64> {
        quantize(what, v, Granularity::PerTensor, 1, Rounding::Nearest)
            .unwrap()
            .dequantize()
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    let (xd, wd, rd) = (deq(&x, "x"), deq(&w, "w"), deq(&r, "dy"));
    let products = matmul_t(&xd, &wd, n, i, o);
    let want_y: Vec<f64> = products.iter().enumerate().map(|(k, v)| v + b[k % o] as f64).collect();
    let want_dx = matmul_t(&rd, &transpose(&wd, o, i), n, o, i);
    let want_dw = matmul_t(&transpose(&rd, n, o), &transpose(&xd, n, i), o, n, i);
    let fp32 = |want: &[f64], got: &[f32], what: &str| {
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0f64, f64::max);
        assert!(worst <= 1e-6 * scale, "{what}: off by {worst} (scale {scale})");
    };
    fp32(&want_y, &y.to_vec(), "y");
    fp32(&want_dx, &g.get(&xt).unwrap().to_vec(), "dx");
    fp32(&want_dw, &g.of(fc.weight()).unwrap().to_vec(), "dw");
    let st = fc.quant().stats();
    assert_eq!(st.steps, 1);
    // The FP32 products of the unquantized values are measurably elsewhere: a layer that silently
    // ran FP32 fails the checks above.
    let unquantized = matmul_t(&f64s(&x), &f64s(&w), n, i, o);
    let gap = unquantized.iter().zip(&products).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    let scale = products.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(gap > 1e-4 * scale, "quantization must change the products: {gap}");
    let bad = Linear::new("fc", tensor(w, &[o, i]), tensor(vec![0.0; 3], &[3]), Precision::Fp32).unwrap_err();
    assert!(bad.to_string().contains("fc"));
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn pooling_gradients_match_finite_differences() {
    use int8_nn::ops::{avg_pool2d, max_pool2d};
    let base = uniform(2 * 2 * 5 * 5, 11, 1.0);
    for (name, k, stride, pad) in [("max", 2, 2, 0), ("max", 3, 2, 1), ("avg", 3, 2, 1), ("avg", 2, 1, 0)] {
        let pool = |t: &Tensor| {
            if name == "max" { max_pool2d(t, k, stride, pad).unwrap() } else { avg_pool2d(t, k, stride, pad).unwrap() }
        };
        let x = tensor(base.clone(), &[2, 2, 5, 5]).requires_grad();
        let y = pool(&x);
        let r = Tensor::from_vec(uniform(y.elem_count(), 12, 1.0), y.dims()).unwrap();
        let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().to_vec();
        let loss = |v: Vec<f32>| {
            let t = Tensor::from_vec(v, (2, 2, 5, 5)).unwrap();
            pool(&t).mul(&r).unwrap().sum_all().unwrap().to_scalar().unwrap() as f64
        };
        for i in [0, 13, 37, base.len() - 1] {
            let (mut p, mut q) = (base.clone(), base.clone());
            p[i] += 1e-3;
            q[i] -= 1e-3;
            let fd = (loss(p) - loss(q)) / 2e-3;
            assert!((fd - g[i] as f64).abs() < 1e-3, "{name} k{k} s{stride} p{pad} [{i}]: {fd} vs {}", g[i]);
        }
    }
}

#[test]
fn relu_and_relu6_pass_gradients_only_inside_their_range() {
    use int8_nn::ops::{relu, relu6};
    let x = tensor(vec![-2.0, 0.5, 3.0, 5.9, 6.5, 9.0], &[6]).requires_grad();
    for (name, want_y, want_g) in [
        ("relu", vec![0.0, 0.5, 3.0, 5.9, 6.5, 9.0], vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("relu6", vec![0.0, 0.5, 3.0, 5.9, 6.0, 6.0], vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
    ] {
        let y = if name == "relu" { relu(&x).unwrap() } else { relu6(&x).unwrap() };
        assert_eq!(y.to_vec(), want_y, "{name}");
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec(), want_g, "{name}");
    }
}

#[test]
fn global_pooling_residual_add_concat_and_flatten_route_gradients_where_their_values_went() {
    // y = concat(add_relu(a, b), gap(a)[..., None, None] broadcast by hand) -> flatten -> * r
    let a = tensor(uniform(2 * 3 * 2 * 2, 31, 1.0), &[2, 3, 2, 2]).requires_grad();
    let b = tensor(uniform(2 * 3 * 2 * 2, 32, 1.0), &[2, 3, 2, 2]).requires_grad();
    let c = tensor(uniform(2 * 2 * 2 * 2, 33, 1.0), &[2, 2, 2, 2]).requires_grad();
    let f = |a: &Tensor, b: &Tensor, c: &Tensor| {
        let joined = concat(&[add_relu(a, b).unwrap(), c.clone()], 1).unwrap();
        assert_eq!(joined.dims(), &[2, 5, 2, 2]);
        let flat = joined.flatten_from(1).unwrap();
        assert_eq!(flat.dims(), &[2, 20]);
        let pooled = global_avg_pool(&joined).unwrap();
        (flat, pooled)
    };
    let (flat, pooled) = f(&a, &b, &c);
    let (r1, r2) = (tensor(uniform(40, 34, 1.0), &[2, 20]), tensor(uniform(10, 35, 1.0), &[2, 5]));
    let loss = |flat: &Tensor, pooled: &Tensor| {
        flat.mul(&r1).unwrap().sum_all().unwrap().add(&pooled.mul(&r2).unwrap().sum_all().unwrap()).unwrap()
    };
    let g = loss(&flat, &pooled).backward().unwrap();
    for (name, t, seed) in [("a", &a, 31), ("b", &b, 32), ("c", &c, 33)] {
        let gt = g.get(t).unwrap().to_vec();
        let base = t.to_vec();
        for i in 0..base.len() {
            let eval = |d: f32| {
                let mut v = base.clone();
                v[i] += d;
                let p = tensor(v, t.dims());
                let (aa, bb, cc) = match name {
                    "a" => (p, b.detach(), c.detach()),
                    "b" => (a.detach(), p, c.detach()),
                    _ => (a.detach(), b.detach(), p),
                };
                let (fl, po) = f(&aa, &bb, &cc);
                loss(&fl, &po).to_scalar().unwrap() as f64
            };
            let fd = (eval(1e-3) - eval(-1e-3)) / 2e-3;
            assert!((fd - gt[i] as f64).abs() < 2e-3, "{name}[{i}] (seed {seed}): {fd} vs {}", gt[i]);
        }
    }
}

#[test]
fn a_model_lists_its_parameters_through_its_layers() {
    let net = Tiny::new(Precision::Int8(Int8Config::default()));
    let names: Vec<&str> = net.trainables().iter().map(|t| t.param.name()).collect();
    assert_eq!(
        names,
        ["conv1.weight", "bn1.gamma", "bn1.beta", "conv2.weight", "bn2.gamma", "bn2.beta", "fc.weight", "fc.bias"]
    );
    assert_eq!(net.param_count(), 2 * 4 * 4 * 9 + 4 * 4 + 3 * 4 + 3);
    let decays: Vec<bool> = net.trainables().iter().map(|t| t.param.decay()).collect();
    assert_eq!(decays, [true, false, false, true, false, false, true, false]);
    assert_eq!(net.int8_stats().len(), 2, "the two convolutions run in INT8, fc in FP32");
}

/// A frozen batch norm (detection backbones) normalises with its running statistics in training,
/// passes gradients to its input as finite differences of its forward say, and its scale and
/// shift take none and are not trained.
#[test]
fn a_frozen_batch_norm_trains_its_input_only() {
    let bn = BatchNorm2d::new("bn", 3, true).unwrap().frozen();
    bn.set_running(int8_nn::layers::RunningStats { mean: vec![0.1, -0.2, 0.3], var: vec![0.5, 2.0, 1.5] });
    bn.gamma().set_values(vec![1.5, 0.5, -1.0]).unwrap();
    bn.beta().set_values(vec![0.1, 0.2, 0.3]).unwrap();
    bn.set_training(true);
    let base = uniform(2 * 3 * 4, 41, 2.0);
    let r = tensor(uniform(2 * 3 * 4, 42, 1.0), &[2, 3, 2, 2]);
    let x = tensor(base.clone(), &[2, 3, 2, 2]).requires_grad();
    let y = bn.forward(&x).unwrap();
    let before = bn.running();
    let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    assert_eq!(bn.running(), before, "running statistics are not updated");
    assert!(g.of(bn.gamma()).is_none() && g.of(bn.beta()).is_none(), "frozen parameters take no gradient");
    let dx = g.get(&x).unwrap().to_vec();
    for i in 0..base.len() {
        let at = |d: f32| {
            let mut v = base.clone();
            v[i] += d;
            bn.forward(&tensor(v, &[2, 3, 2, 2])).unwrap().mul(&r).unwrap().sum_all().unwrap().to_scalar().unwrap()
                as f64
        };
        let fd = (at(1e-3) - at(-1e-3)) / 2e-3;
        assert!((fd - dx[i] as f64).abs() < 2e-3, "dx[{i}]: {fd} vs {}", dx[i]);
    }
    let net_params = bn.layers().iter().flat_map(|l| l.params()).count();
    assert_eq!((net_params, bn.param_count(), bn.trainables().len()), (2, 0, 0));
}

#[test]
fn permute_moves_values_where_their_indices_go_and_back() {
    let (n, c, h, w) = (2, 3, 4, 5);
    let x = tensor((0..n * c * h * w).map(|v| v as f32).collect(), &[n, c, h, w]).requires_grad();
    let y = x.permute(&[0, 2, 3, 1]).unwrap();
    assert_eq!(y.dims(), &[n, h, w, c]);
    let (xv, yv) = (x.to_vec(), y.to_vec());
    for i in 0..n {
        for ci in 0..c {
            for yi in 0..h {
                for xi in 0..w {
                    assert_eq!(yv[((i * h + yi) * w + xi) * c + ci], xv[((i * c + ci) * h + yi) * w + xi]);
                }
            }
        }
    }
    // The gradient of <permute(x), r> is r permuted back.
    let r = tensor(uniform(y.elem_count(), 51, 1.0), y.dims());
    let g = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap().get(&x).unwrap().to_vec();
    let back = r.permute(&[0, 3, 1, 2]).unwrap().to_vec();
    assert_eq!(g, back);
    assert!(x.permute(&[0, 1, 1, 2]).is_err() && x.permute(&[0, 1, 2]).is_err());
}
