//! Allocation policy for training processes.
//!
//! Every op of a step allocates its output, and every backward its gradients: tens of megabytes a
//! step for ResNet-20 at batch 128, in blocks of up to 8 MB, freed again within the step. glibc's
//! malloc serves blocks that large with fresh `mmap`s and returns the memory on free (or trims the
//! heap), so each step pays a page fault for every 4 KiB it writes. [`keep_freed_memory`] tells
//! malloc to keep freed memory for reuse instead: with it, `int8-bench step` on the 2-core dev
//! machine measured FP32 321-353 ms and INT8 243-261 ms, against 362-373 and 270-272 ms without,
//! alternating the two binaries. Blocks above 32 MiB, the largest mmap threshold glibc accepts
//! (MobileNetV2's expanded activations at 32x32 are 75 MB at batch 128), still got fresh `mmap`s,
//! and the kernel's page clearing was a tenth of a MobileNetV2 step; with `mmap` turned off as well
//! (`M_MMAP_MAX = 0`: every block comes from the heap), `int8-bench step --model mobilenetv2-cifar`
//! measured FP32 1768-1937 ms and INT8 1804-1895 ms against 2158-2325 and 1968-2005 ms, in three
//! alternating runs each, with the same peak memory (2.87-2.89 GB).
//!
//! Since a step runs on a rayon worker ([`crate::threads::in_pool`]), its blocks come from that
//! thread's arena, not the main one; such an arena grows in heaps of at most 64 MiB, so a larger
//! block got its own `mmap` whatever `M_MMAP_MAX` says, and its pages were faulted in again every
//! step (`strace`: 168 maps of 72 MiB in a 3-second MobileNetV2 step bench). One arena for all
//! threads (`M_ARENA_MAX = 1`) puts every block on the main heap: on an AMD EPYC VM with 2
//! threads, `int8-bench step --model mobilenetv2-cifar --seconds 6`, alternating, went from
//! 2656-2699 to 2371-2423 ms at FP32 and from 2499-2522 to 2145-2150 ms at INT8, page faults from
//! 3.5 to 0.54 million a run, peak memory 2.12 to 2.02-2.07 GiB; ResNet-20 (no block above
//! 64 MiB) did not change. The arena's lock is shared by the step's threads and the loader's
//! (small blocks come from each thread's cache without it): decoding the 50,000 CIFAR-10 training
//! JPEGs on 2 threads, once at the start of a run, went from 2011-2015 to 2248-2338 ms. Binaries
//! call it first thing; a library leaves the process's allocator alone.

/// Makes glibc's malloc keep freed memory in the process: every thread allocates from the main
/// heap, blocks of any size come from it rather than their own `mmap`, and the heap is not
/// trimmed below 1 GiB of free space. No effect on other C libraries or platforms. Returns whether
/// every setting was accepted.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // The largest threshold glibc accepts on 64-bit targets (DEFAULT_MMAP_THRESHOLD_MAX).
        const MMAP_THRESHOLD: i32 = 32 << 20;
        const TRIM_THRESHOLD: i32 = 1 << 30;
        const TOP_PAD: i32 = 64 << 20;
        // SAFETY: `mallopt` only sets malloc's tuning parameters; it is thread-safe and takes
        // plain integers.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_MMAP_MAX, 0) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1
                && libc::mallopt(libc::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_accepts_the_settings() {
        assert!(super::keep_freed_memory());
    }
    // That a large block freed off the main thread is reused is `tests/alloc.rs`, a process of its
    // own: the setting of one arena holds only for threads that have not allocated yet.
}
