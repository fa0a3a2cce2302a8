//! Output buffers that kernels fill without a separate zeroing pass over memory.
//!
//! Safe Rust hands out `&mut [f32]` only over initialised memory, and zeroing each fresh output
//! first would cost one more pass at memory speed; instead [`Out`] hands a kernel its output in the
//! chunks its tasks write, zeroed just before a task writes them (while in cache) or not at all
//! when the task computes every value ([`Fill`], [`Out::par_chunks_unzeroed`]), and [`fresh`]
//! checks that every chunk was handed out. Measurements: `docs/performance.md`.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::error::{CoreError, Result};

/// A kernel's output: `len()` values, written through chunks that are zeroed when taken.
///
/// Made from an initialised slice (`&mut [f32]`, `&mut Vec<f32>`) or by [`fresh`].
#[derive(Debug)]
pub struct Out<'a> {
    buf: &'a mut [MaybeUninit<f32>],
    /// How many values have been handed out (and so initialised), for [`fresh`].
    handed: Option<&'a Counter>,
}

impl<'a> From<&'a mut [f32]> for Out<'a> {
    fn from(v: &'a mut [f32]) -> Self {
        let (ptr, len) = (v.as_mut_ptr(), v.len());
        // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, the slice is borrowed mutably for
        // `'a`, and `Out` only ever writes initialised values (zeros, then the kernel's results)
        // into it, so it stays initialised for its owner.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<MaybeUninit<f32>>(), len) };
        Out { buf, handed: None }
    }
}

impl<'a, const N: usize> From<&'a mut [f32; N]> for Out<'a> {
    fn from(v: &'a mut [f32; N]) -> Self {
        Out::from(v.as_mut_slice())
    }
}

impl<'a> From<&'a mut Vec<f32>> for Out<'a> {
    fn from(v: &'a mut Vec<f32>) -> Self {
        Out::from(v.as_mut_slice())
    }
}

/// A count of the values handed out, one cache line per worker thread: chunks are as small as
/// one 8x8 plane, and one shared atomic measured slower than zeroing the whole buffer (the threads
/// took its line from each other on every chunk).
#[derive(Debug)]
struct Counter {
    slots: Vec<Slot>,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct Slot(AtomicUsize);

impl Counter {
    fn new() -> Self {
        // One slot per thread of the current pool, and one for threads outside it.
        Counter { slots: (0..=rayon::current_num_threads()).map(|_| Slot::default()).collect() }
    }

    fn add(&self, k: usize) {
        let last = self.slots.len() - 1;
        let i = rayon::current_thread_index().map_or(last, |i| i.min(last));
        self.slots[i].0.fetch_add(k, Ordering::Relaxed);
    }

    fn total(&self) -> usize {
        self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

/// Counts `k` values as handed out, where an output counts them ([`fresh`]'s).
fn count(handed: Option<&Counter>, k: usize) {
    if let Some(h) = handed {
        h.add(k);
    }
}

/// Zeroes `c` and returns it as initialised values, counting them in `handed`.
fn take<'a>(c: &'a mut [MaybeUninit<f32>], handed: Option<&Counter>) -> &'a mut [f32] {
    for v in c.iter_mut() {
        v.write(0.0);
    }
    count(handed, c.len());
    let (ptr, len) = (c.as_mut_ptr(), c.len());
    // SAFETY: every element of `c` was written just above, and `MaybeUninit<f32>` has the layout
    // of `f32`; the result borrows `c`.
    unsafe { std::slice::from_raw_parts_mut(ptr.cast::<f32>(), len) }
}

impl<'a> Out<'a> {
    /// The number of values.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The values in consecutive chunks of `len` (the last may be shorter), in parallel, each
    /// zeroed as it is taken.
    pub fn par_chunks(self, len: usize) -> impl IndexedParallelIterator<Item = &'a mut [f32]> {
        let handed = self.handed;
        self.buf.par_chunks_mut(len.max(1)).map(move |c| take(c, handed))
    }

