//! Micro-benchmarks of what scoring reads out of llama.cpp's sequence state
//! at P = 8,000 cells, f16 cache, row-wise V (flash attention on): every
//! layer's keys decoded to f32 (`gather_keys`, the query-based scorer's
//! input) and every layer's value norms (`value_norms`, for
//! `--value-weighting norm`), at the shapes of the default model (Qwen2.5
//! 0.5B: 24 layers, 2 KV heads of dimension 64) and of SmolLM2-135M (30
//! layers, 3 KV heads of dimension 64). The blobs are synthetic
//! (snapkv::snapkv::synthetic).

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use snapkv::snapkv::synthetic::build_blob;
use snapkv::snapkv::{gather_keys, position_order, value_norms, AlgoError, SeqState};
use snapkv::CacheType;

const P: usize = 8000;
const WINDOW: usize = 32;

/// An f16 bit pattern in [0.5, 1) from a byte's position, so that every
/// decoded value is finite.
fn f16_byte(cell: usize, byte: usize) -> u8 {
    if byte % 2 == 1 {
        0x38
    } else {
        (cell.wrapping_mul(31) ^ byte) as u8
    }
}

fn state_reads(c: &mut Criterion) {
    let positions: Vec<i32> = (0..P as i32).collect();
    let mut group = c.benchmark_group("state reads");
    group.sample_size(10);
    let mut no_quantized =
        |_: CacheType, _: &[u8], _: &mut [f32]| -> Result<(), AlgoError> { unreachable!("the cache is f16") };
    for (label, shape) in [
        ("Qwen2.5 0.5B", common::qwen_0_5b()),
        ("SmolLM2-135M", common::smollm2_135m()),
    ] {
        let blob = build_blob(
            &shape,
            &positions,
            CacheType::F16,
            CacheType::F16,
            false,
            1,
            0,
            |_, _, c, b| f16_byte(c, b),
        );
        let state = SeqState::parse(&blob, &shape).expect("parse");
        let order = position_order(state.positions(), WINDOW).expect("order");
        let mut out = Vec::new();
        group.bench_function(format!("gather_keys/{label}, all layers"), |b| {
            b.iter(|| {
                for layer in 0..shape.n_layer {
                    gather_keys(&state, &order, layer, &mut no_quantized, &mut out).expect("keys");
                }
                black_box(out.len())
            });
        });
        group.bench_function(format!("value_norms/{label}, all layers"), |b| {
            b.iter(|| {
                for layer in 0..shape.n_layer {
                    value_norms(&state, &order, layer, &mut no_quantized, &mut out).expect("norms");
                }
                black_box(out.len())
            });
        });
    }
    group.finish();
}

criterion_group!(benches, state_reads);
criterion_main!(benches);
