//! `snapkv eval`: the synthetic long-context suite (passkey, multi-key,
//! multi-value, variable tracking) over lengths × depths × seeds × methods ×
//! budgets. Each prompt is evaluated once; every method branches from that
//! state. Prints its tables and writes them to `table.txt`, the records to
//! `eval.json` and `eval.csv`, and an accuracy heatmap (length × depth) per
//! task and method. `--replot` redraws the tables and plots of an earlier
//! run from its `eval.json`.
//!
//! Two protocols: query-aware (the default), where each prompt ends with its
//! question and is compressed with it, and question-agnostic
//! ([`agnostic`]), where the document is compressed before any question is
//! seen and every question about it is then asked of that one cache.

mod agnostic;
pub mod grid;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::{Deserialize, Deserializer, Serialize};
use snapkv::llama::{Pos, Token};
use snapkv::{generate, init_backend, Generation, Model, ModelParams, Sampler};
use snapkv_cli::trial::needs_surprisal;
use snapkv_cli::{
    agreement, branch_after_answer_start, forced_distributions, generate_task, log_softmax, Agreement, Branch,
    Haystack, Method, PromptLayout, Snapshot, TaskInstance, TaskKind, TaskSpec,
};

use crate::common::{model_stem, ChatPrompt, RunInfo};
use crate::common::{observed_context, short_answer, task_prompt, token_counter, write_json, write_text};
use crate::options::ModelOptions;
use crate::options::{MethodOptions, MethodSpec};
use crate::plot::{self, Heatmap, LineChart, Series};

/// Arguments of `snapkv eval`.
#[derive(Debug, Clone, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelOptions,
    /// Tasks, comma-separated: passkey, multikey, multivalue, vartrack.
    #[arg(long, value_delimiter = ',', default_value = "passkey,multikey,multivalue,vartrack")]
    tasks: Vec<TaskKind>,
    /// Prompt lengths in tokens (of the user message), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4000")]
    lengths: Vec<usize>,
    /// Depths of the asked needles (0 = start, 1 = end of the document), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.5,0.9")]
    depths: Vec<f64>,
    /// Seeds, comma-separated (one prompt per task, length, depth and seed).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    seeds: Vec<u64>,
    /// Methods, comma-separated: full, snapkv, snapkv-shared-layer, snapkv-shared-all, streaming, random, keydiff,
    /// reconstruct; under trial (snapkv_cli::trial): reconstruct-shared, and with --protocol question-agnostic
    /// surprisal, reconstruct-surprisal-quarter, reconstruct-surprisal-half;
    /// a method may override options, e.g. snapkv:kernel=15:pool=avg:value=norm, and may compress after
    /// the answer's first N tokens (written on the full cache) with lookahead=N, e.g. snapkv:lookahead=8.
    #[arg(long, value_delimiter = ',', default_value = "full,snapkv,streaming,random")]
    methods: Vec<MethodSpec>,
    /// Budgets in cells per KV head (window included), comma-separated; more than the window.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    budgets: Vec<usize>,
    /// Filler from a text file (a real text) instead of built-in sentences.
    #[arg(long)]
    haystack: Option<PathBuf>,
    /// The order of question and answer instructions after the document: question-last (the question ends
    /// the prompt, inside the observation window) or instructions-last (a long answer instruction ends it).
    #[arg(long, default_value = "question-last")]
    layout: PromptLayout,
    /// query-aware: each prompt (document and question) is compressed with its question, which ends it;
    /// question-agnostic: the document is compressed before any question is seen (the window is the
    /// document's end), then each question about it (up to 4: the labels of a multi-key or multi-value
    /// document, the chains of a variable-tracking one) is appended, answered and removed again, all from
    /// the one compressed cache.
    #[arg(long, value_enum, default_value_t = Protocol::QueryAware)]
    protocol: Protocol,
    /// Tokens to generate per answer (0 = enough for the expected answer plus 16).
    #[arg(short = 'n', long = "n-predict", default_value_t = 0)]
    n_predict: usize,
    /// Output directory for table.txt, eval.json, eval.csv and the heatmaps.
    #[arg(long, default_value = "results/eval")]
    out: PathBuf,
    /// Evaluate nothing: read `<out>/eval.json` of an earlier run, print and rewrite its tables and redraw its
    /// heatmaps and charts from the records (tasks, lengths, depths, seeds, methods and budgets as recorded).
    #[arg(long)]
    replot: bool,
    #[command(flatten)]
    snap: MethodOptions,
}

/// When the cache is compressed: with the question or before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// The question ends the prompt that is compressed.
    QueryAware,
    /// The document is compressed before any question is seen.
    QuestionAgnostic,
}

impl Protocol {
    /// The name the CLI and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::QueryAware => "query-aware",
            Protocol::QuestionAgnostic => "question-agnostic",
        }
    }
}

fn query_aware() -> String {
    Protocol::QueryAware.name().to_string()
}

