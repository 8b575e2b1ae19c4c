//! The ggml tensor types a llama.cpp KV cache can hold, as a pure table.

use super::error::AlgoError;
use half::slice::HalfFloatSliceExt;

/// A ggml tensor type usable for K or V in the pinned llama.cpp KV cache.
///
/// Values match `enum ggml_type` in the pinned `ggml.h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheType {
    /// 32-bit float.
    F32,
    /// IEEE half float.
    F16,
    /// 4-bit blocks of 32 with a scale.
    Q4_0,
    /// 4-bit blocks of 32 with scale and minimum.
    Q4_1,
    /// 5-bit blocks of 32 with a scale.
    Q5_0,
    /// 5-bit blocks of 32 with scale and minimum.
    Q5_1,
    /// 8-bit blocks of 32 with a scale.
    Q8_0,
    /// 4-bit non-linear blocks of 32.
    Iq4Nl,
    /// bfloat16.
    Bf16,
}

impl CacheType {
    /// Every supported type, in ggml id order.
    pub const ALL: [CacheType; 9] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Q4_0,
        CacheType::Q4_1,
        CacheType::Q5_0,
        CacheType::Q5_1,
        CacheType::Q8_0,
        CacheType::Iq4Nl,
        CacheType::Bf16,
    ];

    /// Looks up a ggml type id.
    ///
    /// # Errors
    /// [`AlgoError::UnsupportedCacheType`] for ids that are not a KV cache
    /// type in the pinned llama.cpp.
    pub fn from_id(type_id: i32) -> Result<Self, AlgoError> {
        CacheType::ALL
            .into_iter()
            .find(|t| t.id() == type_id)
            .ok_or_else(|| AlgoError::UnsupportedCacheType {
                type_id,
                reason: "not a KV cache type known to this version (supported: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl)".into(),
            })
    }

    /// The ggml type id (`enum ggml_type` value).
    pub fn id(self) -> i32 {
        match self {
            CacheType::F32 => 0,
            CacheType::F16 => 1,
            CacheType::Q4_0 => 2,
            CacheType::Q4_1 => 3,
            CacheType::Q5_0 => 6,
            CacheType::Q5_1 => 7,
            CacheType::Q8_0 => 8,
            CacheType::Iq4Nl => 20,
            CacheType::Bf16 => 30,
        }
    }

    /// The name ggml gives the type (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            CacheType::F32 => "f32",
            CacheType::F16 => "f16",
            CacheType::Q4_0 => "q4_0",
            CacheType::Q4_1 => "q4_1",
            CacheType::Q5_0 => "q5_0",
            CacheType::Q5_1 => "q5_1",
            CacheType::Q8_0 => "q8_0",
            CacheType::Iq4Nl => "iq4_nl",
            CacheType::Bf16 => "bf16",
        }
    }

    /// Elements per block (`ggml_blck_size`).
    pub fn block_size(self) -> usize {
        match self {
            CacheType::F32 | CacheType::F16 | CacheType::Bf16 => 1,
            _ => 32,
        }
    }

    /// Bytes per block (`ggml_type_size`).
    pub fn type_size(self) -> usize {
        match self {
            CacheType::F32 => 4,
            CacheType::F16 | CacheType::Bf16 => 2,
            CacheType::Q4_0 | CacheType::Iq4Nl => 18,
            CacheType::Q4_1 => 20,
            CacheType::Q5_0 => 22,
            CacheType::Q5_1 => 24,
            CacheType::Q8_0 => 34,
        }
    }

    /// Whether rows are stored in multi-element blocks.
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of a row of `n_elements` (`ggml_row_size`); `None` when the
    /// block size does not divide `n_elements` or the size overflows.
    pub fn row_bytes(self, n_elements: usize) -> Option<usize> {
        if n_elements % self.block_size() != 0 {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.type_size())
    }
}

