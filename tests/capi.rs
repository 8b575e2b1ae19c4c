//! The C ABI from C and C++ (issue 4): C programs compiled and run by the
//! test suite against the libraries cargo built.
//!
//! - `c_abi_acceptance_on_tiny_model` / `..._under_valgrind`: tests/c/capi_test.c
//!   (-std=c99 -Wall -Wextra -Werror): layout drift, NULL pointers, a context
//!   without the observer, missing and empty sequences, invalid params; the
//!   KV cache is unchanged after each failure. Then under valgrind.
//! - `header_compiles_as_cxx17`: tests/c/header_cxx.cpp.
//! - `c_passkey_example_matches_rust_api`: examples/passkey.c on the default
//!   model, linked through the pkg-config file, against the Rust API's answer
//!   on the same prompt.
//! - `plugin_*`: the `dynamic-link` build (built here into
//!   `<target>/plugin`, linked to the shared libllama that
//!   scripts/build-llama-tools.sh installs with `SNAPKV_LLAMA_PREFIX`): no
//!   llama_* symbol defined in libsnapkv.so, and a host
//!   that links only libllama, dlopen()s the plugin and retrieves the passkey
//!   with the same tokens as the Rust API.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::*;
use snapkv::{Batch, Budget, ChatMessage, Compressor, FlashAttention, SnapKvConfig};
use snapkv_testing::{tiny_model_path, TinyModelSpec};

