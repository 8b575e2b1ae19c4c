//! Which prefix cells each KV head keeps: one trait, several methods
//! (SnapKV per head, shared variants, and the streaming and random
//! baselines), all producing the same [`Selection`] for the same rewrite.

use std::cmp::Ordering;

use super::error::AlgoError;
use super::scores::HeadScores;

/// For every layer and KV head, the prefix indices kept (ascending,
/// distinct, each `< prefix_len`); every head keeps exactly `n_keep`.
///
/// The public fields describe the layout; construct through
/// [`Selection::new`] or [`Selection::uniform`], which validate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Layers.
    pub n_layer: usize,
    /// KV heads per layer.
    pub n_head_kv: usize,
    /// Prefix cells kept per head.
    pub n_keep: usize,
    /// Prefix cells the indices refer to.
    pub prefix_len: usize,
    kept: Vec<u32>,
}

/// The dimensions a selector must fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SelectionShape {
    /// Layers.
    pub n_layer: usize,
    /// KV heads per layer.
    pub n_head_kv: usize,
    /// Prefix cells per head to choose from.
    pub prefix_len: usize,
}

impl Selection {
    /// Wraps kept indices laid out `[layer][kv_head][j in 0..n_keep]`.
    ///
    /// # Errors
    /// [`AlgoError::InvalidSelection`] when `kept` has the wrong length,
    /// `n_keep > prefix_len`, `prefix_len` does not fit in `u32`, or a row
    /// is not strictly ascending within `0..prefix_len`.
    pub fn new(
        n_layer: usize,
        n_head_kv: usize,
        n_keep: usize,
        prefix_len: usize,
        kept: Vec<u32>,
    ) -> Result<Self, AlgoError> {
        let s = Selection {
            n_layer,
            n_head_kv,
            n_keep,
            prefix_len,
            kept,
        };
        s.validate()?;
        Ok(s)
    }

    /// The same kept indices (ascending, distinct) for every layer and head.
    ///
    /// # Errors
    /// As [`Selection::new`].
    pub fn uniform(n_layer: usize, n_head_kv: usize, prefix_len: usize, kept: Vec<u32>) -> Result<Self, AlgoError> {
        let rows = n_layer
            .checked_mul(n_head_kv)
            .ok_or_else(|| AlgoError::InvalidSelection("layer × head count overflows".into()))?;
        let n_keep = kept.len();
        let mut all = Vec::with_capacity(rows.saturating_mul(n_keep));
        for _ in 0..rows {
            all.extend_from_slice(&kept);
        }
        Selection::new(n_layer, n_head_kv, n_keep, prefix_len, all)
    }

    /// Checks every invariant (lengths, ranges, strict ascending order).
    ///
    /// # Errors
    /// [`AlgoError::InvalidSelection`] describing the first violation.
    pub fn validate(&self) -> Result<(), AlgoError> {
        let invalid = |m: String| Err(AlgoError::InvalidSelection(m));
        if self.prefix_len > u32::MAX as usize {
            return invalid(format!("prefix length {} does not fit in u32", self.prefix_len));
        }
        if self.n_keep > self.prefix_len {
            return invalid(format!(
                "cannot keep {} of {} prefix cells",
                self.n_keep, self.prefix_len
            ));
        }
        let expected = [self.n_layer, self.n_head_kv, self.n_keep]
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d));
        if expected != Some(self.kept.len()) {
            return invalid(format!(
                "{} kept indices for {} layers × {} KV heads × {} cells",
                self.kept.len(),
                self.n_layer,
                self.n_head_kv,
                self.n_keep
            ));
        }
        if self.n_keep == 0 {
            return Ok(());
        }
        for (r, row) in self.kept.chunks_exact(self.n_keep).enumerate() {
            if let Some(w) = row.windows(2).find(|w| w[0] >= w[1]) {
                return invalid(format!(
                    "layer {} KV head {}: indices not strictly ascending ({} then {})",
                    r / self.n_head_kv.max(1),
                    r % self.n_head_kv.max(1),
                    w[0],
                    w[1]
                ));
            }
            if let Some(&last) = row.last() {
                if last as usize >= self.prefix_len {
                    return invalid(format!(
                        "layer {} KV head {}: index {last} out of range for {} prefix cells",
                        r / self.n_head_kv.max(1),
                        r % self.n_head_kv.max(1),
                        self.prefix_len
                    ));
                }
            }
        }
        Ok(())
    }

    /// Kept prefix indices of KV head `kv_head` in layer `layer`, ascending.
    ///
    /// # Panics
    /// If `layer` or `kv_head` is out of range.
    pub fn row(&self, layer: usize, kv_head: usize) -> &[u32] {
        assert!(layer < self.n_layer && kv_head < self.n_head_kv);
        let start = (layer * self.n_head_kv + kv_head) * self.n_keep;
        &self.kept[start..start + self.n_keep]
    }

    /// All kept indices, `[layer][kv_head][j]`.
    pub fn as_slice(&self) -> &[u32] {
        &self.kept
    }
}

