//! Fuzzing of the state-blob parser ([`SeqState::parse`]) and of the
//! per-KV-head rewrite ([`rewrite`]), built on proptest because cargo-fuzz
//! needs a nightly toolchain.
//!
//! Inputs are arbitrary bytes and mutations (byte flips, truncation,
//! insertion, deletion and duplication of byte runs, splices of two seeds,
//! boundary values written over 4- and 8-byte fields) of real blobs that
//! llama.cpp wrote through this crate: the seed corpus in
//! `tests/fuzz-corpus/` (regenerate it with
//! `cargo test --release --test state_blob_fuzz -- --ignored write_seed_corpus`).
//! For every input the tests prove that:
//! - parsing never panics, and a refusal is a format, shape or cache-type
//!   error (never an allocation failure or anything else);
//! - parsing allocates at most the input's length plus 4 KiB and rewriting
//!   at most twice the input's length plus 4 KiB (counted per thread by the
//!   test's global allocator), so no count read from the blob can trigger a
//!   large allocation, and each call returns within a second;
//! - an accepted blob accounts for every byte: its length is exactly the
//!   fixed header plus `n_cells` times the bytes one cell occupies;
//! - any valid selection (a random window of 1 to 4 cells, a random `k` in
//!   `0..=prefix_len`, a random subset of `k` prefix cells per layer and KV
//!   head; under the tiny model's shape and under other splits of its rows
//!   into 1, 4 and 8 KV heads) rewrites it into a blob that parses again with `window + k`
//!   cells, the same header, streams, types and layouts, the positions and
//!   per-head K/V bytes the rewrite specifies, and exactly
//!   `(n_cells - window - k) × cell bytes` fewer bytes than the input (so
//!   never more); the result is a fixed point of the keep-everything rewrite;
//! - each committed seed is what its file name says, and the
//!   keep-everything rewrite reproduces it byte for byte (or, for the seed
//!   whose cells are out of position order, reorders it as specified).
//!
//! Runs are reproducible: fixed proptest RNG seeds and case counts (50 000
//! mutated and 10 000 arbitrary inputs, about a second in release), and no
//! failure-persistence files. `SNAPKV_FUZZ_CASES` and `SNAPKV_FUZZ_SEED`
//! override both for a longer local campaign.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config as ProptestConfig, RngAlgorithm, RngSeed, TestRunner};
use snapkv::snapkv::{
    position_order, rewrite, AlgoError, CacheType, ModelShape, Selection, SeqState, VLayout, STATE_SEQ_MAGIC,
};

// ---------------------------------------------------------------------------
// Allocation accounting
// ---------------------------------------------------------------------------

/// Forwards to the system allocator and counts, per thread, the bytes every
/// allocation and reallocation asks for.
struct CountingAlloc;

thread_local! {
    static REQUESTED: Cell<usize> = const { Cell::new(0) };
}

fn count(bytes: usize) {
    // `try_with`: the slot may be gone while the thread shuts down.
    let _ = REQUESTED.try_with(|r| r.set(r.get().saturating_add(bytes)));
}

// SAFETY: every method forwards to `System` with the caller's arguments; the
// counting touches only a const-initialised thread-local `Cell`, which
// neither allocates nor unwinds.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Runs `f`, returning its result, the bytes it asked the allocator for on
/// this thread, and how long it took.
fn measured<T>(f: impl FnOnce() -> T) -> (T, usize, Duration) {
    let before = REQUESTED.with(Cell::get);
    let start = Instant::now();
    let r = f();
    let elapsed = start.elapsed();
    (r, REQUESTED.with(Cell::get) - before, elapsed)
}

/// Allowance for small fixed allocations (error messages, per-layer tables).
const ALLOC_SLACK: usize = 4096;
/// A parse or rewrite of a blob of a few KB takes microseconds; one that
/// takes a second is looping or allocating on a count read from the blob.
const CALL_LIMIT: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// The seed corpus
// ---------------------------------------------------------------------------

/// The attention shape of `TinyModelSpec::default()` (2 layers, 4 query
/// heads, 2 KV heads, head size 64); `write_seed_corpus` checks it against
/// the loaded model.
const TINY: ModelShape = ModelShape {
    n_layer: 2,
    n_head: 4,
    n_head_kv: 2,
    head_dim_k: 64,
    head_dim_v: 64,
};

/// Shapes whose rows the tiny model's blobs also fit (2 layers, 128
/// elements per K and V row), split into 2, 1, 4 and 8 KV heads: the
/// rewrite must move the bytes of whichever heads the shape names. Eight
/// heads of 16 elements cannot hold q8_0 blocks of 32, so blobs with q8_0
/// are refused under the last one.
const SHAPES: [ModelShape; 4] = [
    TINY,
    ModelShape {
        n_layer: 2,
        n_head: 2,
        n_head_kv: 1,
        head_dim_k: 128,
        head_dim_v: 128,
    },
    ModelShape {
        n_layer: 2,
        n_head: 8,
        n_head_kv: 4,
        head_dim_k: 32,
        head_dim_v: 32,
    },
    ModelShape {
        n_layer: 2,
        n_head: 8,
        n_head_kv: 8,
        head_dim_k: 16,
        head_dim_v: 16,
    },
];

