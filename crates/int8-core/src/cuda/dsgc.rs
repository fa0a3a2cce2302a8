//! Direction Sensitive Gradient Clipping on the GPU (Zhu et al., CVPR 2020, Sec. 4.1), mirroring
//! `crate::dsgc`: the cosine distance `1 - cos(g, Q_c(g))` from the three sums the CPU forms,
//! and the clip search making the CPU's sequence of evaluations.
//!
//! Each 1024-value block's sums and each CPU chunk's sums (16384 values) are the CPU's exactly;
//! only the final addition of the chunks is in index order where the CPU's rayon reduction uses a
//! tree, so a distance can differ from the CPU's by the reassociation of at most `n / 16384`
//! non-negative f64 terms (`g * q >= 0`: a code has its value's sign): below `n / 16384 * 2^-53`
//! relative in each sum, far inside the 1e-6 relative the issue allows, and nothing for up to
//! 16384 values. The search compares distances, so it picks the CPU's clip value unless two
//! compared distances lie that close.

use cudarc::driver::CudaSlice;

use super::Gpu;
use super::quant::{GpuQTensor, max_abs, max_abs_scan, quantize_with_terms, terms_pass};
use crate::dsgc::{ClipChoice, ClipMode, ClipState, ClipUpdate};
use crate::error::Result;
use crate::quant::Rounding;

/// Values per CPU work item of `dsgc::cosine_distance` (`dsgc::CHUNK`).
const DSGC_CHUNK: usize = 1 << 14;
/// Points of the coarse grid (`dsgc::COARSE_POINTS`).
const COARSE_POINTS: usize = 20;
/// Golden-section iterations (`dsgc::REFINE_ITERS`).
const REFINE_ITERS: usize = 18;

/// `1 - cos(g, q)` from the three sums (`dsgc::distance_from_terms`).
fn distance_from_terms(gq: f64, qq: f64, gg: f64) -> f64 {
    if gg == 0.0 {
        return 0.0;
    }
    if qq == 0.0 {
        return 1.0;
    }
    (1.0 - gq / (gg.sqrt() * qq.sqrt())).max(0.0)
}

/// `1 - cos(g, Q_c(g))` for clip value `clip` with nearest rounding (`dsgc::cosine_distance`):
/// 0 for an all-zero gradient, 1 for a clip value that maps everything to zero.
pub fn cosine_distance(gpu: &Gpu, g: &CudaSlice<f32>, clip: f32) -> Result<f64> {
    if clip <= 0.0 {
        // `g.iter().all(|&v| v == 0.0)`: no finite nonzero value and nothing non-finite.
        let (amax, bad) = max_abs_scan(gpu, g)?;
        return Ok(if amax == 0.0 && bad.is_none() { 0.0 } else { 1.0 });
    }
    let (gq, qq, gg) = terms_pass(gpu, g, clip, Rounding::Nearest, DSGC_CHUNK, None)?;
    Ok(distance_from_terms(gq, qq, gg))
}

/// Quantizes `g` at `clip` and measures the cosine distance of the codes produced, in one pass
/// (the pass `dsgc::ClipState::quantize` makes), or an error naming `name`.
pub fn quantize_with_distance(
    gpu: &Gpu,
    name: &str,
    g: &CudaSlice<f32>,
    clip: f32,
    rounding: Rounding,
) -> Result<(GpuQTensor, f64)> {
    let (q, (gq, qq, gg)) = quantize_with_terms(gpu, name, g, clip, rounding)?;
    Ok((q, distance_from_terms(gq, qq, gg)))
}

