//! Batches for training from a [`Source`]: a small dataset decoded once into memory with
//! CIFAR-style augmentation (random crop from a zero-padded image, horizontal flip, per-channel
//! normalisation), or a large image folder decoded as it streams, with ImageNet-style
//! augmentation (random-resized crop and flip; resize and centre crop for evaluation). A seeded
//! shuffle per epoch, and batches assembled in parallel (rayon) by a background thread that keeps
//! a few ready, so the trainer does not wait on data. Every sample is a pure function of (seed,
//! epoch, index), so a resumed run sees exactly the pixels it would have seen.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use rayon::prelude::*;

use crate::idx::IdxDataset;
use crate::image_folder::ImageFolder;
use crate::transform::{ResizedCrop, Stream, crop_resize, mix, resize_center};
use crate::{DatasetError, Result};

/// A dataset held in memory as `u8` pixels, `count x channels x height x width`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InMemory {
    /// Pixels, planar per image.
    pub pixels: Vec<u8>,
    /// Labels.
    pub labels: Vec<u32>,
    /// Channels.
    pub channels: usize,
    /// Height.
    pub height: usize,
    /// Width.
    pub width: usize,
}

impl InMemory {
    /// Images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Decodes every image of an image folder in parallel, checking that each is `size`.
    pub fn from_image_folder(folder: &ImageFolder, size: (usize, usize)) -> Result<Self> {
        let decoded: Vec<(Vec<u8>, u32)> = (0..folder.items.len())
            .into_par_iter()
            .map(|i| {
                let (img, label) = folder.load(i, Some(size))?;
                Ok((img.to_planar(), label))
            })
            .collect::<Result<_>>()?;
        let labels = decoded.iter().map(|d| d.1).collect();
        let pixels = decoded.into_iter().flat_map(|d| d.0).collect();
        Ok(Self { pixels, labels, channels: 3, height: size.1, width: size.0 })
    }

    /// The images at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Self {
        let len = self.image_len();
        Self {
            pixels: indices.iter().flat_map(|&i| self.pixels[i * len..(i + 1) * len].iter().copied()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            ..*self
        }
    }

    /// A CIFAR binary dataset (three 32x32 planes per image).
    pub fn from_cifar(b: crate::cifar::CifarBatch) -> Self {
        Self {
            pixels: b.images,
            labels: b.labels.iter().map(|&l| l as u32).collect(),
            channels: 3,
            height: 32,
            width: 32,
        }
    }

    /// An MNIST-style dataset (one channel).
    pub fn from_idx(ds: IdxDataset) -> Self {
        let (h, w) = (ds.images.dims[1], ds.images.dims[2]);
        Self {
            pixels: ds.images.data,
            labels: ds.labels.iter().map(|&l| l as u32).collect(),
            channels: 1,
            height: h,
            width: w,
        }
    }
}

/// CIFAR-10's per-channel mean after scaling to `[0, 1]` (training set).
pub const CIFAR10_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// CIFAR-10's per-channel standard deviation.
pub const CIFAR10_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];
/// ImageNet's per-channel mean (torchvision's normalisation).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How each image becomes a training sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    /// Zero padding before the random crop (4 for CIFAR; 0 for none).
    pub pad: usize,
    /// Random horizontal flips.
    pub flip: bool,
    /// Per-channel mean, after scaling to `[0, 1]`.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

impl Augment {
    /// Evaluation: normalisation only.
    pub fn eval(&self) -> Self {
        Self { pad: 0, flip: false, ..self.clone() }
    }
}

/// Writes sample `i` of `ds`, augmented with random bits `r`, into `out` (`c x h x w` floats).
fn sample(ds: &InMemory, aug: &Augment, i: usize, r: u64, out: &mut [f32]) {
    let (c, h, w) = (ds.channels, ds.height, ds.width);
    let img = &ds.pixels[i * ds.image_len()..(i + 1) * ds.image_len()];
    let span = 2 * aug.pad + 1;
    let (dy, dx) =
        ((r % span as u64) as isize - aug.pad as isize, ((r >> 16) % span as u64) as isize - aug.pad as isize);
    let flip = aug.flip && (r >> 32) & 1 == 1;
    for ch in 0..c {
        let (m, s) = (aug.mean[ch % aug.mean.len()], aug.std[ch % aug.std.len()]);
        let zero = -m / s;
        for y in 0..h {
            let sy = y as isize + dy;
            for x in 0..w {
                let xx = if flip { w - 1 - x } else { x };
                let sx = xx as isize + dx;
                out[(ch * h + y) * w + x] = if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                    zero
                } else {
                    (img[(ch * h + sy as usize) * w + sx as usize] as f32 / 255.0 - m) / s
                };
            }
        }
    }
}

