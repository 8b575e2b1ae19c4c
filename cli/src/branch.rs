//! Branching one evaluated prompt into several caches.
//!
//! Evaluating a long prompt is the expensive part of every comparison, and
//! it is the same for every method. So the prompt without its observation
//! window is evaluated once and its sequence state taken as a [`Snapshot`];
//! each method then restores the snapshot and evaluates only the window —
//! armed, so that the compressing methods observe it and compress — and
//! generates from there. `full` restores and evaluates the window without
//! compressing. Every method sees the same window and goes through the same
//! [`Compressor`], so comparisons are fair.

use std::time::Instant;

use super::metrics::{log_softmax, Agreement};
use snapkv::compress::model_shape;
use snapkv::llama::{Batch, ContextRef, Pos, SeqId, Token};
use snapkv::snapkv::{ScoreBasis, SeqState, SnapKvConfig, SELECTOR_NAMES};
use snapkv::{CompressionStats, Compressor, Context};
use snapkv::{Error, Result};

/// How a branch treats the prompt's cache.
#[derive(Debug)]
pub enum Method {
    /// No compression: the whole prompt stays in the cache.
    Full,
    /// Compression with a selection method.
    Compress(Compressor),
}

/// Every method name [`Method::by_name`] accepts: `full`, the library's
/// selectors and the methods under trial ([`crate::trial`]).
pub fn method_names() -> Vec<&'static str> {
    std::iter::once("full")
        .chain(SELECTOR_NAMES)
        .chain(crate::trial::TRIAL_NAMES)
        .collect()
}

impl Method {
    /// The method called `name` (`full`, a library selector's name or a
    /// method under trial's) with `config`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown name; [`Error::Algo`] for an
    /// invalid configuration.
    pub fn by_name(name: &str, config: SnapKvConfig) -> Result<Self> {
        if name == "full" {
            return Ok(Method::Full);
        }
        if let Some(selector) = crate::trial::trial_selector(name, None) {
            return Compressor::with_selector(config, selector).map(Method::Compress);
        }
        Compressor::with_method(config, name).map(Method::Compress)
    }

    /// The method's name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Compress(c) => c.method(),
        }
    }

    /// The observation window of this method (`default` for `full`).
    pub fn window(&self, default: usize) -> usize {
        match self {
            Method::Full => default,
            Method::Compress(c) => c.config().window,
        }
    }
}

/// Cells and K/V bytes a sequence holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqUsage {
    /// Cells of the sequence (per KV head, after compression).
    pub cells: usize,
    /// Bytes of K and V data in those cells, over all layers.
    pub kv_bytes: usize,
    /// Bytes of the serialised sequence state (K/V data plus metadata).
    pub state_bytes: usize,
}

impl SeqUsage {
    /// K/V bytes in MiB.
    pub fn kv_mib(&self) -> f64 {
        self.kv_bytes as f64 / (1024.0 * 1024.0)
    }
}

/// The cells and K/V bytes sequence `seq` holds (from its state).
///
/// # Errors
/// As [`ContextRef::state_seq_get`], or when the state is not recognised.
pub fn seq_usage(ctx: &ContextRef, seq: SeqId) -> Result<SeqUsage> {
    let blob = ctx.state_seq_get(seq)?;
    let state = SeqState::parse(&blob, &model_shape(ctx.model()))?;
    let shape = *state.shape();
    let mut per_cell = 0usize;
    for layer in 0..shape.n_layer {
        per_cell += state.k_type(layer).row_bytes(shape.n_embd_k_gqa()).unwrap_or(0);
        per_cell += state.v_type(layer).row_bytes(shape.n_embd_v_gqa()).unwrap_or(0);
    }
    Ok(SeqUsage {
        cells: state.n_cells(),
        kv_bytes: per_cell * state.n_cells(),
        state_bytes: blob.len(),
    })
}

