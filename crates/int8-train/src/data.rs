//! A recipe's data, from wherever the registry finds it, optionally cut to a seeded random subset,
//! with the dataset's normalisation: small datasets (Fashion-MNIST, CIFAR-10) decoded into memory
//! with CIFAR-style augmentation; image folders (`image-folder`, the ImageNet layout) streamed
//! from disk with a random-resized crop and flip for training and resize plus centre crop for
//! testing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use int8_datasets::cifar::{CifarKind, read_cifar};
use int8_datasets::idx::read_idx_pair;
use int8_datasets::image_folder::ImageFolder;
use int8_datasets::loader::{
    Augment, Augmented, CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, InMemory, Source, Streamed, epoch_order,
};
use int8_datasets::registry::{known, locate, search_dirs, workspace_cache};
use int8_datasets::transform::ResizedCrop;

use crate::recipe::Recipe;
use crate::{Result, TrainError};

/// The data of one run.
#[derive(Debug, Clone)]
pub struct RunData {
    /// Training samples, augmented.
    pub train: Arc<dyn Source>,
    /// Test samples, with the evaluation transform.
    pub test: Arc<dyn Source>,
    /// Classes.
    pub classes: usize,
    /// Where the data was read from.
    pub root: PathBuf,
}

/// A seeded random subset of `limit` images (all when `limit` is 0 or too large).
fn limit(ds: InMemory, limit: usize, seed: u64) -> InMemory {
    if limit == 0 || limit >= ds.len() {
        return ds;
    }
    let order = epoch_order(ds.len(), seed, u64::MAX);
    ds.subset(&order[..limit])
}

/// Finds dataset `name` (or the recipe's `data.root`) and returns its folder.
fn find(name: &str, recipe_root: Option<&Path>, data_dir: Option<&Path>) -> Result<PathBuf> {
    let ds = known(name).map_err(TrainError::Data)?;
    let mut dirs = Vec::new();
    if let Some(r) = recipe_root {
        dirs.push(r.to_path_buf());
        if let Some(parent) = r.parent() {
            dirs.push(parent.to_path_buf());
        }
    }
    dirs.extend(search_dirs(data_dir, &workspace_cache()));
    locate(ds, &dirs).ok_or_else(|| TrainError::Recipe {
        path: PathBuf::from(name),
        why: format!(
            "dataset not found in {}; get it with: {}",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
            ds.sources.join(" or ")
        ),
    })
}