/// The prompt positions every KV head kept: a [`Selection`] with its prefix
/// indices translated to the positions those cells held before
/// compression. The window, which every head keeps whole, is not listed.
///
/// It answers "did the compression keep this part of the prompt?", e.g. the
/// tokens of a fact that a question asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptPositions {
    /// Layers.
    pub n_layer: usize,
    /// KV heads per layer.
    pub n_head_kv: usize,
    /// Positions kept per head.
    pub n_keep: usize,
    positions: Vec<i32>,
}

impl KeptPositions {
    /// Translates `selection` through `prefix_positions`, the position of
    /// each prefix cell in the order the selection indexes them.
    ///
    /// # Errors
    /// [`AlgoError::InvalidSelection`] when `prefix_positions` does not have
    /// the selection's `prefix_len` entries.
    pub fn new(selection: &Selection, prefix_positions: &[i32]) -> Result<Self, AlgoError> {
        if prefix_positions.len() != selection.prefix_len {
            return Err(AlgoError::InvalidSelection(format!(
                "{} prefix positions for a selection over {} prefix cells",
                prefix_positions.len(),
                selection.prefix_len
            )));
        }
        Ok(KeptPositions {
            n_layer: selection.n_layer,
            n_head_kv: selection.n_head_kv,
            n_keep: selection.n_keep,
            positions: selection
                .as_slice()
                .iter()
                .map(|&i| prefix_positions[i as usize])
                .collect(),
        })
    }

    /// Positions kept by KV head `kv_head` of layer `layer`, in the order of
    /// the selection (ascending when the prefix was in position order).
    ///
    /// # Panics
    /// If `layer` or `kv_head` is out of range.
    pub fn row(&self, layer: usize, kv_head: usize) -> &[i32] {
        assert!(layer < self.n_layer && kv_head < self.n_head_kv);
        let start = (layer * self.n_head_kv + kv_head) * self.n_keep;
        &self.positions[start..start + self.n_keep]
    }

    /// For each layer, the fraction of `wanted` that its KV heads kept,
    /// averaged over the heads (1.0 for an empty `wanted`).
    pub fn fraction_kept_per_layer(&self, wanted: &[i32]) -> Vec<f64> {
        (0..self.n_layer)
            .map(|layer| {
                if wanted.is_empty() || self.n_head_kv == 0 {
                    return 1.0;
                }
                let kept: usize = (0..self.n_head_kv)
                    .map(|h| {
                        let row = self.row(layer, h);
                        wanted.iter().filter(|p| row.contains(p)).count()
                    })
                    .sum();
                kept as f64 / (wanted.len() * self.n_head_kv) as f64
            })
            .collect()
    }

    /// The fraction of `wanted` kept, averaged over every layer and KV head.
    pub fn fraction_kept(&self, wanted: &[i32]) -> f64 {
        let per_layer = self.fraction_kept_per_layer(wanted);
        per_layer.iter().sum::<f64>() / per_layer.len().max(1) as f64
    }
}

