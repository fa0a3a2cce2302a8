//! A trainable parameter: a named leaf of the tape whose value the optimizer updates in place.

use std::sync::RwLock;

use crate::error::{NnError, Result};
use crate::tensor::LeafId;
use crate::tensor::{Shape, Tensor};

/// A named tensor that training updates: a layer's weight, bias, or batch-norm scale and shift.
/// Its value is a leaf of the tape, with the same [`LeafId`] for the parameter's whole life, so
/// [`crate::Gradients::of`] finds its gradient after any backward pass. A frozen parameter (a
/// frozen batch norm's scale and shift) is saved and loaded like the others but takes no
/// gradient and no update.
#[derive(Debug)]
pub struct Param {
    name: String,
    decay: bool,
    id: LeafId,
    value: RwLock<Tensor>,
    frozen: bool,
}

impl Param {
    /// A parameter named `name` (as in checkpoints, `layer1.0.conv1.weight`) with initial value
    /// `value`; `decay` says whether weight decay applies to it (weights, not biases or batch-norm
    /// parameters).
    pub fn new(name: impl Into<String>, value: Tensor, decay: bool) -> Self {
        let id = LeafId::fresh();
        let value = RwLock::new(value.detach().with_track(crate::tensor::Track::Leaf(id)));
        Self { name: name.into(), decay, id, value, frozen: false }
    }

    /// The same parameter frozen: its value is given to ops untracked, so it takes no gradient.
    pub fn frozen(mut self) -> Self {
        self.frozen = true;
        self
    }

    /// Whether training updates it.
    pub fn trainable(&self) -> bool {
        !self.frozen
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether weight decay applies.
    pub fn decay(&self) -> bool {
        self.decay
    }

    /// The leaf id its gradients are kept under.
    pub fn id(&self) -> LeafId {
        self.id
    }

    /// The current value, as a leaf of the tape (ops on it record their gradient for it), or
    /// untracked when the parameter is frozen.
    pub fn value(&self) -> Tensor {
        let v = self.value.read().unwrap_or_else(|e| e.into_inner()).clone();
        if self.frozen { v.detach() } else { v }
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.value.read().unwrap_or_else(|e| e.into_inner()).shape().clone()
    }

    /// The number of values.
    pub fn elem_count(&self) -> usize {
        self.value.read().unwrap_or_else(|e| e.into_inner()).elem_count()
    }

    /// The values, copied to the host.
    pub fn to_vec(&self) -> Vec<f32> {
        self.value.read().unwrap_or_else(|e| e.into_inner()).to_vec()
    }

    /// Replaces the value (from a checkpoint, say) with `values`, which must have the
    /// parameter's size; the shape and the device stay.
    pub fn set_values(&self, values: Vec<f32>) -> Result<()> {
        let mut v = self.value.write().unwrap_or_else(|e| e.into_inner());
        if values.len() != v.elem_count() {
            return Err(NnError::BadInput {
                layer: self.name.clone(),
                why: format!("{} values for a parameter of shape {}", values.len(), v.shape()),
            });
        }
        // On the device the value is on (a checkpoint loaded into a model on a GPU stays there).
        let value = Tensor::from_vec(values, v.shape().clone())?.to_device(&v.device())?;
        *v = value.with_track(crate::tensor::Track::Leaf(self.id));
        Ok(())
    }

    /// Runs `f` on the values in place: without a copy when nothing else holds them (the graph
    /// that read them has been dropped or has run backward), copied first otherwise.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut [f32]) -> R) -> R {
        let mut v = self.value.write().unwrap_or_else(|e| e.into_inner());
        f(v.make_cpu_mut())
    }

    /// Runs `f` on the value tensor in place (a GPU update writes its device buffer).
    #[cfg(feature = "cuda")]
    pub(crate) fn update_tensor<R>(&self, f: impl FnOnce(&mut Tensor) -> R) -> R {
        let mut v = self.value.write().unwrap_or_else(|e| e.into_inner());
        f(&mut v)
    }

    /// The device holding the value.
    pub fn device(&self) -> crate::Device {
        self.value.read().unwrap_or_else(|e| e.into_inner()).device()
    }

    /// Moves the value to `device` (the same leaf: its gradients are still found by
    /// [`crate::Gradients::of`]). A GPU asked of a build without the `cuda` feature is an error
    /// saying how to build it.
    pub fn to_device(&self, device: &crate::Device) -> Result<()> {
        let mut v = self.value.write().unwrap_or_else(|e| e.into_inner());
        let moved = v.detach().to_device(device)?;
        *v = moved.with_track(crate::tensor::Track::Leaf(self.id));
        Ok(())
    }
}