/// One answer: a prompt, a method, a budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    #[serde(deserialize_with = "task_name")]
    task: TaskName,
    haystack: String,
    length: usize,
    prompt_tokens: usize,
    depth: f64,
    seed: u64,
    method: String,
    budget: Option<usize>,
    /// [`Protocol::name`]: query-aware (reports written before there was a
    /// choice are) or question-agnostic.
    #[serde(default = "query_aware")]
    protocol: String,
    /// Which question about the document this answers (0: the first, the
    /// only one of the query-aware protocol).
    #[serde(default)]
    question: usize,
    cells: usize,
    kv_bytes: usize,
    score: f64,
    /// Answer tokens generated on the full cache before compressing.
    lookahead: usize,
    /// With a look-ahead: the score over the expected values that the
    /// answer's first `lookahead` tokens do not already hold (`None` without
    /// a look-ahead, or when they hold every value).
    score_beyond_lookahead: Option<f64>,
    /// The full cache's answer scored the same way (same first tokens).
    full_score_beyond_lookahead: Option<f64>,
    expected: Vec<String>,
    answer: String,
    /// Mean KL divergence (nats/token) from the full cache's next-token
    /// distributions along the full cache's answer, teacher-forced.
    mean_kl: f64,
    /// Largest KL divergence at one position of that answer.
    max_kl: f64,
    /// Fraction of the answer's positions with the full cache's top-1 token.
    top1: f64,
    /// Positions compared (the full cache's answer length).
    kl_positions: usize,
    /// The KL divergence at each of those positions (JSON only), so that
    /// any run of positions can be compared between methods, e.g. those
    /// after a look-ahead.
    kl_per_position: Vec<f64>,
    /// Fraction of the asked needles' tokens the cache kept, averaged over
    /// every layer and KV head (1 for the full cache).
    needle_kept: f64,
    /// The same per layer (empty for the full cache).
    needle_kept_per_layer: Vec<f64>,
    /// Fraction of the other needles' tokens (the distractors') the cache
    /// kept, averaged the same way (`None` for a task without distractors).
    #[serde(default)]
    other_needles_kept: Option<f64>,
    /// How many distractor values (other labels' numbers, other chains'
    /// variables) the answer holds (`None` for a task without any).
    #[serde(default)]
    distractors_in_answer: Option<usize>,
    /// Where the cache's kept prefix cells went (`None` for the full cache).
    #[serde(default)]
    cell_shares: Option<CellShares>,
    decode_tokens_per_second: f64,
    compression_seconds: f64,
}

/// Where a compressed cache's kept prefix cells (the window's excluded) went,
/// as shares of all of them over every layer and KV head.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct CellShares {
    /// The first 4 positions (the attention sink streaming keeps).
    sink: f64,
    /// The tokens of the needles the question asks about.
    asked: f64,
    /// The tokens of the other needles.
    others: f64,
    /// The request after the document (question, instructions) before the
    /// window.
    request: f64,
    /// Everything else: the document's filler (and the few tokens of the
    /// chat template and the introduction before it).
    filler: f64,
}

impl CellShares {
    fn of(kept: &snapkv::snapkv::KeptPositions, prompt: &ChatPrompt) -> Self {
        let asked: HashSet<i32> = prompt.asked_positions.iter().copied().collect();
        let others: HashSet<i32> = prompt.unasked_positions.iter().copied().collect();
        let mut counts = CellShares::default();
        let mut total = 0usize;
        for layer in 0..kept.n_layer {
            for head in 0..kept.n_head_kv {
                for &p in kept.row(layer, head) {
                    total += 1;
                    let bin = if p < 4 {
                        &mut counts.sink
                    } else if asked.contains(&p) {
                        &mut counts.asked
                    } else if others.contains(&p) {
                        &mut counts.others
                    } else if p >= prompt.request_start {
                        &mut counts.request
                    } else {
                        &mut counts.filler
                    };
                    *bin += 1.0;
                }
            }
        }
        let n = total.max(1) as f64;
        CellShares {
            sink: counts.sink / n,
            asked: counts.asked / n,
            others: counts.others / n,
            request: counts.request / n,
            filler: counts.filler / n,
        }
    }
}

/// A task's name, as `TaskKind::name` spells it. (An alias, so that serde
/// does not take the field for a string borrowed from its input.)
type TaskName = &'static str;

/// A task's name read from a report.
fn task_name<'de, D: Deserializer<'de>>(d: D) -> Result<TaskName, D::Error> {
    let name = String::deserialize(d)?;
    name.parse::<TaskKind>()
        .map(TaskKind::name)
        .map_err(serde::de::Error::custom)
}

#[derive(Serialize)]
struct Report<'a> {
    info: RunInfo,
    window: usize,
    /// The prompt layout of every task (question-last or instructions-last).
    layout: &'static str,
    /// [`Protocol::name`].
    protocol: &'static str,
    records: &'a [Record],
}

/// What `--replot` reads back of an `eval.json`.
#[derive(Deserialize)]
struct SavedReport {
    info: SavedInfo,
    records: Vec<Record>,
}

#[derive(Deserialize)]
struct SavedInfo {
    model: String,
}

