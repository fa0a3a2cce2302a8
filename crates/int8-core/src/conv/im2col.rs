//! im2col: the data movement that lowers a convolution to a GEMM, for any element type (f32 for
//! FP32, i8 codes for INT8).

use std::ops::Range;

use super::{ConvShape, stride2};
use crate::gemm::PanelSource;

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
    /// Which of a channel's planes the tap reads (see [`Grid::planes`]); 0 for a plain input.
    pub plane: usize,
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
                plane: 0,
            });
        }
    }
    taps
}

/// The geometry that im2col lowers: `channels` input planes of `in_h x in_w`, read at
/// `out_h x out_w` output positions with stride 1, each at the offsets of its [`Tap`]s (strided
/// convolutions are first split into phases, see [`Lowering`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grid {
    pub channels: usize,
    /// Planes per channel: 1, or the phases of a deinterleaved strided input ([`Lowering`]).
    pub planes: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl Grid {
    /// The grid of one image and group of a stride-1 convolution.
    pub fn of(s: &ConvShape) -> Self {
        debug_assert_eq!(s.stride, (1, 1));
        Grid { channels: s.c_in_group(), planes: 1, in_h: s.h, in_w: s.w, out_h: s.out_h(), out_w: s.out_w() }
    }
}

/// im2col on any [`Grid`]: `col` is `(channels * taps) x (out_h * out_w)`, row-major, channels
/// outer; reads outside the input are zero.
pub(crate) fn im2col_grid<T: ZeroDefault>(g: &Grid, taps: &[Tap], masks: &[u64], x: &[T], col: &mut [T]) {
    im2col_grid_with(g, taps, masks, x, col, fast_masked_copy::<T>());
}

/// The output positions that each same-width tap (output rows as wide as the input's)
/// reads inside the image, as bits, `ceil(out_plane / 64)` words per tap; empty for other grids.
/// [`im2col_grid`] copies such taps as masked vector moves; the masks depend only on the
/// geometry, so they are made once per convolution, not once per image.
pub(crate) fn tap_masks(g: &Grid, taps: &[Tap]) -> Vec<u64> {
    let (ow_n, p) = (g.out_w, g.out_h * g.out_w);
    if ow_n != g.in_w || p == 0 {
        return Vec::new();
    }
    let words = p.div_ceil(64);
    let mut masks = vec![0u64; taps.len() * words];
    for (tap, mask) in taps.iter().zip(masks.chunks_exact_mut(words)) {
        for oh in tap.rows.clone() {
            for q in oh * ow_n + tap.cols.start..oh * ow_n + tap.cols.end {
                mask[q / 64] |= 1 << (q % 64);
            }
        }
    }
    masks
}

/// [`im2col_grid`], with the masked vector copies of same-width taps (`fast`, where the CPU has
/// them and `masks` is not empty) or without.
fn im2col_grid_with<T: ZeroDefault>(g: &Grid, taps: &[Tap], masks: &[u64], x: &[T], col: &mut [T], fast: bool) {
    let (ow_n, p, in_plane) = (g.out_w, g.out_h * g.out_w, g.in_h * g.in_w);
    let words = p.div_ceil(64);
    let masks = if fast && masks.len() == taps.len() * words { masks } else { &[] };
    for c in 0..g.channels {
        for (t, tap) in taps.iter().enumerate() {
            let plane = &x[(c * g.planes + tap.plane) * in_plane..][..in_plane];
            let row = &mut col[(c * taps.len() + t) * p..][..p];
            if tap.rows.is_empty() || tap.cols.is_empty() {
                zero_run(row);
                continue;
            }
            if ow_n == g.in_w {
                let mask = if masks.is_empty() { &[][..] } else { &masks[t * words..][..words] };
                if !masked_tap(ow_n, tap, plane, mask, row) {
                    same_width_tap(ow_n, tap, plane, row);
                }
                continue;
            }
            if tap.rows.len() < g.out_h || tap.cols.len() < ow_n {
                zero_run(row);
            }
            for oh in tap.rows.clone() {
                let ih = oh as isize + tap.row_off;
                let src = &plane[ih as usize * g.in_w..][..g.in_w];
                let dst = &mut row[oh * ow_n..][tap.cols.clone()];
                let start = tap.cols.start as isize + tap.col_off;
                copy_run(dst, &src[start as usize..][..dst.len()]);
            }
        }
    }
}

