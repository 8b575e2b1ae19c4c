//! Votes of the window's queries over the sequence's cells: from the
//! model's own softmax when it was captured and can be matched to the
//! cells, otherwise from the captured queries against the cached keys; and
//! the query-free scores of the cached keys alone.

use super::support::k_rotation;
use super::ScoreSource;
use crate::error::{Error, Result};
use crate::llama::observer::Capture;
use crate::llama::{dequantize_row, ModelRef};
use crate::snapkv::{
    gather_keys, hadamard, key_dissimilarity, value_norms, weight_votes_by_value_norms, CellOrder, HeadScores,
    QueryAggregation, QueryScorer, SeqState, Votes,
};

/// The attention scale of the model: `{arch}.attention.scale` when set,
/// otherwise `1/sqrt(head_dim)`.
fn attention_scale(model: &ModelRef) -> f32 {
    match model.meta_f32(&format!("{}.attention.scale", model.arch())) {
        Some(s) if s != 0.0 => s,
        _ => 1.0 / (model.head_dim() as f32).sqrt(),
    }
}

/// Votes from the model's softmax when every layer's was captured and its
/// columns can be matched to the sequence's cells; otherwise from the
/// captured queries and the cached keys.
pub(super) fn compute_votes(
    model: &ModelRef,
    capture: &Capture,
    state: &SeqState<'_>,
    order: &CellOrder,
    w: usize,
    queries: QueryAggregation,
    rotation_disabled: bool,
) -> Result<(Votes, ScoreSource)> {
    let n_layer = model.n_layer();
    let mut votes = Votes::new(n_layer, model.n_head(), order.prefix_len)?.with_query_aggregation(queries);
    if capture.softmax.iter().all(Option::is_some) {
        if let Some(prefix_col) = softmax_columns(capture, state, order, model.n_head(), w) {
            for (layer, rows) in capture.softmax.iter().enumerate() {
                let rows = rows.as_ref().expect("checked above");
                crate::snapkv::add_votes_from_softmax(&mut votes, layer, &rows.data, rows.n_cols, w, &prefix_col)?;
            }
            return Ok((votes, ScoreSource::Softmax));
        }
        log::warn!("softmax columns could not be matched to the sequence's cells; scoring from queries and keys");
    }
    query_key_votes(model, &capture.queries, state, order, w, rotation_disabled, &mut votes)?;
    Ok((votes, ScoreSource::QueryKey))
}

/// Scales every layer's votes by the norms of the cached value vectors
/// ([`ValueWeighting::Norm`]).
pub(super) fn weight_by_value_norms(state: &SeqState<'_>, order: &CellOrder, votes: &mut Votes) -> Result<()> {
    let mut norms = Vec::new();
    for layer in 0..state.shape().n_layer {
        value_norms(state, order, layer, &mut dequantize_row, &mut norms)?;
        weight_votes_by_value_norms(votes, layer, &norms, state.shape().n_head_kv)?;
    }
    Ok(())
}

/// Matches softmax columns (KV cell indices) to the sequence's cells: the
/// last window query sees every cell of its sequence and nothing else, so
/// its non-zero columns (over all layers and heads), in increasing order,
/// are the sequence's cells in the state's (cell index) order. `None` when
/// the count does not match.
fn softmax_columns(
    capture: &Capture,
    state: &SeqState<'_>,
    order: &CellOrder,
    n_head: usize,
    w: usize,
) -> Option<Vec<usize>> {
    let n_cols = capture.softmax.first()?.as_ref()?.n_cols;
    let mut visible = vec![false; n_cols];
    for rows in capture.softmax.iter().flatten() {
        if rows.n_cols != n_cols {
            return None;
        }
        for h in 0..n_head {
            let row = &rows.data[(h * w + (w - 1)) * n_cols..][..n_cols];
            for (v, &p) in visible.iter_mut().zip(row) {
                *v |= p > 0.0;
            }
        }
    }
    let cols: Vec<usize> = (0..n_cols).filter(|&c| visible[c]).collect();
    if cols.len() != state.n_cells() {
        return None;
    }
    Some(
        order.by_position[..order.prefix_len]
            .iter()
            .map(|&cell| cols[cell])
            .collect(),
    )
}