/// Runs `snapkv eval`.
pub fn run(args: &EvalArgs) -> snapkv::Result<()> {
    if args.replot {
        return replot(args);
    }
    let w = args.snap.window;
    for &b in &args.budgets {
        args.snap.config("snapkv", b).validate()?;
        // Each method's own options too, so that a combination only the
        // whole configuration refuses stops the run before the first
        // prompt is evaluated rather than after minutes of work.
        for spec in args.methods.iter().filter(|m| !m.is_full()) {
            spec.method(&args.snap, b)?;
        }
    }
    if let Some(spec) = args
        .methods
        .iter()
        .find(|m| args.protocol != Protocol::QuestionAgnostic && needs_surprisal(&m.name))
    {
        return Err(snapkv::Error::InvalidArgument {
            param: "method",
            reason: format!(
                "{} selects by the document's token surprisal, which only --protocol question-agnostic computes",
                spec.label
            ),
        });
    }
    if args.tasks.is_empty() || args.lengths.is_empty() || args.depths.is_empty() || args.seeds.is_empty() {
        return Err(snapkv::Error::InvalidArgument {
            param: "eval",
            reason: "tasks, lengths, depths and seeds must each name at least one value".into(),
        });
    }
    let haystack = match &args.haystack {
        Some(p) => {
            let text = std::fs::read_to_string(p)?;
            let name = p
                .file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
            Haystack::from_text(name, &text).map_err(|reason| snapkv::Error::InvalidArgument {
                param: "haystack",
                reason,
            })?
        }
        None => Haystack::Builtin,
    };
    let model = Model::load(init_backend(), &args.model.model, &ModelParams::default())?;
    let mut count = token_counter(&model);
    let total = args.tasks.len() * args.lengths.len() * args.depths.len() * args.seeds.len();
    let mut records: Vec<Record> = Vec::new();
    let mut ctx_slot: Option<(usize, snapkv::Context<'_>)> = None;
    let t_start = Instant::now();
    let mut done = 0;
    for &length in &args.lengths {
        for &seed in &args.seeds {
            for &kind in &args.tasks {
                for &depth in &args.depths {
                    done += 1;
                    let spec = TaskSpec {
                        layout: args.layout,
                        ..TaskSpec::new(kind, length, depth, seed)
                    };
                    let task = generate_task(&spec, &haystack, &mut count);
                    if args.protocol == Protocol::QuestionAgnostic {
                        let label = format!("[{done}/{total}] {kind} length {length} depth {depth} seed {seed}");
                        agnostic::evaluate_document(
                            args,
                            &model,
                            &task,
                            &haystack,
                            &mut ctx_slot,
                            &mut records,
                            &label,
                        )?;
                        continue;
                    }
                    let prompt = task_prompt(&model, &task, w)?;
                    let p = prompt.tokens.len();
                    let expected_tokens = model.tokenize(&task.answers.join(", "), false, false)?.len();
                    let n_gen = if args.n_predict > 0 {
                        args.n_predict
                    } else {
                        expected_tokens + 16
                    };
                    let need = p + n_gen.max(agnostic::ROOM_FOR_A_PASS) + 64;
                    if !matches!(&ctx_slot, Some((n, _)) if *n >= need) {
                        drop(ctx_slot.take());
                        let ctx = observed_context(&model, &args.model, need)?;
                        ctx_slot = Some((ctx.n_ctx(), ctx));
                    }
                    let ctx = &mut ctx_slot.as_mut().expect("created above").1;
                    let chunk = ctx.n_ubatch();
                    let snapshot = Snapshot::capture(ctx, 0, &prompt.tokens, w, chunk, |_| {})?;
                    eprintln!(
                        "[{done}/{total}] {kind} length {length} ({p} tokens) depth {depth} seed {seed}: prefill {:.1} s ({:.0} tok/s), elapsed {:.0} s",
                        snapshot.prefill_seconds,
                        (p - w) as f64 / snapshot.prefill_seconds,
                        t_start.elapsed().as_secs_f64()
                    );
                    // The reference: the full cache's own greedy answer and the
                    // next-token distributions it was drawn from.
                    let reference = run_method(ctx, &snapshot, &Method::Full, n_gen, &[], None)?;
                    let full_text = model.detokenize(&reference.answer.tokens, false)?;
                    for spec in &args.methods {
                        let budgets: Vec<Option<usize>> = if spec.is_full() {
                            vec![None]
                        } else {
                            args.budgets.iter().map(|&b| Some(b)).collect()
                        };
                        for budget in budgets {
                            // The answer's first tokens before compressing are
                            // the full cache's own greedy ones, short of an
                            // end-of-answer token: the method's cache decides
                            // where its answer ends.
                            let mut lookahead = spec.lookahead().min(reference.answer.tokens.len());
                            if lookahead > 0 && model.is_eog(reference.answer.tokens[lookahead - 1]) {
                                lookahead -= 1;
                            }
                            let run = if spec.is_full() {
                                None
                            } else {
                                let method = spec.method(&args.snap, budget.unwrap_or(p))?;
                                let ahead = &reference.answer.tokens[..lookahead];
                                Some(run_method(
                                    ctx,
                                    &snapshot,
                                    &method,
                                    n_gen,
                                    ahead,
                                    Some(&reference.answer.tokens),
                                )?)
                            };
                            let run = run.as_ref().unwrap_or(&reference);
                            let fidelity = agreement(&reference.distributions, &run.distributions);
                            let text = model.detokenize(&run.answer.tokens, false)?;
                            let (score_beyond_lookahead, full_score_beyond_lookahead) = if lookahead > 0 {
                                let start = model.detokenize(&run.answer.tokens[..lookahead], false)?;
                                (task.score_beyond(&start, &text), task.score_beyond(&start, &full_text))
                            } else {
                                (None, None)
                            };
                            records.push(answer_record(
                                Answered {
                                    task: &task,
                                    prompt: &prompt,
                                    haystack: haystack.name(),
                                    method: &spec.label,
                                    budget,
                                    protocol: Protocol::QueryAware,
                                    question: 0,
                                    branch: &run.branch,
                                    generation: &run.answer,
                                    lookahead,
                                    score_beyond_lookahead,
                                    full_score_beyond_lookahead,
                                },
                                text,
                                fidelity,
                            ));
                        }
                    }
                }
            }
        }
    }

    write_tables(args, &records)?;
    write_json(
        &args.out.join("eval.json"),
        &Report {
            info: RunInfo::new(&model, &args.model),
            window: w,
            layout: args.layout.name(),
            protocol: args.protocol.name(),
            records: &records,
        },
    )?;
    write_csv(&args.out.join("eval.csv"), &records)?;
    draw_plots(args, &records, haystack.name(), &model_stem(&args.model.model));
    Ok(())
}

/// What one answer came from, for [`answer_record`].
struct Answered<'a> {
    task: &'a TaskInstance,
    prompt: &'a ChatPrompt,
    haystack: &'a str,
    method: &'a str,
    budget: Option<usize>,
    protocol: Protocol,
    question: usize,
    branch: &'a Branch,
    generation: &'a Generation,
    lookahead: usize,
    score_beyond_lookahead: Option<f64>,
    full_score_beyond_lookahead: Option<f64>,
}

