#line 1 "batchnorm.cu"
// Batch norm over NCHW with a fused ReLU/ReLU6 (nn/batchnorm.rs), bit for bit.
//
// The CPU's reductions have a fixed order that depends only on the shape, and these kernels
// follow it: each (image, channel) plane is summed in sixteen f32 lanes (value 16 * i + l in lane
// l, the last hw % 16 values in f64 on their own), the lanes added in f64 in order; the planes of
// a channel are merged image by image within IMAGE_BLOCKS = min(n, 32) blocks of images
// (block b holds images b * n / blocks .. (b + 1) * n / blocks), then block by block. Every f32
// expression keeps the CPU's order of operations, and no multiply-add is fused (--fmad=false).

#define IMAGE_BLOCKS 32
// Planes per thread block in the plane kernels: sixteen lanes each.
#define PLANES (BLOCK / 16)

struct Moments {
    double n, mean, m2;
};

// `Moments::merge` (Chan, Golub and LeVeque).
__device__ __forceinline__ Moments merge(Moments a, Moments b) {
    if (a.n == 0.0) return b;
    if (b.n == 0.0) return a;
    Moments r;
    r.n = a.n + b.n;
    const double delta = b.mean - a.mean;
    r.mean = a.mean + delta * b.n / r.n;
    r.m2 = a.m2 + b.m2 + delta * delta * a.n * b.n / r.n;
    return r;
}

// `Moments::of_plane` for every plane: mean from the first pass, squared deviations from the mean
// rounded to f32 in the second, corrected by n * (mean - m)^2.
extern "C" __global__ void bn_plane_moments(const float* x, i64 planes, i64 hw, double* out_mean, double* out_m2) {
    __shared__ float lanes[BLOCK];
    __shared__ float means[PLANES];
    const int group = threadIdx.x / 16, lane = threadIdx.x % 16;
    const i64 plane = (i64)blockIdx.x * PLANES + group;
    const bool live = plane < planes;
    const float* v = x + (live ? plane : 0) * hw;
    const i64 n16 = hw / 16 * 16;
    const double n = (double)hw;
    double mean = 0.0;
    // First pass: sum v.
    float acc = 0.0f;
    if (live)
        for (i64 k = lane; k < n16; k += 16) acc += v[k];
    lanes[threadIdx.x] = acc;
    __syncthreads();
    if (lane == 0 && live) {
        double s = -0.0, tail = -0.0;
        for (int l = 0; l < 16; l++) s += (double)lanes[group * 16 + l];
        for (i64 k = n16; k < hw; k++) tail += (double)v[k];
        mean = (s + tail) / n;
        means[group] = (float)mean;
    }
    __syncthreads();
    // Second pass: sum (v - m)^2 with m the mean rounded to f32.
    const float m = live ? means[group] : 0.0f;
    acc = 0.0f;
    if (live)
        for (i64 k = lane; k < n16; k += 16) {
            const float d = v[k] - m;
            acc += d * d;
        }
    lanes[threadIdx.x] = acc;
    __syncthreads();
    if (lane == 0 && live) {
        double s = -0.0, tail = -0.0;
        for (int l = 0; l < 16; l++) s += (double)lanes[group * 16 + l];
        for (i64 k = n16; k < hw; k++) tail += (double)((v[k] - m) * (v[k] - m));
        const double dm = mean - (double)m;
        out_mean[plane] = mean;
        out_m2[plane] = fmax(s + tail - n * (dm * dm), 0.0);
    }
}

// Per channel: merge the planes in the CPU's order, then the statistics and the forward's affine
// map exactly as `forward_train` computes them.
extern "C" __global__ void bn_channel_stats(const double* pmean, const double* pm2, i64 n, i64 c, i64 hw,
                                            const float* gamma, const float* beta, float eps, float* mean,
                                            float* inv_std, float* var, float* scale, float* shift) {
    GRID_LOOP(ch, c) {
        const i64 blocks = n < IMAGE_BLOCKS ? n : IMAGE_BLOCKS;
        Moments out = {0.0, 0.0, 0.0};
        for (i64 b = 0; b < blocks; b++) {
            Moments acc = {0.0, 0.0, 0.0};
            for (i64 i = b * n / blocks; i < (b + 1) * n / blocks; i++) {
                Moments p = {(double)hw, pmean[i * c + ch], pm2[i * c + ch]};
                acc = merge(acc, p);
            }
            out = merge(out, acc);
        }
        const float mu = (float)out.mean;
        const float v = (float)(out.m2 / out.n);
        const float inv = 1.0f / sqrtf(v + eps);
        const float sc = gamma[ch] * inv;
        mean[ch] = mu;
        var[ch] = v;
        inv_std[ch] = inv;
        scale[ch] = sc;
        shift[ch] = beta[ch] - mu * sc;
    }
}

// `forward_eval`'s (and `backward_eval`'s) scale and shift from running statistics, and
// `backward_eval`'s 1 / sqrt(var + eps).
extern "C" __global__ void bn_eval_affine(const float* gamma, const float* beta, const float* rmean,
                                          const float* rvar, i64 c, float eps, float* scale, float* shift,
                                          float* inv) {
    GRID_LOOP(ch, c) {
        const float sc = gamma[ch] / sqrtf(rvar[ch] + eps);
        scale[ch] = sc;
        shift[ch] = beta[ch] - rmean[ch] * sc;
        inv[ch] = 1.0f / sqrtf(rvar[ch] + eps);
    }
}

