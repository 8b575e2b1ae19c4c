//! The crate's error type.

use std::path::PathBuf;

use crate::snapkv::AlgoError;

/// Everything that can go wrong in snapkv, with what a user needs to act on it.
///
/// A compression that returns an error has left the sequence's KV cache
/// exactly as it was (see [`crate::Compressor`]), except for
/// [`Error::RestoreFailed`], which says that this guarantee could not be kept.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model file could not be loaded.
    #[error("failed to load model {path}: {reason}")]
    ModelLoad {
        /// The path that was given.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// llama.cpp refused to create a context.
    #[error("failed to create a llama.cpp context: {0}")]
    ContextCreate(String),
    /// `llama_decode` failed.
    #[error("llama_decode failed with code {code}: {meaning}")]
    Decode {
        /// The code llama_decode returned.
        code: i32,
        /// What llama.h says the code means.
        meaning: &'static str,
    },
    /// Tokenization or detokenization failed.
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    /// The chat template could not be applied.
    #[error("chat template failed: {0}")]
    ChatTemplate(String),
    /// An argument is out of range or inconsistent.
    #[error("invalid argument `{param}`: {reason}")]
    InvalidArgument {
        /// The parameter's name.
        param: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A token id is not in the model's vocabulary.
    #[error("token id {token} is outside the vocabulary (0..{n_vocab})")]
    InvalidToken {
        /// The id that was given.
        token: i32,
        /// The vocabulary size.
        n_vocab: usize,
    },
    /// A sequence id does not exist in the context.
    #[error("sequence id {seq} is invalid: {reason}")]
    InvalidSequence {
        /// The id that was given.
        seq: i32,
        /// Why it is refused.
        reason: String,
    },
    /// The sequence holds no cells.
    #[error("sequence {seq} is empty (holds no KV cells)")]
    EmptySequence {
        /// The sequence id.
        seq: i32,
    },
    /// The model or context cannot be compressed soundly.
    #[error("unsupported model or context: {0}")]
    Unsupported(String),
    /// The context was created without the SnapKV observer attached.
    #[error("the context has no SnapKV observer: attach one to the context parameters before creating the context")]
    ObserverMissing,
    /// The observer did not see what scoring needs during the window pass.
    #[error("observation window capture failed: {0}")]
    Capture(String),
    /// Reading or writing the sequence state through llama.cpp failed.
    #[error("sequence state {op} failed: {reason}")]
    State {
        /// `get`, `set`, `save` (to a file) or `load` (from a file).
        op: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// The algorithm layer refused its input (bad config, unknown state format, ...).
    #[error(transparent)]
    Algo(#[from] AlgoError),
    /// Compression failed and restoring the original sequence state failed
    /// too: the sequence may have lost cells.
    #[error("compression failed ({cause}) and the original sequence could not be restored: {restore}")]
    RestoreFailed {
        /// Why compression failed.
        cause: String,
        /// Why the restore failed.
        restore: String,
    },
    /// The llama.cpp in this process is not the one snapkv was built for.
    #[error("llama.cpp mismatch: snapkv was built for ggml {expected}, the process has ggml {found}")]
    LlamaMismatch {
        /// The ggml version snapkv was built against.
        expected: String,
        /// The ggml version found at run time.
        found: String,
    },
    /// An I/O error (reading a prompt file, writing results).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
