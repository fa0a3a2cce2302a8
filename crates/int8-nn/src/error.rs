//! The one error type of `int8-nn`.

use thiserror::Error;

/// Everything that can go wrong in `int8-nn`. Messages are lowercase and say what to do.
#[derive(Debug, Error)]
pub enum NnError {
    /// A kernel or the quantizer refused its input (a non-finite gradient, a bad shape).
    #[error(transparent)]
    Core(#[from] int8_core::CoreError),
    /// A layer got an input it cannot take.
    #[error("layer `{layer}`: {why}")]
    BadInput {
        /// The layer's name.
        layer: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// Tensors of shapes an op cannot take.
    #[error("{0}")]
    Shape(String),
    /// The tape was used in a way it cannot follow (a backward pass from a loss that was not
    /// recorded, or run twice over one graph).
    #[error("{0}")]
    Graph(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = NnError> = std::result::Result<T, E>;
