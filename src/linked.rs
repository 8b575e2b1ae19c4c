//! SnapKV for a program on [llama-cpp-2](https://docs.rs/llama-cpp-2): its
//! own model, context and batch types, one llama.cpp in the binary.
//!
//! With the feature `llama-cpp-sys-2`, snapkv builds no llama.cpp: it binds
//! and calls the one llama-cpp-sys-2 builds. llama-cpp-2 does not hand out
//! its raw context pointers, so snapkv meets the contexts where they pass:
//! the program's link sends its calls of a few llama.cpp functions (creating
//! and freeing contexts, decoding, removing or copying cells, saving and
//! loading sequence state) to snapkv's wrappers, with the GNU linker's
//! `--wrap`. Each wrapper calls llama.cpp's own function exactly once; around
//! that call the engine of the `LD_PRELOAD` library (docs/preload.md) does
//! what it does inside llama-server: it attaches an observer when a context
//! is created, notices the end of a prompt (a batch of two or more tokens of
//! a sequence whose last token asks for logits, followed by a batch that
//! gives it one token at the next position), and compresses the sequence to
//! the budget before that next batch runs, from the window queries it saw
//! while the prompt was evaluated.
//!
//! Two things in the program:
//!
//! 1. its `build.rs` passes the link option this crate publishes (Cargo
//!    gives it to direct dependents as `DEP_SNAPKV_WRAP_LINK_ARG`):
//!
//!    ```no_run
//!    // build.rs of the program
//!    fn main() {
//!        let arg = std::env::var("DEP_SNAPKV_WRAP_LINK_ARG").expect("snapkv with feature llama-cpp-sys-2");
//!        println!("cargo:rustc-link-arg={arg}");
//!    }
//!    ```
//!    (Without it the link fails on undefined `__real_llama_…` symbols.)
//! 2. before its first context, it calls [`enable`] (or sets
//!    `SNAPKV_BUDGET` and the other variables of docs/preload.md).
//!
//! Then the program decodes, samples and reuses its cache as it always did;
//! a compressed sequence answers the same position queries the preload
//! documents (`pos_min` is the compressed prompt's last position). Without
//! [`enable`] and without `SNAPKV_BUDGET`, every wrapper only forwards.
//!
//! Linux only (ELF, GNU ld or lld). `examples/llama-cpp-2` is a complete
//! program.

use crate::error::{Error, Result};
use crate::preload::config::{LogLevel, Settings};
use crate::snapkv::config::SnapKvConfig;

/// What [`enable`] sets: the compression and when it applies.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkedSettings {
    /// The compression applied to each prompt (its budget, window, ...).
    pub config: SnapKvConfig,
    /// The selection method: `snapkv` (the default), `keydiff` or
    /// `reconstruct` (question-agnostic, for a conversation that goes on
    /// asking about the prompt after its first question).
    pub method: String,
    /// Prompts shorter than this many tokens are left alone.
    pub min_prompt: usize,
    /// One line on stderr per compression (cells before and after, memory,
    /// time), like the preload's `SNAPKV_LOG=1`.
    pub log: bool,
}

impl LinkedSettings {
    /// `config` for every prompt, logged.
    pub fn new(config: SnapKvConfig) -> Self {
        Self {
            config,
            method: "snapkv".into(),
            min_prompt: 0,
            log: true,
        }
    }
}

/// Turns compression on for the contexts the program creates from now on.
///
/// # Errors
/// - [`Error::Algo`] when the configuration is invalid;
/// - [`Error::InvalidArgument`] for a method other than `snapkv`, `keydiff`
///   and `reconstruct`;
/// - [`Error::Unsupported`] when compression was already set up: by an
///   earlier call, or because a context was created (or the wrappers were
///   first reached) before this call, which decides from the environment.
pub fn enable(settings: LinkedSettings) -> Result<()> {
    settings.config.validate()?;
    let method = crate::preload::config::method(&settings.method).map_err(|reason| Error::InvalidArgument {
        param: "method",
        reason: format!("{:?}: {reason}", settings.method),
    })?;
    let settings = Settings {
        config: settings.config,
        method,
        min_prompt: settings.min_prompt,
        log: if settings.log {
            LogLevel::Compressions
        } else {
            LogLevel::Off
        },
    };
    crate::preload::set_program_settings(settings).map_err(|()| {
        Error::Unsupported(
            "snapkv::linked::enable must be called once, before the program's first llama.cpp context".into(),
        )
    })
}
