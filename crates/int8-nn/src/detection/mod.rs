//! The gradient-free machinery of the detectors, on plain slices (no tensors, no tape), with
//! torchvision's semantics (`torchvision/ops/boxes.py`, `torchvision/models/detection/_utils.py`,
//! `anchor_utils.py`, `rpn.py`, `roi_heads.py`, `ssd.py`, `retinanet.py`): what SSD (Liu et al.,
//! ECCV 2016), SSDLite (Sandler et al., CVPR 2018), Faster R-CNN (Ren et al., NeurIPS 2015) and
//! RetinaNet (Lin et al., ICCV 2017) do around their networks.
//!
//! Boxes are `[x1, y1, x2, y2]` in pixels unless a function says otherwise. Arithmetic is in `f32`
//! in the order torchvision's CPU ops take it, so that results equal torchvision's up to the last
//! bit of `exp`, `ln` and `sqrt`, whose vectorised torch versions may differ by an ulp.
//!
//! - [`boxes`]: area, the one IoU formula, clipping, small-box removal, the box coder.
//! - [`anchors`]: the anchors of Faster R-CNN and RetinaNet, the default boxes of SSD and SSDLite.
//! - [`nms`]: greedy non-maximum suppression, per class or over all boxes.
//! - [`matching`]: the IoU matchers assigning ground truth to anchors or proposals.
//! - [`sampling`]: the positive/negative sampler, the RPN's proposal selection and the RoI head's
//!   training samples.

pub mod anchors;
pub mod boxes;
pub mod matching;
pub mod nms;
pub mod sampling;

use crate::error::NnError;

/// An error for bad input to the function `op`.
fn bad_input(op: &str, why: impl Into<String>) -> NnError {
    NnError::BadInput { layer: op.to_string(), why: why.into() }
}

/// Checks that `a` and `b` have the same length.
fn same_len(op: &str, what: (&str, usize), other: (&str, usize)) -> crate::Result<()> {
    if what.1 == other.1 {
        return Ok(());
    }
    Err(NnError::Shape(format!("{op}: {} {} but {} {}; pass one per box", what.1, what.0, other.1, other.0)))
}

/// A random box from `r`'s values at `4 i .. 4 i + 4`: a corner in `[0, 100)^2`, sides in
/// `[1, 51)`.
#[cfg(test)]
fn random_box(r: &int8_core::rng::CounterRng, i: u64) -> [f32; 4] {
    let u = |k: u64| r.uniform(4 * i + k) * 100.0;
    let (x, y) = (u(0), u(1));
    [x, y, x + 1.0 + u(2) * 0.5, y + 1.0 + u(3) * 0.5]
}
