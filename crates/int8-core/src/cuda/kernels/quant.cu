#line 1 "quant.cu"
// Symmetric INT8 quantization (quant.rs) and DSGC's distance terms (dsgc.rs), bit for bit.
//
// Per element: t = x * inv (inv = 127 / clip, or 0 when clip <= 0), stochastic rounding
// t = floor(t + u) with u = CounterRng::uniform(seed, flat index), code = round_code(clamp(t)),
// saturated when |x| > clip. The CPU sums DSGC's products `x * q`, `q * q` and `x * x` per block of
// 1024 values in sixteen f32 lanes (value 16 * i + l of the block in lane l, the last < 16 values
// of a short block in lane 0 after its other values), adds each block's lanes in f64 in lane order,
// and carries the blocks in f64. The kernels below reproduce each block's three f64 sums exactly
// (one group of sixteen threads per block, one thread per lane); `chunk_sums` adds them per CPU
// chunk in the CPU's order; only the final sum over chunks is the host's.

// One thread block's partial of max |x| (NaN ignored, as `f32::max` does) and the smallest index
// of a non-finite value (`n` when there is none). Max and min are exact in any order.
extern "C" __global__ void max_abs_partial(const float* x, i64 n, float* out_max, u64* out_bad) {
    __shared__ float smax[BLOCK];
    __shared__ u64 sbad[BLOCK];
    float m = 0.0f;
    u64 bad = (u64)n;
    GRID_LOOP(i, n) {
        float v = x[i];
        if (!finite_f32(v)) {
            if ((u64)i < bad) bad = (u64)i;
        } else {
            m = fmaxf(m, fabsf(v));
        }
    }
    smax[threadIdx.x] = m;
    sbad[threadIdx.x] = bad;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + s]);
            u64 o = sbad[threadIdx.x + s];
            if (o < sbad[threadIdx.x]) sbad[threadIdx.x] = o;
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out_max[blockIdx.x] = smax[0];
        out_bad[blockIdx.x] = sbad[0];
    }
}

// max |x| of each channel (one thread block per channel of `len` values): `max_abs_finite(c).0`.
extern "C" __global__ void channel_max_abs(const float* x, i64 len, float* out) {
    __shared__ float smax[BLOCK];
    const float* c = x + (i64)blockIdx.x * len;
    float m = 0.0f;
    for (i64 i = threadIdx.x; i < len; i += BLOCK) m = fmaxf(m, fabsf(c[i]));
    smax[threadIdx.x] = m;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) smax[threadIdx.x] = fmaxf(smax[threadIdx.x], smax[threadIdx.x + s]);
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = smax[0];
}

// The code of `v`: `quantize_slice`'s arithmetic.
__device__ __forceinline__ i8 quantize_one(float v, float inv, int stochastic, u64 key, u64 index) {
    float t = v * inv;
    if (stochastic) t = floorf(t + rng_uniform(key, index));
    return round_code(clamp_code(t));
}

// Adds this thread's count to `total` once per thread block (integer atomics: exact in any order).
__device__ __forceinline__ void add_count(u32 mine, u64* total) {
    __shared__ u32 counts[BLOCK];
    counts[threadIdx.x] = mine;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) counts[threadIdx.x] += counts[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0 && counts[0] != 0) atomicAdd(total, (u64)counts[0]);
}

// Per-tensor quantization with clip value `clip` (`inv` = 127 / clip computed on the host, 0 when
// clip <= 0), the stream's index being the flat index.
extern "C" __global__ void quantize_tensor(const float* x, i64 n, float clip, float inv, int stochastic, u64 key,
                                           i8* out, u64* saturated) {
    u32 sat = 0;
    GRID_LOOP(i, n) {
        float v = x[i];
        out[i] = quantize_one(v, inv, stochastic, key, (u64)i);
        sat += fabsf(v) > clip ? 1u : 0u;
    }
    add_count(sat, saturated);
}

// Per-channel quantization: channel `i / len` clips at its own max |x| (`clips`), and the stream's
// index is still the flat index (the CPU starts each channel's stream at `channel * len`).
extern "C" __global__ void quantize_channels(const float* x, i64 n, i64 len, const float* clips, int stochastic,
                                             u64 key, i8* out, u64* saturated) {
    u32 sat = 0;
    GRID_LOOP(i, n) {
        float clip = clips[i / len];
        float inv = clip > 0.0f ? 127.0f / clip : 0.0f;
        float v = x[i];
        out[i] = quantize_one(v, inv, stochastic, key, (u64)i);
        sat += fabsf(v) > clip ? 1u : 0u;
    }
    add_count(sat, saturated);
}

