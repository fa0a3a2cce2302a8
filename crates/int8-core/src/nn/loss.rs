//! Softmax cross-entropy over logits, with its gradient and top-k hits.

use rayon::prelude::*;

use crate::error::{CoreError, Result, check_len};

/// What one batch's loss pass gives.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropy {
    /// Mean negative log-likelihood over the batch.
    pub loss: f64,
    /// Gradient of the mean loss with respect to the logits (`(softmax - onehot) / batch`).
    pub grad: Vec<f32>,
    /// Images whose label is the top prediction.
    pub top1: usize,
    /// Images whose label is among the five top predictions.
    pub top5: usize,
}

/// Softmax cross-entropy of `logits` (`batch x classes`, row-major) against `labels`.
pub fn softmax_cross_entropy(logits: &[f32], classes: usize, labels: &[u32]) -> Result<CrossEntropy> {
    check_len("logits", logits.len(), labels.len() * classes)?;
    if let Some((i, &l)) = labels.iter().enumerate().find(|&(_, &l)| l as usize >= classes) {
        return Err(CoreError::InvalidArgument {
            what: "label",
            why: format!("label {l} of sample {i} is not below the {classes} classes"),
        });
    }
    let batch = labels.len().max(1) as f32;
    let mut grad = vec![0f32; logits.len()];
    let rows: Vec<(f64, bool, bool, bool)> = grad
        .par_chunks_mut(classes)
        .zip(logits.par_chunks(classes))
        .zip(labels.par_iter())
        .map(|((g, z), &label)| {
            let label = label as usize;
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (gi, &v) in g.iter_mut().zip(z) {
                *gi = ((v as f64 - max).exp() / sum) as f32 / batch;
            }
            g[label] -= 1.0 / batch;
            let nll = sum.ln() - (z[label] as f64 - max);
            let above = z.iter().filter(|&&v| v > z[label]).count();
            (nll, above == 0, above < 5, z.iter().all(|v| v.is_finite()))
        })
        .collect();
    if let Some(i) = rows.iter().position(|r| !r.3) {
        return Err(CoreError::NonFinite { name: "logits".into(), value: f32::NAN, index: i * classes });
    }
    Ok(CrossEntropy {
        loss: rows.iter().map(|r| r.0).sum::<f64>() / batch as f64,
        grad,
        top1: rows.iter().filter(|r| r.1).count(),
        top5: rows.iter().filter(|r| r.2).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_gradient_and_hits_match_the_definition() {
        let logits = [2.0f32, 1.0, 0.1, -1.0, 0.5, 3.0];
        let labels = [0u32, 1];
        let ce = softmax_cross_entropy(&logits, 3, &labels).unwrap();
        let nll = |z: &[f32], l: usize| {
            let s: f64 = z.iter().map(|&v| (v as f64).exp()).sum();
            -((z[l] as f64).exp() / s).ln()
        };
        let want = (nll(&logits[..3], 0) + nll(&logits[3..], 1)) / 2.0;
        assert!((ce.loss - want).abs() < 1e-9);
        // Central differences of the mean loss.
        for i in 0..6 {
            let (mut p, mut q) = (logits, logits);
            p[i] += 1e-3;
            q[i] -= 1e-3;
            let f = |z: &[f32]| (nll(&z[..3], 0) + nll(&z[3..], 1)) / 2.0;
            let fd = (f(&p) - f(&q)) / 2e-3;
            assert!((fd - ce.grad[i] as f64).abs() < 1e-4, "grad[{i}]: {fd} vs {}", ce.grad[i]);
        }
        assert_eq!((ce.top1, ce.top5), (1, 2));
        assert!(softmax_cross_entropy(&logits, 3, &[0, 3]).unwrap_err().to_string().contains("label 3"));
        let mut bad = logits;
        bad[4] = f32::NAN;
        assert!(softmax_cross_entropy(&bad, 3, &labels).is_err());
    }
}
