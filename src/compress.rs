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
//! - `seq_rm` over a range of compressed positions removes composite cells
//!   (parts of several tokens); removing from the window onwards is exact.
//! - Shifting (`seq_add`) works: K rows are re-rotated by the same delta.
//! - Prefix reuse by token comparison is not valid for the compressed part.
//! - Models whose attention depends on cell positions (ALiBi) are refused.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::llama::observer::{Capture, CaptureRequest};
use crate::llama::{dequantize_row, CacheType, ContextRef, ModelRef, Pos, Sampler, SeqId, Token, WindowObserver};
use crate::snapkv::{
    gather_keys, hadamard, pool_and_aggregate, position_order, rewrite, selector_by_name, value_norms,
    weight_votes_by_value_norms, CellOrder, HeadScores, KeptPositions, ModelShape, QueryAggregation, QueryScorer,
    Selection, SelectionShape, Selector, SeqState, SnapKvConfig, SnapKvSelector, ValueWeighting, Votes,
};

/// Model architectures whose graph naming (`Qcur-<il>` after RoPE,
/// `kq_soft_max-<il>`) and attention scale snapkv has verified.
pub const VERIFIED_ARCHS: &[&str] = &["llama", "qwen2", "qwen3"];

/// Where the attention scores came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreSource {
    /// The model's own softmax (flash attention off).
    Softmax,
    /// Captured window queries against the cached keys (flash attention on).
    QueryKey,
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
    /// `snapkv-shared-all`, `streaming`, `random`.
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
    /// Invalid arguments, unsupported models, decode failures. If the
    /// compression step fails, the sequence holds the full evaluated prompt.
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
        if tokens.is_empty() {
            return Err(Error::InvalidArgument {
                param: "tokens",
                reason: "empty prompt".into(),
            });
        }
        let start = ctx.seq_pos_max(seq).map_or(0, |p| p + 1);
        let cells_total = start as usize + tokens.len();
        let w = self.config.window;
        let Some(budget) = self.config.cells_to_keep(cells_total)? else {
            let t0 = Instant::now();
            ctx.decode_tokens(seq, tokens, start, true)?;
            return Ok(self.noop_stats(cells_total, t0.elapsed().as_secs_f64()));
        };
        check_supported(ctx.model())?;
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
        // The last micro-batch holds the window; it is evaluated on its own
        // (armed) so that it is exactly one micro-batch.
        let split = tokens.len() - tokens.len().min(ctx.n_ubatch());
        let t0 = Instant::now();
        if split > 0 {
            ctx.decode_tokens(seq, &tokens[..split], start, false)?;
        }
        let prefill_seconds = t0.elapsed().as_secs_f64();
        let (capture, window_seconds) =
            self.observe_window(ctx, observer, seq, &tokens[split..], start + split as Pos, w)?;
        let draft = Drafting {
            observer,
            last_token: tokens[tokens.len() - 1],
        };
        let mut stats = self.compress_captured(ctx, seq, &capture, Some(budget), Some(draft), None)?;
        stats.prefill_seconds = prefill_seconds;
        stats.window_seconds = window_seconds;
        Ok(stats)
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
    /// # Errors
    /// Invalid arguments, an empty sequence, unsupported models. On any
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
        let w = self.config.window;
        if window_tokens.len() < w {
            return Err(Error::InvalidArgument {
                param: "window_tokens",
                reason: format!("need the last {w} tokens of the sequence, got {}", window_tokens.len()),
            });
        }
        let window = &window_tokens[window_tokens.len() - w..];
        let last = ctx.seq_pos_max(seq).ok_or(Error::EmptySequence { seq })?;
        // The snapshot restores the sequence on failure (the window is
        // removed before it is evaluated again); the host pays for it, so it
        // counts as compaction.
        let t_snapshot = Instant::now();
        let snapshot = ctx.state_seq_get(seq)?;
        let cells = SeqState::parse(&snapshot, &model_shape(ctx.model()))?.n_cells();
        let snapshot_seconds = t_snapshot.elapsed().as_secs_f64();
        let Some(budget) = self.config.cells_to_keep(cells)? else {
            let mut stats = self.noop_stats(cells, 0.0);
            stats.compact_seconds = snapshot_seconds;
            return Ok(stats);
        };
        check_supported(ctx.model())?;
        check_window_fits(ctx, w)?;
        let first = last + 1 - w as Pos;
        if first < 0 {
            return Err(Error::InvalidArgument {
                param: "window_tokens",
                reason: "the sequence is shorter than the window".into(),
            });
        }
        let result = (|| {
            if !ctx.seq_rm(seq, first, -1) {
                return Err(Error::State {
                    op: "set",
                    reason: "llama.cpp could not remove the window for re-evaluation".into(),
                });
            }
            let (capture, window_seconds) = self.observe_window(ctx, observer, seq, window, first, w)?;
            let draft = Drafting {
                observer,
                last_token: window[w - 1],
            };
            // The snapshot holds the same positions and, outside the window,
            // the same K/V as the sequence now; the window's cells keep the
            // K/V the host computed. Softmax columns index the cache's
            // cells as they are after the re-evaluation, which may differ
            // from the snapshot's order: that source reads the state again.
            let current = capture.softmax.iter().all(Option::is_none).then_some(&snapshot[..]);
            let mut stats = self.compress_captured(ctx, seq, &capture, Some(budget), Some(draft), current)?;
            stats.window_seconds = window_seconds;
            stats.compact_seconds += snapshot_seconds;
            Ok(stats)
        })();
        result.or_else(|err| {
            restore(ctx, seq, &snapshot, &err)?;
            Err(err)
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
    /// [`Error::Algo`] for an invalid configuration.
    pub fn observe_decodes(&self, ctx: &crate::Context<'_>) -> Result<()> {
        let observer = ctx.observer().ok_or(Error::ObserverMissing)?;
        self.observe_decodes_with(ctx, observer)
    }

    /// [`observe_decodes`](Self::observe_decodes) with an explicit observer.
    ///
    /// # Errors
    /// [`Error::Algo`] for an invalid configuration.
    pub fn observe_decodes_with(&self, ctx: &ContextRef, observer: &WindowObserver) -> Result<()> {
        self.config.validate()?;
        let model = ctx.model();
        observer.arm(CaptureRequest {
            n_layer: model.n_layer(),
            n_head: model.n_head(),
            head_dim: model.head_dim(),
            n_tokens: None,
            keep: self.config.window,
        });
        Ok(())
    }

    /// The hook after [`observe_decodes`](Self::observe_decodes): disarms
    /// the observer and compresses sequence `seq` from the window rows the
    /// caller's decodes recorded. Nothing is re-evaluated; the logits of the
    /// last token stay as the caller's decode left them.
    ///
    /// The last `window` tokens decoded while armed must be the last
    /// `window` tokens of `seq` (their positions are checked; decode only
    /// `seq` while armed).
    ///
    /// # Errors
    /// [`Error::ObserverMissing`] when no decode reached the observer (it is
    /// not this context's callback, or nothing was decoded);
    /// [`Error::InvalidArgument`] when fewer than `window` tokens were
    /// decoded while armed or their positions are not the end of `seq`;
    /// [`Error::EmptySequence`], [`Error::Unsupported`], capture and state
    /// errors. On any error the sequence is exactly as it was.
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
        ctx.check_seq(seq)?;
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
        let expected: Vec<Pos> = (last + 1 - w as Pos..=last).collect();
        if capture.positions != expected {
            let got = match (capture.positions.first(), capture.positions.last()) {
                (Some(a), Some(b)) => format!("{} tokens at positions {a}..={b}", capture.positions.len()),
                _ => "no tokens".into(),
            };
            return Err(Error::InvalidArgument {
                param: "seq",
                reason: format!(
                    "the decodes observed ended with {got}, but the window is the {w} tokens at positions {}..={last} \
                     of sequence {seq}: decode the prompt (only this sequence) after observe_decodes and compress \
                     before decoding anything else",
                    last + 1 - w as Pos
                ),
            });
        }
        // The budget follows from the cells the state holds, which
        // compress_captured reads anyway.
        self.compress_captured(ctx, seq, &capture, None, None, None)
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

    /// Evaluates `batch` (at most one micro-batch, ending with the window of
    /// `window` tokens) with the observer armed to capture the window's
    /// rows; returns the capture and the seconds it took.
    fn observe_window(
        &self,
        ctx: &mut ContextRef,
        observer: &WindowObserver,
        seq: SeqId,
        batch: &[Token],
        start: Pos,
        window: usize,
    ) -> Result<(Capture, f64)> {
        debug_assert!(window <= batch.len() && batch.len() <= ctx.n_ubatch());
        let model = ctx.model();
        let before = observer.activity();
        observer.arm(CaptureRequest {
            n_layer: model.n_layer(),
            n_head: model.n_head(),
            head_dim: model.head_dim(),
            n_tokens: Some(batch.len()),
            keep: window,
        });
        let t0 = Instant::now();
        let decoded = ctx.decode_tokens(seq, batch, start, true);
        ctx.synchronize();
        let capture = observer.disarm();
        decoded?;
        if observer.activity().missed_window_since(before) {
            // No graph callback reached the observer: it is not this
            // context's cb_eval.
            return Err(Error::ObserverMissing);
        }
        Ok((capture, t0.elapsed().as_secs_f64()))
    }

    /// Scores, selects and compacts sequence `seq` from a window capture.
    /// `budget`: cells to keep, or `None` to derive it from the cells the
    /// sequence holds (then a sequence that fits is left alone and the model
    /// is checked only when there is something to compress). `snapshot`:
    /// the sequence's state if the caller already read it (the positions
    /// and, outside the window, the K/V it holds now), compacted instead of
    /// reading the state again; on failure the sequence is restored from it.
    fn compress_captured(
        &self,
        ctx: &mut ContextRef,
        seq: SeqId,
        capture: &Capture,
        budget: Option<usize>,
        draft: Option<Drafting<'_>>,
        snapshot: Option<&[u8]>,
    ) -> Result<CompressionStats> {
        if let Some(e) = &capture.error {
            return Err(Error::Capture(e.clone()));
        }
        let model = ctx.model();
        let shape = model_shape(model);
        let w = self.config.window;
        let t_compact = Instant::now();
        let read;
        let blob = match snapshot {
            Some(blob) => blob,
            None => {
                read = ctx.state_seq_get(seq)?;
                &read[..]
            }
        };
        let state = SeqState::parse(blob, &shape)?;
        let derived = budget.is_none();
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
        if derived {
            // The other callers checked before evaluating anything.
            check_supported(model)?;
        }
        let order = position_order(state.positions(), w)?;
        let mut compact_seconds = t_compact.elapsed().as_secs_f64();
        let n_keep = budget - w;

        let t_score = Instant::now();
        let (scores, mut source) = if self.selector.needs_scores() {
            let (votes, source) = compute_votes(model, capture, &state, &order, w, self.config.queries)?;
            (Some(self.scores_from_votes(&state, &order, votes)?), source)
        } else {
            (None, ScoreSource::None)
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
        if let Err(err) = ctx.state_seq_set(seq, &new_blob) {
            restore(ctx, seq, blob, &err)?;
            return Err(err);
        }
        compact_seconds += t_rewrite.elapsed().as_secs_f64();

        let mut draft_tokens = 0;
        let mut draft_seconds = 0.0;
        if let Some(draft) = draft.filter(|_| self.config.draft > 0 && scores.is_some()) {
            let redrafted = self.redraft(ctx, seq, capture, &state, &order, &sel_shape, n_keep, draft);
            match redrafted {
                Ok(Some(r)) => {
                    source = ScoreSource::QueryKey;
                    selection = r.selection;
                    new_blob = r.blob;
                    draft_tokens = r.tokens;
                    draft_seconds = r.draft_seconds;
                    score_seconds += r.score_seconds;
                    select_seconds += r.select_seconds;
                    compact_seconds += r.compact_seconds;
                }
                Ok(None) => {}
                Err(err) => {
                    restore(ctx, seq, blob, &err)?;
                    return Err(err);
                }
            }
        }
        let prefix_positions: Vec<i32> = order.by_position[..order.prefix_len]
            .iter()
            .map(|&cell| state.positions()[cell])
            .collect();
        let kept = KeptPositions::new(&selection, &prefix_positions)?;
        let cells_before = state.n_cells();
        Ok(CompressionStats {
            compressed: true,
            method: self.selector.name(),
            score_source: source,
            cells_before,
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
    fn scores_from_votes(&self, state: &SeqState<'_>, order: &CellOrder, mut votes: Votes) -> Result<HeadScores> {
        if self.config.value_weighting == ValueWeighting::Norm {
            weight_by_value_norms(state, order, &mut votes)?;
        }
        Ok(pool_and_aggregate(
            &votes,
            state.shape().n_head_kv,
            self.config.kernel,
            self.config.pooling,
            self.config.pool_align,
            self.config.gqa,
        )?)
    }

    /// The draft's second selection, on a sequence already compacted from
    /// `state` (the full prompt) by the window's selection: greedily decodes
    /// up to [`SnapKvConfig::draft`] tokens of the answer on the compacted
    /// cache with the observer recording their queries, selects again from
    /// `state` with the window's and the draft's queries voting together,
    /// writes that selection in place of the first (the draft's cells go
    /// with it) and decodes the prompt's last token again over it, so that
    /// the logits left are the prompt's. `None` when the first drafted token
    /// ends the answer (nothing was decoded; the first selection stands).
    #[allow(clippy::too_many_arguments)]
    fn redraft(
        &self,
        ctx: &mut ContextRef,
        seq: SeqId,
        capture: &Capture,
        state: &SeqState<'_>,
        order: &CellOrder,
        sel_shape: &SelectionShape,
        n_keep: usize,
        draft: Drafting<'_>,
    ) -> Result<Option<Redraft>> {
        let last = ctx.seq_pos_max(seq).ok_or(Error::EmptySequence { seq })?;
        let t_draft = Instant::now();
        if ctx.logits_ith(-1).is_none() {
            return Err(Error::InvalidArgument {
                param: "logits",
                reason: "the prompt's last decode left no logits to draft from".into(),
            });
        }
        let mut greedy = Sampler::greedy();
        let first = greedy.sample(ctx, -1);
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
        let before = draft.observer.activity();
        let model = ctx.model();
        draft.observer.arm(CaptureRequest {
            n_layer: model.n_layer(),
            n_head: model.n_head(),
            head_dim: model.head_dim(),
            n_tokens: None,
            keep: self.config.draft,
        });
        let mut tokens = 0;
        let decoded = (|| -> Result<()> {
            let mut token = first;
            loop {
                ctx.decode_tokens(seq, &[token], last + 1 + tokens as Pos, true)?;
                tokens += 1;
                if tokens == self.config.draft {
                    return Ok(());
                }
                token = greedy.sample(ctx, -1);
                if ctx.model().is_eog(token) {
                    return Ok(());
                }
            }
        })();
        let drafted = draft.observer.disarm();
        decoded?;
        if draft.observer.activity().missed_window_since(before) {
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
        query_key_votes(model, &queries, state, order, self.config.window, &mut votes)?;
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
        ctx.decode_tokens(seq, &[draft.last_token], last, true)?;
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

/// What a draft needs beyond the window's capture: the observer that records
/// the draft's queries, and the prompt's last token, decoded again at the
/// end.
#[derive(Clone, Copy)]
struct Drafting<'a> {
    observer: &'a WindowObserver,
    last_token: Token,
}

/// The outcome of [`Compressor::redraft`].
struct Redraft {
    selection: Selection,
    blob: Vec<u8>,
    tokens: usize,
    draft_seconds: f64,
    score_seconds: f64,
    select_seconds: f64,
    compact_seconds: f64,
}

/// Puts a sequence back as it was after a failed step.
fn restore(ctx: &mut ContextRef, seq: SeqId, snapshot: &[u8], cause: &Error) -> Result<()> {
    ctx.state_seq_set(seq, snapshot).map_err(|e| Error::RestoreFailed {
        cause: cause.to_string(),
        restore: e.to_string(),
    })
}

/// The model's shape as the algorithm layer (state parsing) needs it.
pub fn model_shape(model: &ModelRef) -> ModelShape {
    ModelShape {
        n_layer: model.n_layer(),
        n_head: model.n_head(),
        n_head_kv: model.n_head_kv(),
        head_dim_k: model.head_dim(),
        head_dim_v: model.head_dim_v(),
    }
}

/// Refuses models on which per-head eviction is unsound or unverified.
pub(crate) fn check_supported(model: &ModelRef) -> Result<()> {
    let arch = model.arch();
    let refuse = |why: String| Err(Error::Unsupported(format!("{arch}: {why}")));
    if model.is_recurrent() || model.is_hybrid() {
        return refuse("recurrent and hybrid models keep state that is not a KV cache".into());
    }
    if model.n_swa() > 0 {
        return refuse("sliding-window layers keep a second cache that per-head eviction does not cover".into());
    }
    if model
        .meta_f32(&format!("{arch}.attention.max_alibi_bias"))
        .unwrap_or(0.0)
        > 0.0
    {
        return refuse("ALiBi attention depends on cell positions, which compression makes nominal".into());
    }
    if model.meta_f32(&format!("{arch}.attn_logit_softcapping")).unwrap_or(0.0) > 0.0 {
        return refuse("attention logit soft-capping is not modelled by the scorer".into());
    }
    if model.n_head_kv() == 0 || model.n_head() % model.n_head_kv() != 0 {
        return refuse("query heads are not a multiple of KV heads".into());
    }
    if !VERIFIED_ARCHS.contains(&arch.as_str()) {
        return refuse(format!(
            "architecture not verified for per-head compression (verified: {})",
            VERIFIED_ARCHS.join(", ")
        ));
    }
    Ok(())
}

fn check_window_fits(ctx: &ContextRef, w: usize) -> Result<()> {
    if w > ctx.n_ubatch() {
        return Err(Error::InvalidArgument {
            param: "window",
            reason: format!(
                "the window ({w}) must fit one micro-batch (n_ubatch = {})",
                ctx.n_ubatch()
            ),
        });
    }
    Ok(())
}

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
fn compute_votes(
    model: &ModelRef,
    capture: &Capture,
    state: &SeqState<'_>,
    order: &CellOrder,
    w: usize,
    queries: QueryAggregation,
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
    query_key_votes(model, &capture.queries, state, order, w, &mut votes)?;
    Ok((votes, ScoreSource::QueryKey))
}

/// Scales every layer's votes by the norms of the cached value vectors
/// ([`ValueWeighting::Norm`]).
fn weight_by_value_norms(state: &SeqState<'_>, order: &CellOrder, votes: &mut Votes) -> Result<()> {
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
fn query_key_votes(
    model: &ModelRef,
    layer_queries: &[Option<Vec<f32>>],
    state: &SeqState<'_>,
    order: &CellOrder,
    w: usize,
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
        let queries = match k_rotation(state.k_type(layer), head_dim) {
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

/// The Hadamard block llama.cpp rotates quantized keys with, if it does
/// (quantized K, head size a multiple of 64, not disabled by
/// `LLAMA_ATTN_ROT_DISABLE`).
fn k_rotation(k_type: CacheType, head_dim: usize) -> Option<usize> {
    let disabled = std::env::var("LLAMA_ATTN_ROT_DISABLE")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
        .is_some_and(|v| v != 0);
    if disabled || !k_type.is_quantized() {
        return None;
    }
    hadamard::rotation_block(head_dim)
}

#[cfg(test)]
mod tests {
    //! Scores and selections against a naive f64 implementation of
    //! DESIGN.md section 1, on data captured from the tiny model.

    use std::sync::OnceLock;

    use half::f16;

    use super::*;
    use crate::llama::{Context, ContextParams, FlashAttention, Model, ModelParams};
    use crate::snapkv::{GqaAggregation, PoolAlign, Pooling};
    use crate::testing::{tiny_model_path, TinyModelSpec};

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

        let (votes, source) = compute_votes(model, &capture, &state, &order, w, QueryAggregation::Sum).unwrap();
        let naive_votes = if fa == FlashAttention::Off {
            assert_eq!(source, ScoreSource::Softmax);
            naive_votes_softmax(model, &capture, p, w)
        } else {
            assert_eq!(source, ScoreSource::QueryKey);
            naive_votes_qk(model, &capture, &state, w)
        };
        let scores = pool_and_aggregate(
            &votes,
            model.n_head_kv(),
            7,
            Pooling::Max,
            PoolAlign::Centered,
            GqaAggregation::Mean,
        )
        .unwrap();
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
}
