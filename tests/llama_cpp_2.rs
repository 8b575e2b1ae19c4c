//! A program on llama-cpp-2 (examples/llama-cpp-2) with snapkv's feature
//! `llama-cpp-sys-2`: llama-cpp-2's own model, context, batch and sampler
//! types, one llama.cpp in the binary (llama-cpp-sys-2's), and the default
//! model answering a passkey from a cache compressed to 256 cells.
//!
//! The example is its own Cargo workspace (the feature must not reach this
//! one's build) with its own lock file; it is built on first use into
//! target/llama-cpp-2 and reused.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{repo_path, QWEN};

fn example() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = repo_path("target/llama-cpp-2");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "--locked", "--manifest-path"])
            .arg(repo_path("examples/llama-cpp-2/Cargo.toml"))
            .arg("--target-dir")
            .arg(&dir)
            .status()
            .expect("run cargo build for examples/llama-cpp-2");
        assert!(status.success(), "building examples/llama-cpp-2 failed");
        dir.join("release/snapkv-llama-cpp-2-example")
    })
}

/// A passkey document of about `24 * reps` tokens with `key` at 40%,
/// written to a file under target/.
fn document(name: &str, reps: usize, key: u32) -> PathBuf {
    let path = repo_path(&format!("target/llama-cpp-2-{name}.txt"));
    std::fs::write(&path, common::passkey_document(reps, key)).unwrap();
    path
}

/// Runs the example; a run that has not ended after five minutes (a hang:
/// the full prompt takes well under one) is killed and fails the test.
fn ask(document: &Path, extra: &[&str]) -> (ExitStatus, String, String) {
    let mut child = Command::new(example())
        .arg(document)
        .arg("What is the pass key?")
        .arg("--model")
        .arg(repo_path(QWEN))
        .args(["--threads", "2"])
        .args(extra)
        .env_remove("SNAPKV_BUDGET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the llama-cpp-2 example");
    let read_all = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the example did not finish in 5 minutes:\n{}", stderr.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    (status, stdout.join().unwrap(), stderr.join().unwrap())
}

/// ~3,000 tokens, evaluated in two batches by llama-cpp-2, compressed to
/// 256 cells per KV head once (after the last batch, from the window the
/// prompt's own evaluation showed), and the passkey answered.
#[test]
fn a_llama_cpp_2_program_answers_from_a_compressed_cache() {
    let key = 48613;
    let (status, stdout, stderr) = ask(&document("long", 120, key), &["--budget", "256"]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains(&key.to_string()), "answered {stdout:?}\n{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("snapkv: seq ")).collect();
    assert_eq!(lines.len(), 1, "compressed once:\n{stderr}");
    let line = lines[0];
    assert!(line.contains(" -> 256 cells per KV head"), "{line}");
    assert!(line.contains("window observed"), "{line}");
    let before: usize = line
        .trim_start_matches("snapkv: seq 0: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no cell count in {line}"));
    assert!(before > 2_500, "the whole prompt was in the cache: {line}");
}

/// Without `snapkv::linked::enable` (and no `SNAPKV_BUDGET`) every wrapper
/// only forwards: the program answers and snapkv says nothing.
#[test]
fn without_enable_the_program_runs_as_it_would_without_snapkv() {
    let key = 30577;
    let (status, stdout, stderr) = ask(&document("short", 40, key), &["--full"]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains(&key.to_string()), "answered {stdout:?}\n{stderr}");
    assert!(!stderr.contains("snapkv"), "{stderr}");
}

/// One llama.cpp in the binary: llama-cpp-sys-2's, with snapkv's wrappers
/// beside its functions (the link's `--wrap`), and no second copy from
/// snapkv's own build.
#[test]
fn the_binary_holds_one_llama_cpp_and_the_wrappers() {
    let out = Command::new("nm").arg(example()).output().expect("run nm");
    assert!(out.status.success());
    let symbols = String::from_utf8_lossy(&out.stdout);
    let defined = |name: &str| symbols.lines().filter(|l| l.ends_with(&format!(" T {name}"))).count();
    assert_eq!(defined("llama_decode"), 1, "llama_decode defined once");
    assert_eq!(defined("__wrap_llama_decode"), 1);
    assert_eq!(defined("__wrap_llama_new_context_with_model"), 1);
    // snapkv's build script built no llama.cpp of its own.
    let built = std::fs::read_dir(repo_path("target/llama-cpp-2/release/build"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("snapkv-"))
        .any(|e| e.path().join("out/lib/libllama.a").exists());
    assert!(!built, "snapkv built a llama.cpp of its own");
}
