#line 1 "gemm.cu"
// Data movement around the GEMMs: packing INT8 operands into the padded K-contiguous layout that
// cuBLASLt's IMMA kernels take, applying the scales to the exact INT32 sums (gemm::gemm_i8_scaled:
// `sum as f32 * row_scale`), and carrying INT32 partial sums in i64 (conv::conv2d_dw_i8).

// dst[b][r][c] (rows_pad x cols_pad per batch entry) = src[b * sb + r * rs + c * cs] inside
// rows x cols, 0 in the padding (zero codes add nothing to an integer dot product).
extern "C" __global__ void pack_i8(const i8* src, i64 batch, i64 rows, i64 cols, i64 sb, i64 rs, i64 cs, i8* dst,
                                   i64 rows_pad, i64 cols_pad) {
    const i64 per = rows_pad * cols_pad;
    GRID_LOOP(i, batch * per) {
        const i64 b = i / per, r = (i % per) / cols_pad, c = i % cols_pad;
        dst[i] = (r < rows && c < cols) ? src[b * sb + r * rs + c * cs] : (i8)0;
    }
}

// out[r * cols + c] = (float)sums[r * ld + c] * scales[r]: the exact sum rounded to f32 once, then
// one f32 product, as `store_row_scaled` does.
extern "C" __global__ void scale_rows(const int* sums, i64 rows, i64 cols, i64 ld, const float* scales, float* out) {
    GRID_LOOP(i, rows * cols) {
        const i64 r = i / cols, c = i % cols;
        out[i] = (float)sums[r * ld + c] * scales[r];
    }
}

// out[r * cols + c] = sums[r * ld + c]: the unpadded INT32 product.
extern "C" __global__ void unpad_i32(const int* sums, i64 rows, i64 cols, i64 ld, int* out) {
    GRID_LOOP(i, rows * cols) {
        const i64 r = i / cols, c = i % cols;
        out[i] = sums[r * ld + c];
    }
}

// total[r * cols + c] += sums[r * ld + c], widening: one image chunk's exact INT32 sums carried in
// i64 (`widen_add`).
extern "C" __global__ void widen_add(const int* sums, i64 rows, i64 cols, i64 ld, i64* total) {
    GRID_LOOP(i, rows * cols) {
        const i64 r = i / cols, c = i % cols;
        total[i] += (i64)sums[r * ld + c];
    }
}

// out[i] = (f32)((f64)total[i] * sc): `(v as f64 * sc) as f32`.
extern "C" __global__ void finish_i64(const i64* total, i64 n, double sc, float* out) {
    GRID_LOOP(i, n) out[i] = (float)((double)total[i] * sc);
}

// The fallback when cuBLASLt refuses an INT8 product (`Gpu::int8_gemm_fallback`): c[i][j] = sum
// over k of a[i][k] * bt[j][k], exact in INT32 (the caller's depth bound), four bytes at a time
// with __dp4a. `k` is a multiple of 16 and the rows 16-byte aligned, so the int loads are aligned.
extern "C" __global__ void gemm_i8_nt(const i8* a, const i8* bt, i64 m, i64 n, i64 k, int* c) {
    GRID_LOOP(idx, m * n) {
        const i64 i = idx / n, j = idx % n;
        const int* ar = (const int*)(a + i * k);
        const int* br = (const int*)(bt + j * k);
        int acc = 0;
        for (i64 q = 0; q < k / 4; q++) acc = __dp4a(ar[q], br[q], acc);
        c[idx] = acc;
    }
}
