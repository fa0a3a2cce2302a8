//! Every-other-element gathers and scatters, the data movement of stride-2 convolutions: splitting
//! an input row into its even and odd columns (the forward pass and the weight gradient), and
//! writing one phase of the input gradient back into its columns.
//!
//! The scalar loops do not vectorise (the compiler emits one load and one store per element), so
//! on AVX-512 (BW and VL) one byte or one 32-bit lane of each pair is selected by a narrowing move
//! (`vpmovwb`, `vpmovqd`) and written back by a widening move and a masked store. Everything else
//! takes the scalar loop, which defines the meaning.

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

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
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
