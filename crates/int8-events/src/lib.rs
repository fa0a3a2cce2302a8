//! `int8-events`: TensorBoard event files, the one implementation of their format in the
//! workspace. The trainer writes its scalars, histograms, text and session starts with
//! [`EventWriter`]; `int8-train scalars` and `cargo xtask plot` read a run's scalar curves back
//! with [`read_run`], as TensorBoard's `EventAccumulator` shows them. A file is a sequence of
//! TFRecords (see [`record`]) each holding an `Event` protocol buffer (see `proto`), the format
//! of TensorFlow's `record_writer.cc` and `event.proto`.
//!
//! Written here rather than taken from `tensorboard-rs`, which is unmaintained, pulls a protobuf
//! crate with a security advisory and leaves histograms and text unimplemented. The crate is kept
//! light (prost, crc32c, thiserror) because xtask links it and must build in seconds.

mod proto;
mod read;
pub mod record;
mod write;

use std::path::PathBuf;

use thiserror::Error;

pub use read::{Scalars, event_files, read_run};
pub use write::EventWriter;

/// Errors of reading and writing event files. Messages are lowercase, name the file or folder at
/// fault and say what to do.
#[derive(Debug, Error)]
pub enum EventError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}; check that it exists and is readable")]
    Read {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file or folder could not be created or written.
    #[error("cannot write {path}: {source}; check that its folder is writable and the disk has room")]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A folder given as a run's holds no event file.
    #[error("{path} holds no TensorBoard event file (events.out.tfevents.*); give a run's folder")]
    NoEventFiles {
        /// The folder.
        path: PathBuf,
    },
    /// A record of an event file is damaged, or the file is not an event file.
    #[error("{path}: the record at byte {offset} {why}; move the file out of the run folder")]
    BadRecord {
        /// The event file.
        path: PathBuf,
        /// Where the record starts in the file.
        offset: usize,
        /// What is wrong with it.
        why: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = EventError> = std::result::Result<T, E>;
