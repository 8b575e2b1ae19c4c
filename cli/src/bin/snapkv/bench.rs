//! `snapkv bench`: speed and memory, full cache against compressed, per
//! prompt length: prefill tok/s, the compression's cost (window, observe,
//! score, select, compact), decode tok/s over N tokens, KV cells and bytes
//! in use — plus a fresh prompt of `budget` tokens as the decode ceiling.
//! Writes `bench-<model>.json` and a plot of decode tok/s vs prompt length;
//! `--replot` prints and redraws them from an earlier run's JSON.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use serde::{Deserialize, Serialize};
use snapkv::{generate, init_backend, Model, ModelParams, Sampler};
use snapkv_cli::{branch, generate_task, seq_usage, Haystack, Method, Snapshot, TaskKind, TaskSpec};

use crate::common::{model_stem, observed_context, task_prompt, token_counter, write_json};
use crate::common::{Progress, RunInfo};
use crate::options::ModelOptions;
use crate::options::{MethodOptions, MethodSpec};
use crate::plot::{self, LineChart, Series};

/// Arguments of `snapkv bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelOptions,
    /// Prompt lengths in tokens (of the user message), comma-separated; each above the budget.
    #[arg(long, value_delimiter = ',', default_value = "2000,4000")]
    lengths: Vec<usize>,
    /// Cells kept per KV head (window included); also the length of the fresh prompt.
    #[arg(long, default_value_t = 1024)]
    budget: usize,
    /// Compression method, with optional overrides (e.g. snapkv:kernel=15).
    #[arg(long, default_value = "snapkv")]
    method: MethodSpec,
    /// Tokens to decode per measurement (end-of-generation does not stop it).
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    n_predict: usize,
    /// Also measure the observed-decode hook: evaluate each prompt a second
    /// time, in the same batches, with the observer recording, and compress
    /// from that (costs one more prefill per length).
    #[arg(long)]
    observed: bool,
    /// Output directory for bench-<model>.json and the decode plot.
    #[arg(long, default_value = "results/bench")]
    out: PathBuf,
    /// Measure nothing: read `<out>/bench-<model>.json` of an earlier run (the model named by -m), print
    /// its table and redraw its plot.
    #[arg(long)]
    replot: bool,
    #[command(flatten)]
    snap: MethodOptions,
}

#[derive(Debug, Serialize, Deserialize)]
struct Point {
    length: usize,
    prompt_tokens: usize,
    prefill_tokens_per_second: f64,
    prefill_seconds: f64,
    /// The compressing branch's evaluation of the window, observer armed
    /// (what the re-evaluating hook spends on evaluation).
    window_seconds: f64,
    /// The full branch's evaluation of the same window, observer not armed.
    window_unobserved_seconds: f64,
    observe_seconds: f64,
    score_seconds: f64,
    select_seconds: f64,
    compact_seconds: f64,
    /// Answer tokens drafted (`--draft`; 0 without a draft, and in runs
    /// made before drafts existed).
    #[serde(default)]
    draft_tokens: usize,
    /// Seconds decoding the draft and the prompt's last token again.
    #[serde(default)]
    draft_seconds: f64,
    /// Observe + score + select + compact (+ draft), as a fraction of the prefill (one-call path).
    overhead_fraction: f64,
    /// The re-evaluating hook (`compress_after_prefill`) run on the full
    /// state: (its snapshot + re-evaluation + score + select + compact +
    /// draft) / prefill.
    hook_overhead_fraction: f64,
    /// Seconds of the hook's re-evaluation of the window, observer armed.
    hook_window_seconds: f64,
    decode_full_tokens_per_second: f64,
    decode_compressed_tokens_per_second: f64,
    decode_speedup: f64,
    cells_full: usize,
    cells_compressed: usize,
    kv_bytes_full: usize,
    kv_bytes_compressed: usize,
    kv_ratio: f64,
    /// Compressed decode speed over the fresh prompt's.
    vs_fresh: f64,
    /// With --observed: seconds evaluating the prompt (same batches as
    /// `prefill_seconds`) with the observer recording.
    observed_prefill_seconds: Option<f64>,
    /// With --observed: (observed prefill - prefill + score + select +
    /// compact) / prefill, the cost of the observed-decode hook. Includes the
    /// run-to-run noise of two prefills.
    observed_overhead_fraction: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Fresh {
    prompt_tokens: usize,
    decode_tokens_per_second: f64,
    cells: usize,
    kv_bytes: usize,
}

#[derive(Serialize)]
struct Report<'a> {
    info: RunInfo,
    #[serde(flatten)]
    measured: &'a Measured<'a>,
}