/// How one image and group of a convolution becomes the `k_group x out_plane` GEMM operand.
///
/// A strided input is first split into its phases (the pixels `(r + sh * u, rc + sw * v)`, one
/// plane each, only the phases some tap reads), after which every tap is a stride-1 read of one
/// phase plane: rows copied whole instead of gathered element by element, once per tap. The split
/// itself touches each input element once, where the gather touched it once per tap.
#[derive(Debug, Clone)]
pub(crate) struct Lowering {
    grid: Grid,
    taps: Vec<Tap>,
    /// The taps' masks ([`tap_masks`]).
    masks: Vec<u64>,
    /// The phases `(r, rc)` of a split strided input, in plane order; empty for stride 1.
    phases: Vec<(usize, usize)>,
    shape: ConvShape,
}

impl Lowering {
    /// The lowering of `s`.
    pub fn new(s: &ConvShape) -> Self {
        if s.stride == (1, 1) {
            let (grid, taps) = (Grid::of(s), taps(s));
            let masks = tap_masks(&grid, &taps);
            return Lowering { grid, taps, masks, phases: Vec::new(), shape: *s };
        }
        let (sh, sw) = (s.stride.0 as isize, s.stride.1 as isize);
        let (hp, wp) = (s.h.div_ceil(s.stride.0), s.w.div_ceil(s.stride.1));
        let mut phases = Vec::new();
        let mut out = Vec::with_capacity(s.kh * s.kw);
        for i in 0..s.kh {
            for j in 0..s.kw {
                let oi = (i * s.dilation.0) as isize - s.pad.0 as isize;
                let oj = (j * s.dilation.1) as isize - s.pad.1 as isize;
                let phase = (oi.rem_euclid(sh) as usize, oj.rem_euclid(sw) as usize);
                let plane = phases.iter().position(|&q| q == phase).unwrap_or_else(|| {
                    phases.push(phase);
                    phases.len() - 1
                });
                let (row_off, col_off) = (oi.div_euclid(sh), oj.div_euclid(sw));
                out.push(Tap {
                    rows: valid(s.out_h(), hp, 1, row_off),
                    cols: valid(s.out_w(), wp, 1, col_off),
                    row_off,
                    col_off,
                    plane,
                });
            }
        }
        let grid = Grid {
            channels: s.c_in_group(),
            planes: phases.len(),
            in_h: hp,
            in_w: wp,
            out_h: s.out_h(),
            out_w: s.out_w(),
        };
        let masks = tap_masks(&grid, &out);
        Lowering { grid, taps: out, masks, phases, shape: *s }
    }

    /// The elements of the operand (`k_group * out_plane`).
    fn col_len(&self) -> usize {
        self.shape.k_group() * self.shape.out_plane()
    }

    /// Whether the split input is already the operand: one tap per phase plane, in plane order,
    /// reading it whole (a 1x1 strided convolution without padding).
    fn split_is_operand(&self) -> bool {
        !self.phases.is_empty()
            && (self.grid.in_h, self.grid.in_w) == (self.grid.out_h, self.grid.out_w)
            && self.taps.iter().enumerate().all(|(t, tap)| tap.plane == t && (tap.row_off, tap.col_off) == (0, 0))
    }

    /// The buffer [`Lowering::run`] needs: the operand, and the split input where there is one.
    pub fn buffer_len(&self) -> usize {
        if self.split_is_operand() {
            return self.col_len();
        }
        self.col_len() + self.grid.channels * self.phases.len() * self.grid.in_h * self.grid.in_w
    }

