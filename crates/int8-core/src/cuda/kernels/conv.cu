#line 1 "conv.cu"
// Convolution data movement and the direct depthwise kernels (conv/: im2col.rs, phase.rs,
// depthwise.rs, mod.rs's subsample/upsample).
//
// `Geom` is one group's view of a convolution: an input of `c` channels of h x w, of which the
// group reads channels c0 .. c0 + cg, a kh x kw kernel with stride, zero padding and dilation,
// and an oh x ow output. The host fills it (cuda/conv.rs `Geom`, the same #[repr(C)] layout).
struct Geom {
    i64 c, c0, cg, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
};

// The lowered input of images n0 .. n0 + nc: element (k, pos), k = (ci * kh + i) * kw + j (the
// weight's layout), pos = ni * oh * ow + oy * ow + ox, is x[n0 + ni][c0 + ci][oy * sh + i * dh - ph]
// [ox * sw + j * dw - pw], 0 where that reads padding and over the padded extent k < k_pad,
// pos < pos_pad; it goes to out[k * sk + pos * sp] (sk = 1: rows of positions, K contiguous, as
// the INT8 GEMM takes it; sp = 1: rows of taps, the CPU's im2col layout).
template <typename T>
__device__ __forceinline__ void im2col(const T* x, Geom g, i64 n0, i64 nc, i64 k_pad, i64 pos_pad, i64 sk, i64 sp,
                                       T* out) {
    const i64 p = g.oh * g.ow, kk = g.kh * g.kw, kg = g.cg * kk;
    GRID_LOOP(idx, k_pad * pos_pad) {
        i64 k, pos;
        if (sk == 1) {
            pos = idx / k_pad;
            k = idx % k_pad;
        } else {
            k = idx / pos_pad;
            pos = idx % pos_pad;
        }
        T v = (T)0;
        if (k < kg && pos < nc * p) {
            const i64 ni = pos / p, oy = (pos % p) / g.ow, ox = pos % g.ow;
            const i64 ci = k / kk, i = (k % kk) / g.kw, j = k % g.kw;
            const i64 ih = oy * g.sh + i * g.dh - g.ph, iw = ox * g.sw + j * g.dw - g.pw;
            if (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w)
                v = x[(((n0 + ni) * g.c + g.c0 + ci) * g.h + ih) * g.w + iw];
        }
        out[k * sk + pos * sp] = v;
    }
}

extern "C" __global__ void im2col_i8(const i8* x, Geom g, i64 n0, i64 nc, i64 k_pad, i64 pos_pad, i64 sk, i64 sp,
                                     i8* out) {
    im2col<i8>(x, g, n0, nc, k_pad, pos_pad, sk, sp, out);
}

extern "C" __global__ void im2col_f32(const float* x, Geom g, i64 n0, i64 nc, i64 k_pad, i64 pos_pad, i64 sk, i64 sp,
                                      float* out) {
    im2col<float>(x, g, n0, nc, k_pad, pos_pad, sk, sp, out);
}

// Whether input position `r` along an axis is reached by any tap: the CPU's phase of `r`
// (`r mod stride`) has taps (phase.rs `axis_taps`), else its gradient is written as 0.
__device__ __forceinline__ bool axis_reached(i64 r, i64 k, i64 dil, i64 pad, i64 stride) {
    const i64 rh = r % stride;
    for (i64 i = 0; i < k; i++) {
        i64 d = i * dil - pad - rh;
        if (((d % stride) + stride) % stride == 0) return true;
    }
    return false;
}

// The input position's output along an axis for tap `i`: -1 when it reads none.
__device__ __forceinline__ i64 tap_source(i64 r, i64 i, i64 dil, i64 pad, i64 stride, i64 out_len) {
    const i64 d = r + pad - i * dil;
    if (d < 0 || d % stride != 0) return -1;
    const i64 o = d / stride;
    return o < out_len ? o : -1;
}

