//! SnapKV compression end to end on llama.cpp: exactness, invariants after
//! compression, isolation of other sequences, failure safety, flash
//! attention on/off agreement, and passkey retrieval on the default model.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use snapkv::compress::model_shape;
use snapkv::snapkv::{
    AlgoError, HeadScores, Selection, SelectionShape, Selector, SeqState, SharedAllLayersSelector, SnapKvSelector,
};
use snapkv::{
    generate, init_backend, CacheType, ChatMessage, Compressor, Context, FlashAttention, Model, ModelParams,
    QueryAggregation, Sampler, SnapKvConfig, ValueWeighting, WindowObserver,
};
use snapkv_testing::{tiny_model_path, TinyModelSpec};

/// A selector that records what the wrapped one chose.
struct Recording<S> {
    inner: S,
    chosen: Arc<Mutex<Option<Selection>>>,
}

impl<S: Selector> Selector for Recording<S> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn needs_scores(&self) -> bool {
        self.inner.needs_scores()
    }
    fn select(
        &self,
        scores: Option<&HeadScores>,
        shape: &SelectionShape,
        n_keep: usize,
    ) -> Result<Selection, AlgoError> {
        let s = self.inner.select(scores, shape, n_keep)?;
        *self.chosen.lock().unwrap() = Some(s.clone());
        Ok(s)
    }
}

fn recording<S: Selector + 'static>(cfg: SnapKvConfig, inner: S) -> (Compressor, Arc<Mutex<Option<Selection>>>) {
    let chosen = Arc::new(Mutex::new(None));
    let c = Compressor::with_selector(
        cfg,
        Box::new(Recording {
            inner,
            chosen: chosen.clone(),
        }),
    )
    .unwrap();
    (c, chosen)
}

fn bits_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn budget_not_below_prompt_is_a_bit_identical_no_op() {
    for fa in [FlashAttention::On, FlashAttention::Off] {
        let tokens = tiny_prompt(150, 11);
        let mut plain = observed(tiny(), 1024, fa);
        plain.decode_tokens(0, &tokens, 0, true).unwrap();
        let mut comp = observed(tiny(), 1024, fa);
        let stats = Compressor::new(config(tokens.len()))
            .unwrap()
            .prefill(&mut comp, 0, &tokens)
            .unwrap();
        assert!(!stats.compressed);
        assert_eq!(stats.cells_after, tokens.len());
        assert!(bits_equal(plain.logits_ith(-1).unwrap(), comp.logits_ith(-1).unwrap()));
        // The hook path is a no-op too, and the state is untouched.
        let before = comp.state_seq_get(0).unwrap();
        let hook = Compressor::new(config(2048))
            .unwrap()
            .compress_after_prefill(&mut comp, 0, &tokens)
            .unwrap();
        assert!(!hook.compressed);
        assert_eq!(comp.state_seq_get(0).unwrap(), before);
        let p = tokens.len() as i32;
        plain.decode_tokens(0, &[tokens[3]], p, true).unwrap();
        comp.decode_tokens(0, &[tokens[3]], p, true).unwrap();
        assert!(
            bits_equal(plain.logits_ith(-1).unwrap(), comp.logits_ith(-1).unwrap()),
            "{fa:?}"
        );
    }
}

/// Every head keeping the same cells must equal removing the others with
/// llama.cpp's own seq_rm and re-placing the rest.
#[test]
fn uniform_selection_equals_llama_seq_rm() {
    for fa in [FlashAttention::On, FlashAttention::Off] {
        let tokens = tiny_prompt(300, 12);
        let p = tokens.len();
        let cfg = config(96);
        let w = cfg.window;
        let (comp, chosen) = recording(cfg, SharedAllLayersSelector);
        let mut a = observed(tiny(), 1024, fa);
        let stats = comp.prefill(&mut a, 0, &tokens).unwrap();
        assert!(stats.compressed);
        let sel = chosen.lock().unwrap().clone().unwrap();
        let kept = sel.row(0, 0).to_vec();
        for l in 0..sel.n_layer {
            for g in 0..sel.n_head_kv {
                assert_eq!(
                    sel.row(l, g),
                    &kept[..],
                    "shared selection differs at layer {l} head {g}"
                );
            }
        }

        // Evaluated as the prefill path does (the prompt fits one
        // micro-batch), so the K/V rows are computed by the same kernels.
        let mut b = observed(tiny(), 1024, fa);
        b.decode_tokens(0, &tokens, 0, true).unwrap();
        let mut keep = vec![false; p];
        for &i in &kept {
            keep[i as usize] = true;
        }
        keep[p - w..].iter_mut().for_each(|k| *k = true);
        let mut i = 0;
        while i < p {
            if keep[i] {
                i += 1;
                continue;
            }
            let j = (i..p).find(|&j| keep[j]).unwrap_or(p);
            assert!(b.seq_rm(0, i as i32, j as i32));
            i = j;
        }
        let rest = b.state_seq_get(0).unwrap();
        b.clear();
        b.state_seq_set(0, &rest).unwrap();
        assert_eq!(n_cells(&a, 0), n_cells(&b, 0));

        let next = tokens[7];
        a.decode_tokens(0, &[next], p as i32, true).unwrap();
        b.decode_tokens(0, &[next], p as i32, true).unwrap();
        let d = max_abs_diff(a.logits_ith(-1).unwrap(), b.logits_ith(-1).unwrap());
        assert!(d <= 1e-4, "{fa:?}: max |Δlogit| = {d}");
    }
}

