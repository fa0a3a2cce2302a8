//! Matrix multiplication, FP32 and INT8, on strided matrix views.
//!
//! `C = A * B` (or `C += A * B`) where every operand is a view with its own row and column strides,
//! so transposes are free. FP32 runs on the `gemm` crate, and on dot-product kernels of our own
//! where both operands run along the inner dimension (the weight gradient's layout). INT8 multiplies codes in `[-127, 127]`
//! with exact INT32 accumulation on our own packed kernels, chosen at run time from the CPU's
//! instruction sets ([`Int8Path`]). [`reference`] holds the naive loops that define both.

#[cfg(target_arch = "x86_64")]
pub(crate) mod amx;
mod f32;
mod f32_dot;
mod int8;
pub mod reference;

pub use self::f32::gemm_f32;
pub(crate) use self::f32::gemm_f32_overwrite;

pub use self::int8::{Int8Path, MAX_K_I8, PackedA, gemm_i8, gemm_i8_packed, gemm_i8_scaled, gemm_i8_scaled_packed};
pub(crate) use self::int8::{LineBuf, PanelSource, gemm_i8_scaled_packed_from, pack_b, store_row_scaled};
#[cfg(target_arch = "x86_64")]
pub(crate) use self::int8::{interleave4x16, interleave4x32};

use std::mem::MaybeUninit;

use crate::error::{CoreError, Result};

/// Whether a GEMM may use the rayon pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallelism {
    /// Run on the calling thread (for callers that already parallelise, such as the convolutions).
    None,
    /// Split the work across the rayon pool.
    Rayon,
}

/// A read-only strided matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// A mutable strided matrix view, laid out like [`MatRef`].
#[derive(Debug)]
pub struct MatMut<'a, T> {
    data: &'a mut [T],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

/// Checks that every element of a `rows x cols` view with these strides lies inside `len`.
fn check_view(what: &'static str, len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let last = (rows - 1).checked_mul(rs).and_then(|r| (cols - 1).checked_mul(cs).and_then(|c| r.checked_add(c)));
    match last {
        Some(last) if last < len => Ok(()),
        _ => Err(CoreError::InvalidArgument {
            what,
            why: format!("a {rows}x{cols} view with strides ({rs}, {cs}) does not fit in {len} elements"),
        }),
    }
}

impl<'a, T: Copy> MatRef<'a, T> {
    /// A view with explicit strides; errors if any element falls outside `data`.
    pub fn new(data: &'a [T], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Result<Self> {
        check_view("matrix view", data.len(), rows, cols, row_stride, col_stride)?;
        Ok(Self { data, rows, cols, row_stride, col_stride })
    }

    /// A dense row-major `rows x cols` view.
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Result<Self> {
        crate::error::check_len("row-major matrix", data.len(), rows * cols)?;
        Self::new(data, rows, cols, cols, 1)
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Element `(i, j)`.
    #[inline(always)]
    pub fn at(&self, i: usize, j: usize) -> T {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

impl<'a, T: Copy> MatMut<'a, T> {
    /// A mutable view with explicit strides; errors if any element falls outside `data`.
    pub fn new(data: &'a mut [T], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Result<Self> {
        check_view("output matrix view", data.len(), rows, cols, row_stride, col_stride)?;
        if rows > 1 && cols > 1 && (row_stride == 0 || col_stride == 0) {
            return Err(CoreError::InvalidArgument {
                what: "output matrix view",
                why: "a zero stride would alias outputs".into(),
            });
        }
        Ok(Self { data, rows, cols, row_stride, col_stride })
    }

    /// A dense row-major `rows x cols` view.
    pub fn row_major(data: &'a mut [T], rows: usize, cols: usize) -> Result<Self> {
        crate::error::check_len("row-major output matrix", data.len(), rows * cols)?;
        Self::new(data, rows, cols, cols, 1)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

impl<'a> MatMut<'a, f32> {
    /// The same view for a kernel that only writes it ([`gemm_f32_overwrite`],
    /// [`gemm_i8_scaled_packed`]).
    pub(crate) fn into_uninit(self) -> MatMut<'a, MaybeUninit<f32>> {
        let (ptr, len) = (self.data.as_mut_ptr(), self.data.len());
        // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, the slice stays borrowed for `'a`,
        // and the kernels that take such a view write only initialised values into it.
        let data = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<MaybeUninit<f32>>(), len) };
        MatMut { data, rows: self.rows, cols: self.cols, row_stride: self.row_stride, col_stride: self.col_stride }
    }
}

impl<'a> MatMut<'a, MaybeUninit<f32>> {
    /// The view over its slice written with zeros throughout, for the kernels that read their
    /// output.
    fn zeroed(self) -> MatMut<'a, f32> {
        let data = crate::out::Out::from_uninit(self.data).zeroed();
        MatMut { data, rows: self.rows, cols: self.cols, row_stride: self.row_stride, col_stride: self.col_stride }
    }
}

/// Checks the shapes of `C = A * B`.
fn check_product<A: Copy, B: Copy, C: Copy>(a: &MatRef<A>, b: &MatRef<B>, c: &MatMut<C>) -> Result<()> {
    if a.cols != b.rows || c.rows != a.rows || c.cols != b.cols {
        return Err(CoreError::InvalidArgument {
            what: "matrix product shapes",
            why: format!("A is {}x{}, B is {}x{}, C is {}x{}", a.rows, a.cols, b.rows, b.cols, c.rows, c.cols),
        });
    }
    Ok(())
}
