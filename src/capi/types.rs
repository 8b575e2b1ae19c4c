//! The C-visible types of snapkv.h, their conversions to the safe API, and
//! the layout table that the header's drift test checks.

use std::ffi::CStr;
use std::marker::{PhantomData, PhantomPinned};
use std::mem::{offset_of, size_of};

use super::status::{Failure, Status};
use crate::compress::{CompressionStats, ScoreSource};
use crate::snapkv::{Budget, PoolAlign, Pooling, Preset, QueryAggregation, SnapKvConfig, ValueWeighting};

/// `snapkv_observer`: opaque in C; in Rust the pointer is an
/// `Arc<WindowObserver>` turned into a raw pointer (see `ptr.rs`).
#[repr(C)]
pub struct SnapkvObserver {
    _opaque: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `struct llama_context` as the C ABI sees it: opaque.
#[repr(C)]
pub struct LlamaContext {
    _opaque: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `struct llama_context_params` as the C ABI's signatures see it: only
/// `ptr.rs` looks inside (as the bound llama.h type).
#[repr(C)]
pub struct LlamaContextParams {
    _opaque: [u8; 0],
    _marker: PhantomData<(*mut u8, PhantomPinned)>,
}

/// `SNAPKV_POOLING_MAX`.
pub const POOLING_MAX: i32 = 0;
/// `SNAPKV_POOLING_AVG`.
pub const POOLING_AVG: i32 = 1;
/// `SNAPKV_POOL_ALIGN_CENTERED`.
pub const POOL_ALIGN_CENTERED: i32 = 0;
/// `SNAPKV_POOL_ALIGN_TRAILING`.
pub const POOL_ALIGN_TRAILING: i32 = 1;
/// `SNAPKV_POOL_ALIGN_FORWARD`.
pub const POOL_ALIGN_FORWARD: i32 = 2;
/// `SNAPKV_VALUE_WEIGHTING_OFF`.
pub const VALUE_WEIGHTING_OFF: i32 = 0;
/// `SNAPKV_VALUE_WEIGHTING_NORM`.
pub const VALUE_WEIGHTING_NORM: i32 = 1;
/// `SNAPKV_QUERY_AGGREGATION_SUM`.
pub const QUERY_AGGREGATION_SUM: i32 = 0;
/// `SNAPKV_QUERY_AGGREGATION_MAX`.
pub const QUERY_AGGREGATION_MAX: i32 = 1;
/// `SNAPKV_PRESET_DEFAULT`.
pub const PRESET_DEFAULT: i32 = 0;
/// `SNAPKV_PRESET_FACTS`.
pub const PRESET_FACTS: i32 = 1;
/// `SNAPKV_PRESET_RECONSTRUCT`.
pub const PRESET_RECONSTRUCT: i32 = 2;
/// `SNAPKV_SCORE_NONE`.
pub const SCORE_NONE: i32 = 0;
/// `SNAPKV_SCORE_SOFTMAX`.
pub const SCORE_SOFTMAX: i32 = 1;
/// `SNAPKV_SCORE_QUERY_KEY`.
pub const SCORE_QUERY_KEY: i32 = 2;
/// `SNAPKV_SCORE_KEYS`.
pub const SCORE_KEYS: i32 = 3;
/// `SNAPKV_SCORE_RECONSTRUCTION`.
pub const SCORE_RECONSTRUCTION: i32 = 4;

/// `SNAPKV_METHOD_SNAPKV`.
pub const METHOD_SNAPKV: i32 = 0;
/// `SNAPKV_METHOD_KEYDIFF`.
pub const METHOD_KEYDIFF: i32 = 1;
/// `SNAPKV_METHOD_RECONSTRUCT`.
pub const METHOD_RECONSTRUCT: i32 = 2;

/// Sizes above this are refused as uninitialised structs rather than read.
const MAX_STRUCT_SIZE: u32 = 4096;

/// `snapkv_params`: SnapKV parameters. Fill with `snapkv_params_default`;
/// validated on every use.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SnapkvParams {
    /// `sizeof(snapkv_params)` of the caller's header (forward compatibility).
    pub size: u32,
    /// Observation window in tokens.
    pub window: u32,
    /// Cells kept per KV head, window included; 0 when `budget_fraction` is used.
    pub budget: u32,
    /// Pooling kernel size (odd; 1 disables pooling).
    pub kernel: u32,
    /// Fraction of the prompt kept, in (0, 1]; 0 when `budget` is used.
    pub budget_fraction: f64,
    /// `enum snapkv_pooling`.
    pub pooling: i32,
    /// Must be 0. It held the GQA aggregation option, retired without a
    /// measured win (the query heads of a KV head vote by their mean); the
    /// field keeps the layout of callers compiled against older headers.
    pub reserved: i32,
    /// `enum snapkv_pool_align`.
    pub pool_align: i32,
    /// Positions a vote reaches forward with `SNAPKV_POOL_ALIGN_FORWARD`
    /// (below `kernel`); ignored with the other alignments. It fills what
    /// was the struct's tail padding, so the size did not change.
    pub pool_forward: u32,
    /// `enum snapkv_value_weighting`. Added after the 40-byte layout: a
    /// caller compiled against that header (`size` 40) gets the default,
    /// off, which is also this field's zero.
    pub value_weighting: i32,
    /// `enum snapkv_query_aggregation`. It fills what was the struct's tail
    /// padding, so the size did not change; its zero is the default, sum.
    pub query_aggregation: i32,
    /// Answer tokens drafted on the cache compressed once, whose queries
    /// vote in a second selection ([`SnapKvConfig::draft`]). Appended after
    /// the 48-byte layout: a caller compiled against that header gets the
    /// default, 0 (no draft), which is also this field's zero. 64 bits wide
    /// so that the struct has no padding.
    pub draft_tokens: u64,
    /// `enum snapkv_method`: the selection method (snapkv, keydiff, reconstruct).
    /// Appended after the 56-byte layout: a caller compiled against that
    /// header gets the default, SnapKV, which is also this field's zero.
    pub method: i32,
    /// Must be 0: keeps the struct free of padding (whose bytes a caller's
    /// compiler need not zero), for a later field.
    pub spare: u32,
}

/// `sizeof(snapkv_params)` before `value_weighting` was appended: the
/// smallest size a caller may pass.
const PARAMS_MIN_SIZE: u32 = offset_of!(SnapkvParams, value_weighting) as u32;

impl Default for SnapkvParams {
    /// The defaults of [`SnapKvConfig::default`]: they live there only.
    fn default() -> Self {
        SnapkvParams::from_config(&SnapKvConfig::default())
    }
}

fn invalid(msg: String) -> Failure {
    Failure::new(Status::InvalidParams, msg)
}

/// A parameter enum of the safe API and the `int` enumerators that stand
/// for its variants in snapkv.h.
trait CEnum: Sized {
    /// The enumerator of this variant.
    fn to_c(self) -> i32;

