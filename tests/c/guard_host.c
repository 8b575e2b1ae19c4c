/*
 * A minimal llama.cpp program that decodes with the plain llama_decode
 * API: it loads a model, creates a context with llama_init_from_model,
 * evaluates the prompt in one batch, and greedy-decodes N tokens, printing
 * their text. tests/preload_server.rs builds it against the pinned llama.h
 * (the preload compresses its prompt) and against a llama.h with one field
 * added to llama_context_params (the version guard refuses it).
 *
 * Usage: guard_host MODEL.gguf PROMPT_FILE [N]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT_FILE [N]\n", argv[0]);
        return 2;
    }
    const int n_generate = argc > 3 ? atoi(argv[3]) : 8;
    static char prompt[1 << 16];
    FILE * f = fopen(argv[2], "rb");
    if (f == NULL) {
        return 2;
    }
    const size_t len = fread(prompt, 1, sizeof(prompt) - 1, f);
    fclose(f);
    prompt[len] = 0;
    llama_backend_init();
    struct llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == NULL) {
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 4096;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == NULL) {
        return 1;
    }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);
    static llama_token tokens[4096];
    int n = llama_tokenize(vocab, prompt, (int32_t) len, tokens, 4096 - 64, true, true);
    if (n <= 0) {
        return 1;
    }
    int first = 0;
    for (int step = 0; step < n_generate && n < 4096; step++) {
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
        char piece[64];
        const int k = llama_token_to_piece(vocab, best, piece, sizeof(piece) - 1, 0, false);
        piece[k > 0 ? k : 0] = 0;
        printf("%s", piece);
        fflush(stdout);
        first = n;
        tokens[n++] = best;
    }
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