/// Issue 27.12: what llama.cpp's position operations do to a compressed
/// sequence, pinned against the uncompressed equivalent (the same cells
/// removed with `seq_rm`, true positions kept), whose logits equal the
/// compressed sequence's before any operation (test above):
/// - shifting the whole sequence (`seq_add` over every cell) re-rotates
///   every key by the same delta, whatever true position it holds: exact
///   up to rounding;
/// - removing from the window on is exact;
/// - `seq_div` re-rotates each cell by an amount computed from its nominal
///   position, not its true one: the logits move away from the
///   equivalent's (documented as wrong in `snapkv::compress`).
#[test]
fn position_operations_on_a_compressed_sequence() {
    let tokens = tiny_prompt(300, 12);
    let p = tokens.len();
    let cfg = config(96);
    let w = cfg.window;
    let (comp, chosen) = recording(cfg, SharedAllLayersSelector);
    let compressed = || {
        let mut a = observed(tiny(), 1024, FlashAttention::On);
        comp.prefill(&mut a, 0, &tokens).unwrap();
        a
    };
    let mut a = compressed();
    let kept = chosen.lock().unwrap().clone().unwrap().row(0, 0).to_vec();
    let equivalent = || {
        let mut b = observed(tiny(), 1024, FlashAttention::On);
        b.decode_tokens(0, &tokens, 0, true).unwrap();
        for i in (0..p - w).rev() {
            if !kept.contains(&(i as u32)) {
                assert!(b.seq_rm(0, i as i32, i as i32 + 1));
            }
        }
        let rest = b.state_seq_get(0).unwrap();
        b.clear();
        b.state_seq_set(0, &rest).unwrap();
        b
    };
    let probe = |ctx: &mut snapkv::ContextRef, pos: usize| {
        ctx.decode_tokens(0, &[tokens[7]], pos as i32, true).unwrap();
        let logits = ctx.logits_ith(-1).unwrap().to_vec();
        assert!(ctx.seq_rm(0, pos as i32, -1));
        logits
    };
    let base = probe(&mut equivalent(), p);

    // The whole sequence shifted by +100: the probe 100 positions later
    // sees the same relative distances.
    a.seq_add(0, -1, -1, 100);
    let shifted = probe(&mut a, p + 100);
    let d = max_abs_diff(&shifted, &base);
    assert!(d < 1e-2, "seq_add over the whole sequence: max |Δlogit| = {d}");
    assert_eq!(a.seq_pos_max(0), Some(p as i32 - 1 + 100));

    // Removing the window's last 10 cells from both: the same cells go.
    let mut a = compressed();
    let mut b = equivalent();
    assert!(a.seq_rm(0, (p - 10) as i32, -1));
    assert!(b.seq_rm(0, (p - 10) as i32, -1));
    assert_eq!(n_cells(&a, 0), 96 - 10);
    let d = max_abs_diff(&probe(&mut a, p - 10), &probe(&mut b, p - 10));
    assert!(d <= 1e-4, "seq_rm from the window on: max |Δlogit| = {d}");

    // seq_div by 2 on both: the equivalent's keys move to their true
    // positions / 2, the compressed sequence's by its nominal ones.
    let mut a = compressed();
    let mut b = equivalent();
    a.seq_div(0, -1, -1, 2);
    b.seq_div(0, -1, -1, 2);
    let next = p / 2;
    let (da, db) = (probe(&mut a, next), probe(&mut b, next));
    let d = max_abs_diff(&da, &db);
    assert!(
        d > 1e-1,
        "seq_div is documented as wrong on a compressed sequence, yet it matched the uncompressed equivalent \
         (max |Δlogit| = {d}): update the documentation"
    );
}

#[test]
fn compressed_sequence_keeps_its_shape_and_keeps_working() {
    let tokens = tiny_prompt(400, 13);
    let p = tokens.len() as i32;
    let mut ctx = observed(tiny(), 2048, FlashAttention::Auto);
    let stats = Compressor::new(config(128))
        .unwrap()
        .prefill(&mut ctx, 0, &tokens)
        .unwrap();
    assert!(stats.compressed);
    assert_eq!((stats.cells_before, stats.cells_after), (tokens.len(), 128));
    assert_eq!(n_cells(&ctx, 0), 128);
    assert_eq!(ctx.seq_pos_max(0), Some(p - 1));
    assert_eq!(ctx.seq_pos_min(0), Some(p - 128));
    let expected = stats.bytes_before as f64 * 128.0 / tokens.len() as f64;
    assert!(
        (stats.bytes_after as f64 - expected).abs() < 1024.0,
        "{} vs {expected}",
        stats.bytes_after
    );

    let gen = generate(&mut ctx, 0, &mut Sampler::greedy(), p, 32, false).unwrap();
    assert_eq!(gen.tokens.len(), 32);
    assert!(gen.tokens.iter().all(|&t| t >= 0 && (t as usize) < tiny().n_vocab()));
    // A second user turn after the generation.
    let mut pos = p + 31;
    ctx.decode_tokens(0, &[*gen.tokens.last().unwrap()], pos, false)
        .unwrap();
    pos += 1;
    let turn = tiny().tokenize(" and what comes next?", false, false).unwrap();
    ctx.decode_tokens(0, &turn, pos, true).unwrap();
    pos += turn.len() as i32;
    assert!(ctx.logits_ith(-1).unwrap().iter().all(|x| x.is_finite()));
    let more = generate(&mut ctx, 0, &mut Sampler::greedy(), pos, 8, false).unwrap();
    assert_eq!(more.tokens.len(), 8);
    assert_eq!(ctx.seq_pos_max(0), Some(pos + 6));
}