    /// Lowers `x` (the `c_in_group x h x w` input of one image and group) into `buf`, returning
    /// the operand (`k_group x out_plane`, row-major).
    pub fn run<'b, T: ZeroDefault>(&self, x: &[T], buf: &'b mut [T]) -> &'b [T] {
        self.run_with(x, buf, fast_masked_copy::<T>())
    }

    /// [`Lowering::run`], with the masked vector copies (`fast`, where the CPU has them) or
    /// without.
    fn run_with<'b, T: ZeroDefault>(&self, x: &[T], buf: &'b mut [T], fast: bool) -> &'b [T] {
        let (col, split) = buf.split_at_mut(self.col_len());
        if self.split_is_operand() {
            self.split(x, col);
        } else if self.phases.is_empty() {
            im2col_grid_with(&self.grid, &self.taps, &self.masks, x, col, fast);
        } else {
            self.split(x, split);
            im2col_grid_with(&self.grid, &self.taps, &self.masks, split, col, fast);
        }
        col
    }

    /// The operand of `x` (as [`Lowering::run`]) packed straight from the input planes
    /// ([`LoweredPanels`]), after splitting a strided input into `buf`; `None` where that does not
    /// apply (the caller then runs [`Lowering::run`]).
    pub fn panels<'b>(&'b self, x: &'b [i8], buf: &'b mut [i8]) -> Option<LoweredPanels<'b>> {
        let split_len = self.grid.channels * self.phases.len() * self.grid.in_h * self.grid.in_w;
        let len = if self.phases.is_empty() { x.len() } else { split_len };
        if self.split_is_operand() || !LoweredPanels::fits(&self.grid, &self.taps, &self.masks, len) {
            return None;
        }
        let src: &[i8] = if self.phases.is_empty() {
            x
        } else {
            let split = &mut buf[self.col_len()..][..split_len];
            self.split(x, split);
            split
        };
        LoweredPanels::new(&self.grid, &self.taps, &self.masks, src)
    }

    /// Writes the phase planes of `x`, each `hp x wp` and zero where the phase has no pixel.
    fn split<T: ZeroDefault>(&self, x: &[T], out: &mut [T]) {
        let s = &self.shape;
        let (sh, sw) = s.stride;
        let (hp, wp) = (self.grid.in_h, self.grid.in_w);
        let plane_len = hp * wp;
        // The plane of each phase `(r, c)` among one channel's planes, if the phase is used.
        let mut index = vec![None; sh * sw];
        for (i, &(r, c)) in self.phases.iter().enumerate() {
            index[r * sw + c] = Some(i);
        }
        let per_channel = self.phases.len() * plane_len;
        for (plane_in, planes) in
            x.chunks_exact(s.in_plane()).take(s.c_in_group()).zip(out.chunks_exact_mut(per_channel))
        {
            // Byte planes of even size split into all four phases of stride 2 in one pass.
            if let ((2, 2), &[Some(p0), Some(p1), Some(p2), Some(p3)]) = ((sh, sw), index.as_slice())
                && (2 * hp, 2 * wp) == (s.h, s.w)
            {
                let at = |p: usize| p * plane_len..(p + 1) * plane_len;
                let [a, b, c, d] =
                    planes.get_disjoint_mut([at(p0), at(p1), at(p2), at(p3)]).expect("four phases share no plane");
                if stride2::split_phases_2x2(plane_in, s.h, s.w, [a, b, c, d]) {
                    continue;
                }
            }
            for r in 0..sh {
                let row_planes = &index[r * sw..(r + 1) * sw];
                if let (2, [Some(p0), Some(p1)]) = (sw, row_planes)
                    && s.w.is_multiple_of(2)
                    && wp == s.w / 2
                {
                    // Even width: both column phases of every row of this row phase in one call,
                    // then zero rows past the input's last row.
                    let rows = hp.min((s.h.saturating_sub(r)).div_ceil(sh));
                    let (o0, o1) = (p0 * plane_len, p1 * plane_len);
                    let [even, odd] = planes
                        .get_disjoint_mut([o0..o0 + plane_len, o1..o1 + plane_len])
                        .expect("two phases share no plane");
                    stride2::deinterleave_rows(&plane_in[r * s.w..], sh * s.w, rows, wp, even, odd);
                    zero_run(&mut even[rows * wp..]);
                    zero_run(&mut odd[rows * wp..]);
                    continue;
                }
                for u in 0..hp {
                    let ih = r + sh * u;
                    let src = (ih < s.h).then(|| &plane_in[ih * s.w..][..s.w]);
                    if let (Some(src), 2, [Some(p0), Some(p1)]) = (src, sw, row_planes) {
                        // Both column phases of this row in one pass.
                        let (o0, o1) = (p0 * plane_len + u * wp, p1 * plane_len + u * wp);
                        let [even, odd] =
                            planes.get_disjoint_mut([o0..o0 + wp, o1..o1 + wp]).expect("two phases share no plane");
                        let (n0, n1) = stride2::deinterleave(src, even, odd);
                        zero_run(&mut even[n0..]);
                        zero_run(&mut odd[n1..]);
                        continue;
                    }
                    for (c, p) in row_planes.iter().enumerate() {
                        let Some(p) = *p else { continue };
                        let dst = &mut planes[p * plane_len + u * wp..][..wp];
                        let Some(src) = src else {
                            zero_run(dst);
                            continue;
                        };
                        let filled = stride2::gather_strided(&src[c.min(s.w)..], dst, sw);
                        zero_run(&mut dst[filled..]);
                    }
                }
            }
        }
    }
}

