//! The conv layer: a named weight (and optional bias), a geometry, a precision and, for INT8, the
//! layer's DSGC state and statistics.

use int8_core::dsgc::ClipMode;
use int8_core::gemm::Int8Path;

use crate::error::{NnError, Result};
use crate::ops::conv::{ConvArgs, ConvGeometry, add_channel_bias, conv2d};
use crate::param::Param;
use crate::precision::Precision;
use crate::stats::QuantState;
use crate::tensor::Tensor;

/// A 2-D convolution layer (without bias unless [`Conv2d::with_bias`]: the networks here follow
/// most convolutions with batch norm).
#[derive(Debug)]
pub struct Conv2d {
    name: String,
    weight: Param,
    bias: Option<Param>,
    geometry: ConvGeometry,
    precision: Precision,
    quant: QuantState,
    path: Int8Path,
}

impl Conv2d {
    /// A layer named `name` (used in errors, logs and the parameter names `<name>.weight`,
    /// `<name>.bias`) with initial weight `weight` (`out x in/groups x kh x kw`).
    pub fn new(name: impl Into<String>, weight: Tensor, geometry: ConvGeometry, precision: Precision) -> Result<Self> {
        let name = name.into();
        if weight.rank() != 4 {
            return Err(NnError::BadInput {
                layer: name,
                why: format!("the weight must be 4-D (OIHW), got {}", weight.shape()),
            });
        }
        let clip = match precision {
            Precision::Int8(cfg) => cfg.clip,
            Precision::Fp32 => ClipMode::default(),
        };
        Ok(Self {
            weight: Param::new(format!("{name}.weight"), weight, true),
            name,
            bias: None,
            geometry,
            precision,
            quant: QuantState::new(clip),
            path: Int8Path::detect(),
        })
    }

    /// Adds a bias (one per output channel), kept in FP32 and added after the convolution.
    pub fn with_bias(mut self, bias: Tensor) -> Result<Self> {
        let out = self.weight.shape().dims()[0];
        if bias.dims() != [out] {
            return Err(NnError::BadInput {
                layer: self.name,
                why: format!("the bias must have one value per output channel ({out}), got {}", bias.shape()),
            });
        }
        self.bias = Some(Param::new(format!("{}.bias", self.name), bias, false));
        Ok(self)
    }

    /// Applies the layer to `x` (`n x c x h x w`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let args = ConvArgs {
            name: &self.name,
            geometry: self.geometry,
            precision: self.precision,
            quant: &self.quant,
            path: self.path,
        };
        let y = conv2d(x, &self.weight.value(), args)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => add_channel_bias(&y, &b.value()),
        }
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight.
    pub fn weight(&self) -> &Param {
        &self.weight
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<&Param> {
        self.bias.as_ref()
    }

    /// The geometry.
    pub fn geometry(&self) -> ConvGeometry {
        self.geometry
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
