//! The foundation: models load with the right metadata, tokenization round
//! trips, decoding is deterministic, sequence state round trips exactly,
//! sequences are independent, bad model files give errors.

mod common;

use common::*;
use snapkv::{generate, init_backend, Context, FlashAttention, Model, ModelParams, Sampler};

#[test]
fn tiny_model_metadata() {
    let m = tiny();
    assert_eq!(m.arch(), "llama");
    assert_eq!(m.n_layer(), 2);
    assert_eq!(m.n_head(), 4);
    assert_eq!(m.n_head_kv(), 2);
    assert_eq!(m.head_dim(), 64);
    assert!(m.n_vocab() > 300);
}

#[test]
fn smollm2_metadata() {
    let m = smollm2();
    assert_eq!(m.arch(), "llama");
    assert_eq!((m.n_layer(), m.n_head(), m.n_head_kv()), (30, 9, 3));
    assert_eq!(m.head_dim(), 64);
    assert_eq!(m.n_ctx_train(), 8192);
}

#[test]
fn qwen_metadata() {
    let m = qwen();
    assert_eq!(m.arch(), "qwen2");
    assert_eq!((m.n_layer(), m.n_head(), m.n_head_kv()), (24, 14, 2));
    assert_eq!(m.head_dim(), 64);
    assert_eq!(m.n_ctx_train(), 32768);
    assert!(m.chat_template().is_some_and(|t| t.contains("im_start")));
}

#[test]
fn tokenize_detokenize_round_trip() {
    let text = "The pass key is 71432. Remember it, then say: hello, world!";
    for m in [tiny(), qwen()] {
        let toks = m.tokenize(text, false, false).unwrap();
        assert!(!toks.is_empty());
        assert_eq!(m.detokenize(&toks, false).unwrap().trim_start(), text);
    }
    let with_bos = tiny().tokenize("abc", true, false).unwrap();
    assert_eq!(Some(with_bos[0]), tiny().bos());
}

#[test]
fn chat_template_wraps_the_message() {
    let p = qwen()
        .apply_chat_template(&[snapkv::ChatMessage::user("What is 2+2?")], true)
        .unwrap();
    assert!(p.contains("<|im_start|>user\nWhat is 2+2?<|im_end|>"));
    assert!(p.ends_with("<|im_start|>assistant\n"));
}

fn greedy_run(m: &Model, prompt: &[i32], n: usize) -> Vec<i32> {
    let mut ctx = Context::new(m, &params(512, FlashAttention::Auto)).unwrap();
    ctx.decode_tokens(0, prompt, 0, true).unwrap();
    generate(&mut ctx, 0, &mut Sampler::greedy(), prompt.len() as i32, n, false)
        .unwrap()
        .tokens
}

#[test]
fn greedy_decoding_is_deterministic() {
    let m = tiny();
    let prompt = m.tokenize(&filler(60, 1), true, false).unwrap();
    let a = greedy_run(m, &prompt, 24);
    let b = greedy_run(m, &prompt, 24);
    assert_eq!(a.len(), 24);
    assert_eq!(a, b);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = tiny();
    let prompt = m.tokenize(&filler(40, 2), true, false).unwrap();
    let run = |seed| {
        let mut ctx = Context::new(m, &params(512, FlashAttention::Auto)).unwrap();
        ctx.decode_tokens(0, &prompt, 0, true).unwrap();
        let mut s = Sampler::seeded(seed, 1.0, 40, 0.95);
        generate(&mut ctx, 0, &mut s, prompt.len() as i32, 16, false)
            .unwrap()
            .tokens
    };
    assert_eq!(run(7), run(7));
}

#[test]
fn state_round_trip_restores_bit_identical_logits() {
    for fa in [FlashAttention::On, FlashAttention::Off] {
        let m = tiny();
        let prompt = m.tokenize(&filler(150, 3), true, false).unwrap();
        let mut ctx = Context::new(m, &params(1024, fa)).unwrap();
        ctx.decode_tokens(0, &prompt, 0, true).unwrap();
        let state = ctx.state_seq_get(0).unwrap();
        let next = prompt[5];
        let p = prompt.len() as i32;
        ctx.decode_tokens(0, &[next], p, true).unwrap();
        let before = ctx.logits_ith(-1).unwrap().to_vec();

        ctx.clear();
        assert_eq!(ctx.seq_pos_max(0), None);
        ctx.state_seq_set(0, &state).unwrap();
        assert_eq!(ctx.seq_pos_max(0), Some(p - 1));
        ctx.decode_tokens(0, &[next], p, true).unwrap();
        let after = ctx.logits_ith(-1).unwrap();
        assert!(
            before.iter().zip(after).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{fa:?}: logits differ after the round trip"
        );
    }
}

#[test]
fn two_sequences_stay_independent() {
    let m = tiny();
    let a = m.tokenize(&filler(120, 4), true, false).unwrap();
    let b = m.tokenize(&filler(90, 5), true, false).unwrap();
    // Sequence 0 alone.
    let mut solo = Context::new(m, &params(1024, FlashAttention::Auto)).unwrap();
    solo.decode_tokens(0, &a, 0, true).unwrap();
    let alone = solo.logits_ith(-1).unwrap().to_vec();
    // Sequence 0 next to sequence 1, which is then removed.
    let mut ctx = Context::new(m, &params(1024, FlashAttention::Auto).with_n_seq_max(2)).unwrap();
    ctx.decode_tokens(1, &b, 0, true).unwrap();
    ctx.decode_tokens(0, &a, 0, true).unwrap();
    let together = ctx.logits_ith(-1).unwrap().to_vec();
    assert_eq!(argmax(&alone), argmax(&together));
    let max_diff = alone
        .iter()
        .zip(&together)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-3, "sequence 1 changed sequence 0's logits by {max_diff}");
    assert!(ctx.seq_rm(1, -1, -1));
    assert_eq!(ctx.seq_pos_max(1), None);
    assert_eq!(ctx.seq_pos_max(0), Some(a.len() as i32 - 1));
}

#[test]
fn missing_and_corrupt_models_are_errors() {
    let missing = Model::load(init_backend(), "/nonexistent/model.gguf", &ModelParams::default());
    assert!(matches!(missing, Err(snapkv::Error::ModelLoad { .. })));

    let dir = std::env::temp_dir().join(format!("snapkv-corrupt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a gguf file at all").unwrap();
    let err = Model::load(init_backend(), &garbage, &ModelParams::default()).unwrap_err();
    assert!(err.to_string().contains("garbage.gguf"), "{err}");

    // A real model cut in half.
    let tiny_bytes = std::fs::read(snapkv_testing::tiny_model_path(&Default::default()).unwrap()).unwrap();
    let cut = dir.join("truncated.gguf");
    std::fs::write(&cut, &tiny_bytes[..tiny_bytes.len() / 2]).unwrap();
    assert!(Model::load(init_backend(), &cut, &ModelParams::default()).is_err());
    std::fs::remove_dir_all(&dir).ok();
}
