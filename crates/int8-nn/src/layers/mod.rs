//! The layers models are made of: each owns its parameters (and, for INT8, its quantization
//! state) and calls the ops of [`crate::ops`] with them. [`Conv2d`] and [`Linear`] run at the
//! precision the layer policy gives them; [`BatchNorm2d`] keeps running statistics; [`Dropout`]
//! draws reproducible masks.

mod batch_norm;
mod conv;
mod dropout;
mod linear;

pub use batch_norm::{BatchNorm2d, RunningStats};
pub use conv::Conv2d;
pub use dropout::Dropout;
pub use linear::Linear;
