//! Reliability (issue 27): what safe Rust cannot do, what bad input gets,
//! and that a failed compression — by error or by panic, at every step of
//! every path — leaves the sequence, and every other sequence, exactly as
//! it was. Failures are injected with `snapkv::llama::faults`.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::*;
use snapkv::capi::{status_of, Status};
use snapkv::llama::faults::{FaultPlan, FaultPoint};
use snapkv::snapkv::{AlgoError, HeadScores, Selection, SelectionShape, Selector, SnapKvSelector};
use snapkv::{Compressor, Context, ContextRef, Error, FlashAttention, Model, Sampler, WindowObserver};

/// The state bytes of a sequence, or `None` when it is empty.
fn state(ctx: &ContextRef, seq: i32) -> Option<Vec<u8>> {
    ctx.seq_pos_max(seq).map(|_| ctx.state_seq_get(seq).unwrap())
}

// --------------------------------------------------------------- soundness

/// Compile-time checks: `ambiguous::<T>()` fails to compile when `T` is
/// `Sync`, because both blanket impls then apply.
mod not_sync {
    pub trait AmbiguousIfSync<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSync<()> for T {}
    pub struct IsSync;
    impl<T: ?Sized + Sync> AmbiguousIfSync<IsSync> for T {}
}

/// Issue 27.1: `&ContextRef` must not cross threads (llama.cpp mutates the
/// context inside `&self` calls such as `logits_ith` and `state_seq_get`);
/// contexts may move between threads, models may be shared.
#[test]
fn contexts_are_send_but_not_sync_and_models_are_both() {
    fn send<T: Send + ?Sized>() {}
    fn sync<T: Sync + ?Sized>() {}
    send::<ContextRef>();
    send::<Context<'static>>();
    send::<Sampler>();
    send::<Model>();
    sync::<Model>();
    sync::<WindowObserver>();
    // Each line fails to compile if the type is Sync.
    <ContextRef as not_sync::AmbiguousIfSync<_>>::check();
    <Context<'static> as not_sync::AmbiguousIfSync<_>>::check();
}

/// Issue 27.2: llama.cpp asserts (aborting the process) when asked to
/// sample an output that has no logits.
#[test]
fn sampling_an_output_without_logits_is_an_error() {
    let mut ctx = observed(tiny(), 256, FlashAttention::Auto);
    let mut greedy = Sampler::greedy();
    // Nothing decoded yet.
    assert!(matches!(
        greedy.sample(&mut ctx, -1),
        Err(Error::InvalidArgument { param: "idx", .. })
    ));
    let tokens = tiny_prompt(20, 1);
    // Logits not requested for any token.
    ctx.decode_tokens(0, &tokens, 0, false).unwrap();
    assert!(greedy.sample(&mut ctx, -1).is_err());
    assert!(greedy.sample(&mut ctx, 5).is_err());
    assert!(snapkv::generate(&mut ctx, 0, &mut greedy, 20, 4, true).is_err());
    // With logits it samples.
    ctx.seq_rm(0, 0, -1);
    ctx.decode_tokens(0, &tokens, 0, true).unwrap();
    greedy.sample(&mut ctx, -1).unwrap();
    assert!(greedy.sample(&mut ctx, 3).is_err(), "only the last token has logits");
}

/// Issue 27.3: an id outside the vocabulary made llama.cpp throw a C++
/// exception through its C API.
#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let model = tiny();
    let n_vocab = model.n_vocab() as i32;
    for bad in [-1, n_vocab, i32::MAX] {
        assert!(matches!(model.token_bytes(bad, true), Err(Error::InvalidToken { token, .. }) if token == bad));
        assert!(model.detokenize(&[1, bad, 2], false).is_err());
    }
    assert!(model.token_bytes(n_vocab - 1, true).is_ok());
    let mut ctx = observed(model, 256, FlashAttention::Auto);
    let mut tokens = tiny_prompt(40, 2);
    tokens[17] = n_vocab;
    assert!(matches!(
        ctx.decode_tokens(0, &tokens, 0, true),
        Err(Error::InvalidToken { .. })
    ));
    assert_eq!(ctx.seq_pos_max(0), None, "nothing was evaluated");
    let comp = Compressor::new(config(64)).unwrap();
    let err = comp.prefill(&mut ctx, 0, &tokens).unwrap_err();
    assert!(matches!(err, Error::InvalidToken { .. }), "{err}");
    assert_eq!(status_of(&err), Status::InvalidArgument);
    assert_eq!(ctx.seq_pos_max(0), None);
}

