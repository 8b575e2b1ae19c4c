#!/usr/bin/env bash
# The Rust scorer's speed with and without the repository's target flags
# (.cargo/config.toml: +avx,+avx2,+fma,+f16c,+bmi2), side by side in one
# run. A program that depends on snapkv does not read that file; the
# scoring kernels choose their SIMD width at run time so that it scores as
# fast anyway. Both builds get the same llama.cpp (AVX2, through
# SNAPKV_CMAKE_ARGS), so only the Rust code differs; the two `snapkv bench`
# runs alternate, twice, so that drift on the machine hits both alike.
#
#   scripts/bench-scoring-dispatch.sh [OUT_DIR]          (default results/scoring-dispatch)
#   scripts/bench-scoring-dispatch.sh --table [OUT_DIR]  the table of the runs already there
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
table_only=0
if [[ "${1:-}" == --table ]]; then
    table_only=1
    shift
fi
out="${1:-results/scoring-dispatch}"
mkdir -p "$out"
bench=(bench -t 2 --lengths 2000,4000 --budget 1024 -n 8)

if ((!table_only)); then
    cargo build --release -p snapkv-cli
    # RUSTFLAGS, even empty, replaces the flags of .cargo/config.toml.
    RUSTFLAGS="" SNAPKV_CMAKE_ARGS="-DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON" \
        cargo build --release -p snapkv-cli --target-dir target/no-target-flags
    for run in 1 2 3 4; do
        target/release/snapkv "${bench[@]}" --out "$out/with-flags-$run" >/dev/null 2>&1
        target/no-target-flags/release/snapkv "${bench[@]}" --out "$out/without-flags-$run" >/dev/null 2>&1
    done
fi

python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for build in ("with-flags", "without-flags"):
    for path in sorted(glob.glob(f"{out}/{build}-*/bench-*.json")):
        for p in json.load(open(path))["points"]:
            rows.setdefault(p["prompt_tokens"], {}).setdefault(build, []).append(p["score_seconds"])
table = []
lines = ["| prompt tokens | repository's flags: mean (median) s | no target flags: mean (median) s | ratio of means (medians) | runs each |",
         "|---:|---:|---:|---:|---:|"]
def median(v):
    v = sorted(v)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2
for tokens in sorted(rows):
    a, b = rows[tokens]["with-flags"], rows[tokens]["without-flags"]
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = median(a), median(b)
    table.append({"prompt_tokens": tokens, "with_flags_seconds": a, "without_flags_seconds": b,
                  "ratio_of_means": mb / ma, "ratio_of_medians": db / da})
    lines.append(f"| {tokens:,} | {ma:.3f} ({da:.3f}) | {mb:.3f} ({db:.3f}) | {mb / ma:.2f} ({db / da:.2f}) | {len(a)} |")
json.dump({"command": "scripts/bench-scoring-dispatch.sh", "machine": "2-core x86-64 VM, -t 2", "points": table}, open(f"{out}/scoring-dispatch.json", "w"), indent=2)
print("\n".join(lines))
PY
