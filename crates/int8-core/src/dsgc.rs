//! Direction Sensitive Gradient Clipping (DSGC; Zhu et al., CVPR 2020, Sec. 4.1).
//!
//! Gradients are sharp and wide: clipping at `max|g|` wastes codes on a few outliers, clipping too
//! low bends the gradient's direction. DSGC picks, per layer, the clip value `c` that minimises the
//! cosine distance `d(c) = 1 - cos(g, Q_c(g))` between the gradient and its quantized copy, and
//! refreshes it only every N iterations because the search costs time.
//!
//! [`cosine_distance`] evaluates `d(c)` in one pass. [`search_clip`] finds `c*` in `(0, max|g|]`
//! with a coarse geometric grid followed by a golden-section refinement around its best point: about
//! 40 evaluations, where a dense 1000-point grid needs 1000, landing within 1% of the grid's best
//! distance on heavy-tailed gradients (see the tests). [`ClipState`] holds a layer's clip value
//! between searches, and can search early when that value has gone stale (an addition to the
//! paper, off by default).

use rayon::prelude::*;

use crate::error::Result;
use crate::quant::{LANES, QMAX, QTensor, Rounding, max_abs, quantize_pass, round_code};

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;
/// Points of the coarse geometric grid spanning `[max|g| / 1000, max|g|]`.
const COARSE_POINTS: usize = 20;
/// Golden-section iterations inside the bracket around the best coarse point (shrinks it by 0.618^n).
const REFINE_ITERS: usize = 18;

/// `1 - cos(g, Q_c(g))` for clip value `clip`, with nearest rounding, in one pass. The scale
/// cancels in the cosine, so only the codes are formed. Returns 0 for an all-zero gradient and 1
/// for a clip value that maps everything to zero.
pub fn cosine_distance(g: &[f32], clip: f32) -> f64 {
    if clip <= 0.0 {
        return if g.iter().all(|&v| v == 0.0) { 0.0 } else { 1.0 };
    }
    let inv = QMAX / clip;
    let (gq, qq, gg) = g
        .par_chunks(CHUNK)
        .map(|c| distance_terms(c, inv))
        .reduce(|| (0.0, 0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1, x.2 + y.2));
    distance_from_terms(gq, qq, gg)
}

/// `1 - cos(g, q)` from `sum g*q`, `sum q*q` and `sum g*g`: 0 for an all-zero gradient, 1 when
/// every code is zero.
fn distance_from_terms(gq: f64, qq: f64, gg: f64) -> f64 {
    if gg == 0.0 {
        return 0.0;
    }
    if qq == 0.0 {
        return 1.0;
    }
    (1.0 - gq / (gg.sqrt() * qq.sqrt())).max(0.0)
}

/// `(sum g*q, sum q*q, sum g*g)` over `c` for codes `q = round(g * inv)`: sixteen f32 lanes over
/// blocks of 1024, carried across blocks in f64 to keep `1 - cos` accurate when it is small.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn distance_terms(c: &[f32], inv: f32) -> (f64, f64, f64) {
    let (mut gq, mut qq, mut gg) = (0.0f64, 0.0f64, 0.0f64);
    for block in c.chunks(1024) {
        let (mut a, mut b, mut e) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
        let mut lanes = block.chunks_exact(LANES);
        for v in lanes.by_ref() {
            for l in 0..LANES {
                let q = round_code((v[l] * inv).clamp(-QMAX, QMAX)) as f32;
                a[l] += v[l] * q;
                b[l] += q * q;
                e[l] += v[l] * v[l];
            }
        }
        for &v in lanes.remainder() {
            let q = round_code((v * inv).clamp(-QMAX, QMAX)) as f32;
            a[0] += v * q;
            b[0] += q * q;
            e[0] += v * v;
        }
        gq += a.iter().map(|&x| x as f64).sum::<f64>();
        qq += b.iter().map(|&x| x as f64).sum::<f64>();
        gg += e.iter().map(|&x| x as f64).sum::<f64>();
    }
    (gq, qq, gg)
}

/// The outcome of a clip search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipChoice {
    /// The chosen clip value `c*`.
    pub clip: f32,
    /// `d(c*)`.
    pub distance: f64,
    /// How many times `d` was evaluated (each a pass over the gradient).
    pub evaluations: usize,
}

