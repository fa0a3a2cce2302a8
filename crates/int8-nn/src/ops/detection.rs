//! The detection heads' ops, on `int8-core`'s kernels: RoIAlign (Faster R-CNN's box head),
//! nearest upsampling to an exact size (FPN's top-down path), SSD's L2 normalisation with a
//! learned scale, and the losses (smooth L1, the sigmoid focal loss of RetinaNet, SSD's MultiBox
//! loss), each a scalar to call backward on.

use int8_core::nn::detection::{self, Nchw, RoiAlign};
use int8_core::nn::detection_loss;

use super::{cpu_out, zeros};
use crate::error::{NnError, Result};
use crate::tape::{Backward, record};
use crate::tensor::{Shape, Tensor};

fn nchw(op: &str, x: &Tensor) -> Result<Nchw> {
    match *x.dims() {
        [n, c, h, w] => Ok(Nchw { n, c, h, w }),
        _ => Err(NnError::Shape(format!("{op} needs an NCHW input, got shape {}", x.shape()))),
    }
}

/// RoIAlign of `x` over `rois` (`[batch index, x1, y1, x2, y2]` in image coordinates):
/// `rois x c x pooled.0 x pooled.1`.
pub fn roi_align(x: &Tensor, rois: &[[f32; 5]], cfg: RoiAlign) -> Result<Tensor> {
    let _t = crate::profile::span("roi-align", false);
    let d = nchw("RoIAlign", x)?;
    let out = Shape::from([rois.len(), d.c, cfg.pooled.0, cfg.pooled.1]);
    let mut y = zeros(out.elem_count());
    detection::roi_align(&cfg, d, x.cpu()?, rois, &mut y)?;
    let y = cpu_out(y, out);
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output("roi-align", y, RoiAlignBackward { cfg, d, rois: rois.to_vec(), x: x.shape().clone() }),
    })
}

struct RoiAlignBackward {
    cfg: RoiAlign,
    d: Nchw,
    rois: Vec<[f32; 5]>,
    x: Shape,
}

impl Backward for RoiAlignBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut dx = zeros(self.d.len());
        detection::roi_align_backward(&self.cfg, self.d, grad.cpu()?, &self.rois, &mut dx)?;
        Ok(vec![Some(cpu_out(dx, self.x))])
    }
}

/// Each plane of `x` resized to `size` (height, width) by nearest neighbour.
pub fn upsample_nearest(x: &Tensor, size: (usize, usize)) -> Result<Tensor> {
    let _t = crate::profile::span("upsample-nearest", false);
    let d = nchw("upsampling", x)?;
    let out = Shape::from([d.n, d.c, size.0, size.1]);
    let mut y = zeros(out.elem_count());
    detection::upsample_nearest(d, size, x.cpu()?, &mut y)?;
    let y = cpu_out(y, out);
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output("upsample-nearest", y, UpsampleBackward { d, size, x: x.shape().clone() }),
    })
}

struct UpsampleBackward {
    d: Nchw,
    size: (usize, usize),
    x: Shape,
}

impl Backward for UpsampleBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut dx = zeros(self.d.len());
        detection::upsample_nearest_backward(self.d, self.size, grad.cpu()?, &mut dx)?;
        Ok(vec![Some(cpu_out(dx, self.x))])
    }
}

/// SSD's L2Norm: each pixel's channel vector of `x` scaled to unit length, times `weight` (one
/// value per channel).
pub fn l2norm(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let _t = crate::profile::span("l2norm", false);
    let d = nchw("L2Norm", x)?;
    let mut y = zeros(d.len());
    let norms = detection::l2norm(d, x.cpu()?, weight.cpu()?, &mut y)?;
    let y = cpu_out(y, x.shape());
    Ok(match record(&[x, weight]) {
        None => y,
        Some(r) => r.output("l2norm", y, L2NormBackward { d, x: x.detach(), weight: weight.detach(), norms }),
    })
}

struct L2NormBackward {
    d: Nchw,
    x: Tensor,
    weight: Tensor,
    norms: Vec<f32>,
}

impl Backward for L2NormBackward {
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let mut dx = zeros(self.d.len());
        let dw =
            detection::l2norm_backward(self.d, self.x.cpu()?, self.weight.cpu()?, &self.norms, grad.cpu()?, &mut dx)?;
        Ok(vec![needs[0].then(|| cpu_out(dx, self.x.shape())), needs[1].then(|| cpu_out(dw, self.weight.shape()))])
    }

    fn saved_bytes(&self) -> usize {
        4 * (self.x.elem_count() + self.norms.len())
    }
}

