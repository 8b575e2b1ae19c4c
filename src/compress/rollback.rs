//! Putting a sequence back as it was when a compression fails — by error or
//! by panic.
//!
//! Every entry point holds one [`Rollback`] from the moment it first
//! changes the sequence. Committed, it does nothing; dropped uncommitted
//! (an error returned with `?` inside the guarded work, or a panic
//! unwinding through it, from a user's `Selector` say) it puts the
//! sequence back. [`Rollback::fail`] does the same for an error and says
//! whether the restore held: the error is passed on as it was when the
//! sequence is back, and becomes [`Error::RestoreFailed`] only when it is
//! not — never both.

use std::ops::{Deref, DerefMut};

use crate::error::{Error, Result};
use crate::llama::{ContextRef, Pos, SeqId};

/// What puts the sequence back.
enum Undo<'s> {
    /// Write this state of the sequence back (`llama_state_seq_set_data`).
    State(&'s [u8]),
    /// Remove the cells at positions from `from` on (what a call added).
    Truncate { from: Pos },
}

/// Restores one sequence unless committed. Dereferences to the context, so
/// the guarded work uses the context through it.
pub(super) struct Rollback<'c, 's> {
    ctx: &'c mut ContextRef,
    seq: SeqId,
    undo: Option<Undo<'s>>,
}

impl<'c, 's> Rollback<'c, 's> {
    /// Restores `seq` to `state` (its state blob, read before the change).
    pub(super) fn to_state(ctx: &'c mut ContextRef, seq: SeqId, state: &'s [u8]) -> Self {
        Self {
            ctx,
            seq,
            undo: Some(Undo::State(state)),
        }
    }

    /// Removes what was evaluated into `seq` from position `from` on. Only
    /// exact while the sequence's positions are true (uncompressed): nest a
    /// [`to_state`](Self::to_state) guard inside it around the compaction.
    pub(super) fn truncating(ctx: &'c mut ContextRef, seq: SeqId, from: Pos) -> Self {
        Self {
            ctx,
            seq,
            undo: Some(Undo::Truncate { from }),
        }
    }

    /// Keeps the changes.
    pub(super) fn commit(mut self) {
        self.undo = None;
    }

    /// Puts the sequence back after `cause` and returns the error to report:
    /// `cause` itself when the sequence is back, [`Error::RestoreFailed`]
    /// when it could not be put back.
    pub(super) fn fail(mut self, cause: Error) -> Error {
        match self.undo.take().map(|undo| self.apply(undo)) {
            Some(Err(restore)) => Error::RestoreFailed {
                cause: cause.to_string(),
                restore,
            },
            _ => cause,
        }
    }

    /// Runs `work` on the guarded context, then commits on success or puts
    /// the sequence back on error ([`fail`](Self::fail)); a panic in `work`
    /// unwinds through the guard, which puts the sequence back on drop.
    pub(super) fn run<T>(mut self, work: impl FnOnce(&mut ContextRef) -> Result<T>) -> Result<T> {
        match work(&mut self) {
            Ok(value) => {
                self.commit();
                Ok(value)
            }
            Err(err) => Err(self.fail(err)),
        }
    }

    fn apply(&mut self, undo: Undo<'_>) -> std::result::Result<(), String> {
        match undo {
            Undo::State(state) => self.ctx.state_seq_set(self.seq, state).map_err(|e| e.to_string()),
            Undo::Truncate { from } => {
                if self.ctx.seq_pos_max(self.seq).is_some_and(|last| last >= from)
                    && !self.ctx.seq_rm(self.seq, from, -1)
                {
                    return Err(format!(
                        "llama.cpp could not remove positions {from}.. of sequence {}",
                        self.seq
                    ));
                }
                Ok(())
            }
        }
    }
}

impl Drop for Rollback<'_, '_> {
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            // Reached only when unwinding from a panic (errors go through
            // `fail`): there is no error to return, so say it in the log.
            if let Err(e) = self.apply(undo) {
                log::error!(
                    "snapkv: sequence {} could not be restored while unwinding: {e}",
                    self.seq
                );
            }
        }
    }
}

impl Deref for Rollback<'_, '_> {
    type Target = ContextRef;
    fn deref(&self) -> &ContextRef {
        self.ctx
    }
}

impl DerefMut for Rollback<'_, '_> {
    fn deref_mut(&mut self) -> &mut ContextRef {
        self.ctx
    }
}
