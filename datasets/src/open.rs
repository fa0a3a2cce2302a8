//! Opening a dataset for a run: a registry name (`cargo xtask data list`) or a folder given by
//! path becomes training and test sources, a class count and a normalisation. What each format
//! needs lives here and in the registry, so the trainer names no dataset.
//!
//! A folder given by path is recognised by its files: the four IDX files of the MNIST layout
//! (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-...`, gzipped or not), CIFAR-10
//! or CIFAR-100 binary batches, or image folders (`train/` and `val/` or `test/`, one folder per
//! class). Small datasets are decoded into memory and augmented with padding, random crops and
//! flips; image folders given by path or as `image-folder` stream from disk with random-resized
//! crops (the ImageNet way).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cifar::{CifarBatch, CifarKind, read_cifar};
use crate::detection::{DetectionSet, VOC_CLASSES, read_voc_classes};
use crate::detection_loader::DetectionSource;
use crate::idx::{IdxDataset, read_idx_pair};
use crate::image_folder::ImageFolder;
use crate::loader::{Augment, Augmented, IMAGENET_MEAN, IMAGENET_STD, InMemory, Source, Streamed, epoch_order};
use crate::registry::{Format, KnownDataset, known, locate, search_dirs, workspace_cache};
use crate::transform::ResizedCrop;
use crate::{DatasetError, Result};

/// What a run asks of its data (a recipe's `dataset` and `data.*`).
#[derive(Debug, Clone, Default)]
pub struct DataSpec {
    /// A registry name, `image-folder` (with `root`), or the path of a dataset's folder.
    pub dataset: String,
    /// A folder searched first for a registry dataset; the folder of `image-folder`.
    pub root: Option<PathBuf>,
    /// A folder searched before the usual places (`--data-dir`).
    pub data_dir: Option<PathBuf>,
    /// Training images to use (a seeded random subset); 0 for all.
    pub train_limit: usize,
    /// Test images to use; 0 for all.
    pub test_limit: usize,
    /// The seed of the subsets.
    pub seed: u64,
    /// Zero padding before random crops of in-memory data.
    pub pad: usize,
    /// Random horizontal flips.
    pub flip: bool,
    /// Random vertical flips (detection; for overhead imagery).
    pub vflip: bool,
    /// Random crops keep from this fraction of each side to all of it (detection); 0: none.
    pub crop: f32,
    /// Per-channel mean after scaling to `[0, 1]`; the dataset's own when absent.
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation; the dataset's own when absent.
    pub std: Option<Vec<f32>>,
    /// Image side: in-memory image folders must have it, streamed ones are resized to it.
    pub size: usize,
}

/// A run's data.
#[derive(Debug, Clone)]
pub struct Opened {
    /// Training samples, augmented.
    pub train: Arc<dyn Source>,
    /// Test samples, with the evaluation transform.
    pub test: Arc<dyn Source>,
    /// Classes.
    pub classes: usize,
    /// Where the data was read from.
    pub root: PathBuf,
}

/// An error about a setting of the spec (named as a recipe names it, `data.pad`).
fn setting(key: &str, why: impl Into<String>) -> DatasetError {
    DatasetError::Invalid { path: PathBuf::from(key), why: why.into() }
}

/// Opens the data `spec` asks for.
pub fn open(spec: &DataSpec) -> Result<Opened> {
    check(spec)?;
    if spec.dataset == "image-folder" {
        let root = spec.root.clone().ok_or_else(|| {
            setting("data.root", "dataset = \"image-folder\" needs data.root, a folder with train/ and val/ (or test/)")
        })?;
        return streamed(spec, root);
    }
    let path = Path::new(&spec.dataset);
    if known(&spec.dataset).is_err() && (path.is_dir() || spec.dataset.contains(std::path::MAIN_SEPARATOR)) {
        return by_path(spec, path);
    }
    let ds = known(&spec.dataset)?;
    let root = find(ds, spec)?;
    match ds.format {
        Format::Idx => idx(spec, &root, Some(ds)),
        Format::Cifar(kind) => cifar(spec, &root, kind, ds),
        Format::ImageFolder => in_memory_folder(spec, &root, ds),
        Format::Voc(_) => Err(setting(
            ds.name,
            "is a detection dataset: train a detector on it, with a recipe of task = \"detection\"",
        )),
    }
}

