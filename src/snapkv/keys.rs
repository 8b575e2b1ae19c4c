//! Decoding cached K and V from a parsed state blob into what scoring
//! reads: keys in the f32 layout of the query-based scorer, and the norms
//! of the value vectors for value-weighted votes.

use super::error::AlgoError;
use super::ggml_type::{decode_f32_row, CacheType};
use super::scores::CellOrder;
use super::state_blob::{SeqState, VLayout};

/// Decodes one quantized row (`type`, encoded bytes) into f32 values.
pub type QuantizedRowDecoder<'d> = dyn FnMut(CacheType, &[u8], &mut [f32]) -> Result<(), AlgoError> + 'd;

/// Decodes layer `layer`'s keys into `out` as `[cell in position order]
/// [kv_head][d]` f32 (the `keys` argument of
/// [`add_votes_from_queries`](super::scores::add_votes_from_queries)).
///
/// F32, F16 and BF16 rows decode in Rust. Quantized rows go through
/// `decode_quantized(type, row_bytes, out_row)`, which must fill `out_row`
/// (one cell, all KV heads) — e.g. ggml's `to_float`, followed by undoing
/// the per-head Hadamard rotation llama.cpp applies to quantized caches.
///
/// # Errors
/// [`AlgoError::ShapeMismatch`] when `layer` is out of range or `order` does
/// not cover the state's cells; errors of `decode_quantized` are passed on.
pub fn gather_keys(
    state: &SeqState<'_>,
    order: &CellOrder,
    layer: usize,
    decode_quantized: &mut QuantizedRowDecoder<'_>,
    out: &mut Vec<f32>,
) -> Result<(), AlgoError> {
    check_layer_and_order(state, order, layer)?;
    let n = state.n_cells();
    let n_embd = state.shape().n_embd_k_gqa();
    let ty = state.k_type(layer);
    out.clear();
    let len = n
        .checked_mul(n_embd)
        .ok_or_else(|| AlgoError::ShapeMismatch("gathered keys overflow".into()))?;
    super::alloc::reserve(out, len, "gathered keys")?;
    out.resize(len, 0.0);
    for (dst, &cell) in out.chunks_exact_mut(n_embd).zip(&order.by_position) {
        decode_row(ty, state.k_row(layer, cell), decode_quantized, dst)?;
    }
    Ok(())
}

/// How far keys computed for the window lie from the keys the cache holds
/// for the sequence's last cells, in layer `layer`: the largest distance
/// `|cached - computed|` over those cells and their KV heads, relative to
/// how much the computed keys of that head vary over the window (their
/// RMS distance from their mean). Measured against the spread, not the
/// keys' length: a large key bias (Qwen2's) makes every key long and the
/// keys of different tokens close in relative terms, while their
/// difference is what tells tokens apart. `computed` holds `w` rows
/// `[window token][kv_head][d]` in position order, for the sequence's last
/// `w` cells. Rows evaluated for the same tokens at the same positions
/// differ by rounding (and the cache type's quantization); rows of other
/// tokens by about the spread or more.
///
/// # Errors
/// [`AlgoError::ShapeMismatch`] when `layer` is out of range, `order` does
/// not cover the state's cells, or `computed` is not 2 or more whole rows
/// and at most the state's cells; errors of `decode_quantized` are passed
/// on.
pub fn window_key_distance(
    state: &SeqState<'_>,
    order: &CellOrder,
    layer: usize,
    computed: &[f32],
    decode_quantized: &mut QuantizedRowDecoder<'_>,
) -> Result<f32, AlgoError> {
    check_layer_and_order(state, order, layer)?;
    let shape = state.shape();
    let (n_embd, d, n_head_kv) = (shape.n_embd_k_gqa(), shape.head_dim_k, shape.n_head_kv);
    let rows = computed.len() / n_embd;
    if computed.len() % n_embd != 0 || rows < 2 || rows > state.n_cells() {
        return Err(AlgoError::ShapeMismatch(format!(
            "{} computed key values are not 2..={} rows of {n_embd}",
            computed.len(),
            state.n_cells()
        )));
    }
    // Each head's spread over the window.
    let mut spread = vec![0f32; n_head_kv];
    for (g, s) in spread.iter_mut().enumerate() {
        let mut mean = vec![0f32; d];
        for row in computed.chunks_exact(n_embd) {
            mean.iter_mut()
                .zip(&row[g * d..(g + 1) * d])
                .for_each(|(m, x)| *m += x / rows as f32);
        }
        let sum_sq: f32 = computed
            .chunks_exact(n_embd)
            .map(|row| {
                row[g * d..(g + 1) * d]
                    .iter()
                    .zip(&mean)
                    .map(|(x, m)| (x - m) * (x - m))
                    .sum::<f32>()
            })
            .sum();
        *s = (sum_sq / rows as f32).sqrt();
    }
    let cells = &order.by_position[order.by_position.len() - rows..];
    let ty = state.k_type(layer);
    let mut cached = vec![0f32; n_embd];
    let mut worst = 0f32;
    for (row, &cell) in computed.chunks_exact(n_embd).zip(cells) {
        decode_row(ty, state.k_row(layer, cell), decode_quantized, &mut cached)?;
        for ((c, k), &s) in cached.chunks_exact(d).zip(row.chunks_exact(d)).zip(&spread) {
            let diff: f32 = c.iter().zip(k).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
            let distance = if s > 0.0 { diff / s } else { diff };
            if distance.is_nan() || distance > worst {
                worst = distance; // NaN counts as the worst
            }
        }
    }
    Ok(worst)
}

