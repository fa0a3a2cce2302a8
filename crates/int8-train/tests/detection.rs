//! Detection end to end on real images (NEON tree crowns from the deepforest wheel, which
//! scripts/setup imports): SSDLite overfits two tiles at both precisions within a fixed step
//! budget, and so does SSD300; a detection run killed and resumed ends exactly where an
//! uninterrupted one does, and SSD300 takes training steps on real tiles with a finite gradient
//! for every parameter at both precisions.

use std::path::{Path, PathBuf};

use int8_nn::Module;
use int8_train::TrainError;
use int8_train::checkpoint;
use int8_train::progress::ProgressMode;
use int8_train::recipe::Recipe;
use int8_train::run::{RunOptions, Summary, run};
use int8_train::task::{self, Batches, Data, Net, targets};

/// The imported tree tiles.
fn trees() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../datasets/cache/deepforest-trees");
    assert!(
        root.join("README.md").is_file(),
        "{} is missing: run scripts/setup (it imports the deepforest wheel's tree crowns)",
        root.display()
    );
    root
}

/// Training tiles of few crowns: the first two have 5 each (4 of them whole), the others 7 and 11.
const TILES: [&str; 4] = [
    "2019_YELL_2_528000_4978000_image_crop2_x0_y1381",
    "2019_YELL_2_528000_4978000_image_crop2_x760_y1381",
    "2019_YELL_2_528000_4978000_image_crop2_x1139_y1381",
    "2019_YELL_2_528000_4978000_image_crop2_x1139_y1727",
];

/// A dataset folder holding the first `n` of [`TILES`] as its training set and as its test set:
/// what a detector must be able to learn by heart.
fn tiles(dir: &Path, n: usize) -> PathBuf {
    let root = dir.join(format!("tiles-{n}"));
    std::fs::create_dir_all(root.join("ImageSets/Main")).unwrap();
    for sub in ["Annotations", "JPEGImages"] {
        std::os::unix::fs::symlink(trees().join(sub), root.join(sub)).unwrap();
    }
    let ids: String = TILES[..n].iter().map(|t| format!("{t}\n")).collect();
    for split in ["train", "test"] {
        std::fs::write(root.join(format!("ImageSets/Main/{split}.txt")), &ids).unwrap();
    }
    std::fs::write(root.join("README.md"), "tiles of deepforest-trees\n").unwrap();
    root
}