/// Finds the clip value in `(0, max|g|]` minimising [`cosine_distance`] (`dsgc::search_clip`,
/// line for line: the coarse geometric grid, then golden-section refinement around its best
/// point), or an error naming `name` if `g` holds NaN or an infinity.
pub fn search_clip(gpu: &Gpu, name: &str, g: &CudaSlice<f32>) -> Result<ClipChoice> {
    let amax = max_abs(gpu, name, g)?;
    if amax == 0.0 {
        return Ok(ClipChoice { clip: 0.0, distance: 0.0, evaluations: 0 });
    }
    let mut evaluations = 0;
    let mut eval = |c: f32| -> Result<f64> {
        evaluations += 1;
        cosine_distance(gpu, g, c)
    };
    let ratio = 1000f64.powf(1.0 / (COARSE_POINTS - 1) as f64);
    let grid: Vec<f32> =
        (0..COARSE_POINTS).map(|i| (amax as f64 / ratio.powi((COARSE_POINTS - 1 - i) as i32)) as f32).collect();
    let dist: Vec<f64> = grid.iter().map(|&c| eval(c)).collect::<Result<_>>()?;
    let best = (0..COARSE_POINTS).min_by(|&a, &b| dist[a].total_cmp(&dist[b])).unwrap_or(COARSE_POINTS - 1);
    let (mut best_c, mut best_d) = (grid[best], dist[best]);
    let mut lo = if best == 0 { grid[0] / ratio as f32 } else { grid[best - 1] } as f64;
    let mut hi = if best + 1 == COARSE_POINTS { amax } else { grid[best + 1] } as f64;
    const INV_PHI: f64 = 0.618_033_988_749_894_9;
    let mut x1 = hi - INV_PHI * (hi - lo);
    let mut x2 = lo + INV_PHI * (hi - lo);
    let mut d1 = eval(x1 as f32)?;
    let mut d2 = eval(x2 as f32)?;
    for _ in 0..REFINE_ITERS {
        if d1 <= d2 {
            hi = x2;
            (x2, d2) = (x1, d1);
            x1 = hi - INV_PHI * (hi - lo);
            d1 = eval(x1 as f32)?;
        } else {
            lo = x1;
            (x1, d1) = (x2, d2);
            x2 = lo + INV_PHI * (hi - lo);
            d2 = eval(x2 as f32)?;
        }
    }
    for (c, d) in [(x1, d1), (x2, d2)] {
        if d < best_d {
            (best_c, best_d) = (c as f32, d);
        }
    }
    Ok(ClipChoice { clip: best_c, distance: best_d, evaluations })
}

/// `ClipState::quantize` on the GPU, step for step: the clip value (`max|g|`, the one in force, or
/// a search when one is due), one fused pass that quantizes `g` and measures the distance of the
/// codes it made, and a search and a second pass when the value in force has gone stale. The state
/// advances exactly as the CPU's does, so a layer can move between the CPU and the GPU.
pub fn clip_quantize(
    gpu: &Gpu,
    state: &mut ClipState,
    name: &str,
    g: &CudaSlice<f32>,
    rounding: Rounding,
) -> Result<(GpuQTensor, ClipUpdate)> {
    let search = |state: &mut ClipState| -> Result<f32> {
        let choice = search_clip(gpu, name, g)?;
        state.snap.searches += 1;
        state.snap.clip = Some(choice.clip);
        Ok(choice.clip)
    };
    let mut searched = state.periodic_due();
    let clip = match state.mode {
        ClipMode::MaxAbs => max_abs(gpu, name, g)?,
        ClipMode::Dsgc { .. } if searched => search(state)?,
        ClipMode::Dsgc { .. } => state.snap.clip.unwrap_or(0.0),
    };
    state.snap.calls += 1;
    state.snap.clip = Some(clip);
    let pass = |clip: f32, searched: bool| -> Result<(GpuQTensor, ClipUpdate)> {
        let (q, distance) = quantize_with_distance(gpu, name, g, clip, rounding)?;
        Ok((q, ClipUpdate { clip, distance, searched }))
    };
    let (mut q, mut up) = pass(clip, searched)?;
    if !searched && state.stale(up.distance) {
        searched = true;
        let clip = search(state)?;
        (q, up) = pass(clip, true)?;
    }
    if searched {
        state.snap.reference = Some(up.distance);
    }
    Ok((q, up))
}
