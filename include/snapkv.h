/*
 * snapkv.h: SnapKV KV-cache compression for llama.cpp, C interface.
 *
 * After a long prompt has been evaluated, snapkv keeps, for every layer and
 * every KV head, the prompt positions the observation window (the prompt's
 * last tokens) attends to, plus the window itself, and evicts the rest from
 * llama.cpp's own KV cache. Decoding then attends over `budget` cells per
 * sequence however long the prompt was.
 *
 * Usage (see examples/passkey.c):
 *
 *     snapkv_observer *obs = snapkv_observer_new();
 *     struct llama_context_params cp = llama_context_default_params();
 *     snapkv_observer_attach(obs, &cp);                  // before creating the context
 *     struct llama_context *ctx = llama_init_from_model(model, cp);
 *     snapkv_params p;
 *     snapkv_params_default(&p);
 *     p.budget = 256;
 *     // either: evaluate and compress in one call
 *     snapkv_prefill(ctx, obs, &p, 0, tokens, n_tokens, NULL);
 *     // or, after evaluating the prompt yourself with llama_decode:
 *     snapkv_compress_after_prefill(ctx, obs, &p, 0, tokens, n_tokens, NULL);
 *     ... decode as usual ...
 *     llama_free(ctx);
 *     snapkv_observer_free(obs);                          // after the context
 *
 * Linking: libsnapkv.a (default build) contains llama.cpp; libsnapkv.so
 * built with the `dynamic-link` feature uses the process's shared libllama
 * (plugin mode). See README.md, "C and C++".
 *
 * Conventions:
 * - Fallible functions return a snapkv_status: SNAPKV_OK (0) or an error
 *   code. Codes are never renumbered. On failure, snapkv_last_error() holds
 *   a message for the calling thread; output arguments are written only on
 *   success.
 * - No function aborts the host or lets a Rust panic escape: an internal bug
 *   returns SNAPKV_ERR_PANIC.
 * - Functions taking a llama_context must not run concurrently with any
 *   other use of that context (as llama.h's functions).
 * - No ABI stability is promised before snapkv 1.0. The structs carry their
 *   size as first member so that later versions can extend them.
 */
#ifndef SNAPKV_H
#define SNAPKV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "llama.h"

/* Version of this header; snapkv_version() reports the library's. */
#define SNAPKV_VERSION_MAJOR 0
#define SNAPKV_VERSION_MINOR 1
#define SNAPKV_VERSION_PATCH 0
#define SNAPKV_VERSION_STRING "0.1.0+llama-cpp-python.0.3.36"
/* The llama.cpp this header goes with: the tree of llama-cpp-python 0.3.36,
 * ggml 0.25.3. snapkv_llama_ggml_version() reports what the library was
 * built against; snapkv_check_llama() compares it with the process's. */
#define SNAPKV_LLAMA_CPP_PYTHON_VERSION "0.3.36"
#define SNAPKV_LLAMA_GGML_VERSION "0.25.3"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Status codes                                                             */
/* ------------------------------------------------------------------------ */

typedef int32_t snapkv_status;

enum snapkv_status_code {
    SNAPKV_OK = 0,
    SNAPKV_ERR_NULL_POINTER = 1,           /* a required pointer argument is NULL */
    SNAPKV_ERR_INVALID_PARAMS = 2,         /* snapkv_params invalid (or window > n_ubatch) */
    SNAPKV_ERR_INVALID_ARGUMENT = 3,       /* another argument out of range (e.g. too few tokens, a token id outside the vocabulary) */
    SNAPKV_ERR_INVALID_SEQUENCE = 4,       /* seq_id outside 0 .. llama_n_seq_max(ctx)-1 */
    SNAPKV_ERR_EMPTY_SEQUENCE = 5,         /* the sequence holds no KV cells */
    SNAPKV_ERR_OBSERVER_NOT_ATTACHED = 6,  /* ctx was created without this observer */
    SNAPKV_ERR_UNSUPPORTED = 7,            /* model/cache not supported (recurrent, SWA, ALiBi, ...) */
    SNAPKV_ERR_DECODE = 8,                 /* llama_decode failed (e.g. context full) */
    SNAPKV_ERR_CAPTURE = 9,                /* observation window capture incomplete */
    SNAPKV_ERR_STATE = 10,                 /* llama_state_seq_* failed */
    SNAPKV_ERR_STATE_FORMAT = 11,          /* unrecognised sequence-state format */
    SNAPKV_ERR_RESTORE_FAILED = 12,        /* failure, and the sequence could not be restored */
    SNAPKV_ERR_LLAMA_MISMATCH = 13,        /* process's llama.cpp differs from the build's */
    SNAPKV_ERR_MODEL_LOAD = 14,            /* (reserved for model loading) */
    SNAPKV_ERR_CONTEXT_CREATE = 15,        /* (reserved for context creation) */
    SNAPKV_ERR_TOKENIZE = 16,              /* (reserved for tokenization) */
    SNAPKV_ERR_IO = 17,                    /* I/O error */
    SNAPKV_ERR_INTERNAL = 18,              /* internal inconsistency (a bug) */
    SNAPKV_ERR_PANIC = 19,                 /* panic caught at the boundary (a bug) */
    SNAPKV_ERR_OUT_OF_MEMORY = 20          /* a buffer that grows with the prompt could not be allocated */
};