/// A run's detection data.
#[derive(Debug, Clone)]
pub struct OpenedDetection {
    /// Training images with their boxes, flipped as the spec asks.
    pub train: Arc<DetectionSource>,
    /// Test images with their boxes.
    pub test: Arc<DetectionSource>,
    /// Class names, in label order (the detector's labels are these plus 1; 0 is background).
    pub classes: Vec<String>,
    /// Where the data was read from.
    pub root: PathBuf,
}

/// Opens the detection data `spec` asks for, its images resized to `size` (height, width): a
/// registry dataset in VOC form, or a VOC folder by path (`Annotations/`, `JPEGImages/`,
/// `ImageSets/Main/train.txt` and `test.txt` or `val.txt`) of the 20 VOC classes.
pub fn open_detection(spec: &DataSpec, size: (usize, usize)) -> Result<OpenedDetection> {
    check(spec)?;
    let path = Path::new(&spec.dataset);
    let (root, classes, mean, std): (PathBuf, Vec<&str>, &[f32], &[f32]) = match known(&spec.dataset) {
        Ok(ds) => match ds.format {
            Format::Voc(classes) => (find(ds, spec)?, classes.to_vec(), ds.mean, ds.std),
            _ => {
                return Err(setting(
                    ds.name,
                    "is a classification dataset; a detection recipe needs boxes (`cargo xtask data list` shows the \
                     detection datasets)",
                ));
            }
        },
        Err(_) if path.join("ImageSets/Main/train.txt").is_file() => {
            (path.to_path_buf(), VOC_CLASSES.to_vec(), &IMAGENET_MEAN[..], &IMAGENET_STD[..])
        }
        Err(e) if !path.is_dir() => return Err(e),
        Err(_) => {
            return Err(DatasetError::Invalid {
                path: path.into(),
                why: "holds no detection dataset: a Pascal VOC folder needs ImageSets/Main/train.txt (and test.txt \
                      or val.txt), Annotations/ and JPEGImages/"
                    .into(),
            });
        }
    };
    let test_split = if root.join("ImageSets/Main/test.txt").is_file() { "test" } else { "val" };
    let channel = |v: Option<&Vec<f32>>, own: &[f32], key: &str| -> Result<[f32; 3]> {
        let v = v.map_or(own, |v| v.as_slice());
        v.try_into().map_err(|_| setting(key, format!("needs 3 values (R, G, B), got {}", v.len())))
    };
    let (mean, std) = (channel(spec.mean.as_ref(), mean, "data.mean")?, channel(spec.std.as_ref(), std, "data.std")?);
    let subset = |mut set: DetectionSet, limit: usize| {
        if limit > 0 && limit < set.items.len() {
            let mut keep = epoch_order(set.items.len(), spec.seed, u64::MAX)[..limit].to_vec();
            keep.sort_unstable();
            set.items = keep.iter().map(|&i| set.items[i].clone()).collect();
        }
        set
    };
    let train = subset(read_voc_classes(&root, "train", &classes)?, spec.train_limit);
    let test = subset(read_voc_classes(&root, test_split, &classes)?, spec.test_limit);
    let source = |set, hflip, vflip, crop| Arc::new(DetectionSource { set, size, mean, std, hflip, vflip, crop });
    Ok(OpenedDetection {
        train: source(train, spec.flip, spec.vflip, spec.crop),
        test: source(test, false, false, 0.0),
        classes: classes.iter().map(|c| c.to_string()).collect(),
        root,
    })
}

/// The settings no dataset can take: checked before anything is read, so that a bad value is a
/// clear error rather than a failed run.
fn check(spec: &DataSpec) -> Result<()> {
    if spec.size == 0 || spec.size > 4096 {
        return Err(setting("data.size", format!("must be an image side in 1..=4096 pixels, got {}", spec.size)));
    }
    if spec.pad > 64 {
        return Err(setting("data.pad", format!("pads by {} pixels; use at most 64 (CIFAR uses 4)", spec.pad)));
    }
    if let Some(m) = &spec.mean
        && let Some(v) = m.iter().find(|v| !v.is_finite())
    {
        return Err(setting("data.mean", format!("holds {v}; every entry must be a finite number")));
    }
    if let Some(s) = &spec.std
        && let Some(v) = s.iter().find(|&&v| !(v > 0.0 && v.is_finite()))
    {
        return Err(setting("data.std", format!("holds {v}; every entry must be a positive number")));
    }
    Ok(())
}

