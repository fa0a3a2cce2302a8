//! Direct INT8 convolution on AMX tiles: the stride-1 convolutions (ResNet-20's 3x3 layers, and
//! through [`super::dx_as_forward`] their input gradients; Zhu et al., CVPR 2020, Sec. 3)
//! multiplied straight from the input's codes, with no im2col panels.
//!
//! Each image's codes are laid out once as `[c_in / 4][plane][4]`: groups of four channels
//! interleaved pixel by pixel over the zero-padded image (`hp = h + 2 pad_h` rows of `wp = w + 2
//! pad_w`; `plane` adds room past the last row). There, the 16 output positions `q = oh * wp + ow`
//! from a multiple of 16 read, for tap `(i, j)`, the 16 consecutive pixels from `q + i * wp + j`,
//! four channels each: 64 contiguous bytes, one row of an AMX B tile, whose rows are the channel
//! groups, one plane apart. A tap's product over up to 64 input channels is then one tile load
//! and one `tdpbssd`, with that tap's weights (16 output channels by those input channels) as the
//! A tile. Positions with `ow >= out_w` wrap onto the next row: computed, never written out
//! (`wp / out_w` of the work: 6% more at 32x32, 25% at 8x8).
//!
//! The weight gradient of the same convolutions takes the zero-padded input planes as A tiles and
//! the output gradient, packed as a GEMM panel, as B tiles; that of 1x1 convolutions
//! ([`pointwise_weight_grad`]) the output gradient's rows as A tiles as they lie.
//!
//! The sums are exact INT32 (the same products as the GEMM paths, in another order, with wrapping
//! adds), dequantized per output channel as they are written.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::ConvShape;
use crate::error::Result;
use crate::gemm::{Int8Path, LineBuf, pack_b, store_row_scaled};
use crate::out::Out;

/// Output channels per A tile (AMX's tile rows).
const CO_BLOCK: usize = 16;
/// Output positions per C tile; [`block`] computes two tiles side by side.
const Q_TILE: usize = 16;
/// Blocks of 16 output channels that [`blocks`] computes at once, one C tile each.
const MAX_BLOCKS: usize = 4;
/// About how many output positions one band of rows computes before writing them out: the
/// sums of a band (64 channels of 2048 positions: 512 KiB) stay in L2, and a detector's 300x300
/// planes need no sums buffer of the whole plane.
const BAND: usize = 2048;

/// Output rows per band: about [`BAND`] positions of rows `wp` wide, at least one row, at most
/// all of them.
fn band_rows(out_h: usize, wp: usize) -> usize {
    (BAND / wp).clamp(1, out_h)
}

/// Whether [`forward`] computes this convolution on `path`: AMX, stride 1, no dilation, one
/// group, a kernel wider than 1x1 (1x1 convolutions need no im2col on any path), and input
/// channels in groups of four that fill one tile's rows or a whole number of them (up to 64, or a
/// multiple of 64), so one tile configuration serves every product.
pub(crate) fn applies(path: Int8Path, s: &ConvShape) -> bool {
    let c4 = s.c_in.div_ceil(4);
    path == Int8Path::Amx
        && s.stride == (1, 1)
        && s.dilation == (1, 1)
        && s.groups == 1
        && !s.is_pointwise()
        && (c4 <= 16 || c4.is_multiple_of(16))
}

/// The layout of one convolution's operands on the tiles.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    /// Channel groups per B tile (its rows), and the tiles per tap.
    rows: usize,
    chunks: usize,
    /// Padded width and the pixels of one channel group's plane (a multiple of 16).
    wp: usize,
    plane: usize,
    out_h: usize,
    out_w: usize,
    /// Output rows per band, and the positions a band computes (its rows' `band * wp` rounded up
    /// to two tiles): the sums' row length.
    band: usize,
    band_q: usize,
    /// An upper bound on the positions any band computes, from the first row's.
    qn: usize,
    taps: usize,
    kw: usize,
    co_blocks: usize,
}

