//! Matrix products on the GPU, mirroring `crate::gemm`: INT8 with exact INT32 accumulation on
//! cuBLASLt's tensor-core kernels (the three GEMMs of Zhu et al., CVPR 2020, Sec. 3), and FP32 on
//! cuBLAS SGEMM with TF32 off.
//!
//! INT8 layout (see the module header of [`crate::cuda`]): cuBLASLt's IMMA kernels take the "TN"
//! form of column-major operands, i.e. both operands with K contiguous, so every INT8 product is
//! `matmul_i8_nt`: `C[M][N] = A[M][K] * Bt[N][K]^T`, row-major, with M, N, K padded to
//! multiples of [`PAD`], at least `2 * PAD` (zeros) so that sizes, leading dimensions and offsets meet IMMA's
//! alignment rules. The products are exact INT32 sums for reductions up to
//! [`crate::gemm::MAX_K_I8`], as on the CPU, whatever order cuBLASLt sums in.

use cudarc::cublas::CudaBlas;
use cudarc::cublaslt::sys as lt;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::{Gpu, driver, grid, launch};
use crate::error::{CoreError, Result, check_len};
use crate::gemm::MAX_K_I8;

/// INT8 operands are padded to multiples of this in every dimension: 16 bytes, the alignment that
/// IMMA wants (and a multiple of the 4 it needs).
pub const PAD: usize = 16;

/// `v` rounded up to a multiple of [`PAD`], and at least `2 * PAD`: PyTorch's INT8 product on
/// cuBLASLt (`torch._int_mm`) requires more than 16 rows, a limit of cuBLASLt's INT8 kernels.
pub(crate) fn pad(v: usize) -> usize {
    v.div_ceil(PAD).max(2) * PAD
}

/// The cuBLAS and cuBLASLt handles of a [`Gpu`].
pub(crate) struct Blas {
    blas: CudaBlas,
    lt: lt::cublasLtHandle_t,
}

// SAFETY: the cuBLASLt handle is used only through `&mut Blas` behind the GPU's mutex, one thread
// at a time; cuBLASLt handles may be used from any thread.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle came from `create_handle` and is destroyed only here.
        let _ = unsafe { cudarc::cublaslt::result::destroy_handle(self.lt) };
    }
}

/// An error for a failed cuBLAS or cuBLASLt call.
fn blas_err(op: &str, e: impl std::fmt::Debug) -> CoreError {
    CoreError::Cuda { op: op.to_string(), why: format!("{e:?}") }
}

impl Blas {
    /// The handles on `stream`, cuBLAS in pedantic FP32 (no TF32 tensor cores, no reduced
    /// precision anywhere: true FP32 products).
    pub(crate) fn new(stream: &std::sync::Arc<CudaStream>) -> Result<Self> {
        let blas = CudaBlas::new(stream.clone()).map_err(|e| blas_err("cublas handle creation", e))?;
        // SAFETY: the handle is alive (owned by `blas`).
        unsafe {
            cudarc::cublas::sys::cublasSetMathMode(
                *blas.handle(),
                cudarc::cublas::sys::cublasMath_t::CUBLAS_PEDANTIC_MATH,
            )
        }
        .result()
        .map_err(|e| blas_err("cublas math mode", e))?;
        let lt = cudarc::cublaslt::result::create_handle().map_err(|e| blas_err("cublaslt handle creation", e))?;
        Ok(Self { blas, lt })
    }
}

