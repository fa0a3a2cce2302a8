//! The trainer end to end on real data (Fashion-MNIST, a few hundred images): the TensorBoard
//! files it writes are read back with TensorBoard's own reader, and a run killed and resumed
//! ends exactly where an uninterrupted one does.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

use int8_train::TrainError;
use int8_train::checkpoint;
use int8_train::progress::ProgressMode;
use int8_train::recipe::Recipe;
use int8_train::run::{RunOptions, Summary, run};
use serde_json::Value;

const FASHION: &str = "/usr/share/datasets/fashion-mnist";

/// A two-epoch INT8 recipe over 512 training images, with DSGC searching every 5 steps and
/// whenever the clip value goes stale (a distance 1.1 times the last search's), and stochastic
/// gradient rounding, so that resuming must restore the clip state and the
/// rounding stream as well as weights and momentum.
fn recipe(extra: &[&str]) -> Recipe {
    assert!(
        Path::new(FASHION).exists(),
        "{FASHION} is missing: apt-get install -y dataset-fashion-mnist (the README's set-up does it)"
    );
    let text = r#"
model = "cnn-small"
dataset = "fashion-mnist"
[data]
train_limit = 512
test_limit = 500
pad = 2
[train]
epochs = 2
batch = 64
eval_batch = 250
log_every = 2
histogram_every = 5
checkpoint_every = 3
[optim]
lr = 0.05
weight_decay = 5e-4
schedule = "cosine"
[quant]
clip_interval = 5
clip_stale_ratio = 1.1
grad_rounding = "stochastic"
"#;
    let sets: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    Recipe::parse(text, Path::new("test-recipe.toml"), &sets).unwrap()
}

fn opts(out: &Path) -> RunOptions {
    RunOptions { progress: ProgressMode::Quiet, ..RunOptions::new(out) }
}

/// Runs on one thread, so that floating-point sums are in a fixed order and runs compare bit
/// for bit.
fn one_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(f)
}

/// Every tag of a run folder, read by TensorBoard's `EventAccumulator`.
fn read_events(dir: &Path) -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/read_events.py");
    let out = Command::new("python3").arg(&script).arg(dir).output().expect("python3 runs");
    assert!(
        out.status.success(),
        "TensorBoard's reader failed (install it with `pip install tensorboard`; the README's set-up does it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tensorboard_reads_every_tag_the_trainer_writes() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(&[]);
    let s: Summary = run(&r, &opts(dir.path())).unwrap();
    assert_eq!((s.images, s.int8_layers, s.epochs), ((512, 500), 2, 2));
    let ev = read_events(dir.path());
    let scalars = ev["scalars"].as_object().unwrap();
    let mut want: Vec<String> = ["train/loss", "train/top1", "train/lr", "train/images_per_s", "train/step_ms"]
        .into_iter()
        .chain(["epoch/train_loss", "epoch/train_top1", "epoch/images_per_s", "test/loss", "test/top1", "test/top5"])
        .map(String::from)
        .collect();
    for layer in ["conv2", "conv3"] {
        for what in ["clip", "cosine_distance", "phi", "saturation_x", "saturation_w", "saturation_dy", "searches"] {
            want.push(format!("quant/{layer}/{what}"));
        }
    }
    let mut got: Vec<String> = scalars.keys().cloned().collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // 16 steps logged every 2 (and at step 1); the test curve has one point per epoch, and its
    // last point is the summary's top-1.
    assert_eq!(scalars["train/loss"].as_array().unwrap().len(), 9);
    let top1 = scalars["test/top1"].as_array().unwrap();
    assert_eq!(top1.len(), 2);
    assert_eq!(top1[1][0], 16);
    assert!((top1[1][1].as_f64().unwrap() - s.top1.unwrap()).abs() < 1e-4);
    // DCLR's multiplier is exp(-20 d) floored at 0.1, as logged.
    let (d, phi) = (&scalars["quant/conv2/cosine_distance"], &scalars["quant/conv2/phi"]);
    for (d, p) in d.as_array().unwrap().iter().zip(phi.as_array().unwrap()) {
        let want = (-20.0 * d[1].as_f64().unwrap()).exp().max(0.1);
        assert!((p[1].as_f64().unwrap() - want).abs() < 1e-5, "phi {p} for distance {d}");
    }
    // Histograms of every parameter and of the INT8 layers' gradients, at steps 5, 10 and 15.
    let hist = ev["histograms"].as_object().unwrap();
    let mut names: Vec<&str> = hist.keys().map(String::as_str).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "grads/conv2.grad_output",
            "grads/conv3.grad_output",
            "weights/bn1.beta",
            "weights/bn1.gamma",
            "weights/bn2.beta",
            "weights/bn2.gamma",
            "weights/bn3.beta",
            "weights/bn3.gamma",
            "weights/conv1.weight",
            "weights/conv2.weight",
            "weights/conv3.weight",
            "weights/fc.bias",
            "weights/fc.weight",
        ]
    );
    let conv2 = hist["weights/conv2.weight"].as_array().unwrap();
    assert_eq!(conv2.iter().map(|p| p[0].as_i64().unwrap()).collect::<Vec<_>>(), vec![5, 10, 15]);
    assert_eq!(conv2[0][1].as_f64().unwrap(), (64 * 32 * 9) as f64);
    // The resolved recipe as text.
    let text = &ev["tensors"]["recipe"][0][1];
    assert!(text.as_str().unwrap().contains("model = \"cnn-small\""), "{text}");
    same_scalars_as_tensorboard(dir.path(), &ev);
}

