//! `INT8_TRAIN_CPU` caps the kernels' instruction set: under `avx2` (or `portable` on a CPU
//! without AVX2) no wider path is chosen, and the INT8 convolutions the capped paths compute are
//! still exact against the naive f64 reference, the FP32 ones within 1e-5 of the sum of absolute
//! terms, at the shapes whose fast paths are AVX-512 only (the byte-plane phase split, the masked
//! taps, the depthwise VNNI kernels).
//!
//! One test in its own binary: the cap is read once per process, so it must be set before any
//! kernel dispatches, with no other test running beside it.

mod common;
use common::{codes, f64s, floats};

use int8_core::conv::{
    ConvShape, QView, conv2d_dw_f32, conv2d_dw_i8, conv2d_dx_f32, conv2d_dx_i8, conv2d_fwd_f32, conv2d_fwd_i8,
    reference,
};
use int8_core::cpu::{self, Level};
use int8_core::gemm::Int8Path;

fn close(got: &[f32], want: &[f64], bound: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        assert!((g as f64 - w).abs() <= 1e-5 * b.max(1.0), "{what} at {i}: {g} vs {w}");
    }
}

#[test]
fn the_cap_holds_the_kernels_to_the_named_level_and_they_stay_exact() {
    #[cfg(target_arch = "x86_64")]
    let has_avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let has_avx2 = false;
    let level = if has_avx2 { Level::Avx2 } else { Level::Portable };
    // SAFETY: this binary holds this one test, so no other thread reads the environment while it
    // is written, and nothing has dispatched a kernel (and so read the cap) yet.
    unsafe { std::env::set_var(cpu::ENV, level.name()) };
    assert_eq!(cpu::check_env().unwrap(), Some(level));
    assert!(cpu::allows(level) && (level == Level::Avx512 || !cpu::allows(Level::Avx512)));
    assert!(!cpu::allows(Level::AvxVnni));
    let want_path = if has_avx2 { Int8Path::Avx2 } else { Int8Path::Portable };
    assert_eq!(Int8Path::detect(), want_path);
    assert!(
        Int8Path::available().iter().all(|p| !matches!(p, Int8Path::Amx | Int8Path::Avx512Vnni | Int8Path::AvxVnni))
    );
    assert!(!cpu::allows(Level::Amx));

    let sq = ConvShape::square;
    let one = [1.0f32];
    for s in [
        sq(1, 2, 32, 3, 3, 2, 1),
        sq(2, 3, 16, 5, 3, 2, 1),
        sq(2, 5, 8, 6, 3, 1, 1),
        sq(2, 4, 8, 6, 1, 2, 0),
        sq(2, 40, 5, 70, 3, 1, 1),
        sq(2, 5, 16, 5, 3, 1, 1).with_groups(5),
        sq(3, 4, 16, 4, 3, 2, 1).with_groups(4),
    ] {
        let (x, w, dy) = (codes(s.x_len(), 1), codes(s.w_len(), 2), codes(s.y_len(), 3));
        let (xq, wq, dyq) =
            (QView { codes: &x, scales: &one }, QView { codes: &w, scales: &one }, QView { codes: &dy, scales: &one });
        let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
        let path = Int8Path::detect();
        let mut y = vec![f32::NAN; s.y_len()];
        conv2d_fwd_i8(path, &s, xq, wq, &mut y).unwrap();
        assert_eq!(f64s(&y), reference::conv2d_fwd(&s, &xd, &wd), "{s:?} int8 fwd");
        let mut dx = vec![f32::NAN; s.x_len()];
        conv2d_dx_i8(path, &s, wq, dyq, &mut dx).unwrap();
        assert_eq!(f64s(&dx), reference::conv2d_dx(&s, &wd, &dyd), "{s:?} int8 dx");
        let mut dw = vec![f32::NAN; s.w_len()];
        conv2d_dw_i8(path, &s, xq, dyq, &mut dw).unwrap();
        assert_eq!(f64s(&dw), reference::conv2d_dw(&s, &xd, &dyd), "{s:?} int8 dw");

        let (x, w, dy) = (floats(s.x_len(), 4), floats(s.w_len(), 5), floats(s.y_len(), 6));
        let (xd, wd, dyd) = (f64s(&x), f64s(&w), f64s(&dy));
        let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
        let mut y = vec![f32::NAN; s.y_len()];
        conv2d_fwd_f32(&s, &x, &w, &mut y).unwrap();
        close(&y, &reference::conv2d_fwd(&s, &xd, &wd), &reference::conv2d_fwd(&s, &abs(&xd), &abs(&wd)), "fwd");
        let mut dx = vec![f32::NAN; s.x_len()];
        conv2d_dx_f32(&s, &w, &dy, &mut dx).unwrap();
        close(&dx, &reference::conv2d_dx(&s, &wd, &dyd), &reference::conv2d_dx(&s, &abs(&wd), &abs(&dyd)), "dx");
        let mut dw = vec![f32::NAN; s.w_len()];
        conv2d_dw_f32(&s, &x, &dy, &mut dw).unwrap();
        close(&dw, &reference::conv2d_dw(&s, &xd, &dyd), &reference::conv2d_dw(&s, &abs(&xd), &abs(&dyd)), "dw");
    }
}
