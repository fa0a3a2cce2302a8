//! The depthwise kernels against the naive f64 reference ([`crate::conv::reference`]), on every
//! INT8 kernel this CPU runs (so the AVX2 and portable paths are tested on an AVX-512 machine
//! too): exact integer sums, and outputs scaled exactly as the kernels' contract says.

use super::*;
use crate::conv::reference;
use crate::rng::CounterRng;

/// Row copies of every length up to 70, into a longer row whose tail must stay untouched.
#[test]
fn row_copies_write_exactly_the_row() {
    for n in 0..=70usize {
        let src: Vec<i32> = (0..n as i32).map(|v| v * 7 + 1).collect();
        let mut dst = vec![-1i32; n + 5];
        copy_row(&mut dst, &src);
        assert_eq!(&dst[..n], &src[..], "length {n}");
        assert!(dst[n..].iter().all(|&v| v == -1), "length {n} wrote past the row");
    }
}

/// The INT8 dot products (the portable loop, and the AVX2 kernel where the CPU has AVX2) equal
/// the naive `i64` sum at every length up to 100 (whole 32-code blocks and tails), for random
/// codes and for the extremes -128 and 127, whose products are the largest.
#[test]
fn int8_dot_is_exact_at_every_length() {
    let rng = CounterRng::new(7);
    let random: Vec<i8> = (0..200).map(|i| rng.bits(i) as u8 as i8).collect();
    let lows = [-128i8; 100];
    let highs = [127i8; 100];
    for n in 0..=100 {
        for (a, b) in [(&random[..n], &random[100..100 + n]), (&lows[..n], &lows[..n]), (&lows[..n], &highs[..n])] {
            let want: i64 = a.iter().zip(b).map(|(&x, &y)| x as i64 * y as i64).sum();
            assert_eq!(dot_lanes(a, b) as i64, want, "length {n}, portable loop");
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                // SAFETY: the CPU has AVX2 (checked above).
                assert_eq!(unsafe { avx2::dot_i8(a, b) } as i64, want, "length {n}, AVX2");
            }
        }
    }
    // The shorter operand sets the length.
    assert_eq!(dot_lanes(&highs[..40], &highs[..33]), 33 * 127 * 127);
}

/// A depthwise shape: `n` images of `c` channels, `h x w`, kernel `k x k`, stride, padding.
fn dw(n: usize, c: usize, (h, w): (usize, usize), k: usize, stride: usize, pad: usize) -> ConvShape {
    ConvShape { h, w, ..ConvShape::square(n, c, h, c, k, stride, pad).with_groups(c) }
}

/// Shapes, and whether the AVX-512 kernels' windows must take their forward pass and input
/// gradient (the weight gradient takes every shape). First every MobileNetV2 (CIFAR) depthwise
/// plane size at both strides, with channel counts that are not multiples of 16; then odd sizes,
/// rectangles, wide rows and other kernels.
fn shapes() -> Vec<(&'static str, ConvShape, bool)> {
    vec![
        ("3x3 s1 32x32", dw(2, 3, (32, 32), 3, 1, 1), true),
        ("3x3 s2 32x32", dw(2, 3, (32, 32), 3, 2, 1), true),
        ("3x3 s1 16x16", dw(3, 5, (16, 16), 3, 1, 1), true),
        ("3x3 s2 16x16", dw(3, 5, (16, 16), 3, 2, 1), true),
        ("3x3 s1 8x8", dw(2, 17, (8, 8), 3, 1, 1), true),
        ("3x3 s2 8x8", dw(2, 17, (8, 8), 3, 2, 1), true),
        ("3x3 s1 4x4", dw(3, 19, (4, 4), 3, 1, 1), true),
        ("3x3 s1 7x7", dw(2, 3, (7, 7), 3, 1, 1), true),
        ("3x3 s2 7x7", dw(3, 3, (7, 7), 3, 2, 1), true),
        ("3x3 s1 5x9", dw(2, 3, (5, 9), 3, 1, 1), true),
        ("3x3 s2 5x9", dw(2, 3, (5, 9), 3, 2, 1), true),
        ("3x3 s1 9x5", dw(2, 2, (9, 5), 3, 1, 1), true),
        ("3x3 s1 1x1", dw(2, 2, (1, 1), 3, 1, 1), true),
        ("3x3 s1 2x3", dw(2, 2, (2, 3), 3, 1, 1), true),
        ("3x3 s1 3x17 (a block of 16 columns and one of 1)", dw(2, 2, (3, 17), 3, 1, 1), true),
        ("3x3 s2 6x33", dw(2, 2, (6, 33), 3, 2, 1), true),
        ("3x3 s1 4x40", dw(2, 2, (4, 40), 3, 1, 1), true),
        ("3x3 s1 p0 6x6", dw(2, 2, (6, 6), 3, 1, 0), true),
        ("5x5 s1 p2 8x8", dw(2, 2, (8, 8), 5, 1, 2), true),
        ("5x5 s2 p2 7x7", dw(2, 2, (7, 7), 5, 2, 2), true),
        ("2x2 s3 p0 10x10: pixels no tap reads", dw(2, 2, (10, 10), 2, 3, 0), true),
        ("3x3 dilation 2", ConvShape { dilation: (2, 2), pad: (2, 2), ..dw(2, 3, (8, 8), 3, 1, 2) }, true),
        (
            "3x2 stride (3,2) dilation (2,3)",
            ConvShape { kh: 3, kw: 2, stride: (3, 2), dilation: (2, 3), pad: (3, 1), ..dw(2, 3, (11, 11), 3, 1, 1) },
            true,
        ),
        ("3x3 s1 5x70: rows too wide for one window", dw(2, 2, (5, 70), 3, 1, 1), false),
        ("3x3 s2 5x71", dw(2, 2, (5, 71), 3, 2, 1), false),
    ]
}

