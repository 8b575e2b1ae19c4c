//! The exported wrappers: functions named like llama.cpp's, found by the
//! host before its `libllama.so` because this library is preloaded. Linked
//! into a program that shares llama-cpp-sys-2's llama.cpp (feature
//! `llama-cpp-sys-2`), the same wrappers are named `__wrap_llama_…` and the
//! program's link redirects its calls to them (`--wrap`, see
//! [`crate::linked`]).
//!
//! Every wrapper forwards to the host's function ([`super::real`]) exactly
//! once and returns what it returned (except `llama_memory_seq_pos_min`
//! of a compressed sequence, see [`super::track`]). Our work runs before
//! and after the forward inside [`guarded`]: a panic there is logged and
//! dropped, never unwound into the host. Calls the library makes while
//! compressing ([`super::host::inside`]) and calls made while no engine is
//! active are forwarded and nothing else.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use super::host::{inside, Engine};
use super::log::{log, Level};
use super::shadow::ShadowBatch;
use super::track::Removal;
use super::{engine, real};
use crate::llama::{ContextRef, ModelRef, WindowObserver};
use crate::sys;

/// Runs our part of a call; a panic becomes one log line (once).
fn guarded<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        if !REPORTED.swap(true, Ordering::SeqCst) {
            log(
                Level::Warn,
                "snapkv: internal error (a bug, please report it); the call was forwarded unchanged",
            );
        }
        fallback
    })
}

/// The engine, when this call should do more than forward.
fn active() -> Option<&'static Engine> {
    if inside() {
        return None;
    }
    guarded(None, engine)
}

/// The host's function `$name`, or `$missing` returned from the wrapper
/// when the host lacks it (it called a function its own llama.cpp does
/// not define: nothing can be forwarded).
macro_rules! host_or {
    ($name:ident) => {
        host_or!($name, ())
    };
    ($name:ident, $missing:expr) => {
        match real::$name() {
            Some(f) => f,
            None => {
                log(
                    Level::Warn,
                    concat!("snapkv: the host has no ", stringify!($name), " to forward to"),
                );
                return $missing;
            }
        }
    };
}

// Runs at load time: reads the environment and checks the host, so that
// an invalid variable or a refused host is reported at start-up. (Linked
// into a program instead, the program configures us first: `crate::linked`.)
#[cfg(feature = "preload")]
#[used]
#[link_section = ".init_array"]
static AT_LOAD: extern "C" fn() = {
    extern "C" fn at_load() {
        let _ = guarded(None, engine);
    }
    at_load
};

/// Wraps `llama_init_from_model`: attaches an observer to the context's
/// params when the model can be compressed.
///
/// # Safety
/// As llama.h's `llama_init_from_model`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_init_from_model")]
pub unsafe extern "C" fn llama_init_from_model(
    model: *mut sys::llama_model,
    params: sys::llama_context_params,
) -> *mut sys::llama_context {
    let forward = host_or!(llama_init_from_model, std::ptr::null_mut());
    // SAFETY: the host's arguments and its own function.
    unsafe { create_context(forward, model, params) }
}

/// Wraps `llama_new_context_with_model`, the deprecated name llama-cpp-2
/// creates its contexts with: its body in llama.cpp calls
/// `llama_init_from_model` where no link wraps it. (A preloaded library
/// needs no such wrapper: that inner call reaches ours.)
///
/// # Safety
/// As llama.h's `llama_new_context_with_model`.
#[cfg(feature = "llama-cpp-sys-2")]
#[export_name = "__wrap_llama_new_context_with_model"]
pub unsafe extern "C" fn llama_new_context_with_model(
    model: *mut sys::llama_model,
    params: sys::llama_context_params,
) -> *mut sys::llama_context {
    let forward = host_or!(llama_new_context_with_model, std::ptr::null_mut());
    // SAFETY: the host's arguments and its own function.
    unsafe { create_context(forward, model, params) }
}