/// A prompt evaluated up to its observation window, as a sequence state to
/// branch from.
#[derive(Debug, Clone)]
pub struct Snapshot {
    seq: SeqId,
    state: Vec<u8>,
    /// The whole prompt; its last `window` tokens are not in `state`.
    prompt: Vec<Token>,
    window: usize,
    n_prompt: usize,
    /// Seconds evaluating the prompt before the window.
    pub prefill_seconds: f64,
}

impl Snapshot {
    /// Empties sequence `seq`, evaluates `prompt[..P - window]` into it in
    /// chunks of `chunk` tokens (calling `progress` with the tokens done
    /// after each) and takes its state.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the prompt is not longer than the
    /// window; decode and state errors.
    pub fn capture(
        ctx: &mut ContextRef,
        seq: SeqId,
        prompt: &[Token],
        window: usize,
        chunk: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Self> {
        if window == 0 || prompt.len() <= window {
            return Err(Error::InvalidArgument {
                param: "prompt",
                reason: format!(
                    "a prompt of {} tokens leaves nothing before a {window}-token window",
                    prompt.len()
                ),
            });
        }
        ctx.check_seq(seq)?;
        ctx.seq_rm(seq, -1, -1);
        let split = prompt.len() - window;
        let t0 = Instant::now();
        let chunk = chunk.max(1);
        let mut done = 0;
        for part in prompt[..split].chunks(chunk) {
            ctx.decode_tokens(seq, part, done as Pos, false)?;
            done += part.len();
            progress(done);
        }
        ctx.synchronize();
        let prefill_seconds = t0.elapsed().as_secs_f64();
        let state = ctx.state_seq_get(seq)?;
        Ok(Snapshot {
            seq,
            state,
            prompt: prompt.to_vec(),
            window,
            n_prompt: prompt.len(),
            prefill_seconds,
        })
    }

    /// The sequence the snapshot was taken from (and is restored into).
    pub fn seq(&self) -> SeqId {
        self.seq
    }

    /// Tokens of the whole prompt, window included: the position where
    /// generation continues.
    pub fn n_prompt(&self) -> usize {
        self.n_prompt
    }

    /// The window tokens.
    pub fn window(&self) -> &[Token] {
        &self.prompt[self.prompt.len() - self.window..]
    }

    /// Bytes of the stored state.
    pub fn state_bytes(&self) -> usize {
        self.state.len()
    }

    /// Puts the snapshot back into its sequence (whatever it held is
    /// removed first).
    ///
    /// # Errors
    /// As [`ContextRef::state_seq_set`].
    pub fn restore(&self, ctx: &mut ContextRef) -> Result<()> {
        ctx.seq_rm(self.seq, -1, -1);
        ctx.state_seq_set(self.seq, &self.state)
    }
}

/// What one branch did.
#[derive(Debug, Clone)]
pub struct Branch {
    /// The method's name.
    pub method: &'static str,
    /// The compression's statistics (`None` for `full`).
    pub stats: Option<CompressionStats>,
    /// Seconds restoring the snapshot.
    pub restore_seconds: f64,
    /// Seconds evaluating the window, compression included.
    pub window_seconds: f64,
    /// Cells and bytes the sequence holds afterwards.
    pub usage: SeqUsage,
}

/// Restores `snapshot` and evaluates its window with `method`: `full`
/// decodes it, a compressor evaluates it armed and compresses. Afterwards
/// the logits of the prompt's last token are available
/// (`logits_ith(-1)`) and generation continues at
/// [`Snapshot::n_prompt`].
///
/// # Errors
/// [`Error::InvalidArgument`] when the method's window differs from the
/// snapshot's; restore, decode and compression errors.
pub fn branch(ctx: &mut Context<'_>, snapshot: &Snapshot, method: &Method) -> Result<Branch> {
    branch_after_answer_start(ctx, snapshot, method, &[], |_| {})
}

/// [`branch`], compressing only after the first tokens of the answer.
///
/// Restores `snapshot`, evaluates its window and then `answer_start` (the
/// answer's first tokens, one at a time as generation would) on the full
/// cache, and compresses after the last of them: the observation window is
/// then the last `window` tokens of prompt and answer together, so the
/// queries of the answer's first tokens vote for what the rest of it needs.
/// The answer's first tokens are the full cache's own (compression comes
/// after them). `on_logits` receives the logits after the window and after
/// each token of `answer_start` but the last; the logits after the last
/// are left for the caller (`logits_ith(-1)`), and generation continues at
/// [`Snapshot::n_prompt`] `+ answer_start.len()`. An empty `answer_start`
/// is [`branch`] (the logits after the window are left, not passed).
///
/// # Errors
/// As [`branch`]; [`Error::InvalidArgument`] when `answer_start` does not
/// fit in the window (it must leave at least one prompt token in it).
pub fn branch_after_answer_start(
    ctx: &mut Context<'_>,
    snapshot: &Snapshot,
    method: &Method,
    answer_start: &[Token],
    mut on_logits: impl FnMut(&[f32]),
) -> Result<Branch> {
    let w = snapshot.window;
    if method.window(w) != w {
        return Err(Error::InvalidArgument {
            param: "method",
            reason: format!(
                "{} uses a {}-token window, the snapshot was taken for {w}",
                method.name(),
                method.window(w)
            ),
        });
    }
    if answer_start.len() >= w {
        return Err(Error::InvalidArgument {
            param: "answer_start",
            reason: format!(
                "{} answer tokens before compressing need a window of more than {} tokens, not {w}",
                answer_start.len(),
                answer_start.len()
            ),
        });
    }
    let seq = snapshot.seq;
    let t0 = Instant::now();
    snapshot.restore(ctx)?;
    let restore_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    // The window, then the answer's first tokens one at a time.
    let mut decode_all = |ctx: &mut Context<'_>| -> Result<()> {
        let pos = (snapshot.n_prompt - w) as Pos;
        ctx.decode_tokens(seq, snapshot.window(), pos, true)?;
        for (i, &token) in answer_start.iter().enumerate() {
            on_logits(last_logits(ctx)?);
            ctx.decode_tokens(seq, &[token], (snapshot.n_prompt + i) as Pos, true)?;
        }
        Ok(())
    };
    let stats = match method {
        Method::Full => {
            decode_all(ctx)?;
            None
        }
        // Right after the prompt: the prefill path observes the window as it
        // evaluates it.
        // Reconstruction repeats the whole prompt, which the prefill path is
        // not given (the snapshot holds the rest): the window is decoded, and
        // the hook for an evaluated sequence gets every token.
        Method::Compress(c) if answer_start.is_empty() && c.score_basis() == Some(ScoreBasis::Reconstruction) => {
            decode_all(ctx)?;
            Some(c.compress_after_prefill(ctx, seq, &snapshot.prompt)?)
        }
        Method::Compress(c) if answer_start.is_empty() => Some(c.prefill(ctx, seq, snapshot.window())?),
        Method::Compress(c) => {
            c.observe_decodes(ctx)?;
            if let Err(err) = decode_all(ctx) {
                // Disarm: a capture cut short by a failed decode is of no use.
                if let Some(observer) = ctx.observer() {
                    observer.cancel();
                }
                return Err(err);
            }
            Some(c.compress_observed(ctx, seq)?)
        }
    };
    ctx.synchronize();
    let window_seconds = t1.elapsed().as_secs_f64();
    let usage = seq_usage(ctx, seq)?;
    Ok(Branch {
        method: method.name(),
        stats,
        restore_seconds,
        window_seconds,
        usage,
    })
}

