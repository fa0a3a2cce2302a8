//! What every model reports about its layers: parameters with their decay flags and DCLR
//! multipliers, and the statistics of its INT8 layers.

use int8_nn::conv::Conv2d;
use int8_nn::layers::BatchNorm2d;
use int8_nn::linear::Linear;
use int8_nn::precision::Precision;
use int8_nn::stats::LayerStats;

use crate::Param;

/// DCLR's multiplier for a layer: its `phi` when INT8, 1 when FP32.
fn lr_scale(precision: Precision, stats: LayerStats) -> f64 {
    if matches!(precision, Precision::Int8(_)) { stats.phi } else { 1.0 }
}

/// The parameters of a model made of these layers, in this order.
pub(crate) fn params(convs: &[&Conv2d], bns: &[&BatchNorm2d], linears: &[&Linear]) -> Vec<Param> {
    let mut out = Vec::new();
    for c in convs {
        let scale = lr_scale(c.precision(), c.stats());
        out.push(Param { name: format!("{}.weight", c.name()), var: c.weight().clone(), decay: true, lr_scale: scale });
        if let Some(b) = c.bias() {
            out.push(Param { name: format!("{}.bias", c.name()), var: b.clone(), decay: false, lr_scale: scale });
        }
    }
    for bn in bns {
        out.push(Param { name: format!("{}.gamma", bn.name()), var: bn.gamma().clone(), decay: false, lr_scale: 1.0 });
        out.push(Param { name: format!("{}.beta", bn.name()), var: bn.beta().clone(), decay: false, lr_scale: 1.0 });
    }
    for fc in linears {
        let scale = lr_scale(fc.precision(), fc.stats());
        out.push(Param {
            name: format!("{}.weight", fc.name()),
            var: fc.weight().clone(),
            decay: true,
            lr_scale: scale,
        });
        out.push(Param { name: format!("{}.bias", fc.name()), var: fc.bias().clone(), decay: false, lr_scale: scale });
    }
    out
}

/// The statistics of the INT8 layers among these, by layer name.
pub(crate) fn int8_stats(convs: &[&Conv2d], linears: &[&Linear]) -> Vec<(String, LayerStats)> {
    let convs = convs.iter().filter(|c| matches!(c.precision(), Precision::Int8(_))).map(|c| (c.name(), c.stats()));
    let fcs = linears.iter().filter(|f| matches!(f.precision(), Precision::Int8(_))).map(|f| (f.name(), f.stats()));
    convs.chain(fcs).map(|(n, s)| (n.to_string(), s)).collect()
}