    /// The variant of an enumerator the caller put in the field `field`.
    ///
    /// # Errors
    /// [`Status::InvalidParams`] naming the field, the value and the
    /// enumerators it may hold, for any other value.
    fn from_c(field: &str, value: i32) -> Result<Self, Failure>;
}

/// Implements [`CEnum`] from `Variant <=> CONSTANT` pairs: both directions
/// are exhaustive matches, so a variant without an enumerator does not
/// compile, and an error lists the constants by their names in snapkv.h.
macro_rules! c_enum {
    ($ty:ident { $($variant:ident <=> $value:ident),+ $(,)? }) => {
        impl CEnum for $ty {
            fn to_c(self) -> i32 {
                match self {
                    $($ty::$variant => $value,)+
                }
            }

            fn from_c(field: &str, value: i32) -> Result<Self, Failure> {
                match value {
                    $($value => Ok($ty::$variant),)+
                    other => Err(invalid(format!(
                        "{field}: unknown value {other} ({})",
                        [$(concat!("SNAPKV_", stringify!($value))),+].join(" or ")
                    ))),
                }
            }
        }
    };
}

c_enum!(Pooling { Max <=> POOLING_MAX, Avg <=> POOLING_AVG });
c_enum!(ValueWeighting { Off <=> VALUE_WEIGHTING_OFF, Norm <=> VALUE_WEIGHTING_NORM });
c_enum!(QueryAggregation { Sum <=> QUERY_AGGREGATION_SUM, Max <=> QUERY_AGGREGATION_MAX });
c_enum!(Preset {
    Default <=> PRESET_DEFAULT,
    Facts <=> PRESET_FACTS,
    Reconstruct <=> PRESET_RECONSTRUCT,
});

/// The [`Preset`] an `enum snapkv_preset` value names.
///
/// # Errors
/// [`Status::InvalidParams`] naming the enumerators, for any other value.
pub(crate) fn preset_from_c(value: i32) -> Result<Preset, Failure> {
    Preset::from_c("preset", value)
}

impl SnapkvParams {
    /// The C struct of a configuration (`size` set to this header's): the
    /// inverse of [`SnapkvParams::to_config`].
    pub(crate) fn from_config(c: &SnapKvConfig) -> Self {
        let (budget, budget_fraction) = match c.budget {
            Budget::Cells(n) => (u32::try_from(n).unwrap_or(u32::MAX), 0.0),
            Budget::Fraction(f) => (0, f),
        };
        SnapkvParams {
            size: size_of::<SnapkvParams>() as u32,
            window: c.window as u32,
            budget,
            kernel: c.kernel as u32,
            budget_fraction,
            pooling: c.pooling.to_c(),
            reserved: 0,
            pool_align: match c.pool_align {
                PoolAlign::Centered => POOL_ALIGN_CENTERED,
                PoolAlign::Trailing => POOL_ALIGN_TRAILING,
                PoolAlign::Forward(_) => POOL_ALIGN_FORWARD,
            },
            pool_forward: match c.pool_align {
                PoolAlign::Forward(n) => u32::try_from(n).unwrap_or(u32::MAX),
                PoolAlign::Centered | PoolAlign::Trailing => 0,
            },
            value_weighting: c.value_weighting.to_c(),
            query_aggregation: c.queries.to_c(),
            draft_tokens: c.draft as u64,
            method: METHOD_SNAPKV,
            spare: 0,
        }
    }

