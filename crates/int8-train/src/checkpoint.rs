//! Checkpoints: one safetensors file holding the model's parameters, batch-norm running
//! statistics and SGD momentum buffers as tensors, and the trainer's state (progress, metrics
//! so far, each INT8 layer's DSGC clip state and step count) as JSON in the header's metadata.
//! Files are written atomically, so a killed run always leaves a whole checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use int8_core::dsgc::ClipSnapshot;
use int8_nn::layers::RunningStats;
use int8_nn::optim::Sgd;
use int8_nn::stats::QuantSnapshot;
use int8_nn::{Layer, Module};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};

use crate::task::Net;
use crate::{Result, TrainError, write_atomic};

/// The metadata key holding the trainer's state.
const STATE_KEY: &str = "int8-train.state";
/// The prefix of momentum-buffer tensors.
const MOMENTUM: &str = "optim.momentum.";

/// One epoch's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// The epoch (from 1).
    pub epoch: usize,
    /// Learning rate at the epoch's end.
    pub lr: f64,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Training top-1 accuracy (%) over the epoch, on augmented images (classification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_top1: Option<f64>,
    /// Mean of each detection loss term over the epoch.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub train_terms: BTreeMap<String, f64>,
    /// Test loss, when evaluated (classification).
    pub test_loss: Option<f64>,
    /// Test top-1 accuracy (%), when evaluated.
    pub test_top1: Option<f64>,
    /// Test top-5 accuracy (%), when evaluated.
    pub test_top5: Option<f64>,
    /// Test mAP@0.5 (%, VOC all-point), when evaluated (detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_map50: Option<f64>,
    /// Test mAP@[.5:.95] (%, COCO), when evaluated (detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_map: Option<f64>,
    /// Training throughput over the epoch (images per second, data wait included).
    pub images_per_s: f64,
}

/// A layer's INT8 state, as saved.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuantRecord {
    /// Backward passes seen.
    pub steps: u64,
    /// Gradients the clip state has seen.
    pub calls: u64,
    /// The clip value in force.
    pub clip: Option<f32>,
    /// The cosine distance measured right after the last DSGC search (checkpoints written before
    /// it was kept have none: a stale clip value is then first noticed after the next search).
    #[serde(default)]
    pub reference: Option<f64>,
    /// DSGC searches run so far.
    #[serde(default)]
    pub searches: u64,
}

impl From<QuantSnapshot> for QuantRecord {
    fn from(s: QuantSnapshot) -> Self {
        let c = s.clip;
        Self { steps: s.steps, calls: c.calls, clip: c.clip, reference: c.reference, searches: c.searches }
    }
}

impl From<QuantRecord> for QuantSnapshot {
    fn from(q: QuantRecord) -> Self {
        let clip = ClipSnapshot { calls: q.calls, clip: q.clip, reference: q.reference, searches: q.searches };
        Self { steps: q.steps, clip }
    }
}

/// Where a run stands.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Whole epochs finished.
    pub epochs_done: usize,
    /// Batches finished inside the current epoch.
    pub step_in_epoch: usize,
    /// Training steps finished.
    pub global_step: u64,
    /// The best test headline metric so far: top-1 or mAP@0.5 (%).
    #[serde(alias = "best_top1")]
    pub best: f64,
    /// Seconds spent training (not evaluating), over every session of the run.
    pub train_seconds: f64,
    /// Seconds of compute in timed steps (forward, backward, update), for the mean step time.
    pub step_seconds: f64,
    /// Steps timed.
    pub steps_timed: u64,
    /// Loss summed over the current epoch's finished batches (weighted by batch size).
    pub epoch_loss_sum: f64,
    /// Correct predictions in the current epoch so far.
    pub epoch_hits: u64,
    /// Images seen in the current epoch so far.
    pub epoch_seen: u64,
    /// Each detection loss term summed over the current epoch's batches (weighted by batch size).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epoch_terms: BTreeMap<String, f64>,
    /// Seconds of the current epoch so far.
    pub epoch_seconds: f64,
    /// Metrics of finished epochs.
    pub history: Vec<EpochRecord>,
    /// INT8 layers' states, by layer name.
    pub quant: BTreeMap<String, QuantRecord>,
    /// Dropout layers' mask counts, by layer name.
    #[serde(default)]
    pub dropout: BTreeMap<String, u64>,
    /// The resolved recipe the run was started with.
    pub recipe: String,
}