// col2im of an exact INT32 lowered gradient: dx[n0 + ni][c0 + ci][y][x] = (f32)(sum over the taps
// (i, j) reaching it of col[k * ld + ni * P + oy * ow + ox]) * scale, the sum exact in INT32 (so
// any order gives the CPU's value), 0 for pixels whose phase no tap reaches.
extern "C" __global__ void col2im_i32(const int* col, i64 ld, Geom g, i64 n0, i64 nc, float scale, float* dx) {
    const i64 hw = g.h * g.w, p = g.oh * g.ow;
    GRID_LOOP(idx, nc * g.cg * hw) {
        const i64 ni = idx / (g.cg * hw), ci = (idx / hw) % g.cg, y = (idx % hw) / g.w, x = idx % g.w;
        const i64 out = (((n0 + ni) * g.c + g.c0 + ci) * g.h + y) * g.w + x;
        if (!axis_reached(y, g.kh, g.dh, g.ph, g.sh) || !axis_reached(x, g.kw, g.dw, g.pw, g.sw)) {
            dx[out] = 0.0f;
            continue;
        }
        int acc = 0;
        for (i64 i = 0; i < g.kh; i++) {
            const i64 oy = tap_source(y, i, g.dh, g.ph, g.sh, g.oh);
            if (oy < 0) continue;
            for (i64 j = 0; j < g.kw; j++) {
                const i64 ox = tap_source(x, j, g.dw, g.pw, g.sw, g.ow);
                if (ox < 0) continue;
                acc += col[((ci * g.kh + i) * g.kw + j) * ld + ni * p + oy * g.ow + ox];
            }
        }
        dx[out] = (float)acc * scale;
    }
}

// col2im of an FP32 lowered gradient, the taps summed in row-major order (FP32 convolutions are
// checked against the f64 reference within a bound, not bit for bit).
extern "C" __global__ void col2im_f32(const float* col, i64 ld, Geom g, i64 n0, i64 nc, float* dx) {
    const i64 hw = g.h * g.w, p = g.oh * g.ow;
    GRID_LOOP(idx, nc * g.cg * hw) {
        const i64 ni = idx / (g.cg * hw), ci = (idx / hw) % g.cg, y = (idx % hw) / g.w, x = idx % g.w;
        float acc = 0.0f;
        for (i64 i = 0; i < g.kh; i++) {
            const i64 oy = tap_source(y, i, g.dh, g.ph, g.sh, g.oh);
            if (oy < 0) continue;
            for (i64 j = 0; j < g.kw; j++) {
                const i64 ox = tap_source(x, j, g.dw, g.pw, g.sw, g.ow);
                if (ox < 0) continue;
                acc += col[((ci * g.kh + i) * g.kw + j) * ld + ni * p + oy * g.ow + ox];
            }
        }
        dx[(((n0 + ni) * g.c + g.c0 + ci) * g.h + y) * g.w + x] = acc;
    }
}

// A group's GEMM output (cog rows of nc * P columns, row stride ld) into NCHW output channels
// co0 .. co0 + cog of images n0 .. n0 + nc: INT32 sums times each channel's scale.
extern "C" __global__ void scatter_i32(const int* c, i64 ld, i64 cog, i64 co_total, i64 co0, i64 p, i64 n0, i64 nc,
                                       const float* scales, float* y) {
    GRID_LOOP(idx, nc * cog * p) {
        const i64 ni = idx / (cog * p), co = (idx / p) % cog, q = idx % p;
        y[((n0 + ni) * co_total + co0 + co) * p + q] = (float)c[co * ld + ni * p + q] * scales[co0 + co];
    }
}

// The same for an FP32 GEMM output (no scale).
extern "C" __global__ void scatter_f32(const float* c, i64 ld, i64 cog, i64 co_total, i64 co0, i64 p, i64 n0, i64 nc,
                                       float* y) {
    GRID_LOOP(idx, nc * cog * p) {
        const i64 ni = idx / (cog * p), co = (idx / p) % cog, q = idx % p;
        y[((n0 + ni) * co_total + co0 + co) * p + q] = c[co * ld + ni * p + q];
    }
}

// `conv::subsample`: out[plane][i][j] = x[plane][i * sh][j * sw].
template <typename T>
__device__ __forceinline__ void subsample(const T* x, i64 planes, i64 h, i64 w, i64 oh, i64 ow, i64 sh, i64 sw,
                                          T* out) {
    GRID_LOOP(idx, planes * oh * ow) {
        const i64 pl = idx / (oh * ow), i = (idx / ow) % oh, j = idx % ow;
        out[idx] = x[(pl * h + i * sh) * w + j * sw];
    }
}

extern "C" __global__ void subsample_i8(const i8* x, i64 planes, i64 h, i64 w, i64 oh, i64 ow, i64 sh, i64 sw,
                                        i8* out) {
    subsample<i8>(x, planes, h, w, oh, ow, sh, sw, out);
}

extern "C" __global__ void subsample_f32(const float* x, i64 planes, i64 h, i64 w, i64 oh, i64 ow, i64 sh, i64 sw,
                                         float* out) {
    subsample<float>(x, planes, h, w, oh, ow, sh, sw, out);
}

