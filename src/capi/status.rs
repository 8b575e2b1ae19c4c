//! Status codes, the mapping from [`crate::Error`] to them, and the
//! thread-local last-error message.

use std::cell::RefCell;
use std::ffi::CStr;

use crate::error::Error;
use crate::snapkv::AlgoError;

/// The status every fallible C function returns (`snapkv_status` in
/// snapkv.h). 0 is success. Numbers are never reused: a retired code keeps
/// its number, a new one takes the next free number.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// `SNAPKV_OK`: success.
    Ok = 0,
    /// `SNAPKV_ERR_NULL_POINTER`: a required pointer argument was NULL.
    NullPointer = 1,
    /// `SNAPKV_ERR_INVALID_PARAMS`: the `snapkv_params` are invalid.
    InvalidParams = 2,
    /// `SNAPKV_ERR_INVALID_ARGUMENT`: another argument is out of range.
    InvalidArgument = 3,
    /// `SNAPKV_ERR_INVALID_SEQUENCE`: the sequence id does not exist in the context.
    InvalidSequence = 4,
    /// `SNAPKV_ERR_EMPTY_SEQUENCE`: the sequence holds no cells.
    EmptySequence = 5,
    /// `SNAPKV_ERR_OBSERVER_NOT_ATTACHED`: the observer is not the context's `cb_eval`.
    ObserverNotAttached = 6,
    /// `SNAPKV_ERR_UNSUPPORTED`: the model or cache cannot be compressed soundly.
    Unsupported = 7,
    /// `SNAPKV_ERR_DECODE`: `llama_decode` failed.
    Decode = 8,
    /// `SNAPKV_ERR_CAPTURE`: the observation window capture was incomplete or malformed.
    Capture = 9,
    /// `SNAPKV_ERR_STATE`: reading or writing the sequence state failed.
    State = 10,
    /// `SNAPKV_ERR_STATE_FORMAT`: llama.cpp's sequence-state format was not recognised.
    StateFormat = 11,
    /// `SNAPKV_ERR_RESTORE_FAILED`: a failure, and the sequence could not be restored.
    RestoreFailed = 12,
    /// `SNAPKV_ERR_LLAMA_MISMATCH`: the process's llama.cpp is not the one snapkv was built for.
    LlamaMismatch = 13,
    /// `SNAPKV_ERR_MODEL_LOAD`: a model file could not be loaded.
    ModelLoad = 14,
    /// `SNAPKV_ERR_CONTEXT_CREATE`: llama.cpp refused to create a context.
    ContextCreate = 15,
    /// `SNAPKV_ERR_TOKENIZE`: tokenization or the chat template failed.
    Tokenize = 16,
    /// `SNAPKV_ERR_IO`: an I/O error.
    Io = 17,
    /// `SNAPKV_ERR_INTERNAL`: an internal inconsistency (a bug).
    Internal = 18,
    /// `SNAPKV_ERR_PANIC`: a panic was caught at the C boundary (a bug).
    Panic = 19,
    /// `SNAPKV_ERR_OUT_OF_MEMORY`: a buffer that grows with the prompt could not be allocated.
    OutOfMemory = 20,
}

