//! Compaction micro-benchmarks at the default model's shapes (Qwen2.5 0.5B:
//! 24 layers, 2 KV heads of dimension 64, f16 cache) and P = 8,000 cells:
//! parsing llama.cpp's sequence state and rewriting it per KV head to a
//! 1,024-cell budget, for row-wise V (flash attention on) and transposed V
//! (flash attention off). The blobs are synthetic (snapkv::snapkv::synthetic).

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use snapkv::snapkv::synthetic::build_blob;
use snapkv::snapkv::{position_order, rewrite, RandomSelector, SelectionShape, Selector, SeqState};
use snapkv::CacheType;

const P: usize = 8000;
const WINDOW: usize = 32;
const BUDGET: usize = 1024;

fn compaction(c: &mut Criterion) {
    let shape = common::qwen_0_5b();
    let positions: Vec<i32> = (0..P as i32).collect();
    let mut group = c.benchmark_group("compaction");
    group.sample_size(10);
    for (label, v_trans) in [("row-wise V", false), ("transposed V", true)] {
        let blob = build_blob(
            &shape,
            &positions,
            CacheType::F16,
            CacheType::F16,
            v_trans,
            1,
            0,
            |_, l, c, b| (l ^ c ^ b) as u8,
        );
        group.bench_function(format!("parse/{label}"), |b| {
            b.iter(|| black_box(SeqState::parse(&blob, &shape).expect("parse").n_cells()));
        });
        let state = SeqState::parse(&blob, &shape).expect("parse");
        let order = position_order(state.positions(), WINDOW).expect("order");
        let selection = RandomSelector { seed: 7 }
            .select(
                None,
                &SelectionShape {
                    n_layer: shape.n_layer,
                    n_head_kv: shape.n_head_kv,
                    prefix_len: order.prefix_len,
                },
                BUDGET - WINDOW,
            )
            .expect("select");
        group.bench_function(format!("rewrite/{label}, 8000 -> 1024 cells"), |b| {
            b.iter(|| black_box(rewrite(&state, &order, &selection).expect("rewrite").len()));
        });
    }
    group.finish();
}

criterion_group!(benches, compaction);
criterion_main!(benches);
