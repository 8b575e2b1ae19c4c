//! Selection methods under trial: measured by `snapkv eval`, not (yet) part
//! of the library. A method moves into the library once it wins where it is
//! measured; until then it lives here, beside the harness that measures it,
//! and reaches the engine through the library's public [`Selector`] trait
//! ([`Compressor::with_selector`]).
//!
//! - `reconstruct-shared` ([`shared`]): reconstruction scores, most of each
//!   KV head's cells chosen by its layer.
//! - `surprisal` ([`surprisal`]): the document's least predictable tokens,
//!   the same for every head.
//! - `reconstruct-surprisal-quarter` and `-half`: that share of the cells to
//!   the least predictable tokens first, the rest as `reconstruct-shared`.
//!
//! The surprisal methods need the document's own token scores, which only
//! `snapkv eval --protocol question-agnostic` computes
//! ([`DocumentScores`]); elsewhere they refuse to select.

pub mod memo;
pub mod shared;
pub mod surprisal;

use std::sync::Arc;

use snapkv::llama::Pos;
use snapkv::snapkv::{selector_by_name, Selector, SnapKvConfig};
use snapkv::Preset;
use snapkv::{Compressor, Context, Error, Result};

use crate::{Branch, Method, Snapshot};
use memo::ScoreMemo;
use shared::ReconstructSharedSelector;
use surprisal::{mean_pool_centred, SurprisalSelector};

/// The names of the methods under trial ([`trial_selector`]).
pub const TRIAL_NAMES: [&str; 4] = [
    "reconstruct-shared",
    "surprisal",
    "reconstruct-surprisal-quarter",
    "reconstruct-surprisal-half",
];

/// Whether the method under trial called `name` needs the document's token
/// surprisal ([`surprisal::token_surprisal`]).
pub fn needs_surprisal(name: &str) -> bool {
    name.contains("surprisal")
}

/// The method under trial called `name`, if there is one. `surprisal`: one
/// score per prefix index (pooled) for the methods that need it; without
/// it they refuse to select.
pub fn trial_selector(name: &str, surprisal: Option<Arc<[f32]>>) -> Option<Box<dyn Selector>> {
    let scores = || surprisal.clone().unwrap_or_else(|| Arc::from(Vec::new()));
    Some(match name {
        "reconstruct-shared" => Box::new(ReconstructSharedSelector::new()),
        "surprisal" => Box::new(SurprisalSelector::new(scores())),
        "reconstruct-surprisal-quarter" => Box::new(ReconstructSharedSelector::with_first(
            "reconstruct-surprisal-quarter",
            scores(),
            0.25,
        )),
        "reconstruct-surprisal-half" => Box::new(ReconstructSharedSelector::with_first(
            "reconstruct-surprisal-half",
            scores(),
            0.5,
        )),
        _ => return None,
    })
}

/// The preset a method starts from when none is named: the library's
/// ([`Preset::for_method`]), and for the methods under trial that score by
/// reconstruction `reconstruct`'s own.
pub fn preset_for(name: &str) -> Preset {
    match trial_selector(name, None) {
        Some(s) if s.needs_scores() && s.score_basis() == snapkv::snapkv::ScoreBasis::Reconstruction => {
            Preset::Reconstruct
        }
        _ => Preset::for_method(name),
    }
}

/// What the methods of one document share: its token surprisal (when a
/// method needs it) and the reconstruction scores recorded for it
/// ([`ScoreMemo`]).
#[derive(Debug)]
pub struct DocumentScores {
    surprisal: Option<Vec<f32>>,
    memo: Arc<ScoreMemo>,
}

impl DocumentScores {
    /// The shared scores of a new document; `surprisal`: one per token
    /// (position), or `None` when no method needs it.
    pub fn new(surprisal: Option<Vec<f32>>) -> Self {
        DocumentScores {
            surprisal,
            memo: ScoreMemo::new(),
        }
    }

    /// The method called `name` with `config`, as [`Method::by_name`], with
    /// the document's surprisal (averaged over a centred window of the
    /// configuration's kernel) and its reconstruction scores recorded or
    /// replayed. Returns the method and whether it replays recorded scores
    /// (its branch must then redo the last token, as [`Self::branch`] does).
    fn method(&self, name: &str, config: SnapKvConfig) -> Result<(Method, bool)> {
        if name == "full" {
            return Ok((Method::Full, false));
        }
        let pooled = self
            .surprisal
            .as_ref()
            .map(|s| Arc::from(mean_pool_centred(s, config.kernel)));
        let selector = trial_selector(name, pooled)
            .or_else(|| selector_by_name(name))
            .ok_or_else(|| Error::InvalidArgument {
                param: "method",
                reason: format!("unknown method {name:?}"),
            })?;
        let (selector, replays) = self.memo.wrap(selector, &config);
        Ok((Method::Compress(Compressor::with_selector(config, selector)?), replays))
    }

    /// [`branch()`](crate::branch()) with the method called `name` and `config`, given
    /// the document's surprisal and its recorded reconstruction scores. A
    /// branch that replays recorded scores decodes the prompt's last token
    /// again over the compressed cache, as the engine does after a repeat,
    /// so that its cache is the one a fresh reconstruction leaves. Returns
    /// the branch and whether it replayed.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an unknown name; [`Error::Algo`] for an
    /// invalid configuration; branch and decode errors.
    pub fn branch(
        &self,
        ctx: &mut Context<'_>,
        snapshot: &Snapshot,
        name: &str,
        config: SnapKvConfig,
    ) -> Result<(Branch, bool)> {
        let (method, replays) = self.method(name, config)?;
        let branch = crate::branch(ctx, snapshot, &method)?;
        if replays {
            let last = *snapshot
                .window()
                .last()
                .ok_or(Error::EmptySequence { seq: snapshot.seq() })?;
            memo::redo_last_token(ctx, snapshot.seq(), last, snapshot.n_prompt() as Pos - 1)?;
        }
        Ok((branch, replays))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trial_names_resolve() {
        for name in TRIAL_NAMES {
            assert_eq!(trial_selector(name, None).unwrap().name(), name);
        }
        assert!(trial_selector("snapkv", None).is_none());
        assert!(needs_surprisal("reconstruct-surprisal-half") && !needs_surprisal("reconstruct-shared"));
        assert_eq!(preset_for("reconstruct-shared"), Preset::Reconstruct);
        assert_eq!(preset_for("reconstruct-surprisal-quarter"), Preset::Reconstruct);
        assert_eq!(preset_for("reconstruct"), Preset::Reconstruct);
        assert_eq!(preset_for("surprisal"), Preset::Default);
        assert_eq!(preset_for("snapkv"), Preset::Default);
    }
}
