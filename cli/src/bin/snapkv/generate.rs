//! `snapkv generate`: evaluate a prompt, optionally compress it, generate.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use snapkv::llama::{Pos, Token};
use snapkv::{
    generate, init_backend, ChatMessage, Compressor, Context, ContextParams, Error, Model, ModelParams, Sampler,
    WindowObserver,
};

use crate::options::{ModelOptions, SnapKvOptions};

/// Arguments of `snapkv generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelOptions,
    /// The prompt.
    #[arg(short = 'p', long, conflicts_with = "file", required_unless_present = "file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    /// Sampling seed.
    #[arg(short = 's', long, default_value_t = 42)]
    seed: u32,
    /// Compress the prompt's KV cache with SnapKV before generating.
    #[arg(long)]
    snapkv: bool,
    /// With --snapkv: evaluate the whole prompt first, then compress through the
    /// hook that re-evaluates only the window (the path for callers that
    /// evaluated the prompt themselves).
    #[arg(long, requires = "snapkv")]
    hook: bool,
    /// With --snapkv: evaluate the whole prompt with the observer recording
    /// its last window rows, then compress without re-evaluating anything
    /// (the observed-decode hook).
    #[arg(long, requires = "snapkv", conflicts_with = "hook")]
    observed: bool,
    /// With --snapkv: generate the answer's first N tokens on the full cache,
    /// then compress, so that the observation window ends with them (fewer
    /// than --window). Runs through the observed-decode hook, or with --hook
    /// through the re-evaluating one.
    #[arg(long, requires = "snapkv", default_value_t = 0)]
    lookahead: usize,
    /// Selection method with --snapkv: snapkv, snapkv-shared-layer, snapkv-shared-all, streaming, random,
    /// keydiff, reconstruct (question-agnostic: for a document saved before its questions, --save-state).
    #[arg(long, default_value = "snapkv")]
    method: String,
    /// Save the prompt's cache (compressed with --snapkv) to a file after
    /// evaluating it, with llama.cpp's sequence state format: compress a
    /// document once, before its questions, and answer each later with
    /// --load-state. With --chat the prompt is the document of an open user
    /// turn, so a question can follow it. -n 0 generates nothing.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["lookahead", "load_state"])]
    save_state: Option<PathBuf>,
    /// Load a cache saved with --save-state (the same model), then evaluate
    /// the prompt after it and generate: the prompt is the question. With
    /// --chat it continues the saved user turn and closes it. Nothing is
    /// compressed again.
    #[arg(long, value_name = "FILE", conflicts_with = "snapkv")]
    load_state: Option<PathBuf>,
    #[command(flatten)]
    snap: SnapKvOptions,
}

/// The cells sequence 0 holds.
fn seq_cells(ctx: &Context) -> snapkv::Result<usize> {
    let blob = ctx.state_seq_get(0)?;
    Ok(snapkv::snapkv::SeqState::parse(&blob, &snapkv::compress::model_shape(ctx.model()))?.n_cells())
}

/// The number of tokens saved in a llama.cpp sequence state file (its
/// header: magic `ggsq`, version, token count), so that the context can
/// be sized for them before loading.
fn saved_token_count(path: &std::path::Path) -> snapkv::Result<usize> {
    use std::io::Read;
    let mut header = [0u8; 12];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| Error::InvalidArgument {
            param: "load-state",
            reason: format!("{}: {e}", path.display()),
        })?;
    let word = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    if word(0) != 0x6767_7371 {
        return Err(Error::InvalidArgument {
            param: "load-state",
            reason: format!("{} is not a llama.cpp sequence state file", path.display()),
        });
    }
    Ok(word(8) as usize)
}