/// What the scores a [`Selector`] is given measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScoreBasis {
    /// The attention the observation window (and a draft's tokens) pays to
    /// each prefix position, pooled ([`HeadScores`] from the votes).
    Attention,
    /// The cached keys alone:
    /// [`key_dissimilarity`](crate::snapkv::key_dissimilarity), no query
    /// involved.
    KeyDissimilarity,
    /// The attention that a teacher-forced repeat of the whole sequence
    /// pays each position (the largest over the repeat's queries), pooled
    /// like the window's. The engine needs every token of the sequence for
    /// it (prefill into an empty sequence, or all of them passed to
    /// `compress_after_prefill`).
    Reconstruction,
}

/// A method that decides which prefix cells every KV head keeps.
pub trait Selector: Send + Sync {
    /// The method's name as the CLI spells it.
    fn name(&self) -> &'static str;

    /// Whether the selector needs scores (false for streaming and random;
    /// the engine then skips scoring).
    fn needs_scores(&self) -> bool;

    /// What the scores measure, when [`needs_scores`](Self::needs_scores):
    /// the window's attention unless a selector says otherwise.
    fn score_basis(&self) -> ScoreBasis {
        ScoreBasis::Attention
    }

    /// Chooses `n_keep` prefix indices for every layer and KV head.
    ///
    /// # Errors
    /// [`AlgoError::InvalidSelection`] when `n_keep > shape.prefix_len`,
    /// scores are required but missing or contain NaN;
    /// [`AlgoError::ShapeMismatch`] when the scores do not match `shape`.
    fn select(
        &self,
        scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> Result<Selection, AlgoError>;
}

impl SelectionShape {
    /// Checks that `n_keep` cells can be chosen from this shape's prefix: what
    /// every selector checks first.
    ///
    /// # Errors
    /// [`AlgoError::InvalidSelection`] when `n_keep > prefix_len` or the
    /// prefix does not fit in `u32`.
    pub fn check_keep(&self, n_keep: usize) -> Result<(), AlgoError> {
        if n_keep > self.prefix_len {
            return Err(AlgoError::InvalidSelection(format!(
                "cannot keep {n_keep} of {} prefix cells",
                self.prefix_len
            )));
        }
        if self.prefix_len > u32::MAX as usize {
            return Err(AlgoError::InvalidSelection(format!(
                "prefix length {} does not fit in u32",
                self.prefix_len
            )));
        }
        Ok(())
    }

    /// The scores a selector called `method` was given, checked against this
    /// shape: present, of this shape, and free of NaN (what a
    /// [`Selector`] that needs scores checks before choosing).
    ///
    /// # Errors
    /// [`AlgoError::InvalidSelection`] when `scores` is `None` or holds a
    /// NaN; [`AlgoError::ShapeMismatch`] when its dimensions differ.
    pub fn require_scores<'s>(
        &self,
        scores: Option<&'s HeadScores>,
        method: &str,
    ) -> Result<&'s HeadScores, AlgoError> {
        let shape = self;
        let scores = scores
            .ok_or_else(|| AlgoError::InvalidSelection(format!("the {method} selector needs attention scores")))?;
        scores.check()?;
        if (scores.n_layer, scores.n_head_kv, scores.prefix_len) != (shape.n_layer, shape.n_head_kv, shape.prefix_len) {
            return Err(AlgoError::ShapeMismatch(format!(
                "scores are {} layers × {} KV heads × {} cells, the selection needs {} × {} × {}",
                scores.n_layer, scores.n_head_kv, scores.prefix_len, shape.n_layer, shape.n_head_kv, shape.prefix_len
            )));
        }
        if let Some(i) = scores.as_slice().iter().position(|x| x.is_nan()) {
            return Err(AlgoError::InvalidSelection(format!(
                "score {i} (layer {}, KV head {}, prefix index {}) is NaN",
                i / (shape.n_head_kv * shape.prefix_len),
                (i / shape.prefix_len) % shape.n_head_kv,
                i % shape.prefix_len
            )));
        }
        Ok(scores)
    }
}