/// A loss whose gradient with respect to its one tracked input was computed in the forward pass:
/// the backward pass scales it by the incoming gradient.
struct ScaledGrad {
    grads: Vec<(Vec<f32>, Shape)>,
}

impl Backward for ScaledGrad {
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        let scale = grad.to_scalar()?;
        Ok(self
            .grads
            .into_iter()
            .zip(needs)
            .map(|((mut g, shape), &need)| {
                need.then(|| {
                    g.iter_mut().for_each(|v| *v *= scale);
                    cpu_out(g, shape)
                })
            })
            .collect())
    }

    fn saved_bytes(&self) -> usize {
        4 * self.grads.iter().map(|g| g.0.len()).sum::<usize>()
    }
}

/// A scalar loss from `(loss, gradients)` of `inputs`.
fn loss_output(name: &'static str, inputs: &[&Tensor], loss: f64, grads: Vec<Vec<f32>>) -> Tensor {
    let y = cpu_out(vec![loss as f32], ());
    match record(inputs) {
        None => y,
        Some(r) => {
            let grads = grads.into_iter().zip(inputs).map(|(g, t)| (g, t.shape().clone())).collect();
            r.output(name, y, ScaledGrad { grads })
        }
    }
}

/// The sum of smooth L1 over `pred - target` (`target` as long as `pred`), with `beta`.
pub fn smooth_l1(pred: &Tensor, target: &[f32], beta: f32) -> Result<Tensor> {
    let _t = crate::profile::span("smooth-l1", false);
    let s = detection_loss::smooth_l1(pred.cpu()?, target, beta)?;
    Ok(loss_output("smooth-l1", &[pred], s.loss, vec![s.grad]))
}

/// The sum of the sigmoid focal loss of `logits` against 0/1 `targets` (as long as `logits`).
pub fn sigmoid_focal(logits: &Tensor, targets: &[f32], alpha: f32, gamma: f32) -> Result<Tensor> {
    let _t = crate::profile::span("sigmoid-focal", false);
    let s = detection_loss::sigmoid_focal(logits.cpu()?, targets, alpha, gamma)?;
    Ok(loss_output("sigmoid-focal", &[logits], s.loss, vec![s.grad]))
}

/// SSD's MultiBox loss in its two parts, whose sum is trained; each is a scalar tensor with its
/// own gradient (the classification part's to the logits, the box part's to the regression).
#[derive(Debug, Clone)]
pub struct MultiBoxLoss {
    /// Cross-entropy over the positives and the kept hard negatives, over the positive count.
    pub classification: Tensor,
    /// Smooth L1 over the positives' encoded boxes, over the positive count.
    pub box_regression: Tensor,
    /// Matched default boxes in the batch.
    pub positives: usize,
}

/// SSD's MultiBox loss of `cls_logits` (`images x anchors x classes`) and `box_reg`
/// (`images x anchors x 4`) against per-anchor `labels` (0 for background) and encoded
/// `box_targets`, with `neg_ratio` hard negatives per positive.
pub fn multibox(
    cls_logits: &Tensor,
    box_reg: &Tensor,
    labels: &[u32],
    box_targets: &[f32],
    neg_ratio: usize,
) -> Result<MultiBoxLoss> {
    let _t = crate::profile::span("multibox", false);
    let &[images, anchors, classes] = cls_logits.dims() else {
        return Err(NnError::Shape(format!(
            "class logits must be images x anchors x classes, got {}",
            cls_logits.shape()
        )));
    };
    if box_reg.dims() != [images, anchors, 4] {
        return Err(NnError::Shape(format!(
            "box regression of shape {} for logits {}",
            box_reg.shape(),
            cls_logits.shape()
        )));
    }
    let m = detection_loss::multibox(
        (images, anchors, classes),
        cls_logits.cpu()?,
        box_reg.cpu()?,
        labels,
        box_targets,
        neg_ratio,
    )?;
    Ok(MultiBoxLoss {
        classification: loss_output("multibox-classification", &[cls_logits], m.cls_loss, vec![m.cls_grad]),
        box_regression: loss_output("multibox-boxes", &[box_reg], m.box_loss, vec![m.box_grad]),
        positives: m.positives,
    })
}