/// Every tensor of a checkpoint, by name.
fn tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    checkpoint::load(path).unwrap().tensors
}

#[test]
fn a_killed_and_resumed_run_ends_exactly_where_an_uninterrupted_one_does() {
    let r = recipe(&[]);
    let straight = tempfile::tempdir().unwrap();
    let s_straight = one_thread(|| run(&r, &opts(straight.path()))).unwrap();

    let broken = tempfile::tempdir().unwrap();
    // Killed after step 5, with no chance to save: the checkpoint of step 3 is what is left.
    let mut o = opts(broken.path());
    o.kill_at_step = Some(5);
    assert!(matches!(one_thread(|| run(&r, &o)), Err(TrainError::Interrupted { step: 5, .. })));
    assert_eq!(
        checkpoint::load(&broken.path().join("checkpoints/last.safetensors")).unwrap().state.unwrap().global_step,
        3
    );
    // Without --resume the folder is refused rather than overwritten.
    let err = one_thread(|| run(&r, &opts(broken.path()))).unwrap_err().to_string();
    assert!(err.contains("--resume"), "{err}");
    // A different recipe cannot resume it.
    let mut o = opts(broken.path());
    o.resume = true;
    let err = one_thread(|| run(&recipe(&["optim.lr=0.1"]), &o)).unwrap_err().to_string();
    assert!(err.contains("different recipe"), "{err}");
    // Resumed, then stopped as by Ctrl-C after the next step, with a checkpoint there (step 4).
    o.stop.store(true, Ordering::Relaxed);
    assert!(matches!(one_thread(|| run(&r, &o)), Err(TrainError::Interrupted { step: 4, .. })));
    // Resumed again to the end.
    o.stop.store(false, Ordering::Relaxed);
    let s_broken = one_thread(|| run(&r, &o)).unwrap();

    let (a, b) = (
        tensors(&straight.path().join("checkpoints/last.safetensors")),
        tensors(&broken.path().join("checkpoints/last.safetensors")),
    );
    assert_eq!(a.keys().collect::<std::collections::BTreeSet<_>>(), b.keys().collect());
    for (name, ta) in &a {
        assert_eq!(ta, &b[name], "tensor {name} differs after resuming");
    }
    assert!(a.keys().any(|k| k.starts_with("optim.momentum.")), "momentum is checkpointed");
    let (qa, qb) = (
        checkpoint::load(&straight.path().join("checkpoints/last.safetensors")).unwrap().state.unwrap(),
        checkpoint::load(&broken.path().join("checkpoints/last.safetensors")).unwrap().state.unwrap(),
    );
    assert_eq!(qa.quant, qb.quant);
    assert_eq!(qa.quant["conv2"].steps, 16);
    // Four periodic searches in 16 steps; more means a stale clip value triggered some, and the
    // resumed run restored what decides them.
    assert!(qa.quant["conv2"].searches + qa.quant["conv3"].searches > 8, "{:?}", qa.quant);
    let strip = |h: &[checkpoint::EpochRecord]| {
        h.iter().map(|e| (e.epoch, e.train_loss, e.train_top1, e.test_loss, e.test_top1)).collect::<Vec<_>>()
    };
    assert_eq!(strip(&qa.history), strip(&qb.history));
    assert_eq!((s_straight.top1, s_straight.best_top1), (s_broken.top1, s_broken.best_top1));
    assert_eq!(s_straight.final_train_loss, s_broken.final_train_loss);
    // A finished run resumed is left as it is.
    assert_eq!(one_thread(|| run(&r, &o)).unwrap(), s_broken);

    // TensorBoard sees one curve without doubled steps: the restart marks let it drop what the
    // killed session logged past its checkpoint.
    let ev = read_events(broken.path());
    let loss: BTreeMap<i64, f64> = ev["scalars"]["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    let steps: Vec<i64> =
        ev["scalars"]["train/loss"].as_array().unwrap().iter().map(|p| p[0].as_i64().unwrap()).collect();
    assert_eq!(steps, loss.keys().copied().collect::<Vec<_>>(), "steps are unique and in order");
    assert_eq!(steps, vec![1, 2, 4, 6, 8, 10, 12, 14, 16]);
    same_scalars_as_tensorboard(broken.path(), &ev);
}

/// `train.checkpoint_epochs = 2` over three epochs: the epoch-end checkpoint is written after
/// epochs 2 and 3 only, so a run killed in epoch 3 resumes from epoch 2's end and still ends
/// exactly where an uninterrupted run does; the best checkpoint is the best epoch's state.
#[test]
fn checkpoints_every_other_epoch_resume_from_the_last_written() {
    let r = recipe(&["train.epochs=3", "train.checkpoint_every=0", "train.checkpoint_epochs=2"]);
    let straight = tempfile::tempdir().unwrap();
    one_thread(|| run(&r, &opts(straight.path()))).unwrap();
    let broken = tempfile::tempdir().unwrap();
    let mut o = opts(broken.path());
    // Eight steps an epoch: killed in epoch 2, no epoch-end checkpoint has been written yet.
    o.kill_at_step = Some(12);
    assert!(matches!(one_thread(|| run(&r, &o)), Err(TrainError::Interrupted { step: 12, .. })));
    assert!(!broken.path().join("checkpoints/last.safetensors").exists());
    // Again from the start, killed in epoch 3: what is left is epoch 2's end.
    o.resume = true;
    o.kill_at_step = Some(20);
    assert!(matches!(one_thread(|| run(&r, &o)), Err(TrainError::Interrupted { step: 20, .. })));
    let ck = checkpoint::load(&broken.path().join("checkpoints/last.safetensors")).unwrap().state.unwrap();
    assert_eq!((ck.global_step, ck.epochs_done), (16, 2));
    o.kill_at_step = None;
    one_thread(|| run(&r, &o)).unwrap();
    let (a, b) = (
        tensors(&straight.path().join("checkpoints/last.safetensors")),
        tensors(&broken.path().join("checkpoints/last.safetensors")),
    );
    for (name, ta) in &a {
        assert_eq!(ta, &b[name], "tensor {name} differs after resuming");
    }
    let best = checkpoint::load(&straight.path().join("checkpoints/best.safetensors")).unwrap().state.unwrap();
    let top1 = best.history.last().unwrap().test_top1.unwrap();
    assert_eq!(top1, best.best, "the best checkpoint holds the state of its best epoch");
    let last = checkpoint::load(&straight.path().join("checkpoints/last.safetensors")).unwrap().state.unwrap();
    assert_eq!(top1, last.history.iter().filter_map(|h| h.test_top1).fold(f64::MIN, f64::max));
}

/// A run killed before its first checkpoint starts again from step 0 on --resume, and removes
/// what the killed session logged: TensorBoard sees each step once.
#[test]
fn resuming_a_run_killed_before_its_first_checkpoint_leaves_no_stale_events() {
    let r = recipe(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.kill_at_step = Some(2);
    assert!(matches!(one_thread(|| run(&r, &o)), Err(TrainError::Interrupted { step: 2, .. })));
    assert!(!dir.path().join("checkpoints/last.safetensors").exists());
    o.kill_at_step = None;
    o.resume = true;
    one_thread(|| run(&r, &o)).unwrap();
    let events = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("events.out.tfevents."))
        .count();
    assert_eq!(events, 1, "the killed session's event file is gone");
    let ev = read_events(dir.path());
    let steps: Vec<i64> =
        ev["scalars"]["train/loss"].as_array().unwrap().iter().map(|p| p[0].as_i64().unwrap()).collect();
    assert_eq!(steps, vec![1, 2, 4, 6, 8, 10, 12, 14, 16]);
}

/// Our reader (`cargo xtask scalars`) gives every tag the points TensorBoard's reader gives.
fn same_scalars_as_tensorboard(dir: &Path, ev: &Value) {
    let ours = int8_train::tensorboard::read_scalars(dir).unwrap();
    let theirs = ev["scalars"].as_object().unwrap();
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (tag, points) in &ours {
        let want: Vec<(u64, f32)> = theirs[tag]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
            .collect();
        assert_eq!(points, &want, "{tag}");
    }
}

#[test]
fn a_layer_rule_that_names_no_layer_is_refused_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let r = recipe(&[r#"quant.rules=[{ pattern = "layer9.*", int8 = false }]"#]);
    let err = run(&r, &opts(dir.path())).unwrap_err().to_string();
    assert!(err.contains("`layer9.*`") && err.contains("cnn-small"), "{err}");
    assert!(!dir.path().join("checkpoints").exists());
}

/// A run may resume on another device (`train.device` is not part of what a run is), and a GPU
/// asked of a trainer built without the `cuda` feature is refused with how to build one, before
/// the run folder changes.
#[cfg(not(feature = "cuda"))]
#[test]
fn a_run_resumes_on_another_device_and_a_gpu_needs_the_cuda_feature() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.kill_at_step = Some(4);
    assert!(matches!(one_thread(|| run(&recipe(&[]), &o)), Err(TrainError::Interrupted { step: 4, .. })));
    let saved = std::fs::read_to_string(dir.path().join("recipe.toml")).unwrap();
    let (o, gpu) = (RunOptions { resume: true, ..opts(dir.path()) }, recipe(&["train.device=\"cuda\""]));
    let err = one_thread(|| run(&gpu, &o)).unwrap_err().to_string();
    assert!(err.contains("cuda:0") && err.contains("--features cuda"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("recipe.toml")).unwrap(), saved);
    // Another change than the device is still another run.
    let err = one_thread(|| run(&recipe(&["optim.lr=0.1", "train.device=\"cuda\""]), &o)).unwrap_err().to_string();
    assert!(err.contains("different recipe"), "{err}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_message_and_keeps_its_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    // A learning rate of 1e45 (past f32's range) with warmup: step 1 runs at rate 0 and is
    // checkpointed; step 2's update overflows.
    let r = recipe(&["optim.lr=1e45", "optim.warmup_epochs=1", "train.checkpoint_every=1"]);
    let err = run(&r, &opts(dir.path())).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TrainError::Diverged { step: 2, .. }), "{msg}");
    assert!(msg.contains("diverged") && msg.contains("lower optim.lr") && msg.contains("last.safetensors"), "{msg}");
    let kept = checkpoint::load(&dir.path().join("checkpoints/last.safetensors")).unwrap();
    assert_eq!(kept.state.unwrap().global_step, 1);
    for (name, (_, v)) in &kept.tensors {
        assert!(v.iter().all(|x| x.is_finite()), "the kept checkpoint has a non-finite {name}");
    }
    assert!(!dir.path().join("summary.json").exists());
}