    /// The name of the selection method `method` asks for
    /// ([`Compressor::with_method`](crate::Compressor::with_method)).
    ///
    /// # Errors
    /// `SNAPKV_ERR_INVALID_PARAMS` for an unknown method or a non-zero `spare`.
    pub(crate) fn method_name(&self) -> Result<&'static str, Failure> {
        if self.spare != 0 {
            return Err(invalid(format!("spare: must be 0, got {}", self.spare)));
        }
        match self.method {
            METHOD_SNAPKV => Ok("snapkv"),
            METHOD_KEYDIFF => Ok("keydiff"),
            METHOD_RECONSTRUCT => Ok("reconstruct"),
            other => Err(invalid(format!(
                "method: unknown value {other} (SNAPKV_METHOD_SNAPKV, _KEYDIFF or _RECONSTRUCT)"
            ))),
        }
    }

    /// Checks the `size` field a caller set; returns how many bytes of the
    /// caller's struct may be read (its size) when it is acceptable: at
    /// least the layout before `value_weighting` (fields past a smaller
    /// caller's struct take their defaults).
    pub(crate) fn check_size(size: u32) -> Result<usize, Failure> {
        let ours = size_of::<SnapkvParams>() as u32;
        if !(PARAMS_MIN_SIZE..=MAX_STRUCT_SIZE).contains(&size) {
            return Err(invalid(format!(
                "snapkv_params.size is {size}, expected {ours}: initialise the struct with snapkv_params_default()"
            )));
        }
        Ok(size as usize)
    }

