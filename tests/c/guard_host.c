/*
 * A minimal llama.cpp program for the preload's version guard: it loads a
 * model, creates a context with llama_init_from_model, and greedy-decodes
 * 8 tokens after a prompt with llama_decode, printing their ids. Built
 * against the pinned llama.h and against a llama.h with one field added to
 * llama_context_params (tests/preload_server.rs).
 *
 * Usage: guard_host MODEL.gguf PROMPT
 */
#include <stdio.h>
#include <string.h>

#include "llama.h"

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT\n", argv[0]);
        return 2;
    }
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == NULL) {
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) {
        return 1;
    }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    llama_token tokens[512];
    int n = llama_tokenize(vocab, argv[2], (int32_t) strlen(argv[2]), tokens, 256, true, false);
    if (n <= 0) {
        return 1;
    }
    int first = 0;
    for (int step = 0; step < 8; step++) {
        if (llama_decode(ctx, llama_batch_get_one(tokens + first, n - first)) != 0) {
            return 1;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);
        int best = 0;
        for (int i = 1; i < llama_vocab_n_tokens(vocab); i++) {
            if (logits[i] > logits[best]) {
                best = i;
            }
        }
        printf("%d ", best);
        first = n;
        tokens[n++] = best;
    }
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