// ------------------------------------------------------------ nothing lost

/// A context with two sequences: sequence 1 holds its own prompt (so that
/// any damage to other sequences shows), sequence 0 `prior` tokens.
fn two_sequences(fa: FlashAttention, prior: usize) -> Context<'static> {
    let mut ctx = Context::new(
        tiny(),
        &params(2048, fa).with_n_seq_max(2).with_observer(WindowObserver::new()),
    )
    .unwrap();
    ctx.decode_tokens(1, &tiny_prompt(150, 7), 0, true).unwrap();
    if prior > 0 {
        ctx.decode_tokens(0, &tiny_prompt(prior, 8), 0, true).unwrap();
    }
    ctx
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    Prefill,
    Hook,
    Observed,
}

/// Runs one compression of sequence 0 by `path`. The sequence holds 60
/// tokens before; the prefill path adds 240 more, the hooks evaluate them
/// first (the hook path without the observer armed).
fn compress(ctx: &mut Context<'_>, comp: &Compressor, path: Path, rest: &[i32]) -> snapkv::Result<()> {
    match path {
        Path::Prefill => comp.prefill(ctx, 0, rest).map(drop),
        Path::Hook => comp.compress_after_prefill(ctx, 0, rest).map(drop),
        Path::Observed => comp.compress_observed(ctx, 0).map(drop),
    }
}

fn prepare(ctx: &mut Context<'_>, comp: &Compressor, path: Path, rest: &[i32]) {
    match path {
        Path::Prefill => {}
        Path::Hook => ctx.decode_tokens(0, rest, 60, true).unwrap(),
        Path::Observed => {
            comp.observe_decodes(ctx).unwrap();
            ctx.decode_tokens(0, rest, 60, true).unwrap();
        }
    }
}

/// Issue 27.6 and 27.8: every state write and every decode of every path,
/// with and without a draft, made to fail in turn. Each failure must leave
/// sequence 0 exactly as it was before the call (for the prefill path:
/// without the tokens it was given) and sequence 1 untouched, and report
/// the injected error, not `RestoreFailed`.
#[test]
fn every_injected_failure_leaves_every_sequence_as_it_was() {
    let rest = tiny_prompt(240, 9);
    let mut swept = 0;
    for path in [Path::Prefill, Path::Hook, Path::Observed] {
        for draft in [0, 4] {
            if path == Path::Observed && draft > 0 {
                continue; // refused up front: no draft on this path
            }
            let mut cfg = config(96);
            cfg.draft = draft;
            let comp = Compressor::new(cfg).unwrap();
            for point in [FaultPoint::StateSet, FaultPoint::Decode] {
                for pass in 0.. {
                    let mut ctx = two_sequences(FlashAttention::Auto, 60);
                    prepare(&mut ctx, &comp, path, &rest);
                    let before = (state(&ctx, 0), state(&ctx, 1));
                    let plan = FaultPlan::new(point, pass, 1);
                    let result = compress(&mut ctx, &comp, path, &rest);
                    let injected = plan.injected();
                    drop(plan);
                    if injected == 0 {
                        result.unwrap();
                        assert!(n_cells(&ctx, 0) <= 96, "{path:?}: the run without faults compresses");
                        break;
                    }
                    let err = result.unwrap_err();
                    let what = format!("{path:?}, draft {draft}, {point:?} #{pass}: {err}");
                    assert!(!matches!(err, Error::RestoreFailed { .. }), "{what}");
                    let want = match point {
                        FaultPoint::StateSet => Status::State,
                        FaultPoint::Decode => Status::Decode,
                    };
                    assert_eq!(status_of(&err), want, "{what}");
                    assert!(state(&ctx, 0) == before.0, "{what}: sequence 0 changed");
                    assert!(state(&ctx, 1) == before.1, "{what}: sequence 1 changed");
                    swept += 1;
                }
            }
        }
    }
    // Each path writes the state at least once and decodes at least once
    // (the draft several times): a sweep that injected next to nothing
    // would prove nothing.
    assert!(swept >= 15, "only {swept} failures injected");
}

