//! Read-only view of the llama.cpp single-sequence state blob.
//!
//! The blob is what `llama_state_seq_get_data_ext(ctx, dst, size, seq_id, 0)`
//! writes in the pinned llama.cpp (little-endian, no padding):
//!
//! ```text
//! u32 magic = 0xaf143cd8 ; i32 seq_id ; u32 n_stream
//! per stream: u32 cell_count; if cell_count > 0:
//!   cell_count × { i32 pos; u32 n_seq_id (= 1); i32 seq_id }
//!   u32 v_trans; u32 n_layer
//!   version 4 only: u32 n_rot_k; u32 n_rot_v
//!   n_layer × { i32 k_type; u64 k_row_bytes; cell_count rows }
//!   v_trans == 0: n_layer × { i32 v_type; u64 v_row_bytes; cell_count rows }
//!   v_trans == 1: n_layer × { i32 v_type; u32 v_el_bytes; u32 n_embd_v_gqa;
//!                             n_embd_v_gqa × cell_count elements }
//! ```
//!
//! Two layouts are known, named by the `LLAMA_STATE_SEQ_VERSION` of the
//! llama.h that writes them ([`StateFormat`]): version 3 (the pinned tree,
//! ggml 0.25) and version 4 (ggml 0.26, the tree in `llama-cpp-sys-2`
//! 0.1.160), which adds the Hadamard rotation block sizes of K and V to each
//! stream's layer header. The blob itself carries no version, so the parser
//! recognises the layout from that header: the two readings cannot both
//! match a valid blob (see [`SeqState::parse`]), and a blob that matches
//! neither is refused.
//!
//! The format is internal to llama.cpp, so the parser is strict: every count
//! and size is checked against the model shape and the blob's length, and
//! anything unexpected (cell extensions, multi-sequence cells, several
//! non-empty streams, trailing bytes) is refused.

use super::error::AlgoError;
use super::ggml_type::CacheType;

/// Magic number at the start of a sequence-state blob in the pinned version.
pub const STATE_SEQ_MAGIC: u32 = 0xaf14_3cd8;

/// Bytes of one cell's metadata in a single-sequence blob (pos, n_seq_id, seq_id).
pub(crate) const CELL_META_BYTES: usize = 12;

/// The layout of a sequence-state blob, named by the `LLAMA_STATE_SEQ_VERSION`
/// of the llama.cpp that writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateFormat {
    /// Version 3 (the pinned llama.cpp, ggml 0.25): no rotation fields. Whether
    /// a quantized K is rotated follows from its type, its head size and
    /// `LLAMA_ATTN_ROT_DISABLE` as llama.cpp read it (see
    /// [`hadamard::rotation_block`](super::hadamard::rotation_block)).
    V3,
    /// Version 4 (ggml 0.26, the llama.cpp of `llama-cpp-sys-2` 0.1.160):
    /// the stream's layer header names the Hadamard block of K and of V
    /// (0 when not rotated), so the blob says how its keys are stored.
    V4 {
        /// Block size of the rotation applied to K rows, 0 for none.
        n_rot_k: u32,
        /// Block size of the rotation applied to V rows, 0 for none.
        n_rot_v: u32,
    },
}

impl StateFormat {
    /// llama.h's `LLAMA_STATE_SEQ_VERSION` for this layout.
    pub fn version(&self) -> u32 {
        match self {
            StateFormat::V3 => 3,
            StateFormat::V4 { .. } => 4,
        }
    }

    /// Bytes the layout adds after `n_layer` in a stream's layer header.
    pub(crate) fn rotation_header_bytes(&self) -> usize {
        match self {
            StateFormat::V3 => 0,
            StateFormat::V4 { .. } => 8,
        }
    }
}

/// The attention geometry of the model whose cache the blob comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelShape {
    /// Layers that own a KV cache (the blob's `n_layer`).
    pub n_layer: usize,
    /// Query heads per layer.
    pub n_head: usize,
    /// KV heads per layer.
    pub n_head_kv: usize,
    /// Elements per K head.
    pub head_dim_k: usize,
    /// Elements per V head.
    pub head_dim_v: usize,
}

impl ModelShape {
    /// Checks that every dimension is at least 1, that the query heads split
    /// evenly over the KV heads, and that row sizes cannot overflow.
    ///
    /// # Errors
    /// [`AlgoError::ShapeMismatch`] describing the offending dimension.
    pub fn validate(&self) -> Result<(), AlgoError> {
        let dims = [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_head_kv", self.n_head_kv),
            ("head_dim_k", self.head_dim_k),
            ("head_dim_v", self.head_dim_v),
        ];
        if let Some((name, _)) = dims.iter().find(|(_, v)| *v == 0) {
            return Err(AlgoError::ShapeMismatch(format!("model shape has {name} = 0")));
        }
        if self.n_head % self.n_head_kv != 0 {
            return Err(AlgoError::ShapeMismatch(format!(
                "{} query heads do not split evenly over {} KV heads",
                self.n_head, self.n_head_kv
            )));
        }
        let too_big = |d: usize| d.checked_mul(self.n_head_kv).and_then(|e| e.checked_mul(8)).is_none();
        if too_big(self.head_dim_k) || too_big(self.head_dim_v) {
            return Err(AlgoError::ShapeMismatch("model shape row sizes overflow".into()));
        }
        Ok(())
    }