/// Scores an answer (`text`, its fidelity to the full cache's) and prints
/// its line: the record of one (prompt, method, budget, question).
fn answer_record(a: Answered<'_>, text: String, fidelity: Agreement) -> Record {
    let (task, prompt) = (a.task, a.prompt);
    let kept = a.branch.stats.as_ref().and_then(|s| s.kept.as_ref());
    let needle_kept = kept.map_or(1.0, |k| k.fraction_kept(&prompt.asked_positions));
    let score = task.score(&text);
    let label = a
        .budget
        .map_or_else(|| a.method.to_string(), |b| format!("{} @ {b}", a.method));
    let question = match a.protocol {
        Protocol::QueryAware => String::new(),
        Protocol::QuestionAgnostic => format!("q{} ", a.question),
    };
    eprintln!(
        "    {question}{label:<24} {:>5.0}%  KL {:>7.4}  needles kept {:>5.1}%  {:?}",
        100.0 * score,
        fidelity.mean_kl(),
        100.0 * needle_kept,
        short_answer(&text, 60)
    );
    Record {
        task: task.spec.kind.name(),
        haystack: a.haystack.to_string(),
        length: task.spec.length,
        prompt_tokens: prompt.tokens.len(),
        depth: task.spec.depth,
        seed: task.spec.seed,
        method: a.method.to_string(),
        budget: a.budget,
        protocol: a.protocol.name().to_string(),
        question: a.question,
        cells: a.branch.usage.cells,
        kv_bytes: a.branch.usage.kv_bytes,
        score,
        lookahead: a.lookahead,
        score_beyond_lookahead: a.score_beyond_lookahead,
        full_score_beyond_lookahead: a.full_score_beyond_lookahead,
        expected: task.answers.clone(),
        mean_kl: fidelity.mean_kl(),
        max_kl: fidelity.max_kl(),
        top1: fidelity.top1(),
        kl_positions: fidelity.n(),
        kl_per_position: fidelity.kl,
        needle_kept,
        needle_kept_per_layer: kept.map_or_else(Vec::new, |k| k.fraction_kept_per_layer(&prompt.asked_positions)),
        other_needles_kept: (!prompt.unasked_positions.is_empty())
            .then(|| kept.map_or(1.0, |k| k.fraction_kept(&prompt.unasked_positions))),
        distractors_in_answer: (!task.distractors.is_empty()).then(|| task.distractors_in(&text)),
        cell_shares: kept.map(|k| CellShares::of(k, prompt)),
        decode_tokens_per_second: a.generation.tokens_per_second(),
        compression_seconds: a.branch.stats.as_ref().map_or(0.0, |s| s.overhead_seconds()),
        answer: text,
    }
}

/// Prints the run's tables and writes them to `<out>/table.txt`, so that a
/// results directory holds what its run printed.
fn write_tables(args: &EvalArgs, records: &[Record]) -> snapkv::Result<()> {
    let tables = [
        accuracy_table(args, records),
        lookahead_table(args, records),
        fidelity_table(args, records),
        cell_shares_table(args, records),
    ]
    .concat();
    print!("{tables}");
    write_text(&args.out.join("table.txt"), tables.trim_start())
}