impl Geometry {
    fn new(s: &ConvShape) -> Self {
        let c4 = s.c_in.div_ceil(4);
        let rows = c4.min(16);
        let (out_h, out_w, wp) = (s.out_h(), s.out_w(), s.w + 2 * s.pad.1);
        let band = band_rows(out_h, wp);
        let band_q = (band * wp).next_multiple_of(2 * Q_TILE);
        // A band starts at row `oh0 <= out_h - 1`, so no band computes past `qn`; its last tile
        // row reads 16 pixels from `qn - 16 + (kh - 1) * wp + kw - 1`. The padded image
        // (`(out_h + kh - 1) * wp` pixels) lies within that too, since `band_q >= wp`.
        let qn = (out_h - 1) * wp + band_q;
        let plane = (qn + (s.kh - 1) * wp + s.kw).next_multiple_of(16);
        Geometry {
            rows,
            chunks: c4.div_ceil(rows),
            wp,
            plane,
            out_h,
            out_w,
            band,
            band_q,
            qn,
            taps: s.kh * s.kw,
            kw: s.kw,
            co_blocks: s.c_out.div_ceil(CO_BLOCK),
        }
    }

    /// Bytes of one image's interleaved codes.
    fn image_len(&self) -> usize {
        self.chunks * self.rows * self.plane * 4
    }

    /// Bytes of one A tile (16 output channels by `4 * rows` input channels of one tap).
    fn a_tile_len(&self) -> usize {
        CO_BLOCK * 4 * self.rows
    }
}

/// Packs the weight (`c_out x c_in x kh x kw` codes) as A tiles, in the order the kernel reads
/// them: output-channel block, tap, channel chunk; channels past `c_in` or `c_out` are zeros.
fn pack_weight(s: &ConvShape, g: &Geometry, w: &[i8]) -> LineBuf {
    let mut buf = LineBuf::default();
    let tile = g.a_tile_len();
    let dst = buf.bytes_mut(g.co_blocks * g.taps * g.chunks * tile);
    dst.fill(0);
    for co in 0..s.c_out {
        let (b, r) = (co / CO_BLOCK, co % CO_BLOCK);
        for c in 0..s.c_in {
            let (ch, k) = (c / (4 * g.rows), c % (4 * g.rows));
            for t in 0..g.taps {
                dst[((b * g.taps + t) * g.chunks + ch) * tile + r * 4 * g.rows + k] = w[(co * s.c_in + c) * g.taps + t];
            }
        }
    }
    buf
}

/// Writes one image's codes (`c_in x h x w`) into the interleaved layout `dst`, leaving the
/// padding as it is (zeros, written once by the caller).
fn interleave(s: &ConvShape, g: &Geometry, x: &[i8], dst: &mut [i8]) {
    let hw = s.h * s.w;
    for c4 in 0..s.c_in.div_ceil(4) {
        let plane: [&[i8]; 4] = std::array::from_fn(|t| {
            let c = 4 * c4 + t;
            if c < s.c_in { &x[c * hw..][..hw] } else { &[] }
        });
        let base = c4 * g.plane + s.pad.0 * g.wp + s.pad.1;
        for row in 0..s.h {
            let out = &mut dst[(base + row * g.wp) * 4..][..s.w * 4];
            let src: [&[i8]; 4] = std::array::from_fn(|t| plane[t].get(row * s.w..(row + 1) * s.w).unwrap_or(&[]));
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if src.iter().all(|r| r.len() == s.w) {
                use std::arch::x86_64::*;
                while done + 16 <= s.w {
                    // SAFETY: SSE2 is part of the x86_64 baseline; each row holds `done + 16`
                    // codes and `out` the 64 bytes from `4 * done`.
                    unsafe {
                        let r: [__m128i; 4] =
                            std::array::from_fn(|t| _mm_loadu_si128(src[t].as_ptr().add(done).cast()));
                        crate::gemm::interleave4x16(r, out.as_mut_ptr().add(4 * done));
                    }
                    done += 16;
                }
                if done + 8 <= s.w {
                    // Eight pixels (a row of an 8x8 plane): the low halves of the same unpacks.
                    // SAFETY: SSE2 is part of the x86_64 baseline; each row holds `done + 8`
                    // codes and `out` the 32 bytes from `4 * done`.
                    unsafe {
                        let r: [__m128i; 4] =
                            std::array::from_fn(|t| _mm_loadl_epi64(src[t].as_ptr().add(done).cast()));
                        let (lo, hi) = (_mm_unpacklo_epi8(r[0], r[1]), _mm_unpacklo_epi8(r[2], r[3]));
                        let o = out.as_mut_ptr().add(4 * done);
                        _mm_storeu_si128(o.cast(), _mm_unpacklo_epi16(lo, hi));
                        _mm_storeu_si128(o.add(16).cast(), _mm_unpackhi_epi16(lo, hi));
                    }
                    done += 8;
                }
            }
            for px in done..s.w {
                for t in 0..4 {
                    out[4 * px + t] = src[t].get(px).copied().unwrap_or(0);
                }
            }
        }
    }
}

