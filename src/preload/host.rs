//! The interposer's engine: one record per host context, the decisions
//! taken around each host call, and the compressions.
//!
//! A prompt has ended when a batch evaluated several tokens of a sequence,
//! only the last asking for logits, and the next batch gives that sequence
//! one token at the next position (the first generated token). Programs
//! that evaluate a long prompt in chunks ask for the logits of each chunk's
//! last token (llama-completion does), so the batch alone cannot tell.
//!
//! Around `llama_process(ctx, DECODE, batch)` and `llama_decode(ctx,
//! batch)`:
//! 1. a batch that may end a prompt — the sequence's tokens are the
//!    batch's last, at least a window of them — is forwarded with the
//!    observer armed, and the rows it recorded are kept;
//! 2. before the next batch is forwarded, a sequence whose prompt has
//!    ended (above) is compressed: from the kept rows (the observed-decode
//!    hook: no token evaluated twice), or, when the prompt's end was not
//!    observed (a batch ending several prompts, a last chunk shorter than
//!    the window), with its window evaluated again. The host has read the
//!    previous batch's logits by then (it samples before it submits the
//!    next token), and the batch it submits now computes fresh ones; a
//!    sequence whose prompt went on is not compressed.
//!
//! Any failure leaves the sequence as it was (the library's rollback) and
//! the host's call result as llama.cpp returned it.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use super::config::{LogLevel, Settings};
use super::log::{log, Level};
use super::shadow::{runs, ShadowBatch};
use super::track::{Removal, Tracks};
use crate::compress::{check_supported, CompressionStats, Compressor};
use crate::llama::observer::Capture;
use crate::llama::{ContextRef, ModelRef, WindowObserver};
use crate::snapkv::ScoreBasis;
use crate::sys::{llama_pos, llama_seq_id};

/// The settings and the compressor built from them.
pub(crate) struct Engine {
    pub settings: Settings,
    pub compressor: Compressor,
}

/// A sequence whose prompt may have ended in the previous batch.
struct Pending {
    seq: llama_seq_id,
    /// The position after the prompt.
    end: llama_pos,
    /// The window rows recorded while it was evaluated, if observed.
    capture: Option<Capture>,
}

/// A prompt end whose batch is forwarded with the observer armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Armed {
    seq: llama_seq_id,
    end: llama_pos,
}

/// How many saved states of compressed sequences are remembered.
const SAVED_STATES: usize = 64;

/// One host context the interposer serves.
struct HostContext {
    observer: Arc<WindowObserver>,
    memory: usize,
    tracks: Tracks,
    pending: Vec<Pending>,
    /// States of compressed sequences the host saved (llama-server's
    /// `--cache-ram`): length and hash of the bytes, and the compressed
    /// prompt's end, so that a sequence the host restores from them is
    /// known to be compressed.
    saved: Vec<(usize, u64, llama_pos)>,
}

/// Everything the interposer tracks, behind one lock.
#[derive(Default)]
pub(crate) struct Registry {
    contexts: HashMap<usize, HostContext>,
    batches: HashMap<usize, ShadowBatch>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Mutex::default);

/// The process's registry. A panic while it was held cannot leave it in a
/// state worse than "forget a sequence", so the poison is ignored.
pub(crate) fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is inside one of our compressions: the
/// library's own calls to interposed functions then go straight to the
/// host's llama.cpp.
pub(crate) fn inside() -> bool {
    INSIDE.with(Cell::get)
}

