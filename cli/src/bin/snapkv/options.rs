//! Options shared by the subcommands, named as llama.cpp users know them.

use std::path::PathBuf;

use clap::Args;
use snapkv::{
    Budget, CacheType, FlashAttention, PoolAlign, Pooling, Preset, QueryAggregation, SnapKvConfig, ValueWeighting,
};

/// The default model: Qwen2.5-Coder-0.5B-Instruct, fetched by scripts/fetch-models.sh.
pub const DEFAULT_MODEL: &str = "models/qwen2.5-coder-0.5b-instruct.gguf";

/// Model and context options.
#[derive(Debug, Clone, Args)]
pub struct ModelOptions {
    /// GGUF model path.
    #[arg(short = 'm', long, default_value = DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Context size in cells (0 = fit the prompt and the generation).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: u32,
    /// CPU threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<i32>,
    /// Logical batch size for prompt evaluation.
    #[arg(short = 'b', long = "batch-size", default_value_t = 2048)]
    pub batch_size: u32,
    /// Physical batch size.
    #[arg(long = "ubatch-size", default_value_t = 512)]
    pub ubatch_size: u32,
    /// Flash attention: on, off or auto.
    #[arg(long = "flash-attn", short_alias = 'F', default_value = "auto")]
    pub flash_attn: FlashAttention,
    /// K cache type (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl).
    #[arg(long = "cache-type-k", alias = "ctk", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type_k: CacheType,
    /// V cache type (quantized V needs flash attention).
    #[arg(long = "cache-type-v", alias = "ctv", default_value = "f16", value_parser = parse_cache_type)]
    pub cache_type_v: CacheType,
}

impl ModelOptions {
    /// Threads to use.
    pub fn threads(&self) -> i32 {
        self.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(4, |n| n.get()) as i32)
    }
}

/// SnapKV options of `generate`: a budget and the method parameters.
#[derive(Debug, Clone, Args)]
pub struct SnapKvOptions {
    /// Cells kept per KV head, window included.
    #[arg(long, default_value_t = 1024)]
    pub budget: usize,
    /// Budget as a fraction of the prompt instead (e.g. 0.125).
    #[arg(long = "budget-fraction", conflicts_with = "budget")]
    pub budget_fraction: Option<f64>,
    #[command(flatten)]
    pub method: MethodOptions,
}

impl SnapKvOptions {
    /// The configuration these options describe for method `method`
    /// (validated by the library).
    pub fn config(&self, method: &str) -> SnapKvConfig {
        let mut cfg = self.method.config(method, self.budget);
        if let Some(f) = self.budget_fraction {
            cfg.budget = Budget::Fraction(f);
        }
        cfg
    }
}

/// SnapKV parameters other than the budget, shared by every method of a run.
/// The selection options not given take the preset's values.
#[derive(Debug, Clone, Args)]
pub struct MethodOptions {
    /// Observation window: the last W prompt tokens (the same for every method).
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Selection parameters to start from: default (for continuations that draw on the whole prompt), facts
    /// (for answers that copy facts out of it: --query-aggregation max --kernel 7 --pool-align trailing
    /// --value-weighting norm --pool max) or reconstruct (for --method reconstruct: --pool max --kernel 7
    /// --pool-align centered). The options below override it. [default: reconstruct for the reconstruct
    /// method, default for the others]
    #[arg(long)]
    pub preset: Option<Preset>,
    /// The selection options given one by one.
    #[command(flatten)]
    pub selection: SelectionOverrides,
}

impl MethodOptions {
    /// The configuration of method `method` for a budget of `cells` cells
    /// per KV head: the preset named, or the method's own
    /// ([`snapkv_cli::trial::preset_for`]), then the options given one by one.
    pub fn config(&self, method: &str, cells: usize) -> SnapKvConfig {
        let mut cfg = self
            .preset
            .unwrap_or_else(|| snapkv_cli::trial::preset_for(method))
            .config();
        cfg.window = self.window;
        cfg.budget = Budget::Cells(cells);
        self.selection.apply(&mut cfg);
        cfg
    }
}