#[test]
fn compressing_one_sequence_leaves_another_bit_identical() {
    let a = tiny_prompt(250, 14);
    let b = tiny_prompt(350, 15);
    let observer = WindowObserver::new();
    let mut ctx = Context::new(
        tiny(),
        &params(1024, FlashAttention::Auto)
            .with_n_seq_max(2)
            .with_observer(observer),
    )
    .unwrap();
    let comp = Compressor::new(config(96)).unwrap();
    comp.prefill(&mut ctx, 0, &a).unwrap();
    let pa = a.len() as i32;
    let state_a = ctx.state_seq_get(0).unwrap();
    ctx.decode_tokens(0, &[a[1]], pa, true).unwrap();
    let before = ctx.logits_ith(-1).unwrap().to_vec();
    assert!(ctx.seq_rm(0, pa, -1));

    let stats = comp.prefill(&mut ctx, 1, &b).unwrap();
    assert!(stats.compressed);
    assert_eq!(ctx.state_seq_get(0).unwrap(), state_a, "sequence 0's cells changed");
    ctx.decode_tokens(0, &[a[1]], pa, true).unwrap();
    assert!(bits_equal(&before, ctx.logits_ith(-1).unwrap()));
}

/// The prefill path captures the window as the last rows of the prompt's
/// last micro-batch; the hook re-evaluates the window on its own. Both must
/// choose the same cells, with either score source and whether or not the
/// prompt spans several micro-batches.
#[test]
fn hook_path_selects_what_the_prefill_path_selects() {
    let tokens = tiny_prompt(300, 16);
    for fa in [FlashAttention::On, FlashAttention::Off] {
        for ubatch in [512, 96] {
            let ctx_params = || {
                params(1024, fa)
                    .with_batch(512, ubatch)
                    .with_observer(WindowObserver::new())
            };
            let (comp, chosen) = recording(config(96), SnapKvSelector);
            let mut a = Context::new(tiny(), &ctx_params()).unwrap();
            let via_prefill_stats = comp.prefill(&mut a, 0, &tokens).unwrap();
            let via_prefill = chosen.lock().unwrap().take().unwrap();

            let mut b = Context::new(tiny(), &ctx_params()).unwrap();
            b.decode_tokens(0, &tokens, 0, true).unwrap();
            let stats = comp.compress_after_prefill(&mut b, 0, &tokens).unwrap();
            assert!(stats.compressed);
            assert_eq!(stats.score_source, via_prefill_stats.score_source);
            let via_hook = chosen.lock().unwrap().take().unwrap();
            assert_eq!(via_prefill, via_hook, "flash {fa:?}, ubatch {ubatch}");
            let p = tokens.len() as i32;
            a.decode_tokens(0, &[tokens[2]], p, true).unwrap();
            b.decode_tokens(0, &[tokens[2]], p, true).unwrap();
            // The window's K/V come from micro-batches of different sizes on
            // the two paths (llama.cpp's CPU kernels round differently by
            // batch size), so the logits agree closely but not bit for bit.
            let diff = max_abs_diff(a.logits_ith(-1).unwrap(), b.logits_ith(-1).unwrap());
            assert!(diff < 1e-2, "flash {fa:?}, ubatch {ubatch}: logits differ by {diff}");
        }
    }
}

/// The re-evaluating hook compacts the state the host's own prefill left
/// (its snapshot, read before the window is evaluated again for its
/// queries): the window's cells keep the K/V the host computed, which a
/// re-evaluation in a batch of another size rounds differently.
#[test]
fn hook_keeps_the_hosts_window_kv() {
    let tokens = tiny_prompt(300, 17);
    let w = SnapKvConfig::default().window;
    let mut ctx = observed(tiny(), 1024, FlashAttention::On);
    ctx.decode_tokens(0, &tokens, 0, true).unwrap();
    let before_blob = ctx.state_seq_get(0).unwrap();
    let shape = model_shape(ctx.model());
    let before = SeqState::parse(&before_blob, &shape).unwrap();
    let stats = Compressor::new(config(96))
        .unwrap()
        .compress_after_prefill(&mut ctx, 0, &tokens)
        .unwrap();
    assert!(stats.compressed);
    assert_eq!(stats.score_source, snapkv::ScoreSource::QueryKey);
    let after_blob = ctx.state_seq_get(0).unwrap();
    let after = SeqState::parse(&after_blob, &shape).unwrap();
    let first = (tokens.len() - w) as i32;
    let cell_of = |state: &SeqState<'_>, pos: i32| state.positions().iter().position(|&p| p == pos).unwrap();
    // Flash attention on: V is stored row by row, so rows compare.
    assert!(before.v_row(0, 0).is_some());
    for pos in first..tokens.len() as i32 {
        let (b, a) = (cell_of(&before, pos), cell_of(&after, pos));
        for layer in 0..shape.n_layer {
            assert_eq!(
                before.k_row(layer, b),
                after.k_row(layer, a),
                "K, layer {layer}, position {pos}"
            );
            assert_eq!(
                before.v_row(layer, b),
                after.v_row(layer, a),
                "V, layer {layer}, position {pos}"
            );
        }
    }
}

