//! 2-D convolution on the GPU, mirroring `crate::conv`: forward, input gradient (dX) and weight
//! gradient (dW), INT8 and FP32, general (im2col + GEMM, col2im for dX) and depthwise (direct).
//!
//! INT8 (Zhu et al., CVPR 2020, Sec. 3): the codes are lowered as bytes straight into the padded
//! K-contiguous operands cuBLASLt's IMMA kernels take (see [`crate::cuda`]), multiplied with exact
//! INT32 sums, and the scales applied once per output exactly as the CPU applies them, so every
//! output is the CPU's bit for bit: forward `(f32)sum * (s_x * s_w[co])`, dX `(f32)sum * (s_w *
//! s_dy)` with the taps summed in INT32 by col2im, dW `(f32)((f64)sum * (s_x as f64 * s_dy as
//! f64))` with the sum over the batch carried in i64 across chunks of images whose INT32 sums
//! provably fit (`plane * 127^2` per image, as on the CPU). FP32 runs on cuBLAS SGEMM and matches
//! the f64 reference within the CPU tests' bound. Depthwise convolutions at both precisions follow
//! the CPU's own summation order and match bit for bit.
//!
//! Work proceeds in chunks of images whose lowered operands fit [`WORKSPACE`] bytes.

use cudarc::driver::{CudaSlice, DeviceRepr};

use super::gemm::{Op, matmul_i8_nt, pack_i8, pad, sgemm};
use super::quant::GpuQView;
use super::{Gpu, blocks, grid, launch};
use crate::conv::ConvShape;
use crate::error::{CoreError, Result, check_len};
use crate::gemm::MAX_K_I8;

/// The most bytes of lowered operands and GEMM outputs one chunk of images may use.
pub const WORKSPACE: usize = 256 << 20;

/// One group's view of a convolution, the kernels' `struct Geom` field for field: an input of
/// `c` channels of `h x w` of which the group reads `c0 .. c0 + cg`, a `kh x kw` kernel with
/// stride, padding and dilation, and an `oh x ow` output.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geom {
    c: i64,
    c0: i64,
    cg: i64,
    h: i64,
    w: i64,
    kh: i64,
    kw: i64,
    sh: i64,
    sw: i64,
    ph: i64,
    pw: i64,
    dh: i64,
    dw: i64,
    oh: i64,
    ow: i64,
}

// SAFETY: `#[repr(C)]` and only i64 fields: the layout of the kernels' `struct Geom` of fifteen
// `long long`, passed by value.
unsafe impl DeviceRepr for Geom {}

impl Geom {
    /// The convolution's input as group `g` reads it.
    fn input(s: &ConvShape, g: usize) -> Self {
        let i = |v: usize| v as i64;
        Geom {
            c: i(s.c_in),
            c0: i(g * s.c_in_group()),
            cg: i(s.c_in_group()),
            h: i(s.h),
            w: i(s.w),
            kh: i(s.kh),
            kw: i(s.kw),
            sh: i(s.stride.0),
            sw: i(s.stride.1),
            ph: i(s.pad.0),
            pw: i(s.pad.1),
            dh: i(s.dilation.0),
            dw: i(s.dilation.1),
            oh: i(s.out_h()),
            ow: i(s.out_w()),
        }
    }

    /// The output gradient of group `g` as the input of a 1x1 convolution, whose im2col is dY's
    /// channels of the group, one row per position.
    fn output(s: &ConvShape, g: usize) -> Self {
        let i = |v: usize| v as i64;
        let (oh, ow) = (i(s.out_h()), i(s.out_w()));
        Geom {
            c: i(s.c_out),
            c0: i(g * s.c_out_group()),
            cg: i(s.c_out_group()),
            h: oh,
            w: ow,
            kh: 1,
            kw: 1,
            sh: 1,
            sw: 1,
            ph: 0,
            pw: 0,
            dh: 1,
            dw: 1,
            oh,
            ow,
        }
    }
}

