//! `int8-nn`: layers whose forward and backward run on `int8-core`'s kernels, wrapped as candle
//! custom ops, with the per-layer precision policy, DSGC/DCLR state and the optimizer.
//!
//! Not yet written: see the project's int8-nn issue. The crate exists so the workspace has its
//! final shape.
