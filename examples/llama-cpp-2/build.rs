//! The one line a program on llama-cpp-2 needs for snapkv: link with the
//! `--wrap` options that send its llama.cpp calls to snapkv's wrappers.
//! snapkv's build script publishes them (feature `llama-cpp-sys-2`).

fn main() {
    let arg = std::env::var("DEP_SNAPKV_WRAP_LINK_ARG")
        .expect("snapkv publishes DEP_SNAPKV_WRAP_LINK_ARG with its feature `llama-cpp-sys-2`");
    println!("cargo:rustc-link-arg={arg}");
}
