//! `libsnapkv_preload.so` inside the pinned tree's own, unmodified
//! programs: llama-server driven over HTTP on loopback, and
//! llama-completion, built by llama.cpp's CMake with shared libraries
//! (`scripts/build-llama-tools.sh`, reused once built), with the default
//! model.
//!
//! Each check reads what the host itself reports: the answer, the server's
//! `timings`/`usage` (prompt tokens taken from its cache), and the
//! interposer's lines on the host's stderr.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{repo_path, QWEN};

/// The pinned tree's programs, built on first use.
fn tools() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let status = Command::new("bash")
            .arg(repo_path("scripts/build-llama-tools.sh"))
            .arg(repo_path("target/llama-tools"))
            .stdout(Stdio::null())
            .status()
            .expect("run scripts/build-llama-tools.sh");
        assert!(status.success(), "scripts/build-llama-tools.sh failed");
        repo_path("target/llama-tools/bin")
    })
}

/// `libsnapkv_preload.so`, built on first use into its own target
/// directory (the `preload` feature must not reach the normal build).
fn preload() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let dir = repo_path("target/preload");
        let status = Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "snapkv-preload", "--target-dir"])
            .arg(&dir)
            .current_dir(repo_path("."))
            .status()
            .expect("run cargo build -p snapkv-preload");
        assert!(status.success(), "building snapkv-preload failed");
        dir.join("release/libsnapkv_preload.so")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running llama-server; killed on drop.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    /// Starts llama-server with the default model, `args`, and `env`
    /// (with the preload when `preloaded`), and waits until it is ready.
    fn start(name: &str, preloaded: bool, env: &[(&str, &str)], args: &[&str]) -> Server {
        let port = free_port();
        let log = repo_path(&format!("target/preload-test-{name}.log"));
        let mut cmd = Command::new(tools().join("llama-server"));
        cmd.arg("-m")
            .arg(repo_path(QWEN))
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "-t",
                "2",
                "--no-webui",
            ])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap());
        for var in [
            "SNAPKV_BUDGET",
            "SNAPKV_WINDOW",
            "SNAPKV_PRESET",
            "SNAPKV_MIN_PROMPT",
            "SNAPKV_LOG",
            "LD_PRELOAD",
        ] {
            cmd.env_remove(var);
        }
        if preloaded {
            cmd.env("LD_PRELOAD", preload());
        }
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().expect("start llama-server");
        let server = Server { child, port, log };
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = server.http("GET", "/health", None) {
                return server;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "llama-server did not become ready:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn http(&self, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
        http(self.port, method, path, body)
    }

    /// A chat completion, greedy: the full response.
    fn chat(&self, messages: &Value) -> Value {
        let body = json!({"messages": messages, "temperature": 0, "seed": 42, "max_tokens": 24, "cache_prompt": true});
        let (status, text) = self.http("POST", "/v1/chat/completions", Some(&body)).expect("request");
        assert_eq!(status, 200, "{text}\n{}", self.log_text());
        serde_json::from_str(&text).expect("JSON response")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The interposer's compression lines.
    fn compressions(&self) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.starts_with("snapkv: seq ") && l.contains(" cells per KV head"))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(900)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let text = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, text))
}

const FILLER: &str = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// A passkey document of about `24 * reps` tokens with `key` at 40%.
fn document(reps: usize, key: u32) -> String {
    let mut s = String::from(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz \
         you about the important information there.\n\n",
    );
    for i in 0..=reps {
        if i == reps * 2 / 5 {
            s.push_str(&format!("The pass key is {key}. Remember it. {key} is the pass key. "));
        }
        if i < reps {
            s.push_str(FILLER);
        }
    }
    s
}

fn user(text: String) -> Value {
    json!({"role": "user", "content": text})
}