/// Decodes one cached row: float types in Rust, quantized ones through
/// `decode_quantized`.
fn decode_row(
    ty: CacheType,
    row: &[u8],
    decode_quantized: &mut QuantizedRowDecoder<'_>,
    out: &mut [f32],
) -> Result<(), AlgoError> {
    if ty.is_quantized() {
        decode_quantized(ty, row, out)
    } else {
        decode_f32_row(ty, row, out)
    }
}

/// Euclidean norms of layer `layer`'s cached value vectors for the prefix
/// cells, into `out` as `[kv_head][prefix index]` (prefix index `i` is cell
/// `order.by_position[i]`): the factor
/// [`weight_votes_by_value_norms`](super::scores::weight_votes_by_value_norms)
/// applies.
///
/// Reads row-wise V (flash attention on; quantized rows go through
/// `decode_quantized`, as in [`gather_keys`]) and transposed V (flash
/// attention off, float types only in llama.cpp). The Hadamard rotation of
/// quantized V rows is orthonormal, so the norms need not undo it.
///
/// # Errors
/// [`AlgoError::ShapeMismatch`] when `layer` is out of range or `order` does
/// not cover the state's cells; [`AlgoError::UnsupportedCacheType`] for a
/// quantized transposed V; errors of `decode_quantized` are passed on.
pub fn value_norms(
    state: &SeqState<'_>,
    order: &CellOrder,
    layer: usize,
    decode_quantized: &mut QuantizedRowDecoder<'_>,
    out: &mut Vec<f32>,
) -> Result<(), AlgoError> {
    check_layer_and_order(state, order, layer)?;
    let shape = state.shape();
    let (n_head_kv, d) = (shape.n_head_kv, shape.head_dim_v);
    let prefix = &order.by_position[..order.prefix_len];
    let ty = state.v_type(layer);
    out.clear();
    out.resize(n_head_kv * prefix.len(), 0.0);
    if prefix.is_empty() {
        return Ok(());
    }
    if let VLayout::Rows { .. } = state.v_layout(layer) {
        let mut row = vec![0f32; n_head_kv * d];
        for (i, &cell) in prefix.iter().enumerate() {
            let bytes = state.v_row(layer, cell).expect("V is row-wise in this layer");
            decode_row(ty, bytes, decode_quantized, &mut row)?;
            for (g, head) in row.chunks_exact(d).enumerate() {
                out[g * prefix.len() + i] = head.iter().map(|&x| x * x).sum::<f32>().sqrt();
            }
        }
        return Ok(());
    }
    if ty.is_quantized() {
        return Err(AlgoError::UnsupportedCacheType {
            type_id: ty.id(),
            reason: format!("{} V stored transposed (llama.cpp does not make one)", ty.name()),
        });
    }
    // Transposed: element e of every cell is one contiguous run. Sum the
    // squares per (head, prefix index), one element at a time.
    let mut elements = vec![0f32; state.n_cells()];
    for e in 0..n_head_kv * d {
        let bytes = state.v_element(layer, e).expect("V is transposed in this layer");
        decode_f32_row(ty, bytes, &mut elements)?;
        let sums = &mut out[(e / d) * prefix.len()..][..prefix.len()];
        for (sum, &cell) in sums.iter_mut().zip(prefix) {
            let x = elements[cell];
            *sum += x * x;
        }
    }
    out.iter_mut().for_each(|x| *x = x.sqrt());
    Ok(())
}

