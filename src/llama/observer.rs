//! The observation-window observer: a graph-evaluation callback that stays
//! dormant except while the observation window is evaluated, then captures
//! what SnapKV scoring needs for every layer.
//!
//! It captures the post-RoPE window queries (`Qcur-<layer>`, the node whose
//! op is ROPE) in every attention mode, and the model's own attention
//! probabilities (`kq_soft_max-<layer>`) when flash attention is off and the
//! softmax is materialised. Asking for a tensor splits the graph, so while
//! disarmed the observer asks for nothing.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::sys;

/// The callback signature of `llama_context_params::cb_eval`.
type EvalCallback = unsafe extern "C" fn(*mut sys::ggml_tensor, bool, *mut c_void) -> bool;

/// A callback the caller had installed before attaching the observer; it is
/// still called for every tensor, as if the observer were not there.
#[derive(Clone, Copy)]
struct Chained {
    callback: EvalCallback,
    user_data: *mut c_void,
}

// SAFETY: the chained callback and its user data belong to the caller, who
// installed them on a context that may be used from any one thread at a
// time; we only pass them back to that callback on the decoding thread.
unsafe impl Send for Chained {}

/// What the engine asks the observer to capture during one window pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CaptureRequest {
    /// Layers expected.
    pub n_layer: usize,
    /// Query heads per layer.
    pub n_head: usize,
    /// Query head size (also the K head size).
    pub head_dim: usize,
    /// KV heads per layer (the rows of the captured keys).
    pub n_head_kv: usize,
    /// `Some(n)`: one micro-batch of exactly `n` tokens is armed (a second
    /// one is an error). `None`: any number of micro-batches of any size;
    /// the capture holds the last `keep` rows seen over all of them.
    pub n_tokens: Option<usize>,
    /// The observation window: the last `keep` tokens evaluated while armed.
    /// Only their rows are captured.
    pub keep: usize,
    /// Whether the attention probabilities are copied too (flash attention
    /// off). A pass that scores from its queries alone leaves them: for
    /// hundreds of rows they would take gigabytes.
    pub softmax: bool,
}

impl CaptureRequest {
    /// A request for `model`'s shape: `n_tokens` as in the field, keeping
    /// the last `keep` rows.
    pub(crate) fn for_model(model: &super::ModelRef, n_tokens: Option<usize>, keep: usize) -> Self {
        Self {
            n_layer: model.n_layer(),
            n_head: model.n_head(),
            head_dim: model.head_dim(),
            n_head_kv: model.n_head_kv(),
            n_tokens,
            keep,
            softmax: true,
        }
    }

    /// The same request without the attention probabilities.
    pub(crate) fn queries_only(self) -> Self {
        Self { softmax: false, ..self }
    }
}

/// The model's attention probabilities of one layer for the window's
/// queries: `[head][query][column]`.
#[derive(Debug, Clone)]
pub(crate) struct SoftmaxRows {
    /// Columns per row (the cells attended over, padded).
    pub n_cols: usize,
    /// The probabilities.
    pub data: Vec<f32>,
}

/// What one armed window pass captured.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    /// Per layer: post-RoPE queries of the window `[token][head][dim]`.
    pub queries: Vec<Option<Vec<f32>>>,
    /// Per layer: attention probabilities (flash attention off only).
    pub softmax: Vec<Option<SoftmaxRows>>,
    /// Positions of the captured window rows (from the first layer's RoPE).
    pub positions: Vec<i32>,
    /// Post-RoPE keys of the window rows in layer 0 (`Kcur-0`),
    /// `[token][kv head][dim]`: compared with the cached keys of the
    /// sequence being compressed, they show that the window rows were
    /// evaluated for that sequence's tokens.
    pub keys: Option<Vec<f32>>,
    /// The first problem met (shape, type, duplicate layer).
    pub error: Option<String>,
    /// Time spent copying tensors in the callback.
    pub seconds: f64,
    /// Graph callbacks received while armed (0: the observer is not the
    /// context's callback, or nothing was decoded).
    pub callbacks: u64,
}

