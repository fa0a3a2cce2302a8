//! 2-D convolution.