/// Runs `snapkv generate`.
pub fn run(args: &GenerateArgs) -> snapkv::Result<()> {
    if args.lookahead > 0 && args.lookahead >= args.snap.method.window {
        return Err(Error::InvalidArgument {
            param: "lookahead",
            reason: format!(
                "{} answer tokens before compressing need a window of more than {} tokens, not {}",
                args.lookahead, args.lookahead, args.snap.method.window
            ),
        });
    }
    let text = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)?,
        (None, None) => unreachable!("clap requires one"),
    };
    let t_load = Instant::now();
    let model = Model::load(init_backend(), &args.model.model, &ModelParams::default())?;
    // A saved document is an open user turn; a loaded one's question
    // continues and closes it.
    let prompt = match (args.chat, &args.save_state, &args.load_state) {
        (false, ..) => text,
        (true, Some(_), _) => model.user_turn_framing()?.0 + &text,
        (true, _, Some(_)) => format!("\n\n{text}{}", model.user_turn_framing()?.1),
        (true, None, None) => model.apply_chat_template(&[ChatMessage::user(text)], true)?,
    };
    // After a loaded state the prompt continues it: no BOS.
    let tokens = model.tokenize(&prompt, args.load_state.is_none(), args.chat)?;
    let saved = match &args.load_state {
        Some(path) => saved_token_count(path)?,
        None => 0,
    };
    let n_ctx = if args.model.ctx_size > 0 {
        args.model.ctx_size
    } else {
        (saved + tokens.len() + args.n_predict + 64).next_multiple_of(256) as u32
    };
    let observer = WindowObserver::new();
    let params = ContextParams::default()
        .with_n_ctx(n_ctx)
        .with_batch(args.model.batch_size, args.model.ubatch_size)
        .with_threads(args.model.threads())
        .with_flash_attn(args.model.flash_attn)
        .with_cache_types(args.model.cache_type_k, args.model.cache_type_v)
        .with_observer(observer);
    let mut ctx = Context::new(&model, &params)?;
    let load_seconds = t_load.elapsed().as_secs_f64();

    let mut sampler = if args.temp > 0.0 {
        Sampler::seeded(args.seed, args.temp, 40, 0.95)
    } else {
        Sampler::greedy()
    };
    // The answer's first tokens, generated on the full cache before compressing.
    let mut answer_start = Vec::new();
    let mut lookahead_seconds = 0.0;

    // The loaded cache's cells, and the position the prompt continues at.
    let (mut start, mut loaded) = (0usize, None);
    if let Some(path) = &args.load_state {
        let t0 = Instant::now();
        let (bytes, saved_tokens) = ctx.state_seq_load_file(path, 0)?;
        start = ctx.seq_pos_max(0).map_or(0, |p| p as usize + 1);
        loaded = Some((bytes, saved_tokens.len(), seq_cells(&ctx)?, t0.elapsed().as_secs_f64()));
    }

    let t_prompt = Instant::now();
    let stats = if args.load_state.is_some() {
        ctx.decode_tokens(0, &tokens, start as Pos, true)?;
        None
    } else if args.snapkv {
        let compressor = Compressor::with_method(args.snap.config(&args.method), &args.method)?;
        if args.hook {
            let t0 = Instant::now();
            ctx.decode_tokens(0, &tokens, 0, true)?;
            let prefill_seconds = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            answer_start = start_answer(&mut ctx, &mut sampler, tokens.len(), args.lookahead)?;
            lookahead_seconds = t1.elapsed().as_secs_f64();
            let mut evaluated = tokens.clone();
            // Only decoded tokens are in the cache (an end-of-generation token is not).
            evaluated.extend(answer_start.iter().filter(|&&t| !model.is_eog(t)));
            let mut s = compressor.compress_after_prefill(&mut ctx, 0, &evaluated)?;
            s.prefill_seconds = prefill_seconds;
            Some(s)
        } else if args.observed || args.lookahead > 0 {
            let t0 = Instant::now();
            compressor.observe_decodes(&ctx)?;
            ctx.decode_tokens(0, &tokens, 0, true)?;
            let prefill_seconds = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            answer_start = start_answer(&mut ctx, &mut sampler, tokens.len(), args.lookahead)?;
            lookahead_seconds = t1.elapsed().as_secs_f64();
            let mut s = compressor.compress_observed(&mut ctx, 0)?;
            s.prefill_seconds = prefill_seconds;
            Some(s)
        } else {
            Some(compressor.prefill(&mut ctx, 0, &tokens)?)
        }
    } else {
        ctx.decode_tokens(0, &tokens, 0, true)?;
        None
    };
    // The look-ahead's decodes are reported on their own line.
    let prompt_seconds = t_prompt.elapsed().as_secs_f64() - lookahead_seconds;
    let saved_file = match &args.save_state {
        Some(path) => {
            let bytes = ctx.state_seq_save_file(path, 0, &tokens)?;
            Some((path, bytes))
        }
        None => None,
    };

    // An answer that ended within the look-ahead is complete.
    let ended = answer_start.last().is_some_and(|&t| model.is_eog(t));
    let decoded_start = answer_start.len() - usize::from(ended);
    let rest = args.n_predict.saturating_sub(answer_start.len());
    let gen = if ended || rest == 0 {
        snapkv::Generation {
            tokens: Vec::new(),
            decode_seconds: 0.0,
            decoded: 0,
        }
    } else {
        generate(
            &mut ctx,
            0,
            &mut sampler,
            (start + tokens.len() + decoded_start) as Pos,
            rest,
            true,
        )?
    };
    let mut answer = answer_start.clone();
    answer.extend(&gen.tokens);
    println!("{}", model.detokenize(&answer, false)?);

    eprintln!();
    eprintln!("model:    {} ({})", args.model.model.display(), model.description());
    eprintln!("load:     {load_seconds:.2} s");
    eprintln!(
        "prompt:   {} tokens in {prompt_seconds:.2} s ({:.1} tok/s, compression included)",
        tokens.len(),
        tokens.len() as f64 / prompt_seconds
    );
    eprintln!(
        "decode:   {} tokens in {:.2} s ({:.1} tok/s)",
        gen.decoded,
        gen.decode_seconds,
        gen.tokens_per_second()
    );
    if let Some((bytes, n_saved, cells, seconds)) = loaded {
        eprintln!(
            "state:    loaded {} ({n_saved} tokens, {start} positions, {cells} cells) in {seconds:.2} s: {:.1} MiB",
            args.load_state.as_ref().expect("loaded from it").display(),
            bytes as f64 / 1048576.0
        );
    }
    if let Some((path, bytes)) = saved_file {
        eprintln!(
            "state:    saved {} tokens as {} cells to {}: {:.1} MiB",
            tokens.len(),
            seq_cells(&ctx)?,
            path.display(),
            bytes as f64 / 1048576.0
        );
    }
    if !answer_start.is_empty() {
        eprintln!(
            "look-ahead: {} answer tokens on the full cache before compressing, in {lookahead_seconds:.2} s",
            answer_start.len()
        );
    }
    if let Some(s) = stats {
        if s.compressed {
            eprintln!(
                "snapkv:   {} -> {} cells per KV head ({:.1}x), state {:.1} -> {:.1} MiB, scores from {:?}",
                s.cells_before,
                s.cells_after,
                s.cells_before as f64 / s.cells_after as f64,
                s.bytes_before as f64 / 1048576.0,
                s.bytes_after as f64 / 1048576.0,
                s.score_source
            );
            // On the hook path the whole window pass is extra work; on the
            // prefill path the window is part of the prompt evaluation; on
            // the observed path nothing is re-evaluated (the cost of
            // recording while the prompt is decoded is inside its prefill
            // time).
            let extra = s.overhead_seconds()
                + if args.hook {
                    s.window_seconds - s.observe_seconds
                } else {
                    0.0
                };
            eprintln!(
                "          prefill {:.2} s, window {:.3} s (observe {:.3} s), score {:.3} s, select {:.4} s, compact {:.3} s",
                s.prefill_seconds, s.window_seconds, s.observe_seconds, s.score_seconds, s.select_seconds, s.compact_seconds,
            );
            if s.draft_tokens > 0 {
                eprintln!(
                    "          draft: {} answer tokens on the first compressed cache, then selected again ({:.3} s \
                     decoding; the second selection is in score and compact)",
                    s.draft_tokens, s.draft_seconds
                );
            }
            eprintln!(
                "          compression cost ({} path): {:.3} s = {:.2}% of prefill",
                if args.hook && args.lookahead > 0 {
                    "hook, window re-evaluated, after the look-ahead"
                } else if args.hook {
                    "hook, window re-evaluated"
                } else if args.lookahead > 0 {
                    "observed-decode hook, after the look-ahead"
                } else if args.observed {
                    "observed-decode hook"
                } else {
                    "prefill"
                },
                extra,
                100.0 * extra / s.prefill_seconds.max(1e-9)
            );
        } else {
            eprintln!(
                "snapkv:   prompt ({} cells) fits the budget: not compressed",
                s.cells_before
            );
        }
    }
    Ok(())
}

/// Samples up to `n` answer tokens after a prompt of `n_prompt` tokens and
/// decodes each one (so that an armed observer records it), stopping after
/// an end-of-generation token, which is returned but not decoded. The
/// logits of the last decoded token are left for generation to continue.
fn start_answer(ctx: &mut Context, sampler: &mut Sampler, n_prompt: usize, n: usize) -> snapkv::Result<Vec<Token>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let token = sampler.sample(ctx, -1)?;
        out.push(token);
        if ctx.model().is_eog(token) {
            break;
        }
        ctx.decode_tokens(0, &[token], (n_prompt + i) as Pos, true)?;
    }
    Ok(out)
}
