//! `int8-nn`: tensors, the autograd tape, and the layers of INT8 training (Zhu et al., CVPR 2020)
//! on `int8-core`'s kernels.
//!
//! - [`Tensor`] (a shape and values on a [`Device`]) and the [`tape`] that records ops and runs
//!   them backwards; [`Param`], a named trainable leaf; [`no_grad`] for evaluation.
//! - [`ops`]: every op's forward and backward pass (conv and linear at FP32 or INT8, batch norm,
//!   activations, pooling, dropout, the loss, concat, reshape, arithmetic).
//! - [`layers`]: [`layers::Conv2d`], [`layers::Linear`], [`layers::BatchNorm2d`],
//!   [`layers::Dropout`]; [`Module`], how a model lists its layers.
//! - [`detection`]: the detectors' box machinery without gradients (anchors, the box coder, NMS,
//!   matching, sampling), as torchvision's.
//! - The per-layer INT8 state of the paper ([`stats`]: DSGC clip values, DCLR multipliers,
//!   saturation), the layer [`policy`] and [`precision`], the SGD optimizer with DCLR and the
//!   schedules ([`optim`]).
//! - How a training process runs: the per-op step breakdown ([`profile`]), memory counters
//!   ([`memory`]), allocation policy ([`alloc`]) and where steps run ([`threads`]).
//! - With the `cuda` feature, tensors on NVIDIA GPUs (`cuda`): [`Tensor::to_device`], and GPU
//!   paths of the ops a ResNet trains with (convolution and linear at both precisions, batch
//!   norm, the activations, pooling, dropout, the loss) and of the SGD update; the other ops run
//!   on the CPU only and say so.

pub mod alloc;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod detection;
mod error;
pub mod layers;
pub mod memory;
pub mod module;
pub mod ops;
pub mod optim;
mod param;
pub mod policy;
pub mod precision;
pub mod profile;
pub mod stats;
pub mod tape;
mod tensor;
pub mod threads;

pub use error::{NnError, Result};
pub use module::{Layer, Module};
pub use ops::conv::ConvGeometry;
pub use param::Param;
pub use tape::{Gradients, no_grad};
pub use tensor::{Device, Shape, Storage, Tensor};
