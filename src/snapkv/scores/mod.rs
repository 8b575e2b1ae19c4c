//! SnapKV scoring over plain buffers: window votes (from the model's own
//! softmax or from captured queries and cached keys), pooling and GQA
//! aggregation.
//!
//! Terms: the sequence has `P` cells; ordered by position, the last `w` are
//! the observation window and the other `P - w` the prefix, numbered
//! `0..P-w` in position order ("prefix index").

mod key_diff;
mod pooling;
mod query_key;

use super::config::QueryAggregation;
use super::error::AlgoError;

pub use key_diff::key_dissimilarity;
pub use pooling::pool_and_aggregate;
pub use query_key::{add_votes_from_queries, QueryScorer};

/// The cells of a sequence in position order, split into prefix and window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellOrder {
    /// Blob cell index of the i-th cell in position order.
    pub by_position: Vec<usize>,
    /// Number of prefix cells (`P - window`).
    pub prefix_len: usize,
    /// Number of window cells.
    pub window: usize,
}

impl CellOrder {
    /// Total number of cells (`prefix_len + window`).
    pub fn n_cells(&self) -> usize {
        self.by_position.len()
    }
}

/// Orders cells (given by their positions in blob order) by position and
/// splits off the last `window` as the observation window.
///
/// # Errors
/// [`AlgoError::InvalidConfig`] (`window`) when `window` is 0 or not smaller
/// than the number of cells; [`AlgoError::UnsupportedStateFormat`] when two
/// cells share a position.
pub fn position_order(positions: &[i32], window: usize) -> Result<CellOrder, AlgoError> {
    let n = positions.len();
    if window == 0 || window >= n {
        return Err(AlgoError::InvalidConfig {
            param: "window",
            reason: format!(
                "a window of {window} cells needs a sequence of more than {window} cells (and at least 1), got {n}"
            ),
        });
    }
    let mut by_position: Vec<usize> = (0..n).collect();
    by_position.sort_by_key(|&i| positions[i]);
    if let Some(pair) = by_position.windows(2).find(|p| positions[p[0]] == positions[p[1]]) {
        return Err(AlgoError::UnsupportedStateFormat(format!(
            "cells {} and {} share position {}",
            pair[0], pair[1], positions[pair[0]]
        )));
    }
    Ok(CellOrder {
        by_position,
        prefix_len: n - window,
        window,
    })
}

fn checked_volume(dims: &[usize], what: &str) -> Result<usize, AlgoError> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| AlgoError::ShapeMismatch(format!("{what} size overflows: {dims:?}")))
}

/// Per-layer, per-query-head votes: the sum (or, with
/// [`QueryAggregation::Max`], the maximum) over the window queries of their
/// attention probability on each prefix cell. Layout `[layer][head][prefix]`.
///
/// The public fields describe the layout; changing them after construction
/// is a logic error that the accessors turn into panics.
#[derive(Debug, Clone, PartialEq)]
pub struct Votes {
    /// Layers.
    pub n_layer: usize,
    /// Query heads per layer.
    pub n_head: usize,
    /// Prefix cells scored per head.
    pub prefix_len: usize,
    queries: QueryAggregation,
    data: Vec<f32>,
}

impl Votes {
    /// All-zero votes that sum the window queries' probabilities.
    ///
    /// # Errors
    /// [`AlgoError::ShapeMismatch`] when the size overflows;
    /// [`AlgoError::OutOfMemory`] when the votes cannot be allocated.
    pub fn new(n_layer: usize, n_head: usize, prefix_len: usize) -> Result<Self, AlgoError> {
        let len = checked_volume(&[n_layer, n_head, prefix_len], "votes")?;
        Ok(Votes {
            n_layer,
            n_head,
            prefix_len,
            queries: QueryAggregation::Sum,
            data: super::alloc::filled_vec(len, 0.0, "votes")?,
        })
    }

    /// The same votes, combining the probabilities added from now on by
    /// `queries` (set it before adding any).
    pub fn with_query_aggregation(mut self, queries: QueryAggregation) -> Self {
        self.queries = queries;
        self
    }

    /// How added probabilities are combined.
    pub fn query_aggregation(&self) -> QueryAggregation {
        self.queries
    }

    /// Votes of query head `head` in layer `layer`, one per prefix index.
    ///
    /// # Panics
    /// If `layer` or `head` is out of range.
    pub fn row(&self, layer: usize, head: usize) -> &[f32] {
        assert!(layer < self.n_layer && head < self.n_head);
        let start = (layer * self.n_head + head) * self.prefix_len;
        &self.data[start..start + self.prefix_len]
    }

    /// Mutable votes of query head `head` in layer `layer`.
    ///
    /// # Panics
    /// If `layer` or `head` is out of range.
    pub fn row_mut(&mut self, layer: usize, head: usize) -> &mut [f32] {
        assert!(layer < self.n_layer && head < self.n_head);
        let start = (layer * self.n_head + head) * self.prefix_len;
        &mut self.data[start..start + self.prefix_len]
    }

