//! `cargo xtask`: the project's command line (see `docs/architecture.md`).
//!
//! It links none of the workspace's crates but the light `int8-events` (TensorBoard event files),
//! so that it builds in seconds (the rust-analyzer xtask pattern): benches run in the `int8-bench`
//! binary, and training and the tool commands (`zoo`, `data`, `scalars`, a sweep's recipe check)
//! in the `int8-train` binary, which this builds in release mode and spawns. `sweep` expands an experiment into runs and tabulates them (see
//! [`sweep`]); `plot` draws a sweep's curves from its runs' TensorBoard events (see [`plot`]).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

mod plot;
mod sweep;

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "int8-train: INT8 training of CNNs, measured against FP32")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Measure FP32 and INT8 side by side; writes JSON and Markdown under runs/bench/.
    Bench {
        /// Which bench; all of them when omitted.
        which: Option<Bench>,
        /// Write the JSON rows here instead of runs/bench/<bench>.json.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Seconds of measurement per timed item (the step bench takes ten times this per
        /// precision).
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        /// Only rows whose name contains this (kernels bench).
        #[arg(long)]
        filter: Option<String>,
        /// The step bench's model, ResNet-20 unless given (e.g. mobilenetv2-cifar; its rows go
        /// to runs/bench/step-<model>.{json,md}).
        #[arg(long)]
        model: Option<String>,
        /// Keep the layers this name pattern matches in FP32 in the step bench's INT8 model, as
        /// a recipe's `quant.rules` does (`*` for any run of characters; repeatable), e.g.
        /// `--fp32 "*.dw.conv"` for MobileNetV2's depthwise convolutions.
        #[arg(long = "fp32", value_name = "PATTERN")]
        fp32: Vec<String>,
        /// Round the step bench's INT8 output-gradient codes stochastically, as a recipe's
        /// `quant.grad_rounding = "stochastic"` does (its rows go to files named -stochastic-grads).
        #[arg(long)]
        stochastic_grads: bool,
        /// Batch norms after the step bench's INT8 convolutions keep their input for the backward
        /// pass in half precision, as a recipe's `quant.batch_norm_input = "f16"` does (its rows go
        /// to files named -f16-batch-norm-input).
        #[arg(long)]
        f16_batch_norm_input: bool,
        /// Also time a peer framework's FP32 step of the same model in the step bench, as columns
        /// of their own: `pytorch` (torch from PyPI, installed once into runs/bench/.venv-pytorch).
        #[arg(long, value_name = "FRAMEWORK")]
        peer: Option<Peer>,
        /// Where the step bench runs: `cpu`, or `cuda` / `cuda:N` (int8-bench is then built with
        /// its `cuda` feature; the rows go to files named -cuda).
        #[arg(long)]
        device: Option<String>,
        /// Cap the kernels' instruction set, as `INT8_TRAIN_CPU` does, to time the paths of a
        /// smaller CPU on this one (`avx2`: an AVX2-only CPU's kernels; the rows go to files named
        /// -cpu-LEVEL). The `gemm` crate's FP32 kernels and the compiler-vectorised elementwise
        /// loops keep what the CPU has.
        #[arg(long, value_name = "LEVEL")]
        cpu: Option<CpuLevel>,
    },
    /// The main job: run an experiment grid (FP32 vs INT8 x ablations x seeds) and tabulate it.
    Sweep {
        /// An experiment name from experiments/ or a path to one.
        #[arg(default_value = "quick")]
        experiment: String,
        /// Output folder; runs/<experiment> when omitted.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Runs at once (each gets an equal share of the cores).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Print the plan and check every recipe, without running.
        #[arg(long)]
        dry_run: bool,
        /// Rewrite results.csv and results.md from the runs finished so far, without running
        /// (after a change of the experiment's `baseline`, say).
        #[arg(long, conflicts_with = "dry_run")]
        tables: bool,
        /// Build the trainer from the workspace again and run with it; otherwise a sweep that ran
        /// before reuses the copy it made then, so that all its runs run the same code.
        #[arg(long)]
        rebuild: bool,
        /// Build the trainer with its `cuda` feature, for runs on NVIDIA GPUs (with
        /// `--set train.device=cuda`); add --rebuild when the sweep already has a CPU-only copy.
        #[arg(long)]
        cuda: bool,
        /// Override a recipe value in every run, e.g. --set train.epochs=1 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Look for datasets here first.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where the runs run: local processes, or one Slurm job array, one task per run (the
        /// output folder and the data on a filesystem the nodes share; see the README).
        #[arg(long, value_enum, default_value_t = BackendKind::Local)]
        backend: BackendKind,
        /// Slurm: the partition (sbatch --partition).
        #[arg(long, help_heading = "Slurm")]
        partition: Option<String>,
        /// Slurm: CPUs of each run's task, and its threads (sbatch --cpus-per-task).
        #[arg(long, help_heading = "Slurm")]
        cpus_per_task: Option<usize>,
        /// Slurm: GPUs of each run's task (sbatch --gpus-per-task).
        #[arg(long, help_heading = "Slurm")]
        gpus_per_task: Option<usize>,
        /// Slurm: runs at once (the %M of sbatch --array=0-N%M).
        #[arg(long, help_heading = "Slurm")]
        max_parallel: Option<usize>,
        /// Slurm: each run's time limit (sbatch --time); SIGTERM 120 s before it stops the run
        /// with a checkpoint, which the next submission resumes.
        #[arg(long, value_name = "HH:MM:SS", help_heading = "Slurm")]
        time: Option<String>,
        /// Slurm: one more sbatch argument, passed as it is, e.g. --sbatch-arg=--qos=long
        /// (repeatable).
        #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true, help_heading = "Slurm")]
        sbatch_args: Vec<String>,
        /// Slurm: follow the array with progress lines until it ends, then write the tables.
        #[arg(long, help_heading = "Slurm")]
        wait: bool,
        /// Print each run's state (finished, running, pending, failed) from the run folders and
        /// the sweep's Slurm job, without running anything.
        #[arg(long, conflicts_with_all = ["dry_run", "tables", "wait", "cancel"])]
        status: bool,
        /// Slurm: cancel the sweep's job array (running runs stop with a checkpoint).
        #[arg(long, conflicts_with_all = ["dry_run", "tables", "wait"])]
        cancel: bool,
    },
    /// Train one recipe: `cargo xtask train RECIPE [--precision fp32|int8] [--out DIR] [--set k=v]
    /// [--resume]` (see `cargo xtask train --help`).
    Train {
        /// Arguments for the trainer.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// List, import or fetch datasets.
    Data {
        #[command(subcommand)]
        what: DataCmd,
        /// Look here first (then $INT8_DATA_DIR, datasets/cache/, /usr/share/datasets/).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
    },
    /// List the models (with parameter counts) and the recipes.
    Zoo,
    /// Draw a sweep's runs from their TensorBoard events, beside its results.md: curves.png (the
    /// test metric and the losses by epoch, FP32 against each INT8 setting, every seed and their
    /// mean) and layers.png (each INT8 layer's DCLR multiplier, gradient cosine distance and clip
    /// value over the steps). The sweep does this itself when it writes its tables.
    Plot {
        /// An experiment name from experiments/ or a path to one (its sweep's folder is
        /// runs/<name>), or a sweep's folder.
        experiment: String,
        /// The sweep's folder, as given to `cargo xtask sweep --out`; the pictures go there too.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print a run's TensorBoard curves as a Markdown table: `cargo xtask scalars RUN_DIR --tag
    /// "quant/features.1.dw.conv/*" --to 300`; without --tag, list the tags.
    Scalars {
        /// A run's folder (holding events.out.tfevents.* files), e.g.
        /// runs/quick/cnn-small-fashion-mnist-int8-s0.
        run: PathBuf,
        /// Tags to show as columns, `*` matching any run of characters (repeatable).
        #[arg(long = "tag", value_name = "PATTERN")]
        tags: Vec<String>,
        /// First step shown.
        #[arg(long)]
        from: Option<u64>,
        /// Last step shown.
        #[arg(long)]
        to: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum DataCmd {
    /// Each known dataset and where it was found, or how to get it.
    List,
    /// Import a dataset from a local .tar.gz archive or folder into datasets/cache/.
    Import {
        /// The dataset's name (see `data list`).
        name: String,
        /// The archive or folder.
        path: PathBuf,
    },
    /// Download a dataset from its canonical source.
    Fetch {
        /// The dataset's name.
        name: String,
    },
}

/// Where a sweep's runs run.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BackendKind {
    /// Local processes, up to --jobs at once.
    Local,
    /// One Slurm job array, submitted with sbatch.
    Slurm,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Bench {
    /// GEMM and every conv layer of ResNet-20 and MobileNetV2, forward + dX + dW.
    Kernels,
    /// One training step at batch 128: ResNet-20, or the model of `--model`.
    Step,
    /// Whether the CIFAR-10 loader keeps up with INT8 training.
    Data,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Bench::Kernels => "kernels",
            Bench::Step => "step",
            Bench::Data => "data",
        }
    }
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes, without a backtrace: this is a command line.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.command {
        Cmd::Bench {
            which,
            json,
            seconds,
            filter,
            model,
            fp32,
            stochastic_grads,
            f16_batch_norm_input,
            peer,
            device,
            cpu,
        } => {
            if device.is_some() && which != Some(Bench::Step) {
                bail!("--device is the step bench's; run it as `cargo xtask bench step --device cuda`");
            }
            if peer.is_some() && which != Some(Bench::Step) {
                bail!("--peer adds columns to the step bench; run it as `cargo xtask bench step --peer pytorch`");
            }
            let peer_python = match peer {
                Some(Peer::Pytorch) => Some(pytorch_venv(&root)?),
                None => None,
            };
            if model.is_some() && which != Some(Bench::Step) {
                bail!("--model picks the step bench's model; run it as `cargo xtask bench step --model NAME`");
            }
            if !fp32.is_empty() && which != Some(Bench::Step) {
                bail!("--fp32 changes the step bench's INT8 model; run it as `cargo xtask bench step --fp32 PATTERN`");
            }
            if stochastic_grads && which != Some(Bench::Step) {
                bail!(
                    "--stochastic-grads changes the step bench's INT8 model; run it as `cargo xtask bench step --stochastic-grads`"
                );
            }
            if f16_batch_norm_input && which != Some(Bench::Step) {
                bail!(
                    "--f16-batch-norm-input changes the step bench's INT8 model; run it as `cargo xtask bench step --f16-batch-norm-input`"
                );
            }
            let benches = match which {
                Some(b) => vec![b],
                None => vec![Bench::Kernels, Bench::Step, Bench::Data],
            };
            if json.is_some() && benches.len() > 1 {
                bail!("--json names one file; pick one bench (for example `cargo xtask bench kernels --json FILE`)");
            }
            let all = which.is_none();
            // A policy other than the paper's gets its own files, named by its patterns.
            let mut policy: String = fp32
                .iter()
                .map(|p| format!("-fp32-{}", p.replace(|c: char| !c.is_ascii_alphanumeric(), "_")))
                .collect();
            if stochastic_grads {
                policy += "-stochastic-grads";
            }
            if f16_batch_norm_input {
                policy += "-f16-batch-norm-input";
            }
            if let Some(d) = device.as_deref().filter(|d| *d != "cpu") {
                policy += &format!("-{}", d.replace(':', "_"));
            }
            if let Some(c) = cpu {
                policy += &format!("-cpu-{}", c.name());
            }
            for bench in benches {
                let file = match &model {
                    Some(m) => format!("{}-{m}{policy}.json", bench.name()),
                    None => format!("{}{policy}.json", bench.name()),
                };
                let json = json.clone().unwrap_or_else(|| root.join("runs/bench").join(file));
                let opts = BenchOpts {
                    seconds,
                    filter: filter.as_deref(),
                    model: model.as_deref(),
                    fp32: &fp32,
                    stochastic_grads,
                    f16_batch_norm_input,
                    peer_python: peer_python.as_deref(),
                    device: device.as_deref(),
                    cpu,
                };
                match run_bench(&root, bench, &json, &opts) {
                    // The data bench needs CIFAR-10 imported; a full run goes on without it.
                    Err(e) if all && bench == Bench::Data => eprintln!("skipped the data bench: {e:#}"),
                    other => other?,
                }
            }
            Ok(())
        }
        Cmd::Data { what, data_dir } => {
            let mut args: Vec<std::ffi::OsString> = vec!["data".into()];
            match what {
                DataCmd::List => args.push("list".into()),
                DataCmd::Import { name, path } => {
                    // The trainer works from the workspace root: hand it an absolute path.
                    let path = std::env::current_dir().context("cannot read the current folder")?.join(path);
                    args.extend(["import".into(), name.into(), path.into()]);
                }
                DataCmd::Fetch { name } => args.extend(["fetch".into(), name.into()]),
            }
            if let Some(d) = data_dir {
                args.extend(["--data-dir".into(), std::env::current_dir()?.join(d).into()]);
            }
            trainer_tool(&root, &args)
        }
        Cmd::Sweep {
            experiment,
            out,
            jobs,
            dry_run,
            tables,
            rebuild,
            cuda,
            sets,
            data_dir,
            backend,
            partition,
            cpus_per_task,
            gpus_per_task,
            max_parallel,
            time,
            sbatch_args,
            wait,
            status,
            cancel,
        } => {
            let path = if Path::new(&experiment).is_file() {
                PathBuf::from(&experiment)
            } else {
                root.join("experiments").join(format!("{experiment}.toml"))
            };
            if !path.is_file() {
                bail!("no experiment `{experiment}`: neither a file nor {}", path.display());
            }
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("sweep").to_string();
            let out = out.unwrap_or_else(|| root.join("runs").join(stem));
            if jobs == 0 {
                bail!("--jobs must be at least 1");
            }
            let backend = match backend {
                BackendKind::Local => {
                    let given = [
                        ("--partition", partition.is_some()),
                        ("--cpus-per-task", cpus_per_task.is_some()),
                        ("--gpus-per-task", gpus_per_task.is_some()),
                        ("--max-parallel", max_parallel.is_some()),
                        ("--time", time.is_some()),
                        ("--sbatch-arg", !sbatch_args.is_empty()),
                        ("--wait", wait),
                    ];
                    if let Some((flag, _)) = given.iter().find(|g| g.1) {
                        bail!("{flag} is for Slurm: add --backend slurm");
                    }
                    sweep::Backend::Local
                }
                BackendKind::Slurm => {
                    if jobs != 1 {
                        bail!(
                            "--jobs is for the local backend; with --backend slurm, --max-parallel caps runs at once"
                        );
                    }
                    for (flag, v) in [("--cpus-per-task", cpus_per_task), ("--max-parallel", max_parallel)] {
                        if v == Some(0) {
                            bail!("{flag} must be at least 1");
                        }
                    }
                    sweep::Backend::Slurm(sweep::slurm::SlurmOptions {
                        partition,
                        cpus_per_task,
                        gpus_per_task,
                        max_parallel,
                        time,
                        sbatch_args,
                        wait,
                    })
                }
            };
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            ctrlc::set_handler(move || {
                if flag.swap(true, Ordering::Relaxed) {
                    eprintln!("\nsecond Ctrl-C: leaving at once (running runs keep their last checkpoints)");
                    std::process::exit(130);
                }
            })
            .context("cannot install the Ctrl-C handler")?;
            // Paths are handed to runs that work from the workspace root: make them absolute.
            let cwd = std::env::current_dir().context("cannot read the current folder")?;
            let (out, data_dir) = (cwd.join(out), data_dir.map(|d| cwd.join(d)));
            let opts = sweep::SweepOptions {
                experiment: cwd.join(path),
                out,
                jobs,
                dry_run,
                tables,
                rebuild,
                cuda,
                sets,
                data_dir,
                backend,
                status,
                cancel,
            };
            sweep::sweep(&root, &opts, stop)
        }
        Cmd::Plot { experiment, out } => {
            let given = Path::new(&experiment);
            let name = given.file_stem().and_then(|s| s.to_str()).unwrap_or("sweep").to_string();
            let dir = match out {
                Some(o) => o,
                None if given.join("plan.json").is_file() => given.to_path_buf(),
                None => root.join("runs").join(&name),
            };
            let pictures = plot::plot_folder(&dir, &name)?;
            if !pictures.missing.is_empty() {
                println!("left out (no TensorBoard events yet): {}", pictures.missing.join(", "));
            }
            for note in &pictures.notes {
                println!("note: {note}");
            }
            for p in &pictures.written {
                println!("wrote {}", p.display());
            }
            Ok(())
        }
        Cmd::Train { args } => trainer_tool(&root, &args),
        Cmd::Zoo => trainer_tool(&root, &["zoo"]),
        Cmd::Scalars { run, tags, from, to } => {
            let mut args: Vec<std::ffi::OsString> = vec!["scalars".into(), run.into()];
            for t in tags {
                args.extend(["--tag".into(), t.into()]);
            }
            if let Some(f) = from {
                args.extend(["--from".into(), f.to_string().into()]);
            }
            if let Some(t) = to {
                args.extend(["--to".into(), t.to_string().into()]);
            }
            trainer_tool(&root, &args)
        }
    }
}

/// Builds the trainer in release mode and becomes it, with `args`, in the current folder: the
/// trainer gets every signal sent to this process (Ctrl-C, and the SIGTERM of `kill` or a job
/// scheduler, on which a training run stops after its step with a checkpoint) and its exit status
/// is this command's.
fn trainer_tool(root: &Path, args: &[impl AsRef<std::ffi::OsStr>]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let trainer = sweep::build_trainer(root, false)?;
    let err = Command::new(&trainer).args(args).exec();
    Err(err).with_context(|| format!("cannot start {}", trainer.display()))
}

/// The workspace root: the parent of this crate's manifest directory.
fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).context("xtask must live one level below the workspace root")
}

