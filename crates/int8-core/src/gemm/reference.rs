//! Naive reference GEMMs: the definitions every fast path is checked against.

use super::MatRef;

/// `A * B` over `i8` codes, accumulated in `i64` (so the reference itself cannot overflow),
/// row-major output.
pub fn gemm_i8_i64(a: MatRef<i8>, b: MatRef<i8>) -> Vec<i64> {
    let mut c = vec![0i64; a.rows() * b.cols()];
    for i in 0..a.rows() {
        for j in 0..b.cols() {
            let mut s = 0i64;
            for k in 0..a.cols() {
                s += a.at(i, k) as i64 * b.at(k, j) as i64;
            }
            c[i * b.cols() + j] = s;
        }
    }
    c
}

/// `A * B` over `f32` inputs, accumulated in `f64`, row-major output.
pub fn gemm_f64(a: MatRef<f32>, b: MatRef<f32>) -> Vec<f64> {
    let mut c = vec![0f64; a.rows() * b.cols()];
    for i in 0..a.rows() {
        for j in 0..b.cols() {
            let mut s = 0f64;
            for k in 0..a.cols() {
                s += a.at(i, k) as f64 * b.at(k, j) as f64;
            }
            c[i * b.cols() + j] = s;
        }
    }
    c
}
