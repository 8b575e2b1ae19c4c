//! `snapkv fidelity`: how close a compressed cache's next-token
//! distributions stay to the full cache's. The full cache greedily
//! continues a long prompt for N tokens; that continuation is then
//! teacher-forced through every method (branched from one evaluation of the
//! prompt) and through llama.cpp's quantized KV caches (their own contexts,
//! flash attention on, nothing evicted). Reported per row: mean and max KL
//! divergence from the full cache (nats/token), top-1 agreement, KV cells
//! and memory.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;
use snapkv::{generate, init_backend, CacheType, ChatMessage, Context, FlashAttention, Model, ModelParams, Sampler};
use snapkv_cli::{
    agreement, branch, continuation_distributions, generate_task, seq_usage, Agreement, Haystack, Method, PromptLayout,
    SeqUsage, Snapshot, TaskKind, TaskSpec,
};

use crate::common::{context_params, model_stem, observed_context, task_prompt, token_counter};
use crate::common::{write_json, write_text, Progress, RunInfo};
use crate::options::{parse_cache_type, ModelOptions};
use crate::options::{MethodOptions, MethodSpec};

/// Arguments of `snapkv fidelity`.
#[derive(Debug, Args)]
pub struct FidelityArgs {
    #[command(flatten)]
    model: ModelOptions,
    /// Approximate prompt length in tokens (generated documents).
    #[arg(long, default_value_t = 4000)]
    length: usize,
    /// Use a suite task's prompt (passkey, multikey, multivalue, vartrack) instead of a document to summarise.
    #[arg(long)]
    task: Option<TaskKind>,
    /// Depth of the task's needles (with --task).
    #[arg(long, default_value_t = 0.5)]
    depth: f64,
    /// Seed of the generated document.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// With --task: the order of question and answer instructions after the document: question-last (the question ends
    /// the prompt, inside the observation window) or instructions-last (a long answer instruction ends it).
    #[arg(long, default_value = "question-last")]
    layout: PromptLayout,
    /// Filler from a text file instead of built-in sentences.
    #[arg(long)]
    haystack: Option<PathBuf>,
    /// Use this file's text as the document (instead of generated filler).
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// The request after the document (without --task).
    #[arg(
        long,
        default_value = "Summarize the document above in detail, in several paragraphs."
    )]
    question: String,
    /// Tokens of the full cache's greedy continuation to teacher-force.
    #[arg(short = 'n', long = "n-predict", default_value_t = 64)]
    n_predict: usize,
    /// Methods, comma-separated (the full cache is the reference and always runs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "snapkv,snapkv-shared-layer,snapkv-shared-all,streaming,random"
    )]
    methods: Vec<MethodSpec>,
    /// Budgets in cells per KV head, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    budgets: Vec<usize>,
    /// Quantized KV cache types to compare (K and V both), comma-separated; `--quant` with no value for none.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "q8_0,q4_0", value_parser = parse_cache_type)]
    quant: Vec<CacheType>,
    /// Output directory for fidelity-<model>.json and table.txt (the printed table).
    #[arg(long, default_value = "results/fidelity")]
    out: PathBuf,
    #[command(flatten)]
    snap: MethodOptions,
}

#[derive(Debug, Serialize)]
struct Row {
    cache: String,
    method: String,
    budget: Option<usize>,
    cells: usize,
    kv_bytes: usize,
    kv_ratio: f64,
    mean_kl: f64,
    max_kl: f64,
    top1: f64,
    positions: usize,
}

#[derive(Serialize)]
struct Report<'a> {
    info: RunInfo,
    prompt_tokens: usize,
    continuation_tokens: usize,
    continuation: String,
    rows: &'a [Row],
}

