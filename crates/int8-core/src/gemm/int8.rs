//! INT8 GEMM with exact INT32 accumulation (the three GEMMs of Zhu et al., CVPR 2020, Sec. 3).
//!
//! Codes lie in `[-127, 127]` (the quantizer never emits -128), so every product is at most
//! `127^2` and a reduction of up to [`MAX_K_I8`] terms fits in `i32` exactly. Longer reductions
//! (the weight gradient sums over batch x H x W) are split by the caller, which carries the partial
//! sums in `i64`.
//!
//! The layout follows the GotoBLAS scheme: a block of A is packed into `MR`-row panels and each
//! `NR`-column panel of B is packed once per block, both with K grouped by 4 so that one 32-bit
//! lane holds the four bytes that one dot-product instruction consumes. Micro-kernels:
//! - AMX (Sapphire Rapids and later; 16x32 tile): `tdpbssd` multiplies a 16 x 64 tile of A codes by
//!   a 64 x 16 tile of B codes, signed by signed, into 16 x 16 INT32 sums, exactly (wrapping
//!   adds). B's packed layout is already the tile's (each 64-byte row holds 16 columns of four K
//!   values), so one panel of 32 columns is two tiles at a 128-byte row stride; A is packed row by
//!   row instead, K padded with zeros to a multiple of 64, and B's panels are read up to that
//!   padding too (whatever lies there meets A's zeros).
//! - AVX-512 VNNI (`vpdpbusd` on zmm, 8x32 tile) and AVX-VNNI (`vpdpbusd` on ymm, 4x16 tile).
//!   `vpdpbusd` multiplies unsigned by signed bytes, so B is packed as `b + 128` (a free XOR while
//!   interleaving) and each output row is corrected by `128 * rowsum(A)`, summed once while the
//!   small A block is packed; the instruction wraps rather than saturates, so the corrected result
//!   is exact modulo 2^32 and therefore exact.
//! - AVX2 (4x16 tile): `vpmaddubsw` saturates in `i16` for arbitrary bytes, so the kernel feeds it
//!   `|a|` and `sign(a) * b` (`vpabsb`, `vpsignb`), whose pair sums stay below `2 * 127^2 < 2^15`,
//!   then widens with `vpmaddwd`: exact.
//! - Portable (4x16 tile): plain Rust with wrapping arithmetic, the same packing.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{MatMut, MatRef, Parallelism, check_product};
use crate::error::{CoreError, Result};

/// The longest reduction one call may perform: `127^2 * MAX_K_I8 < 2^31`.
pub const MAX_K_I8: usize = 131_072;

/// Depth of one packed K block (a multiple of 4).
const KC: usize = 1024;
/// The most packed B (bytes) that one task packs whole before sweeping it with every A panel: what
/// stays in a 48 KiB L1 beside one A panel. Larger, the sweeps reload B from L2 for every A panel
/// (measured: a 3x3 16->16 layer's forward, 147 KB of B, went from 1.35-1.45 to 1.70-1.74 ms).
const SMALL_B: usize = 32 * 1024;
/// Rows of one packed A block (a multiple of every path's `MR`): 1 MiB of packed A at full depth,
/// which stays in a 2 MiB L2 while every B panel is packed once and swept over all of it.
const MC: usize = 1024;

/// The smallest A (in elements) that [`PackedA::new`] packs in parallel when asked to.
const PARALLEL_PACK: usize = 1 << 18;

/// An INT8 micro-kernel: multiplies a packed `MR x 4*kc4` A panel by a packed `4*kc4 x NR` B panel
/// and stores the `MR x NR` tile at `out` with row stride `ldc`, less `corr[r]` on row `r`,
/// overwriting it or, with `accumulate`, adding to it (wrapping).
type Kernel =
    unsafe fn(kc4: usize, a: *const i8, b: *const i8, out: *mut i32, ldc: usize, corr: *const i32, accumulate: bool);

/// The correction for tiles that go through the temporary buffer (applied on the way out).
const NO_CORRECTION: [i32; 8] = [0; 8];

/// The instruction set an INT8 GEMM runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Int8Path {
    /// AMX tiles (`tdpbssd`), where Linux grants the tile state.
    Amx,
    /// AVX-512 with VNNI (`vpdpbusd` on 512-bit registers).
    Avx512Vnni,
    /// AVX-VNNI (`vpdpbusd` on 256-bit registers, VEX-encoded).
    AvxVnni,
    /// AVX2 without VNNI (`vpmaddwd` on codes widened to 16 bits).
    Avx2,
    /// Plain Rust, on any CPU.
    Portable,
}

struct Geometry {
    mr: usize,
    nr: usize,
    /// Whether B is packed as `b + 128` (for `vpdpbusd`'s unsigned operand), so that outputs are
    /// corrected by `128 * rowsum(A)`.
    offset: bool,
    /// Whether the kernel reads its panels with every code sign-extended to a little-endian
    /// `i16` (two bytes each, in the packed order): `vpmaddwd` then multiplies pairs of codes
    /// exactly, with no sign trick per row.
    widen: bool,
    /// Whether A's panels are row-major (each row's K codes contiguous, padded with zeros to a
    /// multiple of [`AMX_K`]) rather than K grouped by 4 across the panel's rows: AMX's A tiles.
    a_rows: bool,
    kernel: Kernel,
}

/// The depth one AMX tile product reduces over (16 groups of four bytes).
const AMX_K: usize = 64;

impl Geometry {
    /// Bytes of one packed A panel of depth `kc`.
    fn a_panel_len(&self, kc: usize) -> usize {
        if self.a_rows { self.mr * kc.next_multiple_of(AMX_K) } else { kc.div_ceil(4) * 4 * self.mr }
    }

    /// Bytes the kernel may read past the end of a packed B panel of depth `kc`: AMX reads whole
    /// tiles of 16 groups, up to A's padding.
    fn b_slack(&self, kc: usize) -> usize {
        if self.a_rows { (kc.next_multiple_of(AMX_K) - kc.next_multiple_of(4)) * self.nr } else { 0 }
    }
}

impl Int8Path {
    /// Every path, fastest first.
    pub const ALL: [Int8Path; 5] =
        [Int8Path::Amx, Int8Path::Avx512Vnni, Int8Path::AvxVnni, Int8Path::Avx2, Int8Path::Portable];

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Int8Path::Amx => crate::cpu::amx(),
            #[cfg(target_arch = "x86_64")]
            Int8Path::Avx512Vnni => {
                crate::cpu::allows(crate::cpu::Level::Avx512)
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            Int8Path::AvxVnni => {
                crate::cpu::allows(crate::cpu::Level::AvxVnni)
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("avxvnni")
            }
            #[cfg(target_arch = "x86_64")]
            Int8Path::Avx2 => crate::cpu::avx2(),
            Int8Path::Portable => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The paths this CPU can run, fastest first.
    pub fn available() -> Vec<Int8Path> {
        Self::ALL.into_iter().filter(|p| p.is_available()).collect()
    }

    /// The fastest path this CPU can run (detected once).
    pub fn detect() -> Int8Path {
        static BEST: std::sync::OnceLock<Int8Path> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Self::available()[0])
    }

    /// A short name for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            Int8Path::Amx => "amx",
            Int8Path::Avx512Vnni => "avx512-vnni",
            Int8Path::AvxVnni => "avx-vnni",
            Int8Path::Avx2 => "avx2",
            Int8Path::Portable => "portable",
        }
    }

    fn geometry(self) -> Geometry {
        match self {
            #[cfg(target_arch = "x86_64")]
            Int8Path::Amx => {
                Geometry { mr: 16, nr: 32, offset: false, widen: false, a_rows: true, kernel: x86::kernel_amx }
            }
            #[cfg(target_arch = "x86_64")]
            Int8Path::Avx512Vnni => {
                Geometry { mr: 8, nr: 32, offset: true, widen: false, a_rows: false, kernel: x86::kernel_avx512_vnni }
            }
            #[cfg(target_arch = "x86_64")]
            Int8Path::AvxVnni => {
                Geometry { mr: 4, nr: 16, offset: true, widen: false, a_rows: false, kernel: x86::kernel_avx_vnni }
            }
            #[cfg(target_arch = "x86_64")]
            Int8Path::Avx2 => {
                Geometry { mr: 2, nr: 16, offset: false, widen: true, a_rows: false, kernel: x86::kernel_avx2_wide }
            }
            _ => Geometry { mr: 4, nr: 16, offset: false, widen: false, a_rows: false, kernel: kernel_portable },
        }
    }
}

