//! Helpers shared by the measuring subcommands (demo, eval, fidelity, bench,
//! capacity): method options, contexts, chat prompts, a progress bar and
//! report files.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use snapkv::{ChatMessage, Context, ContextParams, Model, WindowObserver};
use snapkv_cli::TaskInstance;

use crate::options::ModelOptions;

/// Context parameters from the model options, with a context size.
pub fn context_params(opts: &ModelOptions, n_ctx: u32) -> ContextParams {
    ContextParams::default()
        .with_n_ctx(n_ctx)
        .with_batch(opts.batch_size, opts.ubatch_size)
        .with_threads(opts.threads())
        .with_flash_attn(opts.flash_attn)
        .with_cache_types(opts.cache_type_k, opts.cache_type_v)
}

/// A context with an observer attached, big enough for `cells` cells
/// (rounded up to 256; `-c` wins when set and larger).
pub fn observed_context<'m>(model: &'m Model, opts: &ModelOptions, cells: usize) -> snapkv::Result<Context<'m>> {
    let n_ctx = (cells.next_multiple_of(256) as u32).max(opts.ctx_size);
    Context::new(model, &context_params(opts, n_ctx).with_observer(WindowObserver::new()))
}

/// A task's prompt: the user message in the model's chat template, the
/// assistant's turn opened, so the prompt ends with the question, the
/// assistant prefix and the task's answer prefix (if any).
pub struct ChatPrompt {
    /// The tokens of the templated text.
    pub tokens: Vec<snapkv::llama::Token>,
    /// Positions of the tokens of the needles the question asks about.
    pub asked_positions: Vec<i32>,
    /// Positions of the tokens of the other needles (the distractors).
    pub unasked_positions: Vec<i32>,
    /// Position of the first token of the request after the document (the
    /// question and answer instructions).
    pub request_start: i32,
}

/// Builds the chat prompt of a task instance and checks that every needle
/// lies before the observation window of `window` tokens.
pub fn task_prompt(model: &Model, task: &TaskInstance, window: usize) -> snapkv::Result<ChatPrompt> {
    let mut text = model.apply_chat_template(&[ChatMessage::user(task.user_message.clone())], true)?;
    text.push_str(&task.answer_prefix);
    let tokens = model.tokenize(&text, true, true)?;
    let at = text
        .find(&task.user_message)
        .ok_or_else(|| snapkv::Error::InvalidArgument {
            param: "chat template",
            reason: "the template changed the user message".into(),
        })?;
    let tokens_before = |end: usize| model.tokenize(&text[..at + end], true, true).map(|t| t.len());
    let upto = tokens_before(task.last_needle_end)?;
    if upto + window > tokens.len() {
        return Err(snapkv::Error::InvalidArgument {
            param: "task",
            reason: format!(
                "a needle ends at token {upto}, inside the {window}-token window of a {}-token prompt",
                tokens.len()
            ),
        });
    }
    let positions = |spans: Vec<std::ops::Range<usize>>| -> snapkv::Result<Vec<i32>> {
        let mut out = Vec::new();
        for span in spans {
            out.extend(tokens_before(span.start)? as i32..tokens_before(span.end)? as i32);
        }
        Ok(out)
    };
    Ok(ChatPrompt {
        asked_positions: positions(task.asked_needle_spans())?,
        unasked_positions: positions(task.unasked_needle_spans())?,
        request_start: tokens_before(task.question_start)? as i32,
        tokens,
    })
}

/// Token counter for task generation: the model's tokenizer.
pub fn token_counter(model: &Model) -> impl FnMut(&str) -> usize + '_ {
    move |s| model.tokenize(s, false, false).map_or(s.len() / 4, |t| t.len())
}

/// A simple progress bar on stderr (redrawn in place on a terminal; one
/// closing line otherwise).
pub struct Progress {
    label: String,
    total: usize,
    start: Instant,
    tty: bool,
    drawn: bool,
}

impl Progress {
    /// A bar for `total` tokens.
    pub fn new(label: impl Into<String>, total: usize) -> Self {
        Progress {
            label: label.into(),
            total: total.max(1),
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    fn line(&self, done: usize) -> String {
        let secs = self.start.elapsed().as_secs_f64();
        let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
        let frac = (done as f64 / self.total as f64).min(1.0);
        let width = 30;
        let filled = (frac * width as f64).round() as usize;
        let eta = if rate > 0.0 {
            (self.total - done.min(self.total)) as f64 / rate
        } else {
            0.0
        };
        format!(
            "{} [{}{}] {done}/{} tokens  {rate:.0} tok/s  {}",
            self.label,
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.total,
            if done >= self.total {
                format!("{secs:.1} s")
            } else {
                format!("ETA {eta:.0} s")
            }
        )
    }

    /// Shows `done` tokens.
    pub fn set(&mut self, done: usize) {
        if self.tty {
            eprint!("\r{}\x1b[K", self.line(done));
            let _ = std::io::stderr().flush();
            self.drawn = true;
        }
    }

    /// Ends the bar with `done` tokens.
    pub fn finish(&mut self, done: usize) {
        if self.tty && self.drawn {
            eprintln!("\r{}\x1b[K", self.line(done));
        } else {
            eprintln!("{}", self.line(done));
        }
    }
}

/// Writes `value` as pretty JSON to `path` (creating the directory).
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> snapkv::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| std::io::Error::other(e.to_string()))?;
    std::fs::write(path, text + "\n")?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// Writes `text` to `path`, creating its directory, and says so on stderr.
///
/// # Errors
/// [`snapkv::Error::Io`] when the directory or the file cannot be written.
pub fn write_text(path: &Path, text: &str) -> snapkv::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The file stem of a model path (for file names of reports).
pub fn model_stem(path: &Path) -> String {
    path.file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

/// A generated answer on one line, trimmed; when longer than `max`
/// characters, its end (where the requested value usually is).
pub fn short_answer(text: &str, max: usize) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let n = line.chars().count();
    if n > max {
        format!("…{}", line.chars().skip(n + 1 - max).collect::<String>())
    } else {
        line
    }
}

/// Metadata every report carries.
#[derive(Debug, serde::Serialize)]
pub struct RunInfo {
    /// The command line.
    pub command: String,
    /// Model path.
    pub model: String,
    /// llama.cpp's model description.
    pub model_description: String,
    /// CPU threads.
    pub threads: i32,
    /// Flash attention setting.
    pub flash_attn: String,
    /// snapkv version.
    pub version: &'static str,
}

impl RunInfo {
    /// Info for this process and model.
    pub fn new(model: &Model, opts: &ModelOptions) -> Self {
        RunInfo {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            model: opts.model.display().to_string(),
            model_description: model.description(),
            threads: opts.threads(),
            flash_attn: format!("{:?}", opts.flash_attn).to_lowercase(),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}