/// Writes a checkpoint of `model`, `sgd` and `state` to `path`, atomically.
pub fn save(path: &Path, model: &dyn Module, sgd: &Sgd, state: &TrainState) -> Result<()> {
    let mut named: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut state = state.clone();
    state.quant.clear();
    state.dropout.clear();
    for layer in model.layers() {
        for p in layer.params() {
            named.push((p.name().to_string(), p.shape().dims().to_vec(), p.to_vec()));
        }
        if let Some(q) = layer.quant() {
            state.quant.insert(layer.name().to_string(), QuantRecord::from(q.snapshot()));
        }
        match layer {
            Layer::BatchNorm(bn) => {
                let r = bn.running();
                named.push((format!("{}.running_mean", bn.name()), vec![r.mean.len()], r.mean));
                named.push((format!("{}.running_var", bn.name()), vec![r.var.len()], r.var));
            }
            Layer::Dropout(d) => {
                state.dropout.insert(d.name().to_string(), d.calls());
            }
            Layer::Conv(_) | Layer::Linear(_) | Layer::L2Norm(_) => {}
        }
    }
    for (name, buf) in sgd.buffers() {
        named.push((format!("{MOMENTUM}{name}"), vec![buf.elem_count()], buf.to_vec()));
    }
    let bytes: Vec<Vec<u8>> = named.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views = named
        .iter()
        .zip(&bytes)
        .map(|((n, shape, _), b)| Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| TrainError::Checkpoint { path: path.into(), why: format!("cannot lay out the tensors: {e}") })?;
    let json = serde_json::to_string(&state).map_err(|e| TrainError::Checkpoint {
        path: path.into(),
        why: format!("cannot write the trainer state: {e}"),
    })?;
    let meta = HashMap::from([(STATE_KEY.to_string(), json)]);
    let data = safetensors::serialize(views, Some(meta))
        .map_err(|e| TrainError::Checkpoint { path: path.into(), why: format!("cannot serialise: {e}") })?;
    write_atomic(path, &data)
}

/// A checkpoint read back.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Tensors by name: shape and values.
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    /// The trainer's state, when the file has one (a checkpoint of this trainer).
    pub state: Option<TrainState>,
}

/// Reads a checkpoint; a file that is not safetensors, or holds other than f32 tensors, is an
/// error naming it.
pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(TrainError::io(path))?;
    let bad = |why: String| TrainError::Checkpoint { path: path.into(), why };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("is not a safetensors file ({e})")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("is not a safetensors file ({e})")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!("tensor `{name}` is {:?}; the trainer reads f32 checkpoints", view.dtype())));
        }
        let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    let state = match meta.metadata().as_ref().and_then(|m| m.get(STATE_KEY)) {
        None => None,
        Some(json) => {
            Some(serde_json::from_str(json).map_err(|e| bad(format!("its trainer state cannot be read ({e})")))?)
        }
    };
    Ok(Loaded { tensors, state })
}

/// Sets `model`'s parameters and batch-norm running statistics from `ck`. Every parameter must
/// be present with its shape; the error names the first that is not.
pub fn restore_weights(model: &Net, ck: &Loaded, path: &Path) -> Result<()> {
    let bad = |why: String| TrainError::Checkpoint { path: path.into(), why };
    let get = |name: &str, dims: &[usize]| -> Result<&Vec<f32>> {
        let (shape, values) = ck.tensors.get(name).ok_or_else(|| {
            bad(format!("has no tensor `{name}`; was it written for another model ({})?", model.name()))
        })?;
        if shape != dims {
            return Err(bad(format!("tensor `{name}` has shape {shape:?}, the model needs {dims:?}")));
        }
        Ok(values)
    };
    for layer in model.layers() {
        for p in layer.params() {
            let values = get(p.name(), p.shape().dims())?;
            p.set_values(values.clone())?;
        }
        if let Layer::BatchNorm(bn) = layer {
            let c = bn.running().mean.len();
            let mean = get(&format!("{}.running_mean", bn.name()), &[c])?.clone();
            let var = get(&format!("{}.running_var", bn.name()), &[c])?.clone();
            bn.set_running(RunningStats { mean, var });
        }
    }
    Ok(())
}

/// Restores everything a resumed run needs: weights, momentum buffers and INT8 layer states.
pub fn restore_all(model: &Net, sgd: &mut Sgd, ck: &Loaded, path: &Path) -> Result<TrainState> {
    let state = ck.state.clone().ok_or_else(|| TrainError::Checkpoint {
        path: path.into(),
        why: "has no trainer state, so it cannot resume a run; use it as train.init instead".into(),
    })?;
    restore_weights(model, ck, path)?;
    let buffers = ck
        .tensors
        .iter()
        .filter_map(|(n, (_, v))| n.strip_prefix(MOMENTUM).map(|p| (p.to_string(), v.clone())))
        .collect();
    sgd.set_buffers(buffers);
    for layer in model.layers() {
        if let (Some(q), Some(rec)) = (layer.quant(), state.quant.get(layer.name())) {
            q.restore((*rec).into());
        }
        if let (Layer::Dropout(d), Some(&calls)) = (layer, state.dropout.get(layer.name())) {
            d.set_calls(calls);
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layer_state_saved_before_the_staleness_test_still_loads() {
        let old: QuantRecord = serde_json::from_str(r#"{"steps": 7, "calls": 7, "clip": 0.5}"#).unwrap();
        let snap = QuantSnapshot::from(old);
        assert_eq!(snap.clip, ClipSnapshot { calls: 7, clip: Some(0.5), reference: None, searches: 0 });
        let new = QuantRecord::from(QuantSnapshot {
            steps: 9,
            clip: ClipSnapshot { calls: 9, clip: Some(0.25), reference: Some(1e-3), searches: 2 },
        });
        let back: QuantRecord = serde_json::from_str(&serde_json::to_string(&new).unwrap()).unwrap();
        assert_eq!(back, new);
    }
}
