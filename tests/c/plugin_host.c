/*
 * A llama.cpp host program for plugin mode: it links only libllama, loads
 * libsnapkv.so (built with the `dynamic-link` feature) with dlopen at run
 * time, attaches the observer to its own llama_context_params, evaluates a
 * prompt itself with llama_decode, calls snapkv_compress_after_prefill, and
 * greedy-decodes the answer. It also checks that the process holds exactly
 * one libllama (the plugin resolved its llama_* symbols from the host's).
 *
 * Usage: plugin_host LIBSNAPKV.so MODEL.gguf PROMPT_FILE BUDGET MAX_TOKENS THREADS
 * Prints "answer[plugin]: ..." and "tokens[plugin]: ...".
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"
#include "snapkv.h"

/* The plugin's entry points, resolved with dlsym. */
static struct {
    snapkv_status (*check_llama)(void);
    size_t (*last_error)(char *, size_t);
    const char * (*version)(void);
    snapkv_observer * (*observer_new)(void);
    snapkv_status (*observer_attach)(snapkv_observer *, struct llama_context_params *);
    void (*observer_free)(snapkv_observer *);
    snapkv_status (*params_default)(snapkv_params *);
    snapkv_status (*compress_after_prefill)(struct llama_context *, snapkv_observer *, const snapkv_params *,
                                            llama_seq_id, const llama_token *, size_t, snapkv_stats *);
} api;

static void * sym(void * lib, const char * name) {
    void * p = dlsym(lib, name);
    if (p == NULL) {
        fprintf(stderr, "dlsym(%s): %s\n", name, dlerror());
        exit(1);
    }
    return p;
}

/* Resolves a function pointer without the object/function pointer cast
 * that ISO C leaves undefined. */
#define RESOLVE(field, name)                                     \
    do {                                                         \
        void * p_ = sym(lib, name);                              \
        memcpy(&api.field, &p_, sizeof api.field);               \
    } while (0)

static int count_libllama(struct dl_phdr_info * info, size_t size, void * data) {
    (void) size;
    if (info->dlpi_name != NULL && strstr(info->dlpi_name, "libllama") != NULL) {
        (*(int *) data)++;
        printf("loaded: %s\n", info->dlpi_name);
    }
    return 0;
}

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
    if (f == NULL) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = (char *) malloc((size_t) n + 1);
    if (fread(buf, 1, (size_t) n, f) != (size_t) n) {
        free(buf);
        fclose(f);
        return NULL;
    }
    buf[n] = '\0';
    fclose(f);
    return buf;
}

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

int main(int argc, char ** argv) {
    void * lib;
    int n_libllama = 0, n_prompt, i, k, n_vocab, max_tokens, threads;
    char * prompt;
    llama_token * toks;
    struct llama_model * model;
    const struct llama_vocab * vocab;
    struct llama_context_params cp;
    struct llama_context * ctx;
    snapkv_observer * obs;
    snapkv_params params;
    snapkv_stats stats;
    snapkv_status st;
    char text[512] = "", ids[1024] = "", msg[512];

    if (argc != 7) {
        fprintf(stderr, "usage: %s LIBSNAPKV.so MODEL PROMPT_FILE BUDGET MAX_TOKENS THREADS\n", argv[0]);
        return 2;
    }
    max_tokens = atoi(argv[5]);
    threads = atoi(argv[6]);
    llama_log_set(quiet_log, NULL);
    llama_backend_init();

    lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    RESOLVE(check_llama, "snapkv_check_llama");
    RESOLVE(last_error, "snapkv_last_error");
    RESOLVE(version, "snapkv_version");
    RESOLVE(observer_new, "snapkv_observer_new");
    RESOLVE(observer_attach, "snapkv_observer_attach");
    RESOLVE(observer_free, "snapkv_observer_free");
    RESOLVE(params_default, "snapkv_params_default");
    RESOLVE(compress_after_prefill, "snapkv_compress_after_prefill");
    dl_iterate_phdr(count_libllama, &n_libllama);
    printf("plugin %s; libllama copies in the process: %d\n", api.version(), n_libllama);
    if (n_libllama != 1) {
        fprintf(stderr, "expected exactly one libllama in the process\n");
        return 1;
    }
    if (api.check_llama() != SNAPKV_OK) {
        api.last_error(msg, sizeof msg);
        fprintf(stderr, "snapkv_check_llama: %s\n", msg);
        return 1;
    }

    model = llama_model_load_from_file(argv[2], llama_model_default_params());
    if (model == NULL) {
        fprintf(stderr, "cannot load %s\n", argv[2]);
        return 1;
    }
    vocab = llama_model_get_vocab(model);
    n_vocab = llama_vocab_n_tokens(vocab);

    obs = api.observer_new();
    cp = llama_context_default_params();
    cp.n_ctx = 4096;
    cp.n_batch = 2048;
    cp.n_ubatch = 512;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    if (obs == NULL || api.observer_attach(obs, &cp) != SNAPKV_OK) {
        fprintf(stderr, "observer attach failed\n");
        return 1;
    }
    ctx = llama_init_from_model(model, cp);

    prompt = read_file(argv[3]);
    if (ctx == NULL || prompt == NULL) {
        fprintf(stderr, "context or prompt failed\n");
        return 1;
    }
    n_prompt = -llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), NULL, 0, true, true);
    toks = (llama_token *) malloc(sizeof(llama_token) * (size_t) n_prompt);
    llama_tokenize(vocab, prompt, (int32_t) strlen(prompt), toks, n_prompt, true, true);
    printf("prompt: %d tokens\n", n_prompt);
    if (eval(ctx, toks, n_prompt, 0) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }

    api.params_default(&params);
    params.budget = (uint32_t) atoi(argv[4]);
    memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
    st = api.compress_after_prefill(ctx, obs, &params, 0, toks, (size_t) n_prompt, &stats);
    if (st != SNAPKV_OK) {
        api.last_error(msg, sizeof msg);
        fprintf(stderr, "snapkv_compress_after_prefill: %d: %s\n", st, msg);
        return 1;
    }
    printf("compressed %llu -> %llu cells\n", (unsigned long long) stats.cells_before,
           (unsigned long long) stats.cells_after);

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
        if (n_piece > 0 && strlen(text) + (size_t) n_piece < sizeof text) {
            piece[n_piece] = '\0';
            strcat(text, piece);
        }
        if (i + 1 < max_tokens && eval(ctx, &best, 1, n_prompt + i) != 0) {
            fprintf(stderr, "llama_decode failed while answering\n");
            return 1;
        }
    }
    printf("answer[plugin]: %s\n", text);
    printf("tokens[plugin]: %s\n", ids);

    free(toks);
    free(prompt);
    llama_free(ctx);
    api.observer_free(obs);
    llama_model_free(model);
    llama_backend_free();
    dlclose(lib);
    return 0;
}
