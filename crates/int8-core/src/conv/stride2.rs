//! Every-other-element gathers and scatters, the data movement of stride-2 convolutions: splitting
//! an input row into its even and odd columns (the forward pass and the weight gradient), and
//! writing one phase of the input gradient back into its columns.
//!
//! The moves come one row at a time (`gather`, `scatter`, `deinterleave`, `interleave`) or, for
//! even widths, a whole pair of phase planes per call (`deinterleave_rows`, `interleave_rows`):
//! on the small planes of CIFAR networks a call per row cost more than the moves.
//!
//! The scalar loops do not vectorise (the compiler emits one load and one store per element), so
//! on AVX-512 (BW and VL) one byte or one 32-bit lane of each pair is selected by a narrowing move
//! (`vpmovwb`, `vpmovqd`) and written back by a widening move and a masked store, or two phases
//! are merged by one two-source permute (`vpermt2d`). Everything else takes the scalar loop, which
//! defines the meaning.

use std::mem::MaybeUninit;

/// `dst[v] = src[2 * v]` for `v < n`, `n = min(dst.len(), ceil(src.len() / 2))`; returns `n`.
pub(crate) fn gather<T: Copy>(src: &[T], dst: &mut [T]) -> usize {
    let n = dst.len().min(src.len().div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        match std::mem::size_of::<T>() {
            1 => {
                // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); `T` is a 1-byte `Copy`
                // type, so its bytes can be moved as u8; `n <= dst.len()` and the kernel reads
                // only `src[..src.len()]` (masked), as the safety contract of `gather_u8` asks.
                unsafe { gather_u8(src.as_ptr().cast(), src.len(), dst.as_mut_ptr().cast(), n) };
                return n;
            }
            4 => {
                // SAFETY: as above, for a 4-byte `Copy` type moved as u32.
                unsafe { gather_u32(src.as_ptr().cast(), src.len(), dst.as_mut_ptr().cast(), n) };
                return n;
            }
            _ => {}
        }
    }
    gather_scalar(src, &mut dst[..n]);
    n
}

/// The scalar [`gather`] of `dst.len()` elements.
fn gather_scalar<T: Copy>(src: &[T], dst: &mut [T]) {
    for (d, &v) in dst.iter_mut().zip(src.iter().step_by(2)) {
        *d = v;
    }
}

/// `dst[2 * v] = src[v]` for `v < n`, `n = min(src.len(), ceil(dst.len() / 2))`, leaving the odd
/// elements of `dst` as they were.
pub(crate) fn scatter<T: Copy>(src: &[T], dst: &mut [T]) {
    let n = src.len().min(dst.len().div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && std::mem::size_of::<T>() == 4 {
        // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); `T` is a 4-byte `Copy` type
        // moved as u32; the kernel writes only `dst[2 * v]` for `v < n` (masked), all inside
        // `dst`, and reads `src[..n]`.
        unsafe { scatter_u32(src.as_ptr().cast(), dst.as_mut_ptr().cast(), dst.len(), n) };
        return;
    }
    scatter_scalar(&src[..n], dst);
}

/// The scalar [`scatter`] of `src.len()` elements.
fn scatter_scalar<T: Copy>(src: &[T], dst: &mut [T]) {
    for (d, &v) in dst.iter_mut().step_by(2).zip(src) {
        *d = v;
    }
}

/// `dst[v] = src[stride * v]` for every `v` inside both, any stride (stride 2 runs [`gather`]);
/// returns how many elements were written.
pub(crate) fn gather_strided<T: Copy>(src: &[T], dst: &mut [T], stride: usize) -> usize {
    if stride == 2 {
        return gather(src, dst);
    }
    let mut k = 0;
    for (d, &v) in dst.iter_mut().zip(src.iter().step_by(stride)) {
        *d = v;
        k += 1;
    }
    k
}

/// `dst[stride * v] = src[v]` for every `v` inside both, any stride (stride 2 runs [`scatter`]).
pub(crate) fn scatter_strided<T: Copy>(src: &[T], dst: &mut [T], stride: usize) {
    if stride == 2 {
        return scatter(src, dst);
    }
    for (d, &v) in dst.iter_mut().step_by(stride).zip(src) {
        *d = v;
    }
}

/// One plane's stride-2 subsample in one call: `dst[i * ow + v] = src[2 i * w + 2 v]` for
/// `i < oh`, `v < ow`, where `w` is the source's row length (`ow <= ceil(w / 2)`, `src` holds row
/// `2 (oh - 1)`; checked). On the 16x16 subsamples of CIFAR networks a call per row cost more
/// than the moves.
pub(crate) fn gather_plane<T: Copy>(src: &[T], w: usize, oh: usize, ow: usize, dst: &mut [T]) {
    assert!(
        ow <= w.div_ceil(2) && (oh == 0 || src.len() >= (2 * oh - 1) * w) && dst.len() >= oh * ow,
        "gather_plane: {oh}x{ow} from rows of {w} do not fit"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        match std::mem::size_of::<T>() {
            // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); `T` is a 1-byte `Copy`
            // type moved as u8; the assertion above is the kernel's contract.
            1 => unsafe { return gather_plane_u8(src.as_ptr().cast(), w, oh, ow, dst.as_mut_ptr().cast()) },
            // SAFETY: as above, for a 4-byte `Copy` type moved as u32.
            4 => unsafe { return gather_plane_u32(src.as_ptr().cast(), w, oh, ow, dst.as_mut_ptr().cast()) },
            _ => {}
        }
    }
    gather_plane_scalar(src, w, oh, ow, dst);
}

/// The scalar [`gather_plane`].
fn gather_plane_scalar<T: Copy>(src: &[T], w: usize, oh: usize, ow: usize, dst: &mut [T]) {
    for (i, row) in dst[..oh * ow].chunks_exact_mut(ow.max(1)).enumerate() {
        gather_scalar(&src[2 * i * w..][..w], row);
    }
}

/// The inverse of [`gather_plane`] for gradients, writing every element of the `h x w` plane
/// `dst`: `src[i * ow + v]` at `(2 i, 2 v)`, zero at every other pixel (`h <= 2 oh`,
/// `w <= 2 ow`, `src` holds `oh * ow`; checked). Each row is written once, so `dst` needs no
/// zeroing first.
pub(crate) fn place_plane(src: &[f32], oh: usize, ow: usize, h: usize, w: usize, dst: &mut [MaybeUninit<f32>]) {
    assert!(
        h <= 2 * oh && w <= 2 * ow && src.len() >= oh * ow && dst.len() >= h * w,
        "place_plane: {oh}x{ow} do not fill a {h}x{w} plane"
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); the assertion above is the
        // kernel's contract; `MaybeUninit<f32>` has `f32`'s layout and only values are written.
        unsafe { place_plane_u32(src.as_ptr().cast(), ow, h, w, dst.as_mut_ptr().cast()) };
        return;
    }
    place_plane_scalar(src, ow, h, w, dst);
}