/// The `n_keep` highest-scoring indices of `row`, ascending. Ties go to the
/// lower index, so the result is a deterministic function of the scores.
/// `scratch` is reused between calls.
fn top_k(row: &[f32], n_keep: usize, scratch: &mut Vec<u32>, out: &mut Vec<u32>) {
    scratch.clear();
    scratch.extend(0..row.len() as u32);
    if n_keep < row.len() && n_keep > 0 {
        let better = |a: &u32, b: &u32| -> Ordering { row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b)) };
        scratch.select_nth_unstable_by(n_keep - 1, better);
    }
    let kept = &mut scratch[..n_keep];
    kept.sort_unstable();
    out.extend_from_slice(kept);
}

/// SnapKV: every KV head keeps its own top `n_keep` prefix cells by score
/// (ties to the lower prefix index).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapKvSelector;

impl Selector for SnapKvSelector {
    fn name(&self) -> &'static str {
        "snapkv"
    }

    fn needs_scores(&self) -> bool {
        true
    }

    fn select(
        &self,
        scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> Result<Selection, AlgoError> {
        shape.check_keep(n_keep)?;
        let scores = shape.require_scores(scores, self.name())?;
        let mut kept = Vec::with_capacity(shape.n_layer * shape.n_head_kv * n_keep);
        let mut scratch = Vec::new();
        for layer in 0..shape.n_layer {
            for g in 0..shape.n_head_kv {
                top_k(scores.row(layer, g), n_keep, &mut scratch, &mut kept);
            }
        }
        Selection::new(shape.n_layer, shape.n_head_kv, n_keep, shape.prefix_len, kept)
    }
}

/// A selector whose every KV head keeps its own top `n_keep` prefix cells
/// (ties to the lower prefix index), as SnapKV's does, by scores of another
/// basis.
macro_rules! per_head_selector {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $basis:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $ty;

        impl Selector for $ty {
            fn name(&self) -> &'static str {
                $name
            }

            fn needs_scores(&self) -> bool {
                true
            }

            fn score_basis(&self) -> ScoreBasis {
                ScoreBasis::$basis
            }

            fn select(
                &self,
                scores: Option<&HeadScores>,
                shape: &SelectionShape,
                n_keep: usize,
            ) -> Result<Selection, AlgoError> {
                SnapKvSelector.select(scores, shape, n_keep)
            }
        }
    };
}

per_head_selector!(
    /// Query-free selection in the manner of KeyDiff (Park et al., 2025):
    /// every KV head keeps its `n_keep` prefix cells whose keys point
    /// furthest from the head's average key direction
    /// ([`ScoreBasis::KeyDissimilarity`]). It looks at no query, so what
    /// ends the prompt does not matter: a document compressed before any
    /// question keeps the same cells as one that ends with it. Ties go to
    /// the lower prefix index.
    KeyDiffSelector,
    "keydiff",
    KeyDissimilarity
);

per_head_selector!(
    /// Question-agnostic selection by reconstruction, in the manner of KVzip
    /// (Kim et al., 2025): the model repeats the sequence (teacher-forced)
    /// and every KV head keeps its `n_keep` prefix cells that the repeat
    /// attended to most ([`ScoreBasis::Reconstruction`]). What the model
    /// needs to reproduce the text is what later questions about it need,
    /// whichever they are; it costs about one more prefill. Ties go to the
    /// lower prefix index.
    ReconstructSelector,
    "reconstruct",
    Reconstruction
);

/// SnapKV with one set per layer: the mean score over the layer's KV heads
/// decides, and every head of the layer keeps the same cells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedPerLayerSelector;

