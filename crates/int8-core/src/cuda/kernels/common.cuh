// Shared by every kernel source (prepended by `int8_core::cuda_sources`): integer types, the
// grid-stride loop, and the CPU's bit-level helpers (CounterRng, round_code, finiteness) so that
// each kernel computes exactly what its CPU function computes.
//
// Every source is compiled with --fmad=false --prec-div=true --prec-sqrt=true --ftz=false
// (`NVRTC_OPTIONS`): Rust never contracts `a * b + c` into a fused multiply-add and rounds every
// f32 division and square root correctly, and the kernels must round the same way.

typedef long long i64;
typedef unsigned long long u64;
typedef unsigned int u32;
typedef signed char i8;

// Threads per block of every kernel launched with the 1-D helper (`Gpu::grid`).
#define BLOCK 256

// for (i64 i = first; i < n; i += stride) over a 1-D grid.
#define GRID_LOOP(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// SplitMix64's finaliser: `rng::mix`.
__device__ __forceinline__ u64 rng_mix(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

// `CounterRng::uniform` of the stream whose key is `key` (`CounterRng::new` runs on the host):
// the top 24 bits of `mix(key + index * golden)` times 2^-24, exact in f32.
__device__ __forceinline__ float rng_uniform(u64 key, u64 index) {
    u64 bits = rng_mix(key + index * 0x9E3779B97F4A7C15ULL);
    return (float)(bits >> 40) * (1.0f / 16777216.0f);
}

// Whether `v` is neither NaN nor infinite (exponent bits not all ones).
__device__ __forceinline__ bool finite_f32(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

// `f32::clamp(t, -127, 127)`: NaN passes through, as in Rust.
__device__ __forceinline__ float clamp_code(float t) {
    if (t < -127.0f) t = -127.0f;
    if (t > 127.0f) t = 127.0f;
    return t;
}

// `quant::round_code`: adding 1.5 * 2^23 leaves the integer nearest `t` (ties to even) in the low
// mantissa bits; the wrapping difference of the bit patterns, truncated to a byte, is the code.
__device__ __forceinline__ i8 round_code(float t) {
    const float MAGIC = 12582912.0f;
    u32 d = __float_as_uint(t + MAGIC) - __float_as_uint(MAGIC);
    return (i8)(int)(d & 0xffu) ;
}