/// The folder of registry dataset `ds`: in `spec.root` (or beside it), then the usual places.
fn find(ds: &KnownDataset, spec: &DataSpec) -> Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(r) = &spec.root {
        dirs.push(r.clone());
        if let Some(parent) = r.parent() {
            dirs.push(parent.to_path_buf());
        }
    }
    dirs.extend(search_dirs(spec.data_dir.as_deref(), &workspace_cache()));
    // A root that is itself the dataset's folder, whatever its name.
    if let Some(r) = &spec.root
        && ds.marker_files.iter().all(|f| r.join(f).is_file())
    {
        return Ok(r.clone());
    }
    locate(ds, &dirs).ok_or_else(|| {
        setting(
            ds.name,
            format!(
                "dataset not found in {}; get it with: {}",
                dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
                ds.sources.join(" or ")
            ),
        )
    })
}

/// A folder given by path, recognised by its files.
fn by_path(spec: &DataSpec, root: &Path) -> Result<Opened> {
    if !root.is_dir() {
        return Err(DatasetError::Invalid {
            path: root.into(),
            why: "is not a folder; name a dataset from `cargo xtask data list` or a folder holding one".into(),
        });
    }
    if idx_files(root).is_some() {
        return idx(spec, root, None);
    }
    if root.join("data_batch_1.bin").is_file() && root.join("test_batch.bin").is_file() {
        return cifar(spec, root, CifarKind::Cifar10, known("cifar10")?);
    }
    if root.join("train.bin").is_file() && root.join("test.bin").is_file() {
        return cifar(spec, root, CifarKind::Cifar100Fine, known("cifar100")?);
    }
    if root.join("train").is_dir() && (root.join("val").is_dir() || root.join("test").is_dir()) {
        return streamed(spec, root.to_path_buf());
    }
    Err(DatasetError::Invalid {
        path: root.into(),
        why: "holds no dataset this trainer reads: the four MNIST-layout IDX files (train-images-idx3-ubyte, \
              train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzipped or not), CIFAR \
              binary batches, or train/ and val/ (or test/) image folders"
            .into(),
    })
}

/// The MNIST layout's four files in `root` (each with or without `.gz`): train images and
/// labels, test images and labels.
fn idx_files(root: &Path) -> Option<[PathBuf; 4]> {
    let pick =
        |stem: &str| [format!("{stem}.gz"), stem.to_string()].into_iter().map(|f| root.join(f)).find(|p| p.is_file());
    Some([
        pick("train-images-idx3-ubyte")?,
        pick("train-labels-idx1-ubyte")?,
        pick("t10k-images-idx3-ubyte")?,
        pick("t10k-labels-idx1-ubyte")?,
    ])
}

/// IDX data: a registry dataset with its class count and normalisation, or a folder by path,
/// whose classes come from its labels and whose normalisation, unless given, from its training
/// images.
fn idx(spec: &DataSpec, root: &Path, ds: Option<&KnownDataset>) -> Result<Opened> {
    let files = idx_files(root).ok_or_else(|| DatasetError::Invalid {
        path: root.into(),
        why: "lacks the MNIST layout's four IDX files".into(),
    })?;
    let read = |img: &Path, lab: &Path| -> Result<IdxDataset> { read_idx_pair(img, lab, u8::MAX) };
    let (train, test) = (read(&files[0], &files[1])?, read(&files[2], &files[3])?);
    if train.images.dims[1..] != test.images.dims[1..] {
        return Err(DatasetError::Invalid {
            path: files[2].clone(),
            why: format!(
                "holds images of {:?}, the training images are {:?}",
                &test.images.dims[1..],
                &train.images.dims[1..]
            ),
        });
    }
    let top = train.labels.iter().chain(&test.labels).copied().max().unwrap_or(0) as usize + 1;
    let classes = match ds {
        Some(ds) => {
            if top > ds.classes {
                return Err(DatasetError::Invalid {
                    path: files[1].clone(),
                    why: format!("has label {} but {} has {} classes", top - 1, ds.name, ds.classes),
                });
            }
            ds.classes
        }
        None => top,
    };
    let (train, test) = (InMemory::from_idx(train), InMemory::from_idx(test));
    let (mean, std) = match ds {
        Some(ds) => (ds.mean.to_vec(), ds.std.to_vec()),
        None => pixel_moments(&train),
    };
    in_memory(spec, root, train, test, classes, mean, std)
}

