//! `libsnapkv_preload.so` inside the pinned tree's own, unmodified
//! programs: llama-server driven over HTTP on loopback, and
//! llama-completion, built by llama.cpp's CMake with shared libraries
//! (`scripts/build-llama-tools.sh`, reused once built), with the default
//! model.
//!
//! Each check reads what the host itself reports: the answer, the server's
//! `timings`/`usage` (prompt tokens taken from its cache), and the
//! interposer's lines on the host's stderr.
//!
//! The tests run one at a time (`heavy()`): each host runs the model on two
//! threads, and two of them side by side on a two-core machine took 81 s
//! where one after the other took 68 s (llama-cli and llama-completion).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::{heavy, llama_tools, passkey_document, repo_path, QWEN};

/// The pinned tree's programs, built on first use.
fn tools() -> PathBuf {
    llama_tools().join("bin")
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
            "SNAPKV_METHOD",
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
    let (doc_a, doc_b) = (passkey_document(120, key_a), passkey_document(124, key_b));
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
    let _one_at_a_time = heavy();
    serve_two_slots("per-slot", &[]);
}

#[test]
fn llama_server_with_a_unified_cache() {
    let _one_at_a_time = heavy();
    serve_two_slots("unified", &["--kv-unified"]);
}

/// With the preload but no `SNAPKV_*` variable, or with an invalid one
/// (one line at start-up), the server answers byte for byte as without it.
/// `SNAPKV_METHOD=reconstruct`: the prompt is compressed by having the
/// model repeat it (no question involved), once; a follow-up turn that asks
/// about another fact of the document reuses the compressed cells and is
/// answered from them.
#[test]
fn llama_server_with_the_question_agnostic_method() {
    let _one_at_a_time = heavy();
    let server = Server::start(
        "reconstruct",
        true,
        &[("SNAPKV_BUDGET", "512"), ("SNAPKV_METHOD", "reconstruct")],
        &["-c", "8192", "-np", "1"],
    );
    let (key, code) = (40917u32, 7263u32);
    // ~1,500 tokens: the method evaluates the prompt twice (the repeat), so
    // this test is kept shorter than the two-slot ones.
    let doc = passkey_document(60, key).replacen("\n\n", &format!("\n\nThe door code is {code}.\n\n"), 1);
    let first = vec![user(format!("{doc}\n\nWhat is the pass key?"))];
    let r1 = server.chat(&json!(first));
    assert!(prompt_tokens(&r1) > 1400, "{r1}");
    assert!(answer(&r1).contains(&key.to_string()), "answered {:?}", answer(&r1));
    let lines = server.compressions();
    assert!(
        lines.len() == 1 && lines[0].contains(" -> 512 cells per KV head") && lines[0].contains("reconstruct"),
        "one reconstruct compression:\n{}",
        server.log_text()
    );

    let mut turn = first.clone();
    turn.push(json!({"role": "assistant", "content": answer(&r1)}));
    turn.push(user("Thank you. What is the door code? Digits only.".into()));
    let r2 = server.chat(&json!(turn));
    assert!(answer(&r2).contains(&code.to_string()), "answered {:?}", answer(&r2));
    assert!(
        cached_tokens(&r2) >= prompt_tokens(&r1),
        "the follow-up turn evaluated the conversation again: {} of {} prompt tokens cached",
        cached_tokens(&r2),
        prompt_tokens(&r2)
    );
    assert_eq!(server.compressions().len(), 1, "a compressed prompt is compressed once");
}

#[test]
fn without_variables_or_with_invalid_ones_the_preload_changes_nothing() {
    let _one_at_a_time = heavy();
    let messages = json!([user(format!("{}\n\nWhat is the pass key?", passkey_document(12, 4417)))]);
    // (name, preloaded, environment)
    type Run<'a> = (&'a str, bool, &'a [(&'a str, &'a str)]);
    let runs: [Run; 3] = [
        ("plain", false, &[]),
        ("passthrough", true, &[]),
        ("invalid", true, &[("SNAPKV_BUDGET", "lots")]),
    ];
    let texts: Vec<String> = runs
        .iter()
        .map(|&(name, preloaded, env)| {
            let server = Server::start(name, preloaded, env, &["-c", "4096"]);
            let r = server.chat(&messages);
            assert!(server.compressions().is_empty());
            let notes: Vec<String> = server
                .log_text()
                .lines()
                .filter(|l| l.starts_with("snapkv:"))
                .map(str::to_string)
                .collect();
            if env.is_empty() {
                assert!(notes.is_empty(), "{notes:?}");
            } else {
                assert_eq!(notes.len(), 1, "{notes:?}");
                assert!(
                    notes[0].contains("SNAPKV_BUDGET=\"lots\"")
                        && notes[0].ends_with("passing through (no compression)"),
                    "{}",
                    notes[0]
                );
            }
            serde_json::to_string(&r["choices"]).unwrap()
        })
        .collect();
    assert_eq!(texts[0], texts[1]);
    assert_eq!(texts[0], texts[2]);
}

