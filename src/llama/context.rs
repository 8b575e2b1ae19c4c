//! Contexts: decoding, logits, per-sequence memory operations and state.

use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

use super::faults::{self, FaultPoint};
use super::observer::WindowObserver;
use super::{Batch, Model, ModelRef, Pos, SeqId, Token};
use crate::error::{Error, Result};
use crate::sys;

pub use crate::snapkv::CacheType;

/// Whether attention uses llama.cpp's fused flash-attention kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlashAttention {
    /// llama.cpp decides (on for the CPU backend in the pinned version).
    #[default]
    Auto,
    /// Always on.
    On,
    /// Always off: the attention softmax is then a graph tensor and V is
    /// stored transposed.
    Off,
}

impl std::str::FromStr for FlashAttention {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" | "1" | "true" => Ok(Self::On),
            "off" | "0" | "false" => Ok(Self::Off),
            _ => Err(format!("expected on, off or auto, got {s:?}")),
        }
    }
}

/// How a context is created. Defaults follow llama.cpp's, with the CPU
/// thread count taken from the machine.
#[derive(Debug, Clone)]
pub struct ContextParams {
    /// Context size in cells (0 = the model's training context).
    pub n_ctx: u32,
    /// Logical batch size: the most tokens one `decode` call takes.
    pub n_batch: u32,
    /// Physical batch size: the most tokens evaluated at once.
    pub n_ubatch: u32,
    /// Threads for single-token decoding.
    pub n_threads: i32,
    /// Threads for prompt (batch) evaluation.
    pub n_threads_batch: i32,
    /// Flash attention mode.
    pub flash_attn: FlashAttention,
    /// K cache type.
    pub type_k: CacheType,
    /// V cache type (quantized V needs flash attention).
    pub type_v: CacheType,
    /// Most sequences the context holds at once.
    pub n_seq_max: u32,
    /// One KV buffer shared by all sequences (llama.cpp's `kv_unified`).
    pub kv_unified: bool,
    /// The SnapKV observer to attach (required for compression).
    pub observer: Option<Arc<WindowObserver>>,
}

impl Default for ContextParams {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get()) as i32;
        Self {
            n_ctx: 4096,
            n_batch: 2048,
            n_ubatch: 512,
            n_threads: threads,
            n_threads_batch: threads,
            flash_attn: FlashAttention::Auto,
            type_k: CacheType::F16,
            type_v: CacheType::F16,
            n_seq_max: 1,
            kv_unified: false,
            observer: None,
        }
    }
}

impl ContextParams {
    /// Sets the context size.
    pub fn with_n_ctx(mut self, n: u32) -> Self {
        self.n_ctx = n;
        self
    }
    /// Sets the logical and physical batch sizes.
    pub fn with_batch(mut self, n_batch: u32, n_ubatch: u32) -> Self {
        self.n_batch = n_batch;
        self.n_ubatch = n_ubatch;
        self
    }
    /// Sets both thread counts.
    pub fn with_threads(mut self, n: i32) -> Self {
        self.n_threads = n;
        self.n_threads_batch = n;
        self
    }
    /// Sets the flash attention mode.
    pub fn with_flash_attn(mut self, fa: FlashAttention) -> Self {
        self.flash_attn = fa;
        self
    }
    /// Sets the K and V cache types.
    pub fn with_cache_types(mut self, k: CacheType, v: CacheType) -> Self {
        self.type_k = k;
        self.type_v = v;
        self
    }
    /// Sets the number of sequences.
    pub fn with_n_seq_max(mut self, n: u32) -> Self {
        self.n_seq_max = n;
        self
    }
    /// Attaches a SnapKV observer (see [`WindowObserver`]).
    pub fn with_observer(mut self, observer: Arc<WindowObserver>) -> Self {
        self.observer = Some(observer);
        self
    }
}

/// A context, freed on drop. Borrows its model; dereferences to
/// [`ContextRef`], which holds every operation.
///
/// `Send` (it may move to another thread) but not `Sync`: llama.cpp
/// contexts are not safe to use from two threads at once.
pub struct Context<'m> {
    raw: NonNull<sys::llama_context>,
    model: &'m Model,
    observer: Option<Arc<WindowObserver>>,
}

// SAFETY: a llama_context has no thread affinity; it may be used from any one
// thread at a time, which `&mut`/`!Sync` guarantees.
unsafe impl Send for Context<'_> {}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("n_ctx", &self.n_ctx())
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

