//! Model shapes the micro-benchmarks share.

#![allow(dead_code)] // each bench uses the shapes it needs

use snapkv::snapkv::ModelShape;

/// Qwen2.5-Coder-0.5B, the default model: 24 layers, 14 query heads, 2 KV
/// heads of dimension 64.
pub fn qwen_0_5b() -> ModelShape {
    ModelShape {
        n_layer: 24,
        n_head: 14,
        n_head_kv: 2,
        head_dim_k: 64,
        head_dim_v: 64,
    }
}

/// SmolLM2-135M, the fast model: 30 layers, 9 query heads, 3 KV heads of
/// dimension 64.
pub fn smollm2_135m() -> ModelShape {
    ModelShape {
        n_layer: 30,
        n_head: 9,
        n_head_kv: 3,
        head_dim_k: 64,
        head_dim_v: 64,
    }
}
