//! The one error type of `int8-nn`.

use thiserror::Error;

/// Everything that can go wrong in `int8-nn`. Messages are lowercase and say what to do.
#[derive(Debug, Error)]
pub enum NnError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
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
}

/// Shorthand for results of this crate.
pub type Result<T, E = NnError> = std::result::Result<T, E>;

/// Carries an `int8-core` error through candle's custom-op interface, which only returns
/// `candle_core::Error`; the message (naming the tensor) survives.
pub(crate) fn to_candle(e: int8_core::CoreError) -> candle_core::Error {
    candle_core::Error::wrap(e)
}
