//! A decoded RGB image, the pixels every image reader hands on (image folders, detection sets)
//! and the transforms take: kept apart from the readers and the transforms so that neither
//! depends on the other.

/// A decoded RGB image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Pixels, row-major, three bytes (R, G, B) each.
    pub data: Vec<u8>,
}

impl DecodedImage {
    /// The image as `3 x height x width` bytes (planar, as the loader stores images).
    pub fn to_planar(&self) -> Vec<u8> {
        let plane = self.width * self.height;
        let mut planar = vec![0u8; 3 * plane];
        for (p, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                planar[c * plane + p] = px[c];
            }
        }
        planar
    }

    /// The image as `3 x height x width` floats, each channel normalised as
    /// `(v / 255 - mean[c]) / std[c]`.
    pub fn to_chw(&self, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
        let plane = self.width * self.height;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in self.data.chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (px[c] as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        out
    }
}
