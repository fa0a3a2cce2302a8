//! Where a training step runs: inside rayon's thread pool.
//!
//! Every kernel parallelises with rayon, and a step makes dozens of parallel calls (an INT8 conv
//! layer alone makes about ten: the max and quantization passes, weight packing, the three
//! products). Called from a thread outside the pool, each call is handed to the pool's workers
//! while the caller sleeps until they finish: two context switches per call. Called from a worker
//! thread, a call splits its work with `join`, and the caller takes part. [`in_pool`] runs a
//! whole step on a worker, so the hand-over is paid once per step.
//!
//! Measured on the 2-core dev machine with `int8-bench profile` (alternating, two runs each): the
//! ResNet-20 16->32 stride-2 layer, forward + dX + dW, went from 4.24-4.41 to 3.95-4.23 ms at
//! INT8 and from 8.01-8.14 to 7.54-7.83 ms at FP32; the 32->64 stride-2 layer from 3.40-3.52 to
//! 3.10-3.14 ms at INT8 and from 5.58-5.63 to 5.37-5.74 ms at FP32.

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
