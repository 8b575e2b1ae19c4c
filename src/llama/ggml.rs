//! ggml type services the algorithm layer cannot provide in pure Rust.

use crate::snapkv::{AlgoError, CacheType};
use crate::sys;

/// Dequantizes one row of `ty` into `dst` with ggml's own converter.
///
/// `src` must hold exactly the bytes of `dst.len()` elements.
///
/// # Errors
/// [`AlgoError::UnsupportedCacheType`] when ggml has no converter or the
/// sizes do not match.
pub(crate) fn dequantize_row(ty: CacheType, src: &[u8], dst: &mut [f32]) -> Result<(), AlgoError> {
    let unsupported = |reason: String| AlgoError::UnsupportedCacheType {
        type_id: ty.id(),
        reason,
    };
    if ty.row_bytes(dst.len()) != Some(src.len()) {
        return Err(unsupported(format!(
            "{} bytes do not hold {} elements of {}",
            src.len(),
            dst.len(),
            ty.name()
        )));
    }
    // SAFETY: ggml_get_type_traits returns a pointer to a static table entry
    // for every valid type id; CacheType only holds valid ids.
    let traits = unsafe { &*sys::ggml_get_type_traits(ty.id() as sys::ggml_type) };
    let Some(to_float) = traits.to_float else {
        return Err(unsupported("ggml has no converter to f32".into()));
    };
    // SAFETY: src holds exactly the bytes of dst.len() elements (checked
    // above); dst is writable for dst.len() floats.
    unsafe { to_float(src.as_ptr().cast(), dst.as_mut_ptr(), dst.len() as i64) };
    Ok(())
}