/// `y = scales[co] * conv(x, w)` for a convolution that [`applies`] on AMX, overwriting `y`
/// (shapes checked by the caller).
pub(crate) fn forward(s: &ConvShape, x: &[i8], w: &[i8], y: Out, scales: &[f32]) -> Result<()> {
    let g = Geometry::new(s);
    let weight = pack_weight(s, &g, w);
    let a = weight.bytes(g.co_blocks * g.taps * g.chunks * g.a_tile_len());
    let out_plane = g.out_h * g.out_w;
    // SAFETY: each image's chunk is written whole: every output channel, row and column below.
    let chunks = unsafe { y.par_chunks_unzeroed(s.c_out * out_plane) };
    chunks.zip(x.par_chunks(s.c_in * s.h * s.w)).for_each_init(
        || (LineBuf::default(), LineBuf::default()),
        |(codes, sums), (y, x)| {
            let codes = codes.bytes_mut(g.image_len());
            interleave(s, &g, x, codes);
            let sums = sums.words_mut(MAX_BLOCKS * CO_BLOCK * g.band_q);
            let per_block = g.taps * g.chunks * g.a_tile_len();
            for b0 in (0..g.co_blocks).step_by(MAX_BLOCKS) {
                let nb = MAX_BLOCKS.min(g.co_blocks - b0);
                for oh0 in (0..g.out_h).step_by(g.band) {
                    let q_start = oh0 * g.wp;
                    // SAFETY: `applies` held, so the path (checked available by the caller) has
                    // AMX; the operands have the lengths `Geometry` gives, `a` the blocks' A
                    // tiles, and the band starts at a row of the output.
                    unsafe {
                        if nb == 1 {
                            block(&g, &a[b0 * per_block..], codes, q_start, sums)
                        } else {
                            blocks(&g, &a[b0 * per_block..], nb, codes, q_start, sums)
                        }
                    };
                    for r in 0..(nb * CO_BLOCK).min(s.c_out - b0 * CO_BLOCK) {
                        let co = b0 * CO_BLOCK + r;
                        for oh in oh0..(oh0 + g.band).min(g.out_h) {
                            let dst: &mut [MaybeUninit<f32>] = &mut y[co * out_plane + oh * g.out_w..][..g.out_w];
                            let row = &sums[r * g.band_q + (oh - oh0) * g.wp..][..g.out_w];
                            store_row_scaled(dst, row, 0, scales[co]);
                        }
                    }
                }
            }
        },
    );
    Ok(())
}

