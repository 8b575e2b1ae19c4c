//! Window votes from captured post-RoPE queries against the cached keys
//! (flash attention on, where the softmax is never materialised): blocked,
//! tiled dot products, a lane-wise softmax, and the votes, on several
//! threads for large inputs.

use std::thread;

use super::{checked_volume, combine, Votes};
use crate::snapkv::config::QueryAggregation;
use crate::snapkv::error::AlgoError;

/// Computes window votes from captured queries and cached keys (flash
/// attention on), reusing its scratch buffers across calls (layers).
#[derive(Debug, Default)]
pub struct QueryScorer {
    pub(super) threads: usize,
    scratch: Vec<Scratch>,
}

#[derive(Debug, Default)]
pub(super) struct Scratch {
    queries: Vec<f32>,
    packed_keys: Vec<f32>,
    logits: Vec<f32>,
}

/// Shapes shared by every worker of one [`QueryScorer::add_votes`] call.
#[derive(Clone, Copy)]
pub(super) struct QkShape {
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
    window: usize,
    /// Query rows: the `window` rows at the window's cells, then any rows
    /// of tokens after it.
    rows: usize,
    prefix_len: usize,
    n_cells: usize,
    scale: f32,
    queries: QueryAggregation,
}

/// Multiply-adds below which a call stays on the calling thread.
pub(super) const PARALLEL_THRESHOLD: usize = 1 << 22;
/// Keys per packed tile (four SSE vectors of accumulators per query row).
pub(super) const KEY_TILE: usize = 16;
/// Query rows that meet each key tile together in [`compute_logits`].
pub(super) const QUERY_BLOCK: usize = 6;

impl QueryScorer {
    /// A scorer using up to `threads` threads; 0 means
    /// `std::thread::available_parallelism()`.
    pub fn new(threads: usize) -> Self {
        let threads = if threads == 0 {
            thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        QueryScorer {
            threads,
            scratch: Vec::new(),
        }
    }

    /// Same as [`add_votes_from_queries`], reusing this scorer's buffers and
    /// threads setting.
    ///
    /// # Errors
    /// As [`add_votes_from_queries`].
    #[allow(clippy::too_many_arguments)]
    pub fn add_votes(
        &mut self,
        votes: &mut Votes,
        layer: usize,
        queries: &[f32],
        keys: &[f32],
        head_dim: usize,
        n_head_kv: usize,
        window: usize,
        scale: f32,
    ) -> Result<(), AlgoError> {
        votes.check_layer(layer)?;
        let n_head = votes.n_head;
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(AlgoError::ShapeMismatch(format!(
                "{n_head} query heads do not split evenly over {n_head_kv} KV heads"
            )));
        }
        if head_dim == 0 || window == 0 {
            return Err(AlgoError::ShapeMismatch(format!(
                "head_dim ({head_dim}) and window ({window}) must be at least 1"
            )));
        }
        if !(scale.is_finite() && scale > 0.0) {
            return Err(AlgoError::ShapeMismatch(format!(
                "attention scale must be finite and positive, got {scale}"
            )));
        }
        let n_cells = votes
            .prefix_len
            .checked_add(window)
            .ok_or_else(|| AlgoError::ShapeMismatch("prefix length + window overflows".into()))?;
        let row_len = checked_volume(&[n_head, head_dim], "queries")?;
        let rows = queries.len() / row_len;
        if queries.len() % row_len != 0 || rows < window {
            return Err(AlgoError::ShapeMismatch(format!(
                "queries of layer {layer} have {} values, expected a multiple of {n_head} heads × {head_dim} = {row_len} \
                 for at least {window} queries",
                queries.len()
            )));
        }
        let k_len = checked_volume(&[n_cells, n_head_kv, head_dim], "keys")?;
        if keys.len() != k_len {
            return Err(AlgoError::ShapeMismatch(format!(
                "keys of layer {layer} have {} values, expected {n_cells} cells × {n_head_kv} KV heads × {head_dim} = {k_len}",
                keys.len()
            )));
        }
        let shape = QkShape {
            n_head,
            n_head_kv,
            head_dim,
            window,
            rows,
            prefix_len: votes.prefix_len,
            n_cells,
            scale,
            queries: votes.queries,
        };
        if votes.prefix_len == 0 {
            return Ok(());
        }
        let work = k_len.saturating_mul(rows).saturating_mul(n_head / n_head_kv);
        let threads = if work < PARALLEL_THRESHOLD {
            1
        } else {
            self.threads.clamp(1, n_head)
        };
        let heads_per_worker = n_head.div_ceil(threads);
        let workers = n_head.div_ceil(heads_per_worker);
        if self.scratch.len() < workers {
            self.scratch.resize_with(workers, Scratch::default);
        }
        let layer_votes = votes.layer_mut(layer);
        let chunk = heads_per_worker * shape.prefix_len;
        if workers == 1 {
            score_heads(&mut self.scratch[0], layer_votes, 0, queries, keys, shape);
            return Ok(());
        }
        thread::scope(|s| {
            for (i, (votes_part, scratch)) in layer_votes.chunks_mut(chunk).zip(self.scratch.iter_mut()).enumerate() {
                s.spawn(move || score_heads(scratch, votes_part, i * heads_per_worker, queries, keys, shape));
            }
        });
        Ok(())
    }
}