/// Issue 27.6: `RestoreFailed` is returned only when the sequence is
/// really gone: the compaction and the restore both fail.
#[test]
fn restore_failed_means_the_sequence_is_gone() {
    let rest = tiny_prompt(240, 9);
    let comp = Compressor::new(config(96)).unwrap();
    for path in [Path::Prefill, Path::Hook, Path::Observed] {
        let mut ctx = two_sequences(FlashAttention::Auto, 60);
        prepare(&mut ctx, &comp, path, &rest);
        let other = state(&ctx, 1);
        let plan = FaultPlan::new(FaultPoint::StateSet, 0, 2);
        let err = compress(&mut ctx, &comp, path, &rest).unwrap_err();
        assert_eq!(plan.injected(), 2);
        drop(plan);
        assert!(matches!(err, Error::RestoreFailed { .. }), "{path:?}: {err}");
        assert_eq!(status_of(&err), Status::RestoreFailed);
        assert_eq!(
            ctx.seq_pos_max(0),
            None,
            "{path:?}: RestoreFailed, so sequence 0 is empty"
        );
        assert!(state(&ctx, 1) == other, "{path:?}: sequence 1 changed");
    }
}

/// A selector that panics, as a user's selector with a bug would.
struct Panicking;

impl Selector for Panicking {
    fn name(&self) -> &'static str {
        "panicking"
    }
    fn needs_scores(&self) -> bool {
        true
    }
    fn select(&self, _: Option<&HeadScores>, _: &SelectionShape, _: usize) -> Result<Selection, AlgoError> {
        panic!("a selector bug")
    }
}

/// Issue 27.5: a panic after the sequence was changed (the re-evaluating
/// hook removes the window before it evaluates it again) unwinds through
/// the rollback guard, which puts the sequence back.
#[test]
fn a_panic_during_compression_leaves_the_sequence_as_it_was() {
    let rest = tiny_prompt(240, 9);
    let comp = Compressor::with_selector(config(96), Box::new(Panicking)).unwrap();
    for path in [Path::Prefill, Path::Hook, Path::Observed] {
        let mut ctx = two_sequences(FlashAttention::Auto, 60);
        prepare(&mut ctx, &comp, path, &rest);
        let before = (state(&ctx, 0), state(&ctx, 1));
        let outcome = catch_unwind(AssertUnwindSafe(|| compress(&mut ctx, &comp, path, &rest)));
        assert!(outcome.is_err(), "{path:?}: the selector panicked");
        assert!(state(&ctx, 0) == before.0, "{path:?}: sequence 0 changed");
        assert!(state(&ctx, 1) == before.1, "{path:?}: sequence 1 changed");
        // And it still works.
        let comp = Compressor::with_selector(config(96), Box::new(SnapKvSelector)).unwrap();
        if path == Path::Prefill {
            comp.prefill(&mut ctx, 0, &rest).unwrap();
        } else {
            comp.compress_after_prefill(&mut ctx, 0, &rest).unwrap();
        }
        assert_eq!(n_cells(&ctx, 0), 96);
    }
}