    /// Bytes a newer caller appended past the fields this library knows
    /// must be zero (the fields' "not set" value): a non-zero one asks for
    /// something this version cannot do.
    pub(crate) fn check_tail(tail: &[u8]) -> Result<(), Failure> {
        match tail.iter().position(|&b| b != 0) {
            None => Ok(()),
            Some(i) => Err(invalid(format!(
                "snapkv_params sets a field this library does not know (byte {} of a {}-byte struct): \
                 it was built for an older snapkv.h",
                size_of::<SnapkvParams>() + i,
                size_of::<SnapkvParams>() + tail.len()
            ))),
        }
    }

    /// Converts to the safe API's configuration and validates it.
    pub(crate) fn to_config(self) -> Result<SnapKvConfig, Failure> {
        let pooling = Pooling::from_c("pooling", self.pooling)?;
        // The retired GQA aggregation's slot: 0 was its default (mean, what
        // the library does); any other value asked for what it no longer does.
        if self.reserved != 0 {
            return Err(invalid(format!(
                "reserved: must be 0, got {} (the field held the retired GQA aggregation; \
                 the query heads of a KV head vote by their mean)",
                self.reserved
            )));
        }
        // pool_forward means something only with the forward alignment: a
        // caller who switches the defaults to centred need not clear it.
        let pool_align = match self.pool_align {
            POOL_ALIGN_FORWARD => PoolAlign::Forward(self.pool_forward as usize),
            POOL_ALIGN_CENTERED => PoolAlign::Centered,
            POOL_ALIGN_TRAILING => PoolAlign::Trailing,
            other => {
                return Err(invalid(format!(
                    "pool_align: unknown value {other} (SNAPKV_POOL_ALIGN_CENTERED, _TRAILING or _FORWARD)"
                )))
            }
        };
        let budget = match (self.budget, self.budget_fraction) {
            (0, 0.0) => {
                return Err(invalid(
                    "budget: set either budget (cells per KV head) or budget_fraction, both are 0".into(),
                ))
            }
            (cells, 0.0) => Budget::Cells(cells as usize),
            (0, f) => Budget::Fraction(f),
            (cells, f) => {
                return Err(invalid(format!(
                    "budget: set either budget ({cells}) or budget_fraction ({f}), not both (set the other to 0)"
                )))
            }
        };
        let value_weighting = ValueWeighting::from_c("value_weighting", self.value_weighting)?;
        let queries = QueryAggregation::from_c("query_aggregation", self.query_aggregation)?;
        // Every field listed: a new parameter must be exposed to C too.
        let config = SnapKvConfig {
            window: self.window as usize,
            budget,
            kernel: self.kernel as usize,
            pooling,
            pool_align,
            value_weighting,
            queries,
            draft: usize::try_from(self.draft_tokens).unwrap_or(usize::MAX),
        };
        config.validate().map_err(|e| invalid(e.to_string()))?;
        Ok(config)
    }
}

/// `snapkv_stats`: what a compression did, written only on success.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SnapkvStats {
    /// `sizeof(snapkv_stats)` of the caller's header; set by the caller.
    pub size: u32,
    /// Whether the cache was rewritten (false: the prompt fit the budget).
    pub compressed: bool,
    /// `enum snapkv_score_source`.
    pub score_source: i32,
    /// Cells of the sequence before.
    pub cells_before: u64,
    /// Cells after.
    pub cells_after: u64,
    /// Bytes of the sequence's state before (0 when nothing was compressed).
    pub bytes_before: u64,
    /// Bytes after.
    pub bytes_after: u64,
    /// Seconds evaluating the prompt before the window (`snapkv_prefill`).
    pub prefill_seconds: f64,
    /// Seconds evaluating the observation window.
    pub window_seconds: f64,
    /// Seconds the observer spent copying tensors (part of `window_seconds`).
    pub observe_seconds: f64,
    /// Seconds scoring.
    pub score_seconds: f64,
    /// Seconds selecting.
    pub select_seconds: f64,
    /// Seconds reading, rewriting and writing the sequence state (the
    /// re-evaluating hook: and its snapshot for restoring on failure).
    pub compact_seconds: f64,
    /// Answer tokens drafted (0 without a draft). Appended after the
    /// 96-byte layout, like `draft_seconds`: a caller compiled against that
    /// header gets neither.
    pub draft_tokens: u64,
    /// Seconds decoding the draft and the prompt's last token again.
    pub draft_seconds: f64,
}

