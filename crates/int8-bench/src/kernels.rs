//! The kernels bench: GEMM and convolution layers, FP32 against INT8.

use std::time::Duration;

use anyhow::Result;
use int8_core::conv::{
    ConvShape, conv2d_dw_f32, conv2d_dw_i8, conv2d_dx_f32, conv2d_dx_i8, conv2d_fwd_f32, conv2d_fwd_i8,
    quantize_subsample_with_clip, strided_pointwise, subsample,
};
use int8_core::dsgc::{ClipMode, ClipState, search_clip};
use int8_core::gemm::{Int8Path, MatMut, MatRef, Parallelism, gemm_f32, gemm_i8};
use int8_core::quant::{Granularity, QTensor, Rounding, max_abs, quantize, quantize_with_clip};
use int8_core::rng::CounterRng;

use crate::timing::{median_ms, median_pair_ms};
use crate::{Row, print_header, print_row};

/// The CPU, thread count and INT8 path, for the top of the table.
pub fn machine_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let paths: Vec<_> = Int8Path::available().iter().map(|p| p.name()).collect();
    let cap = int8_core::cpu::describe_cap().map(|c| format!("; {c}")).unwrap_or_default();
    format!("cpu: {cpu}; threads: {}; int8 paths: {}{cap}", rayon::current_num_threads(), paths.join(", "))
}

fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| rng.uniform(i as u64) * 2.0 - 1.0).collect()
}

fn random_codes(n: usize, seed: u64) -> Vec<i8> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| ((rng.bits(i as u64) % 255) as i32 - 127) as i8).collect()
}

/// Runs every row whose name contains `filter`, printing each as it completes.
pub fn run(budget: Duration, filter: Option<&str>) -> Result<Vec<Row>> {
    let keep = |name: &str| filter.is_none_or(|f| name.contains(f));
    let mut rows = Vec::new();
    print_header();
    let mut push = |row: Row| {
        print_row(&row);
        rows.push(row);
    };
    if keep("gemm-1024") {
        for row in gemm_rows(budget)? {
            push(row);
        }
    }
    for (name, shape) in resnet20_convs(128).into_iter().chain(mobilenetv2_convs(128)) {
        if keep(&name) {
            push(conv_row(&name, &shape, budget)?);
        }
    }
    // The layer the FP32 baseline is compared with PyTorch on (0.166 s fwd+bwd with 2 threads).
    let name = "pytorch-check 3x3 64->64 128x64x32x32";
    if keep(name) {
        push(conv_row(name, &ConvShape::square(128, 64, 32, 64, 3, 1, 1), budget)?);
    }
    Ok(rows)
}

fn gemm_rows(budget: Duration) -> Result<Vec<Row>> {
    let n = 1024;
    let (af, bf) = (random_f32(n * n, 1), random_f32(n * n, 2));
    let (ai, bi) = (random_codes(n * n, 3), random_codes(n * n, 4));
    let mut cf = vec![0f32; n * n];
    let mut ci = vec![0i32; n * n];
    let mut fp32 = || {
        gemm_f32(
            MatRef::row_major(&af, n, n).unwrap(),
            MatRef::row_major(&bf, n, n).unwrap(),
            MatMut::row_major(&mut cf, n, n).unwrap(),
            false,
            Parallelism::Rayon,
        )
        .unwrap()
    };
    let mut rows = Vec::new();
    for path in Int8Path::available() {
        let (f, i) = median_pair_ms(budget, &mut fp32, || {
            gemm_i8(
                path,
                MatRef::row_major(&ai, n, n).unwrap(),
                MatRef::row_major(&bi, n, n).unwrap(),
                MatMut::row_major(&mut ci, n, n).unwrap(),
                false,
                Parallelism::Rayon,
            )
            .unwrap()
        });
        let suffix = if path == Int8Path::detect() { String::new() } else { format!(" ({})", path.name()) };
        rows.push(Row::new(format!("gemm-1024{suffix}"), f, i));
    }
    // rten-gemm's u8 x i8 kernel on the same problem, the reference point we must match or beat.
    // Ours is exact on every path; rten-gemm's AVX2 kernel (no VNNI) adds u8 x i8 pairs in 16
    // bits with saturation (its `may_saturate`), so the row says how many of its sums differ.
    let exact = ci.clone();
    let exec = rten_gemm::GemmExecutor::<u8, i8, i32>::default();
    let au: Vec<u8> = ai.iter().map(|&v| (v as u8) ^ 0x80).collect();
    let zero = vec![128u8; n];
    let (f, rten) = median_pair_ms(budget, &mut fp32, || {
        let a = rten_tensor::NdTensorView::from_data([n, n], au.as_slice());
        let b = rten_tensor::NdTensorView::from_data([n, n], bi.as_slice());
        exec.gemm(
            &mut ci,
            rten_gemm::GemmInputA::Unpacked(a),
            rten_gemm::GemmInputB::Unpacked(b),
            rten_gemm::GemmOptions {
                a_quant: Some(rten_gemm::QuantParams { zero_point: &zero }),
                ..Default::default()
            },
        )
        .unwrap()
    });
    let wrong = ci.iter().zip(&exact).filter(|(a, b)| a != b).count();
    let name = if wrong == 0 {
        "gemm-1024 (rten-gemm u8xi8)".to_string()
    } else {
        format!("gemm-1024 (rten-gemm u8xi8, {wrong} of {} sums inexact)", ci.len())
    };
    rows.push(Row::new(name, f, rten));
    Ok(rows)
}