/// Codes for a tensor of `n`: random over the whole code range, or one of the extremes.
fn codes(n: usize, seed: u64, fill: Fill) -> Vec<i8> {
    let rng = CounterRng::new(seed);
    (0..n)
        .map(|i| match fill {
            Fill::Random => ((rng.bits(i as u64) % 255) as i32 - 127) as i8,
            Fill::Max => 127,
            Fill::Min => -127,
            Fill::Alternating => [127, -127][i % 2],
            Fill::Lowest => -128,
        })
        .collect()
}

/// How a test tensor is filled.
#[derive(Debug, Clone, Copy)]
enum Fill {
    /// Uniform over `[-127, 127]`.
    Random,
    /// 127 everywhere.
    Max,
    /// -127 everywhere.
    Min,
    /// 127 and -127 in turn.
    Alternating,
    /// -128, outside the quantizer's range, which the kernels still sum exactly.
    Lowest,
}

/// Per-channel scales that are not powers of two, so that a missed or doubled scale shows.
fn scales(c: usize) -> Vec<f32> {
    (0..c).map(|i| 0.0173 * (i + 1) as f32 + 0.3).collect()
}

/// `want[i]` as the kernels produce it: the exact integer sum (in f64, exact below 2^53)
/// rounded to f32 and times the channel's scale, bit for bit.
fn assert_scaled(what: &str, got: &[f32], sums: &[f64], plane: usize, scales: &[f32]) {
    assert_eq!(got.len(), sums.len(), "{what}: length");
    for (i, (&g, &v)) in got.iter().zip(sums).enumerate() {
        let want = v as f32 * scales[(i / plane) % scales.len()];
        assert_eq!(g.to_bits(), want.to_bits(), "{what} at {i}: got {g}, want {want} (sum {v})");
    }
}

/// Every INT8 kernel this CPU runs, on every shape and fill: forward, input gradient and weight
/// gradient equal the reference's exact sums (the first two scaled per channel exactly as the
/// kernels' contract says), and the AVX-512 kernels take the shapes they must.
#[test]
fn int8_kernels_equal_the_reference() {
    let kernels = Kernel::available();
    assert!(kernels.contains(&Kernel::Portable));
    let fills = [
        (Fill::Random, Fill::Random, Fill::Random),
        (Fill::Max, Fill::Max, Fill::Max),
        (Fill::Min, Fill::Max, Fill::Min),
        (Fill::Alternating, Fill::Min, Fill::Alternating),
        (Fill::Lowest, Fill::Lowest, Fill::Lowest),
    ];
    for (name, s, windows) in shapes() {
        s.validate().unwrap();
        assert!(s.is_depthwise(), "{name}");
        let sc = scales(s.c_in);
        for (f, &(fx, fw, fdy)) in fills.iter().enumerate() {
            let f = f as u64;
            let (x, w, dy) = (codes(s.x_len(), 1 + f, fx), codes(s.w_len(), 2 + f, fw), codes(s.y_len(), 3 + f, fdy));
            let f64s = |v: &[i8]| v.iter().map(|&c| c as f64).collect::<Vec<_>>();
            let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
            let (y_ref, dx_ref, dw_ref) = (
                reference::conv2d_fwd(&s, &xd, &wd),
                reference::conv2d_dx(&s, &wd, &dyd),
                reference::conv2d_dw(&s, &xd, &dyd),
            );
            for &k in &kernels {
                let what = |part: &str| format!("{k:?} {name} {fx:?}/{fw:?}/{fdy:?} {part}");
                let mut y = vec![f32::NAN; s.y_len()];
                let ran = forward_i8(k, &s, &x, &w, Out::from(&mut y), |c| sc[c]);
                assert_scaled(&what("forward"), &y, &y_ref, s.out_plane(), &sc);
                let mut dx = vec![f32::NAN; s.x_len()];
                let ran_dx = input_grad_i8(k, &s, &w, &dy, Out::from(&mut dx), |c| sc[c]);
                assert_scaled(&what("input gradient"), &dx, &dx_ref, s.in_plane(), &sc);
                let mut dw = vec![i64::MIN; s.w_len()];
                assert_eq!(weight_grad_i8(k, &s, &x, &dy, &mut dw, |v| v), k);
                let dw_want: Vec<i64> = dw_ref.iter().map(|&v| v as i64).collect();
                assert_eq!(dw, dw_want, "{}", what("weight gradient"));
                // The AVX-512 weight gradient's two layouts, whichever it would choose.
                #[cfg(target_arch = "x86_64")]
                if k == Kernel::Avx512Vnni {
                    for layout in avx512_layouts(&s) {
                        let mut dw = vec![i64::MIN; s.w_len()];
                        avx512::weight_grad(&s, &x, &dy, &mut dw, |v| v, &layout);
                        assert_eq!(dw, dw_want, "{} {layout:?}", what("weight gradient"));
                    }
                }
                // A kernel runs itself, or, where its windows do not take the shape, AVX2.
                match k {
                    Kernel::Avx512Vnni if windows => assert_eq!((ran, ran_dx), (k, k), "{name}"),
                    Kernel::Avx512Vnni => assert!([ran, ran_dx].contains(&Kernel::Avx2), "{name}: expected a fallback"),
                    _ => assert_eq!((ran, ran_dx), (k, k), "{name}"),
                }
            }
        }
    }
}

