//! Token sampling through llama.cpp's sampler chain.

use std::ptr::NonNull;

use super::{ContextRef, Token};
use crate::error::{Error, Result};
use crate::sys;

/// A llama.cpp sampler chain, freed on drop.
#[derive(Debug)]
pub struct Sampler {
    raw: NonNull<sys::llama_sampler>,
}

// SAFETY: a sampler chain is plain heap state with no thread affinity.
unsafe impl Send for Sampler {}

impl Sampler {
    fn chain() -> NonNull<sys::llama_sampler> {
        // SAFETY: default params; the chain is owned by the returned Sampler.
        let raw = unsafe { sys::llama_sampler_chain_init(sys::llama_sampler_chain_default_params()) };
        NonNull::new(raw).expect("llama_sampler_chain_init returned NULL (out of memory)")
    }

    fn add(&mut self, s: *mut sys::llama_sampler) {
        // SAFETY: the chain takes ownership of `s`, a fresh sampler.
        unsafe { sys::llama_sampler_chain_add(self.raw.as_ptr(), s) }
    }

    /// Always picks the most likely token (deterministic).
    pub fn greedy() -> Self {
        let mut s = Self { raw: Self::chain() };
        // SAFETY: llama_sampler_init_greedy has no preconditions.
        s.add(unsafe { sys::llama_sampler_init_greedy() });
        s
    }

    /// Temperature sampling after top-k and top-p filtering, reproducible
    /// for a given `seed`.
    pub fn seeded(seed: u32, temperature: f32, top_k: i32, top_p: f32) -> Self {
        let mut s = Self { raw: Self::chain() };
        // SAFETY: plain constructors with value arguments.
        unsafe {
            s.add(sys::llama_sampler_init_top_k(top_k));
            s.add(sys::llama_sampler_init_top_p(top_p, 1));
            s.add(sys::llama_sampler_init_temp(temperature));
            s.add(sys::llama_sampler_init_dist(seed));
        }
        s
    }

    /// Samples from output `idx` of the last decode (-1 = last output) and
    /// records the choice in the chain's state.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the last decode computed no logits
    /// for output `idx` (nothing decoded yet, or the token's logits were not
    /// requested): llama.cpp would assert on it.
    pub fn sample(&mut self, ctx: &mut ContextRef, idx: i32) -> Result<Token> {
        if ctx.logits_ith(idx).is_none() {
            return Err(Error::InvalidArgument {
                param: "idx",
                reason: format!("the last decode computed no logits for output {idx}"),
            });
        }
        // SAFETY: valid sampler and context, and output `idx` has logits
        // (checked above), so llama_sampler_sample's assertion holds; it
        // also accepts the token.
        Ok(unsafe { sys::llama_sampler_sample(self.raw.as_ptr(), ctx.as_ptr(), idx) })
    }

    /// Resets the chain's state (e.g. penalties, RNG position is kept).
    pub fn reset(&mut self) {
        // SAFETY: valid sampler.
        unsafe { sys::llama_sampler_reset(self.raw.as_ptr()) }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // SAFETY: we own the chain (and through it every added sampler).
        unsafe { sys::llama_sampler_free(self.raw.as_ptr()) }
    }
}
