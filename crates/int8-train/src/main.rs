//! `int8-train`: trains one recipe (`int8-train RECIPE ...`), and the tool commands `cargo xtask`
//! runs rather than linking the whole stack (`zoo`, `data`, `scalars`, and `plan` for sweeps).
//! `cargo xtask train` and `cargo xtask sweep` build and spawn this binary; it can also be run
//! directly.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use int8_train::commands;
use int8_train::progress::ProgressMode;
use int8_train::recipe::Recipe;
use int8_train::run::{RunOptions, run};

#[derive(Parser, Debug)]
#[command(
    name = "int8-train",
    about = "Train one recipe at FP32 or INT8 (Zhu et al., CVPR 2020); or a tool command",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    tool: Option<Tool>,
    /// A recipe file, or a built-in recipe's name (`int8-train zoo` lists them).
    #[arg(required = true)]
    recipe: Option<String>,
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

#[derive(Subcommand, Debug)]
enum Tool {
    /// The models with their parameter counts, and the built-in recipes.
    Zoo,
    /// List, import or fetch datasets.
    Data {
        #[command(subcommand)]
        what: DataCmd,
        /// Look here first (then $INT8_DATA_DIR, datasets/cache/, /usr/share/datasets/).
        #[arg(long, global = true)]
        data_dir: Option<PathBuf>,
    },
    /// A run's TensorBoard curves as a Markdown table (without --tag: the list of tags).
    Scalars {
        /// A run's folder (holding events.out.tfevents.* files).
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
    /// For sweeps: read a JSON list of `{recipe, sets}` on stdin, type each recipe and check its
    /// layer rules, and print the answers as a JSON list.
    #[command(hide = true)]
    Plan,
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

/// Runs a tool command.
fn tool(t: Tool) -> Result<()> {
    match t {
        Tool::Zoo => print!("{}", commands::zoo()?),
        Tool::Data { what, data_dir } => match what {
            DataCmd::List => print!("{}", commands::data_list(data_dir.as_deref())),
            DataCmd::Import { name, path } => println!("{name}: {}", commands::data_import(&name, &path)?.display()),
            DataCmd::Fetch { name } => {
                println!("{name}: {}", commands::data_fetch(&name, data_dir.as_deref())?.display())
            }
        },
        Tool::Scalars { run, tags, from, to } => {
            print!("{}", int8_train::scalars::render(&run, &int8_train::scalars::Select { tags, from, to })?)
        }
        Tool::Plan => {
            let mut input = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)
                .context("cannot read the plan on stdin")?;
            let requests: Vec<commands::PlanRequest> =
                serde_json::from_str(&input).context("the plan on stdin is not a JSON list of {recipe, sets}")?;
            println!("{}", serde_json::to_string(&commands::plan(&requests))?);
        }
    }
    Ok(())
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    int8_core::cpu::check_env()?;
    if let Some(t) = cli.tool {
        return tool(t);
    }
    let name = cli.recipe.context("name a recipe: a file, or a built-in one (`int8-train zoo` lists them)")?;
    let mut sets = cli.sets.clone();
    if let Some(p) = cli.precision {
        sets.push(format!("quant.precision={}", if matches!(p, Prec::Fp32) { "fp32" } else { "int8" }));
    }
    let recipe = Recipe::find(&name, &sets)?;
    let stem = int8_train::recipe::recipe_name(&name);
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
    // Ctrl-C (SIGINT) and, through ctrlc's `termination` feature, SIGTERM and SIGHUP (what
    // `scancel`, a Slurm time limit or a closed terminal send) stop the run after its step with a
    // checkpoint; the exit code is then 130 either way (Slurm records such a task as CANCELLED
    // after scancel, or FAILED with exit code 130 when its time limit's early SIGTERM stopped it).
    let stop = opts.stop.clone();
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::Relaxed) {
            eprintln!("\nsecond Ctrl-C or SIGTERM: stopping now without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C or SIGTERM: stopping after this step with a checkpoint (again to stop at once)");
    })
    .context("cannot install the signal handler")?;
    let s = run(&recipe, &opts).with_context(|| format!("run {}", opts.out.display()))?;
    eprintln!("done: {} -> {}", s.describe(), opts.out.display());
    Ok(())
}