/// Runs `snapkv fidelity`.
pub fn run(args: &FidelityArgs) -> snapkv::Result<()> {
    for spec in &args.methods {
        spec.refuse_lookahead("fidelity")?;
    }
    let w = args.snap.window;
    let model = Model::load(init_backend(), &args.model.model, &ModelParams::default())?;
    let tokens = prompt_tokens(args, &model)?;
    let p = tokens.len();
    let n = args.n_predict.max(1);
    let mut ctx = observed_context(&model, &args.model, p + n + 64)?;
    let chunk = ctx.n_ubatch();
    let mut bar = Progress::new("prefill ", p - w);
    let snapshot = Snapshot::capture(&mut ctx, 0, &tokens, w, chunk, |d| bar.set(d))?;
    bar.finish(p - w);

    // The reference: the full cache's greedy continuation and its distributions.
    branch(&mut ctx, &snapshot, &Method::Full)?;
    let gen = generate(&mut ctx, 0, &mut Sampler::greedy(), p as i32, n, true)?;
    let cont = gen.tokens;
    let continuation = model.detokenize(&cont, false)?;
    eprintln!("continuation ({} tokens): {:?}", cont.len(), continuation);
    let full = branch(&mut ctx, &snapshot, &Method::Full)?;
    let reference = continuation_distributions(&mut ctx, 0, p as i32, &cont)?;
    let mut rows = Vec::new();
    let full_bytes = full.usage.kv_bytes.max(1);
    let push = |rows: &mut Vec<Row>, cache: String, method: &str, budget, usage: SeqUsage, agr: Agreement| {
        rows.push(Row {
            cache,
            method: method.to_string(),
            budget,
            cells: usage.cells,
            kv_bytes: usage.kv_bytes,
            kv_ratio: full_bytes as f64 / usage.kv_bytes.max(1) as f64,
            mean_kl: agr.mean_kl(),
            max_kl: agr.max_kl(),
            top1: agr.top1(),
            positions: agr.n(),
        })
    };
    push(
        &mut rows,
        "f16".into(),
        "full",
        None,
        full.usage,
        agreement(&reference, &reference),
    );

    for spec in args.methods.iter().filter(|m| !m.is_full()) {
        for &budget in &args.budgets {
            let method = spec.method(&args.snap, budget)?;
            let b = branch(&mut ctx, &snapshot, &method)?;
            let agr = compare(&mut ctx, p, &cont, &reference)?;
            eprintln!(
                "{} @ {budget}: mean KL {:.5}, top-1 {:.1}%",
                spec.label,
                agr.mean_kl(),
                100.0 * agr.top1()
            );
            push(&mut rows, "f16".into(), &spec.label, Some(budget), b.usage, agr);
        }
    }
    drop(ctx);

    for &q in &args.quant {
        let params = context_params(
            &args.model,
            ((p + n + 64).next_multiple_of(256) as u32).max(args.model.ctx_size),
        )
        .with_cache_types(q, q)
        .with_flash_attn(FlashAttention::On);
        let mut qctx = Context::new(&model, &params)?;
        let mut bar = Progress::new(format!("{} prefill", q.name()), p);
        let mut done = 0;
        for part in tokens.chunks(chunk) {
            let last = done + part.len() == p;
            qctx.decode_tokens(0, part, done as i32, last)?;
            done += part.len();
            bar.set(done);
        }
        bar.finish(p);
        let usage = seq_usage(&qctx, 0)?;
        let agr = compare(&mut qctx, p, &cont, &reference)?;
        eprintln!(
            "{} KV cache: mean KL {:.5}, top-1 {:.1}%",
            q.name(),
            agr.mean_kl(),
            100.0 * agr.top1()
        );
        push(&mut rows, q.name().into(), "full", None, usage, agr);
    }

    write_table(&args.out, &rows, p, cont.len())?;
    let path = args
        .out
        .join(format!("fidelity-{}.json", model_stem(&args.model.model)));
    write_json(
        &path,
        &Report {
            info: RunInfo::new(&model, &args.model),
            prompt_tokens: p,
            continuation_tokens: cont.len(),
            continuation,
            rows: &rows,
        },
    )
}