/// `C = A * B`, or `C += A * B` when `accumulate`, over codes in `[-127, 127]`, on `path`.
///
/// The result is exact as long as the reduction depth is at most [`MAX_K_I8`] (checked) and, when
/// accumulating, the accumulated values fit in `i32` (the caller's bound).
pub fn gemm_i8(
    path: Int8Path,
    a: MatRef<i8>,
    b: MatRef<i8>,
    c: MatMut<i32>,
    accumulate: bool,
    par: Parallelism,
) -> Result<()> {
    check_product(&a, &b, &c)?;
    gemm_i8_packed(&PackedA::new(path, a, par)?, b, c, accumulate, par)
}

/// [`gemm_i8`] with A packed beforehand ([`PackedA`]), so that one A serves many products.
pub fn gemm_i8_packed(a: &PackedA, b: MatRef<i8>, c: MatMut<i32>, accumulate: bool, par: Parallelism) -> Result<()> {
    check_packed_product(a, &b, c.rows, c.cols)?;
    if a.rows == 0 || b.cols == 0 {
        return Ok(());
    }
    if a.depth == 0 {
        if !accumulate {
            for i in 0..c.rows {
                for j in 0..c.cols {
                    c.data[i * c.row_stride + j * c.col_stride] = 0;
                }
            }
        }
        return Ok(());
    }
    drive(a, &b, OutPtr::I32 { ptr: c.data.as_mut_ptr(), rs: c.row_stride, cs: c.col_stride }, accumulate, par);
    Ok(())
}

/// Checks the shapes of `C = A * B` for a packed A and a `c_rows x c_cols` output.
fn check_packed_product(a: &PackedA, b: &dyn PanelSource, c_rows: usize, c_cols: usize) -> Result<()> {
    if a.depth != b.rows() || c_rows != a.rows || c_cols != b.cols() {
        return Err(CoreError::InvalidArgument {
            what: "matrix product shapes",
            why: format!("A is {}x{}, B is {}x{}, C is {}x{}", a.rows, a.depth, b.rows(), b.cols(), c_rows, c_cols),
        });
    }
    Ok(())
}

/// `C = diag(row_scales) * (A * B)` in f32, over codes in `[-127, 127]`: the exact INT32 sums are
/// dequantized as they leave the micro-kernel, with no INT32 matrix in between (when the
/// reduction fits one packed block; deeper ones go through one).
pub fn gemm_i8_scaled(
    path: Int8Path,
    a: MatRef<i8>,
    b: MatRef<i8>,
    c: MatMut<f32>,
    row_scales: &[f32],
    par: Parallelism,
) -> Result<()> {
    check_product(&a, &b, &c)?;
    gemm_i8_scaled_packed(&PackedA::new(path, a, par)?, b, c, row_scales, par)
}

/// [`gemm_i8_scaled`] with A packed beforehand, so that one A (a conv layer's weight) serves many
/// products (the images of a batch) without being packed again.
pub fn gemm_i8_scaled_packed(
    a: &PackedA,
    b: MatRef<i8>,
    c: MatMut<f32>,
    row_scales: &[f32],
    par: Parallelism,
) -> Result<()> {
    gemm_i8_scaled_packed_from(a, &b, c.into_uninit(), row_scales, par)
}

/// [`gemm_i8_scaled_packed`] with B given by whatever packs its panels ([`PanelSource`]): a
/// convolution's lowered input can be packed straight from the image, without the im2col matrix.
/// `C` may start uninitialised: every element of the view is written, none read.
pub(crate) fn gemm_i8_scaled_packed_from(
    a: &PackedA,
    b: &dyn PanelSource,
    c: MatMut<MaybeUninit<f32>>,
    row_scales: &[f32],
    par: Parallelism,
) -> Result<()> {
    check_packed_product(a, b, c.rows, c.cols)?;
    crate::error::check_len("gemm row scales", row_scales.len(), a.rows)?;
    let n = b.cols();
    if a.rows == 0 || n == 0 || a.depth == 0 || a.depth > KC {
        // Reductions deeper than one block are summed in INT32 first, then dequantized once.
        let mut sums = vec![0i32; a.rows * n];
        let out = OutPtr::I32 { ptr: sums.as_mut_ptr(), rs: n, cs: 1 };
        if a.depth > 0 && a.rows > 0 && n > 0 {
            drive(a, b, out, false, par);
        }
        for i in 0..c.rows {
            for j in 0..c.cols {
                c.data[i * c.row_stride + j * c.col_stride].write(sums[i * n + j] as f32 * row_scales[i]);
            }
        }
        return Ok(());
    }
    let ptr = c.data.as_mut_ptr().cast::<f32>();
    let out = OutPtr::F32 { ptr, rs: c.row_stride, cs: c.col_stride, scales: row_scales.as_ptr() };
    drive(a, b, out, false, par);
    Ok(())
}

/// A left operand packed once for one path's INT8 kernels, in blocks of [`KC`] x [`MC`], with
/// each row's correction.
#[derive(Debug, Clone)]
pub struct PackedA {
    path: Int8Path,
    rows: usize,
    depth: usize,
    blocks: Vec<PackedBlock>,
}

#[derive(Debug, Clone)]
struct PackedBlock {
    i0: usize,
    mc: usize,
    k0: usize,
    kc: usize,
    /// The packed panels, `len` bytes.
    data: LineBuf,
    len: usize,
    row_corr: Vec<i32>,
}

/// One 64-byte cache line of [`LineBuf`].
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

/// A growable buffer that starts on a cache line, viewed as bytes or as `i32`s: AMX's tile loads
/// and stores measured several times faster from line-aligned rows (a 1 KiB tile of 16 rows read
/// from L1 in about 7 cycles, against 39 from rows off the line boundary). A `Vec` of lines keeps
/// that alignment through clones and growth.
#[derive(Debug, Clone, Default)]
pub(crate) struct LineBuf(Vec<Line>);

impl LineBuf {
    /// The first `len` bytes, the buffer grown (with zeros) to hold them.
    pub(crate) fn bytes_mut(&mut self, len: usize) -> &mut [i8] {
        self.grow(len);
        // SAFETY: the lines hold at least `len` initialised bytes, contiguous (`Line` is a
        // `repr(C)` byte array with no padding), and the borrow of `self` covers the slice.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<i8>(), len) }
    }

    /// The first `len` bytes (which must have been made by [`LineBuf::bytes_mut`]).
    pub(crate) fn bytes(&self, len: usize) -> &[i8] {
        assert!(len <= 64 * self.0.len(), "LineBuf::bytes: {len} bytes asked of {}", 64 * self.0.len());
        // SAFETY: as in `bytes_mut`, for shared reads.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<i8>(), len) }
    }

    /// The first `len` `i32`s, the buffer grown (with zeros) to hold them.
    pub(crate) fn words_mut(&mut self, len: usize) -> &mut [i32] {
        self.grow(4 * len);
        // SAFETY: as in `bytes_mut`; every bit pattern is an `i32` and a line's 64-byte alignment
        // exceeds an `i32`'s.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<i32>(), len) }
    }

    /// The first `len` `i32`s (which must have been made by [`LineBuf::words_mut`]).
    pub(crate) fn words(&self, len: usize) -> &[i32] {
        assert!(4 * len <= 64 * self.0.len(), "LineBuf::words: {len} values asked of {}", 16 * self.0.len());
        // SAFETY: as in `words_mut`, for shared reads.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<i32>(), len) }
    }

    fn grow(&mut self, bytes: usize) {
        if self.0.len() * 64 < bytes {
            self.0.resize(bytes.div_ceil(64), Line([0; 64]));
        }
    }
}

