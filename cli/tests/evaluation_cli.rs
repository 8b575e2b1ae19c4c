//! The evaluation commands (`demo`, `eval`, `fidelity`, `bench`,
//! `capacity`) end to end on the tiny generated model: each runs in well
//! under a second, writes what the README says it writes, and its numbers
//! obey the invariants that hold whatever the model (the full cache is its
//! own reference, a compressed sequence holds `budget` cells and
//! `budget / prompt` of the full cache's bytes, compression fits more
//! sequences). The tiny model's answers are meaningless, so no test here
//! judges them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use snapkv_testing::{tiny_model_path, TinyModelSpec};

const BUDGET: u64 = 64;

fn tiny() -> PathBuf {
    tiny_model_path(&TinyModelSpec::default()).expect("tiny model written")
}

/// A fresh, empty scratch directory for one test's output.
fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("snapkv-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn snapkv(command: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snapkv"))
        .arg(command)
        .arg("-m")
        .arg(tiny())
        .args(["-t", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn succeed(command: &str, args: &[&str]) -> String {
    let out = snapkv(command, args);
    assert!(
        out.status.success(),
        "snapkv {command} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fail(command: &str, args: &[&str]) -> String {
    let out = snapkv(command, args);
    assert!(!out.status.success(), "snapkv {command} {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The one file in `dir` whose name starts with `prefix` and ends with `suffix`.
fn find(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(suffix)
        })
        .collect();
    assert_eq!(found.len(), 1, "{prefix}*{suffix} in {}: {found:?}", dir.display());
    found.into_iter().next().unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn uint(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not an integer in {v}"))
}

fn float(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn assert_plot(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    match path.extension().and_then(|e| e.to_str()) {
        Some("png") => assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a PNG",
            path.display()
        ),
        Some("svg") => assert!(
            String::from_utf8_lossy(&bytes).contains("<svg"),
            "{} is not an SVG",
            path.display()
        ),
        other => panic!("unexpected plot type {other:?}"),
    }
}

/// Per-cell KV bytes are the same for every sequence of one model, so a
/// sequence of `cells` cells holds exactly `cells / full_cells` of the full
/// cache's bytes.
fn assert_bytes_scale(full_cells: u64, full_bytes: u64, cells: u64, bytes: u64) {
    assert_eq!(
        bytes * full_cells,
        full_bytes * cells,
        "{bytes} B for {cells} cells vs {full_bytes} B for {full_cells}"
    );
}

#[test]
fn eval_writes_records_tables_and_heatmaps() {
    let dir = out_dir("eval");
    let stdout = succeed(
        "eval",
        &[
            "--tasks",
            "passkey,multivalue",
            "--lengths",
            "300",
            "--depths",
            "0.2,0.8",
            "--methods",
            "full,snapkv,streaming,snapkv:lookahead=4,snapkv:value=norm",
            "--budgets",
            "64",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    assert!(
        stdout.contains("accuracy (") && stdout.contains("fidelity to the full cache"),
        "{stdout}"
    );
    assert!(
        stdout.contains("where the kept prefix cells went"),
        "the cell shares table is printed: {stdout}"
    );
    assert!(
        stdout.contains("KL after"),
        "the look-ahead table compares KL after the look-ahead: {stdout}"
    );

    let report = json(&dir.join("eval.json"));
    let records = report["records"].as_array().unwrap();
    // 2 tasks × 2 depths × (full + 4 methods at one budget).
    assert_eq!(records.len(), 2 * 2 * 5);
    let csv = std::fs::read_to_string(dir.join("eval.csv")).unwrap();
    assert!(csv.starts_with("task,"), "{csv}");
    // Answers may hold line breaks (quoted), so count the lines that start a record.
    let rows = csv
        .lines()
        .filter(|l| l.starts_with("passkey,") || l.starts_with("multivalue,"));
    assert_eq!(rows.count(), records.len(), "one CSV row per record");

    for prompt in records.chunks(5) {
        let full = &prompt[0];
        assert_eq!(full["method"], "full");
        assert!(full["budget"].is_null());
        assert_eq!(uint(full, "cells"), uint(full, "prompt_tokens"));
        assert_eq!(float(full, "mean_kl"), 0.0, "the full cache is its own reference");
        assert_eq!(float(full, "top1"), 1.0);
        // Multi-value has distractors (other labels' numbers), passkey none.
        let has_distractors = full["task"] == "multivalue";
        for r in prompt {
            assert_eq!(!r["other_needles_kept"].is_null(), has_distractors, "{r}");
            assert_eq!(!r["distractors_in_answer"].is_null(), has_distractors, "{r}");
            if has_distractors {
                let others = float(r, "other_needles_kept");
                assert!((0.0..=1.0).contains(&others), "{r}");
                assert!(uint(r, "distractors_in_answer") <= 4, "{r}");
            }
        }
        if has_distractors {
            assert_eq!(
                float(full, "other_needles_kept"),
                1.0,
                "the full cache keeps every needle"
            );
        }
        // Where the kept prefix cells went: shares that add up to one; the
        // full cache keeps them all and has none; streaming keeps the 4
        // sink cells of its BUDGET - 32 prefix cells.
        assert!(full["cell_shares"].is_null(), "{full}");
        for r in &prompt[1..] {
            let shares = &r["cell_shares"];
            let parts = ["sink", "asked", "others", "request", "filler"].map(|k| float(shares, k));
            assert!(parts.iter().all(|p| (0.0..=1.0).contains(p)), "{r}");
            assert!((parts.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{r}");
            if !has_distractors {
                assert_eq!(float(shares, "others"), 0.0, "{r}");
            }
            if r["method"] == "streaming" {
                assert_eq!(float(shares, "sink"), 4.0 / (BUDGET - 32) as f64, "{r}");
            }
        }
        for r in &prompt[1..] {
            assert_eq!(
                (&r["task"], &r["depth"], &r["seed"]),
                (&full["task"], &full["depth"], &full["seed"])
            );
            assert_eq!(uint(r, "budget"), BUDGET);
            assert_eq!(uint(r, "cells"), BUDGET);
            assert_bytes_scale(
                uint(full, "cells"),
                uint(full, "kv_bytes"),
                uint(r, "cells"),
                uint(r, "kv_bytes"),
            );
            let score = float(r, "score");
            assert!((0.0..=1.0).contains(&score), "{r}");
            assert!(
                float(r, "mean_kl") >= 0.0 && float(r, "mean_kl") <= float(r, "max_kl"),
                "{r}"
            );
            let per_position: Vec<f64> = r["kl_per_position"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(per_position.len() as u64, uint(r, "kl_positions"), "{r}");
            let mean = per_position.iter().sum::<f64>() / per_position.len() as f64;
            assert!(
                (mean - float(r, "mean_kl")).abs() < 1e-9,
                "mean_kl is the mean of kl_per_position: {r}"
            );
            let lookahead = uint(r, "lookahead");
            assert_eq!(lookahead, if r["method"] == "snapkv:lookahead=4" { 4 } else { 0 });
        }
    }
    for task in ["passkey", "multivalue"] {
        for method in [
            "full",
            "snapkv-64",
            "streaming-64",
            "snapkv_lookahead_4-64",
            "snapkv_value_norm-64",
        ] {
            for ext in ["svg", "png"] {
                assert_plot(&dir.join(format!("heatmap-builtin-{task}-{method}.{ext}")));
            }
        }
    }
}

#[test]
fn eval_over_several_budgets_plots_accuracy_against_the_budget() {
    let dir = out_dir("eval-budgets");
    let tables = succeed(
        "eval",
        &[
            "--tasks",
            "multikey",
            "--lengths",
            "300",
            "--depths",
            "0.5",
            "--methods",
            "full,snapkv,streaming",
            "--budgets",
            "96,48",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    let saved = std::fs::read_to_string(dir.join("table.txt")).unwrap();
    assert_eq!(saved.trim(), tables.trim(), "table.txt holds the printed tables");
    let report = json(&dir.join("eval.json"));
    let records = report["records"].as_array().unwrap();
    assert_eq!(
        records.len(),
        1 + 2 * 2,
        "the full cache, then two methods at two budgets"
    );
    let kept = |budget: u64| {
        let r = records
            .iter()
            .find(|r| r["method"] == "snapkv" && r["budget"].as_u64() == Some(budget))
            .unwrap();
        assert_eq!(uint(r, "cells"), budget);
        float(r, "needle_kept")
    };
    // The top 64 positions of a head's scores include its top 16, so the
    // larger budget keeps every needle token the smaller one keeps.
    assert!(kept(96) >= kept(48), "{} < {}", kept(96), kept(48));
    for ext in ["svg", "png"] {
        assert_plot(&dir.join(format!("budgets-builtin-multikey.{ext}")));
    }

    // --replot rebuilds the same tables and the plots from eval.json alone,
    // whatever the command line says about tasks, methods or budgets.
    let plots = ["budgets-builtin-multikey.svg", "heatmap-builtin-multikey-snapkv-48.png"];
    for plot in plots {
        std::fs::remove_file(dir.join(plot)).unwrap();
    }
    let replotted = succeed(
        "eval",
        &[
            "--replot",
            "--tasks",
            "passkey",
            "--budgets",
            "256",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    assert_eq!(replotted, tables, "the replotted tables differ from the run's");
    let rewritten = std::fs::read_to_string(dir.join("table.txt")).unwrap();
    assert_eq!(rewritten, saved, "--replot rewrites the same table.txt");
    for plot in plots {
        assert_plot(&dir.join(plot));
    }
    std::fs::write(dir.join("eval.json"), "{}").unwrap();
    let err = fail("eval", &["--replot", "--out", dir.to_str().unwrap()]);
    assert!(err.contains("not an eval report"), "{err}");
}

/// The question-agnostic protocol: one compression per document and
/// method, every question about the document answered from it.
#[test]
fn question_agnostic_eval_answers_every_question_from_one_compression() {
    let dir = out_dir("eval-agnostic");
    const METHODS: [&str; 6] = [
        "full",
        "snapkv",
        "keydiff",
        "reconstruct",
        // Methods under trial (snapkv_cli::trial), through the same engine:
        // the last two select from the reconstruction scores the first
        // recorded.
        "reconstruct-shared",
        "reconstruct-surprisal-half",
    ];
    let methods = METHODS.join(",");
    let args = [
        "--protocol",
        "question-agnostic",
        "--tasks",
        "passkey,multikey",
        "--lengths",
        "300",
        "--depths",
        "0.5",
        "--methods",
        &methods,
        "--budgets",
        "64",
        "--out",
        dir.to_str().unwrap(),
    ];
    let out = snapkv("eval", &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Two documents, each scored once by reconstruction and twice reused.
    assert_eq!(stderr.matches("token surprisal in").count(), 2, "{stderr}");
    assert_eq!(
        stderr.matches("scores of an earlier branch reused").count(),
        4,
        "{stderr}"
    );
    assert!(stdout.contains("accuracy (question-agnostic;"), "{stdout}");
    let report = json(&dir.join("eval.json"));
    assert_eq!(report["protocol"], "question-agnostic");
    let records = report["records"].as_array().unwrap();
    // Passkey asks 1 question, multi-key 4: (1 + 4) × 6 methods.
    assert_eq!(records.len(), 5 * METHODS.len());
    for (task, questions) in [("passkey", 1u64), ("multikey", 4)] {
        for method in METHODS {
            let rs: Vec<&Value> = records
                .iter()
                .filter(|r| r["task"] == task && r["method"] == method)
                .collect();
            let asked: Vec<u64> = rs.iter().map(|r| uint(r, "question")).collect();
            assert_eq!(asked, (0..questions).collect::<Vec<_>>(), "{task} {method}");
            for r in &rs {
                assert_eq!(r["protocol"], "question-agnostic");
                // One cache for every question: as many cells each time.
                assert_eq!(uint(r, "cells"), uint(rs[0], "cells"), "{r}");
                if method == "full" {
                    assert_eq!(float(r, "mean_kl"), 0.0, "the full cache is its own reference: {r}");
                } else {
                    assert_eq!(uint(r, "cells"), BUDGET, "{r}");
                }
            }
            // Different questions, different expected answers.
            let mut expected: Vec<String> = rs.iter().map(|r| r["expected"].to_string()).collect();
            expected.dedup();
            assert_eq!(expected.len() as u64, questions, "{task} {method}");
        }
    }
    let err = fail(
        "eval",
        &[
            "--protocol",
            "question-agnostic",
            "--methods",
            "full,snapkv:lookahead=4",
        ],
    );
    assert!(err.contains("question-agnostic"), "{err}");
}

#[test]
fn eval_refuses_bad_settings() {
    let err = fail("eval", &["--budgets", "16", "--window", "32"]);
    assert!(err.contains("budget"), "{err}");
    let err = fail("eval", &["--methods", "snapkv:kernel=4"]);
    assert!(err.contains("kernel"), "{err}");
    let err = fail("eval", &["--methods", "full,surprisal"]);
    assert!(err.contains("question-agnostic"), "{err}");
    let err = fail("eval", &["--preset", "fast"]);
    assert!(err.contains("`default`, `facts` or `reconstruct`"), "{err}");
    let err = fail("eval", &["--methods", "snapkv:preset=fast"]);
    assert!(err.contains("preset") && err.contains("`facts`"), "{err}");
    // A method's options that only the whole configuration can refuse (no
    // pooling with the default forward reach) are refused before the first
    // prompt is evaluated, in both protocols, not after minutes of work.
    for protocol in ["query-aware", "question-agnostic"] {
        let dir = out_dir(&format!("eval-refused-{protocol}"));
        let err = fail(
            "eval",
            &[
                "--protocol",
                protocol,
                "--tasks",
                "passkey",
                "--lengths",
                "300",
                "--depths",
                "0.5",
                "--methods",
                "full,snapkv,snapkv:kernel=1",
                "--budgets",
                "64",
                "--out",
                dir.to_str().unwrap(),
            ],
        );
        assert!(err.contains("pool_align") && err.contains("kernel is 1"), "{err}");
        assert!(
            !err.contains("prefill"),
            "refused only after evaluating a prompt:\n{err}"
        );
    }
}

#[test]
fn the_facts_preset_is_its_spelled_out_options() {
    const SPELLED: &str = "snapkv:queries=max:kernel=7:align=trailing:value=norm:pool=max";
    let run = |name: &str, extra: &[&str], methods: &str| {
        let dir = out_dir(name);
        let mut args = vec![
            "--tasks",
            "multivalue",
            "--lengths",
            "300",
            "--depths",
            "0.5",
            "--budgets",
            "64",
            "--methods",
            methods,
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--out", dir.to_str().unwrap()]);
        succeed("eval", &args);
        let report = json(&dir.join("eval.json"));
        report["records"].as_array().unwrap().clone()
    };
    let by_method = run("preset-method", &[], &format!("snapkv,snapkv:preset=facts,{SPELLED}"));
    let by_run = run("preset-run", &["--preset", "facts"], "snapkv");
    let (default, preset, spelled, run_preset) = (&by_method[0], &by_method[1], &by_method[2], &by_run[0]);
    for r in [preset, run_preset] {
        assert_eq!(r["answer"], spelled["answer"], "{r}");
        assert_eq!(float(r, "mean_kl"), float(spelled, "mean_kl"), "{r}");
        assert_eq!(r["cell_shares"], spelled["cell_shares"], "{r}");
    }
    assert_ne!(
        default["cell_shares"], spelled["cell_shares"],
        "the defaults keep other cells than the preset, so the comparison above can fail"
    );
}

/// A bench point's overhead is observe + score + select + compact + draft
/// over the prefill.
fn assert_overhead_is_its_parts(p: &Value) {
    let parts = float(p, "observe_seconds")
        + float(p, "score_seconds")
        + float(p, "select_seconds")
        + float(p, "compact_seconds")
        + float(p, "draft_seconds");
    let overhead = float(p, "overhead_fraction");
    assert!(
        (overhead - parts / float(p, "prefill_seconds")).abs() < 1e-9,
        "overhead is the parts over the prefill: {p}"
    );
}

/// A draft's decoding is part of what compression costs, on both paths.
#[test]
fn bench_counts_a_draft_in_the_overhead() {
    let dir = out_dir("bench-draft");
    let table = succeed(
        "bench",
        &[
            "--lengths",
            "300",
            "--budget",
            "64",
            "-n",
            "4",
            "--draft",
            "4",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    assert!(table.contains("draft at"), "{table}");
    let report = json(&find(&dir, "bench-", ".json"));
    let p = &report["points"].as_array().unwrap()[0];
    assert_eq!(uint(p, "draft_tokens"), 4, "{p}");
    assert!(float(p, "draft_seconds") > 0.0, "{p}");
    assert_overhead_is_its_parts(p);
    assert!(float(p, "hook_overhead_fraction") > 0.0, "{p}");
}

#[test]
fn bench_reports_both_caches_and_the_fresh_prompt() {
    let dir = out_dir("bench");
    let table = succeed(
        "bench",
        &[
            "--lengths",
            "300,500",
            "--budget",
            "64",
            "-n",
            "4",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    let report = json(&find(&dir, "bench-", ".json"));
    assert_eq!(uint(&report["fresh"], "cells"), BUDGET);
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for p in points {
        assert_eq!(uint(p, "cells_full"), uint(p, "prompt_tokens"));
        assert_eq!(uint(p, "cells_compressed"), BUDGET);
        assert_bytes_scale(
            uint(p, "cells_full"),
            uint(p, "kv_bytes_full"),
            BUDGET,
            uint(p, "kv_bytes_compressed"),
        );
        let ratio = float(p, "kv_ratio");
        assert!(
            (ratio - uint(p, "cells_full") as f64 / BUDGET as f64).abs() < 1e-9,
            "{p}"
        );
        for key in [
            "prefill_tokens_per_second",
            "decode_full_tokens_per_second",
            "decode_compressed_tokens_per_second",
        ] {
            assert!(float(p, key) > 0.0, "{key}: {p}");
        }
        assert_overhead_is_its_parts(p);
        assert_eq!(uint(p, "draft_tokens"), 0);
    }
    assert_plot(&find(&dir, "decode-", ".svg"));
    assert_plot(&find(&dir, "decode-", ".png"));

    // --replot prints the same table and redraws the plot from the JSON.
    let png = find(&dir, "decode-", ".png");
    std::fs::remove_file(&png).unwrap();
    let replotted = succeed("bench", &["--replot", "--out", dir.to_str().unwrap()]);
    assert_eq!(replotted, table, "the replotted table differs from the run's");
    assert_plot(&png);
}

#[test]
fn fidelity_compares_evictions_and_quantized_caches() {
    let dir = out_dir("fidelity");
    let table = succeed(
        "fidelity",
        &[
            "--length",
            "300",
            "--budgets",
            "64",
            "-n",
            "8",
            "--methods",
            "snapkv,streaming",
            "--quant",
            "q8_0",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    let saved = std::fs::read_to_string(dir.join("table.txt")).unwrap();
    assert_eq!(saved.trim(), table.trim(), "table.txt holds the printed table");
    assert!(saved.contains("q8_0") && saved.contains("streaming"), "{saved}");
    let report = json(&find(&dir, "fidelity-", ".json"));
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["cache"].as_str().unwrap().to_owned(),
                r["method"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("f16", "full"),
        ("f16", "snapkv"),
        ("f16", "streaming"),
        ("q8_0", "full"),
    ];
    assert_eq!(names, expected.map(|(c, m)| (c.to_owned(), m.to_owned())));
    let full = &rows[0];
    assert_eq!(float(full, "mean_kl"), 0.0);
    assert_eq!(float(full, "top1"), 1.0);
    assert_eq!(uint(full, "cells"), uint(&report, "prompt_tokens"));
    for r in &rows[1..3] {
        assert_eq!(uint(r, "cells"), BUDGET);
        assert_bytes_scale(uint(full, "cells"), uint(full, "kv_bytes"), BUDGET, uint(r, "kv_bytes"));
    }
    let q8 = &rows[3];
    assert_eq!(
        uint(q8, "cells"),
        uint(full, "cells"),
        "a quantized cache evicts nothing"
    );
    assert!(
        uint(q8, "kv_bytes") < uint(full, "kv_bytes") / 3 * 2,
        "q8_0 holds about half of f16's bytes: {q8}"
    );
    for r in rows {
        assert_eq!(uint(r, "positions"), 8, "{r}");
        assert!(
            float(r, "mean_kl") >= 0.0 && float(r, "mean_kl") <= float(r, "max_kl"),
            "{r}"
        );
    }
}

#[test]
fn demo_prints_one_row_per_cache() {
    let stdout = succeed("demo", &["--length", "300", "--budget", "64", "-n", "8"]);
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("full ") || l.starts_with("snapkv @ 64") || l.starts_with("streaming @ 64"))
        .collect();
    assert_eq!(rows.len(), 3, "{stdout}");
    for row in &rows[1..] {
        assert!(
            row.split_whitespace().any(|w| w == "64"),
            "a compressed cache holds 64 cells: {row}"
        );
    }
}

#[test]
fn capacity_fits_more_compressed_sequences_and_asks_each_one() {
    let dir = out_dir("capacity");
    let stdout = succeed(
        "capacity",
        &[
            "--cells",
            "2048",
            "--length",
            "300",
            "--budget",
            "64",
            "--n-seq",
            "64",
            "-n",
            "4",
            "--out",
            dir.to_str().unwrap(),
        ],
    );
    assert!(stdout.contains("right answers"), "{stdout}");
    let report = json(&find(&dir, "capacity-", ".json"));
    let modes = report["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2);
    let (full, compressed) = (&modes[0], &modes[1]);
    let p_max = uint(&report, "prompt_tokens_max");
    // Full prompts fill the context: the next one did not fit.
    assert!(
        uint(full, "sequences") >= 1 && (uint(full, "sequences") + 1) * p_max > 2048,
        "{full}"
    );
    assert_eq!(uint(compressed, "cells_per_sequence"), BUDGET);
    // Each compressed sequence leaves room for (2048 - prompt) / 64 more.
    assert!(uint(compressed, "sequences") >= (2048 - p_max) / BUDGET, "{compressed}");
    assert!(uint(compressed, "sequences") > 2 * uint(full, "sequences"), "{modes:?}");
    for m in modes {
        assert!(m["stopped_by"].as_str().unwrap().contains("no KV slot"), "{m}");
        assert_eq!(
            uint(m, "answers_checked"),
            uint(m, "sequences"),
            "every sequence that fitted was asked: {m}"
        );
        assert!(uint(m, "answers_right") <= uint(m, "answers_checked"));
    }
}

#[test]
fn capacity_refuses_a_lookahead() {
    let err = fail("capacity", &["--method", "snapkv:lookahead=8"]);
    assert!(err.contains("lookahead"), "{err}");
}

/// `snapkv grid` draws both protocols of two runs: a row per method and
/// budget whose ratio and accuracy are the records' (recomputed here from
/// eval.json), and a chart per protocol.
#[test]
fn grid_reports_accuracy_against_ratio_per_protocol_from_the_runs() {
    let runs = out_dir("grid-runs");
    let (agnostic, aware, out) = (runs.join("agnostic"), runs.join("aware"), runs.join("grid"));
    for (dir, protocol) in [(&agnostic, "question-agnostic"), (&aware, "query-aware")] {
        succeed(
            "eval",
            &[
                "--protocol",
                protocol,
                "--tasks",
                "passkey,multikey",
                "--lengths",
                "300",
                "--depths",
                "0.5",
                "--methods",
                "full,snapkv,random",
                "--budgets",
                "64,128",
                "--out",
                dir.to_str().unwrap(),
            ],
        );
    }
    let runs_arg = format!("{},{}", agnostic.display(), aware.display());
    // `grid` reads reports: it takes no model.
    let grid = |runs: &str| {
        Command::new(env!("CARGO_BIN_EXE_snapkv"))
            .args(["grid", "--runs", runs, "--out", out.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let done = grid(&runs_arg);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let table = std::fs::read_to_string(out.join("grid.txt")).unwrap();
    for (dir, protocol) in [(&agnostic, "question-agnostic"), (&aware, "query-aware")] {
        for ext in ["svg", "png"] {
            assert!(
                out.join(format!("grid-{protocol}.{ext}")).is_file(),
                "grid-{protocol}.{ext}"
            );
        }
        let section: Vec<&str> = table
            .split("\n\n")
            .find(|s| s.starts_with(&format!("{protocol}:")))
            .unwrap_or_else(|| panic!("no {protocol} section in\n{table}"))
            .lines()
            .skip(2)
            .collect();
        // full, then snapkv and random at two budgets each.
        assert_eq!(section.len(), 5, "{section:#?}");
        let report = json(&dir.join("eval.json"));
        let records = report["records"].as_array().unwrap();
        for row in &section {
            let cols: Vec<&str> = row.split_whitespace().collect();
            let (method, budget) = (cols[0], cols[1].parse::<u64>().ok());
            let of: Vec<&Value> = records
                .iter()
                .filter(|r| r["method"] == method && r["budget"].as_u64() == budget)
                .collect();
            let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
            let ratio = mean(
                of.iter()
                    .map(|r| budget.map_or(0.0, |b| 1.0 - b as f64 / float(r, "prompt_tokens")))
                    .collect(),
            );
            let accuracy = mean(
                ["passkey", "multikey"]
                    .iter()
                    .map(|t| {
                        mean(
                            of.iter()
                                .filter(|r| r["task"] == *t)
                                .map(|r| 100.0 * float(r, "score"))
                                .collect(),
                        )
                    })
                    .collect(),
            );
            assert_eq!(cols[2], format!("{ratio:.3}"), "{row}");
            assert_eq!(cols[3], format!("{accuracy:.1}%"), "{row}");
        }
    }
    // A run that repeats the question-agnostic run's answers (scored 0
    // here, so that counting them would move every accuracy) adds nothing:
    // each answer counts once, as the first run scored it.
    let repeat = runs.join("repeat");
    std::fs::create_dir_all(&repeat).unwrap();
    let mut report = json(&agnostic.join("eval.json"));
    let n_records = report["records"].as_array().unwrap().len();
    for r in report["records"].as_array_mut().unwrap() {
        r["score"] = Value::from(0.0);
    }
    std::fs::write(repeat.join("eval.json"), serde_json::to_vec(&report).unwrap()).unwrap();
    let with_repeat = grid(&format!(
        "{},{},{}",
        agnostic.display(),
        repeat.display(),
        aware.display()
    ));
    assert!(
        with_repeat.status.success(),
        "{}",
        String::from_utf8_lossy(&with_repeat.stderr)
    );
    let said = String::from_utf8_lossy(&with_repeat.stdout);
    assert!(
        said.contains(&format!(
            "{n_records} records answer a question an earlier run already answered"
        )),
        "{said}"
    );
    assert_eq!(std::fs::read_to_string(out.join("grid.txt")).unwrap(), table);
    let refused = grid(out.to_str().unwrap());
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("eval.json"), "{err}");
}