/// The scalar [`place_plane`].
fn place_plane_scalar(src: &[f32], ow: usize, h: usize, w: usize, dst: &mut [MaybeUninit<f32>]) {
    for (r, row) in dst[..h * w].chunks_exact_mut(w.max(1)).enumerate() {
        let from = (r % 2 == 0).then(|| &src[r / 2 * ow..][..ow]);
        for (j, d) in row.iter_mut().enumerate() {
            d.write(match from {
                Some(from) if j % 2 == 0 => from[j / 2],
                _ => 0.0,
            });
        }
    }
}

/// Checks that `rows` rows of `half` elements in each of two phase buffers and of `2 * half`
/// elements, `stride` apart, in a row buffer of `row_len` fit (the contract of the row-pair moves).
fn assert_rows_fit(what: &str, phase_lens: (usize, usize), row_len: usize, rows: usize, half: usize, stride: usize) {
    assert!(
        phase_lens.0 >= rows * half
            && phase_lens.1 >= rows * half
            && (rows == 0 || row_len >= (rows - 1) * stride + 2 * half),
        "{what}: {rows} rows of {} do not fit",
        2 * half
    );
}

/// `even[v] = src[2 * v]` and `odd[v] = src[2 * v + 1]` for every `v` inside both the
/// destination and `src`, in one pass over `src` (splitting a row into its two column phases).
/// Returns how many elements of `even` and of `odd` were written.
pub(crate) fn deinterleave<T: Copy>(src: &[T], even: &mut [T], odd: &mut [T]) -> (usize, usize) {
    let n0 = even.len().min(src.len().div_ceil(2));
    let n1 = odd.len().min(src.len() / 2);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && n0 + n1 == src.len() {
        match std::mem::size_of::<T>() {
            // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); `T` is a 1-byte `Copy` type
            // moved as u8; `src.len() = n0 + n1` here, so the kernel reads only `src` and writes
            // `even[..n0]` and `odd[..n1]`, as its contract asks.
            1 => unsafe {
                deinterleave_u8(src.as_ptr().cast(), src.len(), even.as_mut_ptr().cast(), odd.as_mut_ptr().cast());
                return (n0, n1);
            },
            // SAFETY: as above, for a 4-byte `Copy` type moved as u32.
            4 => unsafe {
                deinterleave_u32(src.as_ptr().cast(), src.len(), even.as_mut_ptr().cast(), odd.as_mut_ptr().cast());
                return (n0, n1);
            },
            _ => {}
        }
    }
    gather_scalar(src, &mut even[..n0]);
    gather_scalar(&src[1.min(src.len())..], &mut odd[..n1]);
    (n0, n1)
}

/// [`deinterleave`] of `rows` rows of `2 * half` elements, row `k` starting at `src[k * stride]`,
/// into consecutive rows of `half` elements of `even` and `odd`: one call for a whole phase plane
/// of a stride-2 input of even width, where a call per row cost more than the moves.
pub(crate) fn deinterleave_rows<T: Copy>(
    src: &[T],
    stride: usize,
    rows: usize,
    half: usize,
    even: &mut [T],
    odd: &mut [T],
) {
    assert_rows_fit("deinterleave_rows", (even.len(), odd.len()), src.len(), rows, half, stride);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && matches!(std::mem::size_of::<T>(), 1 | 4) {
        // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); `T` is a 1- or 4-byte `Copy`
        // type moved as u8 or u32; the assertion above keeps every row's `2 * half` reads inside
        // `src` and its `half` writes inside `even` and `odd`.
        unsafe {
            deinterleave_rows_avx512(
                src.as_ptr().cast(),
                stride,
                rows,
                half,
                even.as_mut_ptr().cast(),
                odd.as_mut_ptr().cast(),
                std::mem::size_of::<T>(),
            )
        };
        return;
    }
    for k in 0..rows {
        deinterleave(&src[k * stride..][..2 * half], &mut even[k * half..][..half], &mut odd[k * half..][..half]);
    }
}