/// Mostly the tiny model's own shape, sometimes another split of its rows.
fn shape() -> impl Strategy<Value = &'static ModelShape> {
    prop_oneof![3 => Just(0usize), 1 => 1..SHAPES.len()].prop_map(|i| &SHAPES[i])
}

/// How one corpus file was made and what it must contain.
#[derive(Debug)]
struct Seed {
    file: &'static str,
    k_type: CacheType,
    v_type: CacheType,
    /// Flash attention on: V row-wise; off: V transposed.
    flash_attn: bool,
    /// `n_seq_max` of the context (with `kv_unified = false`, one stream per sequence).
    n_stream: u32,
    /// The sequence whose state the file holds (also its stream).
    seq: i32,
    /// Prompt tokens decoded into `seq` at positions `0..n_tokens`.
    n_tokens: usize,
    /// Then positions `2..5` removed and two tokens decoded at
    /// `n_tokens..n_tokens + 2`, which llama.cpp puts into the freed cells:
    /// cells out of position order, positions with a gap (for 8 tokens,
    /// positions 0, 1, 8, 9, 5, 6, 7 in cell order).
    refill: bool,
}

impl Seed {
    /// Positions the sequence holds, ascending.
    fn positions(&self) -> Vec<i32> {
        let n = self.n_tokens as i32;
        if self.refill {
            (0..2).chain(5..n + 2).collect()
        } else {
            (0..n).collect()
        }
    }
}

const SEEDS: &[Seed] = &[
    Seed {
        file: "f16k-f16v-rows-1stream-seq0-6cells.bin",
        k_type: CacheType::F16,
        v_type: CacheType::F16,
        flash_attn: true,
        n_stream: 1,
        seq: 0,
        n_tokens: 6,
        refill: false,
    },
    Seed {
        file: "f16k-f16v-trans-1stream-seq0-7cells.bin",
        k_type: CacheType::F16,
        v_type: CacheType::F16,
        flash_attn: false,
        n_stream: 1,
        seq: 0,
        n_tokens: 7,
        refill: false,
    },
    Seed {
        file: "q8_0k-f16v-rows-1stream-seq0-8cells.bin",
        k_type: CacheType::Q8_0,
        v_type: CacheType::F16,
        flash_attn: true,
        n_stream: 1,
        seq: 0,
        n_tokens: 8,
        refill: false,
    },
    Seed {
        file: "q8_0k-f16v-trans-1stream-seq0-6cells.bin",
        k_type: CacheType::Q8_0,
        v_type: CacheType::F16,
        flash_attn: false,
        n_stream: 1,
        seq: 0,
        n_tokens: 6,
        refill: false,
    },
    Seed {
        file: "q8_0k-q8_0v-rows-1stream-seq0-6cells.bin",
        k_type: CacheType::Q8_0,
        v_type: CacheType::Q8_0,
        flash_attn: true,
        n_stream: 1,
        seq: 0,
        n_tokens: 6,
        refill: false,
    },
    Seed {
        file: "f16k-f16v-rows-2streams-seq1-6cells.bin",
        k_type: CacheType::F16,
        v_type: CacheType::F16,
        flash_attn: true,
        n_stream: 2,
        seq: 1,
        n_tokens: 6,
        refill: false,
    },
    Seed {
        file: "f16k-f16v-trans-2streams-seq0-5cells.bin",
        k_type: CacheType::F16,
        v_type: CacheType::F16,
        flash_attn: false,
        n_stream: 2,
        seq: 0,
        n_tokens: 5,
        refill: false,
    },
    Seed {
        file: "q8_0k-f16v-rows-3streams-seq1-6cells.bin",
        k_type: CacheType::Q8_0,
        v_type: CacheType::F16,
        flash_attn: true,
        n_stream: 3,
        seq: 1,
        n_tokens: 6,
        refill: false,
    },
    Seed {
        file: "f16k-f16v-trans-3streams-seq2-6cells.bin",
        k_type: CacheType::F16,
        v_type: CacheType::F16,
        flash_attn: false,
        n_stream: 3,
        seq: 2,
        n_tokens: 6,
        refill: false,
    },
    Seed {
        file: "f16k-f16v-rows-1stream-seq0-7cells-unordered.bin",
        k_type: CacheType::F16,
        v_type: CacheType::F16,
        flash_attn: true,
        n_stream: 1,
        seq: 0,
        n_tokens: 8,
        refill: true,
    },
];

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus")
}

