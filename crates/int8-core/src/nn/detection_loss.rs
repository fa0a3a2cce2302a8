//! The detectors' losses, each with its gradient, as torchvision computes them: smooth L1 (Fast
//! R-CNN's box regression, `F.smooth_l1_loss` with `beta`), the sigmoid focal loss (Lin et al.,
//! "Focal Loss for Dense Object Detection", ICCV 2017; `torchvision.ops.sigmoid_focal_loss`),
//! and SSD's MultiBox loss (Liu et al., ECCV 2016, as `torchvision.models.detection.SSD` computes
//! it: smooth L1 over the matched default boxes plus softmax cross-entropy over them and the
//! hardest negatives, three negatives per positive in each image, both divided by the number of
//! positives). Sums run in f64.

use crate::error::{CoreError, Result, check_len};

/// A loss and its gradient with respect to its input.
#[derive(Debug, Clone, PartialEq)]
pub struct LossGrad {
    /// The loss.
    pub loss: f64,
    /// Its gradient, one value per input value.
    pub grad: Vec<f32>,
}

/// `sum over i of smooth_l1(pred[i] - target[i])`, where `smooth_l1(d) = 0.5 d^2 / beta` for
/// `|d| < beta` and `|d| - 0.5 beta` otherwise (`|d|` for `beta = 0`).
pub fn smooth_l1(pred: &[f32], target: &[f32], beta: f32) -> Result<LossGrad> {
    check_len("smooth L1 target", target.len(), pred.len())?;
    if !(beta >= 0.0 && beta.is_finite()) {
        return Err(CoreError::InvalidArgument { what: "smooth L1 beta", why: format!("{beta} is not a number >= 0") });
    }
    let (mut loss, mut grad) = (0f64, Vec::with_capacity(pred.len()));
    for (&p, &t) in pred.iter().zip(target) {
        let d = p - t;
        let (l, g) = if d.abs() < beta { (0.5 * d * d / beta, d / beta) } else { (d.abs() - 0.5 * beta, d.signum()) };
        loss += f64::from(l);
        grad.push(g);
    }
    Ok(LossGrad { loss, grad })
}

/// `sum over i of focal(logits[i], targets[i])` with `p = sigmoid(x)`,
/// `ce = -[t log p + (1 - t) log(1 - p)]`, `p_t = p t + (1 - p)(1 - t)`,
/// `focal = a_t (1 - p_t)^gamma ce`, `a_t = alpha t + (1 - alpha)(1 - t)` (no weighting for a
/// negative `alpha`). Targets are 0 or 1 (soft targets in between are allowed).
pub fn sigmoid_focal(logits: &[f32], targets: &[f32], alpha: f32, gamma: f32) -> Result<LossGrad> {
    check_len("focal loss targets", targets.len(), logits.len())?;
    let (mut loss, mut grad) = (0f64, Vec::with_capacity(logits.len()));
    let (alpha, gamma) = (f64::from(alpha), f64::from(gamma));
    for (&x, &t) in logits.iter().zip(targets) {
        let (x, t) = (f64::from(x), f64::from(t));
        let p = 1.0 / (1.0 + (-x).exp());
        // BCE with logits, stably; and d ce / dx = p - t.
        let ce = x.max(0.0) - x * t + (-x.abs()).exp().ln_1p();
        let pt = p * t + (1.0 - p) * (1.0 - t);
        let m = 1.0 - pt;
        let at = if alpha >= 0.0 { alpha * t + (1.0 - alpha) * (1.0 - t) } else { 1.0 };
        // d m / dx = -(t - (1 - t)) p (1 - p) = (1 - 2t) p (1 - p).
        let dm = (1.0 - 2.0 * t) * p * (1.0 - p);
        let mg = if gamma == 0.0 { 1.0 } else { m.powf(gamma) };
        let dmg = if gamma == 0.0 { 0.0 } else { gamma * m.powf(gamma - 1.0) * dm };
        loss += at * mg * ce;
        grad.push((at * (dmg * ce + mg * (p - t))) as f32);
    }
    Ok(LossGrad { loss, grad })
}

/// What the MultiBox loss reports.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiBox {
    /// The total loss (box regression plus classification), as trained on.
    pub loss: f64,
    /// Its box-regression part.
    pub box_loss: f64,
    /// Its classification part.
    pub cls_loss: f64,
    /// Matched (positive) default boxes over the batch.
    pub positives: usize,
    /// Gradient with respect to the class logits (`images x anchors x classes`).
    pub cls_grad: Vec<f32>,
    /// Gradient with respect to the box regression (`images x anchors x 4`).
    pub box_grad: Vec<f32>,
}

