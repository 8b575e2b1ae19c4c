//! The Walsh-Hadamard rotation llama.cpp applies to quantized K rows.
//!
//! In the pinned llama.cpp, a quantized K cache stores every head's keys
//! rotated by an orthonormal Sylvester-Hadamard matrix `H` (blocks of `n`
//! elements, `n` a power of two). Attention stays exact because the queries
//! are rotated the same way (`Hq · Hk = q · k`). Scoring from captured,
//! unrotated queries against cached keys must therefore rotate the queries.

/// Rotates each consecutive block of `n` values of `v` in place by the
/// orthonormal Sylvester-Hadamard matrix of order `n` (the matrix llama.cpp
/// builds: `H_1 = [1]`, `H_2s = [[H_s, H_s], [H_s, -H_s]]`, scaled by
/// `1/sqrt(n)`).
///
/// Does nothing when `n` is not a power of two of at least 2 or does not
/// divide `v.len()`; callers check applicability first.
pub fn rotate_blocks(v: &mut [f32], n: usize) {
    if n < 2 || !n.is_power_of_two() || v.len() % n != 0 {
        return;
    }
    let scale = 1.0 / (n as f32).sqrt();
    for block in v.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for start in (0..n).step_by(h * 2) {
                for i in start..start + h {
                    let (a, b) = (block[i], block[i + h]);
                    block[i] = a + b;
                    block[i + h] = a - b;
                }
            }
            h *= 2;
        }
        for x in block.iter_mut() {
            *x *= scale;
        }
    }
}

/// The rotation block llama.cpp uses for a head size: the largest power of
/// two that divides it, and at least 64. `None` when llama.cpp does not
/// rotate (head size not a multiple of 64).
pub fn rotation_block(head_dim: usize) -> Option<usize> {
    if head_dim == 0 || head_dim % 64 != 0 {
        return None;
    }
    let mut n = 64;
    while head_dim % (n * 2) == 0 {
        n *= 2;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matrix by the recursive definition, as llama.cpp builds it.
    fn sylvester(n: usize) -> Vec<f32> {
        let mut m = vec![0f32; n * n];
        m[0] = 1.0 / (n as f32).sqrt();
        let mut s = 1;
        while s < n {
            for i in 0..s {
                for j in 0..s {
                    let v = m[i * n + j];
                    m[(i + s) * n + j] = v;
                    m[i * n + j + s] = v;
                    m[(i + s) * n + j + s] = -v;
                }
            }
            s *= 2;
        }
        m
    }

    #[test]
    fn matches_the_matrix_product() {
        let n = 64;
        let h = sylvester(n);
        let x: Vec<f32> = (0..2 * n).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
        let mut y = x.clone();
        rotate_blocks(&mut y, n);
        for b in 0..2 {
            for i in 0..n {
                let want: f32 = (0..n).map(|j| h[i * n + j] * x[b * n + j]).sum();
                assert!(
                    (y[b * n + i] - want).abs() < 1e-4,
                    "row {i}: {} vs {want}",
                    y[b * n + i]
                );
            }
        }
    }

    #[test]
    fn is_an_involution_and_preserves_dot_products() {
        let a: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..128).map(|i| (i as f32 * 0.11).cos()).collect();
        let (mut ra, mut rb) = (a.clone(), b.clone());
        rotate_blocks(&mut ra, 128);
        rotate_blocks(&mut rb, 128);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        assert!((dot(&a, &b) - dot(&ra, &rb)).abs() < 1e-3);
        rotate_blocks(&mut ra, 128);
        assert!(ra.iter().zip(&a).all(|(p, q)| (p - q).abs() < 1e-5));
    }

    #[test]
    fn rotation_block_follows_llama_cpp() {
        assert_eq!(rotation_block(64), Some(64));
        assert_eq!(rotation_block(128), Some(128));
        assert_eq!(rotation_block(192), Some(64));
        assert_eq!(rotation_block(256), Some(256));
        assert_eq!(rotation_block(80), None);
        assert_eq!(rotation_block(32), None);
    }
}
