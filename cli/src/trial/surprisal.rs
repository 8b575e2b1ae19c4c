//! The self-information of a document's tokens, as a question-agnostic
//! score: a token the model could not predict from what came before (a
//! number, a name, a fact stated once) carries what a later question may
//! ask for, while predictable text can be recomputed from context. Ranking
//! tokens by their surprisal to drop the predictable ones is how Selective
//! Context (Li et al., 2023) and LLMLingua (Jiang et al., 2023) compress
//! prompts; here the same score chooses which cells of an evaluated
//! document every KV head keeps.
//!
//! Cost: the document evaluated once more with the logits of every token
//! (the output projection for every position, on this model about a
//! quarter of a prefill more than the prefill itself).

use std::sync::Arc;

use snapkv::llama::{Batch, Pos, SeqId, Token};
use snapkv::snapkv::{AlgoError, HeadScores, Selection, SelectionShape, Selector};
use snapkv::{Context, Error, Result};

/// `-ln p(token i | tokens before i)` for every token of `tokens`, from the
/// model's own next-token distributions. The first token, which nothing
/// predicts, scores infinity: it is kept first, as it should be (every head
/// parks attention on it, the attention sink). The tokens are evaluated into sequence `seq`, which
/// must be empty, in batches of the context's batch size, and removed again
/// afterwards (also on error).
///
/// # Errors
/// [`Error::InvalidArgument`] when `seq` is not empty or the tokens do not
/// fit the context; decode errors.
pub fn token_surprisal(ctx: &mut Context<'_>, seq: SeqId, tokens: &[Token]) -> Result<Vec<f32>> {
    if ctx.seq_pos_max(seq).is_some() {
        return Err(Error::InvalidArgument {
            param: "seq",
            reason: format!("sequence {seq} must be empty to score a document's surprisal"),
        });
    }
    if tokens.len() > ctx.n_ctx() {
        return Err(Error::InvalidArgument {
            param: "tokens",
            reason: format!("{} tokens do not fit a context of {} cells", tokens.len(), ctx.n_ctx()),
        });
    }
    let result = surprisal_in(ctx, seq, tokens);
    ctx.seq_rm(seq, -1, -1);
    result
}

fn surprisal_in(ctx: &mut Context<'_>, seq: SeqId, tokens: &[Token]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(tokens.len());
    let step = ctx.n_batch().max(1);
    let mut batch = Batch::new(step, 1)?;
    for (c, chunk) in tokens.chunks(step).enumerate() {
        batch.clear();
        let start = c * step;
        for (i, &t) in chunk.iter().enumerate() {
            batch.add(t, (start + i) as Pos, &[seq], true)?;
        }
        ctx.decode(&batch)?;
        for i in 0..chunk.len() {
            let at = start + i;
            if at == 0 {
                out.push(f32::INFINITY);
            }
            // Row i predicts the token after it.
            if let Some(&next) = tokens.get(at + 1) {
                let logits = ctx.logits_ith(i as i32).ok_or_else(|| Error::InvalidArgument {
                    param: "logits",
                    reason: format!("no logits for batch row {i}"),
                })?;
                out.push(negative_log_prob(logits, next));
            }
        }
    }
    Ok(out)
}

/// `-ln softmax(logits)[token]`, without the whole distribution (infinite
/// for a token outside the vocabulary).
fn negative_log_prob(logits: &[f32], token: Token) -> f32 {
    let Some(&x) = usize::try_from(token).ok().and_then(|t| logits.get(t)) else {
        return f32::INFINITY;
    };
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    (f64::from(max) + sum.ln() - f64::from(x)) as f32
}

/// The mean of `values` over a centred window of `kernel` places (an even
/// kernel reaches one place further back than forward; the window is cut
/// at both ends of the sequence): the information density around each
/// token. A 7-digit number is seven surprising tokens in a row, while a
/// sentence of ordinary text has a few surprising words among predictable
/// ones; a single token's surprisal cannot tell the two apart, the mean
/// over a number's length can.
pub fn mean_pool_centred(values: &[f32], kernel: usize) -> Vec<f32> {
    let k = kernel.max(1);
    let (back, forward) = (k / 2, (k - 1) / 2);
    (0..values.len())
        .map(|i| {
            let lo = i.saturating_sub(back);
            let hi = (i + forward + 1).min(values.len());
            let window = &values[lo..hi];
            window.iter().map(|&x| f64::from(x)).sum::<f64>() as f32 / window.len() as f32
        })
        .collect()
}

/// Every KV head keeps the same cells: the `n_keep` prefix positions with
/// the highest pooled surprisal (ties to the lower index). It needs no
/// scores from the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct SurprisalSelector {
    /// One score per prefix index; empty when none were computed.
    scores: Arc<[f32]>,
}

impl SurprisalSelector {
    /// The selector over `scores`, one per prefix index (pooled already,
    /// [`mean_pool_centred`]).
    pub fn new(scores: Arc<[f32]>) -> Self {
        SurprisalSelector { scores }
    }
}

