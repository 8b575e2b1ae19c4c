//! Safe wrappers over llama.cpp: the only callers of `crate::sys` (private).
//!
//! Raw pointers are born and die here. Owned handles ([`Model`], [`Context`],
//! [`Batch`], [`Sampler`]) free their object in `Drop`; borrowed handles
//! ([`ModelRef`], [`ContextRef`]) are views of objects someone else owns — a
//! host program in plugin mode — and never free anything.

mod backend;
mod batch;
mod context;
#[doc(hidden)]
pub mod faults;
mod ggml;
mod model;
pub(crate) mod observer;
mod sampler;

pub use backend::{build_info, init_backend, set_log_level, BackendToken, BuildInfo, LogLevel};
pub use batch::Batch;
pub use context::{CacheType, Context, ContextParams, ContextRef, FlashAttention};
pub(crate) use ggml::dequantize_row;
pub use model::{ChatMessage, Model, ModelParams, ModelRef};
pub use observer::WindowObserver;
pub use sampler::Sampler;

/// A token id.
pub type Token = i32;
/// A position within a sequence.
pub type Pos = i32;
/// A sequence id.
pub type SeqId = i32;