impl Selector for SharedPerLayerSelector {
    fn name(&self) -> &'static str {
        "snapkv-shared-layer"
    }

    fn needs_scores(&self) -> bool {
        true
    }

    fn select(
        &self,
        scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> Result<Selection, AlgoError> {
        shape.check_keep(n_keep)?;
        let scores = shape.require_scores(scores, self.name())?;
        let mut kept = Vec::with_capacity(shape.n_layer * shape.n_head_kv * n_keep);
        let mut mean = vec![0f32; shape.prefix_len];
        let mut scratch = Vec::new();
        let mut layer_kept = Vec::with_capacity(n_keep);
        for layer in 0..shape.n_layer {
            mean.fill(0.0);
            for g in 0..shape.n_head_kv {
                for (m, &s) in mean.iter_mut().zip(scores.row(layer, g)) {
                    *m += s;
                }
            }
            let inv = 1.0 / shape.n_head_kv as f32;
            mean.iter_mut().for_each(|m| *m *= inv);
            layer_kept.clear();
            top_k(&mean, n_keep, &mut scratch, &mut layer_kept);
            for _ in 0..shape.n_head_kv {
                kept.extend_from_slice(&layer_kept);
            }
        }
        Selection::new(shape.n_layer, shape.n_head_kv, n_keep, shape.prefix_len, kept)
    }
}

/// SnapKV with one set for everything: the mean score over all layers and
/// heads decides, and every head of every layer keeps the same cells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedAllLayersSelector;

impl Selector for SharedAllLayersSelector {
    fn name(&self) -> &'static str {
        "snapkv-shared-all"
    }

    fn needs_scores(&self) -> bool {
        true
    }

    fn select(
        &self,
        scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> Result<Selection, AlgoError> {
        shape.check_keep(n_keep)?;
        let scores = shape.require_scores(scores, self.name())?;
        let mut sum = vec![0f64; shape.prefix_len];
        if shape.prefix_len > 0 {
            for row in scores.as_slice().chunks_exact(shape.prefix_len) {
                for (s, &x) in sum.iter_mut().zip(row) {
                    *s += f64::from(x);
                }
            }
        }
        let rows = (shape.n_layer * shape.n_head_kv).max(1) as f64;
        let mean: Vec<f32> = sum.iter().map(|&s| (s / rows) as f32).collect();
        let mut kept = Vec::with_capacity(n_keep);
        top_k(&mean, n_keep, &mut Vec::new(), &mut kept);
        Selection::uniform(shape.n_layer, shape.n_head_kv, shape.prefix_len, kept)
    }
}

/// Streaming baseline (attention sinks + recent cells): the first `sinks`
/// prefix cells and the most recent `n_keep - sinks` (all of the first
/// `n_keep` when `sinks >= n_keep`). Needs no scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamingSelector {
    /// Attention-sink cells kept at the start of the prefix.
    pub sinks: usize,
}

impl Default for StreamingSelector {
    fn default() -> Self {
        StreamingSelector { sinks: 4 }
    }
}

impl Selector for StreamingSelector {
    fn name(&self) -> &'static str {
        "streaming"
    }

    fn needs_scores(&self) -> bool {
        false
    }

    fn select(
        &self,
        _scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> Result<Selection, AlgoError> {
        shape.check_keep(n_keep)?;
        let sinks = self.sinks.min(n_keep);
        let recent = n_keep - sinks;
        let kept: Vec<u32> = (0..sinks)
            .chain(shape.prefix_len - recent..shape.prefix_len)
            .map(|i| i as u32)
            .collect();
        Selection::uniform(shape.n_layer, shape.n_head_kv, shape.prefix_len, kept)
    }
}

/// Random baseline: a uniformly random subset per layer and KV head, from a
/// built-in splitmix64 generator; the same seed gives the same selection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RandomSelector {
    /// Generator seed.
    pub seed: u64,
}

