//! A small CNN for 28x28 grayscale images (MNIST, Fashion-MNIST), the model of the quick
//! experiment: three 3x3 convolutions (32, 64, 128 channels) with batch norm and ReLU, max pooling
//! after the first two, global average pooling and a linear classifier. Under the paper's policy
//! the first convolution and the classifier stay FP32.

use int8_nn::layers::{BatchNorm2d, Conv2d, Linear};
use int8_nn::ops::{global_avg_pool, max_pool2d};
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{ConvGeometry, Layer, Module, Tensor};

use crate::{Model, Result, init};

/// The small CNN.
#[derive(Debug)]
pub struct SmallCnn {
    /// 1 -> 32, 28x28.
    pub conv1: Conv2d,
    /// Batch norm + ReLU.
    pub bn1: BatchNorm2d,
    /// 32 -> 64, 14x14.
    pub conv2: Conv2d,
    /// Batch norm + ReLU.
    pub bn2: BatchNorm2d,
    /// 64 -> 128, 7x7.
    pub conv3: Conv2d,
    /// Batch norm + ReLU.
    pub bn3: BatchNorm2d,
    /// 128 -> classes.
    pub fc: Linear,
}

impl SmallCnn {
    /// A network for `classes` classes.
    pub fn new(classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let g = ConvGeometry { padding: (1, 1), ..Default::default() };
        let conv = |name: &str, i: usize, o: usize, n: u64, first: bool| -> Result<Conv2d> {
            let w = init::conv_weight(o, i, 3, seed.wrapping_mul(1000).wrapping_add(n))?;
            Ok(Conv2d::new(name, w, g, policy.precision_for(name, LayerKind::Conv { first }))?)
        };
        let (w, b) = init::linear(classes, 128, seed.wrapping_mul(1000).wrapping_add(999))?;
        Ok(Self {
            conv1: conv("conv1", 1, 32, 1, true)?,
            bn1: BatchNorm2d::new("bn1", 32, true)?,
            conv2: conv("conv2", 32, 64, 2, false)?,
            bn2: BatchNorm2d::new("bn2", 64, true)?,
            conv3: conv("conv3", 64, 128, 3, false)?,
            bn3: BatchNorm2d::new("bn3", 128, true)?,
            fc: Linear::new("fc", w, b, policy.precision_for("fc", LayerKind::Linear { last: true }))?,
        })
    }
}

impl Module for SmallCnn {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        self.conv2.visit(f);
        self.bn2.visit(f);
        self.conv3.visit(f);
        self.bn3.visit(f);
        self.fc.visit(f);
    }
}

impl Model for SmallCnn {
    fn name(&self) -> &str {
        "cnn-small"
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = max_pool2d(&self.bn1.forward(&self.conv1.forward(x)?)?, 2, 2, 0)?;
        let h = max_pool2d(&self.bn2.forward(&self.conv2.forward(&h)?)?, 2, 2, 0)?;
        let h = self.bn3.forward(&self.conv3.forward(&h)?)?;
        Ok(self.fc.forward(&global_avg_pool(&h)?)?)
    }
}
