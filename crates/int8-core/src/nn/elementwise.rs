//! Residual add (plain, or fused with ReLU), ReLU and ReLU6, in-place accumulation, and global
//! average pooling: the elementwise glue of a ResNet or MobileNetV2, and of the tape's gradient
//! sums.

use rayon::prelude::*;

use crate::error::{Result, check_len};
use crate::out::{Fill, Out};

const CHUNK: usize = 1 << 14;

// The per-chunk loops are compiled for AVX-512 and AVX2 as well (chosen at run time), with the
// clamp value passed by value and the conditions written without short-circuits, so that they
// vectorise. A closure inside a rayon task is compiled for the baseline target only, and there
// ReLU6's backward pass ran as a scalar, branching loop that reloaded `cap` for every element:
// 450 ms of a 2.2 s MobileNetV2 step (`int8-bench step --model mobilenetv2-cifar`), five times
// its forward pass.

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_relu_chunk(y: Fill<'_>, a: &[f32], b: &[f32]) -> f32 {
    y.zip_map_max_abs(a, b, |u, v| (u + v).max(0.0))
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_relu_positive_chunk(y: Fill<'_>, a: &[f32], b: &[f32], positive: &mut [u64]) -> f32 {
    y.zip_map_max_abs_positive(a, b, positive, |u, v| (u + v).max(0.0))
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn relu_backward_positive_chunk(o: Fill<'_>, positive: &[u64], g: &[f32]) {
    o.select_bits(g, positive);
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_chunk(y: Fill<'_>, a: &[f32], b: &[f32]) -> f32 {
    y.zip_map_max_abs(a, b, |u, v| u + v)
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn add_assign_chunk(acc: &mut [f32], b: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(b) {
        *a += v;
    }
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn relu_backward_chunk(o: Fill<'_>, y: &[f32], g: &[f32]) {
    o.zip_map(y, g, |yv, gv| if yv > 0.0 { gv } else { 0.0 });
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn clamp_relu_chunk(y: Fill<'_>, x: &[f32], cap: f32) {
    y.map(x, |v| v.max(0.0).min(cap));
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn clamp_relu_backward_chunk(o: Fill<'_>, x: &[f32], g: &[f32], cap: f32) {
    o.zip_map(x, g, |v, gv| if (v > 0.0) & (v < cap) { gv } else { 0.0 });
}

/// `y = max(a + b, 0)`, the end of a residual block, in one pass; returns the largest `|y|` (NaN
/// ignored), for an INT8 consumer's quantizer.
pub fn add_relu<'y>(a: &[f32], b: &[f32], y: impl Into<Out<'y>>) -> Result<f32> {
    let y = y.into();
    check_len("residual add operand", b.len(), a.len())?;
    check_len("residual add output", y.len(), a.len())?;
    Ok(y.par_fills(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .map(|((y, a), b)| add_relu_chunk(y, a, b))
        .reduce(|| 0.0, f32::max))
}

/// [`add_relu`] for training: also sets bit `i % 64` of `positive[i / 64]` where `y[i] > 0`, which
/// is all that [`relu_backward_positive`] needs, so the backward pass keeps a 32nd of `y`'s bytes
/// (`y` itself goes on to an INT8 convolution as 8-bit codes). `positive` holds
/// `a.len().div_ceil(64)` words.
pub fn add_relu_positive<'y>(a: &[f32], b: &[f32], y: impl Into<Out<'y>>, positive: &mut [u64]) -> Result<f32> {
    let y = y.into();
    check_len("residual add operand", b.len(), a.len())?;
    check_len("residual add output", y.len(), a.len())?;
    check_len("residual add sign bits", positive.len(), a.len().div_ceil(64))?;
    const { assert!(CHUNK.is_multiple_of(64)) };
    Ok(y.par_fills(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .zip(positive.par_chunks_mut(CHUNK / 64))
        .map(|(((y, a), b), p)| add_relu_positive_chunk(y, a, b, p))
        .reduce(|| 0.0, f32::max))
}

/// [`relu_backward`] from the sign bits [`add_relu_positive`] set: `dy` where the bit is set,
/// else 0.
pub fn relu_backward_positive<'x>(positive: &[u64], dy: &[f32], dx: impl Into<Out<'x>>) -> Result<()> {
    let dx = dx.into();
    check_len("relu sign bits", positive.len(), dy.len().div_ceil(64))?;
    check_len("relu input gradient", dx.len(), dy.len())?;
    dx.par_fills(CHUNK)
        .zip(positive.par_chunks(CHUNK / 64))
        .zip(dy.par_chunks(CHUNK))
        .for_each(|((o, p), g)| relu_backward_positive_chunk(o, p, g));
    Ok(())
}

/// `y = a + b` (a residual add without activation, as MobileNetV2's), in one pass; returns the
/// largest `|y|` (NaN ignored).
pub fn add<'y>(a: &[f32], b: &[f32], y: impl Into<Out<'y>>) -> Result<f32> {
    let y = y.into();
    check_len("add operand", b.len(), a.len())?;
    check_len("add output", y.len(), a.len())?;
    Ok(y.par_fills(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .map(|((y, a), b)| add_chunk(y, a, b))
        .reduce(|| 0.0, f32::max))
}

/// `acc += b` in place, on all threads: how the tape sums the gradients reaching one value.
pub fn add_assign(acc: &mut [f32], b: &[f32]) -> Result<()> {
    check_len("accumulated operand", b.len(), acc.len())?;
    acc.par_chunks_mut(CHUNK).zip(b.par_chunks(CHUNK)).for_each(|(a, b)| add_assign_chunk(a, b));
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
        .for_each(|((o, y), g)| relu_backward_chunk(o, y, g));
    Ok(())
}

/// `y = min(max(x, 0), cap)`: ReLU (`cap` infinite) or ReLU6 (`cap = 6`).
pub fn clamp_relu<'y>(x: &[f32], cap: f32, y: impl Into<Out<'y>>) -> Result<()> {
    let y = y.into();
    check_len("relu output", y.len(), x.len())?;
    y.par_fills(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| clamp_relu_chunk(y, x, cap));
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
        .for_each(|((o, x), g)| clamp_relu_backward_chunk(o, x, g, cap));
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

    /// The sign bits give the same output and gradient as the f32 output they replace, over
    /// lengths that end mid-word and span several chunks, with zeros of both signs, NaN and
    /// infinities among the sums.
    #[test]
    fn add_relu_sign_bits_give_what_the_output_gives() {
        let r = crate::rng::CounterRng::new(11);
        for n in [1, 63, 64, 65, 1000, CHUNK, 2 * CHUNK + 77] {
            let mut a: Vec<f32> = (0..n).map(|i| r.uniform(i as u64) * 4.0 - 2.0).collect();
            let b: Vec<f32> = (0..n).map(|i| r.uniform((n + i) as u64) * 4.0 - 2.0).collect();
            let specials = [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
            for (i, v) in specials.into_iter().enumerate().take(n) {
                a[i * n / 6] = v;
            }
            // A sum of exactly zero.
            a[n - 1] = -b[n - 1];
            let mut want = vec![0.0; n];
            let max_want = add_relu(&a, &b, &mut want).unwrap();
            let mut y = vec![9.0; n];
            let mut bits = vec![u64::MAX; n.div_ceil(64)];
            let max_got = add_relu_positive(&a, &b, &mut y, &mut bits).unwrap();
            assert_eq!(max_got.to_bits(), max_want.to_bits(), "n = {n}");
            assert!(y.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()), "n = {n}");
            for (i, &v) in want.iter().enumerate() {
                assert_eq!((bits[i / 64] >> (i % 64)) & 1 == 1, v > 0.0, "n = {n}, bit {i}");
            }
            if n % 64 != 0 {
                assert_eq!(bits[n / 64] >> (n % 64), 0, "n = {n}: bits past the end");
            }
            let g: Vec<f32> = (0..n).map(|i| r.uniform((2 * n + i) as u64) - 0.5).collect();
            let mut dx_want = vec![0.0; n];
            relu_backward(&want, &g, &mut dx_want).unwrap();
            let mut dx = vec![9.0; n];
            relu_backward_positive(&bits, &g, &mut dx).unwrap();
            assert!(dx.iter().zip(&dx_want).all(|(g, w)| g.to_bits() == w.to_bits()), "n = {n}");
        }
        let mut y = [0.0; 3];
        assert!(add_relu_positive(&[1.0; 3], &[1.0; 3], &mut y, &mut []).is_err());
        assert!(relu_backward_positive(&[], &[1.0; 3], &mut y).is_err());
    }

    /// The largest |y| the residual adds report is the quantizer's own `max_abs` of the output,
    /// exactly, over lengths that end mid-lane and span several chunks.
    #[test]
    fn the_adds_report_the_quantizers_maximum_of_their_output() {
        let r = crate::rng::CounterRng::new(7);
        for n in [5, 16, 3 * CHUNK + 21] {
            let a: Vec<f32> = (0..n).map(|i| r.uniform(i as u64) * 6.0 - 3.0).collect();
            let b: Vec<f32> = (0..n).map(|i| r.uniform((n + i) as u64) * 2.0 - 1.5).collect();
            let mut y = vec![0.0; n];
            let m = add_relu(&a, &b, &mut y).unwrap();
            assert_eq!(m.to_bits(), crate::quant::max_abs("y", &y).unwrap().to_bits(), "add_relu, {n}");
            let m = add(&a, &b, &mut y).unwrap();
            assert_eq!(m.to_bits(), crate::quant::max_abs("y", &y).unwrap().to_bits(), "add, {n}");
        }
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

    #[test]
    fn long_inputs_match_the_scalar_definitions_in_every_lane() {
        // Lengths past one chunk and not a multiple of any vector width, with values on the
        // boundaries (0 and the cap) and on both sides of them.
        for n in [1, 17, 100, CHUNK + 37, 3 * CHUNK + 5] {
            let x: Vec<f32> =
                (0..n).map(|i| [-1.5, 0.0, 0.25, 6.0, 7.0, 3.0, -0.0][i % 7] * (1 + i % 3) as f32).collect();
            let g: Vec<f32> = (0..n).map(|i| i as f32 - 0.5).collect();
            let (mut y, mut dx) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            for cap in [6.0, f32::INFINITY] {
                clamp_relu(&x, cap, &mut y).unwrap();
                clamp_relu_backward(&x, cap, &g, &mut dx).unwrap();
                for i in 0..n {
                    assert_eq!(y[i], x[i].max(0.0).min(cap), "n = {n}, cap = {cap}, element {i}");
                    let want = if x[i] > 0.0 && x[i] < cap { g[i] } else { 0.0 };
                    assert_eq!(dx[i], want, "n = {n}, cap = {cap}, element {i}");
                }
            }
            add_relu(&x, &g, &mut y).unwrap();
            relu_backward(&x, &g, &mut dx).unwrap();
            let mut sum = vec![f32::NAN; n];
            add(&x, &g, &mut sum).unwrap();
            let mut acc = x.clone();
            add_assign(&mut acc, &g).unwrap();
            for i in 0..n {
                assert_eq!(sum[i], x[i] + g[i], "n = {n}, element {i}");
                assert_eq!(acc[i], x[i] + g[i], "n = {n}, element {i}");
                assert_eq!(y[i], (x[i] + g[i]).max(0.0), "n = {n}, element {i}");
                assert_eq!(dx[i], if x[i] > 0.0 { g[i] } else { 0.0 }, "n = {n}, element {i}");
            }
        }
    }
}
