//! Scoring micro-benchmarks at the default model's shapes (Qwen2.5 0.5B:
//! 24 layers, 14 query heads, 2 KV heads, head dimension 64) and a prompt of
//! P = 8,000 cells with a 32-token window: votes from captured queries and
//! cached keys (flash attention on), pooling + GQA aggregation, and the
//! per-head top-k selection.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use snapkv::snapkv::{
    add_votes_from_queries, pool_and_aggregate, QueryScorer, SelectionShape, Selector, SnapKvSelector, Votes,
};
use snapkv::{PoolAlign, Pooling, QueryAggregation};

const N_LAYER: usize = 24;
const N_HEAD: usize = 14;
const N_HEAD_KV: usize = 2;
const HEAD_DIM: usize = 64;
const P: usize = 8000;
const WINDOW: usize = 32;
const PREFIX: usize = P - WINDOW;
const BUDGET: usize = 1024;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn votes_filled() -> Votes {
    let mut votes = Votes::new(N_LAYER, N_HEAD, PREFIX).expect("shape");
    for layer in 0..N_LAYER {
        for head in 0..N_HEAD {
            let row = values(PREFIX, (layer * N_HEAD + head) as u64 + 1);
            for (v, r) in votes.row_mut(layer, head).iter_mut().zip(row) {
                *v = r.abs();
            }
        }
    }
    votes
}

fn scoring(c: &mut Criterion) {
    let queries = values(WINDOW * N_HEAD * HEAD_DIM, 1);
    let keys = values(P * N_HEAD_KV * HEAD_DIM, 2);
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let mut group = c.benchmark_group("scoring");
    group.sample_size(10);

    group.bench_function("add_votes_from_queries/one layer, all threads", |b| {
        let mut votes = Votes::new(1, N_HEAD, PREFIX).expect("shape");
        b.iter(|| {
            add_votes_from_queries(&mut votes, 0, &queries, &keys, HEAD_DIM, N_HEAD_KV, WINDOW, scale).expect("votes");
            black_box(&votes);
        });
    });
    group.bench_function("QueryScorer/one layer, 1 thread", |b| {
        let mut votes = Votes::new(1, N_HEAD, PREFIX).expect("shape");
        let mut scorer = QueryScorer::new(1);
        b.iter(|| {
            scorer
                .add_votes(&mut votes, 0, &queries, &keys, HEAD_DIM, N_HEAD_KV, WINDOW, scale)
                .expect("votes");
            black_box(&votes);
        });
    });
    for (label, aggregation) in [
        ("", QueryAggregation::Sum),
        (", largest vote of the window", QueryAggregation::Max),
    ] {
        group.bench_function(format!("QueryScorer/24 layers, all threads{label}"), |b| {
            let mut votes = Votes::new(N_LAYER, N_HEAD, PREFIX)
                .expect("shape")
                .with_query_aggregation(aggregation);
            let mut scorer = QueryScorer::new(0);
            b.iter(|| {
                for layer in 0..N_LAYER {
                    scorer
                        .add_votes(&mut votes, layer, &queries, &keys, HEAD_DIM, N_HEAD_KV, WINDOW, scale)
                        .expect("votes");
                }
                black_box(&votes);
            });
        });
    }

    let votes = votes_filled();
    group.bench_function("pool_and_aggregate/24 layers, max pool k=7, mean GQA", |b| {
        b.iter(|| {
            black_box(pool_and_aggregate(&votes, N_HEAD_KV, 7, Pooling::Max, PoolAlign::Centered).expect("pool"))
        });
    });

    let scores = pool_and_aggregate(&votes, N_HEAD_KV, 7, Pooling::Max, PoolAlign::Centered).expect("pool");
    let shape = SelectionShape {
        n_layer: N_LAYER,
        n_head_kv: N_HEAD_KV,
        prefix_len: PREFIX,
    };
    group.bench_function("SnapKvSelector/top 992 of 7968 per KV head", |b| {
        b.iter(|| {
            black_box(
                SnapKvSelector
                    .select(Some(&scores), &shape, BUDGET - WINDOW)
                    .expect("select"),
            )
        });
    });
    group.finish();
}

criterion_group!(benches, scoring);
criterion_main!(benches);
