//! Shadow copies of the host's `llama_batch_ext` batches.
//!
//! A `llama_batch_ext` is opaque: llama.h has setters but no getters. The
//! interposer sees every setter call the host makes (they are exported
//! functions of libllama), mirrors it here, and so knows, when the batch is
//! processed, which tokens of which sequences at which positions it holds
//! and which of them ask for logits.

use crate::sys::{llama_pos, llama_seq_id, llama_token};

/// One entry of a batch as the host filled it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The token, or `None` for an embedding row.
    pub token: Option<llama_token>,
    /// The first sequence it belongs to.
    pub seq: llama_seq_id,
    /// Whether it belongs to more sequences than `seq`.
    pub shared: bool,
    /// Its position, if the host set one (llama.cpp infers it otherwise).
    pub pos: Option<llama_pos>,
    /// Whether the host asked for its logits or embeddings.
    pub output: bool,
}

/// What the interposer knows of one host batch.
#[derive(Debug, Default, Clone)]
pub(crate) struct ShadowBatch {
    pub entries: Vec<Entry>,
    /// A setter failed to be mirrored (an index we never saw): the batch
    /// is not understood, and nothing it evaluates is compressed.
    pub unknown: bool,
}

impl ShadowBatch {
    pub fn clear(&mut self) {
        self.entries.clear();
        self.unknown = false;
    }

    /// Mirrors `llama_batch_ext_add*`, which returned `idx` (negative: the
    /// host's call failed and added nothing).
    pub fn add(&mut self, idx: i32, seq: llama_seq_id, token: Option<llama_token>) {
        if idx < 0 {
            return;
        }
        if idx as usize != self.entries.len() {
            self.unknown = true;
            return;
        }
        self.entries.push(Entry {
            token,
            seq,
            shared: false,
            pos: None,
            output: false,
        });
    }

    fn entry(&mut self, idx: i32) -> Option<&mut Entry> {
        let found = usize::try_from(idx).ok().and_then(|i| self.entries.get_mut(i));
        if found.is_none() {
            self.unknown = true;
        }
        found
    }

    /// Mirrors a successful `llama_batch_ext_add_seq`.
    pub fn add_seq(&mut self, idx: i32) {
        if let Some(e) = self.entry(idx) {
            e.shared = true;
        }
    }

    /// Mirrors a successful `llama_batch_ext_set_pos` (the first position
    /// component; M-RoPE models have more, and are not compressed).
    pub fn set_pos(&mut self, idx: i32, pos: llama_pos) {
        if let Some(e) = self.entry(idx) {
            e.pos = Some(pos);
        }
    }

    /// Mirrors a successful `llama_batch_ext_set_output_*`.
    pub fn set_output(&mut self, idx: i32, value: bool) {
        if let Some(e) = self.entry(idx) {
            e.output = value;
        }
    }
}

/// One sequence's part of a batch, when it is a plain run of tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SeqRun {
    pub seq: llama_seq_id,
    /// Its tokens in batch order.
    pub tokens: Vec<llama_token>,
    /// The position of its first token.
    pub first_pos: llama_pos,
    /// Whether its last token asks for output (a prompt's end, or a
    /// generation step).
    pub ends_with_output: bool,
    /// How many of its tokens ask for output.
    pub outputs: usize,
    /// Whether its tokens are the last ones of the batch.
    pub at_batch_end: bool,
}

/// How the batch's entries divide among sequences: one run per sequence
/// whose entries are tokens at consecutive positions, none shared with
/// another sequence. `Err(seq)` names a sequence whose part is not such a
/// run (embeddings, shared entries, unset or gapped positions): it is not
/// compressed from this batch.
pub(crate) fn runs(batch: &ShadowBatch) -> Vec<Result<SeqRun, llama_seq_id>> {
    let mut order: Vec<llama_seq_id> = Vec::new();
    for e in &batch.entries {
        if !order.contains(&e.seq) {
            order.push(e.seq);
        }
    }
    let last_seq = batch.entries.last().map(|e| e.seq);
    order
        .into_iter()
        .map(|seq| {
            let mine: Vec<(usize, &Entry)> = batch.entries.iter().enumerate().filter(|(_, e)| e.seq == seq).collect();
            let mut tokens = Vec::with_capacity(mine.len());
            let first_pos = mine[0].1.pos.ok_or(seq)?;
            for (k, (_, e)) in mine.iter().enumerate() {
                let token = e.token.ok_or(seq)?;
                if e.shared || e.pos != Some(first_pos + k as llama_pos) {
                    return Err(seq);
                }
                tokens.push(token);
            }
            let (last_idx, last) = mine[mine.len() - 1];
            // Contiguous at the end: the last entries of the batch are
            // exactly this sequence's.
            let contiguous = mine.windows(2).all(|w| w[1].0 == w[0].0 + 1);
            Ok(SeqRun {
                seq,
                tokens,
                first_pos,
                ends_with_output: last.output,
                outputs: mine.iter().filter(|(_, e)| e.output).count(),
                at_batch_end: contiguous && last_seq == Some(seq) && last_idx + 1 == batch.entries.len(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(entries: &[(llama_seq_id, llama_token, llama_pos, bool)]) -> ShadowBatch {
        let mut b = ShadowBatch::default();
        for (i, &(seq, token, pos, output)) in entries.iter().enumerate() {
            b.add(i as i32, seq, Some(token));
            b.set_pos(i as i32, pos);
            b.set_output(i as i32, output);
        }
        b
    }

    #[test]
    fn a_prompt_chunk_after_another_sequences_step_is_a_run_at_the_end() {
        let b = filled(&[(1, 7, 40, true), (0, 1, 0, false), (0, 2, 1, false), (0, 3, 2, true)]);
        let r = runs(&b);
        assert_eq!(r[0].as_ref().unwrap().tokens, vec![7]);
        assert!(!r[0].as_ref().unwrap().at_batch_end);
        let prompt = r[1].as_ref().unwrap();
        assert_eq!(
            (prompt.seq, prompt.first_pos, prompt.tokens.clone()),
            (0, 0, vec![1, 2, 3])
        );
        assert!(prompt.ends_with_output && prompt.at_batch_end);
    }

    #[test]
    fn gaps_shared_entries_and_unset_positions_are_not_runs() {
        let gap = filled(&[(0, 1, 0, false), (0, 2, 2, true)]);
        assert_eq!(runs(&gap), vec![Err(0)]);
        let mut shared = filled(&[(0, 1, 0, false), (0, 2, 1, true)]);
        shared.add_seq(0);
        assert_eq!(runs(&shared), vec![Err(0)]);
        let mut unset = ShadowBatch::default();
        unset.add(0, 3, Some(9));
        assert_eq!(runs(&unset), vec![Err(3)]);
    }

    #[test]
    fn interleaved_sequences_are_runs_but_not_at_the_end() {
        let b = filled(&[(0, 1, 0, false), (1, 5, 0, false), (0, 2, 1, true), (1, 6, 1, true)]);
        let r = runs(&b);
        assert!(r.iter().all(|x| x.is_ok()));
        assert!(
            !r[1].as_ref().unwrap().at_batch_end,
            "seq 1's entries are not contiguous"
        );
    }

    #[test]
    fn setters_on_unseen_indices_mark_the_batch_unknown() {
        let mut b = ShadowBatch::default();
        b.add(1, 0, Some(1));
        assert!(b.unknown);
        b.clear();
        b.set_output(0, true);
        assert!(b.unknown);
        b.clear();
        assert!(!b.unknown && b.entries.is_empty());
    }
}
