//! Wall-clock timing of a closure: warm up, then the median of repeated runs.

use std::time::{Duration, Instant};

/// Median milliseconds of `f` over enough repetitions to fill about `budget`, after one warm-up.
pub fn median_ms(budget: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    f();
    let first = start.elapsed();
    let reps = ((budget.as_secs_f64() / first.as_secs_f64().max(1e-6)) as usize).clamp(3, 50);
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
