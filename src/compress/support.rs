//! What the engine checks before it touches a sequence: the model, the
//! context, cells shared with other sequences, and whether the window rows
//! it captured belong to the sequence it compresses.

use crate::error::{Error, Result};
use crate::llama::{dequantize_row, ContextRef, ModelRef, SeqId};
use crate::snapkv::{
    hadamard, window_key_distance, AlgoError, CacheType, CellOrder, ModelShape, SeqState, StateFormat,
};

/// Model architectures whose graph naming (`Qcur-<il>` and `Kcur-<il>`
/// after RoPE, `kq_soft_max-<il>`) and attention scale snapkv has verified.
pub const VERIFIED_ARCHS: &[&str] = &["llama", "qwen2", "qwen3"];

/// The model's shape as the algorithm layer (state parsing) needs it.
pub fn model_shape(model: &ModelRef) -> ModelShape {
    ModelShape {
        n_layer: model.n_layer(),
        n_head: model.n_head(),
        n_head_kv: model.n_head_kv(),
        head_dim_k: model.head_dim(),
        head_dim_v: model.head_dim_v(),
    }
}

/// Refuses models on which per-head eviction is unsound or unverified.
/// Every entry point calls it before it reads or changes anything.
pub(crate) fn check_supported(model: &ModelRef) -> Result<()> {
    let arch = model.arch();
    let refuse = |why: String| Err(Error::Unsupported(format!("{arch}: {why}")));
    if model.is_recurrent() || model.is_hybrid() {
        return refuse("recurrent and hybrid models keep state that is not a KV cache".into());
    }
    if model.n_swa() > 0 {
        return refuse("sliding-window layers keep a second cache that per-head eviction does not cover".into());
    }
    if model
        .meta_f32(&format!("{arch}.attention.max_alibi_bias"))
        .unwrap_or(0.0)
        > 0.0
    {
        return refuse("ALiBi attention depends on cell positions, which compression makes nominal".into());
    }
    if model.meta_f32(&format!("{arch}.attn_logit_softcapping")).unwrap_or(0.0) > 0.0 {
        return refuse("attention logit soft-capping is not modelled by the scorer".into());
    }
    if model.n_head_kv() == 0 || model.n_head() % model.n_head_kv() != 0 {
        return refuse("query heads are not a multiple of KV heads".into());
    }
    if !VERIFIED_ARCHS.contains(&arch.as_str()) {
        return refuse(format!(
            "architecture not verified for per-head compression (verified: {})",
            VERIFIED_ARCHS.join(", ")
        ));
    }
    Ok(())
}

/// The window must be evaluated as one micro-batch.
pub(super) fn check_window_fits(ctx: &ContextRef, w: usize) -> Result<()> {
    if w > ctx.n_ubatch() {
        return Err(AlgoError::InvalidConfig {
            param: "window",
            reason: format!(
                "the window ({w}) must fit one micro-batch of the context (n_ubatch = {})",
                ctx.n_ubatch()
            ),
        }
        .into());
    }
    Ok(())
}

/// Cells of a unified cache that `seq` may share with other sequences
/// (`llama_memory_seq_cp` shares cells instead of copying them). Compacting
/// such a sequence rewrites it into cells of its own while the shared ones
/// stay with the other sequences, so the cache needs room for the copy; and
/// a restore after a failure needs room for every cell the sequence had. So
/// a sequence that may share cells is compressed only when the cache's free
/// cells cover every possibly shared one: then both always fit.
///
/// llama.cpp has no call that lists a cell's sequences, and a sequence's
/// state names only that sequence. Its metadata-only sizes do tell the
/// counts: a sequence's state holds 12 bytes per cell, the whole cache's
/// (`seq_id = -1`) 8 bytes per used cell plus 4 per (cell, sequence) pair,
/// both after the same per-stream header. From them: the used cells `U`,
/// the pairs `S` (each sequence's cell count, summed); `S - U` pairs are
/// extra memberships, an upper bound of the cells this sequence shares.
pub(super) fn check_shared_cells(ctx: &ContextRef, seq: SeqId, state: &SeqState<'_>) -> Result<()> {
    // Separate streams (per-sequence caches) copy on seq_cp: nothing is
    // shared. One sequence alone shares nothing.
    if state.n_stream() != 1 || ctx.n_seq_max() == 1 {
        return Ok(());
    }
    let unknown = |what: String| -> Error {
        AlgoError::UnsupportedStateFormat(format!("cell counts from llama.cpp's state sizes: {what}")).into()
    };
    // Magic, sequence id, stream count, cell count.
    const HEAD: usize = 16;
    let own = ctx.state_seq_metadata_size(seq)?;
    let c_own = state.n_cells();
    let header = own
        .checked_sub(HEAD + 12 * c_own)
        .ok_or_else(|| unknown(format!("{own} bytes for {c_own} cells")))?;
    let mut pairs = 0usize;
    for other in 0..ctx.n_seq_max() as SeqId {
        let size = if other == seq {
            own
        } else {
            ctx.state_seq_metadata_size(other)?
        };
        if size == HEAD {
            continue;
        }
        let cells = size
            .checked_sub(HEAD + header)
            .filter(|b| b % 12 == 0)
            .ok_or_else(|| unknown(format!("sequence {other}: {size} bytes")))?;
        pairs += cells / 12;
    }
    let all = ctx.state_seq_metadata_size(-1)?;
    let used = all
        .checked_sub(HEAD + header + 4 * pairs)
        .filter(|b| b % 8 == 0)
        .ok_or_else(|| {
            unknown(format!(
                "the whole cache: {all} bytes for {pairs} (cell, sequence) pairs"
            ))
        })?
        / 8;
    let shared = pairs
        .checked_sub(used)
        .ok_or_else(|| unknown(format!("{used} used cells but {pairs} (cell, sequence) pairs")))?;
    let free = ctx.n_ctx().saturating_sub(used);
    if shared > free {
        return Err(Error::Unsupported(format!(
            "sequence {seq} may share up to {shared} cells with other sequences (llama_memory_seq_cp), and the \
             cache has {free} free cells: compacting it could leave it neither compressed nor restorable; free \
             {shared} cells or more (or give the sequence cells of its own) before compressing"
        )));
    }
    Ok(())
}