impl std::fmt::Display for CacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes one row of an unquantized type (F32, F16, BF16) to f32.
///
/// `src` must hold exactly `dst.len()` elements of type `ty`
/// (little-endian). Quantized types are decoded by a caller-supplied
/// decoder (ggml's own `to_float`, through the FFI layer).
///
/// # Errors
/// [`AlgoError::UnsupportedCacheType`] for quantized types,
/// [`AlgoError::ShapeMismatch`] when `src` has the wrong length.
pub fn decode_f32_row(ty: CacheType, src: &[u8], dst: &mut [f32]) -> Result<(), AlgoError> {
    if ty.is_quantized() {
        return Err(AlgoError::UnsupportedCacheType {
            type_id: ty.id(),
            reason: format!("{} is quantized; decode it with ggml's to_float instead", ty.name()),
        });
    }
    let expected = dst.len().checked_mul(ty.type_size());
    if expected != Some(src.len()) {
        return Err(AlgoError::ShapeMismatch(format!(
            "decoding {} {} elements needs {} bytes, got {}",
            dst.len(),
            ty.name(),
            dst.len().saturating_mul(ty.type_size()),
            src.len()
        )));
    }
    match ty {
        CacheType::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        CacheType::F16 => {
            // Whole slices through half's slice conversion, which checks for
            // F16C once per slice: its per-element conversion checks on
            // every element (and cannot inline the F16C instruction) in a
            // build without the `f16c` target feature, as a dependent's is.
            const CHUNK: usize = 64;
            let mut halves = [half::f16::ZERO; CHUNK];
            for (d, s) in dst.chunks_mut(CHUNK).zip(src.chunks(2 * CHUNK)) {
                let halves = &mut halves[..d.len()];
                for (h, b) in halves.iter_mut().zip(s.chunks_exact(2)) {
                    *h = half::f16::from_le_bytes([b[0], b[1]]);
                }
                halves.convert_to_f32_slice(d);
            }
        }
        _ => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = half::bf16::from_le_bytes([s[0], s[1]]).to_f32();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_ggml() {
        let expected = [
            (0, "f32", 1, 4),
            (1, "f16", 1, 2),
            (2, "q4_0", 32, 18),
            (3, "q4_1", 32, 20),
            (6, "q5_0", 32, 22),
            (7, "q5_1", 32, 24),
            (8, "q8_0", 32, 34),
            (20, "iq4_nl", 32, 18),
            (30, "bf16", 1, 2),
        ];
        for (id, name, block, size) in expected {
            let t = CacheType::from_id(id).unwrap();
            assert_eq!(
                (t.id(), t.name(), t.block_size(), t.type_size()),
                (id, name, block, size)
            );
            assert_eq!(t.is_quantized(), block > 1);
        }
    }

    #[test]
    fn unknown_ids_are_refused() {
        for id in [-1, 4, 5, 9, 19, 21, 29, 31, 1000] {
            assert!(matches!(
                CacheType::from_id(id),
                Err(AlgoError::UnsupportedCacheType { type_id, .. }) if type_id == id
            ));
        }
    }

    #[test]
    fn row_bytes_follows_blocks() {
        assert_eq!(CacheType::F16.row_bytes(128), Some(256));
        assert_eq!(CacheType::Q8_0.row_bytes(128), Some(4 * 34));
        assert_eq!(CacheType::Q4_0.row_bytes(48), None);
        assert_eq!(CacheType::F32.row_bytes(usize::MAX), None);
    }

    #[test]
    fn decodes_float_rows() {
        let values = [1.5f32, -2.25, 0.0, 65504.0];
        let mut out = [0f32; 4];
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        decode_f32_row(CacheType::F32, &f32_bytes, &mut out).unwrap();
        assert_eq!(out, values);
        let f16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        decode_f32_row(CacheType::F16, &f16_bytes, &mut out).unwrap();
        assert_eq!(out, values);
        let bf16_bytes: Vec<u8> = [1.5f32, -2.25, 0.0, 256.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        decode_f32_row(CacheType::Bf16, &bf16_bytes, &mut out).unwrap();
        assert_eq!(out, [1.5, -2.25, 0.0, 256.0]);

        // F16 rows convert in chunks: a row of 2.3 chunks, with its last
        // element odd, decodes every element in place.
        let long: Vec<f32> = (0..150).map(|i| (i as f32 - 75.0) * 0.125).collect();
        let long_bytes: Vec<u8> = long
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        let mut decoded = vec![f32::NAN; long.len()];
        decode_f32_row(CacheType::F16, &long_bytes, &mut decoded).unwrap();
        assert_eq!(decoded, long);
    }

    #[test]
    fn decode_refuses_quantized_and_wrong_lengths() {
        let mut out = [0f32; 32];
        assert!(matches!(
            decode_f32_row(CacheType::Q8_0, &[0; 34], &mut out),
            Err(AlgoError::UnsupportedCacheType { type_id: 8, .. })
        ));
        assert!(matches!(
            decode_f32_row(CacheType::F16, &[0; 63], &mut out),
            Err(AlgoError::ShapeMismatch(_))
        ));
    }
}
