//! Dense matrix products through the `gemm` crate (runtime-dispatched SIMD
//! kernels with cache blocking), never hand-written loops.

/// `c[m, n] = a[m, k] · w[n, k]ᵀ (+ bias[n])`, all row-major f32, with
/// `threads` worker threads (1 runs on the caller's thread).
#[allow(clippy::too_many_arguments)] // the BLAS shape: three operands and their sizes
pub fn matmul_wt(
    a: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    threads: usize,
) -> Result<(), String> {
    let need = |len: usize, rows: usize, cols: usize, what: &str| match rows.checked_mul(cols) {
        Some(x) if x <= len => Ok(()),
        _ => Err(format!(
            "GEMM operand `{what}` holds {len} values, [{rows}, {cols}] needs more"
        )),
    };
    need(a.len(), m, k, "a")?;
    need(w.len(), n, k, "w")?;
    need(c.len(), m, n, "c")?;
    if let Some(b) = bias {
        need(b.len(), 1, n, "bias")?;
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        c[..m * n].fill(0.0);
    } else {
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the checks above guarantee that `a` holds m*k, `w` n*k and
        // `c` m*n elements, so every address the strides below reach is
        // inside its slice; `c` is exclusively borrowed and does not overlap
        // `a` or `w` (distinct Rust borrows). `read_dst = false`, so the
        // uninitialised-read concern does not arise.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    if let Some(b) = bias {
        for row in c[..m * n].chunks_exact_mut(n) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_plain_product() {
        let (m, n, k) = (5, 3, 7);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
        let bias = [1.0, 2.0, 3.0];
        let mut c = vec![0.0; m * n];
        matmul_wt(&a, &w, Some(&bias), &mut c, m, n, k, 1).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|p| a[i * k + p] * w[j * k + p]).sum::<f32>() + bias[j];
                assert!((c[i * n + j] - want).abs() < 1e-4, "{i},{j}");
            }
        }
        assert!(matmul_wt(&a, &w, None, &mut c, m + 1, n, k, 1).is_err());
    }
}
