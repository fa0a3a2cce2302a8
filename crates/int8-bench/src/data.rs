//! The data bench: does the loader keep up with training? CIFAR-10 (JPEG q75) training images
//! are decoded into memory, then INT8 ResNet-20 steps (batch 128) consume batches from the
//! loader, which augments them (random crop after 4-pixel padding, flips, normalisation) on the
//! same two cores while the steps run. Reported: the time to decode, the step time, how long
//! each step waited for its batch, and, for data too large for memory, the time to build one
//! batch of 128 streamed from the JPEG files (decode, random-resized crop, flip, normalise).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use int8_datasets::image_folder::ImageFolder;
use int8_datasets::loader::{
    Augment, Augmented, CIFAR10_MEAN, CIFAR10_STD, InMemory, Source, Streamed, epoch, epoch_order, make_batch,
};
use int8_datasets::registry::{known, locate, search_dirs};
use int8_datasets::transform::ResizedCrop;
use int8_nn::Tensor;
use int8_nn::optim::{Sgd, SgdConfig};
use int8_nn::policy::LayerPolicy;
use int8_nn::precision::Int8Config;
use serde::Serialize;

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct DataRow {
    /// What was measured.
    pub name: String,
    /// Milliseconds.
    pub ms: f64,
}

/// Runs the bench for about `budget` of training steps.
pub fn run(workspace: &Path, budget: Duration) -> Result<Vec<DataRow>> {
    let ds = known("cifar10-jpeg")?;
    let root = locate(ds, &search_dirs(None, &workspace.join("datasets/cache"))).context(
        "cifar10-jpeg is not imported; run `cargo xtask data import cifar10-jpeg ../shared/datasets/cifar10-jpeg.tar.gz`",
    )?;
    let t = Instant::now();
    let folder = ImageFolder::open(&root.join("train"))?;
    let data = Arc::new(InMemory::from_image_folder(&folder, (32, 32))?);
    let decode_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!("decoded {} images in {:.1} s", data.len(), decode_ms / 1e3);
    let aug = Augment { pad: 4, flip: true, mean: CIFAR10_MEAN.to_vec(), std: CIFAR10_STD.to_vec() };
    let model = int8_zoo::build("resnet20", 10, &LayerPolicy::paper(Int8Config::default()), 0)?;
    let mut sgd = Sgd::new(SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 5e-4, max_grad_norm: None });
    let src: Arc<dyn Source> = Arc::new(Augmented { data: data.clone(), aug });
    let batches = epoch(src, 128, true, 0, 0, 4)?;
    let (mut steps, mut wait, mut total) = (0usize, 0.0f64, 0.0f64);
    let start = Instant::now();
    while start.elapsed() < budget || steps < 4 {
        let t0 = Instant::now();
        let Ok(b) = batches.recv() else { break };
        let b = b?;
        let t1 = Instant::now();
        let x = Tensor::from_vec(b.images, b.dims)?;
        int8_nn::threads::in_pool(|| int8_train::step::train_step(model.as_ref(), &mut sgd, &x, &b.labels, 0.1))?
            .map_err(|why| anyhow::anyhow!("the bench's step diverged: {why}"))?;
        // The first step includes the loader's start; it is not counted.
        if steps > 0 {
            wait += (t1 - t0).as_secs_f64() * 1e3;
            total += t0.elapsed().as_secs_f64() * 1e3;
        }
        steps += 1;
    }
    drop(batches);
    let n = (steps - 1).max(1) as f64;
    // Streaming: the same images decoded from their files for every batch.
    let streamed = Streamed {
        folder,
        side: 32,
        crop: Some(ResizedCrop::default()),
        flip: true,
        mean: CIFAR10_MEAN,
        std: CIFAR10_STD,
    };
    let order = epoch_order(streamed.len(), 0, 0);
    let t = Instant::now();
    let reps = 8;
    for k in 0..reps {
        make_batch(&streamed, &order[k * 128..(k + 1) * 128], 0, 0)?;
    }
    let stream_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let rows = vec![
        DataRow { name: "cifar10-jpeg decode 50000 train images".into(), ms: decode_ms },
        DataRow { name: "resnet20 int8 step b128, fed by the loader".into(), ms: total / n },
        DataRow { name: "wait for the next batch, per step".into(), ms: wait / n },
        DataRow { name: "streamed batch of 128 from the JPEG files (random-resized crop)".into(), ms: stream_ms },
    ];
    println!("| name | ms |");
    println!("| --- | ---: |");
    for r in &rows {
        println!("| {} | {:.3} |", r.name, r.ms);
    }
    Ok(rows)
}
