//! User-facing SnapKV parameters and the budget arithmetic.

use std::fmt;
use std::str::FromStr;

use super::error::AlgoError;

/// 1-D pooling applied to the votes over prefix positions, so that a
/// selected position brings its neighbours along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pooling {
    /// Maximum of the in-range values in the kernel window.
    Max,
    /// Mean of the in-range values in the kernel window (the default: on
    /// the retrieval suite it kept more answers than max pooling; max
    /// pooling stayed closer to the full cache on a long document's
    /// continuation — see the README's results).
    #[default]
    Avg,
}

/// Where the pooling window of a position lies, and so which neighbours a
/// position that drew attention brings along. [`SnapKvConfig::default`]
/// uses [`PoolAlign::Forward`]`(7)` with kernel 11.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolAlign {
    /// The window is centred on the position (SnapKV's pooling, padding
    /// `kernel / 2` on each side): a voted position keeps the `kernel / 2`
    /// tokens before and after it.
    Centered,
    /// The window ends at the position (the `kernel` positions up to and
    /// including it): a voted position keeps the `kernel - 1` tokens that
    /// follow it. Attention from a question tends to land on where a fact
    /// starts (its label); the tokens after it hold the value that an
    /// answer copies.
    Trailing,
    /// The window reaches `n` positions forward of a voted position and
    /// `kernel - 1 - n` back: `Forward(kernel / 2)` is [`Centered`] and
    /// `Forward(kernel - 1)` is [`Trailing`]. A voted position keeps most of
    /// what follows it (a value after its label) and a little of what
    /// precedes it (a name before its value). `n` must be below `kernel`.
    ///
    /// [`Centered`]: PoolAlign::Centered
    /// [`Trailing`]: PoolAlign::Trailing
    Forward(usize),
}

impl PoolAlign {
    /// The positions the pooling window of a position covers before and
    /// after it, for an odd `kernel` (a vote so reaches the first number
    /// of positions forward and the second back).
    ///
    /// # Errors
    /// [`AlgoError::InvalidConfig`] (`pool_align`) when a
    /// [`Forward`](PoolAlign::Forward) reach is not below `kernel`.
    pub fn extents(self, kernel: usize) -> Result<(usize, usize), AlgoError> {
        let forward = match self {
            PoolAlign::Centered => kernel / 2,
            PoolAlign::Trailing => kernel.saturating_sub(1),
            PoolAlign::Forward(n) if n < kernel => n,
            PoolAlign::Forward(n) => {
                return Err(AlgoError::InvalidConfig {
                    param: "pool_align",
                    reason: format!(
                        "forward-{n} needs a kernel of at least {} (odd), the kernel is {kernel}: \
                         raise the kernel or choose centered, trailing or forward-N with N below {kernel}",
                        (n + 1) | 1
                    ),
                })
            }
        };
        Ok((forward, kernel.saturating_sub(1) - forward))
    }
}

/// How the window queries' attention probabilities on one prefix position
/// are combined into that position's vote (per query head, before value
/// weighting and pooling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QueryAggregation {
    /// Sum over the window queries (SnapKV's paper; the default): a
    /// position wins by drawing attention from many queries.
    #[default]
    Sum,
    /// Maximum over the window queries: a position that one query attends
    /// to strongly counts as much as one that every query attends to a
    /// little. On the suite's multi-value and variable-tracking prompts it
    /// kept the answers and lowered the KL from the full cache (see the
    /// README's results).
    Max,
}

/// Whether a position's votes are weighted by the size of what it would
/// contribute: attention to a position adds its value vector to the head's
/// output, so a position with a small value moves the output little however
/// much attention it draws (the sinks at the start of a prompt are the
/// usual case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ValueWeighting {
    /// Votes are attention probabilities only (SnapKV's paper; the default).
    #[default]
    Off,
    /// Every (query head, position) vote is multiplied by the Euclidean norm
    /// of the position's cached value vector for that head's KV head, before
    /// pooling. The norm is unchanged by the Hadamard rotation llama.cpp
    /// applies to quantized V rows, so it needs no knowledge of it.
    Norm,
}