/// Splits an `h x w` plane of bytes into its four stride-2 phases, each `h/2 x w/2` and written
/// whole: `phases[2 * r + c]` gets the pixels of rows `r, r + 2, ...` and columns `c, c + 2, ...`.
/// Applies only on AVX-512 VBMI with `w` of 8, 16 or 32, `h` even and `h * w` a multiple of 64;
/// elsewhere it writes nothing and returns false (the caller moves rows itself). One 64-byte load
/// covers `64 / w` rows, and one byte permute sorts it into 16 bytes of each phase: on the small
/// planes of CIFAR networks, moving a row at a time cost more than the bytes.
pub(crate) fn split_phases_2x2<T: Copy>(src: &[T], h: usize, w: usize, phases: [&mut [T]; 4]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::mem::size_of::<T>() == 1
        && matches!(w, 8 | 16 | 32)
        && h.is_multiple_of(2)
        && (h * w).is_multiple_of(64)
        && src.len() >= h * w
        && phases.iter().all(|p| p.len() >= h * w / 4)
        && has_avx512()
        && is_x86_feature_detected!("avx512vbmi")
    {
        let dst = phases.map(|p| p.as_mut_ptr().cast::<u8>());
        // SAFETY: the CPU has AVX-512 F, BW, VL and VBMI (checked above); `T` is a 1-byte `Copy`
        // type moved as u8; `src` holds the `h * w` bytes read and each phase the `h * w / 4`
        // written (checked above), and `w` and `h` are what the kernel requires.
        unsafe { split_phases_2x2_u8(src.as_ptr().cast(), h * w, w, dst) };
        return true;
    }
    let _ = (src, h, w, phases);
    false
}

/// The byte permutation of [`split_phases_2x2`] for rows of `w` bytes: output byte `l` belongs to
/// phase `l / 16` (row parity `r`, column parity `c`), and its place `j = l % 16` among that
/// phase's 16 bytes is row pair `j / (w / 2)`, column `j % (w / 2)`.
const fn split_index(w: usize) -> [u8; 64] {
    let (half, mut index, mut l) = (w / 2, [0u8; 64], 0);
    while l < 64 {
        let (phase, j) = (l / 16, l % 16);
        let (r, c) = (phase / 2, phase % 2);
        index[l] = ((2 * (j / half) + r) * w + 2 * (j % half) + c) as u8;
        l += 1;
    }
    index
}

/// # Safety
/// AVX-512 F, BW, VL and VBMI; `w` is 8, 16 or 32 and `len` (the plane, `h * w` with `h` even) a
/// multiple of 64; `src` valid for `len` reads and each `dst` for `len / 4` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi")]
unsafe fn split_phases_2x2_u8(src: *const u8, len: usize, w: usize, dst: [*mut u8; 4]) {
    use std::arch::x86_64::*;
    const INDEX: [[u8; 64]; 3] = [split_index(8), split_index(16), split_index(32)];
    let index = &INDEX[w.trailing_zeros() as usize - 3];
    // SAFETY: `index` is 64 bytes.
    let index = unsafe { _mm512_loadu_si512(index.as_ptr().cast()) };
    for b in 0..len / 64 {
        // SAFETY: block `b` is `src[64 b .. 64 b + 64]`, inside `len`; it fills bytes
        // `16 b .. 16 b + 16` of each phase, inside `len / 4`.
        unsafe {
            let v = _mm512_permutexvar_epi8(index, _mm512_loadu_si512(src.add(64 * b).cast()));
            _mm_storeu_si128(dst[0].add(16 * b).cast(), _mm512_castsi512_si128(v));
            _mm_storeu_si128(dst[1].add(16 * b).cast(), _mm512_extracti32x4_epi32::<1>(v));
            _mm_storeu_si128(dst[2].add(16 * b).cast(), _mm512_extracti32x4_epi32::<2>(v));
            _mm_storeu_si128(dst[3].add(16 * b).cast(), _mm512_extracti32x4_epi32::<3>(v));
        }
    }
}

/// `dst[2 * v] = even[v]` and `dst[2 * v + 1] = odd[v]`: the inverse of [`deinterleave`], writing
/// a whole row from its two column phases. `even` holds `ceil(dst.len() / 2)` elements and `odd`
/// `floor(dst.len() / 2)` (checked).
pub(crate) fn interleave<T: Copy>(even: &[T], odd: &[T], dst: &mut [T]) {
    assert!(
        even.len() == dst.len().div_ceil(2) && odd.len() == dst.len() / 2,
        "interleave: {} even and {} odd elements do not make a row of {}",
        even.len(),
        odd.len(),
        dst.len()
    );
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && std::mem::size_of::<T>() == 4 {
        // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); `T` is a 4-byte `Copy` type
        // moved as u32; the lengths were checked above as the kernel's contract asks.
        unsafe { interleave_u32(even.as_ptr().cast(), odd.as_ptr().cast(), dst.as_mut_ptr().cast(), dst.len()) };
        return;
    }
    scatter_scalar(even, dst);
    let second = 1.min(dst.len());
    scatter_scalar(odd, &mut dst[second..]);
}

