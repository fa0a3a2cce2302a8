//! ResNet-20 learns from real images at both precisions: a batch of CIFAR-10 training images
//! (the JPEG q75 re-encoding in `../shared/datasets`), fitted for a few SGD steps.

use std::path::PathBuf;

use int8_core::dsgc::{cosine_distance, search_clip};
use int8_datasets::archive::extract_tar_gz;
use int8_datasets::image_folder::ImageFolder;
use int8_datasets::loader::{CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD};
use int8_nn::Tensor;
use int8_nn::ops::cross_entropy;
use int8_nn::optim::{Sgd, SgdConfig};
use int8_nn::policy::LayerPolicy;
use int8_nn::precision::Int8Config;
use int8_zoo::Model;
use int8_zoo::resnet_cifar::ResNetCifar;

/// The CIFAR-10 JPEG archive: `$INT8_CIFAR10_JPEG`, or `shared/datasets/` beside an ancestor of
/// this crate (where every developer machine and CI run has it). Its absence fails the test: the
/// claims these tests back need real images.
fn cifar_archive() -> PathBuf {
    if let Ok(p) = std::env::var("INT8_CIFAR10_JPEG") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join("shared/datasets/cifar10-jpeg.tar.gz"))
        .find(|p| p.exists())
        .expect("no cifar10-jpeg.tar.gz in shared/datasets/ beside the checkout: set INT8_CIFAR10_JPEG to its path")
}

/// Sixteen SGD steps on one batch; the mean loss of the last three steps must be at least a
/// quarter below that of the first three, with no divergence.
fn fit_and_check(what: &str, model: &dyn Model, x: &Tensor, labels: &[u32]) {
    let mut sgd = Sgd::new(SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 5e-4, max_grad_norm: None });
    let mut losses = Vec::new();
    for _ in 0..16 {
        let (loss, report) = cross_entropy(&model.forward(x).unwrap(), labels).unwrap();
        let grads = loss.backward().unwrap();
        sgd.step(&model.trainables(), &grads, 0.05).unwrap();
        losses.push(report.loss);
    }
    eprintln!("{what}: losses {:?}", losses.iter().map(|l| format!("{l:.3}")).collect::<Vec<_>>());
    assert!(losses.iter().all(|l| l.is_finite()), "{what} diverged: {losses:?}");
    let (first, last) = (losses[..3].iter().sum::<f64>() / 3.0, losses[losses.len() - 3..].iter().sum::<f64>() / 3.0);
    assert!(last < 0.75 * first, "{what}: loss went from {first:.3} to {last:.3}");
}

#[test]
fn resnet20_loss_falls_on_real_cifar10_at_both_precisions() {
    let archive = cifar_archive();
    // The first 13 training images of each class: 130 real images, 128 used.
    let dir = tempfile::tempdir().unwrap();
    let keep = |p: &std::path::Path| {
        p.components().nth(1).is_some_and(|c| c.as_os_str() == "train")
            && p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u32>().ok()).is_some_and(|i| i < 13)
    };
    assert_eq!(extract_tar_gz(&archive, dir.path(), keep).unwrap(), 130);
    let folder = ImageFolder::open(&dir.path().join("cifar10-jpeg/train")).unwrap();
    assert_eq!(folder.classes.len(), 10);
    // Interleave the classes so that the batch holds all ten.
    let order: Vec<usize> = (0..13).flat_map(|i| (0..10).map(move |c| c * 13 + i)).take(128).collect();
    let (mean, std) = (CIFAR10_MEAN, CIFAR10_STD);
    let mut pixels = Vec::with_capacity(128 * 3 * 32 * 32);
    let mut labels = Vec::with_capacity(128);
    for &i in &order {
        let (img, label) = folder.load(i, Some((32, 32))).unwrap();
        pixels.extend(img.to_chw(mean, std));
        labels.push(label);
    }
    let x = Tensor::from_vec(pixels, (128, 3, 32, 32)).unwrap();

    for (what, policy) in [("fp32", LayerPolicy::fp32()), ("int8", LayerPolicy::paper(Int8Config::default()))] {
        let model = ResNetCifar::new("resnet20", 3, 10, &policy, 0).unwrap();
        // Keep the gradient that reaches a stage-2 convolution, for the DSGC checks below.
        let probe = &model.layer2[1].conv1;
        probe.quant().keep_grad(true);
        fit_and_check(what, &model, &x, &labels);

        if what == "int8" {
            // On this real conv gradient, the DSGC search lands within 1% of the best of a dense
            // 1000-point grid, and beats clipping at max|g|.
            let g = probe.quant().last_grad().expect("the probe layer kept its gradient");
            let amax = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let grid = (1..=1000).map(|i| cosine_distance(&g, amax * i as f32 / 1000.0)).fold(f64::INFINITY, f64::min);
            let found = search_clip("layer2.1.conv1.grad_output", &g).unwrap();
            eprintln!(
                "real gradient: dsgc d={:.3e} at c={:.3e}, grid best {grid:.3e}, clip-at-max d={:.3e}",
                found.distance,
                found.clip,
                cosine_distance(&g, amax)
            );
            assert!(found.distance <= grid * 1.01, "dsgc {} vs grid {grid}", found.distance);
            assert!(found.distance < cosine_distance(&g, amax));
        }
    }
}

