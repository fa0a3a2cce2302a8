//! The FP32 layers around the convolutions on the GPU, mirroring `crate::nn` (batch norm with a
//! fused ReLU/ReLU6, the elementwise glue, pooling, softmax cross-entropy), and int8-nn's dropout
//! mask and SGD update, all bit for bit except the loss (see [`softmax_cross_entropy`]).
//!
//! Batch norm follows the CPU's reduction order, which depends only on the shape: per plane,
//! sixteen f32 lanes added in f64; per channel, planes merged image by image inside at most 32
//! blocks of images and then block by block (Chan, Golub and LeVeque's update for the moments).
//! The kernels reproduce each step, so the statistics, the output and the gradients are the
//! CPU's to the bit.

use cudarc::driver::{CudaSlice, DeviceRepr};

use super::{Gpu, blocks, grid, launch, rng_key};
use crate::error::{CoreError, Result, check_len};
use crate::nn::batchnorm::NchwDims;
use crate::nn::pool::Pool2d;

/// The batch statistics of one training forward pass on the device (`batchnorm::BatchStats`).
#[derive(Debug)]
pub struct GpuBatchStats {
    /// Per-channel mean.
    pub mean: CudaSlice<f32>,
    /// Per-channel `1 / sqrt(var + eps)`.
    pub inv_std: CudaSlice<f32>,
    /// Per-channel biased variance.
    pub var: CudaSlice<f32>,
    /// Per-channel `gamma * inv_std`.
    pub scale: CudaSlice<f32>,
    /// Per-channel `beta - mean * scale`.
    pub shift: CudaSlice<f32>,
}

