//! The input gradient of a strided convolution by phase decomposition.
//!
//! `dX = W^T * dY` of a convolution with stride `(sh, sw)` splits by the input pixel's phase
//! `(ih mod sh, iw mod sw)`: the pixels of one phase receive gradient from a fixed subset of the
//! kernel's taps, and over the phase's own grid that is a stride-1 correlation of `dY` with those
//! taps. Each phase is therefore an im2col of `dY` (a copy of rows, in the element type of `dY`:
//! bytes for INT8) and one GEMM whose output is already the phase's pixels, which are then
//! interleaved into `dX`. The alternative, one GEMM into a `k x out_plane` column buffer followed
//! by a scatter-add (col2im), moves `kh * kw` times more data in the accumulator's type, and on the
//! ResNet-20 stride-2 layers it cost more than the GEMM itself.
//!
//! Derivation: input row `ih = oh * sh + i * dh - ph` takes gradient from tap row `i`. For
//! `ih = rh + sh * u`, that needs `i * dh - ph - rh = sh * a` for an integer `a`, and then
//! `oh = u - a`. So phase row `rh` uses the tap rows `i` with `(i * dh - ph - rh) mod sh = 0`, each
//! reading `dY` at row offset `-a`; columns likewise.

use super::im2col::{AsCodes, Grid, LoweredPanels, Tap, ZeroDefault, im2col_grid, tap_masks, valid};
use super::{ConvShape, stride2};
use crate::error::Result;
use crate::gemm::{MatMut, MatRef};

/// One phase `(rh, rw)` of the input: the pixels `(rh + sh * u, rw + sw * v)`.
#[derive(Debug, Clone)]
pub(crate) struct Phase {
    /// The phase's first row and column.
    pub origin: (usize, usize),
    /// How `dY` (the `out_h x out_w` planes) is read for this phase's `rows x cols` grid.
    pub grid: Grid,
    /// The taps that reach this phase, with their offsets into `dY`.
    pub taps: Vec<Tap>,
    /// The kernel position `i * kw + j` of each tap.
    pub kernel_index: Vec<usize>,
    /// The taps' masks for im2col ([`tap_masks`]).
    pub masks: Vec<u64>,
}

impl Phase {
    /// Whether the phase's im2col of `dY` is `dY` itself: one tap reading every pixel in place
    /// (the even phase of a 1x1 stride-2 convolution), so `dY` can feed the GEMM directly.
    pub fn reads_dy_whole(&self) -> bool {
        let g = &self.grid;
        self.taps.len() == 1
            && (g.in_h, g.in_w) == (g.out_h, g.out_w)
            && (self.taps[0].row_off, self.taps[0].col_off) == (0, 0)
    }

    /// Pixels of the phase per channel.
    pub fn plane(&self) -> usize {
        self.grid.out_h * self.grid.out_w
    }
}

/// The tap offsets of one axis for phase `r`: `(tap, offset of dY)` for each tap position that
/// reaches input positions `r + stride * u`.
fn axis_taps(k: usize, dilation: usize, pad: usize, stride: usize, r: usize) -> Vec<(usize, isize)> {
    (0..k)
        .filter_map(|i| {
            let d = (i * dilation) as isize - pad as isize - r as isize;
            (d.rem_euclid(stride as isize) == 0).then(|| (i, -d.div_euclid(stride as isize)))
        })
        .collect()
}

/// The phases of `s`'s input (for one group), every pixel in exactly one of them; phases that no
/// tap reaches have no taps (their gradient is zero).
pub(crate) fn phases(s: &ConvShape) -> Vec<Phase> {
    let (sh, sw) = s.stride;
    let mut out = Vec::with_capacity(sh * sw);
    for rh in 0..sh.min(s.h) {
        for rw in 0..sw.min(s.w) {
            let (rows, cols) = ((s.h - rh).div_ceil(sh), (s.w - rw).div_ceil(sw));
            let grid = Grid {
                channels: s.c_out_group(),
                planes: 1,
                in_h: s.out_h(),
                in_w: s.out_w(),
                out_h: rows,
                out_w: cols,
            };
            let mut taps = Vec::new();
            let mut kernel_index = Vec::new();
            for &(i, row_off) in &axis_taps(s.kh, s.dilation.0, s.pad.0, sh, rh) {
                for &(j, col_off) in &axis_taps(s.kw, s.dilation.1, s.pad.1, sw, rw) {
                    taps.push(Tap {
                        rows: valid(rows, s.out_h(), 1, row_off),
                        cols: valid(cols, s.out_w(), 1, col_off),
                        row_off,
                        col_off,
                        plane: 0,
                    });
                    kernel_index.push(i * s.kw + j);
                }
            }
            let masks = tap_masks(&grid, &taps);
            out.push(Phase { origin: (rh, rw), grid, taps, kernel_index, masks });
        }
    }
    out
}

/// The per-thread buffer lengths of the phases' im2col (`c_out_group * taps x plane`, the largest
/// over the phases) and GEMM outputs (`c_in_group` planes of the input: room for every phase).
pub(crate) fn buffer_lens(s: &ConvShape, phases: &[Phase]) -> (usize, usize) {
    let col = phases.iter().map(|ph| s.c_out_group() * ph.taps.len() * ph.plane()).max().unwrap_or(0);
    (col, s.c_in_group() * s.in_plane())
}

