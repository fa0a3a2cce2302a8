//! ResNets for ImageNet (He et al., CVPR 2016) as torchvision builds them: a 7x7 stride-2 stem of
//! 64 channels with 3x3 stride-2 max pooling, four stages at 64, 128, 256 and 512 channels
//! (stride 2 entering the last three; in bottleneck blocks on the 3x3 convolution), global
//! average pooling and a linear classifier. ResNet-18 and -34 use basic blocks, ResNet-50
//! bottlenecks; with 1000 classes they have torchvision's 11,689,512, 21,797,672 and 25,557,032
//! parameters.

use int8_nn::layers::{BatchNorm2d, Conv2d, Linear};
use int8_nn::ops::{global_avg_pool, max_pool2d};
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{Layer, Module, Tensor};

use crate::blocks::{BasicBlock, Bottleneck, Builder};
use crate::{Model, Result, ZooError, init};

/// A residual block of either kind.
#[derive(Debug)]
pub enum Block {
    /// Two 3x3 convolutions.
    Basic(Box<BasicBlock>),
    /// 1x1, 3x3, 1x1 with expansion 4.
    Bottleneck(Box<Bottleneck>),
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Block::Basic(b) => b.forward(x),
            Block::Bottleneck(b) => b.forward(x),
        }
    }
}

impl Module for Block {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        match self {
            Block::Basic(b) => b.visit(f),
            Block::Bottleneck(b) => b.visit(f),
        }
    }
}

/// An ImageNet ResNet.
#[derive(Debug)]
pub struct ResNet {
    name: String,
    /// The 7x7 stride-2 stem (FP32 under the paper's policy).
    pub conv1: Conv2d,
    /// The stem's batch norm with the ReLU fused.
    pub bn1: BatchNorm2d,
    /// The four stages.
    pub layers: [Vec<Block>; 4],
    /// The classifier (FP32 under the paper's policy).
    pub fc: Linear,
}

impl ResNet {
    /// ResNet-`depth` (18, 34 or 50) for `classes` classes.
    pub fn new(name: &str, depth: usize, classes: usize, policy: &LayerPolicy, seed: u64) -> Result<Self> {
        let (bottleneck, counts) = match depth {
            18 => (false, [2, 2, 2, 2]),
            34 => (false, [3, 4, 6, 3]),
            50 => (true, [3, 4, 6, 3]),
            _ => return Err(ZooError::UnknownModel(name.to_string())),
        };
        let mut b = Builder { policy, seed, count: 0 };
        let conv1 = b.conv("conv1", 3, 64, 7, 2, true)?;
        let expansion = if bottleneck { 4 } else { 1 };
        let mut inp = 64;
        let mut stage = |idx: usize, planes: usize, n: usize, stride: usize| -> Result<Vec<Block>> {
            (0..n)
                .map(|i| {
                    let (name, s) = (format!("layer{idx}.{i}"), if i == 0 { stride } else { 1 });
                    let block = if bottleneck {
                        Block::Bottleneck(Box::new(Bottleneck::new(&mut b, &name, inp, planes, s)?))
                    } else {
                        Block::Basic(Box::new(BasicBlock::new(&mut b, &name, inp, planes, s)?))
                    };
                    inp = planes * expansion;
                    Ok(block)
                })
                .collect()
        };
        let layers = [
            stage(1, 64, counts[0], 1)?,
            stage(2, 128, counts[1], 2)?,
            stage(3, 256, counts[2], 2)?,
            stage(4, 512, counts[3], 2)?,
        ];
        let (w, bias) = init::linear(classes, 512 * expansion, seed.wrapping_mul(1000).wrapping_add(999))?;
        let fc = Linear::new("fc", w, bias, policy.precision_for("fc", LayerKind::Linear { last: true }))?;
        Ok(Self { name: name.to_string(), conv1, bn1: BatchNorm2d::new("bn1", 64, true)?, layers, fc })
    }

    fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.layers.iter().flatten()
    }
}

impl Module for ResNet {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        for stage in &self.layers {
            stage.visit(f);
        }
        self.fc.visit(f);
    }
}

impl Model for ResNet {
    fn name(&self) -> &str {
        &self.name
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = max_pool2d(&self.bn1.forward(&self.conv1.forward(x)?)?, 3, 2, 1)?;
        for block in self.blocks() {
            h = block.forward(&h)?;
        }
        Ok(self.fc.forward(&global_avg_pool(&h)?)?)
    }
}
