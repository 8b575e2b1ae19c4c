//! Test-support utilities that need no downloaded model.
//!
//! [`tiny_model`] generates a tiny, deterministic, random-weight
//! llama-architecture GGUF file (2 layers, GQA, head dimension 64, SPM
//! tokenizer with byte fallback) that the pinned llama.cpp loads like a real
//! model. Its text output is meaningless, but its attention is sharply
//! non-uniform, so KV-cache compression (SnapKV scoring, eviction, quantized
//! K caches with Hadamard rotation) can be tested end to end in seconds.
//! [`gguf_writer`] is the minimal GGUF v3 writer it is built on.

pub mod gguf_writer;
pub mod tiny_model;

pub use gguf_writer::GgufWriter;
pub use tiny_model::{tiny_model_path, write_tiny_model, TinyModelSpec, TinyVariant};