fn answer(r: &Value) -> String {
    r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn cached_tokens(r: &Value) -> i64 {
    r["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_i64()
        .unwrap_or(-1)
}

fn prompt_tokens(r: &Value) -> i64 {
    r["usage"]["prompt_tokens"].as_i64().unwrap_or(-1)
}

/// Two ~3,000-token passkey requests at once on two slots: both
/// compressed to 256 cells and answered; then, on the same server, the
/// same document with another question (its common prefix with the slot
/// ends inside the compressed prompt) is evaluated again, not reused, and
/// answered; and a follow-up turn reuses the compressed conversation.
fn serve_two_slots(name: &str, extra: &[&str]) {
    let server = Server::start(
        name,
        true,
        &[("SNAPKV_BUDGET", "256")],
        &[&["-c", "16384", "-np", "2"], extra].concat(),
    );
    let (key_a, key_b) = (68142u32, 30517u32);
    let (doc_a, doc_b) = (document(120, key_a), document(124, key_b));
    let ask = |doc: &str| vec![user(format!("{doc}\n\nWhat is the pass key?"))];
    let (ra, rb) = std::thread::scope(|s| {
        let a = s.spawn(|| server.chat(&json!(ask(&doc_a))));
        let b = s.spawn(|| server.chat(&json!(ask(&doc_b))));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(prompt_tokens(&ra) > 2800 && prompt_tokens(&rb) > 2800, "{ra}\n{rb}");
    assert!(
        answer(&ra).contains(&key_a.to_string()),
        "slot A answered {:?}",
        answer(&ra)
    );
    assert!(
        answer(&rb).contains(&key_b.to_string()),
        "slot B answered {:?}",
        answer(&rb)
    );
    let lines = server.compressions();
    assert_eq!(lines.len(), 2, "one compression per request:\n{}", server.log_text());
    for seq in ["snapkv: seq 0: ", "snapkv: seq 1: "] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(seq) && l.contains(" -> 256 cells per KV head")),
            "{seq}... -> 256 missing:\n{lines:#?}"
        );
    }

    // Another question on document A: the slot's prefix ends inside the
    // compressed prompt, so the server must evaluate the prompt again.
    let other = vec![user(format!(
        "{doc_a}\n\nRepeat the pass key from the text, digits only."
    ))];
    let r2 = server.chat(&json!(other));
    assert!(answer(&r2).contains(&key_a.to_string()), "answered {:?}", answer(&r2));
    assert!(
        cached_tokens(&r2) < 256,
        "the prompt reused {} compressed cells' tokens instead of being evaluated again",
        cached_tokens(&r2)
    );
    assert_eq!(
        server.compressions().len(),
        3,
        "the re-evaluated prompt is compressed again"
    );

    // A follow-up turn of that conversation: its prefix covers the whole
    // compressed prompt, so the compressed cells are reused (lossy by
    // design: the answer comes from the kept cells).
    let mut turn = other.clone();
    turn.push(json!({"role": "assistant", "content": answer(&r2)}));
    turn.push(user("Thank you. Now write the pass key once more, digits only.".into()));
    let r3 = server.chat(&json!(turn));
    assert!(answer(&r3).contains(&key_a.to_string()), "answered {:?}", answer(&r3));
    assert!(
        cached_tokens(&r3) >= prompt_tokens(&r2),
        "the follow-up turn evaluated the conversation again: {} of {} prompt tokens cached",
        cached_tokens(&r3),
        prompt_tokens(&r3)
    );
}

#[test]
fn llama_server_with_per_slot_caches() {
    serve_two_slots("per-slot", &[]);
}

#[test]
fn llama_server_with_a_unified_cache() {
    serve_two_slots("unified", &["--kv-unified"]);
}

/// With the preload but no `SNAPKV_*` variable, the server answers byte
/// for byte as without it.
#[test]
fn without_variables_the_preload_changes_nothing() {
    let messages = json!([user(format!("{}\n\nWhat is the pass key?", document(12, 4417)))]);
    let texts: Vec<String> = [false, true]
        .iter()
        .map(|&preloaded| {
            let server = Server::start(
                if preloaded { "passthrough" } else { "plain" },
                preloaded,
                &[],
                &["-c", "4096"],
            );
            let r = server.chat(&messages);
            assert!(server.compressions().is_empty());
            serde_json::to_string(&r["choices"]).unwrap()
        })
        .collect();
    assert_eq!(texts[0], texts[1]);
}

/// llama-completion with `-f long.txt`: the compressed answer and the
/// compression line.
#[test]
fn llama_completion_compresses_a_long_file() {
    let key = 52961u32;
    let file = repo_path("target/preload-test-long.txt");
    // The default model's chat format, written out: llama-completion
    // evaluates the file as it is, in 2,048-token chunks.
    let chat = format!(
        "<|im_start|>user\n{}\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n",
        document(120, key)
    );
    std::fs::write(&file, chat).unwrap();
    let out = Command::new(tools().join("llama-completion"))
        .arg("-m")
        .arg(repo_path(QWEN))
        .arg("-f")
        .arg(&file)
        .args([
            "-n",
            "16",
            "--temp",
            "0",
            "-c",
            "4096",
            "-t",
            "2",
            "-no-cnv",
            "--no-display-prompt",
        ])
        .env("LD_PRELOAD", preload())
        .env("SNAPKV_BUDGET", "256")
        .stdin(Stdio::null())
        .output()
        .expect("run llama-completion");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(&key.to_string()), "answered {stdout:?}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("snapkv: seq 0: ") && l.contains(" -> 256 cells per KV head"))
        .unwrap_or_else(|| panic!("no compression line:\n{stderr}"));
    assert!(
        line.contains("window observed"),
        "the prompt's end was observed, not evaluated again: {line}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("snapkv: seq ")).count(),
        1,
        "compressed once, after the last chunk, not after each chunk:\n{stderr}"
    );
}