/// `NchwDims::check`: values per channel, and the buffers' lengths.
fn check_dims(d: NchwDims, lens: &[(&'static str, usize, usize)]) -> Result<()> {
    if d.n * d.hw == 0 {
        return Err(CoreError::InvalidArgument {
            what: "batch norm input",
            why: format!("{d:?} has no values per channel"),
        });
    }
    for &(what, got, expected) in lens {
        check_len(what, got, expected)?;
    }
    Ok(())
}

/// `(fused clamp on, cap)` for the kernels.
fn clamp_args(relu: Option<f32>) -> (i32, f32) {
    relu.map_or((0, 0.0), |cap| (1, cap))
}

/// The launch of the per-plane kernels: sixteen planes of sixteen lanes per thread block.
fn plane_blocks(planes: usize) -> cudarc::driver::LaunchConfig {
    blocks(planes.div_ceil(16))
}

/// Training forward (`batchnorm::forward_train`): `y = gamma * (x - mean) * inv_std + beta`,
/// clamped to `[0, cap]` when `relu` gives a cap; returns the batch statistics.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_forward_train(
    gpu: &Gpu,
    d: NchwDims,
    x: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    eps: f32,
    relu: Option<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<GpuBatchStats> {
    let len = d.n * d.c * d.hw;
    check_dims(
        d,
        &[
            ("batch norm input", x.len(), len),
            ("gamma", gamma.len(), d.c),
            ("beta", beta.len(), d.c),
            ("batch norm output", y.len(), len),
        ],
    )?;
    let planes = d.n * d.c;
    let (mut pmean, mut pm2) = (gpu.zeros::<f64>(planes)?, gpu.zeros::<f64>(planes)?);
    let (planes_i, hw, n, c, total) = (planes as i64, d.hw as i64, d.n as i64, d.c as i64, len as i64);
    launch!(gpu, "batchnorm", "bn_plane_moments", plane_blocks(planes), [x, &planes_i, &hw, &mut pmean, &mut pm2])?;
    let mut st = GpuBatchStats {
        mean: gpu.zeros(d.c)?,
        inv_std: gpu.zeros(d.c)?,
        var: gpu.zeros(d.c)?,
        scale: gpu.zeros(d.c)?,
        shift: gpu.zeros(d.c)?,
    };
    launch!(
        gpu,
        "batchnorm",
        "bn_channel_stats",
        grid(d.c),
        [
            &pmean,
            &pm2,
            &n,
            &c,
            &hw,
            gamma,
            beta,
            &eps,
            &mut st.mean,
            &mut st.inv_std,
            &mut st.var,
            &mut st.scale,
            &mut st.shift
        ]
    )?;
    let (on, cap) = clamp_args(relu);
    launch!(gpu, "batchnorm", "bn_affine", grid(len), [x, &total, &c, &hw, &st.scale, &st.shift, &on, &cap, y])?;
    Ok(st)
}

/// `(scale, shift, inv)` from running statistics, as `forward_eval` and `backward_eval` form them.
#[allow(clippy::type_complexity)]
fn eval_affine(
    gpu: &Gpu,
    c: usize,
    (gamma, beta): (&CudaSlice<f32>, &CudaSlice<f32>),
    (rmean, rvar): (&CudaSlice<f32>, &CudaSlice<f32>),
    eps: f32,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
    let (mut scale, mut shift, mut inv) = (gpu.zeros::<f32>(c)?, gpu.zeros::<f32>(c)?, gpu.zeros::<f32>(c)?);
    let c_i = c as i64;
    launch!(
        gpu,
        "batchnorm",
        "bn_eval_affine",
        grid(c),
        [gamma, beta, rmean, rvar, &c_i, &eps, &mut scale, &mut shift, &mut inv]
    )?;
    Ok((scale, shift, inv))
}

/// Evaluation forward with running statistics (`batchnorm::forward_eval`).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_forward_eval(
    gpu: &Gpu,
    d: NchwDims,
    x: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    running_mean: &CudaSlice<f32>,
    running_var: &CudaSlice<f32>,
    eps: f32,
    relu: Option<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let len = d.n * d.c * d.hw;
    check_dims(
        d,
        &[
            ("batch norm input", x.len(), len),
            ("gamma", gamma.len(), d.c),
            ("beta", beta.len(), d.c),
            ("running mean", running_mean.len(), d.c),
            ("running variance", running_var.len(), d.c),
            ("batch norm output", y.len(), len),
        ],
    )?;
    let (scale, shift, _) = eval_affine(gpu, d.c, (gamma, beta), (running_mean, running_var), eps)?;
    let (on, cap) = clamp_args(relu);
    let (total, c, hw) = (len as i64, d.c as i64, d.hw as i64);
    launch!(gpu, "batchnorm", "bn_affine", grid(len), [x, &total, &c, &hw, &scale, &shift, &on, &cap, y])
}

/// The shared part of both backward passes: the per-channel sums `(dgamma, dbeta)` and `dx`,
/// with `mean`, `inv` the normalisation, `(ma, mb)` the forward's affine map (for the fused
/// clamp's mask), and `dx = k * (m * g - db - (x - mean) * inv * dg)` with `k`, `m`, `db`, `dg`
/// given per mode (`plane_grad_sums`, `plane_dx`).
#[allow(clippy::too_many_arguments)]
fn backward_common(
    gpu: &Gpu,
    d: NchwDims,
    (x, dy): (&CudaSlice<f32>, &CudaSlice<f32>),
    relu: Option<f32>,
    (mean, inv): (&CudaSlice<f32>, &CudaSlice<f32>),
    (ma, mb): (&CudaSlice<f32>, &CudaSlice<f32>),
    dx_factor: DxFactor,
    dx: &mut CudaSlice<f32>,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let planes = d.n * d.c;
    let len = planes * d.hw;
    let (on, cap) = clamp_args(relu);
    let (planes_i, c, hw, n, total) = (planes as i64, d.c as i64, d.hw as i64, d.n as i64, len as i64);
    let (mut pb, mut pg) = (gpu.zeros::<f64>(planes)?, gpu.zeros::<f64>(planes)?);
    launch!(
        gpu,
        "batchnorm",
        "bn_plane_grad_sums",
        plane_blocks(planes),
        [x, dy, &planes_i, &c, &hw, mean, inv, &on, ma, mb, &cap, &mut pb, &mut pg]
    )?;
    let (mut dbeta, mut dgamma) = (gpu.zeros::<f32>(d.c)?, gpu.zeros::<f32>(d.c)?);
    launch!(gpu, "batchnorm", "bn_channel_grads", grid(d.c), [&pb, &pg, &n, &c, &mut dbeta, &mut dgamma])?;
    let zeros = gpu.zeros::<f32>(d.c)?;
    let (k, m, db, dg) = match dx_factor {
        DxFactor::Train { gamma } => {
            let m = (d.n * d.hw) as f32;
            let mut k = gpu.zeros::<f32>(d.c)?;
            launch!(gpu, "batchnorm", "bn_dx_factor", grid(d.c), [gamma, inv, &c, &m, &mut k])?;
            (k, m, &dbeta, &dgamma)
        }
        // dx = scale * g: `plane_dx`'s formula with m = 1 and no statistics terms.
        DxFactor::Eval { scale } => (scale.clone(), 1.0f32, &zeros, &zeros),
    };
    launch!(
        gpu,
        "batchnorm",
        "bn_dx",
        grid(len),
        [x, dy, &total, &c, &hw, mean, inv, &on, ma, mb, &cap, &k, &m, db, dg, dx]
    )?;
    Ok((dgamma, dbeta))
}

/// How `backward_common` scales `dx`.
enum DxFactor<'a> {
    /// Training: `k = gamma * inv_std / m`, `m = n * hw`, with the statistics' terms.
    Train { gamma: &'a CudaSlice<f32> },
    /// Evaluation: `k = scale`, `m = 1`, no statistics' terms.
    Eval { scale: &'a CudaSlice<f32> },
}

/// Gradients of a training forward pass (`batchnorm::backward`): returns `(dgamma, dbeta)` and
/// writes `dx`; with a fused activation, `dy` is masked where the forward clipped, recomputed from
/// `x` and the forward's `scale` and `shift` with the same arithmetic.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    gpu: &Gpu,
    d: NchwDims,
    x: &CudaSlice<f32>,
    relu: Option<f32>,
    dy: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    stats: &GpuBatchStats,
    dx: &mut CudaSlice<f32>,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let len = d.n * d.c * d.hw;
    check_dims(
        d,
        &[
            ("batch norm input", x.len(), len),
            ("batch norm output gradient", dy.len(), len),
            ("batch norm input gradient", dx.len(), len),
        ],
    )?;
    check_len("batch norm statistics", stats.scale.len(), d.c)?;
    check_len("gamma", gamma.len(), d.c)?;
    backward_common(
        gpu,
        d,
        (x, dy),
        relu,
        (&stats.mean, &stats.inv_std),
        (&stats.scale, &stats.shift),
        DxFactor::Train { gamma },
        dx,
    )
}

/// Gradients of the evaluation forward pass (`batchnorm::backward_eval`: running statistics, a
/// frozen batch norm): returns `(dgamma, dbeta)` and writes `dx = g * gamma / sqrt(var + eps)`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward_eval(
    gpu: &Gpu,
    d: NchwDims,
    x: &CudaSlice<f32>,
    relu: Option<f32>,
    dy: &CudaSlice<f32>,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    (running_mean, running_var): (&CudaSlice<f32>, &CudaSlice<f32>),
    eps: f32,
    dx: &mut CudaSlice<f32>,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let len = d.n * d.c * d.hw;
    check_dims(
        d,
        &[
            ("batch norm input", x.len(), len),
            ("batch norm output gradient", dy.len(), len),
            ("batch norm input gradient", dx.len(), len),
            ("gamma", gamma.len(), d.c),
            ("beta", beta.len(), d.c),
            ("running mean", running_mean.len(), d.c),
            ("running variance", running_var.len(), d.c),
        ],
    )?;
    let (scale, shift, inv) = eval_affine(gpu, d.c, (gamma, beta), (running_mean, running_var), eps)?;
    backward_common(gpu, d, (x, dy), relu, (running_mean, &inv), (&scale, &shift), DxFactor::Eval { scale: &scale }, dx)
}

