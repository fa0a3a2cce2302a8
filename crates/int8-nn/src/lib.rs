//! `int8-nn`: layers whose forward and backward passes run on `int8-core`'s kernels, wrapped as
//! candle custom ops, with the per-layer INT8 state of Zhu et al., CVPR 2020 (DSGC clip values,
//! DCLR multipliers, saturation statistics).
//!
//! Built so far: the conv and linear layers ([`conv::Conv2d`], [`linear::Linear`]) at FP32 and
//! INT8, and the FP32 layers around them ([`layers`]: batch norm with a fused ReLU, residual add +
//! ReLU, global average pooling, cross-entropy), the layer [`policy`], and the SGD optimizer with
//! DCLR multipliers and schedules ([`optim`]). To come (see the project's int8-nn issue): max and
//! average pooling and ReLU6, and the per-op step breakdown.

pub mod alloc;
pub mod conv;
mod error;
pub mod layers;
pub mod linear;
mod ops;
pub mod optim;
pub mod policy;
pub mod precision;
pub mod profile;
pub mod stats;
pub mod threads;

pub use error::{NnError, Result};