/// Creates a context through `forward`, with an observer attached to its
/// params when the engine is active and the model can be compressed.
///
/// A constructor may reach another one that is wrapped too (in a linked
/// program, `llama_new_context_with_model` calls `llama_init_from_model`
/// through the wrap): params that already carry an observer come from the
/// outer wrapper, which registers the context; the inner call forwards.
///
/// # Safety
/// `forward` is llama.cpp's context constructor; `model` and `params` are
/// the host's arguments to it.
unsafe fn create_context(
    forward: unsafe extern "C" fn(*mut sys::llama_model, sys::llama_context_params) -> *mut sys::llama_context,
    model: *mut sys::llama_model,
    params: sys::llama_context_params,
) -> *mut sys::llama_context {
    let engine = active().filter(|_| !model.is_null() && !WindowObserver::attached_to_any(&params));
    let Some(engine) = engine else {
        // SAFETY: forwarding the host's own arguments to its own function.
        return unsafe { forward(model, params) };
    };
    let mut ours = params;
    let observer = guarded(None, || {
        // SAFETY: the host passes a valid model, which outlives its contexts.
        let model = unsafe { ModelRef::from_ptr(model) };
        engine.prepare_context(model, &mut ours)
    });
    let params = if observer.is_some() { ours } else { params };
    // SAFETY: the host's arguments; `params` differ only in the callback
    // fields, which point at an observer kept alive until llama_free.
    let ctx = unsafe { forward(model, params) };
    if let (false, Some(observer)) = (ctx.is_null(), observer) {
        // SAFETY: llama.cpp just created `ctx`; it lives until llama_free.
        let view = unsafe { ContextRef::from_ptr(ctx) };
        guarded((), || engine.context_created(view, observer));
    }
    ctx
}

/// Wraps `llama_free`: forgets the context, and drops its observer after
/// llama.cpp freed it.
///
/// # Safety
/// As llama.h's `llama_free`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_free")]
pub unsafe extern "C" fn llama_free(ctx: *mut sys::llama_context) {
    let forward = host_or!(llama_free);
    let observer = active().and_then(|e| guarded(None, || e.context_freed(ctx as usize)));
    // SAFETY: the host's argument to its own function.
    unsafe { forward(ctx) };
    drop(observer);
}

/// Wraps `llama_process`: around a decode, the compressions of
/// [`super::host`].
///
/// # Safety
/// As llama.h's `llama_process`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_process")]
pub unsafe extern "C" fn llama_process(
    ctx: *mut sys::llama_context,
    kind: sys::llama_process_type,
    batch: *mut sys::llama_batch_ext,
) -> i32 {
    let forward = host_or!(llama_process, -1);
    let engine = active().filter(|_| kind == sys::LLAMA_PROCESS_TYPE_DECODE && !ctx.is_null());
    let Some(engine) = engine else {
        // SAFETY: the host's arguments to its own function.
        return unsafe { forward(ctx, kind, batch) };
    };
    // SAFETY: the host passes a valid context and holds no reference into
    // it while llama_process runs; the view ends before we return.
    let view = unsafe { ContextRef::from_mut_ptr(ctx) };
    let shadow = guarded(None, || engine.batch_shadow(batch as usize));
    let armed = guarded(None, || engine.before_decode(view, shadow.as_ref()));
    // SAFETY: the host's arguments to its own function.
    let ret = unsafe { forward(ctx, kind, batch) };
    if let Some(armed) = armed {
        guarded((), || engine.after_decode(view, armed, ret));
    }
    ret
}

/// Wraps `llama_decode`: as `llama_process`, for programs that fill a
/// plain `llama_batch` (llama.cpp's examples, bindings such as
/// llama-cpp-python). The library's own decodes, made while compressing,
/// come here too and are forwarded untouched.
///
/// # Safety
/// As llama.h's `llama_decode`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_decode")]
pub unsafe extern "C" fn llama_decode(ctx: *mut sys::llama_context, batch: sys::llama_batch) -> i32 {
    let forward = host_or!(llama_decode, -1);
    let Some(engine) = active().filter(|_| !ctx.is_null()) else {
        // SAFETY: the host's arguments to its own function.
        return unsafe { forward(ctx, batch) };
    };
    // SAFETY: the host passes a valid context and holds no reference into
    // it while llama_decode runs; the view ends before we return.
    let view = unsafe { ContextRef::from_mut_ptr(ctx) };
    // SAFETY: llama.h requires the batch's arrays to hold n_tokens entries.
    let shadow = guarded(None, || Some(unsafe { plain_batch_shadow(view, &batch) }));
    let armed = guarded(None, || engine.before_decode(view, shadow.as_ref()));
    // SAFETY: the host's arguments to its own function.
    let ret = unsafe { forward(ctx, batch) };
    if let Some(armed) = armed {
        guarded((), || engine.after_decode(view, armed, ret));
    }
    ret
}