/// The committed seeds, in [`SEEDS`] order.
fn corpus() -> &'static [Vec<u8>] {
    static C: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    C.get_or_init(|| {
        SEEDS
            .iter()
            .map(|s| {
                let path = corpus_dir().join(s.file);
                std::fs::read(&path).unwrap_or_else(|e| {
                    panic!(
                        "{}: {e}; regenerate with `cargo test --release --test state_blob_fuzz -- --ignored write_seed_corpus`",
                        path.display()
                    )
                })
            })
            .collect()
    })
}

/// Checks that `raw` is the blob `seed` describes and returns it parsed.
fn check_seed<'a>(seed: &Seed, raw: &'a [u8]) -> SeqState<'a> {
    let st = SeqState::parse(raw, &TINY).unwrap_or_else(|e| panic!("{}: {e}", seed.file));
    assert_eq!(st.shape(), &TINY);
    assert_eq!(st.seq_id(), seed.seq, "{}", seed.file);
    assert_eq!(st.n_stream(), seed.n_stream, "{}", seed.file);
    assert_eq!(st.stream_index() as i32, seed.seq, "{}", seed.file);
    assert_eq!(st.v_transposed(), !seed.flash_attn, "{}", seed.file);
    for layer in 0..TINY.n_layer {
        assert_eq!(st.k_type(layer), seed.k_type, "{} layer {layer}", seed.file);
        assert_eq!(st.v_type(layer), seed.v_type, "{} layer {layer}", seed.file);
    }
    let mut sorted = st.positions().to_vec();
    sorted.sort_unstable();
    assert_eq!(sorted, seed.positions(), "{}", seed.file);
    let in_order = st.positions().windows(2).all(|w| w[0] < w[1]);
    assert_eq!(in_order, !seed.refill, "{}: cells {:?}", seed.file, st.positions());
    // The file name says what the blob holds.
    let name = format!(
        "{}k-{}v-{}-{}stream{}-seq{}-{}cells{}.bin",
        st.k_type(0),
        st.v_type(0),
        if st.v_transposed() { "trans" } else { "rows" },
        st.n_stream(),
        if st.n_stream() > 1 { "s" } else { "" },
        st.seq_id(),
        st.n_cells(),
        if in_order { "" } else { "-unordered" },
    );
    assert_eq!(seed.file, name);
    let (fields, end) = walk_fields(raw);
    assert_eq!(end, raw.len(), "{}: the independent walk ends early", seed.file);
    assert!(fields.len() > 10);
    st
}

// ---------------------------------------------------------------------------
// Checks applied to every fuzz input
// ---------------------------------------------------------------------------

/// splitmix64, for deriving a selection from a proptest-drawn seed.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn below(state: &mut u64, n: usize) -> usize {
    (next(state) % n as u64) as usize
}

/// Bytes one cell occupies in the parsed blob (metadata, K and V of every layer).
fn cell_bytes(st: &SeqState<'_>) -> usize {
    12 + (0..st.shape().n_layer)
        .map(|l| {
            st.k_row_bytes(l)
                + match st.v_layout(l) {
                    VLayout::Rows { row_bytes } => row_bytes,
                    VLayout::Transposed { el_bytes, n_embd } => el_bytes * n_embd,
                }
        })
        .sum::<usize>()
}

/// Bytes of a blob that do not depend on the cell count: magic, sequence id,
/// stream count, one cell count per stream, `v_trans`, `n_layer`, and 12
/// bytes of type and size per layer for each of K and V.
fn fixed_bytes(st: &SeqState<'_>) -> usize {
    12 + 4 * st.n_stream() as usize + 8 + 24 * st.shape().n_layer
}

/// Counters that show the fuzzing explored both sides.
#[derive(Default)]
struct Tally {
    refused: AtomicUsize,
    accepted: AtomicUsize,
    rewritten: AtomicUsize,
}

impl Tally {
    fn get(&self) -> (usize, usize, usize) {
        (
            self.refused.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
            self.rewritten.load(Ordering::Relaxed),
        )
    }
}

/// Every property of the module documentation, for one input parsed as a
/// cache of a model of shape `shape`.
fn check_blob(raw: &[u8], shape: &ModelShape, sel_seed: u64, tally: &Tally) {
    let (parsed, bytes, took) = measured(|| SeqState::parse(raw, shape));
    assert!(
        bytes <= raw.len() + ALLOC_SLACK,
        "parse of {} bytes allocated {bytes} bytes ({parsed:?})",
        raw.len()
    );
    assert!(took < CALL_LIMIT, "parse of {} bytes took {took:?}", raw.len());
    let st = match parsed {
        Ok(st) => st,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    AlgoError::UnsupportedStateFormat(_)
                        | AlgoError::ShapeMismatch(_)
                        | AlgoError::UnsupportedCacheType { .. }
                ),
                "unexpected refusal {e:?}"
            );
            assert!(!e.to_string().is_empty());
            tally.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    tally.accepted.fetch_add(1, Ordering::Relaxed);
    if check_accepted(&st, raw, sel_seed) {
        tally.rewritten.fetch_add(1, Ordering::Relaxed);
    }
}