/// Launches a binary elementwise kernel `out = f(a, b)` after checking lengths.
macro_rules! binary {
    ($gpu:expr, $func:literal, $a:expr, $b:expr, $out:expr, $what:literal) => {{
        check_len(concat!($what, " operand"), $b.len(), $a.len())?;
        check_len(concat!($what, " output"), $out.len(), $a.len())?;
        let n = $a.len() as i64;
        launch!($gpu, "elementwise", $func, grid($a.len()), [$a, $b, &n, $out])
    }};
}

/// `y = a + b` (`elementwise::add`).
pub fn add(gpu: &Gpu, a: &CudaSlice<f32>, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
    binary!(gpu, "add", a, b, y, "add")
}

/// `y = max(a + b, 0)` (`elementwise::add_relu`).
pub fn add_relu(gpu: &Gpu, a: &CudaSlice<f32>, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
    binary!(gpu, "add_relu", a, b, y, "residual add")
}

/// `acc += b` (`elementwise::add_assign`).
pub fn add_assign(gpu: &Gpu, acc: &mut CudaSlice<f32>, b: &CudaSlice<f32>) -> Result<()> {
    check_len("accumulated operand", b.len(), acc.len())?;
    let n = acc.len() as i64;
    launch!(gpu, "elementwise", "add_assign", grid(acc.len()), [acc, b, &n])
}