#[derive(Default)]
struct State {
    request: Option<CaptureRequest>,
    calls_at_arm: u64,
    capture: Capture,
    chained_asked: bool,
    /// The context parameters or context this observer serves (see
    /// [`WindowObserver::attach`] and [`WindowObserver::bind`]).
    binding: Binding,
}

/// Which context an observer serves.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Binding {
    /// Not attached to any context parameters yet.
    #[default]
    Free,
    /// Attached to context parameters; not yet used with a context.
    Attached,
    /// Used with the context at this address.
    Context(usize),
}

/// Observes the observation window of a context. Create one with
/// [`WindowObserver::new`], attach it through
/// [`ContextParams::with_observer`](super::ContextParams::with_observer) (or
/// the C ABI) before the context is created, and keep it alive for the
/// context's life. One observer serves one context.
pub struct WindowObserver {
    armed: AtomicBool,
    /// `LLAMA_ATTN_ROT_DISABLE` as llama.cpp read it when the context was
    /// created (read at [`attach`](Self::attach), with llama.cpp's `atoi`).
    rotation_disabled: AtomicBool,
    state: Mutex<State>,
    chained: Mutex<Option<Chained>>,
    /// Windows armed so far, and callbacks received while armed: a window
    /// pass that saw no callback at all means the observer is not the
    /// context's `cb_eval` (see [`WindowObserver::activity`]).
    arms: AtomicU64,
    armed_calls: AtomicU64,
}

/// How often an observer was armed and how many graph callbacks reached it
/// while armed. Compare two readings taken around a compression: more arms
/// but no more calls means the window was evaluated by a context this
/// observer is not attached to (the C ABI reports that as
/// `SNAPKV_ERR_OBSERVER_NOT_ATTACHED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Activity {
    /// Times [`WindowObserver::arm`] was called.
    pub arms: u64,
    /// Callbacks received while armed.
    pub armed_calls: u64,
}

impl Activity {
    /// Whether a window was armed between `before` and `self` without any
    /// callback reaching the observer.
    pub(crate) fn missed_window_since(&self, before: Activity) -> bool {
        self.arms > before.arms && self.armed_calls == before.armed_calls
    }
}

impl std::fmt::Debug for WindowObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowObserver")
            .field("armed", &self.armed.load(Ordering::Relaxed))
            .finish()
    }
}

impl WindowObserver {
    /// A new, disarmed observer.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            armed: AtomicBool::new(false),
            rotation_disabled: AtomicBool::new(false),
            state: Mutex::new(State::default()),
            chained: Mutex::new(None),
            arms: AtomicU64::new(0),
            armed_calls: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Installs the observer into raw context params, chaining the callback
    /// already there. The params then point at `self`: the observer must
    /// outlive the context created from them. Attaching again to params
    /// that already carry this observer does nothing.
    ///
    /// Also reads `LLAMA_ATTN_ROT_DISABLE` as llama.cpp will when the
    /// context is created from these params (C `atoi`), so that scoring
    /// undoes exactly the key rotation the cache applies.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the observer is already attached to
    /// other params or serves a context: one observer serves one context,
    /// and a second attach would replace the first context's chained
    /// callback.
    pub(crate) fn attach(self: &Arc<Self>, params: &mut sys::llama_context_params) -> Result<()> {
        let me = Arc::as_ptr(self) as *mut c_void;
        if self.is_attached_to(params) {
            return Ok(()); // already attached to these params
        }
        let mut st = self.lock();
        if st.binding != Binding::Free {
            return Err(Error::InvalidArgument {
                param: "observer",
                reason: "already attached to another context's parameters: one observer serves one context \
                         (create one observer per context)"
                    .into(),
            });
        }
        let previous = params.cb_eval.map(|callback| Chained {
            callback,
            user_data: params.cb_eval_user_data,
        });
        *self.chained.lock().unwrap_or_else(|e| e.into_inner()) = previous;
        self.rotation_disabled
            .store(rotation_disabled_by_env(), Ordering::SeqCst);
        params.cb_eval = Some(eval_trampoline);
        params.cb_eval_user_data = me;
        st.binding = Binding::Attached;
        Ok(())
    }

    /// Records the context created from the params this observer is
    /// attached to (contexts the crate creates itself).
    pub(crate) fn serve(&self, ctx: *const sys::llama_context) {
        self.lock().binding = Binding::Context(ctx as usize);
    }

