//! Drafting the answer: a greedy draft on the first compressed cache whose
//! queries vote beside the window's in a second selection
//! ([`SnapKvConfig::draft`](crate::SnapKvConfig::draft)).

use std::time::Instant;

use super::votes::query_key_votes;
use super::Compressor;
use crate::error::{Error, Result};
use crate::llama::observer::{Capture, CaptureRequest};
use crate::llama::{ContextRef, Pos, Sampler, SeqId, Token, WindowObserver};
use crate::snapkv::{rewrite, CellOrder, Selection, SelectionShape, SeqState, Votes};

impl Compressor {
    /// The draft's second selection, on a sequence already compacted from
    /// `state` (the full prompt) by the window's selection: greedily decodes
    /// up to [`SnapKvConfig::draft`] tokens of the answer on the compacted
    /// cache with the observer recording their queries, selects again from
    /// `state` with the window's and the draft's queries voting together,
    /// writes that selection in place of the first (the draft's cells go
    /// with it) and decodes the prompt's last token again over it, so that
    /// the logits left are the prompt's. `None` when the first drafted token
    /// ends the answer (nothing was decoded; the first selection stands).
    pub(super) fn redraft(&self, ctx: &mut ContextRef, seq: SeqId, draft: Drafting<'_>) -> Result<Option<Redraft>> {
        let Drafting {
            observer,
            last_token,
            capture,
            state,
            order,
            shape: sel_shape,
            n_keep,
        } = draft;
        let last = ctx.seq_pos_max(seq).ok_or(Error::EmptySequence { seq })?;
        let t_draft = Instant::now();
        if ctx.logits_ith(-1).is_none() {
            return Err(Error::InvalidArgument {
                param: "logits",
                reason: "the prompt's last decode left no logits to draft from".into(),
            });
        }
        let mut greedy = Sampler::greedy();
        let first = greedy.sample(ctx, -1)?;
        if ctx.model().is_eog(first) {
            return Ok(None);
        }
        // Measured on the pinned llama.cpp: the first two decodes after a
        // sequence's cells were placed anew take ~10x as long (0.35 s
        // against 0.03 s on Qwen 0.5B) when the observer splits their graph,
        // and run at full speed after one unobserved decode. So the first
        // drafted token is decoded once unobserved and removed again.
        ctx.decode_tokens(seq, &[first], last + 1, true)?;
        if !ctx.seq_rm(seq, last + 1, -1) {
            return Err(Error::State {
                op: "set",
                reason: "llama.cpp could not remove the draft's first token".into(),
            });
        }
        let before = observer.activity();
        let model = ctx.model();
        let pass = observer.arm_scoped(CaptureRequest::for_model(model, None, self.config.draft));
        let mut tokens = 0;
        let decoded = (|| -> Result<()> {
            let mut token = first;
            loop {
                ctx.decode_tokens(seq, &[token], last + 1 + tokens as Pos, true)?;
                tokens += 1;
                if tokens == self.config.draft {
                    return Ok(());
                }
                token = greedy.sample(ctx, -1)?;
                if ctx.model().is_eog(token) {
                    return Ok(());
                }
            }
        })();
        let drafted = pass.finish();
        decoded?;
        if observer.activity().missed_window_since(before) {
            return Err(Error::ObserverMissing);
        }
        if let Some(e) = drafted.error {
            return Err(Error::Capture(e));
        }
        let mut draft_seconds = t_draft.elapsed().as_secs_f64();

        let t_score = Instant::now();
        let model = ctx.model();
        let queries: Vec<Option<Vec<f32>>> = capture
            .queries
            .iter()
            .zip(&drafted.queries)
            .map(|(window, draft)| Some([window.as_deref()?, draft.as_deref()?].concat()))
            .collect();
        let mut votes =
            Votes::new(model.n_layer(), model.n_head(), order.prefix_len)?.with_query_aggregation(self.config.queries);
        query_key_votes(
            model,
            &queries,
            state,
            order,
            self.config.window,
            observer.rotation_disabled(),
            &mut votes,
        )?;
        let scores = self.scores_from_votes(state, order, votes)?;
        let score_seconds = t_score.elapsed().as_secs_f64();
        let t_select = Instant::now();
        let selection = self.selector.select(Some(&scores), sel_shape, n_keep)?;
        let select_seconds = t_select.elapsed().as_secs_f64();
        let t_compact = Instant::now();
        let blob = rewrite(state, order, &selection)?;
        ctx.state_seq_set(seq, &blob)?;
        let compact_seconds = t_compact.elapsed().as_secs_f64();

        let t_last = Instant::now();
        if !ctx.seq_rm(seq, last, -1) {
            return Err(Error::State {
                op: "set",
                reason: "llama.cpp could not remove the prompt's last token to decode it again".into(),
            });
        }
        ctx.decode_tokens(seq, &[last_token], last, true)?;
        draft_seconds += t_last.elapsed().as_secs_f64();
        Ok(Some(Redraft {
            selection,
            blob,
            tokens,
            draft_seconds,
            score_seconds,
            select_seconds,
            compact_seconds,
        }))
    }
}

/// What a draft works from: the observer that records the draft's queries,
/// the prompt's last token (decoded again at the end), the window's capture
/// and the full prompt's state with its order, and the selection's shape.
pub(super) struct Drafting<'a> {
    pub(super) observer: &'a WindowObserver,
    pub(super) last_token: Token,
    pub(super) capture: &'a Capture,
    pub(super) state: &'a SeqState<'a>,
    pub(super) order: &'a CellOrder,
    pub(super) shape: &'a SelectionShape,
    pub(super) n_keep: usize,
}

/// The outcome of [`Compressor::redraft`].
pub(super) struct Redraft {
    pub(super) selection: Selection,
    pub(super) blob: Vec<u8>,
    pub(super) tokens: usize,
    pub(super) draft_seconds: f64,
    pub(super) score_seconds: f64,
    pub(super) select_seconds: f64,
    pub(super) compact_seconds: f64,
}