/// Finds the clip value in `(0, max|g|]` minimising [`cosine_distance`], or an error naming `name`
/// if `g` holds NaN or an infinity.
pub fn search_clip(name: &str, g: &[f32]) -> Result<ClipChoice> {
    let amax = max_abs(name, g)?;
    if amax == 0.0 {
        return Ok(ClipChoice { clip: 0.0, distance: 0.0, evaluations: 0 });
    }
    let mut evaluations = 0;
    let mut eval = |c: f32| {
        evaluations += 1;
        cosine_distance(g, c)
    };
    // Coarse geometric grid from max/1000 to max: the optimum of a heavy-tailed gradient often lies
    // far below max|g|, where a linear grid would be sparse.
    let ratio = 1000f64.powf(1.0 / (COARSE_POINTS - 1) as f64);
    let grid: Vec<f32> =
        (0..COARSE_POINTS).map(|i| (amax as f64 / ratio.powi((COARSE_POINTS - 1 - i) as i32)) as f32).collect();
    let dist: Vec<f64> = grid.iter().map(|&c| eval(c)).collect();
    let best = (0..COARSE_POINTS).min_by(|&a, &b| dist[a].total_cmp(&dist[b])).unwrap_or(COARSE_POINTS - 1);
    let (mut best_c, mut best_d) = (grid[best], dist[best]);
    // Golden-section search on the bracket formed by the neighbours of the best grid point.
    let mut lo = if best == 0 { grid[0] / ratio as f32 } else { grid[best - 1] } as f64;
    let mut hi = if best + 1 == COARSE_POINTS { amax } else { grid[best + 1] } as f64;
    const INV_PHI: f64 = 0.618_033_988_749_894_9;
    let mut x1 = hi - INV_PHI * (hi - lo);
    let mut x2 = lo + INV_PHI * (hi - lo);
    let mut d1 = eval(x1 as f32);
    let mut d2 = eval(x2 as f32);
    for _ in 0..REFINE_ITERS {
        if d1 <= d2 {
            hi = x2;
            (x2, d2) = (x1, d1);
            x1 = hi - INV_PHI * (hi - lo);
            d1 = eval(x1 as f32);
        } else {
            lo = x1;
            (x1, d1) = (x2, d2);
            x2 = lo + INV_PHI * (hi - lo);
            d2 = eval(x2 as f32);
        }
    }
    for (c, d) in [(x1, d1), (x2, d2)] {
        if d < best_d {
            (best_c, best_d) = (c as f32, d);
        }
    }
    Ok(ClipChoice { clip: best_c, distance: best_d, evaluations })
}

/// How a layer picks the clip value for its gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ClipMode {
    /// Clip at `max|g|` every iteration (no DSGC; the paper's ablation baseline).
    MaxAbs,
    /// DSGC: search on the first iteration and then every `interval` iterations.
    Dsgc {
        /// Iterations between searches (the paper refreshes about every 100).
        interval: u64,
        /// Also search before the interval ends when the clip value in force has gone stale: when
        /// the gradient's cosine distance at that value exceeds `stale_ratio` times the distance
        /// measured right after the last search. `None` searches only every `interval`, as the
        /// paper does. Early in training a gradient can grow 20-fold within one interval; its old
        /// clip value then saturates a few percent of the entries and bends its direction.
        stale_ratio: Option<f32>,
    },
}

impl ClipMode {
    /// DSGC every `interval` iterations and at no other time, as in the paper.
    pub const fn dsgc(interval: u64) -> Self {
        ClipMode::Dsgc { interval, stale_ratio: None }
    }
}

impl Default for ClipMode {
    fn default() -> Self {
        ClipMode::dsgc(100)
    }
}

/// What a layer's clip state decided for one gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClipUpdate {
    /// The clip value to quantize this gradient with.
    pub clip: f32,
    /// The cosine distance of this gradient at that clip value.
    pub distance: f64,
    /// Whether a search ran on this call.
    pub searched: bool,
}

/// The part of a [`ClipState`] that a resumed run needs to continue exactly.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClipSnapshot {
    /// Gradients seen.
    pub calls: u64,
    /// The clip value in force, if one has been chosen.
    pub clip: Option<f32>,
    /// The distance measured right after the last search (the staleness test's reference).
    pub reference: Option<f64>,
    /// Searches run, periodic and stale ones together.
    pub searches: u64,
}

/// The smallest reference distance the staleness test compares with, so that a search on an
/// all-zero gradient (distance 0) does not make every later gradient stale.
const STALE_FLOOR: f64 = 1e-6;

/// A layer's gradient clip value, searched periodically (and, with `stale_ratio`, whenever the
/// value in force has gone stale).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipState {
    pub(crate) mode: ClipMode,
    pub(crate) snap: ClipSnapshot,
}

