//! Window plans: how the AVX-512 VNNI depthwise kernels ([`super::avx512`]) gather, for each
//! block of 16 outputs of a channel plane, the input codes that `vpdpbusd` multiplies four at a
//! time.
//!
//! Output `o` of a depthwise forward pass or input gradient is a sum over the kernel taps that
//! reach it, `sum of w[tap] * src[pixel(o, tap)]`, where `src` is the input plane (forward) or the
//! output-gradient plane (input gradient). `vpdpbusd` adds four byte products into each 32-bit
//! lane, so lane `k` of a block holds output `o0 + k`, and its four bytes of group `g` are the
//! sources of its taps `4g .. 4g + 4`, taken in kernel order. The plan lists, per block, the
//! window of the source plane that holds every source the block reads (at most 128 bytes, two
//! registers), a byte permutation per group that moves the sources to their slots (`vpermi2b`),
//! and per group a pattern: which tap each slot multiplies, so that the kernel can lay out the
//! weights for a channel once (`vpermb` of the channel's taps) and use them for every block.
//!
//! A tap whose source lies in the zero padding keeps its slot, with the byte of code 0, so that
//! blocks at the border share the patterns of the interior. The codes are offset by 128 (the
//! unsigned operand of `vpdpbusd`), which adds `128 * sum of the slot weights` to each lane; that
//! sum depends only on a block's patterns (its [`Kind`]), so the kernel subtracts it once per
//! kind and channel.

use std::collections::HashMap;

use crate::conv::ConvShape;

/// Outputs per block: the 32-bit lanes of one AVX-512 register.
pub(super) const LANES: usize = 16;
/// The most distinct weight patterns a plan may use: the kernel keeps a register of each per
/// channel (MobileNetV2's planes need at most three).
const MAX_PATTERNS: usize = 16;
/// The most distinct kinds (pattern sequences) a plan may use, one register each per channel.
const MAX_KINDS: usize = 8;
/// The largest kernel a plan takes: a channel's taps are one 64-byte register.
const MAX_TAPS: usize = 64;
/// A window is two 64-byte registers.
const WINDOW: usize = 128;

/// Which sum the plan gathers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Product {
    /// `y[o] = sum over taps of w[tap] * x[o * stride + tap * dilation - pad]`.
    Forward,
    /// `dx[p] = sum over taps and outputs o with o * stride + tap * dilation - pad = p of
    /// w[tap] * dy[o]`.
    InputGrad,
}

/// One block of up to [`LANES`] consecutive outputs.
#[derive(Debug, Clone, Copy)]
pub(super) struct Block {
    /// Index of the block's first output in the output plane.
    pub out: usize,
    /// Which of the 16 lanes are outputs (the rest are neither computed nor stored).
    pub store: u16,
    /// Where the window starts in the source plane.
    pub win: usize,
    /// Which bytes of the window's two registers to load: those inside the source plane and
    /// inside the span the block reads (a load never touches another byte).
    pub load: [u64; 2],
    /// The block's kind: its sequence of patterns, one per group.
    pub kind: usize,
    /// Where the block's permutations start in [`WindowPlan::steps`]: one per group.
    pub step: usize,
}

/// A byte permutation of one group: slot `l` of the gathered register is window byte
/// `index[l]` where bit `l` of `valid` is set, and the code-0 byte `0x80` (its `index` byte,
/// which `vpermi2b` keeps where the mask bit is clear) where it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Perm {
    pub index: [u8; 64],
    pub valid: u64,
}

/// A weight pattern: slot `l` multiplies tap `index[l]` where bit `l` of `valid` is set, and
/// nothing (weight 0) where it is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Pattern {
    pub index: [u8; 64],
    pub valid: u64,
}

/// A kind: the pattern of each group of a block.
pub(super) type Kind = Vec<usize>;

/// The plan of one depthwise product for one channel plane (the same for every plane of a layer).
#[derive(Debug)]
pub(super) struct WindowPlan {
    /// The length of the source planes the plan reads.
    pub src_len: usize,
    /// The length of the output planes it writes.
    pub out_len: usize,
    pub blocks: Vec<Block>,
    /// For each block and group, its permutation in `perms`.
    pub steps: Vec<usize>,
    pub perms: Vec<Perm>,
    pub patterns: Vec<Pattern>,
    pub kinds: Vec<Kind>,
}

/// A tap reaching an output, and its source pixel (an index into the source plane), `None` in
/// the zero padding.
type Contribution = (u8, Option<usize>);