// Blocks of 1024 values per thread block: sixteen groups of sixteen lanes.
#define TERMS_GROUPS (BLOCK / 16)

// The three distance sums of each 1024-value block `b` into partials[3b .. 3b + 3], and, when
// `out` is given, the codes and the saturation count (`quantize_pass::<true>`).
__device__ __forceinline__ void block_terms(const float* x, i64 n, float clip, float inv, int stochastic, u64 key,
                                            i8* out, u64* saturated, double* partials) {
    __shared__ float sa[BLOCK], sq[BLOCK], se[BLOCK];
    const int group = threadIdx.x / 16, lane = threadIdx.x % 16;
    const i64 b = (i64)blockIdx.x * TERMS_GROUPS + group;
    const i64 start = b * 1024;
    float a = 0.0f, q2 = 0.0f, e = 0.0f;
    u32 sat = 0;
    if (start < n) {
        const i64 len = n - start < 1024 ? n - start : 1024;
        const i64 n16 = len / 16 * 16;
        for (i64 k = lane; k < n16; k += 16) {
            const i64 i = start + k;
            const float v = x[i];
            const i8 code = quantize_one(v, inv, stochastic, key, (u64)i);
            if (out) {
                out[i] = code;
                sat += fabsf(v) > clip ? 1u : 0u;
            }
            const float q = (float)code;
            a += v * q;
            q2 += q * q;
            e += v * v;
        }
        if (lane == 0) {
            // The remainder of a short block goes to lane 0, after its other values.
            for (i64 k = n16; k < len; k++) {
                const i64 i = start + k;
                const float v = x[i];
                const i8 code = quantize_one(v, inv, stochastic, key, (u64)i);
                if (out) {
                    out[i] = code;
                    sat += fabsf(v) > clip ? 1u : 0u;
                }
                const float q = (float)code;
                a += v * q;
                q2 += q * q;
                e += v * v;
            }
        }
    }
    sa[threadIdx.x] = a;
    sq[threadIdx.x] = q2;
    se[threadIdx.x] = e;
    __syncthreads();
    if (lane == 0 && start < n) {
        // `lanes.iter().map(|&v| v as f64).sum::<f64>()`: Rust's float sum starts at -0.0.
        double ga = -0.0, gq = -0.0, ge = -0.0;
        for (int l = 0; l < 16; l++) {
            ga += (double)sa[group * 16 + l];
            gq += (double)sq[group * 16 + l];
            ge += (double)se[group * 16 + l];
        }
        partials[3 * b] = ga;
        partials[3 * b + 1] = gq;
        partials[3 * b + 2] = ge;
    }
    if (out) add_count(sat, saturated);
}

// Codes, saturation and the distance terms in one pass (`ClipState::quantize`'s fused pass).
extern "C" __global__ void quantize_terms(const float* x, i64 n, float clip, float inv, int stochastic, u64 key,
                                          i8* out, u64* saturated, double* partials) {
    block_terms(x, n, clip, inv, stochastic, key, out, saturated, partials);
}

// The distance terms alone with nearest rounding (`dsgc::distance_terms`).
extern "C" __global__ void distance_terms(const float* x, i64 n, float inv, double* partials) {
    block_terms(x, n, 0.0f, inv, 0, 0, (i8*)0, (u64*)0, partials);
}

// Per CPU chunk of `per` blocks: `0.0 + block 0 + block 1 + ...` in block order, for each of the
// three sums (the CPU's per-chunk f64 carry).
extern "C" __global__ void chunk_sums(const double* partials, i64 blocks, i64 per, i64 chunks, double* out) {
    GRID_LOOP(c, chunks) {
        double s0 = 0.0, s1 = 0.0, s2 = 0.0;
        const i64 end = (c + 1) * per < blocks ? (c + 1) * per : blocks;
        for (i64 b = c * per; b < end; b++) {
            s0 += partials[3 * b];
            s1 += partials[3 * b + 1];
            s2 += partials[3 * b + 2];
        }
        out[3 * c] = s0;
        out[3 * c + 1] = s1;
        out[3 * c + 2] = s2;
    }
}