/// The logits of the last decode's last token.
fn last_logits(ctx: &ContextRef) -> Result<&[f32]> {
    ctx.logits_ith(-1).ok_or_else(|| Error::InvalidArgument {
        param: "logits",
        reason: "the last decode left no logits for its last token".into(),
    })
}

/// Feeds `tokens` to sequence `seq` at positions `start..` in batches of at
/// most `n_batch` with logits for every token, calling `on_logits(i, row)`
/// with the logits after token `i`.
///
/// # Errors
/// Decode errors.
pub fn teacher_force(
    ctx: &mut ContextRef,
    seq: SeqId,
    start: Pos,
    tokens: &[Token],
    mut on_logits: impl FnMut(usize, &[f32]),
) -> Result<()> {
    let chunk = ctx.n_batch().clamp(1, 512);
    let mut batch = Batch::new(chunk.min(tokens.len().max(1)), 1)?;
    let mut done = 0;
    for part in tokens.chunks(chunk) {
        batch.clear();
        for (k, &t) in part.iter().enumerate() {
            batch.add(t, start + (done + k) as Pos, &[seq], true)?;
        }
        ctx.decode(&batch)?;
        for k in 0..part.len() {
            let row = ctx.logits_ith(k as i32).ok_or_else(|| Error::InvalidArgument {
                param: "logits",
                reason: format!("no logits for batch output {k}"),
            })?;
            on_logits(done + k, row);
        }
        done += part.len();
    }
    Ok(())
}

