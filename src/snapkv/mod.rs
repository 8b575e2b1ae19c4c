//! The SnapKV algorithm over plain data: configuration, the llama.cpp
//! sequence-state blob (parse and per-head rewrite), window scoring,
//! pooling and GQA aggregation, and the selection methods.
//!
//! Nothing here touches llama.cpp: every function works on byte slices and
//! f32 buffers, so the whole pipeline is unit-testable without a model.
//!
//! Pipeline: [`state_blob::SeqState::parse`] → [`scores::position_order`] →
//! votes ([`scores::add_votes_from_softmax`] or
//! [`scores::add_votes_from_queries`]) → [`scores::pool_and_aggregate`] →
//! [`select::Selector::select`] → [`compact::rewrite`].
#![forbid(unsafe_code)]

pub(crate) mod alloc;
pub mod compact;
pub mod config;
pub mod error;
pub mod ggml_type;
pub mod hadamard;
pub mod keys;
pub mod scores;
pub mod select;
pub mod state_blob;
#[doc(hidden)]
pub mod synthetic;

pub use compact::rewrite;
pub use config::{
    Budget, PoolAlign, Pooling, Preset, QueryAggregation, SnapKvConfig, ValueWeighting, MAX_DRAFT, MAX_KERNEL,
    MAX_WINDOW,
};
pub use error::AlgoError;
pub use ggml_type::{decode_f32_row, CacheType};
pub use keys::{gather_keys, value_norms, window_key_distance, QuantizedRowDecoder};
pub use scores::{
    add_votes_from_queries, add_votes_from_softmax, key_dissimilarity, pool_and_aggregate, position_order,
    weight_votes_by_value_norms, CellOrder, HeadScores, QueryScorer, Votes,
};
pub use select::{
    selector_by_name, KeptPositions, KeyDiffSelector, RandomSelector, ReconstructSelector, ScoreBasis, Selection,
    SelectionShape, Selector, SharedAllLayersSelector, SharedPerLayerSelector, SnapKvSelector, StreamingSelector,
    SELECTOR_NAMES,
};
pub use state_blob::{ModelShape, SeqState, StateFormat, VLayout, STATE_SEQ_MAGIC};
