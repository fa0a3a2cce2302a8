//! The tensor: a shape, its values on a device, and its place in the autograd graph (a leaf, or
//! the node of the op that made it). The node types live here with the tensor because each holds
//! the other (a node's backward object takes and returns tensors); recording ops and running the
//! graph backwards is [`crate::tape`]'s.
//!
//! A [`Tensor`] is an immutable value behind an `Arc`: cloning one, saving it for a backward pass
//! or reshaping it shares its storage. Its values live in a [`Storage`], an enum of devices (the
//! CPU, and with the `cuda` feature NVIDIA GPUs); ops dispatch on it, so code above `int8-nn`
//! never touches raw memory and does not change when a device is added. [`Tensor::to_device`]
//! copies a tensor between devices, its gradient flowing back across the copy. Values are `f32`: INT8 codes exist only inside the ops that make
//! and consume them (`int8_core::quant::QTensor`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use int8_core::quant::QTensor;

use int8_core::rng::CounterRng;

use crate::error::{NnError, Result};
use crate::memory;

/// Where a tensor's values live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// Host memory, computed by `int8-core`'s CPU kernels.
    Cpu,
    /// NVIDIA GPU number `N` (its CUDA ordinal), computed by `int8-core`'s CUDA kernels; only a
    /// build with the `cuda` feature can put tensors there (others answer
    /// [`NnError::CudaNotBuilt`]).
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = NnError;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| NnError::UnknownDevice(s.to_string())),
        }
    }
}

/// A tensor's dimensions, outermost first (`n, c, h, w` for images). Rank 0 is a scalar.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(Vec<usize>);

impl Shape {
    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// The number of values (1 for a scalar).
    pub fn elem_count(&self) -> usize {
        self.0.iter().product()
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<Vec<usize>> for Shape {
    fn from(v: Vec<usize>) -> Self {
        Shape(v)
    }
}

impl From<&[usize]> for Shape {
    fn from(v: &[usize]) -> Self {
        Shape(v.to_vec())
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(v: [usize; N]) -> Self {
        Shape(v.to_vec())
    }
}

impl<const N: usize> From<&[usize; N]> for Shape {
    fn from(v: &[usize; N]) -> Self {
        Shape(v.to_vec())
    }
}

impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}

impl From<()> for Shape {
    fn from((): ()) -> Self {
        Shape(Vec::new())
    }
}

impl From<usize> for Shape {
    fn from(n: usize) -> Self {
        Shape(vec![n])
    }
}

impl From<(usize, usize)> for Shape {
    fn from((a, b): (usize, usize)) -> Self {
        Shape(vec![a, b])
    }
}

impl From<(usize, usize, usize)> for Shape {
    fn from((a, b, c): (usize, usize, usize)) -> Self {
        Shape(vec![a, b, c])
    }
}

impl From<(usize, usize, usize, usize)> for Shape {
    fn from((a, b, c, d): (usize, usize, usize, usize)) -> Self {
        Shape(vec![a, b, c, d])
    }
}

/// A tensor's values on a GPU (the `cuda` feature): the device buffer, the GPU's context and its
/// ordinal.
#[cfg(feature = "cuda")]
pub struct CudaBuf {
    /// The values.
    pub(crate) data: int8_core::cuda::CudaSlice<f32>,
    /// The GPU holding them.
    pub(crate) gpu: Arc<int8_core::cuda::Gpu>,
    /// The GPU's ordinal (its [`Device::Cuda`] number).
    pub(crate) ordinal: usize,
}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for CudaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaBuf(cuda:{}, {} values)", self.ordinal, self.data.len())
    }
}

#[cfg(feature = "cuda")]
impl Clone for CudaBuf {
    /// A copy on the same GPU (what `Arc::make_mut` makes of shared storage before writing).
    ///
    /// # Panics
    /// Only if the GPU fails the allocation or the copy (`CudaSlice`'s own clone).
    fn clone(&self) -> Self {
        Self { data: self.data.clone(), gpu: self.gpu.clone(), ordinal: self.ordinal }
    }
}

