//! `int8-nn`: layers whose forward and backward passes run on `int8-core`'s kernels, wrapped as
//! candle custom ops, with the per-layer INT8 state of Zhu et al., CVPR 2020 (DSGC clip values,
//! DCLR multipliers, saturation statistics).
//!
//! The conv and linear layers ([`conv::Conv2d`], [`linear::Linear`]) at FP32 and INT8; the FP32
//! layers around them ([`layers`]: batch norm with a fused ReLU or ReLU6, residual add + ReLU,
//! ReLU6, max, average and global average pooling, dropout, cross-entropy); the layer [`policy`];
//! the SGD optimizer with DCLR multipliers and schedules ([`optim`]); the per-op step breakdown
//! ([`profile`]); and how a training process allocates ([`alloc`]) and runs its steps
//! ([`threads`]).

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