/// `dw = scale * sum over the batch of conv_weight_grad(x, dy)` for a convolution that [`applies`]
/// on AMX, overwriting `dw` (shapes checked by the caller).
///
/// Per tap, `dw[co][c] = sum_q x_pad[c][q + off] * dy[co][q]` over the output positions `q` of
/// the padded rows: the input's zero-padded planes give the A tiles as they lie (16 channels by 64
/// positions, at the tap's offset), and the output gradient, its rows padded to `wp` with zeros
/// (so the wrapped positions add nothing) and packed as GEMM panels (four positions by every
/// output channel, [`pack_b`]), the B tiles, a band of rows at a time. Each run of images is
/// summed in INT32 per tap, then added to the i64 total ([`super::int8::weight_grad_in_runs`]).
pub(crate) fn weight_grad(s: &ConvShape, x: &[i8], dy: &[i8], dw: &mut [f32], scale: f64) -> Result<()> {
    let (out_h, out_w, wp) = (s.out_h(), s.out_w(), s.w + 2 * s.pad.1);
    let (taps, cp, cop) = (s.kh * s.kw, s.c_in.next_multiple_of(16), s.c_out.next_multiple_of(32));
    // The output rows are taken in bands (`qk` positions computed per band), so that a band's
    // gradient and its panel stay in L2 whatever the plane.
    let band = band_rows(out_h, wp);
    let qk = (band * wp).next_multiple_of(64);
    // A band starts at row `oh0 <= out_h - 1`; its last step's A tiles read 64 positions from
    // `oh0 * wp + qk - 64 + (kh - 1) * wp + kw - 1`.
    let plane = ((out_h - 1) * wp + qk + (s.kh - 1) * wp + s.kw).next_multiple_of(64);
    let x_len = s.c_in * s.h * s.w;
    let sum_run = |(xpad, panel, dyp, sums): &mut (LineBuf, LineBuf, Vec<i8>, LineBuf), xs: &[i8], dys: &[i8]| {
        let xpad = xpad.bytes_mut(cp * plane);
        let panel = panel.bytes_mut(qk * cop);
        let sums = sums.words_mut(taps * cp * cop);
        sums.fill(0);
        for (x, dy) in xs.chunks_exact(x_len).zip(dys.chunks_exact(s.c_out * s.out_plane())) {
            for c in 0..s.c_in {
                for r in 0..s.h {
                    xpad[c * plane + (s.pad.0 + r) * wp + s.pad.1..][..s.w]
                        .copy_from_slice(&x[(c * s.h + r) * s.w..][..s.w]);
                }
            }
            for oh0 in (0..out_h).step_by(band) {
                let rows = band.min(out_h - oh0);
                for co in 0..s.c_out {
                    let dst = &mut dyp[co * qk..][..qk];
                    for r in 0..rows {
                        dst[r * wp..][..out_w].copy_from_slice(&dy[(co * out_h + oh0 + r) * out_w..][..out_w]);
                    }
                    // Past the band's rows (a last band of fewer rows): zeros, not an earlier
                    // band's codes. The columns past `out_w` of each row are never written.
                    dst[rows * wp..].fill(0);
                }
                // The band's gradient as a `qk x c_out` matrix (column-major), packed as one
                // panel of `cop` columns: each group of four positions holds every output
                // channel's four codes, 16 channels per 64 bytes, as B tiles read them.
                let b = crate::gemm::MatRef::new(dyp, qk, s.c_out, 1, qk)?;
                pack_b(&b, 0, qk, 0, s.c_out, cop, 0, panel);
                // SAFETY: `applies` held and the caller checked the path is available (AMX);
                // the buffers have the lengths the kernel's contract names, and the band
                // starts at an output row.
                unsafe { weight_grad_band(s, (plane, qk, cp, cop), xpad, oh0 * wp, panel, sums) };
            }
        }
        Ok(())
    };
    super::int8::weight_grad_in_runs(
        s,
        (x, dy),
        dw,
        scale,
        || (LineBuf::default(), LineBuf::default(), vec![0i8; s.c_out * qk], LineBuf::default()),
        sum_run,
        |(_, _, _, sums), total| {
            // The run's sums are `[tap][cp channels][cop output channels]`; `dw` is
            // `[co][c][tap]`.
            let sums = sums.words(taps * cp * cop);
            for co in 0..s.c_out {
                for c in 0..s.c_in {
                    for t in 0..taps {
                        total[(co * s.c_in + c) * taps + t] += sums[(t * cp + c) * cop + co] as i64;
                    }
                }
            }
        },
    )
}

/// Whether [`pointwise_weight_grad`] computes this convolution's weight gradient on `path`: AMX,
/// a 1x1 stride-1 convolution without padding, one group.
pub(crate) fn pointwise_weight_grad_applies(path: Int8Path, s: &ConvShape) -> bool {
    path == Int8Path::Amx && s.is_pointwise() && s.dilation == (1, 1) && s.groups == 1
}

