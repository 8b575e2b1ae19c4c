/*
 * Drift guard shared by the C and C++ tests: every size, field offset and
 * constant that snapkv.h states is compared with the library's own table
 * (snapkv_abi_item). An entry the library has but this table lacks fails
 * too, so a field added on the Rust side cannot go unchecked.
 */
#ifndef SNAPKV_TEST_ABI_CHECK_H
#define SNAPKV_TEST_ABI_CHECK_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "snapkv.h"

typedef struct abi_expect {
    const char * name;
    int64_t value;
} abi_expect;

#define ABI_SIZE(T) { "sizeof(" #T ")", (int64_t) sizeof(T) }
#define ABI_OFF(T, f) { "offsetof(" #T ", " #f ")", (int64_t) offsetof(T, f) }
#define ABI_CONST(c) { #c, (int64_t) (c) }

static const abi_expect ABI_EXPECTED[] = {
    ABI_SIZE(snapkv_params),
    ABI_SIZE(snapkv_stats),
    ABI_SIZE(llama_token),
    ABI_SIZE(llama_seq_id),
    ABI_SIZE(struct llama_context_params),
    ABI_OFF(snapkv_params, size),
    ABI_OFF(snapkv_params, window),
    ABI_OFF(snapkv_params, budget),
    ABI_OFF(snapkv_params, kernel),
    ABI_OFF(snapkv_params, budget_fraction),
    ABI_OFF(snapkv_params, pooling),
    ABI_OFF(snapkv_params, reserved),
    ABI_OFF(snapkv_params, pool_align),
    ABI_OFF(snapkv_params, pool_forward),
    ABI_OFF(snapkv_params, value_weighting),
    ABI_OFF(snapkv_params, query_aggregation),
    ABI_OFF(snapkv_params, draft_tokens),
    ABI_OFF(snapkv_params, method),
    ABI_OFF(snapkv_params, spare),
    ABI_OFF(snapkv_stats, size),
    ABI_OFF(snapkv_stats, compressed),
    ABI_OFF(snapkv_stats, score_source),
    ABI_OFF(snapkv_stats, cells_before),
    ABI_OFF(snapkv_stats, cells_after),
    ABI_OFF(snapkv_stats, bytes_before),
    ABI_OFF(snapkv_stats, bytes_after),
    ABI_OFF(snapkv_stats, prefill_seconds),
    ABI_OFF(snapkv_stats, window_seconds),
    ABI_OFF(snapkv_stats, observe_seconds),
    ABI_OFF(snapkv_stats, score_seconds),
    ABI_OFF(snapkv_stats, select_seconds),
    ABI_OFF(snapkv_stats, compact_seconds),
    ABI_OFF(snapkv_stats, draft_tokens),
    ABI_OFF(snapkv_stats, draft_seconds),
    ABI_CONST(SNAPKV_POOLING_MAX),
    ABI_CONST(SNAPKV_POOLING_AVG),
    ABI_CONST(SNAPKV_POOL_ALIGN_CENTERED),
    ABI_CONST(SNAPKV_POOL_ALIGN_TRAILING),
    ABI_CONST(SNAPKV_POOL_ALIGN_FORWARD),
    ABI_CONST(SNAPKV_VALUE_WEIGHTING_OFF),
    ABI_CONST(SNAPKV_VALUE_WEIGHTING_NORM),
    ABI_CONST(SNAPKV_QUERY_AGGREGATION_SUM),
    ABI_CONST(SNAPKV_QUERY_AGGREGATION_MAX),
    ABI_CONST(SNAPKV_PRESET_DEFAULT),
    ABI_CONST(SNAPKV_PRESET_FACTS),
    ABI_CONST(SNAPKV_PRESET_RECONSTRUCT),
    ABI_CONST(SNAPKV_SCORE_NONE),
    ABI_CONST(SNAPKV_SCORE_SOFTMAX),
    ABI_CONST(SNAPKV_SCORE_QUERY_KEY),
    ABI_CONST(SNAPKV_SCORE_KEYS),
    ABI_CONST(SNAPKV_SCORE_RECONSTRUCTION),
    ABI_CONST(SNAPKV_METHOD_SNAPKV),
    ABI_CONST(SNAPKV_METHOD_KEYDIFF),
    ABI_CONST(SNAPKV_METHOD_RECONSTRUCT),
    ABI_CONST(SNAPKV_VERSION_MAJOR),
    ABI_CONST(SNAPKV_VERSION_MINOR),
    ABI_CONST(SNAPKV_VERSION_PATCH),
    ABI_CONST(SNAPKV_OK),
    ABI_CONST(SNAPKV_ERR_NULL_POINTER),
    ABI_CONST(SNAPKV_ERR_INVALID_PARAMS),
    ABI_CONST(SNAPKV_ERR_INVALID_ARGUMENT),
    ABI_CONST(SNAPKV_ERR_INVALID_SEQUENCE),
    ABI_CONST(SNAPKV_ERR_EMPTY_SEQUENCE),
    ABI_CONST(SNAPKV_ERR_OBSERVER_NOT_ATTACHED),
    ABI_CONST(SNAPKV_ERR_UNSUPPORTED),
    ABI_CONST(SNAPKV_ERR_DECODE),
    ABI_CONST(SNAPKV_ERR_CAPTURE),
    ABI_CONST(SNAPKV_ERR_STATE),
    ABI_CONST(SNAPKV_ERR_STATE_FORMAT),
    ABI_CONST(SNAPKV_ERR_RESTORE_FAILED),
    ABI_CONST(SNAPKV_ERR_LLAMA_MISMATCH),
    ABI_CONST(SNAPKV_ERR_MODEL_LOAD),
    ABI_CONST(SNAPKV_ERR_CONTEXT_CREATE),
    ABI_CONST(SNAPKV_ERR_TOKENIZE),
    ABI_CONST(SNAPKV_ERR_IO),
    ABI_CONST(SNAPKV_ERR_INTERNAL),
    ABI_CONST(SNAPKV_ERR_PANIC),
    ABI_CONST(SNAPKV_ERR_OUT_OF_MEMORY),
};

