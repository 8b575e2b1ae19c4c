//! Issue 27.11: llama.cpp decides whether it rotates quantized keys from
//! `LLAMA_ATTN_ROT_DISABLE`, read with C's `atoi` when the context is
//! created. snapkv must undo exactly that rotation when it scores from the
//! cached keys: it reads the variable the same way, once, when its observer
//! is attached to the context's parameters — not later, with another
//! parser. This file holds one test because it changes the process's
//! environment.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use common::*;
use snapkv::snapkv::{AlgoError, HeadScores, Selection, SelectionShape, Selector, SnapKvSelector};
use snapkv::{Budget, CacheType, Compressor, Context, FlashAttention, SnapKvConfig, WindowObserver};

struct Recording(Arc<Mutex<Option<Selection>>>);

impl Selector for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn needs_scores(&self) -> bool {
        true
    }
    fn select(
        &self,
        scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> Result<Selection, AlgoError> {
        let s = SnapKvSelector.select(scores, shape, n_keep)?;
        *self.0.lock().unwrap() = Some(s.clone());
        Ok(s)
    }
}

/// The selection on `tokens` with a K cache of `k`; the environment
/// variable is `at_creation` while the context is created and `at_scoring`
/// while it compresses.
fn selection(tokens: &[i32], k: CacheType, at_creation: Option<&str>, at_scoring: Option<&str>) -> Selection {
    let set = |v: Option<&str>| match v {
        Some(v) => std::env::set_var("LLAMA_ATTN_ROT_DISABLE", v),
        None => std::env::remove_var("LLAMA_ATTN_ROT_DISABLE"),
    };
    let chosen = Arc::new(Mutex::new(None));
    let mut config = SnapKvConfig::default();
    config.budget = Budget::Cells(96);
    let comp = Compressor::with_selector(config, Box::new(Recording(chosen.clone()))).unwrap();
    set(at_creation);
    let mut ctx = Context::new(
        tiny(),
        &params(1024, FlashAttention::On)
            .with_cache_types(k, CacheType::F16)
            .with_observer(WindowObserver::new()),
    )
    .unwrap();
    set(at_scoring);
    comp.prefill(&mut ctx, 0, tokens).unwrap();
    std::env::remove_var("LLAMA_ATTN_ROT_DISABLE");
    let s = chosen.lock().unwrap().take().unwrap();
    s
}

fn agreement(a: &Selection, b: &Selection) -> f64 {
    let mut same = 0usize;
    for l in 0..a.n_layer {
        for g in 0..a.n_head_kv {
            let rb: HashSet<u32> = b.row(l, g).iter().copied().collect();
            same += a.row(l, g).iter().filter(|x| rb.contains(x)).count();
        }
    }
    same as f64 / (a.n_layer * a.n_head_kv * a.n_keep) as f64
}

#[test]
fn key_rotation_is_read_as_llama_cpp_reads_it_when_the_context_is_created() {
    let mut tokens = tiny().tokenize(&filler(400, 31), true, false).unwrap();
    tokens.truncate(300);
    // The f16 cache is never rotated: the reference.
    let reference = selection(&tokens, CacheType::F16, None, None);
    let rotated = selection(&tokens, CacheType::Q8_0, None, None);
    let base = agreement(&rotated, &reference);
    assert!(base > 0.9, "q8_0 with rotation agrees with f16 on {base}");
    // " 1x" is 1 for atoi (llama.cpp disables the rotation) but not a
    // number for Rust's parser; and the variable is gone by the time the
    // compression runs. Both must not matter.
    for (at_creation, at_scoring) in [
        (Some(" 1x"), None),
        (Some("1"), None),
        (None, Some("1")),
        (Some("0"), Some("1")),
    ] {
        let got = selection(&tokens, CacheType::Q8_0, at_creation, at_scoring);
        let agree = agreement(&got, &reference);
        assert!(
            agree > 0.9,
            "LLAMA_ATTN_ROT_DISABLE {at_creation:?} at creation, {at_scoring:?} at scoring: agreement {agree} \
             with the unrotated f16 cache (with rotation on and matched: {base})"
        );
    }
}