/// splitmix64 step.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Selector for RandomSelector {
    fn name(&self) -> &'static str {
        "random"
    }

    fn needs_scores(&self) -> bool {
        false
    }

    fn select(
        &self,
        _scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> Result<Selection, AlgoError> {
        shape.check_keep(n_keep)?;
        let n = shape.prefix_len;
        let mut kept = Vec::with_capacity(shape.n_layer * shape.n_head_kv * n_keep);
        let mut perm: Vec<u32> = Vec::with_capacity(n);
        for row in 0..shape.n_layer * shape.n_head_kv {
            let mut state = self.seed ^ (row as u64).wrapping_mul(0xd1b5_4a32_d192_ed03);
            perm.clear();
            perm.extend(0..n as u32);
            // Partial Fisher–Yates: the first n_keep slots become the sample.
            for i in 0..n_keep {
                let span = (n - i) as u64;
                let j = i + ((u128::from(splitmix64(&mut state)) * u128::from(span)) >> 64) as usize;
                perm.swap(i, j);
            }
            let sample = &mut perm[..n_keep];
            sample.sort_unstable();
            kept.extend_from_slice(sample);
        }
        Selection::new(shape.n_layer, shape.n_head_kv, n_keep, shape.prefix_len, kept)
    }
}

/// The selector the CLI calls `name`: `snapkv`, `snapkv-shared-layer`,
/// `snapkv-shared-all`, `streaming` (4 sinks) or `random` (seed 0);
/// `None` for other names.
pub fn selector_by_name(name: &str) -> Option<Box<dyn Selector>> {
    match name {
        "snapkv" => Some(Box::new(SnapKvSelector)),
        "snapkv-shared-layer" => Some(Box::new(SharedPerLayerSelector)),
        "snapkv-shared-all" => Some(Box::new(SharedAllLayersSelector)),
        "streaming" => Some(Box::new(StreamingSelector::default())),
        "random" => Some(Box::new(RandomSelector::default())),
        "keydiff" => Some(Box::new(KeyDiffSelector)),
        "reconstruct" => Some(Box::new(ReconstructSelector)),
        _ => None,
    }
}

