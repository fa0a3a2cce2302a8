//! The instruction sets the hand-written kernels may use: what the CPU has, capped by the
//! `INT8_TRAIN_CPU` environment variable, read once per process.
//!
//! The cap lets one machine run, test and time the kernel paths of a smaller one, as oneDNN's
//! `ONEDNN_MAX_CPU_ISA` does: `INT8_TRAIN_CPU=avx2` on an AVX-512 VNNI machine runs the INT8 GEMM,
//! depthwise, gather and FP32 dot-product kernels that an AVX2-only CPU (AMD Zen 2/3, older Xeons)
//! runs. It does not reach code that others dispatch: the `gemm` crate's FP32 kernels and the
//! compiler-vectorised elementwise loops (the `multiversion` attribute) keep what the CPU has.
//!
//! Values: `amx` (no cap, the default), `avx512`, `avx-vnni`, `avx2`, `portable`. A binary calls
//! [`check_env`] at start so that a bad value is an error naming the variable; a library user who
//! skips that gets a panic with the same message on the first dispatch.

use std::sync::OnceLock;

use crate::error::{CoreError, Result};

/// The environment variable that caps the instruction set.
pub const ENV: &str = "INT8_TRAIN_CPU";

/// Instruction-set levels, smallest first: a cap at one level allows it and those below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Plain Rust (SSE2 on x86-64, as committed builds are compiled).
    Portable,
    /// AVX2 and FMA.
    Avx2,
    /// AVX2 with AVX-VNNI (256-bit `vpdpbusd`).
    AvxVnni,
    /// AVX-512 (F, BW, VL; VNNI and VBMI where the kernel says).
    Avx512,
    /// AMX (the tile registers and their INT8 dot products, Sapphire Rapids and later), on top of
    /// AVX-512.
    Amx,
}

impl Level {
    /// Every level, smallest first.
    pub const ALL: [Level; 5] = [Level::Portable, Level::Avx2, Level::AvxVnni, Level::Avx512, Level::Amx];

    /// The name `INT8_TRAIN_CPU` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avx-vnni",
            Level::Avx512 => "avx512",
            Level::Amx => "amx",
        }
    }

    /// The level named `s` (as [`Level::name`] writes it, any case, surrounding blanks ignored).
    pub fn parse(s: &str) -> Result<Level> {
        let t = s.trim().to_ascii_lowercase();
        Level::ALL.into_iter().find(|l| l.name() == t).ok_or_else(|| CoreError::InvalidArgument {
            what: "INT8_TRAIN_CPU",
            why: format!(
                "`{s}` is not an instruction-set level; use one of {} (or unset it for the CPU's best)",
                Level::ALL.map(|l| l.name()).join(", ")
            ),
        })
    }
}

/// The cap set by `INT8_TRAIN_CPU`, if any, or why its value is bad.
fn cap() -> &'static std::result::Result<Option<Level>, CoreError> {
    static CAP: OnceLock<std::result::Result<Option<Level>, CoreError>> = OnceLock::new();
    CAP.get_or_init(|| match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => Level::parse(&v).map(Some),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(CoreError::InvalidArgument {
            what: "INT8_TRAIN_CPU",
            why: format!("{v:?} is not valid unicode; use one of amx, avx512, avx-vnni, avx2, portable"),
        }),
    })
}

/// Checks `INT8_TRAIN_CPU` and returns the cap it sets (`None`: unset, the CPU's best).
pub fn check_env() -> Result<Option<Level>> {
    cap().clone()
}

/// Whether the kernels may use instructions of `level` (the CPU's support is checked separately,
/// at each dispatch, by feature).
///
/// # Panics
/// If `INT8_TRAIN_CPU` holds a bad value, with the message [`check_env`] returns.
pub fn allows(level: Level) -> bool {
    match cap() {
        Ok(None) => true,
        Ok(Some(c)) => level <= *c,
        Err(e) => panic!("{e}"),
    }
}

/// Whether the kernels may use AVX2 here: the cap allows it and the CPU has it.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    allows(Level::Avx2) && is_x86_feature_detected!("avx2")
}

/// Whether the kernels may use AMX's INT8 tiles here: the cap allows it, the CPU has AMX-TILE and
/// AMX-INT8, and Linux let this process use the tile registers. Linux hands out the tiles' 8 KiB of
/// state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, once per process, for every thread);
/// a refusal (an older kernel, a virtual machine that hides the state) leaves AMX off, and the
/// AVX-512 kernels run as before.
#[cfg(target_arch = "x86_64")]
pub(crate) fn amx() -> bool {
    static GRANTED: OnceLock<bool> = OnceLock::new();
    allows(Level::Amx)
        && *GRANTED.get_or_init(|| {
            // CPUID leaf 7, sub-leaf 0: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8 (Intel SDM, vol. 2A).
            let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
            if edx >> 24 & 1 == 0 || edx >> 25 & 1 == 0 {
                return false;
            }
            request_tile_state()
        })
}

/// Asks Linux for the AMX tile state (`arch/x86/include/uapi/asm/prctl.h`); true if granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: the request only changes which state components this process may use; it takes two
    // integers and touches no memory of ours.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

/// Elsewhere AMX stays off: no other system is known to hand out the tile state on request.
#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_tile_state() -> bool {
    false
}

/// A line for bench tables and logs: the cap, if one is set.
pub fn describe_cap() -> Option<String> {
    match cap() {
        Ok(Some(c)) => Some(format!("{ENV}={}", c.name())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_name_and_rejects_others() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()).unwrap(), l);
            assert_eq!(Level::parse(&format!(" {} ", l.name().to_uppercase())).unwrap(), l);
        }
        let e = Level::parse("avx512vnni").unwrap_err().to_string();
        assert!(e.contains("INT8_TRAIN_CPU") && e.contains("avx2"), "{e}");
        assert!(Level::Portable < Level::Avx2 && Level::Avx2 < Level::AvxVnni && Level::AvxVnni < Level::Avx512);
        assert!(Level::Avx512 < Level::Amx);
    }
}
