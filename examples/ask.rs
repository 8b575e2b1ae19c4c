//! Ask a question about a long document, with the KV cache compressed to a
//! fixed number of cells before the answer is generated.
//!
//! ```sh
//! cargo run --release --example ask -- DOCUMENT.txt "What is the number for amber?"
//! cargo run --release --example ask -- DOCUMENT.txt "..." --model models/SmolLM2-135M-Instruct.Q4_1.gguf --budget 512
//! ```
//!
//! The document comes first and the question last (SnapKV's window votes
//! with the prompt's last tokens), in the model's chat template. The
//! selection is `Preset::Facts` with a 16-token draft: the settings that
//! kept the most facts on the evaluation suite (docs/evaluation.md).

use std::process::ExitCode;

use snapkv::{
    generate, init_backend, Budget, ChatMessage, Compressor, Context, ContextParams, Model, ModelParams, Preset,
    Sampler, WindowObserver,
};

const USAGE: &str = "usage: ask DOCUMENT QUESTION [--model GGUF] [--budget CELLS] [--threads N]";

struct Args {
    document: String,
    question: String,
    model: String,
    budget: usize,
    threads: Option<i32>,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut args = Args {
        document: String::new(),
        question: String::new(),
        model: "models/qwen2.5-coder-0.5b-instruct.gguf".into(),
        budget: 1024,
        threads: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--model" => args.model = value("--model")?,
            "--budget" => args.budget = value("--budget")?.parse().map_err(|e| format!("--budget: {e}"))?,
            "--threads" => args.threads = Some(value("--threads")?.parse().map_err(|e| format!("--threads: {e}"))?),
            "-h" | "--help" => return Err(USAGE.into()),
            _ => positional.push(arg),
        }
    }
    let [document, question] = <[String; 2]>::try_from(positional).map_err(|_| USAGE.to_string())?;
    args.document = document;
    args.question = question;
    Ok(args)
}

fn run(args: &Args) -> snapkv::Result<()> {
    let model = Model::load(init_backend(), &args.model, &ModelParams::default())?;
    let document = std::fs::read_to_string(&args.document)?;
    let prompt = model.apply_chat_template(&[ChatMessage::user(format!("{document}\n\n{}", args.question))], true)?;
    let tokens = model.tokenize(&prompt, true, true)?;

    let mut config = Preset::Facts.config();
    config.budget = Budget::Cells(args.budget);
    config.draft = 16;
    let compressor = Compressor::new(config)?;

    // The observer is attached before the context is created; the context
    // holds the whole prompt until it is compressed, then the answer.
    let answer_tokens = 128;
    let n_ctx = (tokens.len() + answer_tokens + 16) as u32;
    let mut params = ContextParams::default()
        .with_n_ctx(n_ctx)
        .with_observer(WindowObserver::new());
    if let Some(n) = args.threads {
        params = params.with_threads(n);
    }
    let mut ctx = Context::new(&model, &params)?;
    let stats = compressor.prefill(&mut ctx, 0, &tokens)?;
    eprintln!(
        "prompt: {} tokens; KV cache {} -> {} cells per KV head ({:.1} -> {:.1} MiB), compression {:.2} s",
        tokens.len(),
        stats.cells_before,
        stats.cells_after,
        stats.bytes_before as f64 / 1048576.0,
        stats.bytes_after as f64 / 1048576.0,
        stats.overhead_seconds()
    );

    let out = generate(
        &mut ctx,
        0,
        &mut Sampler::greedy(),
        tokens.len() as i32,
        answer_tokens,
        true,
    )?;
    println!("{}", model.detokenize(&out.tokens, false)?);
    eprintln!(
        "answer: {} tokens at {:.1} tok/s",
        out.tokens.len(),
        out.tokens_per_second()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