impl Status {
    /// Every status, in code order.
    pub const ALL: &'static [Status] = &[
        Status::Ok,
        Status::NullPointer,
        Status::InvalidParams,
        Status::InvalidArgument,
        Status::InvalidSequence,
        Status::EmptySequence,
        Status::ObserverNotAttached,
        Status::Unsupported,
        Status::Decode,
        Status::Capture,
        Status::State,
        Status::StateFormat,
        Status::RestoreFailed,
        Status::LlamaMismatch,
        Status::ModelLoad,
        Status::ContextCreate,
        Status::Tokenize,
        Status::Io,
        Status::Internal,
        Status::Panic,
        Status::OutOfMemory,
    ];

    /// The code as C sees it.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The status with this code.
    pub fn from_code(code: i32) -> Option<Status> {
        Self::ALL.iter().copied().find(|s| s.code() == code)
    }

    /// The constant's name in snapkv.h.
    pub fn c_name(self) -> &'static CStr {
        match self {
            Status::Ok => c"SNAPKV_OK",
            Status::NullPointer => c"SNAPKV_ERR_NULL_POINTER",
            Status::InvalidParams => c"SNAPKV_ERR_INVALID_PARAMS",
            Status::InvalidArgument => c"SNAPKV_ERR_INVALID_ARGUMENT",
            Status::InvalidSequence => c"SNAPKV_ERR_INVALID_SEQUENCE",
            Status::EmptySequence => c"SNAPKV_ERR_EMPTY_SEQUENCE",
            Status::ObserverNotAttached => c"SNAPKV_ERR_OBSERVER_NOT_ATTACHED",
            Status::Unsupported => c"SNAPKV_ERR_UNSUPPORTED",
            Status::Decode => c"SNAPKV_ERR_DECODE",
            Status::Capture => c"SNAPKV_ERR_CAPTURE",
            Status::State => c"SNAPKV_ERR_STATE",
            Status::StateFormat => c"SNAPKV_ERR_STATE_FORMAT",
            Status::RestoreFailed => c"SNAPKV_ERR_RESTORE_FAILED",
            Status::LlamaMismatch => c"SNAPKV_ERR_LLAMA_MISMATCH",
            Status::ModelLoad => c"SNAPKV_ERR_MODEL_LOAD",
            Status::ContextCreate => c"SNAPKV_ERR_CONTEXT_CREATE",
            Status::Tokenize => c"SNAPKV_ERR_TOKENIZE",
            Status::Io => c"SNAPKV_ERR_IO",
            Status::Internal => c"SNAPKV_ERR_INTERNAL",
            Status::Panic => c"SNAPKV_ERR_PANIC",
            Status::OutOfMemory => c"SNAPKV_ERR_OUT_OF_MEMORY",
        }
    }

    /// A short, static description (what `snapkv_status_str` returns).
    pub fn description(self) -> &'static CStr {
        match self {
            Status::Ok => c"success",
            Status::NullPointer => c"a required pointer argument is NULL",
            Status::InvalidParams => c"invalid snapkv_params",
            Status::InvalidArgument => c"invalid argument",
            Status::InvalidSequence => c"the sequence id does not exist in this context",
            Status::EmptySequence => c"the sequence holds no KV cells",
            Status::ObserverNotAttached => {
                c"the observer is not attached to this context (snapkv_observer_attach before llama_init_from_model)"
            }
            Status::Unsupported => c"model or KV cache not supported by snapkv",
            Status::Decode => c"llama_decode failed",
            Status::Capture => c"observation window capture failed",
            Status::State => c"reading or writing the sequence state failed",
            Status::StateFormat => c"unrecognised llama.cpp sequence-state format",
            Status::RestoreFailed => c"failure, and the sequence could not be restored",
            Status::LlamaMismatch => c"llama.cpp in this process differs from the one snapkv was built for",
            Status::ModelLoad => c"model load failed",
            Status::ContextCreate => c"context creation failed",
            Status::Tokenize => c"tokenization failed",
            Status::Io => c"I/O error",
            Status::Internal => c"internal error",
            Status::Panic => c"internal error: panic caught at the C boundary",
            Status::OutOfMemory => c"out of memory",
        }
    }
}

/// The one mapping from crate errors to C status codes: by variant only,
/// never by the text a variant carries.
pub fn status_of(err: &Error) -> Status {
    match err {
        Error::ModelLoad { .. } => Status::ModelLoad,
        Error::ContextCreate(_) => Status::ContextCreate,
        Error::Decode { .. } => Status::Decode,
        Error::Tokenize(_) | Error::ChatTemplate(_) => Status::Tokenize,
        Error::InvalidSequence { .. } => Status::InvalidSequence,
        Error::InvalidArgument { .. } | Error::InvalidToken { .. } => Status::InvalidArgument,
        Error::EmptySequence { .. } => Status::EmptySequence,
        Error::Unsupported(_) => Status::Unsupported,
        Error::ObserverMissing => Status::ObserverNotAttached,
        Error::Capture(_) => Status::Capture,
        Error::State { .. } => Status::State,
        Error::Algo(algo) => match algo {
            AlgoError::InvalidConfig { .. } => Status::InvalidParams,
            AlgoError::UnsupportedStateFormat(_) => Status::StateFormat,
            AlgoError::UnsupportedCacheType { .. } => Status::Unsupported,
            AlgoError::OutOfMemory { .. } => Status::OutOfMemory,
            AlgoError::ShapeMismatch(_) | AlgoError::InvalidSelection(_) => Status::Internal,
        },
        Error::RestoreFailed { .. } => Status::RestoreFailed,
        Error::LlamaMismatch { .. } => Status::LlamaMismatch,
        Error::Io(_) => Status::Io,
    }
}