fn check_layer_and_order(state: &SeqState<'_>, order: &CellOrder, layer: usize) -> Result<(), AlgoError> {
    let shape = state.shape();
    if layer >= shape.n_layer {
        return Err(AlgoError::ShapeMismatch(format!(
            "layer {layer} out of range for {} layers",
            shape.n_layer
        )));
    }
    let n = state.n_cells();
    if order.by_position.len() != n || order.by_position.iter().any(|&c| c >= n) || order.prefix_len > n {
        return Err(AlgoError::ShapeMismatch(format!(
            "cell order of {} entries does not cover the state's {n} cells",
            order.by_position.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapkv::scores::position_order;
    use crate::snapkv::state_blob::ModelShape;
    use crate::snapkv::synthetic::{build_blob, pattern_byte, Tensor};

    fn shape(head_dim: usize) -> ModelShape {
        ModelShape {
            n_layer: 2,
            n_head: 2,
            n_head_kv: 2,
            head_dim_k: head_dim,
            head_dim_v: head_dim,
        }
    }

    /// K element `e` of cell `cell` in layer `layer` is `layer*100 + cell*10 + e`.
    fn value(layer: usize, cell: usize, e: usize) -> f32 {
        (layer * 100 + cell * 10 + e) as f32
    }

    #[test]
    fn window_key_distance_compares_the_last_cells_by_position() {
        let positions = [2, 0, 1];
        let raw = build_blob(
            &shape(3),
            &positions,
            CacheType::F32,
            CacheType::F16,
            false,
            1,
            0,
            |t, l, c, b| {
                if t == Tensor::V {
                    return 0;
                }
                value(l, c, b / 4).to_le_bytes()[b % 4]
            },
        );
        let state = SeqState::parse(&raw, &shape(3)).unwrap();
        let order = position_order(state.positions(), 1).unwrap();
        let mut no_quant = |_: CacheType, _: &[u8], _: &mut [f32]| -> Result<(), AlgoError> { unreachable!() };
        // The last two positions (1, 2) are cells 2 and 0; rows of 2 heads × 3.
        let exact: Vec<f32> = [2usize, 0]
            .iter()
            .flat_map(|&c| (0..6).map(move |e| value(1, c, e)))
            .collect();
        assert_eq!(
            window_key_distance(&state, &order, 1, &exact, &mut no_quant).unwrap(),
            0.0
        );
        let mut off = exact.clone();
        off[7] += 1.0;
        let d = window_key_distance(&state, &order, 1, &off, &mut no_quant).unwrap();
        assert!(d > 0.0 && d < 0.1, "{d}");
        // Other cells' keys (positions 0 and 1) are far off.
        let other: Vec<f32> = [1usize, 2]
            .iter()
            .flat_map(|&c| (0..6).map(move |e| value(1, c, e)))
            .collect();
        assert!(window_key_distance(&state, &order, 1, &other, &mut no_quant).unwrap() > 0.05);
        assert!(window_key_distance(&state, &order, 1, &exact[..5], &mut no_quant).is_err());
        assert!(
            window_key_distance(&state, &order, 1, &exact[..6], &mut no_quant).is_err(),
            "one row has no spread"
        );
        assert!(window_key_distance(&state, &order, 2, &exact, &mut no_quant).is_err());
    }

    #[test]
    fn gathers_float_keys_in_position_order() {
        let positions = [2, 0, 1];
        for ty in [CacheType::F32, CacheType::F16, CacheType::Bf16] {
            let size = ty.type_size();
            let raw = build_blob(&shape(3), &positions, ty, CacheType::F16, false, 1, 0, |t, l, c, b| {
                if t == Tensor::V {
                    return 0;
                }
                let v = value(l, c, b / size);
                let bytes = match ty {
                    CacheType::F32 => v.to_le_bytes().to_vec(),
                    CacheType::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                    _ => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                };
                bytes[b % size]
            });
            let state = SeqState::parse(&raw, &shape(3)).unwrap();
            let order = position_order(state.positions(), 1).unwrap();
            let mut out = Vec::new();
            let mut never = |_: CacheType, _: &[u8], _: &mut [f32]| -> Result<(), AlgoError> {
                panic!("float rows must not reach the quantized decoder")
            };
            gather_keys(&state, &order, 1, &mut never, &mut out).unwrap();
            let expected: Vec<f32> = [1, 2, 0]
                .iter()
                .flat_map(|&cell| (0..6).map(move |e| value(1, cell, e)))
                .collect();
            assert_eq!(out, expected, "{ty}");
        }
    }

    /// V element `e` (head-major within the cell) of cell `cell`, layer `layer`.
    fn v_value(layer: usize, cell: usize, e: usize) -> f32 {
        (layer + 1) as f32 * (cell as f32 - 1.5) + 0.25 * e as f32
    }

    #[test]
    fn value_norms_read_rows_and_transposed_v_alike() {
        let positions = [2, 0, 1, 3];
        let sh = shape(3);
        let mut by_layout = Vec::new();
        for v_trans in [false, true] {
            let raw = build_blob(
                &sh,
                &positions,
                CacheType::F16,
                CacheType::F16,
                v_trans,
                1,
                0,
                |t, l, c, b| {
                    if t == Tensor::K {
                        return 0;
                    }
                    half::f16::from_f32(v_value(l, c, b / 2)).to_le_bytes()[b % 2]
                },
            );
            let state = SeqState::parse(&raw, &sh).unwrap();
            let order = position_order(state.positions(), 1).unwrap();
            let mut never = |_: CacheType, _: &[u8], _: &mut [f32]| -> Result<(), AlgoError> {
                panic!("float rows must not reach the quantized decoder")
            };
            let mut out = Vec::new();
            value_norms(&state, &order, 1, &mut never, &mut out).unwrap();
            // Prefix in position order: cells 1, 2, 0 (positions 0, 1, 2).
            let expected: Vec<f32> = (0..2)
                .flat_map(|g| {
                    [1usize, 2, 0].map(|cell| {
                        (0..3)
                            .map(|i| half::f16::from_f32(v_value(1, cell, g * 3 + i)).to_f32().powi(2))
                            .sum::<f32>()
                            .sqrt()
                    })
                })
                .collect();
            assert_eq!(out.len(), 6);
            for (a, b) in out.iter().zip(&expected) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.max(1.0),
                    "v_trans {v_trans}: {out:?} vs {expected:?}"
                );
            }
            assert!(value_norms(&state, &order, 2, &mut never, &mut out).is_err());
            by_layout.push(out);
        }
        assert_eq!(by_layout[0], by_layout[1]);
    }

    #[test]
    fn quantized_v_rows_go_through_the_decoder() {
        let raw = build_blob(
            &shape(32),
            &[0, 1, 2],
            CacheType::F16,
            CacheType::Q8_0,
            false,
            1,
            0,
            pattern_byte,
        );
        let state = SeqState::parse(&raw, &shape(32)).unwrap();
        let order = position_order(state.positions(), 1).unwrap();
        let mut decoder = |ty: CacheType, row: &[u8], out: &mut [f32]| -> Result<(), AlgoError> {
            assert_eq!((ty, row.len(), out.len()), (CacheType::Q8_0, 68, 64));
            // Head 0 all 1s, head 1 all 2s: norms sqrt(32) and 2 sqrt(32).
            out[..32].fill(1.0);
            out[32..].fill(2.0);
            Ok(())
        };
        let mut out = Vec::new();
        value_norms(&state, &order, 0, &mut decoder, &mut out).unwrap();
        let n = 32f32.sqrt();
        assert_eq!(out, [n, n, 2.0 * n, 2.0 * n]);
    }

    #[test]
    fn quantized_keys_go_through_the_decoder() {
        let raw = build_blob(
            &shape(32),
            &[0, 1],
            CacheType::Q8_0,
            CacheType::F16,
            false,
            1,
            0,
            pattern_byte,
        );
        let state = SeqState::parse(&raw, &shape(32)).unwrap();
        let order = position_order(state.positions(), 1).unwrap();
        let mut calls = 0;
        let mut decoder = |ty: CacheType, row: &[u8], out: &mut [f32]| -> Result<(), AlgoError> {
            assert_eq!((ty, row.len(), out.len()), (CacheType::Q8_0, 68, 64));
            calls += 1;
            out.fill(calls as f32);
            Ok(())
        };
        let mut out = Vec::new();
        gather_keys(&state, &order, 0, &mut decoder, &mut out).unwrap();
        assert!(gather_keys(&state, &order, 2, &mut decoder, &mut out).is_err());
        assert_eq!(calls, 2);
        assert_eq!(out, [vec![1.0; 64], vec![2.0; 64]].concat());
    }
}
