//! Batches for training: a dataset decoded once into memory, CIFAR-style augmentation (random
//! crop from a zero-padded image, horizontal flip, per-channel normalisation), a seeded shuffle
//! per epoch, and batches assembled in parallel (rayon) by a background thread that keeps a few
//! ready, so the trainer does not wait on data.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use rayon::prelude::*;

use crate::idx::IdxDataset;
use crate::image_folder::ImageFolder;
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

    /// Decodes every image of an image folder in parallel, each resized and centre-cropped to
    /// `side x side` ([`ImageFolder::load_center`]).
    pub fn from_image_folder_center(folder: &ImageFolder, side: usize) -> Result<Self> {
        let decoded: Vec<(Vec<u8>, u32)> = (0..folder.items.len())
            .into_par_iter()
            .map(|i| {
                let (img, label) = folder.load_center(i, side)?;
                Ok((img.to_planar(), label))
            })
            .collect::<Result<_>>()?;
        let labels = decoded.iter().map(|d| d.1).collect();
        let pixels = decoded.into_iter().flat_map(|d| d.0).collect();
        Ok(Self { pixels, labels, channels: 3, height: side, width: side })
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

/// SplitMix64: the random stream of augmentation and shuffling, a pure function of its input.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

/// Builds the batch of `indices` (augmenting with the stream of `seed`, `epoch`) in parallel.
pub fn make_batch(ds: &InMemory, aug: &Augment, indices: &[usize], seed: u64, epoch: u64) -> Batch {
    let len = ds.image_len();
    let mut images = vec![0f32; indices.len() * len];
    images.par_chunks_mut(len).zip(indices.par_iter()).for_each(|(out, &i)| {
        sample(ds, aug, i, mix(seed ^ mix(epoch.wrapping_mul(0x1000_0000) ^ i as u64)), out);
    });
    Batch {
        images,
        labels: indices.iter().map(|&i| ds.labels[i]).collect(),
        dims: [indices.len(), ds.channels, ds.height, ds.width],
    }
}

/// The batches of one epoch, assembled ahead by a background thread (`prefetch` batches deep);
/// the last, short batch is kept. Dropping the iterator stops the thread.
pub fn epoch(
    ds: Arc<InMemory>,
    aug: Augment,
    batch: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    prefetch: usize,
) -> Result<Receiver<Batch>> {
    epoch_from(ds, aug, batch, shuffle, seed, epoch, prefetch, 0)
}

/// As [`epoch`], starting after the first `skip` batches (a resumed run continues mid-epoch
/// with exactly the batches it had not seen).
pub fn epoch_from(
    ds: Arc<InMemory>,
    aug: Augment,
    batch: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    prefetch: usize,
    skip: usize,
) -> Result<Receiver<Batch>> {
    if batch == 0 || ds.is_empty() {
        return Err(DatasetError::Invalid {
            path: "loader".into(),
            why: format!("needs a batch size above 0 and data (got {batch} and {} images)", ds.len()),
        });
    }
    let order = if shuffle { epoch_order(ds.len(), seed, epoch) } else { (0..ds.len()).collect() };
    let (tx, rx) = sync_channel(prefetch.max(1));
    std::thread::Builder::new()
        .name("int8-loader".into())
        .spawn(move || {
            for chunk in order.chunks(batch).skip(skip) {
                if tx.send(make_batch(&ds, &aug, chunk, seed, epoch)).is_err() {
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
        let b = make_batch(&ds, &aug, &[2, 0], 1, 0);
        assert_eq!(b.dims, [2, 1, 2, 3]);
        assert_eq!(b.labels, vec![2, 0]);
        assert_eq!(codes(&b.images[..6]), vec![20, 21, 22, 23, 24, 25]);
        let norm = make_batch(&ds, &Augment { mean: vec![0.5], std: vec![0.25], ..aug.clone() }, &[0], 1, 0);
        assert!((norm.images[3] - (3.0 / 255.0 - 0.5) / 0.25).abs() < 1e-6);
        // With padding and flips, every sample is a shifted (maybe mirrored) window of its
        // image, padding reading as zero; over many draws both flips and several shifts occur.
        let aug = Augment { pad: 1, flip: true, ..aug };
        let mut seen = std::collections::HashSet::new();
        for e in 0..64 {
            let b = make_batch(&ds, &aug, &[1], 5, e);
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
        let ds = Arc::new(tiny());
        let aug = Augment { pad: 0, flip: false, mean: vec![0.0], std: vec![1.0] };
        let batches: Vec<Batch> = epoch(ds.clone(), aug.clone(), 3, true, 9, 0, 2).unwrap().into_iter().collect();
        assert_eq!(batches.iter().map(|b| b.labels.len()).collect::<Vec<_>>(), vec![3, 1]);
        let mut labels: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
        labels.sort();
        assert_eq!(labels, vec![0, 1, 2, 3]);
        let rest: Vec<Batch> = epoch_from(ds.clone(), aug.clone(), 3, true, 9, 0, 2, 1).unwrap().into_iter().collect();
        assert_eq!(rest, batches[1..].to_vec(), "a resumed epoch delivers exactly the batches left");
        assert!(epoch(Arc::new(tiny()), aug, 0, true, 0, 0, 1).is_err());
    }
}
