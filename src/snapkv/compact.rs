//! The per-KV-head rewrite of a sequence-state blob (a pure function).
//!
//! After the rewrite, output cell `j < n_keep` holds, for KV head `g` of
//! layer `l`, the K and V slices of the prefix cell `selection.row(l, g)[j]`:
//! different heads of one cell hold different original positions. This is
//! exact for attention because K is cached after RoPE and every prompt cell
//! precedes every later query. The cell positions can therefore only be
//! nominal: the window keeps its true positions (so the sequence's highest
//! position and where decoding continues are unchanged), and compressed
//! cells get the consecutive positions just below the window. Consequences
//! for callers: `seq_rm`/`seq_add` on ranges below the window act on
//! nominal positions, and the compressed prefix can no longer be matched
//! token-for-token for prefix reuse.

use super::error::AlgoError;
use super::scores::CellOrder;
use super::select::Selection;
use super::state_blob::{SeqState, StateFormat, VLayout, CELL_META_BYTES};

fn size_error(what: &str) -> AlgoError {
    AlgoError::ShapeMismatch(format!("rewritten blob size overflows ({what})"))
}

fn add(a: usize, b: usize, what: &str) -> Result<usize, AlgoError> {
    a.checked_add(b).ok_or_else(|| size_error(what))
}

fn mul(a: usize, b: usize, what: &str) -> Result<usize, AlgoError> {
    a.checked_mul(b).ok_or_else(|| size_error(what))
}

/// Checks that `order` describes `state`'s cells in strictly increasing
/// position order and that `selection` fits both.
fn check_inputs(state: &SeqState<'_>, order: &CellOrder, selection: &Selection) -> Result<(), AlgoError> {
    let n = state.n_cells();
    if order.by_position.len() != n || order.prefix_len.checked_add(order.window) != Some(n) {
        return Err(AlgoError::ShapeMismatch(format!(
            "cell order covers {} cells (prefix {} + window {}), the state holds {n}",
            order.by_position.len(),
            order.prefix_len,
            order.window
        )));
    }
    if order.window == 0 {
        return Err(AlgoError::ShapeMismatch("cell order has an empty window".into()));
    }
    let positions = state.positions();
    let mut previous: Option<i32> = None;
    for (i, &cell) in order.by_position.iter().enumerate() {
        let pos = *positions
            .get(cell)
            .ok_or_else(|| AlgoError::ShapeMismatch(format!("cell order entry {i} names cell {cell} of {n}")))?;
        // Strictly increasing positions also make the entries distinct.
        if previous.is_some_and(|p| p >= pos) {
            return Err(AlgoError::ShapeMismatch(format!(
                "cell order is not in increasing position order at entry {i} (position {pos})"
            )));
        }
        previous = Some(pos);
    }
    selection.validate()?;
    let shape = state.shape();
    if (selection.n_layer, selection.n_head_kv, selection.prefix_len)
        != (shape.n_layer, shape.n_head_kv, order.prefix_len)
    {
        return Err(AlgoError::InvalidSelection(format!(
            "selection is for {} layers × {} KV heads × {} prefix cells, the state has {} × {} × {}",
            selection.n_layer,
            selection.n_head_kv,
            selection.prefix_len,
            shape.n_layer,
            shape.n_head_kv,
            order.prefix_len
        )));
    }
    Ok(())
}