    /// The values in consecutive chunks of `len` (the last may be shorter), in parallel, not
    /// zeroed: for kernels that write every value of a chunk and read none (the GEMMs'
    /// overwriting stores).
    ///
    /// # Safety
    /// Every element of every chunk must be written before the output is read ([`fresh`] takes
    /// the chunks handed out as written).
    pub unsafe fn par_chunks_unzeroed(
        self,
        len: usize,
    ) -> impl IndexedParallelIterator<Item = &'a mut [MaybeUninit<f32>]> {
        let handed = self.handed;
        self.buf.par_chunks_mut(len.max(1)).map(move |c| {
            count(handed, c.len());
            c
        })
    }

    /// An output over memory that may be uninitialised, for kernels that initialise it
    /// ([`Out::zeroed`]).
    pub(crate) fn from_uninit(buf: &'a mut [MaybeUninit<f32>]) -> Self {
        Out { buf, handed: None }
    }

    /// All the values, zeroed (a full pass: for outputs a kernel fills piecemeal).
    pub fn zeroed(self) -> &'a mut [f32] {
        take(self.buf, self.handed)
    }

    /// The values in consecutive chunks of `len` (the last may be shorter), in parallel, for
    /// elementwise kernels that compute every value of a chunk at once ([`Fill`]): no zeroing.
    pub fn par_fills(self, len: usize) -> impl IndexedParallelIterator<Item = Fill<'a>> {
        let handed = self.handed;
        self.buf.par_chunks_mut(len.max(1)).map(move |buf| Fill { buf, handed })
    }
}

/// `max(m, a)` as one `maxps` (a NaN `a` leaves `m`): `f32::max`'s NaN rule costs a compare and
/// a blend per vector in passes that are otherwise bound by memory. A NaN never needs to reach the
/// maximum: the quantizer that uses it checks finiteness in its own pass.
#[inline(always)]
fn max_nan_blind(m: f32, a: f32) -> f32 {
    if a > m { a } else { m }
}

/// The largest of sixteen lanes (none NaN: they come of [`max_nan_blind`]), as a tree of four
/// vector maxima: one after the other, they cost a 16-value plane more than its pass.
#[inline(always)]
fn lanes_max(mut m: [f32; 16]) -> f32 {
    let mut w = 8;
    while w > 0 {
        for i in 0..w {
            m[i] = max_nan_blind(m[i], m[i + w]);
        }
        w /= 2;
    }
    m[0]
}

/// A chunk of an [`Out`] that one elementwise pass writes whole.
#[derive(Debug)]
pub struct Fill<'a> {
    buf: &'a mut [MaybeUninit<f32>],
    handed: Option<&'a Counter>,
}