/// The gradient of [`add_relu`]: `dy` where the output `y` is positive, else 0
/// (`elementwise::relu_backward`).
pub fn relu_backward(gpu: &Gpu, y: &CudaSlice<f32>, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) -> Result<()> {
    binary!(gpu, "relu_backward", y, dy, dx, "relu gradient")
}

/// `y = min(max(x, 0), cap)`: ReLU (`cap` infinite) or ReLU6 (`elementwise::clamp_relu`).
pub fn clamp_relu(gpu: &Gpu, x: &CudaSlice<f32>, cap: f32, y: &mut CudaSlice<f32>) -> Result<()> {
    check_len("relu output", y.len(), x.len())?;
    let n = x.len() as i64;
    launch!(gpu, "elementwise", "clamp_relu", grid(x.len()), [x, &n, &cap, y])
}

/// The gradient of [`clamp_relu`]: `dy` where `x` was strictly inside `(0, cap)`, else 0.
pub fn clamp_relu_backward(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    cap: f32,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    check_len("relu output gradient", dy.len(), x.len())?;
    check_len("relu input gradient", dx.len(), x.len())?;
    let n = x.len() as i64;
    launch!(gpu, "elementwise", "clamp_relu_backward", grid(x.len()), [x, dy, &n, &cap, dx])
}

/// Global average pooling: the mean of each plane of `hw` values (`elementwise::global_avg_pool`).
pub fn global_avg_pool(gpu: &Gpu, x: &CudaSlice<f32>, hw: usize, y: &mut CudaSlice<f32>) -> Result<()> {
    check_len("pooling input", x.len(), y.len() * hw)?;
    let (planes, hw_i) = (y.len() as i64, hw as i64);
    launch!(gpu, "elementwise", "global_avg_pool", grid(y.len()), [x, &planes, &hw_i, y])
}

/// The gradient of [`global_avg_pool`]: each plane gets `dy[p] / hw`.
pub fn global_avg_pool_backward(gpu: &Gpu, dy: &CudaSlice<f32>, hw: usize, dx: &mut CudaSlice<f32>) -> Result<()> {
    check_len("pooling input gradient", dx.len(), dy.len() * hw)?;
    let (planes, hw_i) = (dy.len() as i64, hw as i64);
    launch!(gpu, "elementwise", "global_avg_pool_backward", grid(dx.len()), [dy, &planes, &hw_i, dx])
}

