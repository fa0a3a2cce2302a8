//! The one error type of `int8-core`.

use thiserror::Error;

/// Everything that can go wrong in `int8-core`. Messages are lowercase and say what to do.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    /// A tensor handed to the quantizer holds NaN or an infinity.
    #[error(
        "tensor `{name}` holds a non-finite value ({value}) at index {index}: the run has diverged; lower the learning rate or resume from the last good checkpoint"
    )]
    NonFinite {
        /// The name the caller gave the tensor (for example `layer1.0.conv1.grad_output`).
        name: String,
        /// The first offending value.
        value: f32,
        /// Its flat index.
        index: usize,
    },
    /// A buffer does not have the length its shape implies.
    #[error("{what} has {got} elements but its shape needs {expected}: pass a buffer of the right size")]
    ShapeMismatch {
        /// Which buffer.
        what: &'static str,
        /// Elements expected from the shape.
        expected: usize,
        /// Elements found.
        got: usize,
    },
    /// A parameter is outside its valid range.
    #[error("invalid {what}: {why}")]
    InvalidArgument {
        /// Which parameter.
        what: &'static str,
        /// Why it is invalid and what to use instead.
        why: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Checks that `buf` has exactly `expected` elements.
pub(crate) fn check_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected { Ok(()) } else { Err(CoreError::ShapeMismatch { what, expected, got }) }
}