impl<'a> Fill<'a> {
    /// The number of values.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The chunk in consecutive pieces of `len` (the last may be shorter), each a [`Fill`] of its
    /// own: for tasks that write a run of planes.
    pub fn chunks(self, len: usize) -> impl Iterator<Item = Fill<'a>> {
        let handed = self.handed;
        self.buf.chunks_mut(len.max(1)).map(move |buf| Fill { buf, handed })
    }

    /// Counts the chunk as written (every value of it was).
    fn done(self) {
        count(self.handed, self.buf.len());
    }

    /// `out[i] = f(x[i])`; values past the end of `x` (a caller's bug) are zero.
    #[inline(always)]
    pub fn map(self, x: &[f32], f: impl Fn(f32) -> f32) {
        let n = x.len().min(self.buf.len());
        for (o, &v) in self.buf[..n].iter_mut().zip(&x[..n]) {
            o.write(f(v));
        }
        for o in &mut self.buf[n..] {
            o.write(0.0);
        }
        self.done();
    }

    /// `out[i] = f(x[i])` as [`Fill::map`], returning the largest `|out[i]|` (NaN ignored): what a
    /// per-tensor quantizer of the output would otherwise find in a pass of its own.
    #[inline(always)]
    pub fn map_max_abs(self, x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
        const LANES: usize = 16;
        let n = x.len().min(self.buf.len());
        let mut m = [0.0f32; LANES];
        let (oc, or) = self.buf[..n].as_chunks_mut::<LANES>();
        let (xc, xr) = x[..n].as_chunks::<LANES>();
        for (o, v) in oc.iter_mut().zip(xc) {
            for l in 0..LANES {
                let y = f(v[l]);
                o[l].write(y);
                m[l] = max_nan_blind(m[l], y.abs());
            }
        }
        for (o, &v) in or.iter_mut().zip(xr) {
            let y = f(v);
            o.write(y);
            m[0] = max_nan_blind(m[0], y.abs());
        }
        for o in &mut self.buf[n..] {
            o.write(0.0);
        }
        self.done();
        lanes_max(m)
    }

    /// `out[i] = f(a[i], b[i])` as [`Fill::zip_map`], returning the largest `|out[i]|` (NaN
    /// ignored), as [`Fill::map_max_abs`] does.
    #[inline(always)]
    pub fn zip_map_max_abs(self, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
        const LANES: usize = 16;
        let n = a.len().min(b.len()).min(self.buf.len());
        let mut m = [0.0f32; LANES];
        let (oc, or) = self.buf[..n].as_chunks_mut::<LANES>();
        let ((ac, ar), (bc, br)) = (a[..n].as_chunks::<LANES>(), b[..n].as_chunks::<LANES>());
        for ((o, u), v) in oc.iter_mut().zip(ac).zip(bc) {
            for l in 0..LANES {
                let y = f(u[l], v[l]);
                o[l].write(y);
                m[l] = max_nan_blind(m[l], y.abs());
            }
        }
        for ((o, &u), &v) in or.iter_mut().zip(ar).zip(br) {
            let y = f(u, v);
            o.write(y);
            m[0] = max_nan_blind(m[0], y.abs());
        }
        for o in &mut self.buf[n..] {
            o.write(0.0);
        }
        self.done();
        lanes_max(m)
    }

    /// `out[i] = f(a[i], b[i])` as [`Fill::zip_map_max_abs`], returning the largest `|out[i]|`
    /// (NaN ignored) and setting bit `i % 64` of `positive[i / 64]` where `out[i] > 0`: all that a
    /// ReLU's backward pass needs of its output, in a 32nd of its bytes. `positive` holds
    /// `len().div_ceil(64)` words; the bits past the end of the chunk are 0.
    #[inline(always)]
    pub fn zip_map_max_abs_positive(
        self,
        a: &[f32],
        b: &[f32],
        positive: &mut [u64],
        f: impl Fn(f32, f32) -> f32,
    ) -> f32 {
        const LANES: usize = 16;
        let n = a.len().min(b.len()).min(self.buf.len());
        let mut m = [0.0f32; LANES];
        let (oc, or) = self.buf[..n].as_chunks_mut::<64>();
        let ((ac, ar), (bc, br)) = (a[..n].as_chunks::<64>(), b[..n].as_chunks::<64>());
        let (words, rest) = positive.split_at_mut(oc.len().min(positive.len()));
        for (((o, u), v), w) in oc.iter_mut().zip(ac).zip(bc).zip(words) {
            let mut word = 0u64;
            for l in 0..64 {
                let y = f(u[l], v[l]);
                o[l].write(y);
                m[l % LANES] = max_nan_blind(m[l % LANES], y.abs());
                word |= u64::from(y > 0.0) << l;
            }
            *w = word;
        }
        let mut word = 0u64;
        for (l, ((o, &u), &v)) in or.iter_mut().zip(ar).zip(br).enumerate() {
            let y = f(u, v);
            o.write(y);
            m[0] = max_nan_blind(m[0], y.abs());
            word |= u64::from(y > 0.0) << l;
        }
        rest.iter_mut().enumerate().for_each(|(i, w)| *w = if i == 0 { word } else { 0 });
        for o in &mut self.buf[n..] {
            o.write(0.0);
        }
        self.done();
        lanes_max(m)
    }

    /// `out[i] = x[i]` where bit `i % 64` of `bits[i / 64]` is set, else 0; values past the end
    /// of `x` or `bits` (a caller's bug) are zero.
    #[inline(always)]
    pub fn select_bits(self, x: &[f32], bits: &[u64]) {
        let n = x.len().min(self.buf.len()).min(bits.len() * 64);
        let (oc, or) = self.buf[..n].as_chunks_mut::<64>();
        let (xc, xr) = x[..n].as_chunks::<64>();
        for ((o, v), &w) in oc.iter_mut().zip(xc).zip(bits) {
            for l in 0..64 {
                o[l].write(if (w >> l) & 1 != 0 { v[l] } else { 0.0 });
            }
        }
        let w = bits.get(oc.len()).copied().unwrap_or(0);
        for (l, (o, &v)) in or.iter_mut().zip(xr).enumerate() {
            o.write(if (w >> l) & 1 != 0 { v } else { 0.0 });
        }
        for o in &mut self.buf[n..] {
            o.write(0.0);
        }
        self.done();
    }

    /// `out[i] = f(a[i], b[i])`; values past the end of `a` or `b` (a caller's bug) are zero.
    #[inline(always)]
    pub fn zip_map(self, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
        let n = a.len().min(b.len()).min(self.buf.len());
        for ((o, &u), &v) in self.buf[..n].iter_mut().zip(&a[..n]).zip(&b[..n]) {
            o.write(f(u, v));
        }
        for o in &mut self.buf[n..] {
            o.write(0.0);
        }
        self.done();
    }
}