/// llama-server's host-memory prompt cache (`--cache-ram`, on by
/// default): a compressed slot saved when another prompt takes the slot,
/// and restored for a request on the same document with another question,
/// is still known to be compressed, so the request is evaluated again
/// rather than reusing the restored compressed cells as its prefix.
#[test]
fn a_compressed_prompt_restored_from_the_ram_cache_is_not_reused_as_a_prefix() {
    let _one_at_a_time = heavy();
    let server = Server::start(
        "cache-ram",
        true,
        &[("SNAPKV_BUDGET", "256")],
        &["-c", "8192", "-np", "1", "--cache-ram", "1024", "-lv", "4"],
    );
    let (key_a, key_b) = (19283u32, 55410u32);
    let doc_a = passkey_document(60, key_a);
    let ra = server.chat(&json!([user(format!("{doc_a}\n\nWhat is the pass key?"))]));
    assert!(answer(&ra).contains(&key_a.to_string()), "answered {:?}", answer(&ra));
    let rb = server.chat(&json!([user(format!(
        "{}\n\nWhat is the pass key?",
        passkey_document(60, key_b)
    ))]));
    assert!(answer(&rb).contains(&key_b.to_string()), "answered {:?}", answer(&rb));
    let r2 = server.chat(&json!([user(format!(
        "{doc_a}\n\nRepeat the pass key from the text, digits only."
    ))]));
    let log = server.log_text();
    assert!(
        log.contains("found better prompt"),
        "the server did not restore document A from its RAM cache, so this test tests nothing:\n{log}"
    );
    assert!(answer(&r2).contains(&key_a.to_string()), "answered {:?}", answer(&r2));
    assert!(
        cached_tokens(&r2) < 256,
        "the restored compressed prompt was reused as a {}-token prefix",
        cached_tokens(&r2)
    );
    assert_eq!(server.compressions().len(), 3, "{log}");
}

