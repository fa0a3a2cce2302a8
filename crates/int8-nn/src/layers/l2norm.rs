//! SSD's L2Norm layer (Liu et al., ECCV 2016, Sec. 3.1, after ParseNet): each pixel's channel
//! vector scaled to unit length, then by a learned per-channel scale (20 at first, as
//! torchvision's SSD300 sets it).

use crate::error::Result;
use crate::ops::detection::l2norm;
use crate::param::Param;
use crate::tensor::Tensor;

/// Channel-wise L2 normalisation with a learned scale.
#[derive(Debug)]
pub struct L2Norm {
    name: String,
    weight: Param,
}

impl L2Norm {
    /// A layer named `name` over `channels`, its scale starting at `scale`.
    pub fn new(name: impl Into<String>, channels: usize, scale: f32) -> Self {
        let name = name.into();
        // A scale like batch norm's: no weight decay.
        Self { weight: Param::new(format!("{name}.weight"), Tensor::full(channels, scale), false), name }
    }

    /// Applies the layer to `x` (`n x c x h x w`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        l2norm(x, &self.weight.value())
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The scale.
    pub fn weight(&self) -> &Param {
        &self.weight
    }
}
