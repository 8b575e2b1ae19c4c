//! Token batches for `llama_decode`.

use super::{Pos, SeqId, Token};
use crate::error::{Error, Result};
use crate::sys;

/// A batch of tokens with their positions, sequence ids and output flags,
/// freed on drop.
#[derive(Debug)]
pub struct Batch {
    raw: sys::llama_batch,
    capacity: usize,
    max_seqs: usize,
}

impl Batch {
    /// A batch that holds up to `capacity` tokens, each in up to `max_seqs`
    /// sequences.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when either is zero or exceeds `i32::MAX`.
    pub fn new(capacity: usize, max_seqs: usize) -> Result<Self> {
        let invalid = |param, reason: &str| Error::InvalidArgument {
            param,
            reason: reason.to_string(),
        };
        let cap = i32::try_from(capacity)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| invalid("capacity", "must be in 1..=i32::MAX"))?;
        let seqs = i32::try_from(max_seqs)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| invalid("max_seqs", "must be in 1..=i32::MAX"))?;
        // SAFETY: positive sizes; llama_batch_init allocates every array for
        // `cap` tokens (token, pos, n_seq_id, seq_id[cap][seqs], logits).
        let raw = unsafe { sys::llama_batch_init(cap, 0, seqs) };
        if raw.token.is_null() || raw.seq_id.is_null() {
            return Err(Error::InvalidArgument {
                param: "capacity",
                reason: "llama_batch_init could not allocate".into(),
            });
        }
        Ok(Self {
            raw: sys::llama_batch { n_tokens: 0, ..raw },
            capacity,
            max_seqs,
        })
    }

    /// Removes all tokens.
    pub fn clear(&mut self) {
        self.raw.n_tokens = 0;
    }

    /// Number of tokens in the batch.
    pub fn len(&self) -> usize {
        self.raw.n_tokens as usize
    }

    /// Whether the batch holds no token.
    pub fn is_empty(&self) -> bool {
        self.raw.n_tokens == 0
    }

    /// Maximum number of tokens.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends a token at `pos` in `seqs`; `logits` asks llama.cpp to
    /// compute its output.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the batch is full or `seqs` is empty
    /// or longer than the batch's `max_seqs`.
    pub fn add(&mut self, token: Token, pos: Pos, seqs: &[SeqId], logits: bool) -> Result<()> {
        let i = self.len();
        if i >= self.capacity {
            return Err(Error::InvalidArgument {
                param: "batch",
                reason: format!("full ({} tokens)", self.capacity),
            });
        }
        if seqs.is_empty() || seqs.len() > self.max_seqs {
            return Err(Error::InvalidArgument {
                param: "seqs",
                reason: format!("need 1..={} sequence ids, got {}", self.max_seqs, seqs.len()),
            });
        }
        // SAFETY: i < capacity, and every array was allocated for `capacity`
        // tokens; seq_id[i] has room for max_seqs ids (checked above).
        unsafe {
            *self.raw.token.add(i) = token;
            *self.raw.pos.add(i) = pos;
            *self.raw.n_seq_id.add(i) = seqs.len() as i32;
            let ids = *self.raw.seq_id.add(i);
            for (k, &s) in seqs.iter().enumerate() {
                *ids.add(k) = s;
            }
            *self.raw.logits.add(i) = i8::from(logits);
        }
        self.raw.n_tokens += 1;
        Ok(())
    }

    /// The token ids added so far.
    pub fn tokens(&self) -> &[Token] {
        if self.is_empty() {
            return &[];
        }
        // SAFETY: `token` was allocated for `capacity` ids by
        // llama_batch_init, and the first `n_tokens <= capacity` were
        // written by `add`.
        unsafe { std::slice::from_raw_parts(self.raw.token, self.len()) }
    }

    pub(crate) fn raw(&self) -> sys::llama_batch {
        self.raw
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // SAFETY: raw came from llama_batch_init and is freed once.
        unsafe { sys::llama_batch_free(self.raw) }
    }
}
