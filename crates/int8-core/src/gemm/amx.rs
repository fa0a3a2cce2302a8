//! AMX tile primitives shared by the INT8 GEMM's AMX micro-kernel ([`super::int8`]) and the direct
//! stride-1 convolutions (`conv::amx`): the tile configuration and the few tile instructions they
//! issue, through `asm!` (Rust's AMX intrinsics are not stable).
//!
//! Register roles, fixed for every kernel: C tiles `tmm0`-`tmm3` (16 rows of 16 INT32 sums), A
//! tiles `tmm4`, `tmm5` (16 rows of `4 * b_rows` codes), B tiles `tmm6`, `tmm7` (`b_rows` rows of
//! 16 columns by four codes). The compiler never allocates tile registers, so a tile keeps its
//! value from one `asm!` block to the next. `tdpbssd` multiplies signed by signed bytes and adds
//! each group of four products to the INT32 sum with wrapping adds: exact while the sums fit.
//!
//! Every function here is `unsafe`: the caller vouches that the CPU has AMX-TILE and AMX-INT8 and
//! that Linux granted the tile state (`cpu::amx`), that [`configure_tiles`] ran on this thread
//! for the tiles' shapes, and that every tile row read or written lies inside its operand.

use std::arch::asm;

/// The tile shapes, palette 1 (Intel SDM, `LDTILECFG`): see the module's register roles.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// Loads the configuration of `b_rows` (1 to 16: a product reduces over `4 * b_rows` codes) into
/// this thread's tile state unless it already holds it. The GEMM takes `b_rows = 16`; the direct
/// convolution one row per group of four input channels. The state is per thread and kept across
/// context switches; nothing else in the process configures tiles. Loading zeroes every tile.
///
/// # Safety
/// AMX granted (`cpu::amx`).
#[inline]
pub(crate) unsafe fn configure_tiles(b_rows: usize) {
    thread_local! {
        static LOADED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    debug_assert!((1..=16).contains(&b_rows));
    if LOADED.get() == b_rows {
        return;
    }
    let mut cfg = TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb: [64; 16], rows: [16; 16] };
    cfg.colsb[8..].fill(0);
    cfg.rows[8..].fill(0);
    (cfg.colsb[4], cfg.colsb[5]) = (4 * b_rows as u16, 4 * b_rows as u16);
    (cfg.rows[6], cfg.rows[7]) = (b_rows as u8, b_rows as u8);
    // SAFETY: `cfg` is a valid 64-byte palette-1 configuration (the caller vouches for AMX).
    unsafe { asm!("ldtilecfg [{cfg}]", cfg = in(reg) &cfg, options(nostack, readonly)) };
    LOADED.set(b_rows);
}

/// Zeroes the two C tiles `tmm0`, `tmm1`.
///
/// # Safety
/// As the module says.
#[inline(always)]
pub(crate) unsafe fn zero_c2() {
    // SAFETY: the caller's contract.
    unsafe { asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem)) };
}

/// Loads `tmm0` and `tmm1` from 16 rows of 32 sums at `c` (`ldc` bytes apart): columns 0-15 and
/// 16-31.
///
/// # Safety
/// As the module says; the 16 rows of 128 bytes lie inside the caller's buffer.
#[inline(always)]
pub(crate) unsafe fn load_c2(c: *const i32, ldc: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!(
            "tileloadd tmm0, [{c} + {ldc}*1]",
            "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
            c = in(reg) c, ldc = in(reg) ldc, options(nostack, readonly)
        )
    };
}

/// Stores `tmm0` and `tmm1` as [`load_c2`] reads them.
///
/// # Safety
/// As for [`load_c2`], with the rows writable and no one else writing them.
#[inline(always)]
pub(crate) unsafe fn store_c2(c: *mut i32, ldc: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!(
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c} + {ldc}*1 + 64], tmm1",
            c = in(reg) c, ldc = in(reg) ldc, options(nostack)
        )
    };
}

/// `tmm0 += A * B0`, `tmm1 += A * B1`: the A tile at `a` (rows `lda` bytes apart) times the two B
/// tiles at `b` and `b + 64` (rows `ldb` bytes apart), two halves of 32 columns.
///
/// # Safety
/// As the module says; every row of the three tiles lies inside its operand.
#[inline(always)]
pub(crate) unsafe fn product2(a: *const i8, lda: usize, b: *const i8, ldb: usize) {
    // SAFETY: the caller's contract.
    unsafe {
        asm!(
            "tileloadd tmm4, [{a} + {lda}*1]",
            "tileloadd tmm6, [{b} + {ldb}*1]",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
            "tdpbssd tmm0, tmm4, tmm6",
            "tdpbssd tmm1, tmm4, tmm7",
            a = in(reg) a, lda = in(reg) lda, b = in(reg) b, ldb = in(reg) ldb,
            options(nostack, readonly)
        )
    };
}
