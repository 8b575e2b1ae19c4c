//! Reconstruction scoring, for a sequence compressed before any question
//! about it is seen, in the manner of KVzip (Kim et al., 2025): the model is
//! asked to repeat the sequence, the repeat is teacher-forced after it one
//! micro-batch at a time with the observer recording the queries, and every
//! cached position scores the largest attention any repeat query pays it.
//! A position the model needs to reproduce the text is one a later question
//! about the text is likely to need; no question is involved, so the
//! selection serves every later question alike.
//!
//! The repeat is framed as the assistant's answer (as KVzip frames it):
//! after the request, the model's chat template closes the user's turn
//! (the sequence is taken to be an open user turn, as a document saved
//! before its questions is) and opens the assistant's, so the model reads
//! the repeat as its own copy of the text.
//!
//! Each chunk of the repeat is evaluated after the sequence as
//! `[request, turn change, chunk]` and removed again, so a chunk attends
//! to the whole sequence and to itself, not to the chunks before it
//! (KVzip's chunked scoring); a later chunk's request quotes the last
//! tokens before it, so that the model knows where its copy resumes. Cost:
//! the sequence's tokens are evaluated once more (plus the request per
//! chunk), and their queries are scored against the sequence's keys:
//! about one more prefill.

use super::support::model_shape;
use super::votes::query_key_votes;
use super::Compressor;
use crate::error::{Error, Result};
use crate::llama::observer::CaptureRequest;
use crate::llama::{ContextRef, Pos, SeqId, Token, WindowObserver};
use crate::snapkv::{position_order, QueryAggregation, SeqState, Votes};

/// The words that ask for the repeat, before its first chunk.
pub const REPEAT_REQUEST: &str = "\n\nRepeat the previous context exactly.";

/// The words that ask for a later chunk of the repeat, followed by the
/// last [`RESUME_ANCHOR`] tokens of the text before the chunk.
pub const RESUME_REQUEST: &str = "\n\nRepeat the previous context exactly, going on after:";

/// How many tokens of the text before a later chunk its request quotes.
pub const RESUME_ANCHOR: usize = 8;

/// The tokens evaluated before each chunk of the repeat.
struct RepeatFraming {
    first: Vec<Token>,
    resume: Vec<Token>,
    /// Closes the user's turn and opens the assistant's (a newline for a
    /// model without a chat template, or one llama.cpp cannot apply).
    turn: Vec<Token>,
}

impl RepeatFraming {
    fn for_model(model: &crate::llama::ModelRef) -> Result<Self> {
        // A template llama.cpp cannot apply frames nothing: the repeat then
        // follows the request on a new line, as for a model without one.
        let turn = match model.chat_template().and_then(|_| model.user_turn_framing().ok()) {
            Some((_, tail)) => model.tokenize(&tail, false, true)?,
            None => model.tokenize("\n", false, false)?,
        };
        Ok(RepeatFraming {
            first: model.tokenize(REPEAT_REQUEST, false, false)?,
            resume: model.tokenize(RESUME_REQUEST, false, false)?,
            turn,
        })
    }

    /// The most tokens a header takes.
    fn longest(&self) -> usize {
        self.first.len().max(self.resume.len() + RESUME_ANCHOR) + self.turn.len()
    }

    /// Writes the header of the chunk that follows `before` (the text
    /// already repeated; empty for the first chunk) into `out`.
    fn header(&self, before: &[Token], out: &mut Vec<Token>) {
        if before.is_empty() {
            out.extend_from_slice(&self.first);
        } else {
            out.extend_from_slice(&self.resume);
            out.extend_from_slice(&before[before.len().saturating_sub(RESUME_ANCHOR)..]);
        }
        out.extend_from_slice(&self.turn);
    }
}

/// The shortest chunk of the repeat tried when the context has no room for
/// a longer one.
const MIN_CHUNK: usize = 16;

