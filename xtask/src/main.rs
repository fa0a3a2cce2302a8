//! `cargo xtask`: the project's command line (see `../shared/ARCHITECTURE.md`).
//!
//! It knows nothing of kernels or math: benches run in the `int8-bench` binary, which this builds
//! in release mode and spawns, collecting its Markdown table and JSON under `runs/bench/`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

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
    },
    /// Run an experiment grid (not built yet).
    Sweep {
        /// Arguments for the sweep.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Train one recipe (not built yet).
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
    /// List models and recipes (not built yet).
    Zoo,
}

#[derive(Subcommand, Debug)]
enum DataCmd {
    /// Each known dataset and where it was found, or how to get it.
    List,
    /// Import a dataset from a local .tar.gz archive into datasets/cache/.
    Import {
        /// The dataset's name (see `data list`).
        name: String,
        /// The archive.
        path: PathBuf,
    },
    /// Download a dataset from its canonical source.
    Fetch {
        /// The dataset's name.
        name: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Bench {
    /// GEMM and every conv layer of ResNet-20 and MobileNetV2, forward + dX + dW.
    Kernels,
    /// One ResNet-20 training step at batch 128.
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
        Cmd::Bench { which, json, seconds, filter } => {
            let benches = match which {
                Some(b) => vec![b],
                None => vec![Bench::Kernels, Bench::Step, Bench::Data],
            };
            if json.is_some() && benches.len() > 1 {
                bail!("--json names one file; pick one bench (for example `cargo xtask bench kernels --json FILE`)");
            }
            let all = which.is_none();
            for bench in benches {
                let json =
                    json.clone().unwrap_or_else(|| root.join("runs/bench").join(format!("{}.json", bench.name())));
                match run_bench(&root, bench, &json, seconds, filter.as_deref()) {
                    // The data bench needs CIFAR-10 imported; a full run goes on without it.
                    Err(e) if all && bench == Bench::Data => eprintln!("skipped the data bench: {e:#}"),
                    other => other?,
                }
            }
            Ok(())
        }
        Cmd::Data { what, data_dir } => data(&root, what, data_dir.as_deref()),
        Cmd::Sweep { .. } | Cmd::Train { .. } | Cmd::Zoo => bail!(
            "this command is not built yet: the trainer, datasets, zoo and sweep are open issues; \
             what runs today is `cargo xtask bench`, `cargo xtask data` and `cargo test --workspace`"
        ),
    }
}

/// `cargo xtask data ...`.
fn data(root: &Path, what: DataCmd, data_dir: Option<&Path>) -> Result<()> {
    use int8_datasets::registry::{DATASETS, import, known, locate, search_dirs};
    let cache = root.join("datasets/cache");
    let dirs = search_dirs(data_dir, &cache);
    match what {
        DataCmd::List => {
            println!("| dataset | status | what it is |");
            println!("| --- | --- | --- |");
            for ds in DATASETS {
                let status = match locate(ds, &dirs) {
                    Some(p) => format!("found: {}", p.display()),
                    None => format!("missing: {}", ds.sources.first().copied().unwrap_or("no known source")),
                };
                println!("| {} | {status} | {} |", ds.name, ds.description);
            }
            println!(
                "\nsearched, in order: {}",
                dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
            );
            Ok(())
        }
        DataCmd::Import { name, path } => {
            let ds = known(&name)?;
            if !path.is_file() {
                bail!("{}: not a file; pass the dataset's .tar.gz archive", path.display());
            }
            eprintln!("importing {name} from {} (checking its checksum, then extracting)...", path.display());
            let dest = import(ds, &path, &cache)?;
            println!("{name}: {}", dest.display());
            Ok(())
        }
        DataCmd::Fetch { name } => {
            let ds = known(&name)?;
            bail!(
                "this build has no network client, so it cannot download {name}; get it from {} and run `cargo xtask data import {name} FILE`",
                ds.sources.join(" or ")
            )
        }
    }
}

/// The workspace root: the parent of this crate's manifest directory.
fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).context("xtask must live one level below the workspace root")
}

/// Builds and runs `int8-bench` in release mode, echoing its table and saving it beside the JSON.
fn run_bench(root: &Path, bench: Bench, json: &Path, seconds: f64, filter: Option<&str>) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["run", "--release", "--quiet", "--package", "int8-bench", "--", bench.name(), "--json"])
        .arg(json)
        .args(["--seconds", &(if bench == Bench::Kernels { seconds } else { seconds * 10.0 }).to_string()]);
    if let (Some(f), Bench::Kernels) = (filter, bench) {
        cmd.args(["--filter", f]);
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