    /// All votes, `[layer][head][prefix]`.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    fn check_layer(&self, layer: usize) -> Result<(), AlgoError> {
        let expected = checked_volume(&[self.n_layer, self.n_head, self.prefix_len], "votes")?;
        if self.data.len() != expected {
            return Err(AlgoError::ShapeMismatch(format!(
                "votes hold {} values, their shape says {expected}",
                self.data.len()
            )));
        }
        if layer >= self.n_layer {
            return Err(AlgoError::ShapeMismatch(format!(
                "layer {layer} out of range for {} layers",
                self.n_layer
            )));
        }
        Ok(())
    }

    fn layer_mut(&mut self, layer: usize) -> &mut [f32] {
        let len = self.n_head * self.prefix_len;
        &mut self.data[layer * len..(layer + 1) * len]
    }
}

/// One score per prefix index for every layer and KV head, the input of
/// selection. Layout `[layer][kv_head][prefix]`.
///
/// The public fields describe the layout; changing them after construction
/// is a logic error that the accessors turn into panics.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadScores {
    /// Layers.
    pub n_layer: usize,
    /// KV heads per layer.
    pub n_head_kv: usize,
    /// Prefix cells scored per head.
    pub prefix_len: usize,
    data: Vec<f32>,
}

impl HeadScores {
    /// Wraps scores laid out `[layer][kv_head][prefix]`.
    ///
    /// # Errors
    /// [`AlgoError::ShapeMismatch`] when `data` has the wrong length.
    pub fn from_vec(n_layer: usize, n_head_kv: usize, prefix_len: usize, data: Vec<f32>) -> Result<Self, AlgoError> {
        let expected = checked_volume(&[n_layer, n_head_kv, prefix_len], "scores")?;
        if data.len() != expected {
            return Err(AlgoError::ShapeMismatch(format!(
                "scores for {n_layer} layers × {n_head_kv} KV heads × {prefix_len} cells need {expected} values, got {}",
                data.len()
            )));
        }
        Ok(HeadScores {
            n_layer,
            n_head_kv,
            prefix_len,
            data,
        })
    }

    /// Scores of KV head `kv_head` in layer `layer`, one per prefix index.
    ///
    /// # Panics
    /// If `layer` or `kv_head` is out of range.
    pub fn row(&self, layer: usize, kv_head: usize) -> &[f32] {
        assert!(layer < self.n_layer && kv_head < self.n_head_kv);
        let start = (layer * self.n_head_kv + kv_head) * self.prefix_len;
        &self.data[start..start + self.prefix_len]
    }