impl ClipState {
    /// A fresh state: the first [`ClipState::update`] chooses the clip value.
    pub fn new(mode: ClipMode) -> Self {
        Self { mode, snap: ClipSnapshot::default() }
    }

    /// Restores a state saved with [`ClipState::snapshot`] (for resumed runs).
    pub fn restore(mode: ClipMode, snap: ClipSnapshot) -> Self {
        Self { mode, snap }
    }

    /// What a checkpoint keeps of this state.
    pub fn snapshot(&self) -> ClipSnapshot {
        self.snap
    }

    /// The clip value in force, if any has been chosen.
    pub fn clip(&self) -> Option<f32> {
        self.snap.clip
    }

    /// How the clip value is chosen.
    pub fn mode(&self) -> ClipMode {
        self.mode
    }

    /// How many gradients this state has seen.
    pub fn calls(&self) -> u64 {
        self.snap.calls
    }

    /// How many searches have run (periodic and stale ones).
    pub fn searches(&self) -> u64 {
        self.snap.searches
    }

    /// Whether the periodic search is due on this call (always on the first).
    pub(crate) fn periodic_due(&self) -> bool {
        match self.mode {
            ClipMode::MaxAbs => false,
            ClipMode::Dsgc { interval, .. } => {
                self.snap.clip.is_none() || self.snap.calls.is_multiple_of(interval.max(1))
            }
        }
    }

    /// Whether `distance`, measured at the clip value in force, says that value has gone stale.
    pub(crate) fn stale(&self, distance: f64) -> bool {
        match (self.mode, self.snap.reference) {
            (ClipMode::Dsgc { stale_ratio: Some(r), .. }, Some(reference)) => {
                distance > r as f64 * reference.max(STALE_FLOOR)
            }
            _ => false,
        }
    }

    /// Runs a search and puts its clip value in force; the caller records the reference distance.
    /// An all-zero gradient has nothing to choose a clip value from (every value gives the same
    /// zero codes): the value in force stays, or none stays chosen and the next gradient searches
    /// again, and `None` says so. A clip value of 0 put in force would zero every later gradient
    /// of the layer until the next search, as happens to a layer called several times in a step
    /// (a head shared by the levels of a feature pyramid) when one call's gradient is zero.
    fn search(&mut self, name: &str, g: &[f32]) -> Result<Option<f32>> {
        let choice = search_clip(name, g)?;
        self.snap.searches += 1;
        if choice.clip == 0.0 {
            return Ok(None);
        }
        self.snap.clip = Some(choice.clip);
        Ok(Some(choice.clip))
    }

    /// The clip value in force, 0 (every code zero) while none has been chosen.
    fn in_force(&self) -> f32 {
        self.snap.clip.unwrap_or(0.0)
    }

    /// Chooses the clip value for gradient `g` as [`ClipState::update`] does and quantizes `g` with
    /// it, measuring the cosine distance of the codes actually produced in the same pass. Between
    /// searches this is one pass over the gradient where `update` and a separate quantization
    /// take two; a stale clip value costs a search and a second pass.
    pub fn quantize(&mut self, name: &str, g: &[f32], rounding: Rounding) -> Result<(QTensor, ClipUpdate)> {
        let mut searched = false;
        let clip = match self.mode {
            ClipMode::MaxAbs => {
                let clip = max_abs(name, g)?;
                self.snap.clip = Some(clip);
                clip
            }
            ClipMode::Dsgc { .. } if self.periodic_due() => match self.search(name, g)? {
                Some(clip) => {
                    searched = true;
                    clip
                }
                None => self.in_force(),
            },
            ClipMode::Dsgc { .. } => self.in_force(),
        };
        self.snap.calls += 1;
        let pass = |clip: f32, searched: bool| -> Result<(QTensor, ClipUpdate)> {
            let (q, s) = quantize_pass::<true>(name, g, clip, rounding)?;
            Ok((q, ClipUpdate { clip, distance: distance_from_terms(s.gq, s.qq, s.gg), searched }))
        };
        let (mut q, mut up) = pass(clip, searched)?;
        if !searched && self.stale(up.distance) {
            // A stale value means a gradient that is not all zero (whose distance is 0), so the
            // search finds a value.
            if let Some(clip) = self.search(name, g)? {
                searched = true;
                (q, up) = pass(clip, true)?;
            }
        }
        if searched {
            // The reference is measured like every later distance (same pass, same rounding).
            self.snap.reference = Some(up.distance);
        }
        Ok((q, up))
    }

