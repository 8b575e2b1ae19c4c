// snapkv.h compiled as C++17: the extern "C" guards, the enums and the
// structs work unchanged, and the layout agrees with the library.
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "snapkv.h"
#include "abi_check.h"

static_assert(std::is_standard_layout<snapkv_params>::value, "snapkv_params is a C struct");
static_assert(std::is_standard_layout<snapkv_stats>::value, "snapkv_stats is a C struct");
static_assert(std::is_trivially_copyable<snapkv_stats>::value, "snapkv_stats is a C struct");
static_assert(std::is_same<snapkv_status, int32_t>::value, "snapkv_status is int32_t");

int main() {
    int failures = abi_check();
    snapkv_params p{};
    if (snapkv_params_default(&p) != SNAPKV_OK || p.size != sizeof p) {
        std::fprintf(stderr, "snapkv_params_default failed\n");
        failures++;
    }
    p.pooling = SNAPKV_POOLING_AVG;
    p.query_aggregation = SNAPKV_QUERY_AGGREGATION_MAX;
    p.pool_align = SNAPKV_POOL_ALIGN_FORWARD;
    p.pool_forward = 4;
    snapkv_observer * obs = snapkv_observer_new();
    llama_context_params cp = llama_context_default_params();
    if (snapkv_observer_attach(obs, &cp) != SNAPKV_OK || cp.cb_eval == nullptr) {
        std::fprintf(stderr, "snapkv_observer_attach failed\n");
        failures++;
    }
    snapkv_observer_free(obs);
    snapkv_stats st{};
    st.size = sizeof st;
    if (snapkv_prefill(nullptr, nullptr, &p, 0, nullptr, 0, &st) != SNAPKV_ERR_NULL_POINTER) {
        failures++;
    }
    char msg[256];
    snapkv_last_error(msg, sizeof msg);
    std::printf("C++17: %s; last error: %s\n", snapkv_version(), msg);
    return failures == 0 ? 0 : 1;
}
