//! Naive convolution loops in f64, straight from the definition: the meaning of every conv kernel.
//! INT8 codes convert to f64 exactly and their sums stay below 2^53, so these are exact references
//! for the INT8 kernels as well.

use super::ConvShape;

/// Calls `f(x_index, w_index, y_index)` for every multiply-accumulate of the convolution.
fn for_each_mac(s: &ConvShape, mut f: impl FnMut(usize, usize, usize)) {
    let (cig, cog) = (s.c_in_group(), s.c_out_group());
    for n in 0..s.n {
        for co in 0..s.c_out {
            let g = co / cog;
            for oh in 0..s.out_h() {
                for ow in 0..s.out_w() {
                    let yi = ((n * s.c_out + co) * s.out_h() + oh) * s.out_w() + ow;
                    for ci in 0..cig {
                        let c = g * cig + ci;
                        for i in 0..s.kh {
                            for j in 0..s.kw {
                                let ih = (oh * s.stride.0 + i * s.dilation.0) as isize - s.pad.0 as isize;
                                let iw = (ow * s.stride.1 + j * s.dilation.1) as isize - s.pad.1 as isize;
                                if ih < 0 || iw < 0 || ih as usize >= s.h || iw as usize >= s.w {
                                    continue;
                                }
                                let xi = ((n * s.c_in + c) * s.h + ih as usize) * s.w + iw as usize;
                                let wi = ((co * cig + ci) * s.kh + i) * s.kw + j;
                                f(xi, wi, yi);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `Y = W * X`.
pub fn conv2d_fwd(s: &ConvShape, x: &[f64], w: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; s.y_len()];
    for_each_mac(s, |xi, wi, yi| y[yi] += w[wi] * x[xi]);
    y
}

/// `dX = W^T * dY`.
pub fn conv2d_dx(s: &ConvShape, w: &[f64], dy: &[f64]) -> Vec<f64> {
    let mut dx = vec![0.0; s.x_len()];
    for_each_mac(s, |xi, wi, yi| dx[xi] += w[wi] * dy[yi]);
    dx
}

/// `dW = dY * X^T`, summed over the batch.
pub fn conv2d_dw(s: &ConvShape, x: &[f64], dy: &[f64]) -> Vec<f64> {
    let mut dw = vec![0.0; s.w_len()];
    for_each_mac(s, |xi, wi, yi| dw[wi] += dy[yi] * x[xi]);
    dw
}
