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

#![cfg_attr(not(feature = "preload"), allow(dead_code))]

pub(crate) mod config;
pub(crate) mod guard;
pub(crate) mod host;
#[cfg(feature = "preload")]
mod interpose;
pub(crate) mod log;
pub(crate) mod real;
pub(crate) mod shadow;
pub(crate) mod track;

use std::sync::OnceLock;

use host::Engine;

/// The engine, when the environment asks for compression and the host
/// passed the guard; read once, with one line on stderr when a variable is
/// invalid or the host is refused.
pub(crate) fn engine() -> Option<&'static Engine> {
    static ENGINE: OnceLock<Option<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let settings = match config::from_env(|k| std::env::var(k).ok()) {
                Ok(Some(s)) => s,
                Ok(None) => return None,
                Err(why) => {
                    eprintln!("snapkv: {why}; passing through (no compression)");
                    return None;
                }
            };
            if let Err(why) = guard::check_host() {
                eprintln!("snapkv: {why}; passing through (no compression)");
                return None;
            }
            match crate::Compressor::new(settings.config.clone()) {
                Ok(compressor) => {
                    if settings.log >= config::LogLevel::Compressions {
                        eprintln!(
                            "snapkv: compressing prompts to {} per KV head (window {}, from {} tokens)",
                            match settings.config.budget {
                                crate::Budget::Cells(c) => format!("{c} cells"),
                                crate::Budget::Fraction(f) => format!("{:.1}% of their cells", f * 100.0),
                            },
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