/// Per (task, method, budget): the mean shares of the kept prefix cells
/// that went to the sink, the asked needles, the other needles, the request
/// and the filler.
fn cell_shares_table(args: &EvalArgs, records: &[Record]) -> String {
    let width = args.methods.iter().map(|m| m.label.len()).max().unwrap_or(0).max(20);
    let mut out = String::new();
    for ((_, _, (task, method, budget)), rs) in rows(args, records) {
        let shares: Vec<CellShares> = rs.iter().filter_map(|r| r.cell_shares).collect();
        if shares.is_empty() {
            continue;
        }
        let mean_of = |f: fn(&CellShares) -> f64| 100.0 * shares.iter().map(f).sum::<f64>() / shares.len() as f64;
        let _ = writeln!(
            out,
            "{:<11} {:<width$} {:>7} {:>6.1}% {:>6.1}% {:>6.1}% {:>7.1}% {:>6.1}%",
            task,
            method,
            budget.map_or_else(|| "-".into(), |b| b.to_string()),
            mean_of(|c| c.sink),
            mean_of(|c| c.asked),
            mean_of(|c| c.others),
            mean_of(|c| c.request),
            mean_of(|c| c.filler),
        );
    }
    if out.is_empty() {
        return out;
    }
    format!(
        "\nwhere the kept prefix cells went (shares over every layer and KV head, the window's cells left out;\n\
         sink: the first 4 positions; request: the question and instructions before the window):\n\
         {:<11} {:<width$} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7}\n{out}",
        "task", "method", "budget", "sink", "asked", "others", "request", "filler"
    )
}

fn draw_plots(args: &EvalArgs, records: &[Record], haystack: &str, model: &str) {
    heatmaps(args, records, haystack, model);
    if args.budgets.len() > 1 {
        budget_charts(args, records, haystack, model);
    }
}

/// `--replot`: the tables and plots of the run recorded in `<out>/eval.json`,
/// with the tasks, lengths, depths, seeds, methods and budgets its records
/// hold, in the order they first appear.
fn replot(args: &EvalArgs) -> snapkv::Result<()> {
    let path = args.out.join("eval.json");
    let saved: SavedReport =
        serde_json::from_slice(&std::fs::read(&path)?).map_err(|e| snapkv::Error::InvalidArgument {
            param: "replot",
            reason: format!("{} is not an eval report: {e}", path.display()),
        })?;
    let records = saved.records;
    let Some(first) = records.first() else {
        return Err(snapkv::Error::InvalidArgument {
            param: "replot",
            reason: format!("{} holds no records", path.display()),
        });
    };
    fn distinct<T: PartialEq>(values: impl Iterator<Item = T>) -> Vec<T> {
        let mut out = Vec::new();
        for v in values {
            if !out.contains(&v) {
                out.push(v);
            }
        }
        out
    }
    let mut shown = args.clone();
    shown.tasks = distinct(records.iter().map(|r| r.task))
        .into_iter()
        .map(|t| t.parse().expect("read through TaskKind::name"))
        .collect();
    shown.lengths = distinct(records.iter().map(|r| r.length));
    shown.depths = distinct(records.iter().map(|r| r.depth.to_bits()))
        .into_iter()
        .map(f64::from_bits)
        .collect();
    shown.seeds = distinct(records.iter().map(|r| r.seed));
    shown.budgets = distinct(records.iter().filter_map(|r| r.budget));
    shown.methods = distinct(records.iter().map(|r| r.method.as_str()))
        .into_iter()
        .map(|m| {
            m.parse::<MethodSpec>()
                .map_err(|reason| snapkv::Error::InvalidArgument {
                    param: "replot",
                    reason: format!("method {m:?} of {}: {reason}", path.display()),
                })
        })
        .collect::<snapkv::Result<_>>()?;
    write_tables(&shown, &records)?;
    let model = model_stem(std::path::Path::new(&saved.info.model));
    draw_plots(&shown, &records, &first.haystack, &model);
    Ok(())
}

/// One method on one prompt: the branch, its greedy answer, and the
/// next-token distributions of its cache along `forced` (the full cache's
/// answer), or along its own answer when `forced` is `None`. With an
/// `answer_start`, the method compresses after those first answer tokens
/// (evaluated on the full cache); they begin its answer, and its
/// distributions there are the full cache's.
struct MethodRun {
    branch: Branch,
    answer: Generation,
    distributions: Vec<Vec<f32>>,
}

fn run_method(
    ctx: &mut snapkv::Context<'_>,
    snapshot: &Snapshot,
    method: &Method,
    n_gen: usize,
    answer_start: &[Token],
    forced: Option<&[Token]>,
) -> snapkv::Result<MethodRun> {
    if forced.is_some_and(|f| !f.starts_with(answer_start)) {
        return Err(snapkv::Error::InvalidArgument {
            param: "answer_start",
            reason: "the answer's first tokens are not those of the forced answer".into(),
        });
    }
    let mut distributions = Vec::new();
    let branch = branch_after_answer_start(ctx, snapshot, method, answer_start, |row| {
        distributions.push(log_softmax(row))
    })?;
    let first = ctx
        .logits_ith(-1)
        .map(log_softmax)
        .ok_or_else(|| snapkv::Error::InvalidArgument {
            param: "logits",
            reason: "no logits after the prompt".into(),
        })?;
    distributions.push(first);
    let k = answer_start.len();
    let p = (snapshot.n_prompt() + k) as Pos;
    let mut answer = generate(
        ctx,
        snapshot.seq(),
        &mut Sampler::greedy(),
        p,
        n_gen.saturating_sub(k),
        true,
    )?;
    answer.tokens.splice(0..0, answer_start.iter().copied());
    // Back to where the method compressed; the cache keeps what it left.
    if !ctx.seq_rm(snapshot.seq(), p, -1) {
        return Err(snapkv::Error::InvalidArgument {
            param: "seq_rm",
            reason: "llama.cpp could not remove the generated tokens".into(),
        });
    }
    forced_distributions(
        ctx,
        snapshot.seq(),
        p,
        &forced.unwrap_or(&answer.tokens)[k..],
        &mut distributions,
    )?;
    Ok(MethodRun {
        branch,
        answer,
        distributions,
    })
}

