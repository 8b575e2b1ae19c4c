//! `reconstruct-shared` and `reconstruct-surprisal`: reconstruction scores
//! with most of each KV head's cells chosen by its layer, optionally after
//! a set of positions every head keeps (the document's most surprising
//! tokens, [`super::surprisal`]).

use std::cmp::Ordering;
use std::sync::Arc;

use snapkv::snapkv::{AlgoError, HeadScores, ScoreBasis, Selection, SelectionShape, Selector};

/// The share of each KV head's cells that [`ReconstructSharedSelector`]
/// chooses by the head's own scores; the rest go by its layer's ranking.
/// Chosen on the tuning seed (1) against a half and three quarters
/// (docs/evaluation.md).
pub const RECONSTRUCT_OWN_SHARE: f64 = 0.25;

/// Reconstruction scores ([`ScoreBasis::Reconstruction`]) with most of each
/// KV head's cells chosen by its layer: every head keeps its own top
/// quarter ([`RECONSTRUCT_OWN_SHARE`] of `n_keep`, rounded down), then the
/// rest by the layer's ranking, the sum over the layer's KV heads of each
/// head's scores divided by its largest (a head whose largest score is not a
/// positive finite number counts unscaled). A position one head repeats
/// from strongly is then kept by every head of the layer, where the
/// library's `reconstruct` keeps it only in the heads that attended to it.
/// Ties go to the lower prefix index at both steps.
///
/// With [`first`](Self::with_first) set, a share of the cells goes first to
/// the positions that score highest there, the same for every head; the
/// rest is chosen as above (a quarter by the head, then the layer) among the
/// positions left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReconstructSharedSelector {
    first: Option<FirstShare>,
    name: &'static str,
}

/// Positions every head keeps before its own choice: the highest `share`
/// of the cells by `scores` (one per prefix index).
#[derive(Debug, Clone, PartialEq)]
struct FirstShare {
    scores: Arc<[f32]>,
    share: f64,
}

impl ReconstructSharedSelector {
    /// `reconstruct-shared`: no positions are kept before each head's own.
    pub fn new() -> Self {
        ReconstructSharedSelector {
            first: None,
            name: "reconstruct-shared",
        }
    }

    /// The selector called `name` that gives `share` (0 to 1) of every
    /// head's cells first to the highest of `scores`, one score per prefix
    /// index (selecting fails when there are fewer scores than prefix
    /// cells).
    pub fn with_first(name: &'static str, scores: Arc<[f32]>, share: f64) -> Self {
        ReconstructSharedSelector {
            first: Some(FirstShare { scores, share }),
            name,
        }
    }
}

impl Selector for ReconstructSharedSelector {
    fn name(&self) -> &'static str {
        self.name
    }

    fn needs_scores(&self) -> bool {
        true
    }

    fn score_basis(&self) -> ScoreBasis {
        ScoreBasis::Reconstruction
    }

    fn select(
        &self,
        scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> Result<Selection, AlgoError> {
        shape.check_keep(n_keep)?;
        let scores = shape.require_scores(scores, self.name())?;
        let n = shape.prefix_len;
        let first = match &self.first {
            Some(f) => {
                if f.scores.len() < n {
                    return Err(AlgoError::InvalidSelection(format!(
                        "{} has {} token scores for {n} prefix cells: it needs the document's own \
                         (snapkv eval --protocol question-agnostic computes them)",
                        self.name,
                        f.scores.len()
                    )));
                }
                let n_first = (f.share.clamp(0.0, 1.0) * n_keep as f64) as usize;
                let mut candidates: Vec<u32> = (0..n as u32).collect();
                let mut first = Vec::with_capacity(n_first);
                top_of(&f.scores, &mut candidates, n_first, &mut first);
                first
            }
            None => Vec::new(),
        };
        let rest = n_keep - first.len();
        let n_own = (RECONSTRUCT_OWN_SHARE * rest as f64) as usize;
        let mut kept = Vec::with_capacity(shape.n_layer * shape.n_head_kv * n_keep);
        let (mut layer_rank, mut taken) = (vec![0f32; n], vec![false; n]);
        let mut candidates = Vec::with_capacity(n);
        for layer in 0..shape.n_layer {
            layer_rank.fill(0.0);
            for g in 0..shape.n_head_kv {
                let row = scores.row(layer, g);
                let largest = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let scale = if largest.is_finite() && largest > 0.0 {
                    1.0 / largest
                } else {
                    1.0
                };
                for (r, &x) in layer_rank.iter_mut().zip(row) {
                    *r += x * scale;
                }
            }
            for g in 0..shape.n_head_kv {
                let start = kept.len();
                kept.extend_from_slice(&first);
                // The head's own top among the positions not taken first,
                // then the layer's ranking over those still left.
                taken.fill(false);
                for &i in &first {
                    taken[i as usize] = true;
                }
                candidates.clear();
                candidates.extend((0..n as u32).filter(|&i| !taken[i as usize]));
                top_of(scores.row(layer, g), &mut candidates, n_own, &mut kept);
                for &i in &kept[start..] {
                    taken[i as usize] = true;
                }
                candidates.clear();
                candidates.extend((0..n as u32).filter(|&i| !taken[i as usize]));
                top_of(&layer_rank, &mut candidates, rest - n_own, &mut kept);
                kept[start..].sort_unstable();
            }
        }
        Selection::new(shape.n_layer, shape.n_head_kv, n_keep, n, kept)
    }
}