/// The most taps the AVX2 and AVX-512 panels of [`LoweredPanels`] take (a 7x7 kernel has 49).
const MAX_PANEL_TAPS: usize = 64;

/// Element types that may be INT8 codes, which [`LoweredPanels`] packs from.
pub(crate) trait AsCodes: Sized {
    /// `x` as codes, for `i8`; `None` for other types.
    fn as_codes(x: &[Self]) -> Option<&[i8]>;
}

impl AsCodes for i8 {
    fn as_codes(x: &[i8]) -> Option<&[i8]> {
        Some(x)
    }
}

impl AsCodes for f32 {
    fn as_codes(_: &[f32]) -> Option<&[i8]> {
        None
    }
}

/// The im2col operand of INT8 codes on a same-width [`Grid`], packed for the GEMM straight from the
/// image: each 32-column panel of four rows is four masked 32-byte loads from the input planes
/// (lanes outside the image read as zero) and the byte interleave of the packer, so the
/// `k x out_plane` matrix is never written and read back. The 16-column panels of the AVX2 and
/// AVX-VNNI paths take 16-byte loads, with the tap's mask bits widened to bytes and ANDed in (AVX2
/// has no masked byte loads), and a bounded copy where a load would leave the input.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoweredPanels<'a> {
    grid: &'a Grid,
    taps: &'a [Tap],
    masks: &'a [u64],
    x: &'a [i8],
}

impl<'a> LoweredPanels<'a> {
    /// The operand of `x` (the grid's `channels x planes` input planes), where it can be packed
    /// this way: output rows as wide as the input's, the taps' masks made, planes of whole
    /// 32-column panels, and AVX-512 BW for the masked loads. `None` otherwise.
    pub fn new(grid: &'a Grid, taps: &'a [Tap], masks: &'a [u64], x: &'a [i8]) -> Option<Self> {
        Self::fits(grid, taps, masks, x.len()).then_some(LoweredPanels { grid, taps, masks, x })
    }

    /// Whether [`LoweredPanels::new`] accepts an input of `len` codes on this grid (for the
    /// 32-column panels of AVX-512 or the 16-column ones of AVX2; [`PanelSource::pack`] takes the
    /// one the GEMM asks for).
    pub fn fits(grid: &Grid, taps: &[Tap], masks: &[u64], len: usize) -> bool {
        let p = grid.out_h * grid.out_w;
        grid.out_w == grid.in_w
            && p.is_multiple_of(32)
            && p > 0
            && masks.len() == taps.len() * p.div_ceil(64)
            && len >= grid.channels * grid.planes * grid.in_h * grid.in_w
            && taps.len() <= MAX_PANEL_TAPS
            && (has_avx512_panels() || has_avx2())
    }

    /// Per tap, for the panel of `width` columns (16 or 32) from column `j0` (a multiple of
    /// `width`, so its mask bits lie in one word): where its row starts relative to its channel's
    /// first plane, and its `width` mask bits. Made once per panel: looking them up per row cost
    /// the packers more than their loads. `MAX_PANEL_TAPS` taps at most (checked by `fits`).
    #[inline(always)]
    fn tap_rows(&self, j0: usize, width: usize) -> ([isize; MAX_PANEL_TAPS], [u32; MAX_PANEL_TAPS]) {
        let g = self.grid;
        let (in_plane, words) = (g.in_h * g.in_w, (g.out_h * g.out_w).div_ceil(64));
        let (mut start, mut bits) = ([0isize; MAX_PANEL_TAPS], [0u32; MAX_PANEL_TAPS]);
        for (t, tap) in self.taps.iter().enumerate() {
            start[t] = (tap.plane * in_plane + j0) as isize + tap.row_off * g.in_w as isize + tap.col_off;
            bits[t] = ((self.masks[t * words + j0 / 64] >> (j0 % 64)) & ((1u64 << width) - 1)) as u32;
        }
        (start, bits)
    }

    /// Element `(k, q)` of the operand: row `k` is channel `k / taps`, tap `k % taps`.
    fn at(&self, k: usize, q: usize) -> i8 {
        let g = self.grid;
        let (c, tap) = (k / self.taps.len(), &self.taps[k % self.taps.len()]);
        let (oh, ow) = (q / g.out_w, q % g.out_w);
        if !tap.rows.contains(&oh) || !tap.cols.contains(&ow) {
            return 0;
        }
        let (ih, iw) = ((oh as isize + tap.row_off) as usize, (ow as isize + tap.col_off) as usize);
        self.x[(c * g.planes + tap.plane) * g.in_h * g.in_w + ih * g.in_w + iw]
    }
}

