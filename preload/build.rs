//! Links `libsnapkv_preload.so` with lazy binding: its llama.cpp references
//! are resolved in the host process, and a host whose llama.cpp lacks one
//! of them must still load (the version guard then passes through) rather
//! than fail at start-up on an unresolved symbol.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,lazy");
    }
}