    /// Elements of a K row (all KV heads of one cell).
    pub fn n_embd_k_gqa(&self) -> usize {
        self.n_head_kv * self.head_dim_k
    }

    /// Elements of a V row (all KV heads of one cell).
    pub fn n_embd_v_gqa(&self) -> usize {
        self.n_head_kv * self.head_dim_v
    }
}

/// How one layer's V data is laid out in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VLayout {
    /// One row per cell, all KV heads concatenated (flash attention on).
    Rows {
        /// Bytes per row.
        row_bytes: usize,
    },
    /// Element-major: for each dimension `d`, that element of every cell
    /// (flash attention off; block size 1 types only).
    Transposed {
        /// Bytes per element.
        el_bytes: usize,
        /// Elements per cell (`n_head_kv * head_dim_v`).
        n_embd: usize,
    },
}

/// Where one layer's K and V live in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerSection {
    pub(crate) k_type: CacheType,
    pub(crate) k_row_bytes: usize,
    /// Offset of the first K row.
    pub(crate) k_offset: usize,
    pub(crate) v_type: CacheType,
    pub(crate) v_layout: VLayout,
    /// Offset of the first V byte.
    pub(crate) v_offset: usize,
}

/// A parsed, validated view of one sequence's state blob. Borrows the bytes.
#[derive(Debug, Clone)]
pub struct SeqState<'a> {
    raw: &'a [u8],
    shape: ModelShape,
    seq_id: i32,
    n_stream: u32,
    stream_index: u32,
    positions: Vec<i32>,
    v_trans: bool,
    format: StateFormat,
    layers: Vec<LayerSection>,
    /// Offset of the non-empty stream's `cell_count`.
    stream_start: usize,
    /// Offset just past the non-empty stream's data.
    stream_end: usize,
}

/// The one stream that holds cells, while parsing.
struct ActiveStream {
    index: u32,
    start: usize,
    positions: Vec<i32>,
    v_trans: bool,
    format: StateFormat,
    layers: Vec<LayerSection>,
    end: usize,
}

/// Cursor over the blob that turns every short read into an error naming
/// the field and the offset.
struct Reader<'a> {
    raw: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], AlgoError> {
        let end = self.offset.checked_add(n).filter(|&e| e <= self.raw.len());
        match end {
            Some(end) => {
                let bytes = &self.raw[self.offset..end];
                self.offset = end;
                Ok(bytes)
            }
            None => Err(AlgoError::UnsupportedStateFormat(format!(
                "truncated: {what} needs {n} bytes at offset {}, but the blob has {} bytes",
                self.offset,
                self.raw.len()
            ))),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32, AlgoError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self, what: &str) -> Result<i32, AlgoError> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, AlgoError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Skips `count × size` bytes of data, refusing overflow and truncation.
    fn skip_data(&mut self, count: usize, size: usize, what: &str) -> Result<usize, AlgoError> {
        let start = self.offset;
        let n = count.checked_mul(size).ok_or_else(|| {
            AlgoError::UnsupportedStateFormat(format!("{what} at offset {start}: {count} × {size} bytes overflows"))
        })?;
        self.take(n, what)?;
        Ok(start)
    }
}

fn format_error(msg: String) -> AlgoError {
    AlgoError::UnsupportedStateFormat(msg)
}

/// Checks that `ty` can be sliced per head of `head_dim` elements.
fn check_head_slicing(ty: CacheType, head_dim: usize, tensor: &str, layer: usize) -> Result<(), AlgoError> {
    if head_dim % ty.block_size() != 0 {
        return Err(AlgoError::UnsupportedCacheType {
            type_id: ty.id(),
            reason: format!(
                "{tensor} of layer {layer} is {} with blocks of {} elements, which do not divide the head size {head_dim}: per-head slices are not addressable",
                ty.name(),
                ty.block_size()
            ),
        });
    }
    Ok(())
}

fn expected_row_bytes(ty: CacheType, n_embd: usize, tensor: &str, layer: usize) -> Result<usize, AlgoError> {
    ty.row_bytes(n_embd).ok_or_else(|| AlgoError::UnsupportedCacheType {
        type_id: ty.id(),
        reason: format!(
            "{tensor} of layer {layer}: {} rows of {n_embd} elements are not a whole number of blocks",
            ty.name()
        ),
    })
}

/// Whether `n` is a rotation block llama.cpp can write for heads of
/// `head_dim` elements: 0 (no rotation) or a power of two of at least 64 that
/// divides the head.
fn plausible_rotation(n: u32, head_dim: usize) -> bool {
    let n = n as usize;
    n == 0 || (n >= 64 && n.is_power_of_two() && head_dim % n == 0)
}