impl PanelSource for LoweredPanels<'_> {
    fn rows(&self) -> usize {
        self.grid.channels * self.taps.len()
    }

    fn cols(&self) -> usize {
        self.grid.out_h * self.grid.out_w
    }

    fn pack(&self, k0: usize, kc: usize, j0: usize, ncols: usize, nr: usize, xor: i8, dst: &mut [i8]) {
        #[cfg(target_arch = "x86_64")]
        if nr == 32
            && ncols == 32
            && j0.is_multiple_of(32)
            && dst.len() >= kc.div_ceil(4) * 128
            && self.taps.len() <= MAX_PANEL_TAPS
            && has_avx512_panels()
        {
            // SAFETY: AVX-512 F, BW and VL (checked above); `new` checked the grid's geometry,
            // its masks and that `x` holds every input plane; the panel's columns
            // `j0..j0 + 32` lie inside the plane (`ncols == 32`) and `dst` holds the panel.
            unsafe { self.pack32(k0, kc, j0, xor, dst) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if nr == 16
            && ncols == 16
            && j0.is_multiple_of(16)
            && dst.len() >= kc.div_ceil(4) * 64
            && self.taps.len() <= MAX_PANEL_TAPS
            && has_avx2()
        {
            // SAFETY: AVX2 (checked above); `new` checked the grid's geometry, its masks and that
            // `x` holds every input plane; the panel's columns `j0..j0 + 16` lie inside the plane
            // (`ncols == 16`) and `dst` holds the panel.
            unsafe { self.pack16(k0, kc, j0, xor, dst) };
            return;
        }
        dst.fill(0);
        for kk in 0..kc {
            for j in 0..ncols {
                dst[((kk / 4) * nr + j) * 4 + kk % 4] = self.at(k0 + kk, j0 + j) ^ xor;
            }
        }
    }
}

impl LoweredPanels<'_> {
    /// [`PanelSource::pack`] of a full 32-column panel.
    ///
    /// # Safety
    /// AVX-512 F, BW and VL; columns `j0..j0 + 32` inside the plane, `j0` a multiple of 32; `dst`
    /// holds `kc.div_ceil(4) * 128` bytes; the grid, taps, masks and `x` as [`LoweredPanels::new`]
    /// checked them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
    unsafe fn pack32(&self, k0: usize, kc: usize, j0: usize, xor: i8, dst: &mut [i8]) {
        use std::arch::x86_64::*;
        let g = self.grid;
        let (nt, in_plane) = (self.taps.len(), g.in_h * g.in_w);
        let flip = _mm256_set1_epi8(xor);
        let base = self.x.as_ptr();
        let (tap_start, tap_bits) = self.tap_rows(j0, 32);
        let channel = (g.planes * in_plane) as isize;
        // Row `k` is channel `c`, tap `t`; both advance with `k` (no division per row).
        let (mut c, mut t) = (k0 / nt, k0 % nt);
        let out = dst.as_mut_ptr();
        for k4 in 0..kc.div_ceil(4) {
            // Rows past `kc` meet A's zero padding; any value does, zero is cheapest. (A loop, not
            // a closure: closures do not inherit the target features, and this one was not
            // inlined.)
            let mut r = [_mm256_setzero_si256(); 4];
            for r in r.iter_mut().take(kc - 4 * k4) {
                let (start, bits) = (c as isize * channel + tap_start[t], tap_bits[t]);
                t += 1;
                if t == nt {
                    (c, t) = (c + 1, 0);
                }
                // SAFETY: only lanes whose mask bit is set are read, and those sources (output
                // position `q`, read at `q + shift`) lie inside this tap's plane by the masks'
                // construction ([`tap_masks`]); the plane lies inside `x` (checked by `new`);
                // `wrapping_offset` forms the address without asserting it is in bounds.
                let v = unsafe { _mm256_maskz_loadu_epi8(bits, base.wrapping_offset(start).cast()) };
                *r = _mm256_xor_si256(v, flip);
            }
            // SAFETY: AVX2 is enabled here; the 128 bytes from `k4 * 128` lie inside `dst`, which
            // holds `kc.div_ceil(4) * 128` (the contract).
            unsafe { crate::gemm::interleave4x32(r, out.add(k4 * 128)) };
        }
    }

    /// [`PanelSource::pack`] of a full 16-column panel with AVX2: per row a 16-byte load from the
    /// tap's plane, ANDed with the tap's 16 mask bits widened to bytes, then the byte interleave
    /// of four rows. A load that would start before `x` or end past it (the first and last
    /// planes' edge taps) gathers the lanes the mask keeps into a zeroed copy instead.
    ///
    /// # Safety
    /// AVX2; columns `j0..j0 + 16` inside the plane, `j0` a multiple of 16; `dst` holds
    /// `kc.div_ceil(4) * 64` bytes; the grid, taps, masks and `x` as [`LoweredPanels::new`]
    /// checked them.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn pack16(&self, k0: usize, kc: usize, j0: usize, xor: i8, dst: &mut [i8]) {
        use std::arch::x86_64::*;
        let g = self.grid;
        let (nt, in_plane) = (self.taps.len(), g.in_h * g.in_w);
        let flip = _mm_set1_epi8(xor);
        // Byte `l` of a row keeps its lane when bit `l` of the mask is set: bytes 0-7 test the
        // mask's low byte, 8-15 its high byte, each against its own bit.
        let spread = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let select = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
        // Per tap, once per panel: its row's start, its 16 mask bits and those bits as a byte mask.
        let (tap_start, tap_bits) = self.tap_rows(j0, 16);
        let mut tap_keep = [_mm_setzero_si128(); MAX_PANEL_TAPS];
        for (keep, &bits) in tap_keep.iter_mut().zip(&tap_bits).take(nt) {
            *keep =
                _mm_cmpeq_epi8(_mm_and_si128(_mm_shuffle_epi8(_mm_set1_epi16(bits as i16), spread), select), select);
        }
        let channel = (g.planes * in_plane) as isize;
        let (mut c, mut t) = (k0 / nt, k0 % nt);
        let out = dst.as_mut_ptr();
        for k4 in 0..kc.div_ceil(4) {
            // Rows past `kc` meet A's zero padding; zero is cheapest.
            let mut r = [_mm_setzero_si128(); 4];
            for r in r.iter_mut().take(kc - 4 * k4) {
                let (start, bits, keep) = (c as isize * channel + tap_start[t], tap_bits[t], tap_keep[t]);
                t += 1;
                if t == nt {
                    (c, t) = (c + 1, 0);
                }
                let v = if start >= 0 && start as usize + 16 <= self.x.len() {
                    // SAFETY: the 16 bytes from `start` lie inside `x` (checked just above).
                    unsafe { _mm_loadu_si128(self.x.as_ptr().add(start as usize).cast()) }
                } else {
                    // Only lanes whose mask bit is set are read, and those lie inside this tap's
                    // plane by the masks' construction ([`tap_masks`]), so inside `x`.
                    let mut tmp = [0i8; 16];
                    for (l, v) in tmp.iter_mut().enumerate().filter(|&(l, _)| bits >> l & 1 == 1) {
                        *v = self.x[(start + l as isize) as usize];
                    }
                    // SAFETY: `tmp` holds 16 bytes.
                    unsafe { _mm_loadu_si128(tmp.as_ptr().cast()) }
                };
                *r = _mm_xor_si128(_mm_and_si128(v, keep), flip);
            }
            // SAFETY: the 64 bytes from `k4 * 64` lie inside `dst`, which holds
            // `kc.div_ceil(4) * 64` (the contract).
            unsafe { crate::gemm::interleave4x16(r, out.add(k4 * 64)) };
        }
    }
}