impl<'m> Context<'m> {
    /// Creates a context for `model`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for out-of-range sizes, or an observer
    /// that already serves another context;
    /// [`Error::ContextCreate`] when llama.cpp refuses (out of memory, a
    /// quantized V cache without flash attention, ...).
    pub fn new(model: &'m Model, params: &ContextParams) -> Result<Self> {
        if params.n_batch == 0 || params.n_ubatch == 0 || params.n_seq_max == 0 {
            return Err(Error::InvalidArgument {
                param: "context params",
                reason: "n_batch, n_ubatch and n_seq_max must be positive".into(),
            });
        }
        if params.n_threads <= 0 || params.n_threads_batch <= 0 {
            return Err(Error::InvalidArgument {
                param: "n_threads",
                reason: "must be positive".into(),
            });
        }
        // SAFETY: llama_context_default_params has no preconditions.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.n_ctx = params.n_ctx;
        cp.n_batch = params.n_batch;
        cp.n_ubatch = params.n_ubatch.min(params.n_batch);
        cp.n_threads = params.n_threads;
        cp.n_threads_batch = params.n_threads_batch;
        cp.n_seq_max = params.n_seq_max;
        cp.kv_unified = params.kv_unified;
        cp.flash_attn_type = match params.flash_attn {
            FlashAttention::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
            FlashAttention::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            FlashAttention::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        };
        cp.type_k = params.type_k.id() as sys::ggml_type;
        cp.type_v = params.type_v.id() as sys::ggml_type;
        cp.no_perf = false;
        if let Some(obs) = &params.observer {
            obs.attach(&mut cp)?;
        }
        // SAFETY: model is valid for 'm; cp is complete; `self.observer` keeps
        // the observer (the callback's user pointer) alive as long as the context.
        let raw = unsafe { sys::llama_init_from_model(model.as_ptr() as *mut _, cp) };
        let Some(raw) = NonNull::new(raw) else {
            if let Some(obs) = &params.observer {
                obs.release();
            }
            return Err(Error::ContextCreate(
                "llama_init_from_model returned NULL (out of memory, or an unsupported combination such as a quantized V cache without flash attention)"
                    .into(),
            ));
        };
        if let Some(obs) = &params.observer {
            obs.serve(raw.as_ptr());
        }
        Ok(Self {
            raw,
            model,
            observer: params.observer.clone(),
        })
    }

    /// The model this context was created for.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// The observer attached at creation, if any.
    pub fn observer(&self) -> Option<&Arc<WindowObserver>> {
        self.observer.as_ref()
    }
}

impl Drop for Context<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the context and free it once.
        unsafe { sys::llama_free(self.raw.as_ptr()) }
        if let Some(obs) = &self.observer {
            obs.release();
        }
    }
}

impl Deref for Context<'_> {
    type Target = ContextRef;
    fn deref(&self) -> &ContextRef {
        // SAFETY: the pointer is valid while self lives.
        unsafe { ContextRef::from_ptr(self.raw.as_ptr()) }
    }
}

impl DerefMut for Context<'_> {
    fn deref_mut(&mut self) -> &mut ContextRef {
        // SAFETY: the pointer is valid while self lives; &mut self is unique.
        unsafe { ContextRef::from_mut_ptr(self.raw.as_ptr()) }
    }
}

/// A borrowed context: every operation, without ownership. Obtained from a
/// [`Context`] by deref, or from a host program's `llama_context *` (C ABI).
///
/// `Send` but not `Sync`: llama.cpp contexts may move between threads but
/// must not be used from two at once, and even the `&self` methods here
/// (logits, state reads) make llama.cpp mutate the context internally
/// (output reordering, synchronisation).
#[repr(transparent)]
pub struct ContextRef {
    raw: sys::llama_context,
    /// bindgen's opaque `llama_context` is a plain zero-sized struct and so
    /// `Sync`; this marker takes `Sync` away and keeps `Send`.
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for ContextRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextRef").field("n_ctx", &self.n_ctx()).finish()
    }
}

/// What `llama_decode` return codes mean (llama.h).
fn decode_meaning(code: i32) -> &'static str {
    match code {
        1 => "no KV slot for the batch (context full: use a larger n_ctx or fewer tokens)",
        2 => "aborted",
        -1 => "invalid input batch",
        _ => "fatal error",
    }
}

