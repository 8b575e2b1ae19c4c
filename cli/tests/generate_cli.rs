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

/// A document compressed before its question (`reconstruct`) and saved with
/// `--save-state` answers a question asked later from the file, which is a
/// fraction of the full cache's; the file is llama.cpp's own sequence state.
#[test]
fn cli_saves_a_compressed_document_and_answers_a_later_question_from_the_file() {
    let _g = heavy();
    let dir = std::env::temp_dir().join(format!("snapkv-cli-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let doc = dir.join("doc.txt");
    std::fs::write(&doc, passkey_document(80, 58213)).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapkv"))
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .args(["generate", "--chat", "-t", "2"])
            .args(args)
            .output()
            .expect("snapkv runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {stderr}");
        (String::from_utf8_lossy(&out.stdout).into_owned(), stderr)
    };
    let (full, compressed) = (dir.join("full.kv"), dir.join("compressed.kv"));
    let doc = doc.to_str().unwrap();
    run(&["-f", doc, "-n", "0", "--save-state", full.to_str().unwrap()]);
    let (_, saved) = run(&[
        "-f",
        doc,
        "-n",
        "0",
        "--snapkv",
        "--method",
        "reconstruct",
        "--budget",
        "256",
        "--save-state",
        compressed.to_str().unwrap(),
    ]);
    assert!(saved.contains("as 256 cells to"), "{saved}");
    let (full_bytes, small_bytes) = (
        std::fs::metadata(&full).unwrap().len(),
        std::fs::metadata(&compressed).unwrap().len(),
    );
    assert!(small_bytes * 4 < full_bytes, "{small_bytes} vs {full_bytes} bytes");

    let (answer, loaded) = run(&[
        "--load-state",
        compressed.to_str().unwrap(),
        "-n",
        "16",
        "-p",
        "What is the pass key? Answer with the number only.",
    ]);
    assert!(answer.contains("58213"), "answer: {answer}\n{loaded}");
    assert!(loaded.contains("256 cells"), "{loaded}");
    // Loading is refused with a clear error for what is not a state file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapkv"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["generate", "--load-state", doc, "-p", "x"])
        .output()
        .expect("snapkv runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a llama.cpp sequence state file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