impl PackedA {
    /// Packs `a` for `path` (errors if this CPU cannot run it or the depth exceeds [`MAX_K_I8`]).
    pub fn new(path: Int8Path, a: MatRef<i8>, par: Parallelism) -> Result<Self> {
        check_path_and_depth(path, a.cols)?;
        let g = path.geometry();
        // A conv layer's weight (tens of kilobytes) packs in microseconds, less than waking
        // another thread to share it costs; only large operands are packed in parallel.
        let par = if a.rows * a.cols < PARALLEL_PACK { Parallelism::None } else { par };
        let mut blocks = Vec::new();
        for k0 in (0..a.cols).step_by(KC) {
            let kc = KC.min(a.cols - k0);
            for i0 in (0..a.rows).step_by(MC) {
                let mc = MC.min(a.rows - i0);
                let (mut data, mut row_corr) = (LineBuf::default(), Vec::new());
                let mut len = pack_a(&a, i0, mc, k0, kc, &g, par, &mut data, &mut row_corr);
                if g.widen {
                    let mut wide = LineBuf::default();
                    widen_codes(data.bytes(len), wide.bytes_mut(2 * len));
                    (data, len) = (wide, 2 * len);
                }
                blocks.push(PackedBlock { i0, mc, k0, kc, data, len, row_corr });
            }
        }
        Ok(Self { path, rows: a.rows, depth: a.cols, blocks })
    }

    /// Rows of A.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of A (the reduction depth).
    pub fn depth(&self) -> usize {
        self.depth
    }
}

/// Checks that the CPU runs `path` and that a reduction of depth `k` is exact in `i32`.
fn check_path_and_depth(path: Int8Path, k: usize) -> Result<()> {
    if !path.is_available() {
        return Err(CoreError::InvalidArgument {
            what: "int8 gemm path",
            why: format!("this cpu cannot run {}; use Int8Path::detect()", path.name()),
        });
    }
    if k > MAX_K_I8 {
        return Err(CoreError::InvalidArgument {
            what: "int8 gemm depth",
            why: format!("{k} exceeds {MAX_K_I8}, where i32 sums may overflow; split the reduction"),
        });
    }
    Ok(())
}

/// The right operand of a product as the packer sees it: something that writes its `NR`-column
/// panels in the packed layout. A matrix view packs its elements ([`pack_b`]); a convolution's
/// lowered input can pack straight from the image (`conv::im2col`), skipping the im2col matrix.
pub(crate) trait PanelSource: Sync {
    /// Rows (the reduction depth).
    fn rows(&self) -> usize;
    /// Columns.
    fn cols(&self) -> usize;
    /// Packs rows `k0..k0+kc`, columns `j0..j0+ncols` into one `nr`-column panel exactly as
    /// [`pack_b`] does: K grouped by 4, every byte XORed with `xor`, zero padded past `ncols`
    /// columns (any value past `kc` rows, which meet A's zero padding).
    #[allow(clippy::too_many_arguments)]
    fn pack(&self, k0: usize, kc: usize, j0: usize, ncols: usize, nr: usize, xor: i8, dst: &mut [i8]);
}

impl PanelSource for MatRef<'_, i8> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn pack(&self, k0: usize, kc: usize, j0: usize, ncols: usize, nr: usize, xor: i8, dst: &mut [i8]) {
        pack_b(self, k0, kc, j0, ncols, nr, xor, dst);
    }
}

/// Runs the packed kernels over the whole product (shapes checked, `k > 0`); the blocks come in
/// order of depth, so the first block of each row range overwrites unless accumulating.
fn drive(a: &PackedA, b: &dyn PanelSource, out: OutPtr, accumulate: bool, par: Parallelism) {
    let g = a.path.geometry();
    let n = b.cols();
    let n_panels = n.div_ceil(g.nr);
    for blk in &a.blocks {
        let overwrite = blk.k0 == 0 && !accumulate;
        let block = Block {
            a: blk.data.bytes(blk.len),
            row_corr: &blk.row_corr,
            b,
            i0: blk.i0,
            mc: blk.mc,
            k0: blk.k0,
            kc: blk.kc,
            n,
            overwrite,
            out,
        };
        match par {
            Parallelism::None => block.run(&g, 0..n_panels),
            Parallelism::Rayon => {
                let tasks = (rayon::current_num_threads() * 2).min(n_panels).max(1);
                let per = n_panels.div_ceil(tasks);
                (0..n_panels.div_ceil(per))
                    .into_par_iter()
                    .for_each(|t| block.run(&g, t * per..((t + 1) * per).min(n_panels)));
            }
        }
    }
}

/// The output matrix as a raw pointer, so that tasks writing disjoint column panels can share it.
#[derive(Clone, Copy)]
enum OutPtr {
    /// INT32 sums, overwritten or accumulated.
    I32 { ptr: *mut i32, rs: usize, cs: usize },
    /// `scales[i] * sum` in f32, overwritten (the reduction fits one block).
    F32 { ptr: *mut f32, rs: usize, cs: usize, scales: *const f32 },
}

// SAFETY: tasks built on one `OutPtr` write disjoint elements (distinct column panels) and only
// read the scales; the views they came from stay borrowed for the whole call.
unsafe impl Send for OutPtr {}
// SAFETY: as above; shared references only hand the pointer to tasks with disjoint columns.
unsafe impl Sync for OutPtr {}

/// One packed A block and the B columns it multiplies.
struct Block<'a> {
    a: &'a [i8],
    /// `128 * rowsum(A)` of each row of the block on the offset paths, else zero.
    row_corr: &'a [i32],
    b: &'a dyn PanelSource,
    i0: usize,
    mc: usize,
    k0: usize,
    kc: usize,
    n: usize,
    overwrite: bool,
    out: OutPtr,
}