    /// All scores, `[layer][kv_head][prefix]`.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// Checks that the data length matches the public shape fields.
    pub(crate) fn check(&self) -> Result<(), AlgoError> {
        let expected = checked_volume(&[self.n_layer, self.n_head_kv, self.prefix_len], "scores")?;
        if self.data.len() != expected {
            return Err(AlgoError::ShapeMismatch(format!(
                "scores hold {} values, their shape says {expected}",
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// Adds one layer's votes from the model's own attention probabilities
/// (flash attention off).
///
/// `probs` is laid out `[head][query q in 0..window][column c in 0..n_cols]`
/// (the `kq_soft_max` tensor); `prefix_col[i]` is the column that holds
/// prefix index `i`. For every head and prefix index the probabilities of
/// all window queries are summed into `votes` (or their maximum taken, as
/// the votes' [`QueryAggregation`] says).
///
/// # Errors
/// [`AlgoError::ShapeMismatch`] when `layer` is out of range, `probs` is not
/// `n_head × window × n_cols` values, `prefix_col` does not have
/// `prefix_len` entries or one of them is `>= n_cols`.
pub fn add_votes_from_softmax(
    votes: &mut Votes,
    layer: usize,
    probs: &[f32],
    n_cols: usize,
    window: usize,
    prefix_col: &[usize],
) -> Result<(), AlgoError> {
    votes.check_layer(layer)?;
    let expected = checked_volume(&[votes.n_head, window, n_cols], "softmax")?;
    if probs.len() != expected {
        return Err(AlgoError::ShapeMismatch(format!(
            "softmax of layer {layer} has {} values, expected {} heads × {window} queries × {n_cols} columns = {expected}",
            probs.len(),
            votes.n_head
        )));
    }
    if prefix_col.len() != votes.prefix_len {
        return Err(AlgoError::ShapeMismatch(format!(
            "{} prefix columns given for {} prefix cells",
            prefix_col.len(),
            votes.prefix_len
        )));
    }
    if let Some((i, c)) = prefix_col.iter().enumerate().find(|(_, &c)| c >= n_cols) {
        return Err(AlgoError::ShapeMismatch(format!(
            "prefix index {i} maps to column {c}, but the softmax has {n_cols} columns"
        )));
    }
    if window == 0 || n_cols == 0 {
        return Ok(());
    }
    let prefix_len = votes.prefix_len;
    let queries = votes.queries;
    let layer_votes = votes.layer_mut(layer);
    for (head_votes, head_probs) in layer_votes
        .chunks_exact_mut(prefix_len.max(1))
        .zip(probs.chunks_exact(window * n_cols))
    {
        for row in head_probs.chunks_exact(n_cols) {
            for (v, &c) in head_votes.iter_mut().zip(prefix_col) {
                *v = combine(queries, *v, row[c]);
            }
        }
    }
    Ok(())
}

/// A vote after one more window query's probability `p`: the sum or the
/// maximum so far. (`queries` is the same for a whole loop, so the
/// compiler hoists the match out of it.)
#[inline(always)]
fn combine(queries: QueryAggregation, vote: f32, p: f32) -> f32 {
    match queries {
        QueryAggregation::Sum => vote + p,
        QueryAggregation::Max => vote.max(p),
    }
}

/// Multiplies layer `layer`'s votes by the norms of the value vectors they
/// point at ([`ValueWeighting::Norm`](super::ValueWeighting::Norm)): the
/// vote of query head `h` for prefix index `i` is scaled by
/// `norms[g * prefix_len + i]`, `g = h / (n_head / n_head_kv)` its KV head.
/// Apply it once per layer, after every vote of the layer has been added.
///
/// # Errors
/// [`AlgoError::ShapeMismatch`] when `layer` is out of range, the query
/// heads do not split evenly over `n_head_kv`, or `norms` does not hold
/// `n_head_kv × prefix_len` values.
pub fn weight_votes_by_value_norms(
    votes: &mut Votes,
    layer: usize,
    norms: &[f32],
    n_head_kv: usize,
) -> Result<(), AlgoError> {
    votes.check_layer(layer)?;
    if n_head_kv == 0 || votes.n_head % n_head_kv != 0 {
        return Err(AlgoError::ShapeMismatch(format!(
            "{} query heads do not split evenly over {n_head_kv} KV heads",
            votes.n_head
        )));
    }
    let n = votes.prefix_len;
    if norms.len() != n_head_kv * n {
        return Err(AlgoError::ShapeMismatch(format!(
            "{} value norms given for {n_head_kv} KV heads × {n} prefix cells",
            norms.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let group = votes.n_head / n_head_kv;
    for (h, row) in votes.layer_mut(layer).chunks_exact_mut(n).enumerate() {
        let g = h / group;
        for (v, &w) in row.iter_mut().zip(&norms[g * n..(g + 1) * n]) {
            *v *= w;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::pooling::*;
    use super::*;
    use crate::snapkv::config::{PoolAlign, Pooling};
    use crate::snapkv::select::{SelectionShape, Selector, SnapKvSelector};
    use proptest::prelude::*;

    /// Deterministic pseudo-random f32 in [-1, 1) (splitmix64).
    pub(crate) fn random_values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[derive(Clone, Copy, Debug)]
    struct Dims {
        n_head: usize,
        n_head_kv: usize,
        head_dim: usize,
        window: usize,
        prefix_len: usize,
    }

    /// Naive f64 probabilities `[head][q][cell]` of DESIGN.md section 1:
    /// window query q sees every prefix cell and window cells 0..=q.
    fn naive_probs(d: Dims, queries: &[f32], keys: &[f32], scale: f64) -> Vec<f64> {
        let n = d.prefix_len + d.window;
        let group = d.n_head / d.n_head_kv;
        let mut out = vec![0f64; d.n_head * d.window * n];
        for h in 0..d.n_head {
            let g = h / group;
            for q in 0..d.window {
                let qv = &queries[(q * d.n_head + h) * d.head_dim..][..d.head_dim];
                let visible = d.prefix_len + q + 1;
                let logits: Vec<f64> = (0..visible)
                    .map(|c| {
                        let kv = &keys[(c * d.n_head_kv + g) * d.head_dim..][..d.head_dim];
                        scale
                            * qv.iter()
                                .zip(kv)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum::<f64>()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                for (c, l) in logits.iter().enumerate() {
                    out[(h * d.window + q) * n + c] = (l - max).exp() / sum;
                }
            }
        }
        out
    }

    /// Naive votes `[head][prefix]` from naive probabilities: their sum
    /// over the window queries.
    fn naive_votes(d: Dims, probs: &[f64]) -> Vec<f64> {
        naive_votes_by(d, probs, QueryAggregation::Sum)
    }

    /// Naive votes `[head][prefix]`, the window queries' probabilities
    /// summed or their maximum taken.
    fn naive_votes_by(d: Dims, probs: &[f64], queries: QueryAggregation) -> Vec<f64> {
        let n = d.prefix_len + d.window;
        let mut votes = vec![0f64; d.n_head * d.prefix_len];
        for h in 0..d.n_head {
            for q in 0..d.window {
                for i in 0..d.prefix_len {
                    let (v, p) = (&mut votes[h * d.prefix_len + i], probs[(h * d.window + q) * n + i]);
                    *v = match queries {
                        QueryAggregation::Sum => *v + p,
                        QueryAggregation::Max => v.max(p),
                    };
                }
            }
        }
        votes
    }

    /// Random window queries (`[q][head][d]`, times `query_gain` to sharpen
    /// the attention) and keys (`[cell][kv_head][d]`) for shape `d`.
    fn random_queries_and_keys(d: Dims, query_seed: u64, key_seed: u64, query_gain: f32) -> (Vec<f32>, Vec<f32>) {
        let n = d.prefix_len + d.window;
        let queries = random_values(query_seed, d.window * d.n_head * d.head_dim)
            .into_iter()
            .map(|x| x * query_gain)
            .collect();
        (queries, random_values(key_seed, n * d.n_head_kv * d.head_dim))
    }

    /// Naive O(n·k) pooling with truncated windows.
    fn naive_pool(row: &[f64], kernel: usize, pooling: Pooling, align: PoolAlign) -> Vec<f64> {
        let (before, after) = match align {
            PoolAlign::Centered => (kernel / 2, kernel / 2),
            PoolAlign::Trailing => (kernel - 1, 0),
            PoolAlign::Forward(n) => (n, kernel - 1 - n),
        };
        (0..row.len())
            .map(|j| {
                let lo = j.saturating_sub(before);
                let hi = (j + after).min(row.len() - 1);
                let window = &row[lo..=hi];
                match pooling {
                    Pooling::Max => window.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                    Pooling::Avg => window.iter().sum::<f64>() / window.len() as f64,
                }
            })
            .collect()
    }

    /// Naive scores `[kv_head][prefix]` for one layer.
    fn naive_scores(d: Dims, votes: &[f64], kernel: usize, pooling: Pooling, align: PoolAlign) -> Vec<f64> {
        let group = d.n_head / d.n_head_kv;
        let mut out = Vec::new();
        for g in 0..d.n_head_kv {
            let pooled: Vec<Vec<f64>> = (g * group..(g + 1) * group)
                .map(|h| naive_pool(&votes[h * d.prefix_len..][..d.prefix_len], kernel, pooling, align))
                .collect();
            for i in 0..d.prefix_len {
                out.push(pooled.iter().map(|p| p[i]).sum::<f64>() / group as f64);
            }
        }
        out
    }

    fn assert_close(fast: &[f32], reference: &[f64], tol: f64, what: &str) {
        assert_eq!(fast.len(), reference.len(), "{what}: lengths");
        for (i, (&a, &b)) in fast.iter().zip(reference).enumerate() {
            let err = (f64::from(a) - b).abs();
            assert!(err <= tol * b.abs().max(1.0), "{what}[{i}]: fast {a} vs reference {b}");
        }
    }

    /// Runs the fast query path for one layer (twice, layer 1 of 2).
    fn fast_votes(d: Dims, queries: &[f32], keys: &[f32], scale: f32, threads: usize) -> Votes {
        let mut votes = Votes::new(2, d.n_head, d.prefix_len).unwrap();
        QueryScorer::new(threads)
            .add_votes(&mut votes, 1, queries, keys, d.head_dim, d.n_head_kv, d.window, scale)
            .unwrap();
        assert!(votes.row(0, 0).iter().all(|&v| v == 0.0), "layer 0 untouched");
        votes
    }

    fn check_against_reference(d: Dims, seed: u64, threads: usize) {
        let (queries, keys) = random_queries_and_keys(d, seed, seed ^ 0xabcdef, 3.0);
        let scale = 1.0 / (d.head_dim as f32).sqrt();
        let probs = naive_probs(d, &queries, &keys, f64::from(scale));
        let ref_votes = naive_votes(d, &probs);
        let votes = fast_votes(d, &queries, &keys, scale, threads);
        let fast_layer: Vec<f32> = (0..d.n_head).flat_map(|h| votes.row(1, h).to_vec()).collect();
        assert_close(&fast_layer, &ref_votes, 1e-4, "votes");
        for kernel in [1, 3, 7] {
            for pooling in [Pooling::Max, Pooling::Avg] {
                for align in [
                    PoolAlign::Centered,
                    PoolAlign::Trailing,
                    PoolAlign::Forward(kernel - 1 - kernel / 3),
                ] {
                    let scores = pool_and_aggregate(&votes, d.n_head_kv, kernel, pooling, align).unwrap();
                    let reference = naive_scores(d, &ref_votes, kernel, pooling, align);
                    let fast: Vec<f32> = (0..d.n_head_kv).flat_map(|g| scores.row(1, g).to_vec()).collect();
                    assert_close(&fast, &reference, 1e-4, "scores");
                }
            }
        }
    }

    #[test]
    fn query_votes_match_the_naive_reference() {
        let shapes = [
            // head_dim not a multiple of 8, rows not a multiple of 4
            (1, 1, 12, 3, 20),
            (4, 2, 16, 5, 40),
            (6, 3, 8, 4, 70),
            (2, 2, 64, 32, 300),
        ];
        for (i, &(n_head, n_head_kv, head_dim, window, prefix_len)) in shapes.iter().enumerate() {
            let d = Dims {
                n_head,
                n_head_kv,
                head_dim,
                window,
                prefix_len,
            };
            check_against_reference(d, i as u64, 1);
        }
    }

    #[test]
    fn value_norms_scale_each_query_heads_votes_by_its_kv_heads_norms() {
        // 4 query heads over 2 KV heads, 3 prefix positions, 2 layers.
        let mut votes = Votes::new(2, 4, 3).unwrap();
        for h in 0..4 {
            votes.row_mut(1, h).copy_from_slice(&[1.0, 2.0, 3.0]);
            votes.row_mut(0, h).copy_from_slice(&[5.0, 5.0, 5.0]);
        }
        let norms = [0.5, 1.0, 2.0, 3.0, 0.0, 1.0];
        weight_votes_by_value_norms(&mut votes, 1, &norms, 2).unwrap();
        for h in 0..2 {
            assert_eq!(votes.row(1, h), &[0.5, 2.0, 6.0]);
        }
        for h in 2..4 {
            assert_eq!(votes.row(1, h), &[3.0, 0.0, 3.0]);
        }
        // Layer 0 untouched.
        assert!(votes.row(0, 0).iter().all(|&v| v == 5.0));
        assert!(weight_votes_by_value_norms(&mut votes, 2, &norms, 2).is_err());
        assert!(weight_votes_by_value_norms(&mut votes, 1, &norms[..5], 2).is_err());
        assert!(weight_votes_by_value_norms(&mut votes, 1, &norms, 3).is_err());
        assert!(weight_votes_by_value_norms(&mut votes, 1, &norms, 0).is_err());
    }

    #[test]
    fn threaded_query_votes_match_the_naive_reference() {
        let d = Dims {
            n_head: 8,
            n_head_kv: 2,
            head_dim: 64,
            window: 16,
            prefix_len: 2000,
        };
        check_against_reference(d, 7, 3);
    }

    #[test]
    fn snapkv_selection_matches_the_reference_selection() {
        let d = Dims {
            n_head: 4,
            n_head_kv: 2,
            head_dim: 32,
            window: 8,
            prefix_len: 400,
        };
        let (queries, keys) = random_queries_and_keys(d, 11, 12, 4.0);
        let scale = 1.0 / (d.head_dim as f32).sqrt();
        let ref_votes = naive_votes(d, &naive_probs(d, &queries, &keys, f64::from(scale)));
        let votes = fast_votes(d, &queries, &keys, scale, 1);
        // Avg pooling and mean aggregation leave no exact ties in random data;
        // budgets whose boundary falls on a near tie (< 1e-6) are skipped.
        let scores = pool_and_aggregate(&votes, 2, 5, Pooling::Avg, PoolAlign::Centered).unwrap();
        let reference = naive_scores(d, &ref_votes, 5, Pooling::Avg, PoolAlign::Centered);
        let shape = SelectionShape {
            n_layer: 2,
            n_head_kv: 2,
            prefix_len: d.prefix_len,
        };
        let mut checked = 0;
        for n_keep in [10, 50, 100, 150, 200, 250, 300] {
            let sel = SnapKvSelector.select(Some(&scores), &shape, n_keep).unwrap();
            for g in 0..2 {
                let row = &reference[g * d.prefix_len..][..d.prefix_len];
                let mut idx: Vec<usize> = (0..d.prefix_len).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                if row[idx[n_keep - 1]] - row[idx[n_keep]] < 1e-6 {
                    continue;
                }
                let mut expected: Vec<u32> = idx[..n_keep].iter().map(|&i| i as u32).collect();
                expected.sort_unstable();
                assert_eq!(sel.row(1, g), &expected[..], "n_keep {n_keep}, KV head {g}");
                checked += 1;
            }
        }
        assert!(checked >= 10, "only {checked} tie-free cases");
    }

    #[test]
    fn softmax_votes_match_query_votes() {
        let d = Dims {
            n_head: 6,
            n_head_kv: 2,
            head_dim: 16,
            window: 5,
            prefix_len: 50,
        };
        let n = d.prefix_len + d.window;
        let queries = random_values(3, d.window * d.n_head * d.head_dim);
        let keys = random_values(4, n * d.n_head_kv * d.head_dim);
        let scale = 0.25f32;
        let probs = naive_probs(d, &queries, &keys, f64::from(scale));
        // Lay the probabilities out like kq_soft_max: cells in a shuffled
        // column order, plus padding columns that are masked (0).
        let n_cols = n + 3;
        let column_of_cell: Vec<usize> = (0..n).map(|c| (c * 7 + 2) % n_cols).collect();
        let mut softmax = vec![0f32; d.n_head * d.window * n_cols];
        for row in 0..d.n_head * d.window {
            for c in 0..n {
                softmax[row * n_cols + column_of_cell[c]] = probs[row * n + c] as f32;
            }
        }
        let mut from_softmax = Votes::new(1, d.n_head, d.prefix_len).unwrap();
        add_votes_from_softmax(
            &mut from_softmax,
            0,
            &softmax,
            n_cols,
            d.window,
            &column_of_cell[..d.prefix_len],
        )
        .unwrap();
        let mut from_queries = Votes::new(1, d.n_head, d.prefix_len).unwrap();
        add_votes_from_queries(&mut from_queries, 0, &queries, &keys, d.head_dim, 2, d.window, scale).unwrap();
        for (a, b) in from_softmax.as_slice().iter().zip(from_queries.as_slice()) {
            assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    fn max_over_queries_matches_the_naive_reference_on_both_paths() {
        let d = Dims {
            n_head: 6,
            n_head_kv: 2,
            head_dim: 16,
            window: 7,
            prefix_len: 90,
        };
        let n = d.prefix_len + d.window;
        let (queries, keys) = random_queries_and_keys(d, 11, 12, 3.0);
        let scale = 0.25f32;
        let probs = naive_probs(d, &queries, &keys, f64::from(scale));
        let reference = naive_votes_by(d, &probs, QueryAggregation::Max);
        let sums = naive_votes(d, &probs);
        assert!(
            reference.iter().zip(&sums).any(|(m, s)| (m - s).abs() > 1e-3),
            "max and sum must differ for the test to mean anything"
        );
        for threads in [1, 3] {
            let mut votes = Votes::new(1, d.n_head, d.prefix_len)
                .unwrap()
                .with_query_aggregation(QueryAggregation::Max);
            QueryScorer::new(threads)
                .add_votes(&mut votes, 0, &queries, &keys, d.head_dim, d.n_head_kv, d.window, scale)
                .unwrap();
            assert_close(votes.as_slice(), &reference, 1e-4, "max votes from queries");
        }
        let softmax: Vec<f32> = probs.iter().map(|&p| p as f32).collect();
        let columns: Vec<usize> = (0..d.prefix_len).collect();
        let mut from_softmax = Votes::new(1, d.n_head, d.prefix_len)
            .unwrap()
            .with_query_aggregation(QueryAggregation::Max);
        add_votes_from_softmax(&mut from_softmax, 0, &softmax, n, d.window, &columns).unwrap();
        assert_close(from_softmax.as_slice(), &reference, 1e-6, "max votes from softmax");
        assert_eq!(from_softmax.query_aggregation(), QueryAggregation::Max);
    }

    #[test]
    fn softmax_votes_refuse_bad_shapes() {
        let mut votes = Votes::new(1, 2, 3).unwrap();
        let probs = vec![0.1f32; 2 * 2 * 5];
        add_votes_from_softmax(&mut votes, 0, &probs, 5, 2, &[0, 1, 2]).unwrap();
        assert!((votes.row(1 - 1, 1)[2] - 0.2).abs() < 1e-6);
        for (layer, n_cols, cols) in [
            (1, 5, vec![0, 1, 2]),
            (0, 4, vec![0, 1, 2]),
            (0, 5, vec![0, 1]),
            (0, 5, vec![0, 1, 5]),
        ] {
            assert!(matches!(
                add_votes_from_softmax(&mut votes, layer, &probs, n_cols, 2, &cols),
                Err(AlgoError::ShapeMismatch(_))
            ));
        }
    }

    #[test]
    fn query_votes_refuse_bad_shapes() {
        let mut votes = Votes::new(1, 4, 3).unwrap();
        let q = vec![0f32; 2 * 4 * 8];
        let k = vec![0f32; 5 * 2 * 8];
        add_votes_from_queries(&mut votes, 0, &q, &k, 8, 2, 2, 0.3).unwrap();
        // Uniform logits: every visible cell gets 1/visible.
        let expected = 1.0 / 4.0 + 1.0 / 5.0;
        assert!(votes.as_slice().iter().all(|v| (v - expected).abs() < 1e-6));
        let cases: [(usize, usize, usize, usize, f32); 6] = [
            (1, 8, 2, 2, 0.3),
            (0, 8, 3, 2, 0.3),
            (0, 8, 2, 3, 0.3),
            (0, 4, 2, 2, 0.3),
            (0, 8, 2, 2, 0.0),
            (0, 8, 2, 2, f32::NAN),
        ];
        for (layer, head_dim, n_head_kv, window, scale) in cases {
            assert!(matches!(
                add_votes_from_queries(&mut votes, layer, &q, &k, head_dim, n_head_kv, window, scale),
                Err(AlgoError::ShapeMismatch(_))
            ));
        }
        // Queries that are not whole rows, and fewer rows than the window.
        assert!(matches!(
            add_votes_from_queries(&mut votes, 0, &q[..q.len() - 1], &k, 8, 2, 2, 0.3),
            Err(AlgoError::ShapeMismatch(_))
        ));
        let mut short = Votes::new(1, 4, 2).unwrap();
        assert!(matches!(
            add_votes_from_queries(&mut short, 0, &q, &k, 8, 2, 3, 0.3),
            Err(AlgoError::ShapeMismatch(_))
        ));
    }

    #[test]
    fn rows_after_the_window_see_every_window_cell() {
        let d = Dims {
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            window: 5,
            prefix_len: 60,
        };
        let extra = 3;
        let n = d.prefix_len + d.window;
        let (window_queries, keys) = random_queries_and_keys(d, 31, 32, 3.0);
        let row_len = d.n_head * d.head_dim;
        let draft: Vec<f32> = random_values(33, extra * row_len)
            .into_iter()
            .map(|x| x * 3.0)
            .collect();
        let scale = 0.25f32;
        for aggregation in [QueryAggregation::Sum, QueryAggregation::Max] {
            // The reference: the window rows as always; each extra row is
            // what a window query at the last window cell (which sees every
            // window cell) with that row's values would vote.
            let mut reference = naive_votes_by(
                d,
                &naive_probs(d, &window_queries, &keys, f64::from(scale)),
                aggregation,
            );
            for row in draft.chunks_exact(row_len) {
                let mut queries = window_queries.clone();
                queries[(d.window - 1) * row_len..].copy_from_slice(row);
                let probs = naive_probs(d, &queries, &keys, f64::from(scale));
                for h in 0..d.n_head {
                    for i in 0..d.prefix_len {
                        let p = probs[(h * d.window + d.window - 1) * n + i];
                        let v = &mut reference[h * d.prefix_len + i];
                        *v = match aggregation {
                            QueryAggregation::Sum => *v + p,
                            QueryAggregation::Max => v.max(p),
                        };
                    }
                }
            }
            let all: Vec<f32> = window_queries.iter().chain(&draft).copied().collect();
            let mut votes = Votes::new(1, d.n_head, d.prefix_len)
                .unwrap()
                .with_query_aggregation(aggregation);
            QueryScorer::new(1)
                .add_votes(&mut votes, 0, &all, &keys, d.head_dim, d.n_head_kv, d.window, scale)
                .unwrap();
            assert_close(votes.as_slice(), &reference, 1e-4, "votes with rows after the window");
            let mut window_only = Votes::new(1, d.n_head, d.prefix_len)
                .unwrap()
                .with_query_aggregation(aggregation);
            QueryScorer::new(1)
                .add_votes(
                    &mut window_only,
                    0,
                    &window_queries,
                    &keys,
                    d.head_dim,
                    d.n_head_kv,
                    d.window,
                    scale,
                )
                .unwrap();
            assert!(
                votes
                    .as_slice()
                    .iter()
                    .zip(window_only.as_slice())
                    .any(|(a, b)| (a - b).abs() > 1e-3),
                "the extra rows must change the votes for the test to mean anything"
            );
        }
    }

    #[test]
    fn pooling_by_hand() {
        let mut votes = Votes::new(1, 1, 8).unwrap();
        votes
            .row_mut(0, 0)
            .copy_from_slice(&[1.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 2.0]);
        let max = pool_and_aggregate(&votes, 1, 3, Pooling::Max, PoolAlign::Centered).unwrap();
        assert_eq!(max.row(0, 0), &[1.0, 1.0, 5.0, 5.0, 5.0, 0.0, 2.0, 2.0]);
        let avg = pool_and_aggregate(&votes, 1, 3, Pooling::Avg, PoolAlign::Centered).unwrap();
        let expected = [0.5, 1.0 / 3.0, 5.0 / 3.0, 5.0 / 3.0, 5.0 / 3.0, 0.0, 2.0 / 3.0, 1.0];
        for (a, b) in avg.row(0, 0).iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let wide = pool_and_aggregate(&votes, 1, 21, Pooling::Max, PoolAlign::Centered).unwrap();
        assert!(wide.row(0, 0).iter().all(|&v| v == 5.0));
        // Trailing windows end at the position: a vote reaches the two
        // positions after it and none before.
        let max = pool_and_aggregate(&votes, 1, 3, Pooling::Max, PoolAlign::Trailing).unwrap();
        assert_eq!(max.row(0, 0), &[1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 0.0, 2.0]);
        let avg = pool_and_aggregate(&votes, 1, 3, Pooling::Avg, PoolAlign::Trailing).unwrap();
        let expected = [1.0, 0.5, 1.0 / 3.0, 5.0 / 3.0, 5.0 / 3.0, 5.0 / 3.0, 0.0, 2.0 / 3.0];
        for (a, b) in avg.row(0, 0).iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn query_heads_of_a_kv_head_vote_by_their_mean() {
        let mut votes = Votes::new(1, 4, 2).unwrap();
        for (h, row) in [[1.0, 4.0], [3.0, 0.0], [2.0, 2.0], [0.0, 6.0]].iter().enumerate() {
            votes.row_mut(0, h).copy_from_slice(row);
        }
        let mean = pool_and_aggregate(&votes, 2, 1, Pooling::Max, PoolAlign::Centered).unwrap();
        assert_eq!(mean.as_slice(), &[2.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn pooling_refuses_bad_parameters() {
        let votes = Votes::new(1, 4, 2).unwrap();
        for (kv, kernel) in [(3, 3), (0, 3), (2, 4), (2, 0)] {
            assert!(pool_and_aggregate(&votes, kv, kernel, Pooling::Max, PoolAlign::Centered).is_err());
        }
    }

    #[test]
    fn position_order_sorts_and_splits() {
        let order = position_order(&[30, 10, 20, 0, 40], 2).unwrap();
        assert_eq!(order.by_position, vec![3, 1, 2, 0, 4]);
        assert_eq!((order.prefix_len, order.window, order.n_cells()), (3, 2, 5));
        assert!(matches!(
            position_order(&[1, 2, 1, 3], 1),
            Err(AlgoError::UnsupportedStateFormat(_))
        ));
        for window in [0, 4, 5] {
            assert!(matches!(
                position_order(&[1, 2, 3, 4], window),
                Err(AlgoError::InvalidConfig { param: "window", .. })
            ));
        }
    }

    proptest! {
        #[test]
        fn fast_pooling_matches_naive_pooling(
            row in proptest::collection::vec(0f32..10.0, 1..60),
            half_kernel in 0usize..12,
            avg in any::<bool>(),
            align in 0usize..3,
            reach in 0usize..1000,
        ) {
            let kernel = 2 * half_kernel + 1;
            let pooling = if avg { Pooling::Avg } else { Pooling::Max };
            let align = [PoolAlign::Centered, PoolAlign::Trailing, PoolAlign::Forward(reach % kernel)][align];
            let mut votes = Votes::new(1, 1, row.len()).unwrap();
            votes.row_mut(0, 0).copy_from_slice(&row);
            let scores = pool_and_aggregate(&votes, 1, kernel, pooling, align).unwrap();
            let reference = naive_pool(&row.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(), kernel, pooling, align);
            for (a, b) in scores.row(0, 0).iter().zip(&reference) {
                prop_assert!((f64::from(*a) - b).abs() <= 1e-5 * b.abs().max(1.0));
            }
        }
    }

    /// Times the query path at the real shape (Qwen2.5-0.5B, 7.5k prompt).
    /// Run: `cargo test --release -- --ignored --nocapture time_`
    #[test]
    #[ignore]
    fn time_query_scoring_at_real_shape() {
        let (n_layer, n_head, n_head_kv, head_dim, window, n) = (24, 14, 2, 64, 32, 7500);
        let prefix_len = n - window;
        let queries: Vec<Vec<f32>> = (0..n_layer)
            .map(|l| random_values(l as u64, window * n_head * head_dim))
            .collect();
        let keys: Vec<Vec<f32>> = (0..n_layer)
            .map(|l| random_values(1000 + l as u64, n * n_head_kv * head_dim))
            .collect();
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut votes = Votes::new(n_layer, n_head, prefix_len).unwrap();
        let threads: usize = std::env::var("SNAPKV_BENCH_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        let mut scorer = QueryScorer::new(threads);
        let start = std::time::Instant::now();
        for l in 0..n_layer {
            scorer
                .add_votes(&mut votes, l, &queries[l], &keys[l], head_dim, n_head_kv, window, scale)
                .unwrap();
        }
        let t_votes = start.elapsed();
        let start = std::time::Instant::now();
        let scores = pool_and_aggregate(&votes, n_head_kv, 7, Pooling::Max, PoolAlign::Centered).unwrap();
        let t_pool = start.elapsed();
        let start = std::time::Instant::now();
        let shape = SelectionShape {
            n_layer,
            n_head_kv,
            prefix_len,
        };
        let sel = SnapKvSelector.select(Some(&scores), &shape, 1024 - window).unwrap();
        let t_select = start.elapsed();
        println!(
            "P={n} layers={n_layer} heads={n_head}/{n_head_kv} d={head_dim} w={window}: votes {t_votes:?} ({} threads), pool+gqa {t_pool:?}, select {t_select:?} ({} kept/head)",
            scorer.threads,
            sel.n_keep
        );
    }
}
