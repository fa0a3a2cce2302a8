//! The training processes' allocation policy ([`int8_nn::alloc::keep_freed_memory`]) in a process
//! that sets it first thing, as the binaries do: a block larger than a thread arena's heap
//! (64 MiB), freed on a thread other than the main one (where a step runs) and allocated again,
//! comes back without page faults. Without `M_ARENA_MAX = 1` every round faulted in all its pages
//! again. No test harness: its threads would allocate before the policy is set.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    assert!(int8_nn::alloc::keep_freed_memory(), "glibc refused a setting");
    const LEN: usize = 96 << 20;
    let faults = std::thread::spawn(|| {
        (0..3)
            .map(|round| {
                let before = thread_faults();
                let mut v = vec![0u8; LEN];
                // Write every page, so that each one not kept is faulted in.
                for (k, page) in v.chunks_mut(4096).enumerate() {
                    page[0] = (k + round) as u8;
                }
                std::hint::black_box(&v);
                drop(v);
                thread_faults() - before
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let pages = (LEN / 4096) as i64;
    assert!(faults[0] > pages / 2, "the first round must fault its pages in: {faults:?}");
    assert!(faults[1] < pages / 20 && faults[2] < pages / 20, "later rounds faulted again: {faults:?} of {pages}");
    println!("a large block freed off the main thread is reused: page faults per round {faults:?} of {pages} pages");
}

/// Minor page faults of the calling thread so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn thread_faults() -> i64 {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
        u.ru_minflt
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("the allocation policy applies to glibc on Linux only: nothing to test here");
}