#[cfg(feature = "cuda")]
impl CudaBuf {
    /// The values, copied to the host.
    pub(crate) fn download(&self) -> Result<Vec<f32>> {
        Ok(self.gpu.download(&self.data)?)
    }
}

/// A tensor's values on one device.
#[derive(Debug, Clone)]
pub enum Storage {
    /// Values in host memory, counted by [`memory`].
    Cpu(memory::HostBuf),
    /// Values on a GPU, with the GPU's context (shared by every tensor on it).
    #[cfg(feature = "cuda")]
    Cuda(CudaBuf),
}

impl Storage {
    /// The device holding the values.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Device::Cuda(b.ordinal),
        }
    }
}

/// A shape, values on a device, and the tensor's place on the autograd tape (see [`crate::tape`]).
#[derive(Clone)]
pub struct Tensor {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    shape: Shape,
    storage: Arc<Storage>,
    track: Track,
    /// The largest `|value|` (NaN ignored), where the op that wrote the values found it on the way:
    /// an INT8 consumer then quantizes with it instead of a pass of its own. Cleared whenever the
    /// values are written in place.
    max_abs: Option<f32>,
    /// Whether an INT8 layer that asked for it (`Int8Config::f16_batch_norm_input`) wrote the
    /// values: a batch norm reading them then keeps them for its backward pass in half precision
    /// (they already carry the INT8 product's error, far above half precision's). Cleared, as
    /// `max_abs` is, when the values are written in place.
    f16_ok: bool,
    /// Per channel (the second dimension), the scale by which an INT8 convolution multiplied its
    /// integer sums to write these values: a batch norm reading them keeps them for its backward
    /// pass as 16-bit sums, which give every value back exactly
    /// (`int8_core::nn::batchnorm::SumsSaved`). Cleared, as `max_abs` is, when the values are
    /// written in place, and by a change of shape.
    sum_scales: Option<Arc<[f32]>>,
    /// The per-tensor INT8 codes of these values at `max_abs` (nearest rounding), where an INT8
    /// convolution made them: a second INT8 convolution reading the same tensor (a residual
    /// block's strided 1x1 shortcut beside its first convolution) takes them instead of reading
    /// the values again. Cleared, as `max_abs` is, when the values are written in place.
    codes: OnceLock<(f32, Arc<QTensor>)>,
}

impl Inner {
    /// Forgets what was recorded about the values (`max_abs`, `f16_ok`, `sum_scales`, `codes`),
    /// before they are written in place.
    fn forget_derived(&mut self) {
        self.max_abs = None;
        self.f16_ok = false;
        self.sum_scales = None;
        self.codes = OnceLock::new();
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({}, {}", self.inner.shape, self.device())?;
        match &self.inner.track {
            Track::None => write!(f, ")"),
            Track::Leaf(id) => write!(f, ", leaf {})", id.0),
            Track::Node(n) => write!(f, ", from {})", n.name()),
        }
    }
}

impl Tensor {
    /// A CPU tensor of `shape` holding `values` (row-major, outermost dimension first).
    pub fn from_vec(values: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if values.len() != shape.elem_count() {
            return Err(NnError::Shape(format!(
                "{} values do not fill a tensor of shape {shape} ({} values)",
                values.len(),
                shape.elem_count()
            )));
        }
        Ok(Self::cpu_untracked(values, shape))
    }

    /// An untracked CPU tensor; `values.len()` must equal the shape's count (checked by callers).
    pub(crate) fn cpu_untracked(values: Vec<f32>, shape: Shape) -> Tensor {
        debug_assert_eq!(values.len(), shape.elem_count());
        Tensor {
            inner: Arc::new(Inner {
                shape,
                storage: Arc::new(Storage::Cpu(memory::HostBuf::new(values))),
                track: Track::None,
                max_abs: None,
                f16_ok: false,
                sum_scales: None,
                codes: OnceLock::new(),
            }),
        }
    }

    /// A tensor of `shape` with every value `v`.
    pub fn full(shape: impl Into<Shape>, v: f32) -> Tensor {
        let shape = shape.into();
        let values = if v == 0.0 { int8_core::out::zeros(shape.elem_count()) } else { vec![v; shape.elem_count()] };
        Self::cpu_untracked(values, shape)
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>) -> Tensor {
        Self::full(shape, 0.0)
    }

