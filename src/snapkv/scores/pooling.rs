//! Pooling vote rows over prefix positions (so that a voted position brings
//! its neighbours) and aggregating query heads into their KV heads.

use super::{checked_volume, HeadScores, Votes};
use crate::snapkv::config::{PoolAlign, Pooling};
use crate::snapkv::error::AlgoError;

/// Pools every `(layer, query head)` vote row over prefix positions and
/// aggregates the query heads that share a KV head into one score row.
///
/// Pooling: kernel `kernel` (odd), stride 1, the window of position `j`
/// placed by `align` (centred: `j - kernel/2 ..= j + kernel/2`; trailing:
/// `j - kernel + 1 ..= j`; forward `n`: `j - n ..= j + kernel - 1 - n`) and truncated at the edges (max → max of the
/// in-range values, avg → mean of the in-range values); `kernel == 1`
/// leaves the votes unchanged.
/// Aggregation: query head `h` belongs to KV head `h / (n_head / n_head_kv)`;
/// the group's pooled rows are averaged. Runs in
/// `O(n_layer · n_head · prefix_len)`.
///
/// # Errors
/// [`AlgoError::InvalidConfig`] (`kernel`) for an even or zero kernel,
/// (`pool_align`) for a forward reach not below the kernel;
/// [`AlgoError::ShapeMismatch`] when the query heads do not split evenly
/// over `n_head_kv` or the votes are inconsistent.
pub fn pool_and_aggregate(
    votes: &Votes,
    n_head_kv: usize,
    kernel: usize,
    pooling: Pooling,
    align: PoolAlign,
) -> Result<HeadScores, AlgoError> {
    if kernel == 0 || kernel % 2 == 0 {
        return Err(AlgoError::InvalidConfig {
            param: "kernel",
            reason: format!("must be odd and >= 1, got {kernel}"),
        });
    }
    if n_head_kv == 0 || votes.n_head % n_head_kv != 0 {
        return Err(AlgoError::ShapeMismatch(format!(
            "{} query heads do not split evenly over {n_head_kv} KV heads",
            votes.n_head
        )));
    }
    let expected = checked_volume(&[votes.n_layer, votes.n_head, votes.prefix_len], "votes")?;
    if votes.data.len() != expected {
        return Err(AlgoError::ShapeMismatch(format!(
            "votes hold {} values, their shape says {expected}",
            votes.data.len()
        )));
    }
    let extents = align.extents(kernel)?;
    let n = votes.prefix_len;
    let group = votes.n_head / n_head_kv;
    let mut out = crate::snapkv::alloc::filled_vec(votes.n_layer * n_head_kv * n, 0f32, "pooled scores")?;
    if n == 0 {
        return HeadScores::from_vec(votes.n_layer, n_head_kv, n, out);
    }
    let mut pooler = Pooler::default();
    let mut pooled = vec![0f32; n];
    for (layer_votes, layer_out) in votes
        .data
        .chunks_exact(votes.n_head * n)
        .zip(out.chunks_exact_mut(n_head_kv * n))
    {
        for (h, row) in layer_votes.chunks_exact(n).enumerate() {
            pooler.pool(row, extents, pooling, &mut pooled);
            let dst = &mut layer_out[(h / group) * n..(h / group + 1) * n];
            for (d, &p) in dst.iter_mut().zip(&pooled) {
                *d += p;
            }
        }
    }
    if group > 1 {
        let inv = 1.0 / group as f32;
        out.iter_mut().for_each(|x| *x *= inv);
    }
    HeadScores::from_vec(votes.n_layer, n_head_kv, n, out)
}

/// Scratch for O(n) 1-D pooling.
#[derive(Default)]
pub(super) struct Pooler {
    forward: Vec<f32>,
    backward: Vec<f32>,
    prefix_sums: Vec<f64>,
}

impl Pooler {
    /// Pools `row` into `out` over windows reaching `before` positions
    /// back and `after` forward, truncated at the ends.
    fn pool(&mut self, row: &[f32], (before, after): (usize, usize), pooling: Pooling, out: &mut [f32]) {
        if before == 0 && after == 0 {
            out.copy_from_slice(row);
            return;
        }
        match pooling {
            Pooling::Max => self.max_pool(row, before, after, out),
            Pooling::Avg => self.avg_pool(row, before, after, out),
        }
    }

    /// van Herk / Gil-Werman: on the row padded with `-inf` by `before` and
    /// `after`, a window `[j, j+k)` (`k = before + after + 1`) is the max of
    /// the suffix maximum of its first block and the prefix maximum of its
    /// last block.
    fn max_pool(&mut self, row: &[f32], before: usize, after: usize, out: &mut [f32]) {
        let k = before + after + 1;
        let n = row.len();
        let m = n + before + after;
        let at = |i: usize| {
            if i >= before && i < before + n {
                row[i - before]
            } else {
                f32::NEG_INFINITY
            }
        };
        self.forward.resize(m, 0.0);
        self.backward.resize(m, 0.0);
        for i in 0..m {
            let v = at(i);
            self.forward[i] = if i % k == 0 { v } else { v.max(self.forward[i - 1]) };
        }
        for i in (0..m).rev() {
            let v = at(i);
            self.backward[i] = if i + 1 == m || (i + 1) % k == 0 {
                v
            } else {
                v.max(self.backward[i + 1])
            };
        }
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.backward[j].max(self.forward[j + k - 1]);
        }
    }

    fn avg_pool(&mut self, row: &[f32], before: usize, after: usize, out: &mut [f32]) {
        let n = row.len();
        self.prefix_sums.clear();
        self.prefix_sums.push(0.0);
        let mut acc = 0f64;
        for &v in row {
            acc += f64::from(v);
            self.prefix_sums.push(acc);
        }
        for (j, o) in out.iter_mut().enumerate() {
            let lo = j.saturating_sub(before);
            let hi = (j + after + 1).min(n);
            *o = ((self.prefix_sums[hi] - self.prefix_sums[lo]) / (hi - lo) as f64) as f32;
        }
    }
}
