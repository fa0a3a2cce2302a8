//! What the detector tests that compare with torchvision share.

use int8_zoo::detection::Detections;

/// torchvision's post-processed detections of one image, summarised: their count, score sum,
/// coordinate sum and label sum, and the best three (box, score, label).
pub type Summary = (usize, f64, f64, u32, [([f32; 4], f32, u32); 3]);

/// Checks `dets` against torchvision's `want`, image by image: the count and label sum exactly,
/// the best three's labels exactly, their scores within 2e-6 and coordinates within 1e-3. The
/// score and coordinate sums go to `sums(image, score_sum, coordinate_sum, summary)`, which
/// checks them within the caller's tolerance.
pub fn check_against_torchvision(dets: &[Detections], want: &[Summary], sums: impl Fn(usize, f64, f64, &Summary)) {
    for (i, (d, w)) in dets.iter().zip(want).enumerate() {
        assert_eq!(d.scores.len(), w.0, "image {i}");
        let scores: f64 = d.scores.iter().map(|&s| f64::from(s)).sum();
        let coords: f64 = d.boxes.iter().flatten().map(|&c| f64::from(c)).sum();
        sums(i, scores, coords, w);
        assert_eq!(d.labels.iter().sum::<u32>(), w.3, "image {i}");
        for (j, (b, s, l)) in w.4.iter().enumerate() {
            assert_eq!(d.labels[j], *l, "image {i} detection {j}");
            assert!((d.scores[j] - s).abs() < 2e-6, "image {i} detection {j}: {} against {s}", d.scores[j]);
            for c in 0..4 {
                assert!((d.boxes[j][c] - b[c]).abs() < 1e-3, "image {i} detection {j}: {:?} against {b:?}", d.boxes[j]);
            }
        }
    }
}