/// Adds one layer's votes computed from post-RoPE window queries and the
/// cached keys (flash attention on).
///
/// `queries` is `[row][head][d]` with at least `window` rows, `keys` is
/// `[cell in position order][kv_head][d]` for `prefix_len + window` cells,
/// prefix first then window. Query head `h` attends with KV head
/// `h / (n_head / n_head_kv)`; window query `q < window` sits at window cell
/// `q` and sees every prefix cell plus window cells `0..=q`. Rows after the
/// first `window` are queries of tokens after the window (a draft of the
/// answer, see [`SnapKvConfig::draft`](crate::snapkv::SnapKvConfig::draft)):
/// they see every prefix and window cell (their own cells are not among
/// `keys`, so their softmax runs over the cells given). Logits are scaled by
/// `scale`, turned into probabilities by a max-subtracted softmax in f32, and
/// the probabilities of prefix cells are added to `votes` (or their maximum
/// taken, as the votes' [`QueryAggregation`] says).
///
/// Uses `std::thread::available_parallelism()` threads for large inputs;
/// use [`QueryScorer`] to choose the thread count and to reuse buffers.
///
/// # Errors
/// [`AlgoError::ShapeMismatch`] when a buffer length does not match the
/// shapes (or holds fewer than `window` query rows), `layer` is out of range, the heads do not split evenly over the
/// KV heads, `head_dim` or `window` is 0, or `scale` is not finite and
/// positive.
#[allow(clippy::too_many_arguments)]
pub fn add_votes_from_queries(
    votes: &mut Votes,
    layer: usize,
    queries: &[f32],
    keys: &[f32],
    head_dim: usize,
    n_head_kv: usize,
    window: usize,
    scale: f32,
) -> Result<(), AlgoError> {
    QueryScorer::new(0).add_votes(votes, layer, queries, keys, head_dim, n_head_kv, window, scale)
}

/// Scores query heads `first_head..` (as many as `votes_part` holds rows
/// for) of one layer into `votes_part`.
///
/// Compiled twice on x86-64: for the baseline target and with AVX2 (the
/// functions it calls are inlined into each copy), and the copy the CPU
/// runs is chosen at run time, so that a program built without target
/// flags scores as fast as one built for AVX2. Both copies compute the same
/// results: no fused multiply-adds, the same order of operations.
#[multiversion::multiversion(targets("x86_64+avx+avx2+fma"))]
pub(super) fn score_heads(
    scratch: &mut Scratch,
    votes_part: &mut [f32],
    first_head: usize,
    queries: &[f32],
    keys: &[f32],
    s: QkShape,
) {
    let n_heads_here = votes_part.len() / s.prefix_len;
    let group = s.n_head / s.n_head_kv;
    let d = s.head_dim;
    let mut h = first_head;
    let end = first_head + n_heads_here;
    while h < end {
        let kv_head = h / group;
        let h_end = end.min((kv_head + 1) * group);
        let rows = (h_end - h) * s.rows;
        // Gather this run's queries as contiguous rows: row = (head - h) * rows + q.
        scratch.queries.clear();
        for head in h..h_end {
            for q in 0..s.rows {
                let start = (q * s.n_head + head) * d;
                scratch.queries.extend_from_slice(&queries[start..start + d]);
            }
        }
        scratch.logits.resize(rows * s.n_cells, 0.0);
        compute_logits(
            &scratch.queries,
            keys,
            kv_head,
            s,
            &mut scratch.packed_keys,
            &mut scratch.logits[..rows * s.n_cells],
        );
        for (r, logits) in scratch.logits[..rows * s.n_cells]
            .chunks_exact_mut(s.n_cells)
            .enumerate()
        {
            let head_local = r / s.rows;
            let q = r % s.rows;
            let visible = &mut logits[..s.prefix_len + (q + 1).min(s.window)];
            let inv_sum = 1.0 / softmax_numerators(visible, s.scale);
            let row_start = (h - first_head + head_local) * s.prefix_len;
            let votes_row = &mut votes_part[row_start..row_start + s.prefix_len];
            for (v, &e) in votes_row.iter_mut().zip(visible.iter()) {
                *v = combine(s.queries, *v, e * inv_sum);
            }
        }
        h = h_end;
    }
}