/// `sizeof(snapkv_stats)` before `draft_tokens` was appended: the smallest
/// size a caller may pass.
const STATS_MIN_SIZE: usize = offset_of!(SnapkvStats, draft_tokens);

impl SnapkvStats {
    /// Checks the `size` field a caller set; returns the bytes that may be
    /// written (the smaller of the caller's and ours).
    pub(crate) fn check_size(size: u32) -> Result<usize, Failure> {
        let ours = size_of::<SnapkvStats>();
        if (size as usize) < STATS_MIN_SIZE || size > MAX_STRUCT_SIZE {
            return Err(Failure::new(
                Status::InvalidArgument,
                format!("snapkv_stats.size is {size}, expected {ours}: set it to sizeof(snapkv_stats)"),
            ));
        }
        Ok(ours.min(size as usize))
    }
}

impl From<&CompressionStats> for SnapkvStats {
    fn from(s: &CompressionStats) -> Self {
        SnapkvStats {
            size: size_of::<SnapkvStats>() as u32,
            compressed: s.compressed,
            score_source: match s.score_source {
                ScoreSource::None => SCORE_NONE,
                ScoreSource::Softmax => SCORE_SOFTMAX,
                ScoreSource::QueryKey => SCORE_QUERY_KEY,
                ScoreSource::Keys => SCORE_KEYS,
                ScoreSource::Reconstruction => SCORE_RECONSTRUCTION,
            },
            cells_before: s.cells_before as u64,
            cells_after: s.cells_after as u64,
            bytes_before: s.bytes_before as u64,
            bytes_after: s.bytes_after as u64,
            prefill_seconds: s.prefill_seconds,
            window_seconds: s.window_seconds,
            observe_seconds: s.observe_seconds,
            score_seconds: s.score_seconds,
            select_seconds: s.select_seconds,
            compact_seconds: s.compact_seconds,
            draft_tokens: s.draft_tokens as u64,
            draft_seconds: s.draft_seconds,
        }
    }
}

/// One entry of the layout table: a name as the C test spells it
/// (`sizeof(snapkv_params)`, `offsetof(snapkv_params, window)`,
/// `SNAPKV_OK`, ...) and its value in this library.
#[derive(Debug, Clone, Copy)]
pub struct AbiItem {
    /// The name, NUL-terminated.
    pub name: &'static CStr,
    /// The value.
    pub value: i64,
}

macro_rules! abi_size {
    ($t:ty, $c:literal) => {
        AbiItem {
            name: match CStr::from_bytes_with_nul(concat!("sizeof(", $c, ")\0").as_bytes()) {
                Ok(s) => s,
                Err(_) => unreachable!(),
            },
            value: size_of::<$t>() as i64,
        }
    };
}

macro_rules! abi_offsets {
    ($t:ty, $c:literal, $($f:ident),+) => {
        [$(AbiItem {
            name: match CStr::from_bytes_with_nul(concat!("offsetof(", $c, ", ", stringify!($f), ")\0").as_bytes()) {
                Ok(s) => s,
                Err(_) => unreachable!(),
            },
            value: offset_of!($t, $f) as i64,
        }),+]
    };
}

macro_rules! abi_const {
    ($c:literal, $v:expr) => {
        AbiItem {
            name: match CStr::from_bytes_with_nul(concat!($c, "\0").as_bytes()) {
                Ok(s) => s,
                Err(_) => unreachable!(),
            },
            value: $v as i64,
        }
    };
}

