//! Synthetic sequence-state blobs for tests (here and in the crate's
//! integration tests). Not part of the supported API.

use super::ggml_type::CacheType;
use super::state_blob::{ModelShape, StateFormat, STATE_SEQ_MAGIC};

/// Which cache tensor a byte belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tensor {
    /// Keys.
    K,
    /// Values.
    V,
}

/// Builds a valid single-sequence state blob in the pinned llama.cpp format.
///
/// Cell `i` (blob order) gets position `positions[i]`. The sequence lives in
/// stream `stream_index` of `n_stream` (the others are empty) and its id is
/// `stream_index`, as llama.cpp maps sequence s to stream s when the cache
/// is not unified. Every data byte comes from
/// `fill(tensor, layer, cell, byte)`, where `byte` indexes the cell's row in
/// row-wise form (head `g` owns bytes `[g*row/n_head_kv, (g+1)*row/n_head_kv)`);
/// for transposed V the byte `b` of element `d` has `byte = d*el + b`.
///
/// # Panics
/// When `stream_index >= n_stream` or a type cannot hold the shape's rows;
/// this is a test helper.
#[allow(clippy::too_many_arguments)]
pub fn build_blob(
    shape: &ModelShape,
    positions: &[i32],
    k_type: CacheType,
    v_type: CacheType,
    v_trans: bool,
    n_stream: u32,
    stream_index: u32,
    fill: impl FnMut(Tensor, usize, usize, usize) -> u8,
) -> Vec<u8> {
    build_blob_in(
        StateFormat::V3,
        shape,
        positions,
        k_type,
        v_type,
        v_trans,
        n_stream,
        stream_index,
        fill,
    )
}

/// [`build_blob`] in a chosen layout: [`StateFormat::V4`] writes its
/// rotation block sizes after the layer count, as llama.cpp's version 4 does.
///
/// # Panics
/// As [`build_blob`].
#[allow(clippy::too_many_arguments)]
pub fn build_blob_in(
    format: StateFormat,
    shape: &ModelShape,
    positions: &[i32],
    k_type: CacheType,
    v_type: CacheType,
    v_trans: bool,
    n_stream: u32,
    stream_index: u32,
    mut fill: impl FnMut(Tensor, usize, usize, usize) -> u8,
) -> Vec<u8> {
    assert!(stream_index < n_stream, "stream index out of range");
    let k_row = k_type
        .row_bytes(shape.n_embd_k_gqa())
        .expect("K type does not fit the shape");
    let n_embd_v = shape.n_embd_v_gqa();
    let v_row = v_type.row_bytes(n_embd_v).expect("V type does not fit the shape");
    let seq_id = stream_index as i32;
    let mut out = Vec::new();
    out.extend_from_slice(&STATE_SEQ_MAGIC.to_le_bytes());
    out.extend_from_slice(&seq_id.to_le_bytes());
    out.extend_from_slice(&n_stream.to_le_bytes());
    for s in 0..n_stream {
        if s != stream_index {
            out.extend_from_slice(&0u32.to_le_bytes());
            continue;
        }
        out.extend_from_slice(&(positions.len() as u32).to_le_bytes());
        for &p in positions {
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&seq_id.to_le_bytes());
        }
        out.extend_from_slice(&u32::from(v_trans).to_le_bytes());
        out.extend_from_slice(&(shape.n_layer as u32).to_le_bytes());
        if let StateFormat::V4 { n_rot_k, n_rot_v } = format {
            out.extend_from_slice(&n_rot_k.to_le_bytes());
            out.extend_from_slice(&n_rot_v.to_le_bytes());
        }
        for layer in 0..shape.n_layer {
            out.extend_from_slice(&k_type.id().to_le_bytes());
            out.extend_from_slice(&(k_row as u64).to_le_bytes());
            for cell in 0..positions.len() {
                out.extend((0..k_row).map(|b| fill(Tensor::K, layer, cell, b)));
            }
        }
        for layer in 0..shape.n_layer {
            out.extend_from_slice(&v_type.id().to_le_bytes());
            if v_trans {
                let el = v_type.type_size();
                out.extend_from_slice(&(el as u32).to_le_bytes());
                out.extend_from_slice(&(n_embd_v as u32).to_le_bytes());
                for d in 0..n_embd_v {
                    for cell in 0..positions.len() {
                        out.extend((0..el).map(|b| fill(Tensor::V, layer, cell, d * el + b)));
                    }
                }
            } else {
                out.extend_from_slice(&(v_row as u64).to_le_bytes());
                for cell in 0..positions.len() {
                    out.extend((0..v_row).map(|b| fill(Tensor::V, layer, cell, b)));
                }
            }
        }
    }
    out
}

/// A deterministic byte that differs between nearby tensors, layers, cells
/// and bytes: a convenient `fill` for [`build_blob`].
pub fn pattern_byte(tensor: Tensor, layer: usize, cell: usize, byte: usize) -> u8 {
    let t = match tensor {
        Tensor::K => 0x9e37_79b9u64,
        Tensor::V => 0x85eb_ca6bu64,
    };
    let mut x = t ^ ((layer as u64) << 40) ^ ((cell as u64) << 20) ^ byte as u64;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 24) as u8
}