#[test]
fn small_cnn_loss_falls_on_real_fashion_mnist_at_both_precisions() {
    let dir = std::path::Path::new("/usr/share/datasets/fashion-mnist");
    assert!(dir.exists(), "{} is absent: apt-get install -y dataset-fashion-mnist (scripts/setup does)", dir.display());
    let ds = int8_datasets::idx::read_idx_pair(
        &dir.join("train-images-idx3-ubyte.gz"),
        &dir.join("train-labels-idx1-ubyte.gz"),
        10,
    )
    .unwrap();
    // The first 256 training images, scaled to [0, 1] and normalised with Fashion-MNIST's
    // mean and standard deviation.
    let n = 256;
    let pixels: Vec<f32> = ds.images.data[..n * 784].iter().map(|&v| (v as f32 / 255.0 - 0.2860) / 0.3530).collect();
    let labels: Vec<u32> = ds.labels[..n].iter().map(|&l| l as u32).collect();
    let x = Tensor::from_vec(pixels, (n, 1, 28, 28)).unwrap();
    for (what, policy) in [("fp32", LayerPolicy::fp32()), ("int8", LayerPolicy::paper(Int8Config::default()))] {
        let model = int8_zoo::build("cnn-small", 10, &policy, 0).unwrap();
        fit_and_check(what, model.as_ref(), &x, &labels);
    }
}

/// The ImageNet-sized models each take a training step on real photographs (CIFAR-10 images,
/// resized and centre-cropped to the model's input side) at both precisions: the loss is finite,
/// every parameter gets a finite gradient and moves, and every INT8 layer reports statistics.
#[test]
fn imagenet_models_take_a_training_step_on_real_images_at_both_precisions() {
    let archive = cifar_archive();
    let dir = tempfile::tempdir().unwrap();
    let keep = |p: &std::path::Path| {
        p.components().nth(1).is_some_and(|c| c.as_os_str() == "test")
            && p.file_stem().and_then(|s| s.to_str()).and_then(|s| s.parse::<u32>().ok()).is_some_and(|i| i < 1)
    };
    assert_eq!(extract_tar_gz(&archive, dir.path(), keep).unwrap(), 10);
    let folder = ImageFolder::open(&dir.path().join("cifar10-jpeg/test")).unwrap();
    let (mean, std) = (IMAGENET_MEAN, IMAGENET_STD);
    for (name, side) in [("mobilenetv2", 224), ("resnet50", 224), ("alexnet", 224), ("inceptionv3", 299)] {
        // Two images of different classes.
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for i in [0, 5] {
            let (img, label) = folder.load_center(i, side).unwrap();
            pixels.extend(img.to_chw(mean, std));
            labels.push(label);
        }
        let x = Tensor::from_vec(pixels, (2, 3, side, side)).unwrap();
        for (what, policy) in [("fp32", LayerPolicy::fp32()), ("int8", LayerPolicy::paper(Int8Config::default()))] {
            let model = int8_zoo::build(name, 10, &policy, 0).unwrap();
            let before: Vec<Vec<f32>> = model.trainables().iter().map(|t| t.param.to_vec()).collect();
            let (loss, report) = cross_entropy(&model.forward(&x).unwrap(), &labels).unwrap();
            assert!(report.loss.is_finite() && report.loss > 0.0, "{name} {what}: loss {}", report.loss);
            let grads = loss.backward().unwrap();
            let mut should_move = Vec::new();
            for t in model.trainables() {
                let p = t.param;
                let g = grads.of(p).unwrap_or_else(|| panic!("{name} {what}: no gradient for {}", p.name())).to_vec();
                assert!(g.iter().all(|v| v.is_finite()), "{name} {what}: {} has a non-finite gradient", p.name());
                // A value must move when its step (lr times its gradient) is well above its
                // float spacing.
                let w = p.to_vec();
                should_move
                    .push(p.decay() || g.iter().zip(&w).any(|(g, w)| (0.01 * g).abs() > 1e-6 * w.abs().max(1e-30)));
            }
            let mut sgd =
                Sgd::new(SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 1e-4, max_grad_norm: None });
            sgd.step(&model.trainables(), &grads, 0.01).unwrap();
            for ((t, b), should) in model.trainables().iter().zip(&before).zip(should_move) {
                let now = t.param.to_vec();
                assert!(now.iter().all(|v| v.is_finite()), "{name} {what}: {} is not finite", t.param.name());
                if should {
                    assert_ne!(now, *b, "{name} {what}: {} did not move", t.param.name());
                }
            }
            let stats = model.int8_stats();
            assert_eq!(stats.is_empty(), what == "fp32", "{name} {what}");
            for (layer, st) in stats {
                assert!(st.steps == 1 && st.distance.is_finite() && st.phi > 0.0, "{name} {layer}: {st:?}");
            }
            eprintln!("{name} {what}: loss {:.3}, {} INT8 layers", report.loss, model.int8_stats().len());
        }
    }
}