/// Runs `f` with [`inside`] set (reset on unwind too).
fn as_library<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            INSIDE.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(INSIDE.with(|c| c.replace(true)));
    f()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h = (h ^ u64::from_le_bytes(c.try_into().unwrap_or_default())).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &b in chunks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl Engine {
    fn debug(&self, msg: impl FnOnce() -> String) {
        if self.settings.log >= LogLevel::Debug {
            log(Level::Info, &msg());
        }
    }

    /// Before a context is created: attaches a new observer to its params
    /// when the model can be compressed.
    pub(crate) fn prepare_context(
        &self,
        model: &ModelRef,
        params: &mut crate::sys::llama_context_params,
    ) -> Option<Arc<WindowObserver>> {
        if let Err(e) = check_supported(model) {
            log(
                Level::Warn,
                &format!("snapkv: this model's contexts are not compressed: {e}"),
            );
            return None;
        }
        let observer = WindowObserver::new();
        match observer.attach(params) {
            Ok(()) => Some(observer),
            Err(e) => {
                log(Level::Warn, &format!("snapkv: context not compressed: {e}"));
                None
            }
        }
    }

    /// After a context was created with an observer attached.
    pub(crate) fn context_created(&self, ctx: &ContextRef, observer: Arc<WindowObserver>) {
        observer.serve(ctx.as_ptr());
        registry().contexts.insert(
            ctx.as_ptr() as usize,
            HostContext {
                observer,
                memory: ctx.memory() as usize,
                tracks: if self.whole_sequence() {
                    Tracks::keeping_every_token(self.settings.config.window)
                } else {
                    Tracks::new(self.settings.config.window)
                },
                pending: Vec::new(),
                saved: Vec::new(),
            },
        );
        self.debug(|| format!("snapkv: observing context {:p}", ctx.as_ptr()));
    }

    /// Before a decode of `batch` (as the host filled it; `None` when it
    /// is not known) is forwarded: step 2, then step 1 of the module docs.
    pub(crate) fn before_decode(&self, ctx: &mut ContextRef, batch: Option<&ShadowBatch>) -> Option<Armed> {
        let mut reg = registry();
        let hc = reg.contexts.get_mut(&(ctx.as_ptr() as usize))?;
        let runs = match batch {
            Some(shadow) if !shadow.unknown => runs(shadow),
            _ => Vec::new(),
        };
        for p in std::mem::take(&mut hc.pending) {
            let next = runs.iter().find_map(|r| match r {
                Ok(run) if run.seq == p.seq => Some(Some(run)),
                Err(seq) if *seq == p.seq => Some(None),
                _ => None,
            });
            match next {
                // The first generated token: the prompt has ended.
                Some(Some(run)) if run.first_pos == p.end && run.tokens.len() == 1 => self.compress_ended(ctx, hc, p),
                // Not decoded in this batch: still waiting.
                None => hc.pending.push(p),
                Some(_) => self.debug(|| format!("snapkv: seq {}: the prompt went on after {}", p.seq, p.end)),
            }
        }
        let window = self.settings.config.window;
        let mut armed = None;
        for run in &runs {
            let run = match run {
                Ok(run) => run,
                Err(seq) => {
                    hc.tracks.tail_unknown(*seq);
                    continue;
                }
            };
            hc.tracks.decoded(run.seq, run.first_pos, &run.tokens);
            let end = run.first_pos + run.tokens.len() as llama_pos;
            let may_end_prompt = run.ends_with_output && run.outputs == 1 && run.tokens.len() >= 2;
            if !may_end_prompt {
                continue;
            }
            if (end as usize) < self.settings.min_prompt {
                self.debug(|| format!("snapkv: seq {}: {end} tokens, below SNAPKV_MIN_PROMPT", run.seq));
                continue;
            }
            if !matches!(self.settings.config.cells_to_keep(end as usize), Ok(Some(_))) {
                self.debug(|| format!("snapkv: seq {}: {end} tokens fit the budget", run.seq));
                continue;
            }
            // A method that repeats the whole sequence observes nothing.
            if armed.is_none() && run.at_batch_end && run.tokens.len() >= window && !self.whole_sequence() {
                armed = Some(Armed { seq: run.seq, end });
            } else {
                hc.pending.push(Pending {
                    seq: run.seq,
                    end,
                    capture: None,
                });
            }
        }
        let a = armed?;
        match as_library(|| self.compressor.observe_decodes_with(ctx, &hc.observer)) {
            Ok(()) => Some(a),
            Err(e) => {
                self.debug(|| format!("snapkv: seq {}: window not observed ({e})", a.seq));
                hc.pending.push(Pending {
                    seq: a.seq,
                    end: a.end,
                    capture: None,
                });
                None
            }
        }
    }

    /// After the batch of [`before_decode`](Self::before_decode) returned
    /// `ret`: keeps the rows the armed pass recorded.
    pub(crate) fn after_decode(&self, ctx: &mut ContextRef, armed: Armed, ret: i32) {
        let mut reg = registry();
        let Some(hc) = reg.contexts.get_mut(&(ctx.as_ptr() as usize)) else {
            return;
        };
        let capture = hc.observer.disarm();
        if ret == 0 {
            hc.pending.push(Pending {
                seq: armed.seq,
                end: armed.end,
                capture: Some(capture),
            });
        }
    }

    /// Compresses a sequence whose prompt has ended: from the rows the
    /// observer recorded when there are any, else by evaluating the window
    /// again; or, with a method that reads the whole sequence
    /// (reconstruct), from every token of the prompt, once per prompt
    /// evaluated from position 0 (a follow-up turn after a compressed
    /// prompt is left as it is).
    fn compress_ended(&self, ctx: &mut ContextRef, hc: &mut HostContext, p: Pending) {
        if ctx.seq_pos_max(p.seq) != Some(p.end - 1) {
            self.debug(|| format!("snapkv: seq {}: changed since its prompt ended; not compressed", p.seq));
            return;
        }
        let whole = self.whole_sequence();
        if whole && hc.tracks.get(p.seq).is_some_and(|t| t.compressed_end.is_some()) {
            self.debug(|| {
                format!(
                    "snapkv: seq {}: compressed before; {} compresses a prompt once",
                    p.seq, self.settings.method
                )
            });
            return;
        }
        if let Some(capture) = p.capture {
            match as_library(|| self.compressor.compress_from_capture(ctx, &hc.observer, p.seq, capture)) {
                Ok(stats) => return self.compressed(hc, p.seq, p.end, &stats, "window observed"),
                // The sequence is as it was; evaluate the window again.
                Err(e) => self.debug(|| format!("snapkv: seq {}: not compressed from the observed rows ({e})", p.seq)),
            }
        }
        let (tokens, how, unseen) = if whole {
            (
                hc.tracks.whole_sequence(p.seq),
                "the prompt repeated",
                "not every token since position 0 was seen",
            )
        } else {
            (
                hc.tracks.window_tokens(p.seq),
                "window evaluated again",
                "its last tokens were not all seen",
            )
        };
        let Some(tokens) = tokens else {
            self.debug(|| format!("snapkv: seq {}: {unseen}; not compressed", p.seq));
            return;
        };
        match as_library(|| {
            self.compressor
                .compress_after_prefill_with(ctx, &hc.observer, p.seq, &tokens)
        }) {
            Ok(stats) => self.compressed(hc, p.seq, p.end, &stats, how),
            Err(e) => log(Level::Warn, &format!("snapkv: seq {}: not compressed: {e}", p.seq)),
        }
    }

    /// Whether the method reads the whole sequence (reconstruct), so that
    /// every token of a prompt must be tracked and none is observed.
    fn whole_sequence(&self) -> bool {
        self.compressor.score_basis() == Some(ScoreBasis::Reconstruction)
    }

    fn compressed(&self, hc: &mut HostContext, seq: llama_seq_id, end: llama_pos, s: &CompressionStats, how: &str) {
        if !s.compressed {
            return;
        }
        hc.tracks.compressed(seq, end);
        if self.settings.log >= LogLevel::Compressions {
            log(
                Level::Info,
                &format!(
                    "snapkv: seq {seq}: {} -> {} cells per KV head, {:.1} -> {:.1} MiB, {:.3} s ({}, {how}, state transfer {:.3} s)",
                    s.cells_before,
                    s.cells_after,
                    s.bytes_before as f64 / (1 << 20) as f64,
                    s.bytes_after as f64 / (1 << 20) as f64,
                    // The compression's own time. The observation's copy
                    // time is left out: on an asynchronous backend (GPU,
                    // RPC) the callback's reads also wait for the prompt's
                    // own computation.
                    s.overhead_seconds() - s.observe_seconds + s.window_seconds,
                    self.settings.method,
                    s.compact_seconds,
                ),
            );
        }
    }

    /// A context is being freed.
    pub(crate) fn context_freed(&self, ctx: usize) -> Option<Arc<WindowObserver>> {
        registry().contexts.remove(&ctx).map(|hc| hc.observer)
    }

    /// `llama_memory_seq_pos_min` as the host sees it.
    pub(crate) fn reported_pos_min(&self, memory: usize, seq: llama_seq_id, actual: llama_pos) -> llama_pos {
        let reg = registry();
        match reg.contexts.values().find(|hc| hc.memory == memory) {
            Some(hc) => hc.tracks.reported_pos_min(seq, actual),
            None => actual,
        }
    }

    /// What to remove for the host's `llama_memory_seq_rm`.
    pub(crate) fn removal(
        &self,
        memory: usize,
        seq: llama_seq_id,
        p0: llama_pos,
        p1: llama_pos,
        pos_min: llama_pos,
    ) -> Removal {
        let reg = registry();
        let removal = match reg.contexts.values().find(|hc| hc.memory == memory) {
            Some(hc) if seq >= 0 => hc.tracks.removal(seq, p0, p1, pos_min),
            _ => Removal::AsAsked,
        };
        if removal == Removal::WholeSequence {
            log(
                Level::Warn,
                &format!(
                    "snapkv: seq {seq}: removing positions {p0}.. of a compressed prompt removes all of it (its cells \
                     also stand for other positions): evaluate the prompt again"
                ),
            );
        }
        removal
    }

    /// Applies `f` to the tracks of the context that owns `memory`.
    pub(crate) fn with_tracks(&self, memory: usize, f: impl FnOnce(&mut Tracks)) {
        let mut reg = registry();
        if let Some(hc) = reg.contexts.values_mut().find(|hc| hc.memory == memory) {
            f(&mut hc.tracks);
        }
    }

    /// The host saved sequence `seq`'s state as `bytes`.
    pub(crate) fn state_saved(&self, ctx: usize, seq: llama_seq_id, bytes: &[u8]) {
        let mut reg = registry();
        let Some(hc) = reg.contexts.get_mut(&ctx) else { return };
        if let Some(end) = hc.tracks.get(seq).and_then(|t| t.compressed_end) {
            if hc.saved.len() == SAVED_STATES {
                hc.saved.remove(0);
            }
            hc.saved.push((bytes.len(), fnv1a(bytes), end));
        }
    }

    /// The host replaced sequence `seq`'s state with `bytes`.
    pub(crate) fn state_restored(&self, ctx: usize, seq: llama_seq_id, bytes: &[u8]) {
        let mut reg = registry();
        let Some(hc) = reg.contexts.get_mut(&ctx) else { return };
        hc.tracks.forget(Some(seq));
        hc.pending.retain(|p| p.seq != seq);
        if hc.saved.iter().any(|&(len, _, _)| len == bytes.len()) {
            let hash = fnv1a(bytes);
            if let Some(&(_, _, end)) = hc.saved.iter().find(|&&(len, h, _)| len == bytes.len() && h == hash) {
                hc.tracks.compressed(seq, end);
            }
        }
    }

    /// Batch mirroring: runs `f` on the shadow of `batch`.
    pub(crate) fn with_batch(&self, batch: usize, f: impl FnOnce(&mut ShadowBatch)) {
        f(registry().batches.entry(batch).or_default());
    }

    /// A copy of what the host put in the `llama_batch_ext` at `batch`.
    pub(crate) fn batch_shadow(&self, batch: usize) -> Option<ShadowBatch> {
        registry().batches.get(&batch).cloned()
    }

    /// The host freed `batch`.
    pub(crate) fn batch_freed(&self, batch: usize) {
        registry().batches.remove(&batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_hash_reads_every_byte() {
        let a = vec![1u8; 1001];
        let mut b = a.clone();
        b[1000] = 2;
        assert_ne!(fnv1a(&a), fnv1a(&b));
        b[1000] = 1;
        b[3] = 0;
        assert_ne!(fnv1a(&a), fnv1a(&b));
    }

    #[test]
    fn library_calls_are_marked_inside_and_the_mark_survives_a_panic() {
        assert!(!inside());
        assert!(as_library(inside));
        let _ = std::panic::catch_unwind(|| as_library(|| panic!("boom")));
        assert!(!inside());
    }
}
