//! What the interposer knows of each sequence of a host context: the last
//! tokens decoded into it (the window a deferred compression evaluates
//! again), and, once compressed, where its compressed prompt ends.
//!
//! The position rules live here, apart from llama.cpp, so that they can be
//! tested on their own:
//! - a compressed sequence whose prompt ended at position `P` reports
//!   `llama_memory_seq_pos_min` as at least `P - 1`. llama-server keeps a
//!   cached prefix of `n` tokens only when `pos_min < n` (its SWA check):
//!   so it reuses the compressed cells only for a new prompt that starts
//!   with the whole compressed prompt (a follow-up turn), and evaluates any
//!   other prompt again from the start;
//! - removing a suffix that starts inside the compressed range would leave
//!   cells that stand for the removed tokens too (each KV head kept other
//!   positions): the whole sequence is removed instead, so a host that
//!   then decodes from the middle gets llama.cpp's position error, never
//!   an answer computed from the wrong cells.

use std::collections::{HashMap, VecDeque};

use crate::sys::{llama_pos, llama_seq_id, llama_token};

/// One sequence.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SeqTrack {
    /// The last tokens decoded, ending at `next_pos - 1`.
    tail: VecDeque<llama_token>,
    /// The position after the last token decoded.
    next_pos: llama_pos,
    /// Set once compressed: the position after its compressed prompt.
    pub compressed_end: Option<llama_pos>,
}

/// What a `llama_memory_seq_rm` call on a tracked sequence does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// Forward it as the host asked.
    AsAsked,
    /// Remove the whole sequence instead: the range starts inside a
    /// compressed prompt and runs to the end.
    WholeSequence,
}

/// The sequences of one context.
#[derive(Debug, Default)]
pub(crate) struct Tracks {
    seqs: HashMap<llama_seq_id, SeqTrack>,
    /// The window: the tokens [`window_tokens`](Self::window_tokens) gives.
    window: usize,
    /// How many tokens each tail keeps: the window, or every token for a
    /// method that reads the whole sequence.
    keep: usize,
}

fn end_of(p1: llama_pos) -> llama_pos {
    if p1 < 0 {
        llama_pos::MAX
    } else {
        p1
    }
}

impl Tracks {
    /// Tails of the last `window` tokens.
    pub fn new(window: usize) -> Self {
        Self {
            seqs: HashMap::new(),
            window,
            keep: window,
        }
    }

    /// Tails of every token since position 0 as well
    /// ([`whole_sequence`](Self::whole_sequence)), for a method that reads
    /// the whole sequence.
    pub fn keeping_every_token(window: usize) -> Self {
        Self {
            keep: usize::MAX,
            ..Self::new(window)
        }
    }

    pub fn get(&self, seq: llama_seq_id) -> Option<&SeqTrack> {
        self.seqs.get(&seq)
    }

    /// Records tokens decoded into `seq` from position `first`. A run that
    /// does not continue the tail starts a new one.
    pub fn decoded(&mut self, seq: llama_seq_id, first: llama_pos, tokens: &[llama_token]) {
        let t = self.seqs.entry(seq).or_default();
        if first != t.next_pos {
            t.tail.clear();
        }
        if first < t.next_pos {
            // Decoding over positions a compressed prompt covered: the
            // host removed them (seq_rm keeps this consistent); be safe.
            if t.compressed_end.is_some_and(|end| first < end) {
                t.compressed_end = None;
            }
        }
        for &tok in tokens {
            if t.tail.len() == self.keep {
                t.tail.pop_front();
            }
            t.tail.push_back(tok);
        }
        t.next_pos = first + tokens.len() as llama_pos;
    }

    /// `seq` got tokens this tracker could not follow (embeddings, shared
    /// entries): its tail is unknown until a new run starts.
    pub fn tail_unknown(&mut self, seq: llama_seq_id) {
        if let Some(t) = self.seqs.get_mut(&seq) {
            t.tail.clear();
            t.next_pos = llama_pos::MIN;
        }
    }

    /// The last `window` tokens of `seq`, when they were all seen.
    pub fn window_tokens(&self, seq: llama_seq_id) -> Option<Vec<llama_token>> {
        let t = self.seqs.get(&seq)?;
        (t.tail.len() >= self.window).then(|| t.tail.iter().skip(t.tail.len() - self.window).copied().collect())
    }

    /// Every token of `seq`, when its tail holds them all from position 0
    /// (only with [`keeping_every_token`](Self::keeping_every_token)).
    pub fn whole_sequence(&self, seq: llama_seq_id) -> Option<Vec<llama_token>> {
        let t = self.seqs.get(&seq)?;
        (t.next_pos > 0 && t.tail.len() == t.next_pos as usize).then(|| t.tail.iter().copied().collect())
    }

