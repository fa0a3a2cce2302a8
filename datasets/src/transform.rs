//! ImageNet-style image transforms: random-resized crop and horizontal flip for training, resize
//! and centre crop for evaluation (Szegedy et al. 2015's "Inception" crop, as torchvision's
//! `RandomResizedCrop` draws it), and the counter-based random stream that makes every sample a
//! pure function of (seed, epoch, index), so a resumed run sees the same pixels.

use image::imageops::{FilterType, crop_imm, resize};

use crate::decoded::DecodedImage;

pub(crate) use int8_core::rng::splitmix64 as mix;

/// A counter-based random stream started from one 64-bit draw.
#[derive(Debug, Clone)]
pub struct Stream {
    key: u64,
    counter: u64,
}

impl Stream {
    /// The stream keyed by `key`.
    pub fn new(key: u64) -> Self {
        Self { key, counter: 0 }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.counter += 1;
        mix(self.key ^ mix(self.counter))
    }

    /// A uniform draw from `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform draw from `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// A uniform integer from `0..=max`.
    pub fn below_or_at(&mut self, max: u32) -> u32 {
        (self.next_u64() % (max as u64 + 1)) as u32
    }
}

/// A crop window in pixels: left, top, width, height.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Width.
    pub w: u32,
    /// Height.
    pub h: u32,
}

/// The area and aspect-ratio ranges of a random-resized crop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResizedCrop {
    /// Fraction of the image's area the crop covers, drawn uniformly (0.08 to 1 for ImageNet).
    pub scale: (f64, f64),
    /// Width over height, drawn log-uniformly (3/4 to 4/3 for ImageNet).
    pub ratio: (f64, f64),
}

impl Default for ResizedCrop {
    fn default() -> Self {
        Self { scale: (0.08, 1.0), ratio: (3.0 / 4.0, 4.0 / 3.0) }
    }
}

impl ResizedCrop {
    /// Draws a window of a `width x height` image: up to ten tries at a random area and aspect
    /// ratio that fits, then the largest centred window whose aspect ratio is in range
    /// (torchvision's `RandomResizedCrop.get_params`).
    pub fn window(&self, width: u32, height: u32, rng: &mut Stream) -> Window {
        let area = width as f64 * height as f64;
        let (lr0, lr1) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target = area * rng.uniform(self.scale.0, self.scale.1);
            let aspect = rng.uniform(lr0, lr1).exp();
            let w = (target * aspect).sqrt().round() as u32;
            let h = (target / aspect).sqrt().round() as u32;
            if w > 0 && h > 0 && w <= width && h <= height {
                let x = rng.below_or_at(width - w);
                let y = rng.below_or_at(height - h);
                return Window { x, y, w, h };
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < self.ratio.0 {
            (width, ((width as f64 / self.ratio.0).round() as u32).clamp(1, height))
        } else if in_ratio > self.ratio.1 {
            (((height as f64 * self.ratio.1).round() as u32).clamp(1, width), height)
        } else {
            (width, height)
        };
        Window { x: (width - w) / 2, y: (height - h) / 2, w, h }
    }
}

/// The buffer of `img`, without copying its pixels.
fn buffer(img: DecodedImage) -> image::RgbImage {
    image::RgbImage::from_raw(img.width as u32, img.height as u32, img.data)
        .expect("an DecodedImage holds width * height * 3 bytes")
}

/// The window of `img` resized (bilinear) to `side x side`, mirrored left-right when `flip`.
pub fn crop_resize(img: DecodedImage, win: Window, side: usize, flip: bool) -> DecodedImage {
    let buf = buffer(img);
    let crop = crop_imm(&buf, win.x, win.y, win.w, win.h).to_image();
    let mut out = resize(&crop, side as u32, side as u32, FilterType::Triangle);
    if flip {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    DecodedImage { width: side, height: side, data: out.into_raw() }
}

/// ImageNet's evaluation transform: resize (bilinear) so that the shorter side is `side`, then
/// crop the centre `side x side` square.
pub fn resize_center(img: DecodedImage, side: usize) -> DecodedImage {
    let (w, h) = (img.width as f64, img.height as f64);
    let scale = side as f64 / w.min(h);
    let (nw, nh) = (((w * scale).round() as u32).max(side as u32), ((h * scale).round() as u32).max(side as u32));
    let buf = buffer(img);
    let resized = resize(&buf, nw, nh, FilterType::Triangle);
    let (x0, y0) = ((nw - side as u32) / 2, (nh - side as u32) / 2);
    let crop = crop_imm(&resized, x0, y0, side as u32, side as u32).to_image();
    DecodedImage { width: side, height: side, data: crop.into_raw() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_uniform_and_reproducible() {
        let mut a = Stream::new(7);
        let draws: Vec<f64> = (0..20_000).map(|_| a.next_f64()).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert!(draws.iter().all(|&d| (0.0..1.0).contains(&d)));
        let mut b = Stream::new(7);
        assert_eq!(b.next_f64(), draws[0]);
        assert_ne!(Stream::new(8).next_f64(), draws[0]);
    }

    #[test]
    fn resized_crop_windows_fit_and_follow_the_area_and_ratio_ranges() {
        let rc = ResizedCrop::default();
        let (w, h) = (500u32, 375u32);
        let mut rng = Stream::new(3);
        let mut areas = Vec::new();
        for _ in 0..2000 {
            let win = rc.window(w, h, &mut rng);
            assert!(win.w > 0 && win.h > 0 && win.x + win.w <= w && win.y + win.h <= h, "{win:?}");
            let frac = (win.w * win.h) as f64 / (w * h) as f64;
            let ratio = win.w as f64 / win.h as f64;
            // Rounding to whole pixels moves both by a little.
            assert!((0.07..=1.01).contains(&frac), "area fraction {frac}");
            assert!((0.74..=1.35).contains(&ratio), "ratio {ratio}");
            areas.push(frac);
        }
        // Draws that fit are accepted as drawn, so small and large crops both occur.
        assert!(areas.iter().any(|&a| a < 0.15) && areas.iter().any(|&a| a > 0.85));
        // A very wide image falls back to the widest centred window within the ratio range.
        let rc = ResizedCrop { scale: (1.0, 1.0), ratio: (1.0, 1.0) };
        let win = rc.window(300, 100, &mut rng);
        assert_eq!(win, Window { x: 100, y: 0, w: 100, h: 100 });
    }

    #[test]
    fn crop_resize_and_centre_crop_move_pixels_where_they_belong() {
        // Left half red, right half blue, 8x4.
        let mut data = Vec::new();
        for _y in 0..4 {
            for x in 0..8 {
                data.extend_from_slice(if x < 4 { &[255, 0, 0] } else { &[0, 0, 255] });
            }
        }
        let img = DecodedImage { width: 8, height: 4, data };
        let left = crop_resize(img.clone(), Window { x: 0, y: 0, w: 4, h: 4 }, 2, false);
        assert!(left.data.chunks(3).all(|p| p == [255, 0, 0]), "{:?}", left.data);
        let flipped = crop_resize(img.clone(), Window { x: 2, y: 0, w: 4, h: 4 }, 4, true);
        // The window spans red then blue; mirrored, blue comes first.
        assert_eq!(&flipped.data[..3], &[0, 0, 255]);
        assert_eq!(&flipped.data[9..12], &[255, 0, 0]);
        let centre = resize_center(img, 4);
        assert_eq!((centre.width, centre.height), (4, 4));
        assert_eq!(&centre.data[..3], &[255, 0, 0]);
        assert_eq!(&centre.data[9..12], &[0, 0, 255]);
    }
}
