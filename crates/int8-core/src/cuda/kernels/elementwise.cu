#line 1 "elementwise.cu"
// Elementwise glue (nn/elementwise.rs), dropout (int8-nn's ops/dropout.rs) and the SGD update
// (int8-nn's optim.rs), bit for bit: each output is one f32 expression of its inputs, written
// in the CPU's order of operations, with no fused multiply-add (--fmad=false).

extern "C" __global__ void add(const float* a, const float* b, i64 n, float* y) {
    GRID_LOOP(i, n) y[i] = a[i] + b[i];
}

// `(u + v).max(0.0)`; fmaxf ignores a NaN operand as `f32::max` does.
extern "C" __global__ void add_relu(const float* a, const float* b, i64 n, float* y) {
    GRID_LOOP(i, n) y[i] = fmaxf(a[i] + b[i], 0.0f);
}

extern "C" __global__ void add_assign(float* acc, const float* b, i64 n) {
    GRID_LOOP(i, n) acc[i] = acc[i] + b[i];
}

// `if y > 0 { g } else { 0 }`.
extern "C" __global__ void relu_backward(const float* y, const float* dy, i64 n, float* dx) {
    GRID_LOOP(i, n) dx[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

// `x.max(0.0).min(cap)`.
extern "C" __global__ void clamp_relu(const float* x, i64 n, float cap, float* y) {
    GRID_LOOP(i, n) y[i] = fminf(fmaxf(x[i], 0.0f), cap);
}

// `if (x > 0) & (x < cap) { g } else { 0 }`.
extern "C" __global__ void clamp_relu_backward(const float* x, const float* dy, i64 n, float cap, float* dx) {
    GRID_LOOP(i, n) dx[i] = (x[i] > 0.0f && x[i] < cap) ? dy[i] : 0.0f;
}

// `(plane.map(f64).sum::<f64>() / hw as f64) as f32`, one thread per plane, in order from -0.0.
extern "C" __global__ void global_avg_pool(const float* x, i64 planes, i64 hw, float* y) {
    GRID_LOOP(p, planes) {
        double s = -0.0;
        for (i64 k = 0; k < hw; k++) s += (double)x[p * hw + k];
        y[p] = (float)(s / (double)hw);
    }
}

// Each plane gets dy[p] / hw (an f32 division).
extern "C" __global__ void global_avg_pool_backward(const float* dy, i64 planes, i64 hw, float* dx) {
    GRID_LOOP(i, planes * hw) dx[i] = dy[i / hw] / (float)hw;
}

// Inverted dropout: y = x * (uniform(i) >= p ? keep : 0), keep = 1 / (1 - p) from the host.
extern "C" __global__ void dropout(const float* x, i64 n, u64 key, float p, float keep, float* y) {
    GRID_LOOP(i, n) y[i] = x[i] * (rng_uniform(key, (u64)i) >= p ? keep : 0.0f);
}

// `Rule::apply`: g = grad + wd * w; buf = first ? g : m * buf + g; d = nesterov ? g + m * buf : buf;
// w - lr * d.
__device__ __forceinline__ void sgd_rule(float w, float grad, float buf, int first, float wd, float m, float lr,
                                         int nesterov, float* nw, float* nb) {
    const float g = grad + wd * w;
    const float b = first ? g : m * buf + g;
    const float d = nesterov ? g + m * b : b;
    *nw = w - lr * d;
    *nb = b;
}

// The smallest index whose gradient is not finite and the smallest whose updated weight is not
// (both start at n), so that a refused step writes nothing. Integer atomics: exact.
extern "C" __global__ void sgd_check(const float* w, const float* grad, const float* buf, i64 n, int first, float wd,
                                     float m, float lr, int nesterov, u64* bad_grad, u64* bad_weight) {
    GRID_LOOP(i, n) {
        float nw, nb;
        sgd_rule(w[i], grad[i], buf[i], first, wd, m, lr, nesterov, &nw, &nb);
        if (!finite_f32(grad[i])) atomicMin(bad_grad, (u64)i);
        if (!finite_f32(nw)) atomicMin(bad_weight, (u64)i);
    }
}

extern "C" __global__ void sgd_apply(float* w, const float* grad, float* buf, i64 n, int first, float wd, float m,
                                     float lr, int nesterov) {
    GRID_LOOP(i, n) {
        float nw, nb;
        sgd_rule(w[i], grad[i], buf[i], first, wd, m, lr, nesterov, &nw, &nb);
        w[i] = nw;
        buf[i] = nb;
    }
}