const PASSKEY: &str = "52714";
const BUDGET: usize = 256;
const MAX_ANSWER: usize = 16;
const THREADS: i32 = 2;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Scratch directory for compiled C programs and prompt files.
fn scratch() -> PathBuf {
    let dir = profile_dir().join("capi-tests");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn output_text(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command and returns its output; panics with everything it printed
/// when it fails.
fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed\n{}", output_text(&out));
    out
}

fn tool(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// `pkg-config <args> snapkv` with the .pc file in `pc_dir`.
fn pkg_config(pc_dir: &Path, args: &[&str]) -> Vec<String> {
    let out = run_ok(
        Command::new("pkg-config")
            .args(args)
            .arg("snapkv")
            .env("PKG_CONFIG_PATH", pc_dir),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// `cargo test` does not build the static library and cannot run `cargo
/// build` itself (it holds the target directory's lock), so the library
/// comes from the `cargo build --release` that the README's test command
/// runs first.
fn require_static_lib(profile: &Path) {
    let lib = profile.join("libsnapkv.a");
    assert!(
        lib.is_file(),
        "{} is missing: run `cargo build --release` before `cargo test --release`",
        lib.display()
    );
}

/// Compiler flags for the static library, from the pkg-config file that
/// scripts/snapkv-pkg-config.sh writes (so the documented two lines are
/// what the tests use).
fn static_flags() -> &'static [String] {
    static FLAGS: OnceLock<Vec<String>> = OnceLock::new();
    FLAGS.get_or_init(|| {
        let profile = profile_dir();
        require_static_lib(&profile);
        run_ok(
            Command::new("bash")
                .arg(repo().join("scripts/snapkv-pkg-config.sh"))
                .arg(&profile),
        );
        pkg_config(&profile.join("pkgconfig"), &["--cflags", "--libs"])
    })
}

/// Compiles `source` (C99 or C++17, warnings as errors) into the scratch
/// directory as `name`.
fn compile(source: &str, name: &str, flags: &[String]) -> PathBuf {
    let src = repo().join(source);
    let exe = scratch().join(name);
    let cxx = source.ends_with(".cpp");
    let mut cmd = if cxx {
        let mut c = Command::new(tool("CXX", "c++"));
        c.arg("-std=c++17");
        c
    } else {
        let mut c = Command::new(tool("CC", "cc"));
        c.arg("-std=c99");
        c
    };
    cmd.args(["-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg(format!("-I{}", repo().join("tests/c").display()))
        .arg(&src)
        .args(flags)
        .arg("-o")
        .arg(&exe);
    run_ok(&mut cmd);
    exe
}

fn tiny_model() -> PathBuf {
    tiny_model_path(&TinyModelSpec::default()).expect("tiny model written")
}

fn capi_test_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| compile("tests/c/capi_test.c", "capi_test", static_flags()))
}

#[test]
fn header_versions_match_the_crate() {
    let header = std::fs::read_to_string(repo().join("include/snapkv.h")).unwrap();
    let define = |name: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("snapkv.h lacks {name}"))
            .trim()
            .trim_matches('"')
            .to_string()
    };
    assert_eq!(define("SNAPKV_VERSION_MAJOR"), env!("CARGO_PKG_VERSION_MAJOR"));
    assert_eq!(define("SNAPKV_VERSION_MINOR"), env!("CARGO_PKG_VERSION_MINOR"));
    assert_eq!(define("SNAPKV_VERSION_PATCH"), env!("CARGO_PKG_VERSION_PATCH"));
    assert_eq!(define("SNAPKV_VERSION_STRING"), env!("CARGO_PKG_VERSION"));
    assert_eq!(define("SNAPKV_LLAMA_GGML_VERSION"), snapkv::build_info().ggml_version);
}

#[test]
fn c_abi_acceptance_on_tiny_model() {
    let out = run_ok(Command::new(capi_test_exe()).arg(tiny_model()));
    let text = output_text(&out);
    println!("{text}");
    assert!(text.contains("all C ABI checks passed"), "{text}");
    assert!(
        text.contains("caches and stats unchanged after every failure"),
        "{text}"
    );
}

#[test]
fn c_abi_acceptance_under_valgrind() {
    let exe = capi_test_exe();
    let valgrind = Command::new("valgrind").arg("--version").output();
    assert!(
        valgrind.is_ok_and(|o| o.status.success()),
        "valgrind is required for this test: run scripts/setup.sh"
    );
    let out = run_ok(
        Command::new("valgrind")
            .args([
                "--error-exitcode=1",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite",
            ])
            .arg(exe)
            .arg(tiny_model()),
    );
    let text = output_text(&out);
    println!("{text}");
    assert!(text.contains("all C ABI checks passed"), "{text}");
    assert!(text.contains("ERROR SUMMARY: 0 errors"), "{text}");
    assert!(
        text.contains("definitely lost: 0 bytes") || text.contains("All heap blocks were freed"),
        "{text}"
    );
}

#[test]
fn header_compiles_as_cxx17() {
    let exe = compile("tests/c/header_cxx.cpp", "header_cxx", static_flags());
    let out = run_ok(&mut Command::new(exe));
    let text = output_text(&out);
    assert!(text.contains("entries agree"), "{text}");
}

/// The passkey prompt (chat template applied) and the tokens the Rust API
/// answers with after the hook compressed it to `BUDGET` cells.
struct Reference {
    prompt_file: PathBuf,
    tokens: Vec<i32>,
}

fn first_argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

fn rust_reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let model = qwen();
        let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
        let mut body = String::from(
            "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. \
             I will quiz you about the important information there. ",
        );
        for i in 0..68 {
            if i == 68 * 2 / 5 {
                body.push_str(&format!(
                    "The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key. "
                ));
            }
            body.push_str(filler);
        }
        body.push_str("What is the pass key? The pass key is");
        let prompt = model.apply_chat_template(&[ChatMessage::user(body)], true).unwrap();
        let prompt_file = scratch().join("passkey-prompt.txt");
        std::fs::write(&prompt_file, &prompt).unwrap();

        let _heavy = heavy();
        let tokens = model.tokenize(&prompt, true, true).unwrap();
        let n = tokens.len() as i32;
        let mut ctx = observed(model, 4096, FlashAttention::Auto);
        ctx.set_threads(THREADS, THREADS);
        ctx.decode_tokens(0, &tokens, 0, true).unwrap();
        let mut config = SnapKvConfig::default();
        config.budget = Budget::Cells(BUDGET);
        let stats = Compressor::new(config)
            .unwrap()
            .compress_after_prefill(&mut ctx, 0, &tokens)
            .unwrap();
        assert!(stats.compressed && stats.cells_after == BUDGET, "{stats:?}");
        let mut answer = Vec::new();
        let mut batch = Batch::new(1, 1).unwrap();
        for i in 0..MAX_ANSWER {
            let best = first_argmax(ctx.logits_ith(-1).unwrap()) as i32;
            if model.is_eog(best) {
                break;
            }
            answer.push(best);
            if i + 1 < MAX_ANSWER {
                batch.clear();
                batch.add(best, n + i as i32, &[0], true).unwrap();
                ctx.decode(&batch).unwrap();
            }
        }
        let text = model.detokenize(&answer, false).unwrap();
        println!("rust api: {} prompt tokens, answer {text:?} {answer:?}", tokens.len());
        assert!(text.contains(PASSKEY), "the Rust API lost the pass key: {text:?}");
        Reference {
            prompt_file,
            tokens: answer,
        }
    })
}

/// The token ids a C program printed as `tokens[label]: 1 2 3`.
fn printed_tokens(text: &str, label: &str) -> Vec<i32> {
    let prefix = format!("tokens[{label}]:");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in\n{text}"));
    line.split_whitespace().map(|t| t.parse().unwrap()).collect()
}

#[test]
fn c_passkey_example_matches_rust_api() {
    let reference = rust_reference();
    let exe = compile("examples/passkey.c", "passkey", static_flags());
    let _heavy = heavy();
    let out = run_ok(
        Command::new(exe)
            .current_dir(repo())
            .args(["-m", QWEN, "-k", PASSKEY, "-b", &BUDGET.to_string()])
            .args(["-t", &THREADS.to_string(), "-n", &MAX_ANSWER.to_string()])
            .arg("-f")
            .arg(&reference.prompt_file),
    );
    let text = output_text(&out);
    println!("{text}");
    assert!(text.contains(&format!("pass key {PASSKEY}: retrieved")), "{text}");
    let full = text.lines().find(|l| l.starts_with("answer[full]:")).unwrap();
    assert!(full.contains(PASSKEY), "the full cache lost the pass key: {full}");
    assert_eq!(printed_tokens(&text, "snapkv"), reference.tokens, "C hook vs Rust API");
}

