//! The one small-GEMM entry point of the kernels: the `gemm` crate's runtime-dispatched SGEMM
//! (AVX2/AVX-512 micro-kernels) behind a slice-checked signature. Single-threaded: the operators
//! parallelise over heads with ORT's pool, so a nested pool would oversubscribe the cores.

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
        // `gemm` computes `dst = alpha·dst + beta·lhs·rhs` and takes column strides first; with
        // `read_dst` false it never reads `c`, so a `beta` of 0 ignores whatever `c` held.
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}
