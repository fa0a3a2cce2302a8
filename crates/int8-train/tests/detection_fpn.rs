//! The detectors on ResNet-50-FPN end to end on real images (NEON tree crowns from the deepforest
//! wheel, which scripts/setup imports): Faster R-CNN, as the registry builds it (the backbone's
//! batch norm trained), learns two tiles by heart at both precisions within a fixed step budget,
//! through the trainer's own step and evaluation, and takes training steps on real tiles with a
//! finite gradient for every parameter at both precisions; and so does RetinaNet.
//!
//! The registry's input size is torchvision's 800 pixels; here the tiles (400 pixels) are read at
//! the recipe's `detector.image_size` ([`side`]), so that ResNet-50 trains in minutes on two cores.
//! For Faster R-CNN (128 pixels) the crowns are then 6 to 20 pixels across, below the smallest
//! anchors (32 pixels), which the anchors' low-quality matches and the box regression have to
//! bridge; RetinaNet, whose focal loss learns from few positive anchors more slowly, reads them at
//! 256.

use std::path::{Path, PathBuf};

use int8_datasets::open::open_detection;
use int8_nn::Module;
use int8_nn::optim::Sgd;
use int8_train::recipe::Recipe;
use int8_train::task::{self, Batch, Batches, Data, Net, targets};
use int8_zoo::detection::Detector;
use int8_zoo::detection::faster_rcnn::FasterRcnn;
use int8_zoo::detection::fpn::BackboneNorm;

/// The side `model`'s tiles are read at.
fn side(model: &str) -> usize {
    if model == "retinanet-resnet50-fpn" { 256 } else { 128 }
}

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

/// Two training tiles of 5 crowns each (4 of them whole), as in tests/detection.rs.
const TILES: [&str; 2] =
    ["2019_YELL_2_528000_4978000_image_crop2_x0_y1381", "2019_YELL_2_528000_4978000_image_crop2_x760_y1381"];

/// A dataset folder holding [`TILES`] as its training set and as its test set.
fn tiles(dir: &Path) -> PathBuf {
    let root = dir.join("tiles");
    std::fs::create_dir_all(root.join("ImageSets/Main")).unwrap();
    for sub in ["Annotations", "JPEGImages"] {
        std::os::unix::fs::symlink(trees().join(sub), root.join(sub)).unwrap();
    }
    let ids: String = TILES.iter().map(|t| format!("{t}\n")).collect();
    for split in ["train", "test"] {
        std::fs::write(root.join(format!("ImageSets/Main/{split}.txt")), &ids).unwrap();
    }
    std::fs::write(root.join("README.md"), "tiles of deepforest-trees\n").unwrap();
    root
}

/// A recipe for `model` on the tiles under `root`, changed by `sets`: its precision, SGD and
/// learning-rate schedule (one step an epoch: two tiles, batch 2).
fn recipe(root: &Path, model: &str, sets: &[String]) -> Recipe {
    let text = format!(
        r#"
task = "detection"
model = "{model}"
dataset = "deepforest-trees"
[data]
root = "{}"
[train]
epochs = 80
batch = 2
[optim]
lr = 0.005
schedule = "cosine"
warmup_epochs = 5
[detector]
image_size = [{side}, {side}]
"#,
        root.display(),
        side = side(model),
    );
    Recipe::parse(&text, Path::new("detection-fpn-test.toml"), sets).unwrap()
}

/// The tiles at the recipe's image size, opened as the trainer opens a recipe's data.
fn data(r: &Recipe) -> Data {
    let size = int8_zoo::detection::image_size(&r.model, &r.detector.options()).unwrap();
    assert_eq!(size, (side(&r.model), side(&r.model)));
    Data::Detection(open_detection(&r.data_spec(None), size).unwrap())
}

/// The registry's detector `model` (the backbone's batch norm trained) for one class of objects,
/// at the recipe's image size. Faster R-CNN samples 128 regions per image for its box head rather
/// than torchvision's 512: with 5 crowns an image the positives are the same, and the box head's
/// two wide layers cost a quarter.
fn detector(model: &str, r: &Recipe) -> Box<dyn Detector> {
    let (policy, seed, options) = (r.policy(), r.train.seed, r.detector.options());
    match model {
        "fasterrcnn-resnet50-fpn" => Box::new(
            FasterRcnn::with_norm(2, &policy, seed, BackboneNorm::Trained)
                .unwrap()
                .with_image_size((side(model), side(model)))
                .with_box_batch_size_per_image(128)
                .unwrap(),
        ),
        "retinanet-resnet50-fpn" => int8_zoo::detection::build(model, 2, &policy, seed, &options).unwrap(),
        _ => panic!("no detector {model}"),
    }
}