/// The weight gradient of a 1x1 stride-1 convolution, `dw[co][c] = scale * sum over images and
/// positions of dy[co][q] * x[c][q]`, on AMX tiles: the output gradient's rows are the A tiles (16
/// output channels by 64 positions, read in place when the plane is a whole number of tiles and
/// the channels a whole number of blocks, else from a zero-padded copy), and the input's codes,
/// packed per image as a GEMM panel of its channels (`pack_b`), the B tiles. Each block of sums
/// stays in its tiles over a whole run of images. Where the GEMM packed both operands and called
/// a product per image, this packs one small panel per image, which on the small planes of CIFAR
/// networks cost less than the calls.
pub(crate) fn pointwise_weight_grad(s: &ConvShape, x: &[i8], dy: &[i8], dw: &mut [f32], scale: f64) -> Result<()> {
    let p = s.out_plane();
    let (p64, cp, cop) = (p.next_multiple_of(64), s.c_in.next_multiple_of(32), s.c_out.next_multiple_of(16));
    let g = PointwiseGrad { p64, cp, cop, panel: p64 / 4 * cp * 4, image: cop * p64 };
    // The gradient's rows serve as A tiles in place where every tile lies inside them.
    let in_place = p == p64 && s.c_out == cop;
    let sum_run = |(panels, dyp, sums): &mut (LineBuf, LineBuf, LineBuf), xs: &[i8], dys: &[i8]| {
        let images = xs.len() / (s.c_in * p);
        let panels = panels.bytes_mut(images * g.panel);
        for (x, panel) in xs.chunks_exact(s.c_in * p).zip(panels.chunks_exact_mut(g.panel)) {
            // X^T (`p x c_in`, column-major) as one panel of `cp` columns; the groups of four
            // positions past the plane (up to the last tile's) are zero, so that whatever the
            // A tiles hold there adds nothing.
            let b = crate::gemm::MatRef::new(x, p, s.c_in, 1, p)?;
            let (packed, tail) = panel.split_at_mut(p.div_ceil(4) * cp * 4);
            pack_b(&b, 0, p, 0, s.c_in, cp, 0, packed);
            tail.fill(0);
        }
        let a = if in_place {
            dys
        } else {
            let dyp = dyp.bytes_mut(images * g.image);
            for (dy, padded) in dys.chunks_exact(s.c_out * p).zip(dyp.chunks_exact_mut(g.image)) {
                // Rows of `p` codes, then zeros to `p64` and in the rows past `c_out`.
                let (rows, spare) = padded.split_at_mut(s.c_out * p64);
                for (row, src) in rows.chunks_exact_mut(p64).zip(dy.chunks_exact(p)) {
                    row[..p].copy_from_slice(src);
                    row[p..].fill(0);
                }
                spare.fill(0);
            }
            &*dyp
        };
        let sums = sums.words_mut(cop * cp);
        // SAFETY: the caller checked the path is available (AMX); `a` holds `images` images of
        // `cop` rows of `p64` codes (in place: `c_out = cop` rows of `p = p64`), `panels` as
        // many panels, `sums` `cop x cp` values.
        unsafe { pointwise_weight_grad_run(&g, images, a, panels, sums) };
        Ok(())
    };
    super::int8::weight_grad_in_runs(
        s,
        (x, dy),
        dw,
        scale,
        || (LineBuf::default(), LineBuf::default(), LineBuf::default()),
        sum_run,
        |(_, _, sums), total| {
            let sums = sums.words(cop * cp);
            for co in 0..s.c_out {
                for c in 0..s.c_in {
                    total[co * s.c_in + c] += sums[co * cp + c] as i64;
                }
            }
        },
    )
}

/// The layout of [`pointwise_weight_grad`]'s operands: positions per row of A tiles (`p64`, a
/// multiple of 64), input channels per panel (`cp`, a multiple of 32), output channels (`cop`, a
/// multiple of 16), and the bytes of one image's panel and of its A rows.
struct PointwiseGrad {
    p64: usize,
    cp: usize,
    cop: usize,
    panel: usize,
    image: usize,
}

/// Overwrites `sums` (`cop x cp`) with a run's products: per block of 16 output channels and 32
/// input channels, held in two C tiles over every image, the A tiles of each image's rows of `a`
/// times its panel's B tiles, 64 positions at a time.
///
/// # Safety
/// AMX granted (`cpu::amx`); `a` holds `images` blocks of `g.image` bytes (`cop` rows of `p64`),
/// `panels` `images` panels of `g.panel` bytes, `sums` `cop * cp` values.
#[cfg(target_arch = "x86_64")]
unsafe fn pointwise_weight_grad_run(g: &PointwiseGrad, images: usize, a: &[i8], panels: &[i8], sums: &mut [i32]) {
    use crate::gemm::amx;
    let PointwiseGrad { p64, cp, cop, .. } = *g;
    debug_assert!(a.len() >= images * g.image && panels.len() >= images * g.panel && sums.len() >= cop * cp);
    let (lda, ldb, ldc) = (p64, 4 * cp, 4 * cp);
    // SAFETY: the caller's contract covers AMX. Reads: an A tile is 16 rows from `co0` of image
    // `i`, 64 bytes from `q0 < p64`; a B tile 16 groups from `q0 / 4` of image `i`'s panel, 64
    // bytes at column `c0` or `c0 + 16`. Writes: the two C tiles of rows `co0 .. co0 + 16`,
    // columns `c0 .. c0 + 32`.
    unsafe {
        amx::configure_tiles(16);
        for co0 in (0..cop).step_by(16) {
            for c0 in (0..cp).step_by(32) {
                amx::zero_c2();
                for i in 0..images {
                    let (ai, bi) = (a.as_ptr().add(i * g.image + co0 * lda), panels.as_ptr().add(i * g.panel + c0 * 4));
                    for q0 in (0..p64).step_by(64) {
                        amx::product2(ai.add(q0), lda, bi.add(q0 * cp), ldb);
                    }
                }
                amx::store_c2(sums.as_mut_ptr().add(co0 * cp + c0), ldc);
            }
        }
    }
}

