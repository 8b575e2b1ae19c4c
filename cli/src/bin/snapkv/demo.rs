//! `snapkv demo`: one long document with hidden facts, evaluated once, and
//! the same question answered from a full cache, a SnapKV cache and a
//! streaming cache of the same size.

use std::path::PathBuf;

use clap::Args;
use snapkv::{generate, init_backend, Model, ModelParams, Sampler};
use snapkv_cli::{branch, generate_task, Haystack, PromptLayout, Snapshot, TaskKind, TaskSpec};

use crate::common::Progress;
use crate::common::{observed_context, short_answer, task_prompt, token_counter};
use crate::options::ModelOptions;
use crate::options::{MethodOptions, MethodSpec};

/// Arguments of `snapkv demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    model: ModelOptions,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 4000)]
    length: usize,
    /// Cells kept per KV head by the compressed caches (window included).
    #[arg(long, default_value_t = 256)]
    budget: usize,
    /// Task: passkey, multikey, multivalue or vartrack.
    #[arg(long, default_value = "multikey")]
    task: TaskKind,
    /// Where the asked fact sits in the document (0 = start, 1 = end).
    #[arg(long, default_value_t = 0.4)]
    depth: f64,
    /// Seed of the document.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The order of question and answer instructions after the document: question-last (the question ends
    /// the prompt, inside the observation window) or instructions-last (a long answer instruction ends it).
    #[arg(long, default_value = "question-last")]
    layout: PromptLayout,
    /// Methods, comma-separated (full, snapkv, snapkv-shared-layer, snapkv-shared-all, streaming, random,
    /// keydiff).
    #[arg(long, value_delimiter = ',', default_value = "full,snapkv,streaming")]
    methods: Vec<MethodSpec>,
    /// Filler from a text file instead of built-in sentences.
    #[arg(long)]
    haystack: Option<PathBuf>,
    /// Most tokens to generate per answer.
    #[arg(short = 'n', long = "n-predict", default_value_t = 32)]
    n_predict: usize,
    #[command(flatten)]
    snap: MethodOptions,
}

/// Runs `snapkv demo`.
pub fn run(args: &DemoArgs) -> snapkv::Result<()> {
    for spec in &args.methods {
        spec.refuse_lookahead("demo")?;
    }
    let haystack = match &args.haystack {
        Some(p) => {
            let text = std::fs::read_to_string(p)?;
            Haystack::from_text(p.display().to_string(), &text).map_err(|reason| snapkv::Error::InvalidArgument {
                param: "haystack",
                reason,
            })?
        }
        None => Haystack::Builtin,
    };
    let model = Model::load(init_backend(), &args.model.model, &ModelParams::default())?;
    let spec = TaskSpec {
        layout: args.layout,
        ..TaskSpec::new(args.task, args.length, args.depth, args.seed)
    };
    let task = generate_task(&spec, &haystack, &mut token_counter(&model));
    let w = args.snap.window;
    let prompt = task_prompt(&model, &task, w)?;
    let n_prompt = prompt.tokens.len();
    let mut ctx = observed_context(&model, &args.model, n_prompt + args.n_predict + 64)?;

    println!("model:    {} ({})", args.model.model.display(), model.description());
    println!(
        "document: {n_prompt} tokens of {} filler with {} hidden facts ({} task, asked fact at depth {:.0}%)",
        haystack.name(),
        task.needles.len(),
        args.task,
        100.0 * args.depth
    );
    let mut bar = Progress::new("prefill ", n_prompt - w);
    let chunk = ctx.n_ubatch();
    let snapshot = Snapshot::capture(&mut ctx, 0, &prompt.tokens, w, chunk, |d| bar.set(d))?;
    bar.finish(n_prompt - w);
    println!(
        "prefill:  {} tokens in {:.1} s ({:.1} tok/s), evaluated once; each cache below branches from this state",
        n_prompt - w,
        snapshot.prefill_seconds,
        (n_prompt - w) as f64 / snapshot.prefill_seconds
    );
    println!("question: {}", task.asked);
    println!("expected: {}", task.answers.join(", "));
    println!();
    println!(
        "{:<20} {:<34} {:>6} {:>9} {:>8} {:>12}",
        "cache", "answer", "right", "KV cells", "KV MiB", "decode tok/s"
    );
    let mut right_full = None;
    for spec in &args.methods {
        let method = spec.method(&args.snap, args.budget)?;
        let b = branch(&mut ctx, &snapshot, &method)?;
        let mut sampler = Sampler::greedy();
        let gen = generate(&mut ctx, 0, &mut sampler, n_prompt as i32, args.n_predict, true)?;
        let text = model.detokenize(&gen.tokens, false)?;
        let score = task.score(&text);
        let right = if score == 1.0 {
            "yes"
        } else if score > 0.0 {
            "part"
        } else {
            "no"
        };
        if spec.is_full() {
            right_full = Some(score);
        }
        let label = if spec.is_full() {
            "full".to_string()
        } else {
            format!("{} @ {}", spec.label, args.budget)
        };
        println!(
            "{:<20} {:<34} {:>6} {:>9} {:>8.1} {:>12.1}",
            label,
            format!("{:?}", short_answer(&text, 30)),
            right,
            b.usage.cells,
            b.usage.kv_mib(),
            gen.tokens_per_second()
        );
        if let Some(s) = b.stats.filter(|s| s.compressed) {
            log::info!(
                "{}: window {:.2} s, observe {:.3} s, score {:.3} s, select {:.4} s, compact {:.3} s",
                spec.label,
                s.window_seconds,
                s.observe_seconds,
                s.score_seconds,
                s.select_seconds,
                s.compact_seconds
            );
        }
    }
    if right_full == Some(0.0) {
        println!("\nnote: the full cache misses this fact too: the model cannot answer it at this length.");
    }
    Ok(())
}