/// What a plain `llama_batch` holds, read as llama.cpp reads it: a null
/// `seq_id` means sequence 0, a null `pos` the positions after the
/// sequence's last, a null `logits` output for the last token only.
///
/// # Safety
/// Each non-null array of `batch` holds `n_tokens` entries (and each
/// `seq_id[i]` at least one), as llama.h requires of a decoded batch.
unsafe fn plain_batch_shadow(ctx: &ContextRef, batch: &sys::llama_batch) -> ShadowBatch {
    let n = usize::try_from(batch.n_tokens).unwrap_or(0);
    let mut shadow = ShadowBatch::default();
    let mut next_pos: HashMap<sys::llama_seq_id, sys::llama_pos> = HashMap::new();
    for i in 0..n {
        let idx = i as i32;
        // SAFETY (this block's reads): in bounds by the function's contract.
        let (seq, shared, token, pos, output) = unsafe {
            let seq_ptr = if batch.seq_id.is_null() {
                std::ptr::null_mut()
            } else {
                *batch.seq_id.add(i)
            };
            let seq = if seq_ptr.is_null() { 0 } else { *seq_ptr };
            let shared = !batch.n_seq_id.is_null() && *batch.n_seq_id.add(i) > 1;
            let token = (!batch.token.is_null()).then(|| *batch.token.add(i));
            let pos = (!batch.pos.is_null()).then(|| *batch.pos.add(i));
            let output = if batch.logits.is_null() {
                i + 1 == n
            } else {
                *batch.logits.add(i) != 0
            };
            (seq, shared, token, pos, output)
        };
        let pos = pos.unwrap_or_else(|| {
            let p = next_pos
                .entry(seq)
                .or_insert_with(|| ctx.seq_pos_max(seq).map_or(0, |m| m + 1));
            *p += 1;
            *p - 1
        });
        shadow.add(idx, seq, token);
        if shared {
            shadow.add_seq(idx);
        }
        shadow.set_pos(idx, pos);
        shadow.set_output(idx, output);
    }
    shadow
}

/// Mirrors a batch setter into the shadow batch after forwarding it.
macro_rules! mirror {
    ($batch:expr, |$shadow:ident| $body:expr) => {
        if let Some(engine) = active() {
            guarded((), || engine.with_batch($batch as usize, |$shadow| $body));
        }
    };
}

/// Wraps `llama_batch_ext_clear`.
///
/// # Safety
/// As llama.h's `llama_batch_ext_clear`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_batch_ext_clear")]
pub unsafe extern "C" fn llama_batch_ext_clear(batch: *mut sys::llama_batch_ext) {
    let forward = host_or!(llama_batch_ext_clear);
    // SAFETY: the host's argument to its own function.
    unsafe { forward(batch) };
    mirror!(batch, |s| s.clear());
}

/// Wraps `llama_batch_ext_free`.
///
/// # Safety
/// As llama.h's `llama_batch_ext_free`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_batch_ext_free")]
pub unsafe extern "C" fn llama_batch_ext_free(batch: *mut sys::llama_batch_ext) {
    let forward = host_or!(llama_batch_ext_free);
    if let Some(engine) = active() {
        guarded((), || engine.batch_freed(batch as usize));
    }
    // SAFETY: the host's argument to its own function.
    unsafe { forward(batch) };
}

/// The three ways of adding an entry to a batch: forwarded, then mirrored
/// with the index llama.cpp returned (a token, or none for an embedding
/// or an empty entry).
macro_rules! adder {
    ($name:ident($($arg:ident: $ty:ty),*) => $token:expr) => {
        #[doc = concat!("Wraps `", stringify!($name), "`.\n\n# Safety\nAs llama.h's `", stringify!($name), "`.")]
        #[cfg_attr(feature = "preload", no_mangle)]
        #[cfg_attr(not(feature = "preload"), export_name = concat!("__wrap_", stringify!($name)))]
        pub unsafe extern "C" fn $name(batch: *mut sys::llama_batch_ext, seq: sys::llama_seq_id, $($arg: $ty),*) -> i32 {
            let forward = host_or!($name, -1);
            // SAFETY: the host's arguments to its own function.
            let idx = unsafe { forward(batch, seq, $($arg),*) };
            mirror!(batch, |s| s.add(idx, seq, $token));
            idx
        }
    };
}