type Key<'a> = (&'static str, &'a str, Option<usize>);

/// The records of each table row — a (task, method, budget) — in the order
/// the command line named the tasks and methods.
fn rows<'r>(args: &EvalArgs, records: &'r [Record]) -> BTreeMap<(usize, usize, Key<'r>), Vec<&'r Record>> {
    let task_order = |t: &str| args.tasks.iter().position(|x| x.name() == t).unwrap_or(usize::MAX);
    let method_order = |m: &str| args.methods.iter().position(|x| x.label == m).unwrap_or(usize::MAX);
    let mut rows: BTreeMap<_, Vec<&Record>> = BTreeMap::new();
    for r in records {
        rows.entry((
            task_order(r.task),
            method_order(&r.method),
            (r.task, r.method.as_str(), r.budget),
        ))
        .or_default()
        .push(r);
    }
    rows
}

/// The protocol of a run's records (one per run).
fn protocol_of(records: &[Record]) -> &str {
    records
        .first()
        .map_or(Protocol::QueryAware.name(), |r| r.protocol.as_str())
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Mean score per (task, method, budget) and length.
fn accuracy_table(args: &EvalArgs, records: &[Record]) -> String {
    let mut out = String::new();
    let width = args.methods.iter().map(|m| m.label.len()).max().unwrap_or(0).max(20);
    let _ = write!(out, "{:<11} {:<width$} {:>7}", "task", "method", "budget");
    for l in &args.lengths {
        let _ = write!(out, " {:>8}", format!("{l}"));
    }
    let _ = writeln!(out, " {:>8} {:>8}", "all", "vs full");
    let mut full: BTreeMap<&str, f64> = BTreeMap::new();
    for ((_, _, (task, method, budget)), rs) in rows(args, records) {
        let all = mean(rs.iter().map(|r| r.score)).unwrap_or(0.0);
        if method.starts_with("full") {
            full.insert(task, all);
        }
        let _ = write!(
            out,
            "{:<11} {:<width$} {:>7}",
            task,
            method,
            budget.map_or_else(|| "-".into(), |b| b.to_string())
        );
        for &l in &args.lengths {
            match mean(rs.iter().filter(|r| r.length == l).map(|r| r.score)) {
                Some(m) => {
                    let _ = write!(out, " {:>7.1}%", 100.0 * m);
                }
                None => {
                    let _ = write!(out, " {:>8}", "-");
                }
            }
        }
        let rel = full
            .get(task)
            .filter(|&&f| f > 0.0)
            .map_or_else(|| "-".to_string(), |f| format!("{:.0}%", 100.0 * all / f));
        let _ = writeln!(out, " {:>7.1}% {:>8}", 100.0 * all, rel);
    }
    format!(
        "\naccuracy ({}; mean fraction of expected values found; {} depths × {} seeds per length):\n{out}",
        protocol_of(records),
        args.depths.len(),
        args.seeds.len()
    )
}

/// For the methods with a look-ahead: accuracy over what their answers found
/// beyond their first tokens (the full cache's), beside the full cache's
/// own answers scored the same way on the same prompts.
fn lookahead_table(args: &EvalArgs, records: &[Record]) -> String {
    if records.iter().all(|r| r.lookahead == 0) {
        return String::new();
    }
    let width = args.methods.iter().map(|m| m.label.len()).max().unwrap_or(0).max(20);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:<width$} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>12}",
        "task", "method", "budget", "prompts", "method", "full", "vs full", "KL after", "/ streaming"
    );
    for ((_, _, (task, method, budget)), rs) in rows(args, records) {
        let scored: Vec<(f64, f64)> = rs
            .iter()
            .filter(|r| r.lookahead > 0)
            .filter_map(|r| r.score_beyond_lookahead.zip(r.full_score_beyond_lookahead))
            .collect();
        if scored.is_empty() {
            continue;
        }
        let m = mean(scored.iter().map(|s| s.0)).unwrap_or(0.0);
        let f = mean(scored.iter().map(|s| s.1)).unwrap_or(0.0);
        let rel = if f > 0.0 {
            format!("{:.0}%", 100.0 * m / f)
        } else {
            "-".into()
        };
        let (kl, streaming_kl) = kl_after_lookahead(records, &rs);
        let vs_streaming = match (kl, streaming_kl) {
            (Some(kl), Some(s)) if s > 0.0 => format!("{:.3}", kl / s),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<11} {:<width$} {:>7} {:>8} {:>7.1}% {:>7.1}% {:>8} {:>9} {:>12}",
            task,
            method,
            budget.map_or_else(|| "-".into(), |b| b.to_string()),
            scored.len(),
            100.0 * m,
            100.0 * f,
            rel,
            kl.map_or_else(|| "-".into(), |k| format!("{k:.4}")),
            vs_streaming
        );
    }
    format!(
        "\naccuracy beyond the look-ahead (expected values not already in the answer's first tokens, which the full cache wrote);\n\
         KL after: mean KL over the answer positions after the look-ahead, pooled, beside plain streaming's on the same positions:\n{out}"
    )
}