/// The left operand of one phase and group: `c_in_group x (c_out_group * taps)`, row-major, with
/// `a[ci][co * taps + t] = w[g * cog + co][ci][kernel_index[t]]`, matching the row order of
/// the phase's im2col of `dY` (channels outer).
pub(crate) fn phase_weight<T: Copy + Default>(s: &ConvShape, w: &[T], g: usize, ph: &Phase) -> Vec<T> {
    let (cig, cog, kk, nt) = (s.c_in_group(), s.c_out_group(), s.kh * s.kw, ph.taps.len());
    let mut a = vec![T::default(); cig * cog * nt];
    for ci in 0..cig {
        for co in 0..cog {
            for (t, &k) in ph.kernel_index.iter().enumerate() {
                a[(ci * cog + co) * nt + t] = w[((g * cog + co) * cig + ci) * kk + k];
            }
        }
    }
    a
}

/// Writes a phase's pixels (`c_in_group x rows x cols`, in `src`) into their places in `dx` (the
/// group's `c_in_group x h x w` planes).
pub(crate) fn scatter(s: &ConvShape, ph: &Phase, src: &[f32], dx: &mut [f32]) {
    let (rh, rw) = ph.origin;
    let (sh, sw) = s.stride;
    let (rows, cols) = (ph.grid.out_h, ph.grid.out_w);
    for (plane, src) in dx.chunks_exact_mut(s.in_plane()).zip(src.chunks_exact(rows * cols)) {
        for (u, src) in src.chunks_exact(cols).enumerate() {
            stride2::scatter_strided(src, &mut plane[(rh + sh * u) * s.w..][..s.w][rw..], sw);
        }
    }
}

/// Writes two phases that share rows, `even` with the even columns and `odd` with the odd ones
/// (their pixels one after the other in `src`), into their places in `dx`, a whole row at a time.
fn interleave(s: &ConvShape, even: &Phase, odd: &Phase, src: &[f32], dx: &mut [f32]) {
    let (rh, sh) = (even.origin.0, s.stride.0);
    let (c0, c1) = (even.grid.out_w, odd.grid.out_w);
    let (first, second) = src.split_at(s.c_in_group() * even.plane());
    for ((plane, e), o) in
        dx.chunks_exact_mut(s.in_plane()).zip(first.chunks_exact(even.plane())).zip(second.chunks_exact(odd.plane()))
    {
        if c0 == c1 {
            // Even width: the whole pair of planes in one call.
            stride2::interleave_rows(e, o, even.grid.out_h, c0, &mut plane[rh * s.w..], sh * s.w);
            continue;
        }
        for (u, (e, o)) in e.chunks_exact(c0).zip(o.chunks_exact(c1)).enumerate() {
            stride2::interleave(e, o, &mut plane[(rh + sh * u) * s.w..][..s.w]);
        }
    }
}

/// Multiplies phase `i`'s weight by an operand packed from the codes of `dY` into `out`.
pub(crate) type PanelProduct<'f> = &'f mut dyn FnMut(usize, &LoweredPanels, MatMut<f32>) -> Result<()>;

/// The input gradient of one image and group, phase by phase: each phase that some tap reaches
/// lowers `dy` (the group's `c_out_group` planes) into `col`, or uses `dy` itself where that is
/// the lowering, and `product(i, b, out)` multiplies phase `i`'s weight by `b` into `out`
/// (`c_in_group x plane`), whose pixels then go to their places in `dx`. Pixels no tap reaches
/// get zero. `col` and `out` are at least [`buffer_lens`] long.
///
/// With `from_codes` (INT8 codes on the VNNI path), a phase whose lowering can be packed straight
/// from `dy` ([`LoweredPanels`]) goes to `from_codes(i, panels, out)` instead, without the im2col.
pub(crate) fn input_grad_image<T: ZeroDefault + AsCodes>(
    s: &ConvShape,
    phases: &[Phase],
    dy: &[T],
    dx: &mut [f32],
    (col, out): (&mut [T], &mut [f32]),
    mut product: impl FnMut(usize, MatRef<T>, MatMut<f32>) -> Result<()>,
    mut from_codes: Option<PanelProduct>,
) -> Result<()> {
    if phases.iter().any(|ph| ph.taps.is_empty()) {
        dx.fill(0.0);
    }
    let cig = s.c_in_group();
    let mut i = 0;
    while i < phases.len() {
        let ph = &phases[i];
        // The next phase, where it holds the odd columns of the same rows (stride 2 across), so
        // that the two GEMM outputs are interleaved into whole rows of `dx` in one pass.
        let partner = phases
            .get(i + 1)
            .filter(|q| s.stride.1 == 2 && ph.origin.1 == 0 && q.origin == (ph.origin.0, 1))
            .filter(|q| !ph.taps.is_empty() && !q.taps.is_empty());
        let count = if partner.is_some() { 2 } else { 1 };
        let mut used = 0;
        for (j, ph) in phases[i..i + count].iter().enumerate() {
            if ph.taps.is_empty() {
                continue;
            }
            let (k, q) = (s.c_out_group() * ph.taps.len(), ph.plane());
            let target = MatMut::row_major(&mut out[used..used + cig * q], cig, q)?;
            let panels = match (&mut from_codes, T::as_codes(dy)) {
                (Some(f), Some(codes)) if !ph.reads_dy_whole() => {
                    LoweredPanels::new(&ph.grid, &ph.taps, &ph.masks, codes).map(|p| (f, p))
                }
                _ => None,
            };
            if let Some((f, panels)) = panels {
                f(i + j, &panels, target)?;
                used += cig * q;
                continue;
            }
            let b = if ph.reads_dy_whole() {
                dy
            } else {
                im2col_grid(&ph.grid, &ph.taps, &ph.masks, dy, &mut col[..k * q]);
                &col[..k * q]
            };
            product(i + j, MatRef::row_major(b, k, q)?, target)?;
            used += cig * q;
        }
        match partner {
            Some(odd) => interleave(s, ph, odd, &out[..used], dx),
            None if !ph.taps.is_empty() => scatter(s, ph, &out[..used], dx),
            None => {}
        }
        i += count;
    }
    Ok(())
}