#[test]
fn an_int8_run_can_start_from_an_fp32_checkpoint() {
    let fp32 = tempfile::tempdir().unwrap();
    run(&recipe(&["quant.precision=fp32", "train.epochs=1"]), &opts(fp32.path())).unwrap();
    let best = fp32.path().join("checkpoints/best.safetensors");
    let init = format!("train.init=\"{}\"", best.display());
    // One INT8 epoch from the FP32 weights: it starts where FP32 ended, so its first loss is far
    // below a fresh model's.
    let tuned = tempfile::tempdir().unwrap();
    let s = run(&recipe(&[&init, "train.epochs=1"]), &opts(tuned.path())).unwrap();
    let fresh = tempfile::tempdir().unwrap();
    let f = run(&recipe(&["train.epochs=1"]), &opts(fresh.path())).unwrap();
    assert!(s.top1.unwrap() > f.top1.unwrap(), "fine-tuned {:?} vs fresh {:?}", s.top1, f.top1);
    let first_loss = |dir: &Path| read_events(dir)["scalars"]["train/loss"][0][1].as_f64().unwrap();
    assert!(first_loss(tuned.path()) < first_loss(fresh.path()) - 0.1);
    // A checkpoint of another model is refused, naming the first tensor that does not fit.
    let err = run(&recipe(&[&init, "model=\"resnet20\""]), &opts(&tuned.path().join("other"))).unwrap_err();
    assert!(err.to_string().contains("tensor `conv1.weight` has shape [32, 1, 3, 3]"), "{err}");
}