/// `logits[row * n_cells + c] = q_row · k_c` for every query row and cell.
///
/// Keys are packed in tiles of [`KEY_TILE`] cells stored dimension-major
/// (`tile[d * KEY_TILE + j]`), so one broadcast query element multiplies a
/// whole tile row: the inner loop runs over keys, which the compiler turns
/// into packed SIMD with the accumulators in registers. Each tile (4 KiB at
/// head_dim 64) stays in L1 while every query row meets it. Inlined into
/// [`score_heads`]'s copies, so that each gets its instruction set.
#[inline(always)]
pub(super) fn compute_logits(
    queries: &[f32],
    keys: &[f32],
    kv_head: usize,
    s: QkShape,
    packed: &mut Vec<f32>,
    logits: &mut [f32],
) {
    let d = s.head_dim;
    let key_stride = s.n_head_kv * d;
    let n_tiles = s.n_cells.div_ceil(KEY_TILE);
    packed.clear();
    packed.resize(n_tiles * KEY_TILE * d, 0.0);
    for (c, key) in keys.chunks_exact(key_stride).enumerate() {
        let key = &key[kv_head * d..(kv_head + 1) * d];
        let tile = &mut packed[(c / KEY_TILE) * KEY_TILE * d..][..KEY_TILE * d];
        let j = c % KEY_TILE;
        for (dim, &v) in key.iter().enumerate() {
            tile[dim * KEY_TILE + j] = v;
        }
    }
    for (t, tile) in packed.chunks_exact(KEY_TILE * d).enumerate() {
        let c0 = t * KEY_TILE;
        let valid = KEY_TILE.min(s.n_cells - c0);
        let mut blocks = queries.chunks_exact(QUERY_BLOCK * d);
        let mut r = 0;
        for block in &mut blocks {
            let rows: [&[f32]; QUERY_BLOCK] = std::array::from_fn(|i| &block[i * d..(i + 1) * d]);
            for (i, row_dots) in tile_dots(tile, rows).iter().enumerate() {
                store_tile(&mut logits[(r + i) * s.n_cells + c0..], row_dots, valid);
            }
            r += QUERY_BLOCK;
        }
        for q in blocks.remainder().chunks_exact(d) {
            let [row_dots] = tile_dots(tile, [q]);
            store_tile(&mut logits[r * s.n_cells + c0..], &row_dots, valid);
            r += 1;
        }
    }
}

/// Writes the first `valid` dot products of a tile (a fixed-size copy in
/// the common full-tile case, so it is inlined rather than a memcpy call).
#[inline(always)]
pub(super) fn store_tile(dst: &mut [f32], dots: &[f32; KEY_TILE], valid: usize) {
    if valid == KEY_TILE {
        dst[..KEY_TILE].copy_from_slice(dots);
    } else {
        dst[..valid].copy_from_slice(&dots[..valid]);
    }
}

/// Dot products of `N` query rows with every key of one packed tile: per
/// dimension, one tile row (two 256-bit loads) meets `N` broadcast query
/// elements, `2N` vector multiply-adds into accumulators held in registers.
/// Each dot product sums its terms in dimension order, as a plain loop
/// would, so the blocking changes no result.
#[inline(always)]
pub(super) fn tile_dots<const N: usize>(tile: &[f32], q: [&[f32]; N]) -> [[f32; KEY_TILE]; N] {
    let mut acc = [[0f32; KEY_TILE]; N];
    for (dim, k) in tile.chunks_exact(KEY_TILE).enumerate() {
        for (row, q_row) in acc.iter_mut().zip(&q) {
            let x = q_row[dim];
            for j in 0..KEY_TILE {
                row[j] += x * k[j];
            }
        }
    }
    acc
}

