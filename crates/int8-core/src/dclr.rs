//! Deviation Counteractive Learning Rate scaling (DCLR; Zhu et al., CVPR 2020, Sec. 4.2, Eq. 11).
//!
//! A quantized gradient that deviates from the true one in direction (cosine distance `d`) should
//! take a smaller step. Each layer's learning rate is multiplied by
//! `phi(d) = max(exp(-alpha * d), beta)`, with `alpha = 20` and `beta = 0.1` as in the paper.

/// DCLR's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dclr {
    /// How fast the multiplier falls with the distance.
    pub alpha: f64,
    /// The floor of the multiplier.
    pub beta: f64,
}

impl Default for Dclr {
    fn default() -> Self {
        Self { alpha: 20.0, beta: 0.1 }
    }
}

impl Dclr {
    /// The learning-rate multiplier for cosine distance `d`.
    pub fn phi(&self, d: f64) -> f64 {
        (-self.alpha * d).exp().max(self.beta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phi_follows_the_paper() {
        let dclr = Dclr::default();
        assert_eq!(dclr.phi(0.0), 1.0);
        assert!((dclr.phi(0.01) - (-0.2f64).exp()).abs() < 1e-15);
        // exp(-20 d) = 0.1 at d = ln(10) / 20 = 0.1151; beyond it the floor holds.
        assert!((dclr.phi(0.1) - (-2.0f64).exp()).abs() < 1e-15);
        assert_eq!(dclr.phi(0.2), 0.1);
        assert_eq!(dclr.phi(1.0), 0.1);
        let custom = Dclr { alpha: 5.0, beta: 0.5 };
        assert!((custom.phi(0.1) - (-0.5f64).exp()).abs() < 1e-15);
        assert_eq!(custom.phi(1.0), 0.5);
    }
}