/// llama-completion with `-f long.txt`: the compressed answer and the
/// compression line.
#[test]
fn llama_completion_compresses_a_long_file() {
    let _one_at_a_time = heavy();
    let key = 52961u32;
    let file = repo_path("target/preload-test-long.txt");
    // The default model's chat format, written out: llama-completion
    // evaluates the file as it is, in chunks of `-b` tokens (1,024: the
    // ~1,500-token file takes two).
    let chat = format!(
        "<|im_start|>user\n{}\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n",
        passkey_document(60, key)
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
            "-b",
            "1024",
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

/// A ggml-rpc-server on loopback; killed on drop.
struct RpcServer {
    child: Child,
    port: u16,
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The model and its KV cache on an `ggml-rpc-server` (llama.cpp's
/// distributed backend) on loopback: the passkey answered, the cells
/// reduced, the state transfer's cost in the line.
#[test]
fn llama_server_with_the_model_on_an_rpc_server() {
    let _one_at_a_time = heavy();
    let port = free_port();
    let child = Command::new(tools().join("ggml-rpc-server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string(), "-t", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ggml-rpc-server");
    let rpc = RpcServer { child, port };
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", rpc.port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ggml-rpc-server did not listen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let endpoint = format!("127.0.0.1:{}", rpc.port);
    let server = Server::start(
        "rpc",
        true,
        &[("SNAPKV_BUDGET", "256")],
        &["-c", "4096", "--rpc", &endpoint, "-ngl", "99", "-lv", "4"],
    );
    let key = 71530u32;
    let r = server.chat(&json!([user(format!(
        "{}\n\nWhat is the pass key?",
        passkey_document(40, key)
    ))]));
    assert!(answer(&r).contains(&key.to_string()), "answered {:?}", answer(&r));
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("llama_kv_cache: RPC0[") && l.contains("KV buffer")),
        "the KV cache is not on the RPC server:\n{log}"
    );
    let lines = server.compressions();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(
        lines[0].contains(" -> 256 cells per KV head") && lines[0].contains("state transfer"),
        "{}",
        lines[0]
    );
}

/// The pinned tree with one field added at the end of
/// `llama_context_params` in llama.h: a llama.cpp "built from other
/// headers". Its libllama is built on first use (and reused), over the
/// ggml libraries [`llama_tools`] installed: the header change does not
/// reach ggml, and compiling ggml again took minutes of CI.
fn altered_llama() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = repo_path("target/guard-host");
        let tree = dir.join("llama.cpp");
        if !tree.join("include/llama.h").is_file() {
            std::fs::create_dir_all(&tree).unwrap();
            let vendor = repo_path("vendor/llama.cpp");
            for part in ["CMakeLists.txt", "cmake", "include", "src", "ggml", "vendor", "licenses", "LICENSE"] {
                let status = Command::new("cp").arg("-a").arg(vendor.join(part)).arg(&tree).status().unwrap();
                assert!(status.success(), "copy {part}");
            }
            let header = tree.join("include/llama.h");
            let text = std::fs::read_to_string(&header).unwrap();
            let anchor = "        struct llama_context * ctx_other;\n    };";
            assert!(text.contains(anchor), "llama.h changed: update the guard test");
            let altered = text.replacen(
                anchor,
                "        struct llama_context * ctx_other;\n\n        // added by snapkv's guard test\n        void * snapkv_guard_test;\n    };",
                1,
            );
            std::fs::write(&header, altered).unwrap();
        }
        let ggml = llama_tools().join("install");
        let build = dir.join("build");
        let mut configure = Command::new("cmake");
        configure.arg("-S").arg(&tree).arg("-B").arg(&build);
        configure.arg(format!("-DCMAKE_PREFIX_PATH={}", ggml.display()));
        configure.args([
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=ON",
            "-DLLAMA_USE_SYSTEM_GGML=ON",
            "-DLLAMA_BUILD_COMMON=OFF",
            "-DLLAMA_BUILD_TOOLS=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_OPENSSL=OFF",
        ]);
        assert!(configure.stdout(Stdio::null()).status().unwrap().success(), "configure the altered tree");
        let built = Command::new("cmake")
            .arg("--build")
            .arg(&build)
            .args(["--target", "llama", "-j", "2"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(built.success(), "build the altered libllama");
        dir
    })
}

/// Compiles tests/c/guard_host.c against `include` and links it to the
/// libllama in the first of `libs` (the others: the libraries it needs,
/// found there at link and run time).
fn guard_host(name: &str, tree: &Path, libs: &[&Path]) -> PathBuf {
    let exe = repo_path(&format!("target/guard-host/{name}"));
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    let status = Command::new("cc")
        .arg(repo_path("tests/c/guard_host.c"))
        .arg(format!("-I{}", tree.join("include").display()))
        .arg(format!("-I{}", tree.join("ggml/include").display()))
        .args(
            libs.iter()
                .flat_map(|lib| [format!("-L{}", lib.display()), format!("-Wl,-rpath,{}", lib.display())]),
        )
        // DT_RPATH, which (unlike DT_RUNPATH) also serves the libraries'
        // own dependencies: the installed libggml has no path to its
        // backends.
        .arg("-Wl,--disable-new-dtags")
        .args(["-lllama", "-o"])
        .arg(&exe)
        .status()
        .expect("run cc");
    assert!(status.success(), "compile guard_host.c ({name})");
    exe
}

/// Runs a guard_host build on `prompt` with `model`, preloaded with
/// `budget` when given.
fn run_host_with(exe: &Path, model: &str, prompt: &str, n: usize, budget: Option<&str>) -> (String, String) {
    let name = exe.file_name().unwrap().to_string_lossy();
    let file = repo_path(&format!("target/guard-host/prompt-{name}-{}.txt", budget.is_some()));
    std::fs::write(&file, prompt).unwrap();
    let mut cmd = Command::new(exe);
    cmd.arg(repo_path(model)).arg(&file).arg(n.to_string());
    cmd.env_remove("LD_PRELOAD");
    if let Some(budget) = budget {
        cmd.env("LD_PRELOAD", preload()).env("SNAPKV_BUDGET", budget);
    }
    let out = cmd.output().expect("run guard_host");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{}: {stderr}", exe.display());
    (String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

fn run_host(exe: &Path, preloaded: bool) -> (String, String) {
    run_host_with(
        exe,
        common::SMOLLM2,
        "The capital of France is",
        8,
        preloaded.then_some("64"),
    )
}

/// A program that decodes with the plain `llama_decode` API (as
/// llama.cpp's examples and bindings do) is compressed too: its prompt,
/// evaluated in one batch, from the observed window.
#[test]
fn a_program_that_calls_llama_decode_is_compressed() {
    let _one_at_a_time = heavy();
    let host = guard_host("pinned-decode", &repo_path("vendor/llama.cpp"), &[&tools()]);
    let key = 40983u32;
    let prompt = format!(
        "<|im_start|>user\n{}\n\nWhat is the pass key?<|im_end|>\n<|im_start|>assistant\n",
        passkey_document(40, key)
    );
    let (out, err) = run_host_with(&host, QWEN, &prompt, 16, Some("256"));
    assert!(out.contains(&key.to_string()), "answered {out:?}\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("snapkv: seq 0: ")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(" -> 256 cells per KV head") && lines[0].contains("window observed"),
        "{}",
        lines[0]
    );
}

/// The version guard: preloaded into a host built from the pinned llama.h
/// it acts; into one built from a llama.h whose `llama_context_params`
/// has one more field (same ggml version, same function names), it says so
/// in one line and only forwards, and the host's output is unchanged.
#[test]
fn the_version_guard_refuses_a_host_built_from_other_headers() {
    let _one_at_a_time = heavy();
    let refusal = |stderr: &str| {
        stderr
            .lines()
            .filter(|l| l.starts_with("snapkv: ") && l.ends_with("passing through (no compression)"))
            .count()
    };
    let pinned = guard_host("pinned", &repo_path("vendor/llama.cpp"), &[&tools()]);
    let (plain, _) = run_host(&pinned, false);
    let (out, err) = run_host(&pinned, true);
    assert_eq!(refusal(&err), 0, "{err}");
    assert!(err.contains("snapkv: compressing prompts to 64 cells"), "{err}");
    assert_eq!(out, plain);

    let dir = altered_llama();
    let altered = guard_host(
        "altered",
        &dir.join("llama.cpp"),
        &[&dir.join("build/bin"), &llama_tools().join("install/lib")],
    );
    let (plain, _) = run_host(&altered, false);
    let (out, err) = run_host(&altered, true);
    assert_eq!(refusal(&err), 1, "{err}");
    assert!(
        err.contains("llama_context_params") && err.contains("another llama.cpp"),
        "{err}"
    );
    assert!(!err.contains("compressing prompts"), "{err}");
    assert_eq!(out, plain, "the refused host's output changed");
}

/// Context shift (`--context-shift`) on a compressed slot: generation runs
/// past the slot's context, the server shifts (removing and moving
/// positions of the compressed sequence), and keeps serving to the end.
#[test]
fn context_shift_on_a_compressed_slot_keeps_serving() {
    let _one_at_a_time = heavy();
    let server = Server::start(
        "context-shift",
        true,
        &[("SNAPKV_BUDGET", "256")],
        &["-c", "2048", "-np", "1", "--context-shift"],
    );
    let prompt = format!(
        "<|im_start|>user\n{}\n\nWhat is the pass key? Then write a long story.<|im_end|>\n<|im_start|>assistant\n",
        passkey_document(60, 8841)
    );
    let body = json!({"prompt": prompt, "n_predict": 700, "ignore_eos": true, "temperature": 0, "seed": 1});
    let (status, text) = server.http("POST", "/completion", Some(&body)).expect("request");
    assert_eq!(status, 200, "{text}\n{}", server.log_text());
    let r: Value = serde_json::from_str(&text).unwrap();
    assert!(r["tokens_evaluated"].as_i64().unwrap_or(0) > 1400, "{r}");
    assert_eq!(r["timings"]["predicted_n"].as_i64(), Some(700), "{r}");
    let log = server.log_text();
    assert!(
        log.contains("slot context shift"),
        "the context never shifted, so this tests nothing:\n{log}"
    );
    assert_eq!(server.compressions().len(), 1, "{log}");
}

/// llama-cli (the pinned tree's chat program, built on the server's code)
/// for one turn with `-f long.txt`: the compressed answer and the line.
#[test]
fn llama_cli_compresses_a_long_file() {
    let _one_at_a_time = heavy();
    let key = 36158u32;
    let file = repo_path("target/preload-test-cli.txt");
    std::fs::write(&file, format!("{}\n\nWhat is the pass key?", passkey_document(60, key))).unwrap();
    let out = Command::new(tools().join("llama-cli"))
        .arg("-m")
        .arg(repo_path(QWEN))
        .arg("-f")
        .arg(&file)
        .args(["-n", "24", "--temp", "0", "-c", "8192", "-t", "2", "-st", "--simple-io"])
        .env("LD_PRELOAD", preload())
        .env("SNAPKV_BUDGET", "256")
        .stdin(Stdio::null())
        .output()
        .expect("run llama-cli");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let reply = stdout.rsplit("What is the pass key?").next().unwrap_or_default();
    assert!(reply.contains(&key.to_string()), "answered {reply:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("snapkv: seq ")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(" -> 256 cells per KV head"), "{}", lines[0]);
}
