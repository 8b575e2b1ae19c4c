//! The one place where the C ABI turns raw pointers into references.
//!
//! Every function here takes a pointer exactly as a C caller passed it to an
//! exported `snapkv_*` function, checks it for NULL (a NULL becomes
//! `SNAPKV_ERR_NULL_POINTER` naming the argument) and otherwise relies on
//! the contract written next to that function in include/snapkv.h: a
//! non-NULL pointer is valid, suitably aligned, and not used by anyone else
//! for the duration of the call. The exported functions are `unsafe extern
//! "C"`: whoever calls them (from C or Rust) takes on that contract, and
//! these helpers must only be called with their arguments, during the call.
//!
//! The returned references are unbounded (`'a`); callers keep them inside
//! the exported call.

use std::mem::{size_of, ManuallyDrop};
use std::ptr::NonNull;
use std::sync::Arc;

use super::status::Failure;
use super::types::{LlamaContext, LlamaContextParams, SnapkvObserver, SnapkvParams, SnapkvStats};
use crate::llama::{ContextRef, WindowObserver};
use crate::sys;

/// A host's `llama_context *` as a borrowed [`ContextRef`]; never freed here.
pub(super) fn context<'a>(ctx: *mut LlamaContext) -> Result<&'a mut ContextRef, Failure> {
    let ctx = NonNull::new(ctx).ok_or_else(|| Failure::null("ctx"))?;
    // SAFETY: snapkv.h: `ctx` is a live llama_context the caller owns and does not
    // use elsewhere during the call; ContextRef borrows it and never frees it.
    Ok(unsafe { ContextRef::from_mut_ptr(ctx.as_ptr().cast::<sys::llama_context>()) })
}

/// A new observer handle: the `Arc` is leaked into a raw pointer, which
/// [`observer_release`] takes back.
pub(super) fn observer_into_raw(obs: Arc<WindowObserver>) -> *mut SnapkvObserver {
    Arc::into_raw(obs).cast_mut().cast::<SnapkvObserver>()
}

/// Borrows the observer behind a handle from `snapkv_observer_new`.
pub(super) fn observer<'a>(obs: *mut SnapkvObserver) -> Result<&'a WindowObserver, Failure> {
    let obs = NonNull::new(obs).ok_or_else(|| Failure::null("obs"))?;
    // SAFETY: snapkv.h: `obs` comes from snapkv_observer_new and was not
    // freed; it points at the WindowObserver inside an Arc.
    Ok(unsafe { &*obs.as_ptr().cast::<WindowObserver>().cast_const() })
}

/// The `Arc` behind a handle, without taking ownership of it (the
/// `ManuallyDrop` keeps the handle's reference count untouched).
pub(super) fn observer_arc(obs: *mut SnapkvObserver) -> Result<ManuallyDrop<Arc<WindowObserver>>, Failure> {
    let obs = NonNull::new(obs).ok_or_else(|| Failure::null("obs"))?;
    // SAFETY: the pointer came from Arc::into_raw (`observer_into_raw`) and owns
    // one strong count, which the ManuallyDrop never releases.
    Ok(ManuallyDrop::new(unsafe {
        Arc::from_raw(obs.as_ptr().cast::<WindowObserver>().cast_const())
    }))
}

/// Takes back the reference a handle owns; NULL is a no-op.
pub(super) fn observer_release(obs: *mut SnapkvObserver) {
    if let Some(obs) = NonNull::new(obs) {
        // SAFETY: snapkv.h: `obs` comes from snapkv_observer_new and is
        // freed once; this releases the strong count it was created with.
        drop(unsafe { Arc::from_raw(obs.as_ptr().cast::<WindowObserver>().cast_const()) });
    }
}

/// The caller's `struct llama_context_params`.
pub(super) fn context_params<'a>(
    params: *mut LlamaContextParams,
) -> Result<&'a mut sys::llama_context_params, Failure> {
    let params = NonNull::new(params).ok_or_else(|| Failure::null("params"))?;
    // SAFETY: snapkv.h: a writable llama_context_params of the llama.h we were
    // built for (snapkv_observer_attach checks the llama.cpp version first).
    Ok(unsafe { &mut *params.as_ptr().cast::<sys::llama_context_params>() })
}

