//! `cargo xtask sweep`: expands an experiment (`experiments/*.toml`) into runs over recipes x
//! precision x ablation axes x seeds ([`experiment`]), has the trainer type every run's recipe
//! and check its layer rules before anything runs ([`check`]), runs each as its own trainer
//! process, up to `--jobs` at once ([`local`]) or as one Slurm job array ([`slurm`]), skips
//! finished runs and resumes interrupted ones, and writes `results.csv` and `results.md` with the
//! INT8-minus-FP32 accuracy and the INT8/FP32 step-time ratio ([`report`]).

pub mod check;
pub mod experiment;
pub mod local;
pub mod report;
pub mod slurm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

use experiment::{Experiment, PlannedRun, plan, start_order};
use report::{Baseline, finished, write_results};

/// Options of `cargo xtask sweep`.
#[derive(Debug)]
pub struct SweepOptions {
    /// The experiment file.
    pub experiment: PathBuf,
    /// The output folder.
    pub out: PathBuf,
    /// Runs at once.
    pub jobs: usize,
    /// Print the plan only.
    pub dry_run: bool,
    /// Rewrite the results tables from the finished runs only.
    pub tables: bool,
    /// Build the trainer again and replace the sweep's copy.
    pub rebuild: bool,
    /// Build the trainer with its `cuda` feature.
    pub cuda: bool,
    /// Overrides for every run.
    pub sets: Vec<String>,
    /// A data folder searched first.
    pub data_dir: Option<PathBuf>,
    /// Where the runs run.
    pub backend: Backend,
    /// Print each run's state, without running (`--status`).
    pub status: bool,
    /// Cancel the sweep's Slurm job (`--cancel`).
    pub cancel: bool,
}

/// Where a sweep's runs run.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Local processes, up to `--jobs` at once.
    Local,
    /// One Slurm job array.
    Slurm(slurm::SlurmOptions),
}