/// The checks of an accepted blob; returns whether it was rewritten (a blob
/// of one cell cannot be: no window leaves a prefix).
fn check_accepted(st: &SeqState<'_>, raw: &[u8], sel_seed: u64) -> bool {
    let shape = *st.shape();
    let n = st.n_cells();
    assert!(n >= 1);
    assert_eq!(st.positions().len(), n);
    let per_cell = cell_bytes(st);
    assert_eq!(
        raw.len(),
        fixed_bytes(st) + n * per_cell,
        "the accepted blob's length is not header + {n} cells × {per_cell} bytes"
    );
    // Every accessor stays in range on the last cell.
    for layer in 0..shape.n_layer {
        assert_eq!(st.k_row(layer, n - 1).len(), st.k_row_bytes(layer));
        for head in 0..shape.n_head_kv {
            assert_eq!(
                st.k_head_bytes(layer, n - 1, head).len(),
                st.k_row_bytes(layer) / shape.n_head_kv
            );
        }
        match st.v_layout(layer) {
            VLayout::Rows { row_bytes } => {
                assert_eq!(st.v_row(layer, n - 1).map(<[u8]>::len), Some(row_bytes));
                assert!(st.v_element(layer, 0).is_none());
            }
            VLayout::Transposed { el_bytes, n_embd } => {
                assert_eq!(st.v_element(layer, n_embd - 1).map(<[u8]>::len), Some(n * el_bytes));
                assert!(st.v_row(layer, 0).is_none());
            }
        }
    }
    if n < 2 {
        // No window can leave a prefix: the order (and so the rewrite) is refused.
        assert!(position_order(st.positions(), 1).is_err());
        return false;
    }

    let mut rng = sel_seed;
    let window = 1 + below(&mut rng, 4.min(n - 1));
    let order = position_order(st.positions(), window).expect("distinct positions order");
    let prefix = order.prefix_len;
    let k = below(&mut rng, prefix + 1);
    let mut kept = Vec::with_capacity(shape.n_layer * shape.n_head_kv * k);
    for _ in 0..shape.n_layer * shape.n_head_kv {
        let mut all: Vec<u32> = (0..prefix as u32).collect();
        for i in 0..k {
            let j = i + below(&mut rng, prefix - i);
            all.swap(i, j);
        }
        let mut row = all[..k].to_vec();
        row.sort_unstable();
        kept.extend(row);
    }
    let selection = Selection::new(shape.n_layer, shape.n_head_kv, k, prefix, kept).expect("valid selection");

    let (result, bytes, took) = measured(|| rewrite(st, &order, &selection));
    assert!(took < CALL_LIMIT, "rewrite of {} bytes took {took:?}", raw.len());
    // Never refused: the nominal positions `first_window - k ..` cannot leave
    // i32, because the prefix holds `prefix >= k` distinct positions, all
    // in `i32::MIN..first_window`.
    let out = result.unwrap_or_else(|e| panic!("an accepted blob with a valid selection was refused: {e}"));
    let positions = st.positions();
    let first_window = i64::from(positions[order.by_position[prefix]]);
    assert!(
        bytes <= 2 * raw.len() + ALLOC_SLACK,
        "rewrite of {} bytes allocated {bytes} bytes",
        raw.len()
    );
    // Exact size: the rewrite only drops whole cells.
    let n_out = window + k;
    assert_eq!(out.len(), raw.len() - (n - n_out) * per_cell);
    assert!(out.len() <= raw.len());

    let new = SeqState::parse(&out, &shape).unwrap_or_else(|e| panic!("the rewritten blob does not parse: {e}"));
    assert_eq!(new.n_cells(), n_out);
    assert_eq!(
        (new.seq_id(), new.n_stream(), new.stream_index(), new.v_transposed()),
        (st.seq_id(), st.n_stream(), st.stream_index(), st.v_transposed())
    );
    for layer in 0..shape.n_layer {
        assert_eq!(new.k_type(layer), st.k_type(layer));
        assert_eq!(new.v_type(layer), st.v_type(layer));
        assert_eq!(new.v_layout(layer), st.v_layout(layer));
    }
    // Everything before the stream (header, empty streams) and after it is kept.
    let before = 12 + 4 * st.stream_index() as usize;
    let after = 4 * (st.n_stream() - 1 - st.stream_index()) as usize;
    assert_eq!(out[..before], raw[..before]);
    assert_eq!(out[out.len() - after..], raw[raw.len() - after..]);

    // Positions: nominal just below the window, then the window's own.
    let expected_positions: Vec<i32> = (0..n_out)
        .map(|j| {
            if j < k {
                (first_window - k as i64 + j as i64) as i32
            } else {
                positions[order.by_position[prefix + j - k]]
            }
        })
        .collect();
    assert_eq!(new.positions(), &expected_positions[..]);

    // Every head of every output cell comes from the cell the selection names.
    let source = |layer: usize, head: usize, j: usize| {
        if j < k {
            order.by_position[selection.row(layer, head)[j] as usize]
        } else {
            order.by_position[prefix + j - k]
        }
    };
    for layer in 0..shape.n_layer {
        for head in 0..shape.n_head_kv {
            for j in 0..n_out {
                let c = source(layer, head, j);
                assert_eq!(new.k_head_bytes(layer, j, head), st.k_head_bytes(layer, c, head));
                assert_eq!(new.v_head_bytes(layer, j, head), st.v_head_bytes(layer, c, head));
            }
        }
        if let VLayout::Transposed { el_bytes, n_embd } = st.v_layout(layer) {
            for d in 0..n_embd {
                let src = st.v_element(layer, d).unwrap();
                let dst = new.v_element(layer, d).unwrap();
                for j in 0..n_out {
                    let c = source(layer, d / shape.head_dim_v, j);
                    assert_eq!(dst[j * el_bytes..][..el_bytes], src[c * el_bytes..][..el_bytes]);
                }
            }
        }
    }

    // The output is canonical: keeping all of its prefix changes nothing.
    if k > 0 {
        assert_eq!(
            identity_rewrite(&new, window),
            out,
            "the rewritten blob is not a fixed point"
        );
    }
    true
}