/// A named set of the selection parameters, measured together on the
/// default model (the README's results say by what commands).
///
/// A preset sets how positions are voted for and pooled: [`kernel`],
/// [`pooling`], [`pool_align`], [`value_weighting`] and
/// [`queries`]. The observation window and the budget are left to the
/// caller.
///
/// ```
/// use snapkv::{Budget, Preset};
///
/// let mut config = Preset::Facts.config();
/// config.budget = Budget::Cells(256);
/// config.validate()?;
/// assert_eq!("facts".parse::<Preset>()?, Preset::Facts);
/// # Ok::<(), snapkv::snapkv::AlgoError>(())
/// ```
///
/// [`kernel`]: SnapKvConfig::kernel
/// [`pooling`]: SnapKvConfig::pooling
/// [`pool_align`]: SnapKvConfig::pool_align
/// [`value_weighting`]: SnapKvConfig::value_weighting
/// [`queries`]: SnapKvConfig::queries
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Preset {
    /// The parameters of [`SnapKvConfig::default`]: summed votes, average
    /// pooling over kernel 11 reaching 7 positions forward. For a
    /// continuation that draws on the whole prompt (a summary, chat over a
    /// document) they stayed closest to the full cache.
    #[default]
    Default,
    /// For answers that copy facts out of the prompt (lists of values,
    /// chains of references): a vote is the largest of the window queries'
    /// (weighted by the value's norm), max-pooled over the 6 positions after
    /// it (kernel 7, trailing). On the suite's held-out multi-value and
    /// variable-tracking prompts it kept 81% and 89% of the full cache's
    /// answers at 1/16 of the prompt, against 62% and 69% with
    /// [`Preset::Default`]; on a long document's continuation its
    /// next-token KL was higher than the default's.
    Facts,
    /// For `reconstruct` (question-agnostic compression by a repeat of the
    /// sequence): each position's score is the largest within 3 positions on
    /// either side (max pooling, kernel 7, centred), so that a number the
    /// repeat copies keeps all its digits. On held-out documents (built-in
    /// filler, seeds 4 and 5, ~4,000 tokens, every question asked of one
    /// compressed cache) at 512 cells it kept 86%, 90% and 111% of the full
    /// cache's multi-key, multi-value and variable-tracking answers, against
    /// 57%, 30% and 33% with [`Preset::Default`]'s pooling; on real text
    /// (the GPL-3 as filler, seeds 4 and 5) 43% to 60% of each task's
    /// score at 1,024 cells, against 0% to 14%.
    Reconstruct,
}

impl Preset {
    /// Sets the selection parameters of `config` to this preset's, leaving
    /// its window and budget.
    pub fn apply(self, config: &mut SnapKvConfig) {
        let preset = match self {
            Preset::Default => SnapKvConfig::default(),
            Preset::Facts => SnapKvConfig {
                kernel: 7,
                pooling: Pooling::Max,
                pool_align: PoolAlign::Trailing,
                value_weighting: ValueWeighting::Norm,
                queries: QueryAggregation::Max,
                ..SnapKvConfig::default()
            },
            Preset::Reconstruct => SnapKvConfig {
                kernel: 7,
                pooling: Pooling::Max,
                pool_align: PoolAlign::Centered,
                ..SnapKvConfig::default()
            },
        };
        config.kernel = preset.kernel;
        config.pooling = preset.pooling;
        config.pool_align = preset.pool_align;
        config.value_weighting = preset.value_weighting;
        config.queries = preset.queries;
    }

    /// The preset measured best for the selection method called `method`
    /// ([`SELECTOR_NAMES`](crate::snapkv::SELECTOR_NAMES)):
    /// [`Preset::Reconstruct`] for `reconstruct`, [`Preset::Default`] for
    /// every other name. What the preload and the command-line tool use when
    /// a method is chosen and no preset is named.
    ///
    /// ```
    /// use snapkv::Preset;
    ///
    /// assert_eq!(Preset::for_method("reconstruct"), Preset::Reconstruct);
    /// assert_eq!(Preset::for_method("snapkv"), Preset::Default);
    /// ```
    pub fn for_method(method: &str) -> Preset {
        match method {
            "reconstruct" => Preset::Reconstruct,
            _ => Preset::Default,
        }
    }

    /// The default window and budget with this preset's selection
    /// parameters.
    pub fn config(self) -> SnapKvConfig {
        let mut config = SnapKvConfig::default();
        self.apply(&mut config);
        config
    }
}

