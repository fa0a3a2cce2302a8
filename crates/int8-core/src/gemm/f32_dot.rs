//! FP32 `C = A * B` where both operands run contiguously along the inner dimension `K`: `A`'s rows
//! and `B`'s columns. That is the convolution weight gradient's shape, `dW = dY * im2col(X)^T`, an
//! output of a few thousand sums each over a whole image plane. A packing GEMM must transpose both
//! operands for this layout, and with so few outputs each packed element feeds few products: on a
//! Zen 4 core the `gemm` crate spent more time packing than multiplying there. Here each output
//! is a dot product: a tile of `MR` rows of `A` and `NR` columns of `B` keeps `MR x NR` vector
//! accumulators over the whole of `K`, loading each operand vector once per tile, and reduces them
//! at the end. Kernels for AVX-512 and AVX2+FMA are chosen at run time; the portable loop defines
//! them (every path is tested against the f64 reference).

use super::{MatMut, MatRef};

/// The shortest `K` the dot-product kernels take: with shorter ones the horizontal reductions at
/// the end of each tile cost more than the packing they avoid (on a Zen 4 core, ResNet-20's weight
/// gradients over 8x8 planes, `K` = 64, took 2.5x the `gemm` crate's time; over 16x16, `K` = 256,
/// 0.76x; over 32x32, `K` = 1024, 0.17x).
pub(super) const MIN_K: usize = 256;

/// An instruction set the dot-product kernels can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DotPath {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl DotPath {
    /// The best path this CPU runs.
    pub(super) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::allows(crate::cpu::Level::Avx512) && is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if crate::cpu::allows(crate::cpu::Level::Avx2)
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return Self::Avx2;
            }
        }
        Self::Portable
    }

    /// Every path this CPU runs, for the tests.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut paths = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::cpu::allows(crate::cpu::Level::Avx2)
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                paths.push(Self::Avx2);
            }
            if crate::cpu::allows(crate::cpu::Level::Avx512) && is_x86_feature_detected!("avx512f") {
                paths.push(Self::Avx512);
            }
        }
        paths
    }
}

/// Whether [`gemm_dot`] takes this product: `A`'s rows and `B`'s columns contiguous, and `K` long.
pub(super) fn applies(a: &MatRef<f32>, b: &MatRef<f32>) -> bool {
    a.cols >= MIN_K && a.col_stride == 1 && b.row_stride == 1
}

/// `C = A * B` (or `C += A * B`) on the calling thread, for views where [`applies`] holds and whose
/// shapes were checked.
pub(super) fn gemm_dot(path: DotPath, a: MatRef<f32>, b: MatRef<f32>, c: MatMut<f32>, accumulate: bool) {
    let (m, n, k) = (c.rows, c.cols, a.cols);
    debug_assert!(a.col_stride == 1 && b.row_stride == 1 && a.rows == m && b.cols == n && b.rows == k);
    let (mr, nr) = match path {
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx512 => (4, 4),
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx2 => (3, 4),
        DotPath::Portable => (4, 4),
    };
    let mut sums = [0f32; 16];
    for i in (0..m).step_by(mr) {
        let rows = mr.min(m - i);
        for j in (0..n).step_by(nr) {
            let cols = nr.min(n - j);
            // The operands' slices from the tile's first element; each row of A and column of B
            // is `k` long at its stride (the views were checked to hold every element).
            let a_tile = &a.data[i * a.row_stride..];
            let b_tile = &b.data[j * b.col_stride..];
            let tile = Tile { a: a_tile, lda: a.row_stride, b: b_tile, ldb: b.col_stride, k, rows, cols };
            match path {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `detect` or `available` chose this path, so the CPU has AVX-512F.
                DotPath::Avx512 => unsafe { x86::tile_avx512(&tile, &mut sums) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `detect` or `available` chose this path, so the CPU has AVX2 and FMA.
                DotPath::Avx2 => unsafe { x86::tile_avx2(&tile, &mut sums) },
                DotPath::Portable => tile_portable(&tile, &mut sums),
            }
            for r in 0..rows {
                for s in 0..cols {
                    let o = &mut c.data[(i + r) * c.row_stride + (j + s) * c.col_stride];
                    let v = sums[r * cols + s];
                    *o = if accumulate { *o + v } else { v };
                }
            }
        }
    }
}

/// One tile's operands: `rows` rows of `A` from `a` at stride `lda` and `cols` columns of `B` from
/// `b` at stride `ldb`, each `k` long. Its sums go to `sums[r * cols + s]`.
struct Tile<'a> {
    a: &'a [f32],
    lda: usize,
    b: &'a [f32],
    ldb: usize,
    k: usize,
    rows: usize,
    cols: usize,
}

impl Tile<'_> {
    fn row(&self, r: usize) -> &[f32] {
        &self.a[r * self.lda..][..self.k]
    }

    fn col(&self, s: usize) -> &[f32] {
        &self.b[s * self.ldb..][..self.k]
    }
}