impl Block<'_> {
    /// Multiplies the block by B's column panels `panels`, writing into the output.
    fn run(&self, g: &Geometry, panels: std::ops::Range<usize>) {
        // The tile and the packed B panels live in per-thread buffers that every call reuses: a
        // conv layer makes one call per image, and fresh zeroed buffers each time measured a few
        // percent of a small layer's time.
        thread_local! {
            static SCRATCH: std::cell::RefCell<(LineBuf, LineBuf, Vec<i8>)> =
                const { std::cell::RefCell::new((LineBuf(Vec::new()), LineBuf(Vec::new()), Vec::new())) };
        }
        SCRATCH.with_borrow_mut(|(tile, packed, wide)| {
            if g.widen {
                self.run_widened(g, panels, tile, packed, wide)
            } else {
                self.run_with(g, panels, tile, packed)
            }
        });
    }

    /// [`Block::run`] for a kernel of widened codes: each B panel is packed, then sign-extended
    /// once into `wide` for every A panel to read.
    fn run_widened(
        &self,
        g: &Geometry,
        panels: std::ops::Range<usize>,
        tile: &mut LineBuf,
        packed: &mut LineBuf,
        wide: &mut Vec<i8>,
    ) {
        let kc4 = self.kc.div_ceil(4);
        let panel_len = kc4 * 4 * g.nr;
        let tile = tile.words_mut(g.mr * g.nr);
        if wide.len() < 2 * panel_len {
            wide.resize(2 * panel_len, 0);
        }
        let (packed, wide) = (packed.bytes_mut(panel_len), &mut wide[..2 * panel_len]);
        for jp in panels {
            let j0 = jp * g.nr;
            self.b.pack(self.k0, self.kc, j0, g.nr.min(self.n - j0), g.nr, 0, packed);
            widen_codes(packed, wide);
            for (ip, a) in self.a.chunks_exact(2 * kc4 * 4 * g.mr).enumerate() {
                self.tile(g, ip, a, jp, wide, tile);
            }
        }
    }

    /// [`Block::run`] with scratch buffers, grown as needed; their contents are overwritten.
    fn run_with(&self, g: &Geometry, panels: std::ops::Range<usize>, tile: &mut LineBuf, packed: &mut LineBuf) {
        let kc4 = self.kc.div_ceil(4);
        let panel_len = kc4 * 4 * g.nr;
        let xor = if g.offset { 0x80u8 as i8 } else { 0 };
        let tile = tile.words_mut(g.mr * g.nr);
        let a_panel = g.a_panel_len(self.kc);
        // AMX packs all of a task's panels first whatever the rows (up to 256 KiB, in L2): a tile
        // load right after the stores that packed its panel waited on them (a 3x3 16->16 layer's
        // forward, alternated with the AVX-512 VNNI path: 2.40/2.54 against 1.78/2.24 ms packing
        // each panel before its tiles, 1.96/2.21 against 2.11/2.30 ms packing all first).
        let whole = panels.len() > 1
            && (g.a_rows && panel_len * panels.len() <= 8 * SMALL_B
                || self.mc >= 4 * g.mr && panel_len * panels.len() <= SMALL_B);
        let need = if whole { panel_len * panels.len() } else { panel_len };
        // Each panel is handed to the kernel with what lies after it, up to the bytes it may read
        // past its end (the next panels, then this slack: bytes of earlier panels, which meet
        // A's zero padding).
        let packed = packed.bytes_mut(need + g.b_slack(self.kc));
        if whole {
            // A shallow product with many rows (a 1x1 convolution from few channels to many): all
            // of this task's B panels are packed first, then each A panel sweeps them, so that the
            // output is written a band of rows at a time rather than a column panel down every
            // row. With two or three A panels the column order measured faster.
            for (jp, dst) in panels.clone().zip(packed[..need].chunks_exact_mut(panel_len)) {
                let j0 = jp * g.nr;
                self.b.pack(self.k0, self.kc, j0, g.nr.min(self.n - j0), g.nr, xor, dst);
            }
            for (ip, a) in self.a.chunks_exact(a_panel).enumerate() {
                for (p, jp) in panels.clone().enumerate() {
                    self.tile(g, ip, a, jp, &packed[p * panel_len..], tile);
                }
            }
            return;
        }
        for jp in panels {
            let j0 = jp * g.nr;
            self.b.pack(self.k0, self.kc, j0, g.nr.min(self.n - j0), g.nr, xor, &mut packed[..panel_len]);
            for (ip, a) in self.a.chunks_exact(a_panel).enumerate() {
                self.tile(g, ip, a, jp, packed, tile);
            }
        }
    }

    /// Multiplies A panel `ip` (`a`) by the packed B panel `jp` (`packed_b`) into the output,
    /// through `tile` where the tile is partial or the output is not plain INT32.
    #[inline(always)]
    fn tile(&self, g: &Geometry, ip: usize, a: &[i8], jp: usize, packed_b: &[i8], tile: &mut [i32]) {
        let kc4 = self.kc.div_ceil(4);
        let (r0, j0) = (ip * g.mr, jp * g.nr);
        let (nrows, ncols) = (g.mr.min(self.mc - r0), g.nr.min(self.n - j0));
        if let OutPtr::I32 { ptr, rs, cs: 1 } = self.out
            && nrows == g.mr
            && ncols == g.nr
        {
            // A full tile of a row-major INT32 output: the kernel stores it in place.
            // SAFETY: `a` holds a packed A panel and `packed_b` a B panel and the bytes the kernel
            // may read past it ([`Geometry::b_slack`]); rows
            // `i0 + r0 ..+ mr`, columns `j0 ..+ nr` lie inside the output view (checked
            // against its slice) and belong to this task's column panel; `row_corr` has
            // an entry for each of the tile's rows; the path's instruction sets were
            // checked before any kernel runs.
            unsafe {
                (g.kernel)(
                    kc4,
                    a.as_ptr(),
                    packed_b.as_ptr(),
                    ptr.add((self.i0 + r0) * rs + j0),
                    rs,
                    self.row_corr[r0..].as_ptr(),
                    !self.overwrite,
                )
            };
            return;
        }
        // SAFETY: as above, with `tile` holding `mr * nr` values at row stride `nr`.
        unsafe {
            (g.kernel)(kc4, a.as_ptr(), packed_b.as_ptr(), tile.as_mut_ptr(), g.nr, NO_CORRECTION.as_ptr(), false)
        };
        for r in 0..nrows {
            let row = &tile[r * g.nr..r * g.nr + ncols];
            // SAFETY: row `i`, columns `j0..j0 + ncols` lie inside the output view, whose
            // extent was checked against its slice, and no other task writes this column
            // panel; `scales` has one entry per row of A.
            unsafe { self.store(self.i0 + r0 + r, j0, row, self.row_corr[r0 + r]) };
        }
    }

    /// Writes tile row `row` (less `correction`) to output row `i` from column `j0`.
    ///
    /// # Safety
    /// `(i, j0..j0 + row.len())` must lie inside the output, with no other task writing there.
    unsafe fn store(&self, i: usize, j0: usize, row: &[i32], correction: i32) {
        match self.out {
            OutPtr::I32 { ptr, rs, cs: 1 } => {
                // SAFETY: the caller's contract; the column stride is 1, so the run is contiguous.
                let dst = unsafe { std::slice::from_raw_parts_mut(ptr.add(i * rs + j0), row.len()) };
                store_row(dst, row, correction, self.overwrite);
            }
            OutPtr::F32 { ptr, rs, cs: 1, scales } => {
                // SAFETY: as above; `scales` has an entry per output row.
                // The output may be uninitialised ([`gemm_i8_scaled_packed_from`]): written, never read.
                let (dst, scale) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(ptr.add(i * rs + j0).cast::<MaybeUninit<f32>>(), row.len()),
                        *scales.add(i),
                    )
                };
                store_row_scaled(dst, row, correction, scale);
            }
            OutPtr::I32 { ptr, rs, cs } => {
                for (j, &v) in row.iter().enumerate() {
                    let v = v.wrapping_sub(correction);
                    // SAFETY: the caller's contract.
                    unsafe {
                        let p = ptr.add(i * rs + (j0 + j) * cs);
                        *p = if self.overwrite { v } else { (*p).wrapping_add(v) };
                    }
                }
            }
            OutPtr::F32 { ptr, rs, cs, scales } => {
                for (j, &v) in row.iter().enumerate() {
                    // SAFETY: the caller's contract.
                    unsafe { *ptr.add(i * rs + (j0 + j) * cs) = v.wrapping_sub(correction) as f32 * *scales.add(i) };
                }
            }
        }
    }
}

/// Writes each code of `src` sign-extended to a little-endian `i16` (two bytes) into `dst`, which
/// holds twice as many bytes: the panels of a widening kernel ([`Geometry::widen`]).
fn widen_codes(src: &[i8], dst: &mut [i8]) {
    assert_eq!(dst.len(), 2 * src.len(), "widen_codes: the output holds two bytes per code");
    // SAFETY: AVX2 was detected; the lengths were checked above.
    #[cfg(target_arch = "x86_64")]
    let done = if crate::cpu::avx2() { unsafe { x86::widen_avx2(src, dst) } } else { 0 };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (d, &v) in dst[2 * done..].chunks_exact_mut(2).zip(&src[done..]) {
        d.copy_from_slice(&(v as i16).to_le_bytes().map(|b| b as i8));
    }
}

/// Stores one tile row, less the VNNI correction, dequantized: `dst = (v - c) * scale`.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(crate) fn store_row_scaled(dst: &mut [MaybeUninit<f32>], row: &[i32], correction: i32, scale: f32) {
    for (d, &v) in dst.iter_mut().zip(row) {
        d.write(v.wrapping_sub(correction) as f32 * scale);
    }
}

/// Stores one tile row into a contiguous output row, less the VNNI correction: `dst = v - c`, or
/// `dst += v - c` when accumulating. Wrapping, since the corrected sum is exact modulo 2^32.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn store_row(dst: &mut [i32], row: &[i32], correction: i32, overwrite: bool) {
    if overwrite {
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = v.wrapping_sub(correction);
        }
    } else {
        for (d, &v) in dst.iter_mut().zip(row) {
            *d = d.wrapping_add(v.wrapping_sub(correction));
        }
    }
}

/// Packs rows `i0..i0+mc`, columns `k0..k0+kc` of A into `MR`-row panels (K grouped by 4, or
/// row-major for AMX), zero padded, and writes each row's correction (`128 * rowsum` on the offset
/// paths, else 0); returns the packed bytes.
fn pack_a(
    a: &MatRef<i8>,
    i0: usize,
    mc: usize,
    k0: usize,
    kc: usize,
    g: &Geometry,
    par: Parallelism,
    dst: &mut LineBuf,
    row_corr: &mut Vec<i32>,
) -> usize {
    let (mr, len) = (g.mr, g.a_panel_len(kc));
    let panels = mc.div_ceil(mr);
    let dst = dst.bytes_mut(panels * len);
    dst.fill(0);
    row_corr.clear();
    row_corr.resize(panels * mr, 0);
    let pack_panel = |((p, panel), corr): ((usize, &mut [i8]), &mut [i32])| {
        let (i, rows) = (i0 + p * mr, mr.min(mc - p * mr));
        if g.a_rows {
            pack_a_panel_rows(a, i, rows, k0, kc, panel);
        } else {
            pack_a_panel(a, i, rows, k0, kc, mr, g.offset, panel, corr);
        }
    };
    match par {
        Parallelism::None => dst.chunks_mut(len).enumerate().zip(row_corr.chunks_mut(mr)).for_each(pack_panel),
        Parallelism::Rayon => dst.par_chunks_mut(len).enumerate().zip(row_corr.par_chunks_mut(mr)).for_each(pack_panel),
    }
    panels * len
}