/// Whether the 32-column panels' masked byte loads run here (AVX-512 F, BW and VL).
fn has_avx512_panels() -> bool {
    fast_masked_copy::<i8>() && has_avx512vl()
}

/// Whether the 16-column panels' AVX2 code runs here.
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether this CPU has AVX-512 VL (masked 256-bit loads).
fn has_avx512vl() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::cpu::allows(crate::cpu::Level::Avx512) && is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether [`masked_tap`] has a fast path for elements of type `T` on this CPU.
fn fast_masked_copy<T>() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(std::mem::size_of::<T>(), 1 | 4)
            && crate::cpu::allows(crate::cpu::Level::Avx512)
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A same-width tap (see [`same_width_tap`]) as masked vector moves: each block of 64 bytes of
/// `row` is one load from `plane` at the tap's fixed offset, with the lanes that fall outside the
/// image (`mask` clear) loaded as zero, and one store. No border fix-ups remain, which on small
/// planes (8x8) cost more than the copy. Returns false where there is no fast path (`mask` is then
/// empty); the caller copies the scalar way.
fn masked_tap<T: ZeroDefault>(width: usize, tap: &Tap, plane: &[T], mask: &[u64], row: &mut [T]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if !mask.is_empty() && row.len() <= mask.len() * 64 {
        let shift = tap.row_off * width as isize + tap.col_off;
        match std::mem::size_of::<T>() {
            // SAFETY: `fast_masked_copy` (which made `mask` non-empty) found AVX-512 F and BW; `T`
            // is a 1-byte `Copy` type moved as bytes; `mask` has a bit for each of the `row.len()`
            // positions and sets only those whose source `q + shift` lies in the tap's valid rows
            // and columns, hence inside `plane`, as `masked_copy_u8` requires.
            1 => unsafe { masked_copy_u8(plane.as_ptr().cast(), shift, mask, row.as_mut_ptr().cast(), row.len()) },
            // SAFETY: as above, for a 4-byte `Copy` type moved as u32.
            4 => unsafe { masked_copy_u32(plane.as_ptr().cast(), shift, mask, row.as_mut_ptr().cast(), row.len()) },
            _ => return false,
        }
        return true;
    }
    let _ = (width, tap, plane, mask, row);
    false
}