/// Whether a layer-0 K header (`i32 k_type; u64 row_bytes`) for `shape`
/// starts at `at`.
fn k_header_at(raw: &[u8], at: usize, shape: &ModelShape) -> bool {
    let Some(bytes) = at.checked_add(12).and_then(|end| raw.get(at..end)) else {
        return false;
    };
    let ty = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let mut row = [0u8; 8];
    row.copy_from_slice(&bytes[4..12]);
    let row = u64::from_le_bytes(row);
    match CacheType::from_id(ty) {
        Ok(ty) => ty.row_bytes(shape.n_embd_k_gqa()).is_some_and(|r| r as u64 == row),
        Err(_) => false,
    }
}

/// Recognises the layout from what follows `n_layer` (the reader stands
/// there): version 3 continues with layer 0's K header, version 4 with two
/// rotation block sizes and then that header. For both readings to match,
/// the version 3 K type would have to read as a block size (only F32, id 0,
/// does) and its row size, `4 × n_embd_k_gqa` bytes, as a block that divides
/// the V head: a V head at least four times the whole K row. No model
/// llama.cpp caches this way has one; such a blob is refused, not guessed.
/// Nothing is consumed.
fn detect_format(r: &Reader<'_>, shape: &ModelShape) -> Result<StateFormat, AlgoError> {
    let at = r.offset;
    let v3 = k_header_at(r.raw, at, shape);
    let word = |offset: usize| {
        r.raw
            .get(offset..offset + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let v4 = match (word(at), word(at + 4)) {
        (Some(n_rot_k), Some(n_rot_v))
            if plausible_rotation(n_rot_k, shape.head_dim_k)
                && plausible_rotation(n_rot_v, shape.head_dim_v)
                && k_header_at(r.raw, at + 8, shape) =>
        {
            Some(StateFormat::V4 { n_rot_k, n_rot_v })
        }
        _ => None,
    };
    match (v3, v4) {
        (true, None) => Ok(StateFormat::V3),
        (false, Some(format)) => Ok(format),
        (true, Some(_)) => Err(format_error(format!(
            "the layer header at offset {at} reads both as state version 3 and as version 4; refusing to guess"
        ))),
        (false, None) => {
            // Name what was found as version 3 reads it: the common case is
            // a bad K type or row size, which the checks below explain.
            let mut probe = Reader { raw: r.raw, offset: at };
            let ty = CacheType::from_id(probe.i32("K type")?)?;
            check_head_slicing(ty, shape.head_dim_k, "K", 0)?;
            let expected = expected_row_bytes(ty, shape.n_embd_k_gqa(), "K", 0)?;
            let row = probe.u64("K row size")?;
            Err(AlgoError::ShapeMismatch(format!(
                "K row size of layer 0 at offset {} is {row} bytes, expected {expected} ({} × {} {} elements); \
                 nor is the header a state version 4 one (rotation block sizes and then a K header)",
                at + 4,
                shape.n_head_kv,
                shape.head_dim_k,
                ty.name()
            )))
        }
    }
}

impl<'a> SeqState<'a> {
    /// Parses and validates a single-sequence state blob against `shape`.
    ///
    /// # Errors
    /// - [`AlgoError::UnsupportedStateFormat`] when the blob is truncated,
    ///   has trailing bytes, a wrong magic, no or several non-empty streams,
    ///   cells shared with other sequences or carrying extensions (M-RoPE),
    ///   a `v_trans` flag other than 0/1, duplicate positions, or a layer
    ///   header that is neither a version 3 nor a version 4 one
    ///   ([`StateFormat`]);
    /// - [`AlgoError::ShapeMismatch`] when the layer count or a row size does
    ///   not match `shape` (or `shape` itself is invalid);
    /// - [`AlgoError::UnsupportedCacheType`] for unknown types, block sizes
    ///   that do not divide the head size, or quantized transposed V.
    pub fn parse(raw: &'a [u8], shape: &ModelShape) -> Result<Self, AlgoError> {
        shape.validate()?;
        let mut r = Reader { raw, offset: 0 };
        let magic = r.u32("magic")?;
        if magic != STATE_SEQ_MAGIC {
            return Err(format_error(format!(
                "magic at offset 0 is {magic:#010x}, expected {STATE_SEQ_MAGIC:#010x}"
            )));
        }
        let seq_id = r.i32("sequence id")?;
        let n_stream_offset = r.offset;
        let n_stream = r.u32("stream count")?;
        if n_stream == 0 {
            return Err(format_error(format!(
                "stream count at offset {n_stream_offset} is 0, expected at least 1"
            )));
        }
        let mut active: Option<ActiveStream> = None;
        for s in 0..n_stream {
            let stream_start = r.offset;
            let cell_count = r.u32("cell count")? as usize;
            if cell_count == 0 {
                continue;
            }
            if let Some(first) = &active {
                return Err(format_error(format!(
                    "streams {} and {s} both hold cells (second at offset {stream_start}); expected a single-sequence blob",
                    first.index
                )));
            }
            let positions = Self::parse_cells(&mut r, cell_count, seq_id)?;
            let (v_trans, format, layers) = Self::parse_layers(&mut r, cell_count, shape)?;
            active = Some(ActiveStream {
                index: s,
                start: stream_start,
                positions,
                v_trans,
                format,
                layers,
                end: r.offset,
            });
        }
        if r.offset != raw.len() {
            return Err(format_error(format!(
                "{} trailing bytes after the last stream at offset {}",
                raw.len() - r.offset,
                r.offset
            )));
        }
        let active = active.ok_or_else(|| {
            format_error(format!(
                "empty sequence: all {n_stream} streams have 0 cells for sequence {seq_id}"
            ))
        })?;
        Ok(SeqState {
            raw,
            shape: *shape,
            seq_id,
            n_stream,
            stream_index: active.index,
            positions: active.positions,
            v_trans: active.v_trans,
            format: active.format,
            layers: active.layers,
            stream_start: active.start,
            stream_end: active.end,
        })
    }

    fn parse_cells(r: &mut Reader<'_>, cell_count: usize, seq_id: i32) -> Result<Vec<i32>, AlgoError> {
        // Refuse impossible counts before allocating for them.
        let meta_start = r.offset;
        let fits = match cell_count.checked_mul(CELL_META_BYTES) {
            Some(n) => n <= r.raw.len() - meta_start,
            None => false,
        };
        if !fits {
            return Err(format_error(format!(
                "truncated: {cell_count} cells need {} bytes of metadata at offset {meta_start}, but the blob has {} bytes",
                cell_count.saturating_mul(CELL_META_BYTES),
                r.raw.len()
            )));
        }
        let mut positions = Vec::with_capacity(cell_count);
        for cell in 0..cell_count {
            positions.push(r.i32("cell position")?);
            let at = r.offset;
            let n_seq_id = r.u32("cell sequence count")?;
            if n_seq_id != 1 {
                return Err(format_error(format!(
                    "cell {cell} at offset {at} belongs to {n_seq_id} sequences, expected exactly 1"
                )));
            }
            let at = r.offset;
            let cell_seq = r.i32("cell sequence id")?;
            if cell_seq != seq_id {
                return Err(format_error(format!(
                    "cell {cell} at offset {at} names sequence {cell_seq}, expected {seq_id}; the cache may store per-cell extensions (M-RoPE), which are not supported"
                )));
            }
        }
        let mut sorted = positions.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(format_error(format!("position {} appears in more than one cell", w[0])));
        }
        Ok(positions)
    }

    fn parse_layers(
        r: &mut Reader<'_>,
        cell_count: usize,
        shape: &ModelShape,
    ) -> Result<(bool, StateFormat, Vec<LayerSection>), AlgoError> {
        let at = r.offset;
        let v_trans = match r.u32("v_trans flag")? {
            0 => false,
            1 => true,
            other => {
                return Err(format_error(format!(
                    "v_trans at offset {at} is {other}, expected 0 or 1"
                )))
            }
        };
        let at = r.offset;
        let n_layer = r.u32("layer count")? as usize;
        if n_layer != shape.n_layer {
            return Err(AlgoError::ShapeMismatch(format!(
                "blob has {n_layer} layers (offset {at}), the model has {}",
                shape.n_layer
            )));
        }
        let format = detect_format(r, shape)?;
        r.take(format.rotation_header_bytes(), "rotation block sizes")?;
        let mut k_parts = Vec::with_capacity(n_layer);
        for layer in 0..n_layer {
            let ty = CacheType::from_id(r.i32("K type")?)?;
            check_head_slicing(ty, shape.head_dim_k, "K", layer)?;
            let expected = expected_row_bytes(ty, shape.n_embd_k_gqa(), "K", layer)?;
            let at = r.offset;
            let row = r.u64("K row size")?;
            if row != expected as u64 {
                return Err(AlgoError::ShapeMismatch(format!(
                    "K row size of layer {layer} at offset {at} is {row} bytes, expected {expected} ({} × {} {} elements)",
                    shape.n_head_kv,
                    shape.head_dim_k,
                    ty.name()
                )));
            }
            let offset = r.skip_data(cell_count, expected, "K rows")?;
            k_parts.push((ty, expected, offset));
        }
        let mut layers = Vec::with_capacity(n_layer);
        for (layer, (k_type, k_row_bytes, k_offset)) in k_parts.into_iter().enumerate() {
            let v_type = CacheType::from_id(r.i32("V type")?)?;
            check_head_slicing(v_type, shape.head_dim_v, "V", layer)?;
            let n_embd = shape.n_embd_v_gqa();
            let expected = expected_row_bytes(v_type, n_embd, "V", layer)?;
            let (v_layout, v_offset) = if v_trans {
                if v_type.block_size() != 1 {
                    return Err(AlgoError::UnsupportedCacheType {
                        type_id: v_type.id(),
                        reason: format!(
                            "transposed V of layer {layer} is {}, but a transposed V must have block size 1",
                            v_type.name()
                        ),
                    });
                }
                let at = r.offset;
                let el = r.u32("V element size")? as usize;
                if el != v_type.type_size() {
                    return Err(AlgoError::ShapeMismatch(format!(
                        "V element size of layer {layer} at offset {at} is {el}, expected {} for {}",
                        v_type.type_size(),
                        v_type.name()
                    )));
                }
                let at = r.offset;
                let embd = r.u32("V embedding size")? as usize;
                if embd != n_embd {
                    return Err(AlgoError::ShapeMismatch(format!(
                        "V embedding size of layer {layer} at offset {at} is {embd}, expected {n_embd}"
                    )));
                }
                let cells_bytes = cell_count
                    .checked_mul(el)
                    .ok_or_else(|| format_error(format!("V of layer {layer}: {cell_count} cells overflow")))?;
                let offset = r.skip_data(n_embd, cells_bytes, "transposed V")?;
                (VLayout::Transposed { el_bytes: el, n_embd }, offset)
            } else {
                let at = r.offset;
                let row = r.u64("V row size")?;
                if row != expected as u64 {
                    return Err(AlgoError::ShapeMismatch(format!(
                        "V row size of layer {layer} at offset {at} is {row} bytes, expected {expected} ({} × {} {} elements)",
                        shape.n_head_kv,
                        shape.head_dim_v,
                        v_type.name()
                    )));
                }
                let offset = r.skip_data(cell_count, expected, "V rows")?;
                (VLayout::Rows { row_bytes: expected }, offset)
            };
            layers.push(LayerSection {
                k_type,
                k_row_bytes,
                k_offset,
                v_type,
                v_layout,
                v_offset,
            });
        }
        Ok((v_trans, format, layers))
    }

    /// Number of cells the sequence holds.
    pub fn n_cells(&self) -> usize {
        self.positions.len()
    }

    /// Position of every cell, in blob (KV cell index) order.
    pub fn positions(&self) -> &[i32] {
        &self.positions
    }

    /// The layout the blob was written in, with its rotation fields.
    pub fn format(&self) -> StateFormat {
        self.format
    }

    /// Whether V is stored transposed (element-major).
    pub fn v_transposed(&self) -> bool {
        self.v_trans
    }

    /// The sequence id written in the header.
    pub fn seq_id(&self) -> i32 {
        self.seq_id
    }

    /// Number of streams in the blob (non-empty and empty).
    pub fn n_stream(&self) -> u32 {
        self.n_stream
    }

    /// Index of the one stream that holds the sequence's cells.
    pub fn stream_index(&self) -> u32 {
        self.stream_index
    }

    /// The model shape the blob was validated against.
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }

    /// Type of layer `layer`'s K cache.
    ///
    /// # Panics
    /// If `layer >= shape().n_layer`.
    pub fn k_type(&self, layer: usize) -> CacheType {
        self.layers[layer].k_type
    }

    /// Type of layer `layer`'s V cache.
    ///
    /// # Panics
    /// If `layer >= shape().n_layer`.
    pub fn v_type(&self, layer: usize) -> CacheType {
        self.layers[layer].v_type
    }

    /// Layout of layer `layer`'s V data.
    ///
    /// # Panics
    /// If `layer >= shape().n_layer`.
    pub fn v_layout(&self, layer: usize) -> VLayout {
        self.layers[layer].v_layout
    }

    /// Bytes of a K row of layer `layer` (all KV heads of one cell).
    ///
    /// # Panics
    /// If `layer >= shape().n_layer`.
    pub fn k_row_bytes(&self, layer: usize) -> usize {
        self.layers[layer].k_row_bytes
    }

    /// The K row (all KV heads) of cell `cell` (blob order) in layer `layer`,
    /// still encoded in [`SeqState::k_type`].
    ///
    /// # Panics
    /// If `layer` or `cell` is out of range.
    pub fn k_row(&self, layer: usize, cell: usize) -> &'a [u8] {
        let sec = &self.layers[layer];
        assert!(cell < self.n_cells());
        let start = sec.k_offset + cell * sec.k_row_bytes;
        &self.raw[start..start + sec.k_row_bytes]
    }

    /// The bytes of KV head `head` of cell `cell` (blob order) in layer
    /// `layer`'s K, still encoded in [`SeqState::k_type`].
    ///
    /// # Panics
    /// If `layer`, `cell` or `head` is out of range.
    pub fn k_head_bytes(&self, layer: usize, cell: usize, head: usize) -> &'a [u8] {
        let sec = &self.layers[layer];
        assert!(cell < self.n_cells() && head < self.shape.n_head_kv);
        let head_bytes = sec.k_row_bytes / self.shape.n_head_kv;
        let start = sec.k_offset + cell * sec.k_row_bytes + head * head_bytes;
        &self.raw[start..start + head_bytes]
    }

    /// The bytes of KV head `head` of cell `cell` in layer `layer`'s V when V
    /// is stored row-wise; `None` when it is transposed.
    ///
    /// # Panics
    /// If `layer`, `cell` or `head` is out of range.
    pub fn v_head_bytes(&self, layer: usize, cell: usize, head: usize) -> Option<&'a [u8]> {
        let sec = &self.layers[layer];
        assert!(cell < self.n_cells() && head < self.shape.n_head_kv);
        match sec.v_layout {
            VLayout::Rows { row_bytes } => {
                let head_bytes = row_bytes / self.shape.n_head_kv;
                let start = sec.v_offset + cell * row_bytes + head * head_bytes;
                Some(&self.raw[start..start + head_bytes])
            }
            VLayout::Transposed { .. } => None,
        }
    }

    /// The V row (all KV heads) of cell `cell` (blob order) in layer
    /// `layer`, still encoded in [`SeqState::v_type`]; `None` when V is
    /// stored transposed (see [`SeqState::v_element`]).
    ///
    /// # Panics
    /// If `layer` or `cell` is out of range.
    pub fn v_row(&self, layer: usize, cell: usize) -> Option<&'a [u8]> {
        let sec = &self.layers[layer];
        assert!(cell < self.n_cells());
        match sec.v_layout {
            VLayout::Rows { row_bytes } => {
                let start = sec.v_offset + cell * row_bytes;
                Some(&self.raw[start..start + row_bytes])
            }
            VLayout::Transposed { .. } => None,
        }
    }

    /// Element `element` (`0..n_embd_v_gqa`, KV head-major) of every cell in
    /// blob order, when layer `layer`'s V is stored transposed: `n_cells`
    /// elements of [`SeqState::v_type`]. `None` when V is stored row-wise.
    ///
    /// # Panics
    /// If `layer` or `element` is out of range.
    pub fn v_element(&self, layer: usize, element: usize) -> Option<&'a [u8]> {
        let sec = &self.layers[layer];
        match sec.v_layout {
            VLayout::Rows { .. } => None,
            VLayout::Transposed { el_bytes, n_embd } => {
                assert!(element < n_embd);
                let len = self.n_cells() * el_bytes;
                let start = sec.v_offset + element * len;
                Some(&self.raw[start..start + len])
            }
        }
    }

    /// The whole blob.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    pub(crate) fn layer_sections(&self) -> &[LayerSection] {
        &self.layers
    }

    /// Offset of the non-empty stream's `cell_count` field.
    pub(crate) fn stream_start(&self) -> usize {
        self.stream_start
    }

    /// Offset just past the non-empty stream's data.
    pub(crate) fn stream_end(&self) -> usize {
        self.stream_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapkv::synthetic::{build_blob, build_blob_in, pattern_byte, Tensor};

    const SHAPE: ModelShape = ModelShape {
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        head_dim_k: 4,
        head_dim_v: 3,
    };

    fn blob(positions: &[i32], v_trans: bool, n_stream: u32, stream_index: u32) -> Vec<u8> {
        build_blob(
            &SHAPE,
            positions,
            CacheType::F16,
            CacheType::F32,
            v_trans,
            n_stream,
            stream_index,
            pattern_byte,
        )
    }

    fn format_refused(raw: &[u8], shape: &ModelShape) -> String {
        match SeqState::parse(raw, shape) {
            Err(AlgoError::UnsupportedStateFormat(m)) => m,
            other => panic!("expected UnsupportedStateFormat, got {other:?}"),
        }
    }

    fn put_u32(raw: &mut [u8], offset: usize, v: u32) {
        raw[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Offset of the first K type field in a one-stream blob of `n` cells.
    fn k_type_offset(n: usize) -> usize {
        16 + 12 * n + 8
    }

    #[test]
    fn parses_what_the_builder_writes() {
        let positions = [5, 0, 3, 9, 1];
        for v_trans in [false, true] {
            let raw = blob(&positions, v_trans, 3, 1);
            let st = SeqState::parse(&raw, &SHAPE).unwrap();
            assert_eq!(st.n_cells(), 5);
            assert_eq!(st.positions(), &positions);
            assert_eq!(st.v_transposed(), v_trans);
            assert_eq!(st.seq_id(), 1);
            assert_eq!((st.n_stream(), st.stream_index()), (3, 1));
            assert_eq!(st.raw().len(), raw.len());
            for layer in 0..2 {
                assert_eq!(st.k_type(layer), CacheType::F16);
                assert_eq!(st.v_type(layer), CacheType::F32);
                assert_eq!(st.k_row_bytes(layer), 16);
                for cell in 0..5 {
                    for head in 0..2 {
                        let k = st.k_head_bytes(layer, cell, head);
                        let expected: Vec<u8> = (head * 8..(head + 1) * 8)
                            .map(|b| pattern_byte(Tensor::K, layer, cell, b))
                            .collect();
                        assert_eq!(k, &expected[..]);
                        let v = st.v_head_bytes(layer, cell, head);
                        if v_trans {
                            assert!(v.is_none());
                        } else {
                            let expected: Vec<u8> = (head * 12..(head + 1) * 12)
                                .map(|b| pattern_byte(Tensor::V, layer, cell, b))
                                .collect();
                            assert_eq!(v.unwrap(), &expected[..]);
                        }
                    }
                    assert_eq!(st.k_row(layer, cell).len(), 16);
                }
            }
        }
    }

    /// A shape whose heads (64 elements) admit a rotation block.
    const ROTATABLE: ModelShape = ModelShape {
        n_layer: 2,
        n_head: 2,
        n_head_kv: 1,
        head_dim_k: 64,
        head_dim_v: 64,
    };

    fn blob_v4(positions: &[i32], n_rot_k: u32, n_rot_v: u32, v_trans: bool) -> Vec<u8> {
        build_blob_in(
            StateFormat::V4 { n_rot_k, n_rot_v },
            &ROTATABLE,
            positions,
            CacheType::Q8_0,
            CacheType::F16,
            v_trans,
            2,
            1,
            pattern_byte,
        )
    }

    #[test]
    fn both_layouts_are_recognised() {
        let v3 = build_blob(
            &ROTATABLE,
            &[1, 0, 2],
            CacheType::Q8_0,
            CacheType::F16,
            false,
            2,
            1,
            pattern_byte,
        );
        assert_eq!(SeqState::parse(&v3, &ROTATABLE).unwrap().format(), StateFormat::V3);
        for (n_rot_k, n_rot_v) in [(0, 0), (64, 64), (64, 0), (0, 64)] {
            for v_trans in [false, true] {
                let v_type = CacheType::F16;
                let raw = blob_v4(&[1, 0, 2], n_rot_k, n_rot_v, v_trans);
                let st = SeqState::parse(&raw, &ROTATABLE).unwrap();
                assert_eq!(st.format(), StateFormat::V4 { n_rot_k, n_rot_v });
                assert_eq!(st.format().version(), 4);
                assert_eq!(st.positions(), &[1, 0, 2]);
                assert_eq!(st.v_type(1), v_type);
                // The same cells in both layouts: the data is the same.
                let same = build_blob(
                    &ROTATABLE,
                    &[1, 0, 2],
                    CacheType::Q8_0,
                    v_type,
                    v_trans,
                    2,
                    1,
                    pattern_byte,
                );
                let old = SeqState::parse(&same, &ROTATABLE).unwrap();
                for layer in 0..2 {
                    for cell in 0..3 {
                        assert_eq!(st.k_row(layer, cell), old.k_row(layer, cell));
                        assert_eq!(st.v_row(layer, cell), old.v_row(layer, cell));
                    }
                }
            }
        }
    }

    #[test]
    fn unknown_rotation_headers_are_refused() {
        // Block sizes llama.cpp never writes: not a power of two, below 64,
        // or not dividing the head.
        for (n_rot_k, n_rot_v) in [(48, 0), (0, 32), (128, 0), (1, 1), (u32::MAX, 0)] {
            let raw = blob_v4(&[0, 1], n_rot_k, n_rot_v, false);
            assert!(
                SeqState::parse(&raw, &ROTATABLE).is_err(),
                "accepted rotation blocks ({n_rot_k}, {n_rot_v})"
            );
        }
    }

    #[test]
    fn every_truncation_of_a_version_4_blob_is_refused() {
        for v_trans in [false, true] {
            let raw = blob_v4(&[2, 0, 1], 64, 64, v_trans);
            for len in 0..raw.len() {
                assert!(
                    SeqState::parse(&raw[..len], &ROTATABLE).is_err(),
                    "accepted {len} bytes"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_refused() {
        for (n_stream, index) in [(1, 0), (3, 1)] {
            for v_trans in [false, true] {
                let raw = blob(&[2, 0, 1], v_trans, n_stream, index);
                for len in 0..raw.len() {
                    assert!(
                        SeqState::parse(&raw[..len], &SHAPE).is_err(),
                        "accepted a blob cut to {len} of {} bytes",
                        raw.len()
                    );
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut raw = blob(&[0, 1], false, 1, 0);
        raw.push(0);
        assert!(format_refused(&raw, &SHAPE).contains("trailing"));
    }

    #[test]
    fn bad_magic_is_refused() {
        let mut raw = blob(&[0, 1], false, 1, 0);
        raw[0] ^= 1;
        assert!(format_refused(&raw, &SHAPE).contains("magic"));
    }

    #[test]
    fn wrong_layer_count_is_refused() {
        let raw = blob(&[0, 1], false, 1, 0);
        let shape = ModelShape { n_layer: 3, ..SHAPE };
        assert!(matches!(
            SeqState::parse(&raw, &shape),
            Err(AlgoError::ShapeMismatch(m)) if m.contains("layers")
        ));
    }

    #[test]
    fn wrong_row_sizes_are_refused() {
        let raw = blob(&[0, 1], false, 1, 0);
        let wider_k = ModelShape { head_dim_k: 5, ..SHAPE };
        assert!(matches!(
            SeqState::parse(&raw, &wider_k),
            Err(AlgoError::ShapeMismatch(m)) if m.contains("K row size")
        ));
        let wider_v = ModelShape { head_dim_v: 4, ..SHAPE };
        assert!(matches!(
            SeqState::parse(&raw, &wider_v),
            Err(AlgoError::ShapeMismatch(m)) if m.contains("V row size")
        ));
        let raw_t = blob(&[0, 1], true, 1, 0);
        assert!(matches!(
            SeqState::parse(&raw_t, &wider_v),
            Err(AlgoError::ShapeMismatch(m)) if m.contains("V embedding size")
        ));
    }

    #[test]
    fn multi_sequence_cells_are_refused() {
        let mut raw = blob(&[0, 1], false, 1, 0);
        put_u32(&mut raw, 16 + 12 + 4, 2); // n_seq_id of cell 1
        assert!(format_refused(&raw, &SHAPE).contains("2 sequences"));
    }

    #[test]
    fn foreign_cell_sequence_ids_are_refused() {
        let mut raw = blob(&[0, 1], false, 1, 0);
        put_u32(&mut raw, 16 + 8, 7); // seq_id of cell 0
        assert!(format_refused(&raw, &SHAPE).contains("extensions"));
    }

    #[test]
    fn duplicate_positions_are_refused() {
        let raw = blob(&[4, 2, 4], false, 1, 0);
        assert!(format_refused(&raw, &SHAPE).contains("position 4"));
    }

    #[test]
    fn bad_v_trans_flag_is_refused() {
        let mut raw = blob(&[0, 1], false, 1, 0);
        put_u32(&mut raw, 16 + 24, 2);
        assert!(format_refused(&raw, &SHAPE).contains("v_trans"));
    }

    #[test]
    fn unknown_types_are_refused() {
        let mut raw = blob(&[0, 1], false, 1, 0);
        put_u32(&mut raw, k_type_offset(2), 4);
        assert!(matches!(
            SeqState::parse(&raw, &SHAPE),
            Err(AlgoError::UnsupportedCacheType { type_id: 4, .. })
        ));
    }

    #[test]
    fn blocks_that_split_a_head_are_refused() {
        let shape = ModelShape {
            n_layer: 1,
            n_head: 2,
            n_head_kv: 2,
            head_dim_k: 48,
            head_dim_v: 48,
        };
        // 2 × 48 = 96 elements = 3 blocks of 32: rows are valid, heads are not.
        let raw = build_blob(
            &shape,
            &[0, 1],
            CacheType::Q8_0,
            CacheType::F16,
            false,
            1,
            0,
            pattern_byte,
        );
        assert!(matches!(
            SeqState::parse(&raw, &shape),
            Err(AlgoError::UnsupportedCacheType { type_id: 8, reason }) if reason.contains("head size 48")
        ));
    }

    #[test]
    fn quantized_transposed_v_is_refused() {
        let shape = ModelShape {
            n_layer: 1,
            n_head: 1,
            n_head_kv: 1,
            head_dim_k: 32,
            head_dim_v: 32,
        };
        let raw = build_blob(
            &shape,
            &[0, 1],
            CacheType::Q8_0,
            CacheType::Q8_0,
            true,
            1,
            0,
            pattern_byte,
        );
        assert!(matches!(
            SeqState::parse(&raw, &shape),
            Err(AlgoError::UnsupportedCacheType { type_id: 8, reason }) if reason.contains("transposed")
        ));
        let row_wise = build_blob(
            &shape,
            &[0, 1],
            CacheType::Q8_0,
            CacheType::Q4_0,
            false,
            1,
            0,
            pattern_byte,
        );
        SeqState::parse(&row_wise, &shape).unwrap();
    }

    #[test]
    fn stream_layouts_are_checked() {
        // Two streams both holding cells.
        let one = blob(&[0, 1], false, 2, 0);
        let stream = &one[12..one.len() - 4];
        let mut two = one[..one.len() - 4].to_vec();
        two.extend_from_slice(stream);
        assert!(format_refused(&two, &SHAPE).contains("both hold cells"));
        // No stream holding cells.
        let mut empty = one[..8].to_vec();
        empty.extend_from_slice(&2u32.to_le_bytes());
        empty.extend_from_slice(&[0; 8]);
        assert!(format_refused(&empty, &SHAPE).contains("empty sequence"));
        // Zero streams.
        let mut none = one[..8].to_vec();
        none.extend_from_slice(&0u32.to_le_bytes());
        assert!(format_refused(&none, &SHAPE).contains("stream count"));
    }

    #[test]
    fn huge_counts_are_refused_without_allocating() {
        let mut raw = blob(&[0, 1], false, 1, 0);
        put_u32(&mut raw, 12, u32::MAX);
        assert!(format_refused(&raw, &SHAPE).contains("truncated"));
    }

    #[test]
    fn invalid_shapes_are_refused() {
        let raw = blob(&[0, 1], false, 1, 0);
        for shape in [
            ModelShape { n_head_kv: 0, ..SHAPE },
            ModelShape { n_head: 3, ..SHAPE },
            ModelShape {
                head_dim_k: usize::MAX / 2,
                ..SHAPE
            },
        ] {
            assert!(matches!(
                SeqState::parse(&raw, &shape),
                Err(AlgoError::ShapeMismatch(_))
            ));
        }
    }
}
