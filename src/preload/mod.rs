//! SnapKV inside llama.cpp's own programs, by preloading: built as
//! `libsnapkv_preload.so` (the `snapkv-preload` crate), named in
//! `LD_PRELOAD` of a program dynamically linked to the pinned tree's
//! `libllama.so` (llama-server, llama-cli, llama-completion, programs on
//! `llama_decode` such as llama.cpp's examples), it wraps the
//! few llama.cpp entry points it needs and compresses each sequence right
//! after its prompt was evaluated.
//!
//! - [`interpose`]: the exported wrappers (feature `preload` only); each
//!   forwards to the host's function exactly once, with our work around it
//!   caught so that no panic reaches the host;
//! - [`host`]: the per-context records and the decisions;
//! - [`shadow`]: what the host put in its opaque `llama_batch_ext`s;
//! - [`track`]: sequences, compressed prompts and the position rules the
//!   host sees (`pos_min`, removals);
//! - [`config`]: the `SNAPKV_*` environment variables;
//! - [`guard`]: the version guard;
//! - [`real`]: the host's own functions behind ours;
//! - [`log`]: lines in the host's log.
//!
//! Without `SNAPKV_BUDGET` the library forwards every call and does
//! nothing else.
//!
//! The same wrappers and engine serve a program on llama-cpp-2 that links
//! snapkv with the feature `llama-cpp-sys-2` ([`crate::linked`]): there the
//! link's `--wrap` routes the calls, and the program may configure the
//! engine before its first context instead of the environment.

#![cfg_attr(not(feature = "preload"), allow(dead_code))]

pub(crate) mod config;
pub(crate) mod guard;
pub(crate) mod host;
#[cfg(any(feature = "preload", feature = "llama-cpp-sys-2"))]
mod interpose;
pub(crate) mod log;
pub(crate) mod real;
pub(crate) mod shadow;
pub(crate) mod track;

use std::sync::OnceLock;

use host::Engine;

static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();

/// Settings a program linked to us gave [`crate::linked::enable`] before
/// the engine started; they take the place of the environment.
static PROGRAM_SETTINGS: OnceLock<config::Settings> = OnceLock::new();

/// Records a program's settings. `Err(())` when the engine has already
/// started (a context was created, or settings were given before).
#[cfg(feature = "llama-cpp-sys-2")]
pub(crate) fn set_program_settings(settings: config::Settings) -> Result<(), ()> {
    if ENGINE.get().is_some() {
        return Err(());
    }
    PROGRAM_SETTINGS.set(settings).map_err(|_| ())
}

/// The engine, when the program's settings or the environment ask for
/// compression and the host passed the guard; decided once, with one line
/// on stderr when a variable is invalid or the host is refused.
pub(crate) fn engine() -> Option<&'static Engine> {
    ENGINE
        .get_or_init(|| {
            let settings = match PROGRAM_SETTINGS.get() {
                Some(s) => s.clone(),
                None => match config::from_env(|k| std::env::var(k).ok()) {
                    Ok(Some(s)) => s,
                    Ok(None) => return None,
                    Err(why) => {
                        eprintln!("snapkv: {why}; passing through (no compression)");
                        return None;
                    }
                },
            };
            // A preloaded library meets whatever llama.cpp the host has; a
            // linked one was compiled against the llama.cpp it links.
            #[cfg(feature = "preload")]
            if let Err(why) = guard::check_host() {
                eprintln!("snapkv: {why}; passing through (no compression)");
                return None;
            }
            match crate::Compressor::with_method(settings.config.clone(), settings.method) {
                Ok(compressor) => {
                    if settings.log >= config::LogLevel::Compressions {
                        eprintln!(
                            "snapkv: compressing prompts to {} per KV head ({}, window {}, from {} tokens)",
                            match settings.config.budget {
                                crate::Budget::Cells(c) => format!("{c} cells"),
                                crate::Budget::Fraction(f) => format!("{:.1}% of their cells", f * 100.0),
                            },
                            settings.method,
                            settings.config.window,
                            settings.min_prompt
                        );
                    }
                    Some(Engine { settings, compressor })
                }
                Err(e) => {
                    eprintln!("snapkv: {e}; passing through (no compression)");
                    None
                }
            }
        })
        .as_ref()
}