/// Builds a new state blob for the same sequence holding `n_keep + window`
/// cells.
///
/// Output cell `j < n_keep` holds, for KV head `g` of layer `l`, the K and V
/// head slices of the cell at prefix index `selection.row(l, g)[j]`; output
/// cells `n_keep..` hold the window cells (all heads) in position order.
/// Window cells keep their positions; compressed cell `j` gets the nominal
/// position `first_window_position - n_keep + j`, so positions stay distinct
/// and increasing and the highest position is unchanged. The header, sequence
/// id, stream count and empty streams, `v_trans` and the types are kept, so
/// the result is a valid blob of the same format for
/// `llama_state_seq_set_data_ext`. Keeping every prefix cell of a blob whose
/// cells are already in position order with positions `0..P` reproduces the
/// input byte for byte.
///
/// # Errors
/// [`AlgoError::ShapeMismatch`] when `order` does not describe `state`
/// (length, permutation, position order) or sizes overflow;
/// [`AlgoError::InvalidSelection`] when `selection` is malformed or does not
/// match the state's layers, KV heads and prefix length.
pub fn rewrite(state: &SeqState<'_>, order: &CellOrder, selection: &Selection) -> Result<Vec<u8>, AlgoError> {
    check_inputs(state, order, selection)?;
    let shape = *state.shape();
    let raw = state.raw();
    let n_keep = selection.n_keep;
    let n_out = add(n_keep, order.window, "cell count")?;
    let n_out_u32 = u32::try_from(n_out).map_err(|_| size_error("cell count exceeds u32"))?;
    let positions = state.positions();
    let first_window_pos = i64::from(positions[order.by_position[order.prefix_len]]);
    let nominal_start = first_window_pos - n_keep as i64;
    if nominal_start < i64::from(i32::MIN) {
        return Err(AlgoError::ShapeMismatch(format!(
            "nominal positions would start at {nominal_start}, below i32"
        )));
    }

    // Exact output size up front.
    let head_len = state.stream_start();
    let tail = &raw[state.stream_end()..];
    let mut total = add(head_len, tail.len(), "header")?;
    total = add(total, 4 + 8 + state.format().rotation_header_bytes(), "stream header")?;
    total = add(total, mul(n_out, CELL_META_BYTES, "cell metadata")?, "cell metadata")?;
    for sec in state.layer_sections() {
        total = add(total, 12, "K header")?;
        total = add(total, mul(n_out, sec.k_row_bytes, "K")?, "K")?;
        let v_bytes = match sec.v_layout {
            VLayout::Rows { row_bytes } => add(12, mul(n_out, row_bytes, "V")?, "V")?,
            VLayout::Transposed { el_bytes, n_embd } => add(12, mul(mul(n_out, el_bytes, "V")?, n_embd, "V")?, "V")?,
        };
        total = add(total, v_bytes, "V")?;
    }

    let mut out = Vec::new();
    super::alloc::reserve(&mut out, total, "the rewritten state")?;
    out.extend_from_slice(&raw[..head_len]);
    out.extend_from_slice(&n_out_u32.to_le_bytes());
    let seq_id = state.seq_id().to_le_bytes();
    for j in 0..n_out {
        let pos = if j < n_keep {
            // In range: nominal_start >= i32::MIN and j < n_keep keeps it below the window.
            (nominal_start + j as i64) as i32
        } else {
            positions[order.by_position[order.prefix_len + (j - n_keep)]]
        };
        out.extend_from_slice(&pos.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&seq_id);
    }
    out.extend_from_slice(&u32::from(state.v_transposed()).to_le_bytes());
    out.extend_from_slice(&(shape.n_layer as u32).to_le_bytes());
    if let StateFormat::V4 { n_rot_k, n_rot_v } = state.format() {
        out.extend_from_slice(&n_rot_k.to_le_bytes());
        out.extend_from_slice(&n_rot_v.to_le_bytes());
    }

    // source[g * n_out + j] = blob cell whose head-g slice goes to output cell j.
    let g_count = shape.n_head_kv;
    let mut source = vec![0usize; g_count * n_out];
    let fill_sources = |layer: usize, source: &mut [usize]| {
        for (g, cells) in source.chunks_exact_mut(n_out).enumerate() {
            for (dst, &p) in cells.iter_mut().zip(selection.row(layer, g)) {
                *dst = order.by_position[p as usize];
            }
            cells[n_keep..].copy_from_slice(&order.by_position[order.prefix_len..]);
        }
    };

    for (layer, sec) in state.layer_sections().iter().enumerate() {
        fill_sources(layer, &mut source);
        out.extend_from_slice(&sec.k_type.id().to_le_bytes());
        out.extend_from_slice(&(sec.k_row_bytes as u64).to_le_bytes());
        copy_rows(&mut out, raw, sec.k_offset, sec.k_row_bytes, g_count, n_out, &source);
    }
    for (layer, sec) in state.layer_sections().iter().enumerate() {
        fill_sources(layer, &mut source);
        out.extend_from_slice(&sec.v_type.id().to_le_bytes());
        match sec.v_layout {
            VLayout::Rows { row_bytes } => {
                out.extend_from_slice(&(row_bytes as u64).to_le_bytes());
                copy_rows(&mut out, raw, sec.v_offset, row_bytes, g_count, n_out, &source);
            }
            VLayout::Transposed { el_bytes, n_embd } => {
                out.extend_from_slice(&(el_bytes as u32).to_le_bytes());
                out.extend_from_slice(&(n_embd as u32).to_le_bytes());
                let n_cells = state.n_cells();
                let src_row_len = n_cells * el_bytes;
                let dst_row_len = n_out * el_bytes;
                let base = out.len();
                out.resize(base + n_embd * dst_row_len, 0);
                let dst_all = &mut out[base..];
                for d in 0..n_embd {
                    let g = d / shape.head_dim_v;
                    let cells = &source[g * n_out..(g + 1) * n_out];
                    let src_row = &raw[sec.v_offset + d * src_row_len..][..src_row_len];
                    let dst_row = &mut dst_all[d * dst_row_len..(d + 1) * dst_row_len];
                    match el_bytes {
                        2 => gather_elements::<2>(dst_row, src_row, cells),
                        4 => gather_elements::<4>(dst_row, src_row, cells),
                        _ => {
                            for (dst, &c) in dst_row.chunks_exact_mut(el_bytes).zip(cells) {
                                dst.copy_from_slice(&src_row[c * el_bytes..(c + 1) * el_bytes]);
                            }
                        }
                    }
                }
            }
        }
    }
    out.extend_from_slice(tail);
    debug_assert_eq!(out.len(), total);
    Ok(out)
}

