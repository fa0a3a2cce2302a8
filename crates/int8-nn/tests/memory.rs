//! Dropping a step's graph frees what its ops saved, and evaluation keeps nothing: over 100
//! batches the bytes of tensor storage at the peak do not grow. One test in a process of its own,
//! since the counters are process-wide.

use int8_core::rng::CounterRng;
use int8_nn::layers::{BatchNorm2d, Conv2d, Linear};
use int8_nn::memory::{live_bytes, peak_bytes, reset_peak, saved_bytes};
use int8_nn::ops::{add_relu, cross_entropy, global_avg_pool};
use int8_nn::optim::{Sgd, SgdConfig};
use int8_nn::precision::{Int8Config, Precision};
use int8_nn::{ConvGeometry, Layer, Module, Tensor, no_grad};

struct Net {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    conv2: Conv2d,
    bn2: BatchNorm2d,
    fc: Linear,
}

impl Net {
    fn new() -> Self {
        let g = ConvGeometry { padding: (1, 1), ..Default::default() };
        let int8 = Precision::Int8(Int8Config::default());
        let w = |seed| Tensor::randn((8, 8, 3, 3), seed).scale(0.2).unwrap();
        Net {
            conv1: Conv2d::new("conv1", w(1), g, int8).unwrap(),
            bn1: BatchNorm2d::new("bn1", 8, true).unwrap(),
            conv2: Conv2d::new("conv2", w(2), g, int8).unwrap(),
            bn2: BatchNorm2d::new("bn2", 8, false).unwrap(),
            fc: Linear::new("fc", Tensor::randn((10, 8), 3), Tensor::zeros(10), Precision::Fp32).unwrap(),
        }
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        let h = self.bn1.forward(&self.conv1.forward(x).unwrap()).unwrap();
        let h = self.bn2.forward(&self.conv2.forward(&h).unwrap()).unwrap();
        self.fc.forward(&global_avg_pool(&add_relu(&h, x).unwrap()).unwrap()).unwrap()
    }
}

impl Module for Net {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        self.conv2.visit(f);
        self.bn2.visit(f);
        self.fc.visit(f);
    }
}

fn batch(i: u64) -> (Tensor, Vec<u32>) {
    let rng = CounterRng::new(i);
    (Tensor::randn((16, 8, 12, 12), i), (0..16).map(|k| (rng.bits(k) % 10) as u32).collect())
}

