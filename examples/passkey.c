/*
 * Passkey retrieval with snapkv from C: a pass key hidden in ~1,600 tokens
 * of filler, answered once with the full KV cache and once after
 * compressing the prompt to BUDGET cells per KV head with the hook
 * (snapkv_compress_after_prefill), as a llama.cpp program that evaluates
 * its prompt itself would.
 *
 * Build (default build: libsnapkv.a contains llama.cpp; see README.md,
 * "C and C++"):
 *     cargo build --release && scripts/snapkv-pkg-config.sh
 *     export PKG_CONFIG_PATH=$PWD/target/release/pkgconfig
 *     cc -std=c99 -O2 examples/passkey.c $(pkg-config --cflags --libs --static snapkv) -o passkey
 *     ./passkey -m models/qwen2.5-coder-0.5b-instruct.gguf
 *
 * Options: -m MODEL  -f PROMPT_FILE (a complete prompt, chat markup
 * included; default: a generated one)  -k PASSKEY (to check)  -b BUDGET
 * (default 256)  -t THREADS (default 4)  -n MAX_ANSWER_TOKENS (default 16).
 * Exit status 0 when the compressed cache's answer contains the pass key.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"
#include "snapkv.h"

static void quiet_log(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static char * read_file(const char * path) {
    FILE * f = fopen(path, "rb");
    char * buf;
    long n;
    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        if (f != NULL) {
            fclose(f);
        }
        return NULL;
    }
    buf = (char *) malloc((size_t) n + 1);
    if (buf != NULL && fread(buf, 1, (size_t) n, f) != (size_t) n) {
        free(buf);
        buf = NULL;
    }
    if (buf != NULL) {
        buf[n] = '\0';
    }
    fclose(f);
    return buf;
}

/* The classic passkey prompt, wrapped in the model's chat template. */
static char * make_prompt(const struct llama_model * model, const char * passkey) {
    const char * filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    const int n_filler = 68;
    size_t cap = strlen(filler) * (size_t) n_filler + 1024;
    char * body = (char *) malloc(cap);
    char * out;
    struct llama_chat_message msg;
    int i, n;
    strcpy(body, "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there. ");
    for (i = 0; i < n_filler; i++) {
        if (i == n_filler * 2 / 5) {
            strcat(body, "The pass key is ");
            strcat(body, passkey);
            strcat(body, ". Remember it. ");
            strcat(body, passkey);
            strcat(body, " is the pass key. ");
        }
        strcat(body, filler);
    }
    strcat(body, "What is the pass key? The pass key is");
    msg.role = "user";
    msg.content = body;
    n = llama_chat_apply_template(llama_model_chat_template(model, NULL), &msg, 1, true, NULL, 0);
    if (n < 0) {
        return body; /* no template: the plain text */
    }
    out = (char *) malloc((size_t) n + 1);
    llama_chat_apply_template(llama_model_chat_template(model, NULL), &msg, 1, true, out, n + 1);
    out[n] = '\0';
    free(body);
    return out;
}

/* Evaluates tokens [0, n) of sequence 0 at positions pos0.., in batches. */
static int eval(struct llama_context * ctx, const llama_token * toks, int n, llama_pos pos0) {
    int n_batch = (int) llama_n_batch(ctx);
    struct llama_batch b = llama_batch_init(n_batch, 0, 1);
    int done, i, rc = 0;
    for (done = 0; done < n && rc == 0; done += b.n_tokens) {
        b.n_tokens = n - done < n_batch ? n - done : n_batch;
        for (i = 0; i < b.n_tokens; i++) {
            b.token[i] = toks[done + i];
            b.pos[i] = pos0 + done + i;
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = 0;
            b.logits[i] = done + i == n - 1;
        }
        rc = llama_decode(ctx, b);
    }
    llama_batch_free(b);
    return rc;
}

/* Greedy answer from the current logits; prints its text and token ids. */
static int answer(struct llama_context * ctx, const struct llama_vocab * vocab, llama_pos pos, int max_tokens,
                  const char * label, char * text, size_t text_cap) {
    int n_vocab = llama_vocab_n_tokens(vocab);
    int i, k;
    char ids[1024] = "";
    text[0] = '\0';
    for (i = 0; i < max_tokens; i++) {
        const float * logits = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        char piece[128];
        int n_piece;
        for (k = 1; k < n_vocab; k++) {
            if (logits[k] > logits[best]) {
                best = k;
            }
        }
        if (llama_vocab_is_eog(vocab, best)) {
            break;
        }
        sprintf(ids + strlen(ids), "%s%d", i ? " " : "", best);
        n_piece = llama_token_to_piece(vocab, best, piece, (int32_t) sizeof piece - 1, 0, false);
        if (n_piece > 0 && strlen(text) + (size_t) n_piece < text_cap) {
            piece[n_piece] = '\0';
            strcat(text, piece);
        }
        if (i + 1 < max_tokens && eval(ctx, &best, 1, pos + i) != 0) {
            return -1;
        }
    }
    printf("answer[%s]: %s\n", label, text);
    printf("tokens[%s]: %s\n", label, ids);
    return i;
}