/* A static, human-readable description of `status`; never NULL, also for
 * unknown codes. Static storage: valid for the life of the process; the
 * caller must not free it. */
const char * snapkv_status_str(snapkv_status status);

/* Copies the calling thread's last-error message into `buf` (at most len-1
 * bytes, always NUL-terminated when len > 0) and returns the message's full
 * length without the NUL, like snprintf: the message was truncated when
 * the result is >= len. `buf` may be NULL when len is 0 (to ask the size).
 * The message describes the latest snapkv call on this thread that returned
 * a status or a pointer: it is empty after a success. Caller owns `buf`. */
size_t snapkv_last_error(char * buf, size_t len);

/* ------------------------------------------------------------------------ */
/* Version                                                                  */
/* ------------------------------------------------------------------------ */

/* The library's version, e.g. "0.1.0+llama-cpp-python.0.3.36". Static
 * storage; the caller must not free it. */
const char * snapkv_version(void);

/* The ggml version of the llama.cpp the library was built against. Static
 * storage. */
const char * snapkv_llama_ggml_version(void);

/* Compares ggml_version() of the llama.cpp in this process with the one the
 * library was built for. SNAPKV_OK, or SNAPKV_ERR_LLAMA_MISMATCH with both
 * versions in the message. snapkv_observer_attach, snapkv_prefill and
 * snapkv_compress_after_prefill check this themselves and refuse a
 * mismatch (struct layouts would differ). */
snapkv_status snapkv_check_llama(void);

/* ------------------------------------------------------------------------ */
/* Parameters                                                               */
/* ------------------------------------------------------------------------ */

enum snapkv_pooling {
    SNAPKV_POOLING_MAX = 0, /* max over the kernel window */
    SNAPKV_POOLING_AVG = 1  /* mean over the kernel window (default) */
};

enum snapkv_pool_align {
    SNAPKV_POOL_ALIGN_CENTERED = 0, /* the kernel window centred on each position (SnapKV's paper) */
    SNAPKV_POOL_ALIGN_TRAILING = 1, /* the window ends at each position: a voted position keeps the
                                       kernel - 1 tokens after it */
    SNAPKV_POOL_ALIGN_FORWARD = 2   /* a voted position keeps pool_forward tokens after it and
                                       kernel - 1 - pool_forward before it */
};

enum snapkv_value_weighting {
    SNAPKV_VALUE_WEIGHTING_OFF = 0, /* votes are attention probabilities (SnapKV's paper; default) */
    SNAPKV_VALUE_WEIGHTING_NORM = 1 /* each vote times the norm of the cached value vector it
                                       points at */
};

enum snapkv_query_aggregation {
    SNAPKV_QUERY_AGGREGATION_SUM = 0, /* a vote sums the window queries' probabilities
                                         (SnapKV's paper; default) */
    SNAPKV_QUERY_AGGREGATION_MAX = 1  /* a vote is the largest of them */
};

