//! The engine's common core: evaluating the window with the observer armed,
//! and scoring, selecting and compacting a sequence from what was captured.

use std::time::Instant;

use super::draft::Drafting;
use super::support::model_shape;
use super::votes::{compute_votes, key_scores, weight_by_value_norms};
use super::{CompressionStats, Compressor, ScoreSource};
use crate::error::{Error, Result};
use crate::llama::observer::{Capture, CaptureRequest};
use crate::llama::{ContextRef, Pos, SeqId, Token, WindowObserver};
use crate::snapkv::{
    pool_and_aggregate, position_order, rewrite, CellOrder, HeadScores, KeptPositions, ScoreBasis, SelectionShape,
    SeqState, ValueWeighting, Votes,
};

impl Compressor {
    /// Evaluates `batch` (at most one micro-batch, ending with the window of
    /// `window` tokens) with the observer armed to capture the window's
    /// rows; returns the capture and the seconds it took.
    pub(super) fn observe_window(
        &self,
        ctx: &mut ContextRef,
        observer: &WindowObserver,
        seq: SeqId,
        batch: &[Token],
        start: Pos,
        window: usize,
    ) -> Result<(Capture, f64)> {
        debug_assert!(window <= batch.len() && batch.len() <= ctx.n_ubatch());
        let request = CaptureRequest::for_model(ctx.model(), Some(batch.len()), window);
        self.observe_batch(ctx, observer, seq, batch, start, request)
    }

    /// Evaluates `batch` (at most one micro-batch) with the observer armed
    /// for `request`; returns the capture and the seconds it took.
    pub(super) fn observe_batch(
        &self,
        ctx: &mut ContextRef,
        observer: &WindowObserver,
        seq: SeqId,
        batch: &[Token],
        start: Pos,
        request: CaptureRequest,
    ) -> Result<(Capture, f64)> {
        let before = observer.activity();
        let pass = observer.arm_scoped(request);
        let t0 = Instant::now();
        let decoded = ctx.decode_tokens(seq, batch, start, true);
        ctx.synchronize();
        let capture = pass.finish();
        decoded?;
        if observer.activity().missed_window_since(before) {
            // No graph callback reached the observer: it is not this
            // context's cb_eval.
            return Err(Error::ObserverMissing);
        }
        if let Some(e) = &capture.error {
            return Err(Error::Capture(e.clone()));
        }
        Ok((capture, t0.elapsed().as_secs_f64()))
    }