int main(int argc, char ** argv) {
    const char * model_path = "models/qwen2.5-coder-0.5b-instruct.gguf";
    const char * prompt_file = NULL;
    const char * passkey = NULL;
    int budget = 256, threads = 4, max_answer = 16;
    int i, n_prompt, n_answer, ok;
    char * prompt;
    llama_token * toks;
    char text[512];
    struct llama_model_params mp;
    struct llama_model * model;
    const struct llama_vocab * vocab;
    struct llama_context_params cp;
    struct llama_context * ctx;
    snapkv_observer * obs;
    snapkv_params params;
    snapkv_stats stats;
    snapkv_status st;

    for (i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "-m") == 0) {
            model_path = argv[i + 1];
        } else if (strcmp(argv[i], "-f") == 0) {
            prompt_file = argv[i + 1];
        } else if (strcmp(argv[i], "-k") == 0) {
            passkey = argv[i + 1];
        } else if (strcmp(argv[i], "-b") == 0) {
            budget = atoi(argv[i + 1]);
        } else if (strcmp(argv[i], "-t") == 0) {
            threads = atoi(argv[i + 1]);
        } else if (strcmp(argv[i], "-n") == 0) {
            max_answer = atoi(argv[i + 1]);
        } else {
            break;
        }
    }
    if (i != argc) {
        fprintf(stderr, "usage: %s [-m MODEL] [-f PROMPT_FILE] [-k PASSKEY] [-b BUDGET] [-t THREADS] [-n N]\n",
                argv[0]);
        return 2;
    }
    if (snapkv_check_llama() != SNAPKV_OK) {
        char msg[256];
        snapkv_last_error(msg, sizeof msg);
        fprintf(stderr, "%s\n", msg);
        return 1;
    }

    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    mp = llama_model_default_params();
    model = llama_model_load_from_file(model_path, mp);
    if (model == NULL) {
        fprintf(stderr, "cannot load %s (run scripts/fetch-models.sh)\n", model_path);
        return 1;
    }
    vocab = llama_model_get_vocab(model);

    /* 1. The observer goes into the context params before the context exists. */
    obs = snapkv_observer_new();
    cp = llama_context_default_params();
    cp.n_ctx = 4096;
    cp.n_batch = 2048;
    cp.n_ubatch = 512;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    if (snapkv_observer_attach(obs, &cp) != SNAPKV_OK) {
        fprintf(stderr, "snapkv_observer_attach failed\n");
        return 1;
    }
    ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) {
        fprintf(stderr, "llama_init_from_model failed\n");
        return 1;
    }

    if (prompt_file != NULL) {
        prompt = read_file(prompt_file);
        if (prompt == NULL) {
            fprintf(stderr, "cannot read %s\n", prompt_file);
            return 1;
        }
    } else {
        if (passkey == NULL) {
            passkey = "68341";
        }
        prompt = make_prompt(model, passkey);
    }
    n_prompt = -llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), NULL, 0, true, true);
    toks = (llama_token *) malloc(sizeof(llama_token) * (size_t) n_prompt);
    llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), toks, n_prompt, true, true);
    printf("prompt: %d tokens, budget %d cells per KV head\n", n_prompt, budget);

    /* 2. The program evaluates its prompt as usual and answers from the full cache. */
    if (eval(ctx, toks, n_prompt, 0) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    n_answer = answer(ctx, vocab, n_prompt, max_answer, "full", text, sizeof text);

    /* 3. Back to the end of the prompt, then the hook compresses it. */
    llama_memory_seq_rm(llama_get_memory(ctx), 0, n_prompt, -1);
    snapkv_params_default(&params);
    params.budget = (uint32_t) budget;
    memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
    st = snapkv_compress_after_prefill(ctx, obs, &params, 0, toks, (size_t) n_prompt, &stats);
    if (st != SNAPKV_OK) {
        char msg[512];
        snapkv_last_error(msg, sizeof msg);
        fprintf(stderr, "snapkv_compress_after_prefill: %s: %s\n", snapkv_status_str(st), msg);
        return 1;
    }
    printf("snapkv: %s, %llu -> %llu cells, %llu -> %llu bytes, window %.3f s, scoring %.3f s, compaction %.3f s\n",
           stats.compressed ? "compressed" : "fits the budget", (unsigned long long) stats.cells_before,
           (unsigned long long) stats.cells_after, (unsigned long long) stats.bytes_before,
           (unsigned long long) stats.bytes_after, stats.window_seconds, stats.score_seconds,
           stats.compact_seconds);

    /* 4. Decoding continues after the prompt, over `budget` cells. */
    n_answer = answer(ctx, vocab, n_prompt, max_answer, "snapkv", text, sizeof text);
    ok = n_answer >= 0 && (passkey == NULL || strstr(text, passkey) != NULL);
    if (passkey != NULL) {
        printf("pass key %s: %s\n", passkey, ok ? "retrieved" : "NOT retrieved");
    }

    free(toks);
    free(prompt);
    llama_free(ctx);
    snapkv_observer_free(obs); /* after the context that uses it */
    llama_model_free(model);
    llama_backend_free();
    return ok ? 0 : 1;
}