/// Selection parameters given one by one on the command line (or as a
/// method's `key=value` options), each replacing the configuration's when
/// set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Args)]
pub struct SelectionOverrides {
    /// Pooling kernel (odd; at least 9 with --pool-align forward-7, any odd size with centered) [default: the
    /// preset's, 11].
    #[arg(long)]
    kernel: Option<usize>,
    /// Pooling: max or avg [default: the preset's, avg].
    #[arg(long)]
    pool: Option<Pooling>,
    /// Where a position's pooling window lies, and so which neighbours a position that drew attention keeps:
    /// centered (kernel/2 on each side), trailing (the kernel-1 tokens after it) or forward-N (N tokens after
    /// it and kernel-1-N before it; N below the kernel) [default: the preset's, forward-7].
    #[arg(long = "pool-align", value_name = "POOL_ALIGN")]
    align: Option<PoolAlign>,
    /// Votes weighted by the norm of the cached value vector they point at: off or norm [default: the
    /// preset's, off].
    #[arg(long = "value-weighting")]
    value_weighting: Option<ValueWeighting>,
    /// How the window queries' attention on a position makes its vote: sum (SnapKV's paper) or max (the
    /// largest of them) [default: the preset's, sum].
    #[arg(long = "query-aggregation", value_name = "QUERY_AGGREGATION")]
    queries: Option<QueryAggregation>,
    /// Draft N answer tokens greedily on the cache compressed once, then select again from the full prompt
    /// with their queries voting beside the window's (0: no draft) [default: 0].
    #[arg(long)]
    draft: Option<usize>,
}

impl SelectionOverrides {
    fn apply(&self, cfg: &mut SnapKvConfig) {
        if let Some(k) = self.kernel {
            cfg.kernel = k;
        }
        if let Some(p) = self.pool {
            cfg.pooling = p;
        }
        if let Some(a) = self.align {
            cfg.pool_align = a;
        }
        if let Some(v) = self.value_weighting {
            cfg.value_weighting = v;
        }
        if let Some(q) = self.queries {
            cfg.queries = q;
        }
        if let Some(n) = self.draft {
            cfg.draft = n;
        }
    }
}

/// Parses a cache type by its llama.cpp name (`f16`, `q8_0`, ...).
pub fn parse_cache_type(s: &str) -> Result<CacheType, String> {
    (0..64)
        .filter_map(|id| CacheType::from_id(id).ok())
        .find(|t| t.name() == s)
        .ok_or_else(|| format!("unknown cache type {s:?} (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl)"))
}

/// A method as written on the command line: a name (`full` or a selector)
/// optionally followed by `:key=value` overrides of the shared method
/// options, e.g. `snapkv:kernel=15:pool=avg:align=trailing:value=norm:queries=max`. Overrides let one run
/// compare variants of a method over the same evaluated prompts; the window
/// cannot be overridden (every method of a run observes the same window).
/// `preset=NAME` starts the method's selection parameters from that preset
/// instead of the run's options (its other overrides still apply).
/// `lookahead=N` (`eval` only) compresses after the answer's first `N`
/// tokens instead of right after the prompt, so that the window's last `N`
/// tokens are the answer's.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodSpec {
    /// The text as given, used as the method's label in reports.
    pub label: String,
    /// `full` or a selector name.
    pub name: String,
    preset: Option<Preset>,
    overrides: SelectionOverrides,
    lookahead: usize,
}

impl MethodSpec {
    /// Whether this is the uncompressed cache.
    pub fn is_full(&self) -> bool {
        self.name == "full"
    }

    /// Answer tokens generated on the full cache before compressing (0:
    /// compress right after the prompt).
    pub fn lookahead(&self) -> usize {
        self.lookahead
    }

    /// Refuses a look-ahead: `command` compresses right after the prompt.
    ///
    /// # Errors
    /// [`snapkv::Error::InvalidArgument`] when the spec asks for one.
    pub fn refuse_lookahead(&self, command: &str) -> snapkv::Result<()> {
        if self.lookahead == 0 {
            return Ok(());
        }
        Err(snapkv::Error::InvalidArgument {
            param: "method",
            reason: format!("{}: {command} does not take lookahead (only eval does)", self.label),
        })
    }

