//! Installing for C and C++ programs (issue 28.5): `scripts/install.sh
//! --prefix <temp dir>` lays out the library, the headers, the pkg-config
//! file and the CMake package; then examples/passkey.c is built twice
//! against the installed tree only, as a CMake project (examples/cmake:
//! `find_package(snapkv 0.1 REQUIRED)` and `snapkv::snapkv`) and with `cc
//! $(pkg-config --cflags --libs snapkv)`, and both programs compress a
//! prompt on the tiny model. A link interface that lacked a library the
//! archive needs fails the link here.
//!
//! Needs `cargo build --release` first (the README's test command runs it),
//! and cmake and pkg-config (scripts/setup.sh installs both).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

mod common;

use common::profile_dir;
use snapkv_testing::{tiny_model_path, TinyModelSpec};

/// Cells kept per KV head: well below the prompt's length.
const BUDGET: usize = 64;
const THREADS: usize = 2;
const MAX_ANSWER: usize = 4;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `cargo test` does not build the static library and cannot run `cargo
/// build` itself (it holds the target directory's lock), so the library
/// comes from the `cargo build --release` that the README's test command
/// runs first.
fn require_built_libs(profile: &Path) {
    for lib in ["libsnapkv.a", "libsnapkv.so"] {
        let path = profile.join(lib);
        assert!(
            path.is_file(),
            "{} is missing: run `cargo build --release` before `cargo test --release`",
            path.display()
        );
    }
}

/// Fails with the fix when a tool the test drives is absent.
fn require_tool(name: &str) {
    let found = Command::new(name).arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "{name} is required for this test: run scripts/setup.sh (it installs cmake and pkg-config)"
    );
}

/// A fresh directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("snapkv-cmake-install-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
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

/// A prompt of a few hundred tokens for the tiny model (its vocabulary
/// spells most words letter by letter).
fn write_prompt(dir: &Path) -> PathBuf {
    let mut prompt = String::from("The pass key is 52714. Remember it. ");
    for i in 0..24 {
        prompt.push_str(&format!(
            "It was the time of the number {i}, and that is all there is to it. "
        ));
    }
    prompt.push_str("What is the pass key? The pass key is");
    let path = dir.join("prompt.txt");
    fs::write(&path, prompt).expect("prompt file");
    path
}

/// Runs a passkey build on the tiny model and checks that it compressed the
/// prompt to the budget and answered; returns the answer's token ids.
fn run_passkey(exe: &Path, model: &Path, prompt: &Path) -> String {
    let started = Instant::now();
    let out = run_ok(
        Command::new(exe)
            .arg("-m")
            .arg(model)
            .arg("-f")
            .arg(prompt)
            .args(["-b", &BUDGET.to_string()])
            .args(["-t", &THREADS.to_string()])
            .args(["-n", &MAX_ANSWER.to_string()]),
    );
    let text = output_text(&out);
    println!("{} ({:.2} s)\n{text}", exe.display(), started.elapsed().as_secs_f64());
    let n_prompt: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("prompt: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `prompt: N tokens` line\n{text}"));
    assert!(n_prompt > 2 * BUDGET, "the prompt is too short to compress\n{text}");
    let want = format!("snapkv: compressed, {n_prompt} -> {BUDGET} cells");
    assert!(text.contains(&want), "expected {want:?}\n{text}");
    assert!(text.contains("answer[snapkv]:"), "{text}");
    text.lines()
        .find(|l| l.starts_with("tokens[snapkv]:"))
        .unwrap_or_else(|| panic!("no tokens[snapkv] line\n{text}"))
        .to_string()
}

#[test]
fn installed_tree_serves_cmake_and_pkg_config() {
    let profile = profile_dir();
    require_built_libs(&profile);
    require_tool("cmake");
    require_tool("pkg-config");
    let started = Instant::now();
    let tmp = TempDir::new();
    let prefix = tmp.0.join("prefix");

    // 1. Install from the build tree into the temporary prefix.
    let out = run_ok(
        Command::new("bash")
            .arg(repo().join("scripts/install.sh"))
            .arg("--prefix")
            .arg(&prefix)
            .arg(&profile),
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    for file in [
        "lib/libsnapkv.a",
        "lib/libsnapkv.so",
        "include/snapkv.h",
        "include/snapkv/llama.cpp/llama.h",
        "include/snapkv/llama.cpp/ggml.h",
        "lib/pkgconfig/snapkv.pc",
        "lib/cmake/snapkv/snapkvConfig.cmake",
        "lib/cmake/snapkv/snapkvConfigVersion.cmake",
    ] {
        assert!(prefix.join(file).is_file(), "install.sh did not install {file}");
    }

    let model = tiny_model_path(&TinyModelSpec::default()).expect("tiny model written");
    let prompt = write_prompt(&tmp.0);

    // 2. A CMake project: find_package(snapkv 0.1 REQUIRED), snapkv::snapkv.
    let build = tmp.0.join("cmake-build");
    run_ok(
        Command::new("cmake")
            .arg("-S")
            .arg(repo().join("examples/cmake"))
            .arg("-B")
            .arg(&build)
            .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()))
            .arg("-DCMAKE_BUILD_TYPE=Release"),
    );
    let cache = fs::read_to_string(build.join("CMakeCache.txt")).expect("CMakeCache.txt");
    let found = cache
        .lines()
        .find_map(|l| l.strip_prefix("snapkv_DIR:PATH="))
        .expect("snapkv_DIR in CMakeCache.txt");
    assert_eq!(
        Path::new(found),
        prefix.join("lib/cmake/snapkv"),
        "find_package found another snapkv"
    );
    run_ok(Command::new("cmake").arg("--build").arg(&build));
    let cmake_tokens = run_passkey(&build.join("passkey"), &model, &prompt);

    // 3. pkg-config with the installed .pc file: paths into the prefix only.
    let pc_dir = prefix.join("lib/pkgconfig");
    let flags = run_ok(
        Command::new("pkg-config")
            .args(["--cflags", "--libs", "snapkv"])
            .env("PKG_CONFIG_PATH", &pc_dir),
    );
    let flags: Vec<String> = String::from_utf8(flags.stdout)
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let build_tree = profile.to_string_lossy().into_owned();
    assert!(
        flags.iter().all(|f| !f.contains(&build_tree)),
        "the installed snapkv.pc points into the build tree: {flags:?}"
    );
    assert!(
        flags.contains(&format!("{}/libsnapkv.a", prefix.join("lib").display())),
        "{flags:?}"
    );
    let exe = tmp.0.join("passkey-pkg-config");
    run_ok(
        Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
            .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1"])
            .arg(repo().join("examples/passkey.c"))
            .args(&flags)
            .arg("-o")
            .arg(&exe),
    );
    let pc_tokens = run_passkey(&exe, &model, &prompt);
    assert_eq!(
        cmake_tokens, pc_tokens,
        "the two builds of one program answered differently"
    );
    println!(
        "install, two builds and two runs: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