/// `dst[j] = src[cells[j]]` for elements of `N` bytes (a fixed-size copy
/// per element instead of a `memcpy` call).
fn gather_elements<const N: usize>(dst: &mut [u8], src: &[u8], cells: &[usize]) {
    for (d, &c) in dst.chunks_exact_mut(N).zip(cells) {
        d.copy_from_slice(&src[c * N..c * N + N]);
    }
}

/// Appends `n_out` rows of `row_bytes`, assembling head `g` of row `j` from
/// source cell `source[g * n_out + j]` of the rows starting at `offset`.
fn copy_rows(
    out: &mut Vec<u8>,
    raw: &[u8],
    offset: usize,
    row_bytes: usize,
    n_head_kv: usize,
    n_out: usize,
    source: &[usize],
) {
    let head_bytes = row_bytes / n_head_kv;
    let base = out.len();
    out.resize(base + n_out * row_bytes, 0);
    let dst_all = &mut out[base..];
    for (j, dst_row) in dst_all.chunks_exact_mut(row_bytes).enumerate() {
        for (g, dst) in dst_row.chunks_exact_mut(head_bytes).enumerate() {
            let c = source[g * n_out + j];
            let start = offset + c * row_bytes + g * head_bytes;
            dst.copy_from_slice(&raw[start..start + head_bytes]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapkv::ggml_type::CacheType;
    use crate::snapkv::scores::position_order;
    use crate::snapkv::state_blob::ModelShape;
    use crate::snapkv::synthetic::{build_blob, build_blob_in, pattern_byte, Tensor};
    use proptest::prelude::*;

    /// splitmix64, for deriving test data from a proptest seed.
    fn next(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(state: &mut u64, n: usize) -> usize {
        (next(state) % n as u64) as usize
    }

    /// Blob cell holding the i-th smallest position, found by counting
    /// (independent of `position_order`).
    fn cell_of_rank(positions: &[i32], rank: usize) -> usize {
        (0..positions.len())
            .find(|&c| positions.iter().filter(|&&p| p < positions[c]).count() == rank)
            .unwrap()
    }

    struct Case {
        shape: ModelShape,
        k_type: CacheType,
        v_type: CacheType,
        v_trans: bool,
        n_stream: u32,
        stream_index: u32,
        positions: Vec<i32>,
        window: usize,
        n_keep: usize,
        kept: Vec<u32>,
        format: StateFormat,
    }

    /// Version 3, or version 4 with the rotation blocks llama.cpp would
    /// write for the case's heads (0 where a head has none).
    fn with_format(mut c: Case, v4: bool) -> Case {
        if v4 {
            let block = |d: usize| crate::snapkv::hadamard::rotation_block(d).unwrap_or(0) as u32;
            c.format = StateFormat::V4 {
                n_rot_k: block(c.shape.head_dim_k),
                n_rot_v: block(c.shape.head_dim_v),
            };
        }
        c
    }

    fn head_dim_for(ty: CacheType, small: usize, blocks: usize) -> usize {
        if ty.is_quantized() {
            ty.block_size() * blocks
        } else {
            small
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn make_case(
        n_layer: usize,
        n_head_kv: usize,
        k_idx: usize,
        v_idx: usize,
        v_trans: bool,
        small_k: usize,
        small_v: usize,
        blocks: usize,
        window: usize,
        prefix_len: usize,
        n_stream: u32,
        seed: u64,
    ) -> Case {
        let mut rng = seed;
        let k_type = CacheType::ALL[k_idx];
        let v_type = CacheType::ALL[v_idx];
        let v_trans = v_trans && !v_type.is_quantized();
        let shape = ModelShape {
            n_layer,
            n_head: n_head_kv * 2,
            n_head_kv,
            head_dim_k: head_dim_for(k_type, small_k, blocks),
            head_dim_v: head_dim_for(v_type, small_v, blocks),
        };
        let n = prefix_len + window;
        // Distinct positions with gaps, in shuffled cell order.
        let mut positions: Vec<i32> = Vec::with_capacity(n);
        let mut p = below(&mut rng, 5) as i32;
        for _ in 0..n {
            positions.push(p);
            p += 1 + below(&mut rng, 3) as i32;
        }
        for i in (1..n).rev() {
            positions.swap(i, below(&mut rng, i + 1));
        }
        let n_keep = below(&mut rng, prefix_len + 1);
        let mut kept = Vec::new();
        for _ in 0..n_layer * n_head_kv {
            let mut all: Vec<u32> = (0..prefix_len as u32).collect();
            for i in (1..prefix_len).rev() {
                all.swap(i, below(&mut rng, i + 1));
            }
            let mut row = all[..n_keep].to_vec();
            row.sort_unstable();
            kept.extend(row);
        }
        Case {
            shape,
            k_type,
            v_type,
            v_trans,
            n_stream,
            stream_index: (seed % u64::from(n_stream)) as u32,
            positions,
            window,
            n_keep,
            kept,
            format: StateFormat::V3,
        }
    }

    fn source_blob(c: &Case) -> Vec<u8> {
        build_blob_in(
            c.format,
            &c.shape,
            &c.positions,
            c.k_type,
            c.v_type,
            c.v_trans,
            c.n_stream,
            c.stream_index,
            pattern_byte,
        )
    }

    /// The blob the rewrite must produce, derived naively from the spec.
    fn expected_blob(c: &Case) -> Vec<u8> {
        let n = c.positions.len();
        let prefix_len = n - c.window;
        let n_out = c.n_keep + c.window;
        let first_window = c.positions[cell_of_rank(&c.positions, prefix_len)];
        let out_positions: Vec<i32> = (0..n_out)
            .map(|j| {
                if j < c.n_keep {
                    first_window - c.n_keep as i32 + j as i32
                } else {
                    c.positions[cell_of_rank(&c.positions, prefix_len + j - c.n_keep)]
                }
            })
            .collect();
        let g_count = c.shape.n_head_kv;
        let k_head = c.k_type.row_bytes(c.shape.n_embd_k_gqa()).unwrap() / g_count;
        let v_head = c.v_type.row_bytes(c.shape.n_embd_v_gqa()).unwrap() / g_count;
        let source_cell = |layer: usize, g: usize, j: usize| {
            if j < c.n_keep {
                let prefix_index = c.kept[(layer * g_count + g) * c.n_keep + j] as usize;
                cell_of_rank(&c.positions, prefix_index)
            } else {
                cell_of_rank(&c.positions, prefix_len + j - c.n_keep)
            }
        };
        build_blob_in(
            c.format,
            &c.shape,
            &out_positions,
            c.k_type,
            c.v_type,
            c.v_trans,
            c.n_stream,
            c.stream_index,
            |tensor, layer, j, byte| {
                let g = match tensor {
                    Tensor::K => byte / k_head,
                    Tensor::V => byte / v_head,
                };
                pattern_byte(tensor, layer, source_cell(layer, g, j), byte)
            },
        )
    }

    fn run_rewrite(c: &Case, raw: &[u8]) -> Result<Vec<u8>, AlgoError> {
        let state = SeqState::parse(raw, &c.shape)?;
        let order = position_order(state.positions(), c.window)?;
        let selection = Selection::new(
            c.shape.n_layer,
            c.shape.n_head_kv,
            c.n_keep,
            order.prefix_len,
            c.kept.clone(),
        )?;
        rewrite(&state, &order, &selection)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn rewrite_moves_every_byte_where_the_spec_says(
            n_layer in 1usize..=3,
            n_head_kv in 1usize..=3,
            k_idx in 0usize..9,
            v_idx in 0usize..9,
            v_trans in any::<bool>(),
            small_k in 1usize..=6,
            small_v in 1usize..=6,
            blocks in 1usize..=2,
            window in 1usize..=4,
            prefix_len in 1usize..=8,
            n_stream in 1u32..=3,
            seed in any::<u64>(),
            v4 in any::<bool>(),
        ) {
            let c = with_format(make_case(n_layer, n_head_kv, k_idx, v_idx, v_trans, small_k, small_v,
                blocks, window, prefix_len, n_stream, seed), v4);
            let raw = source_blob(&c);
            let out = run_rewrite(&c, &raw).unwrap();
            let expected = expected_blob(&c);
            prop_assert_eq!(out.len(), expected.len());
            if let Some(i) = out.iter().zip(&expected).position(|(a, b)| a != b) {
                prop_assert!(false, "first differing byte at offset {}", i);
            }
            // The output is itself a valid blob of the same format.
            let reparsed = SeqState::parse(&out, &c.shape).unwrap();
            prop_assert_eq!(reparsed.n_cells(), c.n_keep + c.window);
            prop_assert_eq!(reparsed.format(), c.format);
        }

        #[test]
        fn keeping_everything_in_position_order_is_the_identity(
            n_layer in 1usize..=3,
            n_head_kv in 1usize..=3,
            k_idx in 0usize..9,
            v_idx in 0usize..9,
            v_trans in any::<bool>(),
            small in 1usize..=6,
            window in 1usize..=4,
            prefix_len in 1usize..=8,
            n_stream in 1u32..=3,
            v4 in any::<bool>(),
        ) {
            let mut c = with_format(make_case(n_layer, n_head_kv, k_idx, v_idx, v_trans, small, small,
                1, window, prefix_len, n_stream, 0), v4);
            c.positions = (0..(prefix_len + window) as i32).collect();
            c.n_keep = prefix_len;
            c.kept = (0..n_layer * n_head_kv)
                .flat_map(|_| 0..prefix_len as u32)
                .collect();
            let raw = source_blob(&c);
            let out = run_rewrite(&c, &raw).unwrap();
            prop_assert!(out == raw);
        }
    }

    fn small_case() -> (Case, Vec<u8>) {
        let c = make_case(2, 2, 1, 1, false, 4, 4, 1, 2, 5, 1, 42);
        let raw = source_blob(&c);
        (c, raw)
    }

    #[test]
    fn mismatched_selections_are_refused() {
        let (c, raw) = small_case();
        let state = SeqState::parse(&raw, &c.shape).unwrap();
        let order = position_order(state.positions(), c.window).unwrap();
        let wrong_layers = Selection::uniform(1, 2, order.prefix_len, vec![0]).unwrap();
        assert!(matches!(
            rewrite(&state, &order, &wrong_layers),
            Err(AlgoError::InvalidSelection(_))
        ));
        let wrong_prefix = Selection::uniform(2, 2, order.prefix_len + 1, vec![0]).unwrap();
        assert!(matches!(
            rewrite(&state, &order, &wrong_prefix),
            Err(AlgoError::InvalidSelection(_))
        ));
    }

    #[test]
    fn inconsistent_orders_are_refused() {
        let (c, raw) = small_case();
        let state = SeqState::parse(&raw, &c.shape).unwrap();
        let order = position_order(state.positions(), c.window).unwrap();
        let sel = Selection::uniform(2, 2, order.prefix_len, vec![1, 3]).unwrap();
        let mut swapped = order.clone();
        swapped.by_position.swap(0, 1);
        assert!(matches!(
            rewrite(&state, &swapped, &sel),
            Err(AlgoError::ShapeMismatch(_))
        ));
        let mut short = order.clone();
        short.by_position.pop();
        assert!(rewrite(&state, &short, &sel).is_err());
        let mut out_of_range = order.clone();
        out_of_range.by_position[0] = 99;
        assert!(rewrite(&state, &out_of_range, &sel).is_err());
        rewrite(&state, &order, &sel).unwrap();
    }

    #[test]
    fn nominal_positions_sit_just_below_the_window() {
        let shape = ModelShape {
            n_layer: 1,
            n_head: 1,
            n_head_kv: 1,
            head_dim_k: 1,
            head_dim_v: 1,
        };
        let positions = [10, 20, 30, 40, 50, 60];
        let raw = build_blob(
            &shape,
            &positions,
            CacheType::F32,
            CacheType::F32,
            true,
            1,
            0,
            pattern_byte,
        );
        let state = SeqState::parse(&raw, &shape).unwrap();
        let order = position_order(state.positions(), 2).unwrap();
        let sel = Selection::uniform(1, 1, 4, vec![0, 2]).unwrap();
        let out = rewrite(&state, &order, &sel).unwrap();
        let new_state = SeqState::parse(&out, &shape).unwrap();
        assert_eq!(new_state.positions(), &[48, 49, 50, 60]);
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::snapkv::ggml_type::CacheType;
    use crate::snapkv::scores::position_order;
    use crate::snapkv::state_blob::ModelShape;
    use crate::snapkv::synthetic::build_blob;

    /// Times the rewrite at the real shape (Qwen2.5-0.5B, 7.5k prompt, f16,
    /// 1024 cells kept). Run: `cargo test --release -- --ignored --nocapture time_`
    #[test]
    #[ignore]
    fn time_rewrite_at_real_shape() {
        let shape = ModelShape {
            n_layer: 24,
            n_head: 14,
            n_head_kv: 2,
            head_dim_k: 64,
            head_dim_v: 64,
        };
        let n: usize = 7500;
        let window = 32;
        let positions: Vec<i32> = (0..n as i32).collect();
        for v_trans in [false, true] {
            let raw = build_blob(
                &shape,
                &positions,
                CacheType::F16,
                CacheType::F16,
                v_trans,
                1,
                0,
                |_, l, c, b| (l ^ c ^ b) as u8,
            );
            let state = SeqState::parse(&raw, &shape).unwrap();
            let order = position_order(state.positions(), window).unwrap();
            let n_keep = 1024 - window;
            let kept: Vec<u32> = (0..shape.n_layer * shape.n_head_kv)
                .flat_map(|r| (0..n_keep as u32).map(move |j| j * 7 + (r as u32 % 7)))
                .collect();
            let sel = Selection::new(24, 2, n_keep, order.prefix_len, kept).unwrap();
            let start = std::time::Instant::now();
            let parsed = SeqState::parse(&raw, &shape).unwrap();
            let t_parse = start.elapsed();
            let start = std::time::Instant::now();
            let out = rewrite(&parsed, &order, &sel).unwrap();
            let t_rewrite = start.elapsed();
            println!(
                "rewrite v_trans={v_trans}: blob {} B -> {} B, parse {t_parse:?}, rewrite {t_rewrite:?}",
                raw.len(),
                out.len()
            );
        }
    }
}
