//! `int8-nn`: layers whose forward and backward passes run on `int8-core`'s kernels, wrapped as
//! candle custom ops, with the per-layer INT8 state of Zhu et al., CVPR 2020 (DSGC clip values,
//! DCLR multipliers, saturation statistics).
//!
//! Built so far: the conv layer ([`conv::Conv2d`]) at FP32 and INT8. To come (see the project's
//! int8-nn issue): linear, batch norm, ReLU, pooling, residual add and loss ops, the layer
//! policy, the optimizer with DCLR, and the ResNet-20 model.

pub mod conv;
mod error;
mod ops;
pub mod precision;
pub mod stats;

pub use error::{NnError, Result};
