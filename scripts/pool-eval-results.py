#!/usr/bin/env python3
"""Pools the records of several `snapkv eval` runs (their eval.json files)
into one table per task and budget: accuracy relative to the full cache on the same prompts,
accuracy beyond a look-ahead, and mean KL (weighted by answer positions)
as a fraction of streaming's; for look-ahead methods, when the records
hold per-position KL, also the KL over the positions after the look-ahead
beside streaming's over the same positions.

Use it for runs that share the model, tasks and settings but differ in
seeds, e.g. the held-out sets of the README:

    scripts/pool-eval-results.py results/eval/eval.json \
        results/lookahead/held-out-seeds-6-7/eval.json \
        results/lookahead/held-out-seeds-8-10/eval.json --budget 256

`--length N` keeps the prompts of one length (runs over several lengths).
A question-agnostic run's questions about one document count as prompts
of their own. `--strict` adds, after "vs full", the strict share: the
full cache's found values the method found too.

A prompt is counted once per file it appears in; pass each run once.

`--compare A B` (repeatable) pairs method B with method A prompt by prompt,
across the files (a prompt is its task, haystack, length, depth and seed):
on how many prompts B's mean KL is lower or higher than A's, its score
higher or lower, and both methods' median compression seconds, e.g.

    scripts/pool-eval-results.py results/lookahead/held-out-seeds-4-10/eval.json \
        results/value-weighting/held-out-seeds-4-10/eval.json \
        --compare snapkv snapkv:value=norm

`--kl-concentration M` (repeatable) shows where method M's KL lies, per
task: over the answer positions after its look-ahead (all positions
without one), how much of the summed KL the 10 largest positions and the
2 largest prompts hold, and how many positions exceed 1 nat. A KL carried
by a few positions comes from a few confident disagreements (a wrong name
or number), not from a blur over every token. The 2 largest prompts'
answers are printed beside what they should hold.

`--numbers` counts, per task and method, the 7-digit numbers (the suite's
values) in the answers: their mean per answer and the answers holding at
most one (an answer that stopped after its first value).

`--reproduced` checks runs against each other: for every (prompt, method,
budget) that more than one file holds, whether the answers are identical.
"""
import re

import argparse
import json
import sys


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def pooled_kl(records):
    positions = sum(r["kl_positions"] for r in records)
    if positions == 0:
        return float("nan")
    return sum(r["mean_kl"] * r["kl_positions"] for r in records) / positions


def kl_after_lookahead(records, streaming_by_prompt):
    """Mean KL over the positions after each record's look-ahead, and plain
    streaming's over the same positions of the same prompts; None unless
    every record has a look-ahead, per-position KL and a streaming record."""
    total, streaming_total, n = 0.0, 0.0, 0
    for r in records:
        s = streaming_by_prompt.get(r["prompt"])
        if not r.get("lookahead") or "kl_per_position" not in r or s is None or "kl_per_position" not in s:
            return None
        after = slice(r["lookahead"], len(r["kl_per_position"]))
        total += sum(r["kl_per_position"][after])
        streaming_total += sum(s["kl_per_position"][after])
        n += len(r["kl_per_position"][after])
    if n == 0:
        return None
    return total / n, streaming_total / n


def median(xs):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def compare(records, tasks, budget, a, b):
    """Prints, per task, how method `b` fares against method `a` on the
    prompts both ran (at `budget`), whichever files they came from."""
    def by_prompt(method):
        out = {}
        for r in records:
            if r["method"] == method and r["budget"] == budget:
                out.setdefault(r["prompt"][1:], r)
        return out

    ra, rb = by_prompt(a), by_prompt(b)
    print(f"{b} against {a}, prompt by prompt, {budget} cells:")
    print(f"{'task':<11} {'prompts':>7} {'KL lower':>9} {'KL higher':>10} {'score up':>9} {'score down':>11} {'median s, A':>12} {'median s, B':>12}")
    for task in tasks:
        shared = [k for k in rb if k in ra and k[0] == task]
        if not shared:
            continue
        pairs = [(ra[k], rb[k]) for k in shared]
        print(
            f"{task:<11} {len(pairs):>7} {sum(y['mean_kl'] < x['mean_kl'] for x, y in pairs):>9} "
            f"{sum(y['mean_kl'] > x['mean_kl'] for x, y in pairs):>10} "
            f"{sum(y['score'] > x['score'] for x, y in pairs):>9} "
            f"{sum(y['score'] < x['score'] for x, y in pairs):>11} "
            f"{median([x['compression_seconds'] for x, _ in pairs]):>12.3f} "
            f"{median([y['compression_seconds'] for _, y in pairs]):>12.3f}"
        )