/// What `--replot` reads back of a bench report.
#[derive(Deserialize)]
struct SavedReport {
    method: String,
    budget: usize,
    decode_tokens: usize,
    fresh: Fresh,
    points: Vec<Point>,
}

/// What a run measured: the report's fields besides `info`, which the table
/// and the plot show.
#[derive(Serialize)]
struct Measured<'a> {
    method: &'a str,
    budget: usize,
    decode_tokens: usize,
    fresh: &'a Fresh,
    points: &'a [Point],
}

/// Runs `snapkv bench`.
pub fn run(args: &BenchArgs) -> snapkv::Result<()> {
    if args.replot {
        return replot(args);
    }
    args.method.refuse_lookahead("bench")?;
    let w = args.snap.window;
    let model = Model::load(init_backend(), &args.model.model, &ModelParams::default())?;
    let method = args.method.method(&args.snap, args.budget)?;
    let n = args.n_predict.max(2);
    let mut count = token_counter(&model);
    let prompts = args
        .lengths
        .iter()
        .map(|&length| {
            let spec = TaskSpec::new(TaskKind::Passkey, length, 0.5, 1);
            let task = generate_task(&spec, &Haystack::Builtin, &mut count);
            task_prompt(&model, &task, w).map(|p| (length, p.tokens))
        })
        .collect::<snapkv::Result<Vec<_>>>()?;
    let longest = prompts.iter().map(|(_, t)| t.len()).max().unwrap_or(0).max(args.budget);
    let mut ctx = observed_context(&model, &args.model, longest + n + 64)?;
    let chunk = ctx.n_ubatch();

    // The ceiling: a fresh prompt of `budget` tokens (the start of the longest prompt).
    let fresh_tokens = &prompts
        .iter()
        .max_by_key(|(_, t)| t.len())
        .map(|(_, t)| t.clone())
        .unwrap_or_default();
    let fresh_tokens = &fresh_tokens[..args.budget.min(fresh_tokens.len())];
    ctx.seq_rm(0, -1, -1);
    ctx.decode_tokens(0, fresh_tokens, 0, true)?;
    let usage = seq_usage(&ctx, 0)?;
    let gen = generate(&mut ctx, 0, &mut Sampler::greedy(), fresh_tokens.len() as i32, n, false)?;
    let fresh = Fresh {
        prompt_tokens: fresh_tokens.len(),
        decode_tokens_per_second: gen.tokens_per_second(),
        cells: usage.cells,
        kv_bytes: usage.kv_bytes,
    };
    eprintln!(
        "fresh {}-token prompt: decode {:.1} tok/s",
        fresh.prompt_tokens, fresh.decode_tokens_per_second
    );

    let mut points = Vec::new();
    for (length, tokens) in &prompts {
        let p = tokens.len();
        let mut bar = Progress::new(format!("prefill {length}"), p - w);
        let snapshot = Snapshot::capture(&mut ctx, 0, tokens, w, chunk, |d| bar.set(d))?;
        bar.finish(p - w);
        let full = branch(&mut ctx, &snapshot, &Method::Full)?;
        let gen_full = generate(&mut ctx, 0, &mut Sampler::greedy(), p as i32, n, false)?;
        let comp = branch(&mut ctx, &snapshot, &method)?;
        let gen_comp = generate(&mut ctx, 0, &mut Sampler::greedy(), p as i32, n, false)?;
        let s = comp.stats.clone().ok_or_else(|| snapkv::Error::InvalidArgument {
            param: "method",
            reason: "bench needs a compressing method".into(),
        })?;
        if !s.compressed {
            eprintln!(
                "warning: {p}-token prompt fits the budget ({}): not compressed",
                args.budget
            );
        }
        // The full branch's window evaluation stands for the prompt's last w tokens.
        let prefill_seconds = snapshot.prefill_seconds + full.window_seconds;
        let observed = match (&method, args.observed) {
            (Method::Compress(c), true) => Some(observed_run(&mut ctx, c, tokens, w, chunk, *length)?),
            _ => None,
        };
        let hook = match &method {
            Method::Compress(c) => {
                // The re-evaluating hook as a host calls it: on the full
                // state, given the whole prompt.
                branch(&mut ctx, &snapshot, &Method::Full)?;
                Some(c.compress_after_prefill(&mut ctx, 0, tokens)?)
            }
            Method::Full => None,
        };
        let (hook_window_seconds, hook_total) = hook.as_ref().map_or((0.0, 0.0), |h| {
            (
                h.window_seconds,
                // The observer's copying is part of the window's evaluation.
                h.window_seconds + h.overhead_seconds() - h.observe_seconds,
            )
        });
        let point = Point {
            length: *length,
            prompt_tokens: p,
            prefill_tokens_per_second: p as f64 / prefill_seconds,
            prefill_seconds,
            window_seconds: s.window_seconds,
            window_unobserved_seconds: full.window_seconds,
            observe_seconds: s.observe_seconds,
            score_seconds: s.score_seconds,
            select_seconds: s.select_seconds,
            compact_seconds: s.compact_seconds,
            draft_tokens: s.draft_tokens,
            draft_seconds: s.draft_seconds,
            overhead_fraction: s.overhead_seconds() / prefill_seconds,
            hook_overhead_fraction: hook_total / prefill_seconds,
            hook_window_seconds,
            decode_full_tokens_per_second: gen_full.tokens_per_second(),
            decode_compressed_tokens_per_second: gen_comp.tokens_per_second(),
            decode_speedup: gen_comp.tokens_per_second() / gen_full.tokens_per_second().max(1e-9),
            cells_full: full.usage.cells,
            cells_compressed: comp.usage.cells,
            kv_bytes_full: full.usage.kv_bytes,
            kv_bytes_compressed: comp.usage.kv_bytes,
            kv_ratio: full.usage.kv_bytes as f64 / comp.usage.kv_bytes.max(1) as f64,
            vs_fresh: gen_comp.tokens_per_second() / fresh.decode_tokens_per_second.max(1e-9),
            observed_prefill_seconds: observed.as_ref().map(|o| o.0),
            observed_overhead_fraction: observed.as_ref().map(|(t, os)| {
                (t - prefill_seconds + os.score_seconds + os.select_seconds + os.compact_seconds) / prefill_seconds
            }),
        };
        eprintln!(
            "{length}: decode full {:.1} tok/s, {} {:.1} tok/s, overhead {:.2}% of prefill",
            point.decode_full_tokens_per_second,
            args.method.label,
            point.decode_compressed_tokens_per_second,
            100.0 * point.overhead_fraction
        );
        points.push(point);
    }

    let measured = Measured {
        method: &args.method.label,
        budget: args.budget,
        decode_tokens: n,
        fresh: &fresh,
        points: &points,
    };
    print_report(&measured);
    let stem = model_stem(&args.model.model);
    write_json(
        &args.out.join(format!("bench-{stem}.json")),
        &Report {
            info: RunInfo::new(&model, &args.model),
            measured: &measured,
        },
    )?;
    decode_chart(&args.out, &stem, &measured);
    Ok(())
}