/// Next-token log-probabilities along `continuation` for sequence `seq`,
/// whose last decode ended with the prompt's last token: the first row from
/// that decode's logits, then one row after each token of `continuation`
/// but the last, which are teacher-forced at positions `start..` (and stay
/// in the cache). Row `i` is the distribution `continuation[i]` was drawn
/// from.
///
/// # Errors
/// [`Error::InvalidArgument`] when the last decode left no logits for its
/// last token; decode errors.
pub fn continuation_distributions(
    ctx: &mut ContextRef,
    seq: SeqId,
    start: Pos,
    continuation: &[Token],
) -> Result<Vec<Vec<f32>>> {
    let first = ctx.logits_ith(-1).ok_or_else(|| Error::InvalidArgument {
        param: "logits",
        reason: "the last decode left no logits for its last token".into(),
    })?;
    let mut rows = vec![log_softmax(first)];
    forced_distributions(ctx, seq, start, continuation, &mut rows)?;
    Ok(rows)
}

/// Appends to `rows` the next-token log-probabilities after each token of
/// `continuation` but the last, teacher-forced at positions `start..`.
///
/// # Errors
/// Decode errors.
pub fn forced_distributions(
    ctx: &mut ContextRef,
    seq: SeqId,
    start: Pos,
    continuation: &[Token],
    rows: &mut Vec<Vec<f32>>,
) -> Result<()> {
    if let Some((_, forced)) = continuation.split_last() {
        if !forced.is_empty() {
            teacher_force(ctx, seq, start, forced, |_, row| rows.push(log_softmax(row)))?;
        }
    }
    Ok(())
}