/// `x` with inverted dropout at rate `p` in `[0, 1)`, its mask drawn from `seed` (int8-nn's
/// `ops::dropout`: zero where `uniform(i) < p`, else `x / (1 - p)` as `x * (1 / (1 - p))`). The
/// backward pass is the same call on the gradient with the same seed.
pub fn dropout(gpu: &Gpu, x: &CudaSlice<f32>, p: f32, seed: u64, y: &mut CudaSlice<f32>) -> Result<()> {
    check_len("dropout output", y.len(), x.len())?;
    let (n, key, keep) = (x.len() as i64, rng_key(seed), 1.0f32 / (1.0 - p));
    launch!(gpu, "elementwise", "dropout", grid(x.len()), [x, &n, &key, &p, &keep, y])
}

/// One parameter's SGD rule in f32 (int8-nn's `optim::Rule`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdRule {
    /// Weight decay (0 for parameters without decay).
    pub weight_decay: f32,
    /// Momentum.
    pub momentum: f32,
    /// The learning rate times the parameter's multiplier (DCLR's `phi(d)`).
    pub lr: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl SgdRule {
    /// The rule `Sgd::step` forms: `wd` only where the parameter decays, `lr * lr_scale` rounded
    /// to f32 once.
    pub fn new(momentum: f64, nesterov: bool, weight_decay: f64, decay: bool, lr: f64, lr_scale: f64) -> Self {
        Self {
            weight_decay: if decay { weight_decay as f32 } else { 0.0 },
            momentum: momentum as f32,
            lr: (lr * lr_scale) as f32,
            nesterov,
        }
    }

    /// The new weight and momentum buffer of one value (`Rule::apply`), on the host.
    pub fn apply(self, w: f32, g: f32, buf: f32, first: bool) -> (f32, f32) {
        let g = g + self.weight_decay * w;
        let buf = if first { g } else { self.momentum * buf + g };
        let d = if self.nesterov { g + self.momentum * buf } else { buf };
        (w - self.lr * d, buf)
    }
}

/// One SGD update of a parameter in place (`Sgd::step` for one parameter): `g = grad + wd * w`,
/// `buf = m * buf + g` (`g` on the `first` step, when `buf` is not read), `d = g + m * buf`
/// (Nesterov) or `buf`, `w -= lr * d`. A gradient value or an updated weight that is not finite
/// is an error naming `name`, and then nothing is written.
pub fn sgd_step(
    gpu: &Gpu,
    name: &str,
    w: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
    buf: &mut CudaSlice<f32>,
    first: bool,
    rule: SgdRule,
) -> Result<()> {
    check_len("gradient", grad.len(), w.len())?;
    check_len("momentum buffer", buf.len(), w.len())?;
    let n = w.len();
    if n == 0 {
        return Ok(());
    }
    let (n_i, first_i, nesterov) = (n as i64, first as i32, rule.nesterov as i32);
    let (wd, m, lr) = (rule.weight_decay, rule.momentum, rule.lr);
    let mut bad = gpu.upload(&[n as u64, n as u64])?;
    {
        let (mut bad_grad, mut bad_weight) = bad.split_at_mut(1);
        launch!(
            gpu,
            "elementwise",
            "sgd_check",
            grid(n),
            [&*w, grad, &*buf, &n_i, &first_i, &wd, &m, &lr, &nesterov, &mut bad_grad, &mut bad_weight]
        )?;
    }
    let bad = gpu.download(&bad)?;
    let value = |v: &CudaSlice<f32>, i: usize| -> Result<f32> {
        Ok(gpu.stream().clone_dtoh(&v.slice(i..i + 1)).map_err(|e| super::driver("copy from the gpu", e))?[0])
    };
    if bad[0] < n as u64 {
        let i = bad[0] as usize;
        return Err(CoreError::NonFinite { name: format!("{name} (gradient)"), value: value(grad, i)?, index: i });
    }
    if bad[1] < n as u64 {
        let i = bad[1] as usize;
        let (wi, gi, bi) = (value(w, i)?, value(grad, i)?, value(buf, i)?);
        return Err(CoreError::NonFinite {
            name: format!("{name} (updated weight)"),
            value: rule.apply(wi, gi, bi, first).0,
            index: i,
        });
    }
    launch!(gpu, "elementwise", "sgd_apply", grid(n), [w, grad, buf, &n_i, &first_i, &wd, &m, &lr, &nesterov])
}

