//! The fully connected layer: weight, bias, precision and (for INT8) its DSGC state.

use std::sync::{Arc, Mutex};

use candle_core::{Tensor, Var};
use int8_core::dsgc::ClipMode;
use int8_core::gemm::Int8Path;

use crate::error::{NnError, Result};
use crate::ops::linear::LinearOp;
use crate::precision::Precision;
use crate::stats::{LayerState, LayerStats, QuantSnapshot};

/// `y = x w^T + b` over `batch x in` inputs.
#[derive(Debug)]
pub struct Linear {
    name: String,
    weight: Var,
    bias: Var,
    precision: Precision,
    state: Arc<Mutex<LayerState>>,
    path: Int8Path,
}

impl Linear {
    /// A layer with weight `out x in` and bias `out`.
    pub fn new(name: impl Into<String>, weight: Var, bias: Var, precision: Precision) -> Result<Self> {
        let name = name.into();
        match (weight.dims(), bias.dims()) {
            (&[o, _], &[bo]) if o == bo => {}
            (w, b) => {
                return Err(NnError::BadInput {
                    layer: name,
                    why: format!("weight {w:?} and bias {b:?} must be out x in and out"),
                });
            }
        }
        let clip = match precision {
            Precision::Int8(cfg) => cfg.clip,
            Precision::Fp32 => ClipMode::default(),
        };
        Ok(Self {
            name,
            weight,
            bias,
            precision,
            state: Arc::new(Mutex::new(LayerState::new(clip))),
            path: Int8Path::detect(),
        })
    }

    /// Applies the layer to `x` (`batch x in`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let op = LinearOp::new(self.name.clone(), self.precision, self.state.clone(), self.path);
        Ok(x.contiguous()?.apply_op3(self.weight.as_tensor(), self.bias.as_tensor(), op)?)
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight variable.
    pub fn weight(&self) -> &Var {
        &self.weight
    }

    /// The bias variable.
    pub fn bias(&self) -> &Var {
        &self.bias
    }

    /// The layer's precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The last step's statistics.
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
}
