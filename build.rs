//! Build script: compile the pinned llama.cpp with cmake and generate its raw
//! bindings with bindgen.
//!
//! Source discovery, in order:
//! 1. `LLAMA_CPP_DIR`: a llama.cpp tree of the user's own (the llama.cpp they
//!    ship; plugin builds use this);
//! 2. `vendor/llama.cpp`, materialised by `vendor/fetch-llama-cpp.sh` in a
//!    checkout, and carried (trimmed to what the build reads) by the
//!    packaged crate;
//! 3. otherwise a clear error naming that script. This script never downloads.
//!
//! Environment variables (each read through [`env`], which prints its rerun line):
//! - `LLAMA_CPP_DIR`: see above.
//! - `SNAPKV_CMAKE_ARGS`: extra `-DNAME=VALUE` options for llama.cpp's cmake,
//!   separated by whitespace, applied last (e.g. `-DGGML_AVX512=ON`).
//!
//! The instruction set llama.cpp is compiled for follows the Rust target's
//! features ([`X86_OPTIONS`]); the `native` feature asks for the build
//! machine's instead.
//! - `SNAPKV_CMAKE_JOBS`: parallel compile jobs (defaults to cargo's `NUM_JOBS`).
//! - `DOCS_RS`: set by docs.rs; the bindings are generated but llama.cpp is
//!   neither built nor linked.
//! - `SNAPKV_LLAMA_PREFIX`: an installed llama.cpp (what `cmake --install`
//!   writes) to link instead of building one: the bindings come from its
//!   headers (`PREFIX/include`), the libraries from `PREFIX/lib` or
//!   `PREFIX/lib64`, and nothing is compiled here. The static libraries
//!   by default (`libllama.a`, `libggml*.a`; OpenMP's runtime too when
//!   its ggml-config.cmake says ggml was built with it), the shared ones
//!   with `dynamic-link` (a host's own libllama, for plugin mode).
//!
//! With the `preload` feature llama.cpp is not built or linked either: the
//! interposition library resolves llama.cpp's functions in the host process
//! that preloads it (see `src/preload`).
//!
//! With the `llama-cpp-sys-2` feature the llama.cpp is llama-cpp-sys-2's:
//! nothing is built or linked here, the bindings come from the headers that
//! crate installed (in the prefix it publishes as `DEP_LLAMA_ROOT`),
//! and the `--wrap` options a program's link needs for `snapkv::linked` are
//! passed to this package's own binaries and tests and published to
//! dependents as `DEP_SNAPKV_WRAP_LINK_ARG`.

use std::env as stdenv;
use std::fs;
use std::path::{Path, PathBuf};

/// Directories of the llama.cpp tree whose changes require a rebuild.
const WATCHED_DIRS: &[&str] = &[
    "CMakeLists.txt",
    "cmake",
    "include",
    "src",
    "ggml/CMakeLists.txt",
    "ggml/include",
    "ggml/src",
];

/// The llama.cpp functions `snapkv::linked` wraps (src/preload/real.rs
/// lists the same ones; a unit test there checks that they agree).
const WRAPPED: &[&str] = &[
    "llama_new_context_with_model",
    "llama_init_from_model",
    "llama_free",
    "llama_decode",
    "llama_process",
    "llama_batch_ext_free",
    "llama_batch_ext_clear",
    "llama_batch_ext_add",
    "llama_batch_ext_add_token",
    "llama_batch_ext_add_embd",
    "llama_batch_ext_add_seq",
    "llama_batch_ext_set_pos",
    "llama_batch_ext_set_output_logits",
    "llama_batch_ext_set_output_embd",
    "llama_memory_clear",
    "llama_memory_seq_rm",
    "llama_memory_seq_cp",
    "llama_memory_seq_keep",
    "llama_memory_seq_add",
    "llama_memory_seq_pos_min",
    "llama_state_seq_get_data_ext",
    "llama_state_seq_set_data_ext",
    "llama_state_seq_get_data",
    "llama_state_seq_set_data",
];