/// The observed-decode hook: the caller decodes the prompt itself (in any
/// micro-batch sizes, even smaller than the window) with the observer armed,
/// then compresses without re-evaluating anything. It must choose what the
/// prefill path chooses and leave the caller's logits alone.
#[test]
fn observed_decodes_select_what_the_prefill_path_selects() {
    let tokens = tiny_prompt(300, 16);
    let (comp, chosen) = recording(config(96), SnapKvSelector);
    for fa in [FlashAttention::On, FlashAttention::Off] {
        let mut a = Context::new(
            tiny(),
            &params(1024, fa)
                .with_batch(512, 512)
                .with_observer(WindowObserver::new()),
        )
        .unwrap();
        comp.prefill(&mut a, 0, &tokens).unwrap();
        let via_prefill = chosen.lock().unwrap().take().unwrap();
        // ubatch 20 < window 32: the window's rows come from two micro-batches.
        for (n_batch, ubatch) in [(512, 512), (512, 96), (64, 20)] {
            let mut b = Context::new(
                tiny(),
                &params(1024, fa)
                    .with_batch(n_batch, ubatch)
                    .with_observer(WindowObserver::new()),
            )
            .unwrap();
            comp.observe_decodes(&b).unwrap();
            b.decode_tokens(0, &tokens, 0, true).unwrap();
            let logits = b.logits_ith(-1).unwrap().to_vec();
            let stats = comp.compress_observed(&mut b, 0).unwrap();
            assert!(stats.compressed);
            assert_eq!(stats.window_seconds, 0.0, "nothing re-evaluated");
            assert_eq!(n_cells(&b, 0), 96);
            assert!(bits_equal(&logits, b.logits_ith(-1).unwrap()), "logits untouched");
            let via_observed = chosen.lock().unwrap().take().unwrap();
            let agree = agreement(&via_prefill, &via_observed);
            // Different micro-batch sizes round the queries differently;
            // a near-tie may then fall the other way.
            assert!(agree >= 0.99, "flash {fa:?}, ubatch {ubatch}: agreement {agree}");
            let p = tokens.len() as i32;
            a.seq_rm(0, p, -1);
            a.decode_tokens(0, &[tokens[2]], p, true).unwrap();
            b.decode_tokens(0, &[tokens[2]], p, true).unwrap();
            if agree == 1.0 {
                let diff = max_abs_diff(a.logits_ith(-1).unwrap(), b.logits_ith(-1).unwrap());
                assert!(diff < 1e-2, "flash {fa:?}, ubatch {ubatch}: logits differ by {diff}");
            }
        }
    }
}

fn same_state(ctx: &snapkv::ContextRef, expected: &[u8], line: u32) {
    let now = ctx.state_seq_get(0).unwrap();
    let first = now.iter().zip(expected).position(|(a, b)| a != b);
    assert!(
        now == expected,
        "line {line}: state differs: {} vs {} bytes, first difference at {first:?}",
        now.len(),
        expected.len()
    );
}

/// Misuse of the observed-decode hook is refused and loses nothing.
#[test]
fn observed_decodes_refuse_misuse() {
    let tokens = tiny_prompt(300, 21);
    let comp = Compressor::new(config(96)).unwrap();
    let mut ctx = observed(tiny(), 1024, FlashAttention::Auto);
    ctx.decode_tokens(0, &tokens, 0, true).unwrap();
    let full = ctx.state_seq_get(0).unwrap();
    // Not armed.
    assert!(matches!(
        comp.compress_observed(&mut ctx, 0),
        Err(snapkv::Error::InvalidArgument { param: "observer", .. })
    ));
    // Armed, but the last tokens decoded are not the sequence's end: a
    // token decoded and removed again.
    comp.observe_decodes(&ctx).unwrap();
    ctx.decode_tokens(0, &tokens[..40], 300, false).unwrap();
    assert!(ctx.seq_rm(0, 300, -1));
    assert!(matches!(
        comp.compress_observed(&mut ctx, 0),
        Err(snapkv::Error::InvalidArgument { param: "seq", .. })
    ));
    same_state(&ctx, &full, line!());
    // Fewer tokens than the window decoded while armed.
    ctx.seq_rm(0, 290, -1);
    comp.observe_decodes(&ctx).unwrap();
    ctx.decode_tokens(0, &tokens[290..], 290, true).unwrap();
    // (The last 10 cells were recomputed in a smaller batch: their values
    // may differ in the last bits, so this is the state to keep now.)
    let full = ctx.state_seq_get(0).unwrap();
    assert!(matches!(
        comp.compress_observed(&mut ctx, 0),
        Err(snapkv::Error::InvalidArgument { param: "seq", .. })
    ));
    same_state(&ctx, &full, line!());
    // Nothing decoded while armed.
    comp.observe_decodes(&ctx).unwrap();
    assert!(matches!(
        comp.compress_observed(&mut ctx, 0),
        Err(snapkv::Error::ObserverMissing)
    ));
    // An observer that is not this context's callback: refused when armed,
    // before the host decodes anything.
    let foreign = WindowObserver::new();
    assert!(matches!(
        comp.observe_decodes_with(&ctx, &foreign),
        Err(snapkv::Error::ObserverMissing)
    ));
    ctx.seq_rm(0, 0, -1);
    ctx.decode_tokens(0, &tokens, 0, true).unwrap();
    let full = ctx.state_seq_get(0).unwrap();
    assert!(comp.compress_observed_with(&mut ctx, &foreign, 0).is_err());
    same_state(&ctx, &full, line!());
}

