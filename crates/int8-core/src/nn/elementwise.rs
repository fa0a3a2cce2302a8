//! Residual add fused with ReLU, and global average pooling: the elementwise glue of a ResNet.

use rayon::prelude::*;

use crate::error::{Result, check_len};
use crate::out::Out;

const CHUNK: usize = 1 << 14;

/// `y = max(a + b, 0)`, the end of a residual block, in one pass.
pub fn add_relu<'y>(a: &[f32], b: &[f32], y: impl Into<Out<'y>>) -> Result<()> {
    let y = y.into();
    check_len("residual add operand", b.len(), a.len())?;
    check_len("residual add output", y.len(), a.len())?;
    y.par_fills(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((y, a), b)| y.zip_map(a, b, |u, v| (u + v).max(0.0)));
    Ok(())
}

/// The gradient of [`add_relu`] for both operands: `dy` where the output `y` is positive, else 0.
pub fn relu_backward<'x>(y: &[f32], dy: &[f32], dx: impl Into<Out<'x>>) -> Result<()> {
    let dx = dx.into();
    check_len("relu output gradient", dy.len(), y.len())?;
    check_len("relu input gradient", dx.len(), y.len())?;
    dx.par_fills(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((o, y), g)| o.zip_map(y, g, |yv, gv| if yv > 0.0 { gv } else { 0.0 }));
    Ok(())
}

/// `y = min(max(x, 0), cap)`: ReLU (`cap` infinite) or ReLU6 (`cap = 6`).
pub fn clamp_relu<'y>(x: &[f32], cap: f32, y: impl Into<Out<'y>>) -> Result<()> {
    let y = y.into();
    check_len("relu output", y.len(), x.len())?;
    y.par_fills(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| y.map(x, |v| v.max(0.0).min(cap)));
    Ok(())
}

/// The gradient of [`clamp_relu`]: `dy` where the input was strictly inside `(0, cap)`, else 0.
pub fn clamp_relu_backward<'x>(x: &[f32], cap: f32, dy: &[f32], dx: impl Into<Out<'x>>) -> Result<()> {
    let dx = dx.into();
    check_len("relu output gradient", dy.len(), x.len())?;
    check_len("relu input gradient", dx.len(), x.len())?;
    dx.par_fills(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((o, x), g)| o.zip_map(x, g, |v, gv| if v > 0.0 && v < cap { gv } else { 0.0 }));
    Ok(())
}

/// Global average pooling: `y[p] = mean of x[p * hw .. (p + 1) * hw]` for each `(image, channel)`
/// plane `p`.
pub fn global_avg_pool(x: &[f32], hw: usize, y: &mut [f32]) -> Result<()> {
    check_len("pooling input", x.len(), y.len() * hw)?;
    y.par_iter_mut().zip(x.par_chunks(hw.max(1))).for_each(|(o, p)| {
        *o = (p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64) as f32;
    });
    Ok(())
}

/// The gradient of [`global_avg_pool`]: each plane gets `dy[p] / hw` everywhere.
pub fn global_avg_pool_backward(dy: &[f32], hw: usize, dx: &mut [f32]) -> Result<()> {
    check_len("pooling input gradient", dx.len(), dy.len() * hw)?;
    dx.par_chunks_mut(hw.max(1)).zip(dy.par_iter()).for_each(|(p, &g)| p.fill(g / hw as f32));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_relu_and_its_gradient() {
        let a = [1.0, -2.0, 0.5, -0.25];
        let b = [0.5, 1.0, -1.0, 0.25];
        let mut y = [9.0; 4];
        add_relu(&a, &b, &mut y).unwrap();
        assert_eq!(y, [1.5, 0.0, 0.0, 0.0]);
        let mut dx = [9.0; 4];
        relu_backward(&y, &[1.0, 2.0, 3.0, 4.0], &mut dx).unwrap();
        assert_eq!(dx, [1.0, 0.0, 0.0, 0.0]);
        assert!(add_relu(&a, &b[..3], &mut y).is_err());
    }

    #[test]
    fn relu6_and_its_gradient() {
        let x = [-1.0, 0.0, 3.0, 6.0, 7.5];
        let mut y = [9.0; 5];
        clamp_relu(&x, 6.0, &mut y).unwrap();
        assert_eq!(y, [0.0, 0.0, 3.0, 6.0, 6.0]);
        let mut dx = [9.0; 5];
        clamp_relu_backward(&x, 6.0, &[1.0; 5], &mut dx).unwrap();
        assert_eq!(dx, [0.0, 0.0, 1.0, 0.0, 0.0]);
        clamp_relu(&x, f32::INFINITY, &mut y).unwrap();
        assert_eq!(y, [0.0, 0.0, 3.0, 6.0, 7.5]);
    }

    #[test]
    fn global_average_pooling_and_its_gradient() {
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let mut y = [0.0; 3];
        global_avg_pool(&x, 4, &mut y).unwrap();
        assert_eq!(y, [1.5, 5.5, 9.5]);
        let mut dx = [0.0; 12];
        global_avg_pool_backward(&[4.0, 8.0, -4.0], 4, &mut dx).unwrap();
        assert_eq!(dx, [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, -1.0, -1.0, -1.0, -1.0]);
    }
}