/// llama.cpp's x86-64 instruction-set options, each with the Rust target
/// feature that turns it on. All are set, on or off: with GGML_NATIVE off,
/// ggml's own defaults would turn on SSE4.2, AVX, AVX2, BMI2, FMA and F16C
/// whatever the target. So a default build (the x86-64 baseline target)
/// gives a llama.cpp that runs on any x86-64 machine, and
/// `-C target-cpu=x86-64-v3` (or any `target-feature` list) gives the
/// matching faster one; `SNAPKV_CMAKE_ARGS`, applied after these, can
/// raise llama.cpp's level alone (the repository's .cargo/config.toml
/// does). Rust's own scoring kernels choose their SIMD width at run time
/// either way.
const X86_OPTIONS: &[(&str, &str)] = &[
    ("GGML_SSE42", "sse4.2"),
    ("GGML_AVX", "avx"),
    ("GGML_AVX2", "avx2"),
    ("GGML_FMA", "fma"),
    ("GGML_F16C", "f16c"),
    ("GGML_BMI2", "bmi2"),
    ("GGML_AVX_VNNI", "avxvnni"),
    ("GGML_AVX512", "avx512f"),
    ("GGML_AVX512_VBMI", "avx512vbmi"),
    ("GGML_AVX512_VNNI", "avx512vnni"),
    ("GGML_AVX512_BF16", "avx512bf16"),
    ("GGML_AMX_TILE", "amx-tile"),
    ("GGML_AMX_INT8", "amx-int8"),
    ("GGML_AMX_BF16", "amx-bf16"),
];

/// The llama.cpp whose headers we bind: a source tree, or an install
/// prefix (llama-cpp-sys-2's build, or `SNAPKV_LLAMA_PREFIX`).
struct Headers {
    /// Where the tree or prefix is (reported by the library).
    root: PathBuf,
    llama_h: PathBuf,
    gguf_h: PathBuf,
    include_dirs: Vec<PathBuf>,
    ggml_version: String,
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let shared = feature("llama-cpp-sys-2");
    if shared && feature("preload") {
        panic!(
            "the features `preload` (a library preloaded into llama.cpp's programs) and `llama-cpp-sys-2` \
             (linked into a program on llama-cpp-2) exclude each other"
        );
    }
    let headers = if shared {
        let Some(prefix) = env("DEP_LLAMA_ROOT") else {
            panic!(
                "feature `llama-cpp-sys-2`: llama-cpp-sys-2 published no DEP_LLAMA_ROOT \
                 (the prefix its CMake build installs llama.cpp into); is it the pinned version?"
            );
        };
        installed_headers(Path::new(&prefix), "feature `llama-cpp-sys-2`")
    } else if let Some(prefix) = env("SNAPKV_LLAMA_PREFIX") {
        let prefix = PathBuf::from(prefix);
        let headers = installed_headers(&prefix, "SNAPKV_LLAMA_PREFIX");
        println!("cargo:rerun-if-changed={}", headers.llama_h.display());
        if env("DOCS_RS").is_none() && !feature("preload") {
            check_installed_libraries(&prefix);
            link_llama_cpp(&prefix);
        }
        headers
    } else {
        let src = locate_llama_cpp();
        watch_tree(&src);
        // docs.rs (and anyone documenting the crate with DOCS_RS set) needs
        // the bindings to type-check, but no native code: nothing is linked.
        if env("DOCS_RS").is_none() && !feature("preload") {
            let prefix = build_llama_cpp(&src);
            link_llama_cpp(&prefix);
        }
        source_headers(&src)
    };
    if shared {
        publish_wrap_link_arg();
    }
    generate_bindings(&headers);
    export_pin(&headers);
}

fn source_headers(src: &Path) -> Headers {
    Headers {
        root: src.to_path_buf(),
        llama_h: src.join("include/llama.h"),
        gguf_h: src.join("ggml/include/gguf.h"),
        include_dirs: vec![src.join("include"), src.join("ggml/include")],
        ggml_version: ggml_version_of_tree(src),
    }
}

