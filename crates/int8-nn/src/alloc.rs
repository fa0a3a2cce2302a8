//! Allocation policy for training processes.
//!
//! A step allocates and frees tens of megabytes of outputs and gradients, and glibc's malloc by
//! default returns large blocks to the kernel, so every step would fault their pages in again.
//! [`keep_freed_memory`] keeps every block, of any size and from any thread, on the one main heap
//! (a rayon worker's own arena would `mmap` blocks above 64 MiB afresh); binaries call it first
//! thing, and a library leaves the process's allocator alone. Measurements: `docs/performance.md`.

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
