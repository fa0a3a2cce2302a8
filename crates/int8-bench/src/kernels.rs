//! The kernels bench: GEMM and convolution layers, FP32 against INT8.

use std::time::Duration;

use anyhow::Result;
use int8_core::gemm::{Int8Path, MatMut, MatRef, Parallelism, gemm_f32, gemm_i8};
use int8_core::rng::CounterRng;

use crate::timing::median_ms;
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
    format!(
        "cpu: {cpu}; threads: {}; int8 paths: {}",
        rayon::current_num_threads(),
        paths.join(", ")
    )
}

fn random_f32(n: usize, seed: u64) -> Vec<f32> {
    let rng = CounterRng::new(seed);
    (0..n).map(|i| rng.uniform(i as u64) * 2.0 - 1.0).collect()
}

fn random_codes(n: usize, seed: u64) -> Vec<i8> {
    let rng = CounterRng::new(seed);
    (0..n)
        .map(|i| ((rng.bits(i as u64) % 255) as i32 - 127) as i8)
        .collect()
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
    if keep("gemm") {
        for row in gemm_rows(budget)? {
            push(row);
        }
    }
    Ok(rows)
}

fn gemm_rows(budget: Duration) -> Result<Vec<Row>> {
    let n = 1024;
    let (af, bf) = (random_f32(n * n, 1), random_f32(n * n, 2));
    let (ai, bi) = (random_codes(n * n, 3), random_codes(n * n, 4));
    let mut cf = vec![0f32; n * n];
    let mut ci = vec![0i32; n * n];
    let fp32 = median_ms(budget, || {
        gemm_f32(
            MatRef::row_major(&af, n, n).unwrap(),
            MatRef::row_major(&bf, n, n).unwrap(),
            MatMut::row_major(&mut cf, n, n).unwrap(),
            false,
            Parallelism::Rayon,
        )
        .unwrap()
    });
    let mut rows = Vec::new();
    for path in Int8Path::available() {
        let int8 = median_ms(budget, || {
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
        let suffix = if path == Int8Path::detect() {
            String::new()
        } else {
            format!(" ({})", path.name())
        };
        rows.push(Row::new(format!("gemm-1024{suffix}"), fp32, int8));
    }
    // rten-gemm's u8 x i8 kernel on the same problem, the reference point we must match or beat.
    let exec = rten_gemm::GemmExecutor::<u8, i8, i32>::default();
    let au: Vec<u8> = ai.iter().map(|&v| (v as u8) ^ 0x80).collect();
    let zero = vec![128u8; n];
    let rten = median_ms(budget, || {
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
    rows.push(Row::new("gemm-1024 (rten-gemm u8xi8)", fp32, rten));
    Ok(rows)
}