// `conv::upsample`: dx gets `sub` at the pixels the strided 1x1 convolution read, 0 elsewhere.
extern "C" __global__ void upsample_f32(const float* sub, i64 planes, i64 h, i64 w, i64 oh, i64 ow, i64 sh, i64 sw,
                                        float* dx) {
    GRID_LOOP(idx, planes * h * w) {
        const i64 pl = idx / (h * w), y = (idx / w) % h, x = idx % w;
        float v = 0.0f;
        if (y % sh == 0 && x % sw == 0 && y / sh < oh && x / sw < ow) v = sub[(pl * oh + y / sh) * ow + x / sw];
        dx[idx] = v;
    }
}

// Depthwise (one input and one output channel per group; here g.c = g.cg = channels, g.c0 = 0).
// The input pixel that tap (i, j) of output (oy, ox) reads, or -1 in the padding.
__device__ __forceinline__ i64 dw_input(const Geom& g, i64 plane, i64 oy, i64 ox, i64 i, i64 j) {
    const i64 y = oy * g.sh + i * g.dh - g.ph, x = ox * g.sw + j * g.dw - g.pw;
    if (y < 0 || y >= g.h || x < 0 || x >= g.w) return -1;
    return (plane * g.h + y) * g.w + x;
}

// INT8 forward: y = (f32)(exact INT32 sum over taps) * scales[c] (`depthwise::forward`).
extern "C" __global__ void dw_fwd_i8(const i8* x, const i8* w, Geom g, i64 n, const float* scales, float* y) {
    const i64 p = g.oh * g.ow, kk = g.kh * g.kw;
    GRID_LOOP(idx, n * g.c * p) {
        const i64 plane = idx / p, c = plane % g.c, oy = (idx % p) / g.ow, ox = idx % g.ow;
        int acc = 0;
        for (i64 t = 0; t < kk; t++) {
            const i64 src = dw_input(g, plane, oy, ox, t / g.kw, t % g.kw);
            if (src >= 0) acc += (int)w[c * kk + t] * (int)x[src];
        }
        y[idx] = (float)acc * scales[c];
    }
}

// FP32 forward: the CPU adds `w[tap] * x` to each output in tap order from 0.0 (its padding
// products are +-0 and change nothing), then multiplies by 1.0: the same sum, bit for bit.
extern "C" __global__ void dw_fwd_f32(const float* x, const float* w, Geom g, i64 n, float* y) {
    const i64 p = g.oh * g.ow, kk = g.kh * g.kw;
    GRID_LOOP(idx, n * g.c * p) {
        const i64 plane = idx / p, c = plane % g.c, oy = (idx % p) / g.ow, ox = idx % g.ow;
        float acc = 0.0f;
        for (i64 t = 0; t < kk; t++) {
            const i64 src = dw_input(g, plane, oy, ox, t / g.kw, t % g.kw);
            if (src >= 0) acc += w[c * kk + t] * x[src];
        }
        y[idx] = acc * 1.0f;
    }
}

// INT8 input gradient: dx = (f32)(exact sum over the taps reaching the pixel) * scales[c].
extern "C" __global__ void dw_dx_i8(const i8* w, const i8* dy, Geom g, i64 n, const float* scales, float* dx) {
    const i64 hw = g.h * g.w, p = g.oh * g.ow, kk = g.kh * g.kw;
    GRID_LOOP(idx, n * g.c * hw) {
        const i64 plane = idx / hw, c = plane % g.c, y = (idx % hw) / g.w, x = idx % g.w;
        int acc = 0;
        for (i64 t = 0; t < kk; t++) {
            const i64 oy = tap_source(y, t / g.kw, g.dh, g.ph, g.sh, g.oh);
            const i64 ox = tap_source(x, t % g.kw, g.dw, g.pw, g.sw, g.ow);
            if (oy >= 0 && ox >= 0) acc += (int)w[c * kk + t] * (int)dy[plane * p + oy * g.ow + ox];
        }
        dx[idx] = (float)acc * scales[c];
    }
}

