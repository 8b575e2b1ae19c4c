//! The C ABI declared in `include/snapkv.h`: a thin layer over the safe API.
//!
//! - Every exported function runs inside `boundary`: a panic becomes
//!   `SNAPKV_ERR_PANIC` with a message, never an unwind into C or an abort.
//! - Raw pointers become references in one module (`ptr`), where NULL
//!   becomes `SNAPKV_ERR_NULL_POINTER`.
//! - [`status_of`] is the one mapping from [`crate::Error`] to codes; the
//!   message goes to a thread-local string that `snapkv_last_error` copies
//!   out.
//! - Host contexts are borrowed ([`crate::ContextRef`]) and never freed.
//!
//! The functions are `unsafe extern "C"`: the pointer contracts are the ones
//! written next to each declaration in snapkv.h. Rust code should use the
//! safe API instead.

mod ptr;
mod status;
mod types;

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use crate::compress::Compressor;
use crate::error::Error;
use crate::llama::{build_info, SeqId, Token, WindowObserver};

pub use status::{status_of, Status};
pub use types::{
    abi_items, AbiItem, LlamaContext, LlamaContextParams, SnapkvObserver, SnapkvParams, SnapkvStats, POOLING_AVG,
    POOLING_MAX, SCORE_NONE, SCORE_QUERY_KEY, SCORE_SOFTMAX,
};

use status::{clear_last_error, set_last_error, with_last_error, Failure};

/// Runs one exported call: clears the thread's last error, catches panics,
/// and turns a failure into its status code plus the last-error message.
fn boundary(f: impl FnOnce() -> Result<(), Failure>) -> i32 {
    boundary_with(Status::Panic.code(), |s| s, || f().map(|()| Status::Ok.code()))
}

/// [`boundary`] for functions that return something other than a status:
/// `on_failure` turns the failure's status into the value C receives.
fn boundary_with<T>(on_panic: T, on_failure: impl FnOnce(i32) -> T, f: impl FnOnce() -> Result<T, Failure>) -> T {
    clear_last_error();
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => value,
        Ok(Err(failure)) => {
            set_last_error(failure.message);
            on_failure(failure.status.code())
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            // Dropping a panic payload can itself panic; never let it out.
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            set_last_error(format!(
                "internal error (a bug in snapkv, please report it): panic: {what}"
            ));
            on_panic
        }
    }
}

/// The version of this library, e.g. `0.1.0+llama-cpp-python.0.3.36`.
/// Static storage: valid for the life of the process.
#[no_mangle]
pub extern "C" fn snapkv_version() -> *const c_char {
    const V: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("version contains a NUL"),
    };
    V.as_ptr()
}

