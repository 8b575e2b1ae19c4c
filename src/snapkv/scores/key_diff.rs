//! Query-free scores from the cached keys alone, in the manner of KeyDiff
//! (Park et al., 2025): per KV head, a position whose key points away from
//! the head's average key direction scores high. Keys that resemble the
//! bulk of the prompt (repetitive filler) add little that the others do not
//! already offer; keys unlike it (names, numbers, rare words) are what a
//! later question may need. No query is involved, so the scores do not
//! depend on what ends the prompt: a document compressed before any
//! question is scored the same as one ending with it.

use super::checked_volume;
use crate::snapkv::error::AlgoError;

/// Scores one layer's prefix keys by their dissimilarity from the average
/// key direction of their KV head: `out[g * prefix_len + i] = 1 - cos(k_i,
/// a_g)`, with `a_g` the mean of head `g`'s unit prefix keys. A zero key
/// scores 1 (its cosine taken as 0). Scores lie in `[0, 2]`.
///
/// `keys` holds at least `prefix_len` cells in position order, each
/// `[kv_head][head_dim]` f32 (as [`gather_keys`](crate::snapkv::gather_keys)
/// writes them; the window's cells after the prefix are ignored). The
/// Hadamard rotation llama.cpp applies to quantized keys is orthonormal per
/// head, so the cosines need no knowledge of it. Runs in
/// `O(prefix_len · n_head_kv · head_dim)`.
///
/// # Errors
/// [`AlgoError::ShapeMismatch`] when `keys` or `out` do not have the sizes
/// the shape gives.
pub fn key_dissimilarity(
    keys: &[f32],
    prefix_len: usize,
    n_head_kv: usize,
    head_dim: usize,
    out: &mut [f32],
) -> Result<(), AlgoError> {
    let row = checked_volume(&[n_head_kv, head_dim], "key row")?;
    let needed = checked_volume(&[prefix_len, row], "prefix keys")?;
    if keys.len() < needed || row == 0 && prefix_len > 0 {
        return Err(AlgoError::ShapeMismatch(format!(
            "{prefix_len} prefix keys of {n_head_kv} heads × {head_dim} need {needed} values, got {}",
            keys.len()
        )));
    }
    let expected = checked_volume(&[n_head_kv, prefix_len], "key scores")?;
    if out.len() != expected {
        return Err(AlgoError::ShapeMismatch(format!(
            "key scores of {n_head_kv} heads × {prefix_len} positions need {expected} values, got {}",
            out.len()
        )));
    }
    if prefix_len == 0 {
        return Ok(());
    }
    let mut anchor = vec![0f64; head_dim];
    let mut inv_norms = vec![0f32; prefix_len];
    for g in 0..n_head_kv {
        let key = |i: usize| &keys[i * row + g * head_dim..][..head_dim];
        anchor.iter_mut().for_each(|a| *a = 0.0);
        for (i, inv) in inv_norms.iter_mut().enumerate() {
            let k = key(i);
            let norm = dot(k, k).sqrt();
            *inv = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            for (a, &x) in anchor.iter_mut().zip(k) {
                *a += f64::from(x * *inv);
            }
        }
        let anchor_norm = anchor.iter().map(|a| a * a).sum::<f64>().sqrt();
        let unit_anchor: Vec<f32> = anchor
            .iter()
            .map(|&a| {
                if anchor_norm > 0.0 {
                    (a / anchor_norm) as f32
                } else {
                    0.0
                }
            })
            .collect();
        for (i, (o, &inv)) in out[g * prefix_len..][..prefix_len]
            .iter_mut()
            .zip(&inv_norms)
            .enumerate()
        {
            let cos = (dot(key(i), &unit_anchor) * inv).clamp(-1.0, 1.0);
            *o = 1.0 - cos;
        }
    }
    Ok(())
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapkv::scores::tests::random_values;

    /// The definition in f64: the anchor is the mean of unit keys.
    fn naive(keys: &[f32], p: usize, h: usize, d: usize) -> Vec<f64> {
        let key = |i: usize, g: usize| -> Vec<f64> { (0..d).map(|e| f64::from(keys[(i * h + g) * d + e])).collect() };
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut out = Vec::new();
        for g in 0..h {
            let mut anchor = vec![0.0; d];
            for i in 0..p {
                let k = key(i, g);
                let n = norm(&k);
                if n > 0.0 {
                    anchor.iter_mut().zip(&k).for_each(|(a, x)| *a += x / n);
                }
            }
            let an = norm(&anchor);
            for i in 0..p {
                let k = key(i, g);
                let (kn, dot) = (norm(&k), k.iter().zip(&anchor).map(|(a, b)| a * b).sum::<f64>());
                let cos = if kn > 0.0 && an > 0.0 { dot / (kn * an) } else { 0.0 };
                out.push(1.0 - cos);
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_random_keys() {
        for (p, h, d, seed) in [(1, 1, 4, 1), (37, 2, 16, 2), (300, 3, 64, 3)] {
            let window = 5;
            // A bias shared by every key, as Qwen2's K bias gives: cosines
            // close to 1 whose differences still order the positions.
            let mut keys = random_values(seed, (p + window) * h * d);
            keys.iter_mut()
                .enumerate()
                .for_each(|(i, k)| *k += 3.0 * ((i % d) as f32 / d as f32));
            let mut out = vec![f32::NAN; h * p];
            key_dissimilarity(&keys, p, h, d, &mut out).unwrap();
            let reference = naive(&keys, p, h, d);
            for (i, (&a, &b)) in out.iter().zip(&reference).enumerate() {
                assert!((f64::from(a) - b).abs() < 1e-5, "p={p} [{i}]: {a} vs {b}");
            }
        }
    }

    #[test]
    fn the_odd_key_out_scores_highest_and_zero_keys_score_one() {
        let (p, d) = (6, 3);
        let mut keys = Vec::new();
        for i in 0..p {
            let key = match i {
                2 => [-1.0f32, 0.5, 0.0],
                4 => [0.0, 0.0, 0.0],
                _ => [2.0, 0.1 * i as f32, 0.0],
            };
            keys.extend_from_slice(&key);
        }
        let mut out = vec![0f32; p];
        key_dissimilarity(&keys, p, 1, d, &mut out).unwrap();
        let best = (0..p).max_by(|&a, &b| out[a].total_cmp(&out[b])).unwrap();
        assert_eq!(best, 2, "{out:?}");
        assert_eq!(out[4], 1.0);
        assert!(out.iter().all(|s| (0.0..=2.0).contains(s)));
        // Scale does not matter, direction does.
        let scaled: Vec<f32> = keys.iter().map(|k| k * 10.0).collect();
        let mut again = vec![0f32; p];
        key_dissimilarity(&scaled, p, 1, d, &mut again).unwrap();
        for (a, b) in out.iter().zip(&again) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        let keys = vec![1.0f32; 2 * 4 * 8];
        let mut out = vec![0f32; 2 * 4];
        assert!(key_dissimilarity(&keys, 4, 2, 8, &mut out).is_ok());
        assert!(key_dissimilarity(&keys, 5, 2, 8, &mut out).is_err());
        assert!(key_dissimilarity(&keys, 4, 2, 8, &mut out[..7]).is_err());
        assert!(key_dissimilarity(&keys, 4, 2, 0, &mut out[..0]).is_err());
        assert!(key_dissimilarity(&[], 0, 2, 8, &mut []).is_ok());
    }
}
