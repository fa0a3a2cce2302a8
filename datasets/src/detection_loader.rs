//! Batches for detection training: each image decoded as it is needed, cropped at random (SSD's
//! zoom-in augmentation, Liu et al. 2016, Sec. 2.2: a crop keeps the boxes whose centre it
//! holds, clipped), resized to the detector's fixed input size (boxes scaled with it, as
//! torchvision's SSD transform does), flipped at random left-right and, for overhead imagery where
//! up and down mean nothing, top-bottom, and normalised per channel. Every sample is a pure function of (seed, epoch, index), so a resumed
//! run sees exactly the pixels and boxes it would have seen.

use std::sync::Arc;
use std::sync::mpsc::Receiver;

use image::imageops::{FilterType, resize};
use rayon::prelude::*;

use crate::detection::{DetectionItem, DetectionSet, Object, flip_boxes, scale_boxes};
use crate::loader::{epoch_order, prefetched};
use crate::transform::{Stream, mix};
use crate::{DatasetError, Result, io_err};

/// A split of a detection dataset with its transform.
#[derive(Debug, Clone)]
pub struct DetectionSource {
    /// The images and their boxes.
    pub set: DetectionSet,
    /// Output `(height, width)`.
    pub size: (usize, usize),
    /// Per-channel mean after scaling to `[0, 1]`.
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
    /// Random left-right flips.
    pub hflip: bool,
    /// Random top-bottom flips.
    pub vflip: bool,
    /// Random crops keep from this fraction of each side to all of it (0 or 1: no crops).
    pub crop: f32,
}

/// A batch: `len x 3 x height x width` floats, each image's boxes in output pixels, and the
/// images' indices in the split.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionBatch {
    /// Images.
    pub images: Vec<f32>,
    /// `[batch, 3, height, width]`.
    pub dims: [usize; 4],
    /// Each image's objects.
    pub objects: Vec<Vec<Object>>,
    /// Each image's index in the split.
    pub indices: Vec<usize>,
}

fn decode(item: &DetectionItem) -> Result<image::RgbImage> {
    let bytes = std::fs::read(&item.image).map_err(io_err(&item.image))?;
    let img = image::load_from_memory(&bytes)
        .map_err(|e| DatasetError::Invalid {
            path: item.image.clone(),
            why: format!("does not decode as an image ({e}); delete or replace it"),
        })?
        .to_rgb8();
    if (img.width(), img.height()) != (item.width, item.height) {
        return Err(DatasetError::Invalid {
            path: item.image.clone(),
            why: format!("is {}x{}, but its annotation says {}x{}", img.width(), img.height(), item.width, item.height),
        });
    }
    Ok(img)
}

impl DetectionSource {
    /// Images in the split.
    pub fn len(&self) -> usize {
        self.set.items.len()
    }

    /// Whether the split is empty.
    pub fn is_empty(&self) -> bool {
        self.set.items.is_empty()
    }

    /// Sample `i` with the crop and flips drawn from the random bits `r`: `3 x h x w` floats and
    /// its boxes.
    pub fn sample(&self, i: usize, r: u64) -> Result<(Vec<f32>, Vec<Object>)> {
        let item = &self.set.items[i];
        let (h, w) = self.size;
        let mut img = decode(item)?;
        let mut objects = item.objects.clone();
        if self.crop > 0.0 && self.crop < 1.0 {
            let mut rng = Stream::new(r);
            let f = rng.uniform(f64::from(self.crop), 1.0);
            let (cw, ch) =
                ((f * item.width as f64).round().max(1.0) as u32, (f * item.height as f64).round().max(1.0) as u32);
            let x0 = (rng.next_f64() * f64::from(item.width - cw + 1)) as u32;
            let y0 = (rng.next_f64() * f64::from(item.height - ch + 1)) as u32;
            img = image::imageops::crop_imm(&img, x0, y0, cw, ch).to_image();
            objects = crop_objects(&objects, (x0, y0), (cw, ch));
        }
        let (iw, ih) = (img.width(), img.height());
        let mut img = resize(&img, w as u32, h as u32, FilterType::Triangle);
        scale_boxes(&mut objects, w as f32 / iw as f32, h as f32 / ih as f32);
        if self.hflip && r & 1 == 1 {
            image::imageops::flip_horizontal_in_place(&mut img);
            flip_boxes(&mut objects, w as f32);
        }
        if self.vflip && r & 2 == 2 {
            image::imageops::flip_vertical_in_place(&mut img);
            for o in &mut objects {
                let [x1, y1, x2, y2] = o.bbox;
                o.bbox = [x1, h as f32 - y2, x2, h as f32 - y1];
            }
        }
        let plane = h * w;
        let mut out = vec![0f32; 3 * plane];
        for (p, px) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + p] = (f32::from(px.0[c]) / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok((out, objects))
    }