impl Compressor {
    /// Votes over the first `prefix_len` positions of sequence `seq`, which
    /// holds exactly `tokens` (uncompressed, positions `0..tokens.len()`):
    /// for every layer and query head, the largest attention probability a
    /// query of the repeat pays each position. The sequence is left as it
    /// was (every chunk is removed after its pass); the logits are not.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a micro-batch cannot hold the request
    /// and one token of the repeat; decode, capture and state errors.
    pub(super) fn reconstruction_votes(
        &self,
        ctx: &mut ContextRef,
        seq: SeqId,
        observer: &WindowObserver,
        tokens: &[Token],
        prefix_len: usize,
    ) -> Result<Votes> {
        let model = ctx.model();
        let (n_layer, n_head) = (model.n_layer(), model.n_head());
        let framing = RepeatFraming::for_model(model)?;
        // A pass is one micro-batch, and must fit the context after the
        // sequence.
        let room = ctx.n_ubatch().min(ctx.n_ctx().saturating_sub(tokens.len()));
        let chunk = room.saturating_sub(framing.longest());
        if chunk == 0 {
            return Err(Error::InvalidArgument {
                param: "n_ctx",
                reason: format!(
                    "the repeat needs a micro-batch of more than {} tokens (its request) after the sequence's {} \
                     cells: the context has {} cells and micro-batches of {}",
                    framing.longest(),
                    tokens.len(),
                    ctx.n_ctx(),
                    ctx.n_ubatch()
                ),
            });
        }
        // The repeat reproduces the text, not the begin-of-sequence token.
        let body = match (tokens.split_first(), model.bos()) {
            (Some((&first, rest)), Some(bos)) if first == bos => rest,
            _ => tokens,
        };
        let end = tokens.len() as Pos;
        let mut total = Votes::new(n_layer, n_head, prefix_len)?.with_query_aggregation(QueryAggregation::Max);
        let mut batch = Vec::with_capacity(framing.longest() + chunk);
        let (mut done, mut chunk) = (0, chunk);
        while done < body.len() {
            let part = &body[done..body.len().min(done + chunk)];
            batch.clear();
            framing.header(&body[..done], &mut batch);
            batch.extend_from_slice(part);
            let pass = CaptureRequest::for_model(ctx.model(), Some(batch.len()), batch.len()).queries_only();
            let capture = match self.observe_batch(ctx, observer, seq, &batch, end, pass) {
                Ok((capture, _)) => capture,
                // No free run of cells that long (llama.cpp places a
                // micro-batch in consecutive cells, and the free ones may be
                // split): the decode changed nothing; try half as many.
                Err(Error::Decode { code: 1, .. }) if chunk > MIN_CHUNK => {
                    chunk /= 2;
                    continue;
                }
                Err(e) => return Err(e),
            };
            done += part.len();
            let blob = ctx.state_seq_get(seq)?;
            let state = SeqState::parse(&blob, &model_shape(ctx.model()))?;
            // The pass's rows are the window; the sequence is the prefix.
            let order = position_order(state.positions(), batch.len())?;
            if order.prefix_len != tokens.len() {
                return Err(Error::InvalidArgument {
                    param: "seq",
                    reason: format!(
                        "sequence {seq} holds {} cells before the repeat, not its {} tokens",
                        order.prefix_len,
                        tokens.len()
                    ),
                });
            }
            let mut votes =
                Votes::new(n_layer, n_head, order.prefix_len)?.with_query_aggregation(QueryAggregation::Max);
            query_key_votes(
                ctx.model(),
                &capture.queries,
                &state,
                &order,
                batch.len(),
                observer.rotation_disabled(),
                &mut votes,
            )?;
            for layer in 0..n_layer {
                for head in 0..n_head {
                    let pass_row = &votes.row(layer, head)[..prefix_len];
                    for (t, &v) in total.row_mut(layer, head).iter_mut().zip(pass_row) {
                        *t = t.max(v);
                    }
                }
            }
            if !ctx.seq_rm(seq, end, -1) {
                return Err(Error::State {
                    op: "set",
                    reason: "llama.cpp could not remove a chunk of the repeat".into(),
                });
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, OnceLock};

    use super::*;
    use crate::compress::ScoreSource;
    use crate::llama::{Context, ContextParams, FlashAttention, Model, ModelParams};
    use crate::snapkv::SnapKvConfig;
    use snapkv_testing::{tiny_model_path, TinyModelSpec};

    fn tiny() -> &'static Model {
        static M: OnceLock<Model> = OnceLock::new();
        M.get_or_init(|| {
            let path = tiny_model_path(&TinyModelSpec::default()).unwrap();
            Model::load(crate::init_backend(), path, &ModelParams::default()).unwrap()
        })
    }

    fn prompt(model: &Model, n: usize) -> Vec<Token> {
        let mut tokens = model
            .tokenize(
                &"the river flows to the sea and 4821 time passes ".repeat(60),
                true,
                false,
            )
            .unwrap();
        tokens.truncate(n);
        tokens
    }

    fn context<'m>(model: &'m Model, fa: FlashAttention, observer: &Arc<WindowObserver>) -> Context<'m> {
        let params = ContextParams::default()
            .with_n_ctx(1024)
            .with_threads(2)
            .with_flash_attn(fa);
        Context::new(model, &params.with_observer(observer.clone())).unwrap()
    }

    /// The votes from queries and keys against the model's own attention
    /// probabilities (flash attention off) for the same repeat: for every
    /// layer, head and prefix position, the largest over the repeat's rows.
    /// The repeat fits one micro-batch here.
    #[test]
    fn reconstruction_votes_are_the_repeats_largest_attention() {
        votes_match_the_repeats_softmax(None);
    }

    /// The same with micro-batches of 128 tokens: the repeat is split in
    /// chunks, each after its own header (a later one quoting the text
    /// before it), and a position's vote is the largest over all of them.
    #[test]
    fn a_chunked_repeats_votes_are_its_largest_attention() {
        votes_match_the_repeats_softmax(Some(128));
    }

    fn votes_match_the_repeats_softmax(n_ubatch: Option<u32>) {
        let model = tiny();
        let tokens = prompt(model, 300);
        let (p, w) = (tokens.len(), 32);
        let observer = WindowObserver::new();
        let mut params = ContextParams::default()
            .with_n_ctx(1024)
            .with_threads(2)
            .with_flash_attn(FlashAttention::Off);
        if let Some(n) = n_ubatch {
            params = params.with_batch(n, n);
        }
        let mut ctx = Context::new(model, &params.with_observer(observer.clone())).unwrap();
        ctx.decode_tokens(0, &tokens, 0, false).unwrap();
        let comp = Compressor::with_method(SnapKvConfig::default(), "reconstruct").unwrap();
        let votes = comp
            .reconstruction_votes(&mut ctx, 0, &observer, &tokens, p - w)
            .unwrap();
        assert_eq!(ctx.seq_pos_max(0), Some(p as Pos - 1), "the repeat is removed");

        // The same repeat chunk by chunk, with the softmax captured: the
        // largest probability over every chunk's rows.
        let framing = RepeatFraming::for_model(model).unwrap();
        let chunk = ctx.n_ubatch() - framing.longest();
        let body = &tokens[1..];
        let mut want = vec![0f32; model.n_layer() * model.n_head() * (p - w)];
        let mut passes = 0;
        for done in (0..body.len()).step_by(chunk) {
            let mut batch = Vec::new();
            framing.header(&body[..done], &mut batch);
            batch.extend_from_slice(&body[done..body.len().min(done + chunk)]);
            let pass = CaptureRequest::for_model(model, Some(batch.len()), batch.len());
            let (capture, _) = comp
                .observe_batch(&mut ctx, &observer, 0, &batch, p as Pos, pass)
                .unwrap();
            let rows = batch.len();
            for layer in 0..model.n_layer() {
                let softmax = capture.softmax[layer].as_ref().expect("softmax captured");
                for head in 0..model.n_head() {
                    let out = &mut want[(layer * model.n_head() + head) * (p - w)..][..p - w];
                    // In a fresh context the sequence's cells are 0..p in order.
                    for (c, o) in out.iter_mut().enumerate() {
                        for q in 0..rows {
                            *o = o.max(softmax.data[(head * rows + q) * softmax.n_cols + c]);
                        }
                    }
                }
            }
            assert!(ctx.seq_rm(0, p as Pos, -1));
            passes += 1;
        }
        assert_eq!(passes > 1, n_ubatch.is_some(), "{passes} chunks");
        let mut compared = 0;
        for layer in 0..model.n_layer() {
            for head in 0..model.n_head() {
                let expected = &want[(layer * model.n_head() + head) * (p - w)..][..p - w];
                for (c, (&got, &want)) in votes.row(layer, head).iter().zip(expected).enumerate() {
                    // ggml's softmax and ours round differently (0.2%).
                    assert!(
                        (got - want).abs() <= 1e-2 * want + 1e-4,
                        "layer {layer} head {head} position {c}: {got} vs {want}"
                    );
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, model.n_layer() * model.n_head() * (p - w));
    }

    /// A chunk of the repeat after the first quotes the last tokens before
    /// it; every header ends with the turn change (a newline for the tiny
    /// model, which has no chat template).
    #[test]
    fn a_later_chunk_quotes_the_text_before_it() {
        let model = tiny();
        let framing = RepeatFraming::for_model(model).unwrap();
        let newline = model.tokenize("\n", false, false).unwrap();
        assert_eq!(framing.turn, newline);
        let mut first = Vec::new();
        framing.header(&[], &mut first);
        let want: Vec<Token> = model
            .tokenize(REPEAT_REQUEST, false, false)
            .unwrap()
            .into_iter()
            .chain(newline.clone())
            .collect();
        assert_eq!(first, want);

        let before = prompt(model, 40);
        let mut later = Vec::new();
        framing.header(&before, &mut later);
        let resume = model.tokenize(RESUME_REQUEST, false, false).unwrap();
        let want: Vec<Token> = resume
            .iter()
            .chain(&before[before.len() - RESUME_ANCHOR..])
            .chain(&newline)
            .copied()
            .collect();
        assert_eq!(later, want);
        assert!(later.len() <= framing.longest() && first.len() <= framing.longest());
        // Fewer tokens before the chunk than the anchor: all of them.
        let mut short = Vec::new();
        framing.header(&before[..3], &mut short);
        assert_eq!(short.len(), resume.len() + 3 + newline.len());
    }

    /// With a chat template the repeat is the assistant's turn: the header
    /// closes the user's turn and opens the assistant's with the template's
    /// own special tokens (SmolLM2's ChatML).
    #[test]
    fn the_repeat_is_the_assistants_turn() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        let model = Model::load(crate::init_backend(), &path, &ModelParams::default())
            .unwrap_or_else(|e| panic!("{} (scripts/fetch-models.sh fetches it): {e}", path.display()));
        let framing = RepeatFraming::for_model(&model).unwrap();
        let mut header = Vec::new();
        framing.header(&[], &mut header);
        let text = model.detokenize(&header, true).unwrap();
        assert!(
            text.starts_with(REPEAT_REQUEST) && text.ends_with("<|im_end|>\n<|im_start|>assistant\n"),
            "{text:?}"
        );
        let open = model.tokenize("<|im_start|>", false, true).unwrap();
        assert_eq!(open.len(), 1, "a special token");
        assert!(header.contains(&open[0]), "parsed as the special token, not as text");
    }

    /// Compressing by reconstruction: the repeat is gone, the sequence holds
    /// the budget, and the logits left are the prompt's last token's over
    /// the compressed cache (not the repeat's). The context leaves less room
    /// after the prompt than a micro-batch: the repeat's chunks shrink to
    /// fit.
    #[test]
    fn reconstruct_leaves_the_compressed_prompt_and_its_logits() {
        let model = tiny();
        let tokens = prompt(model, 600);
        let p = tokens.len();
        let observer = WindowObserver::new();
        let mut ctx = context(model, FlashAttention::On, &observer);
        let config = SnapKvConfig {
            budget: crate::Budget::Cells(128),
            ..SnapKvConfig::default()
        };
        let comp = Compressor::with_method(config, "reconstruct").unwrap();
        let stats = comp.prefill(&mut ctx, 0, &tokens).unwrap();
        assert_eq!(stats.score_source, ScoreSource::Reconstruction);
        assert_eq!((stats.cells_before, stats.cells_after), (p, 128));
        assert_eq!(ctx.seq_pos_max(0), Some(p as Pos - 1));
        let left = ctx.logits_ith(-1).unwrap().to_vec();
        assert!(ctx.seq_rm(0, p as Pos - 1, -1));
        ctx.decode_tokens(0, &tokens[p - 1..], p as Pos - 1, true).unwrap();
        assert_eq!(ctx.logits_ith(-1).unwrap(), &left[..]);

        // Without every token of the sequence it cannot repeat it; the
        // sequence is left as it was.
        ctx.seq_rm(0, -1, -1);
        ctx.decode_tokens(0, &tokens[..100], 0, false).unwrap();
        let before = ctx.state_seq_get(0).unwrap();
        let err = comp.prefill(&mut ctx, 0, &tokens[100..]).unwrap_err();
        assert!(err.to_string().contains("needs all of its"), "{err}");
        assert_eq!(ctx.state_seq_get(0).unwrap(), before);
    }
}