/// A failed C call: its status and the message for `snapkv_last_error`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: Status,
    pub message: String,
}

impl Failure {
    pub(crate) fn new(status: Status, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// A NULL pointer where `what` was required.
    pub(crate) fn null(what: &str) -> Self {
        Self::new(Status::NullPointer, format!("`{what}` must not be NULL"))
    }
}

impl From<Error> for Failure {
    fn from(err: Error) -> Self {
        let message = match err {
            // Through the C ABI the observer is always given, so the
            // engine's "missing" means it is not this context's cb_eval.
            Error::ObserverMissing => "the observer saw no graph callback while the observation window was \
                                      evaluated: it is not attached to this context (call \
                                      snapkv_observer_attach on the llama_context_params before \
                                      llama_init_from_model, with this observer)"
                .to_string(),
            _ => err.to_string(),
        };
        Self::new(status_of(&err), message)
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Replaces this thread's last-error message.
pub(crate) fn set_last_error(message: String) {
    // A message with an interior NUL would be cut short in C; make it visible.
    let message = message.replace('\0', "\\0");
    LAST_ERROR.with(|m| *m.borrow_mut() = message);
}

/// Clears this thread's last-error message.
pub(crate) fn clear_last_error() {
    LAST_ERROR.with(|m| m.borrow_mut().clear());
}

/// Runs `f` with this thread's last-error message.
pub(crate) fn with_last_error<T>(f: impl FnOnce(&str) -> T) -> T {
    LAST_ERROR.with(|m| f(&m.borrow()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// The codes are part of the ABI: this table is the promise. Changing a
    /// number here is an ABI break; add new codes at the end.
    const STABLE: &[(Status, i32, &str)] = &[
        (Status::Ok, 0, "SNAPKV_OK"),
        (Status::NullPointer, 1, "SNAPKV_ERR_NULL_POINTER"),
        (Status::InvalidParams, 2, "SNAPKV_ERR_INVALID_PARAMS"),
        (Status::InvalidArgument, 3, "SNAPKV_ERR_INVALID_ARGUMENT"),
        (Status::InvalidSequence, 4, "SNAPKV_ERR_INVALID_SEQUENCE"),
        (Status::EmptySequence, 5, "SNAPKV_ERR_EMPTY_SEQUENCE"),
        (Status::ObserverNotAttached, 6, "SNAPKV_ERR_OBSERVER_NOT_ATTACHED"),
        (Status::Unsupported, 7, "SNAPKV_ERR_UNSUPPORTED"),
        (Status::Decode, 8, "SNAPKV_ERR_DECODE"),
        (Status::Capture, 9, "SNAPKV_ERR_CAPTURE"),
        (Status::State, 10, "SNAPKV_ERR_STATE"),
        (Status::StateFormat, 11, "SNAPKV_ERR_STATE_FORMAT"),
        (Status::RestoreFailed, 12, "SNAPKV_ERR_RESTORE_FAILED"),
        (Status::LlamaMismatch, 13, "SNAPKV_ERR_LLAMA_MISMATCH"),
        (Status::ModelLoad, 14, "SNAPKV_ERR_MODEL_LOAD"),
        (Status::ContextCreate, 15, "SNAPKV_ERR_CONTEXT_CREATE"),
        (Status::Tokenize, 16, "SNAPKV_ERR_TOKENIZE"),
        (Status::Io, 17, "SNAPKV_ERR_IO"),
        (Status::Internal, 18, "SNAPKV_ERR_INTERNAL"),
        (Status::Panic, 19, "SNAPKV_ERR_PANIC"),
        (Status::OutOfMemory, 20, "SNAPKV_ERR_OUT_OF_MEMORY"),
    ];

    #[test]
    fn codes_are_distinct_and_stable() {
        assert_eq!(STABLE.len(), Status::ALL.len(), "every status is in the stable table");
        for &(status, code, name) in STABLE {
            assert_eq!(status.code(), code, "{name} changed its number");
            assert_eq!(status.c_name().to_str().unwrap(), name);
            assert_eq!(Status::from_code(code), Some(status));
            assert!(!status.description().to_bytes().is_empty());
        }
        let codes: HashSet<i32> = Status::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(codes.len(), Status::ALL.len(), "codes are distinct");
        let names: HashSet<&CStr> = Status::ALL.iter().map(|s| s.c_name()).collect();
        assert_eq!(names.len(), Status::ALL.len(), "names are distinct");
        assert_eq!(Status::from_code(-1), None);
        assert_eq!(Status::from_code(1000), None);
    }

    #[test]
    fn every_error_variant_maps_to_its_code() {
        let invalid = |param| Error::InvalidArgument {
            param,
            reason: String::new(),
        };
        let cases: Vec<(Error, Status)> = vec![
            (
                Error::ModelLoad {
                    path: "m".into(),
                    reason: String::new(),
                },
                Status::ModelLoad,
            ),
            (Error::ContextCreate(String::new()), Status::ContextCreate),
            (Error::Decode { code: 1, meaning: "" }, Status::Decode),
            (Error::Tokenize(String::new()), Status::Tokenize),
            (Error::ChatTemplate(String::new()), Status::Tokenize),
            // Issue 27.10: the variant decides, not the parameter's name.
            (invalid("seq"), Status::InvalidArgument),
            (invalid("window"), Status::InvalidArgument),
            (invalid("tokens"), Status::InvalidArgument),
            (
                Error::InvalidSequence {
                    seq: 9,
                    reason: String::new(),
                },
                Status::InvalidSequence,
            ),
            (Error::InvalidToken { token: -1, n_vocab: 5 }, Status::InvalidArgument),
            (
                Error::Algo(AlgoError::OutOfMemory {
                    what: "votes",
                    bytes: 1,
                }),
                Status::OutOfMemory,
            ),
            (Error::EmptySequence { seq: 0 }, Status::EmptySequence),
            (Error::Unsupported(String::new()), Status::Unsupported),
            (Error::ObserverMissing, Status::ObserverNotAttached),
            (Error::Capture(String::new()), Status::Capture),
            (
                Error::State {
                    op: "get",
                    reason: String::new(),
                },
                Status::State,
            ),
            (
                Error::Algo(AlgoError::InvalidConfig {
                    param: "kernel",
                    reason: String::new(),
                }),
                Status::InvalidParams,
            ),
            (
                Error::Algo(AlgoError::UnsupportedStateFormat(String::new())),
                Status::StateFormat,
            ),
            (
                Error::Algo(AlgoError::UnsupportedCacheType {
                    type_id: 99,
                    reason: String::new(),
                }),
                Status::Unsupported,
            ),
            (Error::Algo(AlgoError::ShapeMismatch(String::new())), Status::Internal),
            (
                Error::Algo(AlgoError::InvalidSelection(String::new())),
                Status::Internal,
            ),
            (
                Error::RestoreFailed {
                    cause: String::new(),
                    restore: String::new(),
                },
                Status::RestoreFailed,
            ),
            (
                Error::LlamaMismatch {
                    expected: "a".into(),
                    found: "b".into(),
                },
                Status::LlamaMismatch,
            ),
            (Error::Io(std::io::Error::other("x")), Status::Io),
        ];
        for (err, want) in cases {
            assert_eq!(status_of(&err), want, "{err:?}");
            let failure = Failure::from(err);
            assert_eq!(failure.status, want);
            assert!(!failure.message.is_empty());
        }
    }

    #[test]
    fn last_error_is_per_thread() {
        set_last_error("here".into());
        std::thread::spawn(|| with_last_error(|m| assert_eq!(m, "")))
            .join()
            .unwrap();
        with_last_error(|m| assert_eq!(m, "here"));
        set_last_error("a\0b".into());
        with_last_error(|m| assert_eq!(m, "a\\0b"));
        clear_last_error();
        with_last_error(|m| assert_eq!(m, ""));
    }
}