/* How the kept positions are chosen (snapkv_params.method). */
enum snapkv_method {
    SNAPKV_METHOD_SNAPKV = 0,     /* SnapKV: what the prompt's last `window`
                                     tokens attend to. Best when the prompt
                                     ends with the question (default). */
    SNAPKV_METHOD_KEYDIFF = 1,    /* query-free: the keys that differ most
                                     from their head's mean key. No question
                                     needed; costs almost nothing. */
    SNAPKV_METHOD_RECONSTRUCT = 2 /* question-agnostic: what the model
                                     attends to while repeating the sequence
                                     (KVzip-style). For a cache compressed
                                     before its questions are known (a shared
                                     document, a saved state); costs about
                                     1.7 prefills more at 4,000 tokens.
                                     Needs every token of
                                     the sequence: snapkv_prefill into an
                                     empty sequence, or
                                     snapkv_compress_after_prefill given all
                                     of them; otherwise
                                     SNAPKV_ERR_INVALID_ARGUMENT. */
};

typedef struct snapkv_params {
    /* sizeof(snapkv_params) of the header the caller compiled against; set
     * by snapkv_params_default. Must stay the first member. */
    uint32_t size;
    /* Observation window: the last `window` prompt tokens vote and are
     * always kept. Default 32; must fit one micro-batch (n_ubatch). */
    uint32_t window;
    /* Cells kept per KV head, window included; > window. Default 1024.
     * Set to 0 to use budget_fraction instead. */
    uint32_t budget;
    /* Pooling kernel size: odd, 1 disables pooling. Default 11; at least
     * pool_forward + 1 with SNAPKV_POOL_ALIGN_FORWARD. */
    uint32_t kernel;
    /* Fraction of the prompt kept, in (0, 1], rounded up; used only when
     * budget is 0. Default 0 (unused). */
    double budget_fraction;
    /* enum snapkv_pooling. Default SNAPKV_POOLING_AVG. */
    int32_t pooling;
    /* Must be 0 (snapkv_params_default sets it). It held the GQA
     * aggregation, retired without a measured win: the query heads that
     * share a KV head vote by their mean. A non-zero value is
     * SNAPKV_ERR_INVALID_PARAMS. */
    int32_t reserved;
    /* enum snapkv_pool_align. Default SNAPKV_POOL_ALIGN_FORWARD. */
    int32_t pool_align;
    /* With SNAPKV_POOL_ALIGN_FORWARD: how many positions after a voted
     * position it keeps, below kernel. Default 7. Ignored with the other
     * alignments. */
    uint32_t pool_forward;
    /* enum snapkv_value_weighting. Default SNAPKV_VALUE_WEIGHTING_OFF.
     * Appended after pool_forward: a caller built against a header without
     * it passes size 40 and gets the default. */
    int32_t value_weighting;
    /* enum snapkv_query_aggregation. Default SNAPKV_QUERY_AGGREGATION_SUM.
     * It fills what was the struct's tail padding: the size is unchanged. */
    int32_t query_aggregation;
    /* Answer tokens to draft: 0 (the default) for none. With a draft, the
     * cache is compressed once from the window, up to draft_tokens answer
     * tokens are decoded greedily on it with their queries recorded, and
     * the positions are selected again from the full prompt with the
     * window's and the draft's queries voting together. The draft's tokens
     * are discarded and the prompt's last token is decoded again over the
     * final cache, so llama_get_logits_ith(ctx, -1) is the prompt's (over
     * the compressed cache). Cost: draft_tokens decodes over `budget`
     * cells, a second scoring and compaction. snapkv_prefill and
     * snapkv_compress_after_prefill take it; snapkv_compress_observed,
     * which is not given the prompt's tokens, refuses it
     * (SNAPKV_ERR_INVALID_ARGUMENT). At most 1024. Appended after
     * query_aggregation: a caller built against a header without it passes
     * size 48 and gets 0. */
    uint64_t draft_tokens;
    /* enum snapkv_method: how the kept positions are chosen. Default
     * SNAPKV_METHOD_SNAPKV. Appended after draft_tokens: a caller built
     * against a header without it passes size 56 and gets SnapKV. */
    int32_t method;
    /* Must be 0 (snapkv_params_default sets it): keeps the struct free of
     * padding, for a later field. */
    uint32_t spare;
} snapkv_params;

/* Fills *params with the defaults (and params->size). Caller owns params.
 * SNAPKV_ERR_NULL_POINTER when params is NULL. Parameters are validated
 * when used: invalid ones give SNAPKV_ERR_INVALID_PARAMS. */
snapkv_status snapkv_params_default(snapkv_params * params);

