//! Shared helpers for the integration tests: models and contexts.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use snapkv::compress::model_shape;
use snapkv::snapkv::SeqState;
use snapkv::{
    init_backend, Budget, ChatMessage, Context, ContextParams, ContextRef, FlashAttention, Model, ModelParams,
    SnapKvConfig, WindowObserver,
};
use snapkv_testing::{tiny_model_path, TinyModelSpec};

/// The default model (fetched by scripts/fetch-models.sh).
pub const QWEN: &str = "models/qwen2.5-coder-0.5b-instruct.gguf";
/// The fast model.
pub const SMOLLM2: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A path in the workspace root (where `models/` is), also from the member
/// crates that include this module.
pub fn repo_path(rel: &str) -> PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest
        .ancestors()
        .find(|d| d.join("vendor").is_dir())
        .unwrap_or(manifest);
    root.join(rel)
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

/// The pinned tree built by llama.cpp's own CMake with shared libraries
/// (scripts/build-llama-tools.sh, into target/llama-tools; a later call
/// rebuilds only what changed): its programs in `bin/` (llama-server,
/// llama-completion, llama-cli, ggml-rpc-server), and in `install/` the
/// libllama and libggml* they run on with their headers, installed as a
/// host's llama.cpp is. Built once per test binary, on first use.
pub fn llama_tools() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = repo_path("target/llama-tools");
        let status = std::process::Command::new("bash")
            .arg(repo_path("scripts/build-llama-tools.sh"))
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run scripts/build-llama-tools.sh");
        assert!(status.success(), "scripts/build-llama-tools.sh failed");
        dir
    })
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

/// cargo's profile directory (`target/release`): integration tests run
/// from its `deps` folder.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// The default configuration with a budget of `budget` cells.
pub fn config(budget: usize) -> SnapKvConfig {
    let mut c = SnapKvConfig::default();
    c.budget = Budget::Cells(budget);
    c
}

/// A tiny-model prompt of exactly `n` tokens (BOS + filler text).
pub fn tiny_prompt(n: usize, seed: u64) -> Vec<i32> {
    let mut tokens = tiny().tokenize(&filler(n, seed), true, false).unwrap();
    assert!(tokens.len() >= n);
    tokens.truncate(n);
    tokens
}

/// The cells sequence `seq` holds.
pub fn n_cells(ctx: &ContextRef, seq: i32) -> usize {
    let blob = ctx.state_seq_get(seq).unwrap();
    SeqState::parse(&blob, &model_shape(ctx.model())).unwrap().n_cells()
}

const PASSKEY_FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// A passkey document (no question, no chat template) of about
/// `24 * reps` tokens with `key` at 40%: what the tests that drive
/// llama.cpp's own programs and a llama-cpp-2 program write to a file.
pub fn passkey_document(reps: usize, key: u32) -> String {
    let mut s = String::from(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz \
         you about the important information there.\n\n",
    );
    for i in 0..=reps {
        if i == reps * 2 / 5 {
            s.push_str(&format!("The pass key is {key}. Remember it. {key} is the pass key. "));
        }
        if i < reps {
            s.push_str(PASSKEY_FILLER);
        }
    }
    s
}

/// A passkey prompt of about `target` tokens (chat template applied), the
/// key at `depth` (0..1) of the filler, ending with the question.
pub fn passkey_prompt(model: &Model, target: usize, depth: f64, key: u32) -> Vec<i32> {
    let build = |n: usize| {
        let at = (depth * n as f64).round() as usize;
        let mut s = String::from(
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.\n\n",
        );
        for i in 0..=n {
            if i == at {
                s.push_str(&format!("The pass key is {key}. Remember it. {key} is the pass key. "));
            }
            if i < n {
                s.push_str(PASSKEY_FILLER);
            }
        }
        s.push_str("\n\nWhat is the pass key?");
        let chat = model.apply_chat_template(&[ChatMessage::user(s)], true).unwrap();
        model.tokenize(&chat, true, true).unwrap()
    };
    let per = (build(10).len() - build(0).len()) as f64 / 10.0;
    build(((target - build(0).len()) as f64 / per) as usize)
}
