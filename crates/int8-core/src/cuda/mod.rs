//! The GPU kernels of unified INT8 training (Zhu et al., CVPR 2020) on NVIDIA GPUs: the same
//! functions as the CPU modules, on device buffers, computing the same numbers.
//!
//! # What runs where
//! - [`Gpu`] holds one device's context, one stream and the cuBLAS and cuBLASLt handles. Every
//!   call runs on that stream in order; the host waits only where a result decides what happens
//!   next (a non-finite tensor is an error, a clip value or a scale goes back into the API, DSGC's
//!   search compares distances).
//! - Kernels are the `.cu` files under `src/cuda/kernels/` ([`crate::cuda_sources`]), compiled by
//!   NVRTC to a cubin for the device's own architecture (`sm_XY`) the first time one of them is
//!   used, cached per process by (architecture, source) and loaded once per [`Gpu`].
//! - [`quant`] mirrors `crate::quant`, [`dsgc`] the cosine distance and the clip search,
//!   [`gemm`] the INT8 GEMM (cuBLASLt) and the FP32 GEMM (cuBLAS, TF32 off), [`conv`] the three
//!   convolution products at both precisions (im2col / col2im around the GEMMs; depthwise
//!   direct), [`nn`] batch norm, the elementwise glue, pooling, the loss, dropout and SGD.
//!
//! # Layouts
//! Tensors are NCHW and row-major, as on the CPU. cuBLASLt's INT8 tensor-core (IMMA) kernels take
//! column-major operands in the "TN" form only (A transposed, B not), both with the reduction
//! dimension K contiguous, and want leading dimensions and sizes that are multiples of 4 and
//! 16-byte aligned pointers. Every INT8 product here is therefore `C = A * Bt^T` with
//! `A: [M][K]` and `Bt: [N][K]` row-major (K contiguous in both), copied into buffers whose
//! M, N and K are padded with zeros to multiples of 16, at least 32 (zero codes add nothing to
//! an integer sum; PyTorch's INT8 product on cuBLASLt needs more than 16 rows). In cuBLASLt's
//! column-major terms that is `C^T (N x M, ld N) = op(Bt) * op(A)` with `Bt` as a K x N matrix
//! (ld K, TRANSA = T) and `A` as a K x M matrix (ld K, TRANSB = N), INT32 output,
//! `CUBLAS_COMPUTE_32I`, INT32 scale type; as in PyTorch's INT8 product, the call leaves the
//! algorithm to cuBLASLt (no heuristic query, no workspace). The convolutions lay their operands
//! out so:
//! - forward: `A` = the weight of a group `[c_out_g][K]`, `Bt` = im2col of the input as rows of
//!   output positions `[images x out_plane][K]`, `C` scattered to NCHW times `s_x * s_w[co]`;
//! - input gradient: `A` = the transposed weight `[K = c_in_g kh kw][c_out_g]`, `Bt` = dY as rows
//!   of positions `[images x out_plane][c_out_g]`, `C` summed back onto the input by col2im in
//!   INT32, times `s_w * s_dy`;
//! - weight gradient: `A` = dY as `[c_out_g][images x out_plane]`, `Bt` = im2col of the input as
//!   `[K][images x out_plane]`, over chunks of images whose INT32 sums provably fit, each chunk
//!   widened into an i64 total, times `s_x * s_dy` in f64 at the end.
//!
//! Should cuBLASLt refuse an INT8 product all the same, an exact `__dp4a` kernel of our own
//! computes it (same numbers, slower) and [`Gpu::int8_gemm_fallback`] says why.
//!
//! FP32 products go to cuBLAS SGEMM in `CUBLAS_PEDANTIC_MATH` (no TF32, no reduced-precision
//! reductions), with the row-major-as-column-major transposition and no padding. Convolutions
//! lower a chunk of images at a time, sized so that its operands fit [`conv::WORKSPACE`].
//!
//! # Libraries
//! Nothing CUDA is needed to build. At run time [`Gpu::new`] loads the driver (`libcuda.so.1`),
//! NVRTC (`libnvrtc.so.13`, which loads `libnvrtc-builtins.so.13.0`), cuBLAS and cuBLASLt
//! (`libcublas.so.13`, `libcublasLt.so.13`) from the library search path, and answers an error
//! naming the first one missing (cudarc itself would panic).
//!
//! # Exactness
//! The kernels are written against the CPU code line by line and compiled without fused
//! multiply-adds (`--fmad=false`, correctly rounded division and square root, no flush to zero),
//! so each f32 expression rounds as Rust's does. Bit for bit equal to the CPU, for finite inputs
//! (a kernel skips the products with padding that the CPU forms, which matters only where an
//! infinity would meet a zero):
//! quantization (codes, scales, saturation counts; nearest and stochastic, whose counter-based
//! generator is reproduced exactly), every INT8 product and convolution (exact INT32/i64 sums, the
//! scales applied as on the CPU), the depthwise convolutions at both precisions (the CPU's tap
//! order and lane structure), batch norm forward and backward in training and evaluation mode
//! (the CPU's shape-determined reduction order is followed), the elementwise ops, pooling and
//! their gradients, dropout and the SGD update. Not bit for bit, with the bound the tests check:
//! - FP32 convolutions and GEMMs: cuBLAS sums in its own order; within 1e-5 of the sum of the
//!   absolute terms, the CPU tests' bound against the f64 reference.
//! - DSGC's three sums: each 1024-value block's and each CPU chunk's sums are the CPU's exactly;
//!   the chunks are added in index order where the CPU's rayon reduction adds them in a tree, so
//!   the sums differ by the reassociation of non-negative f64 terms (relative difference below
//!   chunks x 2^-53, chunks = n / 16384) and the distance by about that much in absolute terms:
//!   within the 1e-6 relative unless the distance itself is below chunks x 1e-10 (INT8
//!   distances are 1e-4 to 1e-2). With one chunk (up to 16384 values; 32768 for the fused
//!   quantize pass) they are equal. The clip search makes the CPU's sequence of evaluations, so
//!   it chooses the CPU's clip unless two compared distances lie within that difference.
//! - The loss: `exp` and `log` in f64 are CUDA's, within 1 ulp of glibc's; the loss agrees to
//!   about 1e-15 relative, and a gradient value can differ in its last f32 bit.
//! - The sign of a zero from `max(-0.0, 0.0)` (ReLU of -0.0): Rust leaves it unspecified, and it
//!   may differ.
//!
//! Reductions are deterministic: fixed shapes of partial sums combined in a fixed order, integer
//! atomics only where the result is exact in any order (counts, first indices), never a float
//! atomic. A run repeats bit for bit on the same GPU and libraries (cuBLAS's own guarantee; the
//! INT8 products are exact whatever algorithm runs them).

