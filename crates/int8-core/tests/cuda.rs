//! Every GPU kernel family of `int8_core::cuda` against its CPU function, on a GPU:
//! `cargo test -p int8-core --features cuda --test cuda`.
//!
//! Bit for bit (f32 bit patterns equal, a zero's sign aside where Rust leaves `max(-0, 0)`
//! unspecified): quantization, the INT8 GEMMs and convolutions, the depthwise convolutions at both
//! precisions, batch norm, the elementwise ops, pooling, dropout and SGD. Within a stated bound:
//! FP32 convolutions and GEMMs (1e-5 of the sum of absolute terms against the f64 reference, the
//! CPU tests' bound), DSGC's distance (1e-6 relative, the bar; equal within one CPU chunk),
//! and the loss (1e-12 relative; a gradient value within one f32 ulp, since `exp`/`log` are
//! CUDA's). The CUDA libraries are found as the NVRTC test finds NVRTC: pip's `nvidia/cu13/lib`
//! (`nvidia-cuda-nvrtc`, `nvidia-cublas`) when Python has it, else the system's library path.
#![cfg(feature = "cuda")]

use std::sync::OnceLock;

use int8_core::conv::{self, ConvShape, QView, reference};
use int8_core::cuda::{self, CudaSlice, Gpu};
use int8_core::dsgc::{self, ClipMode, ClipState};
use int8_core::gemm::{self, Int8Path, MatMut, MatRef, Parallelism};
use int8_core::nn::batchnorm::{self, NchwDims};
use int8_core::nn::{elementwise, loss, pool};
use int8_core::quant::{self, Granularity, Rounding};
use int8_core::rng::CounterRng;

/// Loads the CUDA libraries from pip's `nvidia/cu13/lib` by full path where Python has them, so
/// that cudarc's `dlopen` by soname finds them without LD_LIBRARY_PATH (dependencies first).
fn preload_pip_libraries() {
    let script = "import os, nvidia\nfor p in nvidia.__path__: print(os.path.join(p, 'cu13', 'lib'))";
    let Ok(out) = std::process::Command::new("python3").args(["-c", script]).output() else { return };
    for dir in String::from_utf8_lossy(&out.stdout).lines().map(std::path::PathBuf::from) {
        for lib in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13", "libcublasLt.so.13", "libcublas.so.13"] {
            let path = dir.join(lib);
            if !path.is_file() {
                continue;
            }
            let c = std::ffi::CString::new(path.to_string_lossy().into_owned()).expect("a path without NUL");
            // SAFETY: a NUL-terminated path that outlives the call; the handle is never closed.
            unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        }
    }
}

/// The GPU all tests share (one context; each test uses its own buffers on its stream).
fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        preload_pip_libraries();
        match Gpu::new(0) {
            Ok(g) => {
                eprintln!("gpu: {} (sm_{}{})", g.name(), g.arch().0, g.arch().1);
                g
            }
            Err(e) => panic!("these tests need a gpu with cuda 13: {e}"),
        }
    })
}

fn up<T: cudarc::driver::DeviceRepr>(v: &[T]) -> CudaSlice<T> {
    gpu().upload(v).expect("upload")
}

fn down<T: cudarc::driver::DeviceRepr + Clone + Default>(v: &CudaSlice<T>) -> Vec<T> {
    gpu().download(v).expect("download")
}

fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(n: usize) -> CudaSlice<T> {
    gpu().zeros(n).expect("alloc")
}

/// Uniform values in `[-scale, scale) + offset`.
fn floats(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| (rng.uniform(i as u64) * 2.0 - 1.0) * scale + offset).collect()
}

/// Heavy-tailed values (a Student-t with 3 degrees of freedom, roughly), like gradients.
fn heavy(n: usize, seed: u64) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n)
        .map(|i| {
            let u = rng.uniform_f64(2 * i as u64).max(1e-12);
            let v = rng.uniform_f64(2 * i as u64 + 1);
            let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            (z / (0.2 + v * v).sqrt()) as f32 * 1e-3
        })
        .collect()
}

fn codes(n: usize, seed: u64) -> Vec<i8> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| ((rng.bits(i as u64) % 255) as i32 - 127) as i8).collect()
}

/// Equal bit patterns, except that +0 and -0 are taken as equal, and any two NaNs.
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a == 0.0 && b == 0.0) || (a.is_nan() && b.is_nan())
}

fn assert_bits(what: &str, gpu: &[f32], cpu: &[f32]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    if let Some(i) = (0..gpu.len()).find(|&i| !same(gpu[i], cpu[i])) {
        let bad = (0..gpu.len()).filter(|&i| !same(gpu[i], cpu[i])).count();
        panic!(
            "{what}: {bad} of {} values differ; first at {i}: gpu {:e} ({:#x}), cpu {:e} ({:#x})",
            gpu.len(),
            gpu[i],
            gpu[i].to_bits(),
            cpu[i],
            cpu[i].to_bits()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization

#[test]
fn quantization_matches_the_cpu_bit_for_bit() {
    // Lengths: one short tensor, one spanning several of the CPU's chunks with a ragged tail.
    for (n, seed) in [(1000usize, 1u64), (3 * 32768 + 1234, 2)] {
        let x = floats(n, seed, 3.0, 0.1);
        let xd = up(&x);
        assert_eq!(cuda::quant::max_abs(gpu(), "x", &xd).unwrap(), quant::max_abs("x", &x).unwrap());
        for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 42 }] {
            for clip in [0.0f32, 0.5, 2.9, 10.0] {
                let want = quant::quantize_with_clip("x", &x, clip, rounding).unwrap();
                let got = cuda::quant::quantize_with_clip(gpu(), "x", &xd, clip, rounding).unwrap();
                assert_eq!(down(&got.codes), want.data, "n {n} clip {clip} {rounding:?} codes");
                assert_eq!(
                    (got.scales.clone(), got.saturated),
                    (want.scales.clone(), want.saturated),
                    "n {n} clip {clip}"
                );
            }
            let want = quant::quantize("x", &x, Granularity::PerTensor, 1, rounding).unwrap();
            let got = cuda::quant::quantize(gpu(), "x", &xd, Granularity::PerTensor, 1, rounding).unwrap();
            assert_eq!(down(&got.codes), want.data, "n {n} per tensor {rounding:?}");
            assert_eq!((got.scales, got.saturated), (want.scales, want.saturated));
        }
    }
    // Per channel: channels of different ranges, a channel of zeros, lengths not a multiple of 16.
    let (channels, len) = (7usize, 333usize);
    let mut w: Vec<f32> =
        (0..channels * len).map(|i| floats(1, i as u64, 1.0, 0.0)[0] * (1 + i / len) as f32).collect();
    w[3 * len..4 * len].fill(0.0);
    let wd = up(&w);
    for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 7 }] {
        let want = quant::quantize("w", &w, Granularity::PerChannel, channels, rounding).unwrap();
        let got = cuda::quant::quantize(gpu(), "w", &wd, Granularity::PerChannel, channels, rounding).unwrap();
        assert_eq!(down(&got.codes), want.data, "per channel {rounding:?}");
        assert_eq!((got.scales, got.saturated), (want.scales, want.saturated));
    }
    let err = cuda::quant::quantize(gpu(), "w", &wd, Granularity::PerChannel, 5, Rounding::Nearest).unwrap_err();
    assert_eq!(err, quant::quantize("w", &w, Granularity::PerChannel, 5, Rounding::Nearest).unwrap_err());
}

