//! `libsnapkv_preload.so`: SnapKV for unmodified llama.cpp programs.
//!
//! ```sh
//! LD_PRELOAD=target/release/libsnapkv_preload.so SNAPKV_BUDGET=1024 \
//!     llama-server -m model.gguf -c 16384 -np 2
//! ```
//!
//! This crate only packages the interposer that the `snapkv` crate builds
//! with its `preload` feature (`src/preload` there, with the design and
//! the variables); see the README's "llama-server and llama-cli" section.

// Keep the dependency linked: its exported wrappers are this library.
pub use snapkv as _snapkv;