/// Reads a `snapkv_params` after checking its `size` field. Fields past an
/// older header's (smaller) struct take their defaults; bytes a newer
/// header appended must be zero.
pub(super) fn params(params: *const SnapkvParams) -> Result<SnapkvParams, Failure> {
    let params = NonNull::new(params.cast_mut()).ok_or_else(|| Failure::null("params"))?;
    // SAFETY: snapkv.h: `params` points at a readable snapkv_params whose
    // first member is `size` (u32, the struct's first 4 bytes).
    let size = unsafe { params.as_ptr().cast::<u32>().read() };
    let size = SnapkvParams::check_size(size)?;
    // SAFETY: the caller's struct is `size` bytes long (its size field, at
    // least the oldest layout's, checked above): all of them are readable.
    let bytes = unsafe { std::slice::from_raw_parts(params.as_ptr().cast::<u8>(), size) };
    let known = size.min(size_of::<SnapkvParams>());
    let mut ours = SnapkvParams::default();
    // SAFETY: repr(C), integer and float fields only (any bits are valid);
    // `known` bytes fit both the caller's struct and `ours`, which differ.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), std::ptr::addr_of_mut!(ours).cast::<u8>(), known);
    }
    SnapkvParams::check_tail(&bytes[known..])?;
    Ok(ours)
}

/// Where to write a `snapkv_params` (`snapkv_params_default`, `snapkv_params_preset`).
pub(super) fn params_out<'a>(params: *mut SnapkvParams) -> Result<&'a mut SnapkvParams, Failure> {
    let params = NonNull::new(params).ok_or_else(|| Failure::null("params"))?;
    // SAFETY: snapkv.h: `params` points at writable storage for one
    // snapkv_params (the header's layout, kept equal by the drift test).
    Ok(unsafe { &mut *params.as_ptr() })
}

/// An optional stats output: checked up front (its `size`), written only
/// on success by [`StatsOut::write`].
pub(super) struct StatsOut {
    ptr: Option<(NonNull<SnapkvStats>, usize)>,
}

/// Checks an optional `snapkv_stats *` before any work is done.
pub(super) fn stats_out(stats: *mut SnapkvStats) -> Result<StatsOut, Failure> {
    let Some(stats) = NonNull::new(stats) else {
        return Ok(StatsOut { ptr: None });
    };
    // SAFETY: snapkv.h: a non-NULL `stats` points at a snapkv_stats whose
    // first member `size` the caller set.
    let size = unsafe { stats.as_ptr().cast::<u32>().read() };
    let n = SnapkvStats::check_size(size)?;
    Ok(StatsOut { ptr: Some((stats, n)) })
}

impl StatsOut {
    /// Writes the stats (keeping the caller's `size`).
    pub(super) fn write(self, value: &SnapkvStats) {
        let Some((ptr, n)) = self.ptr else { return };
        let mut value = *value;
        // SAFETY: ptr is the caller's writable stats, at least `n` bytes
        // (checked in `stats_out`); `size` is its first u32.
        unsafe {
            value.size = ptr.as_ptr().cast::<u32>().read();
            std::ptr::copy_nonoverlapping(
                (&value as *const SnapkvStats).cast::<u8>(),
                ptr.as_ptr().cast::<u8>(),
                n,
            );
        }
    }
}

/// A C array `(ptr, n)` as a slice; NULL is allowed only when `n == 0`.
pub(super) fn slice<'a, T>(ptr: *const T, n: usize, what: &str) -> Result<&'a [T], Failure> {
    if n == 0 {
        return Ok(&[]);
    }
    let ptr = NonNull::new(ptr.cast_mut()).ok_or_else(|| Failure::null(what))?;
    // SAFETY: snapkv.h: a non-NULL array argument points at `n` readable,
    // initialised elements that stay unchanged during the call.
    Ok(unsafe { std::slice::from_raw_parts(ptr.as_ptr().cast_const(), n) })
}

/// A caller's `char *buf` of `len` bytes as a writable slice; `None` when
/// NULL or empty.
pub(super) fn buffer<'a>(buf: *mut std::ffi::c_char, len: usize) -> Option<&'a mut [u8]> {
    let buf = NonNull::new(buf)?;
    if len == 0 {
        return None;
    }
    // SAFETY: snapkv.h: a non-NULL `buf` is writable for `len` bytes.
    Some(unsafe { std::slice::from_raw_parts_mut(buf.as_ptr().cast::<u8>(), len) })
}

/// Writes an optional output pointer.
pub(super) fn write_out<T>(out: *mut T, value: T) -> Result<(), Failure> {
    let out = NonNull::new(out).ok_or_else(|| Failure::null("out"))?;
    // SAFETY: snapkv.h: a non-NULL output pointer is writable for one T.
    unsafe { out.as_ptr().write(value) };
    Ok(())
}
