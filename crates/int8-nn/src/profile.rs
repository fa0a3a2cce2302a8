//! A switchable per-op timer: when enabled, each op adds its wall time and a call count under its
//! name, so a benchmark can break a training step down by op. Disabled, it costs one atomic load
//! per op.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
/// An op's name and whether the pass is backward.
type Key = (&'static str, bool);

static TABLE: Mutex<BTreeMap<Key, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Turns timing on or off.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Forgets everything timed so far.
pub fn reset() {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Total milliseconds and calls per op and pass (`"<op> forward"`, `"<op> backward"`).
pub fn report() -> Vec<(String, f64, u64)> {
    TABLE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(&(op, bwd), (d, n))| {
            (format!("{op} {}", if bwd { "backward" } else { "forward" }), d.as_secs_f64() * 1e3, *n)
        })
        .collect()
}

/// Times the rest of the enclosing scope under an op and pass, when timing is on. With the `cuda`
/// feature it also names the op running on this thread (see [`current_op`]) until it ends.
pub(crate) struct Span(Option<(Key, Instant)>, #[cfg(feature = "cuda")] &'static str);

#[cfg(feature = "cuda")]
thread_local! {
    static CURRENT: std::cell::Cell<&'static str> = const { std::cell::Cell::new("(no op)") };
}

/// The op running on this thread (the innermost open span): what an error for a GPU tensor
/// reaching a CPU-only op names.
#[cfg(feature = "cuda")]
pub(crate) fn current_op() -> &'static str {
    CURRENT.with(std::cell::Cell::get)
}

/// Names op `op` as the one running on this thread until the guard drops, without timing it (for
/// the small ops the step breakdown does not list).
#[cfg(feature = "cuda")]
pub(crate) fn naming(op: &'static str) -> impl Drop {
    struct Restore(&'static str);
    impl Drop for Restore {
        fn drop(&mut self) {
            CURRENT.with(|c| c.set(self.0));
        }
    }
    Restore(CURRENT.with(|c| c.replace(op)))
}

impl Drop for Span {
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        CURRENT.with(|c| c.set(self.1));
        if let Some((name, t)) = self.0.take() {
            let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
            let e = table.entry(name).or_default();
            e.0 += t.elapsed();
            e.1 += 1;
        }
    }
}

/// Starts a span for op `op`, forward or backward.
pub(crate) fn span(op: &'static str, backward: bool) -> Span {
    Span(
        ENABLED.load(Ordering::Relaxed).then(|| ((op, backward), Instant::now())),
        #[cfg(feature = "cuda")]
        CURRENT.with(|c| c.replace(op)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_count_only_while_enabled() {
        reset();
        {
            let _s = span("probe-off", false);
        }
        set_enabled(true);
        for _ in 0..3 {
            let _s = span("probe-on", true);
        }
        set_enabled(false);
        let r = report();
        assert!(r.iter().any(|(n, _, c)| n == "probe-on backward" && *c == 3));
        assert!(!r.iter().any(|(n, _, _)| n.starts_with("probe-off")));
    }
}