impl ContextRef {
    /// Views a context owned elsewhere.
    ///
    /// # Safety
    /// `ptr` must be a valid `llama_context` that outlives `'a` and is not
    /// used through another path during `'a`.
    pub(crate) unsafe fn from_ptr<'a>(ptr: *const sys::llama_context) -> &'a ContextRef {
        // SAFETY: repr(transparent) over the opaque type; validity is the
        // caller's promise.
        unsafe { &*(ptr as *const ContextRef) }
    }

    /// Mutable view of a context owned elsewhere.
    ///
    /// # Safety
    /// As [`from_ptr`](Self::from_ptr), and no other reference to the
    /// context exists during `'a`.
    pub(crate) unsafe fn from_mut_ptr<'a>(ptr: *mut sys::llama_context) -> &'a mut ContextRef {
        // SAFETY: as above, uniqueness is the caller's promise.
        unsafe { &mut *(ptr as *mut ContextRef) }
    }

    fn ptr(&self) -> *mut sys::llama_context {
        self as *const ContextRef as *mut sys::llama_context
    }

    pub(crate) fn memory(&self) -> sys::llama_memory_t {
        // SAFETY: valid context; the memory lives as long as it.
        unsafe { sys::llama_get_memory(self.ptr()) }
    }

    /// The model of this context.
    pub fn model(&self) -> &ModelRef {
        // SAFETY: a context's model outlives it (owned contexts borrow the
        // Model; host contexts are the host's promise).
        unsafe { ModelRef::from_ptr(sys::llama_get_model(self.ptr())) }
    }