/// Elsewhere no path is AMX, so [`pointwise_weight_grad_applies`] never holds.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn pointwise_weight_grad_run(_g: &PointwiseGrad, _images: usize, _a: &[i8], _panels: &[i8], _sums: &mut [i32]) {
    unreachable!("AMX exists on x86-64 only")
}

/// Adds one band's weight-gradient sums (its `qk` positions from `q_start`) to `sums`
/// (`[tap][cp channels][cop output channels]`).
///
/// # Safety
/// AMX granted (`cpu::amx`); `xpad` holds `cp` planes of `plane` bytes, `panel` `qk * cop`
/// bytes (`qk` and `plane` multiples of 64 with `plane >= q_start + qk + (kh - 1) * wp + kw -
/// 1`), `sums` `kh * kw * cp * cop` values; `cp` a multiple of 16, `cop` of 32.
#[cfg(target_arch = "x86_64")]
unsafe fn weight_grad_band(
    s: &ConvShape,
    (plane, qk, cp, cop): (usize, usize, usize, usize),
    xpad: &[i8],
    q_start: usize,
    panel: &[i8],
    sums: &mut [i32],
) {
    use crate::gemm::amx;
    let wp = s.w + 2 * s.pad.1;
    debug_assert!(xpad.len() >= cp * plane && panel.len() >= qk * cop && sums.len() >= s.kh * s.kw * cp * cop);
    let (lda, ldb, ldc) = (plane, 4 * cop, 4 * cop);
    debug_assert!(q_start + qk + (s.kh - 1) * wp + s.kw - 1 <= plane);
    // SAFETY: the caller's contract covers AMX. Reads: an A tile is 16 planes' 64 bytes from
    // `q_start + q0 + off <= q_start + qk - 64 + (kh - 1) * wp + kw - 1`, inside each plane; a B
    // tile 16 rows of the panel (four positions each) from `q0 / 4`, 64 bytes at output channel
    // `32 p` or `32 p + 16`.
    // Writes: the two C tiles of channels `c0 .. c0 + 16`, output channels `32 p .. 32 p + 32`.
    unsafe {
        amx::configure_tiles(16);
        for t in 0..s.kh * s.kw {
            let off = (t / s.kw) * wp + t % s.kw;
            for c0 in (0..cp).step_by(16) {
                for p in 0..cop / 32 {
                    let c = sums.as_mut_ptr().add((t * cp + c0) * cop + 32 * p);
                    amx::load_c2(c, ldc);
                    for q0 in (0..qk).step_by(64) {
                        let b = panel.as_ptr().add((q0 / 4 * cop + 32 * p) * 4);
                        amx::product2(xpad.as_ptr().add(c0 * plane + q_start + q0 + off), lda, b, ldb);
                    }
                    amx::store_c2(c, ldc);
                }
            }
        }
    }
}

/// Elsewhere no path is AMX, so [`applies`] never holds.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn weight_grad_band(
    _s: &ConvShape,
    _geometry: (usize, usize, usize, usize),
    _xpad: &[i8],
    _q_start: usize,
    _panel: &[i8],
    _sums: &mut [i32],
) {
    unreachable!("AMX exists on x86-64 only")
}

