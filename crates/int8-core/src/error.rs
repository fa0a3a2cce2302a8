//! The one error type of `int8-core`.

use thiserror::Error;

/// Everything that can go wrong in `int8-core`. Messages are lowercase and say what to do.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// A tensor handed to the quantizer holds NaN or an infinity.
    #[error(
        "tensor `{name}` holds a non-finite value ({value}) at index {index}: the run has diverged; lower the learning rate or resume from the last good checkpoint"
    )]
    NonFinite {
        /// The name the caller gave the tensor (for example `layer1.0.conv1.grad_output`).
        name: String,
        /// The first offending value.
        value: f32,
        /// Its flat index.
        index: usize,
    },
    /// A buffer does not have the length its shape implies.
    #[error("{what} has {got} elements but its shape needs {expected}: pass a buffer of the right size")]
    ShapeMismatch {
        /// Which buffer.
        what: &'static str,
        /// Elements expected from the shape.
        expected: usize,
        /// Elements found.
        got: usize,
    },
    /// A parameter is outside its valid range.
    #[error("invalid {what}: {why}")]
    InvalidArgument {
        /// Which parameter.
        what: &'static str,
        /// Why it is invalid and what to use instead.
        why: String,
    },
    /// A CUDA library (the driver, NVRTC, cuBLAS or cuBLASLt) could not be loaded: no GPU driver
    /// on this machine, or a library missing from the search path. The CUDA variants exist with
    /// or without the `cuda` feature, so that matching on this enum does not depend on features.
    #[error("cuda library {library} could not be loaded ({why}): {remedy}")]
    CudaLibrary {
        /// The library's file name (for example `libcublasLt.so.13`).
        library: &'static str,
        /// What failed.
        why: String,
        /// How to install it.
        remedy: &'static str,
    },
    /// A kernel source failed to compile with NVRTC.
    #[error(
        "cuda kernel source `{kernel}` failed to compile with nvrtc for {arch}; fix the kernel (nvrtc's log follows)\n{log}"
    )]
    CudaCompile {
        /// The kernel source's name (`int8_core::cuda_sources::KERNELS`).
        kernel: String,
        /// The target architecture (for example `sm_90`).
        arch: String,
        /// NVRTC's log.
        log: String,
    },
    /// A CUDA driver, cuBLAS or cuBLASLt call failed.
    #[error(
        "cuda {op} failed: {why}; check the gpu with nvidia-smi, and free memory or use smaller batches if it ran out"
    )]
    Cuda {
        /// What was being done.
        op: String,
        /// The library's error.
        why: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Checks that `buf` has exactly `expected` elements.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected { Ok(()) } else { Err(CoreError::ShapeMismatch { what, expected, got }) }
}