/// Runs a sweep.
pub fn sweep(root: &Path, opts: &SweepOptions, stop: Arc<AtomicBool>) -> Result<()> {
    let text = std::fs::read_to_string(&opts.experiment)
        .with_context(|| format!("cannot read the experiment {}", opts.experiment.display()))?;
    let exp: Experiment =
        toml::from_str(&text).with_context(|| format!("{}: not a valid experiment", opts.experiment.display()))?;
    let runs = plan(&exp, &opts.sets).with_context(|| format!("{}", opts.experiment.display()))?;
    // The state of a sweep and its cancellation need no build: they read its folder and ask Slurm.
    if opts.status || opts.cancel {
        if !opts.out.is_dir() {
            bail!("{} does not exist: no run of this sweep has started", opts.out.display());
        }
        if opts.cancel {
            return slurm::cancel(&opts.out);
        }
        return slurm::status(&opts.out, &runs.iter().map(|r| r.name.clone()).collect::<Vec<_>>());
    }
    let slurm_opts = match &opts.backend {
        Backend::Slurm(s) if !opts.dry_run && !opts.tables => {
            // A machine without Slurm's client fails now, not after a build.
            slurm::check_client()?;
            Some(s)
        }
        _ => None,
    };
    // The workspace's trainer types every recipe and checks its layer rules before anything runs,
    // so that a typo fails in a second, not an hour in.
    let built = build_trainer(root, opts.cuda)?;
    let resolved = check::check(&built, &runs)?;
    // A run folder made with another recipe (the experiment changed since) is not reused. A saved
    // recipe that differs only in text is resolved again by today's trainer first: a key added
    // since, at its default, does not make a run another one.
    let mut differ = Vec::new();
    for (r, resolved) in runs.iter().zip(&resolved) {
        let saved = opts.out.join(&r.name).join("recipe.toml");
        if let Ok(text) = std::fs::read_to_string(&saved)
            && text != resolved.resolved
        {
            differ.push((r, saved, resolved));
        }
    }
    if !differ.is_empty() {
        let again: Vec<PlannedRun> = differ
            .iter()
            .map(|(r, saved, _)| PlannedRun {
                recipe: std::path::absolute(saved).unwrap_or(saved.clone()).display().to_string(),
                sets: vec![],
                ..(*r).clone()
            })
            .collect();
        let saved_now = check::check(&built, &again)?;
        for ((r, saved, resolved), now) in differ.iter().zip(&saved_now) {
            if now.resolved != resolved.resolved {
                bail!(
                    "{} was made with a different recipe than this experiment now gives run {}; \
                     move or delete that folder, or pass another --out",
                    saved.display(),
                    r.name
                );
            }
        }
    }
    // The baseline is read before anything runs, so that a wrong name fails now, not at the end.
    let baseline = exp.baseline.as_deref().map(|name| Baseline::load(root, name)).transpose()?;
    match &opts.backend {
        Backend::Local => println!("{} runs in {} (jobs: {}):", runs.len(), opts.out.display(), opts.jobs),
        Backend::Slurm(_) => println!("{} runs in {} (Slurm):", runs.len(), opts.out.display()),
    }
    if let Some(b) = &baseline {
        println!("INT8 runs compare with the FP32 runs of {} ({} found in {})", b.name, b.fp32.len(), b.dir.display());
    }
    for (r, resolved) in runs.iter().zip(&resolved) {
        let state = match finished(&opts.out.join(&r.name)) {
            Some(_) => "finished",
            None if opts.out.join(&r.name).join("checkpoints/last.safetensors").exists() => "to resume",
            None => "to run",
        };
        println!(
            "  {:<48} {} {} epochs={} batch={} [{state}]",
            r.name, resolved.model, resolved.dataset, resolved.epochs, resolved.batch
        );
    }
    if opts.dry_run {
        return Ok(());
    }
    if opts.tables {
        if !opts.out.is_dir() {
            bail!("{} does not exist: no run of this sweep has started; run it without --tables", opts.out.display());
        }
        return write_results(&opts.out, &runs, baseline.as_ref(), None);
    }
    // One array at a time writes a sweep's runs: a second would train the same runs twice at once.
    if let Some(s) = slurm_opts
        && let Some(record) = slurm::active_job(&opts.out)?
    {
        if !s.wait {
            bail!(
                "job {} of this sweep is still queued or running: follow it with --status (or --wait), or \
                 cancel it with --cancel before submitting again",
                record.job
            );
        }
        println!("job {} of this sweep is still queued or running: following it", record.job);
        return slurm_wait(opts, &runs, baseline.as_ref(), &record, s, &stop);
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    let plan_json = serde_json::json!({ "experiment": exp, "cli_set": opts.sets, "runs": runs });
    write_atomic(&opts.out.join("plan.json"), serde_json::to_string_pretty(&plan_json)?.as_bytes())?;
    std::fs::copy(&opts.experiment, opts.out.join("experiment.toml")).context("cannot copy the experiment")?;

    // The runs start from a copy of the trainer made when the sweep first ran, so that neither a
    // rebuild while the sweep goes on (other work in the same checkout) nor a change of the code
    // before it is resumed gives one sweep's runs different code; `--rebuild` takes the
    // workspace's current code (after a fix, say).
    let trainer = opts.out.join(format!(".int8-train{}", std::env::consts::EXE_SUFFIX));
    if opts.rebuild || !trainer.is_file() {
        let part = opts.out.join(".int8-train.part");
        std::fs::copy(&built, &part)
            .and_then(|_| std::fs::rename(&part, &trainer))
            .with_context(|| format!("cannot copy the trainer {} into {}", built.display(), opts.out.display()))?;
        println!("trainer: built from the workspace, copied to {}", trainer.display());
    } else {
        println!(
            "trainer: this sweep's copy {} (made {}), so that all its runs run the same code; \
             --rebuild takes the workspace's current code",
            trainer.display(),
            age(&trainer)
        );
    }
    let todo = start_order(&runs, |r| finished(&opts.out.join(&r.name)).is_some());
    let skipped = runs.len() - todo.len();
    if skipped > 0 {
        println!("{skipped} finished runs skipped");
    }
    let launch = Launch { root, trainer: &trainer, out: &opts.out, data_dir: opts.data_dir.as_deref() };
    if let Some(s) = slurm_opts {
        if todo.is_empty() {
            println!("all {} runs finished: nothing to submit", runs.len());
            return write_results(&opts.out, &runs, baseline.as_ref(), None);
        }
        let record = slurm::submit(&launch, &runs, &todo, s)?;
        if !s.wait {
            let cmd = command_line(root, opts);
            println!(
                "follow it with `{cmd} --status` (each run's state), `{cmd} --tables` (the tables of the \
                 runs finished so far) or `{cmd} --wait`; stop it with `{cmd} --cancel`"
            );
            return Ok(());
        }
        return slurm_wait(opts, &runs, baseline.as_ref(), &record, s, &stop);
    }
    let pool = local::Pool { jobs: opts.jobs, threads: local::threads_per_run(opts.jobs) };
    let failed = pool.run(&launch, &runs, &todo, skipped, &stop)?;
    write_results(&opts.out, &runs, baseline.as_ref(), Some((pool.jobs, pool.threads)))?;
    if stop.load(Ordering::Relaxed) {
        bail!("stopped by Ctrl-C; run the same command again to finish the sweep (finished runs are kept)");
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} runs failed (their train.log says why): {}; they resume with this sweep's trainer \
             copy, so after a fix of the code run it again with --rebuild",
            failed.len(),
            runs.len(),
            failed.iter().map(|f| f.0.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// Follows a submitted array to its end (`--wait`), writes the tables, and fails as the local
/// backend does when runs failed or were stopped.
fn slurm_wait(
    opts: &SweepOptions,
    runs: &[experiment::PlannedRun],
    baseline: Option<&Baseline>,
    record: &slurm::Record,
    s: &slurm::SlurmOptions,
    stop: &AtomicBool,
) -> Result<()> {
    let ended = slurm::follow(&opts.out, record, stop)?;
    // What the tables say of how runs ran: at most this many at once, with a thread per CPU.
    let at_once = s.max_parallel.unwrap_or(record.runs.len()).min(record.runs.len());
    write_results(&opts.out, runs, baseline, Some((at_once, s.cpus_per_task.unwrap_or(1))))?;
    if ended.not_visible {
        bail!(
            "{} of {} runs could not see {}: {}",
            ended.failed.len(),
            record.runs.len(),
            opts.out.display(),
            "the output folder is not visible to the compute nodes: put it on a shared filesystem"
        );
    }
    if !ended.failed.is_empty() {
        bail!(
            "{} of {} runs failed (their train.log says why): {}; they resume with this sweep's trainer \
             copy, so after a fix of the code submit again with --rebuild",
            ended.failed.len(),
            record.runs.len(),
            ended.failed.iter().map(|f| f.0.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    if !ended.unfinished.is_empty() {
        bail!(
            "{} of {} runs were stopped before they finished (cancelled, or at the time limit): {}; submit \
             again to resume them from their checkpoints",
            ended.unfinished.len(),
            record.runs.len(),
            ended.unfinished.join(", ")
        );
    }
    Ok(())
}

/// The `cargo xtask sweep` command that names this sweep, for the hints printed after a
/// submission.
fn command_line(root: &Path, opts: &SweepOptions) -> String {
    let stem = opts.experiment.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let mut cmd = if opts.experiment == root.join("experiments").join(format!("{stem}.toml")) {
        format!("cargo xtask sweep {stem}")
    } else {
        format!("cargo xtask sweep {}", opts.experiment.display())
    };
    if opts.out != root.join("runs").join(&stem) {
        cmd += &format!(" --out {}", opts.out.display());
    }
    cmd
}

/// How a sweep's runs are started, whoever starts them (local processes or a cluster's tasks):
/// the trainer copy, the workspace root they work from, the sweep's folder and the data folder.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The workspace root: runs work from it, where recipes' relative data paths point.
    pub root: &'a Path,
    /// The sweep's trainer copy.
    pub trainer: &'a Path,
    /// The sweep's output folder.
    pub out: &'a Path,
    /// A data folder searched first.
    pub data_dir: Option<&'a Path>,
}

impl Launch<'_> {
    /// The trainer's arguments for `run`: its recipe, its folder, resume, JSON progress on
    /// stdout, its overrides and the data folder.
    pub fn args(&self, run: &experiment::PlannedRun) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![run.recipe.clone().into(), "--out".into()];
        args.push(self.out.join(&run.name).into());
        args.extend(["--resume", "--progress", "json"].map(Into::into));
        for s in &run.sets {
            args.extend(["--set".into(), s.into()]);
        }
        if let Some(d) = self.data_dir {
            args.extend(["--data-dir".into(), d.into()]);
        }
        args
    }
}

/// How long ago `file` was last written, or `?`.
fn age(file: &Path) -> String {
    std::fs::metadata(file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .map_or_else(|| "?".into(), |d| format!("{} ago", fmt_secs(d.as_secs_f64())))
}

/// Builds the trainer in release mode (with its `cuda` feature when `cuda`) and returns its path.
pub fn build_trainer(root: &Path, cuda: bool) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building the trainer in release mode{}...", if cuda { " with cuda" } else { "" });
    let mut args = vec!["build", "--release", "--quiet", "--package", "int8-train", "--bin", "int8-train"];
    if cuda {
        args.extend(["--features", "cuda"]);
    }
    let status = Command::new(cargo)
        .current_dir(root)
        .args(&args)
        .status()
        .context("cannot start cargo to build the trainer")?;
    if !status.success() {
        bail!("building the trainer failed ({status}); the compiler's message is above");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("release").join(format!("int8-train{}", std::env::consts::EXE_SUFFIX)))
}

/// The last `n` non-empty lines of a file, joined.
pub fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// `1h02m`, `3m05s` or `12s`.
pub fn fmt_secs(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.round() as u64;
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

/// Writes `bytes` to `path` through a temporary file beside it, synced and renamed into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).with_context(|| format!("cannot move {} into place", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_committed_experiment_plans_with_valid_recipes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("experiments"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        files.sort();
        assert!(files.len() >= 10, "{files:?}");
        let out = tempfile::tempdir().unwrap();
        for experiment in files {
            let dest = out.path().join(experiment.file_stem().unwrap());
            dry_run(&root, &experiment, &dest).unwrap_or_else(|e| panic!("{}: {e:#}", experiment.display()));
        }
    }

    /// `cargo xtask sweep EXPERIMENT --dry-run --out OUT`, run from `root`.
    fn dry_run(root: &Path, experiment: &Path, out: &Path) -> Result<()> {
        let opts = SweepOptions {
            experiment: experiment.to_path_buf(),
            out: out.to_path_buf(),
            jobs: 1,
            dry_run: true,
            tables: false,
            rebuild: false,
            cuda: false,
            sets: vec![],
            data_dir: None,
            backend: Backend::Local,
            status: false,
            cancel: false,
        };
        sweep(root, &opts, Arc::new(AtomicBool::new(false)))
    }

    #[test]
    fn a_layer_rule_that_names_no_layer_fails_the_sweep_before_any_run() {
        let dir = tempfile::tempdir().unwrap();
        let experiment = dir.path().join("typo.toml");
        std::fs::write(
            &experiment,
            r#"
            recipes = ["resnet20-cifar10", "mobilenetv2-cifar10"]
            precisions = ["int8"]
            set = ['quant.rules=[{ pattern = "*.dw.conv", int8 = false }]']
            "#,
        )
        .unwrap();
        let out = dir.path().join("out");
        let err = format!(
            "{:#}",
            dry_run(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap(), &experiment, &out).unwrap_err()
        );
        assert!(err.contains("resnet20-cifar10-int8-s0") && err.contains("`*.dw.conv`"), "{err}");
        assert!(!out.exists(), "nothing was written");
    }
}