/// [`interleave`] of `rows` rows: row `k` of `half` elements of `even` and of `odd` (consecutive
/// rows) into `dst[k * stride..][..2 * half]`; one call for a whole pair of phase planes of an
/// even-width input gradient.
pub(crate) fn interleave_rows<T: Copy>(even: &[T], odd: &[T], rows: usize, half: usize, dst: &mut [T], stride: usize) {
    assert_rows_fit("interleave_rows", (even.len(), odd.len()), dst.len(), rows, half, stride);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && std::mem::size_of::<T>() == 4 {
        // SAFETY: the CPU has AVX-512 F, BW and VL (checked above); `T` is a 4-byte `Copy` type
        // moved as u32; the assertion above keeps every row's reads inside `even` and `odd` and
        // its `2 * half` writes inside `dst`.
        unsafe {
            interleave_rows_u32(even.as_ptr().cast(), odd.as_ptr().cast(), rows, half, dst.as_mut_ptr().cast(), stride)
        };
        return;
    }
    for k in 0..rows {
        interleave(&even[k * half..][..half], &odd[k * half..][..half], &mut dst[k * stride..][..2 * half]);
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    crate::cpu::allows(crate::cpu::Level::Avx512)
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
}

/// A mask of the low `k` bits (`k <= 64`).
#[cfg(target_arch = "x86_64")]
fn low_bits(k: usize) -> u64 {
    if k >= 64 { u64::MAX } else { (1u64 << k) - 1 }
}

/// # Safety
/// AVX-512 F, BW and VL; `src` valid for `src_len` reads, `dst` for `n` writes,
/// `n <= ceil(src_len / 2)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn gather_u8(src: *const u8, src_len: usize, dst: *mut u8, n: usize) {
    use std::arch::x86_64::*;
    let mut v = 0;
    while v < n {
        let m = (n - v).min(32);
        let avail = src_len - 2 * v;
        // SAFETY: the mask limits the load to `src[2v .. 2v + min(64, avail)]`, inside `src`.
        let x = unsafe { _mm512_maskz_loadu_epi8(low_bits(avail.min(64)), src.add(2 * v).cast()) };
        // The low byte of each 16-bit word is the even element.
        let even = _mm512_cvtepi16_epi8(x);
        // SAFETY: the mask limits the store to `dst[v .. v + m]`, `v + m <= n`.
        unsafe { _mm256_mask_storeu_epi8(dst.add(v).cast(), low_bits(m) as u32, even) };
        v += m;
    }
}

/// # Safety
/// AVX-512 F, BW and VL; `src` valid for `src_len` reads, `dst` for `n` writes,
/// `n <= ceil(src_len / 2)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn gather_u32(src: *const u32, src_len: usize, dst: *mut u32, n: usize) {
    use std::arch::x86_64::*;
    let mut v = 0;
    while v < n {
        let m = (n - v).min(8);
        let avail = src_len - 2 * v;
        // SAFETY: the mask limits the load to `src[2v .. 2v + min(16, avail)]`, inside `src`.
        let x = unsafe { _mm512_maskz_loadu_epi32(low_bits(avail.min(16)) as u16, src.add(2 * v).cast()) };
        // The low half of each 64-bit lane is the even element.
        let even = _mm512_cvtepi64_epi32(x);
        // SAFETY: the mask limits the store to `dst[v .. v + m]`, `v + m <= n`.
        unsafe { _mm256_mask_storeu_epi32(dst.add(v).cast(), low_bits(m) as u8, even) };
        v += m;
    }
}

/// # Safety
/// AVX-512 F, BW and VL; `src` valid for reads of rows `0, 2, .., 2 (oh - 1)` of `w` elements,
/// `dst` for `oh * ow` writes, `ow <= ceil(w / 2)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn gather_plane_u32(src: *const u32, w: usize, oh: usize, ow: usize, dst: *mut u32) {
    use std::arch::x86_64::*;
    // Lane `l` takes element `2 l` of the 32 that two registers hold.
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for i in 0..oh {
        // SAFETY: row `2 i` lies inside `src` (the contract).
        let (row, out) = unsafe { (src.add(2 * i * w), dst.add(i * ow)) };
        let mut v = 0;
        while v < ow {
            let m = (ow - v).min(16);
            let avail = w - 2 * v;
            // SAFETY: the masks limit the loads to `row[2v .. 2v + min(32, avail)]`, inside the
            // row, and the store to `out[v .. v + m]`, `v + m <= ow`.
            unsafe {
                let lo = _mm512_maskz_loadu_epi32(low_bits(avail.min(16)) as u16, row.add(2 * v).cast());
                let hi = _mm512_maskz_loadu_epi32(
                    low_bits(avail.saturating_sub(16).min(16)) as u16,
                    row.add(2 * v + 16).cast(),
                );
                _mm512_mask_storeu_epi32(
                    out.add(v).cast(),
                    low_bits(m) as u16,
                    _mm512_permutex2var_epi32(lo, even, hi),
                );
            }
            v += m;
        }
    }
}