/// The registry builds the same network (same parameters, same starting values) as
/// [`detector`] does, at its own input size unless the recipe sets one.
fn registry_agrees(model: &str, r: &Recipe) {
    let default = int8_zoo::detection::DetectorOptions::default();
    let own = int8_zoo::detection::build(model, 2, &r.policy(), r.train.seed, &default).unwrap();
    assert_eq!(own.image_size(), int8_zoo::detection::input_size(model).unwrap());
    let built = int8_zoo::detection::build(model, 2, &r.policy(), r.train.seed, &r.detector.options()).unwrap();
    assert_eq!((built.name(), built.image_size()), (model, (side(model), side(model))));
    let ours = detector(model, r);
    let values = |m: &dyn Module| -> Vec<(String, Vec<f32>)> {
        m.layers().iter().flat_map(|l| l.params()).map(|p| (p.name().to_string(), p.value().to_vec())).collect()
    };
    assert!(values(built.as_ref()) == values(ours.as_ref()), "{model}: the registry builds another network");
    assert!(values(built.as_ref()) == values(own.as_ref()), "{model}: the image size changed the network");
    // Trained batch norm: every parameter trains.
    assert!(built.layers().iter().flat_map(|l| l.params()).all(|p| p.trainable()));
}

/// Trains `model` on the two tiles at `precision` for the recipe's steps (changed by `sets`)
/// through the trainer's step, evaluating the tiles' mAP@0.5 (percent) with the trainer's
/// evaluation every 20 steps in the budget's second half and at its end, and returns the best
/// (and all of them, for the message): learning the tiles within the budget is what is asked.
fn overfit(model: &str, precision: &str, sets: &[&str]) -> (f64, Vec<(usize, f64)>) {
    let dir = tempfile::tempdir().unwrap();
    let root = tiles(dir.path());
    let mut sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    sets.push(format!("quant.precision={precision}"));
    let r = recipe(&root, model, &sets);
    registry_agrees(model, &r);
    let data = data(&r);
    let net = Net::Detector(detector(model, &r));
    net.set_training(true);
    let mut sgd = Sgd::new(r.sgd());
    let schedule = r.schedule();
    let mut maps = Vec::new();
    for epoch in 0..r.train.epochs {
        let Batches::Boxes(rx) = data.train_epoch(r.train.batch, r.train.seed, epoch as u64, 0).unwrap() else {
            panic!("boxes")
        };
        for batch in rx {
            let step = task::step(&net, &mut sgd, Batch::Boxes(batch.unwrap()), schedule.lr(epoch as f64)).unwrap();
            let step = step.unwrap_or_else(|e| panic!("{model} {precision}: epoch {epoch} failed: {e}"));
            assert!(step.loss.is_finite(), "{model} {precision}: epoch {epoch} loss {}", step.loss);
        }
        let steps = epoch + 1;
        if steps == r.train.epochs || (2 * steps >= r.train.epochs && steps % 20 == 0) {
            maps.push((steps, task::evaluate(&net, &data, 2).unwrap().map50.unwrap()));
        }
    }
    (maps.iter().map(|m| m.1).fold(f64::MIN, f64::max), maps)
}