/// A new vector of `n` zeros, zeroed by all of rayon's threads: for buffers a kernel accumulates
/// into or fills piecemeal. (`vec![0.0; n]` zeroes on one thread, at one core's memory speed.)
pub fn zeros(n: usize) -> Vec<f32> {
    // Below this, one thread zeroes it faster than rayon can share it out.
    const CHUNK: usize = 1 << 14;
    if n <= CHUNK {
        return vec![0f32; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n].par_chunks_mut(CHUNK).for_each(|c| {
        for e in c {
            e.write(0.0);
        }
    });
    // SAFETY: the capacity is at least `n`, and the loop above wrote all of the first `n` elements.
    unsafe { v.set_len(n) };
    v
}

/// A new vector of `n` values written by `write` through an [`Out`], and what `write` returned.
/// Errors if `write` fails or leaves part of the output untaken (a kernel bug; the values would
/// be undefined), so the vector returned is always fully written.
pub fn fresh<T>(n: usize, write: impl FnOnce(Out<'_>) -> Result<T>) -> Result<(Vec<f32>, T)> {
    let mut v = Vec::<f32>::with_capacity(n);
    let counter = Counter::new();
    let r = write(Out { buf: &mut v.spare_capacity_mut()[..n], handed: Some(&counter) })?;
    let handed = counter.total();
    if handed != n {
        return Err(CoreError::InvalidArgument {
            what: "kernel output",
            why: format!("the kernel wrote {handed} of {n} values; this is a bug in int8-core, please report it"),
        });
    }
    // SAFETY: the capacity is at least `n`, and all `n` values were initialised: `Out` is consumed
    // by `par_chunks`, `zeroed` or `par_fills`, which take disjoint chunks of its buffer, each
    // exactly once; a chunk is counted when it has been zeroed (`take`) or wholly written (the
    // `Fill` methods), and the counts add up to `n`.
    unsafe { v.set_len(n) };
    Ok((v, r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_vectors_hold_what_the_kernel_wrote_and_zeros_elsewhere() {
        for n in [0, 1, 7, 1000, 1 << 16] {
            let (v, r) = fresh(n, |out| {
                out.par_chunks(97).enumerate().for_each(|(i, c)| {
                    if i % 2 == 0 {
                        c.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 97 + j) as f32);
                    }
                });
                Ok(5)
            })
            .unwrap();
            assert_eq!((v.len(), r), (n, 5));
            for (k, &x) in v.iter().enumerate() {
                let want = if (k / 97) % 2 == 0 { k as f32 } else { 0.0 };
                assert_eq!(x, want, "n = {n}, index {k}");
            }
        }
    }

    #[test]
    fn an_output_not_wholly_taken_is_an_error_and_kernel_errors_pass_through() {
        let e = fresh(100, |out| {
            out.par_chunks(10).take(9).for_each(|c| c[0] = 1.0);
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("wrote 90 of 100"), "{e}");
        let e = fresh(10, |_| Err::<(), _>(CoreError::InvalidArgument { what: "x", why: "y".into() })).unwrap_err();
        assert_eq!(e.to_string(), "invalid x: y");
    }

    #[test]
    fn fills_write_every_value_and_zero_what_their_inputs_do_not_cover() {
        let a: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let (v, ()) = fresh(1000, |out| {
            out.par_fills(64).enumerate().for_each(|(i, f)| {
                let r = i * 64..(i * 64 + 64).min(1000);
                f.zip_map(&a[r.clone()], &a[r], |u, w| u + w + 1.0)
            });
            Ok(())
        })
        .unwrap();
        assert!(v.iter().enumerate().all(|(i, &x)| x == 2.0 * i as f32 + 1.0));
        let (v, ()) = fresh(10, |out| {
            out.par_fills(10).for_each(|f| f.map(&a[..4], |u| u - 1.0));
            Ok(())
        })
        .unwrap();
        assert_eq!(v, [-1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        let e = fresh(10, |out| {
            out.par_fills(5).take(1).for_each(|f| f.map(&a, |u| u));
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("wrote 5 of 10"), "{e}");
    }

    #[test]
    fn unzeroed_chunks_count_as_written_and_keep_what_the_kernel_wrote() {
        let (v, ()) = fresh(1000, |out| {
            // SAFETY: every element of every chunk is written below.
            let chunks = unsafe { out.par_chunks_unzeroed(64) };
            chunks.enumerate().for_each(|(i, c)| {
                c.iter_mut().enumerate().for_each(|(j, x)| {
                    x.write((i * 64 + j) as f32);
                })
            });
            Ok(())
        })
        .unwrap();
        assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
    }

    #[test]
    fn zeros_have_the_length_asked_for_and_only_zeros() {
        for n in [0, 1, (1 << 14) - 1, 1 << 14, (1 << 14) + 1, 5 * (1 << 14) + 7] {
            let v = zeros(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x.to_bits() == 0), "n = {n}");
        }
    }

    #[test]
    fn slices_wrapped_as_outputs_are_overwritten_in_place() {
        let mut v = vec![3.0f32; 10];
        Out::from(&mut v).par_chunks(4).for_each(|c| c[0] = 1.0);
        assert_eq!(v, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(Out::from(&mut v).zeroed(), &[0.0; 10]);
    }
}
