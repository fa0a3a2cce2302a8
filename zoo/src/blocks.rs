//! Building blocks shared by the zoo's residual networks: the convolution builder (names,
//! policy precisions, seeds) and the basic and bottleneck residual blocks (He et al., CVPR 2016).

use int8_nn::layers::{BatchNorm2d, Conv2d};
use int8_nn::ops::add_relu;
use int8_nn::policy::{LayerKind, LayerPolicy};
use int8_nn::{ConvGeometry, Layer, Module, Tensor};

use crate::{Result, init};

/// Builds convolutions with names, precisions from the policy and seeds of their own.
pub(crate) struct Builder<'a> {
    pub policy: &'a LayerPolicy,
    pub seed: u64,
    pub count: u64,
}

impl Builder<'_> {
    /// A `k x k` convolution with "same" padding, named, with its policy precision and own seed.
    pub(crate) fn conv(
        &mut self,
        name: &str,
        inp: usize,
        out: usize,
        k: usize,
        stride: usize,
        first: bool,
    ) -> Result<Conv2d> {
        self.conv_rect(name, inp, out, (k, k), stride, (k / 2, k / 2), first)
    }

    /// A `kh x kw` convolution with explicit padding, named, with its policy precision and own
    /// seed.
    pub(crate) fn conv_rect(
        &mut self,
        name: &str,
        inp: usize,
        out: usize,
        k: (usize, usize),
        stride: usize,
        padding: (usize, usize),
        first: bool,
    ) -> Result<Conv2d> {
        let w = init::conv_weight_rect(out, inp, k, self.next_seed())?;
        let g = ConvGeometry { stride, padding, ..Default::default() };
        Ok(Conv2d::new(name, w, g, self.policy.precision_for(name, LayerKind::Conv { first }))?)
    }

    /// A fresh seed for the next layer: each layer built draws its own.
    pub(crate) fn next_seed(&mut self) -> u64 {
        self.count += 1;
        self.seed.wrapping_mul(1000).wrapping_add(self.count)
    }
}

/// A basic block: two 3x3 convolutions with batch norm, and a shortcut.
#[derive(Debug)]
pub struct BasicBlock {
    /// First 3x3 convolution (carries the block's stride).
    pub conv1: Conv2d,
    /// Batch norm with the ReLU fused.
    pub bn1: BatchNorm2d,
    /// Second 3x3 convolution.
    pub conv2: Conv2d,
    /// Batch norm before the residual add.
    pub bn2: BatchNorm2d,
    /// Projection shortcut (1x1 convolution and batch norm) where the shape changes.
    pub shortcut: Option<(Conv2d, BatchNorm2d)>,
}

impl BasicBlock {
    pub(crate) fn new(b: &mut Builder, name: &str, inp: usize, out: usize, stride: usize) -> Result<Self> {
        let shortcut = projection(b, name, inp, out, stride)?;
        Ok(Self {
            conv1: b.conv(&format!("{name}.conv1"), inp, out, 3, stride, false)?,
            bn1: BatchNorm2d::new(format!("{name}.bn1"), out, true)?,
            conv2: b.conv(&format!("{name}.conv2"), out, out, 3, 1, false)?,
            bn2: BatchNorm2d::new(format!("{name}.bn2"), out, false)?,
            shortcut,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.bn1.forward(&self.conv1.forward(x)?)?;
        let h = self.bn2.forward(&self.conv2.forward(&h)?)?;
        let s = shortcut_forward(&self.shortcut, x)?;
        Ok(add_relu(&h, &s)?)
    }
}

impl Module for BasicBlock {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        self.conv2.visit(f);
        self.bn2.visit(f);
        self.shortcut.visit(f);
    }
}

/// The projection shortcut of a block from `inp` to `out` channels at `stride`: a 1x1
/// convolution with batch norm where the shape changes, none (identity) where it does not.
fn projection(
    b: &mut Builder,
    name: &str,
    inp: usize,
    out: usize,
    stride: usize,
) -> Result<Option<(Conv2d, BatchNorm2d)>> {
    if stride == 1 && inp == out {
        return Ok(None);
    }
    let conv = b.conv(&format!("{name}.shortcut.conv"), inp, out, 1, stride, false)?;
    Ok(Some((conv, BatchNorm2d::new(format!("{name}.shortcut.bn"), out, false)?)))
}

/// A block's shortcut applied to its input.
fn shortcut_forward(shortcut: &Option<(Conv2d, BatchNorm2d)>, x: &Tensor) -> Result<Tensor> {
    Ok(match shortcut {
        Some((conv, bn)) => bn.forward(&conv.forward(x)?)?,
        None => x.clone(),
    })
}

/// A bottleneck block (ResNet-50 and deeper): 1x1 reduce, 3x3 (carrying the stride), 1x1 expand
/// by 4, each with batch norm, and a shortcut.
#[derive(Debug)]
pub struct Bottleneck {
    /// 1x1 reduction.
    pub conv1: Conv2d,
    /// Batch norm with the ReLU fused.
    pub bn1: BatchNorm2d,
    /// 3x3 convolution.
    pub conv2: Conv2d,
    /// Batch norm with the ReLU fused.
    pub bn2: BatchNorm2d,
    /// 1x1 expansion.
    pub conv3: Conv2d,
    /// Batch norm before the residual add.
    pub bn3: BatchNorm2d,
    /// Projection shortcut where the shape changes.
    pub shortcut: Option<(Conv2d, BatchNorm2d)>,
}

impl Bottleneck {
    pub(crate) fn new(b: &mut Builder, name: &str, inp: usize, planes: usize, stride: usize) -> Result<Self> {
        let out = planes * 4;
        let shortcut = projection(b, name, inp, out, stride)?;
        Ok(Self {
            conv1: b.conv(&format!("{name}.conv1"), inp, planes, 1, 1, false)?,
            bn1: BatchNorm2d::new(format!("{name}.bn1"), planes, true)?,
            conv2: b.conv(&format!("{name}.conv2"), planes, planes, 3, stride, false)?,
            bn2: BatchNorm2d::new(format!("{name}.bn2"), planes, true)?,
            conv3: b.conv(&format!("{name}.conv3"), planes, out, 1, 1, false)?,
            bn3: BatchNorm2d::new(format!("{name}.bn3"), out, false)?,
            shortcut,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.bn1.forward(&self.conv1.forward(x)?)?;
        let h = self.bn2.forward(&self.conv2.forward(&h)?)?;
        let h = self.bn3.forward(&self.conv3.forward(&h)?)?;
        let s = shortcut_forward(&self.shortcut, x)?;
        Ok(add_relu(&h, &s)?)
    }
}

impl Module for Bottleneck {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.conv1.visit(f);
        self.bn1.visit(f);
        self.conv2.visit(f);
        self.bn2.visit(f);
        self.conv3.visit(f);
        self.bn3.visit(f);
        self.shortcut.visit(f);
    }
}