/// The headers of an installed llama.cpp: the prefix llama-cpp-sys-2's
/// CMake build installs into (the cmake crate's `root`, which its `links =
/// "llama"` publishes to us as DEP_LLAMA_ROOT), or `SNAPKV_LLAMA_PREFIX`.
/// `origin` names where the prefix came from, in the errors.
fn installed_headers(prefix: &Path, origin: &str) -> Headers {
    let prefix = prefix.to_path_buf();
    let include = prefix.join("include");
    for header in ["llama.h", "gguf.h"] {
        if !include.join(header).is_file() {
            panic!("{origin}: {} has no {header}", include.display());
        }
    }
    let version_file = installed_lib_dir(&prefix)
        .map(|lib| lib.join("cmake/ggml/ggml-config.cmake"))
        .unwrap_or_else(|| {
            panic!(
                "{origin}: no lib/cmake/ggml/ggml-config.cmake under {}",
                prefix.display()
            )
        });
    let ggml_version = ggml_setting(&version_file, "GGML_VERSION")
        .unwrap_or_else(|| panic!("no GGML_VERSION in {}", version_file.display()));
    Headers {
        root: prefix,
        llama_h: include.join("llama.h"),
        gguf_h: include.join("gguf.h"),
        include_dirs: vec![include],
        ggml_version,
    }
}

/// The library directory of an install prefix (`lib`, or `lib64` where
/// GNUInstallDirs chose it): the one holding ggml's CMake package.
fn installed_lib_dir(prefix: &Path) -> Option<PathBuf> {
    ["lib", "lib64"]
        .iter()
        .map(|dir| prefix.join(dir))
        .find(|dir| dir.join("cmake/ggml/ggml-config.cmake").is_file())
}

/// A `set(NAME "value")` line of an installed ggml-config.cmake.
fn ggml_setting(config: &Path, name: &str) -> Option<String> {
    let text = fs::read_to_string(config).ok()?;
    let head = format!("set({name} ");
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix(&head)
            .map(|v| v.trim_end_matches(')').trim().trim_matches('"').to_string())
    })
}

/// Refuses, in one clear line, an install prefix without the libraries
/// this build links: `libllama.a` by default, `libllama.so` with
/// `dynamic-link`.
fn check_installed_libraries(prefix: &Path) {
    let lib = installed_lib_dir(prefix).unwrap_or_else(|| prefix.join("lib"));
    let (file, kind) = if feature("dynamic-link") {
        ("libllama.so", "shared")
    } else {
        ("libllama.a", "static")
    };
    if !lib.join(file).exists() {
        let other = if feature("dynamic-link") {
            "without the feature `dynamic-link` for static libraries"
        } else {
            "with the feature `dynamic-link` for shared libraries"
        };
        panic!(
            "SNAPKV_LLAMA_PREFIX={}: no {file} in {} (this build links llama.cpp's {kind} libraries; build {other}, \
             or unset the variable to build the vendored llama.cpp)",
            prefix.display(),
            lib.display()
        );
    }
}