/// Fraction of kept positions two selections share, over all heads.
fn agreement(a: &Selection, b: &Selection) -> f64 {
    let mut same = 0usize;
    for l in 0..a.n_layer {
        for g in 0..a.n_head_kv {
            let rb: std::collections::HashSet<u32> = b.row(l, g).iter().copied().collect();
            same += a.row(l, g).iter().filter(|i| rb.contains(i)).count();
        }
    }
    same as f64 / (a.n_layer * a.n_head_kv * a.n_keep) as f64
}

fn selection_with(model: &Model, tokens: &[i32], budget: usize, fa: FlashAttention, k: CacheType) -> Selection {
    selection_of(model, tokens, config(budget), fa, (k, CacheType::F16))
}

/// The selection `cfg` makes on `tokens` with flash attention `fa` and
/// cache types `(K, V)`.
fn selection_of(
    model: &Model,
    tokens: &[i32],
    cfg: SnapKvConfig,
    fa: FlashAttention,
    (k, v): (CacheType, CacheType),
) -> Selection {
    let (comp, chosen) = recording(cfg, SnapKvSelector);
    let n_ctx = (tokens.len() + 64).next_multiple_of(256) as u32;
    let p = params(n_ctx, fa)
        .with_cache_types(k, v)
        .with_observer(WindowObserver::new());
    let mut ctx = Context::new(model, &p).unwrap();
    let stats = comp.prefill(&mut ctx, 0, tokens).unwrap();
    let expect = if fa == FlashAttention::Off {
        snapkv::ScoreSource::Softmax
    } else {
        snapkv::ScoreSource::QueryKey
    };
    assert_eq!(stats.score_source, expect);
    let sel = chosen.lock().unwrap().take().unwrap();
    sel
}

#[test]
fn flash_attention_on_and_off_agree_on_the_tiny_model() {
    let tokens = tiny_prompt(400, 17);
    for k in [CacheType::F16, CacheType::Q8_0] {
        let on = selection_with(tiny(), &tokens, 128, FlashAttention::On, k);
        let off = selection_with(tiny(), &tokens, 128, FlashAttention::Off, k);
        let agree = agreement(&on, &off);
        eprintln!(
            "tiny model, K cache {}: flash on/off agreement {:.2}%",
            k.name(),
            100.0 * agree
        );
        assert!(agree >= 0.97, "K cache {}: {agree}", k.name());
    }
}

/// Value weighting reads V row-wise (flash attention on), transposed (off)
/// and quantized (q8_0 V, flash attention on): all three must weigh the same
/// norms, and the weighting must change what is kept.
#[test]
fn value_weighting_reads_every_v_layout_alike_and_changes_the_selection() {
    let tokens = tiny_prompt(400, 23);
    let mut weighted = config(128);
    weighted.value_weighting = ValueWeighting::Norm;
    let f16 = (CacheType::F16, CacheType::F16);
    let rows = selection_of(tiny(), &tokens, weighted.clone(), FlashAttention::On, f16);
    let transposed = selection_of(tiny(), &tokens, weighted.clone(), FlashAttention::Off, f16);
    let quantized = selection_of(
        tiny(),
        &tokens,
        weighted,
        FlashAttention::On,
        (CacheType::F16, CacheType::Q8_0),
    );
    let plain = selection_of(tiny(), &tokens, config(128), FlashAttention::On, f16);
    let (on_off, q8, vs_plain) = (
        agreement(&rows, &transposed),
        agreement(&rows, &quantized),
        agreement(&rows, &plain),
    );
    eprintln!("value-weighted: rows/transposed {on_off:.3}, f16/q8_0 V {q8:.3}, weighted/plain {vs_plain:.3}");
    assert!(on_off >= 0.97, "{on_off}");
    assert!(q8 >= 0.95, "{q8}");
    assert!(vs_plain < 0.99, "weighting by value norms changed nothing: {vs_plain}");
}

/// Max over the window queries goes through the model's softmax (flash
/// attention off) and through captured queries (on) alike, and keeps other
/// cells than the sum does.
#[test]
fn max_over_queries_agrees_with_flash_attention_on_and_off_and_changes_the_selection() {
    let tokens = tiny_prompt(400, 29);
    let mut by_max = config(128);
    by_max.queries = QueryAggregation::Max;
    let f16 = (CacheType::F16, CacheType::F16);
    let on = selection_of(tiny(), &tokens, by_max.clone(), FlashAttention::On, f16);
    let off = selection_of(tiny(), &tokens, by_max, FlashAttention::Off, f16);
    let summed = selection_of(tiny(), &tokens, config(128), FlashAttention::On, f16);
    let (on_off, vs_sum) = (agreement(&on, &off), agreement(&on, &summed));
    eprintln!("max over queries: flash on/off {on_off:.3}, max/sum {vs_sum:.3}");
    assert!(on_off >= 0.97, "{on_off}");
    assert!(vs_sum < 0.99, "max over the window queries changed nothing: {vs_sum}");
}