#[test]
fn dropped_graphs_and_evaluation_keep_nothing_alive() {
    let net = Net::new();
    let mut sgd = Sgd::new(SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 5e-4, max_grad_norm: None });
    let step = |sgd: &mut Sgd, i: u64| {
        let (x, labels) = batch(i);
        let (loss, _) = cross_entropy(&net.logits(&x), &labels).unwrap();
        assert!(saved_bytes() > 0, "a training forward pass saves for its backward pass");
        let grads = loss.backward().unwrap();
        assert_eq!(saved_bytes(), 0, "the backward pass consumed what was saved");
        sgd.step(&net.trainables(), &grads, 0.01).unwrap();
    };
    // Training: after a first step (which makes the momentum buffers), every step ends where it
    // started and reaches the same peak.
    step(&mut sgd, 0);
    let (base, _) = (live_bytes(), reset_peak());
    for i in 1..=10 {
        step(&mut sgd, i);
    }
    let peak10 = peak_bytes();
    for i in 11..=100 {
        step(&mut sgd, i);
    }
    assert_eq!(live_bytes(), base, "a training step leaves nothing behind");
    assert_eq!(peak_bytes(), peak10, "the peak of 100 steps is the peak of 10");

    // Evaluation: nothing saved, and the peak of 100 batches is the peak of 10.
    net.set_training(false);
    reset_peak();
    let eval = |i: u64| {
        no_grad(|| {
            let (x, labels) = batch(1000 + i);
            let logits = net.logits(&x);
            assert!(!logits.is_tracked());
            assert_eq!(saved_bytes(), 0);
            cross_entropy(&logits, &labels).unwrap().1.loss
        })
    };
    for i in 0..10 {
        eval(i);
    }
    let peak10 = peak_bytes();
    for i in 10..100 {
        eval(i);
    }
    assert_eq!(live_bytes(), base);
    assert_eq!(peak_bytes(), peak10, "the peak of 100 evaluation batches is the peak of 10");
    // The eval peak is well under the training peak: no graph, no saved inputs.
    net.set_training(true);

    // The counters would see a leak: graphs kept alive keep their saved buffers, and the peak
    // grows with every batch kept.
    reset_peak();
    let mut kept = Vec::new();
    let mut peaks = Vec::new();
    for i in 0..3 {
        let (x, labels) = batch(2000 + i);
        kept.push(cross_entropy(&net.logits(&x), &labels).unwrap().0);
        peaks.push((peak_bytes(), saved_bytes()));
    }
    assert!(peaks[0].0 < peaks[1].0 && peaks[1].0 < peaks[2].0, "{peaks:?}");
    assert!(peaks[0].1 < peaks[1].1 && peaks[1].1 < peaks[2].1, "{peaks:?}");
    drop(kept);
    assert_eq!((live_bytes(), saved_bytes()), (base, 0));

    // A residual block's add + ReLU keeps one sign bit per value for its backward pass, not its
    // f32 output: once the graph's other holders let the output go, its bytes are free.
    let (x, _) = batch(3000);
    let h = net
        .bn2
        .forward(&net.conv2.forward(&net.bn1.forward(&net.conv1.forward(&x).unwrap()).unwrap()).unwrap())
        .unwrap();
    let saved = saved_bytes();
    let y = add_relu(&h, &x).unwrap();
    assert_eq!(saved_bytes() - saved, 8 * x.elem_count().div_ceil(64));
    let pooled = global_avg_pool(&y).unwrap();
    let live = live_bytes();
    drop(y);
    assert_eq!(live - live_bytes(), 4 * x.elem_count(), "the tape holds no f32 copy of the output");
    drop((x, h, pooled));
    assert_eq!((live_bytes(), saved_bytes()), (base, 0));

    // A batch norm with a ReLU keeps its f32 input after an FP32 convolution; after an INT8 one,
    // the convolution's integer sums, 2 bytes a value (and 8 bytes for each value beyond 16 bits,
    // a few here) with the 8 channels' scales; after an INT8 convolution with
    // `f16_batch_norm_input`, 2 bytes a value and a bit a value (words of 64 per plane). Its
    // statistics take 5 floats per channel either way.
    let (x, _) = batch(4000);
    let (n, planes, c) = (x.elem_count(), 16 * 8, 8);
    let w = || Tensor::randn((8, 8, 3, 3), 9).scale(0.2).unwrap();
    let g = ConvGeometry { padding: (1, 1), ..Default::default() };
    let half = Int8Config { f16_batch_norm_input: true, ..Int8Config::default() };
    for (precision, kept) in [
        (Precision::Fp32, 4 * n..4 * n + 1),
        (Precision::Int8(Int8Config::default()), 2 * n + 4 * c..2 * n + 4 * c + 8 * n / 100),
        (
            Precision::Int8(half),
            2 * n + 8 * planes * 144usize.div_ceil(64)..2 * n + 8 * planes * 144usize.div_ceil(64) + 1,
        ),
    ] {
        let conv = Conv2d::new("conv", w(), g, precision).unwrap();
        let bn = BatchNorm2d::new("bn", c, true).unwrap();
        let h = conv.forward(&x).unwrap();
        let saved = saved_bytes();
        let y = bn.forward(&h).unwrap();
        let got = saved_bytes() - saved - 4 * 5 * c;
        assert!(
            kept.contains(&got) && (got - kept.start).is_multiple_of(8),
            "{precision:?}: {got} bytes kept, {kept:?}"
        );
        drop((h, y));
    }
    drop(x);
    assert_eq!((live_bytes(), saved_bytes()), (base, 0));
}
