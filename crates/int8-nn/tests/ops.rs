//! The FP32 layers and the linear layer under candle's autograd: a small residual network's
//! gradients against finite differences of its own forward pass, batch-norm statistics, the loss,
//! and INT8 linear against FP32.

use candle_core::{DType, Device, Tensor, Var};
use int8_core::rng::CounterRng;
use int8_nn::conv::{Conv2d, ConvGeometry};
use int8_nn::layers::{BatchNorm2d, add_relu, cross_entropy, global_avg_pool, relu6};
use int8_nn::linear::Linear;
use int8_nn::precision::{Int8Config, Precision};

fn uniform(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| (rng.uniform(i as u64) * 2.0 - 1.0) * scale).collect()
}

fn var(data: Vec<f32>, dims: &[usize]) -> Var {
    Var::from_tensor(&Tensor::from_vec(data, dims, &Device::Cpu).unwrap()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
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
            conv1: Conv2d::new("conv1", var(uniform(4 * 4 * 9, 1, 0.3), &[4, 4, 3, 3]), g, precision).unwrap(),
            bn1: BatchNorm2d::new("bn1", 4, true).unwrap(),
            conv2: Conv2d::new("conv2", var(uniform(4 * 4 * 9, 2, 0.3), &[4, 4, 3, 3]), g, precision).unwrap(),
            bn2: BatchNorm2d::new("bn2", 4, false).unwrap(),
            fc: Linear::new("fc", var(uniform(3 * 4, 3, 0.5), &[3, 4]), var(uniform(3, 4, 0.1), &[3]), Precision::Fp32)
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

#[test]
fn residual_network_gradients_match_finite_differences() {
    let net = Tiny::new(Precision::Fp32);
    let x = var(uniform(3 * 4 * 5 * 5, 5, 1.0), &[3, 4, 5, 5]);
    let labels = [0u32, 2, 1];
    let loss = net.loss(x.as_tensor(), &labels);
    let grads = loss.backward().unwrap();
    let params: [(&str, &Var); 7] = [
        ("input", &x),
        ("conv1", net.conv1.weight()),
        ("bn1.gamma", net.bn1.gamma()),
        ("conv2", net.conv2.weight()),
        ("bn2.beta", net.bn2.beta()),
        ("fc.weight", net.fc.weight()),
        ("fc.bias", net.fc.bias()),
    ];
    for (name, p) in params {
        let g = flat(grads.get(p.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")));
        let base = flat(p.as_tensor());
        let h = 1e-2f32;
        for i in [0, base.len() / 2, base.len() - 1] {
            let eval = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                p.set(&Tensor::from_vec(v, p.dims(), &Device::Cpu).unwrap()).unwrap();
                let l = net.loss(x.as_tensor(), &labels).to_scalar::<f32>().unwrap() as f64;
                p.set(&Tensor::from_vec(base.clone(), p.dims(), &Device::Cpu).unwrap()).unwrap();
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
    let xt = Tensor::from_vec(x, (2, 2, 2, 2), &Device::Cpu).unwrap();
    let y = flat(&bn.forward(&xt).unwrap());
    assert!((y[0] + 1.0).abs() < 1e-4 && (y[1] - 1.0).abs() < 1e-4 && y[4].abs() < 1e-6, "{y:?}");
    let r = bn.running();
    assert!((r.mean[0] - 0.2).abs() < 1e-6 && (r.mean[1] - 1.0).abs() < 1e-6);
    // Unbiased variance over 8 values: 8/7; running = 0.9 * 1 + 0.1 * 8/7.
    assert!((r.var[0] - (0.9 + 0.1 * 8.0 / 7.0)).abs() < 1e-5, "{:?}", r.var);
    bn.set_training(false);
    let y = flat(&bn.forward(&xt).unwrap());
    let want = (1.0 - 0.2) / (r.var[0] + 1e-5).sqrt();
    assert!((y[0] - want).abs() < 1e-5);
    assert!(bn.forward(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).is_err());
}

#[test]
fn batch_norm_with_fused_relu6_is_batch_norm_then_relu6_bit_for_bit() {
    let dims = [3, 4, 5, 5];
    // Values spread enough that many outputs clip at 0 and at 6.
    let x = uniform(300, 21, 8.0);
    let r = Tensor::from_vec(uniform(300, 22, 1.0), &dims, &Device::Cpu).unwrap();
    let run = |fused: bool| {
        let bn = BatchNorm2d::new("bn", 4, false).unwrap();
        let bn = if fused { bn.with_relu6() } else { bn };
        bn.gamma().set(&Tensor::from_vec(vec![4.0f32, 3.0, 5.0, 2.5], 4, &Device::Cpu).unwrap()).unwrap();
        bn.beta().set(&Tensor::from_vec(vec![3.0f32, 1.0, -0.5, 2.0], 4, &Device::Cpu).unwrap()).unwrap();
        let xv = var(x.clone(), &dims);
        let h = bn.forward(xv.as_tensor()).unwrap();
        let y = if fused { h } else { relu6(&h).unwrap() };
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grads = [xv.as_tensor(), bn.gamma().as_tensor(), bn.beta().as_tensor()].map(|t| flat(g.get(t).unwrap()));
        bn.set_training(false);
        let h = bn.forward(xv.as_tensor()).unwrap();
        let eval = flat(&if fused { h } else { relu6(&h).unwrap() });
        (flat(&y), grads, eval)
    };
    let (fused, separate) = (run(true), run(false));
    let y = &fused.0;
    assert!(y.contains(&0.0) && y.contains(&6.0) && y.iter().any(|&v| v > 0.0 && v < 6.0));
    assert_eq!(fused, separate);
}

#[test]
fn cross_entropy_reports_loss_and_hits() {
    let logits = Tensor::from_vec(vec![3.0f32, 0.0, 0.0, 0.0, 0.0, 5.0], (2, 3), &Device::Cpu).unwrap();
    let (loss, report) = cross_entropy(&logits, &[0, 1]).unwrap();
    assert_eq!(report.top1, 1);
    assert!((loss.to_scalar::<f32>().unwrap() as f64 - report.loss).abs() < 1e-6);
    assert!(cross_entropy(&logits, &[0, 7]).unwrap_err().to_string().contains("label 7"));
}

#[test]
fn int8_linear_tracks_fp32() {
    let (n, i, o) = (64, 128, 10);
    let (w, b, x) = (uniform(o * i, 7, 0.1), uniform(o, 8, 0.1), uniform(n * i, 9, 1.0));
    let r = Tensor::from_vec(uniform(n * o, 10, 1.0), (n, o), &Device::Cpu).unwrap();
    let run = |precision| {
        let fc = Linear::new("fc", var(w.clone(), &[o, i]), var(b.clone(), &[o]), precision).unwrap();
        let xv = var(x.clone(), &[n, i]);
        let y = fc.forward(xv.as_tensor()).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = flat(g.get(xv.as_tensor()).unwrap());
        let gw = flat(g.get(fc.weight().as_tensor()).unwrap());
        (flat(&y), gx, gw, fc.stats())
    };
    let cos = |a: &[f32], b: &[f32]| {
        let d: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
        d / (a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
            * b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt())
    };
    let (y32, dx32, dw32, _) = run(Precision::Fp32);
    let (y8, dx8, dw8, st) = run(Precision::Int8(Int8Config::default()));
    assert!(
        cos(&y8, &y32) > 0.999 && cos(&dx8, &dx32) > 0.99 && cos(&dw8, &dw32) > 0.99,
        "{} {} {}",
        cos(&y8, &y32),
        cos(&dx8, &dx32),
        cos(&dw8, &dw32)
    );
    assert_eq!(st.steps, 1);
    let bad = Linear::new("fc", var(w, &[o, i]), var(vec![0.0; 3], &[3]), Precision::Fp32).unwrap_err();
    assert!(bad.to_string().contains("fc"));
}

#[test]
fn pooling_gradients_match_finite_differences() {
    use int8_nn::layers::{avg_pool2d, max_pool2d};
    let base = uniform(2 * 2 * 5 * 5, 11, 1.0);
    for (name, k, stride, pad) in [("max", 2, 2, 0), ("max", 3, 2, 1), ("avg", 3, 2, 1), ("avg", 2, 1, 0)] {
        let pool = |t: &Tensor| {
            if name == "max" { max_pool2d(t, k, stride, pad).unwrap() } else { avg_pool2d(t, k, stride, pad).unwrap() }
        };
        let x = var(base.clone(), &[2, 2, 5, 5]);
        let y = pool(x.as_tensor());
        let r = Tensor::from_vec(uniform(y.elem_count(), 12, 1.0), y.dims(), &Device::Cpu).unwrap();
        let g = flat((&y * &r).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap());
        let loss = |v: Vec<f32>| {
            let t = Tensor::from_vec(v, (2, 2, 5, 5), &Device::Cpu).unwrap();
            (&pool(&t) * &r).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
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
    use int8_nn::layers::{relu, relu6};
    let x = var(vec![-2.0, 0.5, 3.0, 5.9, 6.5, 9.0], &[6]);
    for (name, want_y, want_g) in [
        ("relu", vec![0.0, 0.5, 3.0, 5.9, 6.5, 9.0], vec![0.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("relu6", vec![0.0, 0.5, 3.0, 5.9, 6.0, 6.0], vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]),
    ] {
        let y = if name == "relu" { relu(x.as_tensor()).unwrap() } else { relu6(x.as_tensor()).unwrap() };
        assert_eq!(flat(&y), want_y, "{name}");
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(flat(g.get(x.as_tensor()).unwrap()), want_g, "{name}");
    }
}
