//! The error type of the SnapKV algorithm layer.

/// Everything that can go wrong in the pure algorithm layer (configuration,
/// state-blob parsing, scoring, selection and rewriting).
///
/// Every variant carries enough detail to act on: which parameter, which
/// byte offset, which shape. Bad input never panics; it ends up here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AlgoError {
    /// A configuration parameter is out of range.
    #[error("invalid SnapKV parameter `{param}`: {reason}")]
    InvalidConfig {
        /// The parameter's name as the user spells it (`window`, `budget`, ...).
        param: &'static str,
        /// Why the value is refused and what would be accepted.
        reason: String,
    },
    /// The sequence-state blob is not in the format this version understands
    /// (what was expected, what was found, at which byte offset).
    #[error("unsupported llama.cpp sequence-state format: {0}")]
    UnsupportedStateFormat(String),
    /// The KV cache holds a tensor type this layer cannot handle.
    #[error("unsupported KV cache type id {type_id}: {reason}")]
    UnsupportedCacheType {
        /// The ggml type id (`enum ggml_type` value).
        type_id: i32,
        /// Why it cannot be handled.
        reason: String,
    },
    /// Buffers or descriptors disagree about sizes or counts.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),
    /// A buffer that grows with the prompt could not be allocated.
    #[error("out of memory: {what} needs {bytes} bytes")]
    OutOfMemory {
        /// What the buffer was for.
        what: &'static str,
        /// How many bytes were asked for.
        bytes: usize,
    },
    /// A selection of kept cells is malformed or does not fit the state.
    #[error("invalid selection: {0}")]
    InvalidSelection(String),
}