/// The linker options that send a program's calls of [`WRAPPED`] to our
/// wrappers: for this package's own binaries, tests and cdylib, and, as
/// metadata, for the program that depends on us.
fn publish_wrap_link_arg() {
    let arg = format!(
        "-Wl,{}",
        WRAPPED
            .iter()
            .map(|f| format!("--wrap={f}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("cargo:rustc-link-arg={arg}");
    println!("cargo:wrap_link_arg={arg}");
}

/// Reads an environment variable and tells cargo to rerun when it changes.
fn env(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    stdenv::var(name).ok().filter(|v| !v.is_empty())
}

fn feature(name: &str) -> bool {
    stdenv::var(format!("CARGO_FEATURE_{}", name.to_uppercase().replace('-', "_"))).is_ok()
}

fn locate_llama_cpp() -> PathBuf {
    if let Some(dir) = env("LLAMA_CPP_DIR") {
        let dir = PathBuf::from(dir);
        if !dir.join("include/llama.h").is_file() {
            panic!(
                "LLAMA_CPP_DIR={} is not a llama.cpp source tree (no include/llama.h)",
                dir.display()
            );
        }
        return dir;
    }
    let manifest = PathBuf::from(stdenv::var("CARGO_MANIFEST_DIR").unwrap());
    let vendored = manifest.join("vendor/llama.cpp");
    if vendored.join("include/llama.h").is_file() {
        return vendored;
    }
    panic!(
        "\n\nllama.cpp sources not found.\n\
         Run `vendor/fetch-llama-cpp.sh` to fetch the pinned tree into vendor/llama.cpp,\n\
         or set LLAMA_CPP_DIR to a llama.cpp source tree of your own.\n\n"
    );
}

/// Reruns on the tree's directories (cargo scans them recursively), never on
/// each file: a second build after touching only Rust code does not rebuild
/// llama.cpp.
fn watch_tree(src: &Path) {
    for rel in WATCHED_DIRS {
        println!("cargo:rerun-if-changed={}", src.join(rel).display());
    }
}

/// Configures and builds llama.cpp out of tree in OUT_DIR; returns the
/// install prefix.
fn build_llama_cpp(src: &Path) -> PathBuf {
    let mut cfg = cmake::Config::new(src);
    let shared = feature("dynamic-link");
    cfg.profile("Release")
        .define("BUILD_SHARED_LIBS", on_off(shared))
        .define("LLAMA_BUILD_COMMON", "OFF")
        .define("LLAMA_BUILD_TESTS", "OFF")
        .define("LLAMA_BUILD_TOOLS", "OFF")
        .define("LLAMA_BUILD_EXAMPLES", "OFF")
        .define("LLAMA_BUILD_SERVER", "OFF")
        .define("LLAMA_BUILD_APP", "OFF")
        .define("LLAMA_OPENSSL", "OFF")
        .define("LLAMA_ALL_WARNINGS", "OFF")
        .define("GGML_OPENMP", "OFF")
        .define("CMAKE_INSTALL_LIBDIR", "lib")
        .define("CMAKE_POSITION_INDEPENDENT_CODE", "ON");

    if feature("native") {
        cfg.define("GGML_NATIVE", "ON");
    } else {
        // Never -march=native by default (some VMs advertise AMX and then
        // refuse it), and never an instruction set the Rust target lacks:
        // llama.cpp gets exactly the x86-64 extensions the crate itself is
        // compiled for (see X86_OPTIONS).
        cfg.define("GGML_NATIVE", "OFF");
        if stdenv::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64") {
            let features = stdenv::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
            let enabled: Vec<&str> = features.split(',').collect();
            for (option, feature) in X86_OPTIONS {
                cfg.define(option, on_off(enabled.contains(feature)));
            }
        }
    }
    cfg.define("GGML_CUDA", on_off(feature("cuda")))
        .define("GGML_VULKAN", on_off(feature("vulkan")))
        .define("GGML_METAL", on_off(feature("metal")));

    if let Some(extra) = env("SNAPKV_CMAKE_ARGS") {
        for arg in extra.split_whitespace() {
            let Some((name, value)) = arg.strip_prefix("-D").and_then(|a| a.split_once('=')) else {
                panic!("SNAPKV_CMAKE_ARGS: expected -DNAME=VALUE, got {arg:?}");
            };
            cfg.define(name, value);
        }
    }
    if let Some(jobs) = env("SNAPKV_CMAKE_JOBS") {
        stdenv::set_var("CMAKE_BUILD_PARALLEL_LEVEL", jobs);
    } else if let Ok(jobs) = stdenv::var("NUM_JOBS") {
        stdenv::set_var("CMAKE_BUILD_PARALLEL_LEVEL", jobs);
    }
    cfg.build()
}

fn on_off(b: bool) -> &'static str {
    if b {
        "ON"
    } else {
        "OFF"
    }
}

fn link_llama_cpp(prefix: &Path) {
    // Our own build installs into `lib` (CMAKE_INSTALL_LIBDIR); an installed
    // llama.cpp may use `lib64`.
    let lib = installed_lib_dir(prefix).unwrap_or_else(|| prefix.join("lib"));
    println!("cargo:rustc-link-search=native={}", lib.display());
    // Exposed to dependents (links = "llama") and to our own tests.
    println!("cargo:lib_dir={}", lib.display());
    println!("cargo:include_dir={}", prefix.join("include").display());
    println!("cargo:rustc-env=SNAPKV_LLAMA_LIB_DIR={}", lib.display());

    let mut libs = vec!["llama", "ggml", "ggml-cpu", "ggml-base"];
    if feature("cuda") {
        libs.insert(2, "ggml-cuda");
    }
    if feature("vulkan") {
        libs.insert(2, "ggml-vulkan");
    }
    if feature("metal") {
        libs.insert(2, "ggml-metal");
        libs.insert(3, "ggml-blas");
    }
    let kind = if feature("dynamic-link") { "dylib" } else { "static" };
    for name in &libs {
        println!("cargo:rustc-link-lib={kind}={name}");
    }
    if feature("dynamic-link") {
        // Let our own binaries and tests find the freshly built libraries;
        // a host program supplies its own libllama instead.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    } else {
        match stdenv::var("CARGO_CFG_TARGET_OS").as_deref() {
            Ok("macos") | Ok("ios") => println!("cargo:rustc-link-lib=dylib=c++"),
            Ok("windows") => {}
            _ => println!("cargo:rustc-link-lib=dylib=stdc++"),
        }
        // Our own build turns OpenMP off; an installed ggml may use it.
        let config = lib.join("cmake/ggml/ggml-config.cmake");
        if ggml_setting(&config, "GGML_OPENMP_ENABLED").as_deref() == Some("ON") {
            println!("cargo:rustc-link-lib=dylib=gomp");
        }
    }
    if feature("cuda") {
        for name in ["cudart", "cublas", "cublasLt", "cuda"] {
            println!("cargo:rustc-link-lib=dylib={name}");
        }
    }
    if feature("vulkan") {
        println!("cargo:rustc-link-lib=dylib=vulkan");
    }
    if feature("metal") {
        for fw in ["Foundation", "Metal", "MetalKit", "Accelerate"] {
            println!("cargo:rustc-link-lib=framework={fw}");
        }
    }
}

fn generate_bindings(headers: &Headers) {
    let wrapper: String = [&headers.llama_h, &headers.gguf_h]
        .iter()
        .map(|h| format!("#include \"{}\"\n", h.display()))
        .collect();
    let mut builder = bindgen::Builder::default().header_contents("snapkv_wrapper.h", &wrapper);
    for dir in &headers.include_dirs {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let bindings = builder
        .allowlist_function("(llama|ggml|gguf)_.*")
        .allowlist_type("(llama|ggml|gguf)_.*")
        .allowlist_var("(LLAMA|GGML|GGUF)_.*")
        .prepend_enum_name(false)
        .derive_default(true)
        .layout_tests(true)
        .generate()
        .expect("bindgen failed to generate llama.cpp bindings");
    let out = PathBuf::from(stdenv::var("OUT_DIR").unwrap());
    bindings
        .write_to_file(out.join("llama_bindings.rs"))
        .expect("failed to write bindings");
}

/// Exports what the bindings were made from, so that the library can report
/// it and refuse a host llama.cpp that differs (plugin mode).
fn export_pin(headers: &Headers) {
    println!("cargo:rustc-env=SNAPKV_GGML_VERSION={}", headers.ggml_version);
    let header = fs::read(&headers.llama_h).expect("read llama.h");
    println!("cargo:rustc-env=SNAPKV_LLAMA_H_FINGERPRINT={:016x}", fnv1a64(&header));
    println!("cargo:rustc-env=SNAPKV_LLAMA_CPP_DIR={}", headers.root.display());
    let out = PathBuf::from(stdenv::var("OUT_DIR").unwrap());
    let functions = llama_api_functions(&String::from_utf8_lossy(&header)).join("\n");
    fs::write(out.join("llama_api_functions.txt"), functions).expect("write the llama.h function list");
}

/// ggml's version, from the tree's ggml/CMakeLists.txt.
fn ggml_version_of_tree(src: &Path) -> String {
    let ggml_cmake = fs::read_to_string(src.join("ggml/CMakeLists.txt")).unwrap_or_default();
    let part = |key: &str| {
        ggml_cmake
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("set({key} ")))
            .map(|v| v.trim_end_matches(')').trim().to_string())
            .unwrap_or_else(|| "0".into())
    };
    format!(
        "{}.{}.{}",
        part("GGML_VERSION_MAJOR"),
        part("GGML_VERSION_MINOR"),
        part("GGML_VERSION_PATCH")
    )
}

/// The functions llama.h declares with `LLAMA_API`, comments skipped: the
/// preload's version guard checks that the host defines every one.
fn llama_api_functions(header: &str) -> Vec<String> {
    let code: String = header
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("LLAMA_API") {
        rest = &rest[at + "LLAMA_API".len()..];
        // The name is the identifier before the first `(` that is not a
        // DEPRECATED( wrapper.
        let mut scan = rest;
        while let Some(open) = scan.find('(') {
            let before = scan[..open].trim_end();
            let start = before
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(0, |i| i + 1);
            let name = &before[start..];
            if name == "DEPRECATED" {
                scan = &scan[open + 1..];
                continue;
            }
            if name.starts_with("llama_") && !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
            break;
        }
    }
    names.sort();
    names
}

/// FNV-1a: a dependency-free fingerprint of llama.h.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
