//! `int8-core`: the mathematics of unified INT8 training (Zhu et al., "Towards Unified INT8
//! Training for Convolutional Neural Network", CVPR 2020) and the CPU kernels that run it.
//!
//! - [`quant`]: symmetric linear INT8 quantization, nearest or stochastic rounding, per tensor or
//!   per channel.
//! - [`dsgc`]: Direction Sensitive Gradient Clipping, the per-layer clip-value search.
//! - [`dclr`]: Deviation Counteractive Learning Rate scaling.
//! - [`cpu`]: the instruction sets the kernels may use (the `INT8_TRAIN_CPU` cap).
//! - [`gemm`]: FP32 and exact INT8 matrix multiplication with run-time CPU dispatch.
//! - [`conv`]: 2-D convolution forward, input gradient and weight gradient at both precisions.
//! - [`nn`]: FP32 kernels for batch norm, residual add + ReLU, pooling and the loss.
//! - [`out`]: output buffers that kernels fill without a separate zeroing pass.
//!
//! This crate knows nothing of autograd, models or files: `int8-nn` wraps it as layers.
//!
//! Elementwise loops are compiled for AVX-512 and AVX2 besides the baseline with the
//! `multiversion` attribute (`targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
//! "x86_64+avx2+fma")`), and the best version is chosen at run time: committed builds never use
//! `target-cpu=native`, so without this they would run on 128-bit SSE2.

pub mod conv;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cuda_sources;
pub mod dclr;
pub mod dsgc;
mod error;
pub mod gemm;
pub mod half;
pub mod nn;
pub mod out;
pub mod quant;
pub mod rng;

pub use error::{CoreError, Result};