/// `--replot`: the table and plot of the run recorded in
/// `<out>/bench-<model>.json`.
fn replot(args: &BenchArgs) -> snapkv::Result<()> {
    let stem = model_stem(&args.model.model);
    let path = args.out.join(format!("bench-{stem}.json"));
    let saved: SavedReport =
        serde_json::from_slice(&std::fs::read(&path)?).map_err(|e| snapkv::Error::InvalidArgument {
            param: "replot",
            reason: format!("{} is not a bench report: {e}", path.display()),
        })?;
    let measured = Measured {
        method: &saved.method,
        budget: saved.budget,
        decode_tokens: saved.decode_tokens,
        fresh: &saved.fresh,
        points: &saved.points,
    };
    print_report(&measured);
    decode_chart(&args.out, &stem, &measured);
    Ok(())
}

/// The table, then the costs of both hooks per length.
fn print_report(m: &Measured<'_>) {
    print_table(m);
    for p in m.points.iter().filter(|p| p.draft_tokens > 0) {
        println!(
            "draft at {} tokens: {} answer tokens decoded on the first compressed cache in {:.3} s (in overhead; \
             the second selection is in score and compact)",
            p.prompt_tokens, p.draft_tokens, p.draft_seconds
        );
    }
    for p in m.points {
        println!(
            "re-evaluating hook at {} tokens: window evaluated again in {:.3} s, snapshot + score + select + \
             compact (+ draft) {:.3} s; cost {:.2}% of prefill",
            p.prompt_tokens,
            p.hook_window_seconds,
            p.hook_overhead_fraction * p.prefill_seconds - p.hook_window_seconds,
            100.0 * p.hook_overhead_fraction
        );
    }
    for p in m.points {
        if let (Some(t), Some(f)) = (p.observed_prefill_seconds, p.observed_overhead_fraction) {
            println!(
                "observed-decode hook at {} tokens: prefill {:.2} s recording vs {:.2} s not; cost {:.2}% of prefill",
                p.prompt_tokens,
                t,
                p.prefill_seconds,
                100.0 * f
            );
        }
    }
}