adder!(llama_batch_ext_add() => None);
adder!(llama_batch_ext_add_token(token: sys::llama_token) => Some(token));
adder!(llama_batch_ext_add_embd(embd: sys::llama_embd) => { let _ = &embd; None });

/// Wraps `llama_batch_ext_add_seq`.
///
/// # Safety
/// As llama.h's `llama_batch_ext_add_seq`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_batch_ext_add_seq")]
pub unsafe extern "C" fn llama_batch_ext_add_seq(
    batch: *mut sys::llama_batch_ext,
    idx: i32,
    seq: sys::llama_seq_id,
) -> bool {
    let forward = host_or!(llama_batch_ext_add_seq, false);
    // SAFETY: the host's arguments to its own function.
    let ok = unsafe { forward(batch, idx, seq) };
    if ok {
        mirror!(batch, |s| s.add_seq(idx));
    }
    ok
}

/// Wraps `llama_batch_ext_set_pos`.
///
/// # Safety
/// As llama.h's `llama_batch_ext_set_pos`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_batch_ext_set_pos")]
pub unsafe extern "C" fn llama_batch_ext_set_pos(
    batch: *mut sys::llama_batch_ext,
    idx: i32,
    pos: *const sys::llama_pos,
) -> bool {
    let forward = host_or!(llama_batch_ext_set_pos, false);
    // SAFETY: the host's arguments to its own function.
    let ok = unsafe { forward(batch, idx, pos) };
    if ok && !pos.is_null() {
        // SAFETY: llama.cpp just read at least one position from `pos`.
        let first = unsafe { *pos };
        mirror!(batch, |s| s.set_pos(idx, first));
    }
    ok
}

/// The two output setters, which llama.cpp treats alike.
macro_rules! output_setter {
    ($name:ident) => {
        #[doc = concat!("Wraps `", stringify!($name), "`.\n\n# Safety\nAs llama.h's `", stringify!($name), "`.")]
        #[cfg_attr(feature = "preload", no_mangle)]
        #[cfg_attr(not(feature = "preload"), export_name = concat!("__wrap_", stringify!($name)))]
        pub unsafe extern "C" fn $name(batch: *mut sys::llama_batch_ext, idx: i32, value: bool) -> bool {
            let forward = host_or!($name, false);
            // SAFETY: the host's arguments to its own function.
            let ok = unsafe { forward(batch, idx, value) };
            if ok {
                mirror!(batch, |s| s.set_output(idx, value));
            }
            ok
        }
    };
}

output_setter!(llama_batch_ext_set_output_logits);
output_setter!(llama_batch_ext_set_output_embd);

/// Wraps `llama_memory_seq_pos_min`: a compressed sequence reports at
/// least its compressed prompt's last position (see [`super::track`]).
///
/// # Safety
/// As llama.h's `llama_memory_seq_pos_min`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_memory_seq_pos_min")]
pub unsafe extern "C" fn llama_memory_seq_pos_min(mem: sys::llama_memory_t, seq: sys::llama_seq_id) -> sys::llama_pos {
    let forward = host_or!(llama_memory_seq_pos_min, -1);
    // SAFETY: the host's arguments to its own function.
    let actual = unsafe { forward(mem, seq) };
    match active() {
        Some(engine) => guarded(actual, || engine.reported_pos_min(mem as usize, seq, actual)),
        None => actual,
    }
}

/// Wraps `llama_memory_seq_rm`: a suffix starting inside a compressed
/// prompt removes the whole sequence (see [`super::track`]). Never answers
/// false where llama.cpp would answer true.
///
/// # Safety
/// As llama.h's `llama_memory_seq_rm`.
#[cfg_attr(feature = "preload", no_mangle)]
#[cfg_attr(not(feature = "preload"), export_name = "__wrap_llama_memory_seq_rm")]
pub unsafe extern "C" fn llama_memory_seq_rm(
    mem: sys::llama_memory_t,
    seq: sys::llama_seq_id,
    p0: sys::llama_pos,
    p1: sys::llama_pos,
) -> bool {
    let forward = host_or!(llama_memory_seq_rm, false);
    let Some(engine) = active() else {
        // SAFETY: the host's arguments to its own function.
        return unsafe { forward(mem, seq, p0, p1) };
    };
    let (q0, q1) = guarded((p0, p1), || {
        let pos_min = match real::llama_memory_seq_pos_min() {
            // SAFETY: the host's memory, asked through its own function.
            Some(f) if seq >= 0 => unsafe { f(mem, seq) },
            _ => -1,
        };
        match engine.removal(mem as usize, seq, p0, p1, pos_min) {
            Removal::AsAsked => (p0, p1),
            Removal::WholeSequence => (-1, -1),
        }
    });
    // SAFETY: the host's memory and sequence; the range is the host's or
    // the whole sequence.
    let ok = unsafe { forward(mem, seq, q0, q1) };
    if ok {
        guarded((), || engine.with_tracks(mem as usize, |t| t.removed(seq, q0, q1)));
    }
    ok
}