/// Owned cuBLASLt descriptors, destroyed when dropped.
struct Layout(lt::cublasLtMatrixLayout_t);
struct Desc(lt::cublasLtMatmulDesc_t);

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `create_matrix_layout`, destroyed only here.
        let _ = unsafe { cudarc::cublaslt::result::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_desc`, destroyed only here.
        let _ = unsafe { cudarc::cublaslt::result::destroy_matmul_desc(self.0) };
    }
}

/// `c[M][N] = a[M][K] * bt[N][K]^T` in exact INT32, all row-major with K contiguous: `a` holds
/// `m` rows of `k` codes from element `a_off`, `bt` holds `n` rows of `k` from `bt_off`, `c` gets
/// `m` rows of `n` from `c_off`. `m`, `n`, `k` and the offsets must be multiples of [`PAD`].
///
/// Where cuBLASLt refuses the product, an exact kernel of our own computes it instead and
/// [`Gpu::int8_gemm_fallback`] records why (the results are the same; the speed is not).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_i8_nt(
    gpu: &Gpu,
    (m, n, k): (usize, usize, usize),
    a: &CudaSlice<i8>,
    a_off: usize,
    bt: &CudaSlice<i8>,
    bt_off: usize,
    c: &mut CudaSlice<i32>,
    c_off: usize,
) -> Result<()> {
    if [m, n, k, a_off, bt_off, c_off].iter().any(|v| v % PAD != 0) || m == 0 || n == 0 || k == 0 {
        return Err(CoreError::InvalidArgument {
            what: "int8 gemm padding",
            why: format!(
                "sizes {m}x{n}x{k} and offsets ({a_off}, {bt_off}, {c_off}) must be positive multiples of {PAD}"
            ),
        });
    }
    if a.len() < a_off + m * k || bt.len() < bt_off + n * k || c.len() < c_off + m * n {
        return Err(CoreError::InvalidArgument {
            what: "int8 gemm buffers",
            why: format!("buffers of {}, {}, {} elements are too short for {m}x{n}x{k}", a.len(), bt.len(), c.len()),
        });
    }
    if let Err(e) = lt_matmul_i8(gpu, (m, n, k), (a, a_off), (bt, bt_off), (c, c_off)) {
        gpu.note_int8_fallback(e.to_string());
        let (a, bt) = (a.slice(a_off..a_off + m * k), bt.slice(bt_off..bt_off + n * k));
        let mut c = c.slice_mut(c_off..c_off + m * n);
        let (mi, ni, ki) = (m as i64, n as i64, k as i64);
        launch!(gpu, "gemm", "gemm_i8_nt", grid(m * n), [&a, &bt, &mi, &ni, &ki, &mut c])?;
    }
    Ok(())
}

/// [`matmul_i8_nt`] on cuBLASLt (arguments checked by the caller).
fn lt_matmul_i8(
    gpu: &Gpu,
    (m, n, k): (usize, usize, usize),
    (a, a_off): (&CudaSlice<i8>, usize),
    (bt, bt_off): (&CudaSlice<i8>, usize),
    (c, c_off): (&mut CudaSlice<i32>, usize),
) -> Result<()> {
    use cudarc::cublaslt::result as r;
    use lt::cublasLtMatmulDescAttributes_t as A;
    let err = |op: &'static str| move |e: r::CublasError| blas_err(&format!("cublaslt {op}"), e);
    let i8t = lt::cudaDataType_t::CUDA_R_8I;
    // Column-major: C^T (N x M, ld N) = op(Bt) (N x K) * op(A) (K x M), with Bt stored as K x N
    // (ld K, transposed) and A as K x M (ld K, not transposed): the TN form IMMA requires.
    let la = Layout(r::create_matrix_layout(i8t, k as u64, n as u64, k as i64).map_err(err("layout"))?);
    let lb = Layout(r::create_matrix_layout(i8t, k as u64, m as u64, k as i64).map_err(err("layout"))?);
    let lc = Layout(
        r::create_matrix_layout(lt::cudaDataType_t::CUDA_R_32I, n as u64, m as u64, n as i64).map_err(err("layout"))?,
    );
    let desc = Desc(
        r::create_matmul_desc(lt::cublasComputeType_t::CUBLAS_COMPUTE_32I, lt::cudaDataType_t::CUDA_R_32I)
            .map_err(err("descriptor"))?,
    );
    let (trans, no_trans) = (1i32, 0i32);
    // SAFETY: the descriptor is alive; each attribute is an i32 (cublasOperation_t), passed by
    // pointer with its size.
    unsafe {
        r::set_matmul_desc_attribute(desc.0, A::CUBLASLT_MATMUL_DESC_TRANSA, (&trans as *const i32).cast(), 4)
            .map_err(err("transa"))?;
        r::set_matmul_desc_attribute(desc.0, A::CUBLASLT_MATMUL_DESC_TRANSB, (&no_trans as *const i32).cast(), 4)
            .map_err(err("transb"))?;
    }
    let blas = gpu.blas();
    let stream = gpu.stream().clone();
    let (alpha, beta) = (1i32, 0i32);
    let (pa, _ra) = a.device_ptr(&stream);
    let (pb, _rb) = bt.device_ptr(&stream);
    let (pc, _rc) = c.device_ptr_mut(&stream);
    // No algorithm and no workspace, as PyTorch's INT8 product calls cuBLASLt (an explicit
    // heuristic's algorithm and a workspace failed there for INT8): cuBLASLt applies its default
    // heuristic, the same choice on every call with these shapes.
    // SAFETY: the pointers address the checked extents (offsets in elements of one byte for the
    // INT8 operands and four for C); alpha and beta are INT32 host scalars as the INT32 scale type
    // wants; a null algorithm with no workspace is documented; everything runs on the GPU's stream.
    unsafe {
        r::matmul(
            blas.lt,
            desc.0,
            (&alpha as *const i32).cast(),
            (&beta as *const i32).cast(),
            (pb + bt_off as u64) as *const std::ffi::c_void,
            la.0,
            (pa + a_off as u64) as *const std::ffi::c_void,
            lb.0,
            (pc + 4 * c_off as u64) as *const std::ffi::c_void,
            lc.0,
            (pc + 4 * c_off as u64) as *mut std::ffi::c_void,
            lc.0,
            std::ptr::null(),
            std::ptr::null_mut(),
            0,
            stream.cu_stream() as *mut _,
        )
    }
    .map_err(err("int8 matmul"))
}

/// A cuBLAS operand: a row-major matrix read as is (`false`) or transposed (`true`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Op {
    /// Element offset of the matrix in its buffer.
    pub off: usize,
    /// Row stride (elements) of the stored row-major matrix.
    pub ld: usize,
    /// Whether the product uses the stored matrix transposed.
    pub t: bool,
}

/// `C = op(A) * op(B) + beta * C` in FP32, row-major: op(A) is `m x k`, op(B) `k x n`, C has row
/// stride `ldc` from element `c_off`. Row-major C is column-major C^T, so cuBLAS computes
/// `C^T = op(B)^T * op(A)^T` with the operands' own storage.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    gpu: &Gpu,
    (m, n, k): (usize, usize, usize),
    a: (&CudaSlice<f32>, Op),
    b: (&CudaSlice<f32>, Op),
    beta: f32,
    c: &mut CudaSlice<f32>,
    (c_off, ldc): (usize, usize),
) -> Result<()> {
    use cudarc::cublas::sys::cublasOperation_t as T;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        return Err(CoreError::InvalidArgument {
            what: "fp32 gemm depth",
            why: "an empty reduction goes through gemm_f32".into(),
        });
    }
    let extent = |rows: usize, cols: usize, op: Op| {
        op.off + if op.t { (cols - 1) * op.ld + rows } else { (rows - 1) * op.ld + cols }
    };
    let fits = extent(m, k, a.1) <= a.0.len() && extent(k, n, b.1) <= b.0.len();
    if !fits || c_off + (m - 1) * ldc + n > c.len() || ldc < n {
        return Err(CoreError::InvalidArgument {
            what: "fp32 gemm buffers",
            why: format!("a {m}x{n}x{k} product does not fit its buffers"),
        });
    }
    let int = |v: usize| {
        i32::try_from(v).map_err(|_| CoreError::InvalidArgument {
            what: "fp32 gemm size",
            why: format!("{v} exceeds cublas's 32-bit sizes; split the product"),
        })
    };
    let op = |t: bool| if t { T::CUBLAS_OP_T } else { T::CUBLAS_OP_N };
    let (mi, ni, ki, lda, ldb, ldci) = (int(m)?, int(n)?, int(k)?, int(a.1.ld.max(1))?, int(b.1.ld.max(1))?, int(ldc)?);
    let blas = gpu.blas();
    let stream = gpu.stream().clone();
    let (pa, _ra) = a.0.device_ptr(&stream);
    let (pb, _rb) = b.0.device_ptr(&stream);
    let (pc, _rc) = c.device_ptr_mut(&stream);
    let alpha = 1.0f32;
    // SAFETY: the extents were checked above; the handle is bound to the GPU's stream; alpha and
    // beta are host scalars (the handle's default pointer mode).
    unsafe {
        cudarc::cublas::result::sgemm(
            *blas.blas.handle(),
            op(b.1.t),
            op(a.1.t),
            ni,
            mi,
            ki,
            &alpha,
            (pb + 4 * b.1.off as u64) as *const f32,
            ldb,
            (pa + 4 * a.1.off as u64) as *const f32,
            lda,
            &beta,
            (pc + 4 * c_off as u64) as *mut f32,
            ldci,
        )
    }
    .map_err(|e| blas_err("cublas sgemm", e))
}

/// Copies a strided `rows x cols` INT8 matrix (element `(r, c)` at `off + r * rs + c * cs`) into
/// `dst` as `rows_pad x cols_pad` row-major with zero padding, `batch` times (source stride `sb`,
/// destination stride `rows_pad * cols_pad`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_i8(
    gpu: &Gpu,
    src: &CudaSlice<i8>,
    (batch, rows, cols): (usize, usize, usize),
    (off, sb, rs, cs): (usize, usize, usize, usize),
    dst: &mut CudaSlice<i8>,
    (rows_pad, cols_pad): (usize, usize),
) -> Result<()> {
    let total = batch * rows_pad * cols_pad;
    if dst.len() < total || rows_pad < rows || cols_pad < cols {
        return Err(CoreError::InvalidArgument { what: "int8 packing", why: "destination too small".into() });
    }
    if batch > 0 && rows > 0 && cols > 0 && off + (batch - 1) * sb + (rows - 1) * rs + (cols - 1) * cs >= src.len() {
        return Err(CoreError::InvalidArgument { what: "int8 packing", why: "source view outside its buffer".into() });
    }
    if total == 0 {
        return Ok(());
    }
    let src = src.slice(off..);
    let (b, r, c, sb, rs, cs, rp, cp) =
        (batch as i64, rows as i64, cols as i64, sb as i64, rs as i64, cs as i64, rows_pad as i64, cols_pad as i64);
    launch!(gpu, "gemm", "pack_i8", grid(total), [&src, &b, &r, &c, &sb, &rs, &cs, dst, &rp, &cp])
}

/// Row-major dimensions of a product `C = A * B`: A is `m x k`, B is `k x n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    /// Rows of A and C.
    pub m: usize,
    /// Columns of B and C.
    pub n: usize,
    /// The reduction depth: columns of A, rows of B.
    pub k: usize,
}

