//! The compression engine: ties the observer, the scoring and the per-head
//! compaction of llama.cpp's KV cache together.
//!
//! # What a compressed sequence looks like
//!
//! After compression a sequence holds `budget` cells per KV head, at the
//! lowest free cell indices of the cache. The last `window` cells are the
//! observation window with their true positions, so the sequence's highest
//! position is unchanged and decoding continues at the prompt length. The
//! other cells are *per-head composites*: cell `j` holds, for KV head `g`,
//! the `j`-th prompt position that head `g` kept — different positions for
//! different heads. Their keys carry the RoPE of their true positions, so
//! attention over them is exact; their position metadata is nominal:
//! consecutive values just below the window. Consequences:
//!
//! - `seq_pos_min` reports `P - budget`, not 0; positions of the compressed
//!   cells do not identify prompt tokens.
//! - `seq_rm` from the window onwards is exact. Over a range of compressed
//!   positions it removes composite cells, that is parts of several tokens
//!   (each compressed position holds one kept token of every KV head): the
//!   sequence stays decodable, with less of the prompt.
//! - Shifting every cell by the same delta (`seq_add` over the whole
//!   sequence, e.g. to make room in front) is exact up to rounding: K rows
//!   are re-rotated by the delta, whatever true position they hold.
//!   Shifting only part of it (context shift with `n_keep`, which removes
//!   and shifts from a position inside the compressed range) moves
//!   composite cells relative to each other by the nominal positions, not
//!   the true ones: lossy.
//! - `seq_div` (self-extend's grouped positions) is **wrong** on a
//!   compressed sequence: it re-rotates each cell by an amount computed
//!   from its nominal position, while its keys carry other, per-head true
//!   positions. Do not use it on compressed sequences.
//! - Prefix reuse by token comparison is not valid for the compressed part.
//! - Models whose attention depends on cell positions (ALiBi) are refused.
//!
//! # Failures
//!
//! Every entry point checks the model, the context and its arguments before
//! it evaluates or changes anything, and holds a rollback guard over the
//! sequence from its first change on: on an error, and on a panic
//! unwinding through it (a user's [`crate::snapkv::Selector`]),
//! the sequence is put back exactly as it was — its state bytes, and every
//! other sequence's, unchanged. [`Error::RestoreFailed`] is returned only
//! when putting it back failed, so the sequence really is gone.

mod captured;
mod draft;
mod reconstruct;
mod rollback;
mod support;
mod votes;

use std::time::Instant;

use crate::error::{Error, Result};
use crate::llama::observer::{Capture, CaptureRequest};
use crate::llama::{ContextRef, Pos, SeqId, Token, WindowObserver};
use crate::snapkv::{
    position_order, selector_by_name, KeptPositions, Selector, SeqState, SnapKvConfig, SnapKvSelector,
};

use rollback::Rollback;
pub(crate) use support::check_supported;
use support::{check_shared_cells, check_window_fits, window_keys_mismatch};
pub use support::{model_shape, VERIFIED_ARCHS};

/// Where the attention scores came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreSource {
    /// The model's own softmax (flash attention off).
    Softmax,
    /// Captured window queries against the cached keys (flash attention on).
    QueryKey,
    /// The cached keys alone (a query-free selector,
    /// [`ScoreBasis::KeyDissimilarity`](crate::snapkv::ScoreBasis)).
    Keys,
    /// The queries of a teacher-forced repeat of the sequence against its
    /// keys ([`ScoreBasis::Reconstruction`](crate::snapkv::ScoreBasis)).
    Reconstruction,
    /// The method needs no scores (streaming, random) or nothing was done.
    None,
}

