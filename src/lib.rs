//! # snapkv — SnapKV KV-cache compression for llama.cpp
//!
//! After a long prompt has been evaluated, the attention of its last tokens
//! (the *observation window*) shows which earlier positions each attention
//! head will need. snapkv keeps those positions (with their neighbours, by
//! pooling) and the window, **per KV head**, and evicts everything else from
//! llama.cpp's own KV cache. Decoding then runs over a small, fixed number of
//! cells however long the prompt was. See [SnapKV, arXiv 2404.14469].
//!
//! [SnapKV, arXiv 2404.14469]: https://arxiv.org/abs/2404.14469
//!
//! ## Three ways in
//!
//! - **Rust**: load a [`Model`], create a [`Context`] with a
//!   [`WindowObserver`] attached, then either [`Compressor::prefill`] (evaluate
//!   and compress in one call) or, for a sequence you evaluate yourself,
//!   [`Compressor::observe_decodes`] before your decodes and
//!   [`Compressor::compress_observed`] after them (nothing evaluated twice),
//!   or [`Compressor::compress_after_prefill`] afterwards (re-evaluates only
//!   the window).
//! - **C / C++**: `include/snapkv.h` over `libsnapkv.so` / `libsnapkv.a`.
//! - **Plugin**: built with the `dynamic-link` feature, `libsnapkv.so` uses
//!   the host program's shared libllama, so a llama.cpp program can load it
//!   at run time.
//!
//! ## Layout
//!
//! - [`llama`]: safe wrappers over llama.cpp, the only code that calls the raw
//!   bindings (`sys`, private).
//! - [`snapkv`]: the algorithm over plain data — configuration, scoring,
//!   selection, parsing and rewriting llama.cpp's sequence state. No unsafe.
//! - [`compress`]: the engine tying the two together.
//! - `capi`: the C ABI.
//!
//! The `snapkv` command-line tool and its evaluation harness (`cli/`) and
//! the tiny-model test support (`testing/`) are separate crates of the
//! workspace: depending on this library pulls in neither.
//!
//! ## Features and environment
//!
//! - `dynamic-link`: build libllama/libggml as shared libraries (plugin mode).
//! - `native`: compile llama.cpp with `-march=native` (off by default: some
//!   VMs advertise instructions they refuse).
//! - `cuda`, `vulkan`, `metal`: llama.cpp GPU backends.
//! - `LLAMA_CPP_DIR`: build against your own llama.cpp tree instead of
//!   `vendor/llama.cpp` (fetched by `vendor/fetch-llama-cpp.sh`).
//! - `SNAPKV_CMAKE_ARGS`: extra `-DNAME=VALUE` options for llama.cpp's cmake.
//! - This repository's `.cargo/config.toml` sets no Rust flags; it builds
//!   llama.cpp with AVX2/FMA through `SNAPKV_CMAKE_ARGS` (an environment
//!   value, even empty, wins).
//!
//! The llama.cpp pin lives in `vendor/pin.env`; `vendor/README.md` says how
//! to bump it.

#![warn(missing_docs)]

pub(crate) mod sys;

pub mod capi;
pub mod compress;
mod error;
mod generate;
#[cfg(all(target_os = "linux", feature = "llama-cpp-sys-2"))]
pub mod linked;
pub mod llama;
#[cfg(target_os = "linux")]
mod preload;
pub mod snapkv;

pub use compress::{CompressionStats, Compressor, ScoreSource};
pub use error::{Error, Result};
pub use generate::{generate, Generation};
pub use llama::{
    build_info, init_backend, set_log_level, Batch, ChatMessage, Context, ContextParams, ContextRef, FlashAttention,
    LogLevel, Model, ModelParams, ModelRef, Sampler, WindowObserver,
};
pub use snapkv::{Budget, CacheType, PoolAlign, Pooling, Preset, QueryAggregation, SnapKvConfig, ValueWeighting};

/// The README's Rust examples, compiled by `cargo test` (doc tests) so that
/// they keep building against the API they show.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeExamples;