/// The taps reaching output `(r, c)` of `product`, in kernel order, into `out`.
fn contributions(s: &ConvShape, product: Product, (r, c): (usize, usize), out: &mut Vec<Contribution>) {
    out.clear();
    let ((sh, sw), (dh, dw), (ph, pw)) = (s.stride, s.dilation, s.pad);
    for i in 0..s.kh {
        for j in 0..s.kw {
            let tap = (i * s.kw + j) as u8;
            match product {
                Product::Forward => {
                    let ih = (r * sh + i * dh) as isize - ph as isize;
                    let iw = (c * sw + j * dw) as isize - pw as isize;
                    let inside = (0..s.h as isize).contains(&ih) && (0..s.w as isize).contains(&iw);
                    out.push((tap, inside.then(|| ih as usize * s.w + iw as usize)));
                }
                Product::InputGrad => {
                    // Output row `u` reaches input row `r` through tap row `i` where
                    // `u * sh + i * dh - ph = r`; a tap whose row or column does not divide by the
                    // stride reaches no output from here.
                    let nh = (r + ph) as isize - (i * dh) as isize;
                    let nw = (c + pw) as isize - (j * dw) as isize;
                    if nh.rem_euclid(sh as isize) != 0 || nw.rem_euclid(sw as isize) != 0 {
                        continue;
                    }
                    let (u, v) = (nh.div_euclid(sh as isize), nw.div_euclid(sw as isize));
                    let inside = (0..s.out_h() as isize).contains(&u) && (0..s.out_w() as isize).contains(&v);
                    out.push((tap, inside.then(|| u as usize * s.out_w() + v as usize)));
                }
            }
        }
    }
}

/// Interns `v` in `list`, returning its index.
fn intern<T: Clone + Eq + std::hash::Hash>(v: T, list: &mut Vec<T>, seen: &mut HashMap<T, usize>) -> usize {
    *seen.entry(v.clone()).or_insert_with(|| {
        list.push(v);
        list.len() - 1
    })
}

impl WindowPlan {
    /// The plan of `product` for shape `s`, or `None` where a block's sources do not fit one
    /// window, or the kernel or the number of patterns or kinds is too large for the kernel's
    /// registers (the generic loops take those shapes).
    pub(super) fn new(s: &ConvShape, product: Product) -> Option<Self> {
        if s.kh * s.kw > MAX_TAPS {
            return None;
        }
        let (src_len, out_h, out_w) = match product {
            Product::Forward => (s.in_plane(), s.out_h(), s.out_w()),
            Product::InputGrad => (s.out_plane(), s.h, s.w),
        };
        // Blocks are whole rows where a row is narrower than a block (so a block's outputs stay
        // consecutive in the plane), and runs of 16 columns of one row otherwise.
        let rows_per_block = if out_w >= LANES { 1 } else { LANES / out_w };
        let mut plan = WindowPlan {
            src_len,
            out_len: out_h * out_w,
            blocks: Vec::new(),
            steps: Vec::new(),
            perms: Vec::new(),
            patterns: Vec::new(),
            kinds: Vec::new(),
        };
        let (mut perms_seen, mut patterns_seen, mut kinds_seen) = (HashMap::new(), HashMap::new(), HashMap::new());
        let mut lanes: Vec<Vec<Contribution>> = vec![Vec::new(); LANES];
        let mut r = 0;
        while r < out_h {
            let (rows, cols) = if out_w >= LANES {
                (1, (0..out_w).step_by(LANES).map(|c0| (c0, LANES.min(out_w - c0))).collect::<Vec<_>>())
            } else {
                (rows_per_block.min(out_h - r), vec![(0, out_w)])
            };
            for (c0, width) in cols {
                let n = if rows == 1 { width } else { rows * out_w };
                for (k, lane) in lanes.iter_mut().enumerate().take(n) {
                    let (rr, cc) = if rows == 1 { (r, c0 + k) } else { (r + k / out_w, k % out_w) };
                    contributions(s, product, (rr, cc), lane);
                }
                let sources = lanes[..n].iter().flatten().filter_map(|&(_, src)| src);
                let (lo, hi) = sources.fold((usize::MAX, 0), |(lo, hi), p| (lo.min(p), hi.max(p)));
                let (win, span) = if lo == usize::MAX { (0, 0) } else { (lo, hi - lo + 1) };
                if span > WINDOW {
                    return None;
                }
                let groups = lanes[..n].iter().map(|l| l.len().div_ceil(4)).max().unwrap_or(0);
                let (mut kind, step) = (Vec::with_capacity(groups), plan.steps.len());
                for g in 0..groups {
                    let mut p = Perm { index: [0x80; 64], valid: 0 };
                    let mut q = Pattern { index: [0; 64], valid: 0 };
                    for (k, lane) in lanes[..n].iter().enumerate() {
                        for (b, &(tap, src)) in lane.iter().skip(4 * g).take(4).enumerate() {
                            let slot = 4 * k + b;
                            q.index[slot] = tap;
                            q.valid |= 1 << slot;
                            if let Some(src) = src {
                                p.index[slot] = (src - win) as u8;
                                p.valid |= 1 << slot;
                            }
                        }
                    }
                    plan.steps.push(intern(p, &mut plan.perms, &mut perms_seen));
                    kind.push(intern(q, &mut plan.patterns, &mut patterns_seen));
                }
                let load_bits = span.min(src_len - win.min(src_len));
                let load = [low_bits(load_bits), low_bits(load_bits.saturating_sub(64))];
                let kind = intern(kind, &mut plan.kinds, &mut kinds_seen);
                let out = if rows == 1 { r * out_w + c0 } else { r * out_w };
                plan.blocks.push(Block { out, store: low_bits(n) as u16, win, load, kind, step });
            }
            r += rows;
        }
        (plan.patterns.len() <= MAX_PATTERNS && plan.kinds.len() <= MAX_KINDS).then_some(plan)
    }
}

