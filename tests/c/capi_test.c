/*
 * Acceptance test of the C ABI on the tiny generated model (fast enough for
 * valgrind): layout drift, NULL pointers, a context created without the
 * observer, a sequence that does not exist, an empty sequence, invalid
 * params. Each error must come back as its code with a message, the host
 * keeps running, and the sequence's KV cache (llama_state_seq_get_data
 * bytes) is unchanged. Ends with successful compressions and decoding.
 *
 * Usage: capi_test MODEL.gguf
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "abi_check.h"
#include "llama.h"
#include "snapkv.h"

static int failures = 0;

#define CHECK(cond, msg)                                                        \
    do {                                                                        \
        if (!(cond)) {                                                          \
            fprintf(stderr, "FAIL %s:%d: %s (%s)\n", __FILE__, __LINE__, msg, #cond); \
            failures++;                                                         \
        }                                                                       \
    } while (0)

static const char * code_name(snapkv_status s) {
    switch (s) {
        case SNAPKV_OK: return "SNAPKV_OK";
        case SNAPKV_ERR_NULL_POINTER: return "SNAPKV_ERR_NULL_POINTER";
        case SNAPKV_ERR_INVALID_PARAMS: return "SNAPKV_ERR_INVALID_PARAMS";
        case SNAPKV_ERR_INVALID_ARGUMENT: return "SNAPKV_ERR_INVALID_ARGUMENT";
        case SNAPKV_ERR_INVALID_SEQUENCE: return "SNAPKV_ERR_INVALID_SEQUENCE";
        case SNAPKV_ERR_EMPTY_SEQUENCE: return "SNAPKV_ERR_EMPTY_SEQUENCE";
        case SNAPKV_ERR_OBSERVER_NOT_ATTACHED: return "SNAPKV_ERR_OBSERVER_NOT_ATTACHED";
        default: return "other";
    }
}

/* Checks a status and that a failure left a message (and a success none). */
static void expect(snapkv_status got, snapkv_status want, const char * what, const char * needle) {
    char msg[1024];
    size_t n = snapkv_last_error(msg, sizeof msg);
    if (got != want) {
        fprintf(stderr, "FAIL %s: got %d (%s), want %d (%s): %s\n", what, got, snapkv_status_str(got), want,
                code_name(want), msg);
        failures++;
        return;
    }
    if (want != SNAPKV_OK && (n == 0 || msg[0] == '\0')) {
        fprintf(stderr, "FAIL %s: %s without a message\n", what, code_name(want));
        failures++;
        return;
    }
    if (want == SNAPKV_OK && n != 0) {
        fprintf(stderr, "FAIL %s: success left a message: %s\n", what, msg);
        failures++;
        return;
    }
    if (needle != NULL && strstr(msg, needle) == NULL) {
        fprintf(stderr, "FAIL %s: message lacks \"%s\": %s\n", what, needle, msg);
        failures++;
        return;
    }
    printf("ok  %-44s %-34s %s\n", what, code_name(got), msg);
}

/* A copy of sequence `seq`'s state; caller frees. */
static unsigned char * seq_state(struct llama_context * ctx, llama_seq_id seq, size_t * size) {
    size_t n = llama_state_seq_get_size(ctx, seq);
    unsigned char * buf = (unsigned char *) malloc(n ? n : 1);
    *size = llama_state_seq_get_data(ctx, buf, n, seq);
    return buf;
}

/* Whether `seq` still serialises to exactly `ref`. */
static int same_state(struct llama_context * ctx, llama_seq_id seq, const unsigned char * ref, size_t ref_size) {
    size_t n = 0;
    unsigned char * now = seq_state(ctx, seq, &n);
    int same = n == ref_size && memcmp(now, ref, n) == 0;
    free(now);
    return same;
}

static int decode(struct llama_context * ctx, llama_seq_id seq, const llama_token * toks, int n, llama_pos pos0) {
    struct llama_batch b = llama_batch_init(n, 0, 1);
    int i, rc;
    for (i = 0; i < n; i++) {
        b.token[i] = toks[i];
        b.pos[i] = pos0 + i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = seq;
        b.logits[i] = i == n - 1;
    }
    b.n_tokens = n;
    rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc;
}