    /// `seq` was compressed; its prompt ended before `end`.
    pub fn compressed(&mut self, seq: llama_seq_id, end: llama_pos) {
        self.seqs.entry(seq).or_default().compressed_end = Some(end);
    }

    /// The `llama_memory_seq_pos_min` the host sees, given llama.cpp's.
    pub fn reported_pos_min(&self, seq: llama_seq_id, actual: llama_pos) -> llama_pos {
        match self.seqs.get(&seq).and_then(|t| t.compressed_end) {
            Some(end) if actual >= 0 => actual.max(end - 1),
            _ => actual,
        }
    }

    /// What removing `[p0, p1)` of `seq` (every sequence when negative)
    /// does, given that llama.cpp's smallest position of `seq` is
    /// `pos_min`.
    pub fn removal(&self, seq: llama_seq_id, p0: llama_pos, p1: llama_pos, pos_min: llama_pos) -> Removal {
        let Some(end) = self.seqs.get(&seq).and_then(|t| t.compressed_end) else {
            return Removal::AsAsked;
        };
        let (p0, p1) = (p0.max(0), end_of(p1));
        let inside = p0 > pos_min && p0 < end;
        if inside && p1 == llama_pos::MAX {
            Removal::WholeSequence
        } else {
            Removal::AsAsked
        }
    }

    /// The sequences a position operation on `seq` touches (every one when
    /// `seq < 0`).
    fn targets(&self, seq: llama_seq_id) -> Vec<llama_seq_id> {
        if seq < 0 {
            self.seqs.keys().copied().collect()
        } else {
            vec![seq]
        }
    }

    /// Records that `[p0, p1)` of `seq` (every sequence when `seq < 0`) is
    /// gone.
    pub fn removed(&mut self, seq: llama_seq_id, p0: llama_pos, p1: llama_pos) {
        let (p0, p1) = (p0.max(0), end_of(p1));
        for s in self.targets(seq) {
            let Some(t) = self.seqs.get_mut(&s) else { continue };
            if p0 == 0 && p1 == llama_pos::MAX {
                self.seqs.remove(&s);
                continue;
            }
            if p1 == llama_pos::MAX && p0 < t.next_pos {
                // A suffix: the tail loses its tokens at p0 and after.
                let drop = (t.next_pos - p0) as usize;
                for _ in 0..drop.min(t.tail.len()) {
                    t.tail.pop_back();
                }
                if drop > t.tail.len() {
                    t.tail.clear();
                }
                t.next_pos = p0;
            } else if p0 < t.next_pos {
                // A middle range (context shift): the tail no longer
                // follows from consecutive positions.
                t.tail.clear();
            }
            if t.compressed_end.is_some_and(|end| p0 < end && p1 >= end) {
                t.compressed_end = None;
            }
        }
    }

    /// Records `llama_memory_seq_add(seq, p0, p1, delta)`.
    pub fn shifted(&mut self, seq: llama_seq_id, p0: llama_pos, p1: llama_pos, delta: llama_pos) {
        let (p0, p1) = (p0.max(0), end_of(p1));
        for s in self.targets(seq) {
            let Some(t) = self.seqs.get_mut(&s) else { continue };
            if p0 < t.next_pos && t.next_pos <= p1 {
                t.next_pos += delta;
            } else {
                t.tail.clear();
            }
            if let Some(end) = t.compressed_end {
                if p0 < end && end <= p1 {
                    t.compressed_end = Some(end + delta);
                }
            }
        }
    }

    /// Records `llama_memory_seq_cp(src, dst, p0, p1)`: a whole copy
    /// carries the tracking; a partial one is not followed.
    pub fn copied(&mut self, src: llama_seq_id, dst: llama_seq_id, p0: llama_pos, p1: llama_pos) {
        if src == dst {
            return;
        }
        match self.seqs.get(&src).cloned() {
            Some(t) if p0 <= 0 && p1 < 0 => {
                self.seqs.insert(dst, t);
            }
            _ => {
                self.seqs.remove(&dst);
            }
        }
    }

    /// Records `llama_memory_seq_keep(seq)`.
    pub fn kept_only(&mut self, seq: llama_seq_id) {
        self.seqs.retain(|&s, _| s == seq);
    }

