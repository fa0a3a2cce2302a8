//! ResNets for CIFAR (He et al., "Deep Residual Learning", CVPR 2016, Sec. 4.2): a 3x3 stem of 16
//! channels, three stages of `n` basic blocks at 16, 32 and 64 channels (stride 2 entering the
//! second and third), global average pooling and a linear classifier; depth `6n + 2` (ResNet-20:
//! n = 3). Where a block changes shape its shortcut is a 1x1 stride-2 convolution with batch norm
//! (option B), which gives ResNet-20 its 272,474 parameters; zero-padded identity shortcuts
//! (option A) would give 269,722.

use int8_nn::layers::{BatchNorm2d, Conv2d, Linear};
use int8_nn::ops::global_avg_pool;
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{Layer, Module, Tensor};

pub use crate::blocks::BasicBlock;
use crate::blocks::Builder;
use crate::{Model, Result, init};

/// A CIFAR ResNet of depth `6n + 2`.
#[derive(Debug)]
pub struct ResNetCifar {
    name: String,
    /// The 3x3 stem convolution (FP32 under the paper's policy).
    pub conv1: Conv2d,
    /// The stem's batch norm with the ReLU fused.
    pub bn1: BatchNorm2d,
    /// Stage 1: 16 channels at full resolution.
    pub layer1: Vec<BasicBlock>,
    /// Stage 2: 32 channels at half resolution.
    pub layer2: Vec<BasicBlock>,
    /// Stage 3: 64 channels at quarter resolution.
    pub layer3: Vec<BasicBlock>,
    /// The classifier (FP32 under the paper's policy).
    pub fc: Linear,
}

impl ResNetCifar {
    /// A network with `n` blocks per stage for `classes` classes.
    pub fn new(name: &str, n: usize, classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let mut b = Builder { policy, seed, count: 0 };
        let conv1 = b.conv("conv1", 3, 16, 3, 1, true)?;
        let stage = |b: &mut Builder, idx: usize, inp: usize, out: usize, stride: usize| -> Result<Vec<BasicBlock>> {
            (0..n)
                .map(|i| {
                    let (cin, s) = if i == 0 { (inp, stride) } else { (out, 1) };
                    BasicBlock::new(b, &format!("layer{idx}.{i}"), cin, out, s)
                })
                .collect()
        };
        let layer1 = stage(&mut b, 1, 16, 16, 1)?;
        let layer2 = stage(&mut b, 2, 16, 32, 2)?;
        let layer3 = stage(&mut b, 3, 32, 64, 2)?;
        let (w, bias) = init::linear(classes, 64, seed.wrapping_mul(1000).wrapping_add(999))?;
        let fc = Linear::new("fc", w, bias, policy.precision_for("fc", LayerKind::Linear { last: true }))?;
        Ok(Self { name: name.to_string(), conv1, bn1: BatchNorm2d::new("bn1", 16, true)?, layer1, layer2, layer3, fc })
    }

    fn blocks(&self) -> impl Iterator<Item = &BasicBlock> {
        self.layer1.iter().chain(&self.layer2).chain(&self.layer3)
    }
}

impl Module for ResNetCifar {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        self.layer1.visit(f);
        self.layer2.visit(f);
        self.layer3.visit(f);
        self.fc.visit(f);
    }
}

impl Model for ResNetCifar {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.bn1.forward(&self.conv1.forward(x)?)?;
        for block in self.blocks() {
            h = block.forward(&h)?;
        }
        Ok(self.fc.forward(&global_avg_pool(&h)?)?)
    }
}
