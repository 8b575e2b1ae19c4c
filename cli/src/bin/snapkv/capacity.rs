//! `snapkv capacity`: in one context of fixed size (one KV buffer shared by
//! all sequences), how many concurrent long sequences fit — each prompt
//! evaluated in full, then (with compression) compressed before the next
//! one — until llama.cpp finds no KV slot for the next prompt; then every
//! sequence that fitted answers its passkey question from the shared
//! context, so the count says how many sequences fit *and still work*.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use snapkv::llama::Token;
use snapkv::{generate, init_backend, Batch, Context, Error, Model, ModelParams, Sampler, WindowObserver};
use snapkv_cli::{generate_task, seq_usage, Haystack, Method, TaskKind, TaskSpec};

use crate::common::{context_params, model_stem, task_prompt, token_counter, write_json, RunInfo};
use crate::options::ModelOptions;
use crate::options::{MethodOptions, MethodSpec};

/// Arguments of `snapkv capacity`.
#[derive(Debug, Args)]
pub struct CapacityArgs {
    #[command(flatten)]
    model: ModelOptions,
    /// Context size in cells, shared by all sequences (overrides -c).
    #[arg(long = "cells", default_value_t = 4096)]
    cells: u32,
    /// Most sequences the context may hold (llama.cpp's n_seq_max).
    #[arg(long = "n-seq", default_value_t = 32)]
    n_seq: u32,
    /// Prompt length per sequence in tokens (of the user message).
    #[arg(long, default_value_t = 1024)]
    length: usize,
    /// Cells kept per KV head by the compressed sequences (window included).
    #[arg(long, default_value_t = 128)]
    budget: usize,
    /// Most tokens of each sequence's answer.
    #[arg(short = 'n', long = "n-predict", default_value_t = 16)]
    n_predict: usize,
    /// Compression method, with optional overrides (e.g. snapkv:kernel=15).
    #[arg(long, default_value = "snapkv")]
    method: MethodSpec,
    /// Output directory for capacity-<model>.json.
    #[arg(long, default_value = "results/capacity")]
    out: PathBuf,
    #[command(flatten)]
    snap: MethodOptions,
}

#[derive(Debug, Serialize)]
struct Mode {
    mode: String,
    sequences: usize,
    cells_per_sequence: usize,
    kv_bytes_per_sequence: usize,
    seconds: f64,
    stopped_by: String,
    /// Sequences whose answer holds their passkey.
    answers_right: usize,
    /// Sequences asked (all that fitted, unless the context ran out of
    /// cells for the answers).
    answers_checked: usize,
}

#[derive(Serialize)]
struct Report<'a> {
    info: RunInfo,
    context_cells: u32,
    n_seq_max: u32,
    prompt_tokens_min: usize,
    prompt_tokens_max: usize,
    budget: usize,
    modes: &'a [Mode],
}