/// Packs `rows` rows of A from row `i0` into one `mr`-row panel and writes each row's correction.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn pack_a_panel(
    a: &MatRef<i8>,
    i0: usize,
    rows: usize,
    k0: usize,
    kc: usize,
    mr: usize,
    offset: bool,
    panel: &mut [i8],
    corr: &mut [i32],
) {
    for r in 0..rows {
        let i = i0 + r;
        let mut sum = 0i32;
        if a.col_stride == 1 {
            // Whole groups of four bytes move as one 32-bit word.
            let row = &a.data[i * a.row_stride + k0..][..kc];
            let (groups, rest) = row.as_chunks::<4>();
            for (k4, q) in groups.iter().enumerate() {
                panel[(k4 * mr + r) * 4..][..4].copy_from_slice(q);
            }
            for (t, &v) in rest.iter().enumerate() {
                panel[(kc / 4 * mr + r) * 4 + t] = v;
            }
            sum = row.iter().map(|&v| v as i32).sum();
        } else {
            for kk in 0..kc {
                let v = a.at(i, k0 + kk);
                panel[((kk / 4) * mr + r) * 4 + kk % 4] = v;
                sum += v as i32;
            }
        }
        corr[r] = if offset { sum.wrapping_mul(128) } else { 0 };
    }
}

/// Packs `rows` rows of A from row `i0` into one row-major panel (AMX's A tiles: each row's `kc`
/// codes contiguous, at a stride of `kc` rounded up to [`AMX_K`]), leaving the zeroed padding as
/// it is. The path multiplies signed by signed, so no correction.
fn pack_a_panel_rows(a: &MatRef<i8>, i0: usize, rows: usize, k0: usize, kc: usize, panel: &mut [i8]) {
    for (r, dst) in panel.chunks_exact_mut(kc.next_multiple_of(AMX_K)).take(rows).enumerate() {
        if a.col_stride == 1 {
            dst[..kc].copy_from_slice(&a.data[(i0 + r) * a.row_stride + k0..][..kc]);
        } else {
            for (kk, d) in dst[..kc].iter_mut().enumerate() {
                *d = a.at(i0 + r, k0 + kk);
            }
        }
    }
}

