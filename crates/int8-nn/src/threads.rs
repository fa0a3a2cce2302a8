//! Where a training step runs: inside rayon's thread pool.
//!
//! A step makes dozens of parallel calls, and each one made from outside the pool is handed to the
//! workers while the caller sleeps (two context switches), where from a worker it splits its work
//! with `join` and the caller takes part; [`in_pool`] runs a whole step on a worker, so the
//! hand-over is paid once per step. Measurements: `docs/performance.md`.

/// Runs `f` on a thread of rayon's global pool (the calling thread, if it is one) and returns its
/// result. `f` must not block on other threads' progress (a channel, a lock held across work): a
/// blocked worker cannot run the pool's jobs, and with one worker nothing would.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    #[test]
    fn runs_on_a_worker_of_the_global_pool_and_returns_the_result() {
        assert_eq!(rayon::current_thread_index(), None);
        let (index, sum) = super::in_pool(|| {
            use rayon::prelude::*;
            (rayon::current_thread_index(), (0..1000u64).into_par_iter().sum::<u64>())
        });
        assert!(index.is_some());
        assert_eq!(sum, 499_500);
    }
}