/// Runs `snapkv capacity`.
pub fn run(args: &CapacityArgs) -> snapkv::Result<()> {
    args.method.refuse_lookahead("capacity")?;
    let model = Model::load(init_backend(), &args.model.model, &ModelParams::default())?;
    let mut count = token_counter(&model);
    let tasks: Vec<_> = (0..args.n_seq as u64)
        .map(|seed| {
            let spec = TaskSpec::new(TaskKind::Passkey, args.length, 0.5, seed);
            generate_task(&spec, &Haystack::Builtin, &mut count)
        })
        .collect();
    let prompts = tasks
        .iter()
        .map(|task| task_prompt(&model, task, args.snap.window).map(|p| p.tokens))
        .collect::<snapkv::Result<Vec<_>>>()?;
    let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let p_min = prompts.iter().map(Vec::len).min().unwrap_or(0);
    let tty = std::io::stderr().is_terminal();
    let mut modes = Vec::new();
    let full: MethodSpec = "full".parse().expect("full is always a method");
    for spec in [&full, &args.method] {
        let name = spec.label.as_str();
        let method = spec.method(&args.snap, args.budget)?;
        let mut params = context_params(&args.model, args.cells).with_n_seq_max(args.n_seq);
        params.kv_unified = true;
        if name != "full" {
            params = params.with_observer(WindowObserver::new());
        }
        let mut ctx = Context::new(&model, &params)?;
        let t0 = Instant::now();
        let mut fitted = 0;
        let mut stopped_by = format!("n_seq_max ({})", args.n_seq);
        let mut usage = None;
        let mut sampler = Sampler::greedy();
        // Each fitted sequence's first answer token, sampled from its own
        // prompt's logits before the next prompt overwrites them.
        let mut first_tokens = Vec::new();
        for (s, tokens) in prompts.iter().enumerate() {
            let seq = s as i32;
            let result = match &method {
                Method::Full => ctx.decode_tokens(seq, tokens, 0, true),
                Method::Compress(c) => c.prefill(&mut ctx, seq, tokens).map(|_| ()),
            };
            match result {
                Ok(()) => {
                    fitted += 1;
                    first_tokens.push(sampler.sample(&mut ctx, -1)?);
                    if usage.is_none() {
                        usage = Some(seq_usage(&ctx, seq)?);
                    }
                    if tty {
                        eprint!("\r{name}: {fitted} sequences ({:.0} s)", t0.elapsed().as_secs_f64());
                    }
                }
                Err(Error::Decode { code: 1, .. }) => {
                    ctx.seq_rm(seq, -1, -1);
                    stopped_by = "no KV slot (llama_decode returned 1)".into();
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        let seconds = t0.elapsed().as_secs_f64();
        let (answers_right, answers_checked) = answer_all(&mut ctx, &model, &tasks, &first_tokens, args.n_predict)?;
        eprintln!(
            "{}{name}: {fitted} sequences in {seconds:.0} s, {answers_right} of {answers_checked} answered right",
            if tty { "\r" } else { "" },
        );
        let usage = usage.unwrap_or_default();
        let label = if name == "full" {
            "full".to_string()
        } else {
            format!("{name} @ {}", args.budget)
        };
        modes.push(Mode {
            mode: label,
            sequences: fitted,
            cells_per_sequence: usage.cells,
            kv_bytes_per_sequence: usage.kv_bytes,
            seconds,
            stopped_by,
            answers_right,
            answers_checked,
        });
    }
    println!(
        "\none context of {} cells (kv_unified, n_seq_max {}), prompts of {p_min}-{p} tokens:",
        args.cells, args.n_seq
    );
    println!(
        "{:<20} {:>10} {:>14} {:>12} {:>14}  stopped by",
        "cache", "sequences", "cells per seq", "MiB per seq", "right answers"
    );
    for m in &modes {
        println!(
            "{:<20} {:>10} {:>14} {:>12.2} {:>14}  {}",
            m.mode,
            m.sequences,
            m.cells_per_sequence,
            m.kv_bytes_per_sequence as f64 / 1048576.0,
            format!("{} / {}", m.answers_right, m.answers_checked),
            m.stopped_by
        );
    }
    if let [full, comp] = &modes[..] {
        if full.sequences > 0 {
            println!(
                "{:.1}x the sequences with compression",
                comp.sequences as f64 / full.sequences as f64
            );
        }
    }
    write_json(
        &args
            .out
            .join(format!("capacity-{}.json", model_stem(&args.model.model))),
        &Report {
            info: RunInfo::new(&model, &args.model),
            context_cells: args.cells,
            n_seq_max: args.n_seq,
            prompt_tokens_min: p_min,
            prompt_tokens_max: p,
            budget: args.budget,
            modes: &modes,
        },
    )
}

/// Lets every fitted sequence `0..first_tokens.len()` answer its task from
/// the shared context, greedily, starting from `first_tokens[s]`; each
/// answer's cells are removed again before the next, so the answers need
/// only `max_tokens` free cells between them. Returns (right, checked):
/// checking stops early only when the context has no cell left for an
/// answer.
fn answer_all(
    ctx: &mut Context,
    model: &Model,
    tasks: &[snapkv_cli::TaskInstance],
    first_tokens: &[Token],
    max_tokens: usize,
) -> snapkv::Result<(usize, usize)> {
    let mut right = 0;
    let mut batch = Batch::new(1, 1)?;
    let mut sampler = Sampler::greedy();
    for (s, (&first, task)) in first_tokens.iter().zip(tasks).enumerate() {
        let seq = s as i32;
        let next = ctx.seq_pos_max(seq).map_or(0, |p| p + 1);
        let mut tokens = vec![first];
        if !model.is_eog(first) && max_tokens > 1 {
            batch.clear();
            batch.add(first, next, &[seq], true)?;
            match ctx.decode(&batch) {
                Ok(()) => {}
                Err(Error::Decode { code: 1, .. }) => return Ok((right, s)),
                Err(e) => return Err(e),
            }
            match generate(ctx, seq, &mut sampler, next + 1, max_tokens - 1, true) {
                Ok(gen) => tokens.extend(gen.tokens),
                Err(Error::Decode { code: 1, .. }) => {
                    ctx.seq_rm(seq, next, -1);
                    return Ok((right, s));
                }
                Err(e) => return Err(e),
            }
            ctx.seq_rm(seq, next, -1);
        }
        if task.score(&model.detokenize(&tokens, false)?) == 1.0 {
            right += 1;
        }
    }
    Ok((right, first_tokens.len()))
}