/// `A * B` over dense row-major INT8 codes (`a`: `m x k`, `b`: `k x n`) with exact INT32 sums
/// (the reduction no deeper than [`MAX_K_I8`]), padded and laid out for cuBLASLt; the padded
/// INT32 product `[pad(m)][pad(n)]` and its row stride.
fn product_i8(gpu: &Gpu, a: &CudaSlice<i8>, b: &CudaSlice<i8>, d: Dims) -> Result<(CudaSlice<i32>, usize)> {
    check_len("int8 gemm left operand", a.len(), d.m * d.k)?;
    check_len("int8 gemm right operand", b.len(), d.k * d.n)?;
    if d.k > MAX_K_I8 {
        return Err(CoreError::InvalidArgument {
            what: "int8 gemm depth",
            why: format!("{} exceeds {MAX_K_I8}, where i32 sums may overflow; split the reduction", d.k),
        });
    }
    let (mp, np, kp) = (pad(d.m), pad(d.n), pad(d.k));
    let mut ap = gpu.zeros::<i8>(mp * kp)?;
    let mut bt = gpu.zeros::<i8>(np * kp)?;
    if d.k > 0 {
        pack_i8(gpu, a, (1, d.m, d.k), (0, 0, d.k, 1), &mut ap, (mp, kp))?;
        // B^T: row j of Bt is column j of B (element (j, k) at k * n + j).
        pack_i8(gpu, b, (1, d.n, d.k), (0, 0, 1, d.n), &mut bt, (np, kp))?;
    }
    let mut c = gpu.zeros::<i32>(mp * np)?;
    matmul_i8_nt(gpu, (mp, np, kp), &ap, 0, &bt, 0, &mut c, 0)?;
    Ok((c, np))
}