    /// Whether the observer may serve `ctx`: it must have been attached to
    /// context params, and when the crate created the context from them,
    /// `ctx` must be that context. (A host creates its contexts itself, so
    /// which one carries the observer cannot be known up front; a window
    /// pass that reaches no callback tells.)
    ///
    /// # Errors
    /// [`Error::ObserverMissing`] when the observer was never attached to
    /// context params, or serves another context: either way it is not
    /// `ctx`'s callback.
    pub(crate) fn check_serves(&self, ctx: *const sys::llama_context) -> Result<()> {
        match self.lock().binding {
            Binding::Attached => Ok(()),
            Binding::Context(c) if c == ctx as usize => Ok(()),
            Binding::Context(_) | Binding::Free => Err(Error::ObserverMissing),
        }
    }

    /// Frees the observer for another context once the context it served
    /// is gone.
    pub(crate) fn release(&self) {
        self.lock().binding = Binding::Free;
    }

    /// Whether llama.cpp's key rotation was disabled by the environment when
    /// the observed context was created.
    pub(crate) fn rotation_disabled(&self) -> bool {
        self.rotation_disabled.load(Ordering::SeqCst)
    }

    /// Whether `params` carry an observer (this one or another).
    #[cfg(any(feature = "preload", feature = "llama-cpp-sys-2"))]
    pub(crate) fn attached_to_any(params: &sys::llama_context_params) -> bool {
        let ours = eval_trampoline as EvalCallback as usize;
        params.cb_eval.map(|f| f as usize) == Some(ours)
    }

    /// Whether `params` carry this observer.
    pub(crate) fn is_attached_to(self: &Arc<Self>, params: &sys::llama_context_params) -> bool {
        // Compared as addresses: the observer's user pointer is what makes
        // the pair unique.
        let ours = eval_trampoline as EvalCallback as usize;
        params.cb_eval.map(|f| f as usize) == Some(ours) && params.cb_eval_user_data == Arc::as_ptr(self) as *mut c_void
    }

    /// Starts capturing for the next decode.
    pub(crate) fn arm(&self, request: CaptureRequest) {
        let mut st = self.lock();
        st.request = Some(request);
        st.capture = Capture {
            queries: vec![None; request.n_layer],
            softmax: vec![None; request.n_layer],
            positions: Vec::new(),
            keys: None,
            error: None,
            seconds: 0.0,
            callbacks: 0,
        };
        st.calls_at_arm = self.armed_calls.load(Ordering::SeqCst);
        self.arms.fetch_add(1, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Arms the observer for a pass the engine runs itself; the returned
    /// guard disarms it when finished or dropped (also when a panic
    /// unwinds), so that an interrupted pass does not leave the host's
    /// later decodes observed.
    pub(crate) fn arm_scoped(&self, request: CaptureRequest) -> ArmedPass<'_> {
        self.arm(request);
        ArmedPass { observer: Some(self) }
    }

    /// The observer's [`Activity`] counters.
    pub(crate) fn activity(&self) -> Activity {
        Activity {
            arms: self.arms.load(Ordering::SeqCst),
            armed_calls: self.armed_calls.load(Ordering::SeqCst),
        }
    }

    /// Stops capturing and hands over what was captured.
    pub(crate) fn disarm(&self) -> Capture {
        self.armed.store(false, Ordering::SeqCst);
        let mut st = self.lock();
        st.request = None;
        let mut capture = std::mem::take(&mut st.capture);
        capture.callbacks = self.armed_calls.load(Ordering::SeqCst) - st.calls_at_arm;
        capture
    }

    /// Stops an observation armed by
    /// [`Compressor::observe_decodes`](crate::Compressor::observe_decodes)
    /// without compressing (say, the host's decode failed), and drops what
    /// was captured. Does nothing when not armed.
    pub fn cancel(&self) {
        self.disarm();
    }

    /// Whether the observer is capturing.
    pub fn is_armed(&self) -> bool {
        self.armed.load(Ordering::Relaxed)
    }
}

/// `LLAMA_ATTN_ROT_DISABLE` read as llama.cpp reads it when it creates a
/// KV cache: set and `atoi` of it non-zero.
fn rotation_disabled_by_env() -> bool {
    std::env::var_os("LLAMA_ATTN_ROT_DISABLE").is_some_and(|v| c_atoi(&v.to_string_lossy()) != 0)
}

/// C's `atoi`: leading whitespace, an optional sign, then decimal digits up
/// to the first other character; 0 when there are none. (Overflow is
/// undefined in C; here it saturates, which is non-zero as any glibc
/// result for such input is in practice.)
fn c_atoi(s: &str) -> i64 {
    let s = s.trim_start_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']);
    let (negative, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let value = digits.bytes().take_while(u8::is_ascii_digit).fold(0i64, |acc, d| {
        acc.saturating_mul(10).saturating_add(i64::from(d - b'0'))
    });
    if negative {
        -value
    } else {
        value
    }
}

/// An armed observer that disarms when dropped ([`WindowObserver::arm_scoped`]).
pub(crate) struct ArmedPass<'o> {
    observer: Option<&'o WindowObserver>,
}

impl ArmedPass<'_> {
    /// Disarms and hands over what was captured.
    pub(crate) fn finish(mut self) -> Capture {
        self.observer.take().map(WindowObserver::disarm).unwrap_or_default()
    }
}

