//! Reconstruction scores computed once per document and reused.
//!
//! `reconstruct` costs about two prefills per compression, and an
//! evaluation compresses the same document for every budget and every
//! method that selects from the same scores (`reconstruct`,
//! `reconstruct-shared`, ...). The scores depend on the document and the
//! scoring options, not on the budget or on how cells are chosen from them,
//! so the first such branch records them and the others select from the
//! record. A [`ScoreMemo`] belongs to one document: a new document needs a
//! new memo.
//!
//! A replayed branch differs from a recomputed one in one place: the
//! engine decodes the prompt's last token again over the compressed cache
//! after a reconstruction (its repeat left other logits), so that token's
//! cell holds K/V computed over the compressed cache; [`redo_last_token`]
//! does the same after a replay, and
//! [`DocumentScores::branch`](super::DocumentScores::branch) calls it.

use std::sync::{Arc, Mutex};

use snapkv::llama::{Pos, SeqId, Token};
use snapkv::snapkv::{AlgoError, Budget, HeadScores, ScoreBasis, Selection, SelectionShape, Selector, SnapKvConfig};
use snapkv::{Context, Error, Result};

/// Scores recorded for one document, by scoring options.
#[derive(Debug, Default)]
pub struct ScoreMemo {
    entries: Mutex<Vec<(String, Arc<HeadScores>)>>,
}

impl ScoreMemo {
    /// An empty memo for a new document.
    pub fn new() -> Arc<Self> {
        Arc::new(ScoreMemo::default())
    }

    /// `inner` with its scores recorded or replayed: unchanged unless it
    /// scores by reconstruction. The first selector for a configuration
    /// (apart from its budget) records the scores the engine computes; later
    /// ones, for any budget, select from the record and make the engine
    /// compute none. Returns the selector and whether it replays.
    pub fn wrap(self: &Arc<Self>, inner: Box<dyn Selector>, config: &SnapKvConfig) -> (Box<dyn Selector>, bool) {
        if !inner.needs_scores() || inner.score_basis() != ScoreBasis::Reconstruction {
            return (inner, false);
        }
        let mut scoring = config.clone();
        scoring.budget = Budget::Cells(0);
        let key = format!("{scoring:?}");
        let recorded = self.lock().iter().find(|(k, _)| *k == key).map(|(_, s)| s.clone());
        match recorded {
            Some(scores) => (Box::new(Replaying { inner, scores }), true),
            None => (
                Box::new(Recording {
                    inner,
                    key,
                    memo: self.clone(),
                }),
                false,
            ),
        }
    }

    /// How many score sets the memo holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the memo holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, Arc<HeadScores>)>> {
        // A panic while holding the lock leaves a vector that is still whole.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Passes the engine's scores on and records them.
struct Recording {
    inner: Box<dyn Selector>,
    key: String,
    memo: Arc<ScoreMemo>,
}

impl Selector for Recording {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn needs_scores(&self) -> bool {
        true
    }

    fn score_basis(&self) -> ScoreBasis {
        self.inner.score_basis()
    }

