#line 1 "loss.cu"
// Softmax cross-entropy (nn/loss.rs), one thread per sample. The gradient, the hits and the
// finiteness are the CPU's expressions; `exp` and `log` in f64 are CUDA's (at most 1 ulp from the
// correctly rounded value, as glibc's are), so a gradient value can differ from the CPU's in its
// last f32 bit when the f64 quotient lies within 1 ulp of an f32 rounding boundary, and the loss
// in its last f64 bits. The mean over the batch is the host's, in sample order.
extern "C" __global__ void softmax_xent(const float* logits, const u32* labels, i64 batch, i64 classes,
                                        float fbatch, float* grad, double* nll, int* above, int* finite) {
    GRID_LOOP(r, batch) {
        const float* z = logits + r * classes;
        float* g = grad + r * classes;
        const i64 label = labels[r];
        float mf = __int_as_float(0xff800000);  // -inf
        for (i64 k = 0; k < classes; k++) mf = fmaxf(mf, z[k]);
        const double max = (double)mf;
        double sum = -0.0;
        for (i64 k = 0; k < classes; k++) sum += exp((double)z[k] - max);
        for (i64 k = 0; k < classes; k++) g[k] = (float)(exp((double)z[k] - max) / sum) / fbatch;
        g[label] = g[label] - 1.0f / fbatch;
        nll[r] = log(sum) - ((double)z[label] - max);
        int count = 0, fin = 1;
        for (i64 k = 0; k < classes; k++) {
            if (z[k] > z[label]) count++;
            if (!finite_f32(z[k])) fin = 0;
        }
        above[r] = count;
        finite[r] = fin;
    }
}
