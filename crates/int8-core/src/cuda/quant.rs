//! Symmetric INT8 quantization on the GPU (Zhu et al., CVPR 2020, Sec. 3, Eq. 1), mirroring
//! `crate::quant` bit for bit: the same clip values and scales, the same codes (nearest, ties to
//! even, or stochastic from the same counter-based stream), the same saturation counts, and the
//! same error, naming the tensor, for the first non-finite value.

use cudarc::driver::CudaSlice;

use super::{Gpu, blocks, grid, launch, rounding_args};
use crate::error::{CoreError, Result};
use crate::quant::{Granularity, QMAX, Rounding, scale_for_clip};

/// Values per CPU work item of `quant::quantize_pass` (`quant::CHUNK`): the fused pass's distance
/// terms are carried per chunk of this many values, as there.
pub(crate) const QUANT_CHUNK: usize = 1 << 15;
/// Blocks of `max_abs_partial` (each reduces a grid-stride share of the tensor).
const MAX_ABS_BLOCKS: usize = 1024;

/// A quantized tensor on the GPU: the codes on the device, the scales and the saturation count on
/// the host (as `QTensor`; the host needs them anyway: the scales go into the convolutions'
/// arguments and the count into the logs).
#[derive(Debug)]
pub struct GpuQTensor {
    /// Codes in `[-127, 127]`, in the source tensor's layout.
    pub codes: CudaSlice<i8>,
    /// One scale (`c / 127`) per channel; a single entry for per-tensor quantization.
    pub scales: Vec<f32>,
    /// How many source values were clipped.
    pub saturated: usize,
}

impl GpuQTensor {
    /// A borrowed view for the convolutions.
    pub fn view(&self) -> GpuQView<'_> {
        GpuQView { codes: &self.codes, scales: &self.scales }
    }
}

/// A borrowed quantized tensor on the GPU (`conv::QView`): codes on the device, scales on the host.
#[derive(Debug, Clone, Copy)]
pub struct GpuQView<'a> {
    /// The codes.
    pub codes: &'a CudaSlice<i8>,
    /// The scales.
    pub scales: &'a [f32],
}

/// `(max |x| over the finite values, first index of a non-finite value)`.
pub(crate) fn max_abs_scan(gpu: &Gpu, x: &CudaSlice<f32>) -> Result<(f32, Option<usize>)> {
    let n = x.len();
    if n == 0 {
        return Ok((0.0, None));
    }
    let nb = n.div_ceil(super::BLOCK as usize).min(MAX_ABS_BLOCKS);
    let mut maxes = gpu.zeros::<f32>(nb)?;
    let mut bad = gpu.zeros::<u64>(nb)?;
    let len = n as i64;
    launch!(gpu, "quant", "max_abs_partial", blocks(nb), [x, &len, &mut maxes, &mut bad])?;
    let (maxes, bad) = (gpu.download(&maxes)?, gpu.download(&bad)?);
    let amax = maxes.iter().fold(0.0f32, |m, &v| m.max(v));
    let first = bad.iter().copied().min().filter(|&b| b < n as u64).map(|b| b as usize);
    Ok((amax, first))
}

/// The error for the first non-finite value of `x`, at `index`.
pub(crate) fn non_finite(gpu: &Gpu, name: &str, x: &CudaSlice<f32>, index: usize) -> CoreError {
    let value =
        gpu.stream().clone_dtoh(&x.slice(index..index + 1)).ok().and_then(|v| v.first().copied()).unwrap_or(f32::NAN);
    CoreError::NonFinite { name: name.to_string(), value, index }
}

/// The largest magnitude in `x`, or an error naming `name` if `x` holds NaN or an infinity
/// (`quant::max_abs`).
pub fn max_abs(gpu: &Gpu, name: &str, x: &CudaSlice<f32>) -> Result<f32> {
    match max_abs_scan(gpu, x)? {
        (amax, None) => Ok(amax),
        (_, Some(i)) => Err(non_finite(gpu, name, x, i)),
    }
}