/// Rewrites `st` keeping every prefix cell, with a window of `window` cells.
fn identity_rewrite(st: &SeqState<'_>, window: usize) -> Vec<u8> {
    let order = position_order(st.positions(), window).unwrap();
    let all = Selection::uniform(
        st.shape().n_layer,
        st.shape().n_head_kv,
        order.prefix_len,
        (0..order.prefix_len as u32).collect(),
    )
    .unwrap();
    rewrite(st, &order, &all).unwrap()
}

// ---------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------

/// Offsets and widths (4 or 8 bytes) of every non-data field of a valid
/// blob (only ever called on the committed seeds), found by walking the
/// format without the parser, and the offset where the walk ended. Stops
/// early, returning what it found, where the blob is too short.
fn walk_fields(raw: &[u8]) -> (Vec<(usize, usize)>, usize) {
    let u32_at = |at: usize| {
        raw.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let u64_at = |at: usize| {
        raw.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize)
    };
    let mut fields = vec![(0, 4), (4, 4), (8, 4)];
    let mut at = 12;
    let Some(n_stream) = u32_at(8) else {
        return (fields, at);
    };
    for _ in 0..n_stream {
        let Some(cells) = u32_at(at) else {
            return (fields, at);
        };
        fields.push((at, 4));
        at += 4;
        if cells == 0 {
            continue;
        }
        for _ in 0..cells * 3 {
            fields.push((at, 4));
            at += 4;
        }
        let v_trans = u32_at(at) == Some(1);
        let Some(n_layer) = u32_at(at + 4) else {
            return (fields, at);
        };
        fields.extend([(at, 4), (at + 4, 4)]);
        at += 8;
        for _ in 0..n_layer {
            let Some(row) = u64_at(at + 4) else {
                return (fields, at);
            };
            fields.extend([(at, 4), (at + 4, 8)]);
            at += 12 + cells * row;
        }
        for _ in 0..n_layer {
            fields.push((at, 4));
            if v_trans {
                let (Some(el), Some(embd)) = (u32_at(at + 4), u32_at(at + 8)) else {
                    return (fields, at);
                };
                fields.extend([(at + 4, 4), (at + 8, 4)]);
                at += 12 + embd * cells * el;
            } else {
                let Some(row) = u64_at(at + 4) else {
                    return (fields, at);
                };
                fields.push((at + 4, 8));
                at += 12 + cells * row;
            }
        }
    }
    (fields, at)
}

/// Header fields of each seed, for the field-aware mutations.
fn seed_fields() -> &'static [Vec<(usize, usize)>] {
    static F: OnceLock<Vec<Vec<(usize, usize)>>> = OnceLock::new();
    F.get_or_init(|| corpus().iter().map(|raw| walk_fields(raw).0).collect())
}

/// Values written over a field: boundaries of the integer types, ggml type
/// ids, huge counts, and small changes of what is there.
#[derive(Debug, Clone)]
enum Value {
    Boundary(Index),
    TypeId(Index),
    Relative(i8),
    Any(u64),
}

const BOUNDARY: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    12,
    64,
    128,
    256,
    0x7f,
    0xff,
    0xffff,
    1 << 16,
    1 << 20,
    1 << 24,
    1 << 28,
    0x7fff_fffe,
    i32::MAX as u64,
    0x8000_0000,
    0xffff_fffe,
    u32::MAX as u64,
    1 << 32,
    (1 << 32) + 256,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

/// ggml type ids: the supported ones, and some that are not.
const TYPE_IDS: &[i32] = &[0, 1, 2, 3, 6, 7, 8, 20, 30, 4, 5, 9, 39, -1, i32::MIN];