/// Votes from captured post-RoPE queries against the cached keys, layer by
/// layer, accounting for llama.cpp's Hadamard rotation of quantized keys.
pub(super) fn query_key_votes(
    model: &ModelRef,
    layer_queries: &[Option<Vec<f32>>],
    state: &SeqState<'_>,
    order: &CellOrder,
    w: usize,
    rotation_disabled: bool,
    votes: &mut Votes,
) -> Result<()> {
    let (n_head_kv, head_dim) = (model.n_head_kv(), model.head_dim());
    let scale = attention_scale(model);
    let mut scorer = QueryScorer::new(0);
    let mut keys = Vec::new();
    let mut rotated = Vec::new();
    for (layer, queries) in layer_queries.iter().enumerate() {
        let queries = queries.as_ref().ok_or_else(|| {
            Error::Capture(format!(
                "no query captured for layer {layer} (is the architecture's graph as expected?)"
            ))
        })?;
        gather_keys(state, order, layer, &mut dequantize_row, &mut keys)?;
        let queries = match k_rotation(state, layer, rotation_disabled) {
            Some(n) => {
                rotated.clone_from(queries);
                hadamard::rotate_blocks(&mut rotated, n);
                &rotated
            }
            None => queries,
        };
        scorer.add_votes(votes, layer, queries, &keys, head_dim, n_head_kv, w, scale)?;
    }
    Ok(())
}

/// Per-KV-head scores from the cached keys alone
/// ([`key_dissimilarity`], layer by layer) for a query-free selector.
pub(super) fn key_scores(state: &SeqState<'_>, order: &CellOrder) -> Result<HeadScores> {
    let shape = state.shape();
    let (n_layer, n_head_kv, n) = (shape.n_layer, shape.n_head_kv, order.prefix_len);
    let mut data = crate::snapkv::alloc::filled_vec(n_layer * n_head_kv * n, 0f32, "key scores")?;
    let mut keys = Vec::new();
    for (layer, out) in data.chunks_exact_mut((n_head_kv * n).max(1)).enumerate().take(n_layer) {
        gather_keys(state, order, layer, &mut dequantize_row, &mut keys)?;
        key_dissimilarity(&keys, n, n_head_kv, shape.head_dim_k, out)?;
    }
    Ok(HeadScores::from_vec(n_layer, n_head_kv, n, data)?)
}

#[cfg(test)]
mod tests {
    //! Scores and selections against a naive f64 implementation of
    //! DESIGN.md section 1, on data captured from the tiny model.

    use std::sync::OnceLock;

    use half::f16;

    use super::*;
    use crate::compress::{model_shape, Compressor};
    use crate::llama::{Context, ContextParams, FlashAttention, Model, ModelParams, Pos, WindowObserver};
    use crate::snapkv::{
        pool_and_aggregate, position_order, PoolAlign, Pooling, SelectionShape, Selector, SnapKvConfig, SnapKvSelector,
    };
    use snapkv_testing::{tiny_model_path, TinyModelSpec};