pub mod conv;
pub mod dsgc;
pub mod gemm;
pub mod nn;
pub mod quant;

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

pub use cudarc::driver::CudaSlice;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, DriverError, LaunchConfig};
use cudarc::nvrtc::Ptx;

pub use self::quant::{GpuQTensor, GpuQView};
use crate::cuda_sources::{self, NVRTC_OPTIONS};
use crate::error::{CoreError, Result};

/// Threads per block of the 1-D kernels (`BLOCK` in `common.cuh`).
pub(crate) const BLOCK: u32 = 256;
/// The most blocks of a 1-D launch; the kernels loop over the rest (grid-stride).
const MAX_BLOCKS: usize = 1 << 20;

/// How to install each library `int8-core` loads at run time.
const DRIVER: (&str, &str) = ("libcuda.so.1", "install the nvidia driver (cuda 13 needs 580 or newer)");
const NVRTC: (&str, &str) =
    ("libnvrtc.so.13", "install it with `python3 -m pip install nvidia-cuda-nvrtc==13.0.88` or the cuda 13 toolkit");
const CUBLAS: (&str, &str) =
    ("libcublas.so.13", "install it with `python3 -m pip install nvidia-cublas` (13.x) or the cuda 13 toolkit");
const CUBLASLT: (&str, &str) =
    ("libcublasLt.so.13", "install it with `python3 -m pip install nvidia-cublas` (13.x) or the cuda 13 toolkit");

/// A GPU ready to run `int8-core`'s kernels: its context, one stream, the cuBLAS and cuBLASLt
/// handles, and the kernel modules loaded so far.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: (i32, i32),
    name: String,
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    blas: Mutex<gemm::Blas>,
    int8_fallback: Mutex<Option<String>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("arch", &self.arch)
            .finish()
    }
}