/// What a compression did and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct CompressionStats {
    /// Whether the cache was rewritten (false: the prompt fit the budget).
    pub compressed: bool,
    /// The selection method.
    pub method: &'static str,
    /// Where the scores came from.
    pub score_source: ScoreSource,
    /// Cells of the sequence before compression.
    pub cells_before: usize,
    /// Cells after (the budget, or `cells_before` for a no-op).
    pub cells_after: usize,
    /// Bytes of K/V data of the sequence before (from its state size).
    pub bytes_before: usize,
    /// Bytes after.
    pub bytes_after: usize,
    /// Seconds evaluating the prompt before the armed micro-batch (prefill
    /// path only).
    pub prefill_seconds: f64,
    /// Seconds evaluating the armed micro-batch: on the prefill path the
    /// last micro-batch of the prompt (which ends with the window), on the
    /// hook path the re-evaluated window.
    pub window_seconds: f64,
    /// Seconds the observer spent copying tensors (part of `window_seconds`).
    pub observe_seconds: f64,
    /// Seconds computing votes, pooling and aggregation.
    pub score_seconds: f64,
    /// Seconds selecting positions.
    pub select_seconds: f64,
    /// Seconds reading, rewriting and writing the sequence state; on the
    /// re-evaluating hook ([`Compressor::compress_after_prefill`]) also the
    /// snapshot it takes first, to restore the sequence on failure.
    pub compact_seconds: f64,
    /// Tokens of the answer drafted on the first compressed cache
    /// ([`SnapKvConfig::draft`]); 0 without a draft.
    pub draft_tokens: usize,
    /// Seconds decoding the draft and the prompt's last token again (the
    /// second selection's scoring and compaction count in `score_seconds`
    /// and `compact_seconds`).
    pub draft_seconds: f64,
    /// The prompt positions each KV head kept (`None` when nothing was
    /// compressed).
    pub kept: Option<KeptPositions>,
}

impl CompressionStats {
    /// Time spent on compression beyond evaluating the prompt itself:
    /// observing, scoring, selecting, compacting and drafting.
    pub fn overhead_seconds(&self) -> f64 {
        self.observe_seconds + self.score_seconds + self.select_seconds + self.compact_seconds + self.draft_seconds
    }
}

/// SnapKV compression for llama.cpp contexts: a validated configuration and a
/// selection method.
///
/// ```no_run
/// use snapkv::{init_backend, Compressor, Context, ContextParams, Model, ModelParams, SnapKvConfig, WindowObserver};
/// # fn main() -> snapkv::Result<()> {
/// let model = Model::load(init_backend(), "models/qwen2.5-coder-0.5b-instruct.gguf", &ModelParams::default())?;
/// let observer = WindowObserver::new();
/// let mut ctx = Context::new(&model, &ContextParams::default().with_n_ctx(8192).with_observer(observer))?;
/// let tokens = model.tokenize("a long prompt ...", true, false)?;
/// let compressor = Compressor::new(SnapKvConfig::default())?;
/// let stats = compressor.prefill(&mut ctx, 0, &tokens)?;
/// println!("kept {} of {} cells", stats.cells_after, stats.cells_before);
/// # Ok(()) }
/// ```
pub struct Compressor {
    config: SnapKvConfig,
    selector: Box<dyn Selector>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("config", &self.config)
            .field("method", &self.selector.name())
            .finish()
    }
}

impl Compressor {
    /// A SnapKV compressor (per-KV-head selection).
    ///
    /// # Errors
    /// [`Error::Algo`] when the configuration is invalid.
    pub fn new(config: SnapKvConfig) -> Result<Self> {
        Self::with_selector(config, Box::new(SnapKvSelector))
    }

    /// A compressor with another selection method (baselines, ablations).
    ///
    /// # Errors
    /// [`Error::Algo`] when the configuration is invalid.
    pub fn with_selector(config: SnapKvConfig, selector: Box<dyn Selector>) -> Result<Self> {
        config.validate()?;
        Ok(Self { config, selector })
    }

    /// A compressor for a method by name: `snapkv`, `snapkv-shared-layer`,
    /// `snapkv-shared-all`, `streaming`, `random`, `keydiff`, `reconstruct`
    /// ([`SELECTOR_NAMES`](crate::snapkv::SELECTOR_NAMES)).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown name; [`Error::Algo`] for an
    /// invalid configuration.
    pub fn with_method(config: SnapKvConfig, method: &str) -> Result<Self> {
        let selector = selector_by_name(method).ok_or_else(|| Error::InvalidArgument {
            param: "method",
            reason: format!("unknown method {method:?}"),
        })?;
        Self::with_selector(config, selector)
    }

