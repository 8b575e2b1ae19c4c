//! Every model refusal, proven on tiny generated models that the pinned
//! llama.cpp loads and decodes (see `snapkv_testing::tiny_model::TinyVariant`):
//! ALiBi and attention logit soft-capping declared in a llama model's
//! metadata, sliding-window layers (a `cohere2` model, which llama.cpp gives
//! an iSWA cache), and an architecture snapkv has not verified (`mistral3`).
//!
//! Each is refused by every entry point with [`Error::Unsupported`] naming
//! the reason (C status `SNAPKV_ERR_UNSUPPORTED`), before anything changes:
//! the sequence's state bytes are the same before and after the call. The
//! plain llama model goes through the same steps and is compressed, so the
//! refusals are the model's doing.

mod common;

use common::*;
use snapkv::capi::{status_of, Status};
use snapkv::{
    init_backend, Budget, CompressionStats, Compressor, Error, FlashAttention, Model, ModelParams, SnapKvConfig,
};
use snapkv_testing::tiny_model::{TinyVariant, ALIBI_MAX_BIAS, ATTN_LOGIT_SOFTCAPPING, SLIDING_WINDOW};
use snapkv_testing::{tiny_model_path, TinyModelSpec};

/// Cells of the context.
const N_CTX: u32 = 1024;
/// Tokens a sequence holds before `prefill` is given more.
const PREFIX: usize = 100;
/// Tokens of a prompt: far above the budget.
const PROMPT: usize = 200;
/// Cells kept per KV head: compression would happen.
const BUDGET: usize = 64;

fn load(variant: TinyVariant) -> Model {
    let spec = TinyModelSpec {
        variant,
        ..TinyModelSpec::default()
    };
    let path = tiny_model_path(&spec).expect("tiny model written");
    Model::load(init_backend(), &path, &ModelParams::default())
        .unwrap_or_else(|e| panic!("the {variant:?} model loads: {e}"))
}

fn compressor() -> Compressor {
    let mut config = SnapKvConfig::default();
    config.budget = Budget::Cells(BUDGET);
    Compressor::new(config).unwrap()
}

/// A prompt of exactly `n` tokens (BOS + filler text); every variant has the
/// same vocabulary.
fn prompt(model: &Model, n: usize, seed: u64) -> Vec<i32> {
    let mut tokens = model.tokenize(&filler(n, seed), true, false).unwrap();
    assert!(tokens.len() >= n);
    tokens.truncate(n);
    tokens
}

/// What one entry point returned, and sequence 0's state bytes around it.
struct Call<T> {
    result: snapkv::Result<T>,
    before: Vec<u8>,
    after: Vec<u8>,
}

/// `Compressor::prefill` of a prompt into a sequence that already holds
/// [`PREFIX`] tokens.
fn via_prefill(model: &Model) -> Call<CompressionStats> {
    let tokens = prompt(model, PREFIX + PROMPT, 1);
    let mut ctx = observed(model, N_CTX, FlashAttention::Auto);
    ctx.decode_tokens(0, &tokens[..PREFIX], 0, false).unwrap();
    let before = ctx.state_seq_get(0).unwrap();
    let result = compressor().prefill(&mut ctx, 0, &tokens[PREFIX..]);
    let after = ctx.state_seq_get(0).unwrap();
    Call { result, before, after }
}

/// `Compressor::compress_after_prefill` on a sequence the caller evaluated.
fn via_compress_after_prefill(model: &Model) -> Call<CompressionStats> {
    let tokens = prompt(model, PROMPT, 2);
    let mut ctx = observed(model, N_CTX, FlashAttention::Auto);
    ctx.decode_tokens(0, &tokens, 0, true).unwrap();
    let before = ctx.state_seq_get(0).unwrap();
    let result = compressor().compress_after_prefill(&mut ctx, 0, &tokens);
    let after = ctx.state_seq_get(0).unwrap();
    Call { result, before, after }
}