/// The message of a panic caught from cudarc (which panics where a library or symbol is missing).
fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Runs `f`, turning a panic from cudarc's loader into an error naming `library`.
fn guarded<T>(library: (&'static str, &'static str), f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| CoreError::CudaLibrary {
        library: library.0,
        why: panic_message(p),
        remedy: library.1,
    })
}

/// An error for a failed driver call.
pub(crate) fn driver(op: &str, e: DriverError) -> CoreError {
    CoreError::Cuda { op: op.to_string(), why: format!("{e:?}") }
}

/// Checks that a library can be loaded (cudarc would panic on first use instead).
fn require(library: (&'static str, &'static str), present: unsafe fn() -> bool) -> Result<()> {
    // SAFETY: the probe only opens and closes the shared library (dlopen / dlclose).
    let found = guarded(library, || unsafe { present() })?;
    if found {
        Ok(())
    } else {
        Err(CoreError::CudaLibrary {
            library: library.0,
            why: "not found on the library search path".into(),
            remedy: library.1,
        })
    }
}

/// Compiled kernels by (architecture, source name).
type Cubins = HashMap<(String, &'static str), Arc<Vec<u8>>>;

/// This process's compiled kernels: NVRTC runs once per source and architecture.
fn cubin_cache() -> &'static Mutex<Cubins> {
    static CACHE: OnceLock<Mutex<Cubins>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Destroys an NVRTC program when dropped.
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program came from `create_program` and is destroyed only here.
        let _ = unsafe { cudarc::nvrtc::result::destroy_program(self.0) };
    }
}

