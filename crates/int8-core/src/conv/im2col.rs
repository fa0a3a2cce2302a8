//! im2col and col2im: the data movement that lowers a convolution to a GEMM, for any element type
//! (f32 for FP32, i8 codes for INT8, i32 sums for INT8's input gradient).

use std::ops::{AddAssign, Range};

use super::ConvShape;

/// The output positions `o` in `0..out_len` whose input position `o * stride + offset` lies in
/// `0..in_len`.
pub(crate) fn valid(out_len: usize, in_len: usize, stride: usize, offset: isize) -> Range<usize> {
    let lo = if offset >= 0 { 0 } else { ((-offset) as usize).div_ceil(stride) };
    let last = in_len as isize - 1 - offset;
    let hi = if last < 0 { 0 } else { (last as usize / stride + 1).min(out_len) };
    lo.min(hi)..hi
}

/// Copies a short run (typically one output row) with explicit 16-byte moves, the last one
/// overlapping the previous so that no byte-by-byte tail remains. A plain copy of a run of unknown
/// length becomes a call to `memmove` (loop-idiom recognition turns even a chunked loop back into
/// one), and for runs of 16 to 128 bytes the call costs more than the copy.
#[inline(always)]
pub(crate) fn copy_run<T: Copy>(dst: &mut [T], src: &[T]) {
    let src = &src[..dst.len()];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};
        let bytes = std::mem::size_of_val(dst);
        let (d, s) = (dst.as_mut_ptr().cast::<u8>(), src.as_ptr().cast::<u8>());
        if bytes >= 16 {
            let mut off = 0;
            loop {
                // SAFETY: SSE2 is part of the x86_64 baseline; `off + 16 <= bytes`, the byte
                // length of both slices (equal lengths of `T: Copy`), which do not overlap (one is
                // borrowed mutably).
                unsafe {
                    _mm_storeu_si128(d.add(off).cast::<__m128i>(), _mm_loadu_si128(s.add(off).cast::<__m128i>()))
                };
                if off + 16 == bytes {
                    break;
                }
                off = (off + 16).min(bytes - 16);
            }
            return;
        }
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = v;
    }
}

/// An element type of im2col buffers whose `Default` value is all-zero bits, so that padding can
/// be written as zero bytes.
///
/// # Safety
/// `Self::default()` must be the all-zero bit pattern.
pub(crate) unsafe trait ZeroDefault: Copy + Default {}

// SAFETY: 0.0f32 is all-zero bits.
unsafe impl ZeroDefault for f32 {}
// SAFETY: 0i8 is all-zero bits.
unsafe impl ZeroDefault for i8 {}
// SAFETY: 0i32 is all-zero bits.
unsafe impl ZeroDefault for i32 {}

/// Zeroes a short run without a call to `memset` (see [`copy_run`]).
#[inline(always)]
fn zero_run<T: ZeroDefault>(dst: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_setzero_si128, _mm_storeu_si128};
        let bytes = std::mem::size_of_val(dst);
        if bytes >= 16 {
            let d = dst.as_mut_ptr().cast::<u8>();
            let mut off = 0;
            loop {
                // SAFETY: SSE2 is part of the x86_64 baseline; `off + 16 <= bytes`, inside `dst`;
                // zero bytes are `T::default()` by `ZeroDefault`.
                unsafe { _mm_storeu_si128(d.add(off).cast::<__m128i>(), _mm_setzero_si128()) };
                if off + 16 == bytes {
                    break;
                }
                off = (off + 16).min(bytes - 16);
            }
            return;
        }
    }
    for d in dst {
        *d = T::default();
    }
}

/// One kernel tap `(i, j)` of one input channel: where it reads for every output row.
#[derive(Debug, Clone)]
pub(crate) struct Tap {
    /// Output rows whose input row is inside the image.
    pub rows: Range<usize>,
    /// Output columns whose input column is inside the image.
    pub cols: Range<usize>,
    /// Input row of output row `oh` is `oh * stride_h + row_off`.
    pub row_off: isize,
    /// Input column of output column `ow` is `ow * stride_w + col_off`.
    pub col_off: isize,
}

/// The taps of the kernel, row-major over `(i, j)`.
pub(crate) fn taps(s: &ConvShape) -> Vec<Tap> {
    let mut taps = Vec::with_capacity(s.kh * s.kw);
    for i in 0..s.kh {
        for j in 0..s.kw {
            let row_off = (i * s.dilation.0) as isize - s.pad.0 as isize;
            let col_off = (j * s.dilation.1) as isize - s.pad.1 as isize;
            taps.push(Tap {
                rows: valid(s.out_h(), s.h, s.stride.0, row_off),
                cols: valid(s.out_w(), s.w, s.stride.1, col_off),
                row_off,
                col_off,
            });
        }
    }
    taps
}

