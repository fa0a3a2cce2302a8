//! Recipes: typed TOML describing one training run (model, data, schedule, optimizer and the
//! quantization settings of Zhu et al., CVPR 2020), with unknown keys rejected, `--set key=value`
//! overrides applied before typing, and checks that name the offending key. The project's own
//! recipes live in `crates/int8-train/recipes/` and are compiled into the trainer ([`builtin`]),
//! so a name works wherever the binary runs; any other recipe is given as a file.

use std::path::{Path, PathBuf};

use int8_core::dclr::Dclr;
use int8_core::dsgc::ClipMode;
use int8_core::quant::Granularity;
use int8_datasets::open::DataSpec;
use int8_nn::optim::{Schedule, ScheduleKind, SgdConfig};
use int8_nn::policy::{LayerPolicy, Rule};
use int8_nn::precision::{GradRounding, Int8Config, Operand};
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

mod compiled {
    include!(concat!(env!("OUT_DIR"), "/recipes.rs"));
}

/// The recipes compiled into the trainer (`crates/int8-train/recipes/*.toml`): name and text,
/// sorted by name.
pub fn builtin() -> &'static [(&'static str, &'static str)] {
    compiled::BUILTIN
}

/// The name a recipe gives its runs: a built-in recipe's name, or a file's stem.
pub fn recipe_name(name_or_path: &str) -> String {
    Path::new(name_or_path).file_stem().and_then(|s| s.to_str()).unwrap_or(name_or_path).to_string()
}

/// One training run, as written in `crates/int8-train/recipes/<model>-<dataset>.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// What the model learns: image classes (the default) or object boxes.
    #[serde(default, skip_serializing_if = "Task::is_classification")]
    pub task: Task,
    /// The model's registry name (`cargo xtask zoo` lists them).
    pub model: String,
    /// The dataset: a registry name (`cargo xtask data list`), `image-folder` with `data.root`,
    /// or the path of a folder holding a dataset (see `int8_datasets::open`).
    pub dataset: String,
    /// Where the data comes from and how it is augmented.
    #[serde(default)]
    pub data: DataConfig,
    /// The loop: epochs, batch, seed, logging and checkpoints.
    pub train: TrainConfig,
    /// SGD and the learning-rate schedule.
    pub optim: OptimConfig,
    /// FP32 or INT8, and the paper's gradient treatment.
    #[serde(default)]
    pub quant: QuantConfig,
    /// What a detection recipe changes of its detector.
    #[serde(default, skip_serializing_if = "DetectorConfig::is_default")]
    pub detector: DetectorConfig,
}

/// Detector settings (`task = "detection"`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Default-box scales as fractions of the image (SSD, SSDLite): `[smallest, largest]`, or one
    /// per feature map and one more; empty for the model's own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub box_scales: Vec<f64>,
    /// The input size `[height, width]` images are resized to; the model's own when absent
    /// (`cargo xtask zoo` lists them). Each side a multiple of 32 from 64 to 2048; SSD300 takes
    /// 300x300 only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<[usize; 2]>,
}

impl DetectorConfig {
    /// The zoo's options for the detector.
    pub fn options(&self) -> int8_zoo::detection::DetectorOptions {
        int8_zoo::detection::DetectorOptions {
            box_scales: self.box_scales.clone(),
            image_size: self.image_size.map(|[h, w]| (h, w)),
        }
    }
}

impl DetectorConfig {
    /// Whether nothing is changed.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// What a run trains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Task {
    /// Image classification: cross-entropy, top-1 and top-5.
    #[default]
    Classification,
    /// Object detection: the detector's own losses, mAP.
    Detection,
}

impl Task {
    /// Whether this is the default task.
    pub fn is_classification(&self) -> bool {
        *self == Task::Classification
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Task::Classification => "classification",
            Task::Detection => "detection",
        })
    }
}

/// Data settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A folder holding the dataset, searched before the usual places.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub root: Option<PathBuf>,
    /// Training images to use (a seeded random subset); 0 for all.
    pub train_limit: usize,
    /// Test images to use (a seeded random subset); 0 for all.
    pub test_limit: usize,
    /// Zero padding before the random crop of in-memory datasets (4 for CIFAR, 0 for none);
    /// image folders (`image-folder`) use random-resized crops instead.
    pub pad: usize,
    /// Random horizontal flips.
    pub flip: bool,
    /// Random vertical flips (detection in overhead imagery, where up and down mean nothing).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub vflip: bool,
    /// Random crops keeping from this fraction of each side to all of it, boxes kept where their
    /// centre is (detection; SSD's zoom-in augmentation); 0: none.
    #[serde(skip_serializing_if = "is_zero")]
    pub crop: f32,
    /// Per-channel mean after scaling to [0, 1]; the dataset's own when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation; the dataset's own when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub std: Option<Vec<f32>>,
    /// Image side: CIFAR-10 JPEG images must already have it; `image-folder` crops are resized
    /// to it.
    pub size: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            root: None,
            train_limit: 0,
            test_limit: 0,
            pad: 0,
            flip: false,
            vflip: false,
            crop: 0.0,
            mean: None,
            std: None,
            size: 32,
        }
    }
}