impl Selector for SurprisalSelector {
    fn name(&self) -> &'static str {
        "surprisal"
    }

    fn needs_scores(&self) -> bool {
        false
    }

    fn select(
        &self,
        _scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> std::result::Result<Selection, AlgoError> {
        let n = shape.prefix_len;
        if self.scores.len() < n {
            return Err(AlgoError::InvalidSelection(format!(
                "surprisal has {} token scores for {n} prefix cells: it needs the document's own \
                 (snapkv eval --protocol question-agnostic computes them)",
                self.scores.len()
            )));
        }
        shape.check_keep(n_keep)?;
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by(|a, b| {
            self.scores[*b as usize]
                .total_cmp(&self.scores[*a as usize])
                .then(a.cmp(b))
        });
        let mut row = order[..n_keep].to_vec();
        row.sort_unstable();
        let rows = shape.n_layer * shape.n_head_kv;
        let kept: Vec<u32> = std::iter::repeat(row).take(rows).flatten().collect();
        Selection::new(shape.n_layer, shape.n_head_kv, n_keep, n, kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::log_softmax;
    use snapkv::{init_backend, ContextParams, Model, ModelParams};
    use snapkv_testing::{tiny_model_path, TinyModelSpec};

    #[test]
    fn pooling_averages_a_centred_window() {
        let v = [0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 3.0, 3.0];
        assert_eq!(mean_pool_centred(&v, 3), [0.0, 0.0, 2.0, 2.0, 2.0, 1.0, 2.0, 3.0]);
        assert_eq!(mean_pool_centred(&v, 1), v);
        // Kernel 4: one back more than forward.
        assert_eq!(mean_pool_centred(&v, 4), [0.0, 0.0, 1.5, 1.5, 1.5, 2.25, 1.5, 2.0]);
        // Five surprising tokens in a row outrank one spike of three times
        // their surprisal.
        let v = [0.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 0.0];
        let pooled = mean_pool_centred(&v, 5);
        assert!(pooled[3] > pooled[9], "{pooled:?}");
    }

    #[test]
    fn every_head_keeps_the_most_surprising_positions() {
        let s = SelectionShape {
            n_layer: 2,
            n_head_kv: 2,
            prefix_len: 6,
        };
        let sel = SurprisalSelector::new(vec![1.0, 3.0, 0.5, 3.0, 2.0, 0.0, 9.0].into());
        let out = sel.select(None, &s, 3).unwrap();
        for (l, g) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            assert_eq!(out.row(l, g), &[1, 3, 4], "the seventh score lies past the prefix");
        }
        assert!(sel.select(None, &s, 7).is_err());
        let err = SurprisalSelector::new(Vec::new().into())
            .select(None, &s, 3)
            .unwrap_err();
        assert!(err.to_string().contains("question-agnostic"), "{err}");
    }

    /// Against the model's logits for the whole text in one batch: batches
    /// of the context's size give the same values, and the sequence is left
    /// empty.
    #[test]
    fn surprisal_is_the_models_own_next_token_loss() {
        let path = tiny_model_path(&TinyModelSpec::default()).unwrap();
        let model = Model::load(init_backend(), &path, &ModelParams::default()).unwrap();
        let tokens = model
            .tokenize(
                &"the river flows to the sea and 4821 time passes ".repeat(12),
                true,
                false,
            )
            .unwrap();
        let params = ContextParams::default()
            .with_n_ctx(512)
            .with_batch(64, 64)
            .with_threads(2);
        let mut ctx = Context::new(&model, &params).unwrap();
        let got = token_surprisal(&mut ctx, 0, &tokens).unwrap();
        assert_eq!(got.len(), tokens.len());
        assert_eq!(ctx.seq_pos_max(0), None, "the sequence is emptied");
        assert_eq!(got[0], f32::INFINITY, "the first token is never dropped");

        let whole = ContextParams::default().with_n_ctx(512).with_threads(2);
        let mut one = Context::new(&model, &whole).unwrap();
        let mut batch = Batch::new(tokens.len(), 1).unwrap();
        for (i, &t) in tokens.iter().enumerate() {
            batch.add(t, i as Pos, &[0], true).unwrap();
        }
        one.decode(&batch).unwrap();
        for i in 1..tokens.len() {
            let lp = log_softmax(one.logits_ith(i as i32 - 1).unwrap());
            let want = -lp[tokens[i] as usize];
            assert!(
                (got[i] - want).abs() <= 1e-3 * want.abs().max(1.0),
                "token {i}: {} vs {want}",
                got[i]
            );
        }
        // Not an empty sequence: refused, the sequence left as it was.
        ctx.decode_tokens(0, &tokens[..8], 0, false).unwrap();
        assert!(token_surprisal(&mut ctx, 0, &tokens).is_err());
        assert_eq!(ctx.seq_pos_max(0), Some(7));
    }
}
