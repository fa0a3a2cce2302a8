//! Tensors on NVIDIA GPUs (the `cuda` feature): the device buffer behind [`Storage::Cuda`], one
//! [`Gpu`] context per ordinal shared by every tensor on it, copies between devices with their
//! gradient, and the helpers the ops' GPU paths share (where an op's operands live, new outputs).
//!
//! The ops keep their CPU path as it is and, when their operands are on a GPU, run `int8-core`'s
//! CUDA kernels (`int8_core::cuda`), which compute the CPU's numbers (bit for bit where the
//! kernels are exact, see that module). Every call of one GPU runs in order on its one stream, so
//! an op never waits for the ones before it except where the host needs a result (a scale, a clip
//! value, the loss).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use int8_core::cuda::{CudaSlice, Gpu};

use crate::error::{NnError, Result};
use crate::tape::{Backward, record};
pub use crate::tensor::CudaBuf;
use crate::tensor::{Device, Shape, Storage, Tensor};

/// GPU `ordinal`, opened once per process: every tensor on it shares its context and stream.
pub fn gpu(ordinal: usize) -> Result<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let mut gpus = GPUS.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(g) = gpus.get(&ordinal) {
        return Ok(g.clone());
    }
    let g = Arc::new(Gpu::new(ordinal)?);
    gpus.insert(ordinal, g.clone());
    Ok(g)
}

/// A GPU that an op runs on: its context and ordinal (for the tensors it makes).
#[derive(Clone)]
pub(crate) struct On {
    gpu: Arc<Gpu>,
    ordinal: usize,
}

impl std::ops::Deref for On {
    type Target = Gpu;

    fn deref(&self) -> &Gpu {
        &self.gpu
    }
}

impl On {
    /// An untracked tensor of `shape` holding `data` on this GPU.
    pub(crate) fn out(&self, data: CudaSlice<f32>, shape: impl Into<Shape>) -> Tensor {
        let buf = CudaBuf { data, gpu: self.gpu.clone(), ordinal: self.ordinal };
        Tensor::from_storage(Storage::Cuda(buf), shape.into())
    }

    /// The GPU a tensor is on, `None` for a CPU tensor.
    pub(crate) fn of(t: &Tensor) -> Option<On> {
        match t.storage() {
            Storage::Cpu(_) => None,
            Storage::Cuda(b) => Some(On { gpu: b.gpu.clone(), ordinal: b.ordinal }),
        }
    }
}

/// Where an op's operands are: all on the CPU (`None`), all on one GPU (`Some`), or an error
/// naming the op and the devices when they are spread over several.
pub(crate) fn placement(op: &str, tensors: &[&Tensor]) -> Result<Option<On>> {
    let Some(first) = tensors.first() else { return Ok(None) };
    let device = first.device();
    if let Some(other) = tensors.iter().map(|t| t.device()).find(|&d| d != device) {
        return Err(NnError::MixedDevices { op: op.to_string(), devices: format!("{device} and {other}") });
    }
    Ok(On::of(first))
}

/// The device buffer of a tensor that [`placement`] put on a GPU.
pub(crate) fn dev(t: &Tensor) -> Result<&CudaSlice<f32>> {
    match t.storage() {
        Storage::Cuda(b) => Ok(&b.data),
        Storage::Cpu(_) => Err(NnError::Graph(format!(
            "a cpu tensor of shape {} reached a gpu kernel; this is a bug in int8-nn, please report it",
            t.shape()
        ))),
    }
}

/// A zeroed buffer of `n` values on `gpu`.
pub(crate) fn zeros(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    Ok(gpu.zeros::<f32>(n)?)
}

impl On {
    /// `t` on this GPU: itself when it is here, else a copy (a gradient that starts on the host,
    /// as the tape's seed of 1 does).
    pub(crate) fn bring(&self, t: &Tensor) -> Result<Tensor> {
        match t.storage() {
            Storage::Cuda(b) if b.ordinal == self.ordinal => Ok(t.clone()),
            _ => Ok(self.out(self.upload(&t.try_to_vec()?)?, t.shape().clone())),
        }
    }
}

/// The fraction of a quantized tensor's values that were clipped (`QTensor::saturation_rate`).
pub(crate) fn saturation_rate(q: &int8_core::cuda::GpuQTensor) -> f32 {
    if q.codes.is_empty() { 0.0 } else { q.saturated as f32 / q.codes.len() as f32 }
}

/// `t` copied to `device` (neither its own device; see [`Tensor::to_device`]).
impl Tensor {
    /// A copy of the values on `device`, recorded on the tape when this tensor is tracked (the
    /// gradient is copied back), or this tensor itself when it is there already.
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device() == *device {
            return Ok(self.clone());
        }
        to_device(self, *device)
    }
}

pub(crate) fn to_device(t: &Tensor, device: Device) -> Result<Tensor> {
    let _s = crate::profile::span("to-device", false);
    let from = t.device();
    let y = copy(t, device)?;
    Ok(match record(&[t]) {
        None => y,
        Some(r) => r.output("to-device", y, CopyBack { to: from }),
    })
}

/// An untracked copy of `t`'s values on `device`.
fn copy(t: &Tensor, device: Device) -> Result<Tensor> {
    match device {
        Device::Cpu => Ok(Tensor::from_vec(t.try_to_vec()?, t.shape().clone())?),
        Device::Cuda(n) => {
            let on = On { gpu: gpu(n)?, ordinal: n };
            let data = match t.storage() {
                Storage::Cpu(_) => on.upload(t.cpu()?)?,
                // Between two GPUs through the host: simple, and rare enough.
                Storage::Cuda(_) => on.upload(&t.try_to_vec()?)?,
            };
            Ok(on.out(data, t.shape().clone()))
        }
    }
}

/// The backward pass of a copy: the gradient copied back to the source's device.
struct CopyBack {
    to: Device,
}

impl Backward for CopyBack {
    fn backward(self: Box<Self>, grad: Tensor, _needs: &[bool]) -> Result<Vec<Option<Tensor>>> {
        Ok(vec![Some(if grad.device() == self.to { grad } else { copy(&grad, self.to)? })])
    }
}
