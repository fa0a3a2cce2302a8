//! The step bench: one training step of a zoo model, ResNet-20 by default (batch 128 of 32x32
//! images; a detector takes 8 images of its input size with ten boxes each, for VOC's 21 classes;
//! forward + backward + SGD update) at FP32 and at INT8 (the paper's policy: DSGC, DCLR,
//! first conv and FC in FP32, and any further layers a `--fp32` pattern names; gradients rounded to
//! nearest, or stochastically with `--stochastic-grads`; batch norms keeping their input in half
//! precision with `--f16-batch-norm-input`), split into its phases and its ops, with
//! the step's peak memory: the process's resident set, the tensors' storage, and what the tape
//! keeps for the backward pass. The input (and a detector's boxes) is made up: only time and memory are measured here.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use int8_nn::optim::{Sgd, SgdConfig};
use int8_nn::policy::{LayerPolicy, Rule};
use int8_nn::precision::{GradRounding, Int8Config};
use int8_nn::{Device, Tensor};
use int8_train::step::{detection_step, train_step};
use int8_zoo::Model;
use int8_zoo::detection::{Detector, DetectorOptions, Target};

use crate::timing::{median, turn};
use crate::{Row, print_header_with, print_row_with};

/// A zoo model with the batch it is timed on.
enum Subject {
    /// A classifier (10 classes) on 128 random 32x32 images.
    Classifier { model: Box<dyn Model>, x: Tensor, labels: Vec<u32> },
    /// A detector (VOC's 20 classes and the background) on 8 random images of its input size, ten
    /// boxes each.
    Detector { model: Box<dyn Detector>, x: Tensor, targets: Vec<Target> },
}

impl Subject {
    /// Builds `name` (a classifier or a detector of the zoo) with `policy`, its parameters and
    /// batch on `device`.
    fn build(name: &str, policy: &LayerPolicy, device: &Device) -> Result<Self> {
        if int8_zoo::detection::DETECTORS.iter().any(|d| d.0 == name) {
            let model = int8_zoo::detection::build(name, 21, policy, 0, &DetectorOptions::default())?;
            let (h, w) = model.image_size();
            let (x, targets) = detection_batch(8, h, w);
            model.to_device(device)?;
            return Ok(Self::Detector { model, x: x.to_device(device)?, targets });
        }
        let batch = 128;
        let labels = (0..batch as u32).map(|i| i % 10).collect();
        let model = int8_zoo::build(name, 10, policy, 0)?;
        model.to_device(device)?;
        Ok(Self::Classifier { model, x: Tensor::randn((batch, 3, 32, 32), 0).to_device(device)?, labels })
    }

    /// Images per step.
    fn batch(&self) -> usize {
        match self {
            Self::Classifier { labels, .. } => labels.len(),
            Self::Detector { targets, .. } => targets.len(),
        }
    }

    /// One step, or an error if it diverged (made-up data at this learning rate should not).
    fn step(&self, sgd: &mut Sgd) -> Result<int8_train::step::Step> {
        let step = match self {
            Self::Classifier { model, x, labels } => train_step(model.as_ref(), sgd, x, labels, 0.01)?,
            Self::Detector { model, x, targets } => detection_step(model.as_ref(), sgd, x, targets, 0.01)?,
        };
        step.map_err(|why| anyhow::anyhow!("the bench's step diverged: {why}"))
    }
}

/// `n` random `h x w` images, each with ten boxes from 6% to 33% of the image's side, spread over
/// it, of classes 1 to 20 in turn: what a detector's matching and loss have to do in a step
/// depends on how many boxes there are, not on where they came from.
fn detection_batch(n: usize, h: usize, w: usize) -> (Tensor, Vec<Target>) {
    let targets = (0..n)
        .map(|i| {
            let boxes: Vec<[f32; 4]> = (0..10)
                .map(|j| {
                    let side = (0.06 + 0.03 * ((i + j) % 10) as f32) * h.min(w) as f32;
                    let (cx, cy) =
                        ((0.1 + 0.08 * j as f32) * w as f32, (0.15 + 0.07 * ((i + 3 * j) % 10) as f32) * h as f32);
                    [
                        (cx - side / 2.0).max(0.0),
                        (cy - side / 2.0).max(0.0),
                        (cx + side / 2.0).min(w as f32),
                        (cy + side / 2.0).min(h as f32),
                    ]
                })
                .collect();
            let labels = (0..10).map(|j| 1 + ((i * 10 + j) % 20) as u32).collect();
            Target { boxes, labels }
        })
        .collect();
    (Tensor::randn((n, 3, h, w), 0), targets)
}