/// How many cells each KV head keeps after compression (window included).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// A fixed number of cells per KV head.
    Cells(usize),
    /// A fraction in (0, 1] of the prompt length, rounded up.
    Fraction(f64),
}

impl Default for Budget {
    fn default() -> Self {
        Budget::Cells(1024)
    }
}

/// The longest draft [`SnapKvConfig::draft`] takes: the draft's queries are
/// held in memory (tokens × layers × query heads × head size floats).
pub const MAX_DRAFT: usize = 1024;

/// The longest observation window [`SnapKvConfig::window`] takes. The
/// window must also fit one micro-batch of the context (`n_ubatch`, 512 by
/// default), which the engine checks against the context.
pub const MAX_WINDOW: usize = 8192;

/// The largest pooling kernel [`SnapKvConfig::kernel`] takes. The pooling
/// scratch grows with the kernel; pooling windows beyond a few dozen
/// positions are no longer "a token and its neighbours".
pub const MAX_KERNEL: usize = 1023;

/// SnapKV parameters. Build with [`SnapKvConfig::default`] (or
/// [`Preset::config`]) and adjust the fields; call
/// [`SnapKvConfig::validate`] before use.
///
/// Which fields are the method and why each other one is here (measured on
/// the default model; docs/evaluation.md has the runs and their commands):
///
/// | field | | measured reason |
/// |---|---|---|
/// | `window`, `budget` | the method | SnapKV's window (32, the paper's) and the cells kept |
/// | `kernel`, `pool_align` | the method's pooling, measured | kernel 11 reaching 7 forward kept every multi-key answer where SnapKV's centred 7 kept 44% (tuning seeds 1-3, 256 cells) |
/// | `pooling`, `queries`, `value_weighting` | option, [`Preset::Facts`] | max pooling, the largest query vote and value weighting, with kernel 7 trailing: 81% and 89% of the full cache's multi-value and variable-tracking answers against the defaults' 62% and 69% (42 held-out prompts each) |
/// | `draft` | option | with the facts preset, 86% and 100% on the same prompts, KL 1/202 and 1/118 of streaming's |
///
/// The query heads that share a KV head vote by their mean. Their maximum,
/// once an option here, was retired for want of a measured win: it moved
/// answers both ways (multi-value 68% against 59% of the full cache's,
/// variable tracking 61% against 70%, tuning seeds 1-3) and went into no
/// preset (docs/evaluation.md).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SnapKvConfig {
    /// Observation window: the last `window` prompt cells whose queries vote
    /// and which are always kept. Default 32.
    pub window: usize,
    /// Cells kept per KV head, window included. Default 1024 cells.
    pub budget: Budget,
    /// Pooling kernel size; odd, 1 disables pooling. Default 11. It must
    /// hold the alignment's reach: with the default `Forward(7)` at least 9
    /// (set `pool_align` to [`PoolAlign::Centered`] for smaller kernels).
    pub kernel: usize,
    /// Pooling kind. Default avg.
    pub pooling: Pooling,
    /// Where the pooling window lies. Default [`PoolAlign::Forward`]`(7)`:
    /// with the default kernel a voted position keeps the 7 tokens after it
    /// and the 3 before it. (SnapKV's paper pools with kernel 7, centred.)
    pub pool_align: PoolAlign,
    /// Value weighting of the votes. Default [`ValueWeighting::Off`].
    pub value_weighting: ValueWeighting,
    /// How the window queries' probabilities make one vote. Default
    /// [`QueryAggregation::Sum`].
    pub queries: QueryAggregation,
    /// Tokens of a greedy draft of the answer that vote beside the window;
    /// 0 (the default) for none. With a draft, compression selects twice:
    /// once from the window, which compacts the cache; then up to `draft`
    /// tokens are decoded greedily on that small cache with their queries
    /// recorded, and the positions are selected again from the full prompt
    /// with the window's and the draft's queries voting together. The
    /// draft's queries ask for what the answer's next tokens need (the next
    /// value of a list, the next link of a chain), which the prompt's own
    /// last tokens do not point at. Its tokens are discarded, and the
    /// prompt's last token is decoded again over the final cache so that the
    /// logits left are the prompt's (computed over the compressed cache,
    /// not the full one). Cost: `draft` decodes over `budget` cells, a
    /// second scoring and compaction, one more decode. Needs the prompt's
    /// last token, so only the paths given the tokens take it
    /// ([`Compressor::prefill`](crate::Compressor::prefill) and
    /// [`Compressor::compress_after_prefill`](crate::Compressor::compress_after_prefill)).
    /// At most [`MAX_DRAFT`].
    pub draft: usize,
}