impl Value {
    fn apply(&self, field: &mut [u8]) {
        let width = field.len();
        let old = if width == 4 {
            u64::from(u32::from_le_bytes(field.try_into().unwrap()))
        } else {
            u64::from_le_bytes(field.try_into().unwrap())
        };
        let new = match self {
            Value::Boundary(i) => *i.get(BOUNDARY),
            Value::TypeId(i) => i64::from(*i.get(TYPE_IDS)) as u64,
            Value::Relative(d) => old.wrapping_add(i64::from(*d) as u64),
            Value::Any(v) => *v,
        };
        field.copy_from_slice(&new.to_le_bytes()[..width]);
    }
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => any::<Index>().prop_map(Value::Boundary),
        1 => any::<Index>().prop_map(Value::TypeId),
        3 => (-4i8..=4).prop_map(Value::Relative),
        1 => any::<u64>().prop_map(Value::Any),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte with a non-zero mask.
    Flip { at: Index, mask: u8 },
    /// Cut the blob at some length.
    Truncate { len: Index },
    /// Insert random bytes.
    Insert { at: Index, bytes: Vec<u8> },
    /// Delete a run of bytes.
    Delete { at: Index, len: usize },
    /// Copy a run of the blob to another place (inserting it).
    Duplicate { from: Index, len: usize, to: Index },
    /// Keep a head of this blob and a tail of another seed, cut at arbitrary offsets.
    Splice { other: Index, cut: Index, other_cut: Index },
    /// As `Splice`, cut at field boundaries of both blobs.
    SpliceAtFields { other: Index, cut: Index, other_cut: Index },
    /// Overwrite one of the seed's header fields (4 or 8 bytes).
    Field { which: Index, value: Value },
    /// Overwrite 4 or 8 aligned bytes anywhere.
    Word { at: Index, wide: bool, value: Value },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        1 => any::<Index>().prop_map(|len| Mutation::Truncate { len }),
        1 => (any::<Index>(), vec(any::<u8>(), 1..=16)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<Index>(), prop_oneof![1usize..=16, 1usize..=2048])
            .prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => (any::<Index>(), prop_oneof![1usize..=16, 1usize..=2048], any::<Index>())
            .prop_map(|(from, len, to)| Mutation::Duplicate { from, len, to }),
        1 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(other, cut, other_cut)| Mutation::Splice { other, cut, other_cut }),
        2 => (any::<Index>(), any::<Index>(), any::<Index>())
            .prop_map(|(other, cut, other_cut)| Mutation::SpliceAtFields { other, cut, other_cut }),
        6 => (any::<Index>(), value()).prop_map(|(which, value)| Mutation::Field { which, value }),
        2 => (any::<Index>(), any::<bool>(), value()).prop_map(|(at, wide, value)| Mutation::Word { at, wide, value }),
    ]
}

/// Applies `m` to `blob`, a mutated copy of seed `seed`.
fn apply(m: &Mutation, blob: &mut Vec<u8>, seed: usize) {
    let len = blob.len();
    match m {
        Mutation::Flip { at, mask } => {
            if len > 0 {
                blob[at.index(len)] ^= mask;
            }
        }
        Mutation::Truncate { len: l } => blob.truncate(l.index(len + 1)),
        Mutation::Insert { at, bytes } => {
            let at = at.index(len + 1);
            blob.splice(at..at, bytes.iter().copied());
        }
        Mutation::Delete { at, len: n } => {
            if len > 0 {
                let at = at.index(len);
                blob.drain(at..(at + n).min(len));
            }
        }
        Mutation::Duplicate { from, len: n, to } => {
            if len > 0 {
                let from = from.index(len);
                let run = blob[from..(from + n).min(len)].to_vec();
                let to = to.index(len + 1);
                blob.splice(to..to, run);
            }
        }
        Mutation::Splice { other, cut, other_cut } => {
            let other = other.get(corpus());
            blob.truncate(cut.index(len + 1));
            blob.extend_from_slice(&other[other_cut.index(other.len() + 1)..]);
        }
        Mutation::SpliceAtFields { other, cut, other_cut } => {
            let o = other.index(SEEDS.len());
            let cut = cut.get(&seed_fields()[seed]).0.min(len);
            let other_cut = other_cut.get(&seed_fields()[o]).0;
            blob.truncate(cut);
            blob.extend_from_slice(&corpus()[o][other_cut..]);
        }
        Mutation::Field { which, value } => {
            let (at, width) = *which.get(&seed_fields()[seed]);
            if at + width <= len {
                value.apply(&mut blob[at..at + width]);
            }
        }
        Mutation::Word { at, wide, value } => {
            let width = if *wide { 8 } else { 4 };
            if len >= width {
                let at = at.index(len - width + 1) & !3;
                value.apply(&mut blob[at..at + width]);
            }
        }
    }
}