/// The Hadamard block llama.cpp rotated `layer`'s cached keys with, if it
/// did. A version 4 blob says so in its header. For version 3 it follows
/// from the cache: quantized K, a head size with such a block, and rotation
/// not disabled (`LLAMA_ATTN_ROT_DISABLE`, as llama.cpp read it when the
/// context was created: `rotation_disabled`).
pub(super) fn k_rotation(state: &SeqState<'_>, layer: usize, rotation_disabled: bool) -> Option<usize> {
    match state.format() {
        StateFormat::V4 { n_rot_k, .. } => (n_rot_k != 0).then_some(n_rot_k as usize),
        StateFormat::V3 => {
            if rotation_disabled || !state.k_type(layer).is_quantized() {
                return None;
            }
            hadamard::rotation_block(state.shape().head_dim_k)
        }
    }
}

/// Largest distance (relative to the keys' spread over the window, see
/// [`window_key_distance`]) of window keys computed for the same tokens
/// from the cached ones. Measured on Qwen2.5 0.5B's first layer (300-token
/// prompts): the same tokens 0.0045 (f16) and 0.062 (q8_0); one token of
/// the window changed 0.23 and 0.25; another text 0.29 and 0.30. On 4- and
/// 5-bit caches quantization alone moves the keys as far as another text
/// does (1.01 against 1.03): no check there (`None`).
fn key_tolerance(k_type: CacheType) -> Option<f32> {
    match k_type {
        CacheType::Q8_0 => Some(0.15),
        t if !t.is_quantized() => Some(0.05),
        _ => None,
    }
}

/// Whether the window rows the observer captured were evaluated for the
/// tokens `seq` holds at its last positions: their layer-0 keys must match
/// the cached ones. `None` when they do, or when the cache's type cannot
/// tell (4- and 5-bit K); otherwise the distance found, for the error
/// message.
pub(super) fn window_keys_mismatch(
    keys: Option<&[f32]>,
    state: &SeqState<'_>,
    order: &CellOrder,
    rotation_disabled: bool,
) -> Result<Option<f32>> {
    let keys = keys.ok_or_else(|| {
        Error::Capture("no layer-0 key (Kcur-0) captured: is the architecture's graph as expected?".into())
    })?;
    let k_type = state.k_type(0);
    let rotated;
    let keys = match k_rotation(state, 0, rotation_disabled) {
        Some(n) => {
            let mut k = keys.to_vec();
            hadamard::rotate_blocks(&mut k, n);
            rotated = k;
            &rotated[..]
        }
        None => keys,
    };
    let Some(tolerance) = key_tolerance(k_type) else {
        return Ok(None);
    };
    let distance = window_key_distance(state, order, 0, keys, &mut dequantize_row)?;
    // A NaN distance (a non-finite key) is a mismatch too.
    let matches = distance.is_finite() && distance <= tolerance;
    Ok((!matches).then_some(distance))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapkv::synthetic::{build_blob_in, pattern_byte};

    const SHAPE: ModelShape = ModelShape {
        n_layer: 1,
        n_head: 2,
        n_head_kv: 1,
        head_dim_k: 64,
        head_dim_v: 64,
    };

    fn rotation_of(format: StateFormat, k_type: CacheType, rotation_disabled: bool) -> Option<usize> {
        let raw = build_blob_in(
            format,
            &SHAPE,
            &[0, 1],
            k_type,
            CacheType::F16,
            false,
            1,
            0,
            pattern_byte,
        );
        let state = SeqState::parse(&raw, &SHAPE).unwrap();
        k_rotation(&state, 0, rotation_disabled)
    }

    #[test]
    fn version_3_rotation_follows_the_cache() {
        assert_eq!(rotation_of(StateFormat::V3, CacheType::Q8_0, false), Some(64));
        assert_eq!(rotation_of(StateFormat::V3, CacheType::Q8_0, true), None);
        assert_eq!(rotation_of(StateFormat::V3, CacheType::F16, false), None);
    }

    #[test]
    fn version_4_rotation_is_what_the_header_says() {
        let v4 = |n_rot_k| StateFormat::V4 { n_rot_k, n_rot_v: 0 };
        assert_eq!(rotation_of(v4(64), CacheType::Q8_0, false), Some(64));
        // The header wins over the version 3 rule in both directions.
        assert_eq!(rotation_of(v4(0), CacheType::Q8_0, false), None);
        assert_eq!(rotation_of(v4(64), CacheType::Q8_0, true), Some(64));
        assert_eq!(rotation_of(v4(64), CacheType::F16, false), Some(64));
    }
}