/// Per-channel mean and standard deviation of a dataset's pixels scaled to `[0, 1]`, in f64.
pub fn pixel_moments(ds: &InMemory) -> (Vec<f32>, Vec<f32>) {
    let plane = ds.height * ds.width;
    let (mut sum, mut sq) = (vec![0f64; ds.channels], vec![0f64; ds.channels]);
    for (k, chunk) in ds.pixels.chunks(plane.max(1)).enumerate() {
        let c = k % ds.channels.max(1);
        for &p in chunk {
            let v = f64::from(p) / 255.0;
            sum[c] += v;
            sq[c] += v * v;
        }
    }
    let n = (ds.len() * plane).max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
    // A constant image set has no spread; normalise by 1 then rather than divide by zero.
    let std =
        sq.iter().zip(&mean).map(|(s, m)| (s / n - m * m).max(0.0).sqrt()).map(|s| if s > 1e-6 { s } else { 1.0 });
    (mean.iter().map(|&m| m as f32).collect(), std.map(|s| s as f32).collect())
}

/// CIFAR binary batches of `kind` in `root`, with `ds`'s normalisation.
fn cifar(spec: &DataSpec, root: &Path, kind: CifarKind, ds: &KnownDataset) -> Result<Opened> {
    let (train_files, test_file): (Vec<PathBuf>, PathBuf) = match kind {
        CifarKind::Cifar10 => {
            ((1..=5).map(|i| root.join(format!("data_batch_{i}.bin"))).collect(), root.join("test_batch.bin"))
        }
        CifarKind::Cifar100Fine | CifarKind::Cifar100Coarse => (vec![root.join("train.bin")], root.join("test.bin")),
    };
    let mut train = CifarBatch::default();
    for f in &train_files {
        let b = read_cifar(f, kind)?;
        train.images.extend(b.images);
        train.labels.extend(b.labels);
    }
    let test = read_cifar(&test_file, kind)?;
    let (train, test) = (InMemory::from_cifar(train), InMemory::from_cifar(test));
    in_memory(spec, root, train, test, usize::from(kind.classes()), ds.mean.to_vec(), ds.std.to_vec())
}

/// The two splits of an image-folder dataset: `train/` and `val/` (or `test/`), with the same
/// classes, each cut to its limit before any image is decoded.
fn folders(spec: &DataSpec, root: &Path) -> Result<(ImageFolder, ImageFolder)> {
    let train = ImageFolder::open(&root.join("train"))?;
    let test_dir = if root.join("val").is_dir() { root.join("val") } else { root.join("test") };
    let test = ImageFolder::open(&test_dir)?;
    if test.classes != train.classes {
        return Err(DatasetError::Invalid {
            path: test_dir,
            why: "its class folders differ from train/'s; both splits need the same classes".into(),
        });
    }
    let cut = |f: ImageFolder, n: usize, seed: u64| -> ImageFolder {
        if n == 0 || n >= f.items.len() {
            return f;
        }
        let order = epoch_order(f.items.len(), seed, u64::MAX);
        let mut keep: Vec<usize> = order[..n].to_vec();
        keep.sort_unstable();
        ImageFolder { items: keep.iter().map(|&i| f.items[i].clone()).collect(), ..f }
    };
    Ok((cut(train, spec.train_limit, spec.seed), cut(test, spec.test_limit, spec.seed ^ 1)))
}

/// A registry image-folder dataset of small images (CIFAR-10 JPEG), decoded once into memory;
/// each image must be `data.size` on a side.
fn in_memory_folder(spec: &DataSpec, root: &Path, ds: &KnownDataset) -> Result<Opened> {
    let (train, test) = folders(spec, root)?;
    let classes = train.classes.len();
    let size = (spec.size, spec.size);
    let (train, test) = (InMemory::from_image_folder(&train, size)?, InMemory::from_image_folder(&test, size)?);
    // The limits were applied before decoding.
    let spec = DataSpec { train_limit: 0, test_limit: 0, ..spec.clone() };
    in_memory(&spec, root, train, test, classes, ds.mean.to_vec(), ds.std.to_vec())
}

/// Image folders streamed from disk: random-resized crops and flips to `data.size` for
/// training, resize and centre crop for testing; ImageNet's normalisation unless given.
fn streamed(spec: &DataSpec, root: PathBuf) -> Result<Opened> {
    if spec.pad != 0 {
        return Err(setting(
            "data.pad",
            "pads in-memory datasets only; image folders use random-resized crops, so set it to 0",
        ));
    }
    let (train, test) = folders(spec, &root)?;
    let classes = train.classes.len();
    let three = |v: Option<&Vec<f32>>, default: [f32; 3], key: &str| -> Result<[f32; 3]> {
        match v {
            None => Ok(default),
            Some(v) => <[f32; 3]>::try_from(v.as_slice())
                .map_err(|_| setting(key, format!("has {} entries for 3 channels", v.len()))),
        }
    };
    let (mean, std) =
        (three(spec.mean.as_ref(), IMAGENET_MEAN, "data.mean")?, three(spec.std.as_ref(), IMAGENET_STD, "data.std")?);
    let test = Streamed { folder: test, side: spec.size, crop: None, flip: false, mean, std };
    let train =
        Streamed { folder: train, side: spec.size, crop: Some(ResizedCrop::default()), flip: spec.flip, mean, std };
    Ok(Opened { train: Arc::new(train), test: Arc::new(test), classes, root })
}