/// An `image-folder` dataset streams from its files: images of any size become random-resized
/// crops for training and centre crops for testing, and a file that stops decoding mid-run is
/// an error naming it, not a panic.
#[test]
fn an_image_folder_streams_and_a_bad_file_is_named() {
    let data = tempfile::tempdir().unwrap();
    for split in ["train", "val"] {
        for (c, class) in ["dark", "light"].iter().enumerate() {
            let dir = data.path().join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for k in 0..6u32 {
                // Sizes differ per image; the classes differ in brightness.
                let img = image::RgbImage::from_fn(30 + 3 * k, 24 + 2 * k, |x, y| {
                    let v = (x * 3 + y * 2 + 90 * c as u32) as u8;
                    image::Rgb([v, v / 2, 200 - v / 2])
                });
                img.save(dir.join(format!("{k}.png"))).unwrap();
            }
        }
    }
    let text = format!(
        r#"
model = "resnet20"
dataset = "image-folder"
[data]
root = "{}"
size = 16
flip = true
[train]
epochs = 1
batch = 4
eval_batch = 6
[optim]
lr = 0.05
"#,
        data.path().display()
    );
    let parse = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::parse(&text, Path::new("folder-recipe.toml"), &sets).unwrap()
    };
    let out = tempfile::tempdir().unwrap();
    let s = run(&parse(&[]), &opts(out.path())).unwrap();
    assert_eq!(s.images, (12, 12));
    assert!(s.final_train_loss.is_finite() && (0.0..=100.0).contains(&s.top1.unwrap()), "{s:?}");
    let err = run(&parse(&["data.pad=4"]), &opts(&out.path().join("padded"))).unwrap_err().to_string();
    assert!(err.contains("data.pad"), "{err}");
    std::fs::write(data.path().join("train/light/3.png"), b"not a png any more").unwrap();
    let err = run(&parse(&[]), &opts(&out.path().join("broken"))).unwrap_err().to_string();
    assert!(err.contains("3.png") && err.contains("does not decode"), "{err}");
}

/// Normalisation needs one mean and one standard deviation per channel.
#[test]
fn normalisation_with_the_wrong_channel_count_is_refused() {
    let out = tempfile::tempdir().unwrap();
    for key in ["data.mean", "data.std"] {
        let err = run(&recipe(&[&format!("{key}=[0.5, 0.5]")]), &opts(out.path())).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("2 entries for 1 channels"), "{err}");
    }
}
