#!/usr/bin/env bash
# The Rust scorer's speed with and without x86-64 target flags
# (+avx,+avx2,+fma,+f16c,+bmi2, which this repository set in
# .cargo/config.toml until it stopped setting any), side by side in one run.
# The repository's own build is now flagless, as a program that depends on
# snapkv is; the scoring kernels choose their SIMD width at run time so that
# it scores as fast anyway. Both builds get the same llama.cpp (AVX2,
# through .cargo/config.toml's SNAPKV_CMAKE_ARGS), so only the Rust code
# differs; the two `snapkv bench` runs alternate, four times each, so that
# drift on the machine hits both alike.
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
    RUSTFLAGS="-C target-feature=+avx,+avx2,+fma,+f16c,+bmi2" \
        cargo build --release -p snapkv-cli --target-dir target/target-flags
    for run in 1 2 3 4; do
        target/target-flags/release/snapkv "${bench[@]}" --out "$out/with-flags-$run" >/dev/null 2>&1
        target/release/snapkv "${bench[@]}" --out "$out/without-flags-$run" >/dev/null 2>&1
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
lines = ["| prompt tokens | AVX2 target flags: mean (median) s | no target flags: mean (median) s | ratio of means (medians) | runs each |",
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