/// A step's peak memory in MiB: tensor storage, and the tape's saved buffers.
#[derive(Debug, Clone, Copy)]
struct Peaks {
    tensors: f64,
    saved: f64,
}

const MIB: f64 = 1024.0 * 1024.0;

/// The peaks since int8-nn's counters were last reset.
fn peaks() -> Peaks {
    Peaks {
        tensors: int8_nn::memory::peak_bytes() as f64 / MIB,
        saved: int8_nn::memory::peak_saved_bytes() as f64 / MIB,
    }
}

/// The process's peak resident set in MiB (`VmHWM`; Linux), NaN where unknown.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

/// The peak resident set of a process that builds `model` at one precision and takes a few
/// steps: this binary run again (`step-memory`), since a process keeps the memory it freed (see
/// `int8_nn::alloc`), so that two models measured in one process would share one peak.
fn child_rss(model: &str, int8: bool, policy: &Int8Policy, device: &Device) -> Result<f64> {
    let exe = std::env::current_exe().context("cannot find this bench's own binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["step-memory", "--model", model, "--precision", if int8 { "int8" } else { "fp32" }]);
    cmd.args(["--device", &device.to_string()]);
    for p in policy.fp32_patterns {
        cmd.args(["--fp32", p]);
    }
    if policy.stochastic_grads {
        cmd.arg("--stochastic-grads");
    }
    if policy.f16_batch_norm_input {
        cmd.arg("--f16-batch-norm-input");
    }
    let out = cmd.output().context("cannot run the memory child")?;
    if !out.status.success() {
        anyhow::bail!("the memory child failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().context("the memory child printed no number")
}

/// What `step-memory` does in the child: build, take four steps, print the peak RSS in MiB.
pub fn memory_child(model: &str, int8: bool, policy: &Int8Policy, device: &Device) -> Result<()> {
    let m = Subject::build(model, &if int8 { int8_policy(policy) } else { LayerPolicy::fp32() }, device)?;
    let mut sgd = sgd();
    for _ in 0..4 {
        m.step(&mut sgd)?;
    }
    println!("{}", peak_rss_mib());
    Ok(())
}

/// The peak memory of one step of `model`, after a warm-up step.
fn step_peaks(model: &Subject) -> Result<Peaks> {
    let mut sgd = sgd();
    model.step(&mut sgd)?;
    int8_nn::memory::reset_peak();
    model.step(&mut sgd)?;
    Ok(peaks())
}

/// Median milliseconds of (forward, backward, update) and of the whole step for `a` and for `b`,
/// their steps in alternation (`a, b`, then `b, a`, and so on) after a warm-up step each, until
/// `2 * budget` has passed (at least three steps each): the machine's changes of speed then fall
/// on both (`crate::timing`). The median step need not be the sum of the median phases.
fn time_steps(a: &Subject, b: &Subject, budget: Duration) -> Result<[Times; 2]> {
    let mut sgd = [sgd(), sgd()];
    a.step(&mut sgd[0])?;
    b.step(&mut sgd[1])?;
    let mut times: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
    let start = Instant::now();
    while times[0].len() < 3 || start.elapsed() < 2 * budget {
        for k in turn(times[0].len()) {
            let s = [a, b][k].step(&mut sgd[k])?;
            times[k].push([s.forward, s.backward, s.update].map(|d| d.as_secs_f64() * 1e3));
        }
    }
    Ok(times.map(|t| Times {
        step: median(t.iter().map(|p| p.iter().sum()).collect()),
        phases: [0, 1, 2].map(|i| median(t.iter().map(|p| p[i]).collect())),
        steps: t.len(),
    }))
}

/// Median step and phase times of one model ([`time_steps`]).
struct Times {
    step: f64,
    phases: [f64; 3],
    steps: usize,
}

fn sgd() -> Sgd {
    Sgd::new(SgdConfig { momentum: 0.9, nesterov: false, weight_decay: 1e-4, max_grad_norm: None })
}

/// Per-op milliseconds per step, and the step's own time, for `a` and for `b`, over three profiled
/// steps each, in alternation as in [`time_steps`].
fn breakdown(a: &Subject, b: &Subject) -> Result<[(BTreeMap<String, f64>, f64); 2]> {
    let steps = 3usize;
    let mut sgd = [sgd(), sgd()];
    let mut out: [(BTreeMap<String, f64>, f64); 2] = Default::default();
    for round in 0..steps {
        for k in turn(round) {
            int8_nn::profile::reset();
            int8_nn::profile::set_enabled(true);
            let t = Instant::now();
            let r = [a, b][k].step(&mut sgd[k]);
            let ms = t.elapsed().as_secs_f64() * 1e3;
            int8_nn::profile::set_enabled(false);
            r?;
            out[k].1 += ms / steps as f64;
            for (name, op_ms, _) in int8_nn::profile::report() {
                *out[k].0.entry(name).or_default() += op_ms / steps as f64;
            }
        }
    }
    Ok(out)
}

/// How the INT8 model departs from the paper's policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct Int8Policy<'a> {
    /// Layers these patterns match (as the recipes' `quant.rules`, `*` for any run of
    /// characters) stay FP32.
    pub fp32_patterns: &'a [String],
    /// Output-gradient codes round stochastically instead of to nearest.
    pub stochastic_grads: bool,
    /// Batch norms after INT8 convolutions keep their input in half precision.
    pub f16_batch_norm_input: bool,
}

/// The INT8 model's policy: the paper's, changed as `p` says.
fn int8_policy(p: &Int8Policy) -> LayerPolicy {
    let grad_rounding =
        if p.stochastic_grads { GradRounding::Stochastic { seed: 0x5EED } } else { GradRounding::Nearest };
    let mut policy = LayerPolicy::paper(Int8Config {
        grad_rounding,
        f16_batch_norm_input: p.f16_batch_norm_input,
        ..Int8Config::default()
    });
    policy.rules.extend(p.fp32_patterns.iter().map(|p| Rule { pattern: p.clone(), int8: false }));
    policy
}

/// PyTorch's FP32 forward, backward and update milliseconds for `model`, from
/// `peer/pytorch_step.py` run by `python` on as many threads as our steps use.
fn pytorch(python: &Path, model: &str, budget: Duration) -> Result<[f64; 3]> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peer/pytorch_step.py");
    let threads = rayon::current_num_threads().to_string();
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--model", model, "--threads", &threads, "--seconds", &budget.as_secs_f64().to_string()])
        .output()
        .with_context(|| format!("cannot run {} {}", python.display(), script.display()))?;
    if !out.status.success() {
        anyhow::bail!("PyTorch's step failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("PyTorch's step printed no JSON")?;
    let ms = |k: &str| v[k].as_f64().with_context(|| format!("PyTorch's step printed no {k}"));
    eprintln!("pytorch {}: {} steps", v["torch"], v["steps"]);
    Ok([ms("forward_ms")?, ms("backward_ms")?, ms("update_ms")?])
}

/// Runs the bench on `device` and prints its rows, the INT8 model built with `policy`; with
/// `peer`, PyTorch's FP32 step of the same model is timed too (after ours, on the same threads).
pub fn run(
    model: &str,
    policy: &Int8Policy,
    device: &Device,
    budget: Duration,
    peer: Option<&Path>,
) -> Result<Vec<Row>> {
    let fp32 = Subject::build(model, &LayerPolicy::fp32(), device)?;
    let int8 = Subject::build(model, &int8_policy(policy), device).context("--fp32")?;
    if peer.is_some() && matches!(fp32, Subject::Detector { .. }) {
        anyhow::bail!("--peer times PyTorch's classifiers only; leave it out for detector {model}");
    }
    let batch = fp32.batch();
    let (fm, im) = (step_peaks(&fp32)?, step_peaks(&int8)?);
    let [f, i] = time_steps(&fp32, &int8, budget)?;
    eprintln!("{} steps each, alternating", f.steps);
    let torch = peer.map(|python| pytorch(python, model, budget)).transpose()?;
    let with_torch = |mut r: Row, k: Option<usize>| {
        r.pytorch_fp32_ms = torch.map(|t| k.map_or(t.iter().sum(), |k| t[k]));
        r
    };
    print_header_with(peer.is_some());
    let rows = vec![
        with_torch(Row::new(format!("{model}-step-b{batch}"), f.step, i.step), None),
        with_torch(Row::new(format!("{model}-forward-b{batch}"), f.phases[0], i.phases[0]), Some(0)),
        with_torch(Row::new(format!("{model}-backward-b{batch}"), f.phases[1], i.phases[1]), Some(1)),
        with_torch(Row::new(format!("{model}-update-b{batch}"), f.phases[2], i.phases[2]), Some(2)),
        Row::new(
            "peak resident set, each precision in a process of its own (MiB, not ms)",
            child_rss(model, false, policy, device)?,
            child_rss(model, true, policy, device)?,
        ),
        Row::new("peak tensor storage (MiB, not ms)", fm.tensors, im.tensors),
        Row::new("peak kept by the tape for backward (MiB, not ms)", fm.saved, im.saved),
    ];
    for r in &rows {
        print_row_with(r, peer.is_some());
    }
    // Where a step's time goes, per kind of op (forward and backward), at each precision: the
    // INT8 model's row of a kind sums its INT8 and FP32 variants (its first convolution stays
    // FP32), and the INT8 variants follow on rows of their own.
    let [(f_ops, f_total), (i_ops, i_total)] = breakdown(&fp32, &int8)?;
    let kind = |name: &str| name.strip_prefix("int8-").unwrap_or(name).to_string();
    let mut kinds: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (name, ms) in &f_ops {
        kinds.entry(kind(name)).or_default().0 += ms;
    }
    for (name, ms) in &i_ops {
        kinds.entry(kind(name)).or_default().1 += ms;
    }
    let mut extra = Vec::new();
    for (name, (f, i)) in &kinds {
        extra.push(Row::new(format!("op {name}"), *f, *i));
        for (variant, ms) in i_ops.iter().filter(|(n, _)| n.starts_with("int8-") && kind(n) == *name) {
            extra.push(Row::new(format!("op {name}: of which {variant}"), f64::NAN, *ms));
        }
    }
    extra.push(Row::new(
        "op other (tape, allocation, update)",
        f_total - f_ops.values().sum::<f64>(),
        i_total - i_ops.values().sum::<f64>(),
    ));
    for r in &extra {
        print_row_with(r, peer.is_some());
    }
    let mut rows = rows;
    rows.extend(extra);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use int8_nn::precision::Precision;

    use super::*;

    /// A GPU asked of a bench built without the `cuda` feature is an error saying how to build
    /// one, not a CPU run under the GPU's name.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_needs_a_bench_built_with_cuda() {
        let err = Subject::build("cnn-small", &LayerPolicy::fp32(), &Device::Cuda(0)).err().unwrap().to_string();
        assert!(err.contains("cuda:0") && err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn a_detectors_made_up_boxes_lie_inside_its_images_with_classes_1_to_20() {
        let (x, targets) = detection_batch(8, 320, 300);
        assert_eq!(x.dims(), &[8, 3, 320, 300]);
        assert_eq!(targets.len(), 8);
        for t in &targets {
            assert_eq!((t.boxes.len(), t.labels.len()), (10, 10));
            for b in &t.boxes {
                assert!(b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 300.0 && b[3] <= 320.0, "{b:?}");
                assert!(b[2] - b[0] >= 0.03 * 300.0 && b[3] - b[1] >= 0.03 * 300.0, "{b:?}");
            }
            assert!(t.labels.iter().all(|&l| (1..=20).contains(&l)));
        }
        let all: std::collections::BTreeSet<u32> = targets.iter().flat_map(|t| t.labels.iter().copied()).collect();
        assert_eq!(all.len(), 20);
    }

    #[test]
    fn fp32_patterns_keep_exactly_the_matching_layers_in_fp32() {
        let patterns = ["*.dw.conv".to_string()];
        let policy = Int8Policy { fp32_patterns: &patterns, ..Default::default() };
        let model = int8_zoo::build("mobilenetv2-cifar", 10, &int8_policy(&policy), 0).unwrap();
        let convs: Vec<_> = model.layers().into_iter().filter(|l| matches!(l, int8_nn::Layer::Conv(_))).collect();
        let (mut dw, mut other_int8) = (0, 0);
        for (i, c) in convs.iter().enumerate() {
            let int8 = matches!(c.precision(), Some(Precision::Int8(_)));
            if c.name().ends_with(".dw.conv") {
                dw += 1;
                assert!(!int8, "{} should be FP32", c.name());
            } else if i > 0 {
                other_int8 += usize::from(int8);
                assert!(int8, "{} should stay INT8", c.name());
            }
        }
        assert_eq!(dw, 17, "MobileNetV2 has 17 depthwise convolutions");
        assert!(other_int8 > 30);
        // The paper's policy without patterns.
        assert_eq!(int8_policy(&Int8Policy::default()), LayerPolicy::paper(Int8Config::default()));
        let stochastic = int8_policy(&Int8Policy { stochastic_grads: true, ..Default::default() });
        assert!(matches!(stochastic.int8.unwrap().grad_rounding, GradRounding::Stochastic { .. }));
    }
}