impl Default for SnapKvConfig {
    /// Window 32, 1,024 cells, and the selection of [`Preset::Default`].
    fn default() -> Self {
        SnapKvConfig {
            window: 32,
            budget: Budget::default(),
            kernel: 11,
            pooling: Pooling::default(),
            pool_align: PoolAlign::Forward(7),
            value_weighting: ValueWeighting::default(),
            queries: QueryAggregation::default(),
            draft: 0,
        }
    }
}

impl SnapKvConfig {
    /// Checks every parameter.
    ///
    /// # Errors
    /// [`AlgoError::InvalidConfig`] when `window` is 0 or above
    /// [`MAX_WINDOW`], `kernel` is even, 0 or above [`MAX_KERNEL`], a
    /// [`PoolAlign::Forward`] reach is not below `kernel`, a `Cells` budget
    /// is not larger than the window, a `Fraction` budget is not a finite
    /// number in (0, 1], or `draft` exceeds [`MAX_DRAFT`]. Every parameter
    /// that sizes an allocation is bounded here.
    pub fn validate(&self) -> Result<(), AlgoError> {
        if self.draft > MAX_DRAFT {
            return Err(AlgoError::InvalidConfig {
                param: "draft",
                reason: format!("at most {MAX_DRAFT} tokens, got {}", self.draft),
            });
        }
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(AlgoError::InvalidConfig {
                param: "window",
                reason: format!("must be 1..={MAX_WINDOW} cells, got {}", self.window),
            });
        }
        if self.kernel == 0 || self.kernel % 2 == 0 || self.kernel > MAX_KERNEL {
            return Err(AlgoError::InvalidConfig {
                param: "kernel",
                reason: format!(
                    "must be odd and in 1..={MAX_KERNEL} (1 disables pooling), got {}",
                    self.kernel
                ),
            });
        }
        self.pool_align.extents(self.kernel)?;
        match self.budget {
            Budget::Cells(cells) if cells <= self.window => Err(AlgoError::InvalidConfig {
                param: "budget",
                reason: format!(
                    "{cells} cells leaves no room beside the {}-cell window; use more than {} cells",
                    self.window, self.window
                ),
            }),
            Budget::Fraction(f) if !(f.is_finite() && f > 0.0 && f <= 1.0) => Err(AlgoError::InvalidConfig {
                param: "budget",
                reason: format!("fraction must be in (0, 1], got {f}"),
            }),
            _ => Ok(()),
        }
    }

    /// Cells kept per KV head (window included) for a prompt of `prompt_len`
    /// cells (window included).
    ///
    /// Returns `Ok(None)` when the prompt already fits (`prompt_len <=`
    /// budget): compression is then a no-op, not an error. The number of
    /// prefix cells each head keeps is the returned value minus `window`.
    /// A `Fraction` budget is `ceil(fraction * prompt_len)`.
    ///
    /// # Errors
    /// [`AlgoError::InvalidConfig`] when the configuration is invalid (see
    /// [`SnapKvConfig::validate`]) or when a `Fraction` budget comes to no
    /// more than the window for this prompt.
    pub fn cells_to_keep(&self, prompt_len: usize) -> Result<Option<usize>, AlgoError> {
        self.validate()?;
        let budget = match self.budget {
            Budget::Cells(cells) => cells,
            Budget::Fraction(f) => {
                // f in (0, 1], so the product is at most prompt_len.
                let cells = (f * prompt_len as f64).ceil();
                (cells as usize).min(prompt_len)
            }
        };
        if prompt_len <= budget {
            return Ok(None);
        }
        if budget <= self.window {
            return Err(AlgoError::InvalidConfig {
                param: "budget",
                reason: format!(
                    "the fraction keeps {budget} of {prompt_len} cells, no more than the {}-cell window; raise the fraction or shrink the window",
                    self.window
                ),
            });
        }
        Ok(Some(budget))
    }
}