/// Every distinct conv layer of CIFAR ResNet-20 (He et al. 2016) as the zoo builds it, with 1x1
/// stride-2 projection shortcuts where a stage begins, at batch `n`.
pub fn resnet20_convs(n: usize) -> Vec<(String, ConvShape)> {
    let mut layers =
        vec![("resnet20 conv1 3->16 32x32 (fp32 in training)".to_string(), ConvShape::square(n, 3, 32, 16, 3, 1, 1))];
    for (c_in, c_out, hw, stride) in
        [(16, 16, 32, 1), (16, 32, 32, 2), (32, 32, 16, 1), (32, 64, 16, 2), (64, 64, 8, 1)]
    {
        let out = hw / stride;
        layers.push((
            format!("resnet20 3x3 {c_in}->{c_out} s{stride} {out}x{out}"),
            ConvShape::square(n, c_in, hw, c_out, 3, stride, 1),
        ));
        if stride == 2 {
            layers.push((
                format!("resnet20 shortcut 1x1 {c_in}->{c_out} s2 {out}x{out}"),
                ConvShape::square(n, c_in, hw, c_out, 1, 2, 0),
            ));
        }
    }
    layers
}

/// Every distinct conv layer of MobileNetV2 (Sandler et al. 2018) with CIFAR strides (the stem and
/// the second stage keep stride 1, so 32x32 inputs end at 4x4), at batch `n`.
pub fn mobilenetv2_convs(n: usize) -> Vec<(String, ConvShape)> {
    let mut layers: Vec<(String, ConvShape)> =
        vec![("mobilenetv2 stem 3->32 32x32 (fp32 in training)".into(), ConvShape::square(n, 3, 32, 32, 3, 1, 1))];
    let (mut c, mut hw) = (32, 32);
    for (t, c_out, repeats, first_stride) in
        [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    {
        for r in 0..repeats {
            let stride = if r == 0 { first_stride } else { 1 };
            let hidden = c * t;
            if t != 1 {
                layers.push((
                    format!("mobilenetv2 expand 1x1 {c}->{hidden} {hw}x{hw}"),
                    ConvShape::square(n, c, hw, hidden, 1, 1, 0),
                ));
            }
            let out = hw / stride;
            layers.push((
                format!("mobilenetv2 depthwise 3x3 {hidden} s{stride} {out}x{out}"),
                ConvShape::square(n, hidden, hw, hidden, 3, stride, 1).with_groups(hidden),
            ));
            layers.push((
                format!("mobilenetv2 project 1x1 {hidden}->{c_out} {out}x{out}"),
                ConvShape::square(n, hidden, out, c_out, 1, 1, 0),
            ));
            (c, hw) = (c_out, out);
        }
    }
    layers.push((format!("mobilenetv2 head 1x1 {c}->1280 {hw}x{hw}"), ConvShape::square(n, c, hw, 1280, 1, 1, 0)));
    let mut seen = std::collections::HashSet::new();
    layers.retain(|(_, s)| seen.insert(*s));
    layers
}

/// The parts of a layer's training work that `profile` times separately.
const PARTS: [&str; 6] = ["quantize x", "quantize w", "forward", "dsgc + q(dy)", "dx", "dw"];

/// One conv layer's training work on fixed random tensors, at either precision, as the layer
/// runs it in training: INT8 quantizes X and W (per tensor, at max|.|) and dY at its DSGC clip
/// value, with the cosine distance measured in the same pass (the search itself is due every 100
/// steps and is not part of a step here). max|X| comes with X, as in training, where the op that
/// writes a convolution's input (batch norm, add, ReLU) finds it on the way at both precisions.
/// A strided 1x1 convolution works in INT8 on its input's subsample, with the input gradient placed
/// back; FP32 reads in place. Its codes are the subsample of the codes that the convolution beside
/// it in the block (which runs first, on the same input) made of X at max|X|, as in training
/// (`int8-nn`'s conv op keeps them with X); that convolution's row pays for quantizing X.
struct LayerWork {
    s: ConvShape,
    /// The shape the INT8 kernels run: `s`, or the stride-1 shape over the subsample.
    k: ConvShape,
    pointwise: bool,
    path: Int8Path,
    clip: ClipState,
    x: Vec<f32>,
    /// max|X|, which the op that wrote X found.
    x_max: f32,
    /// For a strided 1x1 convolution, the codes of X at `x_max` that the block's first
    /// convolution made.
    x_codes: Option<QTensor>,
    w: Vec<f32>,
    dy: Vec<f32>,
    y: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
}

impl LayerWork {
    fn new(s: &ConvShape) -> Result<Self> {
        let pointwise = strided_pointwise(s);
        let k = pointwise.unwrap_or(*s);
        let dy = random_f32(s.y_len(), 13);
        let mut clip = ClipState::new(ClipMode::dsgc(100));
        clip.update("dy", &dy)?;
        let x = random_f32(s.x_len(), 11);
        Ok(LayerWork {
            s: *s,
            k,
            pointwise: pointwise.is_some(),
            path: Int8Path::detect(),
            clip,
            x_max: max_abs("x", &x)?,
            x_codes: match pointwise {
                Some(_) => Some(quantize_with_clip("x", &x, max_abs("x", &x)?, Rounding::Nearest)?),
                None => None,
            },
            x,
            w: random_f32(s.w_len(), 12),
            dy,
            y: vec![0f32; s.y_len()],
            dx: vec![0f32; s.x_len()],
            dw: vec![0f32; s.w_len()],
        })
    }

    /// One FP32 step; `lap(i)` closes part `i` of [`PARTS`].
    fn fp32(&mut self, lap: &mut impl FnMut(usize)) -> Result<()> {
        let s = &self.s;
        conv2d_fwd_f32(s, &self.x, &self.w, &mut self.y)?;
        lap(2);
        conv2d_dx_f32(s, &self.w, &self.dy, &mut self.dx)?;
        lap(4);
        conv2d_dw_f32(s, &self.x, &self.dy, &mut self.dw)?;
        lap(5);
        Ok(())
    }

    /// One INT8 step; `lap(i)` closes part `i` of [`PARTS`].
    fn int8(&mut self, lap: &mut impl FnMut(usize)) -> Result<()> {
        let (s, k, path) = (&self.s, &self.k, self.path);
        let xq = if self.pointwise {
            match &self.x_codes {
                // The block's first convolution's codes of X, subsampled (as in training).
                Some(codes) => QTensor { data: subsample(s, &codes.data), scales: codes.scales.clone(), saturated: 0 },
                None => quantize_subsample_with_clip("x", s, &self.x, self.x_max)?,
            }
        } else {
            quantize_with_clip("x", &self.x, self.x_max, Rounding::Nearest)?
        };
        lap(0);
        let wq = quantize("w", &self.w, Granularity::PerTensor, 1, Rounding::Nearest)?;
        lap(1);
        conv2d_fwd_i8(path, k, (&xq).into(), (&wq).into(), &mut self.y)?;
        lap(2);
        let (dyq, _) = self.clip.quantize("dy", &self.dy, Rounding::Nearest)?;
        lap(3);
        // A strided 1x1 convolution's kernel places its gradient back itself.
        conv2d_dx_i8(path, s, (&wq).into(), (&dyq).into(), &mut self.dx)?;
        lap(4);
        conv2d_dw_i8(path, k, (&xq).into(), (&dyq).into(), &mut self.dw)?;
        lap(5);
        Ok(())
    }
}

/// One conv layer's training work, forward + dX + dW, at both precisions ([`LayerWork`]), timed in
/// alternation. The INT8 clip search runs every 100 steps, so a hundredth of its measured time is
/// added.
pub fn conv_row(name: &str, s: &ConvShape, budget: Duration) -> Result<Row> {
    let work = std::cell::RefCell::new(LayerWork::new(s)?);
    let failed = std::cell::RefCell::new(None);
    let run = |int8: bool| {
        let mut w = work.borrow_mut();
        let r = if int8 { w.int8(&mut |_| ()) } else { w.fp32(&mut |_| ()) };
        if let Err(e) = r {
            failed.borrow_mut().get_or_insert(e);
        }
    };
    let (fp32, int8) = median_pair_ms(budget, || run(false), || run(true));
    if let Some(e) = failed.into_inner() {
        return Err(e);
    }
    let dy = &work.borrow().dy;
    let search = median_ms(budget / 4, || {
        search_clip("dy", dy).unwrap();
    });
    Ok(Row::new(name, fp32, int8 + search / 100.0))
}

/// Runs one layer's work (or, for `gemm`, GEMM 1024^3) for `seconds` at `precision`, then prints
/// the mean time of each part.
pub fn profile(layer: &str, precision: &str, seconds: f64) -> Result<()> {
    if layer == "gemm" {
        let n = 1024;
        let (af, bf, ai, bi) =
            (random_f32(n * n, 1), random_f32(n * n, 2), random_codes(n * n, 3), random_codes(n * n, 4));
        let (mut cf, mut ci) = (vec![0f32; n * n], vec![0i32; n * n]);
        let (start, mut steps) = (std::time::Instant::now(), 0usize);
        while start.elapsed().as_secs_f64() < seconds {
            if precision == "fp32" {
                gemm_f32(
                    MatRef::row_major(&af, n, n)?,
                    MatRef::row_major(&bf, n, n)?,
                    MatMut::row_major(&mut cf, n, n)?,
                    false,
                    Parallelism::Rayon,
                )?;
            } else {
                let (a, b) = (MatRef::row_major(&ai, n, n)?, MatRef::row_major(&bi, n, n)?);
                gemm_i8(Int8Path::detect(), a, b, MatMut::row_major(&mut ci, n, n)?, false, Parallelism::Rayon)?;
            }
            steps += 1;
        }
        println!(
            "gemm 1024^3, {precision}: {:.3} ms mean over {steps} runs",
            start.elapsed().as_secs_f64() * 1e3 / steps as f64
        );
        return Ok(());
    }
    let Some((name, s)) =
        resnet20_convs(128).into_iter().chain(mobilenetv2_convs(128)).find(|(n, _)| n.contains(layer))
    else {
        anyhow::bail!("no conv layer matches `{layer}`; see `int8-bench kernels` for the names");
    };
    let mut work = LayerWork::new(&s)?;
    let mut totals = vec![0.0f64; PARTS.len()];
    let (start, mut steps) = (std::time::Instant::now(), 0usize);
    while start.elapsed().as_secs_f64() < seconds {
        let mut t = std::time::Instant::now();
        let mut lap = |i: usize| {
            totals[i] += t.elapsed().as_secs_f64() * 1e3;
            t = std::time::Instant::now();
        };
        if precision == "fp32" {
            work.fp32(&mut lap)?
        } else {
            work.int8(&mut lap)?
        }
        steps += 1;
    }
    println!("{name}, {precision}, {steps} steps, mean ms per part:");
    for (part, total) in PARTS.iter().zip(&totals) {
        if *total > 0.0 {
            println!("  {part:12} {:8.3}", total / steps as f64);
        }
    }
    println!("  {:12} {:8.3}", "total", totals.iter().sum::<f64>() / steps as f64);
    Ok(())
}