/// What `cargo xtask bench` passes on to `int8-bench`.
struct BenchOpts<'a> {
    /// Seconds of measurement per timed item (ten times this per precision for the step bench).
    seconds: f64,
    /// The kernels bench's row filter.
    filter: Option<&'a str>,
    /// The step bench's model.
    model: Option<&'a str>,
    /// Layer-name patterns the step bench's INT8 model keeps in FP32.
    fp32: &'a [String],
    /// Whether the step bench's INT8 model rounds gradient codes stochastically.
    stochastic_grads: bool,
    /// Whether the step bench's INT8 batch norms keep their input in half precision.
    f16_batch_norm_input: bool,
    /// A Python with torch, for the step bench's PyTorch columns.
    peer_python: Option<&'a Path>,
    /// The step bench's device, the CPU unless given.
    device: Option<&'a str>,
    /// The instruction-set cap handed to int8-bench as `INT8_TRAIN_CPU`.
    cpu: Option<CpuLevel>,
}

/// An instruction-set cap for the kernels (`int8_core::cpu::Level`, by the same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CpuLevel {
    /// No cap: AMX where the CPU and Linux allow it.
    Amx,
    /// AVX-512 (with VNNI) but not AMX.
    Avx512,
    /// AVX2 with AVX-VNNI.
    AvxVnni,
    /// AVX2 and FMA, as AMD Zen 2/3 and older Xeons have.
    Avx2,
    /// Plain Rust.
    Portable,
}