/// Checks a clip value as `quantize_pass` does.
fn check_clip(name: &str, clip: f32) -> Result<()> {
    if !clip.is_finite() || clip < 0.0 {
        return Err(CoreError::InvalidArgument {
            what: "clip value",
            why: format!("{clip} for tensor `{name}`; it must be finite and >= 0"),
        });
    }
    Ok(())
}

/// `QMAX / clip`, or 0 when `clip <= 0` (everything maps to code 0): `quantize_slice`'s `inv`.
pub(crate) fn inverse_scale(clip: f32) -> f32 {
    if clip > 0.0 { QMAX / clip } else { 0.0 }
}

/// Quantizes `x` with clipping value `clip` per tensor (`quant::quantize_with_clip`), or an
/// error naming `name` if `x` holds NaN or an infinity.
pub fn quantize_with_clip(
    gpu: &Gpu,
    name: &str,
    x: &CudaSlice<f32>,
    clip: f32,
    rounding: Rounding,
) -> Result<GpuQTensor> {
    check_clip(name, clip)?;
    if let (_, Some(i)) = max_abs_scan(gpu, x)? {
        return Err(non_finite(gpu, name, x, i));
    }
    quantize_checked(gpu, x, clip, rounding)
}

/// [`quantize_with_clip`] on a tensor already checked to be finite.
fn quantize_checked(gpu: &Gpu, x: &CudaSlice<f32>, clip: f32, rounding: Rounding) -> Result<GpuQTensor> {
    let n = x.len();
    let mut codes = gpu.zeros::<i8>(n.max(1))?;
    let mut saturated = gpu.zeros::<u64>(1)?;
    if n > 0 {
        let (stochastic, key) = rounding_args(rounding);
        let (len, inv) = (n as i64, inverse_scale(clip));
        launch!(
            gpu,
            "quant",
            "quantize_tensor",
            grid(n),
            [x, &len, &clip, &inv, &stochastic, &key, &mut codes, &mut saturated]
        )?;
    }
    let saturated = gpu.download(&saturated)?[0] as usize;
    let codes = shrink(gpu, codes, n)?;
    Ok(GpuQTensor { codes, scales: vec![scale_for_clip(clip)], saturated })
}

/// `codes` as a buffer of exactly `n` values: buffers are allocated with at least one value, so an
/// empty tensor's codes are replaced by an empty buffer.
fn shrink(gpu: &Gpu, codes: CudaSlice<i8>, n: usize) -> Result<CudaSlice<i8>> {
    if codes.len() == n {
        return Ok(codes);
    }
    gpu.zeros::<i8>(n)
}

/// Quantizes `x` clipping at its own largest magnitude, per tensor or per channel (the outermost
/// dimension, `channels` slices of equal length), so nothing saturates (`quant::quantize`).
pub fn quantize(
    gpu: &Gpu,
    name: &str,
    x: &CudaSlice<f32>,
    granularity: Granularity,
    channels: usize,
    rounding: Rounding,
) -> Result<GpuQTensor> {
    match granularity {
        Granularity::PerTensor => {
            let clip = max_abs(gpu, name, x)?;
            quantize_checked(gpu, x, clip, rounding)
        }
        Granularity::PerChannel => {
            let n = x.len();
            if channels == 0 || !n.is_multiple_of(channels) {
                return Err(CoreError::InvalidArgument {
                    what: "channel count",
                    why: format!("{n} elements of `{name}` do not split into {channels} channels"),
                });
            }
            max_abs(gpu, name, x)?;
            let len = n / channels;
            let mut clips = gpu.zeros::<f32>(channels)?;
            let mut codes = gpu.zeros::<i8>(n.max(1))?;
            let mut saturated = gpu.zeros::<u64>(1)?;
            if len > 0 {
                let (stochastic, key) = rounding_args(rounding);
                let (total, len) = (n as i64, len as i64);
                launch!(gpu, "quant", "channel_max_abs", blocks(channels), [x, &len, &mut clips])?;
                launch!(
                    gpu,
                    "quant",
                    "quantize_channels",
                    grid(n),
                    [x, &total, &len, &clips, &stochastic, &key, &mut codes, &mut saturated]
                )?;
            }
            // An empty tensor has no channel chunks on the CPU, hence no scales.
            let scales =
                if n == 0 { Vec::new() } else { gpu.download(&clips)?.into_iter().map(scale_for_clip).collect() };
            let saturated = gpu.download(&saturated)?[0] as usize;
            Ok(GpuQTensor { codes: shrink(gpu, codes, n)?, scales, saturated })
        }
    }
}