/// Appends the `k` of `candidates` (indices into `row`, reordered in place)
/// with the highest scores to `out`; ties go to the lower index.
fn top_of(row: &[f32], candidates: &mut [u32], k: usize, out: &mut Vec<u32>) {
    if k < candidates.len() && k > 0 {
        let better = |a: &u32, b: &u32| -> Ordering { row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)) };
        candidates.select_nth_unstable_by(k - 1, better);
    }
    out.extend_from_slice(&candidates[..k]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [0.5, 2.5) on a grid of 64
    /// (xorshift64), so that exact ties occur and the tie rule is exercised.
    fn positive_values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 64) as f32 / 32.0 + 0.5
            })
            .collect()
    }

    fn sort_by_rank(indices: &mut [u32], rank: &[f64]) {
        indices.sort_by(|a, b| rank[*b as usize].total_cmp(&rank[*a as usize]).then(a.cmp(b)));
    }

    /// The selection by its definition, with full sorts: the `first` set
    /// (the highest `n_first` of `first_scores`), then each head's top
    /// quarter of the rest, then the layer's ranking over what is left
    /// (summed in f32 as the selector sums it, so that the values' exact
    /// ties stay ties).
    fn naive(
        scores: &HeadScores,
        s: &SelectionShape,
        n_keep: usize,
        first_scores: &[f32],
        n_first: usize,
    ) -> Vec<Vec<u32>> {
        let first_rank: Vec<f64> = first_scores.iter().map(|&x| f64::from(x)).collect();
        let mut first: Vec<u32> = (0..first_scores.len() as u32).collect();
        sort_by_rank(&mut first, &first_rank);
        first.truncate(n_first);
        let n_own = (n_keep - n_first) / 4;
        let mut rows = Vec::new();
        for l in 0..s.n_layer {
            let mut layer32 = vec![0f32; s.prefix_len];
            for g in 0..s.n_head_kv {
                let row = scores.row(l, g);
                let largest = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                for (r, &x) in layer32.iter_mut().zip(row) {
                    *r += x * (1.0 / largest);
                }
            }
            let layer: Vec<f64> = layer32.iter().map(|&x| f64::from(x)).collect();
            for g in 0..s.n_head_kv {
                let own: Vec<f64> = scores.row(l, g).iter().map(|&x| f64::from(x)).collect();
                let mut order: Vec<u32> = (0..s.prefix_len as u32).filter(|i| !first.contains(i)).collect();
                sort_by_rank(&mut order, &own);
                let mut rest = order[n_own..].to_vec();
                sort_by_rank(&mut rest, &layer);
                let mut kept: Vec<u32> = first
                    .iter()
                    .chain(&order[..n_own])
                    .chain(&rest[..n_keep - n_first - n_own])
                    .copied()
                    .collect();
                kept.sort_unstable();
                rows.push(kept);
            }
        }
        rows
    }

    #[test]
    fn reconstruct_shared_matches_its_definition() {
        let mut cases = 0;
        for seed in 0..40u64 {
            let (n_layer, n_head_kv, prefix_len) =
                (1 + seed as usize % 3, 1 + seed as usize % 4, 1 + seed as usize * 7 % 60);
            let s = SelectionShape {
                n_layer,
                n_head_kv,
                prefix_len,
            };
            let scores = HeadScores::from_vec(
                n_layer,
                n_head_kv,
                prefix_len,
                positive_values(seed, n_layer * n_head_kv * prefix_len),
            )
            .unwrap();
            let first_scores: Arc<[f32]> = positive_values(seed + 1000, prefix_len).into();
            for n_keep in [
                0,
                prefix_len / 3,
                prefix_len / 2,
                prefix_len.saturating_sub(1),
                prefix_len,
            ] {
                let plain = ReconstructSharedSelector::new()
                    .select(Some(&scores), &s, n_keep)
                    .unwrap();
                let half = ReconstructSharedSelector::with_first("t", first_scores.clone(), 0.5)
                    .select(Some(&scores), &s, n_keep)
                    .unwrap();
                for (out, n_first) in [(plain, 0), (half, n_keep / 2)] {
                    let expected = naive(&scores, &s, n_keep, &first_scores, n_first);
                    for l in 0..n_layer {
                        for g in 0..n_head_kv {
                            assert_eq!(
                                out.row(l, g),
                                expected[l * n_head_kv + g].as_slice(),
                                "seed {seed} keep {n_keep} first {n_first}"
                            );
                        }
                    }
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 400);
    }

    #[test]
    fn a_quarter_by_the_head_and_the_rest_by_the_layer() {
        // One layer, two heads, 8 positions, 4 kept each: 1 by the head's own
        // scores, 3 by the layer's ranking, head 0's row / 0.9 plus head 1's
        // / 4.0 = [1.0, 0.889, 0.5, 0.05, 0.778, 0, 1.0, 0.111]. Head 1's
        // strong position 6, which head 0 ignores, reaches head 0 too.
        let s = SelectionShape {
            n_layer: 1,
            n_head_kv: 2,
            prefix_len: 8,
        };
        #[rustfmt::skip]
        let scores = HeadScores::from_vec(1, 2, 8, vec![
            0.9, 0.8, 0.0, 0.0, 0.7, 0.0, 0.0, 0.1,
            0.0, 0.0, 2.0, 0.2, 0.0, 0.0, 4.0, 0.0,
        ]).unwrap();
        let out = ReconstructSharedSelector::new().select(Some(&scores), &s, 4).unwrap();
        assert_eq!(out.row(0, 0), &[0, 1, 4, 6], "own: 0; layer: 6, 1, 4");
        assert_eq!(out.row(0, 1), &[0, 1, 4, 6], "own: 6; layer: 0, 1, 4");
        let five = ReconstructSharedSelector::new().select(Some(&scores), &s, 5).unwrap();
        assert_eq!(five.row(0, 0), &[0, 1, 2, 4, 6], "the layer's fourth choice joins");
        assert!(ReconstructSharedSelector::new().select(Some(&scores), &s, 9).is_err());
        assert!(ReconstructSharedSelector::new().select(None, &s, 4).is_err());

        // Half first by other scores (every head keeps 3 and 5), then the
        // rest as before among the positions left: own 0 (the quarter of 2
        // is 0), layer: 6, 0.
        let first: Arc<[f32]> = vec![0.0, 0.0, 0.0, 9.0, 0.0, 8.0, 0.0, 0.0].into();
        let out = ReconstructSharedSelector::with_first("t", first, 0.5)
            .select(Some(&scores), &s, 4)
            .unwrap();
        assert_eq!(out.row(0, 0), &[0, 3, 5, 6]);
        assert_eq!(out.row(0, 1), &[0, 3, 5, 6]);
    }
}
