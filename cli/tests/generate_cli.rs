//! `snapkv generate` end to end: compression reported on every path, its
//! refusals, the look-ahead's tokens, and a factual answer from the default
//! model (run from the workspace root, where `models/` is).

#[path = "../../tests/common/mod.rs"]
mod common;

use common::*;
use snapkv_testing::{tiny_model_path, TinyModelSpec};

#[test]
fn cli_reports_compression_on_every_path() {
    let model = tiny_model_path(&TinyModelSpec::default()).unwrap();
    let prompt = filler(300, 24);
    for extra in [
        &[][..],
        &["--hook"][..],
        &["--observed"][..],
        &["--flash-attn", "off"][..],
        &["--lookahead", "4"][..],
        &["--lookahead", "4", "--hook"][..],
        &["--draft", "4"][..],
        &["--draft", "4", "--hook"][..],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapkv"))
            .arg("generate")
            .arg("-m")
            .arg(&model)
            .args([
                "-p", &prompt, "-n", "8", "-t", "2", "--snapkv", "--budget", "64", "--window", "16",
            ])
            .args(extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{extra:?}: {stderr}");
        assert!(stderr.contains("-> 64 cells per KV head"), "{extra:?}: {stderr}");
        assert!(stderr.contains("compression cost"), "{extra:?}: {stderr}");
        assert_eq!(
            stderr.contains("draft: 4 answer tokens"),
            extra.contains(&"--draft"),
            "{extra:?}: {stderr}"
        );
    }
    // The observed-decode hook is not given the tokens a draft needs.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapkv"))
        .arg("generate")
        .arg("-m")
        .arg(&model)
        .args(["-p", &prompt, "-n", "4", "--snapkv", "--budget", "64", "--window", "16"])
        .args(["--observed", "--draft", "4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("draft"));
    // The look-ahead's tokens are the full cache's own: with nothing
    // generated after them, the text is the uncompressed run's.
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapkv"))
            .arg("generate")
            .arg("-m")
            .arg(&model)
            .args(["-p", &prompt, "-n", "4", "-t", "2"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let full = run(&[]);
    for hook in [&[][..], &["--hook"][..]] {
        let args = [
            &["--snapkv", "--budget", "64", "--window", "16", "--lookahead", "4"][..],
            hook,
        ]
        .concat();
        assert_eq!(run(&args), full, "{args:?}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapkv"))
        .arg("generate")
        .arg("-m")
        .arg(&model)
        .args(["-p", "hello", "--snapkv", "--window", "16", "--lookahead", "16"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lookahead"));
    // Invalid settings are reported, not panicked on.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapkv"))
        .arg("generate")
        .arg("-m")
        .arg(&model)
        .args(["-p", "hello", "--snapkv", "--kernel", "4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kernel"));
}

#[test]
fn cli_answers_a_factual_question_with_the_default_model() {
    let _g = heavy();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapkv"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "generate",
            "--chat",
            "-n",
            "24",
            "-t",
            "2",
            "-p",
            "What is the capital of France? Answer in one word.",
        ])
        .output()
        .expect("snapkv runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("Paris"), "answer: {stdout}");
    assert!(
        stderr.contains("decode:") && stderr.contains("tok/s"),
        "timings: {stderr}"
    );
}
