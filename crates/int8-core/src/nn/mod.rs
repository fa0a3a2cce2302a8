//! FP32 kernels for the layers around the convolutions: batch norm (with an optional fused ReLU),
//! max and average pooling, residual add with ReLU, global average pooling, the losses, and the
//! detection heads' RoIAlign, upsampling and L2 normalisation. The paper keeps these
//! in floating point; they are here because a fast FP32 around the INT8 convolutions is what
//! makes the end-to-end comparison honest.

pub mod batchnorm;
pub mod detection;
pub mod detection_loss;
pub mod elementwise;
pub mod loss;
pub mod pool;