/* Named sets of the selection parameters (kernel, pooling,
 * pool_align, pool_forward, value_weighting, query_aggregation), measured
 * together; window and budget are not part of them. */
enum snapkv_preset {
    SNAPKV_PRESET_DEFAULT = 0, /* snapkv_params_default's: for continuations
                                  that draw on the whole prompt */
    SNAPKV_PRESET_FACTS = 1,   /* for answers that copy facts out of the
                                  prompt: QUERY_AGGREGATION_MAX, kernel 7,
                                  POOL_ALIGN_TRAILING, VALUE_WEIGHTING_NORM,
                                  POOLING_MAX */
    SNAPKV_PRESET_RECONSTRUCT = 2 /* for SNAPKV_METHOD_RECONSTRUCT: POOLING_MAX
                                  over kernel 7, POOL_ALIGN_CENTERED (a
                                  number the repeat copies keeps all its
                                  digits). Sets the pooling only: set
                                  params->method too. Kept far more answers
                                  than the default pooling with that method
                                  on held-out documents (docs/usage.md) */
};

/* Fills *params like snapkv_params_default, with the selection parameters
 * of `preset` (enum snapkv_preset). SNAPKV_ERR_NULL_POINTER when params is
 * NULL; SNAPKV_ERR_INVALID_PARAMS for an unknown preset, *params untouched. */
snapkv_status snapkv_params_preset(snapkv_params * params, int32_t preset);

/* ------------------------------------------------------------------------ */
/* Statistics                                                               */
/* ------------------------------------------------------------------------ */

enum snapkv_score_source {
    SNAPKV_SCORE_NONE = 0,      /* nothing was scored (no-op) */
    SNAPKV_SCORE_SOFTMAX = 1,   /* the model's attention softmax (flash attention off) */
    SNAPKV_SCORE_QUERY_KEY = 2, /* captured queries against cached keys (flash attention on) */
    SNAPKV_SCORE_KEYS = 3,          /* the cached keys alone (a query-free method) */
    SNAPKV_SCORE_RECONSTRUCTION = 4 /* a repeat of the sequence against its keys (a
                                       question-agnostic method) */
    /* This header's entry points run SnapKV: they report 0 to 2. */
};

typedef struct snapkv_stats {
    /* Set by the caller to sizeof(snapkv_stats) before the call; the
     * library writes the fields it knows and leaves `size` as it is. */
    uint32_t size;
    /* Whether the cache was rewritten; false when the sequence already fit
     * the budget (a no-op, not an error). */
    bool compressed;
    /* enum snapkv_score_source. */
    int32_t score_source;
    uint64_t cells_before;  /* cells of the sequence before */
    uint64_t cells_after;   /* cells after (the budget when compressed) */
    uint64_t bytes_before;  /* bytes of the sequence's state before (0 for a no-op) */
    uint64_t bytes_after;   /* bytes after */
    double prefill_seconds; /* evaluating the prompt before its last micro-batch (snapkv_prefill) */
    double window_seconds;  /* evaluating the armed micro-batch (prefill: the last one; hook: the window) */
    double observe_seconds; /* copying captured tensors (part of window_seconds) */
    double score_seconds;   /* scoring */
    double select_seconds;  /* selecting */
    double compact_seconds; /* reading, rewriting and writing the sequence state
                             * (snapkv_compress_after_prefill: and its snapshot
                             * for restoring on failure) */
    /* Appended after compact_seconds: a caller built against a header
     * without them passes size 96 and gets the fields above only. */
    uint64_t draft_tokens;  /* answer tokens drafted (0 without a draft) */
    double draft_seconds;   /* decoding the draft and the prompt's last token again */
} snapkv_stats;

/* ------------------------------------------------------------------------ */
/* Observer                                                                 */
/* ------------------------------------------------------------------------ */

/* The observation-window observer: a graph-evaluation callback that stays
 * dormant except while snapkv evaluates the window. One observer serves one
 * context. */
typedef struct snapkv_observer snapkv_observer;

/* A new observer. Caller owns it: free with snapkv_observer_free after
 * the context it was attached to has been freed. NULL on failure (see
 * snapkv_last_error). */
snapkv_observer * snapkv_observer_new(void);

