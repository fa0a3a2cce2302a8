//! The conv layer: a named weight, a geometry, a precision and, for INT8, the layer's DSGC state
//! and statistics.

use std::sync::{Arc, Mutex};

use candle_core::{Tensor, Var};
use int8_core::dsgc::ClipMode;
use int8_core::gemm::Int8Path;

use crate::error::{NnError, Result};
use crate::ops::conv::Conv2dOp;
pub use crate::ops::conv::ConvGeometry;
use crate::precision::Precision;
use crate::stats::{LayerState, LayerStats, QuantSnapshot};

/// A 2-D convolution layer (no bias: the networks here follow each conv with batch norm).
#[derive(Debug)]
pub struct Conv2d {
    name: String,
    weight: Var,
    bias: Option<Var>,
    geometry: ConvGeometry,
    precision: Precision,
    state: Arc<Mutex<LayerState>>,
    path: Int8Path,
}

impl Conv2d {
    /// A layer named `name` (used in errors and logs) with weight `weight` (`out x in/groups x kh
    /// x kw`).
    pub fn new(name: impl Into<String>, weight: Var, geometry: ConvGeometry, precision: Precision) -> Result<Self> {
        let name = name.into();
        if weight.dims().len() != 4 {
            return Err(NnError::BadInput {
                layer: name,
                why: format!("the weight must be 4-D (OIHW), got {:?}", weight.dims()),
            });
        }
        let clip = match precision {
            Precision::Int8(cfg) => cfg.clip,
            Precision::Fp32 => ClipMode::default(),
        };
        Ok(Self {
            name,
            weight,
            bias: None,
            geometry,
            precision,
            state: Arc::new(Mutex::new(LayerState::new(clip))),
            path: Int8Path::detect(),
        })
    }

    /// Adds a bias (one per output channel), kept in FP32 and added after the convolution.
    pub fn with_bias(mut self, bias: Var) -> Result<Self> {
        if bias.dims() != [self.weight.dims()[0]] {
            return Err(NnError::BadInput {
                layer: self.name,
                why: format!("the bias must have one value per output channel, got {:?}", bias.dims()),
            });
        }
        self.bias = Some(bias);
        Ok(self)
    }

    /// Applies the layer to `x` (`n x c x h x w`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let op = Conv2dOp::new(self.name.clone(), self.geometry, self.precision, self.state.clone(), self.path);
        let y = x.contiguous()?.apply_op2(self.weight.as_tensor(), op)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => Ok(y.broadcast_add(&b.as_tensor().reshape((1, b.dims()[0], 1, 1))?)?),
        }
    }

    /// The bias variable, if the layer has one.
    pub fn bias(&self) -> Option<&Var> {
        self.bias.as_ref()
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight variable.
    pub fn weight(&self) -> &Var {
        &self.weight
    }

    /// The layer's precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The last step's statistics (all zero, with `phi = 1`, before the first INT8 step).
    pub fn stats(&self) -> LayerStats {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).stats
    }

    /// The INT8 state a checkpoint keeps.
    pub fn quant_snapshot(&self) -> QuantSnapshot {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).snapshot()
    }

    /// Restores the INT8 state from a checkpoint.
    pub fn restore_quant(&self, snap: QuantSnapshot) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).restore(snap);
    }

    /// Keeps (or stops keeping) a copy of each output gradient, for histograms.
    pub fn keep_grad(&self, keep: bool) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.keep_grad = keep;
        if !keep {
            st.last_grad = None;
        }
    }

    /// The last output gradient, when kept.
    pub fn last_grad(&self) -> Option<Vec<f32>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).last_grad.clone()
    }
}