    fn tiny() -> &'static Model {
        static M: OnceLock<Model> = OnceLock::new();
        M.get_or_init(|| {
            let path = tiny_model_path(&TinyModelSpec::default()).unwrap();
            Model::load(crate::init_backend(), path, &ModelParams::default()).unwrap()
        })
    }

    /// Naive per-(layer, query head) votes in f64 from the captured queries
    /// and the cached f16 keys. In a fresh single-sequence cache, cell i
    /// holds position i.
    fn naive_votes_qk(model: &ModelRef, capture: &Capture, state: &SeqState<'_>, w: usize) -> Vec<Vec<Vec<f64>>> {
        let (h_n, g_n, d) = (model.n_head(), model.n_head_kv(), model.head_dim());
        let p = state.n_cells();
        let scale = 1.0 / (d as f64).sqrt();
        let key = |l: usize, cell: usize, g: usize| -> Vec<f64> {
            state
                .k_head_bytes(l, cell, g)
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect()
        };
        (0..model.n_layer())
            .map(|l| {
                let q_all = capture.queries[l].as_ref().unwrap();
                (0..h_n)
                    .map(|h| {
                        let g = h / (h_n / g_n);
                        let mut votes = vec![0f64; p - w];
                        for qi in 0..w {
                            let q = &q_all[(qi * h_n + h) * d..][..d];
                            let visible = p - w + qi + 1;
                            let logits: Vec<f64> = (0..visible)
                                .map(|c| key(l, c, g).iter().zip(q).map(|(k, &q)| k * q as f64).sum::<f64>() * scale)
                                .collect();
                            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                            let z: f64 = logits.iter().map(|x| (x - m).exp()).sum();
                            for (c, v) in votes.iter_mut().enumerate() {
                                *v += (logits[c] - m).exp() / z;
                            }
                        }
                        votes
                    })
                    .collect()
            })
            .collect()
    }

    /// Naive votes from the model's own softmax.
    fn naive_votes_softmax(model: &ModelRef, capture: &Capture, p: usize, w: usize) -> Vec<Vec<Vec<f64>>> {
        (0..model.n_layer())
            .map(|l| {
                let rows = capture.softmax[l].as_ref().unwrap();
                (0..model.n_head())
                    .map(|h| {
                        (0..p - w)
                            .map(|c| (0..w).map(|q| rows.data[(h * w + q) * rows.n_cols + c] as f64).sum())
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    /// Max pooling (kernel k, padding k/2, edges truncated), then the mean
    /// over the query heads of each KV head.
    fn naive_scores(votes: &[Vec<Vec<f64>>], n_head_kv: usize, k: usize) -> Vec<Vec<Vec<f64>>> {
        votes
            .iter()
            .map(|heads| {
                let group = heads.len() / n_head_kv;
                (0..n_head_kv)
                    .map(|g| {
                        let n = heads[0].len();
                        (0..n)
                            .map(|i| {
                                let (lo, hi) = (i.saturating_sub(k / 2), (i + k / 2).min(n - 1));
                                heads[g * group..(g + 1) * group]
                                    .iter()
                                    .map(|v| v[lo..=hi].iter().cloned().fold(f64::NEG_INFINITY, f64::max))
                                    .sum::<f64>()
                                    / group as f64
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    fn check_against_naive(fa: FlashAttention) {
        let model = tiny();
        let mut tokens = model
            .tokenize(&"the river flows to the sea and time passes ".repeat(40), true, false)
            .unwrap();
        tokens.truncate(300);
        let config = SnapKvConfig {
            budget: crate::Budget::Cells(96),
            ..SnapKvConfig::default()
        };
        let comp = Compressor::new(config).unwrap();
        let w = comp.config.window;
        let observer = WindowObserver::new();
        let params = ContextParams::default()
            .with_n_ctx(512)
            .with_threads(2)
            .with_flash_attn(fa);
        let mut ctx = Context::new(model, &params.with_observer(observer.clone())).unwrap();
        let p = tokens.len();
        // The armed batch is longer than the window, as on the prefill
        // path: only its last `w` rows are captured.
        let armed = 100;
        ctx.decode_tokens(0, &tokens[..p - armed], 0, false).unwrap();
        let (capture, _) = comp
            .observe_window(&mut ctx, &observer, 0, &tokens[p - armed..], (p - armed) as Pos, w)
            .unwrap();
        assert!(capture.error.is_none(), "{:?}", capture.error);
        let blob = ctx.state_seq_get(0).unwrap();
        let state = SeqState::parse(&blob, &model_shape(model)).unwrap();
        let order = position_order(state.positions(), w).unwrap();

        let (votes, source) = compute_votes(model, &capture, &state, &order, w, QueryAggregation::Sum, false).unwrap();
        let naive_votes = if fa == FlashAttention::Off {
            assert_eq!(source, ScoreSource::Softmax);
            naive_votes_softmax(model, &capture, p, w)
        } else {
            assert_eq!(source, ScoreSource::QueryKey);
            naive_votes_qk(model, &capture, &state, w)
        };
        let scores = pool_and_aggregate(&votes, model.n_head_kv(), 7, Pooling::Max, PoolAlign::Centered).unwrap();
        let naive = naive_scores(&naive_votes, model.n_head_kv(), 7);

        let n_keep = 96 - w;
        let selection = SnapKvSelector
            .select(
                Some(&scores),
                &SelectionShape {
                    n_layer: model.n_layer(),
                    n_head_kv: model.n_head_kv(),
                    prefix_len: p - w,
                },
                n_keep,
            )
            .unwrap();
        let mut rows_compared = 0;
        for (l, layer) in naive.iter().enumerate() {
            for (g, row) in layer.iter().enumerate() {
                for (i, &want) in row.iter().enumerate() {
                    let got = scores.row(l, g)[i] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4,
                        "{fa:?} layer {l} head {g} cell {i}: {got} vs {want}"
                    );
                }
                let mut idx: Vec<usize> = (0..row.len()).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                // Compare selections only where the cut is not a near-tie.
                if (row[idx[n_keep - 1]] - row[idx[n_keep]]).abs() > 1e-4 {
                    let mut want: Vec<u32> = idx[..n_keep].iter().map(|&i| i as u32).collect();
                    want.sort_unstable();
                    assert_eq!(selection.row(l, g), &want[..], "{fa:?} layer {l} head {g}");
                    rows_compared += 1;
                }
            }
        }
        assert!(rows_compared >= 2, "every cut was a near-tie");
    }

    #[test]
    fn query_key_scores_match_a_naive_reference() {
        check_against_naive(FlashAttention::On);
    }

    #[test]
    fn softmax_scores_match_a_naive_reference() {
        check_against_naive(FlashAttention::Off);
    }

    /// The query-free selector end to end: what `keydiff` keeps is the top
    /// of a naive f64 key dissimilarity computed from the uncompressed
    /// cache's f16 keys.
    #[test]
    fn keydiff_keeps_the_keys_furthest_from_their_heads_mean_direction() {
        let model = tiny();
        let mut tokens = model
            .tokenize(
                &"the river flows to the sea and 4821 time passes ".repeat(40),
                true,
                false,
            )
            .unwrap();
        tokens.truncate(300);
        let (p, budget) = (tokens.len(), 96);
        let config = SnapKvConfig {
            budget: crate::Budget::Cells(budget),
            ..SnapKvConfig::default()
        };
        let w = config.window;
        let params = ContextParams::default().with_n_ctx(512).with_threads(2);
        let mut ctx = Context::new(model, &params.with_observer(WindowObserver::new())).unwrap();
        ctx.decode_tokens(0, &tokens, 0, false).unwrap();
        let blob = ctx.state_seq_get(0).unwrap();
        let state = SeqState::parse(&blob, &model_shape(model)).unwrap();
        let order = position_order(state.positions(), w).unwrap();
        let (n_head_kv, d) = (model.n_head_kv(), state.shape().head_dim_k);
        let naive: Vec<Vec<Vec<f64>>> = (0..model.n_layer())
            .map(|layer| {
                let key = |i: usize, g: usize| -> Vec<f64> {
                    let row = state.k_row(layer, order.by_position[i]);
                    (0..d)
                        .map(|e| {
                            let at = 2 * (g * d + e);
                            f64::from(f16::from_le_bytes([row[at], row[at + 1]]).to_f32())
                        })
                        .collect()
                };
                let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                (0..n_head_kv)
                    .map(|g| {
                        let mut anchor = vec![0.0; d];
                        for i in 0..p - w {
                            let k = key(i, g);
                            let n = norm(&k);
                            anchor.iter_mut().zip(&k).for_each(|(a, x)| *a += x / n);
                        }
                        (0..p - w)
                            .map(|i| {
                                let k = key(i, g);
                                let dot: f64 = k.iter().zip(&anchor).map(|(a, b)| a * b).sum();
                                1.0 - dot / (norm(&k) * norm(&anchor))
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        ctx.seq_rm(0, -1, -1);

        let comp = Compressor::with_method(config, "keydiff").unwrap();
        let stats = comp.prefill(&mut ctx, 0, &tokens).unwrap();
        assert_eq!(stats.score_source, ScoreSource::Keys);
        assert_eq!((stats.cells_before, stats.cells_after), (p, budget));
        let kept = stats.kept.unwrap();
        let n_keep = budget - w;
        let mut rows_compared = 0;
        for (l, layer) in naive.iter().enumerate() {
            for (g, row) in layer.iter().enumerate() {
                let mut idx: Vec<usize> = (0..row.len()).collect();
                idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                if (row[idx[n_keep - 1]] - row[idx[n_keep]]).abs() > 1e-4 {
                    let mut want: Vec<i32> = idx[..n_keep].iter().map(|&i| i as i32).collect();
                    want.sort_unstable();
                    assert_eq!(kept.row(l, g), &want[..], "layer {l} head {g}");
                    rows_compared += 1;
                }
            }
        }
        assert!(rows_compared >= 2, "every cut was a near-tie");
    }
}