/// Validates the shape and the buffers' lengths (`conv::check`).
fn check(s: &ConvShape, lens: &[(&'static str, usize, usize)]) -> Result<()> {
    s.validate()?;
    for &(what, got, expected) in lens {
        check_len(what, got, expected)?;
    }
    Ok(())
}

/// The single scale of a per-tensor quantized operand (`conv::int8::tensor_scale`).
fn tensor_scale(what: &'static str, q: &GpuQView) -> Result<f32> {
    match q.scales {
        [s] => Ok(*s),
        _ => Err(CoreError::InvalidArgument {
            what,
            why: format!("needs one per-tensor scale, got {}; quantize it per tensor", q.scales.len()),
        }),
    }
}

/// Images per chunk when each image needs `per_image` bytes of workspace (at least one).
fn images_per_chunk(per_image: usize, n: usize) -> usize {
    (WORKSPACE / per_image.max(1)).clamp(1, n.max(1))
}

/// The chunks `(first image, images)` of a batch of `n`, `per` images at a time.
fn chunks(n: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(per.max(1)).map(move |n0| (n0, per.min(n - n0)))
}

/// im2col of images `n0 .. n0 + nc` of group geometry `g` into `out[k * sk + pos * sp]`, padded
/// with zeros to `k_pad x pos_pad`.
#[allow(clippy::too_many_arguments)]
fn im2col_i8(
    gpu: &Gpu,
    x: &CudaSlice<i8>,
    g: Geom,
    (n0, nc): (usize, usize),
    (k_pad, pos_pad): (usize, usize),
    (sk, sp): (usize, usize),
    out: &mut CudaSlice<i8>,
) -> Result<()> {
    if out.len() < k_pad * pos_pad {
        return Err(CoreError::InvalidArgument { what: "im2col buffer", why: "too small".into() });
    }
    let (n0, nc, kp, pp, sk, sp) = (n0 as i64, nc as i64, k_pad as i64, pos_pad as i64, sk as i64, sp as i64);
    launch!(gpu, "conv", "im2col_i8", grid(k_pad * pos_pad), [x, &g, &n0, &nc, &kp, &pp, &sk, &sp, out])
}

/// [`im2col_i8`] for FP32 values.
#[allow(clippy::too_many_arguments)]
fn im2col_f32(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    g: Geom,
    (n0, nc): (usize, usize),
    (k_pad, pos_pad): (usize, usize),
    (sk, sp): (usize, usize),
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if out.len() < k_pad * pos_pad {
        return Err(CoreError::InvalidArgument { what: "im2col buffer", why: "too small".into() });
    }
    let (n0, nc, kp, pp, sk, sp) = (n0 as i64, nc as i64, k_pad as i64, pos_pad as i64, sk as i64, sp as i64);
    launch!(gpu, "conv", "im2col_f32", grid(k_pad * pos_pad), [x, &g, &n0, &nc, &kp, &pp, &sk, &sp, out])
}

/// Checks a depthwise weight's scales and returns each channel's: `f(channel scale)`.
fn per_channel(what: &'static str, scales: &[f32], c: usize, f: impl Fn(f32) -> f32) -> Result<Vec<f32>> {
    match scales {
        [s] => Ok(vec![f(*s); c]),
        s if s.len() == c => Ok(s.iter().map(|&v| f(v)).collect()),
        s => Err(CoreError::InvalidArgument {
            what,
            why: format!("needs one scale or one per channel ({c}), got {}", s.len()),
        }),
    }
}

/// Forward: `y = (s_x * s_w[co]) * conv(xq, wq)`, overwriting `y` (`conv::conv2d_fwd_i8`). The
/// weight may have one scale or one per output channel.
pub fn conv2d_fwd_i8(gpu: &Gpu, s: &ConvShape, x: GpuQView, w: GpuQView, y: &mut CudaSlice<f32>) -> Result<()> {
    check(
        s,
        &[
            ("conv input", x.codes.len(), s.x_len()),
            ("conv weight", w.codes.len(), s.w_len()),
            ("conv output", y.len(), s.y_len()),
        ],
    )?;
    let sx = tensor_scale("conv input", &x)?;
    if w.scales.len() != 1 && w.scales.len() != s.c_out {
        return Err(CoreError::InvalidArgument {
            what: "conv weight scales",
            why: format!(
                "{} scales for {} output channels; give one, or one per output channel",
                w.scales.len(),
                s.c_out
            ),
        });
    }
    let row_scales: Vec<f32> = (0..s.c_out).map(|co| sx * w.scales[if w.scales.len() == 1 { 0 } else { co }]).collect();
    let scales = gpu.upload(&row_scales)?;
    if s.is_depthwise() {
        let (g, n) = (Geom::input(s, 0), s.n as i64);
        return launch!(gpu, "conv", "dw_fwd_i8", grid(s.y_len()), [x.codes, w.codes, &g, &n, &scales, y]);
    }
    let (p, kg, cog) = (s.out_plane(), s.k_group(), s.c_out_group());
    let (mp, kp) = (pad(cog), pad(kg));
    let mut weights = gpu.zeros::<i8>(s.groups * mp * kp)?;
    pack_i8(gpu, w.codes, (s.groups, cog, kg), (0, cog * kg, kg, 1), &mut weights, (mp, kp))?;
    let per = images_per_chunk(p * kp + 4 * mp * p, s.n);
    let mut col = gpu.zeros::<i8>(pad(per * p) * kp)?;
    let mut out = gpu.zeros::<i32>(mp * pad(per * p))?;
    for (n0, nc) in chunks(s.n, per) {
        let np = pad(nc * p);
        for g in 0..s.groups {
            im2col_i8(gpu, x.codes, Geom::input(s, g), (n0, nc), (kp, np), (1, kp), &mut col)?;
            matmul_i8_nt(gpu, (mp, np, kp), &weights, g * mp * kp, &col, 0, &mut out, 0)?;
            let (ld, cog_i, co, co0, p_i, n0_i, nc_i) =
                (np as i64, cog as i64, s.c_out as i64, (g * cog) as i64, p as i64, n0 as i64, nc as i64);
            launch!(
                gpu,
                "conv",
                "scatter_i32",
                grid(nc * cog * p),
                [&out, &ld, &cog_i, &co, &co0, &p_i, &n0_i, &nc_i, &scales, &mut *y]
            )?;
        }
    }
    Ok(())
}

/// Input gradient: `dx = (s_w * s_dy) * conv_transpose(dyq, wq)`, overwriting `dx`
/// (`conv::conv2d_dx_i8`). Both operands need one scale each, except that a depthwise weight may
/// have one per channel.
pub fn conv2d_dx_i8(gpu: &Gpu, s: &ConvShape, w: GpuQView, dy: GpuQView, dx: &mut CudaSlice<f32>) -> Result<()> {
    check(
        s,
        &[
            ("conv weight", w.codes.len(), s.w_len()),
            ("conv output gradient", dy.codes.len(), s.y_len()),
            ("conv input gradient", dx.len(), s.x_len()),
        ],
    )?;
    if s.is_depthwise() {
        let sdy = tensor_scale("conv output gradient", &dy)?;
        let scales = per_channel("depthwise conv weight (for the input gradient)", w.scales, s.c_out, |sw| sw * sdy)?;
        let scales = gpu.upload(&scales)?;
        let (g, n) = (Geom::input(s, 0), s.n as i64);
        return launch!(gpu, "conv", "dw_dx_i8", grid(s.x_len()), [w.codes, dy.codes, &g, &n, &scales, dx]);
    }
    let sc = tensor_scale("conv weight (for the input gradient)", &w)? * tensor_scale("conv output gradient", &dy)?;
    let (p, kg, cog) = (s.out_plane(), s.k_group(), s.c_out_group());
    if cog * s.kh * s.kw > MAX_K_I8 {
        return Err(CoreError::InvalidArgument {
            what: "int8 gemm depth",
            why: format!(
                "the input gradient sums {} terms, more than {MAX_K_I8}, where i32 sums may overflow",
                cog * s.kh * s.kw
            ),
        });
    }
    // A = W_g^T: [K = c_in_g * kh * kw][c_out_g], element (k, co) at w[(g * cog + co) * kg + k].
    let (mp, kp) = (pad(kg), pad(cog));
    let mut weights = gpu.zeros::<i8>(s.groups * mp * kp)?;
    pack_i8(gpu, w.codes, (s.groups, kg, cog), (0, cog * kg, 1, kg), &mut weights, (mp, kp))?;
    let per = images_per_chunk(p * kp + 4 * mp * p, s.n);
    let mut col = gpu.zeros::<i8>(pad(per * p) * kp)?;
    let mut out = gpu.zeros::<i32>(mp * pad(per * p))?;
    for (n0, nc) in chunks(s.n, per) {
        let np = pad(nc * p);
        for g in 0..s.groups {
            // dY of the group as rows of positions: [positions][c_out_g].
            im2col_i8(gpu, dy.codes, Geom::output(s, g), (n0, nc), (kp, np), (1, kp), &mut col)?;
            matmul_i8_nt(gpu, (mp, np, kp), &weights, g * mp * kp, &col, 0, &mut out, 0)?;
            let (geom, ld, n0_i, nc_i) = (Geom::input(s, g), np as i64, n0 as i64, nc as i64);
            launch!(
                gpu,
                "conv",
                "col2im_i32",
                grid(nc * s.c_in_group() * s.in_plane()),
                [&out, &ld, &geom, &n0_i, &nc_i, &sc, &mut *dx]
            )?;
        }
    }
    Ok(())
}

/// Weight gradient: `dw = (s_dy * s_x) * sum over the batch of dyq * im2col(xq)^T`, overwriting
/// `dw` (`conv::conv2d_dw_i8`): each chunk's sums exact in INT32, the batch sum carried in i64.
pub fn conv2d_dw_i8(gpu: &Gpu, s: &ConvShape, x: GpuQView, dy: GpuQView, dw: &mut CudaSlice<f32>) -> Result<()> {
    check(
        s,
        &[
            ("conv input", x.codes.len(), s.x_len()),
            ("conv output gradient", dy.codes.len(), s.y_len()),
            ("conv weight gradient", dw.len(), s.w_len()),
        ],
    )?;
    let sc = tensor_scale("conv input", &x)? as f64 * tensor_scale("conv output gradient", &dy)? as f64;
    let mut total = gpu.zeros::<i64>(s.w_len())?;
    let len = s.w_len() as i64;
    if s.is_depthwise() {
        let (g, n) = (Geom::input(s, 0), s.n as i64);
        launch!(gpu, "conv", "dw_dw_i8", blocks(s.c_in * s.kh * s.kw), [x.codes, dy.codes, &g, &n, &mut total])?;
        return launch!(gpu, "gemm", "finish_i64", grid(s.w_len()), [&total, &len, &sc, dw]);
    }
    let (p, kg, cog) = (s.out_plane(), s.k_group(), s.c_out_group());
    // One image adds at most `plane * 127^2` to each sum, so this many add up exactly in INT32.
    let per_i32 = (i32::MAX as usize / (p * 127 * 127)).max(1);
    let (mp, np) = (pad(cog), pad(kg));
    let per = images_per_chunk((mp + np) * p, s.n).min(per_i32);
    let kp_max = pad(per * p);
    let mut a = gpu.zeros::<i8>(mp * kp_max)?;
    let mut bt = gpu.zeros::<i8>(np * kp_max)?;
    let mut out = gpu.zeros::<i32>(mp * np)?;
    for (n0, nc) in chunks(s.n, per) {
        let kp = pad(nc * p);
        for g in 0..s.groups {
            // A = dY of the group as [c_out_g][positions]; Bt = im2col(x) as [K][positions].
            im2col_i8(gpu, dy.codes, Geom::output(s, g), (n0, nc), (mp, kp), (kp, 1), &mut a)?;
            im2col_i8(gpu, x.codes, Geom::input(s, g), (n0, nc), (np, kp), (kp, 1), &mut bt)?;
            matmul_i8_nt(gpu, (mp, np, kp), &a, 0, &bt, 0, &mut out, 0)?;
            let mut part = total.slice_mut(g * cog * kg..(g + 1) * cog * kg);
            let (rows, cols, ld) = (cog as i64, kg as i64, np as i64);
            launch!(gpu, "gemm", "widen_add", grid(cog * kg), [&out, &rows, &cols, &ld, &mut part])?;
        }
    }
    launch!(gpu, "gemm", "finish_i64", grid(s.w_len()), [&total, &len, &sc, dw])
}

/// Forward: `y = conv(x, w)`, overwriting `y` (`conv::conv2d_fwd_f32`).
pub fn conv2d_fwd_f32(
    gpu: &Gpu,
    s: &ConvShape,
    x: &CudaSlice<f32>,
    w: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    check(
        s,
        &[("conv input", x.len(), s.x_len()), ("conv weight", w.len(), s.w_len()), ("conv output", y.len(), s.y_len())],
    )?;
    if s.is_depthwise() {
        let (g, n) = (Geom::input(s, 0), s.n as i64);
        return launch!(gpu, "conv", "dw_fwd_f32", grid(s.y_len()), [x, w, &g, &n, y]);
    }
    let (p, kg, cog) = (s.out_plane(), s.k_group(), s.c_out_group());
    let per = images_per_chunk(4 * (kg + cog) * p, s.n);
    let mut col = gpu.zeros::<f32>(kg * per * p)?;
    let mut out = gpu.zeros::<f32>(cog * per * p)?;
    for (n0, nc) in chunks(s.n, per) {
        let q = nc * p;
        for g in 0..s.groups {
            im2col_f32(gpu, x, Geom::input(s, g), (n0, nc), (kg, q), (q, 1), &mut col)?;
            // [c_out_g][positions] = W_g [c_out_g][K] * col [K][positions].
            sgemm(
                gpu,
                (cog, q, kg),
                (w, Op { off: g * cog * kg, ld: kg, t: false }),
                (&col, Op { off: 0, ld: q, t: false }),
                0.0,
                &mut out,
                (0, q),
            )?;
            let (ld, cog_i, co, co0, p_i, n0_i, nc_i) =
                (q as i64, cog as i64, s.c_out as i64, (g * cog) as i64, p as i64, n0 as i64, nc as i64);
            launch!(
                gpu,
                "conv",
                "scatter_f32",
                grid(nc * cog * p),
                [&out, &ld, &cog_i, &co, &co0, &p_i, &n0_i, &nc_i, &mut *y]
            )?;
        }
    }
    Ok(())
}

/// Input gradient: `dx = conv_transpose(dy, w)`, overwriting `dx` (`conv::conv2d_dx_f32`).
pub fn conv2d_dx_f32(
    gpu: &Gpu,
    s: &ConvShape,
    w: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    check(
        s,
        &[
            ("conv weight", w.len(), s.w_len()),
            ("conv output gradient", dy.len(), s.y_len()),
            ("conv input gradient", dx.len(), s.x_len()),
        ],
    )?;
    if s.is_depthwise() {
        let (g, n) = (Geom::input(s, 0), s.n as i64);
        return launch!(gpu, "conv", "dw_dx_f32", grid(s.x_len()), [w, dy, &g, &n, dx]);
    }
    let (p, kg, cog) = (s.out_plane(), s.k_group(), s.c_out_group());
    let per = images_per_chunk(4 * (kg + cog) * p, s.n);
    let mut dyg = gpu.zeros::<f32>(cog * per * p)?;
    let mut col = gpu.zeros::<f32>(kg * per * p)?;
    for (n0, nc) in chunks(s.n, per) {
        let q = nc * p;
        for g in 0..s.groups {
            im2col_f32(gpu, dy, Geom::output(s, g), (n0, nc), (cog, q), (q, 1), &mut dyg)?;
            // [K][positions] = W_g^T [K][c_out_g] * dY_g [c_out_g][positions].
            sgemm(
                gpu,
                (kg, q, cog),
                (w, Op { off: g * cog * kg, ld: kg, t: true }),
                (&dyg, Op { off: 0, ld: q, t: false }),
                0.0,
                &mut col,
                (0, q),
            )?;
            let (geom, ld, n0_i, nc_i) = (Geom::input(s, g), q as i64, n0 as i64, nc as i64);
            launch!(
                gpu,
                "conv",
                "col2im_f32",
                grid(nc * s.c_in_group() * s.in_plane()),
                [&col, &ld, &geom, &n0_i, &nc_i, &mut *dx]
            )?;
        }
    }
    Ok(())
}

/// The row length of the CPU's depthwise phase layout (`depthwise::Phased::new`'s `pw`), which
/// decides the lanes of its FP32 weight-gradient dot products.
fn phased_row(s: &ConvShape) -> usize {
    (s.out_w() + (s.kw - 1) * s.dilation.1 / s.stride.1).max((s.w + s.pad.1).div_ceil(s.stride.1))
}

/// Weight gradient: `dw = sum over the batch of dy * im2col(x)^T`, overwriting `dw`
/// (`conv::conv2d_dw_f32`).
pub fn conv2d_dw_f32(
    gpu: &Gpu,
    s: &ConvShape,
    x: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dw: &mut CudaSlice<f32>,
) -> Result<()> {
    check(
        s,
        &[
            ("conv input", x.len(), s.x_len()),
            ("conv output gradient", dy.len(), s.y_len()),
            ("conv weight gradient", dw.len(), s.w_len()),
        ],
    )?;
    if s.is_depthwise() {
        let rows = s.c_in * s.kh * s.kw;
        let mut partial = gpu.zeros::<f32>(rows * s.n)?;
        let (g, n, pw, rows_i) = (Geom::input(s, 0), s.n as i64, phased_row(s) as i64, rows as i64);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (rows as u32, s.n.div_ceil(16) as u32, 1),
            block_dim: (super::BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(gpu, "conv", "dw_dw_f32_images", cfg, [x, dy, &g, &n, &pw, &mut partial])?;
        return launch!(gpu, "conv", "dw_dw_f32_finish", grid(rows), [&partial, &rows_i, &n, dw]);
    }
    let (p, kg, cog) = (s.out_plane(), s.k_group(), s.c_out_group());
    let per = images_per_chunk(4 * (kg + cog) * p, s.n);
    let mut dyg = gpu.zeros::<f32>(cog * per * p)?;
    let mut col = gpu.zeros::<f32>(kg * per * p)?;
    for (i, (n0, nc)) in chunks(s.n, per).enumerate() {
        let q = nc * p;
        for g in 0..s.groups {
            im2col_f32(gpu, dy, Geom::output(s, g), (n0, nc), (cog, q), (q, 1), &mut dyg)?;
            im2col_f32(gpu, x, Geom::input(s, g), (n0, nc), (kg, q), (q, 1), &mut col)?;
            // dW_g [c_out_g][K] (+)= dY_g [c_out_g][positions] * col^T [positions][K].
            let beta = if i == 0 { 0.0 } else { 1.0 };
            sgemm(
                gpu,
                (cog, kg, q),
                (&dyg, Op { off: 0, ld: q, t: false }),
                (&col, Op { off: 0, ld: q, t: true }),
                beta,
                dw,
                (g * cog * kg, kg),
            )?;
        }
    }
    Ok(())
}

/// The pixels a strided 1x1 convolution `s` reads (`conv::subsample`), for INT8 codes.
pub fn subsample_i8(gpu: &Gpu, s: &ConvShape, x: &CudaSlice<i8>) -> Result<CudaSlice<i8>> {
    check_len("subsample input", x.len(), s.x_len())?;
    let len = s.n * s.c_in * s.out_plane();
    let mut out = gpu.zeros::<i8>(len.max(1))?;
    let a = subsample_args(s);
    launch!(gpu, "conv", "subsample_i8", grid(len), [x, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &mut out])?;
    Ok(out)
}

/// The pixels a strided 1x1 convolution `s` reads (`conv::subsample`), for FP32 values.
pub fn subsample_f32(gpu: &Gpu, s: &ConvShape, x: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
    check_len("subsample input", x.len(), s.x_len())?;
    let len = s.n * s.c_in * s.out_plane();
    let mut out = gpu.zeros::<f32>(len.max(1))?;
    let a = subsample_args(s);
    launch!(gpu, "conv", "subsample_f32", grid(len), [x, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], &mut out])?;
    Ok(out)
}

/// The inverse placement of the subsample for gradients (`conv::upsample`): `dx` gets `sub` at
/// the pixels the convolution read and zero everywhere else.
pub fn upsample(gpu: &Gpu, s: &ConvShape, sub: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) -> Result<()> {
    check_len("upsample input", sub.len(), s.n * s.c_in * s.out_plane())?;
    check_len("upsample output", dx.len(), s.x_len())?;
    let a = subsample_args(s);
    launch!(gpu, "conv", "upsample_f32", grid(s.x_len()), [sub, &a[0], &a[1], &a[2], &a[3], &a[4], &a[5], &a[6], dx])
}

/// `(planes, h, w, out_h, out_w, stride_h, stride_w)` of a subsample.
fn subsample_args(s: &ConvShape) -> [i64; 7] {
    [
        (s.n * s.c_in) as i64,
        s.h as i64,
        s.w as i64,
        s.out_h() as i64,
        s.out_w() as i64,
        s.stride.0 as i64,
        s.stride.1 as i64,
    ]
}