/// The layouts of the AVX-512 weight gradient for `s`: the phases, and the windows where they
/// take `s` (which MobileNetV2's planes must: see the plans' test).
#[cfg(target_arch = "x86_64")]
fn avx512_layouts(s: &ConvShape) -> Vec<avx512::Layout> {
    std::iter::once(avx512::Layout::Phases).chain(windows::TapPlan::new(s).map(avx512::Layout::Windows)).collect()
}

/// The AVX-512 weight gradient keeps its per-lane 32-bit sums for a run of images and then moves
/// them into `i64`: with the largest products over enough images to need several runs (each
/// lane gains up to `16 * 4 * 255 * 128` per 32x32 image in the windows' 16 registers, so a run
/// is 1028 images; 967 in the phases' 17), the sum over the batch is still exact, on every kernel
/// and both layouts.
#[test]
fn int8_weight_gradient_is_exact_over_many_images() {
    let s = dw(2100, 2, (32, 32), 3, 1, 1);
    let x = codes(s.x_len(), 0, Fill::Max);
    let dy = codes(s.y_len(), 0, Fill::Min);
    // Every pixel's tap reaches a code of 127 * -127, except where it falls in the padding.
    let want = reference::conv2d_dw(
        &s,
        &x.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &dy.iter().map(|&v| v as f64).collect::<Vec<_>>(),
    );
    assert!(want.iter().all(|&v| v < i32::MIN as f64), "the sums must exceed 32 bits");
    let want: Vec<i64> = want.iter().map(|&v| v as i64).collect();
    for k in Kernel::available() {
        let mut dw = vec![0i64; s.w_len()];
        weight_grad_i8(k, &s, &x, &dy, &mut dw, |v| v);
        assert_eq!(dw, want, "{k:?}");
        #[cfg(target_arch = "x86_64")]
        if k == Kernel::Avx512Vnni {
            for layout in avx512_layouts(&s) {
                let mut dw = vec![0i64; s.w_len()];
                avx512::weight_grad(&s, &x, &dy, &mut dw, |v| v, &layout);
                assert_eq!(dw, want, "{layout:?}");
            }
        }
    }
}

/// The AVX-512 window plans of MobileNetV2's planes use few patterns and kinds: one kind for the
/// forward pass (every block takes the same taps in the same slots) and at most two for a
/// strided input gradient (even and odd rows), three groups (vpdpbusd) per block of a 3x3 forward
/// pass and one or three for its input gradient.
#[test]
fn window_plans_of_mobilenet_planes_are_compact() {
    use windows::{Product, TapPlan, WindowPlan};
    for hw in [32, 16, 8, 4] {
        for stride in [1, 2] {
            let s = dw(1, 1, (hw, hw), 3, stride, 1);
            let fwd = WindowPlan::new(&s, Product::Forward).unwrap();
            assert_eq!(fwd.kinds.len(), 1, "{hw} s{stride}");
            assert_eq!(fwd.kinds[0].len(), 3, "{hw} s{stride}");
            assert_eq!(fwd.blocks.len(), s.out_plane().div_ceil(16), "{hw} s{stride}: every lane an output");
            let dx = WindowPlan::new(&s, Product::InputGrad).unwrap();
            assert!(dx.kinds.len() <= 2, "{hw} s{stride}");
            let groups = if stride == 1 { 3 } else { 1 };
            assert!(dx.kinds.iter().all(|k| k.len() == groups), "{hw} s{stride}: {:?}", dx.kinds);
            // The weight gradient's windows: whole registers of 64 positions at stride 1 from
            // 8x8 up, the whole plane where it is smaller, 16 positions (one or two output rows)
            // at stride 2 otherwise.
            let dw = TapPlan::new(&s).unwrap();
            let block = match (hw, stride) {
                (4, _) | (8, 2) => (hw / stride) * (hw / stride),
                (_, 1) => 64,
                _ => 16,
            };
            assert_eq!(dw.block_len(), block, "{hw} s{stride}");
            assert_eq!(dw.blocks.len(), s.out_plane().div_ceil(block), "{hw} s{stride}");
        }
    }
}