/// One batch: `len x channels x height x width` floats and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Images.
    pub images: Vec<f32>,
    /// Labels.
    pub labels: Vec<u32>,
    /// `[batch, channels, height, width]`.
    pub dims: [usize; 4],
}

/// The order of epoch `epoch` for `n` samples under `seed` (Fisher-Yates).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let key = mix(seed ^ mix(epoch));
    for i in (1..n).rev() {
        let j = (mix(key.wrapping_add(i as u64)) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Where a loader's samples come from.
pub trait Source: Send + Sync + std::fmt::Debug {
    /// Samples.
    fn len(&self) -> usize;
    /// Whether there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `[channels, height, width]` of every sample.
    fn dims(&self) -> [usize; 3];
    /// The label of sample `i`.
    fn label(&self, i: usize) -> u32;
    /// Writes sample `i`, augmented with the random bits `r`, into `out` (`c x h x w` floats).
    fn write(&self, i: usize, r: u64, out: &mut [f32]) -> Result<()>;
}

/// An in-memory dataset with CIFAR-style augmentation.
#[derive(Debug, Clone)]
pub struct Augmented {
    /// The images.
    pub data: Arc<InMemory>,
    /// How each becomes a sample.
    pub aug: Augment,
}

impl Source for Augmented {
    fn len(&self) -> usize {
        self.data.len()
    }
    fn dims(&self) -> [usize; 3] {
        [self.data.channels, self.data.height, self.data.width]
    }
    fn label(&self, i: usize) -> u32 {
        self.data.labels[i]
    }
    fn write(&self, i: usize, r: u64, out: &mut [f32]) -> Result<()> {
        sample(&self.data, &self.aug, i, r, out);
        Ok(())
    }
}

/// An image folder decoded as it streams (for data too large to hold in memory, like ImageNet):
/// for training a random-resized crop and flip, for evaluation resize and centre crop, each to
/// `side x side`, then per-channel normalisation.
#[derive(Debug, Clone)]
pub struct Streamed {
    /// The images.
    pub folder: ImageFolder,
    /// Output side in pixels.
    pub side: usize,
    /// The training crop, or `None` for the evaluation transform.
    pub crop: Option<ResizedCrop>,
    /// Random horizontal flips (training only).
    pub flip: bool,
    /// Per-channel mean, after scaling to `[0, 1]`.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
}

impl Source for Streamed {
    fn len(&self) -> usize {
        self.folder.items.len()
    }
    fn dims(&self) -> [usize; 3] {
        [3, self.side, self.side]
    }
    fn label(&self, i: usize) -> u32 {
        self.folder.items[i].1
    }
    fn write(&self, i: usize, r: u64, out: &mut [f32]) -> Result<()> {
        let (img, _) = self.folder.load(i, None)?;
        let img = match &self.crop {
            Some(crop) => {
                let mut rng = Stream::new(r);
                let win = crop.window(img.width as u32, img.height as u32, &mut rng);
                let flip = self.flip && rng.next_u64() & 1 == 1;
                crop_resize(img, win, self.side, flip)
            }
            None => resize_center(img, self.side),
        };
        out.copy_from_slice(&img.to_chw(self.mean, self.std));
        Ok(())
    }
}

/// Builds the batch of `indices` (augmenting with the stream of `seed`, `epoch`) in parallel.
pub fn make_batch(src: &dyn Source, indices: &[usize], seed: u64, epoch: u64) -> Result<Batch> {
    let [c, h, w] = src.dims();
    let len = c * h * w;
    let mut images = vec![0f32; indices.len() * len];
    images
        .par_chunks_mut(len)
        .zip(indices.par_iter())
        .try_for_each(|(out, &i)| src.write(i, mix(seed ^ mix(epoch.wrapping_mul(0x1000_0000) ^ i as u64)), out))?;
    Ok(Batch { images, labels: indices.iter().map(|&i| src.label(i)).collect(), dims: [indices.len(), c, h, w] })
}

/// The batches of one epoch, assembled ahead by a background thread (`prefetch` batches deep);
/// the last, short batch is kept. A sample that cannot be read ends the epoch with its error.
/// Dropping the receiver stops the thread.
pub fn epoch(
    src: Arc<dyn Source>,
    batch: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    prefetch: usize,
) -> Result<Receiver<Result<Batch>>> {
    epoch_from(src, batch, shuffle, seed, epoch, prefetch, 0)
}

/// As [`epoch`], starting after the first `skip` batches (a resumed run continues mid-epoch
/// with exactly the batches it had not seen).
pub fn epoch_from(
    src: Arc<dyn Source>,
    batch: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    prefetch: usize,
    skip: usize,
) -> Result<Receiver<Result<Batch>>> {
    if batch == 0 || src.is_empty() {
        return Err(DatasetError::Invalid {
            path: "loader".into(),
            why: format!("needs a batch size above 0 and data (got {batch} and {} images)", src.len()),
        });
    }
    let order = if shuffle { epoch_order(src.len(), seed, epoch) } else { (0..src.len()).collect() };
    prefetched(order, batch, skip, prefetch, move |chunk| make_batch(src.as_ref(), chunk, seed, epoch))
}

/// Runs `make` on the chunks of `order` (`batch` long, the first `skip` left out) on a
/// background thread that keeps `prefetch` results ready; a failed chunk ends the stream with its
/// error. Dropping the receiver stops the thread.
pub(crate) fn prefetched<B: Send + 'static>(
    order: Vec<usize>,
    batch: usize,
    skip: usize,
    prefetch: usize,
    make: impl Fn(&[usize]) -> Result<B> + Send + 'static,
) -> Result<Receiver<Result<B>>> {
    let (tx, rx) = sync_channel(prefetch.max(1));
    std::thread::Builder::new()
        .name("int8-loader".into())
        .spawn(move || {
            for chunk in order.chunks(batch).skip(skip) {
                let b = make(chunk);
                let failed = b.is_err();
                if tx.send(b).is_err() || failed {
                    break;
                }
            }
        })
        .map_err(|e| DatasetError::Invalid { path: "loader".into(), why: format!("cannot start its thread: {e}") })?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> InMemory {
        // Four 1x2x3 images whose pixels encode image and position.
        let pixels = (0..4).flat_map(|i| (0..6).map(move |p| (i * 10 + p) as u8)).collect();
        InMemory { pixels, labels: vec![0, 1, 2, 3], channels: 1, height: 2, width: 3 }
    }

    #[test]
    fn shuffles_are_permutations_reproducible_per_seed_and_epoch() {
        let a = epoch_order(1000, 7, 3);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(1000, 7, 3));
        assert_ne!(a, epoch_order(1000, 7, 4));
        assert_ne!(a, epoch_order(1000, 8, 3));
    }

    #[test]
    fn eval_samples_are_normalised_pixels_and_augmentation_crops_and_flips() {
        let ds = tiny();
        let aug = Augment { pad: 0, flip: false, mean: vec![0.0], std: vec![1.0] };
        let codes = |v: &[f32]| v.iter().map(|&x| (x * 255.0).round() as i32).collect::<Vec<_>>();
        let src = |aug: &Augment| Augmented { data: Arc::new(ds.clone()), aug: aug.clone() };
        let b = make_batch(&src(&aug), &[2, 0], 1, 0).unwrap();
        assert_eq!(b.dims, [2, 1, 2, 3]);
        assert_eq!(b.labels, vec![2, 0]);
        assert_eq!(codes(&b.images[..6]), vec![20, 21, 22, 23, 24, 25]);
        let norm = make_batch(&src(&Augment { mean: vec![0.5], std: vec![0.25], ..aug.clone() }), &[0], 1, 0).unwrap();
        assert!((norm.images[3] - (3.0 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
        // With padding and flips, every sample is a shifted (maybe mirrored) window of its
        // image, padding reading as zero; over many draws both flips and several shifts occur.
        let padded = src(&Augment { pad: 1, flip: true, ..aug });
        let mut seen = std::collections::HashSet::new();
        for e in 0..64 {
            let b = make_batch(&padded, &[1], 5, e).unwrap();
            let c = codes(&b.images);
            for (k, &v) in c.iter().enumerate() {
                assert!(v == 0 || (10..=15).contains(&v), "sample value {v} at {k}");
            }
            seen.insert(c);
        }
        assert!(seen.len() >= 6, "only {} distinct augmentations", seen.len());
        assert!(seen.contains(&vec![12, 11, 10, 15, 14, 13]), "a pure flip occurs");
    }

    #[test]
    fn an_epoch_delivers_every_sample_once_in_batches() {
        let aug = Augment { pad: 0, flip: false, mean: vec![0.0], std: vec![1.0] };
        let ds: Arc<dyn Source> = Arc::new(Augmented { data: Arc::new(tiny()), aug: aug.clone() });
        let batches: Vec<Batch> =
            epoch(ds.clone(), 3, true, 9, 0, 2).unwrap().into_iter().map(Result::unwrap).collect();
        assert_eq!(batches.iter().map(|b| b.labels.len()).collect::<Vec<_>>(), vec![3, 1]);
        let mut labels: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
        labels.sort();
        assert_eq!(labels, vec![0, 1, 2, 3]);
        let rest: Vec<Batch> =
            epoch_from(ds.clone(), 3, true, 9, 0, 2, 1).unwrap().into_iter().map(Result::unwrap).collect();
        assert_eq!(rest, batches[1..].to_vec(), "a resumed epoch delivers exactly the batches left");
        assert!(epoch(ds, 0, true, 0, 0, 1).is_err());
    }

    #[test]
    fn streamed_folders_crop_reproducibly_and_report_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        for (class, n) in [("a", 3u8), ("b", 2)] {
            std::fs::create_dir_all(dir.path().join(class)).unwrap();
            for k in 0..n {
                // A horizontal ramp, so that crops and flips change the pixels.
                let img = image::RgbImage::from_fn(40 + k as u32, 30, |x, y| {
                    image::Rgb([(x * 6) as u8, (y * 8) as u8, k * 50])
                });
                img.save(dir.path().join(class).join(format!("{k}.png"))).unwrap();
            }
        }
        let folder = ImageFolder::open(dir.path()).unwrap();
        let train = Streamed {
            folder: folder.clone(),
            side: 16,
            crop: Some(ResizedCrop::default()),
            flip: true,
            mean: [0.5; 3],
            std: [0.25; 3],
        };
        let b = make_batch(&train, &[0, 4, 2], 3, 1).unwrap();
        assert_eq!(b.dims, [3, 3, 16, 16]);
        assert_eq!(b.labels, vec![0, 1, 0]);
        assert_eq!(b, make_batch(&train, &[0, 4, 2], 3, 1).unwrap(), "a sample is a function of seed, epoch, index");
        assert_ne!(b.images, make_batch(&train, &[0, 4, 2], 3, 2).unwrap().images, "epochs draw new crops");
        // Evaluation is resize and centre crop, normalised.
        let eval = Streamed { crop: None, flip: false, ..train.clone() };
        let e = make_batch(&eval, &[1], 0, 0).unwrap();
        let (img, _) = folder.load_center(1, 16).unwrap();
        assert_eq!(e.images, img.to_chw([0.5; 3], [0.25; 3]));
        // An undecodable file ends the epoch with an error that names it.
        std::fs::write(dir.path().join("b/1.png"), b"not a png").unwrap();
        let src: Arc<dyn Source> = Arc::new(eval);
        let results: Vec<Result<Batch>> = epoch(src, 2, false, 0, 0, 1).unwrap().into_iter().collect();
        assert_eq!(results.len(), 3, "the epoch stops at the failing batch");
        assert!(results[..2].iter().all(Result::is_ok));
        let err = results[2].as_ref().unwrap_err().to_string();
        assert!(err.contains("1.png") && err.contains("does not decode"), "{err}");
    }
}