/// `expected `a` or `b``, `expected `a`, `b` or `c``: the names a parse
/// accepts, for its error.
fn expected_one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.split_last() {
        Some((last, [])) => format!("expected {last}"),
        Some((last, rest)) => format!("expected {} or {last}", rest.join(", ")),
        None => "expected nothing".into(),
    }
}

/// `FromStr` (case-insensitive) and `Display` for a parameter enum whose
/// variants each have one name; a parse error names the parameter and every
/// accepted name.
macro_rules! named_variants {
    ($ty:ident, $param:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl FromStr for $ty {
            type Err = AlgoError;

            /// Parses a variant's name (case-insensitive).
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $(
                    if s.eq_ignore_ascii_case($name) {
                        return Ok($ty::$variant);
                    }
                )+
                Err(AlgoError::InvalidConfig {
                    param: $param,
                    reason: format!("{}, got `{s}`", expected_one_of(&[$($name),+])),
                })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self {
                    $($ty::$variant => $name,)+
                })
            }
        }
    };
}

named_variants!(Pooling, "pooling", { Max => "max", Avg => "avg" });
named_variants!(ValueWeighting, "value_weighting", { Off => "off", Norm => "norm" });
named_variants!(QueryAggregation, "queries", { Sum => "sum", Max => "max" });
named_variants!(Preset, "preset", { Default => "default", Facts => "facts", Reconstruct => "reconstruct" });

impl FromStr for PoolAlign {
    type Err = AlgoError;

    /// Parses `centered`, `trailing` or `forward-N` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "centered" => return Ok(PoolAlign::Centered),
            "trailing" => return Ok(PoolAlign::Trailing),
            _ => {}
        }
        lower
            .strip_prefix("forward-")
            .and_then(|n| n.parse().ok())
            .map(PoolAlign::Forward)
            .ok_or_else(|| AlgoError::InvalidConfig {
                param: "pool_align",
                reason: format!("expected `centered`, `trailing` or `forward-N` (N a count), got `{s}`"),
            })
    }
}