impl Drop for ArmedPass<'_> {
    fn drop(&mut self) {
        if let Some(observer) = self.observer.take() {
            observer.disarm();
        }
    }
}

/// Which captured tensor a graph node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Query(usize),
    /// Layer 0's post-RoPE keys.
    Key0,
    Softmax(usize),
}

/// Classifies a node by name and op: `Qcur-<il>` with op ROPE, `Kcur-0`
/// with op ROPE, or `kq_soft_max-<il>`.
///
/// # Safety
/// `t` must be a valid tensor.
unsafe fn classify(t: *const sys::ggml_tensor) -> Option<Wanted> {
    // SAFETY: valid tensor per the caller; the name is a NUL-terminated
    // array inside the tensor.
    let (name, op) = unsafe { (CStr::from_ptr((*t).name.as_ptr()), (*t).op) };
    let name = name.to_str().ok()?;
    let layer = |rest: &str| rest.parse::<usize>().ok();
    if let Some(rest) = name.strip_prefix("Qcur-") {
        if op == sys::GGML_OP_ROPE {
            return layer(rest).map(Wanted::Query);
        }
    } else if name == "Kcur-0" {
        if op == sys::GGML_OP_ROPE {
            return Some(Wanted::Key0);
        }
    } else if let Some(rest) = name.strip_prefix("kq_soft_max-") {
        return layer(rest).map(Wanted::Softmax);
    }
    None
}

/// Copies, from a contiguous f32 tensor viewed as `slices` blocks of `rows`
/// rows of `row_len` values, rows `first_row..rows` of every block (block
/// after block) to host memory.
///
/// # Safety
/// `t` must be a computed, valid tensor.
unsafe fn read_f32_rows(
    t: *const sys::ggml_tensor,
    row_len: usize,
    rows: usize,
    slices: usize,
    first_row: usize,
) -> Result<Vec<f32>, String> {
    // SAFETY: valid tensor per the caller.
    let (type_, contiguous, n) = unsafe { ((*t).type_, sys::ggml_is_contiguous(t), sys::ggml_nelements(t)) };
    if type_ != sys::GGML_TYPE_F32 {
        return Err(format!("tensor type {type_} is not f32"));
    }
    if !contiguous {
        return Err("tensor is not contiguous".into());
    }
    if n < 0 || n as usize != row_len * rows * slices || first_row > rows {
        return Err(format!(
            "cannot take rows {first_row}.. of {slices} × {rows} rows of {row_len} values from {n} values"
        ));
    }
    let take = (rows - first_row) * row_len;
    let mut out = vec![0f32; take * slices];
    if take == 0 {
        return Ok(out);
    }
    for (slice, dst) in out.chunks_exact_mut(take).enumerate() {
        let offset = (slice * rows + first_row) * row_len * std::mem::size_of::<f32>();
        // SAFETY: t is contiguous row_len × rows × slices f32 (checked above), so the
        // read [offset, +take×4) lies inside it; dst holds exactly take f32.
        unsafe { sys::ggml_backend_tensor_get(t, dst.as_mut_ptr().cast(), offset, std::mem::size_of_val(dst)) };
    }
    Ok(out)
}