/// `C = A * B` over INT8 codes in `[-127, 127]`, exact in INT32 (`crate::gemm::gemm_i8` with a
/// dense row-major output): `a` is `m x k`, `b` is `k x n`, row-major; returns `m x n`.
pub fn gemm_i8(gpu: &Gpu, a: &CudaSlice<i8>, b: &CudaSlice<i8>, d: Dims) -> Result<CudaSlice<i32>> {
    let (c, ld) = product_i8(gpu, a, b, d)?;
    let mut out = gpu.zeros::<i32>((d.m * d.n).max(1))?;
    if d.m * d.n > 0 {
        let (m, n, ld) = (d.m as i64, d.n as i64, ld as i64);
        launch!(gpu, "gemm", "unpad_i32", grid(d.m * d.n), [&c, &m, &n, &ld, &mut out])?;
    }
    Ok(out)
}

/// `C = diag(row_scales) * (A * B)` in f32 (`crate::gemm::gemm_i8_scaled`): each exact INT32
/// sum rounded to f32 once and multiplied by its row's scale, as the CPU does.
pub fn gemm_i8_scaled(
    gpu: &Gpu,
    a: &CudaSlice<i8>,
    b: &CudaSlice<i8>,
    d: Dims,
    row_scales: &[f32],
) -> Result<CudaSlice<f32>> {
    check_len("gemm row scales", row_scales.len(), d.m)?;
    let (c, ld) = product_i8(gpu, a, b, d)?;
    let scales = gpu.upload(if row_scales.is_empty() { &[0.0][..] } else { row_scales })?;
    let mut out = gpu.zeros::<f32>((d.m * d.n).max(1))?;
    if d.m * d.n > 0 {
        let (m, n, ld) = (d.m as i64, d.n as i64, ld as i64);
        launch!(gpu, "gemm", "scale_rows", grid(d.m * d.n), [&c, &m, &n, &ld, &scales, &mut out])?;
    }
    Ok(out)
}

