//! `int8-datasets`: reading the standard formats people already have on disk, never trusting a
//! file. Built so far: IDX (MNIST, Fashion-MNIST; raw or gzipped), CIFAR-10/100 binary batches,
//! the registry of known datasets with discovery and import, the batching loader with CIFAR-style
//! augmentation, and image folders
//! (`root/<split>/<class>/*.{jpg,jpeg,png}`, the ImageNet layout,
//! which the CIFAR-10 JPEG set uses) and `.tar.gz` import. To come (see the datasets issue): detection
//! formats, ImageNet-style augmentation, and `fetch` over the network.

pub mod archive;
pub mod cifar;
pub mod idx;
pub mod image_folder;
pub mod loader;
pub mod registry;

use std::path::PathBuf;

use thiserror::Error;

/// Errors of the datasets crate. Each names the file and says what is wrong.
#[derive(Debug, Error)]
pub enum DatasetError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file's contents are not what its format requires.
    #[error("{path}: {why}")]
    Invalid {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DatasetError {
    let path = path.into();
    move |source| DatasetError::Io { path, source }
}
