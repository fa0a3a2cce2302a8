//! Every CUDA kernel source of `int8-core` ([`int8_core::cuda_sources::KERNELS`]) compiles with
//! NVRTC for the A100's and the H100/H200's architectures (`compute_80` PTX, `sm_80` and `sm_90`),
//! with the options the GPU code uses, and defines every kernel it declares. Runs on any machine:
//! NVRTC is a library (`libnvrtc.so.13` and `libnvrtc-builtins.so.13.0`, from PyPI's
//! `nvidia-cuda-nvrtc`, which `scripts/setup` installs), no GPU or driver needed.

use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use int8_core::cuda_sources::{KERNELS, NVRTC_OPTIONS};

/// The architectures every kernel must compile for.
const ARCHS: [&str; 3] = ["compute_80", "sm_80", "sm_90"];

/// The directories where pip's `nvidia-cuda-nvrtc` wheel put its libraries, as Python sees them.
fn pip_library_dirs() -> Vec<std::path::PathBuf> {
    let script = "import os, nvidia\nfor p in nvidia.__path__: print(os.path.join(p, 'cu13', 'lib'))";
    match std::process::Command::new("python3").args(["-c", script]).output() {
        Ok(out) if out.status.success() => {
            String::from_utf8_lossy(&out.stdout).lines().map(std::path::PathBuf::from).collect()
        }
        _ => Vec::new(),
    }
}

/// Loads NVRTC from pip's package by full path, builtins first, so that cudarc's later
/// `dlopen("libnvrtc.so.13")` (and NVRTC's own `dlopen` of its builtins) find the already-loaded
/// libraries by their sonames, without LD_LIBRARY_PATH. Where pip's package is absent, cudarc
/// searches the system's library path as usual.
fn load_nvrtc() {
    for dir in pip_library_dirs() {
        let (builtins, nvrtc) = (dir.join("libnvrtc-builtins.so.13.0"), dir.join("libnvrtc.so.13"));
        if !(builtins.is_file() && nvrtc.is_file()) {
            continue;
        }
        for lib in [builtins, nvrtc] {
            let path = std::ffi::CString::new(lib.to_string_lossy().into_owned()).expect("a path without NUL");
            // SAFETY: `path` is a NUL-terminated string that outlives the call; loading NVRTC runs
            // only its own initialisers, and the handle is deliberately never closed.
            let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            assert!(!handle.is_null(), "could not load {}: reinstall it with scripts/setup", lib.display());
        }
        return;
    }
}

/// The names of the kernels a source declares (`extern "C" __global__ void NAME(`).
fn declared_kernels(source: &str) -> Vec<&str> {
    source
        .split("extern \"C\" __global__ void ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .map(str::trim)
        .collect()
}

#[test]
fn every_kernel_compiles_with_nvrtc_for_sm80_and_sm90() {
    load_nvrtc();
    // SAFETY: only probes whether the library can be loaded (dlopen and dlclose).
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    assert!(
        present,
        "NVRTC 13 (libnvrtc.so.13) was not found: run scripts/setup, which installs it with \
         `python3 -m pip install nvidia-cuda-nvrtc==13.0.88`"
    );
    assert!(!KERNELS.is_empty());
    let mut failures = Vec::new();
    for &(name, source) in KERNELS {
        let kernels = declared_kernels(source);
        assert!(!kernels.is_empty(), "{name}: no kernels declared");
        for arch in ARCHS {
            let opts = CompileOptions {
                arch: Some(arch),
                options: NVRTC_OPTIONS.iter().map(|o| o.to_string()).collect(),
                name: Some(format!("{name}.cu")),
                ..Default::default()
            };
            match compile_ptx_with_opts(source, opts) {
                Ok(ptx) => {
                    let ptx = ptx.to_src();
                    for k in &kernels {
                        if !ptx.contains(&format!(".entry {k}(")) {
                            failures.push(format!("{name} for {arch}: kernel {k} is missing from the PTX"));
                        }
                    }
                }
                Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
                    failures.push(format!("{name} for {arch}:\n{}", log.to_string_lossy()));
                }
                Err(e) => failures.push(format!("{name} for {arch}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{} compilations failed:\n{}", failures.len(), failures.join("\n\n"));
}
