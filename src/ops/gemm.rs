//! The one small-GEMM entry point of the kernels: `matrixmultiply`'s runtime-dispatched SGEMM
//! behind a slice-checked signature.

/// `c[m×n] = alpha · a[m×k] · b[k×n] + beta · c`, all row-major with the given row strides.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    beta: f32,
    c: &mut [f32],
    c_rs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(a.len() > (m - 1) * a_rs + (k.max(1) - 1) * a_cs || k == 0);
    debug_assert!(c.len() >= (m - 1) * c_rs + n);
    // SAFETY: the strides and extents above describe memory inside the given slices; `c` does not
    // alias `a` or `b` because it is borrowed mutably.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            a_rs as isize,
            a_cs as isize,
            b.as_ptr(),
            b_rs as isize,
            b_cs as isize,
            beta,
            c.as_mut_ptr(),
            c_rs as isize,
            1,
        );
    }
}