/// The definition: each sum in order along `K`, in 8 interleaved partial sums as the vector paths
/// keep them, so that the paths round alike to within a few units.
fn tile_portable(t: &Tile, sums: &mut [f32; 16]) {
    for r in 0..t.rows {
        let a = t.row(r);
        for s in 0..t.cols {
            let b = t.col(s);
            let mut part = [0f32; 8];
            let mut chunks_a = a.chunks_exact(8);
            for (ca, cb) in (&mut chunks_a).zip(b.chunks_exact(8)) {
                for l in 0..8 {
                    part[l] = ca[l].mul_add(cb[l], part[l]);
                }
            }
            let tail = chunks_a.remainder().iter().zip(&b[a.len() - chunks_a.remainder().len()..]);
            let tail: f32 = tail.map(|(x, y)| x * y).sum();
            sums[r * t.cols + s] = part.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Tile;
    use std::arch::x86_64::*;

    /// The tile's sums with AVX-512: `rows x cols` (at most 4 x 4) accumulators of 16 lanes; the
    /// last partial vector of `K` is a masked load.
    ///
    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(t: &Tile, sums: &mut [f32; 16]) {
        match (t.rows, t.cols) {
            (4, 4) => tile512::<4, 4>(t, sums),
            (4, c) => match c {
                1 => tile512::<4, 1>(t, sums),
                2 => tile512::<4, 2>(t, sums),
                _ => tile512::<4, 3>(t, sums),
            },
            (r, c) => {
                // Edge tiles (the last rows of A): one row at a time, all columns.
                let mut one = [0f32; 16];
                for i in 0..r {
                    let row = Tile { a: &t.a[i * t.lda..], rows: 1, ..*t };
                    match c {
                        1 => tile512::<1, 1>(&row, &mut one),
                        2 => tile512::<1, 2>(&row, &mut one),
                        3 => tile512::<1, 3>(&row, &mut one),
                        _ => tile512::<1, 4>(&row, &mut one),
                    }
                    sums[i * c..][..c].copy_from_slice(&one[..c]);
                }
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    fn tile512<const R: usize, const C: usize>(t: &Tile, sums: &mut [f32; 16]) {
        let rows: [&[f32]; R] = std::array::from_fn(|r| t.row(r));
        let cols: [&[f32]; C] = std::array::from_fn(|s| t.col(s));
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let full = t.k / 16;
        for v in 0..full {
            // SAFETY: every row and column slice is `k` long and `v * 16 + 16 <= k`.
            unsafe {
                let av: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(rows[r].as_ptr().add(v * 16)));
                for s in 0..C {
                    let bv = _mm512_loadu_ps(cols[s].as_ptr().add(v * 16));
                    for r in 0..R {
                        acc[r][s] = _mm512_fmadd_ps(av[r], bv, acc[r][s]);
                    }
                }
            }
        }
        let rest = t.k - full * 16;
        if rest > 0 {
            let mask: __mmask16 = (1u32 << rest).wrapping_sub(1) as __mmask16;
            // SAFETY: the masked loads read only the `rest` elements left in each slice.
            unsafe {
                let av: [__m512; R] =
                    std::array::from_fn(|r| _mm512_maskz_loadu_ps(mask, rows[r].as_ptr().add(full * 16)));
                for s in 0..C {
                    let bv = _mm512_maskz_loadu_ps(mask, cols[s].as_ptr().add(full * 16));
                    for r in 0..R {
                        acc[r][s] = _mm512_fmadd_ps(av[r], bv, acc[r][s]);
                    }
                }
            }
        }
        for r in 0..R {
            for s in 0..C {
                sums[r * C + s] = _mm512_reduce_add_ps(acc[r][s]);
            }
        }
    }

    /// The tile's sums with AVX2 and FMA: at most 3 x 4 accumulators of 8 lanes (sixteen vector
    /// registers: twelve sums, three rows and a column); the last partial vector of `K` in scalar.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(t: &Tile, sums: &mut [f32; 16]) {
        match (t.rows, t.cols) {
            (3, 4) => tile256::<3, 4>(t, sums),
            (3, c) => match c {
                1 => tile256::<3, 1>(t, sums),
                2 => tile256::<3, 2>(t, sums),
                _ => tile256::<3, 3>(t, sums),
            },
            (r, c) => {
                let mut one = [0f32; 16];
                for i in 0..r {
                    let row = Tile { a: &t.a[i * t.lda..], rows: 1, ..*t };
                    match c {
                        1 => tile256::<1, 1>(&row, &mut one),
                        2 => tile256::<1, 2>(&row, &mut one),
                        3 => tile256::<1, 3>(&row, &mut one),
                        _ => tile256::<1, 4>(&row, &mut one),
                    }
                    sums[i * c..][..c].copy_from_slice(&one[..c]);
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn tile256<const R: usize, const C: usize>(t: &Tile, sums: &mut [f32; 16]) {
        let rows: [&[f32]; R] = std::array::from_fn(|r| t.row(r));
        let cols: [&[f32]; C] = std::array::from_fn(|s| t.col(s));
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let full = t.k / 8;
        for v in 0..full {
            // SAFETY: every row and column slice is `k` long and `v * 8 + 8 <= k`.
            unsafe {
                let av: [__m256; R] = std::array::from_fn(|r| _mm256_loadu_ps(rows[r].as_ptr().add(v * 8)));
                for s in 0..C {
                    let bv = _mm256_loadu_ps(cols[s].as_ptr().add(v * 8));
                    for r in 0..R {
                        acc[r][s] = _mm256_fmadd_ps(av[r], bv, acc[r][s]);
                    }
                }
            }
        }
        for r in 0..R {
            for s in 0..C {
                // The eight lanes summed pairwise, then the scalar tail of `K`.
                let x = acc[r][s];
                let q = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
                let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
                let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
                let mut total = _mm_cvtss_f32(q);
                for kk in full * 8..t.k {
                    total += rows[r][kk] * cols[s][kk];
                }
                sums[r * C + s] = total;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::reference::gemm_f64;

    fn floats(n: usize, seed: u32) -> Vec<f32> {
        // A small LCG: values in [-1, 1) with no structure the kernels could depend on.
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_path_matches_the_f64_product_at_every_edge() {
        // Rows and columns around the tile sizes (3 and 4), K around the vector lengths (8, 16)
        // and above MIN_K; C strided (a column-major output) and accumulated into.
        for path in DotPath::available() {
            for &(m, n, k) in
                &[(1, 1, 256), (4, 4, 256), (5, 7, 257), (16, 144, 1024), (3, 9, 263), (13, 6, 383), (8, 1, 400)]
            {
                let a = floats(m * k, 1);
                let bt = floats(n * k, 2); // B's columns, each k long
                let av = MatRef::row_major(&a, m, k).unwrap();
                let bv = MatRef::row_major(&bt, n, k).unwrap().t();
                assert!(applies(&av, &bv));
                let want = gemm_f64(av, bv);
                let init = floats(m * n, 3);
                for accumulate in [false, true] {
                    // C column-major: element (i, j) at j * m + i.
                    let mut c = init.clone();
                    gemm_dot(path, av, bv, MatMut::new(&mut c, m, n, 1, m).unwrap(), accumulate);
                    for i in 0..m {
                        for j in 0..n {
                            let base = if accumulate { init[j * m + i] as f64 } else { 0.0 };
                            let exact = base + want[i * n + j];
                            // |sum of k products| <= k; f32 rounding over k terms: k * 2^-23 each.
                            let bound = (k as f64 + 1.0) * (k as f64) * f32::EPSILON as f64;
                            let got = c[j * m + i] as f64;
                            assert!(
                                (got - exact).abs() <= bound,
                                "{path:?} {m}x{n}x{k} accumulate={accumulate} ({i}, {j}): {got} vs {exact}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_paths_agree_to_a_few_units_in_the_last_place() {
        let (m, n, k) = (6, 10, 1000);
        let a = floats(m * k, 4);
        let bt = floats(n * k, 5);
        let av = MatRef::row_major(&a, m, k).unwrap();
        let bv = MatRef::row_major(&bt, n, k).unwrap().t();
        let want = gemm_f64(av, bv);
        for path in DotPath::available() {
            let mut c = vec![0f32; m * n];
            gemm_dot(path, av, bv, MatMut::row_major(&mut c, m, n).unwrap(), false);
            for (got, want) in c.iter().zip(&want) {
                // Sums of 1000 products of values in [-1, 1) are about 10 in size; summed in
                // vectors their error stays under a few hundred ulp of 1.
                assert!((*got as f64 - want).abs() < 1e-4, "{path:?}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn short_k_and_other_layouts_are_left_to_the_packing_gemm() {
        let k = MIN_K - 1;
        let a = floats(4 * k, 6);
        let b = floats(k * 4, 7);
        assert!(!applies(&MatRef::row_major(&a, 4, k).unwrap(), &MatRef::row_major(&b, 4, k).unwrap().t()));
        let k = MIN_K;
        let a = floats(4 * k, 6);
        let b = floats(k * 4, 7);
        assert!(applies(&MatRef::row_major(&a, 4, k).unwrap(), &MatRef::row_major(&b, 4, k).unwrap().t()));
        // B row-major (its rows, not its columns, contiguous): the packing GEMM's layout.
        assert!(!applies(&MatRef::row_major(&a, 4, k).unwrap(), &MatRef::row_major(&b, k, 4).unwrap()));
    }
}