#[test]
fn non_finite_values_are_the_cpu_s_error() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut x = floats(100_000, 3, 1.0, 0.0);
        x[77_777] = bad;
        x[90_000] = f32::NAN;
        let xd = up(&x);
        let want = quant::quantize("layer3.conv2.grad", &x, Granularity::PerTensor, 1, Rounding::Nearest).unwrap_err();
        let got = cuda::quant::quantize(gpu(), "layer3.conv2.grad", &xd, Granularity::PerTensor, 1, Rounding::Nearest)
            .unwrap_err();
        assert_eq!(got.to_string(), want.to_string());
        assert!(cuda::quant::quantize_with_clip(gpu(), "g", &xd, 1.0, Rounding::Nearest).is_err());
        assert!(cuda::dsgc::search_clip(gpu(), "g", &xd).unwrap_err().to_string().contains("77777"));
    }
    let xd = up(&[1.0f32]);
    assert!(cuda::quant::quantize_with_clip(gpu(), "g", &xd, f32::NAN, Rounding::Nearest).is_err());
}

// ---------------------------------------------------------------------------------------------
// DSGC

fn relative(a: f64, b: f64) -> f64 {
    if a == b { 0.0 } else { (a - b).abs() / b.abs().max(1e-300) }
}

#[test]
fn dsgc_distance_and_search_match_the_cpu() {
    let mut worst = 0.0f64;
    // Up to 16384 values the CPU adds one chunk and the GPU's sums are its own: equal.
    for (n, seed, exact) in [(10_007usize, 11u64, true), (16_384, 12, true), (300_007, 13, false)] {
        let g = heavy(n, seed);
        let gd = up(&g);
        let amax = quant::max_abs("g", &g).unwrap();
        for f in [0.0f32, 0.01, 0.1, 0.3, 1.0] {
            let clip = amax * f;
            let (got, want) = (cuda::dsgc::cosine_distance(gpu(), &gd, clip).unwrap(), dsgc::cosine_distance(&g, clip));
            if exact {
                assert_eq!(got, want, "n {n} clip {clip}");
            }
            assert!(relative(got, want) <= 1e-6, "n {n} clip {clip}: gpu {got} cpu {want}");
            worst = worst.max(relative(got, want));
        }
        let (got, want) = (cuda::dsgc::search_clip(gpu(), "g", &gd).unwrap(), dsgc::search_clip("g", &g).unwrap());
        assert_eq!((got.clip, got.evaluations), (want.clip, want.evaluations), "n {n}: the search chose another clip");
        assert!(relative(got.distance, want.distance) <= 1e-6, "n {n}");
        // The fused pass of ClipState::quantize (at max|g|, ClipMode::MaxAbs), both roundings.
        for rounding in [Rounding::Nearest, Rounding::Stochastic { seed: 5 }] {
            let (q, up) = ClipState::new(ClipMode::MaxAbs).quantize("g", &g, rounding).unwrap();
            let (gq, d) = cuda::dsgc::quantize_with_distance(gpu(), "g", &gd, up.clip, rounding).unwrap();
            assert_eq!(down(&gq.codes), q.data, "n {n} {rounding:?}");
            assert_eq!((gq.scales, gq.saturated), (q.scales, q.saturated));
            if n <= 32_768 {
                assert_eq!(d, up.distance, "n {n} {rounding:?}");
            }
            assert!(relative(d, up.distance) <= 1e-6, "n {n} {rounding:?}: {d} vs {}", up.distance);
        }
    }
    eprintln!("dsgc: largest relative difference of the distance {worst:e}");
    let zero = up(&[0.0f32; 10]);
    assert_eq!(cuda::dsgc::cosine_distance(gpu(), &zero, 1.0).unwrap(), 0.0);
    assert_eq!(cuda::dsgc::cosine_distance(gpu(), &up(&[1.0f32, -2.0]), 0.0).unwrap(), 1.0);
    assert_eq!(cuda::dsgc::search_clip(gpu(), "z", &zero).unwrap(), dsgc::search_clip("z", &[0.0; 10]).unwrap());
}

