//! What a training step holds in memory: the bytes of every tensor's host storage alive now and at
//! the peak, and the bytes the tape keeps for backward passes (saved inputs, INT8 codes, batch
//! statistics). The counters are process-wide atomics, updated when a buffer is made or dropped
//! (a few hundred times a step), so benches can report a step's peak and tests can check that
//! dropping a graph frees what it saved.

use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static SAVED: AtomicUsize = AtomicUsize::new(0);
static PEAK_SAVED: AtomicUsize = AtomicUsize::new(0);

/// Bytes of tensor storage in host memory alive now.
pub fn live_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most bytes of tensor storage alive at once since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts new peaks (of tensor storage and of what the tape keeps) from what is alive now.
pub fn reset_peak() {
    PEAK.store(live_bytes(), Ordering::Relaxed);
    PEAK_SAVED.store(saved_bytes(), Ordering::Relaxed);
}

/// Bytes that recorded ops keep for their backward passes, alive now (part of them may share
/// storage with live tensors, as a batch norm's saved input is its convolution's output).
pub fn saved_bytes() -> usize {
    SAVED.load(Ordering::Relaxed)
}

/// The most bytes the tape kept at once since the last [`reset_peak`].
pub fn peak_saved_bytes() -> usize {
    PEAK_SAVED.load(Ordering::Relaxed)
}

pub(crate) fn add_saved(bytes: usize) {
    let now = SAVED.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK_SAVED.fetch_max(now, Ordering::Relaxed);
}

pub(crate) fn sub_saved(bytes: usize) {
    SAVED.fetch_sub(bytes, Ordering::Relaxed);
}

fn add_live(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// A host buffer of `f32` values, counted in [`live_bytes`] while it exists.
#[derive(Debug)]
pub struct HostBuf(Vec<f32>);

impl HostBuf {
    pub(crate) fn new(v: Vec<f32>) -> Self {
        add_live(v.len() * 4);
        HostBuf(v)
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        &self.0
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.0
    }

    pub(crate) fn to_vec(&self) -> Vec<f32> {
        self.0.clone()
    }
}

impl Clone for HostBuf {
    fn clone(&self) -> Self {
        HostBuf::new(self.0.clone())
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        LIVE.fetch_sub(self.0.len() * 4, Ordering::Relaxed);
    }
}