/// A seeded random subset of `limit` images (all when `limit` is 0 or too large).
fn limit(ds: InMemory, limit: usize, seed: u64) -> InMemory {
    if limit == 0 || limit >= ds.len() {
        return ds;
    }
    let order = epoch_order(ds.len(), seed, u64::MAX);
    ds.subset(&order[..limit])
}

/// In-memory splits, cut to their limits, normalised with the spec's values or `mean`/`std`,
/// augmented for training with the spec's padding and flips.
fn in_memory(
    spec: &DataSpec,
    root: &Path,
    train: InMemory,
    test: InMemory,
    classes: usize,
    mean: Vec<f32>,
    std: Vec<f32>,
) -> Result<Opened> {
    let train = limit(train, spec.train_limit, spec.seed);
    let test = limit(test, spec.test_limit, spec.seed ^ 1);
    let mean = spec.mean.clone().unwrap_or(mean);
    let std = spec.std.clone().unwrap_or(std);
    for (key, v) in [("data.mean", &mean), ("data.std", &std)] {
        if v.len() != train.channels {
            return Err(setting(key, format!("has {} entries for {} channels", v.len(), train.channels)));
        }
    }
    let aug = Augment { pad: spec.pad, flip: spec.flip, mean, std };
    let test = Augmented { data: Arc::new(test), aug: aug.eval() };
    let train = Augmented { data: Arc::new(train), aug };
    Ok(Opened { train: Arc::new(train), test: Arc::new(test), classes, root: root.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dataset: &str) -> DataSpec {
        DataSpec { dataset: dataset.into(), size: 32, ..Default::default() }
    }

    #[test]
    fn pixel_moments_are_the_per_channel_mean_and_deviation_in_f64() {
        // Two images, two channels of two pixels: channel 0 holds 0, 255, 51, 204; channel 1 all 102.
        let ds = InMemory {
            pixels: vec![0, 255, 102, 102, 51, 204, 102, 102],
            labels: vec![0, 1],
            channels: 2,
            height: 1,
            width: 2,
        };
        let (mean, std) = pixel_moments(&ds);
        let c0 = [0.0, 1.0, 0.2, 0.8];
        let m0 = c0.iter().sum::<f64>() / 4.0;
        let s0 = (c0.iter().map(|v| (v - m0) * (v - m0)).sum::<f64>() / 4.0).sqrt();
        assert!((f64::from(mean[0]) - m0).abs() < 1e-6 && (f64::from(std[0]) - s0).abs() < 1e-6, "{mean:?} {std:?}");
        // A constant channel is normalised by 1, not divided by zero.
        assert!((mean[1] - 0.4).abs() < 1e-6 && std[1] == 1.0, "{mean:?} {std:?}");
    }

    #[test]
    fn a_folder_holding_no_dataset_is_named_with_what_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        let err = open(&spec(dir.path().to_str().unwrap())).unwrap_err().to_string();
        assert!(err.contains(dir.path().to_str().unwrap()) && err.contains("IDX") && err.contains("CIFAR"), "{err}");
        let err = open(&spec("/no/such/folder")).unwrap_err().to_string();
        assert!(err.contains("/no/such/folder") && err.contains("not a folder"), "{err}");
        let err = open(&spec("imagenet-22k")).unwrap_err().to_string();
        assert!(err.contains("known ones"), "{err}");
    }

    #[test]
    fn settings_no_dataset_can_take_are_refused_before_reading() {
        for (s, key) in [
            (DataSpec { size: 0, ..spec("fashion-mnist") }, "data.size"),
            (DataSpec { pad: 65, ..spec("fashion-mnist") }, "data.pad"),
            (DataSpec { std: Some(vec![0.0]), ..spec("fashion-mnist") }, "data.std"),
            (DataSpec { mean: Some(vec![f32::NAN]), ..spec("fashion-mnist") }, "data.mean"),
            (spec("image-folder"), "data.root"),
        ] {
            let err = open(&s).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }
}