    /// The batch of `indices`, flipped with the stream of `seed` and `epoch`, built in parallel.
    pub fn batch(&self, indices: &[usize], seed: u64, epoch: u64) -> Result<DetectionBatch> {
        let (h, w) = self.size;
        let samples: Vec<(Vec<f32>, Vec<Object>)> = indices
            .par_iter()
            .map(|&i| self.sample(i, mix(seed ^ mix(epoch.wrapping_mul(0x1000_0000) ^ i as u64))))
            .collect::<Result<_>>()?;
        let mut images = Vec::with_capacity(indices.len() * 3 * h * w);
        let mut objects = Vec::with_capacity(indices.len());
        for (px, o) in samples {
            images.extend_from_slice(&px);
            objects.push(o);
        }
        Ok(DetectionBatch { images, dims: [indices.len(), 3, h, w], objects, indices: indices.to_vec() })
    }
}

/// The objects of a crop of `w x h` at `(x0, y0)`: those whose box centre lies inside it, clipped
/// to it and moved into its pixels (SSD's rule for its random crops).
pub fn crop_objects(objects: &[Object], (x0, y0): (u32, u32), (w, h): (u32, u32)) -> Vec<Object> {
    let (x0, y0, x1, y1) = (x0 as f32, y0 as f32, (x0 + w) as f32, (y0 + h) as f32);
    objects
        .iter()
        .filter(|o| {
            let (cx, cy) = ((o.bbox[0] + o.bbox[2]) / 2.0, (o.bbox[1] + o.bbox[3]) / 2.0);
            cx > x0 && cx < x1 && cy > y0 && cy < y1
        })
        .map(|o| {
            let [a, b, c, d] = o.bbox;
            Object { bbox: [a.max(x0) - x0, b.max(y0) - y0, c.min(x1) - x0, d.min(y1) - y0], ..o.clone() }
        })
        .collect()
}