/// A panic inside the window's re-evaluation: the sequence is put back and
/// the observer is not left armed (it would observe the host's later
/// decodes).
#[test]
fn a_panic_in_the_window_pass_disarms_the_observer() {
    let rest = tiny_prompt(240, 9);
    // Without a draft the hook decodes once (the window); with one, the
    // draft's first token unobserved, then its observed tokens: the 3rd
    // decode is inside the draft's observed pass.
    for (draft, panic_at) in [(0, 0), (4, 2)] {
        let mut cfg = config(96);
        cfg.draft = draft;
        let comp = Compressor::new(cfg).unwrap();
        let mut ctx = two_sequences(FlashAttention::Auto, 60);
        prepare(&mut ctx, &comp, Path::Hook, &rest);
        let before = (state(&ctx, 0), state(&ctx, 1));
        let plan = FaultPlan::panic_after(FaultPoint::Decode, panic_at);
        let outcome = catch_unwind(AssertUnwindSafe(|| comp.compress_after_prefill(&mut ctx, 0, &rest)));
        drop(plan);
        assert!(outcome.is_err(), "draft {draft}: the decode panicked");
        assert!(!ctx.observer().unwrap().is_armed(), "draft {draft}: left armed");
        assert!(
            state(&ctx, 0) == before.0 && state(&ctx, 1) == before.1,
            "draft {draft}"
        );
    }
}