def kl_concentration(records, tasks, budget, method):
    """Prints, per task, how concentrated method's per-position KL is."""
    print(f"where the KL of {method} lies, {budget} cells (positions after any look-ahead):")
    print(f"{'task':<11} {'prompts':>7} {'positions':>9} {'KL sum':>8} {'top 10 pos.':>12} {'top 2 prompts':>14} {'pos. > 1 nat':>13}")
    for task in tasks:
        mine = [r for r in records if r["task"] == task and r["method"] == method and r["budget"] == budget]
        mine = [r for r in mine if "kl_per_position" in r]
        if not mine:
            continue
        per_prompt = [r["kl_per_position"][r.get("lookahead", 0):] for r in mine]
        positions = sorted((k for p in per_prompt for k in p), reverse=True)
        total = sum(positions)
        if total <= 0:
            continue
        by_prompt = sorted(zip(mine, per_prompt), key=lambda rp: -sum(rp[1]))
        prompts = [sum(p) for _, p in by_prompt]
        print(
            f"{task:<11} {len(mine):>7} {len(positions):>9} {total:>8.2f} {100 * sum(positions[:10]) / total:>11.0f}% "
            f"{100 * sum(prompts[:2]) / total:>13.0f}% {sum(k > 1 for k in positions):>13}"
        )
        for r, _ in by_prompt[:2]:
            print(f"{'':<11}   seed {r['seed']}, depth {r['depth']}: {r['answer'].strip()!r}, expected {', '.join(r['expected'])}")


def count_numbers(records, tasks, budget):
    """Prints, per task and method, the 7-digit numbers per answer."""
    print(f"7-digit numbers per answer ({budget} cells; the full cache at any budget):")
    print(f"{'task':<11} {'method':<32} {'answers':>7} {'numbers':>8} {'at most one':>12}")
    for task in tasks:
        methods = []
        for r in records:
            if r["task"] == task and (r["budget"] in (None, budget)) and r["method"] not in methods:
                methods.append(r["method"])
        for m in methods:
            mine = [r for r in records if r["task"] == task and r["method"] == m and r["budget"] in (None, budget)]
            counts = [len(re.findall(r"(?<!\d)\d{7}(?!\d)", r["answer"])) for r in mine]
            print(f"{task:<11} {m:<32} {len(mine):>7} {mean(counts):>8.2f} {sum(c <= 1 for c in counts):>12}")


def reproduced(records):
    """Prints how many (prompt, method, budget) answers held by more than
    one file are identical in all of them."""
    answers = {}
    for r in records:
        answers.setdefault((r["prompt"][1:], r["method"], r["budget"]), []).append(r["answer"])
    shared = {k: v for k, v in answers.items() if len(v) > 1}
    same = sum(len(set(v)) == 1 for v in shared.values())
    print(f"answers held by more than one run: {len(shared)}; identical in every run: {same}")
    for (prompt, method, budget), v in shared.items():
        if len(set(v)) > 1:
            print(f"  differs: {prompt[0]} depth {prompt[3]} seed {prompt[4]} {method} @ {budget}: {[a[:40] for a in v]!r}")


def found_values(r):
    """The expected values that the answer holds."""
    expected = r["expected"] if isinstance(r["expected"], list) else str(r["expected"]).split()
    return {v for v in expected if v in r["answer"]}


def strict_share(mine, full_by_prompt):
    """Per prompt, the share of the full cache's found values the method also
    found, averaged over the prompts where the full cache found any."""
    shares = []
    for r in mine:
        want = found_values(full_by_prompt[r["prompt"]])
        if want:
            shares.append(len(want & found_values(r)) / len(want))
    return f"{100 * mean(shares):.0f}" if shares else "-"


