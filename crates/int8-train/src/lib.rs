//! `int8-train`: one run of one recipe. It loads the recipe's data, builds the model from the
//! zoo with the recipe's layer policy (FP32, or INT8 with the DSGC and DCLR of Zhu et al., CVPR
//! 2020), trains and evaluates it, logs TensorBoard events, writes safetensors checkpoints
//! atomically, and resumes a killed run where its last checkpoint left it. Sweeps over many runs
//! are `xtask`'s; this crate knows nothing of them.

pub mod checkpoint;
pub mod commands;
pub mod map;
pub mod progress;
pub mod recipe;
pub mod run;
pub mod scalars;
pub mod step;
pub mod task;
pub mod tensorboard;

use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors of the trainer. Messages are lowercase and say what to do.
#[derive(Debug, Error)]
pub enum TrainError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A recipe is malformed or inconsistent.
    #[error("{path}: {why}")]
    Recipe {
        /// The recipe file (or the key at fault).
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// A checkpoint cannot be used.
    #[error("{path}: {why}")]
    Checkpoint {
        /// The checkpoint.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// A run's TensorBoard curves cannot be shown as asked (a `--tag` that matches no tag).
    #[error("{path}: {why}")]
    Events {
        /// The run folder.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// The run diverged; the last good checkpoint is kept.
    #[error(
        "the run diverged at epoch {epoch}, step {step}: {why}; {kept}; lower optim.lr or check the data, then rerun"
    )]
    Diverged {
        /// The epoch (from 1).
        epoch: usize,
        /// The global step.
        step: u64,
        /// What was not finite.
        why: String,
        /// Which checkpoint is kept.
        kept: String,
    },
    /// The run was stopped by Ctrl-C after saving a checkpoint.
    #[error("stopped by the user at step {step}; the checkpoint {checkpoint} resumes it (--resume)")]
    Interrupted {
        /// The global step reached.
        step: u64,
        /// The checkpoint written.
        checkpoint: PathBuf,
    },
    /// A TensorBoard event file could not be written, or a run's could not be read.
    #[error(transparent)]
    EventFile(#[from] int8_events::EventError),
    /// Reading data failed.
    #[error(transparent)]
    Data(#[from] int8_datasets::DatasetError),
    /// A layer failed.
    #[error(transparent)]
    Nn(#[from] int8_nn::NnError),
    /// Building the model failed.
    #[error(transparent)]
    Zoo(#[from] int8_zoo::ZooError),
    /// Detections or ground truth could not be evaluated (a box that is not one, a score that is
    /// not a number, nothing to evaluate).
    #[error("detection evaluation: {0}")]
    Evaluation(String),
}

impl TrainError {
    /// Wraps an I/O error with its path.
    pub(crate) fn io(path: impl AsRef<Path>) -> impl FnOnce(std::io::Error) -> TrainError {
        let path = path.as_ref().to_path_buf();
        move |source| TrainError::Io { path, source }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

/// Writes `bytes` to `path` atomically: to a temporary file beside it, synced, then renamed, so
/// a crash leaves either the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    }
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(TrainError::io(&tmp))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(TrainError::io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(TrainError::io(path))
}
