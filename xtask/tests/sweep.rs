//! The sweep end to end, as CI runs it: `experiments/ci.toml` (a few hundred real Fashion-MNIST
//! images, one epoch, FP32 and INT8 with DSGC on and off) is killed part way, run again to the
//! end with the same trainer, and run a third time, rebuilt, with nothing left to do.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn sweep(out: &Path, kill_at: Option<u64>) -> Output {
    sweep_with(out, kill_at, &[])
}

fn sweep_with(out: &Path, kill_at: Option<u64>, extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.current_dir(root()).args(["sweep", "ci", "--out"]).arg(out).args(extra);
    if let Some(step) = kill_at {
        cmd.env("INT8_TRAIN_KILL_AT_STEP", step.to_string());
    } else {
        cmd.env_remove("INT8_TRAIN_KILL_AT_STEP");
    }
    let out = cmd.output().unwrap();
    eprintln!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

const RUNS: [&str; 3] = [
    "cnn-small-fashion-mnist-fp32-s0",
    "cnn-small-fashion-mnist-int8-dsgc_on-s0",
    "cnn-small-fashion-mnist-int8-dsgc_off-s0",
];

#[test]
fn a_killed_sweep_finishes_on_the_next_run_without_redoing_finished_runs() {
    assert!(
        Path::new("/usr/share/datasets/fashion-mnist").exists(),
        "Fashion-MNIST is missing: apt-get install -y dataset-fashion-mnist (the README's set-up does it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ci");

    // Every run dies after step 6 of 12, as if killed: the checkpoint of step 4 is left.
    let first = sweep(&out, Some(6));
    assert!(!first.status.success(), "killed runs are reported as failures");
    assert!(String::from_utf8_lossy(&first.stderr).contains("3 of 3 runs failed"));
    assert!(String::from_utf8_lossy(&first.stdout).contains("trainer: built from the workspace"));
    for run in RUNS {
        assert!(out.join(run).join("checkpoints/last.safetensors").exists(), "{run} kept a checkpoint");
        assert!(!out.join(run).join("summary.json").exists());
    }

    // Run again: each run resumes from its checkpoint, with the trainer the sweep started with
    // (the copy is not replaced), and finishes.
    let copy = out.join(format!(".int8-train{}", std::env::consts::EXE_SUFFIX));
    let made = std::fs::metadata(&copy).unwrap().modified().unwrap();
    let second = sweep(&out, None);
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("trainer: this sweep's copy"));
    assert_eq!(std::fs::metadata(&copy).unwrap().modified().unwrap(), made);
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "run,model,dataset,precision,dsgc,dclr,seed,epochs,top1,best_top1,final_train_loss,train_seconds,step_ms"
    );
    assert_eq!(lines.len(), 4, "{csv}");
    for run in RUNS {
        let row = lines.iter().find(|l| l.starts_with(&format!("{run},"))).unwrap_or_else(|| panic!("{run}: {csv}"));
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells.len(), 13);
        assert_eq!(&cells[1..3], ["cnn-small", "fashion-mnist"]);
        let (precision, dsgc) = (cells[3], cells[4]);
        assert_eq!(precision, if run.contains("fp32") { "fp32" } else { "int8" });
        assert_eq!(
            dsgc,
            if run.contains("fp32") {
                "n/a"
            } else if run.contains("dsgc_on") {
                "on"
            } else {
                "off"
            }
        );
        let top1: f64 = cells[8].parse().unwrap();
        assert!(top1 > 10.0 && top1 <= 100.0, "{run}: top-1 {top1} is no better than chance");
        let log = std::fs::read_to_string(out.join(run).join("train.log")).unwrap();
        assert!(log.contains("resuming at step 4"), "{run} resumed from its checkpoint:\n{log}");
        let events = std::fs::read_dir(out.join(run))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains("tfevents"))
            .count();
        assert_eq!(events, 2, "{run}: one event file per session");
        assert!(out.join(run).join("recipe.toml").exists());
    }
    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(md.contains("INT8 against FP32") && md.contains("dsgc=on") && md.contains("dsgc=off"), "{md}");
    assert!(out.join("plan.json").exists() && out.join("experiment.toml").exists());

    // A run made before a recipe key existed (its saved recipe lacks the key) is the same run
    // while the key is at its default.
    let saved = out.join(RUNS[0]).join("recipe.toml");
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains("checkpoint_epochs = 1\n"), "{text}");
    std::fs::write(&saved, text.replace("checkpoint_epochs = 1\n", "")).unwrap();

    // A third time there is nothing to do, and nothing is rewritten.
    let stamp = |run: &str| std::fs::metadata(out.join(run).join("summary.json")).unwrap().modified().unwrap();
    let before: Vec<_> = RUNS.iter().map(|r| stamp(r)).collect();
    // `--rebuild` replaces the trainer's copy with the workspace's build.
    let third = sweep_with(&out, None, &["--rebuild"]);
    assert!(third.status.success());
    assert!(String::from_utf8_lossy(&third.stdout).contains("3 finished runs skipped"));
    assert!(String::from_utf8_lossy(&third.stdout).contains("trainer: built from the workspace"));
    assert_eq!(before, RUNS.iter().map(|r| stamp(r)).collect::<Vec<_>>());
    assert_eq!(std::fs::read_to_string(out.join("results.csv")).unwrap(), csv);

    // Changing the experiment does not silently reuse runs made with the old recipes.
    let changed = sweep_with(&out, None, &["--set", "optim.lr=0.01"]);
    assert!(!changed.status.success());
    assert!(String::from_utf8_lossy(&changed.stderr).contains("different recipe"));
}