/// Loads the data a recipe names. `data_dir` is searched first (as `--data-dir`).
pub fn load(recipe: &Recipe, data_dir: Option<&Path>) -> Result<RunData> {
    let d = &recipe.data;
    let (root, train, test, classes, mean, std) = match recipe.dataset.as_str() {
        "fashion-mnist" => {
            let root = find("fashion-mnist", d.root.as_deref(), data_dir)?;
            let read = |img: &str, lab: &str| -> Result<InMemory> {
                Ok(InMemory::from_idx(read_idx_pair(&root.join(img), &root.join(lab), 10).map_err(TrainError::Data)?))
            };
            let train = read("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")?;
            let test = read("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")?;
            (root, train, test, 10, vec![0.2860], vec![0.3530])
        }
        "cifar10" => {
            let root = find("cifar10", d.root.as_deref(), data_dir)?;
            let mut train = int8_datasets::cifar::CifarBatch::default();
            for i in 1..=5 {
                let b = read_cifar(&root.join(format!("data_batch_{i}.bin")), CifarKind::Cifar10)
                    .map_err(TrainError::Data)?;
                train.images.extend(b.images);
                train.labels.extend(b.labels);
            }
            let test = read_cifar(&root.join("test_batch.bin"), CifarKind::Cifar10).map_err(TrainError::Data)?;
            (
                root,
                InMemory::from_cifar(train),
                InMemory::from_cifar(test),
                10,
                CIFAR10_MEAN.to_vec(),
                CIFAR10_STD.to_vec(),
            )
        }
        "cifar10-jpeg" | "image-folder" => {
            let root = if recipe.dataset == "cifar10-jpeg" {
                find("cifar10-jpeg", d.root.as_deref(), data_dir)?
            } else {
                d.root.clone().ok_or_else(|| TrainError::Recipe {
                    path: "data.root".into(),
                    why: "dataset = \"image-folder\" needs data.root, a folder with train/ and val/ (or test/)".into(),
                })?
            };
            let train_folder = ImageFolder::open(&root.join("train")).map_err(TrainError::Data)?;
            let test_dir = if root.join("val").is_dir() { root.join("val") } else { root.join("test") };
            let test_folder = ImageFolder::open(&test_dir).map_err(TrainError::Data)?;
            if test_folder.classes != train_folder.classes {
                return Err(TrainError::Recipe {
                    path: test_dir,
                    why: "its class folders differ from train/'s; both splits need the same classes".into(),
                });
            }
            // Only the images the subset keeps are decoded: the folders are listed, then cut.
            let cut = |f: ImageFolder, n: usize, seed: u64| -> ImageFolder {
                if n == 0 || n >= f.items.len() {
                    return f;
                }
                let order = epoch_order(f.items.len(), seed, u64::MAX);
                let mut keep: Vec<usize> = order[..n].to_vec();
                keep.sort_unstable();
                ImageFolder { items: keep.iter().map(|&i| f.items[i].clone()).collect(), ..f }
            };
            let classes = train_folder.classes.len();
            let train_folder = cut(train_folder, d.train_limit, recipe.train.seed);
            let test_folder = cut(test_folder, d.test_limit, recipe.train.seed ^ 1);
            if recipe.dataset == "image-folder" {
                if d.pad != 0 {
                    return Err(TrainError::Recipe {
                        path: "data.pad".into(),
                        why: "pads in-memory datasets only; image-folder uses random-resized crops, so set it to 0"
                            .into(),
                    });
                }
                // ImageNet-sized folders stream from disk: a random-resized crop and flip to
                // data.size for training, resize and centre crop for testing.
                let three = |v: Option<&Vec<f32>>, default: [f32; 3], key: &str| -> Result<[f32; 3]> {
                    match v {
                        None => Ok(default),
                        Some(v) => <[f32; 3]>::try_from(v.as_slice()).map_err(|_| TrainError::Recipe {
                            path: key.into(),
                            why: format!("has {} entries for 3 channels", v.len()),
                        }),
                    }
                };
                let (mean, std) = (
                    three(d.mean.as_ref(), IMAGENET_MEAN, "data.mean")?,
                    three(d.std.as_ref(), IMAGENET_STD, "data.std")?,
                );
                let test = Streamed { folder: test_folder, side: d.size, crop: None, flip: false, mean, std };
                let train = Streamed {
                    folder: train_folder,
                    side: d.size,
                    crop: Some(ResizedCrop::default()),
                    flip: d.flip,
                    mean,
                    std,
                };
                return Ok(RunData { train: Arc::new(train), test: Arc::new(test), classes, root });
            }
            // CIFAR-10 JPEG: decoded once, each image checked to be 32x32.
            let size = (d.size, d.size);
            let train = InMemory::from_image_folder(&train_folder, size).map_err(TrainError::Data)?;
            let test = InMemory::from_image_folder(&test_folder, size).map_err(TrainError::Data)?;
            (root, train, test, classes, CIFAR10_MEAN.to_vec(), CIFAR10_STD.to_vec())
        }
        other => {
            return Err(TrainError::Recipe {
                path: PathBuf::from(other),
                why: "is not a dataset the trainer reads; use fashion-mnist, cifar10, cifar10-jpeg or image-folder"
                    .into(),
            });
        }
    };
    let train = limit(train, d.train_limit, recipe.train.seed);
    let test = limit(test, d.test_limit, recipe.train.seed ^ 1);
    let mean = d.mean.clone().unwrap_or(mean);
    let std = d.std.clone().unwrap_or(std);
    for (key, v) in [("data.mean", &mean), ("data.std", &std)] {
        if v.len() != train.channels {
            return Err(TrainError::Recipe {
                path: key.into(),
                why: format!("has {} entries for {} channels", v.len(), train.channels),
            });
        }
    }
    let aug = Augment { pad: d.pad, flip: d.flip, mean, std };
    let test = Augmented { data: Arc::new(test), aug: aug.eval() };
    let train = Augmented { data: Arc::new(train), aug };
    Ok(RunData { train: Arc::new(train), test: Arc::new(test), classes, root })
}