/// # Safety
/// AVX-512 F, BW and VL; `src` valid for reads of rows `0, 2, .., 2 (oh - 1)` of `w` bytes, `dst`
/// for `oh * ow` writes, `ow <= ceil(w / 2)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn gather_plane_u8(src: *const u8, w: usize, oh: usize, ow: usize, dst: *mut u8) {
    for i in 0..oh {
        // SAFETY: row `2 i` lies inside `src` and output row `i` inside `dst` (the contract);
        // `gather_u8` reads at most the row's `w` bytes and writes its `ow <= ceil(w / 2)`.
        unsafe { gather_u8(src.add(2 * i * w), w, dst.add(i * ow), ow) };
    }
}

/// # Safety
/// AVX-512 F, BW and VL; `src` valid for `oh * ow` reads, `dst` for `h * w` writes, `h <= 2 oh`,
/// `w <= 2 ow`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn place_plane_u32(src: *const u32, ow: usize, h: usize, w: usize, dst: *mut u32) {
    use std::arch::x86_64::*;
    for r in 0..h {
        // SAFETY: row `r < h` of `dst` (the contract).
        let out = unsafe { dst.add(r * w) };
        if r % 2 == 1 {
            let mut j = 0;
            while j < w {
                let k = (w - j).min(16);
                // SAFETY: the mask limits the store to `out[j .. j + k]`, inside the row.
                unsafe { _mm512_mask_storeu_epi32(out.add(j).cast(), low_bits(k) as u16, _mm512_setzero_si512()) };
                j += k;
            }
            continue;
        }
        // SAFETY: `r / 2 < oh` since `r < h <= 2 oh`.
        let from = unsafe { src.add(r / 2 * ow) };
        let mut v = 0;
        while 2 * v < w {
            let m = (ow - v).min(8);
            // SAFETY: the masks limit the load to `from[v .. v + m]`, inside the source row, and
            // the store to `out[2v .. min(2v + 16, w)]`, inside the row.
            unsafe {
                let x = _mm256_maskz_loadu_epi32(low_bits(m) as u8, from.add(v).cast());
                // Each element in the low half of a 64-bit lane, zero in the high half: the pixel
                // and its odd neighbour.
                let wide = _mm512_cvtepu32_epi64(x);
                _mm512_mask_storeu_epi32(out.add(2 * v).cast(), low_bits((w - 2 * v).min(16)) as u16, wide);
            }
            v += m;
        }
    }
}

/// # Safety
/// AVX-512 F, BW and VL; `src` valid for `n` reads, `dst` for `dst_len` reads and writes,
/// `n <= ceil(dst_len / 2)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scatter_u32(src: *const u32, dst: *mut u32, dst_len: usize, n: usize) {
    use std::arch::x86_64::*;
    debug_assert!(n == 0 || 2 * (n - 1) < dst_len);
    let mut v = 0;
    while v < n {
        let m = (n - v).min(8);
        // SAFETY: the mask limits the load to `src[v .. v + m]`, `v + m <= n`.
        let x = unsafe { _mm256_maskz_loadu_epi32(low_bits(m) as u8, src.add(v).cast()) };
        // Each element lands in the low half of a 64-bit lane: the even positions.
        let wide = _mm512_cvtepu32_epi64(x);
        // Even lanes only, and only those of the `m` elements.
        let lanes = 0x5555u16 & low_bits(2 * m) as u16;
        // SAFETY: the mask writes `dst[2v + 2i]` for `i < m`, and `2(v + m - 1) < dst_len`
        // because `v + m <= n <= ceil(dst_len / 2)`.
        unsafe { _mm512_mask_storeu_epi32(dst.add(2 * v).cast(), lanes, wide) };
        v += m;
    }
}

/// # Safety
/// AVX-512 F, BW and VL; `src` valid for `len` reads, `even` for `ceil(len / 2)` writes and `odd`
/// for `floor(len / 2)` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn deinterleave_u8(src: *const u8, len: usize, even: *mut u8, odd: *mut u8) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i < len {
        let k = (len - i).min(64);
        // SAFETY: the mask limits the load to `src[i .. i + k]`, inside `src`.
        let x = unsafe { _mm512_maskz_loadu_epi8(low_bits(k), src.add(i).cast()) };
        // The low byte of each 16-bit word is the even element, the high byte the odd one.
        let (e, o) = (_mm512_cvtepi16_epi8(x), _mm512_cvtepi16_epi8(_mm512_srli_epi16::<8>(x)));
        // SAFETY: `i` is even, so these write `even[i/2 .. i/2 + ceil(k/2)]` and
        // `odd[i/2 .. i/2 + floor(k/2)]`, inside the destinations.
        unsafe {
            _mm256_mask_storeu_epi8(even.add(i / 2).cast(), low_bits(k.div_ceil(2)) as u32, e);
            _mm256_mask_storeu_epi8(odd.add(i / 2).cast(), low_bits(k / 2) as u32, o);
        }
        i += k;
    }
}