/// The batches of one epoch of `src` (shuffled with `seed` and `epoch` when `shuffle`), after the
/// first `skip`, assembled ahead by a background thread; the last, short batch is kept.
pub fn detection_epoch(
    src: Arc<DetectionSource>,
    batch: usize,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    skip: usize,
) -> Result<Receiver<Result<DetectionBatch>>> {
    if batch == 0 || src.is_empty() {
        return Err(DatasetError::Invalid {
            path: "loader".into(),
            why: format!("needs a batch size above 0 and data (got {batch} and {} images)", src.len()),
        });
    }
    let order = if shuffle { epoch_order(src.len(), seed, epoch) } else { (0..src.len()).collect() };
    prefetched(order, batch, skip, 2, move |chunk| src.batch(chunk, seed, epoch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 40x20 image, black but for a white 10x6 box at x 10..20, y 2..8.
    fn square(dir: &std::path::Path) -> DetectionItem {
        let path = dir.join("sq.png");
        image::RgbImage::from_fn(40, 20, |x, y| {
            if (10..20).contains(&x) && (2..8).contains(&y) { image::Rgb([255; 3]) } else { image::Rgb([0; 3]) }
        })
        .save(&path)
        .unwrap();
        DetectionItem {
            image: path,
            width: 40,
            height: 20,
            objects: vec![Object { class: 0, bbox: [10.0, 2.0, 20.0, 8.0], difficult: false }],
        }
    }

    #[test]
    fn resizes_and_flips_move_the_boxes_with_the_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let set = DetectionSet { classes: vec!["sq".into()], items: vec![square(dir.path())], empty_boxes: 0 };
        let src =
            DetectionSource { set, size: (40, 80), mean: [0.0; 3], std: [1.0; 3], hflip: true, vflip: true, crop: 0.0 };
        for r in 0..4u64 {
            let (px, objs) = src.sample(0, r).unwrap();
            let want = match r {
                0 => [20.0, 4.0, 40.0, 16.0],
                1 => [40.0, 4.0, 60.0, 16.0],
                2 => [20.0, 24.0, 40.0, 36.0],
                _ => [40.0, 24.0, 60.0, 36.0],
            };
            assert_eq!(objs[0].bbox, want, "r = {r}");
            // Pixels well inside the box are white, well outside black, in every channel.
            for c in 0..3 {
                for y in 0..40usize {
                    for x in 0..80usize {
                        let v = px[(c * 40 + y) * 80 + x];
                        let (fx, fy, b) = (x as f32 + 0.5, y as f32 + 0.5, want);
                        if fx > b[0] + 2.0 && fx < b[2] - 2.0 && fy > b[1] + 2.0 && fy < b[3] - 2.0 {
                            assert_eq!(v, 1.0, "({x}, {y}) r = {r}");
                        }
                        if fx < b[0] - 2.0 || fx > b[2] + 2.0 || fy < b[1] - 2.0 || fy > b[3] + 2.0 {
                            assert_eq!(v, 0.0, "({x}, {y}) r = {r}");
                        }
                    }
                }
            }
        }
        // Batches repeat for a seed and epoch, and a resumed epoch continues where it stopped.
        let src = Arc::new(DetectionSource {
            set: DetectionSet { items: vec![src.set.items[0].clone(); 5], ..src.set.clone() },
            ..src
        });
        let all: Vec<_> =
            detection_epoch(src.clone(), 2, true, 3, 1, 0).unwrap().into_iter().map(|b| b.unwrap()).collect();
        assert_eq!(all.iter().map(|b| b.indices.len()).collect::<Vec<_>>(), vec![2, 2, 1]);
        let rest: Vec<_> = detection_epoch(src, 2, true, 3, 1, 1).unwrap().into_iter().map(|b| b.unwrap()).collect();
        assert_eq!(rest, all[1..]);
    }

    #[test]
    fn crops_keep_the_boxes_whose_centre_they_hold_and_move_them_with_the_pixels() {
        let o = |bbox| Object { class: 0, bbox, difficult: false };
        let objects = [o([0.0, 0.0, 10.0, 10.0]), o([30.0, 30.0, 50.0, 60.0]), o([90.0, 0.0, 100.0, 4.0])];
        // A crop at (20, 25) of 40 x 40: the first box's centre is outside, the second's inside
        // (clipped at the bottom), the third's outside.
        assert_eq!(crop_objects(&objects, (20, 25), (40, 40)), vec![o([10.0, 5.0, 30.0, 35.0])]);
        // Random crops of a real-sized image: boxes inside the output, the same for the same bits.
        let dir = tempfile::tempdir().unwrap();
        let set = DetectionSet { classes: vec!["sq".into()], items: vec![square(dir.path())], empty_boxes: 0 };
        let src = DetectionSource {
            set,
            size: (20, 40),
            mean: [0.0; 3],
            std: [1.0; 3],
            hflip: false,
            vflip: false,
            crop: 0.5,
        };
        let mut kept = 0;
        for r in 0..200u64 {
            let (px, objs) = src.sample(0, r).unwrap();
            assert_eq!((px.len(), src.sample(0, r).unwrap().1), (3 * 20 * 40, objs.clone()));
            for b in &objs {
                assert!(b.bbox[0] >= 0.0 && b.bbox[1] >= 0.0 && b.bbox[2] <= 40.0 && b.bbox[3] <= 20.0, "{b:?}");
                // The box still covers white pixels and the pixels outside it are black.
                let (cx, cy) = (((b.bbox[0] + b.bbox[2]) / 2.0) as usize, ((b.bbox[1] + b.bbox[3]) / 2.0) as usize);
                assert!(px[cy * 40 + cx] > 0.5, "r = {r}: the box centre is not on the square");
            }
            kept += objs.len();
        }
        assert!((50..200).contains(&kept), "{kept} of 200 crops hold the square");
    }
}
