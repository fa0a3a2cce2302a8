//! The fully connected layer: weight, bias, precision and, for INT8, its DSGC state.

use int8_core::dsgc::ClipMode;
use int8_core::gemm::Int8Path;

use crate::error::{NnError, Result};
use crate::param::Param;
use crate::precision::Precision;
use crate::stats::QuantState;
use crate::tensor::Tensor;

/// `y = x w^T + b` over `batch x in` inputs.
#[derive(Debug)]
pub struct Linear {
    name: String,
    weight: Param,
    bias: Param,
    precision: Precision,
    quant: QuantState,
    path: Int8Path,
}

impl Linear {
    /// A layer named `name` with initial weight `out x in` and bias `out`.
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Tensor, precision: Precision) -> Result<Self> {
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
            weight: Param::new(format!("{name}.weight"), weight, true),
            bias: Param::new(format!("{name}.bias"), bias, false),
            name,
            precision,
            quant: QuantState::new(clip),
            path: Int8Path::detect(),
        })
    }

    /// Applies the layer to `x` (`batch x in`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::linear::linear(
            &self.name,
            x,
            &self.weight.value(),
            &self.bias.value(),
            self.precision,
            &self.quant,
            self.path,
        )
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight.
    pub fn weight(&self) -> &Param {
        &self.weight
    }

    /// The bias.
    pub fn bias(&self) -> &Param {
        &self.bias
    }

    /// The layer's precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The layer's INT8 state: DSGC clip state, statistics, DCLR multiplier.
    pub fn quant(&self) -> &QuantState {
        &self.quant
    }
}
