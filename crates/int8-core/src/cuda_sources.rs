//! The CUDA C++ sources of `int8-core`'s GPU kernels (`src/cuda/kernels/*.cu`), always compiled
//! in, with or without the `cuda` feature, so that a test can compile every one of them with NVRTC
//! on a machine without a GPU (`tests/nvrtc.rs`). The `cuda` feature's `int8_core::cuda` compiles
//! them for the device it runs on, at first use, with [`NVRTC_OPTIONS`].
//!
//! Each entry of [`KERNELS`] is one compilation unit: `common.cuh` (the CPU's bit-level helpers,
//! [`crate::rng::CounterRng`] and `quant::round_code`) followed by one `.cu` file, whose `#line`
//! directive keeps NVRTC's line numbers those of the file.

/// Prepends the shared header to a kernel file and names the unit after it.
macro_rules! unit {
    ($name:literal) => {
        ($name, concat!(include_str!("cuda/kernels/common.cuh"), include_str!(concat!("cuda/kernels/", $name, ".cu"))))
    };
}

/// Every kernel source: `(name, source)`, the name being the `.cu` file's stem.
pub const KERNELS: &[(&str, &str)] = &[
    unit!("quant"),
    unit!("gemm"),
    unit!("conv"),
    unit!("batchnorm"),
    unit!("elementwise"),
    unit!("pool"),
    unit!("loss"),
];

/// The NVRTC options every kernel is compiled with (besides the target architecture). The kernels
/// reproduce the CPU's f32 arithmetic bit for bit, so the compiler must not fuse `a * b + c` into
/// one rounding (Rust never does), and must round divisions and square roots correctly and keep
/// subnormals, as the CPU does.
pub const NVRTC_OPTIONS: &[&str] =
    &["--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false", "--std=c++17"];

/// The source of kernel unit `name`, if there is one.
pub fn source(name: &str) -> Option<&'static str> {
    KERNELS.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}