/// The observed hook: `observe_decodes` (its result, and whether it left the
/// observer armed), the caller's own decode, then `compress_observed`.
fn via_observed_hook(model: &Model) -> (snapkv::Result<()>, bool, Call<CompressionStats>) {
    let tokens = prompt(model, PROMPT, 3);
    let mut ctx = observed(model, N_CTX, FlashAttention::Auto);
    let comp = compressor();
    let observe = comp.observe_decodes(&ctx);
    let armed = ctx.observer().unwrap().is_armed();
    ctx.decode_tokens(0, &tokens, 0, true).unwrap();
    let before = ctx.state_seq_get(0).unwrap();
    let result = comp.compress_observed(&mut ctx, 0);
    let after = ctx.state_seq_get(0).unwrap();
    (observe, armed, Call { result, before, after })
}

/// Asserts that `result` is a refusal of `arch` whose message names
/// `reason`, with the C status `SNAPKV_ERR_UNSUPPORTED`.
fn assert_refused<T>(result: &snapkv::Result<T>, arch: &str, reason: &str, entry: &str) {
    let Err(err) = result else {
        panic!("{entry}: accepted the {arch} model, expected a refusal naming {reason:?}");
    };
    let Error::Unsupported(msg) = err else {
        panic!("{entry}: expected Error::Unsupported naming {reason:?}, got {err:?}");
    };
    assert!(
        msg.starts_with(&format!("{arch}: ")) && msg.contains(reason),
        "{entry}: the message does not name {arch} and {reason:?}: {msg}"
    );
    assert_eq!(status_of(err), Status::Unsupported, "{entry}: C status of {err:?}");
}

/// Asserts that the call left sequence 0 byte for byte as it was.
fn assert_untouched<T>(call: &Call<T>, entry: &str) {
    assert!(!call.before.is_empty(), "{entry}: the sequence held nothing to compare");
    assert!(
        call.before == call.after,
        "{entry}: the sequence state changed ({} bytes before, {} after)",
        call.before.len(),
        call.after.len()
    );
}

/// Every entry point refuses the `variant` model, naming `reason`, and
/// leaves the sequence exactly as it was.
fn assert_refused_everywhere(variant: TinyVariant, reason: &str) {
    let _g = heavy();
    let model = load(variant);
    let arch = variant.arch();
    assert_eq!(model.arch(), arch);

    let call = via_prefill(&model);
    assert_refused(&call.result, arch, reason, "prefill");
    // The tokens prefill was given are not left in the cache.
    assert_untouched(&call, "prefill");

    let call = via_compress_after_prefill(&model);
    assert_refused(&call.result, arch, reason, "compress_after_prefill");
    assert_untouched(&call, "compress_after_prefill");

    let (observe, armed, call) = via_observed_hook(&model);
    assert_refused(&observe, arch, reason, "observe_decodes");
    assert!(!armed, "observe_decodes armed the observer for a model it refused");
    // Nothing was armed, so compress_observed has nothing to compress: it
    // refuses (it checks the arming before the model), and changes nothing.
    match &call.result {
        Err(Error::InvalidArgument { param: "observer", .. }) => {}
        other => assert_refused(other, arch, reason, "compress_observed"),
    }
    assert_untouched(&call, "compress_observed");
}