#[test]
fn flash_attention_on_and_off_agree_on_the_default_model() {
    let _g = heavy();
    let m = qwen();
    let text = m
        .apply_chat_template(
            &[ChatMessage::user(format!(
                "{}\n\nSummarise the text.",
                filler(1500, 18)
            ))],
            true,
        )
        .unwrap();
    let tokens = m.tokenize(&text, true, true).unwrap();
    let on = selection_with(m, &tokens, 256, FlashAttention::On, CacheType::F16);
    let off = selection_with(m, &tokens, 256, FlashAttention::Off, CacheType::F16);
    let agree = agreement(&on, &off);
    eprintln!(
        "Qwen 0.5B, {} tokens, budget 256: flash on/off agreement {:.2}%",
        tokens.len(),
        100.0 * agree
    );
    assert!(agree >= 0.97, "{agree}");
}

/// A draft: the answer's first tokens, decoded greedily on the cache
/// compressed once, vote beside the window for a second selection from the
/// full prompt; the draft's cells go, and the logits left are the prompt's
/// last token's, decoded again over the final cache.
#[test]
fn a_draft_selects_again_and_leaves_the_prompts_logits() {
    let tokens = tiny_prompt(400, 31);
    let p = tokens.len() as i32;
    let f16 = (CacheType::F16, CacheType::F16);
    for fa in [FlashAttention::On, FlashAttention::Off] {
        let plain = selection_of(tiny(), &tokens, config(128), fa, f16);
        let mut cfg = config(128);
        cfg.draft = 8;
        let (comp, chosen) = recording(cfg, SnapKvSelector);
        let mut ctx = observed(tiny(), 1024, fa);
        let stats = comp.prefill(&mut ctx, 0, &tokens).unwrap();
        assert!(stats.compressed);
        assert_eq!(stats.draft_tokens, 8, "{fa:?}");
        assert!(stats.draft_seconds > 0.0);
        assert_eq!(
            stats.score_source,
            snapkv::ScoreSource::QueryKey,
            "the second selection scores from queries"
        );
        let drafted = chosen.lock().unwrap().take().unwrap();
        let agree = agreement(&plain, &drafted);
        assert!(
            agree < 0.99,
            "{fa:?}: the draft's votes must change the selection (agreement {agree})"
        );
        assert!(agree > 0.5, "{fa:?}: the window still votes (agreement {agree})");
        assert_eq!(n_cells(&ctx, 0), 128, "the draft's cells are gone");
        assert_eq!(ctx.seq_pos_max(0), Some(p - 1));

        // The logits left are the prompt's last token's over the final cache.
        let logits = ctx.logits_ith(-1).unwrap().to_vec();
        assert!(ctx.seq_rm(0, p - 1, -1));
        ctx.decode_tokens(0, &tokens[tokens.len() - 1..], p - 1, true).unwrap();
        let diff = max_abs_diff(&logits, ctx.logits_ith(-1).unwrap());
        assert!(diff < 1e-5, "{fa:?}: logits differ by {diff}");
        let gen = generate(&mut ctx, 0, &mut Sampler::greedy(), p, 4, false).unwrap();
        assert_eq!(gen.tokens.len(), 4);

        // The re-evaluating hook drafts too.
        let mut hooked = observed(tiny(), 1024, fa);
        hooked.decode_tokens(0, &tokens, 0, true).unwrap();
        let stats = comp.compress_after_prefill(&mut hooked, 0, &tokens).unwrap();
        assert_eq!((stats.draft_tokens, stats.cells_after), (8, 128));
        assert_eq!(n_cells(&hooked, 0), 128);

        // The observed-decode hook is not given the prompt's last token:
        // refused, the sequence as it was.
        let mut watched = observed(tiny(), 1024, fa);
        comp.observe_decodes(&watched).unwrap();
        watched.decode_tokens(0, &tokens, 0, true).unwrap();
        let before = watched.state_seq_get(0).unwrap();
        assert!(matches!(
            comp.compress_observed(&mut watched, 0),
            Err(snapkv::Error::InvalidArgument { param: "draft", .. })
        ));
        assert_eq!(watched.state_seq_get(0).unwrap(), before);
    }
}