    /// A tensor of ones.
    pub fn ones(shape: impl Into<Shape>) -> Tensor {
        Self::full(shape, 1.0)
    }

    /// A scalar (rank 0).
    pub fn scalar(v: f32) -> Tensor {
        Self::full((), v)
    }

    /// Standard normal values (Box-Muller over a counter-based stream): the same for a seed on
    /// every machine.
    pub fn randn(shape: impl Into<Shape>, seed: u64) -> Tensor {
        let shape = shape.into();
        let rng = CounterRng::new(seed);
        let values = (0..shape.elem_count() as u64)
            .map(|i| {
                let (u1, u2) = (rng.uniform_f64(2 * i).max(1e-300), rng.uniform_f64(2 * i + 1));
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        Self::cpu_untracked(values, shape)
    }

    /// Values uniform in `[lo, hi)` from a counter-based stream.
    pub fn uniform(shape: impl Into<Shape>, lo: f32, hi: f32, seed: u64) -> Tensor {
        let shape = shape.into();
        let rng = CounterRng::new(seed);
        let values = (0..shape.elem_count() as u64).map(|i| lo + (hi - lo) * rng.uniform(i)).collect();
        Self::cpu_untracked(values, shape)
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.inner.shape
    }

    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        self.inner.shape.dims()
    }

    /// The number of values.
    pub fn elem_count(&self) -> usize {
        self.inner.shape.elem_count()
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.inner.shape.rank()
    }

    /// The device holding the values.
    pub fn device(&self) -> Device {
        self.inner.storage.device()
    }

    /// The storage (shared with every tensor cloned or reshaped from this one).
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// The values, copied to the host.
    ///
    /// # Panics
    /// Only if a GPU fails to copy the values back (a device fault, not bad input); use
    /// [`Tensor::try_to_vec`] to get that as an error.
    pub fn to_vec(&self) -> Vec<f32> {
        match &*self.inner.storage {
            Storage::Cpu(b) => b.to_vec(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.download().unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// The values, copied to the host, or the GPU's error.
    pub fn try_to_vec(&self) -> Result<Vec<f32>> {
        match &*self.inner.storage {
            Storage::Cpu(b) => Ok(b.to_vec()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.download(),
        }
    }

    /// A copy of the values on `device`, recorded on the tape when this tensor is tracked (the
    /// gradient is copied back), or this tensor itself when it is there already. A GPU asked of
    /// a build without the `cuda` feature is [`NnError::CudaNotBuilt`].
    /// (With the `cuda` feature this method is `crate::cuda`'s, which makes the copy.)
    #[cfg(not(feature = "cuda"))]
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device() == *device {
            return Ok(self.clone());
        }
        Err(NnError::CudaNotBuilt { device: device.to_string() })
    }

    /// The value of a one-element tensor.
    pub fn to_scalar(&self) -> Result<f32> {
        if self.elem_count() != 1 {
            return Err(NnError::Shape(format!("to_scalar needs one value, the tensor has shape {}", self.shape())));
        }
        Ok(self.to_vec()[0])
    }

    /// The values in host memory, borrowed: what the CPU kernels read.
    pub(crate) fn cpu(&self) -> Result<&[f32]> {
        match &*self.inner.storage {
            Storage::Cpu(b) => Ok(b.as_slice()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => {
                Err(NnError::CpuOnly { op: crate::profile::current_op(), device: Device::Cuda(b.ordinal).to_string() })
            }
        }
    }

    /// The same values, recorded nowhere: gradients do not flow through it.
    pub fn detach(&self) -> Tensor {
        if matches!(self.inner.track, Track::None) {
            return self.clone();
        }
        Tensor { inner: Arc::new(Inner { track: Track::None, ..(*self.inner).clone() }) }
    }

    /// The same values as a new leaf of the tape: a tensor whose gradient [`Tensor::backward`]
    /// returns (as a [`crate::Param`]'s is).
    pub fn requires_grad(&self) -> Tensor {
        self.with_track(Track::Leaf(LeafId::fresh()))
    }

    /// Whether gradients flow back through this tensor (a leaf, or made by a recorded op).
    pub fn is_tracked(&self) -> bool {
        !matches!(self.inner.track, Track::None)
    }

    /// The tensor's leaf id, if it is a leaf.
    pub(crate) fn leaf_id(&self) -> Option<LeafId> {
        match self.inner.track {
            Track::Leaf(id) => Some(id),
            _ => None,
        }
    }

    pub(crate) fn track(&self) -> &Track {
        &self.inner.track
    }

    /// The same storage under `shape` (of the same size, which callers check), untracked.
    pub(crate) fn with_shape(&self, shape: Shape) -> Tensor {
        debug_assert_eq!(shape.elem_count(), self.elem_count());
        Tensor {
            inner: Arc::new(Inner {
                shape,
                storage: self.inner.storage.clone(),
                track: Track::None,
                max_abs: self.inner.max_abs,
                f16_ok: self.inner.f16_ok,
                sum_scales: None,
                codes: OnceLock::new(),
            }),
        }
    }

    /// This untracked tensor, recorded as having `max_abs` as its largest `|value|` (see `Inner`).
    pub(crate) fn with_max_abs(mut self, max_abs: f32) -> Tensor {
        Arc::make_mut(&mut self.inner).max_abs = Some(max_abs);
        self
    }

    /// This untracked tensor, marked as written by an INT8 layer whose consumers may keep it in
    /// half precision (see `Inner`).
    pub(crate) fn with_f16_ok(mut self) -> Tensor {
        Arc::make_mut(&mut self.inner).f16_ok = true;
        self
    }

    /// This untracked tensor, recorded as an INT8 convolution's sums times `scales`, one per
    /// channel (see `Inner`).
    pub(crate) fn with_sum_scales(mut self, scales: Arc<[f32]>) -> Tensor {
        Arc::make_mut(&mut self.inner).sum_scales = Some(scales);
        self
    }

    /// Per channel, the scale of the INT8 sums these values are, where an INT8 convolution wrote
    /// them (see `Inner`).
    pub(crate) fn sum_scales(&self) -> Option<&[f32]> {
        self.inner.sum_scales.as_deref()
    }

    /// Whether a batch norm reading these values may keep them in half precision (see `Inner`).
    pub(crate) fn f16_ok(&self) -> bool {
        self.inner.f16_ok
    }

    /// The largest `|value|`, where the op that wrote the values recorded it.
    pub(crate) fn known_max_abs(&self) -> Option<f32> {
        self.inner.max_abs
    }

    /// The per-tensor codes of these values at clip value `clip` = [`Tensor::known_max_abs`]
    /// (nearest rounding): those an earlier INT8 convolution made of this tensor, or `make`'s,
    /// which are kept for the next (see `Inner`). `make` must quantize these values at `clip`.
    pub(crate) fn codes_at_max(&self, clip: f32, make: impl FnOnce() -> Result<QTensor>) -> Result<Arc<QTensor>> {
        debug_assert_eq!(Some(clip), self.inner.max_abs);
        if let Some((c, q)) = self.inner.codes.get()
            && c.to_bits() == clip.to_bits()
        {
            return Ok(q.clone());
        }
        let q = Arc::new(make()?);
        let _ = self.inner.codes.set((clip, q.clone()));
        Ok(q)
    }

    /// The codes of [`Tensor::codes_at_max`] at `clip`, where an INT8 convolution made them.
    pub(crate) fn known_codes(&self, clip: f32) -> Option<Arc<QTensor>> {
        self.inner.codes.get().filter(|(c, _)| c.to_bits() == clip.to_bits()).map(|(_, q)| q.clone())
    }

    pub(crate) fn with_track(&self, track: Track) -> Tensor {
        Tensor { inner: Arc::new(Inner { track, ..(*self.inner).clone() }) }
    }

    /// The storage to write into when no other tensor shares it: how gradients accumulate and
    /// parameters update in place. `None` when shared.
    pub(crate) fn unique_cpu_mut(&mut self) -> Option<&mut [f32]> {
        let inner = Arc::get_mut(&mut self.inner)?;
        inner.forget_derived();
        match Arc::get_mut(&mut inner.storage)? {
            Storage::Cpu(b) => Some(b.as_mut_slice()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }

    /// The values to write into, copied first if another tensor shares them. A GPU tensor is
    /// brought to the host first (callers dispatch GPU tensors to their own paths before this).
    pub(crate) fn make_cpu_mut(&mut self) -> &mut [f32] {
        #[cfg(feature = "cuda")]
        if let Storage::Cuda(_) = &*self.inner.storage {
            let host = Self::cpu_untracked(self.to_vec(), self.shape().clone());
            *self = host.with_track(self.inner.track.clone());
        }
        let inner = Arc::make_mut(&mut self.inner);
        inner.forget_derived();
        match Arc::make_mut(&mut inner.storage) {
            Storage::Cpu(b) => b.as_mut_slice(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => unreachable!("a gpu tensor was copied to the host above"),
        }
    }

    /// A tensor of `shape` on storage `storage`, untracked.
    #[cfg(feature = "cuda")]
    pub(crate) fn from_storage(storage: Storage, shape: Shape) -> Tensor {
        Tensor {
            inner: Arc::new(Inner {
                shape,
                storage: Arc::new(storage),
                track: Track::None,
                max_abs: None,
                f16_ok: false,
                sum_scales: None,
                codes: OnceLock::new(),
            }),
        }
    }

    /// The storage and the tensor's own handle on it, for in-place GPU updates: the buffer
    /// when no other tensor shares it, else `None`.
    #[cfg(feature = "cuda")]
    pub(crate) fn unique_storage_mut(&mut self) -> Option<&mut Storage> {
        let inner = Arc::get_mut(&mut self.inner)?;
        inner.forget_derived();
        Arc::get_mut(&mut inner.storage)
    }

    /// The storage to write into, copied first (on its device) if another tensor shares it.
    #[cfg(feature = "cuda")]
    pub(crate) fn make_storage_mut(&mut self) -> &mut Storage {
        let inner = Arc::make_mut(&mut self.inner);
        inner.forget_derived();
        Arc::make_mut(&mut inner.storage)
    }

    /// Whether two tensors share storage (for tests of in-place updates).
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.inner.storage, &other.inner.storage)
    }
}

/// Identifies a leaf of the tape (a parameter, or a tensor made with
/// [`Tensor::requires_grad`]); gradients are returned by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeafId(pub(crate) u64);

impl LeafId {
    pub(crate) fn fresh() -> LeafId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        LeafId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// How a tensor takes part in autograd.
#[derive(Clone)]
pub(crate) enum Track {
    /// Not at all: data, constants, detached values, anything made while not recording.
    None,
    /// A leaf whose gradient is returned.
    Leaf(LeafId),
    /// The output of a recorded op.
    Node(Arc<Node>),
}

/// What an op keeps for its backward pass, and how it turns its output's gradient into its
/// inputs'.
pub(crate) trait Backward: Send {
    /// The gradients of the op's inputs, in order, given its output's gradient `grad` (of the
    /// output's shape); `needs[i]` says whether input `i` is tracked (an untracked input's
    /// gradient is not computed: return `None` for it).
    fn backward(self: Box<Self>, grad: Tensor, needs: &[bool]) -> Result<Vec<Option<Tensor>>>;

    /// Bytes held for the backward pass (for [`memory::saved_bytes`]).
    fn saved_bytes(&self) -> usize {
        0
    }
}

/// One recorded op.
pub(crate) struct Node {
    /// Creation order (process-wide), so that inputs always have smaller numbers.
    pub(crate) seq: u64,
    /// The op's name, as the step breakdown shows it.
    pub(crate) name: &'static str,
    /// Each input's edge and shape.
    pub(crate) inputs: Vec<(Track, Shape)>,
    /// The backward object, taken when it runs.
    pub(crate) backward: Mutex<Option<Box<dyn Backward>>>,
    /// Bytes the backward object holds (counted in [`memory::saved_bytes`] until it is dropped).
    pub(crate) saved: usize,
}

impl Node {
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    pub(crate) fn take(&self) -> Option<Box<dyn Backward>> {
        let b = self.backward.lock().unwrap_or_else(|e| e.into_inner()).take();
        if b.is_some() {
            memory::sub_saved(self.saved);
        }
        b
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.backward.get_mut().unwrap_or_else(|e| e.into_inner()).is_some() {
            memory::sub_saved(self.saved);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded maximum follows the values through new handles on the same storage, and is
    /// dropped when the values are written in place.
    #[test]
    fn a_recorded_maximum_is_dropped_when_the_values_change() {
        let t = Tensor::from_vec(vec![1.0, -3.0], [2]).unwrap().with_max_abs(3.0);
        assert_eq!(t.detach().known_max_abs(), Some(3.0));
        assert_eq!(t.with_shape(Shape::from([1, 2])).known_max_abs(), Some(3.0));
        assert_eq!(t.requires_grad().known_max_abs(), Some(3.0));
        let mut shared = t.clone();
        shared.make_cpu_mut()[1] = -5.0;
        assert_eq!((shared.known_max_abs(), t.known_max_abs()), (None, Some(3.0)));
        let mut unique = Tensor::from_vec(vec![1.0, -3.0], [2]).unwrap().with_max_abs(3.0);
        unique.unique_cpu_mut().unwrap()[0] = 7.0;
        assert_eq!(unique.known_max_abs(), None);
    }

    /// Codes made at the recorded maximum are kept for the next reader at that clip value, for
    /// no other, and are dropped when the values are written in place.
    #[test]
    fn codes_at_the_maximum_are_kept_until_the_values_change() {
        let t = Tensor::from_vec(vec![1.0, -3.0], [2]).unwrap().with_max_abs(3.0);
        let make = || Ok(QTensor { data: vec![42, -127], scales: vec![3.0 / 127.0], saturated: 0 });
        assert!(t.known_codes(3.0).is_none());
        let first = t.codes_at_max(3.0, make).unwrap();
        let again = t.codes_at_max(3.0, || panic!("the kept codes are taken")).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert!(t.known_codes(3.0).is_some_and(|q| Arc::ptr_eq(&q, &first)));
        assert!(t.known_codes(2.0).is_none(), "codes at another clip value");
        let mut shared = t.clone();
        shared.make_cpu_mut()[1] = -5.0;
        assert!(shared.known_codes(3.0).is_none() && t.known_codes(3.0).is_some());
        let mut unique = t.detach();
        drop(t);
        unique.unique_cpu_mut().unwrap()[0] = 7.0;
        assert!(unique.known_codes(3.0).is_none());
    }

    #[test]
    fn devices_parse_from_their_names_and_print_as_them() {
        for (name, device) in [("cpu", Device::Cpu), ("cuda:0", Device::Cuda(0)), ("cuda:3", Device::Cuda(3))] {
            assert_eq!(name.parse::<Device>().unwrap(), device);
            assert_eq!(device.to_string(), name);
        }
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        for bad in ["gpu", "cuda:", "cuda:x", "CPU", ""] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(matches!(e, NnError::UnknownDevice(_)) && e.to_string().contains("cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_copy_to_its_own_device_is_the_tensor_itself() {
        let t = Tensor::from_vec(vec![1.0, 2.0], 2).unwrap();
        assert!(t.to_device(&Device::Cpu).unwrap().shares_storage(&t));
    }

    /// Without the `cuda` feature a GPU is an error saying how to build one in, for tensors and
    /// parameters alike.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_asked_of_a_build_without_cuda_says_how_to_build_it() {
        let t = Tensor::ones(3);
        let e = t.to_device(&Device::Cuda(0)).unwrap_err();
        assert!(matches!(e, NnError::CudaNotBuilt { ref device } if device == "cuda:0"), "{e}");
        assert!(e.to_string().contains("build with `--features cuda`"), "{e}");
        let p = crate::Param::new("w", Tensor::ones(3), true);
        assert!(
            matches!(p.to_device(&Device::Cuda(1)), Err(NnError::CudaNotBuilt { ref device }) if device == "cuda:1")
        );
        assert_eq!(p.device(), Device::Cpu);
    }
}