/// Loop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Epochs.
    pub epochs: usize,
    /// Training batch size.
    pub batch: usize,
    /// Evaluation batch size.
    #[serde(default = "default_eval_batch")]
    pub eval_batch: usize,
    /// Seed of initialisation, shuffling, augmentation and stochastic rounding.
    #[serde(default)]
    pub seed: u64,
    /// Evaluate every this many epochs (and always after the last).
    #[serde(default = "one")]
    pub eval_every: usize,
    /// Also checkpoint every this many steps inside an epoch (0: at epoch ends only).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Write the epoch-end checkpoint every this many epochs (and always after the last): for
    /// many short epochs of a large model, where one per epoch would cost more than the steps.
    #[serde(default = "one")]
    pub checkpoint_epochs: usize,
    /// Log step scalars every this many steps.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Log weight and gradient histograms every this many steps (0: never).
    #[serde(default = "default_histogram_every")]
    pub histogram_every: usize,
    /// Start from this checkpoint's weights (for example an FP32 model fine-tuned in INT8).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub init: Option<PathBuf>,
    /// Where the run computes: `cpu`, `cuda` (GPU 0) or `cuda:N`; a GPU needs a trainer built
    /// with the `cuda` feature. Not part of what a run is: a run resumes on another device.
    #[serde(default = "default_device", skip_serializing_if = "is_cpu")]
    pub device: String,
}

fn default_device() -> String {
    "cpu".into()
}
fn is_cpu(d: &String) -> bool {
    d == "cpu"
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

fn default_eval_batch() -> usize {
    500
}
fn one() -> usize {
    1
}
fn default_log_every() -> usize {
    20
}
fn default_histogram_every() -> usize {
    200
}

/// The learning-rate schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleName {
    /// The base rate throughout.
    Constant,
    /// Times `gamma` every `step_every` epochs.
    Step,
    /// Times `gamma` at each of `milestones`.
    Multistep,
    /// Cosine to `min_lr` over the run.
    Cosine,
}

/// SGD and schedule settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Base learning rate.
    pub lr: f64,
    /// Momentum.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// L2 weight decay (not on batch-norm parameters and biases).
    #[serde(default)]
    pub weight_decay: f64,
    /// The schedule.
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleName,
    /// Epochs at which `multistep` decays.
    #[serde(default)]
    pub milestones: Vec<f64>,
    /// Decay factor of `step` and `multistep`.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Epochs between `step` decays.
    #[serde(default = "default_step_every")]
    pub step_every: f64,
    /// The final rate of `cosine`.
    #[serde(default)]
    pub min_lr: f64,
    /// Epochs of linear warmup.
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Clip the gradients by their global L2 norm at this value before each update (PyTorch's
    /// `clip_grad_norm_`); none when absent. The detection recipes that need it say so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
}

fn default_momentum() -> f64 {
    0.9
}
fn default_schedule() -> ScheduleName {
    ScheduleName::Constant
}
fn default_gamma() -> f64 {
    0.1
}
fn default_step_every() -> f64 {
    30.0
}

/// A run's precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrecisionName {
    /// Every layer FP32.
    Fp32,
    /// The layer policy's layers INT8 in forward and backward.
    Int8,
}

impl std::fmt::Display for PrecisionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PrecisionName::Fp32 => "fp32",
            PrecisionName::Int8 => "int8",
        })
    }
}

/// Rounding of gradient codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RoundingName {
    /// To the nearest code.
    Nearest,
    /// Stochastic, seeded from the run's seed and the layer.
    Stochastic,
}

/// Weight-scale granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WeightScale {
    /// One scale per weight tensor (the paper).
    PerTensor,
    /// One scale per output channel.
    PerChannel,
}

/// A layer rule: layers whose name matches `pattern` (with `*` wildcards) run at INT8 or FP32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Layer-name pattern, such as `layer3.*`.
    pub pattern: String,
    /// Whether matching layers run in INT8.
    pub int8: bool,
}

