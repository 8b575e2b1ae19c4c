//! Decoding cached keys from a parsed state blob into the f32 layout the
//! query-based scorer reads.

use super::error::AlgoError;
use super::ggml_type::{decode_f32_row, CacheType};
use super::scores::CellOrder;
use super::state_blob::SeqState;

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
    let shape = state.shape();
    if layer >= shape.n_layer {
        return Err(AlgoError::ShapeMismatch(format!(
            "layer {layer} out of range for {} layers",
            shape.n_layer
        )));
    }
    let n = state.n_cells();
    if order.by_position.len() != n || order.by_position.iter().any(|&c| c >= n) {
        return Err(AlgoError::ShapeMismatch(format!(
            "cell order of {} entries does not cover the state's {n} cells",
            order.by_position.len()
        )));
    }
    let n_embd = shape.n_embd_k_gqa();
    let ty = state.k_type(layer);
    out.clear();
    out.resize(n * n_embd, 0.0);
    for (dst, &cell) in out.chunks_exact_mut(n_embd).zip(&order.by_position) {
        let row = state.k_row(layer, cell);
        if ty.is_quantized() {
            decode_quantized(ty, row, dst)?;
        } else {
            decode_f32_row(ty, row, dst)?;
        }
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
