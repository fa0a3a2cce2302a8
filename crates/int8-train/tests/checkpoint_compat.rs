//! A checkpoint written by the trainer before int8-nn owned its tensors and tape (main at
//! ba3055e) loads and resumes with today's trainer, and the resumed run ends where that
//! trainer's own resumed run ended (exactly, but for the FP32 rounding noted in the test) (`tests/fixtures/main-ba3055e/README.md` says how the files
//! were made).

use std::path::{Path, PathBuf};

use int8_train::checkpoint::{self, EpochRecord};
use int8_train::progress::ProgressMode;
use int8_train::recipe::Recipe;
use int8_train::run::{RunOptions, run};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/main-ba3055e").join(name)
}

#[test]
fn a_checkpoint_of_the_previous_trainer_resumes_to_the_same_end() {
    assert!(
        Path::new("/usr/share/datasets/fashion-mnist").exists(),
        "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (scripts/setup does it)"
    );
    let recipe = Recipe::load(&fixture("recipe.toml"), &[]).unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(out.path().join("checkpoints")).unwrap();
    std::fs::copy(fixture("last.safetensors"), out.path().join("checkpoints/last.safetensors")).unwrap();
    let old = checkpoint::load(&out.path().join("checkpoints/last.safetensors")).unwrap();
    assert_eq!(old.state.as_ref().unwrap().global_step, 3);
    let opts = RunOptions { progress: ProgressMode::Quiet, resume: true, ..RunOptions::new(out.path()) };
    // One thread, as the fixture was made, so that sums run in the same order.
    let summary = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| run(&recipe, &opts));
    let summary = summary.unwrap();
    let want: Vec<EpochRecord> = serde_json::from_slice(&std::fs::read(fixture("metrics.json")).unwrap()).unwrap();
    let got = checkpoint::load(&out.path().join("checkpoints/last.safetensors")).unwrap().state.unwrap().history;
    // Epochs, learning rates and accuracies exactly; losses to 1e-4 of their size. Since e90debb
    // the FP32 layers' weight gradients (the stem convolution here) sum in another order than that
    // trainer's, which moves the losses in their sixth digit (1.1e-5 of the size at most when this
    // bound was set); a state lost on the way (momentum, the clip values, the rounding streams)
    // changes every later step and moves them far more.
    let exact = |h: &[EpochRecord]| -> Vec<_> {
        h.iter().map(|e| (e.epoch, e.lr, e.train_top1, e.test_top1, e.test_top5)).collect()
    };
    assert_eq!(exact(&got), exact(&want));
    let close = |what: &str, got: f64, want: f64| {
        assert!((got - want).abs() <= 1e-4 * want.abs(), "{what}: {got} against {want} of the previous trainer")
    };
    for (g, w) in got.iter().zip(&want) {
        close("train loss", g.train_loss, w.train_loss);
        close("test loss", g.test_loss.unwrap(), w.test_loss.unwrap());
    }
    close("final train loss", summary.final_train_loss, want[1].train_loss);
}

#[test]
fn a_checkpoint_of_another_recipe_is_refused_with_the_reason() {
    let recipe = Recipe::load(&fixture("recipe.toml"), &["optim.lr=0.1".to_string()]).unwrap();
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(out.path().join("checkpoints")).unwrap();
    std::fs::copy(fixture("last.safetensors"), out.path().join("checkpoints/last.safetensors")).unwrap();
    let opts = RunOptions { progress: ProgressMode::Quiet, resume: true, ..RunOptions::new(out.path()) };
    let err = run(&recipe, &opts).unwrap_err().to_string();
    assert!(err.contains("different recipe"), "{err}");
}