/// A mask of the low `k` bits, all 64 for `k >= 64`.
pub(super) fn low_bits(k: usize) -> u64 {
    if k >= 64 { u64::MAX } else { (1u64 << k) - 1 }
}

/// The weight gradient's windows: per block of up to 64 consecutive positions of an output plane
/// (byte `j` of a register is position `first + j`), the window of the input plane that every
/// tap reads for them, and per tap a permutation that lays out in slot `j` the input code the tap
/// multiplies with dY at position `first + j` (code 0, `0x80` once offset, in the padding).
#[derive(Debug)]
pub(super) struct TapPlan {
    /// The length of the input planes the plan reads.
    pub src_len: usize,
    /// Positions of the output planes (the dY planes it reads).
    pub positions: usize,
    pub blocks: Vec<TapBlock>,
    /// For each block and tap, its permutation in `perms`.
    pub steps: Vec<usize>,
    pub perms: Vec<Perm>,
}

/// One block of a [`TapPlan`].
#[derive(Debug, Clone, Copy)]
pub(super) struct TapBlock {
    /// The block's first position in the output plane.
    pub first: usize,
    /// Which bytes of dY's register are the block's positions.
    pub positions: u64,
    /// Where the window starts in the input plane.
    pub win: usize,
    /// Which bytes of the window's two registers to load, as [`Block::load`].
    pub load: [u64; 2],
    /// Where the block's permutations start in [`TapPlan::steps`]: one per tap.
    pub step: usize,
}

impl TapPlan {
    /// The plan for shape `s` with blocks of 64 positions, or 32 or 16 where the windows of
    /// larger ones do not fit; `None` where not even those fit.
    pub(super) fn new(s: &ConvShape) -> Option<Self> {
        [64, 32, 16].into_iter().find_map(|size| Self::with_blocks(s, size))
    }

    /// Positions per block (the first block's, which is the largest).
    #[cfg(test)]
    pub(super) fn block_len(&self) -> usize {
        self.blocks.first().map_or(0, |b| b.positions.count_ones() as usize)
    }

    fn with_blocks(s: &ConvShape, size: usize) -> Option<Self> {
        if s.kh * s.kw > MAX_TAPS {
            return None;
        }
        let (p, ow, kk) = (s.out_plane(), s.out_w(), s.kh * s.kw);
        let mut plan =
            TapPlan { src_len: s.in_plane(), positions: p, blocks: Vec::new(), steps: Vec::new(), perms: Vec::new() };
        let mut seen = HashMap::new();
        let mut lanes: Vec<Vec<Contribution>> = vec![Vec::new(); size];
        for first in (0..p).step_by(size) {
            let n = size.min(p - first);
            for (j, lane) in lanes.iter_mut().enumerate().take(n) {
                let q = first + j;
                contributions(s, Product::Forward, (q / ow, q % ow), lane);
            }
            let sources = lanes[..n].iter().flatten().filter_map(|&(_, src)| src);
            let (lo, hi) = sources.fold((usize::MAX, 0), |(lo, hi), p| (lo.min(p), hi.max(p)));
            let (win, span) = if lo == usize::MAX { (0, 0) } else { (lo, hi - lo + 1) };
            if span > WINDOW {
                return None;
            }
            let step = plan.steps.len();
            for t in 0..kk {
                let mut perm = Perm { index: [0x80; 64], valid: 0 };
                for (j, lane) in lanes[..n].iter().enumerate() {
                    // The forward pass's contributions list every tap, in kernel order.
                    if let (tap, Some(src)) = lane[t] {
                        debug_assert_eq!(tap as usize, t);
                        perm.index[j] = (src - win) as u8;
                        perm.valid |= 1 << j;
                    }
                }
                plan.steps.push(intern(perm, &mut plan.perms, &mut seen));
            }
            let load_bits = span.min(s.in_plane() - win.min(s.in_plane()));
            let load = [low_bits(load_bits), low_bits(load_bits.saturating_sub(64))];
            plan.blocks.push(TapBlock { first, positions: low_bits(n), win, load, step });
        }
        Some(plan)
    }
}