// y = x * scale[c] + shift[c], clamped to [0, cap] when `relu` (`plane_affine`).
extern "C" __global__ void bn_affine(const float* x, i64 total, i64 c, i64 hw, const float* scale,
                                     const float* shift, int relu, float cap, float* y) {
    GRID_LOOP(i, total) {
        const i64 ch = (i / hw) % c;
        const float t = x[i] * scale[ch] + shift[ch];
        y[i] = relu ? fminf(fmaxf(t, 0.0f), cap) : t;
    }
}

// `passes`: whether the gradient passes the fused clamp at x (the forward's own arithmetic).
__device__ __forceinline__ bool passes(float x, float a, float b, float cap) {
    const float t = x * a + b;
    return (t > 0.0f) & (t < cap);
}

// `plane_grad_sums` for every plane: (sum g, sum g * (x - mean) * inv), g = dy masked by the
// fused clamp when `relu` (a = scale, b = shift of the forward).
extern "C" __global__ void bn_plane_grad_sums(const float* x, const float* dy, i64 planes, i64 c, i64 hw,
                                              const float* mean, const float* inv, int relu, const float* ma,
                                              const float* mb, float cap, double* out_b, double* out_g) {
    __shared__ float lb[BLOCK], lg[BLOCK];
    const int group = threadIdx.x / 16, lane = threadIdx.x % 16;
    const i64 plane = (i64)blockIdx.x * PLANES + group;
    const bool live = plane < planes;
    const i64 ch = (live ? plane : 0) % c;
    const float* xv = x + (live ? plane : 0) * hw;
    const float* dv = dy + (live ? plane : 0) * hw;
    const i64 n16 = hw / 16 * 16;
    const float mu = mean[ch], iv = inv[ch], a = ma[ch], b = mb[ch];
    float sb = 0.0f, sg = 0.0f;
    if (live)
        for (i64 k = lane; k < n16; k += 16) {
            const float g = (!relu || passes(xv[k], a, b, cap)) ? dv[k] : 0.0f;
            sb += g;
            sg += g * (xv[k] - mu) * iv;
        }
    lb[threadIdx.x] = sb;
    lg[threadIdx.x] = sg;
    __syncthreads();
    if (lane == 0 && live) {
        double t0 = 0.0, t1 = 0.0;
        for (i64 k = n16; k < hw; k++) {
            const float g = (!relu || passes(xv[k], a, b, cap)) ? dv[k] : 0.0f;
            t0 += (double)g;
            t1 += (double)(g * (xv[k] - mu) * iv);
        }
        double s0 = -0.0, s1 = -0.0;
        for (int l = 0; l < 16; l++) {
            s0 += (double)lb[group * 16 + l];
            s1 += (double)lg[group * 16 + l];
        }
        out_b[plane] = s0 + t0;
        out_g[plane] = s1 + t1;
    }
}

// Per channel: (dbeta, dgamma) merged in the CPU's order ((a.0 + b.0, a.1 + b.1) from 0.0), to f32.
extern "C" __global__ void bn_channel_grads(const double* pb, const double* pg, i64 n, i64 c, float* dbeta,
                                            float* dgamma) {
    GRID_LOOP(ch, c) {
        const i64 blocks = n < IMAGE_BLOCKS ? n : IMAGE_BLOCKS;
        double o0 = 0.0, o1 = 0.0;
        for (i64 b = 0; b < blocks; b++) {
            double a0 = 0.0, a1 = 0.0;
            for (i64 i = b * n / blocks; i < (b + 1) * n / blocks; i++) {
                a0 = a0 + pb[i * c + ch];
                a1 = a1 + pg[i * c + ch];
            }
            o0 = o0 + a0;
            o1 = o1 + a1;
        }
        dbeta[ch] = (float)o0;
        dgamma[ch] = (float)o1;
    }
}

// Per channel: k = gamma * inv / m (`backward`'s `gamma[ch] * inv / m`).
extern "C" __global__ void bn_dx_factor(const float* gamma, const float* inv, i64 c, float m, float* k) {
    GRID_LOOP(ch, c) k[ch] = gamma[ch] * inv[ch] / m;
}

// `plane_dx`: dx = k * (m * g - db - (x - mean) * inv * dg), g masked as in the sums.
extern "C" __global__ void bn_dx(const float* x, const float* dy, i64 total, i64 c, i64 hw, const float* mean,
                                 const float* inv, int relu, const float* ma, const float* mb, float cap,
                                 const float* k, float m, const float* db, const float* dg, float* dx) {
    GRID_LOOP(i, total) {
        const i64 ch = (i / hw) % c;
        const float xv = x[i];
        const float g = (!relu || passes(xv, ma[ch], mb[ch], cap)) ? dy[i] : 0.0f;
        dx[i] = k[ch] * (m * g - db[ch] - (xv - mean[ch]) * inv[ch] * dg[ch]);
    }
}