/// The `dynamic-link` build of the library (plugin mode), built on first use
/// into `<target>/plugin` so it does not disturb the main build, against
/// the libllama that llama.cpp's own CMake built and installed for its
/// programs ([`llama_tools`], `SNAPKV_LLAMA_PREFIX`): a host's llama.cpp,
/// and no second llama.cpp build in the test suite.
struct Plugin {
    library: PathBuf,
    pc_dir: PathBuf,
}

fn plugin() -> &'static Plugin {
    static PLUGIN: OnceLock<Plugin> = OnceLock::new();
    PLUGIN.get_or_init(|| {
        let target = profile_dir().parent().expect("target dir").join("plugin");
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let out = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--features",
                "dynamic-link",
                "--lib",
                "--manifest-path",
            ])
            .arg(repo().join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", &target)
            .env("SNAPKV_LLAMA_PREFIX", llama_tools().join("install"))
            .output()
            .expect("run cargo");
        assert!(out.status.success(), "plugin build failed\n{}", output_text(&out));
        let profile = target.join("release");
        run_ok(
            Command::new("bash")
                .arg(repo().join("scripts/snapkv-pkg-config.sh"))
                .arg("--plugin")
                .arg(&profile),
        );
        Plugin {
            library: profile.join("libsnapkv.so"),
            pc_dir: profile.join("pkgconfig"),
        }
    })
}

fn nm(args: &[&str], lib: &Path) -> Vec<String> {
    let out = run_ok(Command::new("nm").args(args).arg(lib));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

#[test]
fn plugin_library_uses_the_hosts_libllama() {
    let lib = &plugin().library;
    let defined = nm(&["-D", "--defined-only"], lib);
    let undefined = nm(&["-D", "--undefined-only"], lib);
    let llama_defined: Vec<_> = defined.iter().filter(|s| s.starts_with("llama_")).collect();
    assert!(llama_defined.is_empty(), "libsnapkv.so defines {llama_defined:?}");
    let llama_undefined = undefined.iter().filter(|s| s.starts_with("llama_")).count();
    for needed in [
        "llama_decode",
        "llama_state_seq_get_data_ext",
        "llama_state_seq_set_data_ext",
    ] {
        assert!(undefined.iter().any(|s| s == needed), "{needed} not imported");
    }
    assert!(defined.iter().any(|s| s == "snapkv_compress_after_prefill"));
    let dynamic = run_ok(Command::new("readelf").arg("-d").arg(lib));
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    assert!(
        dynamic.contains("[libllama.so"),
        "libllama is not a NEEDED library:\n{dynamic}"
    );
    println!(
        "{}: {} snapkv_* symbols defined, 0 llama_* defined, {llama_undefined} llama_* undefined",
        lib.display(),
        defined.iter().filter(|s| s.starts_with("snapkv_")).count()
    );
}

#[test]
fn plugin_host_dlopen_matches_rust_api() {
    let reference = rust_reference();
    let plugin = plugin();
    let mut flags = pkg_config(&plugin.pc_dir, &["--cflags"]);
    let llama_lib = pkg_config(&plugin.pc_dir, &["--variable=llama_libdir"]).join("");
    // DT_RPATH (not RUNPATH) so that libllama's own dependencies (libggml*)
    // are found from the build tree too, as a host's installed tree would.
    flags.extend([
        format!("-L{llama_lib}"),
        "-lllama".into(),
        "-ldl".into(),
        "-Wl,--disable-new-dtags".into(),
        format!("-Wl,-rpath,{llama_lib}"),
    ]);
    let host = compile("tests/c/plugin_host.c", "plugin_host", &flags);
    let needed = run_ok(Command::new("readelf").arg("-d").arg(&host));
    let needed = String::from_utf8_lossy(&needed.stdout);
    assert!(
        !needed.contains("libsnapkv"),
        "the host must not link libsnapkv:\n{needed}"
    );

    let _heavy = heavy();
    let out = run_ok(
        Command::new(&host)
            .arg(&plugin.library)
            .arg(repo().join(QWEN))
            .arg(&reference.prompt_file)
            .arg(BUDGET.to_string())
            .arg(MAX_ANSWER.to_string())
            .arg(THREADS.to_string()),
    );
    let text = output_text(&out);
    println!("{text}");
    assert!(text.contains("libllama copies in the process: 1"), "{text}");
    let answer = text.lines().find(|l| l.starts_with("answer[plugin]:")).unwrap();
    assert!(answer.contains(PASSKEY), "the plugin lost the pass key: {answer}");
    assert_eq!(
        printed_tokens(&text, "plugin"),
        reference.tokens,
        "plugin hook vs Rust API"
    );
}