/// The memory operations whose effect the tracks follow: forwarded, then
/// recorded.
macro_rules! memory_op {
    ($name:ident($($arg:ident: $ty:ty),*) => |$tracks:ident| $update:expr) => {
        #[doc = concat!("Wraps `", stringify!($name), "`.\n\n# Safety\nAs llama.h's `", stringify!($name), "`.")]
        #[cfg_attr(feature = "preload", no_mangle)]
        #[cfg_attr(not(feature = "preload"), export_name = concat!("__wrap_", stringify!($name)))]
        pub unsafe extern "C" fn $name(mem: sys::llama_memory_t, $($arg: $ty),*) {
            let forward = host_or!($name);
            // SAFETY: the host's arguments to its own function.
            unsafe { forward(mem, $($arg),*) };
            if let Some(engine) = active() {
                guarded((), || engine.with_tracks(mem as usize, |$tracks| $update));
            }
        }
    };
}

memory_op!(llama_memory_seq_cp(src: sys::llama_seq_id, dst: sys::llama_seq_id, p0: sys::llama_pos, p1: sys::llama_pos)
    => |t| t.copied(src, dst, p0, p1));
memory_op!(llama_memory_seq_keep(seq: sys::llama_seq_id) => |t| t.kept_only(seq));
// Context shift.
memory_op!(llama_memory_seq_add(seq: sys::llama_seq_id, p0: sys::llama_pos, p1: sys::llama_pos, delta: sys::llama_pos)
    => |t| t.shifted(seq, p0, p1, delta));
memory_op!(llama_memory_clear(data: bool) => |t| t.forget(None));

/// The bytes a state call read or wrote.
///
/// # Safety
/// `ptr` must point at `n` readable bytes (llama.cpp just read or wrote
/// them) when `n > 0`.
unsafe fn state_bytes<'a>(ptr: *const u8, n: usize) -> &'a [u8] {
    if ptr.is_null() || n == 0 {
        return &[];
    }
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(ptr, n) }
}

/// The sequence state calls (llama-server's `--cache-ram` saves and
/// restores slots with the `_ext` pair): forwarded, then the bytes
/// llama.cpp wrote or read are shown to the engine.
macro_rules! state_call {
    ($name:ident, $bytes:ident: $ptr:ty, $seen:ident $(, $flags:ident)?) => {
        #[doc = concat!("Wraps `", stringify!($name), "`.\n\n# Safety\nAs llama.h's `", stringify!($name), "`.")]
        #[cfg_attr(feature = "preload", no_mangle)]
        #[cfg_attr(not(feature = "preload"), export_name = concat!("__wrap_", stringify!($name)))]
        pub unsafe extern "C" fn $name(
            ctx: *mut sys::llama_context,
            $bytes: $ptr,
            size: usize,
            seq: sys::llama_seq_id,
            $($flags: sys::llama_state_seq_flags,)?
        ) -> usize {
            let forward = host_or!($name, 0);
            // SAFETY: the host's arguments to its own function.
            let n = unsafe { forward(ctx, $bytes, size, seq, $($flags)?) };
            if let Some(engine) = active() {
                // SAFETY: llama.cpp just wrote or read `n` bytes there.
                let bytes = unsafe { state_bytes($bytes as *const u8, n) };
                guarded((), || engine.$seen(ctx as usize, seq, bytes));
            }
            n
        }
    };
}

state_call!(llama_state_seq_get_data_ext, dst: *mut u8, state_saved, flags);
state_call!(llama_state_seq_set_data_ext, src: *const u8, state_restored, flags);
state_call!(llama_state_seq_get_data, dst: *mut u8, state_saved);
state_call!(llama_state_seq_set_data, src: *const u8, state_restored);