/// One block of 16 output channels of one image, over the band of positions from `q_start`:
/// `sums[r][q - q_start]` for each of the band's `g.band_q` positions.
///
/// # Safety
/// AMX granted (`cpu::amx`); `a` holds the block's `taps * chunks` A tiles, `codes` one image's
/// interleaved codes, `q_start` is `oh0 * g.wp` for an output row `oh0`, and `sums` holds `16 *
/// g.band_q` values (its rows `g.band_q` apart, so every tile store lies inside it).
#[cfg(target_arch = "x86_64")]
unsafe fn block(g: &Geometry, a: &[i8], codes: &[i8], q_start: usize, sums: &mut [i32]) {
    use crate::gemm::amx;
    debug_assert!(a.len() >= g.taps * g.chunks * g.a_tile_len() && codes.len() >= g.image_len());
    debug_assert!(sums.len() >= CO_BLOCK * g.band_q && q_start + g.band_q <= g.qn);
    let (lda, ldb, ldc) = (4 * g.rows, 4 * g.plane, 4 * g.band_q);
    // SAFETY: the caller's contract covers AMX. Reads: each A tile lies inside `a`; a B tile's
    // rows start at pixel `q_start + q0 + off` (+16) of planes `ch * rows ..+ rows`, and
    // `q_start + q0 + 32 + off <= qn + (kh - 1) * wp + kw - 1 <= plane` ([`Geometry::new`]), so
    // they stay inside `codes`. Writes: the two C tiles of band positions `q0 .. q0 + 32` of the
    // 16 rows of `sums`.
    unsafe {
        amx::configure_tiles(g.rows);
        for q0 in (0..g.band_q).step_by(2 * Q_TILE) {
            amx::zero_c2();
            for t in 0..g.taps {
                let off = (t / g.kw) * g.wp + t % g.kw;
                for ch in 0..g.chunks {
                    let b = codes.as_ptr().add((ch * g.rows * g.plane + q_start + q0 + off) * 4);
                    amx::product2(a.as_ptr().add((t * g.chunks + ch) * g.a_tile_len()), lda, b, ldb);
                }
            }
            amx::store_c2(sums.as_mut_ptr().add(q0), ldc);
        }
    }
}

/// `nb` (2 to 4) blocks of 16 output channels of one image, one tile of 16 positions at a time:
/// each tap's B tile (rows off the cache line, the costly load) is loaded once and multiplied by
/// every block's A tile, where [`block`] loads it again per block. `sums` gets the blocks' rows
/// one after the other. A 3x3 64->64 layer at 8x8, forward: 1.40-1.44 ms with [`block`] per
/// block, against 0.66-0.78 ms for the GEMM path from im2col panels.
///
/// # Safety
/// As for [`block`], with `a` holding `nb` blocks' A tiles and `sums` `nb * 16 * g.band_q` values.
#[cfg(target_arch = "x86_64")]
unsafe fn blocks(g: &Geometry, a: &[i8], nb: usize, codes: &[i8], q_start: usize, sums: &mut [i32]) {
    use crate::gemm::amx;
    use std::arch::asm;
    debug_assert!((2..=MAX_BLOCKS).contains(&nb));
    debug_assert!(a.len() >= nb * g.taps * g.chunks * g.a_tile_len() && codes.len() >= g.image_len());
    debug_assert!(sums.len() >= nb * CO_BLOCK * g.band_q && q_start + g.band_q <= g.qn);
    let (lda, ldb, ldc) = (4 * g.rows, 4 * g.plane, 4 * g.band_q);
    let per_block = g.taps * g.chunks * g.a_tile_len();
    // One `tdpbssd` into C tile `k` (`tmm0`-`tmm3`), A alternating between `tmm4` and `tmm5` so
    // that the next block's A loads while this one multiplies.
    macro_rules! product {
        ($c:literal, $a:literal, $ptr:expr) => {
            asm!(
                concat!("tileloadd ", $a, ", [{a} + {lda}*1]"),
                concat!("tdpbssd ", $c, ", ", $a, ", tmm6"),
                a = in(reg) $ptr, lda = in(reg) lda, options(nostack, readonly)
            )
        };
    }
    macro_rules! store {
        ($c:literal, $ptr:expr) => {
            asm!(concat!("tilestored [{c} + {ldc}*1], ", $c), c = in(reg) $ptr, ldc = in(reg) ldc, options(nostack))
        };
    }
    // SAFETY: the caller's contract covers AMX; the reads are [`block`]'s, one tile at a time,
    // and block `k`'s A tiles lie at `k * per_block` of `a`; each store writes the 16 rows of
    // block `k` (rows `16 k ..` of `sums`), positions `q0 .. q0 + 16`.
    unsafe {
        amx::configure_tiles(g.rows);
        for q0 in (0..g.band_q).step_by(Q_TILE) {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            for t in 0..g.taps {
                let off = (t / g.kw) * g.wp + t % g.kw;
                for ch in 0..g.chunks {
                    asm!(
                        "tileloadd tmm6, [{b} + {ldb}*1]",
                        b = in(reg) codes.as_ptr().add((ch * g.rows * g.plane + q_start + q0 + off) * 4),
                        ldb = in(reg) ldb,
                        options(nostack, readonly)
                    );
                    let at = |k: usize| a.as_ptr().add(k * per_block + (t * g.chunks + ch) * g.a_tile_len());
                    product!("tmm0", "tmm4", at(0));
                    product!("tmm1", "tmm5", at(1));
                    if nb > 2 {
                        product!("tmm2", "tmm4", at(2));
                    }
                    if nb > 3 {
                        product!("tmm3", "tmm5", at(3));
                    }
                }
            }
            let base = sums.as_mut_ptr();
            let c = |k: usize| base.add(k * CO_BLOCK * g.band_q + q0);
            store!("tmm0", c(0));
            store!("tmm1", c(1));
            if nb > 2 {
                store!("tmm2", c(2));
            }
            if nb > 3 {
                store!("tmm3", c(3));
            }
        }
    }
}