/// The ggml version of the llama.cpp this library was built against.
/// Static storage.
#[no_mangle]
pub extern "C" fn snapkv_llama_ggml_version() -> *const c_char {
    const V: &CStr = match CStr::from_bytes_with_nul(concat!(env!("SNAPKV_GGML_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("ggml version contains a NUL"),
    };
    V.as_ptr()
}

/// The llama.cpp in this process must be the one the bindings were made
/// from: checked once per process.
fn check_llama() -> Result<(), Failure> {
    static RESULT: OnceLock<Option<(String, String)>> = OnceLock::new();
    let mismatch = RESULT.get_or_init(|| {
        let info = build_info();
        (info.runtime_ggml_version != info.ggml_version)
            .then(|| (info.ggml_version.to_string(), info.runtime_ggml_version))
    });
    match mismatch {
        None => Ok(()),
        Some((expected, found)) => Err(Error::LlamaMismatch {
            expected: expected.clone(),
            found: found.clone(),
        }
        .into()),
    }
}

/// Compares the process's `ggml_version()` with the one this library was
/// built for. `SNAPKV_OK` or `SNAPKV_ERR_LLAMA_MISMATCH`.
#[no_mangle]
pub extern "C" fn snapkv_check_llama() -> i32 {
    boundary(check_llama)
}

/// A static description of a status code; never NULL.
#[no_mangle]
pub extern "C" fn snapkv_status_str(status: i32) -> *const c_char {
    Status::from_code(status)
        .map_or(c"unknown snapkv status code", Status::description)
        .as_ptr()
}

/// Copies this thread's last-error message into `buf` (NUL-terminated,
/// truncated to `len - 1` bytes); returns the full message's length without
/// the NUL, as `snprintf` does.
///
/// # Safety
/// `buf` is NULL or writable for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn snapkv_last_error(buf: *mut c_char, len: usize) -> usize {
    let copy = || {
        with_last_error(|msg| {
            if let Some(out) = ptr::buffer(buf, len) {
                let n = msg.len().min(out.len() - 1);
                out[..n].copy_from_slice(&msg.as_bytes()[..n]);
                out[n] = 0;
            }
            msg.len()
        })
    };
    // Not through `boundary`: this function reads the last error, it must
    // not clear it.
    catch_unwind(AssertUnwindSafe(copy)).unwrap_or(0)
}

/// Fills `params` with the defaults.
///
/// # Safety
/// See snapkv.h.
#[no_mangle]
pub unsafe extern "C" fn snapkv_params_default(params: *mut SnapkvParams) -> i32 {
    boundary(|| {
        *ptr::params_out(params)? = SnapkvParams::default();
        Ok(())
    })
}

/// Fills `params` with the defaults and the selection parameters of
/// `preset` (an `enum snapkv_preset`); leaves it untouched on failure.
///
/// # Safety
/// See snapkv.h.
#[no_mangle]
pub unsafe extern "C" fn snapkv_params_preset(params: *mut SnapkvParams, preset: i32) -> i32 {
    boundary(|| {
        let out = ptr::params_out(params)?;
        let preset = types::preset_from_c(preset)?;
        *out = SnapkvParams::from_config(&preset.config());
        Ok(())
    })
}

/// A new observer; NULL (with a last-error message) on failure. Free with
/// `snapkv_observer_free`.
#[no_mangle]
pub extern "C" fn snapkv_observer_new() -> *mut SnapkvObserver {
    boundary_with(
        std::ptr::null_mut(),
        |_| std::ptr::null_mut(),
        || Ok(ptr::observer_into_raw(WindowObserver::new())),
    )
}

/// Installs the observer as the params' `cb_eval`, chaining the callback
/// already there.
///
/// # Safety
/// See snapkv.h.
#[no_mangle]
pub unsafe extern "C" fn snapkv_observer_attach(obs: *mut SnapkvObserver, params: *mut LlamaContextParams) -> i32 {
    boundary(|| {
        let obs = ptr::observer_arc(obs)?;
        let params = ptr::context_params(params)?;
        check_llama()?;
        obs.attach(params)?;
        Ok(())
    })
}

/// Frees an observer; NULL is a no-op.
///
/// # Safety
/// See snapkv.h.
#[no_mangle]
pub unsafe extern "C" fn snapkv_observer_free(obs: *mut SnapkvObserver) {
    boundary(|| {
        ptr::observer_release(obs);
        Ok(())
    });
}

fn compressor(params: &SnapkvParams) -> Result<Compressor, Failure> {
    Ok(Compressor::with_method(params.to_config()?, params.method_name()?)?)
}

/// Evaluates `tokens` into sequence `seq_id` and compresses it.
///
/// # Safety
/// See snapkv.h.
#[no_mangle]
pub unsafe extern "C" fn snapkv_prefill(
    ctx: *mut LlamaContext,
    obs: *mut SnapkvObserver,
    params: *const SnapkvParams,
    seq_id: SeqId,
    tokens: *const Token,
    n_tokens: usize,
    stats: *mut SnapkvStats,
) -> i32 {
    boundary(|| {
        let ctx = ptr::context(ctx)?;
        let obs = ptr::observer(obs)?;
        let params = ptr::params(params)?;
        let tokens = ptr::slice(tokens, n_tokens, "tokens")?;
        let out = ptr::stats_out(stats)?;
        check_llama()?;
        // The engine leaves the sequence as it was on failure (it removes
        // what this call evaluated): the same promise as for Rust callers.
        let stats = compressor(&params)?.prefill_with(ctx, obs, seq_id, tokens)?;
        out.write(&SnapkvStats::from(&stats));
        Ok(())
    })
}

/// Compresses a sequence the caller already evaluated, re-evaluating only
/// its last `window` tokens.
///
/// # Safety
/// See snapkv.h.
#[no_mangle]
pub unsafe extern "C" fn snapkv_compress_after_prefill(
    ctx: *mut LlamaContext,
    obs: *mut SnapkvObserver,
    params: *const SnapkvParams,
    seq_id: SeqId,
    window_tokens: *const Token,
    n_window_tokens: usize,
    stats: *mut SnapkvStats,
) -> i32 {
    boundary(|| {
        let ctx = ptr::context(ctx)?;
        let obs = ptr::observer(obs)?;
        let params = ptr::params(params)?;
        let window = ptr::slice(window_tokens, n_window_tokens, "window_tokens")?;
        let out = ptr::stats_out(stats)?;
        check_llama()?;
        let stats = compressor(&params)?.compress_after_prefill_with(ctx, obs, seq_id, window)?;
        out.write(&SnapkvStats::from(&stats));
        Ok(())
    })
}

/// Arms the observer so that the caller's own next decodes record the
/// window rows (step 1 of the observed-decode hook).
///
/// # Safety
/// See snapkv.h.
#[no_mangle]
pub unsafe extern "C" fn snapkv_observe(
    ctx: *mut LlamaContext,
    obs: *mut SnapkvObserver,
    params: *const SnapkvParams,
) -> i32 {
    boundary(|| {
        let ctx = ptr::context(ctx)?;
        let obs = ptr::observer(obs)?;
        let params = ptr::params(params)?;
        check_llama()?;
        compressor(&params)?.observe_decodes_with(ctx, obs)?;
        Ok(())
    })
}

/// Compresses a sequence from the window rows recorded since
/// `snapkv_observe` (step 2 of the observed-decode hook).
///
/// # Safety
/// See snapkv.h.
#[no_mangle]
pub unsafe extern "C" fn snapkv_compress_observed(
    ctx: *mut LlamaContext,
    obs: *mut SnapkvObserver,
    params: *const SnapkvParams,
    seq_id: SeqId,
    stats: *mut SnapkvStats,
) -> i32 {
    boundary(|| {
        let ctx = ptr::context(ctx)?;
        let obs = ptr::observer(obs)?;
        let params = ptr::params(params)?;
        let out = ptr::stats_out(stats)?;
        check_llama()?;
        let stats = compressor(&params)?.compress_observed_with(ctx, obs, seq_id)?;
        out.write(&SnapkvStats::from(&stats));
        Ok(())
    })
}

/// Entry `index` of the layout table (drift test): its name and value.
/// `SNAPKV_ERR_INVALID_ARGUMENT` past the end.
///
/// # Safety
/// See snapkv.h.
#[no_mangle]
pub unsafe extern "C" fn snapkv_abi_item(index: usize, name: *mut *const c_char, value: *mut i64) -> i32 {
    boundary(|| {
        static ITEMS: OnceLock<Vec<AbiItem>> = OnceLock::new();
        let items = ITEMS.get_or_init(abi_items);
        let item = items.get(index).ok_or_else(|| {
            Failure::new(
                Status::InvalidArgument,
                format!("index {index} is past the {} layout items", items.len()),
            )
        })?;
        if name.is_null() || value.is_null() {
            return Err(Failure::null(if name.is_null() { "name" } else { "value" }));
        }
        ptr::write_out(name, item.name.as_ptr())?;
        ptr::write_out(value, item.value)?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        let mut buf = [0 as c_char; 512];
        // SAFETY: buf is writable for its length.
        let n = unsafe { snapkv_last_error(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: snapkv_last_error NUL-terminates within buf.
        let s = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned();
        assert_eq!(n, s.len());
        s
    }

    #[test]
    fn panics_stop_at_the_boundary() {
        let code = boundary(|| panic!("boom"));
        assert_eq!(code, Status::Panic.code());
        assert!(last_error().contains("boom"));
        let p = boundary_with(
            7,
            |_| 0,
            || -> Result<i32, Failure> { panic!("{}", String::from("owned")) },
        );
        assert_eq!(p, 7);
        assert!(last_error().contains("owned"));
        assert_eq!(boundary(|| Ok(())), 0);
        assert_eq!(last_error(), "", "a successful call clears the last error");
    }

    #[test]
    fn presets_fill_the_params_and_an_unknown_one_leaves_them() {
        let mut params = SnapkvParams {
            window: 5,
            ..SnapkvParams::default()
        };
        // SAFETY: `params` is a live, writable snapkv_params.
        let code = unsafe { snapkv_params_preset(&mut params, 7) };
        assert_eq!(code, Status::InvalidParams.code());
        assert!(last_error().contains("SNAPKV_PRESET_FACTS"), "{}", last_error());
        assert_eq!(params.window, 5, "a refused preset leaves the struct as it was");
        // SAFETY: as above.
        let code = unsafe { snapkv_params_preset(&mut params, types::PRESET_FACTS) };
        assert_eq!(code, Status::Ok.code());
        assert_eq!(params.to_config().unwrap(), crate::snapkv::Preset::Facts.config());
        // SAFETY: as above.
        let code = unsafe { snapkv_params_preset(&mut params, types::PRESET_DEFAULT) };
        assert_eq!(code, Status::Ok.code());
        assert_eq!(params, SnapkvParams::default());
    }

    #[test]
    fn null_pointers_are_refused_with_a_message() {
        let params = SnapkvParams::default();
        // SAFETY: NULL pointers are part of the contract (refused).
        let code = unsafe {
            snapkv_prefill(
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &params,
                0,
                std::ptr::null(),
                0,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(code, Status::NullPointer.code());
        assert!(last_error().contains("ctx"));
        // SAFETY: a NULL params pointer is a documented error, not UB.
        let code = unsafe { snapkv_params_default(std::ptr::null_mut()) };
        assert_eq!(code, Status::NullPointer.code());
        // SAFETY: a NULL params pointer is a documented error, not UB.
        let code = unsafe { snapkv_params_preset(std::ptr::null_mut(), types::PRESET_FACTS) };
        assert_eq!(code, Status::NullPointer.code());
        // SAFETY: NULL is a documented no-op.
        unsafe { snapkv_observer_free(std::ptr::null_mut()) };
        // SAFETY: NULL observer and params are a documented error, not UB.
        let code = unsafe { snapkv_observer_attach(std::ptr::null_mut(), std::ptr::null_mut()) };
        assert_eq!(code, Status::NullPointer.code());
    }

    #[test]
    fn last_error_copy_out_truncates_like_snprintf() {
        set_last_error("0123456789".into());
        let mut small = [0x55 as c_char; 4];
        // SAFETY: buffers are writable for their lengths; NULL with 0 is allowed.
        unsafe {
            assert_eq!(snapkv_last_error(small.as_mut_ptr(), small.len()), 10);
            assert_eq!(CStr::from_ptr(small.as_ptr()).to_bytes(), b"012");
            assert_eq!(snapkv_last_error(std::ptr::null_mut(), 0), 10);
            assert_eq!(snapkv_last_error(small.as_mut_ptr(), 0), 10);
        }
    }

    #[test]
    fn params_default_and_version_strings() {
        let mut p = SnapkvParams {
            size: 0,
            window: 0,
            budget: 0,
            kernel: 0,
            budget_fraction: 0.0,
            pooling: 9,
            reserved: 9,
            pool_align: 9,
            pool_forward: 9,
            value_weighting: 9,
            query_aggregation: 9,
            draft_tokens: 9,
            method: 9,
            spare: 9,
        };
        // SAFETY: p is writable.
        assert_eq!(unsafe { snapkv_params_default(&mut p) }, 0);
        assert_eq!(p, SnapkvParams::default());
        // SAFETY: static NUL-terminated strings.
        let v = unsafe { CStr::from_ptr(snapkv_version()) }.to_str().unwrap();
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        // SAFETY: as above.
        let g = unsafe { CStr::from_ptr(snapkv_llama_ggml_version()) }.to_str().unwrap();
        assert_eq!(g, build_info().ggml_version);
        assert_eq!(snapkv_check_llama(), 0);
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(snapkv_status_str(-5)) };
        assert!(unknown.to_str().unwrap().contains("unknown"));
    }

    #[test]
    fn observer_handles_round_trip() {
        let obs = snapkv_observer_new();
        assert!(!obs.is_null());
        let mut cp = crate::sys::llama_context_params::default();
        // SAFETY: obs is live; cp is a llama_context_params of our llama.h.
        let code = unsafe { snapkv_observer_attach(obs, (&mut cp as *mut crate::sys::llama_context_params).cast()) };
        assert_eq!(code, 0);
        assert!(cp.cb_eval.is_some());
        assert_eq!(cp.cb_eval_user_data, obs.cast());
        // SAFETY: obs came from snapkv_observer_new and is freed once.
        unsafe { snapkv_observer_free(obs) };
    }

    #[test]
    fn abi_items_are_reachable_and_bounded() {
        let n = abi_items().len();
        let mut name: *const c_char = std::ptr::null();
        let mut value = 0i64;
        // SAFETY: out pointers are writable.
        unsafe {
            assert_eq!(snapkv_abi_item(0, &mut name, &mut value), 0);
            assert!(!name.is_null());
            assert_eq!(
                snapkv_abi_item(n, &mut name, &mut value),
                Status::InvalidArgument.code()
            );
        }
    }
}
