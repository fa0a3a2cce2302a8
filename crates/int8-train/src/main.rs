//! `int8-train`: trains one recipe. `cargo xtask train` and `cargo xtask sweep` build and spawn
//! this binary; it can also be run directly.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use int8_train::progress::ProgressMode;
use int8_train::recipe::Recipe;
use int8_train::run::{RunOptions, run};

#[derive(Parser, Debug)]
#[command(name = "int8-train", about = "Train one recipe at FP32 or INT8 (Zhu et al., CVPR 2020)")]
struct Cli {
    /// A recipe file, or a recipe name from zoo/recipes (`cargo xtask zoo` lists them).
    recipe: String,
    /// Override the recipe's precision (quant.precision).
    #[arg(long)]
    precision: Option<Prec>,
    /// The run folder; runs/train/<recipe>-<precision> when omitted.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a recipe value, e.g. --set optim.lr=0.05 --set train.epochs=2 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run in --out from its last checkpoint (a finished run is left as it is).
    #[arg(long)]
    resume: bool,
    /// Look for datasets here first.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// How to show progress.
    #[arg(long, value_enum, default_value_t = Show::Auto)]
    progress: Show,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Prec {
    Fp32,
    Int8,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Show {
    /// A bar on a terminal, lines otherwise.
    Auto,
    Bar,
    Plain,
    /// JSON lines on stdout (for sweeps).
    Json,
    Quiet,
}

fn main() {
    // Training allocates and frees tens of megabytes a step: keep them (see int8_nn::alloc).
    int8_nn::alloc::keep_freed_memory();
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(match e.downcast_ref::<int8_train::TrainError>() {
            Some(int8_train::TrainError::Interrupted { .. }) => 130,
            Some(int8_train::TrainError::Diverged { .. }) => 3,
            _ => 1,
        });
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let Some(path) = int8_zoo::find_recipe(&cli.recipe) else {
        let names: Vec<String> = int8_zoo::recipes().into_iter().map(|r| r.0).collect();
        bail!("no recipe file or zoo recipe `{}`; the zoo has: {}", cli.recipe, names.join(", "));
    };
    let mut sets = cli.sets.clone();
    if let Some(p) = cli.precision {
        sets.push(format!("quant.precision={}", if matches!(p, Prec::Fp32) { "fp32" } else { "int8" }));
    }
    let recipe = Recipe::load(&path, &sets)?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("run").to_string();
    let out = cli.out.unwrap_or_else(|| PathBuf::from("runs/train").join(format!("{stem}-{}", recipe.quant.precision)));
    let mut opts = RunOptions::new(out);
    opts.resume = cli.resume;
    opts.data_dir = cli.data_dir;
    opts.progress = match cli.progress {
        Show::Auto => ProgressMode::auto(),
        Show::Bar => ProgressMode::Bar,
        Show::Plain => ProgressMode::Plain,
        Show::Json => ProgressMode::Json,
        Show::Quiet => ProgressMode::Quiet,
    };
    // For tests of interrupted sweeps: exit as if killed after this step, with no checkpoint.
    opts.kill_at_step = std::env::var("INT8_TRAIN_KILL_AT_STEP").ok().and_then(|v| v.parse().ok());
    let stop = opts.stop.clone();
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::Relaxed) {
            eprintln!("\nsecond Ctrl-C: stopping now without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: stopping after this step with a checkpoint (press again to stop at once)");
    })
    .context("cannot install the Ctrl-C handler")?;
    let s = run(&recipe, &opts).with_context(|| format!("run {}", opts.out.display()))?;
    eprintln!(
        "done: {} {} top-1 {:.2}% (best {:.2}%), {:.1} ms/step, {:.0} s of training -> {}",
        s.model,
        s.precision,
        s.top1,
        s.best_top1,
        s.step_ms,
        s.train_seconds,
        opts.out.display()
    );
    Ok(())
}