/// Issue 27.5 through the C ABI: the panic is reported as
/// `SNAPKV_ERR_PANIC` and the sequence is intact.
#[test]
fn the_c_boundary_reports_a_panic_with_the_sequence_intact() {
    let rest = tiny_prompt(240, 9);
    let observer = WindowObserver::new();
    let mut ctx = Context::new(
        tiny(),
        &params(2048, FlashAttention::Auto)
            .with_n_seq_max(2)
            .with_observer(observer.clone()),
    )
    .unwrap();
    ctx.decode_tokens(1, &tiny_prompt(150, 7), 0, true).unwrap();
    ctx.decode_tokens(0, &tiny_prompt(60, 8), 0, true).unwrap();
    ctx.decode_tokens(0, &rest, 60, true).unwrap();
    let before = (state(&ctx, 0), state(&ctx, 1));
    let params = snapkv::capi::SnapkvParams {
        budget: 96,
        ..Default::default()
    };
    // The compaction's state write panics; the restore after it does not.
    let plan = FaultPlan::panic_after(FaultPoint::StateSet, 0);
    let raw_ctx: *mut ContextRef = &mut *ctx;
    // SAFETY: a live context and observer (the observer handle is the
    // Arc's pointer, as snapkv_observer_new makes it), valid params and
    // tokens for the call; NULL stats are allowed.
    let code = unsafe {
        snapkv::capi::snapkv_compress_after_prefill(
            raw_ctx.cast(),
            std::sync::Arc::as_ptr(&observer).cast_mut().cast(),
            &params,
            0,
            rest.as_ptr(),
            rest.len(),
            std::ptr::null_mut(),
        )
    };
    drop(plan);
    assert_eq!(code, Status::Panic.code());
    let mut buf = [0 as std::ffi::c_char; 256];
    // SAFETY: buf is writable for its length.
    unsafe { snapkv::capi::snapkv_last_error(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: NUL-terminated by snapkv_last_error.
    let message = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    assert!(message.contains("panic injected"), "{message}");
    assert!(state(&ctx, 0) == before.0, "sequence 0 changed");
    assert!(state(&ctx, 1) == before.1, "sequence 1 changed");
}

/// Issue 27.8: the Rust prefill rolls back as the C wrapper did: a failure
/// after the prompt was evaluated removes it again (it used to stay).
#[test]
fn a_failed_prefill_removes_what_it_evaluated() {
    let comp = Compressor::new(config(96)).unwrap();
    let mut ctx = two_sequences(FlashAttention::Auto, 0);
    // The compaction is refused by llama.cpp: the sequence held nothing
    // before, so it holds nothing after.
    let plan = FaultPlan::new(FaultPoint::StateSet, 0, 1);
    assert!(comp.prefill(&mut ctx, 0, &tiny_prompt(300, 3)).is_err());
    drop(plan);
    assert_eq!(ctx.seq_pos_max(0), None);
}

// ------------------------------------------------------------ shared cells

/// Issue 27.7: cells shared with another sequence (`llama_memory_seq_cp`)
/// are invisible in a sequence's state. On a full unified cache the
/// compaction cannot place the copy and the restore cannot place the
/// original, which lost the sequence (`RestoreFailed`). Now it is refused
/// before anything changes; with room, it compresses and the other
/// sequence keeps its cells.
#[test]
fn shared_cells_are_compressed_only_when_a_restore_fits() {
    let comp = Compressor::new(config(96)).unwrap();
    let tokens = tiny_prompt(300, 4);
    for (n_ctx, filler_len, refused) in [(512, 212, true), (1024, 100, false)] {
        let mut p = params(n_ctx, FlashAttention::Auto)
            .with_n_seq_max(3)
            .with_observer(WindowObserver::new());
        p.kv_unified = true;
        let mut ctx = Context::new(tiny(), &p).unwrap();
        ctx.decode_tokens(0, &tokens, 0, true).unwrap();
        ctx.seq_cp(0, 1, -1, -1);
        ctx.decode_tokens(2, &tiny_prompt(filler_len, 5), 0, true).unwrap();
        let before: Vec<_> = (0..3).map(|s| state(&ctx, s)).collect();
        let result = comp.compress_after_prefill(&mut ctx, 0, &tokens);
        if refused {
            let err = result.unwrap_err();
            assert!(matches!(err, Error::Unsupported(ref m) if m.contains("share")), "{err}");
            for s in 0..3 {
                assert!(state(&ctx, s) == before[s as usize], "sequence {s} changed");
            }
        } else {
            result.unwrap();
            assert_eq!(n_cells(&ctx, 0), 96);
            assert!(state(&ctx, 1) == before[1], "the sequence sharing the cells keeps them");
            assert!(state(&ctx, 2) == before[2]);
        }
    }
}

// ------------------------------------------------------- checked arguments

/// Issue 27.9: rows of another sequence decoded while armed, at the same
/// positions, used to be taken as the window.
#[test]
fn the_observed_hook_refuses_another_sequences_rows() {
    let comp = Compressor::new(config(96)).unwrap();
    let mut ctx = two_sequences(FlashAttention::Auto, 0);
    ctx.seq_rm(1, 0, -1);
    let a = tiny_prompt(300, 10);
    let b = tiny_prompt(300, 11);
    ctx.decode_tokens(0, &a, 0, true).unwrap();
    comp.observe_decodes(&ctx).unwrap();
    ctx.decode_tokens(1, &b, 0, true).unwrap();
    let before = (state(&ctx, 0), state(&ctx, 1));
    let err = comp.compress_observed(&mut ctx, 0).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { param: "seq", ref reason } if reason.contains("keys differ")),
        "{err}"
    );
    // The header documents SNAPKV_ERR_INVALID_ARGUMENT for this (it was
    // INVALID_SEQUENCE, chosen by the parameter's name).
    assert_eq!(status_of(&err), Status::InvalidArgument);
    assert!(state(&ctx, 0) == before.0 && state(&ctx, 1) == before.1);
    // The sequence's own rows are accepted.
    comp.observe_decodes(&ctx).unwrap();
    ctx.seq_rm(0, 0, -1);
    ctx.decode_tokens(0, &a, 0, true).unwrap();
    comp.compress_observed(&mut ctx, 0).unwrap();
    assert_eq!(n_cells(&ctx, 0), 96);
}