fn recipe(root: &Path, sets: &[&str]) -> Recipe {
    let text = format!(
        r#"
task = "detection"
model = "ssdlite-mobilenetv2"
dataset = "deepforest-trees"
[data]
root = "{}"
[train]
epochs = 120
batch = 2
eval_batch = 2
eval_every = 120
checkpoint_every = 7
log_every = 5
histogram_every = 0
[optim]
lr = 0.05
schedule = "cosine"
warmup_epochs = 10
"#,
        root.display()
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Recipe::parse(&text, Path::new("detection-test.toml"), &sets).unwrap()
}

fn opts(out: &Path) -> RunOptions {
    RunOptions { progress: ProgressMode::Quiet, ..RunOptions::new(out) }
}

#[test]
fn ssdlite_learns_two_real_tiles_by_heart_at_both_precisions() {
    let dir = tempfile::tempdir().unwrap();
    let root = tiles(dir.path(), 2);
    for precision in ["fp32", "int8"] {
        let out = dir.path().join(precision);
        let s = run(&recipe(&root, &[&format!("quant.precision={precision}")]), &opts(&out)).unwrap();
        // 120 steps of 2 images; the 8 whole crowns found, each box within IoU 0.5.
        let map50 = s.map50.unwrap();
        assert!(map50 > 90.0, "{precision}: mAP@0.5 {map50:.2}% after 120 steps ({s:?})");
        assert_eq!((s.top1, s.task.to_string().as_str()), (None, "detection"));
        let history = checkpoint::load(&out.join("checkpoints/last.safetensors")).unwrap().state.unwrap().history;
        let terms = &history.last().unwrap().train_terms;
        assert!(terms.contains_key("classification") && terms.contains_key("box_regression"), "{terms:?}");
    }
}

/// SSD300's settings for learning the tiles: VGG-16 without batch norm, from scratch, has gradient
/// norms of 70 to 350 at batch 2 and its classification loss runs away at lr 0.01 even clipped;
/// lr 0.002 clipped at norm 10 learns the tiles. (Its 35.6 million parameters make a checkpoint
/// 280 MB with the momentum: one at the end, not one an epoch.)
const SSD300: [&str; 4] =
    ["model=\"ssd300-vgg16\"", "optim.lr=0.002", "optim.max_grad_norm=10", "train.checkpoint_epochs=120"];

#[test]
fn ssd300_learns_two_real_tiles_by_heart_at_both_precisions() {
    let dir = tempfile::tempdir().unwrap();
    let root = tiles(dir.path(), 2);
    for precision in ["fp32", "int8"] {
        let out = dir.path().join(precision);
        let sets: Vec<String> =
            SSD300.iter().map(|s| s.to_string()).chain([format!("quant.precision={precision}")]).collect();
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let s = run(&recipe(&root, &sets), &opts(&out)).unwrap();
        let map50 = s.map50.unwrap();
        assert!(map50 > 90.0, "{precision}: mAP@0.5 {map50:.2}% after 120 steps ({s:?})");
        std::fs::remove_dir_all(&out).unwrap();
    }
}

#[test]
fn a_killed_and_resumed_detection_run_ends_exactly_where_an_uninterrupted_one_does() {
    let dir = tempfile::tempdir().unwrap();
    let root = tiles(dir.path(), 4);
    // Two steps an epoch; flips drawn per sample, and INT8 with DSGC searching every 3 steps and
    // stochastic rounding, so that resuming must restore the data stream, the clip state and the
    // rounding stream. Checkpoints at steps 3 and 9 fall inside an epoch; killed at step 10, before epoch 5's end
    // checkpoint, it resumes from step 9.
    let r = recipe(
        &root,
        &[
            "train.epochs=6",
            "train.eval_every=3",
            "optim.warmup_epochs=1",
            "train.checkpoint_every=3",
            "data.flip=true",
            "data.vflip=true",
            "quant.clip_interval=3",
            "quant.grad_rounding=\"stochastic\"",
        ],
    );
    let one_thread = |f: &(dyn Fn() -> int8_train::Result<Summary> + Sync)| {
        rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(f)
    };
    let straight = dir.path().join("straight");
    let a = one_thread(&|| run(&r, &opts(&straight))).unwrap();
    let broken = dir.path().join("broken");
    let mut o = opts(&broken);
    o.kill_at_step = Some(10);
    assert!(matches!(one_thread(&|| run(&r, &o)), Err(TrainError::Interrupted { step: 10, .. })));
    let ck = checkpoint::load(&broken.join("checkpoints/last.safetensors")).unwrap().state.unwrap();
    assert_eq!((ck.global_step, ck.step_in_epoch), (9, 1), "resumes from inside epoch 5");
    o.kill_at_step = None;
    o.resume = true;
    let b = one_thread(&|| run(&r, &o)).unwrap();
    let (ca, cb) = (
        checkpoint::load(&straight.join("checkpoints/last.safetensors")).unwrap(),
        checkpoint::load(&broken.join("checkpoints/last.safetensors")).unwrap(),
    );
    for (name, t) in &ca.tensors {
        assert_eq!(t, &cb.tensors[name], "tensor {name} differs after resuming");
    }
    let (sa, sb) = (ca.state.unwrap(), cb.state.unwrap());
    let strip = |h: &[checkpoint::EpochRecord]| {
        h.iter().map(|e| (e.epoch, e.train_loss, e.train_terms.clone(), e.test_map50, e.test_map)).collect::<Vec<_>>()
    };
    assert_eq!(strip(&sa.history), strip(&sb.history));
    assert_eq!(sa.history.iter().filter(|h| h.test_map50.is_some()).count(), 2);
    assert_eq!(sa.quant, sb.quant);
    assert_eq!((a.map50, a.map, a.best_map50), (b.map50, b.map, b.best_map50));
}

#[test]
fn ssd300_takes_steps_on_real_tiles_with_a_finite_gradient_for_every_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let root = tiles(dir.path(), 2);
    for precision in ["fp32", "int8"] {
        let r = recipe(&root, &["model=\"ssd300-vgg16\"", &format!("quant.precision={precision}")]);
        let (net, data) = task::build(&r, None).unwrap();
        let (Net::Detector(det), Data::Detection(d)) = (&net, &data) else { panic!("a detector and boxes") };
        assert_eq!(d.classes.len(), 1);
        let mut sgd = int8_nn::optim::Sgd::new(r.sgd());
        for step in 0..2 {
            let Batches::Boxes(rx) = data.train_epoch(2, 0, step, 0).unwrap() else { panic!("boxes") };
            let batch = rx.recv().unwrap().unwrap();
            assert_eq!(batch.dims, [2, 3, 300, 300]);
            let x = int8_nn::Tensor::from_vec(batch.images.clone(), batch.dims).unwrap();
            let losses = det.losses(&x, &targets(&batch)).unwrap();
            assert_eq!(losses.iter().map(|l| l.0).collect::<Vec<_>>(), ["classification", "box_regression"]);
            let total = int8_nn::ops::add(&losses[0].1, &losses[1].1).unwrap();
            assert!(total.to_scalar().unwrap().is_finite(), "{precision} step {step}");
            let grads = total.backward().unwrap();
            let trainables = net.trainables();
            for t in &trainables {
                let name = t.param.name();
                let g = grads.of(t.param).unwrap_or_else(|| panic!("{precision}: no gradient for {name}"));
                let norm: f64 = g.to_vec().iter().map(|&v| f64::from(v).powi(2)).sum();
                assert!(norm.is_finite(), "{precision}: {name} has gradient norm {norm}");
                // The first feature map holds the small crowns' default boxes: everything that
                // feeds its predictions learns. (The coarse maps may have no matched box and no
                // hard negative, and then rightly no gradient.)
                if name.starts_with("vgg.conv")
                    || name.starts_with("l2norm")
                    || name.starts_with("head.") && name.contains(".0.")
                {
                    assert!(norm > 0.0, "{precision}: {name} has no gradient");
                }
            }
            sgd.step(&trainables, &grads, 0.01).unwrap();
        }
    }
}
