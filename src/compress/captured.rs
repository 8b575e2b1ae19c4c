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
        let before = observer.activity();
        let pass = observer.arm_scoped(CaptureRequest::for_model(ctx.model(), Some(batch.len()), window));
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
    /// alone). `draft`: the prompt's last token when a draft may run.
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
        draft: Option<Token>,
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
        let attention = self.selector.needs_scores() && self.selector.score_basis() == ScoreBasis::Attention;
        let (scores, mut source) = if !self.selector.needs_scores() {
            (None, ScoreSource::None)
        } else if attention {
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
        } else {
            (Some(key_scores(&state, &order)?), ScoreSource::Keys)
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
        // A draft's queries vote beside the window's: attention selectors only.
        if let Some(last_token) = draft.filter(|_| self.config.draft > 0 && attention) {
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
