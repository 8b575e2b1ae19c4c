//! Process-wide llama.cpp initialisation and log routing.

use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use crate::sys;

/// Proof that llama.cpp's backends were initialised in this process.
///
/// Obtained from [`init_backend`]; required to load a model.
#[derive(Debug, Clone, Copy)]
pub struct BackendToken(());

static BACKEND: OnceLock<BackendToken> = OnceLock::new();

/// Initialises llama.cpp's backends once per process and routes llama.cpp's
/// log output to the [`log`] crate (quiet by default: see [`set_log_level`]).
///
/// Calling it again is cheap and returns the same token.
pub fn init_backend() -> BackendToken {
    *BACKEND.get_or_init(|| {
        // SAFETY: llama_log_set stores a plain function pointer and a null
        // user pointer; `log_trampoline` is valid for the whole process.
        unsafe { sys::llama_log_set(Some(log_trampoline), std::ptr::null_mut()) };
        // SAFETY: llama_backend_init has no preconditions; OnceLock makes it
        // run once per process.
        unsafe { sys::llama_backend_init() };
        BackendToken(())
    })
}

/// How much of llama.cpp's own log output reaches the `log` crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Nothing.
    Off = 0,
    /// Errors only (the default).
    Error = 1,
    /// Errors and warnings.
    Warn = 2,
    /// Also informational messages (model loading, cache sizes).
    Info = 3,
    /// Everything, including debug output.
    Debug = 4,
}

static LOG_LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Error as u8);

/// Sets how much of llama.cpp's log output is forwarded to the `log` crate.
pub fn set_log_level(level: LogLevel) {
    LOG_LEVEL.store(level as u8, Ordering::Relaxed);
}

/// The log callback installed into llama.cpp and ggml.
///
/// # Safety
/// Called by llama.cpp only, with `text` NULL or a NUL-terminated string.
unsafe extern "C" fn log_trampoline(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    // Never unwind into C: a panic in a log handler is swallowed.
    let _ = std::panic::catch_unwind(|| {
        if text.is_null() {
            return;
        }
        let wanted = LOG_LEVEL.load(Ordering::Relaxed);
        let (rank, lvl) = match level {
            sys::GGML_LOG_LEVEL_ERROR => (1, log::Level::Error),
            sys::GGML_LOG_LEVEL_WARN => (2, log::Level::Warn),
            sys::GGML_LOG_LEVEL_INFO | sys::GGML_LOG_LEVEL_CONT => (3, log::Level::Info),
            _ => (4, log::Level::Debug),
        };
        if rank > wanted {
            return;
        }
        // SAFETY: llama.cpp passes a NUL-terminated string valid for the call.
        let msg = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        let msg = msg.trim_end();
        if !msg.is_empty() {
            log::log!(target: "llama.cpp", lvl, "{msg}");
        }
    });
}

/// What this build of snapkv was compiled against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildInfo {
    /// ggml version of the llama.cpp tree snapkv was built against.
    pub ggml_version: &'static str,
    /// A fingerprint of that tree's llama.h (FNV-1a, hex).
    pub llama_h_fingerprint: &'static str,
    /// ggml version reported by the llama.cpp linked into this process.
    pub runtime_ggml_version: String,
}

/// Reports the llama.cpp snapkv was built for and the one in this process.
pub fn build_info() -> BuildInfo {
    // SAFETY: ggml_version returns a pointer to a static NUL-terminated string.
    let runtime = unsafe { CStr::from_ptr(sys::ggml_version()) }
        .to_string_lossy()
        .into_owned();
    BuildInfo {
        ggml_version: env!("SNAPKV_GGML_VERSION"),
        llama_h_fingerprint: env!("SNAPKV_LLAMA_H_FINGERPRINT"),
        runtime_ggml_version: runtime,
    }
}