/// Quantization settings (Zhu et al., CVPR 2020).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantConfig {
    /// FP32 or INT8.
    pub precision: PrecisionName,
    /// Direction sensitive gradient clipping (Sec. 4.1); off clips gradients at max|g|.
    pub dsgc: bool,
    /// Iterations between DSGC searches (the paper: about 100).
    pub clip_interval: u64,
    /// Search again before `clip_interval` ends when the gradient's cosine distance at the clip
    /// value in force exceeds this many times the distance right after the last search (above 1;
    /// unset, as in the paper: only every `clip_interval`).
    pub clip_stale_ratio: Option<f32>,
    /// Deviation counteractive learning-rate scaling (Sec. 4.2).
    pub dclr: bool,
    /// DCLR's alpha (the paper: 20).
    pub alpha: f64,
    /// DCLR's floor beta (the paper: 0.1).
    pub beta: f64,
    /// Rounding of gradient codes.
    pub grad_rounding: RoundingName,
    /// Weight-scale granularity.
    pub weights: WeightScale,
    /// Run the first convolution in INT8 too (the paper keeps it FP32).
    pub first_conv_int8: bool,
    /// Run the output layers in INT8 too: the classifier, and a detector's prediction layers (the
    /// paper keeps the classifier FP32; so does the default for the prediction layers).
    pub linear_int8: bool,
    /// Rules applied after those defaults; the last match wins.
    pub rules: Vec<RuleConfig>,
    /// An operand the INT8 convolutions leave in FP32, to find which one's quantization costs
    /// accuracy (an ablation; the paper quantizes all three, `none`).
    #[serde(skip_serializing_if = "KeepFp32::is_none")]
    pub keep_fp32: KeepFp32,
    /// What a batch norm after an INT8 convolution keeps of its input for the backward pass: `f32`
    /// (the default, as the paper), or `f16`, its normalised value in half precision and the
    /// fused activation's mask as bits, about half the memory of the step's saved tensors
    /// (`Int8Config::f16_batch_norm_input`).
    #[serde(skip_serializing_if = "BatchNormInput::is_f32")]
    pub batch_norm_input: BatchNormInput,
}

/// `quant.batch_norm_input`: the precision a batch norm after an INT8 convolution keeps its
/// input in for the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BatchNormInput {
    /// The input itself (the paper).
    #[default]
    F32,
    /// The normalised input in half precision.
    F16,
}

impl BatchNormInput {
    fn is_f32(&self) -> bool {
        *self == BatchNormInput::F32
    }
}

/// `quant.keep_fp32`: the operand INT8 convolutions leave unquantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeepFp32 {
    /// All three quantized (the paper).
    #[default]
    None,
    /// The input X.
    Input,
    /// The weights W.
    Weight,
    /// The output gradient dY.
    Grad,
}

impl KeepFp32 {
    fn is_none(&self) -> bool {
        *self == KeepFp32::None
    }
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            precision: PrecisionName::Int8,
            dsgc: true,
            clip_interval: 100,
            clip_stale_ratio: None,
            dclr: true,
            alpha: 20.0,
            beta: 0.1,
            grad_rounding: RoundingName::Nearest,
            weights: WeightScale::PerTensor,
            first_conv_int8: false,
            linear_int8: false,
            rules: Vec::new(),
            keep_fp32: KeepFp32::None,
            batch_norm_input: BatchNormInput::F32,
        }
    }
}

/// Applies `key=value` to a TOML table: `key` is dotted (`optim.lr`), `value` is read as TOML
/// (`0.05`, `true`, `[80, 120]`, `"cosine"`), or as a bare string when it is not valid TOML.
pub fn apply_set(table: &mut toml::Table, set: &str) -> Result<()> {
    let bad = |why: String| TrainError::Recipe { path: PathBuf::from("--set"), why };
    let (key, raw) =
        set.split_once('=').ok_or_else(|| bad(format!("`{set}` must be key=value, e.g. optim.lr=0.05")))?;
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad(format!("`{key}` is not a dotted key such as optim.lr")));
    }
    let mut at = table;
    for p in &parts[..parts.len() - 1] {
        let next = at.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = next.as_table_mut().ok_or_else(|| bad(format!("`{key}`: `{p}` is a value, not a section")))?;
    }
    at.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

impl Recipe {
    /// A recipe file's path, or a built-in recipe's name (a file of that name wins), with `sets`
    /// applied in order, typed and checked.
    pub fn find(name_or_path: &str, sets: &[String]) -> Result<Self> {
        let path = Path::new(name_or_path);
        if path.is_file() {
            return Self::load(path, sets);
        }
        match builtin().iter().find(|(name, _)| *name == name_or_path) {
            Some((name, text)) => Self::parse(text, &Path::new("recipes").join(format!("{name}.toml")), sets),
            None => Err(TrainError::Recipe {
                path: path.to_path_buf(),
                why: format!(
                    "is neither a recipe file nor a built-in recipe; the built-in ones are {}",
                    builtin().iter().map(|r| r.0).collect::<Vec<_>>().join(", ")
                ),
            }),
        }
    }