/* Returns the number of disagreements, printing each. */
static int abi_check(void) {
    const size_t n_expected = sizeof(ABI_EXPECTED) / sizeof(ABI_EXPECTED[0]);
    int failures = 0;
    size_t matched = 0;
    size_t i, j;
    for (i = 0;; i++) {
        const char * name = NULL;
        int64_t value = 0;
        int found = 0;
        if (snapkv_abi_item(i, &name, &value) != SNAPKV_OK) {
            break;
        }
        for (j = 0; j < n_expected; j++) {
            if (strcmp(ABI_EXPECTED[j].name, name) == 0) {
                found = 1;
                matched++;
                if (ABI_EXPECTED[j].value != value) {
                    fprintf(stderr, "ABI drift: %s is %lld in snapkv.h, %lld in the library\n", name,
                            (long long) ABI_EXPECTED[j].value, (long long) value);
                    failures++;
                }
            }
        }
        if (!found) {
            fprintf(stderr, "ABI drift: the library states %s = %lld, which the header test does not check\n", name,
                    (long long) value);
            failures++;
        }
    }
    if (matched != n_expected) {
        fprintf(stderr, "ABI drift: %zu of %zu header entries are unknown to the library\n", n_expected - matched,
                n_expected);
        failures++;
    }
    if (strcmp(snapkv_version(), SNAPKV_VERSION_STRING) != 0) {
        fprintf(stderr, "version drift: header %s, library %s\n", SNAPKV_VERSION_STRING, snapkv_version());
        failures++;
    }
    if (strcmp(snapkv_llama_ggml_version(), SNAPKV_LLAMA_GGML_VERSION) != 0) {
        fprintf(stderr, "llama.cpp drift: header is for ggml %s, library built against ggml %s\n",
                SNAPKV_LLAMA_GGML_VERSION, snapkv_llama_ggml_version());
        failures++;
    }
    if (failures == 0) {
        printf("abi: %zu entries agree\n", matched);
    }
    return failures;
}

#endif /* SNAPKV_TEST_ABI_CHECK_H */