/// A pooling window as the kernels take it (`struct Pool` in pool.cu).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Pool {
    planes: i64,
    h: i64,
    w: i64,
    k: i64,
    stride: i64,
    pad: i64,
    oh: i64,
    ow: i64,
}

// SAFETY: `#[repr(C)]` and only i64 fields: the layout of pool.cu's `struct Pool` of eight
// `long long`, passed by value.
unsafe impl DeviceRepr for Pool {}

/// `Pool2d::validate`, then the kernels' view of the window.
fn pool_args(p: &Pool2d) -> Result<Pool> {
    if p.k == 0 || p.stride == 0 || p.h + 2 * p.pad < p.k || p.w + 2 * p.pad < p.k || 2 * p.pad > p.k {
        return Err(CoreError::InvalidArgument {
            what: "pooling window",
            why: format!(
                "{p:?}: the window must be at least 1, fit the padded input, and be at least twice the padding"
            ),
        });
    }
    let i = |v: usize| v as i64;
    Ok(Pool {
        planes: i(p.planes),
        h: i(p.h),
        w: i(p.w),
        k: i(p.k),
        stride: i(p.stride),
        pad: i(p.pad),
        oh: i(p.out_h()),
        ow: i(p.out_w()),
    })
}

/// Max pooling (`pool::max_pool`); `argmax` receives the flat in-plane index of each output's
/// maximum (the first, as on the CPU).
pub fn max_pool(
    gpu: &Gpu,
    p: &Pool2d,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    argmax: &mut CudaSlice<u32>,
) -> Result<()> {
    let a = pool_args(p)?;
    let out = p.planes * p.out_h() * p.out_w();
    check_len("pooling input", x.len(), p.planes * p.h * p.w)?;
    check_len("pooling output", y.len(), out)?;
    check_len("pooling argmax", argmax.len(), out)?;
    launch!(gpu, "pool", "max_pool", grid(out), [x, &a, y, argmax])
}

/// The gradient of [`max_pool`] (`pool::max_pool_backward`): each output's gradient goes, whole,
/// to its maximum. `argmax` must come from [`max_pool`] with the same window.
pub fn max_pool_backward(
    gpu: &Gpu,
    p: &Pool2d,
    dy: &CudaSlice<f32>,
    argmax: &CudaSlice<u32>,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    let a = pool_args(p)?;
    let out = p.planes * p.out_h() * p.out_w();
    check_len("pooling output gradient", dy.len(), out)?;
    check_len("pooling argmax", argmax.len(), out)?;
    check_len("pooling input gradient", dx.len(), p.planes * p.h * p.w)?;
    launch!(gpu, "pool", "max_pool_backward", grid(dx.len()), [dy, argmax, &a, dx])
}

/// `1 / (k * k)` in f32, as the CPU's average pooling forms it.
fn avg_inv(p: &Pool2d) -> f32 {
    1.0 / (p.k * p.k) as f32
}