/// Packs rows `k0..k0+kc`, columns `j0..j0+ncols` of B into one `NR`-column panel, K grouped by 4,
/// zero padded, every byte XORed with `xor` (`0x80` turns codes into `b + 128` for the VNNI
/// paths).
#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
pub(crate) fn pack_b(
    b: &MatRef<i8>,
    k0: usize,
    kc: usize,
    j0: usize,
    ncols: usize,
    nr: usize,
    xor: i8,
    dst: &mut [i8],
) {
    if ncols < nr || !kc.is_multiple_of(4) {
        dst.fill(0);
    }
    if b.row_stride == 1 && b.col_stride != 1 {
        // Column-major B (a transposed view): each column's four bytes of a group are adjacent, so
        // packing is a transpose of 32-bit words, done in 4x4 blocks where possible.
        let done = transpose_words_simd(b, k0, kc, j0, ncols, nr, xor, dst);
        for j in 0..ncols {
            let col = &b.data[(j0 + j) * b.col_stride + k0..][..kc];
            // Only the groups the transpose did not cover: all of them past its last column.
            let first = if j < done.0 { done.1 } else { 0 };
            for k4 in first..kc / 4 {
                for t in 0..4 {
                    dst[(k4 * nr + j) * 4 + t] = col[4 * k4 + t] ^ xor;
                }
            }
            for (t, &v) in col[kc / 4 * 4..].iter().enumerate() {
                dst[((kc / 4) * nr + j) * 4 + t] = v ^ xor;
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if b.col_stride == 1 && ncols == 32 && nr == 32 && kc.is_multiple_of(4) && crate::cpu::avx2() {
        // SAFETY: AVX2 was detected; rows `k0..k0 + kc` of B each hold columns `j0..j0 + 32`
        // (`ncols` columns lie inside the view), at `row_stride` apart; `dst` holds a whole panel
        // of `kc / 4 * 32 * 4` bytes.
        unsafe { pack_b_rows32(b.data.as_ptr().add(k0 * b.row_stride + j0), b.row_stride, kc / 4, xor, dst) };
        return;
    }
    let full = if b.col_stride == 1 { kc / 4 } else { 0 };
    for k4 in 0..full {
        // Four rows at a time: each output word gathers one byte from each row.
        let rows: [&[i8]; 4] = std::array::from_fn(|t| &b.data[(k0 + 4 * k4 + t) * b.row_stride + j0..][..ncols]);
        let out = &mut dst[k4 * nr * 4..][..ncols * 4];
        let done = interleave4_simd(rows, xor, out);
        for j in done..ncols {
            for t in 0..4 {
                out[4 * j + t] = rows[t][j] ^ xor;
            }
        }
    }
    for kk in 4 * full..kc {
        let base = (kk / 4) * nr * 4 + kk % 4;
        for j in 0..ncols {
            dst[base + j * 4] = b.at(k0 + kk, j0 + j) ^ xor;
        }
    }
}

/// [`pack_b`] for a full 32-column panel of row-major B (the AVX-512 VNNI path's `NR`): per group
/// of four rows, four 32-byte loads, byte and word unpacks within 128-bit lanes, and lane
/// permutes that put the columns back in order, straight through all the groups.
///
/// # Safety
/// AVX2; `src` points at row 0, column 0 of the panel, rows `row_stride` apart, each valid for 32
/// reads for `4 * kc4` rows; `dst` holds `kc4 * 128` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_b_rows32(src: *const i8, row_stride: usize, kc4: usize, xor: i8, dst: &mut [i8]) {
    use std::arch::x86_64::*;
    debug_assert!(dst.len() >= kc4 * 128);
    let x = _mm256_set1_epi8(xor);
    let out = dst.as_mut_ptr();
    for k4 in 0..kc4 {
        // SAFETY: rows `4 * k4 .. 4 * k4 + 4` are inside B (the caller's contract), 32 bytes each.
        let r: [__m256i; 4] = std::array::from_fn(|t| unsafe {
            _mm256_xor_si256(_mm256_loadu_si256(src.add((4 * k4 + t) * row_stride).cast()), x)
        });
        // SAFETY: the 128 bytes from `k4 * 128` lie inside `dst`, which holds `kc4 * 128`.
        unsafe { interleave4x32(r, out.add(k4 * 128)) };
    }
}

/// Writes four rows of 16 bytes as 16 columns of four bytes (`out[4j + t] = r[t][j]`): the packed
/// layout of one group of four rows of a 16-column B panel.
///
/// # Safety
/// `out` is valid for 64 bytes of writes (SSE2 is part of the x86_64 baseline).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
#[inline]
pub(crate) unsafe fn interleave4x16(r: [std::arch::x86_64::__m128i; 4], out: *mut i8) {
    use std::arch::x86_64::*;
    let (a_lo, a_hi) = (_mm_unpacklo_epi8(r[0], r[1]), _mm_unpackhi_epi8(r[0], r[1]));
    let (b_lo, b_hi) = (_mm_unpacklo_epi8(r[2], r[3]), _mm_unpackhi_epi8(r[2], r[3]));
    let words = [
        _mm_unpacklo_epi16(a_lo, b_lo),
        _mm_unpackhi_epi16(a_lo, b_lo),
        _mm_unpacklo_epi16(a_hi, b_hi),
        _mm_unpackhi_epi16(a_hi, b_hi),
    ];
    for (i, w) in words.into_iter().enumerate() {
        // SAFETY: the 16 bytes from `16 i` lie inside the 64 of `out` (the contract).
        unsafe { _mm_storeu_si128(out.add(16 * i).cast(), w) };
    }
}

/// Writes four rows of 32 bytes as 32 columns of four bytes (`out[4j + t] = r[t][j]`): the packed
/// layout of one group of four rows of a 32-column B panel.
///
/// # Safety
/// AVX2; `out` is valid for 128 bytes of writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) unsafe fn interleave4x32(r: [std::arch::x86_64::__m256i; 4], out: *mut i8) {
    use std::arch::x86_64::*;
    // Within each 128-bit lane: columns 0-7 (lane 0) and 16-23 (lane 1) in the low unpacks, 8-15
    // and 24-31 in the high ones.
    let (a_lo, a_hi) = (_mm256_unpacklo_epi8(r[0], r[1]), _mm256_unpackhi_epi8(r[0], r[1]));
    let (b_lo, b_hi) = (_mm256_unpacklo_epi8(r[2], r[3]), _mm256_unpackhi_epi8(r[2], r[3]));
    // Four bytes per column: w0 holds columns 0-3 | 16-19, w1 4-7 | 20-23, w2 8-11 | 24-27, w3
    // 12-15 | 28-31.
    let (w0, w1) = (_mm256_unpacklo_epi16(a_lo, b_lo), _mm256_unpackhi_epi16(a_lo, b_lo));
    let (w2, w3) = (_mm256_unpacklo_epi16(a_hi, b_hi), _mm256_unpackhi_epi16(a_hi, b_hi));
    // SAFETY: the four 32-byte stores cover `out .. out + 128` (the contract).
    unsafe {
        _mm256_storeu_si256(out.cast(), _mm256_permute2x128_si256::<0x20>(w0, w1));
        _mm256_storeu_si256(out.add(32).cast(), _mm256_permute2x128_si256::<0x20>(w2, w3));
        _mm256_storeu_si256(out.add(64).cast(), _mm256_permute2x128_si256::<0x31>(w0, w1));
        _mm256_storeu_si256(out.add(96).cast(), _mm256_permute2x128_si256::<0x31>(w2, w3));
    }
}

/// Interleaves whole groups of 16 columns of four rows into `out` (`out[4j + t] = rows[t][j]`) with
/// SSE2 byte and word unpacks; returns how many columns it did.
#[cfg(target_arch = "x86_64")]
fn interleave4_simd(rows: [&[i8]; 4], xor: i8, out: &mut [i8]) -> usize {
    use std::arch::x86_64::*;
    let n = rows[0].len() / 16 * 16;
    // SAFETY: SSE2 is part of the x86_64 baseline.
    let x = unsafe { _mm_set1_epi8(xor) };
    for j in (0..n).step_by(16) {
        // SAFETY: SSE2 is part of the x86_64 baseline; each row holds at least `j + 16` bytes and
        // `out` at least `4 * (j + 16)`, since `n <= rows[t].len()` and `out.len() == 4 * len`.
        unsafe {
            let r: [__m128i; 4] =
                std::array::from_fn(|t| _mm_xor_si128(_mm_loadu_si128(rows[t].as_ptr().add(j).cast()), x));
            interleave4x16(r, out.as_mut_ptr().add(4 * j));
        }
    }
    n
}

/// Packs column-major B by transposing 4x4 blocks of 32-bit words (four columns by four groups of
/// four K values) with SSE2; returns the columns and groups it covered, `(ncols / 4 * 4,
/// kc / 16 * 4)`, leaving the rest to the caller.
#[cfg(target_arch = "x86_64")]
fn transpose_words_simd(
    b: &MatRef<i8>,
    k0: usize,
    kc: usize,
    j0: usize,
    ncols: usize,
    nr: usize,
    xor: i8,
    dst: &mut [i8],
) -> (usize, usize) {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86_64 baseline.
    let x = unsafe { _mm_set1_epi8(xor) };
    let (jn, kn) = (ncols / 4 * 4, kc / 16 * 16);
    for j in (0..jn).step_by(4) {
        let cols: [&[i8]; 4] = std::array::from_fn(|t| &b.data[(j0 + j + t) * b.col_stride + k0..][..kc]);
        for k in (0..kn).step_by(16) {
            // SAFETY: SSE2 is part of the x86_64 baseline; each column slice holds `kc >= k + 16`
            // bytes, and the four 16-byte stores land at groups `k / 4 .. k / 4 + 4`, columns
            // `j .. j + 4` of a panel of `kc.div_ceil(4) * nr * 4` bytes.
            unsafe {
                let r: [__m128i; 4] =
                    std::array::from_fn(|t| _mm_xor_si128(_mm_loadu_si128(cols[t].as_ptr().add(k).cast()), x));
                let (t0, t1) = (_mm_unpacklo_epi32(r[0], r[1]), _mm_unpacklo_epi32(r[2], r[3]));
                let (t2, t3) = (_mm_unpackhi_epi32(r[0], r[1]), _mm_unpackhi_epi32(r[2], r[3]));
                let rows = [
                    _mm_unpacklo_epi64(t0, t1),
                    _mm_unpackhi_epi64(t0, t1),
                    _mm_unpacklo_epi64(t2, t3),
                    _mm_unpackhi_epi64(t2, t3),
                ];
                for (g, v) in rows.iter().enumerate() {
                    _mm_storeu_si128(dst.as_mut_ptr().add(((k / 4 + g) * nr + j) * 4).cast(), *v);
                }
            }
        }
    }
    (jn, kn / 4)
}

/// Elsewhere the caller's scalar loop does everything.
#[cfg(not(target_arch = "x86_64"))]
fn transpose_words_simd(
    _b: &MatRef<i8>,
    _k0: usize,
    _kc: usize,
    _j0: usize,
    _ncols: usize,
    _nr: usize,
    _xor: i8,
    _dst: &mut [i8],
) -> (usize, usize) {
    (0, 0)
}

/// Elsewhere the caller's scalar loop does every column.
#[cfg(not(target_arch = "x86_64"))]
fn interleave4_simd(_rows: [&[i8]; 4], _xor: i8, _out: &mut [i8]) -> usize {
    0
}

/// The portable 4x16 micro-kernel.
///
/// # Safety
/// `a` must hold `kc4 * 16` bytes, `b` `kc4 * 64` bytes, `corr` 4 values, and `out` a 4 x 16 tile
/// at row stride `ldc`.
unsafe fn kernel_portable(
    kc4: usize,
    a: *const i8,
    b: *const i8,
    out: *mut i32,
    ldc: usize,
    corr: *const i32,
    accumulate: bool,
) {
    const MR: usize = 4;
    const NR: usize = 16;
    // SAFETY: the caller guarantees these lengths.
    let (a, b) = unsafe { (std::slice::from_raw_parts(a, kc4 * 4 * MR), std::slice::from_raw_parts(b, kc4 * 4 * NR)) };
    let mut acc = [0i32; MR * NR];
    for (a, b) in a.chunks_exact(4 * MR).zip(b.chunks_exact(4 * NR)) {
        for r in 0..MR {
            for j in 0..NR {
                let mut s = 0i32;
                for t in 0..4 {
                    s = s.wrapping_add((a[r * 4 + t] as i32).wrapping_mul(b[j * 4 + t] as i32));
                }
                acc[r * NR + j] = acc[r * NR + j].wrapping_add(s);
            }
        }
    }
    for r in 0..MR {
        // SAFETY: the caller guarantees `corr` has MR values and `out` an MR x NR tile at `ldc`.
        let (row, c) = unsafe { (std::slice::from_raw_parts_mut(out.add(r * ldc), NR), *corr.add(r)) };
        for (o, &v) in row.iter_mut().zip(&acc[r * NR..(r + 1) * NR]) {
            let v = v.wrapping_sub(c);
            *o = if accumulate { o.wrapping_add(v) } else { v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Stores an `R` x 16 tile held as `2R` ymm registers (row `r` in `acc[2r]`, `acc[2r + 1]`) at
    /// row stride `ldc`, less `corr[r]`, overwriting or adding.
    ///
    /// # Safety
    /// The CPU must support AVX2; `corr` must hold `R` values and `out` an `R` x 16 tile at `ldc`.
    #[target_feature(enable = "avx2")]
    unsafe fn store_ymm_tile(acc: &[__m256i], out: *mut i32, ldc: usize, corr: *const i32, accumulate: bool) {
        for r in 0..acc.len() / 2 {
            // SAFETY: the caller's contract: row `r`, 16 values, starts at `r * ldc`.
            unsafe {
                let c = _mm256_set1_epi32(*corr.add(r));
                let p = out.add(r * ldc);
                let mut v0 = _mm256_sub_epi32(acc[2 * r], c);
                let mut v1 = _mm256_sub_epi32(acc[2 * r + 1], c);
                if accumulate {
                    v0 = _mm256_add_epi32(v0, _mm256_loadu_si256(p.cast()));
                    v1 = _mm256_add_epi32(v1, _mm256_loadu_si256(p.add(8).cast()));
                }
                _mm256_storeu_si256(p.cast(), v0);
                _mm256_storeu_si256(p.add(8).cast(), v1);
            }
        }
    }

    /// The AVX-512 VNNI 8x32 micro-kernel (B offset by 128: `vpdpbusd` takes it as the unsigned
    /// operand and the broadcast A codes as the signed one).
    ///
    /// # Safety
    /// The CPU must support AVX-512F/BW and VNNI; `a` must hold `kc4 * 32` bytes, `b` `kc4 * 128`
    /// bytes, `corr` 8 values and `out` an 8 x 32 tile at row stride `ldc`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn kernel_avx512_vnni(
        kc4: usize,
        a: *const i8,
        b: *const i8,
        out: *mut i32,
        ldc: usize,
        corr: *const i32,
        accumulate: bool,
    ) {
        let mut acc = [_mm512_setzero_si512(); 16];
        for k in 0..kc4 {
            // SAFETY: `k < kc4`, so every read is inside the panels the caller vouched for.
            unsafe {
                let b0 = _mm512_loadu_si512(b.add(k * 128).cast());
                let b1 = _mm512_loadu_si512(b.add(k * 128 + 64).cast());
                let ap = a.add(k * 32);
                // A streams from L2 (B stays in L1): fetch it sixteen steps ahead. A prefetch
                // never faults, even past the end of the panel.
                _mm_prefetch::<_MM_HINT_T0>(ap.wrapping_add(512).cast());
                for r in 0..8 {
                    let av = _mm512_set1_epi32(ap.add(r * 4).cast::<i32>().read_unaligned());
                    acc[2 * r] = _mm512_dpbusd_epi32(acc[2 * r], b0, av);
                    acc[2 * r + 1] = _mm512_dpbusd_epi32(acc[2 * r + 1], b1, av);
                }
            }
        }
        for r in 0..8 {
            // SAFETY: `corr` has 8 values and row `r` of the tile, 32 values, starts at `r * ldc`.
            unsafe {
                let c = _mm512_set1_epi32(*corr.add(r));
                let p = out.add(r * ldc);
                let mut v0 = _mm512_sub_epi32(acc[2 * r], c);
                let mut v1 = _mm512_sub_epi32(acc[2 * r + 1], c);
                if accumulate {
                    v0 = _mm512_add_epi32(v0, _mm512_loadu_si512(p.cast()));
                    v1 = _mm512_add_epi32(v1, _mm512_loadu_si512(p.add(16).cast()));
                }
                _mm512_storeu_si512(p.cast(), v0);
                _mm512_storeu_si512(p.add(16).cast(), v1);
            }
        }
    }

    /// The AMX 16x32 micro-kernel: per 64 of depth, one A tile (16 rows of 64 codes, row-major at
    /// stride `kc4.div_ceil(16) * 64`) times two B tiles (the panel's 32 columns as two halves of
    /// each 128-byte group row) into two C tiles, `tdpbssd` (signed by signed, exact wrapping
    /// INT32 sums; no correction: `corr` is all zeros on this path). The tiles live in `tmm0`,
    /// `tmm1` (C), `tmm4` (A), `tmm6`, `tmm7` (B), which the compiler never allocates, so they
    /// carry over from one `asm!` block to the next.
    ///
    /// # Safety
    /// AMX-TILE and AMX-INT8 granted (`cpu::amx`); `a` must hold `16 * kc4.div_ceil(16) * 64`
    /// bytes, `b` `kc4.div_ceil(16) * 16 * 128` (the panel and the slack after it), and `out` a
    /// 16 x 32 tile at row stride `ldc`.
    pub(super) unsafe fn kernel_amx(
        kc4: usize,
        a: *const i8,
        b: *const i8,
        out: *mut i32,
        ldc: usize,
        _corr: *const i32,
        accumulate: bool,
    ) {
        use crate::gemm::amx;
        let steps = kc4.div_ceil(16);
        let (lda, ldb, ldc) = (steps * 64, 128usize, ldc * 4);
        // SAFETY: the caller's contract covers AMX; every tile read or written lies inside the
        // operands it vouched for (the A tile at `s * 64` of each row, the B tiles at rows
        // `16 s .. 16 s + 16`, the C tiles at columns 0-15 and 16-31 of the 16 output rows).
        unsafe {
            amx::configure_tiles(16);
            if accumulate {
                amx::load_c2(out, ldc);
            } else {
                amx::zero_c2();
            }
            for s in 0..steps {
                amx::product2(a.add(s * 64), lda, b.add(s * 16 * ldb), ldb);
            }
            amx::store_c2(out, ldc);
        }
    }

    /// The AVX-VNNI 4x16 micro-kernel (B offset by 128, as above).
    ///
    /// # Safety
    /// The CPU must support AVX2 and AVX-VNNI; `a` must hold `kc4 * 16` bytes, `b` `kc4 * 64`
    /// bytes, `corr` 4 values and `out` a 4 x 16 tile at row stride `ldc`.
    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn kernel_avx_vnni(
        kc4: usize,
        a: *const i8,
        b: *const i8,
        out: *mut i32,
        ldc: usize,
        corr: *const i32,
        accumulate: bool,
    ) {
        let mut acc = [_mm256_setzero_si256(); 8];
        for k in 0..kc4 {
            // SAFETY: `k < kc4`, so every read is inside the panels the caller vouched for.
            unsafe {
                let b0 = _mm256_loadu_si256(b.add(k * 64).cast());
                let b1 = _mm256_loadu_si256(b.add(k * 64 + 32).cast());
                let ap = a.add(k * 16);
                for r in 0..4 {
                    let av = _mm256_set1_epi32(ap.add(r * 4).cast::<i32>().read_unaligned());
                    acc[2 * r] = _mm256_dpbusd_avx_epi32(acc[2 * r], b0, av);
                    acc[2 * r + 1] = _mm256_dpbusd_avx_epi32(acc[2 * r + 1], b1, av);
                }
            }
        }
        // SAFETY: forwarded from the caller, whose contract `store_ymm_tile` shares.
        unsafe { store_ymm_tile(&acc, out, ldc, corr, accumulate) };
    }

    /// The AVX2 2x16 micro-kernel on widened codes ([`super::Geometry::widen`]): per group of four
    /// depths, each row's four A codes are broadcast as `i16` to every column and `vpmaddwd`
    /// multiplies them by four columns' codes at once, summing pairs into `i32` lanes (two
    /// partial sums per column, added at the end). A pair's sum is at most `2 * 127^2`, so it is
    /// exact, and there is no sign trick per row as `vpmaddubsw` needs.
    ///
    /// # Safety
    /// The CPU must support AVX2; `a` must hold `kc4 * 16` bytes (2 rows x 4 codes x 2 bytes per
    /// group), `b` `kc4 * 128` (16 columns x 4 codes x 2 bytes), `corr` 2 values and `out` a
    /// 2 x 16 tile at row stride `ldc`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn kernel_avx2_wide(
        kc4: usize,
        a: *const i8,
        b: *const i8,
        out: *mut i32,
        ldc: usize,
        corr: *const i32,
        accumulate: bool,
    ) {
        // acc[4r + i]: row `r`, columns `4i..4i + 4`, each as (codes 0-1, codes 2-3) partial sums.
        let mut acc = [_mm256_setzero_si256(); 8];
        for k in 0..kc4 {
            // SAFETY: `k < kc4`, so every read is inside the panels the caller vouched for.
            unsafe {
                let bp = b.add(k * 128);
                let bv: [__m256i; 4] = [
                    _mm256_loadu_si256(bp.cast()),
                    _mm256_loadu_si256(bp.add(32).cast()),
                    _mm256_loadu_si256(bp.add(64).cast()),
                    _mm256_loadu_si256(bp.add(96).cast()),
                ];
                let ap = a.add(k * 16);
                for r in 0..2 {
                    let av = _mm256_set1_epi64x(ap.add(r * 8).cast::<i64>().read_unaligned());
                    for i in 0..4 {
                        acc[4 * r + i] = _mm256_add_epi32(acc[4 * r + i], _mm256_madd_epi16(av, bv[i]));
                    }
                }
            }
        }
        // Pairs of lanes summed: within each 128-bit lane, columns (0, 1, 4, 5) low and (2, 3, 6, 7)
        // high, put back in order by a 64-bit permute; then row `r` is `rows[2r]`, `rows[2r + 1]`.
        let rows: [__m256i; 4] = std::array::from_fn(|h| {
            _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[2 * h], acc[2 * h + 1]), 0b11_01_10_00)
        });
        // SAFETY: forwarded from the caller, whose contract `store_ymm_tile` shares for two rows.
        unsafe { store_ymm_tile(&rows, out, ldc, corr, accumulate) };
    }

    /// [`super::widen_codes`] with `vpmovsxbw`, 16 codes at a time; returns how many codes it
    /// widened (the whole groups of 16), leaving the rest to the caller.
    ///
    /// # Safety
    /// The CPU must support AVX2; `dst` holds `2 * src.len()` bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn widen_avx2(src: &[i8], dst: &mut [i8]) -> usize {
        let n16 = src.len() / 16 * 16;
        for i in (0..n16).step_by(16) {
            // SAFETY: codes `i..i + 16` lie inside `src` and bytes `2i..2i + 32` inside `dst`.
            unsafe {
                let v = _mm256_cvtepi8_epi16(_mm_loadu_si128(src.as_ptr().add(i).cast()));
                _mm256_storeu_si256(dst.as_mut_ptr().add(2 * i).cast(), v);
            }
        }
        n16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::reference::gemm_i8_i64;
    use crate::rng::CounterRng;

    fn codes(n: usize, seed: u64) -> Vec<i8> {
        let rng = CounterRng::new(seed);
        (0..n).map(|i| (rng.bits(i as u64) % 255) as i32 - 127).map(|v| v as i8).collect()
    }

    fn check(path: Int8Path, m: usize, n: usize, k: usize, transpose_a: bool, transpose_b: bool, par: Parallelism) {
        let ad = codes(m * k, (m * 31 + k) as u64);
        let bd = codes(k * n, (n * 17 + k) as u64);
        let a =
            if transpose_a { MatRef::row_major(&ad, k, m).unwrap().t() } else { MatRef::row_major(&ad, m, k).unwrap() };
        let b =
            if transpose_b { MatRef::row_major(&bd, n, k).unwrap().t() } else { MatRef::row_major(&bd, k, n).unwrap() };
        let want = gemm_i8_i64(a, b);
        let mut c = vec![7i32; m * n];
        gemm_i8(path, a, b, MatMut::row_major(&mut c, m, n).unwrap(), false, par).unwrap();
        for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
            assert_eq!(got as i64, w, "{path:?} {m}x{n}x{k} ta={transpose_a} tb={transpose_b} at {idx}");
        }
        // Accumulating adds onto what is there.
        gemm_i8(path, a, b, MatMut::row_major(&mut c, m, n).unwrap(), true, par).unwrap();
        for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
            assert_eq!(got as i64, 2 * w, "{path:?} accumulate at {idx}");
        }
    }

    #[test]
    fn every_available_path_is_exact_on_odd_and_strided_shapes() {
        let paths = Int8Path::available();
        assert!(paths.contains(&Int8Path::Portable));
        for &path in &paths {
            for &(m, n, k) in
                &[(1, 1, 1), (3, 5, 7), (8, 32, 4), (9, 33, 5), (17, 70, 131), (64, 100, 1030), (300, 45, 20)]
            {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    check(path, m, n, k, ta, tb, Parallelism::None);
                }
                check(path, m, n, k, false, false, Parallelism::Rayon);
            }
        }
    }

    #[test]
    fn every_available_path_is_exact_at_the_extreme_codes_and_full_depth() {
        // All codes at +-127 over the longest allowed reduction: sums reach 127^2 * MAX_K_I8,
        // right under i32::MAX, where a saturating or overflowing kernel would be caught.
        let (m, n, k) = (9, 17, MAX_K_I8);
        let a: Vec<i8> = (0..m * k).map(|i| if (i / k) % 2 == 0 { 127 } else { -127 }).collect();
        let b: Vec<i8> = (0..k * n).map(|i| if (i % n) % 3 == 0 { -127 } else { 127 }).collect();
        let (av, bv) = (MatRef::row_major(&a, m, k).unwrap(), MatRef::row_major(&b, k, n).unwrap());
        let want = gemm_i8_i64(av, bv);
        assert!(want.iter().all(|&w| w.abs() == 127 * 127 * k as i64));
        for path in Int8Path::available() {
            let mut c = vec![0i32; m * n];
            gemm_i8(path, av, bv, MatMut::row_major(&mut c, m, n).unwrap(), false, Parallelism::Rayon).unwrap();
            assert!(c.iter().zip(&want).all(|(&g, &w)| g as i64 == w), "{path:?}");
        }
    }

    #[test]
    fn scaled_output_is_the_exact_sum_times_the_row_scale_on_every_path() {
        for path in Int8Path::available() {
            // Depths within one packed block (dequantized in the write-back) and beyond it, and a
            // shallow product with many rows (B packed whole, then swept by each A panel).
            for &(m, n, k) in &[(9, 33, 144), (16, 70, 1024), (5, 7, 1500), (70, 300, 12)] {
                let (ad, bd) = (codes(m * k, 21), codes(k * n, 22));
                let (a, b) = (MatRef::row_major(&ad, m, k).unwrap(), MatRef::row_major(&bd, k, n).unwrap());
                let scales: Vec<f32> = (0..m).map(|i| 0.001 * (i + 1) as f32).collect();
                let want = gemm_i8_i64(a, b);
                // Row-major output, and a transposed (strided) one.
                let mut c = vec![f32::NAN; m * n];
                gemm_i8_scaled(path, a, b, MatMut::row_major(&mut c, m, n).unwrap(), &scales, Parallelism::Rayon)
                    .unwrap();
                let mut ct = vec![f32::NAN; m * n];
                gemm_i8_scaled(path, a, b, MatMut::new(&mut ct, m, n, 1, m).unwrap(), &scales, Parallelism::None)
                    .unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let w = want[i * n + j] as i32 as f32 * scales[i];
                        assert_eq!(c[i * n + j], w, "{path:?} {m}x{n}x{k} at ({i}, {j})");
                        assert_eq!(ct[j * m + i], w, "{path:?} {m}x{n}x{k} transposed at ({i}, {j})");
                    }
                }
            }
        }
        let a = vec![0i8; 6];
        let av = MatRef::row_major(&a, 2, 3).unwrap();
        let mut c = vec![0f32; 4];
        let err = gemm_i8_scaled(
            Int8Path::Portable,
            av,
            av.t(),
            MatMut::row_major(&mut c, 2, 2).unwrap(),
            &[1.0],
            Parallelism::None,
        );
        assert!(err.unwrap_err().to_string().contains("row scales"));
    }

    #[test]
    fn large_square_matches_the_reference() {
        check(Int8Path::detect(), 257, 300, 1500, false, false, Parallelism::Rayon);
    }

    #[test]
    fn bad_shapes_and_depths_are_errors() {
        let a = vec![0i8; 6];
        let av = MatRef::row_major(&a, 2, 3).unwrap();
        let mut c = vec![0i32; 4];
        let err =
            gemm_i8(Int8Path::Portable, av, av, MatMut::row_major(&mut c, 2, 2).unwrap(), false, Parallelism::None);
        assert!(err.is_err());
        assert!(MatRef::new(&a, 2, 3, 4, 1).is_err());
        let big = vec![0i8; MAX_K_I8 + 1];
        let (x, y) =
            (MatRef::row_major(&big, 1, MAX_K_I8 + 1).unwrap(), MatRef::row_major(&big, MAX_K_I8 + 1, 1).unwrap());
        let mut one = vec![0i32; 1];
        let err =
            gemm_i8(Int8Path::Portable, x, y, MatMut::row_major(&mut one, 1, 1).unwrap(), false, Parallelism::None);
        assert!(err.unwrap_err().to_string().contains("split the reduction"));
    }
}