#[test]
fn variant_models_load_and_decode_as_intended() {
    let _g = heavy();
    let mut state_bytes = Vec::new();
    for variant in TinyVariant::ALL {
        let model = load(variant);
        assert_eq!(model.arch(), variant.arch(), "{variant:?}");
        assert_eq!(
            (model.n_layer(), model.n_head(), model.n_head_kv(), model.head_dim()),
            (2, 4, 2, 64),
            "{variant:?}"
        );
        assert!(!model.is_recurrent() && !model.is_hybrid(), "{variant:?}");
        let swa = if variant == TinyVariant::SlidingWindow {
            SLIDING_WINDOW as usize
        } else {
            0
        };
        assert_eq!(model.n_swa(), swa, "{variant:?}: llama_model_n_swa");
        let alibi = model.meta_f32(&format!("{}.attention.max_alibi_bias", variant.arch()));
        let softcap = model.meta_f32(&format!("{}.attn_logit_softcapping", variant.arch()));
        assert_eq!(
            alibi,
            (variant == TinyVariant::Alibi).then_some(ALIBI_MAX_BIAS),
            "{variant:?}"
        );
        assert_eq!(
            softcap,
            (variant == TinyVariant::SoftCapping).then_some(ATTN_LOGIT_SOFTCAPPING),
            "{variant:?}"
        );
        // A context decodes a prompt longer than the sliding window.
        let tokens = prompt(&model, PROMPT, 4);
        let mut ctx = observed(&model, N_CTX, FlashAttention::Auto);
        ctx.decode_tokens(0, &tokens, 0, true).unwrap();
        assert_eq!(ctx.seq_pos_max(0), Some(PROMPT as i32 - 1), "{variant:?}");
        let logits = ctx.logits_ith(-1).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()), "{variant:?}: logits not finite");
        assert!(logits.iter().any(|&v| v != logits[0]), "{variant:?}: constant logits");
        state_bytes.push((variant, ctx.state_seq_get(0).unwrap().len()));
    }
    let bytes_of = |v| state_bytes.iter().find(|(w, _)| *w == v).unwrap().1;
    // K and V of one layer for one cell: 2 KV heads of 64 f16 values each.
    let row = 2 * 2 * 64 * 2;
    let (w, p) = (SLIDING_WINDOW as usize, PROMPT);
    // The plain model's state: both layers' K/V for every cell, plus
    // metadata (a header and a cell list).
    let plain_meta = bytes_of(TinyVariant::Llama) - 2 * p * row;
    // The sliding-window model's state serialises llama.cpp's two caches
    // (iSWA): the non-SWA cache (layer 1, every cell), then the SWA cache
    // (layer 0), which writes only the cells inside the window (the rest
    // are masked): K/V of `p + w` rows, and two headers and cell lists.
    let swa_meta = bytes_of(TinyVariant::SlidingWindow) - (p + w) * row;
    assert!(plain_meta < 16 * p, "plain model: {plain_meta} bytes of metadata");
    assert!(
        swa_meta > plain_meta && swa_meta < 16 * (p + w),
        "SWA model: {swa_meta} bytes of metadata (plain: {plain_meta})"
    );
}

/// The control: the plain llama model goes through the same steps and every
/// entry point compresses it.
#[test]
fn plain_llama_is_compressed_by_every_entry_point() {
    let _g = heavy();
    let model = load(TinyVariant::Llama);
    let compressed = |call: &Call<CompressionStats>, entry: &str| {
        let stats = call.result.as_ref().unwrap_or_else(|e| panic!("{entry}: {e}"));
        assert!(stats.compressed, "{entry}: not compressed ({stats:?})");
        assert!(call.before != call.after, "{entry}: the state did not change");
    };
    compressed(&via_prefill(&model), "prefill");
    compressed(&via_compress_after_prefill(&model), "compress_after_prefill");
    let (observe, armed, call) = via_observed_hook(&model);
    observe.unwrap();
    assert!(armed, "observe_decodes did not arm the observer");
    compressed(&call, "compress_observed");
}

#[test]
fn alibi_is_refused_by_every_entry_point() {
    assert_refused_everywhere(TinyVariant::Alibi, "ALiBi");
}

#[test]
fn attention_soft_capping_is_refused_by_every_entry_point() {
    assert_refused_everywhere(TinyVariant::SoftCapping, "soft-capping");
}

#[test]
fn sliding_window_layers_are_refused_by_every_entry_point() {
    assert_refused_everywhere(TinyVariant::SlidingWindow, "sliding-window");
}

#[test]
fn unverified_architecture_is_refused_by_every_entry_point() {
    assert_refused_everywhere(TinyVariant::UnverifiedArch, "not verified");
}
