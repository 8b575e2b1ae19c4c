//! A program on llama-cpp-2 whose KV cache snapkv compresses: it loads the
//! model, creates the context, decodes and samples with llama-cpp-2's own
//! types, exactly as it would without snapkv. The only additions are
//! `snapkv::linked::enable` before the first context and the link option in
//! build.rs. The binary holds one llama.cpp: the one llama-cpp-sys-2 built.
//!
//! ```sh
//! cd examples/llama-cpp-2
//! cargo run --release -- DOCUMENT.txt "What is the pass key?" --model ../../models/qwen2.5-coder-0.5b-instruct.gguf
//! ```
//!
//! The answer goes to stdout; snapkv's line for the compression (cells per
//! KV head before and after, memory, time) to stderr. `--full` runs the
//! same program without compression.

use std::num::NonZeroU32;
use std::process::ExitCode;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use snapkv::linked::{enable, LinkedSettings};
use snapkv::{Budget, SnapKvConfig};

const USAGE: &str =
    "usage: snapkv-llama-cpp-2-example DOCUMENT QUESTION [--model GGUF] [--budget CELLS] [--threads N] [--full]";

struct Args {
    document: String,
    question: String,
    model: String,
    budget: usize,
    threads: i32,
    full: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut args = Args {
        document: String::new(),
        question: String::new(),
        model: "../../models/qwen2.5-coder-0.5b-instruct.gguf".into(),
        budget: 1024,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get() as i32),
        full: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--model" => args.model = value("--model")?,
            "--budget" => args.budget = value("--budget")?.parse().map_err(|_| "--budget: cells")?,
            "--threads" => args.threads = value("--threads")?.parse().map_err(|_| "--threads: a number")?,
            "--full" => args.full = true,
            "-h" | "--help" => return Err(USAGE.into()),
            _ if arg.starts_with("--") => return Err(format!("unknown option {arg}\n{USAGE}")),
            _ => positional.push(arg),
        }
    }
    let [document, question] = <[String; 2]>::try_from(positional).map_err(|_| USAGE.to_string())?;
    args.document = std::fs::read_to_string(&document).map_err(|e| format!("{document}: {e}"))?;
    args.question = question;
    Ok(args)
}

fn run(args: Args) -> Result<String, Box<dyn std::error::Error>> {
    // snapkv: compress every prompt to `budget` cells per KV head, before
    // the first context exists.
    if !args.full {
        let mut config = SnapKvConfig::default();
        config.budget = Budget::Cells(args.budget);
        enable(LinkedSettings::new(config))?;
    }

    // From here on, a llama-cpp-2 program like any other.
    let mut backend = LlamaBackend::init()?;
    backend.void_logs();
    let model = LlamaModel::load_from_file(&backend, &args.model, &LlamaModelParams::default())?;
    let template = model.chat_template(None)?;
    let message = LlamaChatMessage::new("user".into(), format!("{}\n\n{}", args.document, args.question))?;
    let prompt = model.apply_chat_template(&template, &[message], true)?;
    let vocab = model.vocab();
    // The template already holds the model's special tokens.
    let tokens = vocab.tokenize(prompt.as_bytes(), false, true);

    let max_answer = 48;
    let n_batch = 2048;
    let n_ctx = u32::try_from(tokens.len() + max_answer)?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_threads(args.threads)
        .with_n_threads_batch(args.threads);
    let mut ctx = model.new_context(&backend, params)?;

    // The prompt, in batches of n_batch tokens; logits for its last token.
    let mut batch = LlamaBatch::new(n_batch as usize, 1);
    for (c, chunk) in tokens.chunks(n_batch as usize).enumerate() {
        batch.clear();
        for (i, &token) in chunk.iter().enumerate() {
            let pos = (c * n_batch as usize + i) as i32;
            batch.add(token, pos, &[0], pos as usize == tokens.len() - 1)?;
        }
        ctx.decode(&mut batch)?;
    }

    // Greedy answer, one token per batch: snapkv compresses the prompt
    // right before the first of these batches is decoded.
    let mut sampler = LlamaSampler::greedy();
    let mut answer = Vec::new();
    let mut logits_at = batch.n_tokens() - 1;
    for pos in (tokens.len() as i32..).take(max_answer) {
        let token = sampler.sample(&ctx, logits_at);
        if vocab.is_eog(token) {
            break;
        }
        answer.extend(vocab.token_to_piece(token, false, None));
        batch.clear();
        batch.add(token, pos, &[0], true)?;
        ctx.decode(&mut batch)?;
        logits_at = 0;
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(answer) => {
            println!("{}", answer.trim());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