/// The three DSGC sums `(sum x*q, sum q*q, sum x*x)` of `x` at `inv`: each 1024-value block's sums
/// as the CPU forms them, added per chunk of `chunk` values in block order from 0.0 (the CPU's
/// per-chunk carry), the chunks added in index order on the host. With `quantize`, also the codes
/// and the saturation count at `clip` with `rounding` (the fused pass).
pub(crate) fn terms_pass(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    clip: f32,
    rounding: Rounding,
    chunk: usize,
    quantize: Option<(&mut CudaSlice<i8>, &mut CudaSlice<u64>)>,
) -> Result<(f64, f64, f64)> {
    let n = x.len();
    if n == 0 {
        return Ok((0.0, 0.0, 0.0));
    }
    let nb = n.div_ceil(1024);
    let mut partials = gpu.zeros::<f64>(3 * nb)?;
    let (len, inv) = (n as i64, inverse_scale(clip));
    // Sixteen 1024-value blocks per thread block of 256 threads.
    let cfg = blocks(nb.div_ceil(16));
    match quantize {
        Some((codes, saturated)) => {
            let (stochastic, key) = rounding_args(rounding);
            launch!(
                gpu,
                "quant",
                "quantize_terms",
                cfg,
                [x, &len, &clip, &inv, &stochastic, &key, codes, saturated, &mut partials]
            )?;
        }
        None => launch!(gpu, "quant", "distance_terms", cfg, [x, &len, &inv, &mut partials])?,
    }
    let per = chunk / 1024;
    let chunks = nb.div_ceil(per);
    let mut sums = gpu.zeros::<f64>(3 * chunks)?;
    let (nb_i, per_i, chunks_i) = (nb as i64, per as i64, chunks as i64);
    launch!(gpu, "quant", "chunk_sums", grid(chunks), [&partials, &nb_i, &per_i, &chunks_i, &mut sums])?;
    let sums = gpu.download(&sums)?;
    let mut total = (0.0f64, 0.0f64, 0.0f64);
    for c in sums.chunks_exact(3) {
        total = (total.0 + c[0], total.1 + c[1], total.2 + c[2]);
    }
    Ok(total)
}

/// `quantize_pass::<true>`: quantizes `x` at `clip` per tensor and returns the DSGC sums of the
/// codes produced, or an error naming `name` for a non-finite value or a bad clip value.
pub(crate) fn quantize_with_terms(
    gpu: &Gpu,
    name: &str,
    x: &CudaSlice<f32>,
    clip: f32,
    rounding: Rounding,
) -> Result<(GpuQTensor, (f64, f64, f64))> {
    check_clip(name, clip)?;
    if let (_, Some(i)) = max_abs_scan(gpu, x)? {
        return Err(non_finite(gpu, name, x, i));
    }
    let n = x.len();
    let mut codes = gpu.zeros::<i8>(n.max(1))?;
    let mut saturated = gpu.zeros::<u64>(1)?;
    let terms = terms_pass(gpu, x, clip, rounding, QUANT_CHUNK, Some((&mut codes, &mut saturated)))?;
    let saturated = gpu.download(&saturated)?[0] as usize;
    Ok((GpuQTensor { codes: shrink(gpu, codes, n)?, scales: vec![scale_for_clip(clip)], saturated }, terms))
}
