//! The autograd tape.
//!
//! An op whose inputs include a tracked tensor (a leaf such as a [`crate::Param`]'s value, or the
//! output of another recorded op) records a node: a number in creation order, an edge to each
//! input, and a backward object that owns what the op saved for it (the INT8 codes of X and W, a
//! batch's statistics, the softmax). The output tensor holds its node; a node holds its inputs'
//! nodes, never its outputs, so the graph of a step lives exactly as long as the tensors made in
//! it and is freed when they are dropped.
//!
//! [`backward`] collects the nodes that the loss depends on and runs them in reverse creation
//! order: every consumer of a value was created after it, so a value's gradient is complete before
//! its own node runs. Each backward object is consumed as it runs (its saved buffers are freed
//! there, not when the graph is dropped) and computes gradients only for the inputs that are
//! tracked. The first gradient reaching a value is stored as it is; later ones are added into it
//! in place, on all threads. Nodes that do not lead to the loss never run, so a branch that does
//! not reach the loss gives its leaves no gradient.
//!
//! Recording is on by default and off inside [`no_grad`] (evaluation): ops then record nothing
//! and keep nothing alive. The switch is per thread, like the step itself (which runs on one
//! thread; only the kernels inside an op spread over the pool).

use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{NnError, Result};
pub(crate) use crate::tensor::Backward;
pub use crate::tensor::LeafId;
use crate::tensor::{Node, Shape, Tensor, Track};
use crate::{memory, ops, profile};

thread_local! {
    static RECORDING: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread record nodes (on unless inside [`no_grad`]).
pub fn is_recording() -> bool {
    RECORDING.with(Cell::get)
}

/// Runs `f` with recording off on this thread: ops record nothing and keep nothing for a
/// backward pass (evaluation). The previous setting is restored afterwards, also on a panic.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            RECORDING.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(RECORDING.with(|r| r.replace(false)));
    f()
}

/// An op about to be recorded: made by [`record`] when recording is on and an input is tracked.
pub(crate) struct Record {
    inputs: Vec<(Track, Shape)>,
}

/// Starts recording an op on `inputs`, or `None` when there is nothing to record (recording is
/// off, or no input is tracked): the op then computes its output only and saves nothing.
pub(crate) fn record(inputs: &[&Tensor]) -> Option<Record> {
    if !is_recording() || !inputs.iter().any(|t| t.is_tracked()) {
        return None;
    }
    Some(Record { inputs: inputs.iter().map(|t| (t.track().clone(), t.shape().clone())).collect() })
}

impl Record {
    /// Whether input `i` is tracked, so that the backward pass will want its gradient (an op
    /// need not save what only that gradient would use).
    pub(crate) fn needs(&self, i: usize) -> bool {
        !matches!(self.inputs[i].0, Track::None)
    }

    /// The op's output `value`, recorded as made by op `name` with `backward`.
    pub(crate) fn output(self, name: &'static str, value: Tensor, backward: impl Backward + 'static) -> Tensor {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let saved = backward.saved_bytes();
        memory::add_saved(saved);
        let node = Node {
            seq: NEXT.fetch_add(1, Ordering::Relaxed),
            name,
            inputs: self.inputs,
            backward: Mutex::new(Some(Box::new(backward))),
            saved,
        };
        value.with_track(Track::Node(Arc::new(node)))
    }
}

/// The gradients a backward pass found, by leaf.
#[derive(Debug, Default)]
pub struct Gradients {
    leaves: HashMap<LeafId, Tensor>,
}

impl Gradients {
    /// The gradient of leaf `t` (a parameter's value or a tensor made with
    /// [`Tensor::requires_grad`]); `None` if the loss does not depend on it.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.leaves.get(&t.leaf_id()?)
    }

    /// The gradient of a parameter; `None` if the loss does not depend on it.
    pub fn of(&self, p: &crate::Param) -> Option<&Tensor> {
        self.leaves.get(&p.id())
    }

    /// How many leaves got a gradient.
    pub fn len(&self) -> usize {
        self.leaves.len()
    }

    /// Whether no leaf got a gradient.
    pub fn is_empty(&self) -> bool {
        self.leaves.is_empty()
    }
}

impl Tensor {
    /// Gradients of this one-element tensor (a loss) with respect to every leaf it depends on:
    /// the tape's recorded ops run backwards in reverse creation order (see [`crate::tape`]).
    pub fn backward(&self) -> Result<Gradients> {
        backward(self)
    }
}

/// Runs the backward pass from `loss` (one value); see the module's documentation.
fn backward(loss: &Tensor) -> Result<Gradients> {
    if loss.elem_count() != 1 {
        return Err(NnError::Graph(format!(
            "backward starts from a single value (a loss), got a tensor of shape {}; reduce it first (sum_all)",
            loss.shape()
        )));
    }
    let mut grads = Gradients::default();
    let root = match loss.track() {
        Track::None => {
            return Err(NnError::Graph(
                "the loss was not recorded: it depends on no parameter, or it was computed inside no_grad \
                 (evaluation) or from detached tensors"
                    .into(),
            ));
        }
        Track::Leaf(id) => {
            grads.leaves.insert(*id, Tensor::ones(loss.shape()));
            return Ok(grads);
        }
        Track::Node(n) => n.clone(),
    };
    // The nodes the loss depends on, latest first.
    let mut nodes = Vec::new();
    let (mut seen, mut stack) = (HashSet::new(), vec![root.clone()]);
    while let Some(n) = stack.pop() {
        if seen.insert(n.seq) {
            stack.extend(
                n.inputs.iter().filter_map(|(t, _)| if let Track::Node(m) = t { Some(m.clone()) } else { None }),
            );
            nodes.push(n);
        }
    }
    nodes.sort_unstable_by_key(|n| std::cmp::Reverse(n.seq));
    let mut pending: HashMap<u64, Tensor> = HashMap::from([(root.seq, Tensor::ones(loss.shape()))]);
    for node in nodes {
        let Some(grad) = pending.remove(&node.seq) else { continue };
        let Some(op) = node.take() else {
            return Err(NnError::Graph(format!(
                "op `{}` already ran its backward pass: a graph runs backward once; run the forward pass again",
                node.name
            )));
        };
        let needs: Vec<bool> = node.inputs.iter().map(|(t, _)| !matches!(t, Track::None)).collect();
        let input_grads = {
            let _t = profile::span(node.name, true);
            op.backward(grad, &needs)?
        };
        if input_grads.len() != node.inputs.len() {
            return Err(bug(node.name, format!("{} gradients for {} inputs", input_grads.len(), node.inputs.len())));
        }
        for ((track, shape), g) in node.inputs.iter().zip(input_grads) {
            let Some(g) = g else { continue };
            if g.shape() != shape {
                return Err(bug(node.name, format!("a gradient of shape {} for an input of shape {shape}", g.shape())));
            }
            match track {
                Track::None => {}
                Track::Leaf(id) => accumulate(grads.leaves.entry(*id), g)?,
                Track::Node(m) => accumulate(pending.entry(m.seq), g)?,
            }
        }
    }
    Ok(grads)
}

fn bug(op: &str, what: String) -> NnError {
    NnError::Graph(format!("op `{op}` returned {what}; this is a bug in int8-nn, please report it"))
}

/// Adds `g` into a value's gradient: stored as it is if it is the first, else added in place.
fn accumulate<K>(slot: Entry<'_, K, Tensor>, g: Tensor) -> Result<()> {
    match slot {
        Entry::Vacant(v) => {
            v.insert(g);
        }
        Entry::Occupied(mut o) => ops::arith::add_into(o.get_mut(), g)?,
    }
    Ok(())
}