    /// The configuration of this method for a budget of `cells` cells per
    /// KV head: the run's, then the spec's preset, then its overrides.
    pub fn config(&self, opts: &MethodOptions, cells: usize) -> SnapKvConfig {
        let mut cfg = opts.config(&self.name, cells);
        if let Some(preset) = self.preset {
            preset.apply(&mut cfg);
        }
        self.overrides.apply(&mut cfg);
        cfg
    }

    /// The method for a budget of `cells` cells per KV head.
    ///
    /// # Errors
    /// As [`snapkv_cli::Method::by_name`] (an invalid configuration).
    pub fn method(&self, opts: &MethodOptions, cells: usize) -> snapkv::Result<snapkv_cli::Method> {
        snapkv_cli::Method::by_name(&self.name, self.config(opts, cells))
    }
}

impl std::str::FromStr for MethodSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default().to_string();
        let known = snapkv_cli::method_names();
        if !known.contains(&name.as_str()) {
            return Err(format!("unknown method {name:?} (known: {})", known.join(", ")));
        }
        let mut spec = MethodSpec {
            label: s.to_string(),
            name,
            preset: None,
            overrides: SelectionOverrides::default(),
            lookahead: 0,
        };
        for part in parts {
            if spec.is_full() {
                return Err(format!("{s:?}: full takes no options"));
            }
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{s:?}: expected key=value after ':', got {part:?}"))?;
            let o = &mut spec.overrides;
            match key {
                "preset" => spec.preset = Some(value.parse().map_err(|e| format!("{s:?}: preset: {e}"))?),
                "kernel" => o.kernel = Some(value.parse().map_err(|e| format!("{s:?}: kernel: {e}"))?),
                "pool" => o.pool = Some(value.parse().map_err(|e| format!("{s:?}: pool: {e}"))?),
                "align" => o.align = Some(value.parse().map_err(|e| format!("{s:?}: align: {e}"))?),
                "value" => o.value_weighting = Some(value.parse().map_err(|e| format!("{s:?}: value: {e}"))?),
                "queries" => o.queries = Some(value.parse().map_err(|e| format!("{s:?}: queries: {e}"))?),
                "draft" => o.draft = Some(value.parse().map_err(|e| format!("{s:?}: draft: {e}"))?),
                "lookahead" => spec.lookahead = value.parse().map_err(|e| format!("{s:?}: lookahead: {e}"))?,
                _ => {
                    return Err(format!(
                        "{s:?}: unknown option {key:?} (preset, kernel, pool, align, value, queries, draft, \
                         lookahead)"
                    ))
                }
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::{MethodOptions, MethodSpec};
    use snapkv::{Preset, SnapKvConfig};

    #[test]
    fn method_specs_parse_names_and_overrides() {
        let plain: MethodSpec = "snapkv".parse().unwrap();
        assert_eq!(
            (plain.name.as_str(), plain.overrides.kernel, plain.overrides.pool),
            ("snapkv", None, None)
        );
        let spec: MethodSpec = "snapkv-shared-layer:kernel=15:pool=avg:align=trailing".parse().unwrap();
        assert_eq!(spec.name, "snapkv-shared-layer");
        assert_eq!(spec.overrides.kernel, Some(15));
        assert_eq!(spec.overrides.pool, Some(snapkv::Pooling::Avg));
        assert_eq!(spec.overrides.align, Some(snapkv::PoolAlign::Trailing));
        let forward: MethodSpec = "snapkv:kernel=11:align=forward-7".parse().unwrap();
        assert_eq!(forward.overrides.align, Some(snapkv::PoolAlign::Forward(7)));
        let drafted: MethodSpec = "snapkv:preset=facts:draft=16".parse().unwrap();
        assert_eq!(drafted.overrides.draft, Some(16));
        assert!("snapkv:draft=many".parse::<MethodSpec>().is_err());
        let weighted: MethodSpec = "snapkv:value=norm:lookahead=8".parse().unwrap();
        assert_eq!(weighted.overrides.value_weighting, Some(snapkv::ValueWeighting::Norm));
        assert_eq!((weighted.lookahead(), plain.overrides.value_weighting), (8, None));
        let by_max: MethodSpec = "snapkv:queries=max".parse().unwrap();
        assert_eq!(
            (by_max.overrides.queries, plain.overrides.queries),
            (Some(snapkv::QueryAggregation::Max), None)
        );
        assert_eq!(spec.label, "snapkv-shared-layer:kernel=15:pool=avg:align=trailing");
        assert!("full".parse::<MethodSpec>().unwrap().is_full());
        let ahead: MethodSpec = "streaming:lookahead=8".parse().unwrap();
        assert_eq!((ahead.lookahead(), plain.lookahead()), (8, 0));
        assert!(ahead.refuse_lookahead("bench").is_err());
        assert!(plain.refuse_lookahead("bench").is_ok());
        for bad in [
            "snapkv:lookahead=-1",
            "full:lookahead=8",
            "nonsense",
            "full:kernel=3",
            "snapkv:kernel",
            "snapkv:kernel=x",
            "snapkv:window=8",
            "snapkv:pool=min",
            "snapkv:align=left",
            "snapkv:gqa=max",
            "snapkv:value=l1",
            "snapkv:queries=mean",
            "snapkv:preset=fast",
        ] {
            assert!(bad.parse::<MethodSpec>().is_err(), "{bad}");
        }
    }

    /// Run options as the command line gives them, with `args` after the
    /// subcommand's name.
    fn run_options(args: &[&str]) -> MethodOptions {
        use clap::Parser;
        #[derive(Parser)]
        struct Run {
            #[command(flatten)]
            method: MethodOptions,
        }
        Run::try_parse_from(std::iter::once("snapkv").chain(args.iter().copied()))
            .unwrap()
            .method
    }

    #[test]
    fn presets_start_the_selection_and_options_override_them() {
        let mut expected = SnapKvConfig::default();
        expected.budget = snapkv::Budget::Cells(256);
        assert_eq!(run_options(&[]).config("snapkv", 256), expected);

        let facts = run_options(&["--preset", "facts", "--window", "16"]).config("snapkv", 256);
        expected = Preset::Facts.config();
        expected.window = 16;
        expected.budget = snapkv::Budget::Cells(256);
        assert_eq!(facts, expected);

        let facts_kernel_9 = run_options(&["--preset", "facts", "--kernel", "9"]).config("snapkv", 256);
        assert_eq!(facts_kernel_9.kernel, 9);
        assert_eq!(facts_kernel_9.queries, Preset::Facts.config().queries);

        // A method's preset replaces the run's selection, not its window;
        // the method's own overrides come after it.
        let run = run_options(&["--kernel", "15", "--window", "16"]);
        let spec: MethodSpec = "snapkv:preset=facts:pool=avg".parse().unwrap();
        let cfg = spec.config(&run, 256);
        assert_eq!((cfg.window, cfg.kernel, cfg.pooling), (16, 7, snapkv::Pooling::Avg));
        assert_eq!(cfg.queries, snapkv::QueryAggregation::Max);
        let spelled_out: MethodSpec = "snapkv:queries=max:kernel=7:align=trailing:value=norm:pool=max"
            .parse()
            .unwrap();
        let by_name: MethodSpec = "snapkv:preset=facts".parse().unwrap();
        let defaults = run_options(&[]);
        assert_eq!(spelled_out.config(&defaults, 256), by_name.config(&defaults, 256));
        assert_eq!(run_options(&[]).preset, None);

        // Without a preset a method starts from its own; a preset named for
        // the run or the method replaces it.
        let bare: MethodSpec = "reconstruct".parse().unwrap();
        assert_eq!(bare.config(&defaults, 256).kernel, 7);
        assert_eq!(bare.config(&defaults, 256).pool_align, snapkv::PoolAlign::Centered);
        let named: MethodSpec = "reconstruct:preset=default".parse().unwrap();
        assert_eq!(named.config(&defaults, 256).kernel, SnapKvConfig::default().kernel);
        let run_default = run_options(&["--preset", "default"]);
        assert_eq!(bare.config(&run_default, 256).kernel, SnapKvConfig::default().kernel);
        let snap: MethodSpec = "snapkv".parse().unwrap();
        assert_eq!(snap.config(&defaults, 256), {
            let mut c = SnapKvConfig::default();
            c.budget = snapkv::Budget::Cells(256);
            c
        });
    }
}