#[test]
fn failures_leave_the_sequence_as_it_was() {
    let tokens = tiny_prompt(300, 19);
    let mut ctx = observed(tiny(), 1024, FlashAttention::Auto);
    ctx.decode_tokens(0, &tokens, 0, true).unwrap();
    let before = ctx.state_seq_get(0).unwrap();

    // Invalid configurations are refused up front.
    let mut bad = config(256);
    bad.kernel = 4;
    assert!(Compressor::new(bad).is_err());
    let mut bad = config(16);
    bad.window = 32;
    assert!(Compressor::new(bad).is_err());
    assert!(Compressor::with_method(config(128), "no-such-method").is_err());

    let comp = Compressor::new(config(128)).unwrap();
    // Too few window tokens, a sequence id out of range, an empty sequence.
    assert!(comp.compress_after_prefill(&mut ctx, 0, &tokens[..5]).is_err());
    assert!(comp.compress_after_prefill(&mut ctx, 3, &tokens).is_err());
    let mut two = Context::new(
        tiny(),
        &params(512, FlashAttention::Auto)
            .with_n_seq_max(2)
            .with_observer(WindowObserver::new()),
    )
    .unwrap();
    assert!(matches!(
        comp.compress_after_prefill(&mut two, 1, &tokens),
        Err(snapkv::Error::EmptySequence { seq: 1 })
    ));
    // A window larger than one micro-batch.
    let mut big_window = config(700);
    big_window.window = 600;
    let mut small_ubatch = Context::new(
        tiny(),
        &params(1024, FlashAttention::Auto)
            .with_batch(512, 256)
            .with_observer(WindowObserver::new()),
    )
    .unwrap();
    let long = tiny_prompt(900, 20);
    small_ubatch.decode_tokens(0, &long, 0, true).unwrap();
    let snap = small_ubatch.state_seq_get(0).unwrap();
    assert!(Compressor::new(big_window)
        .unwrap()
        .compress_after_prefill(&mut small_ubatch, 0, &long)
        .is_err());
    assert_eq!(small_ubatch.state_seq_get(0).unwrap(), snap);
    // A context without observer.
    let mut plain = Context::new(tiny(), &params(1024, FlashAttention::Auto)).unwrap();
    plain.decode_tokens(0, &tokens, 0, true).unwrap();
    assert!(matches!(
        comp.compress_after_prefill(&mut plain, 0, &tokens),
        Err(snapkv::Error::ObserverMissing)
    ));
    assert_eq!(ctx.state_seq_get(0).unwrap(), before);
}

#[test]
fn cache_layouts_that_cannot_be_split_per_head_are_refused() {
    // Head size 16: a q8_0 block (32 values) would span two heads. llama.cpp
    // refuses such a cache when the context is created, before any data
    // exists; the state parser refuses the same layout (unit tests in
    // snapkv::state_blob) for hosts that bypass that check.
    let spec = TinyModelSpec {
        n_embd: 64,
        n_head: 4,
        n_head_kv: 2,
        ..TinyModelSpec::default()
    };
    let model = Model::load(init_backend(), tiny_model_path(&spec).unwrap(), &ModelParams::default()).unwrap();
    let p = params(1024, FlashAttention::On).with_cache_types(CacheType::Q8_0, CacheType::F16);
    assert!(matches!(Context::new(&model, &p), Err(snapkv::Error::ContextCreate(_))));
}

// ------------------------------------------------------------------ passkey

fn answer(ctx: &mut snapkv::ContextRef, model: &Model, p: usize) -> String {
    let gen = generate(ctx, 0, &mut Sampler::greedy(), p as i32, 12, true).unwrap();
    model.detokenize(&gen.tokens, false).unwrap()
}