/* Installs `obs` as params->cb_eval / cb_eval_user_data, before
 * llama_init_from_model(model, *params). A callback the caller had already
 * set is chained: it still sees every tensor. Attaching the same observer
 * to the same params twice is a no-op. The context created from these
 * params keeps a pointer to `obs`: obs must stay valid until that context
 * is freed (llama_free). Caller owns params; obs is borrowed.
 *
 * Also reads LLAMA_ATTN_ROT_DISABLE as llama.cpp will when it creates the
 * context (atoi), so that scoring undoes exactly the key rotation of a
 * quantized K cache: do not change that variable between this call and
 * llama_init_from_model.
 *
 * One observer serves one context: attaching it to other params is
 * refused (SNAPKV_ERR_INVALID_ARGUMENT; the first params' chained callback
 * is kept). Used with a context that was not created from these params,
 * the compression functions answer SNAPKV_ERR_OBSERVER_NOT_ATTACHED (when
 * the window is evaluated and no callback reaches the observer). */
snapkv_status snapkv_observer_attach(snapkv_observer * obs, struct llama_context_params * params);

/* Frees an observer; NULL is a no-op. Only after the context it was
 * attached to has been freed. */
void snapkv_observer_free(snapkv_observer * obs);

/* ------------------------------------------------------------------------ */
/* Compression                                                              */
/* ------------------------------------------------------------------------ */

/* Evaluates `tokens` into sequence `seq_id` of `ctx` (after the positions it
 * already holds) and compresses the sequence to params->budget cells per KV
 * head: the prompt is evaluated in batches of n_batch, its last
 * micro-batch (which ends with the window) with the observer armed, then
 * the cache is compacted. No token is evaluated twice. Afterwards the logits of the last token are
 * available (llama_get_logits_ith(ctx, -1)) and decoding continues at
 * position (previous length + n_tokens). When the sequence fits the budget
 * it is evaluated and left uncompressed (stats->compressed == false).
 *
 * ctx: borrowed, owned by the caller, never freed by snapkv; it must have
 *      been created from params carrying `obs` (snapkv_observer_attach),
 *      else SNAPKV_ERR_OBSERVER_NOT_ATTACHED (detected when the window is
 *      evaluated). n_ubatch must be at least params->window.
 * obs, params: borrowed for the call.
 * tokens: n_tokens tokens (>= params->window when compressing), borrowed
 *      for the call; may be NULL only when n_tokens is 0 (then
 *      SNAPKV_ERR_INVALID_ARGUMENT).
 * stats: NULL, or caller-owned with stats->size set; written on success.
 *
 * On failure the sequence is left as it was before the call (the tokens
 * this call evaluated are removed again), except SNAPKV_ERR_RESTORE_FAILED
 * and SNAPKV_ERR_PANIC. */
snapkv_status snapkv_prefill(
    struct llama_context * ctx,
    snapkv_observer * obs,
    const snapkv_params * params,
    llama_seq_id seq_id,
    const llama_token * tokens,
    size_t n_tokens,
    snapkv_stats * stats);

/* The hook for a sequence the caller already evaluated (with llama_decode
 * on a context carrying `obs`): re-evaluates only its last params->window
 * tokens with the observer armed, then compresses the sequence to
 * params->budget cells per KV head. Pass at least the sequence's last
 * `window` tokens (e.g. the whole prompt: extra leading tokens are
 * ignored). The logits of the last token are recomputed
 * (llama_get_logits_ith(ctx, -1)); decoding continues at the next
 * position as before. The kept cells keep the K/V the caller's decodes
 * computed (compaction starts from a snapshot taken before the window is
 * evaluated again; with flash attention off the window's cells hold the
 * re-evaluation's K/V). When the sequence fits the budget nothing is done
 * (stats->compressed == false).
 *
 * Ownership as snapkv_prefill. Errors: SNAPKV_ERR_INVALID_SEQUENCE,
 * SNAPKV_ERR_EMPTY_SEQUENCE, SNAPKV_ERR_OBSERVER_NOT_ATTACHED,
 * SNAPKV_ERR_INVALID_PARAMS, SNAPKV_ERR_INVALID_ARGUMENT (fewer than
 * `window` tokens, or tokens that are not the sequence's last ones: the
 * keys their re-evaluation computes in the first layer must match the
 * cached ones, up to rounding and an 8-bit K cache's quantization; a 4- or
 * 5-bit K cache cannot tell), SNAPKV_ERR_UNSUPPORTED, ...; on any of them the
 * sequence's cells are exactly as before the call (except
 * SNAPKV_ERR_RESTORE_FAILED and SNAPKV_ERR_PANIC).
 *
 * After compression the sequence's cells below the window carry nominal
 * positions (see the crate documentation): llama_memory_seq_rm from the
 * window onwards is exact, prefix reuse by token comparison is not. */
