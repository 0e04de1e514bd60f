//! Decode's attention products on AVX-512: a handful of query rows (one position times the query
//! group) against a block of cached keys and values, read straight from the cache.
//!
//! The portable path widens each block of the cache into f32 scratch and then multiplies; at one
//! position per call that widening, a write and a read of twice the cache's bytes, cost more than
//! the products. Here sixteen cache values are widened in a register ([`CacheElem::widen16`]) and
//! used at once, every query row has its own accumulator (independent multiply-add chains), and
//! the output rows stay in registers across a block's keys. The arithmetic is f32 throughout, as
//! on the portable path; only the order of the additions differs.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::{CacheElem, HeadRows};

/// Head dimensions per pass over a block's values: four vectors.
const COLS: usize = 64;

/// Whether the fused path runs here: the CPU has AVX-512F and the head width is a multiple of
/// [`COLS`] (the real models' are 128 or 256).
pub fn applies(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        head_dim.is_multiple_of(COLS) && std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = head_dim;
        false
    }
}

/// `scores[row][j] = q[row] · keys[kb + j]` for `j < kn`, `q` holding the rows `[r, head_dim]`.
///
/// # Panics
/// Unless [`applies`] holds, or if `scores` is shorter than `r · kn`.
pub fn scores<T: CacheElem>(q: &[f32], keys: HeadRows<'_, T>, kb: usize, kn: usize, hd: usize, scores: &mut [f32]) {
    assert!(applies(hd) && kb + kn <= keys.len());
    let r = q.len() / hd;
    assert!(scores.len() >= r * kn);
    // SAFETY: AVX-512F is present (asserted); every row read is a whole `hd`-wide row of q or of
    // the cache, and the writes stay inside `scores` (asserted).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        in_row_groups!(r, |row0| scores_rows::<T>(q, keys, kb, kn, hd, row0, scores))
    }
}

/// `acc[row] += Σ_j p[row][j] · values[kb + j]` for `j < kn`, `p` being `[r, kn]` and `acc`
/// `[r, head_dim]`.
///
/// # Panics
/// Unless [`applies`] holds, or if `p` is shorter than `r · kn`.
pub fn accumulate<T: CacheElem>(p: &[f32], values: HeadRows<'_, T>, kb: usize, kn: usize, hd: usize, acc: &mut [f32]) {
    assert!(applies(hd) && kb + kn <= values.len());
    let r = acc.len() / hd;
    assert!(p.len() >= r * kn);
    // SAFETY: as in `scores`; the output rows of each group lie inside `acc`.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        in_row_groups!(r, |row0| accumulate_rows::<T>(p, values, kb, kn, hd, row0, acc))
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn scores_rows<T: CacheElem, const R: usize>(
    q: &[f32],
    keys: HeadRows<'_, T>,
    kb: usize,
    kn: usize,
    hd: usize,
    row0: usize,
    scores: &mut [f32],
) {
    let q: [*const f32; R] = std::array::from_fn(|i| q[(row0 + i) * hd..][..hd].as_ptr());
    for j in 0..kn {
        let key = keys.row(kb + j).as_ptr();
        let mut acc = [_mm512_setzero_ps(); R];
        for c in (0..hd).step_by(16) {
            // SAFETY (whole body): `c + 16 ≤ hd`, so every load stays inside a row of q or of the
            // cache; the caller checked the CPU.
            let k = unsafe { T::widen16(key.add(c)) };
            for (a, qr) in acc.iter_mut().zip(&q) {
                *a = _mm512_fmadd_ps(unsafe { _mm512_loadu_ps(qr.add(c)) }, k, *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            scores[(row0 + i) * kn + j] = _mm512_reduce_add_ps(*a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn accumulate_rows<T: CacheElem, const R: usize>(
    p: &[f32],
    values: HeadRows<'_, T>,
    kb: usize,
    kn: usize,
    hd: usize,
    row0: usize,
    acc: &mut [f32],
) {
    let out = &mut acc[row0 * hd..(row0 + R) * hd];
    for c0 in (0..hd).step_by(COLS) {
        let mut regs = [[_mm512_setzero_ps(); COLS / 16]; R];
        for (i, reg) in regs.iter_mut().enumerate() {
            for (k, x) in reg.iter_mut().enumerate() {
                // SAFETY: `c0 + COLS ≤ hd` (hd is a multiple of COLS), inside output row i.
                *x = unsafe { _mm512_loadu_ps(out[i * hd + c0 + 16 * k..].as_ptr()) };
            }
        }
        for j in 0..kn {
            let value = values.row(kb + j).as_ptr();
            // SAFETY: as above, inside the cache row.
            let v: [__m512; COLS / 16] = std::array::from_fn(|k| unsafe { T::widen16(value.add(c0 + 16 * k)) });
            for (i, reg) in regs.iter_mut().enumerate() {
                let w = _mm512_set1_ps(p[(row0 + i) * kn + j]);
                for (x, &vk) in reg.iter_mut().zip(&v) {
                    *x = _mm512_fmadd_ps(w, vk, *x);
                }
            }
        }
        for (i, reg) in regs.iter().enumerate() {
            for (k, &x) in reg.iter().enumerate() {
                // SAFETY: as for the loads.
                unsafe { _mm512_storeu_ps(out[i * hd + c0 + 16 * k..].as_mut_ptr(), x) };
            }
        }
    }
}