/// Elsewhere no path is AMX, so [`applies`] never holds.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn blocks(_g: &Geometry, _a: &[i8], _nb: usize, _codes: &[i8], _q_start: usize, _sums: &mut [i32]) {
    unreachable!("AMX exists on x86-64 only")
}

/// Elsewhere no path is AMX, so [`applies`] never holds.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn block(_g: &Geometry, _a: &[i8], _codes: &[i8], _q_start: usize, _sums: &mut [i32]) {
    unreachable!("AMX exists on x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applies_to_the_stride_1_layers_whose_channels_fill_whole_tiles() {
        let sq = ConvShape::square;
        for c in [3, 16, 32, 64, 128, 256] {
            assert!(applies(Int8Path::Amx, &sq(8, c, 8, 16, 3, 1, 1)), "{c} channels");
        }
        // 80 channels: 20 groups of four, one full tile and a partial one.
        assert!(!applies(Int8Path::Amx, &sq(8, 80, 8, 16, 3, 1, 1)));
        assert!(!applies(Int8Path::Amx, &sq(8, 16, 8, 16, 3, 2, 1)));
        assert!(!applies(Int8Path::Amx, &sq(8, 16, 8, 16, 1, 1, 0)));
        assert!(!applies(Int8Path::Amx, &sq(8, 16, 8, 16, 3, 1, 1).with_groups(2)));
        assert!(!applies(Int8Path::Avx512Vnni, &sq(8, 16, 8, 16, 3, 1, 1)));
    }

    #[test]
    fn the_layout_reads_stay_inside_the_plane() {
        let sq = ConvShape::square;
        for s in [
            sq(1, 16, 32, 16, 3, 1, 1),
            sq(1, 64, 8, 64, 3, 1, 1),
            sq(1, 5, 7, 3, 5, 1, 0),
            sq(1, 4, 3, 4, 3, 1, 2),
            sq(1, 64, 300, 64, 3, 1, 1),
            sq(1, 3, 71, 4, 3, 1, 1),
        ] {
            let g = Geometry::new(&s);
            // The last band's last B tile row starts at its last tile plus the widest offset.
            let last_band = (g.out_h - 1) / g.band * g.band;
            let last = last_band * g.wp + g.band_q - Q_TILE + (s.kh - 1) * g.wp + s.kw - 1;
            assert!(last + Q_TILE <= g.plane && last_band * g.wp + g.band_q <= g.qn, "{s:?}");
            assert!((s.h + 2 * s.pad.0) * g.wp <= g.plane, "{s:?}");
            assert!(g.band * g.wp <= g.band_q && g.band_q.is_multiple_of(2 * Q_TILE), "{s:?}");
            assert!(g.plane.is_multiple_of(16));
        }
    }
}