    /// Context size in cells.
    pub fn n_ctx(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::llama_n_ctx(self.ptr()) as usize }
    }
    /// Logical batch size.
    pub fn n_batch(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::llama_n_batch(self.ptr()) as usize }
    }
    /// Physical batch size.
    pub fn n_ubatch(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::llama_n_ubatch(self.ptr()) as usize }
    }
    /// Most sequences the context holds.
    pub fn n_seq_max(&self) -> usize {
        // SAFETY: valid context.
        unsafe { sys::llama_n_seq_max(self.ptr()) as usize }
    }

    /// Sets the thread counts for decoding and batch evaluation.
    pub fn set_threads(&mut self, n_threads: i32, n_threads_batch: i32) {
        // SAFETY: valid context.
        unsafe { sys::llama_set_n_threads(self.ptr(), n_threads.max(1), n_threads_batch.max(1)) }
    }

    /// Evaluates a batch.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty batch;
    /// [`Error::InvalidToken`] for a token id outside the vocabulary;
    /// [`Error::Decode`] with llama.cpp's code.
    pub fn decode(&mut self, batch: &Batch) -> Result<()> {
        if batch.is_empty() {
            return Err(Error::InvalidArgument {
                param: "batch",
                reason: "empty".into(),
            });
        }
        self.model().check_tokens(batch.tokens())?;
        if faults::inject(FaultPoint::Decode) {
            return Err(Error::Decode {
                code: -3,
                meaning: "failure injected by a test (snapkv::llama::faults)",
            });
        }
        // SAFETY: valid context; the batch's arrays are valid for its
        // n_tokens entries.
        let code = unsafe { sys::llama_decode(self.ptr(), batch.raw()) };
        if code != 0 {
            return Err(Error::Decode {
                code,
                meaning: decode_meaning(code),
            });
        }
        Ok(())
    }

    /// Evaluates `tokens` of sequence `seq` at positions `start..`, in
    /// batches of at most `n_batch`, computing the logits of the last token
    /// when `logits_last`. Every token id is checked before anything is
    /// evaluated.
    ///
    /// # Errors
    /// As [`decode`](Self::decode).
    pub fn decode_tokens(&mut self, seq: SeqId, tokens: &[Token], start: Pos, logits_last: bool) -> Result<()> {
        self.decode_tokens_with(seq, tokens, start, logits_last, |_| {})
    }

    /// As [`decode_tokens`](Self::decode_tokens), calling `progress` with the
    /// number of tokens evaluated so far after each batch.
    ///
    /// # Errors
    /// As [`decode`](Self::decode).
    pub fn decode_tokens_with(
        &mut self,
        seq: SeqId,
        tokens: &[Token],
        start: Pos,
        logits_last: bool,
        mut progress: impl FnMut(usize),
    ) -> Result<()> {
        self.check_seq(seq)?;
        self.model().check_tokens(tokens)?;
        let chunk = self.n_batch().max(1);
        let mut batch = Batch::new(chunk.min(tokens.len().max(1)), 1)?;
        let mut done = 0usize;
        for part in tokens.chunks(chunk) {
            batch.clear();
            for (k, &t) in part.iter().enumerate() {
                let i = done + k;
                let last = i + 1 == tokens.len();
                batch.add(t, start + i as Pos, &[seq], logits_last && last)?;
            }
            self.decode(&batch)?;
            done += part.len();
            progress(done);
        }
        Ok(())
    }

    /// Logits of output `i` of the last decode (negative counts from the
    /// end: -1 is the last output). `None` when that output was not
    /// requested.
    pub fn logits_ith(&self, i: i32) -> Option<&[f32]> {
        // SAFETY: valid context; NULL for invalid ids, else n_vocab floats that
        // stay valid until the next decode, which needs &mut self.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr(), i);
            if p.is_null() {
                None
            } else {
                Some(std::slice::from_raw_parts(p, self.model().n_vocab()))
            }
        }
    }

    /// Waits for pending backend work.
    pub fn synchronize(&mut self) {
        // SAFETY: valid context.
        unsafe { sys::llama_synchronize(self.ptr()) }
    }

    /// Removes the cells of `seq` with positions in `[p0, p1)` (negative
    /// bounds mean open ends; `seq` < 0 means every sequence). Returns false
    /// when llama.cpp cannot remove a partial range (recurrent models).
    pub fn seq_rm(&mut self, seq: SeqId, p0: Pos, p1: Pos) -> bool {
        if seq >= 0 && self.check_seq(seq).is_err() {
            return false;
        }
        // SAFETY: valid memory handle; seq is -1 or a valid id (llama.cpp
        // asserts on others).
        unsafe { sys::llama_memory_seq_rm(self.memory(), seq, p0, p1) }
    }

    /// Copies the cells of `src` in `[p0, p1)` into sequence `dst` (shared
    /// cells, no data copy).
    pub fn seq_cp(&mut self, src: SeqId, dst: SeqId, p0: Pos, p1: Pos) {
        if self.check_seq(src).is_err() || self.check_seq(dst).is_err() {
            return;
        }
        // SAFETY: valid memory handle and sequence ids.
        unsafe { sys::llama_memory_seq_cp(self.memory(), src, dst, p0, p1) }
    }

    /// Adds `delta` to the positions of `seq`'s cells in `[p0, p1)`
    /// (negative bounds mean open ends); llama.cpp re-rotates their keys
    /// by `delta` before the next decode. On a compressed sequence this is
    /// exact only over the whole sequence (see [`crate::compress`]).
    pub fn seq_add(&mut self, seq: SeqId, p0: Pos, p1: Pos, delta: Pos) {
        if self.check_seq(seq).is_err() {
            return;
        }
        // SAFETY: valid memory handle and sequence id.
        unsafe { sys::llama_memory_seq_add(self.memory(), seq, p0, p1, delta) }
    }

    /// Divides the positions of `seq`'s cells in `[p0, p1)` by `d`
    /// (self-extend's grouping); llama.cpp re-rotates their keys to match.
    /// **Wrong on a compressed sequence**, whose cells carry nominal
    /// positions (see [`crate::compress`]). Does nothing for `d < 1`.
    pub fn seq_div(&mut self, seq: SeqId, p0: Pos, p1: Pos, d: i32) {
        if self.check_seq(seq).is_err() || d < 1 {
            return;
        }
        // SAFETY: valid memory handle and sequence id; llama.cpp asserts
        // d > 0, checked above.
        unsafe { sys::llama_memory_seq_div(self.memory(), seq, p0, p1, d) }
    }

    /// Smallest position of `seq`, or `None` when it is empty.
    pub fn seq_pos_min(&self, seq: SeqId) -> Option<Pos> {
        self.check_seq(seq).ok()?;
        // SAFETY: valid memory handle and sequence id.
        let p = unsafe { sys::llama_memory_seq_pos_min(self.memory(), seq) };
        (p >= 0).then_some(p)
    }

    /// Largest position of `seq`, or `None` when it is empty.
    pub fn seq_pos_max(&self, seq: SeqId) -> Option<Pos> {
        self.check_seq(seq).ok()?;
        // SAFETY: valid memory handle and sequence id.
        let p = unsafe { sys::llama_memory_seq_pos_max(self.memory(), seq) };
        (p >= 0).then_some(p)
    }

    /// Clears the whole memory (all sequences).
    pub fn clear(&mut self) {
        // SAFETY: valid memory handle.
        unsafe { sys::llama_memory_clear(self.memory(), true) }
    }

    /// Serialises sequence `seq`'s cells (llama.cpp's sequence state).
    ///
    /// # Errors
    /// [`Error::EmptySequence`] when it holds no cell; [`Error::State`] when
    /// llama.cpp fails; [`Error::Algo`] with
    /// [`AlgoError::OutOfMemory`](crate::snapkv::AlgoError::OutOfMemory)
    /// when the buffer cannot be allocated.
    pub fn state_seq_get(&self, seq: SeqId) -> Result<Vec<u8>> {
        self.check_seq(seq)?;
        if self.seq_pos_max(seq).is_none() {
            return Err(Error::EmptySequence { seq });
        }
        // SAFETY: valid context.
        let size = unsafe { sys::llama_state_seq_get_size_ext(self.ptr(), seq, 0) };
        if size == 0 {
            return Err(Error::State {
                op: "get",
                reason: "llama_state_seq_get_size returned 0".into(),
            });
        }
        let mut buf = crate::snapkv::alloc::filled_vec(size, 0u8, "the sequence state")?;
        // SAFETY: buf is writable for `size` bytes.
        let n = unsafe { sys::llama_state_seq_get_data_ext(self.ptr(), buf.as_mut_ptr(), size, seq, 0) };
        if n != size {
            return Err(Error::State {
                op: "get",
                reason: format!("llama_state_seq_get_data wrote {n} of {size} bytes"),
            });
        }
        Ok(buf)
    }

    /// Bytes of `seq`'s state without its K/V data (header and per-cell
    /// metadata only), or of every sequence's with `seq = -1`: llama.cpp
    /// counts them without copying any tensor.
    ///
    /// # Errors
    /// [`Error::InvalidSequence`] for an id out of range other than -1;
    /// [`Error::State`] when llama.cpp reports no size.
    pub(crate) fn state_seq_metadata_size(&self, seq: SeqId) -> Result<usize> {
        if seq != -1 {
            self.check_seq(seq)?;
        }
        // SAFETY: valid context; seq is -1 (every sequence) or a valid id.
        // With the ON_DEVICE flag llama.cpp sizes the state with a writer
        // that skips tensor data, and touches no device buffer.
        let size =
            unsafe { sys::llama_state_seq_get_size_ext(self.ptr(), seq, sys::LLAMA_STATE_SEQ_FLAGS_ON_DEVICE as _) };
        if size == 0 {
            return Err(Error::State {
                op: "get",
                reason: format!("llama_state_seq_get_size returned 0 for sequence {seq}"),
            });
        }
        Ok(size)
    }

    /// Replaces sequence `seq` with the cells in `state` (from
    /// [`state_seq_get`](Self::state_seq_get) or a rewrite of it). llama.cpp
    /// removes the sequence and places the cells anew from the lowest free
    /// cell.
    ///
    /// # Errors
    /// [`Error::State`] when llama.cpp refuses the data; the sequence is then
    /// empty (llama.cpp clears what it had placed).
    pub fn state_seq_set(&mut self, seq: SeqId, state: &[u8]) -> Result<()> {
        self.check_seq(seq)?;
        if faults::inject(FaultPoint::StateSet) {
            // As llama.cpp does when it refuses the data: the sequence is
            // left empty.
            self.seq_rm(seq, -1, -1);
            return Err(Error::State {
                op: "set",
                reason: "failure injected by a test (snapkv::llama::faults)".into(),
            });
        }
        // SAFETY: valid context; state is readable for its length.
        let n = unsafe { sys::llama_state_seq_set_data_ext(self.ptr(), state.as_ptr(), state.len(), seq, 0) };
        if n != state.len() {
            return Err(Error::State {
                op: "set",
                reason: format!("llama_state_seq_set_data accepted {n} of {} bytes", state.len()),
            });
        }
        Ok(())
    }

    /// Writes sequence `seq` to the file `path` with llama.cpp's
    /// `llama_state_seq_save_file`: `tokens` (the text the cells hold,
    /// read back by [`state_seq_load_file`](Self::state_seq_load_file)) and
    /// the sequence's cells as they are, so a compressed sequence saves
    /// only its kept cells. Returns the bytes written.
    ///
    /// # Errors
    /// [`Error::InvalidSequence`]; [`Error::EmptySequence`] when it holds no
    /// cell; [`Error::InvalidArgument`] for a path with a NUL byte or that
    /// is not UTF-8; [`Error::State`] when llama.cpp cannot write the file.
    pub fn state_seq_save_file(&self, path: &std::path::Path, seq: SeqId, tokens: &[Token]) -> Result<usize> {
        self.check_seq(seq)?;
        if self.seq_pos_max(seq).is_none() {
            return Err(Error::EmptySequence { seq });
        }
        let c_path = c_path(path)?;
        // SAFETY: valid context; c_path is NUL-terminated and tokens is
        // readable for its length, both for the call. llama.cpp catches its
        // own exceptions and returns 0.
        let n =
            unsafe { sys::llama_state_seq_save_file(self.ptr(), c_path.as_ptr(), seq, tokens.as_ptr(), tokens.len()) };
        if n == 0 {
            return Err(Error::State {
                op: "save",
                reason: format!("llama.cpp could not write sequence {seq} to {}", path.display()),
            });
        }
        Ok(n)
    }

    /// Loads a file written by [`state_seq_save_file`](Self::state_seq_save_file)
    /// (or by any llama.cpp program's `llama_state_seq_save_file` for the
    /// same model) into sequence `seq`, which must be empty, and returns
    /// the tokens saved with it. Returns the bytes read with the tokens.
    ///
    /// # Errors
    /// [`Error::InvalidSequence`]; [`Error::InvalidArgument`] when `seq`
    /// holds cells (nothing is replaced) or for a bad path;
    /// [`Error::State`] when llama.cpp refuses the file (missing, another
    /// model's, more cells than the context has free, more tokens than
    /// `n_ctx`): the sequence is left empty.
    pub fn state_seq_load_file(&mut self, path: &std::path::Path, seq: SeqId) -> Result<(usize, Vec<Token>)> {
        self.check_seq(seq)?;
        if let Some(last) = self.seq_pos_max(seq) {
            return Err(Error::InvalidArgument {
                param: "seq",
                reason: format!("sequence {seq} holds cells up to position {last}: load a state into an empty one"),
            });
        }
        let c_path = c_path(path)?;
        let mut tokens: Vec<Token> = vec![0; self.n_ctx()];
        let mut n_tokens = 0usize;
        // SAFETY: valid context; c_path is NUL-terminated, tokens writable
        // for its length (the capacity passed) and n_tokens for one usize.
        // llama.cpp catches its own exceptions and returns 0.
        let n = unsafe {
            sys::llama_state_seq_load_file(
                self.ptr(),
                c_path.as_ptr(),
                seq,
                tokens.as_mut_ptr(),
                tokens.len(),
                &mut n_tokens,
            )
        };
        if n == 0 {
            // llama.cpp clears what it placed before refusing; make sure.
            self.seq_rm(seq, -1, -1);
            return Err(Error::State {
                op: "load",
                reason: format!(
                    "llama.cpp could not load {} into sequence {seq} (missing or unreadable, saved by another model, \
                     or more cells or tokens than this context of {} cells has room for)",
                    path.display(),
                    self.n_ctx()
                ),
            });
        }
        tokens.truncate(n_tokens);
        Ok((n, tokens))
    }

    /// Checks that `seq` is a valid sequence id for this context.
    ///
    /// # Errors
    /// [`Error::InvalidSequence`] when it is negative or not below
    /// [`n_seq_max`](Self::n_seq_max).
    pub fn check_seq(&self, seq: SeqId) -> Result<()> {
        if seq < 0 || seq as usize >= self.n_seq_max() {
            return Err(Error::InvalidSequence {
                seq,
                reason: format!("outside 0..{} (the context's n_seq_max)", self.n_seq_max()),
            });
        }
        Ok(())
    }

    /// Prompt-evaluation and decode timings kept by llama.cpp.
    pub fn perf(&self) -> (f64, i32, f64, i32) {
        // SAFETY: valid context.
        let d = unsafe { sys::llama_perf_context(self.ptr()) };
        (d.t_p_eval_ms, d.n_p_eval, d.t_eval_ms, d.n_eval)
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::llama_context {
        self.ptr()
    }
}

/// `path` as a C string for llama.cpp's file functions.
fn c_path(path: &std::path::Path) -> Result<std::ffi::CString> {
    let text = path.to_str().ok_or_else(|| Error::InvalidArgument {
        param: "path",
        reason: format!("{} is not UTF-8", path.display()),
    })?;
    std::ffi::CString::new(text).map_err(|_| Error::InvalidArgument {
        param: "path",
        reason: format!("{text:?} contains a NUL byte"),
    })
}