/// Issue 27.9: the re-evaluating hook checks that the window tokens are
/// the sequence's last tokens.
#[test]
fn the_reevaluating_hook_refuses_window_tokens_of_another_text() {
    for fa in [FlashAttention::On, FlashAttention::Off] {
        let comp = Compressor::new(config(96)).unwrap();
        let mut ctx = two_sequences(fa, 0);
        let a = tiny_prompt(300, 12);
        ctx.decode_tokens(0, &a, 0, true).unwrap();
        let before = (state(&ctx, 0), state(&ctx, 1));
        let wrong = tiny_prompt(300, 13);
        let err = comp.compress_after_prefill(&mut ctx, 0, &wrong).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    param: "window_tokens",
                    ..
                }
            ),
            "{fa:?}: {err}"
        );
        assert!(state(&ctx, 0) == before.0 && state(&ctx, 1) == before.1, "{fa:?}");
        // One token off at the end of the window is caught too.
        let mut off = a.clone();
        off[295] = (off[295] + 1) % tiny().n_vocab() as i32;
        assert!(comp.compress_after_prefill(&mut ctx, 0, &off).is_err(), "{fa:?}");
        assert!(state(&ctx, 0) == before.0, "{fa:?}");
        comp.compress_after_prefill(&mut ctx, 0, &a).unwrap();
        assert_eq!(n_cells(&ctx, 0), 96);
    }
}

/// Issue 27.10: the model is checked before anything else, and codes come
/// from the variant: a window larger than a micro-batch is a parameter
/// error (`SNAPKV_ERR_INVALID_PARAMS`), a sequence id out of range
/// `SNAPKV_ERR_INVALID_SEQUENCE`.
#[test]
fn status_codes_follow_the_error_not_its_wording() {
    let mut ctx = two_sequences(FlashAttention::Auto, 300);
    let comp = Compressor::new(config(96)).unwrap();
    let err = comp
        .compress_after_prefill(&mut ctx, 5, &tiny_prompt(300, 8))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidSequence { seq: 5, .. }), "{err}");
    assert_eq!(status_of(&err), Status::InvalidSequence);
    let mut cfg = config(700);
    cfg.window = 600;
    let wide = Compressor::new(cfg).unwrap();
    let long = tiny_prompt(900, 14);
    let mut small = Context::new(
        tiny(),
        &params(2048, FlashAttention::Auto)
            .with_batch(512, 256)
            .with_observer(WindowObserver::new()),
    )
    .unwrap();
    small.decode_tokens(0, &long, 0, true).unwrap();
    let err = wide.compress_after_prefill(&mut small, 0, &long).unwrap_err();
    assert_eq!(status_of(&err), Status::InvalidParams, "{err}");
}

// ------------------------------------------------------------ the observer

/// Issue 27.13: one observer attached to two contexts silently replaced the
/// first one's chained callback; now the second context is refused, and
/// the observer is free again once its context is gone.
#[test]
fn one_observer_serves_one_context() {
    let observer = WindowObserver::new();
    let p = params(512, FlashAttention::Auto).with_observer(observer.clone());
    let first = Context::new(tiny(), &p).unwrap();
    let err = Context::new(tiny(), &p).unwrap_err();
    assert!(err.to_string().contains("one observer serves one context"), "{err}");
    // Used with another context, it is refused too.
    let mut other = observed(tiny(), 512, FlashAttention::Auto);
    other.decode_tokens(0, &tiny_prompt(200, 1), 0, true).unwrap();
    let comp = Compressor::new(config(96)).unwrap();
    let before = state(&other, 0);
    assert!(comp
        .compress_after_prefill_with(&mut other, &observer, 0, &tiny_prompt(200, 1))
        .is_err());
    assert!(state(&other, 0) == before);
    drop(first);
    let mut second = Context::new(tiny(), &p).unwrap();
    second.decode_tokens(0, &tiny_prompt(200, 1), 0, true).unwrap();
    comp.compress_after_prefill(&mut second, 0, &tiny_prompt(200, 1))
        .unwrap();
}
