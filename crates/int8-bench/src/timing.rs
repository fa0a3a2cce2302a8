//! Wall-clock timing of closures: warm up, then the median of repeated runs. FP32 and INT8 are
//! timed in alternation ([`median_pair_ms`]), not one after the other: the shared virtual machines
//! these benches run on change speed by half within seconds, which timed one after the other would
//! put into the ratio; alternating, each pair of runs sees the same machine.

use std::time::{Duration, Instant};

/// Median milliseconds of `f` over enough repetitions to fill about `budget`, after one warm-up.
pub fn median_ms(budget: Duration, mut f: impl FnMut()) -> f64 {
    let (a, _) = median_pair_ms(budget, &mut f, || ());
    a
}

/// Median milliseconds of `f` and of `g`, run in alternation (`f, g`, then `g, f`, and so on, so
/// that neither always runs in the cache state the other leaves) over enough pairs to fill about
/// `budget`, after one warm-up of each.
pub fn median_pair_ms(budget: Duration, mut f: impl FnMut(), mut g: impl FnMut()) -> (f64, f64) {
    let (mut tf, mut tg) = (Vec::new(), Vec::new());
    let start = Instant::now();
    f();
    g();
    let first = start.elapsed();
    let pairs = ((budget.as_secs_f64() / first.as_secs_f64().max(1e-6)) as usize).clamp(3, 50);
    for i in 0..pairs {
        for k in turn(i) {
            if k == 0 { tf.push(time_ms(&mut f)) } else { tg.push(time_ms(&mut g)) }
        }
    }
    (median(tf), median(tg))
}

/// Which of two runs first in pair `i` of an alternation: 0 then 1 in even pairs, 1 then 0 in
/// odd ones.
pub fn turn(i: usize) -> [usize; 2] {
    if i.is_multiple_of(2) { [0, 1] } else { [1, 0] }
}

fn time_ms(f: &mut impl FnMut()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}

/// The median of `v` (the upper one of an even count); NaN for none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// The two closures run equally often, each first in every other pair.
    #[test]
    fn pairs_alternate_which_runs_first() {
        let calls = RefCell::new(String::new());
        median_pair_ms(Duration::ZERO, || calls.borrow_mut().push('f'), || calls.borrow_mut().push('g'));
        // One warm-up each, then at least three pairs.
        assert_eq!(calls.into_inner(), "fgfggffg");
    }

    #[test]
    fn median_takes_the_middle_value_whatever_the_order() {
        assert_eq!(median(vec![5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(Vec::new()).is_nan());
    }
}
