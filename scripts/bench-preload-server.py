#!/usr/bin/env python3
"""Served speed with and without the preload, from llama-server's own timings.

    python3 scripts/bench-preload-server.py [--tokens 7500] [--budget 1024] [--out results/preload-server.json]

Runs the pinned tree's llama-server (scripts/build-llama-tools.sh) with the
default model three times, one request each, greedy, 128 tokens generated
(ignore_eos): a ~7,500-token passkey prompt without the preload; the same
prompt with LD_PRELOAD=libsnapkv_preload.so SNAPKV_BUDGET=1024; and a fresh
prompt of about the budget's length without the preload (the speed the
compressed cache should reach). Prints a Markdown table and writes JSON.
"""
import argparse, json, os, re, socket, subprocess, sys, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models/qwen2.5-coder-0.5b-instruct.gguf")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def document(reps, key):
    s = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
    for i in range(reps + 1):
        if i == reps * 2 // 5:
            s += f"The pass key is {key}. Remember it. {key} is the pass key. "
        if i < reps:
            s += FILLER
    return s


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=3600))


def run(name, reps, env, server_bin, log_dir):
    port = free_port()
    log_path = os.path.join(log_dir, f"bench-{name}.log")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPKV_") and k != "LD_PRELOAD"}
    full_env.update(env)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([server_bin, "-m", MODEL, "--host", "127.0.0.1", "--port", str(port), "-c", "16384",
                                 "-np", "1", "-t", str(os.cpu_count()), "--no-webui"],
                                stdout=log, stderr=subprocess.STDOUT, env=full_env)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except Exception:
                time.sleep(0.2)
        prompt = f"<|im_start|>user\n{document(reps, 68142)}\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n"
        r = post(port, "/completion", {"prompt": prompt, "n_predict": 128, "ignore_eos": True, "temperature": 0,
                                        "seed": 1, "cache_prompt": False})
    finally:
        proc.terminate()
        proc.wait()
    t = r["timings"]
    text = open(log_path).read()
    m = re.findall(r"snapkv: seq \d+: (\d+) -> (\d+) cells per KV head.*?, ([0-9.]+) s \(", text)
    cells = int(m[-1][1]) + t["predicted_n"] if m else t["prompt_n"] + t["predicted_n"]
    return {
        "run": name,
        "prompt_tokens": t["prompt_n"],
        "prompt_tokens_per_second": round(t["prompt_per_second"], 1),
        "generated_tokens": t["predicted_n"],
        "generation_tokens_per_second": round(t["predicted_per_second"], 2),
        "kv_cells_after_generation": cells,
        "compression_seconds": float(m[-1][2]) if m else None,
        "answer_starts": r["content"][:40],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=7500)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--out", default=os.path.join(ROOT, "results/preload-server.json"))
    a = ap.parse_args()
    subprocess.run(["bash", os.path.join(ROOT, "scripts/build-llama-tools.sh")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cargo", "build", "--release", "-p", "snapkv-preload", "--target-dir", "target/preload"],
                   check=True, cwd=ROOT)
    server = os.path.join(ROOT, "target/llama-tools/bin/llama-server")
    lib = os.path.join(ROOT, "target/preload/release/libsnapkv_preload.so")
    logs = os.path.join(ROOT, "target")
    per_rep = 24.0  # tokens per filler repetition with the default model
    long_reps, short_reps = int((a.tokens - 60) / per_rep), int((a.budget - 60) / per_rep)
    rows = [
        run("full cache", long_reps, {}, server, logs),
        run(f"preload, {a.budget} cells", long_reps, {"LD_PRELOAD": lib, "SNAPKV_BUDGET": str(a.budget)}, server, logs),
        run(f"fresh {a.budget}-token prompt", short_reps, {}, server, logs),
    ]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"model": os.path.basename(MODEL), "cpus": os.cpu_count(), "rows": rows}, f, indent=2)
    print("| run | prompt tokens | prompt tok/s | generation tok/s | KV cells per slot | compression s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cs = "" if r["compression_seconds"] is None else f'{r["compression_seconds"]:.2f}'
        print(f'| {r["run"]} | {r["prompt_tokens"]} | {r["prompt_tokens_per_second"]} | '
              f'{r["generation_tokens_per_second"]} | {r["kv_cells_after_generation"]} | {cs} |')
    ratio = rows[1]["generation_tokens_per_second"] / rows[2]["generation_tokens_per_second"]
    print(f"\ncompressed generation speed: {ratio:.0%} of the fresh {a.budget}-token prompt's")


if __name__ == "__main__":
    sys.exit(main())