/// `C = A * B`, or `C += A * B` when `accumulate`, in FP32 on dense row-major matrices
/// (`crate::gemm::gemm_f32`): `a` is `m x k`, `b` is `k x n`, `c` is `m x n`.
pub fn gemm_f32(
    gpu: &Gpu,
    a: &CudaSlice<f32>,
    b: &CudaSlice<f32>,
    d: Dims,
    c: &mut CudaSlice<f32>,
    accumulate: bool,
) -> Result<()> {
    check_len("fp32 gemm left operand", a.len(), d.m * d.k)?;
    check_len("fp32 gemm right operand", b.len(), d.k * d.n)?;
    check_len("fp32 gemm output", c.len(), d.m * d.n)?;
    if d.k == 0 {
        // An empty reduction: C = 0, or C unchanged when accumulating (as on the CPU).
        if !accumulate {
            gpu.stream().memset_zeros(c).map_err(|e| driver("zeroing an empty product", e))?;
        }
        return Ok(());
    }
    let beta = if accumulate { 1.0 } else { 0.0 };
    sgemm(
        gpu,
        (d.m, d.n, d.k),
        (a, Op { off: 0, ld: d.k, t: false }),
        (b, Op { off: 0, ld: d.n, t: false }),
        beta,
        c,
        (0, d.n),
    )
}

/// The transpose of a dense row-major `rows x cols` INT8 matrix, as `cols x rows` row-major
/// (int8-nn's linear layer forms `dY^T` with it for its weight gradient, as the CPU reads `dY`
/// transposed).
pub fn transpose_i8(gpu: &Gpu, src: &CudaSlice<i8>, rows: usize, cols: usize) -> Result<CudaSlice<i8>> {
    check_len("int8 transpose input", src.len(), rows * cols)?;
    if rows * cols == 0 {
        return gpu.zeros::<i8>(0);
    }
    let mut out = gpu.zeros::<i8>(rows * cols)?;
    // Row j of the result is column j of `src` (element (j, r) at r * cols + j).
    pack_i8(gpu, src, (1, cols, rows), (0, 0, 1, cols), &mut out, (cols, rows))?;
    Ok(out)
}