/// `cuda::dsgc::clip_quantize` (the GPU's `ClipState::quantize`, as int8-nn's INT8 layers call it)
/// advances a layer's clip state as the CPU's does: periodic searches, the clip value in force
/// between them, a stale value searched again, `max|g|` without DSGC; codes and updates equal.
#[test]
fn clip_state_steps_match_the_cpu() {
    let modes = [ClipMode::MaxAbs, ClipMode::dsgc(3), ClipMode::Dsgc { interval: 100, stale_ratio: Some(1.5) }];
    for mode in modes {
        let (mut cpu, mut gpu_state) = (ClipState::new(mode), ClipState::new(mode));
        for step in 0..7u64 {
            // The gradient grows tenfold at step 4, so that a stale clip value is searched again.
            let grow = if step >= 4 { 10.0 } else { 1.0 };
            let g: Vec<f32> = heavy(5_000, 40 + step).iter().map(|v| v * grow).collect();
            let rounding = if step % 2 == 0 { Rounding::Nearest } else { Rounding::Stochastic { seed: step } };
            let (q, want) = cpu.quantize("g", &g, rounding).unwrap();
            let (gq, got) = cuda::dsgc::clip_quantize(gpu(), &mut gpu_state, "g", &up(&g), rounding).unwrap();
            assert_eq!(got, want, "{mode:?} step {step}: clip update");
            assert_eq!(down(&gq.codes), q.data, "{mode:?} step {step}: codes");
            assert_eq!((gq.scales, gq.saturated), (q.scales, q.saturated), "{mode:?} step {step}");
            assert_eq!(gpu_state.snapshot(), cpu.snapshot(), "{mode:?} step {step}: state");
        }
        if let ClipMode::Dsgc { stale_ratio: Some(_), .. } = mode {
            assert!(cpu.searches() >= 2, "the stale value was never searched again: the test is not testing it");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GEMM

#[test]
fn int8_gemm_is_exact_and_scaled_as_on_the_cpu() {
    for (m, n, k) in [(1usize, 1usize, 1usize), (7, 13, 5), (33, 65, 300), (16, 16, 16), (5, 200, 3001)] {
        let (a, b) = (codes(m * k, 1), codes(k * n, 2));
        let (ar, br) = (MatRef::row_major(&a, m, k).unwrap(), MatRef::row_major(&b, k, n).unwrap());
        let d = cuda::gemm::Dims { m, n, k };
        let got = down(&cuda::gemm::gemm_i8(gpu(), &up(&a), &up(&b), d).unwrap());
        let want: Vec<i32> = gemm::reference::gemm_i8_i64(ar, br).into_iter().map(|v| v as i32).collect();
        assert_eq!(got, want, "{m}x{n}x{k}");
        let scales: Vec<f32> = (0..m).map(|i| 0.001 * (i + 1) as f32 + 1e-7).collect();
        let got = down(&cuda::gemm::gemm_i8_scaled(gpu(), &up(&a), &up(&b), d, &scales).unwrap());
        let mut want = vec![0.0f32; m * n];
        gemm::gemm_i8_scaled(
            Int8Path::detect(),
            ar,
            br,
            MatMut::row_major(&mut want, m, n).unwrap(),
            &scales,
            Parallelism::None,
        )
        .unwrap();
        assert_bits(&format!("scaled {m}x{n}x{k}"), &got, &want);
    }
    let deep = cuda::gemm::Dims { m: 1, n: 1, k: gemm::MAX_K_I8 + 1 };
    assert!(cuda::gemm::gemm_i8(gpu(), &up(&vec![1i8; deep.k]), &up(&vec![1i8; deep.k]), deep).is_err());
}

/// cuBLASLt accepts the INT8 layout (TN, padded to 16) and runs every INT8 product: where it
/// refuses one, the products still come out exact from the fallback kernel (the other tests), and
/// this test names cuBLASLt's reason.
#[test]
fn int8_products_run_on_cublaslt() {
    let (a, b) = (codes(40 * 300, 1), codes(300 * 50, 2));
    let d = cuda::gemm::Dims { m: 40, n: 50, k: 300 };
    let got = down(&cuda::gemm::gemm_i8(gpu(), &up(&a), &up(&b), d).unwrap());
    let (ar, br) = (MatRef::row_major(&a, 40, 300).unwrap(), MatRef::row_major(&b, 300, 50).unwrap());
    assert_eq!(got, gemm::reference::gemm_i8_i64(ar, br).into_iter().map(|v| v as i32).collect::<Vec<_>>());
    assert_eq!(gpu().int8_gemm_fallback(), None, "cublaslt refused an int8 product; the fallback kernel ran it");
}

/// `transpose_i8` against the naive transpose: one value, wide, tall.
#[test]
fn int8_transpose_matches_the_naive_one() {
    for (rows, cols) in [(1usize, 1usize), (7, 13), (64, 10), (300, 3)] {
        let a = codes(rows * cols, 9);
        let got = down(&cuda::gemm::transpose_i8(gpu(), &up(&a), rows, cols).unwrap());
        let want: Vec<i8> =
            (0..cols).flat_map(|c| (0..rows).map(move |r| (r, c))).map(|(r, c)| a[r * cols + c]).collect();
        assert_eq!(got, want, "{rows}x{cols}");
    }
}

#[test]
fn fp32_gemm_is_true_fp32() {
    for (m, n, k) in [(1usize, 1usize, 1usize), (7, 13, 5), (64, 100, 577)] {
        let (a, b) = (floats(m * k, 3, 1.0, 0.0), floats(k * n, 4, 1.0, 0.0));
        let d = cuda::gemm::Dims { m, n, k };
        let mut c = up(&vec![f32::NAN; m * n]);
        cuda::gemm::gemm_f32(gpu(), &up(&a), &up(&b), d, &mut c, false).unwrap();
        let (ar, br) = (MatRef::row_major(&a, m, k).unwrap(), MatRef::row_major(&b, k, n).unwrap());
        let want = gemm::reference::gemm_f64(ar, br);
        let (aa, ba): (Vec<f32>, Vec<f32>) = (a.iter().map(|v| v.abs()).collect(), b.iter().map(|v| v.abs()).collect());
        let bound =
            gemm::reference::gemm_f64(MatRef::row_major(&aa, m, k).unwrap(), MatRef::row_major(&ba, k, n).unwrap());
        // TF32 would be off by about 1e-3 of the bound; true FP32 by about k * 2^-24.
        let got = down(&c);
        for i in 0..m * n {
            assert!(
                (got[i] as f64 - want[i]).abs() <= 1e-5 * bound[i],
                "{m}x{n}x{k} at {i}: {} vs {}",
                got[i],
                want[i]
            );
        }
        // Accumulating adds to what is there.
        cuda::gemm::gemm_f32(gpu(), &up(&a), &up(&b), d, &mut c, true).unwrap();
        let twice = down(&c);
        for i in 0..m * n {
            assert!((twice[i] as f64 - 2.0 * want[i]).abs() <= 2e-5 * bound[i], "accumulate at {i}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Convolutions

/// `base` with a 3x2 kernel, stride (3, 2), dilation (2, 3) and padding (3, 1).
fn uneven(base: ConvShape) -> ConvShape {
    ConvShape { kh: 3, kw: 2, stride: (3, 2), dilation: (2, 3), pad: (3, 1), ..base }
}

/// The CPU tests' shapes and the issue's: 3x3 stride 1 and 2, 1x1 stride 2, 7x7 stride 2 pad 3,
/// dilation, groups, depthwise, large batches, and odd sizes that exercise the padding to 16.
fn shapes() -> Vec<(&'static str, ConvShape)> {
    let sq = ConvShape::square;
    vec![
        ("3x3 s1 p1", sq(2, 3, 7, 5, 3, 1, 1)),
        ("3x3 s2 p1 odd", sq(2, 4, 9, 6, 3, 2, 1)),
        ("3x3 dilation 2", ConvShape { dilation: (2, 2), pad: (2, 2), ..sq(2, 3, 8, 4, 3, 1, 2) }),
        (
            "1x3 rect stride (1,2)",
            ConvShape { h: 5, w: 8, kh: 1, kw: 3, stride: (1, 2), pad: (0, 1), ..sq(2, 3, 5, 4, 3, 1, 1) },
        ),
        ("groups 2", sq(2, 4, 6, 6, 3, 1, 1).with_groups(2)),
        ("groups 4, 3x3 s2", sq(3, 8, 9, 12, 3, 2, 1).with_groups(4)),
        ("depthwise 3x3 s1", sq(2, 5, 7, 5, 3, 1, 1).with_groups(5)),
        ("depthwise 3x3 s2", sq(3, 4, 9, 4, 3, 2, 1).with_groups(4)),
        (
            "depthwise 5x5 dilated",
            ConvShape { dilation: (2, 1), pad: (4, 2), ..sq(2, 3, 9, 3, 5, 1, 2).with_groups(3) },
        ),
        ("depthwise 3x3 s2 16x16", sq(2, 3, 16, 3, 3, 2, 1).with_groups(3)),
        ("depthwise 5x5 s2 p2 7x7", sq(2, 2, 7, 2, 5, 2, 2).with_groups(2)),
        ("depthwise 3x2 stride (3,2) dilation (2,3)", uneven(sq(2, 3, 11, 3, 3, 1, 1).with_groups(3))),
        ("depthwise 2x2 s3: pixels no tap reads", sq(2, 2, 10, 2, 2, 3, 0).with_groups(2)),
        (
            "depthwise 3x3 s1 32x32, 17 images (more than one group of sixteen)",
            sq(17, 6, 32, 6, 3, 1, 1).with_groups(6),
        ),
        ("depthwise multiplier 2", sq(2, 3, 6, 6, 3, 1, 1).with_groups(3)),
        ("pointwise 1x1", sq(3, 8, 6, 4, 1, 1, 0)),
        ("1x1 stride 2", sq(2, 4, 7, 6, 1, 2, 0)),
        ("7x7 s2 p3 (a stem)", sq(2, 3, 29, 8, 7, 2, 3)),
        ("batch 1", sq(1, 6, 10, 7, 3, 1, 1)),
        ("batch 9", sq(9, 3, 6, 4, 3, 2, 1)),
        ("3x3 s1 p1 8x16, 11 channels", ConvShape { h: 8, w: 16, ..sq(2, 11, 8, 9, 3, 1, 1) }),
        ("5x5 to 1x1", sq(2, 2, 5, 3, 5, 1, 0)),
        ("wide reduction", sq(2, 40, 5, 70, 3, 1, 1)),
        ("3x3 s2 p1 32x32", sq(1, 2, 32, 3, 3, 2, 1)),
        ("5x5 s2 p2", sq(2, 3, 9, 4, 5, 2, 2)),
        ("2x2 s3: phases no tap reaches", sq(2, 3, 10, 4, 2, 3, 0)),
        ("3x2 stride (3,2) dilation (2,3) groups 2", uneven(sq(2, 4, 11, 6, 3, 1, 1).with_groups(2))),
        ("1x1 pad 1 (padding wider than the kernel)", sq(2, 3, 5, 4, 1, 1, 1)),
        ("ResNet-20 layer, 3x3 s1 16->16 32x32, batch 8", sq(8, 16, 32, 16, 3, 1, 1)),
    ]
}

/// Per-tensor and per-channel scales that make the scaled products non-trivial.
fn scales(c: usize, seed: u64) -> Vec<f32> {
    floats(c, seed, 0.004, 0.005)
}

#[test]
fn int8_convolutions_match_the_cpu_bit_for_bit() {
    let path = Int8Path::detect();
    for (name, s) in shapes() {
        let (x, w, dy) = (codes(s.x_len(), 4), codes(s.w_len(), 5), codes(s.y_len(), 6));
        let (xd, wd, dyd) = (up(&x), up(&w), up(&dy));
        let (sx, sdy, sw1) = ([0.0123f32], [0.00071f32], [0.0291f32]);
        let sw = scales(s.c_out, 9);
        // Forward with per-channel and with per-tensor weight scales.
        for wsc in [&sw[..], &sw1[..]] {
            let mut want = vec![f32::NAN; s.y_len()];
            conv::conv2d_fwd_i8(
                path,
                &s,
                QView { codes: &x, scales: &sx },
                QView { codes: &w, scales: wsc },
                &mut want,
            )
            .unwrap();
            let mut got = up(&vec![f32::NAN; s.y_len()]);
            cuda::conv::conv2d_fwd_i8(
                gpu(),
                &s,
                cuda::GpuQView { codes: &xd, scales: &sx },
                cuda::GpuQView { codes: &wd, scales: wsc },
                &mut got,
            )
            .unwrap();
            assert_bits(&format!("{name} fwd ({} weight scales)", wsc.len()), &down(&got), &want);
        }
        // Input gradient: per tensor, and per channel where depthwise allows it.
        let dx_scales: Vec<&[f32]> = if s.is_depthwise() { vec![&sw1[..], &sw[..]] } else { vec![&sw1[..]] };
        for wsc in dx_scales {
            let mut want = vec![f32::NAN; s.x_len()];
            conv::conv2d_dx_i8(
                path,
                &s,
                QView { codes: &w, scales: wsc },
                QView { codes: &dy, scales: &sdy },
                &mut want,
            )
            .unwrap();
            let mut got = up(&vec![f32::NAN; s.x_len()]);
            cuda::conv::conv2d_dx_i8(
                gpu(),
                &s,
                cuda::GpuQView { codes: &wd, scales: wsc },
                cuda::GpuQView { codes: &dyd, scales: &sdy },
                &mut got,
            )
            .unwrap();
            assert_bits(&format!("{name} dx ({} weight scales)", wsc.len()), &down(&got), &want);
        }
        let mut want = vec![f32::NAN; s.w_len()];
        conv::conv2d_dw_i8(path, &s, QView { codes: &x, scales: &sx }, QView { codes: &dy, scales: &sdy }, &mut want)
            .unwrap();
        let mut got = up(&vec![f32::NAN; s.w_len()]);
        cuda::conv::conv2d_dw_i8(
            gpu(),
            &s,
            cuda::GpuQView { codes: &xd, scales: &sx },
            cuda::GpuQView { codes: &dyd, scales: &sdy },
            &mut got,
        )
        .unwrap();
        assert_bits(&format!("{name} dw"), &down(&got), &want);
        // With unit scales the outputs are the integer sums: the f64 reference itself.
        let one = [1.0f32];
        let mut got = up(&vec![f32::NAN; s.y_len()]);
        cuda::conv::conv2d_fwd_i8(
            gpu(),
            &s,
            cuda::GpuQView { codes: &xd, scales: &one },
            cuda::GpuQView { codes: &wd, scales: &one },
            &mut got,
        )
        .unwrap();
        let f64s = |v: &[i8]| v.iter().map(|&c| c as f64).collect::<Vec<f64>>();
        let want = reference::conv2d_fwd(&s, &f64s(&x), &f64s(&w));
        assert_eq!(down(&got).iter().map(|&v| v as f64).collect::<Vec<_>>(), want, "{name} fwd against the reference");
    }
    // Per-channel weight scales are refused for the input gradient of a general convolution.
    let s = ConvShape::square(2, 3, 6, 4, 3, 1, 1);
    let (w, dy) = (up(&codes(s.w_len(), 1)), up(&codes(s.y_len(), 2)));
    let sw = scales(4, 3);
    let mut dx = zeros::<f32>(s.x_len());
    let err = cuda::conv::conv2d_dx_i8(
        gpu(),
        &s,
        cuda::GpuQView { codes: &w, scales: &sw },
        cuda::GpuQView { codes: &dy, scales: &[1.0] },
        &mut dx,
    )
    .unwrap_err();
    assert!(err.to_string().contains("per tensor"), "{err}");
}

/// The weight gradient sums over batch x H x W beyond i32 (64 x 64 x 64 products of 127 x 127,
/// and 9000 images of 4x4): the GPU carries the chunks in i64 as the CPU does.
#[test]
fn int8_weight_gradient_carries_large_batches_in_i64() {
    let sq = ConvShape::square;
    for s in [
        sq(64, 1, 64, 1, 1, 1, 0),
        sq(64, 1, 64, 2, 3, 1, 1),
        sq(9000, 1, 4, 1, 1, 1, 0),
        sq(9000, 1, 4, 2, 3, 1, 1),
        sq(300, 2, 16, 3, 3, 2, 1).with_groups(1),
    ] {
        let (x, dy) = (vec![127i8; s.x_len()], vec![127i8; s.y_len()]);
        let one = [1.0f32];
        let want = reference::conv2d_dw(&s, &vec![127.0; s.x_len()], &vec![127.0; s.y_len()]);
        let mut cpu = vec![0.0f32; s.w_len()];
        conv::conv2d_dw_i8(
            Int8Path::detect(),
            &s,
            QView { codes: &x, scales: &one },
            QView { codes: &dy, scales: &one },
            &mut cpu,
        )
        .unwrap();
        let mut got = zeros::<f32>(s.w_len());
        cuda::conv::conv2d_dw_i8(
            gpu(),
            &s,
            cuda::GpuQView { codes: &up(&x), scales: &one },
            cuda::GpuQView { codes: &up(&dy), scales: &one },
            &mut got,
        )
        .unwrap();
        let got = down(&got);
        assert_bits(&format!("{s:?}"), &got, &cpu);
        for (&g, &w) in got.iter().zip(&want) {
            assert_eq!(g, w as f32, "{s:?}");
        }
    }
    // Random codes over a long batch, with scales.
    let s = sq(200, 3, 12, 5, 3, 1, 1);
    let (x, dy) = (codes(s.x_len(), 8), codes(s.y_len(), 9));
    let (sx, sdy) = ([0.013f32], [0.0007f32]);
    let mut cpu = vec![0.0f32; s.w_len()];
    conv::conv2d_dw_i8(
        Int8Path::detect(),
        &s,
        QView { codes: &x, scales: &sx },
        QView { codes: &dy, scales: &sdy },
        &mut cpu,
    )
    .unwrap();
    let mut got = zeros::<f32>(s.w_len());
    cuda::conv::conv2d_dw_i8(
        gpu(),
        &s,
        cuda::GpuQView { codes: &up(&x), scales: &sx },
        cuda::GpuQView { codes: &up(&dy), scales: &sdy },
        &mut got,
    )
    .unwrap();
    assert_bits("long batch", &down(&got), &cpu);
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

/// `|got - want| <= 1e-5 * bound` per element (the CPU conv tests' bound).
fn assert_close(what: &str, got: &[f32], want: &[f64], bound: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        assert!((g as f64 - w).abs() <= 1e-5 * b + 1e-30, "{what} at {i}: got {g}, want {w} (bound {b})");
    }
}

#[test]
fn fp32_convolutions_match_f64_and_depthwise_matches_the_cpu_bit_for_bit() {
    for (name, s) in shapes() {
        let (x, w, dy) =
            (floats(s.x_len(), 1, 1.0, 0.0), floats(s.w_len(), 2, 1.0, 0.0), floats(s.y_len(), 3, 1.0, 0.0));
        let (xd, wd, dyd) = (up(&x), up(&w), up(&dy));
        let (x64, w64, dy64) = (f64s(&x), f64s(&w), f64s(&dy));
        let mut y = up(&vec![f32::NAN; s.y_len()]);
        cuda::conv::conv2d_fwd_f32(gpu(), &s, &xd, &wd, &mut y).unwrap();
        let y = down(&y);
        assert_close(
            &format!("{name} fwd"),
            &y,
            &reference::conv2d_fwd(&s, &x64, &w64),
            &reference::conv2d_fwd(&s, &abs(&x64), &abs(&w64)),
        );
        let mut dx = up(&vec![f32::NAN; s.x_len()]);
        cuda::conv::conv2d_dx_f32(gpu(), &s, &wd, &dyd, &mut dx).unwrap();
        let dx = down(&dx);
        assert_close(
            &format!("{name} dx"),
            &dx,
            &reference::conv2d_dx(&s, &w64, &dy64),
            &reference::conv2d_dx(&s, &abs(&w64), &abs(&dy64)),
        );
        let mut dw = up(&vec![f32::NAN; s.w_len()]);
        cuda::conv::conv2d_dw_f32(gpu(), &s, &xd, &dyd, &mut dw).unwrap();
        let dw = down(&dw);
        assert_close(
            &format!("{name} dw"),
            &dw,
            &reference::conv2d_dw(&s, &x64, &dy64),
            &reference::conv2d_dw(&s, &abs(&x64), &abs(&dy64)),
        );
        if s.is_depthwise() {
            let (mut cy, mut cdx, mut cdw) = (vec![0.0; s.y_len()], vec![0.0; s.x_len()], vec![0.0; s.w_len()]);
            conv::conv2d_fwd_f32(&s, &x, &w, &mut cy).unwrap();
            conv::conv2d_dx_f32(&s, &w, &dy, &mut cdx).unwrap();
            conv::conv2d_dw_f32(&s, &x, &dy, &mut cdw).unwrap();
            assert_bits(&format!("{name} depthwise fwd"), &y, &cy);
            assert_bits(&format!("{name} depthwise dx"), &dx, &cdx);
            assert_bits(&format!("{name} depthwise dw"), &dw, &cdw);
        }
    }
}

#[test]
fn strided_pointwise_subsample_and_upsample_match_the_cpu() {
    let sq = ConvShape::square;
    for s in [
        sq(2, 4, 7, 6, 1, 2, 0),
        ConvShape { stride: (3, 2), h: 10, w: 9, ..sq(2, 3, 9, 4, 1, 1, 0) },
        sq(1, 2, 70, 3, 1, 2, 0),
    ] {
        let x = codes(s.x_len(), 7);
        assert_eq!(down(&cuda::conv::subsample_i8(gpu(), &s, &up(&x)).unwrap()), conv::subsample(&s, &x));
        let xf = floats(s.x_len(), 8, 1.0, 0.0);
        assert_bits(
            "subsample f32",
            &down(&cuda::conv::subsample_f32(gpu(), &s, &up(&xf)).unwrap()),
            &conv::subsample(&s, &xf),
        );
        let sub = floats(s.n * s.c_in * s.out_plane(), 9, 1.0, 0.0);
        let mut want = vec![f32::NAN; s.x_len()];
        conv::upsample(&s, &sub, &mut want);
        let mut got = up(&vec![f32::NAN; s.x_len()]);
        cuda::conv::upsample(gpu(), &s, &up(&sub), &mut got).unwrap();
        assert_bits("upsample", &down(&got), &want);
    }
}

#[test]
fn bad_shapes_are_the_cpu_s_errors() {
    let ok = ConvShape::square(1, 4, 5, 4, 3, 1, 1);
    let bad = ConvShape { groups: 3, ..ok };
    let mut y = zeros::<f32>(4);
    let err = cuda::conv::conv2d_fwd_f32(gpu(), &bad, &zeros(4), &zeros(4), &mut y).unwrap_err();
    assert_eq!(err, bad.validate().unwrap_err());
    let mut y = zeros::<f32>(ok.y_len());
    let err = cuda::conv::conv2d_fwd_f32(gpu(), &ok, &zeros(ok.x_len() - 1), &zeros(ok.w_len()), &mut y).unwrap_err();
    assert!(err.to_string().contains("conv input"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Batch norm

#[test]
fn batch_norm_matches_the_cpu_bit_for_bit() {
    // Planes shorter than, equal to and not a multiple of sixteen lanes; more than 32 images (the
    // CPU merges blocks of images); offset data (the two-pass mean matters).
    for d in [
        NchwDims { n: 3, c: 5, hw: 49 },
        NchwDims { n: 40, c: 3, hw: 16 },
        NchwDims { n: 2, c: 4, hw: 1024 + 7 },
        NchwDims { n: 1, c: 2, hw: 3 },
    ] {
        let len = d.n * d.c * d.hw;
        let x = floats(len, 1, 2.0, 3.5);
        let (gamma, beta) = (floats(d.c, 2, 0.5, 1.0), floats(d.c, 3, 0.5, 0.0));
        let dy = floats(len, 4, 1.0, 0.1);
        let (xd, gd, bd, dyd) = (up(&x), up(&gamma), up(&beta), up(&dy));
        let eps = 1e-5f32;
        for relu in [None, Some(f32::INFINITY), Some(6.0f32), Some(1.0)] {
            let mut want_y = vec![0.0; len];
            let st = batchnorm::forward_train(d, &x, &gamma, &beta, eps, relu, &mut want_y).unwrap();
            let mut y = zeros::<f32>(len);
            let gst = cuda::nn::batchnorm_forward_train(gpu(), d, &xd, &gd, &bd, eps, relu, &mut y).unwrap();
            let what = format!("{d:?} {relu:?}");
            assert_bits(&format!("{what} mean"), &down(&gst.mean), &st.mean);
            assert_bits(&format!("{what} var"), &down(&gst.var), &st.var);
            assert_bits(&format!("{what} inv_std"), &down(&gst.inv_std), &st.inv_std);
            assert_bits(&format!("{what} scale"), &down(&gst.scale), &st.scale);
            assert_bits(&format!("{what} shift"), &down(&gst.shift), &st.shift);
            assert_bits(&format!("{what} y"), &down(&y), &want_y);
            let mut want_dx = vec![0.0; len];
            let (dg, db) = batchnorm::backward(d, &x, relu, &dy, &gamma, &st, &mut want_dx).unwrap();
            let mut dx = zeros::<f32>(len);
            let (gdg, gdb) = cuda::nn::batchnorm_backward(gpu(), d, &xd, relu, &dyd, &gd, &gst, &mut dx).unwrap();
            assert_bits(&format!("{what} dgamma"), &down(&gdg), &dg);
            assert_bits(&format!("{what} dbeta"), &down(&gdb), &db);
            assert_bits(&format!("{what} dx"), &down(&dx), &want_dx);
            // Evaluation mode with running statistics.
            let (rm, rv) = (floats(d.c, 5, 0.5, 3.5), floats(d.c, 6, 0.5, 1.5));
            let (rmd, rvd) = (up(&rm), up(&rv));
            let mut want_y = vec![0.0; len];
            batchnorm::forward_eval(d, &x, &gamma, &beta, &rm, &rv, eps, relu, &mut want_y).unwrap();
            let mut y = zeros::<f32>(len);
            cuda::nn::batchnorm_forward_eval(gpu(), d, &xd, &gd, &bd, &rmd, &rvd, eps, relu, &mut y).unwrap();
            assert_bits(&format!("{what} eval y"), &down(&y), &want_y);
            let mut want_dx = vec![0.0; len];
            let (dg, db) =
                batchnorm::backward_eval(d, &x, relu, &dy, &gamma, &beta, (&rm, &rv), eps, &mut want_dx).unwrap();
            let mut dx = zeros::<f32>(len);
            let (gdg, gdb) =
                cuda::nn::batchnorm_backward_eval(gpu(), d, &xd, relu, &dyd, &gd, &bd, (&rmd, &rvd), eps, &mut dx)
                    .unwrap();
            assert_bits(&format!("{what} eval dgamma"), &down(&gdg), &dg);
            assert_bits(&format!("{what} eval dbeta"), &down(&gdb), &db);
            assert_bits(&format!("{what} eval dx"), &down(&dx), &want_dx);
        }
    }
    let d = NchwDims { n: 0, c: 2, hw: 4 };
    assert!(
        cuda::nn::batchnorm_forward_train(gpu(), d, &zeros(1), &zeros(2), &zeros(2), 1e-5, None, &mut zeros(1))
            .is_err()
    );
}

// ---------------------------------------------------------------------------------------------
// Elementwise, pooling, loss, dropout, SGD

#[test]
fn elementwise_ops_match_the_cpu_bit_for_bit() {
    for n in [1usize, 17, 100, (1 << 14) + 37, 3 * (1 << 14) + 5] {
        let x: Vec<f32> = (0..n).map(|i| [-1.5, 0.0, 0.25, 6.0, 7.0, 3.0, -0.0][i % 7] * (1 + i % 3) as f32).collect();
        let g: Vec<f32> = (0..n).map(|i| i as f32 - 0.5).collect();
        let (xd, gd) = (up(&x), up(&g));
        let mut want = vec![0.0; n];
        let mut got = zeros::<f32>(n);
        elementwise::add(&x, &g, &mut want).unwrap();
        cuda::nn::add(gpu(), &xd, &gd, &mut got).unwrap();
        assert_bits("add", &down(&got), &want);
        elementwise::add_relu(&x, &g, &mut want).unwrap();
        cuda::nn::add_relu(gpu(), &xd, &gd, &mut got).unwrap();
        assert_bits("add_relu", &down(&got), &want);
        elementwise::relu_backward(&x, &g, &mut want).unwrap();
        cuda::nn::relu_backward(gpu(), &xd, &gd, &mut got).unwrap();
        assert_bits("relu_backward", &down(&got), &want);
        for cap in [6.0, f32::INFINITY] {
            elementwise::clamp_relu(&x, cap, &mut want).unwrap();
            cuda::nn::clamp_relu(gpu(), &xd, cap, &mut got).unwrap();
            assert_bits("clamp_relu", &down(&got), &want);
            elementwise::clamp_relu_backward(&x, cap, &g, &mut want).unwrap();
            cuda::nn::clamp_relu_backward(gpu(), &xd, cap, &gd, &mut got).unwrap();
            assert_bits("clamp_relu_backward", &down(&got), &want);
        }
        let mut acc = x.clone();
        elementwise::add_assign(&mut acc, &g).unwrap();
        let mut accd = up(&x);
        cuda::nn::add_assign(gpu(), &mut accd, &gd).unwrap();
        assert_bits("add_assign", &down(&accd), &acc);
    }
    for (planes, hw) in [(6usize, 64usize), (5, 49), (3, 1)] {
        let x = floats(planes * hw, 9, 1.0, 0.3);
        let mut want = vec![0.0; planes];
        elementwise::global_avg_pool(&x, hw, &mut want).unwrap();
        let mut got = zeros::<f32>(planes);
        cuda::nn::global_avg_pool(gpu(), &up(&x), hw, &mut got).unwrap();
        assert_bits("global_avg_pool", &down(&got), &want);
        let dy = floats(planes, 10, 1.0, 0.0);
        let mut want = vec![0.0; planes * hw];
        elementwise::global_avg_pool_backward(&dy, hw, &mut want).unwrap();
        let mut got = zeros::<f32>(planes * hw);
        cuda::nn::global_avg_pool_backward(gpu(), &up(&dy), hw, &mut got).unwrap();
        assert_bits("global_avg_pool_backward", &down(&got), &want);
    }
}

#[test]
fn pooling_matches_the_cpu_bit_for_bit() {
    let p = |planes, h, w, k, stride, pad, ceil| pool::Pool2d { planes, h, w, k, stride, pad, ceil };
    for q in [
        p(3, 7, 5, 2, 2, 0, false),
        p(2, 9, 9, 3, 2, 1, false),
        p(2, 6, 7, 3, 1, 0, false),
        p(1, 5, 5, 5, 3, 2, false),
        p(4, 75, 75, 2, 2, 0, true),
        p(2, 8, 8, 3, 2, 0, true),
        p(2, 32, 32, 3, 2, 1, false),
    ] {
        let (oh, ow) = (q.out_h(), q.out_w());
        let mut x = floats(q.planes * q.h * q.w, 1, 1.0, 0.0);
        // Ties: the first maximum wins, on both.
        x[3] = 0.75;
        x[4] = 0.75;
        let dy = floats(q.planes * oh * ow, 2, 1.0, 0.0);
        let (xd, dyd) = (up(&x), up(&dy));
        let (mut y, mut am) = (vec![0.0; q.planes * oh * ow], vec![0u32; q.planes * oh * ow]);
        pool::max_pool(&q, &x, &mut y, &mut am).unwrap();
        let (mut gy, mut gam) = (zeros::<f32>(y.len()), zeros::<u32>(y.len()));
        cuda::nn::max_pool(gpu(), &q, &xd, &mut gy, &mut gam).unwrap();
        assert_bits(&format!("{q:?} max"), &down(&gy), &y);
        assert_eq!(down(&gam), am, "{q:?} argmax");
        let mut dx = vec![0.0; x.len()];
        pool::max_pool_backward(&q, &dy, &am, &mut dx).unwrap();
        let mut gdx = up(&vec![f32::NAN; x.len()]);
        cuda::nn::max_pool_backward(gpu(), &q, &dyd, &gam, &mut gdx).unwrap();
        assert_bits(&format!("{q:?} max backward"), &down(&gdx), &dx);
        if q.ceil {
            assert!(cuda::nn::avg_pool(gpu(), &q, &xd, &mut gy).is_err());
            continue;
        }
        pool::avg_pool(&q, &x, &mut y).unwrap();
        cuda::nn::avg_pool(gpu(), &q, &xd, &mut gy).unwrap();
        assert_bits(&format!("{q:?} avg"), &down(&gy), &y);
        pool::avg_pool_backward(&q, &dy, &mut dx).unwrap();
        cuda::nn::avg_pool_backward(gpu(), &q, &dyd, &mut gdx).unwrap();
        assert_bits(&format!("{q:?} avg backward"), &down(&gdx), &dx);
    }
}

#[test]
fn softmax_cross_entropy_matches_the_cpu() {
    for (batch, classes) in [(2usize, 3usize), (128, 10), (33, 1000)] {
        let logits = floats(batch * classes, 3, 4.0, 0.5);
        let labels: Vec<u32> = (0..batch).map(|i| (i * 7 % classes) as u32).collect();
        let want = loss::softmax_cross_entropy(&logits, classes, &labels).unwrap();
        let got = cuda::nn::softmax_cross_entropy(gpu(), &up(&logits), classes, &labels).unwrap();
        assert_eq!((got.top1, got.top5), (want.top1, want.top5), "{batch}x{classes}");
        assert!(relative(got.loss, want.loss) <= 1e-12, "{batch}x{classes}: {} vs {}", got.loss, want.loss);
        let g = down(&got.grad);
        for (i, (&a, &b)) in g.iter().zip(&want.grad).enumerate() {
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(a == b || (a.signum() == b.signum() && ulps <= 1), "{batch}x{classes} grad {i}: {a} vs {b}");
        }
    }
    let logits = up(&[2.0f32, 1.0, 0.1, -1.0, 0.5, 3.0]);
    let err = cuda::nn::softmax_cross_entropy(gpu(), &logits, 3, &[0, 3]).unwrap_err();
    assert!(err.to_string().contains("label 3"), "{err}");
    let bad = up(&[2.0f32, 1.0, 0.1, -1.0, f32::NAN, 3.0]);
    let err = cuda::nn::softmax_cross_entropy(gpu(), &bad, 3, &[0, 1]).unwrap_err();
    // (NaN in the error's value: compare the messages.)
    let want = loss::softmax_cross_entropy(&[2.0f32, 1.0, 0.1, -1.0, f32::NAN, 3.0], 3, &[0, 1]).unwrap_err();
    assert_eq!(err.to_string(), want.to_string());
}

#[test]
fn dropout_draws_the_cpu_s_mask() {
    let x = floats(100_003, 4, 1.0, 0.0);
    for (p, seed) in [(0.1f32, 1u64), (0.5, 2), (0.0, 3)] {
        // int8-nn's ops::dropout: x * (uniform(i) >= p ? 1 / (1 - p) : 0).
        let (rng, keep) = (CounterRng::new(seed), 1.0f32 / (1.0 - p));
        let want: Vec<f32> =
            x.iter().enumerate().map(|(i, &v)| v * if rng.uniform(i as u64) >= p { keep } else { 0.0 }).collect();
        let mut got = zeros::<f32>(x.len());
        cuda::nn::dropout(gpu(), &up(&x), p, seed, &mut got).unwrap();
        assert_bits(&format!("dropout p {p}"), &down(&got), &want);
    }
}

#[test]
fn sgd_matches_the_cpu_rule_and_refuses_non_finite_steps() {
    let n = 70_001;
    let (w, g, b) = (floats(n, 1, 1.0, 0.0), floats(n, 2, 0.1, 0.0), floats(n, 3, 0.1, 0.0));
    for (nesterov, decay, first) in
        [(false, true, true), (false, true, false), (true, true, false), (true, false, true)]
    {
        let rule = cuda::nn::SgdRule::new(0.9, nesterov, 5e-4, decay, 0.1, 0.37);
        // int8-nn's optim::Rule::apply, written out: g = grad + wd * w; buf = first ? g : m * buf + g;
        // d = nesterov ? g + m * buf : buf; w - lr * d, all f32.
        let (wd, m, lr) = (if decay { 5e-4f64 as f32 } else { 0.0 }, 0.9f64 as f32, (0.1f64 * 0.37) as f32);
        let mut want_w = w.clone();
        let mut want_b = b.clone();
        for i in 0..n {
            let gi = g[i] + wd * w[i];
            let bi = if first { gi } else { m * b[i] + gi };
            let d = if nesterov { gi + m * bi } else { bi };
            want_w[i] = w[i] - lr * d;
            want_b[i] = bi;
        }
        let (mut wd_, mut bd) = (up(&w), up(&b));
        cuda::nn::sgd_step(gpu(), "layer1.weight", &mut wd_, &up(&g), &mut bd, first, rule).unwrap();
        let what = format!("nesterov {nesterov} decay {decay} first {first}");
        assert_bits(&format!("{what} weights"), &down(&wd_), &want_w);
        if !first {
            assert_bits(&format!("{what} buffer"), &down(&bd), &want_b);
        }
    }
    let mut bad = g.clone();
    bad[12_345] = f32::NAN;
    let (mut wd_, mut bd) = (up(&w), up(&b));
    let rule = cuda::nn::SgdRule::new(0.9, false, 0.0, false, 0.1, 1.0);
    let err = cuda::nn::sgd_step(gpu(), "layer1.weight", &mut wd_, &up(&bad), &mut bd, false, rule).unwrap_err();
    assert!(err.to_string().contains("layer1.weight") && err.to_string().contains("12345"), "{err}");
    assert_bits("refused step leaves the weights", &down(&wd_), &w);
    let huge = vec![f32::MAX; n];
    let err = cuda::nn::sgd_step(
        gpu(),
        "fc.bias",
        &mut wd_,
        &up(&huge),
        &mut bd,
        false,
        cuda::nn::SgdRule::new(0.9, false, 0.0, false, 10.0, 1.0),
    )
    .unwrap_err();
    assert!(err.to_string().contains("fc.bias"), "{err}");
}

/// Reductions are deterministic: the same call twice gives the same bits.
#[test]
fn runs_repeat_bit_for_bit() {
    let s = ConvShape::square(16, 32, 16, 32, 3, 2, 1);
    let (x, dy) = (up(&floats(s.x_len(), 1, 1.0, 0.0)), up(&floats(s.y_len(), 2, 1.0, 0.0)));
    let mut first = zeros::<f32>(s.w_len());
    let mut second = zeros::<f32>(s.w_len());
    cuda::conv::conv2d_dw_f32(gpu(), &s, &x, &dy, &mut first).unwrap();
    cuda::conv::conv2d_dw_f32(gpu(), &s, &x, &dy, &mut second).unwrap();
    assert_bits("fp32 weight gradient twice", &down(&second), &down(&first));
    let g = up(&heavy(1 << 20, 3));
    let a = cuda::dsgc::cosine_distance(gpu(), &g, 1e-3).unwrap();
    let b = cuda::dsgc::cosine_distance(gpu(), &g, 1e-3).unwrap();
    assert_eq!(a.to_bits(), b.to_bits());
}