/// Mean KL over the answer positions after each record's look-ahead, pooled
/// over `rows` (look-ahead records), and plain `streaming`'s at the same
/// budget over the same positions of the same prompts (`None` when no
/// position is left, or, for streaming, when a prompt has no streaming
/// record).
fn kl_after_lookahead(records: &[Record], rows: &[&Record]) -> (Option<f64>, Option<f64>) {
    let (mut sum, mut n) = (0.0, 0usize);
    let mut streaming_sum = Some(0.0);
    for r in rows.iter().filter(|r| r.lookahead > 0) {
        let after = r.lookahead.min(r.kl_per_position.len())..r.kl_per_position.len();
        sum += r.kl_per_position[after.clone()].iter().sum::<f64>();
        n += after.len();
        let streaming = records.iter().find(|s| {
            s.method == "streaming"
                && s.budget == r.budget
                && (s.task, &s.haystack, s.length, s.seed) == (r.task, &r.haystack, r.length, r.seed)
                && s.depth == r.depth
        });
        streaming_sum = match (streaming_sum, streaming) {
            // Both were teacher-forced along the same full-cache answer.
            (Some(total), Some(s)) if s.kl_per_position.len() == r.kl_per_position.len() => {
                Some(total + s.kl_per_position[after].iter().sum::<f64>())
            }
            _ => None,
        };
    }
    if n == 0 {
        return (None, None);
    }
    (Some(sum / n as f64), streaming_sum.map(|s| s / n as f64))
}

/// KL and top-1 sums over the answer positions of several prompts.
struct PooledKl {
    kl: f64,
    top1: f64,
    positions: usize,
}

impl PooledKl {
    fn of(records: &[&Record]) -> Self {
        PooledKl {
            kl: records.iter().map(|r| r.mean_kl * r.kl_positions as f64).sum(),
            top1: records.iter().map(|r| r.top1 * r.kl_positions as f64).sum(),
            positions: records.iter().map(|r| r.kl_positions).sum(),
        }
    }

    fn mean_kl(&self) -> f64 {
        self.kl / self.positions.max(1) as f64
    }
}

/// Mean KL divergence per token from the full cache along its own answers
/// (pooled over every prompt of a task), top-1 agreement, the ratio to
/// `streaming` at the same budget where the run has it, the mean fraction
/// of the asked needles' tokens kept and of the other needles' tokens, and
/// the distractor values per answer.
fn fidelity_table(args: &EvalArgs, records: &[Record]) -> String {
    let rows = rows(args, records);
    let pooled: Vec<(Key, PooledKl, &[&Record])> = rows
        .iter()
        .map(|(&(_, _, key), rs)| (key, PooledKl::of(rs), rs.as_slice()))
        .collect();
    let streaming: BTreeMap<(&str, Option<usize>), f64> = pooled
        .iter()
        .filter(|((_, method, _), _, _)| *method == "streaming")
        .map(|((task, _, budget), v, _)| ((*task, *budget), v.mean_kl()))
        .collect();
    let percent = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{:.1}%", 100.0 * v));
    let width = args.methods.iter().map(|m| m.label.len()).max().unwrap_or(0).max(20);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:<width$} {:>7} {:>10} {:>7} {:>12} {:>13} {:>12} {:>12}",
        "task", "method", "budget", "mean KL", "top-1", "/ streaming", "needles kept", "others kept", "distractors"
    );
    for ((task, method, budget), v, rs) in &pooled {
        let kept = mean(rs.iter().map(|r| r.needle_kept)).unwrap_or(0.0);
        // `-` for a task without distractors, and for runs recorded before
        // these were measured.
        let others = rs.iter().map(|r| r.other_needles_kept).collect::<Option<Vec<f64>>>();
        let others = others.and_then(|o| mean(o.into_iter()));
        let distractors = rs
            .iter()
            .map(|r| r.distractors_in_answer)
            .collect::<Option<Vec<usize>>>();
        let distractors = distractors
            .and_then(|d| mean(d.into_iter().map(|n| n as f64)))
            .map_or_else(|| "-".to_string(), |d| format!("{d:.2}"));
        let kl = v.mean_kl();
        let ratio = streaming
            .get(&(*task, *budget))
            .filter(|&&s| s > 0.0 && budget.is_some())
            .map_or_else(|| "-".to_string(), |s| format!("{:.3}", kl / s));
        let _ = writeln!(
            out,
            "{:<11} {:<width$} {:>7} {:>10.4} {:>6.1}% {:>12} {:>12.1}% {:>12} {:>12}",
            task,
            method,
            budget.map_or_else(|| "-".into(), |b| b.to_string()),
            kl,
            100.0 * v.top1 / v.positions.max(1) as f64,
            ratio,
            100.0 * kept,
            percent(others),
            distractors
        );
    }
    format!(
        "\nfidelity to the full cache along its own answers, teacher-forced (KL nats/token, pooled over the prompts;\n\
         needles kept: the asked needles' tokens a cache kept, averaged over layers, KV heads and prompts;\n\
         others kept: the same for the other needles; distractors: other needles' values per answer):\n{out}"
    )
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn write_csv(path: &std::path::Path, records: &[Record]) -> snapkv::Result<()> {
    let mut s = String::from(
        "task,haystack,length,prompt_tokens,depth,seed,method,budget,protocol,question,cells,kv_bytes,score,lookahead,score_beyond_lookahead,full_score_beyond_lookahead,expected,answer,mean_kl,max_kl,top1,kl_positions,needle_kept,other_needles_kept,distractors_in_answer,decode_tok_s,compression_s\n",
    );
    for r in records {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{},{},{},{},{:.4},{},{},{},{},{},{:.6},{:.4},{:.4},{},{:.4},{},{},{:.2},{:.4}",
            r.task,
            csv_field(&r.haystack),
            r.length,
            r.prompt_tokens,
            r.depth,
            r.seed,
            csv_field(&r.method),
            r.budget.map_or_else(String::new, |b| b.to_string()),
            r.protocol,
            r.question,
            r.cells,
            r.kv_bytes,
            r.score,
            r.lookahead,
            r.score_beyond_lookahead.map_or_else(String::new, |v| format!("{v:.4}")),
            r.full_score_beyond_lookahead
                .map_or_else(String::new, |v| format!("{v:.4}")),
            csv_field(&r.expected.join(" ")),
            csv_field(r.answer.trim()),
            r.mean_kl,
            r.max_kl,
            r.top1,
            r.kl_positions,
            r.needle_kept,
            r.other_needles_kept.map_or_else(String::new, |v| format!("{v:.4}")),
            r.distractors_in_answer.map_or_else(String::new, |v| v.to_string()),
            r.decode_tokens_per_second,
            r.compression_seconds
        );
    }
    std::fs::write(path, s)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// One heatmap per task, method and budget: rows = depths, columns = lengths.
