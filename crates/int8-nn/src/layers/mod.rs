//! The layers models are made of: each owns its parameters (and, for INT8, its quantization
//! state) and calls the ops of [`crate::ops`] with them. [`Conv2d`] and [`Linear`] run at the
//! precision the layer policy gives them; [`BatchNorm2d`] keeps running statistics; [`Dropout`]
//! draws reproducible masks; [`L2Norm`] is SSD's normalisation with a learned scale.

mod batch_norm;
mod conv;
mod dropout;
mod l2norm;
mod linear;

pub use batch_norm::{BatchNorm2d, RunningStats};
pub use conv::Conv2d;
pub use dropout::Dropout;
pub use l2norm::L2Norm;
pub use linear::Linear;