    /// Forgets `seq` (its state was replaced), or every sequence.
    pub fn forget(&mut self, seq: Option<llama_seq_id>) {
        match seq {
            Some(s) => {
                self.seqs.remove(&s);
            }
            None => self.seqs.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(len: i32) -> Tracks {
        let mut t = Tracks::new(4);
        let tokens: Vec<i32> = (0..len).collect();
        t.decoded(0, 0, &tokens[..len as usize / 2]);
        t.decoded(0, len / 2, &tokens[len as usize / 2..]);
        t
    }

    #[test]
    fn a_tail_of_every_token_gives_the_whole_sequence_while_it_starts_at_zero() {
        let mut t = Tracks::keeping_every_token(4);
        let tokens: Vec<i32> = (0..10).collect();
        t.decoded(0, 0, &tokens[..5]);
        t.decoded(0, 5, &tokens[5..]);
        assert_eq!(t.window_tokens(0), Some(vec![6, 7, 8, 9]));
        assert_eq!(t.whole_sequence(0), Some(tokens.clone()));
        // A removed suffix, then the sequence goes on.
        t.removed(0, 8, -1);
        t.decoded(0, 8, &[20, 21]);
        assert_eq!(t.whole_sequence(0), Some(vec![0, 1, 2, 3, 4, 5, 6, 7, 20, 21]));
        // A context shift leaves no tokens from position 0.
        t.removed(0, 2, 4);
        assert_eq!(t.whole_sequence(0), None);
        // A window tracker never has the whole sequence past its window.
        assert_eq!(prompt(10).whole_sequence(0), None);
        assert_eq!(prompt(4).whole_sequence(0), Some(vec![0, 1, 2, 3]));
    }

    #[test]
    fn the_tail_is_the_last_window_tokens_across_batches() {
        let t = prompt(10);
        assert_eq!(t.window_tokens(0), Some(vec![6, 7, 8, 9]));
        let mut gap = prompt(10);
        gap.decoded(0, 12, &[1, 2]);
        assert_eq!(gap.window_tokens(0), None, "a gap starts a new tail");
    }

    #[test]
    fn a_compressed_prompt_is_reused_only_by_a_prefix_covering_it() {
        // 3000-token prompt kept as 256 cells at nominal positions 2744..2999.
        let mut t = prompt(3000);
        t.compressed(0, 3000);
        let reported = t.reported_pos_min(0, 2744);
        // llama-server reuses n cached tokens only when pos_min < n.
        let reuses = |n: i32| reported < n;
        assert!(!reuses(1500), "a prefix ending inside the compressed prompt");
        assert!(!reuses(2999));
        assert!(reuses(3000), "the whole compressed prompt (a follow-up turn)");
        assert!(reuses(3100));
        assert_eq!(t.reported_pos_min(1, 17), 17, "other sequences are untouched");
        assert_eq!(t.reported_pos_min(0, -1), -1, "an empty sequence stays empty");
    }

    #[test]
    fn removing_a_suffix_inside_the_compressed_prompt_removes_it_all() {
        let mut t = prompt(3000);
        t.compressed(0, 3000);
        assert_eq!(
            t.removal(0, 1500, -1, 2744),
            Removal::AsAsked,
            "below pos_min: every cell goes anyway"
        );
        assert_eq!(t.removal(0, 2800, -1, 2744), Removal::WholeSequence);
        assert_eq!(
            t.removal(0, 3000, -1, 2744),
            Removal::AsAsked,
            "the answer after the prompt"
        );
        assert_eq!(t.removal(0, 0, -1, 2744), Removal::AsAsked, "everything");
        assert_eq!(
            t.removal(0, 100, 200, 2744),
            Removal::AsAsked,
            "a middle range (context shift)"
        );
        assert_eq!(t.removal(1, 5, -1, 0), Removal::AsAsked, "not compressed");
        t.removed(0, 0, -1);
        assert_eq!(t.get(0), None);
    }

    #[test]
    fn a_follow_up_turn_keeps_the_compressed_end_and_extends_the_tail() {
        let mut t = prompt(3000);
        t.compressed(0, 3000);
        t.decoded(0, 3000, &[7, 8]); // the answer
        t.removed(0, 3001, -1); // the next request differs after one token
        assert_eq!(t.get(0).unwrap().compressed_end, Some(3000));
        t.decoded(0, 3001, &[1, 2, 3]);
        assert_eq!(t.window_tokens(0), Some(vec![7, 1, 2, 3]));
    }

    #[test]
    fn copies_shifts_keep_and_clear_follow_llama_cpp() {
        let mut t = prompt(100);
        t.compressed(0, 100);
        t.copied(0, 3, -1, -1);
        assert_eq!(t.get(3).unwrap().compressed_end, Some(100));
        t.copied(0, 4, 0, 50);
        assert_eq!(t.get(4), None);
        t.shifted(0, 50, -1, -10);
        assert_eq!(t.get(0).unwrap().compressed_end, Some(90));
        t.kept_only(3);
        assert!(t.get(0).is_none() && t.get(3).is_some());
        t.forget(None);
        assert!(t.get(3).is_none());
    }
}