/// Appends `rows` (whole rows of `row_len` values) to `buffer` and drops
/// rows from its front so that at most `keep` rows remain.
fn roll<T>(buffer: &mut Vec<T>, rows: Vec<T>, row_len: usize, keep: usize) {
    if rows.len() >= keep * row_len {
        *buffer = rows;
    } else {
        buffer.extend(rows);
    }
    let excess = buffer.len().saturating_sub(keep * row_len);
    buffer.drain(..excess);
}

/// Reads the positions of a RoPE node's rows (its second source, I32), the
/// last `take` of `n_tokens`.
///
/// # Safety
/// `t` must be a computed, valid ROPE tensor.
unsafe fn read_rope_positions(t: *const sys::ggml_tensor, n_tokens: usize, take: usize) -> Result<Vec<i32>, String> {
    // SAFETY: a ROPE node's src[1] is its position tensor, an input that is
    // set before the graph runs.
    let pos = unsafe { (*t).src[1] };
    if pos.is_null() {
        return Err("RoPE node without positions".into());
    }
    // SAFETY: pos is a valid tensor of the same graph.
    let (type_, n, contiguous) = unsafe { ((*pos).type_, sys::ggml_nelements(pos), sys::ggml_is_contiguous(pos)) };
    if type_ != sys::GGML_TYPE_I32 || n < 0 || n as usize != n_tokens || !contiguous {
        return Err(format!(
            "RoPE positions of type {type_} with {n} values; expected {n_tokens} i32 (one position per token)"
        ));
    }
    let mut out = vec![0i32; take];
    let offset = (n_tokens - take) * std::mem::size_of::<i32>();
    // SAFETY: the tensor holds n_tokens contiguous i32 (checked above) and
    // `out` takes the last `take <= n_tokens` of them.
    unsafe { sys::ggml_backend_tensor_get(pos, out.as_mut_ptr().cast(), offset, std::mem::size_of_val(&out[..])) };
    Ok(out)
}

impl WindowObserver {
    fn on_data(&self, t: *const sys::ggml_tensor, wanted: Wanted) {
        let start = Instant::now();
        let mut st = self.lock();
        let Some(req) = st.request else { return };
        // SAFETY: the scheduler hands us a computed, valid tensor.
        let ne = unsafe { (*t).ne };
        let result = match wanted {
            Wanted::Query(il) => Self::on_queries(&mut st.capture, &req, t, il, ne),
            Wanted::Key0 => Self::on_keys(&mut st.capture, &req, t, ne),
            Wanted::Softmax(il) => Self::on_softmax(&mut st.capture, &req, t, il, ne),
        };
        if let Err(e) = result {
            st.capture.error.get_or_insert(e);
        }
        st.capture.seconds += start.elapsed().as_secs_f64();
    }

    fn on_queries(
        capture: &mut Capture,
        req: &CaptureRequest,
        t: *const sys::ggml_tensor,
        il: usize,
        ne: [i64; 4],
    ) -> Result<(), String> {
        let n_tokens = ne[2].max(0) as usize;
        let want = [
            req.head_dim as i64,
            req.n_head as i64,
            req.n_tokens.unwrap_or(n_tokens) as i64,
            1,
        ];
        if il >= req.n_layer {
            return Err(format!("Qcur-{il}: layer out of range"));
        }
        if ne != want {
            return Err(format!("Qcur-{il}: shape {ne:?}, expected {want:?}"));
        }
        if req.n_tokens.is_some() && capture.queries[il].is_some() {
            return Err(format!(
                "Qcur-{il} seen twice: the window was split over several ubatches"
            ));
        }
        let take = req.keep.min(n_tokens);
        let row_len = req.head_dim * req.n_head;
        // Queries are [token][head][dim] in memory: one block of n_tokens
        // rows of n_head × head_dim values.
        // SAFETY: valid computed tensor.
        let rows = unsafe { read_f32_rows(t, row_len, n_tokens, 1, n_tokens - take) }
            .map_err(|e| format!("Qcur-{il}: {e}"))?;
        roll(
            capture.queries[il].get_or_insert_with(Vec::new),
            rows,
            row_len,
            req.keep,
        );
        if il == 0 {
            // SAFETY: a computed ROPE node (classify checked the op).
            let pos = unsafe { read_rope_positions(t, n_tokens, take) }.map_err(|e| format!("Qcur-0: {e}"))?;
            roll(&mut capture.positions, pos, 1, req.keep);
        }
        Ok(())
    }