def fraction(num, den):
    if den != den or num != num or den == 0:
        return "-"
    if num == 0:
        return "0"
    if num >= den:
        return f"{num / den:.2f}x"
    ratio = den / num
    return f"1/{ratio:.1f}" if ratio < 10 else f"1/{ratio:.0f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="eval.json files of `snapkv eval` runs")
    ap.add_argument("--budget", type=int, default=256, help="budget in cells (default 256)")
    ap.add_argument("--tasks", default="", help="comma-separated tasks (default: all found)")
    ap.add_argument("--length", type=int, help="only the prompts of this length (default: all lengths)")
    ap.add_argument(
        "--compare",
        nargs=2,
        action="append",
        default=[],
        metavar=("A", "B"),
        help="also compare method B with method A prompt by prompt (repeatable)",
    )
    ap.add_argument(
        "--kl-concentration",
        action="append",
        default=[],
        metavar="M",
        help="also show how concentrated method M's per-position KL is (repeatable)",
    )
    ap.add_argument(
        "--strict",
        action="store_true",
        help="also give, in brackets after 'vs full', the strict share: per prompt the fraction of the values "
        "the full cache's answer found that the method's answer found too, over the prompts where the full "
        "cache found any",
    )
    ap.add_argument("--numbers", action="store_true", help="also count the 7-digit numbers per answer")
    ap.add_argument(
        "--reproduced", action="store_true", help="also check that answers several files hold are identical"
    )
    args = ap.parse_args()

    records = []
    for i, path in enumerate(args.files):
        with open(path) as f:
            for r in json.load(f)["records"]:
                if args.length is not None and r["length"] != args.length:
                    continue
                # A question-agnostic document is asked several questions:
                # each is a prompt of its own.
                r["prompt"] = (i, r["task"], r["haystack"], r["length"], r["depth"], r["seed"], r.get("question"))
                records.append(r)
    tasks = [t for t in args.tasks.split(",") if t] or sorted({r["task"] for r in records})
    only = "" if args.length is None else f", prompts of length {args.length}"
    print(f"pooled over {len(args.files)} runs, {args.budget} cells{only}:")
    print(f"{'task':<11} {'method':<32} {'prompts':>7} {'vs full':>8} {'beyond look-ahead':>26} {'mean KL':>9} {'/ streaming':>12}")
    for task in tasks:
        rows = [r for r in records if r["task"] == task]
        full = [r for r in rows if r["method"] == "full"]
        if not full:
            print(f"{task}: no full-cache records", file=sys.stderr)
            continue
        full_by_prompt = {r["prompt"]: r for r in full}
        streaming_by_prompt = {
            r["prompt"]: r for r in rows if r["method"] == "streaming" and r["budget"] == args.budget
        }
        print(f"{task:<11} {'full':<32} {len(full):>7} {100 * mean([r['score'] for r in full]):>7.1f}%")
        methods = []
        for r in rows:
            if r["budget"] == args.budget and r["method"] not in methods:
                methods.append(r["method"])
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["budget"] == args.budget]
            # Compare with the full cache and streaming on the same prompts.
            full_score = mean([full_by_prompt[r["prompt"]]["score"] for r in mine])
            streaming_kl = pooled_kl([streaming_by_prompt[r["prompt"]] for r in mine if r["prompt"] in streaming_by_prompt])
            score = mean([r["score"] for r in mine])
            rel = f"{100 * score / full_score:.0f}%" if full_score > 0 else "-"
            if args.strict:
                rel += f" ({strict_share(mine, full_by_prompt)})"
            beyond = [r for r in mine if r.get("score_beyond_lookahead") is not None]
            if beyond:
                b = mean([r["score_beyond_lookahead"] for r in beyond])
                fb = mean([r["full_score_beyond_lookahead"] for r in beyond])
                rel_b = f"{100 * b / fb:.0f}%" if fb > 0 else "-"
                beyond_text = f"{100 * b:.1f}% / {100 * fb:.1f}% ({rel_b})"
            else:
                beyond_text = "-"
            kl = pooled_kl(mine)
            print(
                f"{task:<11} {method:<32} {len(mine):>7} {rel:>8} {beyond_text:>26} {kl:>9.4f} {fraction(kl, streaming_kl):>12}"
            )
            after = kl_after_lookahead(mine, streaming_by_prompt)
            if after:
                kl_after, streaming_after = after
                print(
                    f"{'':<11} {'  KL after the look-ahead':<32} {'':>7} {'':>8} {'':>26} {kl_after:>9.4f} {fraction(kl_after, streaming_after):>12}"
                )
    for a, b in args.compare:
        print()
        compare(records, tasks, args.budget, a, b)
    for m in args.kl_concentration:
        print()
        kl_concentration(records, tasks, args.budget, m)
    if args.numbers:
        print()
        count_numbers(records, tasks, args.budget)
    if args.reproduced:
        print()
        reproduced(records)


if __name__ == "__main__":
    main()
