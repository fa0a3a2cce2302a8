//! Known datasets: where to look for them, how to recognise them on disk, and how to import an
//! archive a user already has. The lookup order is `--data-dir`, `$INT8_DATA_DIR`,
//! `datasets/cache/` in the workspace, then the system folder `/usr/share/datasets/` (where
//! Debian's `dataset-fashion-mnist` package puts Fashion-MNIST).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::archive::extract_tar_gz;
use crate::{DatasetError, Result, io_err};

/// A dataset the project knows by name.
#[derive(Debug, Clone, Copy)]
pub struct KnownDataset {
    /// Registry name.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The folder name under a data directory.
    pub folder: &'static str,
    /// Files (relative to the folder) whose presence marks the dataset as found.
    pub marker_files: &'static [&'static str],
    /// The archive's sha256, where the project knows it.
    pub archive_sha256: Option<&'static str>,
    /// Where it comes from, for `fetch` and for people.
    pub sources: &'static [&'static str],
}

/// The registry.
pub const DATASETS: &[KnownDataset] = &[
    KnownDataset {
        name: "fashion-mnist",
        description: "Fashion-MNIST (Xiao et al. 2017): 60,000/10,000 28x28 grey images, 10 classes, gzipped IDX",
        folder: "fashion-mnist",
        marker_files: &[
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ],
        archive_sha256: None,
        sources: &["apt-get install -y dataset-fashion-mnist", "https://github.com/zalandoresearch/fashion-mnist"],
    },
    KnownDataset {
        name: "cifar10-jpeg",
        description: "CIFAR-10 (JPEG q75 re-encoding): 50,000/10,000 32x32 images in train/ and test/ class folders",
        folder: "cifar10-jpeg",
        marker_files: &["train/airplane/0000.jpg", "test/truck/0999.jpg"],
        archive_sha256: Some("efac85c8ed52f4ead1e1f1b670d8dcf435d551fccebdd8b6365e0a01a504f3a4"),
        sources: &["cargo xtask data import cifar10-jpeg <path to cifar10-jpeg.tar.gz>"],
    },
    KnownDataset {
        name: "cifar10",
        description: "CIFAR-10 (Krizhevsky 2009), official binary batches",
        folder: "cifar-10-batches-bin",
        marker_files: &["data_batch_1.bin", "test_batch.bin"],
        archive_sha256: None,
        sources: &["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"],
    },
];

/// Looks a dataset up by name.
pub fn known(name: &str) -> Result<&'static KnownDataset> {
    DATASETS.iter().find(|d| d.name == name).ok_or_else(|| DatasetError::Invalid {
        path: PathBuf::from(name),
        why: format!(
            "is not a known dataset; known ones: {}",
            DATASETS.iter().map(|d| d.name).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// The workspace's own cache of imported datasets, `datasets/cache/`.
pub fn workspace_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("cache")
}

/// The folders searched, in order: `cli`, `$INT8_DATA_DIR`, `cache`, `/usr/share/datasets`.
pub fn search_dirs(cli: Option<&Path>, cache: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = cli.map(Path::to_path_buf).into_iter().collect();
    if let Some(env) = std::env::var_os("INT8_DATA_DIR") {
        dirs.push(PathBuf::from(env));
    }
    dirs.push(cache.to_path_buf());
    dirs.push(PathBuf::from("/usr/share/datasets"));
    dirs
}

/// The first folder in `dirs` holding every marker file of `ds`.
pub fn locate(ds: &KnownDataset, dirs: &[PathBuf]) -> Option<PathBuf> {
    dirs.iter().map(|d| d.join(ds.folder)).find(|root| ds.marker_files.iter().all(|f| root.join(f).is_file()))
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Imports `ds` from a local `.tar.gz` into `cache`: checks the archive's sha256 where known,
/// extracts into a temporary folder and renames it into place, so a failed import leaves nothing
/// half-written. Returns the dataset's folder.
pub fn import(ds: &KnownDataset, archive: &Path, cache: &Path) -> Result<PathBuf> {
    if let Some(want) = ds.archive_sha256 {
        let got = sha256_file(archive)?;
        if got != want {
            return Err(DatasetError::Invalid {
                path: archive.into(),
                why: format!("has sha256 {got}, but {} is {want}; is it the right file?", ds.name),
            });
        }
    }
    let dest = cache.join(ds.folder);
    if locate(ds, &[cache.to_path_buf()]).is_some() {
        return Ok(dest);
    }
    let tmp = cache.join(format!(".{}.importing", ds.folder));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    extract_tar_gz(archive, &tmp, |_| true)?;
    // The archive holds one top folder; it becomes the dataset's folder.
    let top = tmp.join(ds.folder);
    let src = if top.is_dir() { top } else { tmp.clone() };
    if !ds.marker_files.iter().all(|f| src.join(f).is_file()) {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        return Err(DatasetError::Invalid {
            path: archive.into(),
            why: format!("does not hold {}'s files ({:?})", ds.name, ds.marker_files),
        });
    }
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
    }
    std::fs::rename(&src, &dest).map_err(io_err(&dest))?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_follows_the_search_order_and_needs_every_marker() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ds = known("fashion-mnist").unwrap();
        let put = |root: &Path, files: &[&str]| {
            for f in files {
                let p = root.join("fashion-mnist").join(f);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, b"x").unwrap();
            }
        };
        put(a.path(), &ds.marker_files[..2]);
        put(b.path(), ds.marker_files);
        let dirs = vec![a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(locate(ds, &dirs), Some(b.path().join("fashion-mnist")));
        put(a.path(), ds.marker_files);
        assert_eq!(locate(ds, &dirs), Some(a.path().join("fashion-mnist")));
        assert!(known("imagenet-22k").unwrap_err().to_string().contains("known ones"));
    }

    #[test]
    fn import_checks_the_checksum_and_extracts_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let wrong = dir.path().join("wrong.tar.gz");
        std::fs::write(&wrong, b"not the archive").unwrap();
        let err = import(known("cifar10-jpeg").unwrap(), &wrong, &cache).unwrap_err().to_string();
        assert!(err.contains("wrong.tar.gz") && err.contains("sha256"), "{err}");
        assert!(!cache.join("cifar10-jpeg").exists());
        // A dataset without a known checksum, from an archive made here.
        let ds = KnownDataset { archive_sha256: None, ..*known("fashion-mnist").unwrap() };
        let archive = dir.path().join("fm.tar.gz");
        let gz = flate2::write::GzEncoder::new(std::fs::File::create(&archive).unwrap(), flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        for f in ds.marker_files {
            let mut h = tar::Header::new_gnu();
            h.set_size(1);
            h.set_mode(0o644);
            h.set_cksum();
            t.append_data(&mut h, format!("fashion-mnist/{f}"), &b"x"[..]).unwrap();
        }
        t.into_inner().unwrap().finish().unwrap();
        let root = import(&ds, &archive, &cache).unwrap();
        assert_eq!(root, cache.join("fashion-mnist"));
        assert_eq!(locate(&ds, std::slice::from_ref(&cache)), Some(root));
        assert!(!cache.join(".fashion-mnist.importing").exists());
    }
}