/// Average pooling, padding counted as zeros (`pool::avg_pool`).
pub fn avg_pool(gpu: &Gpu, p: &Pool2d, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) -> Result<()> {
    let a = pool_args(p)?;
    if p.ceil {
        return Err(CoreError::InvalidArgument {
            what: "pooling window",
            why: "average pooling rounds its output size down; ceil mode is for max pooling".into(),
        });
    }
    check_len("pooling input", x.len(), p.planes * p.h * p.w)?;
    check_len("pooling output", y.len(), p.planes * p.out_h() * p.out_w())?;
    let inv = avg_inv(p);
    launch!(gpu, "pool", "avg_pool", grid(y.len()), [x, &a, &inv, y])
}

/// The gradient of [`avg_pool`] (`pool::avg_pool_backward`).
pub fn avg_pool_backward(gpu: &Gpu, p: &Pool2d, dy: &CudaSlice<f32>, dx: &mut CudaSlice<f32>) -> Result<()> {
    let a = pool_args(p)?;
    check_len("pooling output gradient", dy.len(), p.planes * p.out_h() * p.out_w())?;
    check_len("pooling input gradient", dx.len(), p.planes * p.h * p.w)?;
    let inv = avg_inv(p);
    launch!(gpu, "pool", "avg_pool_backward", grid(dx.len()), [dy, &a, &inv, dx])
}

/// What one batch's loss pass gives (`loss::CrossEntropy`), the gradient on the device.
#[derive(Debug)]
pub struct GpuCrossEntropy {
    /// Mean negative log-likelihood over the batch.
    pub loss: f64,
    /// Gradient of the mean loss with respect to the logits.
    pub grad: CudaSlice<f32>,
    /// Samples whose label is the top prediction.
    pub top1: usize,
    /// Samples whose label is among the five top predictions.
    pub top5: usize,
}

/// Softmax cross-entropy of `logits` (`batch x classes`, on the device) against `labels` (on
/// the host, as the data loader has them), mirroring `loss::softmax_cross_entropy`. The gradient,
/// the hits and the errors are the CPU's; `exp` and `log` are CUDA's, within 1 ulp of the host's
/// libm, so the loss agrees to about 1e-15 relative and a gradient value may differ in its last bit.
pub fn softmax_cross_entropy(
    gpu: &Gpu,
    logits: &CudaSlice<f32>,
    classes: usize,
    labels: &[u32],
) -> Result<GpuCrossEntropy> {
    check_len("logits", logits.len(), labels.len() * classes)?;
    if let Some((i, &l)) = labels.iter().enumerate().find(|&(_, &l)| l as usize >= classes) {
        return Err(CoreError::InvalidArgument {
            what: "label",
            why: format!("label {l} of sample {i} is not below the {classes} classes"),
        });
    }
    let batch = labels.len();
    let fbatch = batch.max(1) as f32;
    let mut grad = gpu.zeros::<f32>(logits.len().max(1))?;
    if batch == 0 {
        return Ok(GpuCrossEntropy { loss: 0.0, grad: gpu.zeros(0)?, top1: 0, top5: 0 });
    }
    let labels_dev = gpu.upload(labels)?;
    let (mut nll, mut above, mut finite) =
        (gpu.zeros::<f64>(batch)?, gpu.zeros::<i32>(batch)?, gpu.zeros::<i32>(batch)?);
    let (batch_i, classes_i) = (batch as i64, classes as i64);
    launch!(
        gpu,
        "loss",
        "softmax_xent",
        grid(batch),
        [logits, &labels_dev, &batch_i, &classes_i, &fbatch, &mut grad, &mut nll, &mut above, &mut finite]
    )?;
    let (nll, above, finite) = (gpu.download(&nll)?, gpu.download(&above)?, gpu.download(&finite)?);
    if let Some(i) = finite.iter().position(|&f| f == 0) {
        return Err(CoreError::NonFinite { name: "logits".into(), value: f32::NAN, index: i * classes });
    }
    Ok(GpuCrossEntropy {
        loss: nll.iter().sum::<f64>() / fbatch as f64,
        grad,
        top1: above.iter().filter(|&&a| a == 0).count(),
        top5: above.iter().filter(|&&a| a < 5).count(),
    })
}