snapkv_status snapkv_compress_after_prefill(
    struct llama_context * ctx,
    snapkv_observer * obs,
    const snapkv_params * params,
    llama_seq_id seq_id,
    const llama_token * window_tokens,
    size_t n_window_tokens,
    snapkv_stats * stats);

/* The observed-decode hook, for hosts that evaluate the prompt themselves
 * and want no token evaluated twice. Step 1: snapkv_observe arms `obs` so
 * that the host's next llama_decode calls on `ctx` (the prompt, in any
 * batch and micro-batch sizes) record the rows of their last
 * params->window tokens; while armed every decode splits its graph at the
 * recorded tensors (a small cost). Step 2, right after the prompt:
 * snapkv_compress_observed compresses the sequence from those rows and
 * disarms. Nothing is re-evaluated; the logits of the last token stay as
 * the host's decode left them. Decode only this sequence between the two
 * calls: the last `window` tokens decoded must be the sequence's last
 * `window` tokens (their positions are checked, and their keys in the
 * first layer must match the ones the sequence caches, so another
 * sequence's rows at the same positions are refused; a 4- or 5-bit K cache
 * cannot tell).
 *
 * snapkv_observe: ctx, obs, params borrowed for the call; ctx must carry
 * `obs` (else snapkv_compress_observed reports
 * SNAPKV_ERR_OBSERVER_NOT_ATTACHED). Errors: SNAPKV_ERR_NULL_POINTER,
 * SNAPKV_ERR_INVALID_PARAMS. Arming again restarts the recording. */
snapkv_status snapkv_observe(struct llama_context * ctx, snapkv_observer * obs, const snapkv_params * params);

/* Step 2 of the observed-decode hook; pass the same params as to
 * snapkv_observe. Ownership as snapkv_prefill. Errors:
 * SNAPKV_ERR_INVALID_ARGUMENT (not armed, or the tokens decoded since
 * snapkv_observe do not end with the sequence's last `window` tokens),
 * SNAPKV_ERR_OBSERVER_NOT_ATTACHED (no decode reached the observer),
 * SNAPKV_ERR_INVALID_SEQUENCE, SNAPKV_ERR_EMPTY_SEQUENCE,
 * SNAPKV_ERR_UNSUPPORTED, ...; on any of them the sequence's cells are
 * exactly as before the call (except SNAPKV_ERR_RESTORE_FAILED and
 * SNAPKV_ERR_PANIC). The observer is disarmed in every case. */
snapkv_status snapkv_compress_observed(
    struct llama_context * ctx,
    snapkv_observer * obs,
    const snapkv_params * params,
    llama_seq_id seq_id,
    snapkv_stats * stats);

/* Compressing after the answer's first tokens. Either hook may also run
 * after the host has generated the first few tokens of the answer rather
 * than right after the prompt: arm with snapkv_observe before the prompt
 * and call snapkv_compress_observed after those tokens, or pass the prompt
 * and those tokens to snapkv_compress_after_prefill. The window then ends
 * with the answer's first tokens, whose attention points at what the rest
 * of the answer needs; those tokens are decoded over the full cache
 * (`snapkv eval` measures this as lookahead=N). */

/* ------------------------------------------------------------------------ */
/* Layout table (drift test)                                                */
/* ------------------------------------------------------------------------ */

/* Entry `index` of the library's table of sizes, field offsets and
 * constants, named as C spells them ("sizeof(snapkv_params)",
 * "offsetof(snapkv_stats, cells_after)", "SNAPKV_OK", ...). A test
 * compares every entry with this header, so header and library cannot
 * disagree silently. *name: static storage. SNAPKV_ERR_INVALID_ARGUMENT
 * past the last entry. */
snapkv_status snapkv_abi_item(size_t index, const char ** name, int64_t * value);

#ifdef __cplusplus
}
#endif

#endif /* SNAPKV_H */