// FP32 input gradient: the CPU adds tap after tap into the padded plane (each tap reaching a
// pixel at most once, the rest +-0), then multiplies by 1.0: the same sum in tap order.
extern "C" __global__ void dw_dx_f32(const float* w, const float* dy, Geom g, i64 n, float* dx) {
    const i64 hw = g.h * g.w, p = g.oh * g.ow, kk = g.kh * g.kw;
    GRID_LOOP(idx, n * g.c * hw) {
        const i64 plane = idx / hw, c = plane % g.c, y = (idx % hw) / g.w, x = idx % g.w;
        float acc = 0.0f;
        for (i64 t = 0; t < kk; t++) {
            const i64 oy = tap_source(y, t / g.kw, g.dh, g.ph, g.sh, g.oh);
            const i64 ox = tap_source(x, t % g.kw, g.dw, g.pw, g.sw, g.ow);
            if (oy >= 0 && ox >= 0) acc += w[c * kk + t] * dy[plane * p + oy * g.ow + ox];
        }
        dx[idx] = acc * 1.0f;
    }
}

// INT8 weight gradient: total[c * kk + t] = sum over images and outputs of dy * x, exact in i64
// (one thread block per (channel, tap); integer sums are exact in any order).
extern "C" __global__ void dw_dw_i8(const i8* x, const i8* dy, Geom g, i64 n, i64* total) {
    __shared__ i64 part[BLOCK];
    const i64 kk = g.kh * g.kw, c = blockIdx.x / kk, t = blockIdx.x % kk, p = g.oh * g.ow;
    i64 acc = 0;
    for (i64 q = threadIdx.x; q < n * p; q += BLOCK) {
        const i64 ni = q / p, oy = (q % p) / g.ow, ox = q % g.ow, plane = ni * g.c + c;
        const i64 src = dw_input(g, plane, oy, ox, t / g.kw, t % g.kw);
        if (src >= 0) acc += (i64)((int)dy[plane * p + oy * g.ow + ox] * (int)x[src]);
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) total[blockIdx.x] = part[0];
}

// FP32 weight gradient, one image's sum per (channel, tap), as `weight_grad_plane` forms it: the
// CPU lays dY out in rows of `pw` (its phase layout's row length; columns past ow are zero) and
// takes a sixteen-lane dot product over the flat positions q < len = (oh - 1) * pw + ow, position
// q in lane q % 16 (the last len % 16 positions in lane 0, after its others), then adds the lanes
// in order from 0.0. Positions past ow and padding taps contribute +-0, which changes no lane
// (a lane starts at +0 and never becomes -0). Grid: (channels * kk, ceil(n / 16)); sixteen
// images per thread block, sixteen lanes each.
extern "C" __global__ void dw_dw_f32_images(const float* x, const float* dy, Geom g, i64 n, i64 pw, float* partial) {
    __shared__ float lanes[BLOCK];
    const i64 kk = g.kh * g.kw, c = blockIdx.x / kk, t = blockIdx.x % kk, p = g.oh * g.ow;
    const int group = threadIdx.x / 16, lane = threadIdx.x % 16;
    const i64 ni = (i64)blockIdx.y * 16 + group;
    float acc = 0.0f;
    if (ni < n) {
        const i64 plane = ni * g.c + c;
        const i64 len = (g.oh - 1) * pw + g.ow, n16 = len / 16 * 16;
        for (i64 q = lane; q < n16; q += 16) {
            const i64 oy = q / pw, ox = q % pw;
            if (ox >= g.ow) continue;
            const i64 src = dw_input(g, plane, oy, ox, t / g.kw, t % g.kw);
            if (src >= 0) acc += dy[plane * p + oy * g.ow + ox] * x[src];
        }
        if (lane == 0) {
            for (i64 q = n16; q < len; q++) {
                const i64 oy = q / pw, ox = q % pw;
                if (ox >= g.ow) continue;
                const i64 src = dw_input(g, plane, oy, ox, t / g.kw, t % g.kw);
                if (src >= 0) acc += dy[plane * p + oy * g.ow + ox] * x[src];
            }
        }
    }
    lanes[threadIdx.x] = acc;
    __syncthreads();
    if (lane == 0 && ni < n) {
        float sum = 0.0f;
        for (int l = 0; l < 16; l++) sum += lanes[group * 16 + l];
        partial[(i64)blockIdx.x * n + ni] = sum;
    }
}

// The batch sum of the per-image sums in f64, image by image from 0.0, rounded to f32 once.
extern "C" __global__ void dw_dw_f32_finish(const float* partial, i64 rows, i64 n, float* dw) {
    GRID_LOOP(r, rows) {
        double wide = 0.0;
        for (i64 ni = 0; ni < n; ni++) wide += (double)partial[r * n + ni];
        dw[r] = (float)wide;
    }
}
