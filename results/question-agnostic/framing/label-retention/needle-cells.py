#!/usr/bin/env python3
"""How many KV heads keep each token of each needle, from the files an
experiment build (../tuning-seed1-query-sum/experiment.diff) writes under
SNAPKV_DUMP_DIR: prompt-N.json (the prompt's token pieces and needle
positions) and scores-KEEP-LxHxN.f32 (the selector's pooled scores, one row
per layer and KV head). A head keeps a position when its score ranks among
the head's KEEP highest (ties by rank order, as numpy sorts).

usage: needle-cells.py PROMPT_JSON SCORES_F32
"""
import json
import re
import sys

import numpy as np


def load_prompt(path):
    text = open(path).read()
    # The experiment writes Rust's Debug escapes (\u{a0}); JSON wants \u00a0.
    text = re.sub(r"\\u\{([0-9a-f]+)\}", lambda m: "\\u%04x" % int(m.group(1), 16), text)
    return json.loads(text)


def main():
    prompt = load_prompt(sys.argv[1])
    name = sys.argv[2].rsplit("/", 1)[-1]
    keep = int(name.split("-")[1])
    n_layer, n_head, n = map(int, name.rsplit("-", 1)[1][: -len(".f32")].split("x"))
    scores = np.fromfile(sys.argv[2], dtype="<f4").reshape(n_layer, n_head, n)
    kept = np.argsort(np.argsort(-scores, axis=2), axis=2) < keep
    asked = set(prompt["asked"])
    needle = sorted(asked | set(prompt["unasked"]))
    spans, run = [], [needle[0]]
    for p in needle[1:]:
        if p == run[-1] + 1:
            run.append(p)
        else:
            spans.append(run)
            run = [p]
    spans.append(run)
    pieces = prompt["pieces"]
    print(f"{keep} cells of {n} kept per head; share of the {n_layer * n_head} heads keeping each token")
    for span in spans:
        print(f"{'asked' if span[0] in asked else 'other'} needle at {span[0]}:")
        print("  " + " ".join(f"{pieces[p]!r}:{kept[:, :, p].mean():.2f}" for p in span if p < n))
    tenths = np.array_split(kept.mean(axis=(0, 1)), 10)
    print("kept share by tenth of the document: " + " ".join(f"{t.mean():.2f}" for t in tenths))


if __name__ == "__main__":
    main()
