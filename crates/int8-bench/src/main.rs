//! `int8-bench`: FP32 and INT8 measured side by side, in one process, on the same cores.
//!
//! `cargo xtask bench` builds this in release mode and runs it; it prints a Markdown table and
//! optionally writes JSON (a list of `{name, fp32_ms, int8_ms, speedup}` objects).

mod data;
mod kernels;
mod step;
mod timing;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Measure FP32 and INT8 side by side")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand, Debug)]
enum What {
    /// GEMM 1024^3 and every distinct conv layer of ResNet-20 and MobileNetV2 (CIFAR, batch 128),
    /// forward + dX + dW with quantization included.
    Kernels {
        /// Also write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seconds of measurement per timed item.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Only rows whose name contains this.
        #[arg(long)]
        filter: Option<String>,
    },
    /// One training step (batch 128 of CIFAR-sized images, or 8 of a detector's input size:
    /// forward, backward, update) at FP32 and INT8, ResNet-20 unless `--model` names another zoo
    /// model or detector.
    Step {
        /// Also write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seconds of measurement per precision (at least three steps each).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// The model (a name from `cargo xtask zoo`: a classifier built for 10 classes, a detector
        /// for 21), e.g. mobilenetv2-cifar or ssdlite-mobilenetv2.
        #[arg(long, default_value = "resnet20")]
        model: String,
        /// Keep the layers this name pattern matches in FP32 in the INT8 model, as a recipe's
        /// `quant.rules` does (`*` for any run of characters; repeatable), e.g. `*.dw.conv`.
        #[arg(long = "fp32", value_name = "PATTERN")]
        fp32: Vec<String>,
        /// Round the INT8 layers' output-gradient codes stochastically (a recipe's
        /// `quant.grad_rounding = "stochastic"`) instead of to nearest.
        #[arg(long)]
        stochastic_grads: bool,
        /// Batch norms after INT8 convolutions keep their input for the backward pass in half
        /// precision (a recipe's `quant.batch_norm_input = "f16"`) instead of f32.
        #[arg(long)]
        f16_batch_norm_input: bool,
        /// Also time PyTorch's FP32 step of the same model with this Python (one that has torch;
        /// `cargo xtask bench step --peer pytorch` makes one), as a column of its own.
        #[arg(long, value_name = "PYTHON")]
        peer_python: Option<PathBuf>,
        /// Where the steps run: `cpu`, or `cuda` / `cuda:N` (a bench built with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: int8_nn::Device,
    },
    /// The step bench's memory child: one precision's model, four steps, its peak resident set
    /// (MiB) on stdout.
    #[command(hide = true)]
    StepMemory {
        /// The model.
        #[arg(long)]
        model: String,
        /// fp32 or int8.
        #[arg(long)]
        precision: String,
        /// As for `step`.
        #[arg(long = "fp32", value_name = "PATTERN")]
        fp32: Vec<String>,
        /// As for `step`.
        #[arg(long)]
        stochastic_grads: bool,
        /// As for `step`.
        #[arg(long)]
        f16_batch_norm_input: bool,
        /// As for `step`.
        #[arg(long, default_value = "cpu")]
        device: int8_nn::Device,
    },
    /// Whether the loader keeps up with INT8 ResNet-20 training on CIFAR-10 (JPEG q75).
    Data {
        /// Also write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seconds of training steps.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
    /// Run one conv layer's training work repeatedly at one precision, for a profiler, and print
    /// the time of each part.
    Profile {
        /// The first kernels-bench conv row whose name contains this.
        layer: String,
        /// fp32 or int8.
        #[arg(long, default_value = "int8")]
        precision: String,
        /// Seconds to run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
}

/// One measured row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was measured.
    pub name: String,
    /// FP32 median milliseconds.
    pub fp32_ms: f64,
    /// INT8 median milliseconds.
    pub int8_ms: f64,
    /// `fp32_ms / int8_ms`.
    pub speedup: f64,
    /// PyTorch's FP32 milliseconds for the same work, where measured (`--peer-python`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pytorch_fp32_ms: Option<f64>,
}

impl Row {
    fn new(name: impl Into<String>, fp32_ms: f64, int8_ms: f64) -> Self {
        Self { name: name.into(), fp32_ms, int8_ms, speedup: fp32_ms / int8_ms, pytorch_fp32_ms: None }
    }
}

fn main() -> std::process::ExitCode {
    // The same allocation policy as the trainer, so that steps are timed as they train.
    int8_nn::alloc::keep_freed_memory();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes, without a backtrace.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    int8_core::cpu::check_env()?;
    // Kernels and steps run on a worker of rayon's pool, as the trainer runs its steps
    // (`int8_nn::threads`), so that they are timed as they train. The data bench waits on its
    // loader, which must not happen on a worker; it puts each step there itself.
    if !matches!(cli.what, What::Data { .. }) {
        return int8_nn::threads::in_pool(|| run_on(cli));
    }
    run_on(cli)
}

fn run_on(cli: Cli) -> Result<()> {
    match cli.what {
        What::Kernels { json, seconds, filter } => {
            println!("{}", kernels::machine_line());
            let rows = kernels::run(std::time::Duration::from_secs_f64(seconds), filter.as_deref())?;
            write_json(json, &rows)?;
        }
        What::Step { json, seconds, model, fp32, stochastic_grads, f16_batch_norm_input, peer_python, device } => {
            println!("{}", kernels::machine_line());
            let policy = step::Int8Policy { fp32_patterns: &fp32, stochastic_grads, f16_batch_norm_input };
            let budget = std::time::Duration::from_secs_f64(seconds);
            let rows = step::run(&model, &policy, &device, budget, peer_python.as_deref())?;
            write_json(json, &rows)?;
        }
        What::StepMemory { model, precision, fp32, stochastic_grads, f16_batch_norm_input, device } => {
            let policy = step::Int8Policy { fp32_patterns: &fp32, stochastic_grads, f16_batch_norm_input };
            step::memory_child(&model, precision == "int8", &policy, &device)?;
        }
        What::Data { json, seconds } => {
            println!("{}", kernels::machine_line());
            let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            let rows = data::run(&workspace, std::time::Duration::from_secs_f64(seconds))?;
            write_json(json, &rows)?;
        }
        What::Profile { layer, precision, seconds } => kernels::profile(&layer, &precision, seconds)?,
    }
    Ok(())
}

/// Prints the Markdown header; rows are printed as they are measured. `peer` adds PyTorch's
/// columns.
pub fn print_header_with(peer: bool) {
    if peer {
        println!("| name | fp32 ms | int8 ms | speedup | pytorch fp32 ms | pytorch fp32 / int8 |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    } else {
        println!("| name | fp32 ms | int8 ms | speedup |");
        println!("| --- | ---: | ---: | ---: |");
    }
}

/// Prints the Markdown header without PyTorch's columns.
pub fn print_header() {
    print_header_with(false);
}

/// Prints one Markdown row (a missing value as `-`); `peer` adds PyTorch's columns.
pub fn print_row_with(r: &Row, peer: bool) {
    let cell = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.3}") };
    let ratio = |v: f64| if v.is_nan() { "-".to_string() } else { format!("{v:.2}x") };
    let mut line = format!("| {} | {} | {} | {}", r.name, cell(r.fp32_ms), cell(r.int8_ms), ratio(r.speedup));
    if peer {
        let torch = r.pytorch_fp32_ms.unwrap_or(f64::NAN);
        line += &format!(" | {} | {}", cell(torch), ratio(torch / r.int8_ms));
    }
    println!("{line} |");
}

/// Prints one Markdown row without PyTorch's columns.
pub fn print_row(r: &Row) {
    print_row_with(r, false);
}

/// Writes the rows as JSON, atomically (a temporary file renamed into place).
fn write_json<T: Serialize>(path: Option<PathBuf>, rows: &[T]) -> Result<()> {
    let Some(path) = path else { return Ok(()) };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(rows)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot move {} into place", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
