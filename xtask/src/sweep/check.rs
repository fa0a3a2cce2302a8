//! Typing a sweep's recipes before anything runs, through the trainer binary (`int8-train plan`),
//! so that xtask need not link the trainer: each run's recipe and overrides go in as JSON, and
//! the resolved recipe (or why it cannot run) comes back.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::experiment::PlannedRun;

/// A run's recipe as the trainer resolved it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Resolved {
    /// The resolved recipe as TOML (as saved beside the run).
    pub resolved: String,
    /// The model.
    pub model: String,
    /// The dataset.
    pub dataset: String,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
}

/// The trainer's answer for one run.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Ok(Resolved),
    Error(String),
}

/// Has `trainer` resolve and check every run's recipe; the first run that cannot run is an
/// error naming it.
pub fn check(trainer: &Path, runs: &[PlannedRun]) -> Result<Vec<Resolved>> {
    let requests: Vec<serde_json::Value> =
        runs.iter().map(|r| serde_json::json!({ "recipe": r.recipe, "sets": r.sets })).collect();
    let mut child = Command::new(trainer)
        .arg("plan")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", trainer.display()))?;
    child
        .stdin
        .take()
        .context("no stdin to the trainer")?
        .write_all(serde_json::to_string(&requests)?.as_bytes())
        .context("cannot hand the plan to the trainer")?;
    let out = child.wait_with_output().context("the trainer did not answer the plan")?;
    if !out.status.success() {
        bail!("{} plan failed ({}); its message is above", trainer.display(), out.status);
    }
    let answers: Vec<Answer> =
        serde_json::from_slice(&out.stdout).context("the trainer's answer to the plan is not the JSON it should be")?;
    if answers.len() != runs.len() {
        bail!("the trainer answered {} of {} runs", answers.len(), runs.len());
    }
    runs.iter()
        .zip(answers)
        .map(|(r, a)| match a {
            Answer::Ok(resolved) => Ok(resolved),
            Answer::Error(why) => bail!("run {}: {why}", r.name),
        })
        .collect()
}