    /// The configuration.
    pub fn config(&self) -> &SnapKvConfig {
        &self.config
    }

    /// The selection method's name.
    pub fn method(&self) -> &'static str {
        self.selector.name()
    }

    /// What the method scores by (`None` for one that needs no scores).
    pub fn score_basis(&self) -> Option<crate::snapkv::ScoreBasis> {
        self.selector.needs_scores().then(|| self.selector.score_basis())
    }

    /// Evaluates `tokens` into sequence `seq` (after what it already holds)
    /// and compresses it: the tokens are evaluated in batches, the last
    /// micro-batch (which ends with the observation window) with the
    /// observer armed to capture the window's rows, then the sequence is
    /// compacted. No token is evaluated twice, and the window costs no more
    /// than any other tokens of the prompt. The logits of the last token are
    /// available afterwards (`logits_ith(-1)`).
    ///
    /// When the sequence fits the budget it is evaluated without the
    /// observer and left untouched (`compressed == false`).
    ///
    /// # Errors
    /// Invalid arguments, unsupported models, decode failures. On any error
    /// the sequence is left as it was before the call: the tokens this call
    /// evaluated are removed again (see the module's "Failures").
    pub fn prefill(&self, ctx: &mut crate::Context<'_>, seq: SeqId, tokens: &[Token]) -> Result<CompressionStats> {
        let observer = ctx.observer().cloned().ok_or(Error::ObserverMissing)?;
        self.prefill_with(ctx, &observer, seq, tokens)
    }

    /// [`prefill`](Self::prefill) for a context whose observer is held
    /// elsewhere (borrowed contexts, the C ABI).
    ///
    /// # Errors
    /// As [`prefill`](Self::prefill).
    pub fn prefill_with(
        &self,
        ctx: &mut ContextRef,
        observer: &WindowObserver,
        seq: SeqId,
        tokens: &[Token],
    ) -> Result<CompressionStats> {
        ctx.check_seq(seq)?;
        check_supported(ctx.model())?;
        observer.check_serves(ctx.as_ptr())?;
        if tokens.is_empty() {
            return Err(Error::InvalidArgument {
                param: "tokens",
                reason: "empty prompt".into(),
            });
        }
        ctx.model().check_tokens(tokens)?;
        let start = ctx.seq_pos_max(seq).map_or(0, |p| p + 1);
        let cells_total = start as usize + tokens.len();
        let w = self.config.window;
        let budget = self.config.cells_to_keep(cells_total)?;
        if budget.is_some() {
            if tokens.len() < w {
                return Err(Error::InvalidArgument {
                    param: "tokens",
                    reason: format!(
                        "the observation window ({w}) must lie within the new tokens ({})",
                        tokens.len()
                    ),
                });
            }
            check_window_fits(ctx, w)?;
        }
        Rollback::truncating(ctx, seq, start).run(|ctx| {
            let Some(budget) = budget else {
                let t0 = Instant::now();
                ctx.decode_tokens(seq, tokens, start, true)?;
                return Ok(self.noop_stats(cells_total, t0.elapsed().as_secs_f64()));
            };
            // The last micro-batch holds the window; it is evaluated on its
            // own (armed) so that it is exactly one micro-batch.
            let split = tokens.len() - tokens.len().min(ctx.n_ubatch());
            let t0 = Instant::now();
            if split > 0 {
                ctx.decode_tokens(seq, &tokens[..split], start, false)?;
            }
            let prefill_seconds = t0.elapsed().as_secs_f64();
            let (capture, window_seconds) =
                self.observe_window(ctx, observer, seq, &tokens[split..], start + split as Pos, w)?;
            let t_read = Instant::now();
            let blob = ctx.state_seq_get(seq)?;
            check_shared_cells(ctx, seq, &SeqState::parse(&blob, &model_shape(ctx.model()))?)?;
            let read_seconds = t_read.elapsed().as_secs_f64();
            let mut stats = Rollback::to_state(ctx, seq, &blob)
                .run(|ctx| self.compress_captured(ctx, seq, observer, &capture, &blob, Some(budget), Some(tokens)))?;
            stats.prefill_seconds = prefill_seconds;
            stats.window_seconds = window_seconds;
            stats.compact_seconds += read_seconds;
            Ok(stats)
        })
    }

    /// The hook for a sequence the caller already evaluated: re-evaluates
    /// only its last `window` tokens with the observer armed (pass at least
    /// the last `window` tokens of the sequence; extra leading tokens are
    /// ignored), then compresses. The logits of the last token are
    /// recomputed. The compaction works from a snapshot of the state taken
    /// before the re-evaluation, so the kept cells, the window's included,
    /// hold the K/V the caller's own decodes computed (with the model's
    /// softmax as the score source, flash attention off, the state is read
    /// again after the re-evaluation and the window's cells hold its K/V).
    ///
    /// The window tokens are checked against the sequence: the keys their
    /// re-evaluation computes in the first layer must match the cached ones
    /// (up to rounding, and an 8-bit K cache's quantization). Tokens that
    /// differ from the sequence's last ones are refused with the sequence
    /// restored. With a 4- or 5-bit K cache, whose quantization moves keys
    /// as far as another token does, this cannot be checked: the tokens are
    /// taken as given, and wrong ones vote as if they were the window.
    ///
    /// # Errors
    /// Invalid arguments (window tokens that are not the sequence's last
    /// tokens included), an empty sequence, unsupported models. On any
    /// error the sequence is restored exactly as it was.
    pub fn compress_after_prefill(
        &self,
        ctx: &mut crate::Context<'_>,
        seq: SeqId,
        window_tokens: &[Token],
    ) -> Result<CompressionStats> {
        let observer = ctx.observer().cloned().ok_or(Error::ObserverMissing)?;
        self.compress_after_prefill_with(ctx, &observer, seq, window_tokens)
    }

    /// [`compress_after_prefill`](Self::compress_after_prefill) with an
    /// explicit observer.
    ///
    /// # Errors
    /// As [`compress_after_prefill`](Self::compress_after_prefill).
    pub fn compress_after_prefill_with(
        &self,
        ctx: &mut ContextRef,
        observer: &WindowObserver,
        seq: SeqId,
        window_tokens: &[Token],
    ) -> Result<CompressionStats> {
        ctx.check_seq(seq)?;
        check_supported(ctx.model())?;
        observer.check_serves(ctx.as_ptr())?;
        let w = self.config.window;
        if window_tokens.len() < w {
            return Err(Error::InvalidArgument {
                param: "window_tokens",
                reason: format!("need the last {w} tokens of the sequence, got {}", window_tokens.len()),
            });
        }
        let window = &window_tokens[window_tokens.len() - w..];
        ctx.model().check_tokens(window)?;
        let last = ctx.seq_pos_max(seq).ok_or(Error::EmptySequence { seq })?;
        // The snapshot restores the sequence on failure (the window is
        // removed before it is evaluated again); the host pays for it, so it
        // counts as compaction.
        let t_snapshot = Instant::now();
        let snapshot = ctx.state_seq_get(seq)?;
        let state = SeqState::parse(&snapshot, &model_shape(ctx.model()))?;
        let snapshot_seconds = t_snapshot.elapsed().as_secs_f64();
        let Some(budget) = self.config.cells_to_keep(state.n_cells())? else {
            let mut stats = self.noop_stats(state.n_cells(), 0.0);
            stats.compact_seconds = snapshot_seconds;
            return Ok(stats);
        };
        check_window_fits(ctx, w)?;
        let first = last + 1 - w as Pos;
        if first < 0 {
            return Err(Error::InvalidArgument {
                param: "window_tokens",
                reason: "the sequence is shorter than the window".into(),
            });
        }
        check_shared_cells(ctx, seq, &state)?;
        Rollback::to_state(ctx, seq, &snapshot).run(|ctx| {
            if !ctx.seq_rm(seq, first, -1) {
                return Err(Error::State {
                    op: "set",
                    reason: "llama.cpp could not remove the window for re-evaluation".into(),
                });
            }
            let (capture, window_seconds) = self.observe_window(ctx, observer, seq, window, first, w)?;
            let order = position_order(state.positions(), w)?;
            if let Some(distance) =
                window_keys_mismatch(capture.keys.as_deref(), &state, &order, observer.rotation_disabled())?
            {
                return Err(Error::InvalidArgument {
                    param: "window_tokens",
                    reason: format!(
                        "they are not the last {w} tokens of sequence {seq}: their keys differ from the cached ones \
                         by {distance:.3} (relative)"
                    ),
                });
            }
            // The snapshot holds the same positions and, outside the window,
            // the same K/V as the sequence now; the window's cells keep the
            // K/V the host computed. Softmax columns index the cache's
            // cells as they are after the re-evaluation, which may differ
            // from the snapshot's order: that source reads the state again.
            let reread;
            let current = if capture.softmax.iter().all(Option::is_none) {
                &snapshot[..]
            } else {
                reread = ctx.state_seq_get(seq)?;
                &reread[..]
            };
            let mut stats =
                self.compress_captured(ctx, seq, observer, &capture, current, Some(budget), Some(window_tokens))?;
            stats.window_seconds = window_seconds;
            stats.compact_seconds += snapshot_seconds;
            Ok(stats)
        })
    }

    /// Arms the context's observer so that the caller's own next decodes
    /// (the prompt, evaluated with [`ContextRef::decode_tokens`] or
    /// `llama_decode`, in any batch sizes) record the rows of their last
    /// `window` tokens. Follow with
    /// [`compress_observed`](Self::compress_observed) right after the
    /// prompt: the window is then never evaluated twice, and the hook costs
    /// what the prefill path costs. While armed, every decode splits its
    /// graph at the captured tensors (a small cost); `compress_observed`
    /// disarms.
    ///
    /// # Errors
    /// [`Error::ObserverMissing`] when the context has no observer;
    /// [`Error::Unsupported`] for a model that cannot be compressed (so
    /// that nothing is armed for it); [`Error::Algo`] for an invalid
    /// configuration.
    pub fn observe_decodes(&self, ctx: &crate::Context<'_>) -> Result<()> {
        let observer = ctx.observer().ok_or(Error::ObserverMissing)?;
        self.observe_decodes_with(ctx, observer)
    }

    /// [`observe_decodes`](Self::observe_decodes) with an explicit observer.
    ///
    /// # Errors
    /// [`Error::ObserverMissing`] when the observer was never attached to a
    /// context; [`Error::InvalidArgument`] when it serves another context;
    /// otherwise as [`observe_decodes`](Self::observe_decodes).
    pub fn observe_decodes_with(&self, ctx: &ContextRef, observer: &WindowObserver) -> Result<()> {
        self.config.validate()?;
        check_supported(ctx.model())?;
        observer.check_serves(ctx.as_ptr())?;
        observer.arm(CaptureRequest::for_model(ctx.model(), None, self.config.window));
        Ok(())
    }

    /// The hook after [`observe_decodes`](Self::observe_decodes): disarms
    /// the observer and compresses sequence `seq` from the window rows the
    /// caller's decodes recorded. Nothing is re-evaluated; the logits of the
    /// last token stay as the caller's decode left them.
    ///
    /// The last `window` tokens decoded while armed must be the last
    /// `window` tokens of `seq`: their positions are checked, and their
    /// keys in the first layer must match the ones `seq` caches, so rows of
    /// another sequence decoded while armed are refused even at the same
    /// positions (unless it holds the same tokens there, whose rows are
    /// the same; and not with a 4- or 5-bit K cache, whose quantization
    /// hides the difference). Decode only `seq` while armed.
    ///
    /// # Errors
    /// [`Error::ObserverMissing`] when no decode reached the observer (it is
    /// not this context's callback, or nothing was decoded);
    /// [`Error::InvalidArgument`] when the observer was not armed, fewer
    /// than `window` tokens were decoded while armed, or the rows are not
    /// the end of `seq` (positions or keys);
    /// [`Error::InvalidSequence`], [`Error::EmptySequence`],
    /// [`Error::Unsupported`], capture and state errors. On any error the
    /// sequence is exactly as it was.
    pub fn compress_observed(&self, ctx: &mut crate::Context<'_>, seq: SeqId) -> Result<CompressionStats> {
        let observer = ctx.observer().cloned().ok_or(Error::ObserverMissing)?;
        self.compress_observed_with(ctx, &observer, seq)
    }

    /// [`compress_observed`](Self::compress_observed) with an explicit
    /// observer.
    ///
    /// # Errors
    /// As [`compress_observed`](Self::compress_observed).
    pub fn compress_observed_with(
        &self,
        ctx: &mut ContextRef,
        observer: &WindowObserver,
        seq: SeqId,
    ) -> Result<CompressionStats> {
        let armed = observer.is_armed();
        let capture = observer.disarm();
        if !armed {
            return Err(Error::InvalidArgument {
                param: "observer",
                reason: "not armed: call observe_decodes before decoding the prompt".into(),
            });
        }
        self.compress_from_capture(ctx, observer, seq, capture)
    }

    /// [`compress_observed_with`](Self::compress_observed_with) from a
    /// capture taken off the observer earlier (the preload holds it until
    /// it knows the prompt has ended).
    pub(crate) fn compress_from_capture(
        &self,
        ctx: &mut ContextRef,
        observer: &WindowObserver,
        seq: SeqId,
        capture: Capture,
    ) -> Result<CompressionStats> {
        ctx.check_seq(seq)?;
        check_supported(ctx.model())?;
        observer.check_serves(ctx.as_ptr())?;
        if self.config.draft > 0 {
            return Err(Error::InvalidArgument {
                param: "draft",
                reason: "a draft decodes the prompt's last token again, which compress_observed is not given: \
                         use prefill or compress_after_prefill, or set draft to 0"
                    .into(),
            });
        }
        let w = self.config.window;
        let last = ctx.seq_pos_max(seq).ok_or(Error::EmptySequence { seq })?;
        if capture.callbacks == 0 {
            return Err(Error::ObserverMissing);
        }
        if let Some(e) = &capture.error {
            return Err(Error::Capture(e.clone()));
        }
        let not_this_sequence = |got: String| Error::InvalidArgument {
            param: "seq",
            reason: format!(
                "the decodes observed ended with {got}, but the window is the {w} tokens at positions {}..={last} \
                 of sequence {seq}: decode the prompt (only this sequence) after observe_decodes and compress \
                 before decoding anything else",
                last + 1 - w as Pos
            ),
        };
        let expected: Vec<Pos> = (last + 1 - w as Pos..=last).collect();
        if capture.positions != expected {
            return Err(not_this_sequence(
                match (capture.positions.first(), capture.positions.last()) {
                    (Some(a), Some(b)) => format!("{} tokens at positions {a}..={b}", capture.positions.len()),
                    _ => "no tokens".into(),
                },
            ));
        }
        let t_read = Instant::now();
        let blob = ctx.state_seq_get(seq)?;
        let state = SeqState::parse(&blob, &model_shape(ctx.model()))?;
        let order = position_order(state.positions(), w)?;
        if let Some(distance) =
            window_keys_mismatch(capture.keys.as_deref(), &state, &order, observer.rotation_disabled())?
        {
            return Err(not_this_sequence(format!(
                "rows whose keys differ from the sequence's own by {distance:.3} (relative): another sequence's"
            )));
        }
        check_shared_cells(ctx, seq, &state)?;
        let read_seconds = t_read.elapsed().as_secs_f64();
        // The budget follows from the cells the state holds.
        let mut stats = Rollback::to_state(ctx, seq, &blob)
            .run(|ctx| self.compress_captured(ctx, seq, observer, &capture, &blob, None, None))?;
        if stats.compressed {
            stats.compact_seconds += read_seconds;
        }
        Ok(stats)
    }

    fn noop_stats(&self, cells: usize, prefill_seconds: f64) -> CompressionStats {
        CompressionStats {
            compressed: false,
            method: self.selector.name(),
            score_source: ScoreSource::None,
            cells_before: cells,
            cells_after: cells,
            bytes_before: 0,
            bytes_after: 0,
            prefill_seconds,
            window_seconds: 0.0,
            observe_seconds: 0.0,
            score_seconds: 0.0,
            select_seconds: 0.0,
            compact_seconds: 0.0,
            draft_tokens: 0,
            draft_seconds: 0.0,
            kept: None,
        }
    }
}