/// Everything the header states about layout and constants, as this
/// library sees it. The C drift test checks every entry against the header
/// and fails on entries it does not know.
pub fn abi_items() -> Vec<AbiItem> {
    let mut items = vec![
        abi_size!(SnapkvParams, "snapkv_params"),
        abi_size!(SnapkvStats, "snapkv_stats"),
        abi_size!(crate::llama::Token, "llama_token"),
        abi_size!(crate::llama::SeqId, "llama_seq_id"),
        abi_size!(crate::sys::llama_context_params, "struct llama_context_params"),
        abi_const!("SNAPKV_POOLING_MAX", POOLING_MAX),
        abi_const!("SNAPKV_POOLING_AVG", POOLING_AVG),
        abi_const!("SNAPKV_POOL_ALIGN_CENTERED", POOL_ALIGN_CENTERED),
        abi_const!("SNAPKV_POOL_ALIGN_TRAILING", POOL_ALIGN_TRAILING),
        abi_const!("SNAPKV_POOL_ALIGN_FORWARD", POOL_ALIGN_FORWARD),
        abi_const!("SNAPKV_VALUE_WEIGHTING_OFF", VALUE_WEIGHTING_OFF),
        abi_const!("SNAPKV_VALUE_WEIGHTING_NORM", VALUE_WEIGHTING_NORM),
        abi_const!("SNAPKV_QUERY_AGGREGATION_SUM", QUERY_AGGREGATION_SUM),
        abi_const!("SNAPKV_QUERY_AGGREGATION_MAX", QUERY_AGGREGATION_MAX),
        abi_const!("SNAPKV_PRESET_DEFAULT", PRESET_DEFAULT),
        abi_const!("SNAPKV_PRESET_FACTS", PRESET_FACTS),
        abi_const!("SNAPKV_PRESET_RECONSTRUCT", PRESET_RECONSTRUCT),
        abi_const!("SNAPKV_SCORE_NONE", SCORE_NONE),
        abi_const!("SNAPKV_SCORE_SOFTMAX", SCORE_SOFTMAX),
        abi_const!("SNAPKV_SCORE_QUERY_KEY", SCORE_QUERY_KEY),
        abi_const!("SNAPKV_SCORE_KEYS", SCORE_KEYS),
        abi_const!("SNAPKV_SCORE_RECONSTRUCTION", SCORE_RECONSTRUCTION),
        abi_const!("SNAPKV_METHOD_SNAPKV", METHOD_SNAPKV),
        abi_const!("SNAPKV_METHOD_KEYDIFF", METHOD_KEYDIFF),
        abi_const!("SNAPKV_METHOD_RECONSTRUCT", METHOD_RECONSTRUCT),
        abi_const!(
            "SNAPKV_VERSION_MAJOR",
            env!("CARGO_PKG_VERSION_MAJOR").parse::<i64>().unwrap_or(-1)
        ),
        abi_const!(
            "SNAPKV_VERSION_MINOR",
            env!("CARGO_PKG_VERSION_MINOR").parse::<i64>().unwrap_or(-1)
        ),
        abi_const!(
            "SNAPKV_VERSION_PATCH",
            env!("CARGO_PKG_VERSION_PATCH").parse::<i64>().unwrap_or(-1)
        ),
    ];
    items.extend(abi_offsets!(
        SnapkvParams,
        "snapkv_params",
        size,
        window,
        budget,
        kernel,
        budget_fraction,
        pooling,
        reserved,
        pool_align,
        pool_forward,
        value_weighting,
        query_aggregation,
        draft_tokens,
        method,
        spare
    ));
    items.extend(abi_offsets!(
        SnapkvStats,
        "snapkv_stats",
        size,
        compressed,
        score_source,
        cells_before,
        cells_after,
        bytes_before,
        bytes_after,
        prefill_seconds,
        window_seconds,
        observe_seconds,
        score_seconds,
        select_seconds,
        compact_seconds,
        draft_tokens,
        draft_seconds
    ));
    for &s in Status::ALL {
        items.push(AbiItem {
            name: s.c_name(),
            value: i64::from(s.code()),
        });
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn defaults_come_from_the_safe_api_and_validate() {
        let p = SnapkvParams::default();
        assert_eq!(p.size as usize, size_of::<SnapkvParams>());
        assert_eq!((p.window, p.budget, p.kernel), (32, 1024, 11));
        assert_eq!((p.budget_fraction, p.pooling, p.reserved), (0.0, POOLING_AVG, 0));
        assert_eq!((p.pool_align, p.pool_forward), (POOL_ALIGN_FORWARD, 7));
        assert_eq!(p.value_weighting, VALUE_WEIGHTING_OFF);
        let norm = SnapkvParams {
            value_weighting: VALUE_WEIGHTING_NORM,
            ..p
        };
        assert_eq!(norm.to_config().unwrap().value_weighting, ValueWeighting::Norm);
        assert_eq!(p.query_aggregation, QUERY_AGGREGATION_SUM);
        let max = SnapkvParams {
            query_aggregation: QUERY_AGGREGATION_MAX,
            ..p
        };
        assert_eq!(max.to_config().unwrap().queries, QueryAggregation::Max);
        assert_eq!(p.to_config().unwrap(), SnapKvConfig::default());
    }

    #[test]
    fn enumerators_round_trip_and_unknown_ones_are_named() {
        for p in [Pooling::Max, Pooling::Avg] {
            assert_eq!(Pooling::from_c("pooling", p.to_c()).unwrap(), p);
        }
        for v in [ValueWeighting::Off, ValueWeighting::Norm] {
            assert_eq!(ValueWeighting::from_c("value_weighting", v.to_c()).unwrap(), v);
        }
        for q in [QueryAggregation::Sum, QueryAggregation::Max] {
            assert_eq!(QueryAggregation::from_c("query_aggregation", q.to_c()).unwrap(), q);
        }
        for preset in [Preset::Default, Preset::Facts, Preset::Reconstruct] {
            assert_eq!(preset_from_c(preset.to_c()).unwrap(), preset);
            let params = SnapkvParams::from_config(&preset.config());
            assert_eq!(params.to_config().unwrap(), preset.config());
        }
        assert_eq!(
            preset_from_c(3).unwrap_err().message,
            "preset: unknown value 3 (SNAPKV_PRESET_DEFAULT or SNAPKV_PRESET_FACTS or SNAPKV_PRESET_RECONSTRUCT)"
        );
        let err = QueryAggregation::from_c("query_aggregation", 5).unwrap_err();
        assert_eq!(
            err.message,
            "query_aggregation: unknown value 5 (SNAPKV_QUERY_AGGREGATION_SUM or SNAPKV_QUERY_AGGREGATION_MAX)"
        );
    }

    #[test]
    fn invalid_params_are_refused_with_a_message() {
        let base = SnapkvParams::default();
        let cases: Vec<(SnapkvParams, &str)> = vec![
            (SnapkvParams { window: 0, ..base }, "window"),
            (SnapkvParams { kernel: 4, ..base }, "kernel"),
            (SnapkvParams { budget: 32, ..base }, "budget"),
            (SnapkvParams { pooling: 7, ..base }, "pooling"),
            (SnapkvParams { reserved: 1, ..base }, "reserved"),
            (SnapkvParams { pool_align: 3, ..base }, "pool_align"),
            (
                SnapkvParams {
                    value_weighting: 2,
                    ..base
                },
                "value_weighting",
            ),
            (
                SnapkvParams {
                    query_aggregation: -1,
                    ..base
                },
                "query_aggregation",
            ),
            (
                SnapkvParams {
                    pool_forward: 11,
                    ..base
                },
                "kernel of at least 13",
            ),
            (SnapkvParams { budget: 0, ..base }, "budget"),
            (
                SnapkvParams {
                    budget_fraction: 0.5,
                    ..base
                },
                "not both",
            ),
            (
                SnapkvParams {
                    budget: 0,
                    budget_fraction: 1.5,
                    ..base
                },
                "fraction",
            ),
            (
                SnapkvParams {
                    budget: 0,
                    budget_fraction: f64::NAN,
                    ..base
                },
                "fraction",
            ),
        ];
        for (p, needle) in cases {
            let err = p.to_config().unwrap_err();
            assert_eq!(err.status, Status::InvalidParams, "{p:?}");
            assert!(err.message.contains(needle), "{:?} lacks {needle:?}", err.message);
        }
        let frac = SnapkvParams {
            budget: 0,
            budget_fraction: 0.25,
            ..base
        };
        assert_eq!(frac.to_config().unwrap().budget, Budget::Fraction(0.25));
        // The default's pool_forward (7) is ignored once the alignment is centred.
        let centred = SnapkvParams {
            pool_align: POOL_ALIGN_CENTERED,
            kernel: 3,
            ..base
        };
        assert_eq!(centred.to_config().unwrap().pool_align, PoolAlign::Centered);
    }

    #[test]
    fn methods_are_named_and_unknown_ones_refused() {
        let p = SnapkvParams::default();
        assert_eq!((p.method, p.spare), (METHOD_SNAPKV, 0));
        for (method, name) in [
            (METHOD_SNAPKV, "snapkv"),
            (METHOD_KEYDIFF, "keydiff"),
            (METHOD_RECONSTRUCT, "reconstruct"),
        ] {
            assert_eq!(SnapkvParams { method, ..p }.method_name().unwrap(), name);
        }
        let err = SnapkvParams { method: 3, ..p }.method_name().unwrap_err();
        assert_eq!(err.status, Status::InvalidParams);
        assert!(
            err.message.starts_with("method: unknown value 3 (SNAPKV_METHOD_SNAPKV"),
            "{}",
            err.message
        );
        assert!(SnapkvParams { spare: 1, ..p }.method_name().is_err());
    }

    #[test]
    fn sizes_are_checked() {
        let ours = size_of::<SnapkvParams>() as u32;
        assert!(SnapkvParams::check_size(0).is_err());
        assert_eq!((PARAMS_MIN_SIZE, ours), (40, 64));
        assert!(SnapkvParams::check_size(PARAMS_MIN_SIZE - 1).is_err());
        assert_eq!(SnapkvParams::check_size(PARAMS_MIN_SIZE).unwrap(), 40);
        assert_eq!(SnapkvParams::check_size(ours).unwrap(), ours as usize);
        assert_eq!(SnapkvParams::check_size(ours + 8).unwrap(), ours as usize + 8);
        assert!(SnapkvParams::check_size(1 << 20).is_err());
        assert!(SnapkvParams::check_tail(&[0; 8]).is_ok());
        assert!(SnapkvParams::check_tail(&[0, 0, 1]).is_err());
        assert!(SnapkvStats::check_size(0).is_err());
        assert_eq!((STATS_MIN_SIZE, size_of::<SnapkvStats>()), (96, 112));
        assert!(SnapkvStats::check_size(STATS_MIN_SIZE as u32 - 8).is_err());
        assert_eq!(SnapkvStats::check_size(STATS_MIN_SIZE as u32).unwrap(), STATS_MIN_SIZE);
        assert_eq!(
            SnapkvStats::check_size(size_of::<SnapkvStats>() as u32 + 16).unwrap(),
            size_of::<SnapkvStats>()
        );
    }

    #[test]
    fn layout_table_names_are_unique() {
        let items = abi_items();
        let names: HashSet<&CStr> = items.iter().map(|i| i.name).collect();
        assert_eq!(names.len(), items.len());
        assert!(items.iter().any(|i| i.name == c"offsetof(snapkv_params, reserved)"));
    }
}