/// SSD's loss over `images` images of `anchors` default boxes: `cls_logits` is
/// `images x anchors x classes`, `box_reg` and `box_targets` are `images x anchors x 4` (the
/// targets encoded for matched boxes; ignored elsewhere), `labels` is `images x anchors` with 0
/// for background and the class otherwise. Positives are the boxes with a label above 0; in each
/// image the `neg_ratio` times as many negatives with the highest cross-entropy are kept (ties to
/// the lower index, as a stable sort gives). The loss is `(smooth L1 over positives + CE over
/// positives and kept negatives) / max(1, positives)`.
pub fn multibox(
    (images, anchors, classes): (usize, usize, usize),
    cls_logits: &[f32],
    box_reg: &[f32],
    labels: &[u32],
    box_targets: &[f32],
    neg_ratio: usize,
) -> Result<MultiBox> {
    check_len("class logits", cls_logits.len(), images * anchors * classes)?;
    check_len("box regression", box_reg.len(), images * anchors * 4)?;
    check_len("box targets", box_targets.len(), images * anchors * 4)?;
    check_len("labels", labels.len(), images * anchors)?;
    if let Some(&l) = labels.iter().find(|&&l| l as usize >= classes) {
        return Err(CoreError::InvalidArgument {
            what: "label",
            why: format!("{l} is not below the {classes} classes (0 is background)"),
        });
    }
    // Per-anchor cross-entropy and its gradient for a weight of 1.
    let ce = crate::nn::loss::softmax_cross_entropy(cls_logits, classes, labels)?;
    let rows = images * anchors;
    // softmax_cross_entropy averages over its rows: undo that per row.
    let per_row: Vec<f64> = (0..rows)
        .map(|r| {
            let z = &cls_logits[r * classes..(r + 1) * classes];
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = z.iter().map(|&v| (f64::from(v) - max).exp()).sum();
            sum.ln() - (f64::from(z[labels[r] as usize]) - max)
        })
        .collect();
    let mut keep = vec![false; rows];
    let mut positives = 0;
    for i in 0..images {
        let range = i * anchors..(i + 1) * anchors;
        let pos: Vec<usize> = range.clone().filter(|&r| labels[r] > 0).collect();
        positives += pos.len();
        for &r in &pos {
            keep[r] = true;
        }
        let mut neg: Vec<usize> = range.filter(|&r| labels[r] == 0).collect();
        // Highest loss first; equal losses keep their order.
        neg.sort_by(|&a, &b| per_row[b].total_cmp(&per_row[a]));
        for &r in neg.iter().take(neg_ratio * pos.len()) {
            keep[r] = true;
        }
    }
    let n = positives.max(1) as f64;
    let mut cls_grad = vec![0f32; cls_logits.len()];
    let mut cls_loss = 0f64;
    for r in (0..rows).filter(|&r| keep[r]) {
        cls_loss += per_row[r];
        for k in 0..classes {
            // ce.grad is (softmax - onehot) / rows.
            cls_grad[r * classes + k] = (f64::from(ce.grad[r * classes + k]) * rows as f64 / n) as f32;
        }
    }
    let mut box_grad = vec![0f32; box_reg.len()];
    let mut box_loss = 0f64;
    for r in (0..rows).filter(|&r| labels[r] > 0) {
        let s = smooth_l1(&box_reg[r * 4..r * 4 + 4], &box_targets[r * 4..r * 4 + 4], 1.0)?;
        box_loss += s.loss;
        for (k, g) in s.grad.iter().enumerate() {
            box_grad[r * 4 + k] = (f64::from(*g) / n) as f32;
        }
    }
    let (box_loss, cls_loss) = (box_loss / n, cls_loss / n);
    Ok(MultiBox { loss: box_loss + cls_loss, box_loss, cls_loss, positives, cls_grad, box_grad })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::CounterRng;

    fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let r = CounterRng::new(seed);
        (0..n).map(|i| (r.uniform(i as u64) * 2.0 - 1.0) * scale).collect()
    }

    /// Central differences of `f` at every input.
    fn fd(x: &[f32], f: impl Fn(&[f32]) -> f64) -> Vec<f64> {
        (0..x.len())
            .map(|i| {
                let (mut p, mut m) = (x.to_vec(), x.to_vec());
                p[i] += 1e-3;
                m[i] -= 1e-3;
                (f(&p) - f(&m)) / 2e-3
            })
            .collect()
    }

    #[test]
    fn smooth_l1_and_focal_losses_match_their_definitions_and_gradients() {
        let (p, t) = (data(40, 1, 2.0), data(40, 2, 2.0));
        for beta in [0.0f32, 1.0 / 9.0, 1.0] {
            let s = smooth_l1(&p, &t, beta).unwrap();
            let f = |p: &[f32]| -> f64 {
                p.iter()
                    .zip(&t)
                    .map(|(&a, &b)| {
                        let d = f64::from(a) - f64::from(b);
                        if d.abs() < f64::from(beta) {
                            0.5 * d * d / f64::from(beta)
                        } else {
                            d.abs() - 0.5 * f64::from(beta)
                        }
                    })
                    .sum()
            };
            assert!((s.loss - f(&p)).abs() < 1e-5, "beta {beta}");
            for (i, (g, want)) in s.grad.iter().zip(fd(&p, f)).enumerate() {
                assert!((f64::from(*g) - want).abs() < 1e-2, "beta {beta} [{i}]: {g} vs {want}");
            }
        }
        let x = data(30, 3, 4.0);
        let targets: Vec<f32> = (0..30).map(|i| if i % 3 == 0 { 1.0 } else { 0.0 }).collect();
        for (alpha, gamma) in [(0.25f32, 2.0f32), (-1.0, 0.0), (0.5, 1.5)] {
            let s = sigmoid_focal(&x, &targets, alpha, gamma).unwrap();
            let f = |x: &[f32]| -> f64 {
                x.iter()
                    .zip(&targets)
                    .map(|(&x, &t)| {
                        let (x, t) = (f64::from(x), f64::from(t));
                        let p = 1.0 / (1.0 + (-x).exp());
                        let ce = -(t * p.ln() + (1.0 - t) * (1.0 - p).ln());
                        let pt = p * t + (1.0 - p) * (1.0 - t);
                        let at = if alpha >= 0.0 {
                            f64::from(alpha) * t + (1.0 - f64::from(alpha)) * (1.0 - t)
                        } else {
                            1.0
                        };
                        at * (1.0 - pt).powf(f64::from(gamma)) * ce
                    })
                    .sum()
            };
            assert!((s.loss - f(&x)).abs() < 1e-6 * f(&x).abs().max(1.0), "alpha {alpha} gamma {gamma}");
            for (i, (g, want)) in s.grad.iter().zip(fd(&x, f)).enumerate() {
                assert!((f64::from(*g) - want).abs() < 1e-4, "alpha {alpha} gamma {gamma} [{i}]: {g} vs {want}");
            }
        }
    }

    #[test]
    fn multibox_keeps_three_hardest_negatives_per_positive_and_its_gradient_is_right() {
        let (images, anchors, classes) = (2, 12, 4);
        let logits = data(images * anchors * classes, 4, 3.0);
        let reg = data(images * anchors * 4, 5, 1.5);
        let targets = data(images * anchors * 4, 6, 1.5);
        // Image 0: two positives; image 1: one.
        let mut labels = vec![0u32; images * anchors];
        labels[3] = 2;
        labels[7] = 1;
        labels[anchors + 5] = 3;
        let m = multibox((images, anchors, classes), &logits, &reg, &labels, &targets, 3).unwrap();
        assert_eq!(m.positives, 3);
        // The kept negatives: per image, the 3 x positives highest cross-entropies among label 0.
        let ce = |z: &[f32], l: usize| -> f64 {
            let max = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let s: f64 = z.iter().map(|&v| (f64::from(v) - max).exp()).sum();
            s.ln() - (f64::from(z[l]) - max)
        };
        let row_ce: Vec<f64> =
            (0..images * anchors).map(|r| ce(&logits[r * classes..][..classes], labels[r] as usize)).collect();
        let mut want_cls = 0.0;
        for (i, npos) in [(0, 2usize), (1, 1)] {
            let mut neg: Vec<(f64, usize)> =
                (i * anchors..(i + 1) * anchors).filter(|&r| labels[r] == 0).map(|r| (row_ce[r], r)).collect();
            neg.sort_by(|a, b| b.0.total_cmp(&a.0));
            want_cls += neg.iter().take(3 * npos).map(|n| n.0).sum::<f64>();
            want_cls += (i * anchors..(i + 1) * anchors).filter(|&r| labels[r] > 0).map(|r| row_ce[r]).sum::<f64>();
        }
        assert!((m.cls_loss - want_cls / 3.0).abs() < 1e-9, "{} vs {}", m.cls_loss, want_cls / 3.0);
        let want_box: f64 = (0..images * anchors)
            .filter(|&r| labels[r] > 0)
            .map(|r| smooth_l1(&reg[r * 4..r * 4 + 4], &targets[r * 4..r * 4 + 4], 1.0).unwrap().loss)
            .sum::<f64>()
            / 3.0;
        assert!((m.box_loss - want_box).abs() < 1e-9);
        // Gradients: with the kept set fixed (it moves only at ties), central differences.
        let total =
            |l: &[f32], b: &[f32]| multibox((images, anchors, classes), l, b, &labels, &targets, 3).unwrap().loss;
        for (i, want) in fd(&logits, |l| total(l, &reg)).into_iter().enumerate() {
            assert!((f64::from(m.cls_grad[i]) - want).abs() < 1e-3, "cls[{i}]: {} vs {want}", m.cls_grad[i]);
        }
        for (i, want) in fd(&reg, |b| total(&logits, b)).into_iter().enumerate() {
            assert!((f64::from(m.box_grad[i]) - want).abs() < 1e-3, "box[{i}]: {} vs {want}", m.box_grad[i]);
        }
        // No positive anywhere: no negatives kept, a loss of zero and no division by zero.
        let none =
            multibox((images, anchors, classes), &logits, &reg, &vec![0; images * anchors], &targets, 3).unwrap();
        assert_eq!((none.loss, none.positives), (0.0, 0));
        assert!(multibox((images, anchors, classes), &logits, &reg, &vec![4; images * anchors], &targets, 3).is_err());
    }
}