/// Takes two steps of `model` on the tiles at both precisions, each term finite, and checks that
/// every parameter gets a finite gradient, a non-zero one for the parameters every prediction
/// depends on.
fn steps_with_finite_gradients(model: &str, terms: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let root = tiles(dir.path());
    for precision in ["fp32", "int8"] {
        let r = recipe(&root, model, &[format!("quant.precision={precision}")]);
        let data = data(&r);
        let det = detector(model, &r);
        det.set_training(true);
        let mut sgd = Sgd::new(r.sgd());
        for step in 0..2 {
            let Batches::Boxes(rx) = data.train_epoch(2, 0, step, 0).unwrap() else { panic!("boxes") };
            let batch = rx.recv().unwrap().unwrap();
            assert_eq!(batch.dims, [2, 3, side(model), side(model)]);
            let x = int8_nn::Tensor::from_vec(batch.images.clone(), batch.dims).unwrap();
            let losses = det.losses(&x, &targets(&batch)).unwrap();
            assert_eq!(losses.iter().map(|l| l.0).collect::<Vec<_>>(), terms);
            let mut total = losses[0].1.clone();
            for (name, t) in &losses {
                let v = t.to_scalar().unwrap();
                assert!(v.is_finite() && v >= 0.0, "{model} {precision} step {step}: {name} = {v}");
            }
            for (_, t) in &losses[1..] {
                total = int8_nn::ops::add(&total, t).unwrap();
            }
            let grads = total.backward().unwrap();
            let trainables = det.trainables();
            assert_eq!(trainables.len(), det.layers().iter().map(|l| l.params().len()).sum::<usize>());
            for t in &trainables {
                let name = t.param.name();
                let g = grads.of(t.param).unwrap_or_else(|| panic!("{model} {precision}: no gradient for {name}"));
                let norm: f64 = g.to_vec().iter().map(|&v| f64::from(v).powi(2)).sum();
                assert!(norm.is_finite(), "{model} {precision}: {name} has gradient norm {norm}");
                // Every prediction passes through the backbone's body and the heads' hidden
                // layers. (A pyramid level may hold no sampled anchor or region, and then its
                // lateral and output convolutions rightly get none.)
                if name.starts_with("backbone.body.")
                    || name.starts_with("rpn.head.")
                    || name.starts_with("roi_heads.")
                    || name.starts_with("head.")
                {
                    assert!(norm > 0.0, "{model} {precision}: {name} has no gradient");
                }
            }
            sgd.step(&trainables, &grads, 0.005).unwrap();
        }
    }
}

#[test]
fn faster_rcnn_learns_two_real_tiles_by_heart_at_fp32() {
    let (map50, maps) = overfit("fasterrcnn-resnet50-fpn", "fp32", &[]);
    assert!(map50 > 90.0, "fp32: mAP@0.5 at most {map50:.2}% within 80 steps (step, %): {maps:?}");
}

#[test]
fn faster_rcnn_learns_two_real_tiles_by_heart_at_int8() {
    let (map50, maps) = overfit("fasterrcnn-resnet50-fpn", "int8", &[]);
    assert!(map50 > 90.0, "int8: mAP@0.5 at most {map50:.2}% within 80 steps (step, %): {maps:?}");
}

/// RetinaNet's settings for learning the tiles: from scratch at batch 2 its gradient norm jumps
/// (to 190 where it is otherwise 10 to 30) and lr 0.01 diverges unclipped, as 0.005 does when held
/// longer; clipped at norm 10 (MMDetection clips RetinaNet at 35), lr 0.01 learns the tiles. In
/// 160 steps: how fast it learns them from scratch varies with the last bits of the FP32 sums
/// (since e90debb changed the weight gradients' order, the FP32 test run with the whole file
/// stood at 24.6, 43.3, 70.3 and 84.0% after 60, 80, 100 and 120 steps, and run alone at 100%
/// from step 100).
const RETINANET: [&str; 3] = ["optim.lr=0.01", "optim.max_grad_norm=10", "train.epochs=160"];

#[test]
fn retinanet_learns_two_real_tiles_by_heart_at_fp32() {
    let (map50, maps) = overfit("retinanet-resnet50-fpn", "fp32", &RETINANET);
    assert!(map50 > 90.0, "fp32: mAP@0.5 at most {map50:.2}% within 160 steps (step, %): {maps:?}");
}

#[test]
fn retinanet_learns_two_real_tiles_by_heart_at_int8() {
    let (map50, maps) = overfit("retinanet-resnet50-fpn", "int8", &RETINANET);
    assert!(map50 > 90.0, "int8: mAP@0.5 at most {map50:.2}% within 160 steps (step, %): {maps:?}");
}

#[test]
fn faster_rcnn_takes_steps_on_real_tiles_with_a_finite_gradient_for_every_parameter() {
    steps_with_finite_gradients(
        "fasterrcnn-resnet50-fpn",
        &["rpn_objectness", "rpn_box_regression", "classification", "box_regression"],
    );
}

#[test]
fn retinanet_takes_steps_on_real_tiles_with_a_finite_gradient_for_every_parameter() {
    steps_with_finite_gradients("retinanet-resnet50-fpn", &["classification", "box_regression"]);
}