impl CpuLevel {
    /// The name `INT8_TRAIN_CPU` takes.
    fn name(self) -> &'static str {
        match self {
            CpuLevel::Amx => "amx",
            CpuLevel::Avx512 => "avx512",
            CpuLevel::AvxVnni => "avx-vnni",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Portable => "portable",
        }
    }
}

/// A framework the step bench can time beside ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Peer {
    /// PyTorch's FP32 step (`crates/int8-bench/peer/pytorch_step.py`).
    Pytorch,
}

/// The Python of `runs/bench/.venv-pytorch`, made with torch and numpy from PyPI if it is not
/// there yet (a few minutes and about 1 GB, once).
fn pytorch_venv(root: &Path) -> Result<PathBuf> {
    let venv = root.join("runs/bench/.venv-pytorch");
    let python = venv.join("bin/python");
    let has_torch =
        |py: &Path| Command::new(py).args(["-c", "import torch, numpy"]).output().is_ok_and(|o| o.status.success());
    if python.is_file() && has_torch(&python) {
        return Ok(python);
    }
    eprintln!("installing torch and numpy from PyPI into {} (once)...", venv.display());
    let ok = |cmd: &mut Command, what: &str| -> Result<()> {
        let status = cmd.status().with_context(|| format!("cannot run {what}"))?;
        if !status.success() {
            bail!(
                "{what} failed ({status}); install python3-venv and check that PyPI is reachable, or pass `int8-bench step --peer-python PYTHON` a Python that has torch"
            );
        }
        Ok(())
    };
    ok(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv")?;
    ok(Command::new(&python).args(["-m", "pip", "install", "--quiet", "torch", "numpy"]), "pip install torch numpy")?;
    Ok(python)
}

/// Builds and runs `int8-bench` in release mode, echoing its table and saving it beside the JSON.
fn run_bench(root: &Path, bench: Bench, json: &Path, opts: &BenchOpts) -> Result<()> {
    let BenchOpts { seconds, filter, model, fp32, stochastic_grads, f16_batch_norm_input, peer_python, device, cpu } =
        *opts;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    if let Some(c) = cpu {
        cmd.env("INT8_TRAIN_CPU", c.name());
    }
    cmd.current_dir(root).args(["run", "--release", "--quiet", "--package", "int8-bench"]);
    let gpu = device.filter(|d| *d != "cpu" && bench == Bench::Step);
    if gpu.is_some() {
        cmd.args(["--features", "cuda"]);
    }
    cmd.args(["--", bench.name(), "--json"])
        .arg(json)
        .args(["--seconds", &(if bench == Bench::Kernels { seconds } else { seconds * 10.0 }).to_string()]);
    if let (Some(f), Bench::Kernels) = (filter, bench) {
        cmd.args(["--filter", f]);
    }
    if let (Some(m), Bench::Step) = (model, bench) {
        cmd.args(["--model", m]);
    }
    if bench == Bench::Step {
        for p in fp32 {
            cmd.args(["--fp32", p]);
        }
        if stochastic_grads {
            cmd.arg("--stochastic-grads");
        }
        if f16_batch_norm_input {
            cmd.arg("--f16-batch-norm-input");
        }
        if let Some(py) = peer_python {
            cmd.arg("--peer-python").arg(py);
        }
        if let Some(d) = gpu {
            cmd.args(["--device", d]);
        }
    }
    eprintln!("building and running the {} bench in release mode...", bench.name());
    let mut child = cmd.stdout(Stdio::piped()).spawn().context("cannot start cargo to build int8-bench")?;
    let stdout = child.stdout.take().context("no stdout from int8-bench")?;
    let mut table = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        std::io::stdout().flush()?;
        table.push_str(&line);
        table.push('\n');
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("the {} bench failed ({status}); its output is above", bench.name());
    }
    let md = json.with_extension("md");
    let tmp = md.with_extension("md.tmp");
    std::fs::write(&tmp, &table).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &md).with_context(|| format!("cannot move {} into place", md.display()))?;
    eprintln!("wrote {} and {}", json.display(), md.display());
    Ok(())
}
