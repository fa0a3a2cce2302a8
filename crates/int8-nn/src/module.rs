//! One way for a model to list what it holds: [`Module::visit`] calls back with each layer that
//! has parameters or state, in a fixed order, and everything that walks a model (the optimizer's
//! parameter list, checkpoints, statistics for TensorBoard, switching to evaluation) is written
//! once on top of it. A model writes its `visit` by visiting its fields; blocks, vectors and
//! options of modules are modules too.

use crate::layers::{BatchNorm2d, Conv2d, Dropout, L2Norm, Linear};
use crate::optim::Trainable;
use crate::param::Param;
use crate::precision::Precision;
use crate::stats::{LayerStats, QuantState};

/// A layer with parameters or state, as a visitor sees it.
#[derive(Debug, Clone, Copy)]
pub enum Layer<'a> {
    /// A convolution.
    Conv(&'a Conv2d),
    /// A fully connected layer.
    Linear(&'a Linear),
    /// A batch norm.
    BatchNorm(&'a BatchNorm2d),
    /// A dropout.
    Dropout(&'a Dropout),
    /// An L2 normalisation with a learned scale.
    L2Norm(&'a L2Norm),
}

impl<'a> Layer<'a> {
    /// The layer's name.
    pub fn name(&self) -> &'a str {
        match *self {
            Layer::Conv(l) => l.name(),
            Layer::Linear(l) => l.name(),
            Layer::BatchNorm(l) => l.name(),
            Layer::Dropout(l) => l.name(),
            Layer::L2Norm(l) => l.name(),
        }
    }

    /// The layer's parameters, weight before bias (gamma before beta).
    pub fn params(&self) -> Vec<&'a Param> {
        match *self {
            Layer::Conv(l) => std::iter::once(l.weight()).chain(l.bias()).collect(),
            Layer::Linear(l) => vec![l.weight(), l.bias()],
            Layer::BatchNorm(l) => vec![l.gamma(), l.beta()],
            Layer::Dropout(_) => Vec::new(),
            Layer::L2Norm(l) => vec![l.weight()],
        }
    }

    /// The precision of a conv or linear layer.
    pub fn precision(&self) -> Option<Precision> {
        match *self {
            Layer::Conv(l) => Some(l.precision()),
            Layer::Linear(l) => Some(l.precision()),
            Layer::BatchNorm(_) | Layer::Dropout(_) | Layer::L2Norm(_) => None,
        }
    }

    /// The INT8 state of a conv or linear layer that runs in INT8.
    pub fn int8(&self) -> Option<&'a QuantState> {
        match *self {
            Layer::Conv(l) if matches!(l.precision(), Precision::Int8(_)) => Some(l.quant()),
            Layer::Linear(l) if matches!(l.precision(), Precision::Int8(_)) => Some(l.quant()),
            _ => None,
        }
    }

    /// The quantization state of a conv or linear layer, at either precision (checkpoints keep
    /// it for all of them).
    pub fn quant(&self) -> Option<&'a QuantState> {
        match *self {
            Layer::Conv(l) => Some(l.quant()),
            Layer::Linear(l) => Some(l.quant()),
            Layer::BatchNorm(_) | Layer::Dropout(_) | Layer::L2Norm(_) => None,
        }
    }
}

/// Anything made of layers: a layer, a block, a model.
pub trait Module {
    /// Calls `f` with each layer that has parameters or state, in the same order every time.
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>));

    /// The layers, in visiting order.
    fn layers(&self) -> Vec<Layer<'_>> {
        let mut out = Vec::new();
        self.visit(&mut |l| out.push(l));
        out
    }

    /// The parameters with their learning-rate multipliers: DCLR's `phi` of the last step for
    /// INT8 layers (Zhu et al., CVPR 2020, Sec. 4.2), 1 otherwise.
    fn trainables(&self) -> Vec<Trainable<'_>> {
        let mut out = Vec::new();
        self.visit(&mut |l| {
            let lr_scale = l.int8().map_or(1.0, |q| q.stats().phi);
            out.extend(l.params().into_iter().filter(|p| p.trainable()).map(|param| Trainable { param, lr_scale }));
        });
        out
    }

    /// The number of trainable values (frozen parameters, such as a frozen batch norm's, are not
    /// counted, as torchvision counts its detectors' parameters).
    fn param_count(&self) -> usize {
        self.layers().iter().flat_map(|l| l.params()).filter(|p| p.trainable()).map(Param::elem_count).sum()
    }

    /// Training (batch statistics, dropout) or evaluation (running statistics, no dropout). To
    /// record nothing while evaluating, run the forward pass inside [`crate::no_grad`] as well.
    fn set_training(&self, training: bool) {
        self.visit(&mut |l| match l {
            Layer::BatchNorm(b) => b.set_training(training),
            Layer::Dropout(d) => d.set_training(training),
            Layer::Conv(_) | Layer::Linear(_) | Layer::L2Norm(_) => {}
        });
    }

    /// Moves every parameter (frozen ones too) to `device`; batch norms' running statistics stay
    /// on the host, where checkpoints read them. The optimizer's momentum buffers follow their
    /// parameters at the next step.
    fn to_device(&self, device: &crate::Device) -> crate::Result<()> {
        for p in self.layers().iter().flat_map(|l| l.params()) {
            p.to_device(device)?;
        }
        Ok(())
    }

    /// The last step's statistics of each INT8 layer, by layer name.
    fn int8_stats(&self) -> Vec<(String, LayerStats)> {
        let mut out = Vec::new();
        self.visit(&mut |l| {
            if let Some(q) = l.int8() {
                out.push((l.name().to_string(), q.stats()));
            }
        });
        out
    }
}

// Each layer is a module of one layer.
impl Module for Conv2d {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        f(Layer::Conv(self));
    }
}

impl Module for Linear {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        f(Layer::Linear(self));
    }
}

impl Module for BatchNorm2d {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        f(Layer::BatchNorm(self));
    }
}

impl Module for Dropout {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        f(Layer::Dropout(self));
    }
}

impl Module for L2Norm {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        f(Layer::L2Norm(self));
    }
}

impl<M: Module> Module for Vec<M> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        for m in self {
            m.visit(f);
        }
    }
}

impl<M: Module, const N: usize> Module for [M; N] {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        for m in self {
            m.visit(f);
        }
    }
}

impl<M: Module> Module for Option<M> {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        if let Some(m) = self {
            m.visit(f);
        }
    }
}

impl<A: Module, B: Module> Module for (A, B) {
    fn visit<'a>(&'a self, f: &mut dyn FnMut(Layer<'a>)) {
        self.0.visit(f);
        self.1.visit(f);
    }
}
