#line 1 "pool.cu"
// Max and average pooling and their gradients (nn/pool.rs), bit for bit. The CPU's backward
// passes scatter each output's gradient into the input in output (raster) order; here each input
// pixel gathers from the outputs whose windows hold it, in the same raster order, from 0.0.

struct Pool {
    i64 planes, h, w, k, stride, pad, oh, ow;
};

// The first input row of output row `o`'s window, and the end (exclusive): `Pool2d::span`.
__device__ __forceinline__ void span(i64 o, i64 len, const Pool& p, i64* lo, i64* hi) {
    const i64 start = o * p.stride - p.pad;
    *lo = start > 0 ? start : 0;
    *hi = start + p.k < len ? start + p.k : len;
}

// The outputs along an axis whose windows hold input position r: o_lo .. o_hi (exclusive).
__device__ __forceinline__ void holders(i64 r, i64 out_len, const Pool& p, i64* o_lo, i64* o_hi) {
    // o * stride - pad <= r < o * stride - pad + k.
    const i64 num = r + p.pad - p.k + 1;
    i64 lo = num <= 0 ? 0 : (num + p.stride - 1) / p.stride;
    i64 hi = (r + p.pad) / p.stride + 1;
    *o_lo = lo;
    *o_hi = hi < out_len ? hi : out_len;
}

// `max_pool`: the first maximum (`>`), NaN propagating as the maximum; argmax is the flat in-plane
// index.
extern "C" __global__ void max_pool(const float* x, Pool p, float* y, u32* argmax) {
    const i64 oo = p.oh * p.ow;
    GRID_LOOP(idx, p.planes * oo) {
        const i64 pl = idx / oo, i = (idx % oo) / p.ow, j = idx % p.ow;
        i64 r0, r1, c0, c1;
        span(i, p.h, p, &r0, &r1);
        span(j, p.w, p, &c0, &c1);
        float best = __int_as_float(0xff800000);  // -inf
        i64 at = r0 * p.w + c0;
        for (i64 r = r0; r < r1; r++)
            for (i64 c = c0; c < c1; c++) {
                const float v = x[pl * p.h * p.w + r * p.w + c];
                if (v > best || (v != v && best == best)) {
                    best = v;
                    at = r * p.w + c;
                }
            }
        y[idx] = best;
        argmax[idx] = (u32)at;
    }
}

// `max_pool_backward`: each output's gradient, whole, to its maximum; a pixel that is the maximum
// of several windows sums their gradients in output order. `argmax` must come from `max_pool`
// (each index inside its own window).
extern "C" __global__ void max_pool_backward(const float* dy, const u32* argmax, Pool p, float* dx) {
    const i64 hw = p.h * p.w, oo = p.oh * p.ow;
    GRID_LOOP(idx, p.planes * hw) {
        const i64 pl = idx / hw, r = (idx % hw) / p.w, c = idx % p.w;
        i64 i0, i1, j0, j1;
        holders(r, p.oh, p, &i0, &i1);
        holders(c, p.ow, p, &j0, &j1);
        float acc = 0.0f;
        for (i64 i = i0; i < i1; i++)
            for (i64 j = j0; j < j1; j++) {
                const i64 o = pl * oo + i * p.ow + j;
                if ((i64)argmax[o] == r * p.w + c) acc += dy[o];
            }
        dx[idx] = acc;
    }
}

// `avg_pool`: per window row an f32 sum from -0.0 (`iter().sum::<f32>()`), the rows added to 0.0,
// times inv = 1 / (k * k) (computed on the host as the CPU does).
extern "C" __global__ void avg_pool(const float* x, Pool p, float inv, float* y) {
    const i64 oo = p.oh * p.ow;
    GRID_LOOP(idx, p.planes * oo) {
        const i64 pl = idx / oo, i = (idx % oo) / p.ow, j = idx % p.ow;
        i64 r0, r1, c0, c1;
        span(i, p.h, p, &r0, &r1);
        span(j, p.w, p, &c0, &c1);
        float s = 0.0f;
        for (i64 r = r0; r < r1; r++) {
            float row = -0.0f;
            for (i64 c = c0; c < c1; c++) row += x[pl * p.h * p.w + r * p.w + c];
            s += row;
        }
        y[idx] = s * inv;
    }
}

// `avg_pool_backward`: each pixel adds dy * inv of every window holding it, in output order.
extern "C" __global__ void avg_pool_backward(const float* dy, Pool p, float inv, float* dx) {
    const i64 hw = p.h * p.w, oo = p.oh * p.ow;
    GRID_LOOP(idx, p.planes * hw) {
        const i64 pl = idx / hw, r = (idx % hw) / p.w, c = idx % p.w;
        i64 i0, i1, j0, j1;
        holders(r, p.oh, p, &i0, &i1);
        holders(c, p.ow, p, &j0, &j1);
        float acc = 0.0f;
        for (i64 i = i0; i < i1; i++)
            for (i64 j = j0; j < j1; j++) acc += dy[pl * oo + i * p.ow + j] * inv;
        dx[idx] = acc;
    }
}