static int argmax(const float * v, int n) {
    int i, best = 0;
    for (i = 1; i < n; i++) {
        if (v[i] > v[best]) {
            best = i;
        }
    }
    return best;
}

/* A callback the host had installed before attaching the observer: it must
 * keep seeing the graph (the observer chains it). */
static int host_cb_calls = 0;
static bool host_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    (void) t;
    (*(int *) user_data)++;
    return !ask; /* wants no tensor data */
}

/* llama.cpp's log, errors only. */
static void quiet_log(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    enum { N_MAX = 512 };
    const char * text =
        "The grass is green and the sky is blue. A bird sings on the tree and the river flows to the sea. "
        "Remember the pass key number, it is the first thing you will be asked about. The sun is yellow. ";
    char prompt[4096];
    llama_token toks[N_MAX];
    /* First part (N_BIG - 512) fits; the armed 512 do not, with one or two KV streams. */
    enum { N_BIG = 1000 };
    static llama_token big[N_BIG];
    int n_prompt, i;
    struct llama_model_params mp;
    struct llama_model * model;
    const struct llama_vocab * vocab;
    struct llama_context_params cp;
    struct llama_context *ctx, *plain;
    snapkv_observer *obs, *other;
    snapkv_params p, bad;
    snapkv_stats st, sentinel;
    unsigned char *ref0, *ref1, *ref_plain;
    size_t ref0_n, ref1_n, ref_plain_n;
    const llama_seq_id S0 = 0, S1 = 1;

    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }

    /* Version, layout and status strings: no model needed. */
    failures += abi_check();
    expect(snapkv_check_llama(), SNAPKV_OK, "snapkv_check_llama", NULL);
    for (i = 0; i <= SNAPKV_ERR_OUT_OF_MEMORY; i++) {
        CHECK(snapkv_status_str(i) != NULL && snapkv_status_str(i)[0] != '\0', "status string");
    }
    CHECK(strstr(snapkv_status_str(-7), "unknown") != NULL, "unknown status string");

    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    model = llama_model_load_from_file(argv[1], mp);
    if (model == NULL) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 2;
    }
    vocab = llama_model_get_vocab(model);
    prompt[0] = '\0';
    for (i = 0; i < 3; i++) {
        strcat(prompt, text);
    }
    n_prompt = llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), toks, N_MAX, true, false);
    printf("prompt: %d tokens\n", n_prompt);
    if (n_prompt < 100 || n_prompt > 400) {
        fprintf(stderr, "FAIL: prompt of %d tokens, expected 100..400\n", n_prompt);
        return 1;
    }

    /* A context with the observer (two sequences), and one without. */
    obs = snapkv_observer_new();
    other = snapkv_observer_new();
    CHECK(obs != NULL && other != NULL, "snapkv_observer_new");
    cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    cp.n_seq_max = 2;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.cb_eval = host_cb;
    cp.cb_eval_user_data = &host_cb_calls;
    expect(snapkv_observer_attach(NULL, &cp), SNAPKV_ERR_NULL_POINTER, "attach(NULL obs)", "obs");
    expect(snapkv_observer_attach(obs, NULL), SNAPKV_ERR_NULL_POINTER, "attach(NULL params)", "params");
    expect(snapkv_observer_attach(obs, &cp), SNAPKV_OK, "attach", NULL);
    CHECK(cp.cb_eval != NULL, "cb_eval installed");
    ctx = llama_init_from_model(model, cp);
    cp = llama_context_default_params();
    cp.n_ctx = 1024;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    plain = llama_init_from_model(model, cp);
    CHECK(ctx != NULL && plain != NULL, "contexts");

    /* The host evaluates the prompt itself. */
    CHECK(decode(ctx, S0, toks, n_prompt, 0) == 0, "decode ctx");
    CHECK(decode(plain, S0, toks, n_prompt, 0) == 0, "decode plain");
    CHECK(host_cb_calls > 0, "the host's own cb_eval is chained");
    printf("host cb_eval chained: %d calls\n", host_cb_calls);
    ref0 = seq_state(ctx, S0, &ref0_n);
    ref1 = seq_state(ctx, S1, &ref1_n);
    ref_plain = seq_state(plain, S0, &ref_plain_n);

    expect(snapkv_params_default(NULL), SNAPKV_ERR_NULL_POINTER, "params_default(NULL)", "params");
    expect(snapkv_params_default(&p), SNAPKV_OK, "params_default", NULL);
    CHECK(p.size == sizeof(snapkv_params) && p.window == 32 && p.budget == 1024 && p.kernel == 11 &&
          p.pool_align == SNAPKV_POOL_ALIGN_FORWARD && p.pool_forward == 7 &&
          p.value_weighting == SNAPKV_VALUE_WEIGHTING_OFF &&
          p.query_aggregation == SNAPKV_QUERY_AGGREGATION_SUM, "defaults");
    {
        snapkv_params facts, untouched;
        expect(snapkv_params_preset(NULL, SNAPKV_PRESET_FACTS), SNAPKV_ERR_NULL_POINTER, "params_preset(NULL)",
               "params");
        memset(&untouched, 0x5A, sizeof untouched);
        facts = untouched;
        expect(snapkv_params_preset(&facts, 9), SNAPKV_ERR_INVALID_PARAMS, "params_preset(9)", "SNAPKV_PRESET_FACTS");
        CHECK(memcmp(&facts, &untouched, sizeof facts) == 0, "an unknown preset leaves the struct");
        expect(snapkv_params_preset(&facts, SNAPKV_PRESET_FACTS), SNAPKV_OK, "params_preset(FACTS)", NULL);
        CHECK(facts.size == sizeof(snapkv_params) && facts.window == p.window && facts.budget == p.budget &&
                  facts.kernel == 7 && facts.pooling == SNAPKV_POOLING_MAX &&
                  facts.pool_align == SNAPKV_POOL_ALIGN_TRAILING &&
                  facts.value_weighting == SNAPKV_VALUE_WEIGHTING_NORM &&
                  facts.query_aggregation == SNAPKV_QUERY_AGGREGATION_MAX && facts.reserved == 0,
              "the facts preset");
        expect(snapkv_params_preset(&facts, SNAPKV_PRESET_RECONSTRUCT), SNAPKV_OK, "params_preset(RECONSTRUCT)",
               NULL);
        CHECK(facts.window == p.window && facts.budget == p.budget && facts.kernel == 7 &&
                  facts.pooling == SNAPKV_POOLING_MAX && facts.pool_align == SNAPKV_POOL_ALIGN_CENTERED &&
                  facts.value_weighting == SNAPKV_VALUE_WEIGHTING_OFF &&
                  facts.query_aggregation == SNAPKV_QUERY_AGGREGATION_SUM && facts.method == SNAPKV_METHOD_SNAPKV,
              "the reconstruct preset sets the pooling, not the method");
        expect(snapkv_params_preset(&facts, SNAPKV_PRESET_DEFAULT), SNAPKV_OK, "params_preset(DEFAULT)", NULL);
        CHECK(memcmp(&facts, &p, sizeof p) == 0, "the default preset is snapkv_params_default");
    }
    p.window = 16;
    p.budget = 64;
    memset(&sentinel, 0xAB, sizeof sentinel);
    sentinel.size = sizeof(snapkv_stats);
    st = sentinel;

    /* NULL pointers. */
    expect(snapkv_compress_after_prefill(NULL, obs, &p, S0, toks, n_prompt, &st), SNAPKV_ERR_NULL_POINTER,
           "hook(NULL ctx)", "ctx");
    expect(snapkv_compress_after_prefill(ctx, NULL, &p, S0, toks, n_prompt, &st), SNAPKV_ERR_NULL_POINTER,
           "hook(NULL obs)", "obs");
    expect(snapkv_compress_after_prefill(ctx, obs, NULL, S0, toks, n_prompt, &st), SNAPKV_ERR_NULL_POINTER,
           "hook(NULL params)", "params");
    expect(snapkv_compress_after_prefill(ctx, obs, &p, S0, NULL, n_prompt, &st), SNAPKV_ERR_NULL_POINTER,
           "hook(NULL tokens)", "window_tokens");
    expect(snapkv_prefill(NULL, obs, &p, S1, toks, n_prompt, &st), SNAPKV_ERR_NULL_POINTER, "prefill(NULL ctx)",
           "ctx");
    expect(snapkv_prefill(ctx, obs, &p, S1, NULL, n_prompt, &st), SNAPKV_ERR_NULL_POINTER, "prefill(NULL tokens)",
           "tokens");
    expect(snapkv_prefill(ctx, obs, &p, S1, NULL, 0, &st), SNAPKV_ERR_INVALID_ARGUMENT, "prefill(no tokens)",
           "empty");
    expect(snapkv_abi_item(0, NULL, NULL), SNAPKV_ERR_NULL_POINTER, "abi_item(NULL)", NULL);

    /* Invalid params. */
    bad = p; bad.window = 0;
    expect(snapkv_compress_after_prefill(ctx, obs, &bad, S0, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.window = 0", "window");
    bad = p; bad.kernel = 4;
    expect(snapkv_compress_after_prefill(ctx, obs, &bad, S0, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.kernel = 4", "kernel");
    bad = p; bad.budget = 10;
    expect(snapkv_compress_after_prefill(ctx, obs, &bad, S0, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.budget <= window", "budget");
    bad = p; bad.budget = 0; bad.budget_fraction = 1.5;
    expect(snapkv_compress_after_prefill(ctx, obs, &bad, S0, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.budget_fraction = 1.5", "fraction");
    bad = p; bad.budget_fraction = 0.5;
    expect(snapkv_compress_after_prefill(ctx, obs, &bad, S0, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params budget and fraction", "not both");
    bad = p; bad.pooling = 5;
    expect(snapkv_compress_after_prefill(ctx, obs, &bad, S0, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.pooling = 5", "pooling");
    bad = p; bad.reserved = 1;
    expect(snapkv_prefill(ctx, obs, &bad, S1, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS, "params.reserved = 1",
           "reserved");
    bad = p; bad.pool_align = 3;
    expect(snapkv_prefill(ctx, obs, &bad, S1, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.pool_align = 3", "pool_align");
    bad = p; bad.pool_align = SNAPKV_POOL_ALIGN_FORWARD; bad.pool_forward = bad.kernel;
    expect(snapkv_prefill(ctx, obs, &bad, S1, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.pool_forward = kernel", "forward");
    bad = p; bad.value_weighting = 2;
    expect(snapkv_prefill(ctx, obs, &bad, S1, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.value_weighting = 2", "value_weighting");
    bad = p; bad.query_aggregation = 7;
    expect(snapkv_prefill(ctx, obs, &bad, S1, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.query_aggregation = 7", "query_aggregation");
    /* A caller built before value_weighting existed passes the old size;
     * the field, past its struct, is not read (the invalid 2 is ignored). */
    bad = p; bad.value_weighting = 2; bad.size = offsetof(snapkv_params, value_weighting); bad.window = 0;
    expect(snapkv_prefill(ctx, obs, &bad, S1, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params of the 40-byte layout are read up to their size", "window");
    bad = p; bad.size = 0;
    expect(snapkv_compress_after_prefill(ctx, obs, &bad, S0, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
           "params.size = 0", "snapkv_params_default");
    st.size = 0;
    expect(snapkv_compress_after_prefill(ctx, obs, &p, S0, toks, n_prompt, &st), SNAPKV_ERR_INVALID_ARGUMENT,
           "stats.size = 0", "sizeof(snapkv_stats)");
    st = sentinel;

    /* Sequences that do not exist, an empty one, too few window tokens. */
    expect(snapkv_compress_after_prefill(ctx, obs, &p, 2, toks, n_prompt, &st), SNAPKV_ERR_INVALID_SEQUENCE,
           "hook(seq 2 of 2)", "sequence id 2");
    expect(snapkv_compress_after_prefill(ctx, obs, &p, -1, toks, n_prompt, &st), SNAPKV_ERR_INVALID_SEQUENCE,
           "hook(seq -1)", "-1");
    expect(snapkv_prefill(ctx, obs, &p, 1000, toks, n_prompt, &st), SNAPKV_ERR_INVALID_SEQUENCE,
           "prefill(seq 1000)", "1000");
    expect(snapkv_compress_after_prefill(ctx, obs, &p, S1, toks, n_prompt, &st), SNAPKV_ERR_EMPTY_SEQUENCE,
           "hook(empty seq 1)", "empty");
    expect(snapkv_compress_after_prefill(ctx, obs, &p, S0, toks, 8, &st), SNAPKV_ERR_INVALID_ARGUMENT,
           "hook(8 < window tokens)", "window_tokens");

    /* A context created without the observer, and a foreign observer. */
    expect(snapkv_compress_after_prefill(plain, obs, &p, S0, toks, n_prompt, &st), SNAPKV_ERR_OBSERVER_NOT_ATTACHED,
           "hook(context without observer)", "not attached");
    expect(snapkv_prefill(plain, obs, &p, S0, toks, n_prompt / 2, &st), SNAPKV_ERR_OBSERVER_NOT_ATTACHED,
           "prefill(context without observer)", "not attached");
    expect(snapkv_compress_after_prefill(ctx, other, &p, S0, toks, n_prompt, &st), SNAPKV_ERR_OBSERVER_NOT_ATTACHED,
           "hook(another context's observer)", "not attached");

    /* More than the context holds: the armed last micro-batch finds no room.
       That is llama_decode failing, not a missing observer, and what the
       call evaluated before it is removed again (checked below). */
    for (i = 0; i < N_BIG; i++) {
        big[i] = toks[i % n_prompt];
    }
    expect(snapkv_prefill(ctx, obs, &p, S1, big, N_BIG, &st), SNAPKV_ERR_DECODE, "prefill(more than the context holds)",
           NULL);

    /* The copy-out of the last error (the failure above). */
    {
        char small[8];
        size_t need = snapkv_last_error(NULL, 0);
        CHECK(need > sizeof small, "last error length");
        CHECK(snapkv_last_error(small, sizeof small) == need, "last error returns the full length");
        CHECK(strlen(small) == sizeof small - 1, "last error truncated and NUL-terminated");
    }

    /* Nothing of the above touched the caches or the stats. */
    CHECK(same_state(ctx, S0, ref0, ref0_n), "seq 0 unchanged by failed calls");
    CHECK(same_state(ctx, S1, ref1, ref1_n), "seq 1 still empty");
    CHECK(same_state(plain, S0, ref_plain, ref_plain_n), "context without observer unchanged");
    CHECK(memcmp(&st, &sentinel, sizeof st) == 0, "stats untouched on failure");
    printf("caches and stats unchanged after %s\n", failures ? "FAILURES" : "every failure");

    /* The host keeps running: compress, then decode. */
    expect(snapkv_compress_after_prefill(ctx, obs, &p, S0, toks, n_prompt, &st), SNAPKV_OK, "hook(seq 0)", NULL);
    CHECK(st.size == sizeof(snapkv_stats), "stats.size kept");
    CHECK(st.compressed, "compressed");
    CHECK(st.cells_before == (uint64_t) n_prompt && st.cells_after == 64, "cells");
    CHECK(st.bytes_after < st.bytes_before, "bytes");
    CHECK(st.score_source == SNAPKV_SCORE_QUERY_KEY || st.score_source == SNAPKV_SCORE_SOFTMAX, "score source");
    CHECK(llama_memory_seq_pos_max(llama_get_memory(ctx), S0) == n_prompt - 1, "positions continue");
    {
        llama_token t = (llama_token) argmax(llama_get_logits_ith(ctx, -1), llama_vocab_n_tokens(vocab));
        for (i = 0; i < 4; i++) {
            CHECK(decode(ctx, S0, &t, 1, n_prompt + i) == 0, "decode after compression");
            t = (llama_token) argmax(llama_get_logits_ith(ctx, -1), llama_vocab_n_tokens(vocab));
        }
    }
    st = sentinel;
    expect(snapkv_prefill(ctx, obs, &p, S1, toks, n_prompt, &st), SNAPKV_OK, "prefill(seq 1)", NULL);
    CHECK(st.compressed && st.cells_after == 64 && st.window_seconds > 0.0, "prefill stats");
    CHECK(llama_get_logits_ith(ctx, -1) != NULL, "logits after prefill");
    printf("compressed: %llu -> %llu cells, %llu -> %llu bytes\n", (unsigned long long) st.cells_before,
           (unsigned long long) st.cells_after, (unsigned long long) st.bytes_before,
           (unsigned long long) st.bytes_after);

    /* The observed-decode hook: the host decodes, snapkv only compresses. */
    st = sentinel;
    expect(snapkv_compress_observed(ctx, obs, &p, S1, &st), SNAPKV_ERR_INVALID_ARGUMENT, "compress_observed(not armed)",
           "not armed");
    expect(snapkv_observe(NULL, obs, &p), SNAPKV_ERR_NULL_POINTER, "observe(NULL ctx)", "ctx");
    bad = p; bad.kernel = 2;
    expect(snapkv_observe(ctx, obs, &bad), SNAPKV_ERR_INVALID_PARAMS, "observe(kernel 2)", "kernel");
    CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1");
    expect(snapkv_observe(ctx, obs, &p), SNAPKV_OK, "observe", NULL);
    CHECK(decode(ctx, S1, toks, n_prompt, 0) == 0, "host decodes the prompt while observed");
    {
        const float * before = llama_get_logits_ith(ctx, -1);
        float first = before[0];
        expect(snapkv_compress_observed(ctx, obs, &p, S1, &st), SNAPKV_OK, "compress_observed(seq 1)", NULL);
        CHECK(st.compressed && st.cells_after == 64 && st.window_seconds == 0.0, "observed stats: nothing re-evaluated");
        CHECK(llama_get_logits_ith(ctx, -1)[0] == first, "logits left as the host's decode left them");
    }
    {
        llama_token t = (llama_token) argmax(llama_get_logits_ith(ctx, -1), llama_vocab_n_tokens(vocab));
        CHECK(decode(ctx, S1, &t, 1, n_prompt) == 0, "decode after the observed hook");
    }
    /* Compressing after the answer's first tokens: the host decodes the
     * prompt and three answer tokens one by one while observed. */
    CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 again");
    expect(snapkv_observe(ctx, obs, &p), SNAPKV_OK, "observe (answer start)", NULL);
    CHECK(decode(ctx, S1, toks, n_prompt, 0) == 0, "host decodes the prompt");
    {
        llama_token t;
        for (i = 0; i < 3; i++) {
            t = (llama_token) argmax(llama_get_logits_ith(ctx, -1), llama_vocab_n_tokens(vocab));
            CHECK(decode(ctx, S1, &t, 1, n_prompt + i) == 0, "host decodes an answer token");
        }
    }
    st = sentinel;
    expect(snapkv_compress_observed(ctx, obs, &p, S1, &st), SNAPKV_OK, "compress_observed(after 3 answer tokens)", NULL);
    CHECK(st.compressed && st.cells_before == (uint64_t) n_prompt + 3 && st.cells_after == 64,
          "compressed with the answer's first tokens");
    CHECK(llama_memory_seq_pos_max(llama_get_memory(ctx), S1) == n_prompt + 2, "positions continue after them");
    /* The non-default scoring options through C: the largest vote of the
     * window, weighted by value norms, compresses as the defaults do and
     * keeps other cells than the sum does. */
    {
        snapkv_params by_max = p;
        unsigned char * by_sum_state;
        size_t by_sum_n;
        by_max.query_aggregation = SNAPKV_QUERY_AGGREGATION_MAX;
        by_max.value_weighting = SNAPKV_VALUE_WEIGHTING_NORM;
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (sum)");
        expect(snapkv_prefill(ctx, obs, &p, S1, toks, n_prompt, &st), SNAPKV_OK, "prefill(seq 1, sum)", NULL);
        by_sum_state = seq_state(ctx, S1, &by_sum_n);
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (max)");
        st = sentinel;
        expect(snapkv_prefill(ctx, obs, &by_max, S1, toks, n_prompt, &st), SNAPKV_OK,
               "prefill(seq 1, max of the window, value-weighted)", NULL);
        CHECK(st.compressed && st.cells_before == (uint64_t) n_prompt && st.cells_after == 64,
              "max-aggregated compression stats");
        CHECK(!same_state(ctx, S1, by_sum_state, by_sum_n), "max and value weighting keep other cells than the sum");
        {
            llama_token t = (llama_token) argmax(llama_get_logits_ith(ctx, -1), llama_vocab_n_tokens(vocab));
            CHECK(decode(ctx, S1, &t, 1, n_prompt) == 0, "decode after the max-aggregated compression");
        }
        free(by_sum_state);
    }
    /* A draft through C: eight answer tokens drafted on the cache compressed
     * once vote in a second selection; a caller built against the header
     * before the draft fields (stats size 96) gets the older fields only. */
    {
        snapkv_params drafting = p;
        unsigned char * plain_state;
        size_t plain_n;
        snapkv_stats older;
        drafting.draft_tokens = 8;
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (no draft)");
        expect(snapkv_prefill(ctx, obs, &p, S1, toks, n_prompt, &st), SNAPKV_OK, "prefill(seq 1, no draft)", NULL);
        CHECK(st.draft_tokens == 0 && st.draft_seconds == 0.0, "no draft by default");
        plain_state = seq_state(ctx, S1, &plain_n);
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (draft)");
        st = sentinel;
        expect(snapkv_prefill(ctx, obs, &drafting, S1, toks, n_prompt, &st), SNAPKV_OK, "prefill(seq 1, draft 8)",
               NULL);
        CHECK(st.compressed && st.cells_after == 64 && st.draft_tokens == 8 && st.draft_seconds > 0.0,
              "draft stats");
        CHECK(llama_memory_seq_pos_max(llama_get_memory(ctx), S1) == n_prompt - 1, "the draft's tokens are gone");
        CHECK(!same_state(ctx, S1, plain_state, plain_n), "the draft's votes keep other cells");
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (older stats)");
        memset(&older, 0x5A, sizeof older);
        older.size = (uint32_t) offsetof(snapkv_stats, draft_tokens);
        expect(snapkv_prefill(ctx, obs, &drafting, S1, toks, n_prompt, &older), SNAPKV_OK,
               "prefill(seq 1, stats of the older header)", NULL);
        CHECK(older.cells_after == 64 && older.size == offsetof(snapkv_stats, draft_tokens),
              "older stats written up to their size");
        {
            const unsigned char * tail = (const unsigned char *) &older + offsetof(snapkv_stats, draft_tokens);
            CHECK(tail[0] == 0x5A && tail[sizeof older - offsetof(snapkv_stats, draft_tokens) - 1] == 0x5A,
                  "nothing written past an older caller's stats");
        }
        /* The observed-decode hook is not given the prompt's last token. */
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (observed draft)");
        expect(snapkv_observe(ctx, obs, &drafting), SNAPKV_OK, "observe (draft)", NULL);
        CHECK(decode(ctx, S1, toks, n_prompt, 0) == 0, "host decodes the prompt (draft)");
        free(plain_state);
        plain_state = seq_state(ctx, S1, &plain_n);
        st = sentinel;
        expect(snapkv_compress_observed(ctx, obs, &drafting, S1, &st), SNAPKV_ERR_INVALID_ARGUMENT,
               "compress_observed(draft)", "draft");
        CHECK(same_state(ctx, S1, plain_state, plain_n), "a refused draft leaves the sequence");
        CHECK(memcmp(&st, &sentinel, sizeof st) == 0, "stats untouched by a refused draft");
        free(plain_state);
    }
    /* The method through C: keydiff scores the keys alone, reconstruct a
     * repeat of the sequence, and each keeps other cells than SnapKV. The
     * observed-decode hook is given no tokens, so it refuses reconstruct
     * and leaves the sequence; an unknown method is refused before any
     * work; a caller of the header before `method` (size 56) gets SnapKV. */
    {
        snapkv_params by_keys = p, by_repeat = p, unknown = p, older = p;
        unsigned char * snap_state;
        unsigned char * keys_state;
        unsigned char * plain_state;
        size_t snap_n, keys_n, plain_n;
        by_keys.method = SNAPKV_METHOD_KEYDIFF;
        by_repeat.method = SNAPKV_METHOD_RECONSTRUCT;
        unknown.method = 3;
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (snapkv method)");
        expect(snapkv_prefill(ctx, obs, &p, S1, toks, n_prompt, &st), SNAPKV_OK, "prefill(seq 1, snapkv)", NULL);
        snap_state = seq_state(ctx, S1, &snap_n);
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (keydiff)");
        st = sentinel;
        expect(snapkv_prefill(ctx, obs, &by_keys, S1, toks, n_prompt, &st), SNAPKV_OK, "prefill(seq 1, keydiff)",
               NULL);
        CHECK(st.compressed && st.cells_after == 64 && st.score_source == SNAPKV_SCORE_KEYS, "keydiff stats");
        CHECK(!same_state(ctx, S1, snap_state, snap_n), "keydiff keeps other cells than snapkv");
        keys_state = seq_state(ctx, S1, &keys_n);
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (reconstruct)");
        st = sentinel;
        expect(snapkv_prefill(ctx, obs, &by_repeat, S1, toks, n_prompt, &st), SNAPKV_OK,
               "prefill(seq 1, reconstruct)", NULL);
        CHECK(st.compressed && st.cells_after == 64 && st.score_source == SNAPKV_SCORE_RECONSTRUCTION,
              "reconstruct stats");
        CHECK(llama_memory_seq_pos_max(llama_get_memory(ctx), S1) == n_prompt - 1, "the repeat is gone");
        CHECK(!same_state(ctx, S1, snap_state, snap_n) && !same_state(ctx, S1, keys_state, keys_n),
              "reconstruct keeps other cells than snapkv and keydiff");
        {
            llama_token t = (llama_token) argmax(llama_get_logits_ith(ctx, -1), llama_vocab_n_tokens(vocab));
            CHECK(decode(ctx, S1, &t, 1, n_prompt) == 0, "decode after reconstruct");
        }
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (observed reconstruct)");
        expect(snapkv_observe(ctx, obs, &by_repeat), SNAPKV_OK, "observe (reconstruct)", NULL);
        CHECK(decode(ctx, S1, toks, n_prompt, 0) == 0, "host decodes the prompt (reconstruct)");
        plain_state = seq_state(ctx, S1, &plain_n);
        st = sentinel;
        expect(snapkv_compress_observed(ctx, obs, &by_repeat, S1, &st), SNAPKV_ERR_INVALID_ARGUMENT,
               "compress_observed(reconstruct)", "tokens");
        CHECK(same_state(ctx, S1, plain_state, plain_n), "a refused reconstruct leaves the sequence");
        CHECK(memcmp(&st, &sentinel, sizeof st) == 0, "stats untouched by a refused reconstruct");
        CHECK(llama_memory_seq_rm(llama_get_memory(ctx), S1, -1, -1), "clear seq 1 (unknown method)");
        expect(snapkv_prefill(ctx, obs, &unknown, S1, toks, n_prompt, &st), SNAPKV_ERR_INVALID_PARAMS,
               "prefill(unknown method)", "method");
        CHECK(llama_memory_seq_pos_max(llama_get_memory(ctx), S1) == -1, "a refused method evaluates nothing");
        older.size = (uint32_t) offsetof(snapkv_params, method);
        older.method = SNAPKV_METHOD_RECONSTRUCT; /* past an older caller's struct: not read */
        st = sentinel;
        expect(snapkv_prefill(ctx, obs, &older, S1, toks, n_prompt, &st), SNAPKV_OK,
               "prefill(params of the header before method)", NULL);
        CHECK(st.compressed && st.score_source != SNAPKV_SCORE_RECONSTRUCTION && same_state(ctx, S1, snap_state, snap_n),
              "an older caller gets snapkv");
        free(snap_state);
        free(keys_state);
        free(plain_state);
    }
    /* Observing a context the observer is not attached to. */
    expect(snapkv_observe(plain, obs, &p), SNAPKV_OK, "observe(plain)", NULL);
    CHECK(decode(plain, S0, toks, 1, n_prompt) == 0, "decode plain");
    free(ref_plain);
    ref_plain = seq_state(plain, S0, &ref_plain_n);
    st = sentinel;
    expect(snapkv_compress_observed(plain, obs, &p, S0, &st), SNAPKV_ERR_OBSERVER_NOT_ATTACHED,
           "compress_observed(context without observer)", "observer");
    CHECK(same_state(plain, S0, ref_plain, ref_plain_n), "context without observer unchanged");
    CHECK(memcmp(&st, &sentinel, sizeof st) == 0, "stats untouched on failure");

    free(ref0);
    free(ref1);
    free(ref_plain);
    llama_free(ctx);
    llama_free(plain);
    snapkv_observer_free(obs);
    snapkv_observer_free(other);
    snapkv_observer_free(NULL);
    llama_model_free(model);
    llama_backend_free();

    if (failures) {
        fprintf(stderr, "%d failure(s)\n", failures);
        return 1;
    }
    printf("all C ABI checks passed\n");
    return 0;
}