#[test]
fn passkey_answers_survive_compression_on_the_default_model() {
    let _g = heavy();
    let m = qwen();
    let cfg = config(256);
    let comp = Compressor::new(cfg.clone()).unwrap();
    let mut failures = Vec::new();
    // Three depths (start, middle, late), each compressed twice: the test
    // evaluates 12,000 tokens of the 0.5B model (five depths took 6.5 min of CI).
    for (i, depth) in [0.0, 0.5, 0.9].into_iter().enumerate() {
        let key = 10_000 + (i as u32 * 17_389 + 4_711) % 89_999;
        let tokens = passkey_prompt(m, 2000, depth, key);
        let p = tokens.len();
        let n_ctx = (p + 64).next_multiple_of(256) as u32;

        // Prefill path.
        let mut a = observed(m, n_ctx, FlashAttention::Auto);
        let stats = comp.prefill(&mut a, 0, &tokens).unwrap();
        assert!(stats.compressed && stats.cells_after == 256);
        let via_prefill = answer(&mut a, m, p);
        drop(a);

        // Full cache, then the hook on the same evaluation.
        let mut b = observed(m, n_ctx, FlashAttention::Auto);
        b.decode_tokens(0, &tokens, 0, true).unwrap();
        let snapshot = b.state_seq_get(0).unwrap();
        let full = answer(&mut b, m, p);
        b.state_seq_set(0, &snapshot).unwrap();
        assert!(b.seq_rm(0, p as i32, -1));
        comp.compress_after_prefill(&mut b, 0, &tokens).unwrap();
        let via_hook = answer(&mut b, m, p);

        let k = key.to_string();
        eprintln!("depth {depth}: key {k} | full {full:?} | prefill {via_prefill:?} | hook {via_hook:?}");
        if full.contains(&k) && !via_prefill.contains(&k) {
            failures.push(format!("depth {depth}: prefill path lost the key ({via_prefill:?})"));
        }
        if via_hook != via_prefill {
            failures.push(format!("depth {depth}: hook {via_hook:?} vs prefill {via_prefill:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_compressed_sequence_can_grow_and_be_compressed_again() {
    let tokens = tiny_prompt(300, 22);
    let more = tiny_prompt(200, 23);
    let p = tokens.len() as i32;
    let mut ctx = observed(tiny(), 1024, FlashAttention::Auto);
    let comp = Compressor::new(config(128)).unwrap();
    assert!(comp.prefill(&mut ctx, 0, &tokens).unwrap().compressed);
    // A turn appended without compression...
    ctx.decode_tokens(0, &more[..40], p, false).unwrap();
    assert_eq!(n_cells(&ctx, 0), 168);
    // ...then the next one compresses everything again, from nominal positions.
    let stats = comp.prefill(&mut ctx, 0, &more[40..]).unwrap();
    assert!(stats.compressed);
    assert_eq!((stats.cells_before, stats.cells_after), (328, 128));
    assert_eq!(n_cells(&ctx, 0), 128);
    assert_eq!(ctx.seq_pos_max(0), Some(p + more.len() as i32 - 1));
    let gen = generate(&mut ctx, 0, &mut Sampler::greedy(), p + more.len() as i32, 8, false).unwrap();
    assert_eq!(gen.tokens.len(), 8);
}

#[test]
fn an_observer_of_another_context_is_detected() {
    let tokens = tiny_prompt(300, 25);
    let stray = WindowObserver::new();
    let mut ctx = observed(tiny(), 1024, FlashAttention::Auto);
    ctx.decode_tokens(0, &tokens, 0, true).unwrap();
    let before = ctx.state_seq_get(0).unwrap();
    let err = Compressor::new(config(128))
        .unwrap()
        .compress_after_prefill_with(&mut ctx, &stray, 0, &tokens)
        .unwrap_err();
    assert!(matches!(err, snapkv::Error::ObserverMissing), "{err}");
    assert_eq!(ctx.state_seq_get(0).unwrap(), before);
}

/// A sequence compressed before any question (reconstruct) and saved with
/// llama.cpp's `llama_state_seq_save_file` loads into another context and
/// continues exactly as it would have in the first, from a file that holds
/// only the kept cells; loading refuses what it cannot do and keeps what
/// it would overwrite.
#[test]
fn a_compressed_sequence_saved_to_a_file_loads_back_and_continues_alike() {
    let tokens = tiny_prompt(400, 21);
    let p = tokens.len() as i32;
    let dir = std::env::temp_dir().join(format!("snapkv-state-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (full_file, small_file) = (dir.join("full.kv"), dir.join("compressed.kv"));

    let mut full = observed(tiny(), 2048, FlashAttention::Auto);
    full.decode_tokens(0, &tokens, 0, false).unwrap();
    let full_bytes = full.state_seq_save_file(&full_file, 0, &tokens).unwrap();

    let mut ctx = observed(tiny(), 2048, FlashAttention::Auto);
    let stats = Compressor::with_method(config(128), "reconstruct")
        .unwrap()
        .prefill(&mut ctx, 0, &tokens)
        .unwrap();
    assert!(stats.compressed);
    let small_bytes = ctx.state_seq_save_file(&small_file, 0, &tokens).unwrap();
    assert_eq!(small_bytes as u64, std::fs::metadata(&small_file).unwrap().len());
    // 128 of 400 cells, plus the 400 tokens and per-cell metadata in both.
    assert!(
        small_bytes * 2 < full_bytes,
        "compressed file {small_bytes} bytes, full {full_bytes}"
    );

    let turn = tiny().tokenize(" and what comes next?", false, false).unwrap();
    ctx.decode_tokens(0, &turn, p, true).unwrap();
    let expected = ctx.logits_ith(-1).unwrap().to_vec();

    let mut other = observed(tiny(), 2048, FlashAttention::Auto);
    let (read, saved_tokens) = other.state_seq_load_file(&small_file, 0).unwrap();
    assert_eq!(read, small_bytes);
    assert_eq!(saved_tokens, tokens);
    assert_eq!(n_cells(&other, 0), 128);
    assert_eq!(other.seq_pos_max(0), Some(p - 1));
    other.decode_tokens(0, &turn, p, true).unwrap();
    let got = other.logits_ith(-1).unwrap();
    assert!(max_abs_diff(&expected, got) < 1e-4, "{}", max_abs_diff(&expected, got));

    // Into a sequence that holds cells: refused, the cells kept.
    let before = other.state_seq_get(0).unwrap();
    let err = other.state_seq_load_file(&small_file, 0).unwrap_err();
    assert!(err.to_string().contains("empty"), "{err}");
    assert_eq!(other.state_seq_get(0).unwrap(), before);
    // A missing file, and a context without room for the cells: refused,
    // the sequence left empty.
    let mut fresh = observed(tiny(), 2048, FlashAttention::Auto);
    let err = fresh.state_seq_load_file(&dir.join("missing.kv"), 0).unwrap_err();
    assert!(matches!(err, snapkv::Error::State { op: "load", .. }), "{err}");
    assert_eq!(fresh.seq_pos_max(0), None);
    let mut small_ctx = observed(tiny(), 64, FlashAttention::Auto);
    assert!(small_ctx.state_seq_load_file(&small_file, 0).is_err());
    assert_eq!(small_ctx.seq_pos_max(0), None);
    std::fs::remove_dir_all(&dir).unwrap();
}