    /// Scores, selects and compacts sequence `seq` from a window capture.
    /// `blob` is the sequence's state as it is now (its positions and, outside
    /// the window, its K/V). `budget`: cells to keep, or `None` to derive it
    /// from the cells the sequence holds (a sequence that fits is left
    /// alone). `tokens`: the sequence's last tokens as the caller gave them
    /// (ending at its last position), when the entry point is given any: a
    /// draft decodes the last again; reconstruction needs every token of the
    /// sequence.
    ///
    /// This function does not restore anything: every caller holds a
    /// [`Rollback`](super::rollback::Rollback) over the sequence.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn compress_captured(
        &self,
        ctx: &mut ContextRef,
        seq: SeqId,
        observer: &WindowObserver,
        capture: &Capture,
        blob: &[u8],
        budget: Option<usize>,
        tokens: Option<&[Token]>,
    ) -> Result<CompressionStats> {
        if let Some(e) = &capture.error {
            return Err(Error::Capture(e.clone()));
        }
        let model = ctx.model();
        let shape = model_shape(model);
        let w = self.config.window;
        let rotation_disabled = observer.rotation_disabled();
        let t_compact = Instant::now();
        let state = SeqState::parse(blob, &shape)?;
        let budget = match budget {
            Some(b) => Some(b).filter(|&b| state.n_cells() > b),
            None => self.config.cells_to_keep(state.n_cells())?,
        };
        let Some(budget) = budget else {
            // Nothing to evict (given a budget: the sequence holds fewer
            // cells than its positions suggest, it was compressed before).
            let mut stats = self.noop_stats(state.n_cells(), 0.0);
            stats.observe_seconds = capture.seconds;
            return Ok(stats);
        };
        let order = position_order(state.positions(), w)?;
        let mut compact_seconds = t_compact.elapsed().as_secs_f64();
        let n_keep = budget - w;

        let t_score = Instant::now();
        let basis = self.selector.needs_scores().then(|| self.selector.score_basis());
        // Reconstruction repeats every token of the sequence: checked once.
        let whole = match basis {
            Some(ScoreBasis::Reconstruction) => Some(whole_sequence(tokens, &state, self.selector.name())?),
            _ => None,
        };
        let (scores, mut source) = match basis {
            None => (None, ScoreSource::None),
            Some(ScoreBasis::Attention) => {
                let (votes, source) = compute_votes(
                    model,
                    capture,
                    &state,
                    &order,
                    w,
                    self.config.queries,
                    rotation_disabled,
                )?;
                (Some(self.scores_from_votes(&state, &order, votes)?), source)
            }
            Some(ScoreBasis::KeyDissimilarity) => (Some(key_scores(&state, &order)?), ScoreSource::Keys),
            Some(ScoreBasis::Reconstruction) => {
                let all = whole.expect("checked for reconstruction above");
                let votes = self.reconstruction_votes(ctx, seq, observer, all, order.prefix_len)?;
                (
                    Some(self.scores_from_votes(&state, &order, votes)?),
                    ScoreSource::Reconstruction,
                )
            }
        };
        let mut score_seconds = t_score.elapsed().as_secs_f64();

        let t_select = Instant::now();
        let sel_shape = SelectionShape {
            n_layer: shape.n_layer,
            n_head_kv: shape.n_head_kv,
            prefix_len: order.prefix_len,
        };
        let mut selection = self.selector.select(scores.as_ref(), &sel_shape, n_keep)?;
        let mut select_seconds = t_select.elapsed().as_secs_f64();

        let t_rewrite = Instant::now();
        let mut new_blob = rewrite(&state, &order, &selection)?;
        ctx.state_seq_set(seq, &new_blob)?;
        compact_seconds += t_rewrite.elapsed().as_secs_f64();

        let mut draft_tokens = 0;
        let mut draft_seconds = 0.0;
        if let Some(all) = whole {
            // The repeat left its logits: the prompt's last token is decoded
            // again over the compressed cache, so that the logits are the
            // prompt's. Part of the reconstruction's cost.
            let t_last = Instant::now();
            decode_last_again(ctx, seq, all)?;
            score_seconds += t_last.elapsed().as_secs_f64();
        }
        // A draft's queries vote beside the window's: attention selectors only.
        let last_token = tokens.and_then(|t| t.last().copied());
        if let Some(last_token) = last_token.filter(|_| self.config.draft > 0 && basis == Some(ScoreBasis::Attention)) {
            let drafting = Drafting {
                observer,
                last_token,
                capture,
                state: &state,
                order: &order,
                shape: &sel_shape,
                n_keep,
            };
            if let Some(r) = self.redraft(ctx, seq, drafting)? {
                source = ScoreSource::QueryKey;
                selection = r.selection;
                new_blob = r.blob;
                draft_tokens = r.tokens;
                draft_seconds = r.draft_seconds;
                score_seconds += r.score_seconds;
                select_seconds += r.select_seconds;
                compact_seconds += r.compact_seconds;
            }
        }
        let prefix_positions: Vec<i32> = order.by_position[..order.prefix_len]
            .iter()
            .map(|&cell| state.positions()[cell])
            .collect();
        let kept = KeptPositions::new(&selection, &prefix_positions)?;
        Ok(CompressionStats {
            compressed: true,
            method: self.selector.name(),
            score_source: source,
            cells_before: state.n_cells(),
            cells_after: budget,
            bytes_before: blob.len(),
            bytes_after: new_blob.len(),
            prefill_seconds: 0.0,
            window_seconds: 0.0,
            observe_seconds: capture.seconds,
            score_seconds,
            select_seconds,
            compact_seconds,
            draft_tokens,
            draft_seconds,
            kept: Some(kept),
        })
    }

    /// Weights (when configured), pools and aggregates votes into per-KV-head
    /// scores.
    pub(super) fn scores_from_votes(
        &self,
        state: &SeqState<'_>,
        order: &CellOrder,
        mut votes: Votes,
    ) -> Result<HeadScores> {
        if self.config.value_weighting == ValueWeighting::Norm {
            weight_by_value_norms(state, order, &mut votes)?;
        }
        Ok(pool_and_aggregate(
            &votes,
            state.shape().n_head_kv,
            self.config.kernel,
            self.config.pooling,
            self.config.pool_align,
        )?)
    }
}

/// The tokens of the whole sequence, for a method that reads them all: the
/// caller's `tokens` when they cover every cell of an uncompressed sequence
/// (positions `0..n`).
///
/// # Errors
/// [`Error::InvalidArgument`] naming `method` otherwise.
fn whole_sequence<'t>(tokens: Option<&'t [Token]>, state: &SeqState<'_>, method: &str) -> Result<&'t [Token]> {
    let n = state.n_cells();
    let uncompressed = state.positions().iter().all(|&p| p >= 0 && (p as usize) < n);
    match tokens {
        Some(t) if t.len() == n && uncompressed => Ok(t),
        _ => Err(Error::InvalidArgument {
            param: "tokens",
            reason: format!(
                "{method} repeats the whole sequence, so it needs all of its {n} tokens: prefill them into an \
                 empty sequence, or pass every token to compress_after_prefill"
            ),
        }),
    }
}

/// Decodes the sequence's last token again at its position, over the cache
/// as it is now, leaving its logits.
fn decode_last_again(ctx: &mut ContextRef, seq: SeqId, tokens: &[Token]) -> Result<()> {
    let last = ctx.seq_pos_max(seq).ok_or(Error::EmptySequence { seq })?;
    let token = *tokens.last().ok_or(Error::EmptySequence { seq })?;
    if !ctx.seq_rm(seq, last, -1) {
        return Err(Error::State {
            op: "set",
            reason: "llama.cpp could not remove the prompt's last token to decode it again".into(),
        });
    }
    ctx.decode_tokens(seq, &[token], last, true)
}