/// Names accepted by [`selector_by_name`].
pub const SELECTOR_NAMES: [&str; 7] = [
    "snapkv",
    "snapkv-shared-layer",
    "snapkv-shared-all",
    "streaming",
    "random",
    "keydiff",
    "reconstruct",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapkv::scores::tests::random_values;
    use proptest::prelude::*;

    fn shape(n_layer: usize, n_head_kv: usize, prefix_len: usize) -> SelectionShape {
        SelectionShape {
            n_layer,
            n_head_kv,
            prefix_len,
        }
    }

    fn scores_for(s: &SelectionShape, seed: u64) -> HeadScores {
        let n = s.n_layer * s.n_head_kv * s.prefix_len;
        HeadScores::from_vec(s.n_layer, s.n_head_kv, s.prefix_len, random_values(seed, n)).unwrap()
    }

    fn all_selectors() -> Vec<Box<dyn Selector>> {
        SELECTOR_NAMES.iter().map(|n| selector_by_name(n).unwrap()).collect()
    }

    proptest! {
        #[test]
        fn every_selector_keeps_n_sorted_distinct_in_range_indices(
            n_layer in 1usize..4,
            n_head_kv in 1usize..4,
            prefix_len in 0usize..50,
            keep_frac in 0f64..=1.0,
            seed in any::<u64>(),
        ) {
            let s = shape(n_layer, n_head_kv, prefix_len);
            let n_keep = (keep_frac * prefix_len as f64) as usize;
            let scores = scores_for(&s, seed);
            for sel in all_selectors() {
                let out = sel.select(Some(&scores), &s, n_keep).unwrap();
                prop_assert_eq!((out.n_layer, out.n_head_kv, out.n_keep, out.prefix_len),
                    (n_layer, n_head_kv, n_keep, prefix_len));
                for l in 0..n_layer {
                    for g in 0..n_head_kv {
                        let row = out.row(l, g);
                        prop_assert_eq!(row.len(), n_keep);
                        prop_assert!(row.windows(2).all(|w| w[0] < w[1]));
                        prop_assert!(row.iter().all(|&i| (i as usize) < prefix_len));
                    }
                }
            }
        }

        #[test]
        fn snapkv_keeps_the_highest_scores(
            prefix_len in 1usize..60,
            keep_frac in 0f64..=1.0,
            seed in any::<u64>(),
        ) {
            let s = shape(2, 2, prefix_len);
            let n_keep = (keep_frac * prefix_len as f64) as usize;
            let scores = scores_for(&s, seed);
            let out = SnapKvSelector.select(Some(&scores), &s, n_keep).unwrap();
            for l in 0..2 {
                for g in 0..2 {
                    let row = scores.row(l, g);
                    let kept = out.row(l, g);
                    let worst_kept = kept.iter().map(|&i| row[i as usize]).fold(f32::INFINITY, f32::min);
                    for i in 0..prefix_len as u32 {
                        if !kept.contains(&i) {
                            prop_assert!(row[i as usize] <= worst_kept);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_prefix_index() {
        let s = shape(1, 1, 6);
        let scores = HeadScores::from_vec(1, 1, 6, vec![1.0, 2.0, 2.0, 3.0, 2.0, 0.0]).unwrap();
        let out = SnapKvSelector.select(Some(&scores), &s, 3).unwrap();
        assert_eq!(out.row(0, 0), &[1, 2, 3]);
        let flat = HeadScores::from_vec(1, 1, 6, vec![0.5; 6]).unwrap();
        let out = SnapKvSelector.select(Some(&flat), &s, 4).unwrap();
        assert_eq!(out.row(0, 0), &[0, 1, 2, 3]);
    }

    #[test]
    fn heads_choose_independently_or_shared() {
        let s = shape(2, 2, 4);
        #[rustfmt::skip]
        let scores = HeadScores::from_vec(2, 2, 4, vec![
            9.0, 8.0, 0.0, 0.0,   0.0, 0.0, 8.0, 9.0,
            0.0, 9.0, 0.0, 8.5,   0.0, 1.0, 3.0, 0.0,
        ]).unwrap();
        let per_head = SnapKvSelector.select(Some(&scores), &s, 2).unwrap();
        assert_eq!(per_head.as_slice(), &[0, 1, 2, 3, 1, 3, 1, 2]);
        let per_layer = SharedPerLayerSelector.select(Some(&scores), &s, 2).unwrap();
        // layer 0 means [4.5, 4, 4, 4.5]; layer 1 means [0, 5, 1.5, 4.25]
        assert_eq!(per_layer.as_slice(), &[0, 3, 0, 3, 1, 3, 1, 3]);
        let all = SharedAllLayersSelector.select(Some(&scores), &s, 2).unwrap();
        // means over 4 rows: [2.25, 4.5, 2.75, 4.375]
        assert_eq!(all.as_slice(), &[1, 3, 1, 3, 1, 3, 1, 3]);
    }

    #[test]
    fn kept_positions_translate_indices_and_count_what_was_kept() {
        // Two layers, two KV heads, prefix cells 0..4 hold positions 10..14.
        let sel = Selection::new(2, 2, 2, 4, vec![0, 1, 2, 3, 0, 3, 1, 2]).unwrap();
        let kept = KeptPositions::new(&sel, &[10, 11, 12, 13]).unwrap();
        assert_eq!(kept.row(0, 1), &[12, 13]);
        assert_eq!(kept.row(1, 0), &[10, 13]);
        // Positions 10 and 11: layer 0 keeps both in head 0, none in head 1;
        // layer 1 keeps one in each head.
        assert_eq!(kept.fraction_kept_per_layer(&[10, 11]), vec![0.5, 0.5]);
        assert_eq!(kept.fraction_kept(&[13]), 0.5);
        assert_eq!(kept.fraction_kept(&[10, 11, 12, 13]), 0.5);
        assert_eq!(kept.fraction_kept(&[99]), 0.0);
        assert_eq!(kept.fraction_kept(&[]), 1.0);
        assert!(matches!(
            KeptPositions::new(&sel, &[10, 11, 12]),
            Err(AlgoError::InvalidSelection(_))
        ));
    }

    #[test]
    fn streaming_keeps_sinks_and_recent_cells() {
        let s = shape(2, 3, 10);
        let out = StreamingSelector { sinks: 4 }.select(None, &s, 6).unwrap();
        for l in 0..2 {
            for g in 0..3 {
                assert_eq!(out.row(l, g), &[0, 1, 2, 3, 8, 9]);
            }
        }
        let few = StreamingSelector { sinks: 4 }.select(None, &s, 3).unwrap();
        assert_eq!(few.row(1, 2), &[0, 1, 2]);
        let no_sinks = StreamingSelector { sinks: 0 }.select(None, &s, 3).unwrap();
        assert_eq!(no_sinks.row(0, 0), &[7, 8, 9]);
        assert!(!StreamingSelector::default().needs_scores());
    }

    #[test]
    fn random_is_deterministic_per_seed_and_varies_by_head() {
        let s = shape(3, 2, 200);
        let a = RandomSelector { seed: 7 }.select(None, &s, 20).unwrap();
        let b = RandomSelector { seed: 7 }.select(None, &s, 20).unwrap();
        let c = RandomSelector { seed: 8 }.select(None, &s, 20).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a.row(0, 0), a.row(0, 1));
        assert_ne!(a.row(0, 0), a.row(1, 0));
        assert!(!RandomSelector::default().needs_scores());
    }

    #[test]
    fn bad_requests_are_refused() {
        let s = shape(1, 2, 5);
        let scores = scores_for(&s, 1);
        for sel in all_selectors() {
            assert!(matches!(
                sel.select(Some(&scores), &s, 6),
                Err(AlgoError::InvalidSelection(_))
            ));
        }
        assert!(matches!(
            SnapKvSelector.select(None, &s, 2),
            Err(AlgoError::InvalidSelection(_))
        ));
        let other = scores_for(&shape(1, 1, 5), 1);
        assert!(matches!(
            SnapKvSelector.select(Some(&other), &s, 2),
            Err(AlgoError::ShapeMismatch(_))
        ));
        let nan = HeadScores::from_vec(1, 2, 5, vec![0.0, 1.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).unwrap();
        assert!(matches!(
            SharedPerLayerSelector.select(Some(&nan), &s, 2),
            Err(AlgoError::InvalidSelection(m)) if m.contains("prefix index 2")
        ));
        // The same checks, public for selectors written outside the crate.
        assert!(s.check_keep(5).is_ok() && s.check_keep(6).is_err());
        assert_eq!(s.require_scores(Some(&scores), "custom").unwrap(), &scores);
        assert!(s
            .require_scores(None, "custom")
            .unwrap_err()
            .to_string()
            .contains("custom"));
        assert!(matches!(
            s.require_scores(Some(&other), "custom"),
            Err(AlgoError::ShapeMismatch(_))
        ));
    }

    #[test]
    fn selections_are_validated() {
        assert!(Selection::new(1, 2, 2, 5, vec![0, 1, 2, 4]).is_ok());
        for (n_keep, prefix_len, kept) in [
            (2, 5, vec![0, 1, 2]),
            (2, 5, vec![1, 0, 2, 4]),
            (2, 5, vec![1, 1, 2, 4]),
            (2, 5, vec![0, 1, 2, 5]),
            (6, 5, vec![0; 12]),
        ] {
            assert!(matches!(
                Selection::new(1, 2, n_keep, prefix_len, kept),
                Err(AlgoError::InvalidSelection(_))
            ));
        }
        let u = Selection::uniform(2, 3, 10, vec![2, 5]).unwrap();
        assert_eq!((u.n_keep, u.as_slice().len()), (2, 12));
        assert_eq!(u.row(1, 2), &[2, 5]);
        assert!(Selection::uniform(2, 3, 10, vec![5, 2]).is_err());
        assert_eq!(Selection::uniform(2, 3, 10, vec![]).unwrap().n_keep, 0);
    }

    #[test]
    fn names_resolve() {
        for name in SELECTOR_NAMES {
            assert_eq!(selector_by_name(name).unwrap().name(), name);
        }
        assert!(selector_by_name("h2o").is_none());
        assert!(SnapKvSelector.needs_scores());
    }
}
