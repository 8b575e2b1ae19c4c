//! Shared helpers for the integration tests: models and contexts.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use snapkv::testing::{tiny_model_path, TinyModelSpec};
use snapkv::{init_backend, Context, ContextParams, FlashAttention, Model, ModelParams, WindowObserver};

/// The default model (fetched by scripts/fetch-models.sh).
pub const QWEN: &str = "models/qwen2.5-coder-0.5b-instruct.gguf";
/// The fast model.
pub const SMOLLM2: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn load(path: PathBuf) -> Model {
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-models.sh (the README's setup step)",
        path.display()
    );
    Model::load(init_backend(), &path, &ModelParams::default()).expect("model loads")
}

/// The tiny generated model (2 layers, 4 heads, 2 KV heads, head size 64).
pub fn tiny() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(tiny_model_path(&TinyModelSpec::default()).expect("tiny model written")))
}

/// Qwen2.5-Coder-0.5B-Instruct.
pub fn qwen() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(repo_path(QWEN)))
}

/// SmolLM2-135M-Instruct.
pub fn smollm2() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| load(repo_path(SMOLLM2)))
}

/// Serialises tests that run a real model, so that they do not fight over
/// the two cores.
pub fn heavy() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|e| e.into_inner())
}

/// Context parameters for tests: 2 threads, given size and attention mode.
pub fn params(n_ctx: u32, fa: FlashAttention) -> ContextParams {
    ContextParams::default()
        .with_n_ctx(n_ctx)
        .with_threads(2)
        .with_flash_attn(fa)
}

/// A context with an observer attached.
pub fn observed(model: &Model, n_ctx: u32, fa: FlashAttention) -> Context<'_> {
    Context::new(model, &params(n_ctx, fa).with_observer(WindowObserver::new())).expect("context")
}

/// Deterministic filler text of roughly `words` words.
pub fn filler(words: usize, seed: u64) -> String {
    const W: &[&str] = &[
        "the", "grass", "is", "green", "sky", "blue", "sun", "yellow", "river", "flows", "to", "sea", "a", "bird",
        "sings", "on", "tree", "wind", "moves", "over", "hills", "and", "time", "passes", "slowly",
    ];
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = String::new();
    for i in 0..words {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        out.push_str(W[(s % W.len() as u64) as usize]);
        out.push(if i % 11 == 10 { '.' } else { ' ' });
        if i % 11 == 10 {
            out.push(' ');
        }
    }
    out
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}