    /// Chooses the clip value for gradient `g`: a search when one is due or the value in force
    /// has gone stale, else that value. The distance at the chosen value is always measured (one
    /// pass), since DCLR needs it.
    pub fn update(&mut self, name: &str, g: &[f32]) -> Result<ClipUpdate> {
        let due = self.periodic_due();
        self.snap.calls += 1;
        let update = match self.mode {
            ClipMode::MaxAbs => {
                let clip = max_abs(name, g)?;
                ClipUpdate { clip, distance: cosine_distance(g, clip), searched: false }
            }
            ClipMode::Dsgc { .. } => {
                let kept = self.in_force();
                let kept_distance = if due { f64::NAN } else { cosine_distance(g, kept) };
                let found = if due || self.stale(kept_distance) { self.search(name, g)? } else { None };
                match found {
                    Some(clip) => {
                        let up = ClipUpdate { clip, distance: cosine_distance(g, clip), searched: true };
                        self.snap.reference = Some(up.distance);
                        up
                    }
                    None if kept_distance.is_nan() => {
                        ClipUpdate { clip: kept, distance: cosine_distance(g, kept), searched: false }
                    }
                    None => ClipUpdate { clip: kept, distance: kept_distance, searched: false },
                }
            }
        };
        if self.mode == ClipMode::MaxAbs {
            self.snap.clip = Some(update.clip);
        }
        Ok(update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Rounding, quantize_with_clip};
    use crate::rng::CounterRng;

    /// Laplace(0, 1) samples by inverse CDF.
    pub(crate) fn laplace(n: usize, seed: u64) -> Vec<f32> {
        let rng = CounterRng::new(seed);
        (0..n)
            .map(|i| {
                let u = rng.uniform_f64(i as u64) - 0.5;
                (-u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln()) as f32
            })
            .collect()
    }

    /// Student-t samples with `nu` degrees of freedom: a normal over the root of a scaled chi-square.
    pub(crate) fn student_t(n: usize, nu: usize, seed: u64) -> Vec<f32> {
        let rng = CounterRng::new(seed);
        let mut k = 0u64;
        let mut normal = || {
            let (u1, u2) = (rng.uniform_f64(k).max(1e-300), rng.uniform_f64(k + 1));
            k += 2;
            (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
        };
        (0..n)
            .map(|_| {
                let z = normal();
                let chi: f64 = (0..nu).map(|_| normal().powi(2)).sum();
                (z / (chi / nu as f64).sqrt()) as f32
            })
            .collect()
    }

    fn dense_best(g: &[f32]) -> (f32, f64) {
        let amax = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        (1..=1000)
            .map(|i| {
                let c = amax * i as f32 / 1000.0;
                (c, cosine_distance(g, c))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap()
    }

    #[test]
    fn one_pass_distance_matches_f64_of_the_quantized_copy() {
        let g = laplace(50_000, 3);
        for clip in [0.5f32, 2.0, 7.0] {
            let q = quantize_with_clip("g", &g, clip, Rounding::Nearest).unwrap().dequantize();
            let dot: f64 = g.iter().zip(&q).map(|(&a, &b)| a as f64 * b as f64).sum();
            let ng: f64 = g.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            let nq: f64 = q.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            let want = 1.0 - dot / (ng * nq);
            let got = cosine_distance(&g, clip);
            assert!((got - want).abs() < 1e-6 + 1e-4 * want, "clip {clip}: {got} vs {want}");
        }
        assert_eq!(cosine_distance(&[0.0; 10], 1.0), 0.0);
        assert_eq!(cosine_distance(&[1.0, -2.0], 0.0), 1.0);
    }

    #[test]
    fn search_lands_within_one_percent_of_the_dense_grid_at_a_fraction_of_its_cost() {
        // The last flag says whether the best clip lies well below max|g|. For Cauchy samples the
        // norm is dominated by a few outliers, so clipping them bends the direction most and the
        // best clip is max|g| itself.
        let cases = [
            ("laplace", laplace(100_000, 11), true),
            ("student-t nu=2", student_t(100_000, 2, 12), true),
            ("student-t nu=3", student_t(100_000, 3, 13), true),
            ("student-t nu=1 (cauchy)", student_t(50_000, 1, 14), false),
        ];
        for (what, g, inside) in cases {
            let (grid_c, grid_d) = dense_best(&g);
            let got = search_clip(what, &g).unwrap();
            assert!(
                got.distance <= grid_d * 1.01,
                "{what}: search d={} at c={} vs grid d={grid_d} at c={grid_c}",
                got.distance,
                got.clip
            );
            // The distance reported is the chosen clip value's own.
            assert_eq!(got.distance, cosine_distance(&g, got.clip), "{what}");
            let amax = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if inside {
                assert!(got.clip < 0.9 * amax, "{what}: clip {} of max {amax}", got.clip);
                assert!(got.distance < cosine_distance(&g, amax), "{what}");
            }
        }
    }

    #[test]
    fn fused_quantize_matches_update_then_quantize() {
        let g = student_t(70_000, 3, 21);
        for mode in [ClipMode::MaxAbs, ClipMode::dsgc(2), ClipMode::Dsgc { interval: 3, stale_ratio: Some(1.5) }] {
            let (mut fused, mut split) = (ClipState::new(mode), ClipState::new(mode));
            for step in 0..4 {
                let gs: Vec<f32> = g.iter().map(|v| v * (1.0 + step as f32)).collect();
                let (q, up) = fused.quantize("g", &gs, Rounding::Nearest).unwrap();
                let want = split.update("g", &gs).unwrap();
                assert_eq!((up.clip, up.searched), (want.clip, want.searched), "{mode:?} step {step}");
                assert!(
                    (up.distance - want.distance).abs() < 1e-9,
                    "{mode:?} step {step}: {} vs {}",
                    up.distance,
                    want.distance
                );
                assert_eq!(q, quantize_with_clip("g", &gs, want.clip, Rounding::Nearest).unwrap());
            }
        }
        // With stochastic rounding the distance is that of the stochastic codes.
        let mut state = ClipState::new(ClipMode::MaxAbs);
        let (q, up) = state.quantize("g", &g, Rounding::Stochastic { seed: 3 }).unwrap();
        let deq = q.dequantize();
        let dot: f64 = g.iter().zip(&deq).map(|(&a, &b)| a as f64 * b as f64).sum();
        let (ng, nq) = (
            g.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt(),
            deq.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt(),
        );
        assert!((up.distance - (1.0 - dot / (ng * nq))).abs() < 1e-6);
        let mut bad = g.clone();
        bad[123] = f32::INFINITY;
        assert!(
            state.quantize("layer2.grad", &bad, Rounding::Nearest).unwrap_err().to_string().contains("layer2.grad")
        );
    }

    #[test]
    fn clip_state_searches_on_the_first_call_and_then_every_interval() {
        let mut state = ClipState::new(ClipMode::dsgc(3));
        let g1 = laplace(4096, 1);
        let searched: Vec<bool> = (0..7).map(|_| state.update("g", &g1).unwrap().searched).collect();
        assert_eq!(searched, vec![true, false, false, true, false, false, true]);
        // Between searches the clip value stays fixed, even when the gradient grows.
        let c = state.clip().unwrap();
        let g2: Vec<f32> = g1.iter().map(|v| v * 10.0).collect();
        let up = state.update("g", &g2).unwrap();
        assert!(!up.searched);
        assert_eq!(up.clip, c);
        assert!((up.distance - cosine_distance(&g2, c)).abs() < 1e-12);

        let mut max = ClipState::new(ClipMode::MaxAbs);
        let up = max.update("g", &g2).unwrap();
        assert_eq!(up.clip, g2.iter().fold(0.0f32, |m, v| m.max(v.abs())));
        assert!(!up.searched);

        let mut bad = g1.clone();
        bad[5] = f32::NAN;
        assert!(
            ClipState::new(ClipMode::default())
                .update("layer1.grad", &bad)
                .unwrap_err()
                .to_string()
                .contains("layer1.grad")
        );
    }

    #[test]
    fn an_all_zero_gradient_never_puts_a_zero_clip_value_in_force() {
        // A layer called several times a step (a head shared by a pyramid's levels) sees a zero
        // gradient from a call whose outputs no loss term reached. Both ways of choosing, the
        // fused quantization and `update`, must behave alike.
        let zero = vec![0f32; 4096];
        let g = laplace(4096, 7);
        for fused in [false, true] {
            let mut state = ClipState::new(ClipMode::dsgc(3));
            let mut call = |g: &[f32]| {
                if fused {
                    let (q, up) = state.quantize("g", g, Rounding::Nearest).unwrap();
                    assert_eq!(q, quantize_with_clip("g", g, up.clip, Rounding::Nearest).unwrap());
                    (up, state.clip())
                } else {
                    let up = state.update("g", g).unwrap();
                    (up, state.clip())
                }
            };
            // The first gradient is zero: nothing is chosen, its codes are zero, nothing is stale.
            let (up, in_force) = call(&zero);
            assert_eq!((up.clip, up.distance, up.searched, in_force), (0.0, 0.0, false, None), "fused {fused}");
            // So the next gradient searches, and the value it finds is that of a fresh state.
            let (up, in_force) = call(&g);
            let fresh = search_clip("g", &g).unwrap().clip;
            assert!(up.searched && up.clip == fresh && in_force == Some(fresh), "fused {fused}: {up:?}");
            // A zero gradient at a periodic search (call 3 of interval 3) keeps the value in force.
            call(&g);
            let (up, in_force) = call(&zero);
            assert_eq!((up.clip, up.searched, in_force), (fresh, false, Some(fresh)), "fused {fused}");
            let (up, _) = call(&g);
            assert_eq!((up.clip, up.searched), (fresh, false), "fused {fused}: quantizes with the kept value");
            assert!((up.distance - cosine_distance(&g, fresh)).abs() < 1e-9, "fused {fused}");
        }
    }

    #[test]
    fn a_stale_clip_value_triggers_a_search_before_the_interval_ends() {
        let ratio = 4.0f32;
        let mode = ClipMode::Dsgc { interval: 100, stale_ratio: Some(ratio) };
        let g = laplace(20_000, 7);
        let scaled = |k: f32| g.iter().map(|v| v * k).collect::<Vec<f32>>();
        let mut state = ClipState::new(mode);
        let first = state.update("g", &g).unwrap();
        assert!(first.searched);
        let reference = cosine_distance(&g, first.clip);
        // The same gradient again, and one 10% larger: the clip value in force still fits. (The best
        // clip value of a Laplace gradient is sharp: 30% larger already quadruples the distance.)
        for k in [1.0, 1.1] {
            let up = state.update("g", &scaled(k)).unwrap();
            assert!(!up.searched, "x{k}");
            assert!(cosine_distance(&scaled(k), first.clip) <= ratio as f64 * reference, "x{k}");
        }
        // Grown 20-fold (saturating) or shrunk 20-fold (rounding most entries to zero), the old clip value gives
        // a distance far above `ratio` times the reference, so the state searches again.
        for k in [20.0, 1.0 / 20.0] {
            let gk = scaled(k);
            let old = state.clip().unwrap();
            assert!(cosine_distance(&gk, old) > ratio as f64 * reference, "x{k}");
            let up = state.update("g", &gk).unwrap();
            assert!(up.searched, "x{k}");
            assert_eq!(up.clip, search_clip("g", &gk).unwrap().clip, "x{k}");
            assert!(up.distance < 1.5 * reference, "x{k}: {} vs {reference}", up.distance);
            assert!(!state.update("g", &gk).unwrap().searched, "x{k}: the new value fits");
        }
        assert_eq!(state.searches(), 3);
        // Without a ratio (the paper), only the interval triggers searches.
        let mut paper = ClipState::new(ClipMode::dsgc(100));
        let searched: Vec<bool> =
            [1.0, 20.0, 1.0 / 20.0].iter().map(|&k| paper.update("g", &scaled(k)).unwrap().searched).collect();
        assert_eq!(searched, vec![true, false, false]);
    }

    #[test]
    fn a_restored_clip_state_continues_exactly() {
        let mode = ClipMode::Dsgc { interval: 5, stale_ratio: Some(2.0) };
        let g = student_t(10_000, 3, 4);
        let grads: Vec<Vec<f32>> =
            (0..12).map(|t| g.iter().map(|v| v * (1.0 + 0.6 * t as f32).powi(2)).collect()).collect();
        let mut whole = ClipState::new(mode);
        let mut first = ClipState::new(mode);
        for gt in &grads[..6] {
            assert_eq!(
                whole.quantize("g", gt, Rounding::Nearest).unwrap(),
                first.quantize("g", gt, Rounding::Nearest).unwrap()
            );
        }
        let mut resumed = ClipState::restore(mode, first.snapshot());
        for gt in &grads[6..] {
            assert_eq!(
                whole.quantize("g", gt, Rounding::Nearest).unwrap(),
                resumed.quantize("g", gt, Rounding::Nearest).unwrap()
            );
        }
        assert_eq!(whole, resumed);
        assert!(whole.searches() > 3, "the growing gradient made some searches stale ones: {}", whole.searches());
    }
}