impl fmt::Display for PoolAlign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolAlign::Centered => f.write_str("centered"),
            PoolAlign::Trailing => f.write_str("trailing"),
            PoolAlign::Forward(n) => write!(f, "forward-{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A centred configuration (valid for every odd kernel).
    fn config(window: usize, budget: Budget, kernel: usize) -> SnapKvConfig {
        SnapKvConfig {
            window,
            budget,
            kernel,
            pool_align: PoolAlign::Centered,
            ..SnapKvConfig::default()
        }
    }

    fn refused_param(c: &SnapKvConfig) -> &'static str {
        match c.validate() {
            Err(AlgoError::InvalidConfig { param, .. }) => param,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn presets_set_the_selection_and_leave_window_and_budget() {
        assert_eq!(Preset::Default.config(), SnapKvConfig::default());
        let facts = Preset::Facts.config();
        facts.validate().unwrap();
        assert_eq!(
            (facts.kernel, facts.pooling, facts.pool_align),
            (7, Pooling::Max, PoolAlign::Trailing)
        );
        assert_eq!(
            (facts.queries, facts.value_weighting),
            (QueryAggregation::Max, ValueWeighting::Norm)
        );

        let mut custom = SnapKvConfig {
            window: 16,
            budget: Budget::Fraction(0.25),
            kernel: 21,
            ..SnapKvConfig::default()
        };
        Preset::Facts.apply(&mut custom);
        assert_eq!((custom.window, custom.budget), (16, Budget::Fraction(0.25)));
        assert_eq!(custom.kernel, 7);
        Preset::Default.apply(&mut custom);
        assert_eq!(
            custom,
            SnapKvConfig {
                window: 16,
                budget: Budget::Fraction(0.25),
                ..SnapKvConfig::default()
            }
        );

        let reconstruct = Preset::Reconstruct.config();
        reconstruct.validate().unwrap();
        assert_eq!(
            (reconstruct.kernel, reconstruct.pooling, reconstruct.pool_align),
            (7, Pooling::Max, PoolAlign::Centered)
        );
        assert_eq!(
            (reconstruct.queries, reconstruct.value_weighting),
            (QueryAggregation::Sum, ValueWeighting::Off)
        );
        assert_eq!("reconstruct".parse::<Preset>().unwrap(), Preset::Reconstruct);
        for name in crate::snapkv::SELECTOR_NAMES {
            let want = if name == "reconstruct" {
                Preset::Reconstruct
            } else {
                Preset::Default
            };
            assert_eq!(Preset::for_method(name), want, "{name}");
        }
        assert_eq!("FACTS".parse::<Preset>().unwrap(), Preset::Facts);
        assert_eq!(Preset::Facts.to_string(), "facts");
        match "fast".parse::<Preset>() {
            Err(AlgoError::InvalidConfig { param, reason }) => {
                assert_eq!(param, "preset");
                assert_eq!(reason, "expected `default`, `facts` or `reconstruct`, got `fast`");
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_as_documented() {
        let c = SnapKvConfig::default();
        assert_eq!(c.window, 32);
        assert_eq!(c.budget, Budget::Cells(1024));
        assert_eq!(c.kernel, 11);
        assert_eq!(c.pool_align, PoolAlign::Forward(7));
        assert_eq!(c.pooling, Pooling::Avg);
        assert_eq!(c.queries, QueryAggregation::Sum);
        c.validate().unwrap();
    }

    /// Issue 27.4: a kernel of u32::MAX with max pooling asked for ~34 GB
    /// of pooling scratch; every allocation-sizing parameter is bounded.
    #[test]
    fn allocation_sizing_parameters_are_bounded() {
        let max_kernel = SnapKvConfig {
            kernel: u32::MAX as usize,
            pooling: Pooling::Max,
            pool_align: PoolAlign::Centered,
            ..SnapKvConfig::default()
        };
        assert_eq!(refused_param(&max_kernel), "kernel");
        let kernel = SnapKvConfig {
            kernel: MAX_KERNEL,
            pool_align: PoolAlign::Centered,
            ..SnapKvConfig::default()
        };
        kernel.validate().unwrap();
        assert_eq!(
            refused_param(&SnapKvConfig {
                kernel: MAX_KERNEL + 2,
                ..kernel
            }),
            "kernel"
        );
        let window = SnapKvConfig {
            window: MAX_WINDOW + 1,
            budget: Budget::Cells(MAX_WINDOW + 100),
            ..SnapKvConfig::default()
        };
        assert_eq!(refused_param(&window), "window");
        assert_eq!(
            refused_param(&SnapKvConfig {
                draft: MAX_DRAFT + 1,
                ..SnapKvConfig::default()
            }),
            "draft"
        );
    }

    #[test]
    fn validation_refuses_bad_parameters() {
        assert_eq!(refused_param(&config(0, Budget::Cells(64), 7)), "window");
        assert_eq!(refused_param(&config(32, Budget::Cells(64), 0)), "kernel");
        assert_eq!(refused_param(&config(32, Budget::Cells(64), 4)), "kernel");
        assert_eq!(refused_param(&config(32, Budget::Cells(32), 7)), "budget");
        assert_eq!(refused_param(&config(32, Budget::Cells(10), 7)), "budget");
        for f in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert_eq!(refused_param(&config(32, Budget::Fraction(f), 7)), "budget");
        }
        config(32, Budget::Cells(33), 1).validate().unwrap();
        // The default forward reach needs a kernel of at least 8: a smaller
        // kernel with the default alignment is refused, naming the fix.
        let small = SnapKvConfig {
            kernel: 7,
            ..SnapKvConfig::default()
        };
        match small.validate() {
            Err(AlgoError::InvalidConfig {
                param: "pool_align",
                reason,
            }) => {
                assert!(reason.contains("kernel of at least 9"), "{reason}")
            }
            other => panic!("expected a pool_align error, got {other:?}"),
        }
        config(1, Budget::Fraction(1.0), 3).validate().unwrap();
        let mut drafting = SnapKvConfig {
            draft: MAX_DRAFT,
            ..SnapKvConfig::default()
        };
        drafting.validate().unwrap();
        drafting.draft = MAX_DRAFT + 1;
        assert_eq!(refused_param(&drafting), "draft");
    }

    #[test]
    fn cells_budget_is_a_no_op_when_the_prompt_fits() {
        let c = config(32, Budget::Cells(100), 7);
        assert_eq!(c.cells_to_keep(50).unwrap(), None);
        assert_eq!(c.cells_to_keep(100).unwrap(), None);
        assert_eq!(c.cells_to_keep(101).unwrap(), Some(100));
        assert_eq!(c.cells_to_keep(10_000).unwrap(), Some(100));
    }

    #[test]
    fn fraction_budget_rounds_up_and_refuses_budgets_inside_the_window() {
        let c = config(4, Budget::Fraction(0.25), 7);
        assert_eq!(c.cells_to_keep(100).unwrap(), Some(25));
        assert_eq!(c.cells_to_keep(101).unwrap(), Some(26));
        // ceil(0.25 * 16) = 4 <= window
        assert!(matches!(
            c.cells_to_keep(16),
            Err(AlgoError::InvalidConfig { param: "budget", .. })
        ));
        let all = config(4, Budget::Fraction(1.0), 7);
        assert_eq!(all.cells_to_keep(3).unwrap(), None);
        assert_eq!(all.cells_to_keep(1000).unwrap(), None);
    }

    #[test]
    fn cells_to_keep_validates_first() {
        assert!(config(0, Budget::Cells(8), 7).cells_to_keep(100).is_err());
    }

    #[test]
    fn names_round_trip() {
        for p in [Pooling::Max, Pooling::Avg] {
            assert_eq!(p.to_string().parse::<Pooling>().unwrap(), p);
        }
        for v in [ValueWeighting::Off, ValueWeighting::Norm] {
            assert_eq!(v.to_string().parse::<ValueWeighting>().unwrap(), v);
        }
        assert!("l1".parse::<ValueWeighting>().is_err());
        for q in [QueryAggregation::Sum, QueryAggregation::Max] {
            assert_eq!(q.to_string().parse::<QueryAggregation>().unwrap(), q);
        }
        assert!("mean".parse::<QueryAggregation>().is_err());
        for a in [
            PoolAlign::Centered,
            PoolAlign::Trailing,
            PoolAlign::Forward(0),
            PoolAlign::Forward(6),
        ] {
            assert_eq!(a.to_string().parse::<PoolAlign>().unwrap(), a);
        }
        assert_eq!("Forward-12".parse::<PoolAlign>().unwrap(), PoolAlign::Forward(12));
        assert_eq!("MAX".parse::<Pooling>().unwrap(), Pooling::Max);
        assert!("mean".parse::<Pooling>().is_err());
        for bad in ["left", "forward", "forward-", "forward--1", "forward-x", "forward6"] {
            assert!(bad.parse::<PoolAlign>().is_err(), "{bad}");
        }
    }

    #[test]
    fn parse_errors_name_the_parameter_and_every_choice() {
        match "mean".parse::<QueryAggregation>() {
            Err(AlgoError::InvalidConfig { param, reason }) => {
                assert_eq!(param, "queries");
                assert_eq!(reason, "expected `sum` or `max`, got `mean`");
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
        assert_eq!(expected_one_of(&["a"]), "expected `a`");
        assert_eq!(expected_one_of(&["a", "b", "c"]), "expected `a`, `b` or `c`");
    }

    #[test]
    fn pool_windows_reach_kernel_minus_one_positions() {
        assert_eq!(SnapKvConfig::default().pool_align, PoolAlign::Forward(7));
        assert_eq!(
            SnapKvConfig::default()
                .pool_align
                .extents(SnapKvConfig::default().kernel)
                .unwrap(),
            (7, 3)
        );
        assert_eq!(PoolAlign::Centered.extents(7).unwrap(), (3, 3));
        assert_eq!(PoolAlign::Trailing.extents(7).unwrap(), (6, 0));
        assert_eq!(PoolAlign::Forward(5).extents(7).unwrap(), (5, 1));
        assert_eq!(PoolAlign::Forward(3).extents(7), PoolAlign::Centered.extents(7));
        assert_eq!(PoolAlign::Forward(6).extents(7), PoolAlign::Trailing.extents(7));
        assert_eq!(PoolAlign::Centered.extents(1).unwrap(), (0, 0));
        assert_eq!(PoolAlign::Trailing.extents(1).unwrap(), (0, 0));
        assert_eq!(PoolAlign::Forward(0).extents(1).unwrap(), (0, 0));
        assert!(PoolAlign::Forward(7).extents(7).is_err());
        let past = SnapKvConfig {
            kernel: 5,
            pool_align: PoolAlign::Forward(5),
            ..SnapKvConfig::default()
        };
        assert!(past.validate().is_err());
    }
}