/// Compares two sets of rows from [`continuation_distributions`]
/// position by position (as many positions as the shorter has).
pub fn agreement(reference: &[Vec<f32>], candidate: &[Vec<f32>]) -> Agreement {
    let mut agr = Agreement::default();
    for (r, c) in reference.iter().zip(candidate) {
        agr.add(r, c);
    }
    agr
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapkv::{init_backend, Budget, ContextParams, FlashAttention, Model, ModelParams, WindowObserver};
    use snapkv_testing::{tiny_model_path, TinyModelSpec};

    fn run(fa: FlashAttention) {
        let path = tiny_model_path(&TinyModelSpec::default()).unwrap();
        let model = Model::load(init_backend(), &path, &ModelParams::default()).unwrap();
        let mut tokens = model
            .tokenize(&"the river flows to the sea and time passes ".repeat(40), true, false)
            .unwrap();
        tokens.truncate(300);
        let p = tokens.len();
        let params = ContextParams::default()
            .with_n_ctx(512)
            .with_threads(2)
            .with_flash_attn(fa)
            .with_observer(WindowObserver::new());
        let mut ctx = Context::new(&model, &params).unwrap();
        let mut seen = Vec::new();
        let snap = Snapshot::capture(&mut ctx, 0, &tokens, 32, 100, |d| seen.push(d)).unwrap();
        assert_eq!(seen, vec![100, 200, 268]);
        assert_eq!((snap.n_prompt(), snap.window()), (p, &tokens[p - 32..]));

        let mut config = SnapKvConfig::default();
        config.budget = Budget::Cells(96);
        let snapkv = Method::by_name("snapkv", config.clone()).unwrap();
        let streaming = Method::by_name("streaming", config).unwrap();
        assert!(Method::by_name("nonsense", SnapKvConfig::default()).is_err());

        let logits = |ctx: &Context<'_>| ctx.logits_ith(-1).unwrap().to_vec();
        let full = branch(&mut ctx, &snap, &Method::Full).unwrap();
        let l_full = logits(&ctx);
        assert_eq!((full.method, full.usage.cells), ("full", p));
        assert!(full.stats.is_none());

        let a = branch(&mut ctx, &snap, &snapkv).unwrap();
        let l_a = logits(&ctx);
        assert_eq!((a.method, a.usage.cells), ("snapkv", 96));
        assert!(a.stats.as_ref().unwrap().compressed);
        assert_eq!(a.usage.kv_bytes * p, full.usage.kv_bytes * 96);
        assert_eq!(ctx.seq_pos_max(0), Some(p as Pos - 1));

        // Every branch starts from the same state: repeating one gives the
        // same logits bit for bit, whatever ran in between.
        branch(&mut ctx, &snap, &streaming).unwrap();
        branch(&mut ctx, &snap, &snapkv).unwrap();
        assert_eq!(logits(&ctx), l_a);
        branch(&mut ctx, &snap, &Method::Full).unwrap();
        assert_eq!(logits(&ctx), l_full);

        // The full branch predicts what evaluating the whole prompt at once
        // predicts.
        ctx.seq_rm(0, -1, -1);
        ctx.decode_tokens(0, &tokens, 0, true).unwrap();
        let direct = logits(&ctx);
        let diff = direct
            .iter()
            .zip(&l_full)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-2, "full branch differs from a direct evaluation by {diff}");

        // Teacher forcing gives one row of logits per token, the last equal
        // to what a plain decode of the same tokens leaves.
        branch(&mut ctx, &snap, &snapkv).unwrap();
        let forced = [tokens[5], tokens[6], tokens[7]];
        let mut rows = Vec::new();
        teacher_force(&mut ctx, 0, p as Pos, &forced, |i, row| rows.push((i, row.to_vec()))).unwrap();
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(seq_usage(&ctx, 0).unwrap().cells, 96 + 3);

        // Continuation distributions: one row per continuation token; the
        // same cache twice agrees exactly, and each row is the log-softmax
        // of what a plain decode leaves there (up to batch-size rounding).
        branch(&mut ctx, &snap, &Method::Full).unwrap();
        let reference = continuation_distributions(&mut ctx, 0, p as Pos, &forced).unwrap();
        assert_eq!(reference.len(), forced.len());
        assert_eq!(reference[0], log_softmax(&l_full));
        branch(&mut ctx, &snap, &Method::Full).unwrap();
        let again = continuation_distributions(&mut ctx, 0, p as Pos, &forced).unwrap();
        let same = agreement(&reference, &again);
        assert_eq!((same.kl, same.top1_same), (vec![0.0; 3], 3));
        branch(&mut ctx, &snap, &Method::Full).unwrap();
        ctx.decode_tokens(0, &forced[..2], p as Pos, true).unwrap();
        let plain = log_softmax(&logits(&ctx));
        let diff = plain
            .iter()
            .zip(&reference[2])
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(diff < 1e-3, "forced row differs from a plain decode by {diff}");
        // An evicting cache is measured against it: a positive KL.
        branch(&mut ctx, &snap, &streaming).unwrap();
        let evicted = agreement(
            &reference,
            &continuation_distributions(&mut ctx, 0, p as Pos, &forced).unwrap(),
        );
        assert_eq!(evicted.n(), 3);
        assert!(evicted.mean_kl() > 0.0, "streaming matched the full cache exactly");
        // A continuation of one token forces nothing.
        branch(&mut ctx, &snap, &Method::Full).unwrap();
        assert_eq!(
            continuation_distributions(&mut ctx, 0, p as Pos, &forced[..1])
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn compressing_after_the_answer_start_keeps_it_in_the_window() {
        let path = tiny_model_path(&TinyModelSpec::default()).unwrap();
        let model = Model::load(init_backend(), &path, &ModelParams::default()).unwrap();
        let mut tokens = model
            .tokenize(&"a quiet harbour town keeps its boats ".repeat(40), true, false)
            .unwrap();
        tokens.truncate(260);
        let p = tokens.len();
        let params = ContextParams::default()
            .with_n_ctx(512)
            .with_threads(2)
            .with_observer(WindowObserver::new());
        let mut ctx = Context::new(&model, &params).unwrap();
        let snap = Snapshot::capture(&mut ctx, 0, &tokens, 32, 128, |_| {}).unwrap();
        let mut config = SnapKvConfig::default();
        config.budget = Budget::Cells(80);
        let snapkv = Method::by_name("snapkv", config).unwrap();
        let start = [tokens[3], tokens[4], tokens[5]];

        let mut full_rows = Vec::new();
        let full =
            branch_after_answer_start(&mut ctx, &snap, &Method::Full, &start, |r| full_rows.push(r.to_vec())).unwrap();
        assert_eq!((full.usage.cells, full_rows.len()), (p + 3, 3));
        // The full branch's rows are what a plain decode of the same tokens gives.
        branch(&mut ctx, &snap, &Method::Full).unwrap();
        assert_eq!(ctx.logits_ith(-1).unwrap(), &full_rows[0][..]);

        let mut rows = Vec::new();
        let b = branch_after_answer_start(&mut ctx, &snap, &snapkv, &start, |r| rows.push(r.to_vec())).unwrap();
        let stats = b.stats.unwrap();
        assert!(stats.compressed);
        // The answer's first tokens were evaluated and compressed with the
        // prompt: the sequence ends with them, in the budget.
        assert_eq!((b.usage.cells, stats.cells_before), (80, p + 3));
        assert_eq!(ctx.seq_pos_max(0), Some((p + 2) as Pos));
        // Before compressing, the cache was the full one.
        assert_eq!(rows.len(), 3);
        for (a, f) in rows.iter().zip(&full_rows) {
            let diff = a.iter().zip(f).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff < 1e-3, "observed decode differs from the full cache's by {diff}");
        }
        // The window (kept whole) is the last 32 positions, the answer's
        // three included: every head chose its other 48 cells before it.
        let kept = stats.kept.unwrap();
        assert_eq!(kept.n_keep, 80 - 32);
        let window_start = (p + 3 - 32) as i32;
        for layer in 0..kept.n_layer {
            for head in 0..kept.n_head_kv {
                assert!(kept.row(layer, head).iter().all(|&pos| pos < window_start));
            }
        }

        // No answer tokens: the plain branch.
        let mut none = 0;
        let plain = branch_after_answer_start(&mut ctx, &snap, &snapkv, &[], |_| none += 1).unwrap();
        let l_plain = ctx.logits_ith(-1).unwrap().to_vec();
        branch(&mut ctx, &snap, &snapkv).unwrap();
        assert_eq!(
            (none, plain.usage.cells, ctx.logits_ith(-1).unwrap()),
            (0, 80, &l_plain[..])
        );

        // An answer start that fills the window is refused before anything changes.
        let long = vec![tokens[3]; 32];
        let before = ctx.state_seq_get(0).unwrap();
        let err = branch_after_answer_start(&mut ctx, &snap, &snapkv, &long, |_| {}).unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");
        assert_eq!(ctx.state_seq_get(0).unwrap(), before);
    }

    #[test]
    fn branches_restore_the_snapshot_and_compress_to_the_budget_fa_on() {
        run(FlashAttention::On);
    }

    #[test]
    fn branches_restore_the_snapshot_and_compress_to_the_budget_fa_off() {
        run(FlashAttention::Off);
    }

    #[test]
    fn every_method_name_resolves() {
        for name in method_names() {
            let m = Method::by_name(name, SnapKvConfig::default()).unwrap();
            assert_eq!(m.name(), name);
        }
    }
}
