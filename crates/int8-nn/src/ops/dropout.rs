//! Inverted dropout with a mask drawn from a counter-based stream: each value is zeros with
//! probability `p` and the others scaled by `1 / (1 - p)`. The mask is a pure function of the
//! seed, so the backward pass draws it again rather than keeping it.

use int8_core::rng::CounterRng;

use super::cpu_out;
use crate::error::Result;
use crate::tape::{Backward, record};
use crate::tensor::Tensor;

/// The mask value at position `i`: 0, or `1 / (1 - p)`.
fn mask(rng: &CounterRng, p: f32, keep: f32, i: usize) -> f32 {
    if rng.uniform(i as u64) >= p { keep } else { 0.0 }
}

fn apply(x: &[f32], seed: u64, p: f32) -> Vec<f32> {
    let (rng, keep) = (CounterRng::new(seed), 1.0 / (1.0 - p));
    x.iter().enumerate().map(|(i, &v)| v * mask(&rng, p, keep, i)).collect()
}

/// `x` with dropout at rate `p` in `[0, 1)`, its mask drawn from `seed`.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let _t = crate::profile::span("dropout", false);
    #[cfg(feature = "cuda")]
    if let Some(on) = crate::cuda::placement("dropout", &[x])? {
        let y = on.out(gpu_apply(&on, x, seed, p)?, x.shape());
        return Ok(match record(&[x]) {
            None => y,
            Some(r) => r.output("dropout", y, DropoutBackward { seed, p }),
        });
    }
    let y = cpu_out(apply(x.cpu()?, seed, p), x.shape());
    Ok(match record(&[x]) {
        None => y,
        Some(r) => r.output("dropout", y, DropoutBackward { seed, p }),
    })
}

struct DropoutBackward {
    seed: u64,
    p: f32,
}

impl Backward for DropoutBackward {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        #[cfg(feature = "cuda")]
        if let Some(on) = crate::cuda::On::of(&grad) {
            return Ok(vec![Some(on.out(gpu_apply(&on, &grad, self.seed, self.p)?, grad.shape()))]);
        }
        Ok(vec![Some(cpu_out(apply(grad.cpu()?, self.seed, self.p), grad.shape()))])
    }
}

/// The mask applied on a GPU (`int8_core::cuda::nn::dropout` draws the CPU's stream).
#[cfg(feature = "cuda")]
fn gpu_apply(on: &crate::cuda::On, x: &Tensor, seed: u64, p: f32) -> Result<int8_core::cuda::CudaSlice<f32>> {
    let mut y = crate::cuda::zeros(on, x.elem_count())?;
    int8_core::cuda::nn::dropout(on, crate::cuda::dev(x)?, p, seed, &mut y)?;
    Ok(y)
}