pub(super) const LANES: usize = 8;

#[inline(always)]
pub(super) fn lane_sum(a: [f32; LANES]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// Maximum of `values` (`-inf` when empty), in independent lanes so that
/// the compiler vectorises it (a plain fold stays a scalar chain).
#[inline(always)]
pub(super) fn lane_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for i in 0..LANES {
            lanes[i] = if chunk[i] > lanes[i] { chunk[i] } else { lanes[i] };
        }
    }
    chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Replaces `logits` by `exp((x - max) * scale)` and returns their sum.
#[inline(always)]
pub(super) fn softmax_numerators(logits: &mut [f32], scale: f32) -> f32 {
    let max = lane_max(logits);
    // A plain map loop: LLVM's loop vectoriser turns it into full-width
    // SIMD, where the same work unrolled by hand in lanes was only paired.
    for x in logits.iter_mut() {
        *x = fast_exp((*x - max) * scale);
    }
    let mut acc = [0f32; LANES];
    let mut chunks = logits.chunks_exact(LANES);
    for chunk in &mut chunks {
        for i in 0..LANES {
            acc[i] += chunk[i];
        }
    }
    chunks.remainder().iter().fold(lane_sum(acc), |sum, &x| sum + x)
}

/// `e^x` for `x <= 0` to about 2e-7 relative error, written with plain
/// arithmetic and bit casts so that it vectorises (SSE2 is enough).
#[inline(always)]
pub(super) fn fast_exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.0 { -87.0 } else { x };
    let t = x * LOG2_E + ROUND;
    let n = t - ROUND;
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    p * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapkv::scores::tests::random_values;

    #[test]
    fn blocked_logits_equal_plain_dot_products_bit_for_bit() {
        // 2 KV heads; 13 query rows (two blocks of QUERY_BLOCK and a
        // remainder) against 37 cells (two full key tiles and a partial one).
        let (n_head_kv, d, rows, n_cells) = (2, 64, 13, 37);
        let shape = QkShape {
            n_head: 2,
            n_head_kv,
            head_dim: d,
            window: rows,
            rows,
            prefix_len: n_cells - rows,
            n_cells,
            scale: 0.125,
            queries: QueryAggregation::Sum,
        };
        let queries = random_values(11, rows * d);
        let keys = random_values(12, n_cells * n_head_kv * d);
        for kv_head in 0..n_head_kv {
            let mut logits = vec![f32::NAN; rows * n_cells];
            compute_logits(&queries, &keys, kv_head, shape, &mut Vec::new(), &mut logits);
            for (r, q) in queries.chunks_exact(d).enumerate() {
                for c in 0..n_cells {
                    let k = &keys[(c * n_head_kv + kv_head) * d..][..d];
                    let plain = q.iter().zip(k).fold(0f32, |sum, (&a, &b)| sum + a * b);
                    assert_eq!(logits[r * n_cells + c].to_bits(), plain.to_bits(), "row {r}, cell {c}");
                }
            }
        }
    }

    #[test]
    fn softmax_numerators_sum_in_lanes_and_keep_the_remainder() {
        // 8 lanes × 2 and a remainder of 3.
        let mut logits: Vec<f32> = (0..19).map(|i| i as f32 * 0.25 - 2.0).collect();
        let original = logits.clone();
        let sum = softmax_numerators(&mut logits, 0.5);
        let max = original.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        for (e, x) in logits.iter().zip(&original) {
            let exact = (((x - max) * 0.5) as f64).exp();
            assert!((*e as f64 - exact).abs() <= 1e-6 * exact, "{e} vs {exact}");
        }
        let mut lanes = [0f32; LANES];
        for (i, e) in logits[..16].iter().enumerate() {
            lanes[i % LANES] += e;
        }
        let expected = logits[16..].iter().fold(lane_sum(lanes), |s, &e| s + e);
        assert_eq!(sum.to_bits(), expected.to_bits());
    }

    #[test]
    fn fast_exp_is_accurate() {
        for i in 0..=20_000 {
            let x = -(i as f32) * 0.005;
            let e = fast_exp(x);
            let r = f64::from(x).exp();
            assert!((f64::from(e) - r).abs() <= 5e-7 * r + 1e-37, "exp({x}) = {e}, want {r}");
        }
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(-1000.0) < 1e-37);
    }
}