/// NVRTC's log of a program, as text.
fn program_log(prog: &Program) -> String {
    // SAFETY: the program is alive (owned by `prog`).
    match unsafe { cudarc::nvrtc::result::get_program_log(prog.0) } {
        Ok(log) => {
            let bytes: Vec<u8> = log.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(e) => format!("(no log: {e:?})"),
    }
}

/// Compiles kernel source `unit` with NVRTC to a cubin for `arch` (`sm_90`).
pub fn compile_cubin(unit: &'static str, arch: &str) -> Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    let nvrtc_err = |op: &str, e: result::NvrtcError| CoreError::Cuda {
        op: format!("nvrtc {op} of `{unit}`"),
        why: format!("{e:?}"),
    };
    let source = cuda_sources::source(unit).ok_or_else(|| CoreError::InvalidArgument {
        what: "kernel source",
        why: format!("no source named `{unit}`"),
    })?;
    let bad = |_| CoreError::InvalidArgument { what: "kernel source", why: format!("`{unit}` holds a NUL byte") };
    let (src, name) = (CString::new(source).map_err(bad)?, CString::new(format!("{unit}.cu")).map_err(bad)?);
    guarded(NVRTC, || {
        let prog = Program(result::create_program(&src, Some(&name)).map_err(|e| nvrtc_err("create", e))?);
        let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|o| o.to_string()).collect();
        options.push(format!("--gpu-architecture={arch}"));
        // SAFETY: the program is alive; the options are NUL-free strings.
        if unsafe { result::compile_program(prog.0, &options) }.is_err() {
            return Err(CoreError::CudaCompile {
                kernel: unit.to_string(),
                arch: arch.to_string(),
                log: program_log(&prog),
            });
        }
        let mut size = 0usize;
        // SAFETY: the program compiled; `size` is a valid place for the size.
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| nvrtc_err("cubin size", e))?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` holds the `size` bytes NVRTC reported.
        unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }.result().map_err(|e| nvrtc_err("cubin", e))?;
        Ok(cubin)
    })?
}

/// A 1-D launch over `n` items: blocks of [`BLOCK`] threads, at most [`MAX_BLOCKS`] blocks (the
/// kernels loop over the rest).
pub(crate) fn grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of `blocks` thread blocks of [`BLOCK`] threads each (for kernels with a fixed amount
/// of work per block).
pub(crate) fn blocks(blocks: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks.max(1) as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// Launches kernel `$func` of source `$unit` on `$gpu`'s stream with `$cfg` and the arguments
/// (device slices by reference, scalars by reference to values that outlive the launch, which
/// the builder's lifetimes enforce), in the kernel's parameter order.
macro_rules! launch {
    ($gpu:expr, $unit:literal, $func:literal, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        #[allow(unused_imports)]
        use cudarc::driver::PushKernelArg as _;
        let config: cudarc::driver::LaunchConfig = $cfg;
        let function = $gpu.function($unit, $func)?;
        let mut builder = $gpu.stream().launch_builder(&function);
        $( builder.arg($arg); )*
        // SAFETY: the arguments match the kernel's parameters in number, order and type (each
        // call site is written against the kernel's signature in src/cuda/kernels/), every
        // device buffer was checked on the host to hold what the kernel indexes, and the stream
        // orders this launch after the writes it reads.
        unsafe { builder.launch(config) }.map(|_| ()).map_err(|e| $crate::cuda::driver(concat!("launch of ", $func), e))
    }};
}
pub(crate) use launch;

impl Gpu {
    /// Opens GPU `ordinal`: checks that the driver, NVRTC, cuBLAS and cuBLASLt can be loaded (an
    /// error names the one that cannot), then creates a context, a stream and the BLAS handles.
    pub fn new(ordinal: usize) -> Result<Self> {
        require(DRIVER, cudarc::driver::sys::is_culib_present)?;
        require(NVRTC, cudarc::nvrtc::sys::is_culib_present)?;
        require(CUBLAS, cudarc::cublas::sys::is_culib_present)?;
        require(CUBLASLT, cudarc::cublaslt::sys::is_culib_present)?;
        let ctx = guarded(DRIVER, || CudaContext::new(ordinal))?.map_err(|e| driver("context creation", e))?;
        let stream = ctx.new_stream().map_err(|e| driver("stream creation", e))?;
        let arch = ctx.compute_capability().map_err(|e| driver("compute capability query", e))?;
        let name = ctx.name().map_err(|e| driver("device name query", e))?;
        let blas = guarded(CUBLAS, || gemm::Blas::new(&stream))??;
        Ok(Self {
            ctx,
            stream,
            arch,
            name,
            functions: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            blas: Mutex::new(blas),
            int8_fallback: Mutex::new(None),
        })
    }

    /// The device's compute capability (major, minor).
    pub fn arch(&self) -> (i32, i32) {
        self.arch
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream every call of this GPU runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for everything queued on the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver("stream synchronisation", e))
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(host).map_err(|e| driver("copy to the gpu", e))
    }

    /// Copies a device buffer back to the host.
    pub fn download<T: DeviceRepr + Clone + Default>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).map_err(|e| driver("copy from the gpu", e))
    }

    /// A zeroed device buffer of `len` values.
    pub fn zeros<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream.alloc_zeros(len).map_err(|e| driver("allocation", e))
    }

    /// Copies `src` into the device buffer `dst` (same length).
    pub fn copy_into<T: DeviceRepr>(&self, src: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        crate::error::check_len("device buffer", dst.len(), src.len())?;
        self.stream.memcpy_htod(src, dst).map_err(|e| driver("copy to the gpu", e))
    }

    /// The compute capability as NVRTC's real architecture, `sm_XY`.
    fn sm(&self) -> String {
        format!("sm_{}{}", self.arch.0, self.arch.1)
    }

    /// The module of kernel source `unit`, compiled (once per process) and loaded (once per GPU).
    fn module(&self, unit: &'static str) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(unit) {
            return Ok(m.clone());
        }
        let key = (self.sm(), unit);
        let cached = cubin_cache().lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
        let cubin = match cached {
            Some(c) => c,
            None => {
                let c = Arc::new(compile_cubin(unit, &key.0)?);
                cubin_cache().lock().unwrap_or_else(|e| e.into_inner()).insert(key, c.clone());
                c
            }
        };
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin.to_vec()))
            .map_err(|e| driver(&format!("loading kernels `{unit}`"), e))?;
        modules.insert(unit, module.clone());
        Ok(module)
    }

    /// Kernel `name` of source `unit`.
    pub(crate) fn function(&self, unit: &'static str, name: &'static str) -> Result<CudaFunction> {
        if let Some(f) = self.functions.lock().unwrap_or_else(|e| e.into_inner()).get(&(unit, name)) {
            return Ok(f.clone());
        }
        let f = self
            .module(unit)?
            .load_function(name)
            .map_err(|e| driver(&format!("finding kernel `{name}` in `{unit}`"), e))?;
        self.functions.lock().unwrap_or_else(|e| e.into_inner()).insert((unit, name), f.clone());
        Ok(f)
    }

    /// Why cuBLASLt refused an INT8 product, if it ever did on this GPU: the product then ran on
    /// `int8-core`'s own exact kernel (same results, slower). `None` when cuBLASLt ran them all.
    pub fn int8_gemm_fallback(&self) -> Option<String> {
        self.int8_fallback.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the first reason cuBLASLt refused an INT8 product.
    pub(crate) fn note_int8_fallback(&self, why: String) {
        self.int8_fallback.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(why);
    }

    /// The BLAS handles, one caller at a time (they share a workspace).
    pub(crate) fn blas(&self) -> std::sync::MutexGuard<'_, gemm::Blas> {
        self.blas.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `CounterRng::new(seed)`'s key: `mix(seed ^ IV)`, written with the public `splitmix64`
/// (`splitmix64(z) = mix(z + golden)`), so that the kernels draw the CPU's stream.
pub(crate) fn rng_key(seed: u64) -> u64 {
    crate::rng::splitmix64((seed ^ 0x6A09_E667_F3BC_C909).wrapping_sub(0x9E37_79B9_7F4A_7C15))
}

/// `(stochastic, key)` for the kernels.
pub(crate) fn rounding_args(rounding: crate::quant::Rounding) -> (i32, u64) {
    match rounding {
        crate::quant::Rounding::Nearest => (0, 0),
        crate::quant::Rounding::Stochastic { seed } => (1, rng_key(seed)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{CounterRng, splitmix64};

    /// The key the kernels get draws the CPU's stream: `bits(i) = mix(key + i * golden)`, and
    /// `mix(key + i * golden) = splitmix64(key + (i - 1) * golden)`.
    #[test]
    fn the_kernels_key_reproduces_counter_rng() {
        for seed in [0u64, 1, 7, 0xDEAD_BEEF, u64::MAX] {
            let (rng, key) = (CounterRng::new(seed), rng_key(seed));
            for i in [0u64, 1, 2, 1000, 1 << 40] {
                let golden = 0x9E37_79B9_7F4A_7C15u64;
                assert_eq!(
                    rng.bits(i),
                    splitmix64(key.wrapping_add(i.wrapping_sub(1).wrapping_mul(golden))),
                    "seed {seed} index {i}"
                );
            }
        }
    }

    /// Opening a GPU never panics: on a machine without a driver (or a library) it is an error
    /// naming what is missing; on a GPU machine it succeeds.
    #[test]
    fn opening_a_gpu_is_an_error_naming_a_missing_library_not_a_panic() {
        match Gpu::new(0) {
            Ok(gpu) => assert!(gpu.arch().0 >= 1),
            Err(CoreError::CudaLibrary { library, remedy, .. }) => {
                assert!(library.starts_with("lib") && library.contains(".so"), "{library}");
                assert!(remedy.starts_with("install"), "{remedy}");
            }
            Err(e) => assert!(matches!(e, CoreError::Cuda { .. }), "{e}"),
        }
    }

    /// Every kernel a wrapper launches is declared in the source it names (a misspelt name would
    /// otherwise surface only on a GPU).
    #[test]
    fn every_launched_kernel_exists_in_its_source() {
        let wrappers = [
            include_str!("quant.rs"),
            include_str!("dsgc.rs"),
            include_str!("gemm.rs"),
            include_str!("conv.rs"),
            include_str!("nn.rs"),
        ];
        let mut seen = 0;
        for text in wrappers {
            for call in text.split("launch!(").skip(1) {
                let mut quoted = call.split('"');
                // Only calls naming the kernel with a literal (the elementwise macro passes it on).
                let (Some(_), Some(unit), Some(", "), Some(func)) =
                    (quoted.next(), quoted.next(), quoted.next(), quoted.next())
                else {
                    continue;
                };
                let source = cuda_sources::source(unit).unwrap_or_else(|| panic!("no kernel source `{unit}`"));
                assert!(
                    source.contains(&format!("extern \"C\" __global__ void {func}(")),
                    "kernel `{func}` is not in `{unit}`"
                );
                seen += 1;
            }
        }
        assert!(seen >= 38, "only {seen} launches found");
    }
}
