//! The question-agnostic protocol: a document (in its chat framing, up to
//! where the question would start) is compressed before any question is
//! seen, so the observation window is the document's own end. Then each
//! question about it is appended, answered greedily and removed again, all
//! from the one compressed cache: the way a server's prompt cache, a saved
//! state or a shared document is reused. Removing a question and its answer
//! is exact, since they lie after everything compression touched.

use std::time::Instant;

use snapkv::llama::{Pos, SeqId, Token};
use snapkv::{generate, Generation, Model, Sampler};
use snapkv_cli::trial::surprisal::token_surprisal;
use snapkv_cli::trial::{needs_surprisal, DocumentScores};
use snapkv_cli::{
    agreement, branch, forced_distributions, log_softmax, Branch, Haystack, Method, Snapshot, TaskInstance,
};

use super::{answer_record, Answered, EvalArgs, Protocol, Record};
use crate::common::{observed_context, task_prompt, ChatPrompt};

/// Cells a context leaves after the prompt for one pass of `reconstruct`'s
/// repeat (a micro-batch of the default 512 tokens).
pub(super) const ROOM_FOR_A_PASS: usize = 512;

/// One question about the document, ready to ask.
struct Question {
    task: TaskInstance,
    prompt: ChatPrompt,
    /// Answer tokens to generate.
    n_gen: usize,
}

impl Question {
    /// The question's tokens after the document's `doc_len`.
    fn tail(&self, doc_len: usize) -> &[Token] {
        &self.prompt.tokens[doc_len..]
    }
}

/// What one question's answer was, and the next-token distributions along
/// the reference answer.
struct Reply {
    answer: Generation,
    distributions: Vec<Vec<f32>>,
}

/// Evaluates one document under the question-agnostic protocol: the full
/// cache answers every question first (the reference), then each method and
/// budget compresses the document once and answers every question from it.
/// Appends a record per (method, budget, question).
///
/// # Errors
/// [`snapkv::Error::InvalidArgument`] for a method with a look-ahead (there
/// is no answer to look ahead into before the question) or a question whose
/// tokens do not continue the document's; context, decode and compression
/// errors.
pub(super) fn evaluate_document<'m>(
    args: &EvalArgs,
    model: &'m Model,
    task: &TaskInstance,
    haystack: &Haystack,
    ctx_slot: &mut Option<(usize, snapkv::Context<'m>)>,
    records: &mut Vec<Record>,
    label: &str,
) -> snapkv::Result<()> {
    let w = args.snap.window;
    let mut questions = Vec::new();
    for q in task.questions() {
        let prompt = task_prompt(model, &q, w)?;
        let expected_tokens = model.tokenize(&q.answers.join(", "), false, false)?.len();
        let n_gen = if args.n_predict > 0 {
            args.n_predict
        } else {
            expected_tokens + 16
        };
        questions.push(Question { task: q, prompt, n_gen });
    }
    let doc_len = questions[0].prompt.request_start as usize;
    let document = questions[0].prompt.tokens[..doc_len].to_vec();
    for q in &questions {
        if !q.prompt.tokens.starts_with(&document) {
            return Err(snapkv::Error::InvalidArgument {
                param: "question",
                reason: format!("the tokens of {:?} do not continue the document's", q.task.asked),
            });
        }
    }
    if let Some(spec) = args.methods.iter().find(|m| m.lookahead() > 0) {
        return Err(snapkv::Error::InvalidArgument {
            param: "method",
            reason: format!(
                "{}: the question-agnostic protocol compresses before any question is seen, so there is no \
                 answer to look ahead into: drop lookahead",
                spec.label
            ),
        });
    }
    let longest = questions
        .iter()
        .map(|q| q.tail(doc_len).len() + q.n_gen)
        .max()
        .unwrap_or(0);
    // Room after the document for the longest question and answer, and
    // for a micro-batch of `reconstruct`'s repeat.
    let need = doc_len + longest.max(ROOM_FOR_A_PASS) + 64;
    if !matches!(ctx_slot, Some((n, _)) if *n >= need) {
        drop(ctx_slot.take());
        let ctx = observed_context(model, &args.model, need)?;
        *ctx_slot = Some((ctx.n_ctx(), ctx));
    }
    let ctx = &mut ctx_slot.as_mut().expect("created above").1;
    let chunk = ctx.n_ubatch();
    // The document's token surprisal, for the methods under trial that
    // select by it: evaluated once more, with every token's logits.
    let surprisal = if args.methods.iter().any(|m| needs_surprisal(&m.name)) {
        ctx.clear();
        let t0 = Instant::now();
        let s = token_surprisal(ctx, 0, &document)?;
        eprintln!("{label}: token surprisal in {:.1} s", t0.elapsed().as_secs_f64());
        Some(s)
    } else {
        None
    };
    let scores = DocumentScores::new(surprisal);
    let snapshot = Snapshot::capture(ctx, 0, &document, w, chunk, |_| {})?;
    let seq = snapshot.seq();
    eprintln!(
        "{label} ({doc_len}-token document, {} questions): prefill {:.1} s",
        questions.len(),
        snapshot.prefill_seconds
    );

    let full = branch(ctx, &snapshot, &Method::Full)?;
    let mut references = Vec::new();
    for q in &questions {
        references.push(ask(ctx, seq, doc_len, q, None)?);
    }
    let mut add = |method: &str, budget: Option<usize>, branch: &Branch, q: usize, run: &Reply| {
        let question = &questions[q];
        let text = model.detokenize(&run.answer.tokens, false)?;
        let fidelity = agreement(&references[q].distributions, &run.distributions);
        records.push(answer_record(
            Answered {
                task: &question.task,
                prompt: &question.prompt,
                haystack: haystack.name(),
                method,
                budget,
                protocol: Protocol::QuestionAgnostic,
                question: q,
                branch,
                generation: &run.answer,
                lookahead: 0,
                score_beyond_lookahead: None,
                full_score_beyond_lookahead: None,
            },
            text,
            fidelity,
        ));
        Ok::<(), snapkv::Error>(())
    };
    let full_label = args.methods.iter().find(|m| m.is_full()).map(|m| m.label.clone());
    if let Some(full_label) = &full_label {
        for (q, reference) in references.iter().enumerate() {
            add(full_label, None, &full, q, reference)?;
        }
    }
    for spec in args.methods.iter().filter(|m| !m.is_full()) {
        for &budget in &args.budgets {
            let t0 = Instant::now();
            let (compressed, replays) = scores.branch(ctx, &snapshot, &spec.name, spec.config(&args.snap, budget))?;
            let compress_seconds = t0.elapsed().as_secs_f64();
            for (q, (question, reference)) in questions.iter().zip(&references).enumerate() {
                let run = ask(ctx, seq, doc_len, question, Some(&reference.answer.tokens))?;
                add(&spec.label, Some(budget), &compressed, q, &run)?;
            }
            let reused = if replays {
                " (the reconstruction scores of an earlier branch reused: not counted)"
            } else {
                ""
            };
            eprintln!(
                "    {} @ {budget}: compressed in {compress_seconds:.2} s{reused}",
                spec.label
            );
        }
    }
    Ok(())
}