fn heatmaps(args: &EvalArgs, records: &[Record], haystack: &str, model: &str) {
    let mut groups: BTreeMap<Key, Vec<&Record>> = BTreeMap::new();
    for r in records {
        groups.entry((r.task, r.method.as_str(), r.budget)).or_default().push(r);
    }
    let columns: Vec<String> = args.lengths.iter().map(|l| l.to_string()).collect();
    let rows: Vec<String> = args.depths.iter().map(|d| format!("{:.0}%", 100.0 * d)).collect();
    for ((task, method, budget), rs) in groups {
        let values = args
            .depths
            .iter()
            .map(|&d| {
                args.lengths
                    .iter()
                    .map(|&l| {
                        let hits: Vec<f64> = rs
                            .iter()
                            .filter(|r| r.length == l && r.depth == d)
                            .map(|r| r.score)
                            .collect();
                        (!hits.is_empty()).then(|| hits.iter().sum::<f64>() / hits.len() as f64)
                    })
                    .collect()
            })
            .collect();
        let name = match budget {
            Some(b) => format!("heatmap-{haystack}-{task}-{method}-{b}"),
            None => format!("heatmap-{haystack}-{task}-{method}"),
        };
        let title = match budget {
            Some(b) => format!("{task} · {method} @ {b} cells · {model}"),
            None => format!("{task} · full cache · {model}"),
        };
        let stem = args.out.join(name.replace(['/', ' ', ':', '='], "_"));
        plot::report(plot::heatmap(
            &stem,
            &Heatmap {
                title,
                columns: &columns,
                rows: &rows,
                axes: ("prompt length (tokens)", "depth"),
                values,
            },
        ));
    }
}

/// One line chart per task: accuracy against the budget, a line per
/// compressing method (its mean score over every prompt at that budget) and
/// the full cache's accuracy as a flat line.
fn budget_charts(args: &EvalArgs, records: &[Record], haystack: &str, model: &str) {
    let lengths: Vec<String> = args.lengths.iter().map(|l| l.to_string()).collect();
    let mut budgets = args.budgets.clone();
    budgets.sort_unstable();
    budgets.dedup();
    let (Some(&lo), Some(&hi)) = (budgets.first(), budgets.last()) else {
        return;
    };
    for task in &args.tasks {
        let task = task.name();
        let mut series = Vec::new();
        for method in &args.methods {
            let of_method = |budget: Option<usize>| {
                mean(
                    records
                        .iter()
                        .filter(|r| r.task == task && r.method == method.label && r.budget == budget)
                        .map(|r| 100.0 * r.score),
                )
            };
            let points: Vec<(f64, f64)> = if method.name == "full" {
                of_method(None).map_or_else(Vec::new, |y| vec![(lo as f64, y), (hi as f64, y)])
            } else {
                budgets
                    .iter()
                    .filter_map(|&b| of_method(Some(b)).map(|y| (b as f64, y)))
                    .collect()
            };
            if !points.is_empty() {
                series.push(Series {
                    name: method.label.clone(),
                    points,
                });
            }
        }
        plot::report(plot::line_chart(
            &args.out.join(format!("budgets-{haystack}-{task}")),
            &LineChart {
                title: format!("{task} · accuracy vs budget · {model} · {} tokens", lengths.join("/")),
                axes: ("cells kept per KV head", "accuracy (%)"),
                series,
                log2_x: true,
                y_max: Some(105.0),
            },
        ));
    }
}