/// Fills `col` (`k_group x out_plane`, row-major) from `x`, the `c_in_group x h x w` input of
/// one image and group. Padding reads as zero.
pub(crate) fn im2col<T: ZeroDefault>(s: &ConvShape, taps: &[Tap], x: &[T], col: &mut [T]) {
    let (ow_n, p) = (s.out_w(), s.out_plane());
    let (sh, sw) = s.stride;
    for c in 0..s.c_in_group() {
        let plane = &x[c * s.in_plane()..(c + 1) * s.in_plane()];
        for (t, tap) in taps.iter().enumerate() {
            let row = &mut col[(c * taps.len() + t) * p..][..p];
            if (sh, sw) == (1, 1) && ow_n == s.w && !tap.rows.is_empty() && !tap.cols.is_empty() {
                same_width_tap(ow_n, tap, plane, row);
                continue;
            }
            if tap.rows.len() < s.out_h() || tap.cols.len() < ow_n {
                zero_run(row);
            }
            for oh in tap.rows.clone() {
                let ih = (oh * sh) as isize + tap.row_off;
                let src = &plane[ih as usize * s.w..][..s.w];
                let dst = &mut row[oh * ow_n..][tap.cols.clone()];
                let start = (tap.cols.start * sw) as isize + tap.col_off;
                if sw == 1 {
                    copy_run(dst, &src[start as usize..][..dst.len()]);
                } else {
                    for (d, &v) in dst.iter_mut().zip(src[start as usize..].iter().step_by(sw)) {
                        *d = v;
                    }
                }
            }
        }
    }
}

/// One tap of a stride-1 convolution whose output rows are as wide as its input rows: the source of
/// output `(oh, ow)` is then a fixed distance from its destination, so the tap is one long copy,
/// after which the border columns (which the copy filled from neighbouring rows) and the rows
/// outside the image are zeroed.
fn same_width_tap<T: ZeroDefault>(width: usize, tap: &Tap, plane: &[T], row: &mut [T]) {
    let (r0, r1) = (tap.rows.start, tap.rows.end);
    let d0 = r0 * width + tap.cols.start;
    let len = (r1 - r0 - 1) * width + tap.cols.len();
    let s0 = ((r0 as isize + tap.row_off) as usize) * width + (tap.cols.start as isize + tap.col_off) as usize;
    copy_run(&mut row[d0..d0 + len], &plane[s0..s0 + len]);
    zero_run(&mut row[..r0 * width]);
    zero_run(&mut row[r1 * width..]);
    if tap.cols.len() < width {
        for oh in r0..r1 {
            for ow in (0..tap.cols.start).chain(tap.cols.end..width) {
                row[oh * width + ow] = T::default();
            }
        }
    }
}

/// Adds `col` (`k_group x out_plane`) back into `x` (`c_in_group x h x w`): the transpose of
/// [`im2col`], used for the input gradient.
pub(crate) fn col2im_add<T: Copy + AddAssign>(s: &ConvShape, taps: &[Tap], col: &[T], x: &mut [T]) {
    let (ow_n, p) = (s.out_w(), s.out_plane());
    let (sh, sw) = s.stride;
    for c in 0..s.c_in_group() {
        let plane = &mut x[c * s.in_plane()..(c + 1) * s.in_plane()];
        for (t, tap) in taps.iter().enumerate() {
            let row = &col[(c * taps.len() + t) * p..][..p];
            for oh in tap.rows.clone() {
                let ih = (oh * sh) as isize + tap.row_off;
                let dst = &mut plane[ih as usize * s.w..][..s.w];
                let src = &row[oh * ow_n..][tap.cols.clone()];
                let start = ((tap.cols.start * sw) as isize + tap.col_off) as usize;
                if sw == 1 {
                    for (d, &v) in dst[start..][..src.len()].iter_mut().zip(src) {
                        *d += v;
                    }
                } else {
                    for (d, &v) in dst[start..].iter_mut().step_by(sw).zip(src) {
                        *d += v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ranges_match_brute_force() {
        for out_len in 1..9 {
            for in_len in 1..9 {
                for stride in 1..4 {
                    for offset in -4isize..5 {
                        let want: Vec<usize> = (0..out_len)
                            .filter(|&o| {
                                let i = (o * stride) as isize + offset;
                                i >= 0 && (i as usize) < in_len
                            })
                            .collect();
                        let got: Vec<usize> = valid(out_len, in_len, stride, offset).collect();
                        assert_eq!(got, want, "out {out_len} in {in_len} stride {stride} offset {offset}");
                    }
                }
            }
        }
    }
}