fn prompt_tokens(args: &FidelityArgs, model: &Model) -> snapkv::Result<Vec<snapkv::llama::Token>> {
    let haystack = match &args.haystack {
        Some(p) => Haystack::from_text(p.display().to_string(), &std::fs::read_to_string(p)?).map_err(|reason| {
            snapkv::Error::InvalidArgument {
                param: "haystack",
                reason,
            }
        })?,
        None => Haystack::Builtin,
    };
    if let Some(kind) = args.task {
        let spec = TaskSpec {
            layout: args.layout,
            ..TaskSpec::new(kind, args.length, args.depth, args.seed)
        };
        let task = generate_task(&spec, &haystack, &mut token_counter(model));
        return Ok(task_prompt(model, &task, args.snap.window)?.tokens);
    }
    let document = match &args.file {
        Some(f) => std::fs::read_to_string(f)?,
        None => {
            // A document of filler alone: a passkey instance's text without its
            // request. The request still sizes the filler; instructions-last
            // keeps the documents of the results in results/fidelity.
            let spec = TaskSpec {
                layout: PromptLayout::InstructionsLast,
                ..TaskSpec::new(TaskKind::Passkey, args.length, 0.5, args.seed)
            };
            let task = generate_task(&spec, &haystack, &mut token_counter(model));
            task.user_message[..task.question_start].to_string()
        }
    };
    let text = model.apply_chat_template(
        &[ChatMessage::user(format!("{}\n\n{}", document.trim(), args.question))],
        true,
    )?;
    model.tokenize(&text, true, true)
}

fn compare(ctx: &mut snapkv::ContextRef, p: usize, cont: &[i32], reference: &[Vec<f32>]) -> snapkv::Result<Agreement> {
    Ok(agreement(
        reference,
        &continuation_distributions(ctx, 0, p as i32, cont)?,
    ))
}

/// Prints the table of `rows` and writes it to `<out>/table.txt`.
fn write_table(out: &std::path::Path, rows: &[Row], p: usize, n: usize) -> snapkv::Result<()> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nfidelity to the full f16 cache over {n} teacher-forced tokens after a {p}-token prompt:"
    );
    let width = rows.iter().map(|r| r.method.len()).max().unwrap_or(0).max(20);
    let _ = writeln!(
        s,
        "{:<6} {:<width$} {:>7} {:>8} {:>8} {:>8} {:>11} {:>10} {:>7}",
        "cache", "method", "budget", "cells", "KV MiB", "saving", "mean KL", "max KL", "top-1"
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:<6} {:<width$} {:>7} {:>8} {:>8.2} {:>7.1}x {:>11.5} {:>10.4} {:>6.1}%",
            r.cache,
            r.method,
            r.budget.map_or_else(|| "-".into(), |b| b.to_string()),
            r.cells,
            r.kv_bytes as f64 / 1048576.0,
            r.kv_ratio,
            r.mean_kl,
            r.max_kl,
            100.0 * r.top1
        );
    }
    print!("{s}");
    write_text(&out.join("table.txt"), s.trim_start())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: super::FidelityArgs,
    }

    #[test]
    fn quant_rows_default_to_q8_0_and_q4_0_and_can_be_turned_off() {
        let default = Wrapper::try_parse_from(["fidelity"]).unwrap();
        let names: Vec<&str> = default.args.quant.iter().map(|q| q.name()).collect();
        assert_eq!(names, ["q8_0", "q4_0"]);
        let none = Wrapper::try_parse_from(["fidelity", "--quant"]).unwrap();
        assert!(none.args.quant.is_empty());
        let one = Wrapper::try_parse_from(["fidelity", "--quant", "q8_0"]).unwrap();
        assert_eq!(one.args.quant.len(), 1);
        assert!(Wrapper::try_parse_from(["fidelity", "--quant", "q9"]).is_err());
    }
}
