//! Fallible allocation for the buffers that grow with the prompt (state
//! blobs, votes, gathered keys, rewritten blobs): running out of memory
//! there is an error the host can act on, never an abort of its process.

use super::error::AlgoError;

/// A vector of `len` copies of `value`, or
/// [`AlgoError::OutOfMemory`] naming `what` when the memory cannot be had.
pub(crate) fn filled_vec<T: Clone>(len: usize, value: T, what: &'static str) -> Result<Vec<T>, AlgoError> {
    let mut v = Vec::new();
    reserve(&mut v, len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// Makes room for `additional` more elements in `v`, or returns
/// [`AlgoError::OutOfMemory`] naming `what`.
pub(crate) fn reserve<T>(v: &mut Vec<T>, additional: usize, what: &'static str) -> Result<(), AlgoError> {
    v.try_reserve_exact(additional).map_err(|_| AlgoError::OutOfMemory {
        what,
        bytes: additional.saturating_mul(std::mem::size_of::<T>()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impossible_allocation_is_an_error_not_an_abort() {
        let err = filled_vec(usize::MAX / 2, 0u8, "a test buffer").unwrap_err();
        assert!(
            matches!(
                err,
                AlgoError::OutOfMemory {
                    what: "a test buffer",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("a test buffer"), "{err}");
        let mut v = vec![1u32; 3];
        assert!(reserve(&mut v, usize::MAX / 8, "more").is_err());
        assert_eq!(v, [1, 1, 1], "a failed reservation leaves the vector as it was");
        assert_eq!(filled_vec(4, 7i8, "small").unwrap(), [7; 4]);
    }
}