    fn select(
        &self,
        scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> std::result::Result<Selection, AlgoError> {
        let selection = self.inner.select(scores, shape, n_keep)?;
        if let Some(s) = scores {
            let mut entries = self.memo.lock();
            if !entries.iter().any(|(k, _)| *k == self.key) {
                entries.push((self.key.clone(), Arc::new(s.clone())));
            }
        }
        Ok(selection)
    }
}

/// Selects from recorded scores; the engine computes none.
struct Replaying {
    inner: Box<dyn Selector>,
    scores: Arc<HeadScores>,
}

impl Selector for Replaying {
    fn name(&self) -> &'static str {
        self.inner.name()
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
        self.inner.select(Some(&self.scores), shape, n_keep)
    }
}

/// Decodes sequence `seq`'s last token (`last`, at position `pos`) again
/// over the cache as it is now: what the engine does after a
/// reconstruction, for a branch that replayed one.
///
/// # Errors
/// [`Error::InvalidArgument`] when the sequence does not end at `pos`;
/// decode errors.
pub fn redo_last_token(ctx: &mut Context<'_>, seq: SeqId, last: Token, pos: Pos) -> Result<()> {
    if ctx.seq_pos_max(seq) != Some(pos) || !ctx.seq_rm(seq, pos, -1) {
        return Err(Error::InvalidArgument {
            param: "seq",
            reason: format!("sequence {seq} does not end at position {pos}"),
        });
    }
    ctx.decode_tokens(seq, &[last], pos, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{branch, Method, Snapshot};
    use snapkv::{init_backend, Compressor, ContextParams, FlashAttention, Model, ModelParams, WindowObserver};
    use snapkv_testing::{tiny_model_path, TinyModelSpec};

    fn compressor(memo: &Arc<ScoreMemo>, name: &str, cells: usize) -> (Method, bool) {
        let mut config = SnapKvConfig::default();
        config.budget = Budget::Cells(cells);
        let inner = crate::trial::trial_selector(name, None)
            .or_else(|| snapkv::snapkv::selector_by_name(name))
            .unwrap();
        let (selector, replays) = memo.wrap(inner, &config);
        (
            Method::Compress(Compressor::with_selector(config, selector).unwrap()),
            replays,
        )
    }

    /// A replayed branch holds the same cache, byte for byte, as one whose
    /// reconstruction was computed: for another budget and for another
    /// selector of the same scores.
    #[test]
    fn a_replayed_branch_is_the_computed_one() {
        let path = tiny_model_path(&TinyModelSpec::default()).unwrap();
        let model = Model::load(init_backend(), &path, &ModelParams::default()).unwrap();
        let mut tokens = model
            .tokenize(
                &"the river flows to the sea and 4821 time passes ".repeat(40),
                true,
                false,
            )
            .unwrap();
        tokens.truncate(300);
        let p = tokens.len();
        let params = ContextParams::default()
            .with_n_ctx(1024)
            .with_threads(2)
            .with_flash_attn(FlashAttention::On)
            .with_observer(WindowObserver::new());
        let mut ctx = Context::new(&model, &params).unwrap();
        let snap = Snapshot::capture(&mut ctx, 0, &tokens, 32, 128, |_| {}).unwrap();

        let memo = ScoreMemo::new();
        let (first, replays) = compressor(&memo, "reconstruct-shared", 128);
        assert!(!replays && memo.is_empty());
        branch(&mut ctx, &snap, &first).unwrap();
        assert_eq!(memo.len(), 1, "the first branch records");

        for (name, cells) in [("reconstruct-shared", 96), ("reconstruct", 128)] {
            let fresh = ScoreMemo::new();
            let (computed, _) = compressor(&fresh, name, cells);
            branch(&mut ctx, &snap, &computed).unwrap();
            let want = ctx.state_seq_get(0).unwrap();
            let want_logits = ctx.logits_ith(-1).unwrap().to_vec();

            let (replayed, replays) = compressor(&memo, name, cells);
            assert!(replays, "{name} @ {cells}");
            let b = branch(&mut ctx, &snap, &replayed).unwrap();
            assert_eq!(b.usage.cells, cells);
            redo_last_token(&mut ctx, 0, tokens[p - 1], p as Pos - 1).unwrap();
            assert!(
                ctx.state_seq_get(0).unwrap() == want,
                "{name} @ {cells}: the caches differ"
            );
            assert_eq!(ctx.logits_ith(-1).unwrap(), &want_logits[..]);
        }
        assert_eq!(memo.len(), 1);

        // Other scoring options are other scores: recorded anew.
        let mut config = SnapKvConfig::default();
        config.kernel = 3;
        let (_, replays) = memo.wrap(
            crate::trial::trial_selector("reconstruct-shared", None).unwrap(),
            &config,
        );
        assert!(!replays);
        // Selectors that do not score by reconstruction pass through.
        let (s, replays) = memo.wrap(Box::new(snapkv::snapkv::SnapKvSelector), &config);
        assert!(!replays && s.needs_scores());
    }
}