    /// Reads a recipe file, applies `sets` in order, types and checks it.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
        Self::parse(&text, path, sets)
    }

    /// Types and checks recipe text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path, sets: &[String]) -> Result<Self> {
        let bad = |why: String| TrainError::Recipe { path: path.to_path_buf(), why };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(e.to_string()))?;
        for s in sets {
            apply_set(&mut table, s)?;
        }
        let recipe: Recipe =
            toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| bad(e.message().to_string()))?;
        recipe.check().map_err(bad)?;
        Ok(recipe)
    }

    /// The resolved recipe as TOML, as saved beside a run's outputs.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot write the recipe as TOML: {e}\n"))
    }

    /// Checks every value against its range, so that a bad one is a recipe error naming its key
    /// rather than a failed or diverging run.
    fn check(&self) -> std::result::Result<(), String> {
        let detectors: Vec<&str> = int8_zoo::detection::DETECTORS.iter().map(|d| d.0).collect();
        let (models, other) = match self.task {
            Task::Classification => (int8_zoo::MODELS, ("detector", detectors.as_slice(), "detection")),
            Task::Detection => (detectors.as_slice(), ("classifier", int8_zoo::MODELS, "classification")),
        };
        if !models.contains(&self.model.as_str()) {
            let hint = if other.1.contains(&self.model.as_str()) {
                format!("; `{}` is a {}: set task = \"{}\"", self.model, other.0, other.2)
            } else {
                String::new()
            };
            return Err(format!("unknown {} model `{}`{hint}; known: {}", self.task, self.model, models.join(", ")));
        }
        if self.task == Task::Classification && !self.detector.is_default() {
            return Err("the [detector] section is for task = \"detection\" recipes".into());
        }
        let s = &self.detector.box_scales;
        if s.iter().any(|v| !(v.is_finite() && *v > 0.0 && *v <= 2.0))
            || s.windows(2).any(|w| w[0] > w[1])
            || s.len() == 1
        {
            return Err(format!(
                "detector.box_scales must be two or more rising fractions of the image in (0, 2], got {s:?}"
            ));
        }
        if self.task == Task::Detection {
            int8_zoo::detection::image_size(&self.model, &self.detector.options()).map_err(|e| e.to_string())?;
        }
        self.device().map_err(|e| format!("train.device: {e}"))?;
        let above0 = |key: &str, v: usize| if v == 0 { Err(format!("{key} must be above 0")) } else { Ok(()) };
        let t = &self.train;
        above0("train.epochs", t.epochs)?;
        above0("train.batch", t.batch)?;
        above0("train.eval_batch", t.eval_batch)?;
        above0("train.eval_every", t.eval_every)?;
        above0("train.checkpoint_epochs", t.checkpoint_epochs)?;
        above0("train.log_every", t.log_every)?;
        let o = &self.optim;
        let number = |key: &str, v: f64, ok: bool, range: &str| {
            if v.is_finite() && ok { Ok(()) } else { Err(format!("{key} must be {range}, got {v}")) }
        };
        number("optim.lr", o.lr, o.lr > 0.0, "a positive number")?;
        number("optim.momentum", o.momentum, (0.0..1.0).contains(&o.momentum), "in [0, 1)")?;
        number("optim.weight_decay", o.weight_decay, o.weight_decay >= 0.0, "at least 0")?;
        number("optim.gamma", o.gamma, o.gamma > 0.0 && o.gamma <= 1.0, "in (0, 1]")?;
        number("optim.step_every", o.step_every, o.step_every > 0.0, "above 0")?;
        number("optim.min_lr", o.min_lr, o.min_lr >= 0.0 && o.min_lr <= o.lr, "in [0, optim.lr]")?;
        if let Some(m) = o.max_grad_norm {
            number("optim.max_grad_norm", m, m > 0.0, "a positive number")?;
        }
        let epochs = t.epochs as f64;
        number(
            "optim.warmup_epochs",
            o.warmup_epochs,
            (0.0..epochs).contains(&o.warmup_epochs),
            "in [0, train.epochs)",
        )?;
        for &m in &o.milestones {
            number("optim.milestones", m, m > 0.0, "a list of positive epochs")?;
        }
        if o.milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("optim.milestones must rise, got {:?}", o.milestones));
        }
        if o.schedule == ScheduleName::Multistep && o.milestones.is_empty() {
            return Err("optim.schedule = \"multistep\" needs optim.milestones, e.g. [80, 120]".into());
        }
        let q = &self.quant;
        if q.clip_interval == 0 {
            return Err("quant.clip_interval must be at least 1".into());
        }
        if let Some(r) = q.clip_stale_ratio
            && !(r > 1.0 && r.is_finite())
        {
            return Err(format!("quant.clip_stale_ratio must be a number above 1 (such as 4), got {r}"));
        }
        number("quant.alpha", q.alpha, q.alpha >= 0.0, "at least 0")?;
        number("quant.beta", q.beta, q.beta > 0.0 && q.beta <= 1.0, "in (0, 1]")?;
        let d = &self.data;
        if d.size == 0 || d.size > 4096 {
            return Err(format!("data.size must be an image side in 1..=4096 pixels, got {}", d.size));
        }
        number("data.crop", f64::from(d.crop), (0.0..=1.0).contains(&d.crop), "in [0, 1]")?;
        if d.pad > 64 {
            return Err(format!("data.pad must be at most 64 pixels (CIFAR uses 4), got {}", d.pad));
        }
        for &m in d.mean.iter().flatten() {
            number("data.mean", f64::from(m), true, "a list of finite numbers")?;
        }
        for &s in d.std.iter().flatten() {
            number("data.std", f64::from(s), s > 0.0, "a list of positive numbers")?;
        }
        if let (Some(m), Some(s)) = (&d.mean, &d.std)
            && m.len() != s.len()
        {
            return Err(format!(
                "data.mean has {} entries and data.std {}: give one per channel in each",
                m.len(),
                s.len()
            ));
        }
        Ok(())
    }

    /// The device the run computes on (`train.device`).
    pub fn device(&self) -> std::result::Result<int8_nn::Device, int8_nn::NnError> {
        self.train.device.parse()
    }

    /// The layer policy: FP32 everywhere, or the paper's INT8 policy with this recipe's settings.
    pub fn policy(&self) -> LayerPolicy {
        let q = &self.quant;
        if q.precision == PrecisionName::Fp32 {
            return LayerPolicy::fp32();
        }
        let cfg = Int8Config {
            weight: match q.weights {
                WeightScale::PerTensor => Granularity::PerTensor,
                WeightScale::PerChannel => Granularity::PerChannel,
            },
            grad_rounding: match q.grad_rounding {
                RoundingName::Nearest => GradRounding::Nearest,
                RoundingName::Stochastic => GradRounding::Stochastic { seed: self.train.seed ^ 0x5EED_0F6E_AD00 },
            },
            clip: if q.dsgc {
                ClipMode::Dsgc { interval: q.clip_interval, stale_ratio: q.clip_stale_ratio }
            } else {
                ClipMode::MaxAbs
            },
            dclr: q.dclr.then_some(Dclr { alpha: q.alpha, beta: q.beta }),
            fp32_operand: match q.keep_fp32 {
                KeepFp32::None => None,
                KeepFp32::Input => Some(Operand::Input),
                KeepFp32::Weight => Some(Operand::Weight),
                KeepFp32::Grad => Some(Operand::Grad),
            },
            f16_batch_norm_input: q.batch_norm_input == BatchNormInput::F16,
        };
        LayerPolicy {
            int8: Some(cfg),
            first_conv_int8: q.first_conv_int8,
            linear_int8: q.linear_int8,
            rules: q.rules.iter().map(|r| Rule { pattern: r.pattern.clone(), int8: r.int8 }).collect(),
        }
    }

    /// What the run asks of its data, for `int8_datasets::open::open`; `data_dir` is searched
    /// first (`--data-dir`).
    pub fn data_spec(&self, data_dir: Option<&Path>) -> DataSpec {
        let d = &self.data;
        DataSpec {
            dataset: self.dataset.clone(),
            root: d.root.clone(),
            data_dir: data_dir.map(Path::to_path_buf),
            train_limit: d.train_limit,
            test_limit: d.test_limit,
            seed: self.train.seed,
            pad: d.pad,
            flip: d.flip,
            vflip: d.vflip,
            crop: d.crop,
            mean: d.mean.clone(),
            std: d.std.clone(),
            size: d.size,
        }
    }

    /// SGD's settings.
    pub fn sgd(&self) -> SgdConfig {
        SgdConfig {
            momentum: self.optim.momentum,
            nesterov: self.optim.nesterov,
            weight_decay: self.optim.weight_decay,
            max_grad_norm: self.optim.max_grad_norm,
        }
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        let o = &self.optim;
        let kind = match o.schedule {
            ScheduleName::Constant => ScheduleKind::Constant,
            ScheduleName::Step => ScheduleKind::Step { every: o.step_every, gamma: o.gamma },
            ScheduleName::Multistep => ScheduleKind::MultiStep { milestones: o.milestones.clone(), gamma: o.gamma },
            ScheduleName::Cosine => ScheduleKind::Cosine { total: self.train.epochs as f64, min_lr: o.min_lr },
        };
        Schedule { base_lr: o.lr, kind, warmup: o.warmup_epochs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
model = "cnn-small"
dataset = "cifar100"
[train]
epochs = 2
batch = 64
[optim]
lr = 0.05
"#;

    fn parse(text: &str, sets: &[&str]) -> Result<Recipe> {
        Recipe::parse(text, Path::new("test.toml"), &sets.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn defaults_are_the_papers_and_the_resolved_recipe_round_trips() {
        let r = parse(MINIMAL, &[]).unwrap();
        assert_eq!(r.quant, QuantConfig::default());
        assert_eq!((r.quant.alpha, r.quant.beta, r.quant.clip_interval), (20.0, 0.1, 100));
        let p = r.policy();
        assert!(!p.first_conv_int8 && !p.linear_int8);
        assert_eq!(p.int8.unwrap().clip, ClipMode::dsgc(100));
        let back = parse(&r.to_toml(), &[]).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn sets_override_typed_values_and_unknown_keys_are_named() {
        let r = parse(
            MINIMAL,
            &["optim.lr=0.2", "quant.precision=fp32", "optim.schedule=multistep", "optim.milestones=[1, 1.5]"],
        )
        .unwrap();
        assert_eq!(r.optim.lr, 0.2);
        assert_eq!(r.quant.precision, PrecisionName::Fp32);
        assert_eq!(r.policy(), LayerPolicy::fp32());
        assert_eq!(r.schedule().lr(1.2), 0.2 * 0.1);
        let err = parse(MINIMAL, &["optim.lrr=0.2"]).unwrap_err().to_string();
        assert!(err.contains("lrr") && err.contains("test.toml"), "{err}");
        let err = parse(&format!("{MINIMAL}\nbogus = 1\n"), &[]).unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = parse(MINIMAL, &["quant.precision=int4"]).unwrap_err().to_string();
        assert!(err.contains("int4"), "{err}");
        assert!(parse(MINIMAL, &["optim.lr"]).unwrap_err().to_string().contains("key=value"));
        assert!(parse(MINIMAL, &["optim.lr=0.1.x"]).is_err(), "a string where a number belongs");
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        for (set, key) in [
            ("model=\"vgg99\"", "vgg99"),
            ("train.epochs=0", "train.epochs"),
            ("optim.lr=-1", "optim.lr"),
            ("optim.schedule=multistep", "milestones"),
            ("quant.beta=0", "quant.beta"),
            ("quant.clip_interval=0", "clip_interval"),
            ("quant.clip_stale_ratio=1", "clip_stale_ratio"),
            ("quant.clip_stale_ratio=nan", "clip_stale_ratio"),
            ("optim.max_grad_norm=0", "optim.max_grad_norm"),
            ("optim.max_grad_norm=nan", "optim.max_grad_norm"),
        ] {
            let err = parse(MINIMAL, &[set]).unwrap_err().to_string();
            assert!(err.contains(key), "{set}: {err}");
        }
    }

    #[test]
    fn detection_recipes_name_detectors_and_check_their_settings() {
        let det = |sets: &[&str]| {
            let mut all = vec!["task=\"detection\"", "model=\"ssdlite-mobilenetv2\""];
            all.extend_from_slice(sets);
            parse(MINIMAL, &all)
        };
        let r = det(&["detector.box_scales=[0.05, 0.5]"]).unwrap();
        assert_eq!((r.task, r.detector.box_scales.as_slice()), (Task::Detection, &[0.05, 0.5][..]));
        assert_eq!(parse(&r.to_toml(), &[]).unwrap(), r);
        // The resolved text of a classification recipe is what it was before detection existed.
        assert!(!parse(MINIMAL, &[]).unwrap().to_toml().contains("task"));
        for (sets, says) in [
            (vec!["detector.box_scales=[0.5]"], "detector.box_scales"),
            (vec!["detector.box_scales=[0.5, 0.1]"], "rising"),
            (vec!["detector.box_scales=[0, 0.5]"], "detector.box_scales"),
            (vec!["model=\"resnet20\""], "`resnet20` is a classifier: set task = \"classification\""),
        ] {
            let err = det(&sets).unwrap_err().to_string();
            assert!(err.contains(says), "{sets:?}: {err}");
        }
        let r = det(&["detector.image_size=[256, 192]"]).unwrap();
        assert_eq!(r.detector.options().image_size, Some((256, 192)));
        assert_eq!(parse(&r.to_toml(), &[]).unwrap(), r);
        for (sets, says) in [
            (vec!["detector.image_size=[250, 256]"], "is 250x256; give [height, width], each a multiple of 32"),
            (vec!["detector.image_size=[32, 32]"], "from 64 to 2048"),
            (vec!["model=\"ssd300-vgg16\"", "detector.image_size=[320, 320]"], "SSD300 takes 300x300 only"),
        ] {
            let err = det(&sets).unwrap_err().to_string();
            assert!(err.contains(says) && err.contains("detector.image_size"), "{sets:?}: {err}");
        }
        let err = parse(MINIMAL, &["model=\"ssd300-vgg16\""]).unwrap_err().to_string();
        assert!(err.contains("is a detector: set task = \"detection\""), "{err}");
        let err = parse(MINIMAL, &["detector.box_scales=[0.1, 0.2]"]).unwrap_err().to_string();
        assert!(err.contains("[detector] section is for task = \"detection\""), "{err}");
    }

    /// Every numeric key has a range, and a value outside it is an error naming the key (the
    /// value is accepted first at the edge of its range, where there is one).
    #[test]
    fn every_numeric_key_is_checked() {
        for (bad, good) in [
            ("train.batch=0", "train.batch=1"),
            ("train.eval_batch=0", "train.eval_batch=1"),
            ("train.eval_every=0", "train.eval_every=1"),
            ("train.checkpoint_epochs=0", "train.checkpoint_epochs=1"),
            ("train.log_every=0", "train.log_every=1"),
            ("optim.lr=0", "optim.lr=1e-9"),
            ("optim.lr=inf", "optim.lr=10"),
            ("optim.momentum=1", "optim.momentum=0"),
            ("optim.weight_decay=-1e-4", "optim.weight_decay=0"),
            ("optim.weight_decay=nan", "optim.weight_decay=1"),
            ("optim.gamma=0", "optim.gamma=1"),
            ("optim.gamma=2", "optim.gamma=0.5"),
            ("optim.step_every=0", "optim.step_every=0.5"),
            ("optim.min_lr=-1", "optim.min_lr=0"),
            ("optim.min_lr=1", "optim.min_lr=0.05"),
            ("optim.warmup_epochs=2", "optim.warmup_epochs=1.5"),
            ("optim.warmup_epochs=-1", "optim.warmup_epochs=0"),
            ("optim.milestones=[1, 1]", "optim.milestones=[1, 1.5]"),
            ("optim.milestones=[-1]", "optim.milestones=[1]"),
            ("quant.alpha=-1", "quant.alpha=0"),
            ("quant.beta=1.5", "quant.beta=1"),
            ("data.size=0", "data.size=1"),
            ("data.size=5000", "data.size=4096"),
            ("data.pad=65", "data.pad=64"),
            ("data.crop=1.5", "data.crop=1"),
            ("data.crop=-0.1", "data.crop=0"),
            ("data.std=[0]", "data.std=[1]"),
            ("data.std=[-0.5]", "data.std=[0.5]"),
            ("data.mean=[nan]", "data.mean=[0]"),
        ] {
            let key = bad.split('=').next().unwrap();
            let err = parse(MINIMAL, &[bad]).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
            parse(MINIMAL, &[good]).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        let err = parse(MINIMAL, &["data.mean=[0.5, 0.5]", "data.std=[0.5]"]).unwrap_err().to_string();
        assert!(err.contains("data.mean") && err.contains("data.std"), "{err}");
    }

    /// `quant.keep_fp32` reaches the layers' INT8 settings, and is left out of the resolved
    /// recipe when it is the paper's `none`.
    #[test]
    fn an_operand_kept_in_fp32_reaches_the_policy() {
        let paper = parse(MINIMAL, &[]).unwrap();
        assert_eq!(paper.policy().int8.unwrap().fp32_operand, None);
        assert!(!paper.to_toml().contains("keep_fp32"));
        for (name, want) in [("input", Operand::Input), ("weight", Operand::Weight), ("grad", Operand::Grad)] {
            let r = parse(MINIMAL, &[&format!("quant.keep_fp32=\"{name}\"")]).unwrap();
            assert_eq!(r.policy().int8.unwrap().fp32_operand, Some(want));
            assert!(r.to_toml().contains(&format!("keep_fp32 = \"{name}\"")), "{}", r.to_toml());
        }
        let err = parse(MINIMAL, &["quant.keep_fp32=\"bias\""]).unwrap_err().to_string();
        assert!(err.contains("keep_fp32") || err.contains("bias"), "{err}");
    }

    /// `quant.batch_norm_input` reaches the layers' INT8 settings, and is left out of the resolved
    /// recipe when it is the default `f32`.
    #[test]
    fn the_batch_norm_input_precision_reaches_the_policy() {
        let paper = parse(MINIMAL, &[]).unwrap();
        assert!(!paper.policy().int8.unwrap().f16_batch_norm_input);
        assert!(!paper.to_toml().contains("batch_norm_input"));
        let r = parse(MINIMAL, &["quant.batch_norm_input=\"f16\""]).unwrap();
        assert!(r.policy().int8.unwrap().f16_batch_norm_input);
        assert!(r.to_toml().contains("batch_norm_input = \"f16\""), "{}", r.to_toml());
        let err = parse(MINIMAL, &["quant.batch_norm_input=\"bf16\""]).unwrap_err().to_string();
        assert!(err.contains("batch_norm_input") || err.contains("bf16"), "{err}");
    }

    /// `train.device` names a device or is an error naming the key and the choices; the CPU is
    /// the default and is left out of the resolved recipe, a GPU is written into it.
    #[test]
    fn the_device_is_cpu_unless_the_recipe_names_a_gpu() {
        let cpu = parse(MINIMAL, &[]).unwrap();
        assert_eq!(cpu.device().unwrap(), int8_nn::Device::Cpu);
        assert!(!cpu.to_toml().contains("device"), "{}", cpu.to_toml());
        let gpu = parse(MINIMAL, &["train.device=\"cuda:1\""]).unwrap();
        assert_eq!(gpu.device().unwrap(), int8_nn::Device::Cuda(1));
        assert!(gpu.to_toml().contains("device = \"cuda:1\""), "{}", gpu.to_toml());
        assert_eq!(parse(MINIMAL, &["train.device=\"cuda\""]).unwrap().device().unwrap(), int8_nn::Device::Cuda(0));
        for bad in ["tpu", "cuda:x", "gpu"] {
            let err = parse(MINIMAL, &[&format!("train.device=\"{bad}\"")]).unwrap_err().to_string();
            assert!(err.contains("train.device") && err.contains("cuda:N"), "{bad}: {err}");
        }
    }

    #[test]
    fn ablation_switches_reach_the_layer_config() {
        let r = parse(MINIMAL, &["quant.dsgc=false", "quant.dclr=false", "quant.grad_rounding=stochastic"]).unwrap();
        let cfg = r.policy().int8.unwrap();
        assert_eq!(cfg.clip, ClipMode::MaxAbs);
        assert_eq!(cfg.dclr, None);
        assert!(matches!(cfg.grad_rounding, GradRounding::Stochastic { .. }));
        let r = parse(MINIMAL, &["quant.clip_stale_ratio=4"]).unwrap();
        assert_eq!(r.policy().int8.unwrap().clip, ClipMode::Dsgc { interval: 100, stale_ratio: Some(4.0) });
        assert!(r.to_toml().contains("clip_stale_ratio = 4"), "the saved recipe keeps it");
    }

    #[test]
    fn every_builtin_recipe_is_valid_and_uses_the_papers_quantization() {
        let names: Vec<&str> = builtin().iter().map(|r| r.0).collect();
        for want in ["resnet20-cifar10", "mobilenetv2-cifar10", "cnn-small-fashion-mnist", "resnet50-imagenet"] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        // The compiled copies are the files' current text.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), names.len());
        for (name, text) in builtin() {
            assert_eq!(&std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap(), text);
            let r = Recipe::find(name, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(name.starts_with(&r.model.replace("-cifar", "")), "{name} trains {}", r.model);
            assert_eq!((r.quant.alpha, r.quant.beta, r.quant.clip_interval), (20.0, 0.1, 100), "{name}");
            assert!(r.quant.dsgc && r.quant.dclr && r.optim.momentum == 0.9, "{name}");
            // A run killed mid-epoch loses at most this many steps.
            assert!(r.train.checkpoint_every > 0, "{name} checkpoints only at epoch ends");
        }
        let err = Recipe::find("resnet21-cifar10", &[]).unwrap_err().to_string();
        assert!(err.contains("resnet21-cifar10") && err.contains("resnet20-cifar10"), "{err}");
        assert_eq!(recipe_name("runs/x/my-recipe.toml"), "my-recipe");
        assert_eq!(recipe_name("resnet20-cifar10"), "resnet20-cifar10");
    }
}