/// Decode tok/s against prompt length: full cache, compressed, and the fresh
/// prompt's ceiling, as `<out>/decode-<model>.svg` and `.png`.
fn decode_chart(out: &std::path::Path, stem: &str, m: &Measured<'_>) {
    let xs: Vec<f64> = m.points.iter().map(|p| p.prompt_tokens as f64).collect();
    let series = vec![
        Series {
            name: "full cache".into(),
            points: xs
                .iter()
                .zip(m.points)
                .map(|(&x, p)| (x, p.decode_full_tokens_per_second))
                .collect(),
        },
        Series {
            name: format!("{} @ {} cells", m.method, m.budget),
            points: xs
                .iter()
                .zip(m.points)
                .map(|(&x, p)| (x, p.decode_compressed_tokens_per_second))
                .collect(),
        },
        Series {
            name: format!("fresh {}-token prompt", m.fresh.prompt_tokens),
            points: xs.iter().map(|&x| (x, m.fresh.decode_tokens_per_second)).collect(),
        },
    ];
    plot::report(plot::line_chart(
        &out.join(format!("decode-{stem}")),
        &LineChart {
            title: format!("decode speed after the prompt · {stem}"),
            axes: ("prompt length (tokens)", "decode tokens/s"),
            series,
            log2_x: false,
            y_max: None,
        },
    ));
}

fn print_table(m: &Measured<'_>) {
    let (fresh, points) = (m.fresh, m.points);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n{} @ {} cells, decode over {} tokens; fresh {}-token prompt decodes at {:.1} tok/s",
        m.method, m.budget, m.decode_tokens, fresh.prompt_tokens, fresh.decode_tokens_per_second
    );
    let _ = writeln!(
        s,
        "{:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8} {:>7} {:>8} {:>7} {:>7} {:>8} {:>8} {:>6}",
        "prompt",
        "prefill/s",
        "window s",
        "observe",
        "score",
        "compact",
        "overhead",
        "full/s",
        "comp/s",
        "speedup",
        "vs fresh",
        "cells",
        "cells",
        "MiB",
        "MiB",
        "ratio"
    );
    for p in points {
        let _ = writeln!(
            s,
            "{:>7} {:>9.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.2}% {:>8.1} {:>8.1} {:>6.2}x {:>7.0}% {:>7} {:>7} {:>8.1} {:>8.1} {:>5.1}x",
            p.prompt_tokens,
            p.prefill_tokens_per_second,
            p.window_seconds,
            p.observe_seconds,
            p.score_seconds + p.select_seconds,
            p.compact_seconds,
            100.0 * p.overhead_fraction,
            p.decode_full_tokens_per_second,
            p.decode_compressed_tokens_per_second,
            p.decode_speedup,
            100.0 * p.vs_fresh,
            p.cells_full,
            p.cells_compressed,
            p.kv_bytes_full as f64 / 1048576.0,
            p.kv_bytes_compressed as f64 / 1048576.0,
            p.kv_ratio
        );
    }
    let _ = writeln!(
        s,
        "(cells and MiB: full, then compressed; overhead = observe + score + select + compact (+ draft) over prefill)"
    );
    print!("{s}");
}

/// Evaluates `tokens` again into sequence 0, in the batches the snapshot and
/// the window branch used, with the observer recording; then compresses
/// from what it recorded. Returns the evaluation seconds and the stats.
fn observed_run(
    ctx: &mut snapkv::Context<'_>,
    compressor: &snapkv::Compressor,
    tokens: &[snapkv::llama::Token],
    w: usize,
    chunk: usize,
    length: usize,
) -> snapkv::Result<(f64, snapkv::CompressionStats)> {
    let p = tokens.len();
    ctx.seq_rm(0, -1, -1);
    let mut bar = Progress::new(format!("observed {length}"), p);
    compressor.observe_decodes(ctx)?;
    let t0 = std::time::Instant::now();
    let mut done = 0;
    for part in tokens[..p - w].chunks(chunk.max(1)) {
        ctx.decode_tokens(0, part, done as i32, false)?;
        done += part.len();
        bar.set(done);
    }
    ctx.decode_tokens(0, &tokens[p - w..], (p - w) as i32, true)?;
    ctx.synchronize();
    let seconds = t0.elapsed().as_secs_f64();
    bar.finish(p);
    let stats = compressor.compress_observed(ctx, 0)?;
    Ok((seconds, stats))
}