/// Asks one question of the document that sequence `seq` holds (`doc_len`
/// tokens, compressed or not): evaluates the question's tokens after it,
/// answers greedily, takes the next-token distributions along `forced` (the
/// reference answer; the question's own answer when `None`), and removes
/// question and answer again.
fn ask(
    ctx: &mut snapkv::Context<'_>,
    seq: SeqId,
    doc_len: usize,
    question: &Question,
    forced: Option<&[Token]>,
) -> snapkv::Result<Reply> {
    let tail = question.tail(doc_len);
    ctx.decode_tokens(seq, tail, doc_len as Pos, true)?;
    let first = ctx
        .logits_ith(-1)
        .map(log_softmax)
        .ok_or_else(|| snapkv::Error::InvalidArgument {
            param: "logits",
            reason: "no logits after the question".into(),
        })?;
    let after_question = (doc_len + tail.len()) as Pos;
    let answer = generate(ctx, seq, &mut Sampler::greedy(), after_question, question.n_gen, true)?;
    let mut distributions = vec![first];
    remove_from(ctx, seq, after_question)?;
    forced_distributions(
        ctx,
        seq,
        after_question,
        forced.unwrap_or(&answer.tokens),
        &mut distributions,
    )?;
    remove_from(ctx, seq, doc_len as Pos)?;
    if ctx.seq_pos_max(seq) != Some(doc_len as Pos - 1) {
        return Err(snapkv::Error::InvalidArgument {
            param: "seq_rm",
            reason: format!(
                "after removing the question, sequence {seq} ends at {:?}, not at the document's end {}",
                ctx.seq_pos_max(seq),
                doc_len - 1
            ),
        });
    }
    Ok(Reply { answer, distributions })
}

/// Removes positions `from..` of `seq`.
fn remove_from(ctx: &mut snapkv::Context<'_>, seq: SeqId, from: Pos) -> snapkv::Result<()> {
    if ctx.seq_rm(seq, from, -1) {
        Ok(())
    } else {
        Err(snapkv::Error::InvalidArgument {
            param: "seq_rm",
            reason: format!("llama.cpp could not remove positions {from}.. of sequence {seq}"),
        })
    }
}