/// A deterministic runner: fixed RNG seed and case count, no persistence.
///
/// For a longer local campaign, `SNAPKV_FUZZ_CASES=<n>` replaces the case
/// count and `SNAPKV_FUZZ_SEED=<u64>` the RNG seed
/// (CI sets neither, so its runs are the same every time).
fn runner(cases: u32, rng_seed: u64) -> TestRunner {
    let env = |name: &str| std::env::var(name).ok().map(|v| v.parse::<u64>().expect(name));
    let cases = env("SNAPKV_FUZZ_CASES").map_or(cases, |c| u32::try_from(c).expect("SNAPKV_FUZZ_CASES"));
    let rng_seed = env("SNAPKV_FUZZ_SEED").unwrap_or(rng_seed);
    TestRunner::new(ProptestConfig {
        cases,
        rng_algorithm: RngAlgorithm::ChaCha,
        rng_seed: RngSeed::Fixed(rng_seed),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    })
}

fn run_fuzz<S: Strategy>(
    name: &str,
    cases: u32,
    rng_seed: u64,
    strategy: S,
    check: impl Fn(S::Value, &Tally),
) -> (usize, usize, usize) {
    let tally = Tally::default();
    let start = Instant::now();
    let mut runner = runner(cases, rng_seed);
    let cases = runner.config().cases;
    let result = runner.run(&strategy, |input| {
        check(input, &tally);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    let counts = tally.get();
    eprintln!(
        "{name}: {cases} cases in {:?}: (refused, accepted, rewritten) = {counts:?} (shrinking included)",
        start.elapsed()
    );
    counts
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn mutated_seeds_never_break_parse_or_rewrite() {
    let strategy = (0..SEEDS.len(), vec(mutation(), 1..=4), shape(), any::<u64>());
    let (refused, accepted, rewritten) = run_fuzz(
        "mutations",
        50_000,
        0x5eed_f022,
        strategy,
        |(seed, mutations, shape, sel_seed), tally| {
            let mut blob = corpus()[seed].clone();
            for m in &mutations {
                apply(m, &mut blob, seed);
            }
            check_blob(&blob, shape, sel_seed, tally);
        },
    );
    // Both outcomes must be common, or the mutations are too destructive
    // (nothing reaches the rewrite) or too weak (nothing is refused).
    let total = refused + accepted;
    assert!(
        refused * 2 >= total,
        "only {refused} of {total} mutated blobs were refused"
    );
    assert!(
        accepted * 20 >= total,
        "only {accepted} of {total} mutated blobs were accepted"
    );
    assert!(
        rewritten * 20 >= total,
        "only {rewritten} of {total} mutated blobs were rewritten"
    );
}

#[test]
fn arbitrary_bytes_never_break_parse() {
    let magic = STATE_SEQ_MAGIC.to_le_bytes().to_vec();
    let words = prop_oneof![
        Just(0u32),
        Just(1u32),
        Just(2u32),
        0u32..16,
        Just(64u32),
        Just(128u32),
        Just(256u32),
        Just(u32::MAX),
        any::<u32>()
    ];
    let strategy = (
        prop_oneof![
            // Anything at all.
            vec(any::<u8>(), 0..512),
            // Past the magic.
            vec(any::<u8>(), 0..512).prop_map(move |tail| [magic.clone(), tail].concat()),
            // Past the magic, then little-endian words from a small alphabet.
            vec(words, 0..128).prop_map(|w| {
                let mut b = STATE_SEQ_MAGIC.to_le_bytes().to_vec();
                b.extend(w.iter().flat_map(|x| x.to_le_bytes()));
                b
            }),
        ],
        shape(),
        any::<u64>(),
    );
    let (refused, _, _) = run_fuzz(
        "arbitrary bytes",
        10_000,
        0xa7b1_7a27,
        strategy,
        |(blob, shape, sel_seed), tally| {
            check_blob(&blob, shape, sel_seed, tally);
        },
    );
    // Random bytes essentially never form a valid blob (every case still ran
    // the full checks on what parsing returned).
    assert!(refused > 0);
}

#[test]
fn committed_seeds_are_what_their_names_say() {
    assert_eq!(corpus().len(), SEEDS.len());
    let total: usize = corpus().iter().map(Vec::len).sum();
    assert!(total < 200 * 1024, "the corpus has grown to {total} bytes");
    for (seed, raw) in SEEDS.iter().zip(corpus()) {
        let st = check_seed(seed, raw);
        assert_eq!(raw.len(), fixed_bytes(&st) + st.n_cells() * cell_bytes(&st));
        // The fuzz's own checks, with a few selections, under every shape.
        for shape in &SHAPES {
            let tally = Tally::default();
            for sel_seed in 0..8 {
                check_blob(raw, shape, sel_seed, &tally);
            }
            let q8_split = shape.head_dim_k % 32 != 0 && seed.k_type == CacheType::Q8_0;
            let expected = if q8_split { (8, 0, 0) } else { (0, 8, 8) };
            assert_eq!(tally.get(), expected, "{} as {shape:?}", seed.file);
        }
    }
}

/// Keeping every prefix cell rewrites the cells into position order and
/// gives the prefix the consecutive positions just below the window. For
/// seeds written in position order with positions `0..n`, that is the
/// input byte for byte; for the refilled seed (cells out of order,
/// positions 0, 1, 5, 6, ...) it is a reordering with renumbered positions.
#[test]
fn keeping_everything_round_trips_every_seed() {
    for (seed, raw) in SEEDS.iter().zip(corpus()) {
        let st = check_seed(seed, raw);
        let n = st.n_cells();
        for window in 1..=4.min(n - 1) {
            let out = identity_rewrite(&st, window);
            if !seed.refill {
                assert!(
                    out == *raw,
                    "{} window {window}: identity rewrite changed the blob",
                    seed.file
                );
                continue;
            }
            assert_eq!(out.len(), raw.len(), "{}", seed.file);
            assert!(out != *raw, "{}: cells out of order must be reordered", seed.file);
            let new = SeqState::parse(&out, &TINY).unwrap();
            // Positions: consecutive, ending at the highest (the window here is
            // contiguous, so the renumbered prefix joins it).
            let max = *seed.positions().last().unwrap();
            let expected: Vec<i32> = (max + 1 - n as i32..=max).collect();
            assert_eq!(new.positions(), &expected[..], "{} window {window}", seed.file);
            // Data: output cell j is the input cell of the j-th smallest position.
            let order = position_order(st.positions(), window).unwrap();
            for layer in 0..TINY.n_layer {
                for (j, &c) in order.by_position.iter().enumerate() {
                    assert_eq!(new.k_row(layer, j), st.k_row(layer, c));
                    assert_eq!(new.v_row(layer, j), st.v_row(layer, c));
                }
            }
            assert_eq!(identity_rewrite(&new, window), out, "{}: not a fixed point", seed.file);
        }
    }
}

/// The counting allocator sees what it must: without it the bounds above
/// would hold vacuously.
#[test]
fn the_allocation_counter_counts() {
    let (v, bytes, _) = measured(|| vec![0u8; 100_000]);
    assert_eq!(v.len(), 100_000);
    assert!(bytes >= 100_000, "counted {bytes}");
    let raw = &corpus()[0];
    let (st, bytes, _) = measured(|| SeqState::parse(raw, &TINY).unwrap());
    // The parser keeps one position per cell, so it allocates something.
    assert!(bytes >= 4 * st.n_cells(), "counted {bytes}");
}

/// Writes `tests/fuzz-corpus/`: one real blob per [`SEEDS`] entry, made by
/// llama.cpp through this crate with the default tiny model.
#[test]
#[ignore = "regenerates the committed seed corpus; run on purpose"]
fn write_seed_corpus() {
    use snapkv::compress::model_shape;
    use snapkv::{init_backend, Context, ContextParams, FlashAttention, Model, ModelParams};
    use snapkv_testing::{tiny_model_path, TinyModelSpec};

    let path = tiny_model_path(&TinyModelSpec::default()).expect("tiny model written");
    let model = Model::load(init_backend(), &path, &ModelParams::default()).expect("tiny model loads");
    assert_eq!(model_shape(&model), TINY, "the default tiny model's shape changed");
    let text = "the grass is green and the sky is blue over the hills and the river flows to the sea";
    let tokens = model.tokenize(text, true, false).unwrap();
    assert!(tokens.len() >= 16, "{} tokens", tokens.len());
    std::fs::create_dir_all(corpus_dir()).unwrap();
    for seed in SEEDS {
        let params = ContextParams {
            n_ctx: 256,
            n_batch: 64,
            n_ubatch: 64,
            n_threads: 2,
            n_threads_batch: 2,
            flash_attn: if seed.flash_attn {
                FlashAttention::On
            } else {
                FlashAttention::Off
            },
            type_k: seed.k_type,
            type_v: seed.v_type,
            n_seq_max: seed.n_stream,
            kv_unified: false,
            ..ContextParams::default()
        };
        let mut ctx = Context::new(&model, &params).unwrap_or_else(|e| panic!("{}: {e}", seed.file));
        // Every other sequence holds cells too, so that its stream is non-empty
        // in the context while empty in this sequence's blob.
        for s in 0..seed.n_stream as i32 {
            let n = if s == seed.seq {
                seed.n_tokens
            } else {
                seed.n_tokens + 1 + s as usize
            };
            ctx.decode_tokens(s, &tokens[s as usize..s as usize + n], 0, true)
                .unwrap();
        }
        if seed.refill {
            let n = seed.n_tokens;
            assert!(ctx.seq_rm(seed.seq, 2, 5));
            ctx.decode_tokens(seed.seq, &tokens[n..n + 2], n as i32, true).unwrap();
        }
        let blob = ctx.state_seq_get(seed.seq).unwrap();
        check_seed(seed, &blob);
        std::fs::write(corpus_dir().join(seed.file), &blob).unwrap();
        eprintln!("{}: {} bytes", seed.file, blob.len());
    }
}