/// # Safety
/// AVX-512 F, BW and VL; `src` valid for `len` reads, `even` for `ceil(len / 2)` writes and `odd`
/// for `floor(len / 2)` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn deinterleave_u32(src: *const u32, len: usize, even: *mut u32, odd: *mut u32) {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i < len {
        let k = (len - i).min(16);
        // SAFETY: the mask limits the load to `src[i .. i + k]`, inside `src`.
        let x = unsafe { _mm512_maskz_loadu_epi32(low_bits(k) as u16, src.add(i).cast()) };
        // The low half of each 64-bit lane is the even element, the high half the odd one.
        let (e, o) = (_mm512_cvtepi64_epi32(x), _mm512_cvtepi64_epi32(_mm512_srli_epi64::<32>(x)));
        // SAFETY: `i` is even, so these write `even[i/2 .. i/2 + ceil(k/2)]` and
        // `odd[i/2 .. i/2 + floor(k/2)]`, inside the destinations.
        unsafe {
            _mm256_mask_storeu_epi32(even.add(i / 2).cast(), low_bits(k.div_ceil(2)) as u8, e);
            _mm256_mask_storeu_epi32(odd.add(i / 2).cast(), low_bits(k / 2) as u8, o);
        }
        i += k;
    }
}

/// # Safety
/// AVX-512 F, BW and VL; `elem` is 1 or 4; for each `k < rows`, `src` (elements of `elem` bytes)
/// valid for `2 * half` reads from `k * stride`, and `even` and `odd` for `half` writes from
/// `k * half`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn deinterleave_rows_avx512(
    src: *const u8,
    stride: usize,
    rows: usize,
    half: usize,
    even: *mut u8,
    odd: *mut u8,
    elem: usize,
) {
    for k in 0..rows {
        // SAFETY: the caller's contract, row by row; the kernels read `2 * half` elements and
        // write `half` to each destination.
        unsafe {
            let (s, e, o) = (src.add(k * stride * elem), even.add(k * half * elem), odd.add(k * half * elem));
            if elem == 1 {
                deinterleave_u8(s, 2 * half, e, o);
            } else {
                deinterleave_u32(s.cast(), 2 * half, e.cast(), o.cast());
            }
        }
    }
}

/// # Safety
/// AVX-512 F, BW and VL; for each `k < rows`, `even` and `odd` valid for `half` reads from
/// `k * half`, `dst` for `2 * half` writes from `k * stride`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn interleave_rows_u32(
    even: *const u32,
    odd: *const u32,
    rows: usize,
    half: usize,
    dst: *mut u32,
    stride: usize,
) {
    for k in 0..rows {
        // SAFETY: the caller's contract, row by row.
        unsafe { interleave_u32(even.add(k * half), odd.add(k * half), dst.add(k * stride), 2 * half) };
    }
}