/// `dst[q] = if mask bit q { src[q + shift] } else { 0 }` for `q < len`, 64 bytes at a time.
///
/// # Safety
/// AVX-512 F and BW; `dst` valid for `len` writes; `mask` at least `ceil(len / 64)` words; for every
/// set bit `q`, `src + q + shift` is valid for reads. Lanes with a clear bit are not read (masked
/// loads suppress their faults), so their addresses may lie outside `src`'s allocation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn masked_copy_u8(src: *const u8, shift: isize, mask: &[u64], dst: *mut u8, len: usize) {
    use std::arch::x86_64::*;
    let mut q = 0;
    while q < len {
        let lanes = (len - q).min(64);
        let keep = if lanes == 64 { u64::MAX } else { (1u64 << lanes) - 1 };
        // SAFETY: only lanes with a set mask bit are read, each inside `src` (the contract);
        // `wrapping_offset` forms the block's address without asserting it is in bounds.
        let x = unsafe { _mm512_maskz_loadu_epi8(mask[q / 64], src.wrapping_offset(q as isize + shift).cast()) };
        // SAFETY: the store mask keeps the lanes below `len`.
        unsafe { _mm512_mask_storeu_epi8(dst.add(q).cast(), keep, x) };
        q += 64;
    }
}

/// [`masked_copy_u8`] for 4-byte elements, 16 at a time.
///
/// # Safety
/// As [`masked_copy_u8`], counting in 4-byte elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn masked_copy_u32(src: *const u32, shift: isize, mask: &[u64], dst: *mut u32, len: usize) {
    use std::arch::x86_64::*;
    let mut q = 0;
    while q < len {
        let lanes = (len - q).min(16);
        let keep = ((1u32 << lanes) - 1) as u16;
        let bits = (mask[q / 64] >> (q % 64)) as u16;
        // SAFETY: only lanes with a set mask bit are read, each inside `src` (the contract).
        let x = unsafe { _mm512_maskz_loadu_epi32(bits, src.wrapping_offset(q as isize + shift).cast()) };
        // SAFETY: the store mask keeps the lanes below `len`.
        unsafe { _mm512_mask_storeu_epi32(dst.add(q).cast(), keep, x) };
        q += 16;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every lowering, with and without the vector copies, against the definition of im2col.
    #[test]
    fn lowering_matches_the_definition() {
        let sq = ConvShape::square;
        let shapes = [
            sq(1, 3, 8, 2, 3, 1, 1),
            sq(1, 2, 32, 2, 3, 1, 1),
            sq(1, 2, 5, 2, 3, 1, 2),
            sq(1, 2, 9, 2, 3, 2, 1),
            sq(1, 2, 16, 2, 1, 2, 0),
            sq(1, 2, 11, 2, 5, 3, 2),
            ConvShape { dilation: (2, 1), pad: (2, 1), ..sq(1, 2, 7, 2, 3, 1, 1) },
            ConvShape { h: 6, w: 9, kh: 2, kw: 3, stride: (2, 1), pad: (1, 0), ..sq(1, 2, 1, 2, 1, 1, 0) },
        ];
        for s in shapes {
            let x8: Vec<i8> = (0..s.c_in * s.in_plane()).map(|i| ((i % 251) as i32 - 125) as i8).collect();
            let x32: Vec<f32> = x8.iter().map(|&v| v as f32 * 0.5).collect();
            let (p, kk) = (s.out_plane(), s.kh * s.kw);
            let want = |c: usize, t: usize, q: usize| -> Option<usize> {
                let (i, j, oh, ow) = (t / s.kw, t % s.kw, q / s.out_w(), q % s.out_w());
                let ih = (oh * s.stride.0 + i * s.dilation.0) as isize - s.pad.0 as isize;
                let iw = (ow * s.stride.1 + j * s.dilation.1) as isize - s.pad.1 as isize;
                let inside = (0..s.h as isize).contains(&ih) && (0..s.w as isize).contains(&iw);
                inside.then(|| c * s.in_plane() + ih as usize * s.w + iw as usize)
            };
            let lower = Lowering::new(&s);
            let mut buf8 = vec![77i8; lower.buffer_len()];
            let mut buf32 = vec![77f32; lower.buffer_len()];
            let col8 = lower.run(&x8, &mut buf8).to_vec();
            let col32 = lower.run(&x32, &mut buf32).to_vec();
            let plain8 = lower.run_with(&x8, &mut buf8, false).to_vec();
            let plain32 = lower.run_with(&x32, &mut buf32, false).to_vec();
            for c in 0..s.c_in {
                for t in 0..kk {
                    for q in 0..p {
                        let at = (c * kk + t) * p + q;
                        let w8 = want(c, t, q).map_or(0, |k| x8[k]);
                        let w32 = want(c, t, q).map_or(0.0, |k| x32[k]);
                        assert_eq!((col8[at], col32[at]), (w8, w32), "{s:?}: lowered, channel {c} tap {t} at {q}");
                        assert_eq!((plain8[at], plain32[at]), (w8, w32), "{s:?}: scalar, channel {c} tap {t} at {q}");
                    }
                }
            }
        }
    }

    /// Panels packed from the image, 16 and 32 columns wide, equal the packer's panels of the
    /// lowered matrix, over every panel: the first and last planes' edge taps (where a plain load
    /// would leave the input), partial groups of four rows, and the VNNI paths' XOR.
    #[test]
    fn panels_from_the_image_match_the_packed_lowering() {
        use crate::gemm::{MatRef, PanelSource};
        let sq = ConvShape::square;
        let shapes =
            [sq(1, 3, 8, 2, 3, 1, 1), sq(1, 2, 32, 2, 3, 1, 1), sq(1, 5, 16, 2, 3, 2, 1), sq(1, 1, 8, 1, 3, 1, 1)];
        let mut tried = 0;
        for s in shapes {
            let x: Vec<i8> = (0..s.c_in * s.in_plane()).map(|i| ((i * 37 % 253) as i32 - 126) as i8).collect();
            let lower = Lowering::new(&s);
            let mut buf = vec![0i8; lower.buffer_len()];
            let col = lower.run(&x, &mut buf).to_vec();
            let mut buf = vec![0i8; lower.buffer_len()];
            let Some(panels) = lower.panels(&x, &mut buf) else { continue };
            let m = MatRef::row_major(&col, panels.rows(), panels.cols()).unwrap();
            let k = panels.rows();
            for nr in [16, 32] {
                if nr == 32 && !has_avx512_panels() || nr == 16 && !has_avx2() {
                    continue;
                }
                for xor in [0i8, -128] {
                    for (k0, kc) in [(0, k), (1, k - 1), (4, k.min(9) - 4)] {
                        for j0 in (0..panels.cols()).step_by(nr) {
                            let len = kc.div_ceil(4) * nr * 4;
                            let (mut got, mut want) = (vec![55i8; len], vec![55i8; len]);
                            panels.pack(k0, kc, j0, nr, nr, xor, &mut got);
                            m.pack(k0, kc, j0, nr, nr, xor, &mut want);
                            // Rows past `kc` may hold anything (they meet A's zero padding).
                            for (i, (g, w)) in
                                got.iter().zip(&want).enumerate().filter(|(i, _)| i % 4 < kc - i / (4 * nr) * 4)
                            {
                                assert_eq!(g, w, "{s:?} nr {nr} xor {xor} k0 {k0} kc {kc} j0 {j0} at {i}");
                            }
                            tried += 1;
                        }
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        assert!(tried > 0 || !is_x86_feature_detected!("avx2"), "no panel was compared");
    }

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
