//! The one error type of `int8-nn`.

use thiserror::Error;

/// Everything that can go wrong in `int8-nn`. Messages are lowercase and say what to do.
#[derive(Debug, Error)]
pub enum NnError {
    /// A kernel or the quantizer refused its input (a non-finite gradient, a bad shape).
    #[error(transparent)]
    Core(#[from] int8_core::CoreError),
    /// A layer got an input it cannot take.
    #[error("layer `{layer}`: {why}")]
    BadInput {
        /// The layer's name.
        layer: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// Tensors of shapes an op cannot take.
    #[error("{0}")]
    Shape(String),
    /// The tape was used in a way it cannot follow (a backward pass from a loss that was not
    /// recorded, or run twice over one graph).
    #[error("{0}")]
    Graph(String),
    /// An op got tensors on different devices.
    #[error("op `{op}` got tensors on {devices}: they must be on one device; move them with Tensor::to_device")]
    MixedDevices {
        /// The op's name.
        op: String,
        /// The devices it got, as `cpu and cuda:0`.
        devices: String,
    },
    /// An op that has no GPU path got a tensor on a GPU.
    #[error(
        "op `{op}` runs on the cpu only (it has no gpu path yet) and got a tensor on {device}; \
         move its input to the cpu with to_device(&Device::Cpu)"
    )]
    CpuOnly {
        /// The op's name.
        op: &'static str,
        /// The tensor's device, as `cuda:0`.
        device: String,
    },
    /// A GPU was asked of a build without CUDA.
    #[error("{device} asked of an int8-nn built without cuda; build with `--features cuda`")]
    CudaNotBuilt {
        /// The device asked for, as `cuda:0`.
        device: String,
    },
    /// A device name that is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device `{0}`; use `cpu`, `cuda` or `cuda:N` (N the GPU's ordinal)")]
    UnknownDevice(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = NnError> = std::result::Result<T, E>;