/// # Safety
/// AVX-512 F, BW and VL; `even` valid for `ceil(len / 2)` reads, `odd` for `floor(len / 2)` reads,
/// `dst` for `len` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn interleave_u32(even: *const u32, odd: *const u32, dst: *mut u32, len: usize) {
    use std::arch::x86_64::*;
    // Output lane `2j` takes lane `j` of the first operand, lane `2j + 1` lane `j` of the second
    // (index 16 + j); the high half takes lanes 8..16 the same way.
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let mut i = 0;
    while i < len {
        let k = (len - i).min(32);
        // SAFETY: `i` is even; the masks limit the loads to `even[i/2 .. i/2 + ceil(k/2)]` and
        // `odd[i/2 .. i/2 + floor(k/2)]`, inside the sources.
        let (e, o) = unsafe {
            (
                _mm512_maskz_loadu_epi32(low_bits(k.div_ceil(2)) as u16, even.add(i / 2).cast()),
                _mm512_maskz_loadu_epi32(low_bits(k / 2) as u16, odd.add(i / 2).cast()),
            )
        };
        // SAFETY: the masks limit the stores to `dst[i .. i + k]`, inside `dst`.
        unsafe {
            _mm512_mask_storeu_epi32(
                dst.add(i).cast(),
                low_bits(k.min(16)) as u16,
                _mm512_permutex2var_epi32(e, lo, o),
            );
            if k > 16 {
                _mm512_mask_storeu_epi32(
                    dst.add(i + 16).cast(),
                    low_bits(k - 16) as u16,
                    _mm512_permutex2var_epi32(e, hi, o),
                );
            }
        }
        i += k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast paths (where this CPU has them) and the scalar loops, each against the definition.
    #[test]
    fn gathers_and_scatters_take_every_other_element_at_every_length() {
        type Gather<T> = fn(&[T], &mut [T]) -> usize;
        let scalar8: Gather<i8> = |s, d| {
            let n = d.len().min(s.len().div_ceil(2));
            gather_scalar(s, &mut d[..n]);
            n
        };
        let scalar32: Gather<f32> = |s, d| {
            let n = d.len().min(s.len().div_ceil(2));
            gather_scalar(s, &mut d[..n]);
            n
        };
        let scatter32: fn(&[f32], &mut [f32]) = |s, d| {
            let n = s.len().min(d.len().div_ceil(2));
            scatter_scalar(&s[..n], d);
        };
        for (gather8, gather32, scatter) in [
            (gather::<i8> as Gather<i8>, gather::<f32> as Gather<f32>, scatter::<f32> as fn(&[f32], &mut [f32])),
            (scalar8, scalar32, scatter32),
        ] {
            check(gather8, gather32, scatter);
        }
    }

    /// The 2x2 phase split against its definition, at every width it takes and some it leaves.
    #[test]
    fn split_phases_2x2_puts_every_pixel_in_its_phase() {
        for (h, w) in [(8, 8), (16, 8), (4, 16), (8, 16), (16, 16), (2, 32), (32, 32), (6, 8), (4, 24), (2, 64)] {
            let src: Vec<i8> = (0..h * w).map(|i| (i * 37 % 251) as i8).collect();
            let mut out = vec![vec![0x55i8; h * w / 4]; 4];
            let [a, b, c, d] = &mut out[..] else { unreachable!() };
            let done = split_phases_2x2(&src, h, w, [a, b, c, d]);
            let takes = matches!(w, 8 | 16 | 32) && (h * w) % 64 == 0;
            if !takes {
                assert!(!done, "{h}x{w} is not a plane it takes");
                assert!(out.iter().flatten().all(|&v| v == 0x55), "{h}x{w}: written though not taken");
                continue;
            }
            if !done {
                // This CPU lacks AVX-512 VBMI; the definition is checked where it has it.
                continue;
            }
            for (p, phase) in out.iter().enumerate() {
                let (r, c) = (p / 2, p % 2);
                for u in 0..h / 2 {
                    for v in 0..w / 2 {
                        assert_eq!(
                            phase[u * (w / 2) + v],
                            src[(2 * u + r) * w + 2 * v + c],
                            "{h}x{w} phase {p} ({u}, {v})"
                        );
                    }
                }
            }
        }
    }

    /// Splitting a row into its column phases and putting it back, at every length, against the
    /// definition, with the fast paths and with the scalar loops.
    #[test]
    fn rows_split_into_column_phases_and_back_at_every_length() {
        for len in 0..140usize {
            let src8: Vec<i8> = (0..len).map(|i| (i as i8).wrapping_mul(37).wrapping_add(5)).collect();
            let src32: Vec<f32> = (0..len).map(|i| i as f32 * 1.5 - 7.0).collect();
            for extra in [0, 3] {
                let (mut e8, mut o8) = (vec![99i8; len.div_ceil(2) + extra], vec![99i8; len / 2 + extra]);
                assert_eq!(deinterleave(&src8, &mut e8, &mut o8), (len.div_ceil(2), len / 2));
                for (v, &d) in e8.iter().enumerate() {
                    assert_eq!(d, src8.get(2 * v).copied().unwrap_or(99), "even i8, len {len}, at {v}");
                }
                for (v, &d) in o8.iter().enumerate() {
                    assert_eq!(d, src8.get(2 * v + 1).copied().unwrap_or(99), "odd i8, len {len}, at {v}");
                }
                let (mut e32, mut o32) = (vec![99f32; len.div_ceil(2) + extra], vec![99f32; len / 2 + extra]);
                deinterleave(&src32, &mut e32, &mut o32);
                for (v, &d) in e32.iter().enumerate() {
                    assert_eq!(d, src32.get(2 * v).copied().unwrap_or(99.0), "even f32, len {len}, at {v}");
                }
                for (v, &d) in o32.iter().enumerate() {
                    assert_eq!(d, src32.get(2 * v + 1).copied().unwrap_or(99.0), "odd f32, len {len}, at {v}");
                }
                if extra == 0 {
                    let mut back = vec![0.5f32; len];
                    interleave(&e32, &o32, &mut back);
                    assert_eq!(back, src32, "interleave, len {len}");
                }
            }
            // Shorter destinations take what fits.
            let (mut e8, mut o8) = (vec![0i8; len / 3], vec![0i8; len / 5]);
            assert_eq!(deinterleave(&src8, &mut e8, &mut o8), (len / 3, len / 5));
            assert!(e8.iter().enumerate().all(|(v, &d)| d == src8[2 * v]));
            assert!(o8.iter().enumerate().all(|(v, &d)| d == src8[2 * v + 1]));
        }
        // Whole planes: rows of 2 * half, every other row of a wider source.
        for half in [1, 5, 16, 33] {
            let (rows, stride) = (7, 4 * half + 3);
            let src: Vec<i8> = (0..rows * stride).map(|i| (i as i8).wrapping_mul(13)).collect();
            let src32: Vec<f32> = src.iter().map(|&v| v as f32).collect();
            let (mut e, mut o) = (vec![0i8; rows * half], vec![0i8; rows * half]);
            let (mut back, want) = (vec![0.5f32; rows * stride], {
                let mut w = vec![0.5f32; rows * stride];
                for k in 0..rows {
                    w[k * stride..][..2 * half].copy_from_slice(&src32[k * stride..][..2 * half]);
                }
                w
            });
            let (mut e32, mut o32) = (vec![0f32; rows * half], vec![0f32; rows * half]);
            deinterleave_rows(&src, stride, rows, half, &mut e, &mut o);
            deinterleave_rows(&src32, stride, rows, half, &mut e32, &mut o32);
            for k in 0..rows {
                for v in 0..half {
                    let (ev, od) = (src[k * stride + 2 * v], src[k * stride + 2 * v + 1]);
                    assert_eq!((e[k * half + v], o[k * half + v]), (ev, od), "rows of {half}, row {k}, at {v}");
                    assert_eq!((e32[k * half + v], o32[k * half + v]), (ev as f32, od as f32));
                }
            }
            interleave_rows(&e32, &o32, rows, half, &mut back, stride);
            assert_eq!(back, want, "rows of {half} put back, the rest untouched");
        }
        let (mut even, mut odd, mut row) = (vec![0f32; 5], vec![0f32; 4], vec![1f32; 9]);
        let scalar = |src: &[f32], even: &mut [f32], odd: &mut [f32]| {
            gather_scalar(src, even);
            gather_scalar(&src[1..], odd);
        };
        let src: Vec<f32> = (0..9).map(|i| i as f32).collect();
        scalar(&src, &mut even, &mut odd);
        scatter_scalar(&even, &mut row);
        scatter_scalar(&odd, &mut row[1..]);
        assert_eq!(row, src, "the scalar loops define the same moves");
    }

    /// Whole planes, the fast paths (where this CPU has them) and the scalar loops, against the
    /// definition at even and odd sizes: the subsample, and the placement back with zeros at every
    /// other pixel, written whole over a plane of NaN.
    #[test]
    fn planes_gather_their_subsample_and_place_it_back() {
        type Place = fn(&[f32], usize, usize, usize, usize, &mut [MaybeUninit<f32>]);
        type Gather = fn(&[f32], usize, usize, usize, &mut [f32]);
        let gathers: [Gather; 2] = [gather_plane, gather_plane_scalar];
        let places: [Place; 2] = [place_plane, |src, _, ow, h, w, dst| place_plane_scalar(src, ow, h, w, dst)];
        for (h, w) in [(1usize, 1usize), (2, 2), (3, 5), (32, 32), (16, 33), (7, 40), (4, 64), (5, 65), (2, 31)] {
            let (oh, ow) = (h.div_ceil(2), w.div_ceil(2));
            let src: Vec<f32> = (0..h * w).map(|i| i as f32 * 0.5 - 3.0).collect();
            let bytes: Vec<i8> = (0..h * w).map(|i| (i * 37 % 251) as i8).collect();
            for gather in [gather_plane::<i8> as fn(&[i8], usize, usize, usize, &mut [i8]), gather_plane_scalar] {
                let mut sub = vec![99i8; oh * ow + 3];
                gather(&bytes, w, oh, ow, &mut sub);
                for i in 0..oh {
                    for v in 0..ow {
                        assert_eq!(sub[i * ow + v], bytes[2 * i * w + 2 * v], "{h}x{w} i8 gather ({i}, {v})");
                    }
                }
                assert!(sub[oh * ow..].iter().all(|&v| v == 99), "{h}x{w}: i8 written past the subsample");
            }
            for (gather, place) in gathers.iter().zip(places) {
                let mut sub = vec![f32::NAN; oh * ow + 3];
                gather(&src, w, oh, ow, &mut sub);
                for i in 0..oh {
                    for v in 0..ow {
                        assert_eq!(sub[i * ow + v], src[2 * i * w + 2 * v], "{h}x{w} gather ({i}, {v})");
                    }
                }
                assert!(sub[oh * ow..].iter().all(|v| v.is_nan()), "{h}x{w}: written past the subsample");
                let mut back = vec![MaybeUninit::new(f32::NAN); h * w + 3];
                place(&sub, oh, ow, h, w, &mut back);
                // SAFETY: every element was initialised (NaN) before the call.
                let back: Vec<f32> = back.iter().map(|v| unsafe { v.assume_init() }).collect();
                for r in 0..h {
                    for j in 0..w {
                        let want = if r % 2 == 0 && j % 2 == 0 { src[r * w + j] } else { 0.0 };
                        assert_eq!(back[r * w + j].to_bits(), want.to_bits(), "{h}x{w} place ({r}, {j})");
                    }
                }
                assert!(back[h * w..].iter().all(|v| v.is_nan()), "{h}x{w}: written past the plane");
            }
        }
    }

    fn check(
        gather8: fn(&[i8], &mut [i8]) -> usize,
        gather32: fn(&[f32], &mut [f32]) -> usize,
        scatter: fn(&[f32], &mut [f32]),
    ) {
        for len in 0..80usize {
            let src8: Vec<i8> = (0..len).map(|i| (i as i8).wrapping_mul(37).wrapping_add(5)).collect();
            let src32: Vec<f32> = (0..len).map(|i| i as f32 * 1.5 - 7.0).collect();
            for dst_len in [0, len / 2, len.div_ceil(2), len.div_ceil(2) + 3] {
                let mut d8 = vec![99i8; dst_len];
                let n = gather8(&src8, &mut d8);
                assert_eq!(n, dst_len.min(len.div_ceil(2)));
                for (v, &d) in d8.iter().enumerate() {
                    assert_eq!(d, if v < n { src8[2 * v] } else { 99 }, "i8 gather, len {len}, dst {dst_len}, at {v}");
                }
                let mut d32 = vec![99f32; dst_len];
                let n = gather32(&src32, &mut d32);
                for (v, &d) in d32.iter().enumerate() {
                    assert_eq!(d, if v < n { src32[2 * v] } else { 99.0 }, "f32 gather, len {len}, dst {dst_len}");
                }
            }
            for n_src in [0, len / 2, len.div_ceil(2), len.div_ceil(2) + 2] {
                let src: Vec<f32> = (0..n_src).map(|i| -(i as f32) - 1.0).collect();
                let mut dst = vec![0.5f32; len];
                scatter(&src, &mut dst);
                for (i, &d) in dst.iter().enumerate() {
                    let want = if i % 2 == 0 && i / 2 < n_src { src[i / 2] } else { 0.5 };
                    assert_eq!(d, want, "scatter, dst {len}, src {n_src}, at {i}");
                }
            }
        }
    }
}