    fn on_keys(
        capture: &mut Capture,
        req: &CaptureRequest,
        t: *const sys::ggml_tensor,
        ne: [i64; 4],
    ) -> Result<(), String> {
        let n_tokens = ne[2].max(0) as usize;
        let want = [
            req.head_dim as i64,
            req.n_head_kv as i64,
            req.n_tokens.unwrap_or(n_tokens) as i64,
            1,
        ];
        if ne != want {
            return Err(format!("Kcur-0: shape {ne:?}, expected {want:?}"));
        }
        let take = req.keep.min(n_tokens);
        let row_len = req.head_dim * req.n_head_kv;
        // SAFETY: valid computed tensor.
        let rows =
            unsafe { read_f32_rows(t, row_len, n_tokens, 1, n_tokens - take) }.map_err(|e| format!("Kcur-0: {e}"))?;
        roll(capture.keys.get_or_insert_with(Vec::new), rows, row_len, req.keep);
        Ok(())
    }

    fn on_softmax(
        capture: &mut Capture,
        req: &CaptureRequest,
        t: *const sys::ggml_tensor,
        il: usize,
        ne: [i64; 4],
    ) -> Result<(), String> {
        let n_tokens = ne[1].max(0) as usize;
        if il >= req.n_layer {
            return Err(format!("kq_soft_max-{il}: layer out of range"));
        }
        if req.n_tokens.is_some_and(|n| n != n_tokens) || ne[2] != req.n_head as i64 || ne[3] != 1 {
            return Err(format!("kq_soft_max-{il}: unexpected shape {ne:?}"));
        }
        if req.n_tokens.is_some() && capture.softmax[il].is_some() {
            return Err(format!("kq_soft_max-{il} seen twice"));
        }
        if !req.softmax {
            return Ok(());
        }
        if n_tokens < req.keep {
            // The window's rows are spread over micro-batches whose softmax
            // columns differ: score this layer from the queries instead.
            capture.softmax[il] = None;
            return Ok(());
        }
        let n_cols = ne[0].max(0) as usize;
        // SAFETY: valid computed tensor.
        let data = unsafe { read_f32_rows(t, n_cols, n_tokens, req.n_head, n_tokens - req.keep) }
            .map_err(|e| format!("kq_soft_max-{il}: {e}"))?;
        capture.softmax[il] = Some(SoftmaxRows { n_cols, data });
        Ok(())
    }
}

/// The `cb_eval` installed into llama.cpp. Never unwinds into C.
///
/// # Safety
/// Called by ggml's scheduler only: `t` is a graph node computed (or about
/// to be) on this call, and `user_data` is the pointer `attach` installed.
unsafe extern "C" fn eval_trampoline(t: *mut sys::ggml_tensor, ask: bool, user_data: *mut c_void) -> bool {
    let outcome = std::panic::catch_unwind(|| {
        if user_data.is_null() || t.is_null() {
            return !ask;
        }
        // SAFETY: user_data is the Arc<WindowObserver> pointer installed by
        // `attach`; the observer outlives the context (documented contract).
        let obs = unsafe { &*(user_data as *const WindowObserver) };
        let chained = *obs.chained.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = if obs.armed.load(Ordering::Relaxed) {
            obs.armed_calls.fetch_add(1, Ordering::Relaxed);
            // SAFETY: t is a valid graph node.
            unsafe { classify(t) }
        } else {
            None
        };
        if ask {
            // SAFETY: forwarding the scheduler's arguments to the callback the
            // caller installed with them.
            let chained_wants = chained.is_some_and(|c| unsafe { (c.callback)(t, true, c.user_data) });
            obs.lock().chained_asked = chained_wants;
            chained_wants || wanted.is_some()
        } else {
            if let Some(w) = wanted {
                obs.on_data(t, w);
            }
            let chained_asked = std::mem::take(&mut obs.lock().chained_asked);
            match chained {
                // SAFETY: as above; the chained callback asked for this tensor.
                Some(c) if chained_asked => unsafe { (c.callback)(t, false, c.user_data) },
                _ => true,
            }
        }
    });
    // A panic (a bug) must not abort the host: report "not needed" /
    // "continue", and leave the capture incomplete so the engine refuses it.
    outcome.unwrap_or(!ask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_chains_and_is_idempotent() {
        unsafe extern "C" fn other(_: *mut sys::ggml_tensor, _: bool, _: *mut c_void) -> bool {
            true
        }
        let obs = WindowObserver::new();
        // SAFETY: default params have no preconditions.
        let mut cp = unsafe { sys::llama_context_default_params() };
        cp.cb_eval = Some(other);
        obs.attach(&mut cp).unwrap();
        assert!(obs.is_attached_to(&cp));
        obs.attach(&mut cp).unwrap();
        let chained = obs.chained.lock().unwrap().expect("previous callback chained");
        assert_eq!(chained.callback as usize, other as EvalCallback as usize);
    }

    /// Issue 27.13: a second context's params must not replace the first
    /// one's chained callback.
    #[test]
    fn a_second_attach_to_other_params_is_refused_and_keeps_the_first_chain() {
        unsafe extern "C" fn first(_: *mut sys::ggml_tensor, _: bool, _: *mut c_void) -> bool {
            true
        }
        unsafe extern "C" fn second(_: *mut sys::ggml_tensor, _: bool, _: *mut c_void) -> bool {
            false
        }
        let obs = WindowObserver::new();
        // SAFETY: default params have no preconditions.
        let (mut a, mut b) = unsafe { (sys::llama_context_default_params(), sys::llama_context_default_params()) };
        a.cb_eval = Some(first);
        b.cb_eval = Some(second);
        obs.attach(&mut a).unwrap();
        let err = obs.attach(&mut b).unwrap_err();
        assert!(err.to_string().contains("one observer serves one context"), "{err}");
        assert_eq!(b.cb_eval.map(|f| f as usize), Some(second as EvalCallback as usize));
        let chained = obs.chained.lock().unwrap().expect("first callback still chained");
        assert_eq!(chained.callback as usize, first as EvalCallback as usize);
        // Attached: any context may be the one created from the params.
        obs.check_serves(16 as *const sys::llama_context).unwrap();
        // Serving one context, refused for another; free again after release.
        obs.serve(8 as *const sys::llama_context);
        obs.check_serves(8 as *const sys::llama_context).unwrap();
        assert!(obs.check_serves(16 as *const sys::llama_context).is_err());
        obs.release();
        assert!(obs.check_serves(8 as *const sys::llama_context).is_err());
        obs.attach(&mut b).unwrap();
    }

    #[test]
    fn atoi_reads_like_c() {
        for (s, want) in [
            ("1", 1),
            ("0", 0),
            ("", 0),
            ("  7x", 7),
            ("1abc", 1),
            ("abc", 0),
            ("-3", -3),
            ("+0", 0),
            ("\t\n 12", 12),
            ("0x10", 0),
            ("99999999999999999999999", i64::MAX),
        ] {
            assert_eq!(c_atoi(s), want, "{s:?}");
        }
    }

    #[test]
    fn arm_and_disarm_reset_the_capture() {
        let obs = WindowObserver::new();
        obs.arm(CaptureRequest {
            n_layer: 3,
            n_head: 2,
            head_dim: 4,
            n_head_kv: 1,
            n_tokens: Some(5),
            keep: 2,
            softmax: true,
        });
        assert!(obs.is_armed());
        let cap = obs.disarm();
        let seen = obs.activity();
        assert_eq!((seen.arms, seen.armed_calls), (1, 0));
        assert!(seen.missed_window_since(Activity::default()));
        assert!(!obs.is_armed());
        assert_eq!(cap.queries.len(), 3);
        assert!(cap.queries.iter().all(Option::is_none));
    }
}
