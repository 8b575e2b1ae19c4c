//! The host's own llama.cpp functions behind the ones we interpose, found
//! with `dlsym(RTLD_NEXT, …)`: the next definition after this library in
//! the process's lookup order, which is the host's `libllama`.
//!
//! Functions we do not interpose need nothing here: their undefined
//! references in this library bind to the host's definitions when it is
//! loaded.

use std::ffi::{c_char, c_void, CStr};

use crate::sys;

extern "C" {
    /// glibc's `dlsym` (the C library every host links).
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}

/// glibc's `RTLD_NEXT`: search the libraries loaded after the caller's.
const RTLD_NEXT: *mut c_void = -1isize as *mut c_void;
/// glibc's `RTLD_DEFAULT`: the process's global lookup order.
const RTLD_DEFAULT: *mut c_void = std::ptr::null_mut();

/// Whether the process defines a function or variable named `name`
/// anywhere (the host's libllama included).
pub(super) fn defined_in_process(name: &CStr) -> bool {
    // SAFETY: dlsym only reads the NUL-terminated name; RTLD_DEFAULT is a
    // valid pseudo-handle on glibc.
    !unsafe { dlsym(RTLD_DEFAULT, name.as_ptr()) }.is_null()
}

#[cfg(feature = "preload")]
macro_rules! host_functions {
    ($( $name:ident : fn($($ty:ty),*) $(-> $ret:ty)? ;)*) => {
        $(
            /// The host's definition of this function, resolved on first
            /// use; `None` when the host's libllama lacks it.
            pub(super) fn $name() -> Option<unsafe extern "C" fn($($ty),*) $(-> $ret)?> {
                static ADDRESS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
                const NAME: &CStr = match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                    Ok(n) => n,
                    Err(_) => panic!("NUL in a symbol name"),
                };
                // SAFETY: dlsym reads the NUL-terminated name; RTLD_NEXT
                // is a valid pseudo-handle on glibc.
                let address = *ADDRESS.get_or_init(|| unsafe { dlsym(RTLD_NEXT, NAME.as_ptr()) } as usize);
                if address == 0 {
                    return None;
                }
                // The bindings come from the pinned llama.h; the version
                // guard refuses to act on a host whose llama.cpp differs.
                // SAFETY: the host's function of this name, with llama.h's signature.
                Some(unsafe { std::mem::transmute::<usize, unsafe extern "C" fn($($ty),*) $(-> $ret)?>(address) })
            }
        )*
    };
}

/// Linked into a program (feature `llama-cpp-sys-2`): the linker's
/// `--wrap=NAME` sends the program's calls of `NAME` to our `__wrap_NAME`
/// and resolves `__real_NAME` to llama.cpp's own `NAME`.
#[cfg(not(feature = "preload"))]
macro_rules! host_functions {
    ($( $name:ident : fn($($ty:ty),*) $(-> $ret:ty)? ;)*) => {
        $(
            /// llama.cpp's own definition of this function (always present
            /// in a linked program).
            pub(super) fn $name() -> Option<unsafe extern "C" fn($($ty),*) $(-> $ret)?> {
                extern "C" {
                    #[link_name = concat!("__real_", stringify!($name))]
                    fn $name($(_: $ty),*) $(-> $ret)?;
                }
                Some($name)
            }
        )*
    };
}

host_functions! {
    llama_init_from_model: fn(*mut sys::llama_model, sys::llama_context_params) -> *mut sys::llama_context;
    llama_free: fn(*mut sys::llama_context);
    llama_decode: fn(*mut sys::llama_context, sys::llama_batch) -> i32;
    llama_process: fn(*mut sys::llama_context, sys::llama_process_type, *mut sys::llama_batch_ext) -> i32;
    llama_batch_ext_free: fn(*mut sys::llama_batch_ext);
    llama_batch_ext_clear: fn(*mut sys::llama_batch_ext);
    llama_batch_ext_add: fn(*mut sys::llama_batch_ext, sys::llama_seq_id) -> i32;
    llama_batch_ext_add_token: fn(*mut sys::llama_batch_ext, sys::llama_seq_id, sys::llama_token) -> i32;
    llama_batch_ext_add_embd: fn(*mut sys::llama_batch_ext, sys::llama_seq_id, sys::llama_embd) -> i32;
    llama_batch_ext_add_seq: fn(*mut sys::llama_batch_ext, i32, sys::llama_seq_id) -> bool;
    llama_batch_ext_set_pos: fn(*mut sys::llama_batch_ext, i32, *const sys::llama_pos) -> bool;
    llama_batch_ext_set_output_logits: fn(*mut sys::llama_batch_ext, i32, bool) -> bool;
    llama_batch_ext_set_output_embd: fn(*mut sys::llama_batch_ext, i32, bool) -> bool;
    llama_memory_clear: fn(sys::llama_memory_t, bool);
    llama_memory_seq_rm: fn(sys::llama_memory_t, sys::llama_seq_id, sys::llama_pos, sys::llama_pos) -> bool;
    llama_memory_seq_cp: fn(sys::llama_memory_t, sys::llama_seq_id, sys::llama_seq_id, sys::llama_pos, sys::llama_pos);
    llama_memory_seq_keep: fn(sys::llama_memory_t, sys::llama_seq_id);
    llama_memory_seq_add: fn(sys::llama_memory_t, sys::llama_seq_id, sys::llama_pos, sys::llama_pos, sys::llama_pos);
    llama_memory_seq_pos_min: fn(sys::llama_memory_t, sys::llama_seq_id) -> sys::llama_pos;
    llama_state_seq_get_data_ext: fn(*mut sys::llama_context, *mut u8, usize, sys::llama_seq_id, sys::llama_state_seq_flags) -> usize;
    llama_state_seq_set_data_ext: fn(*mut sys::llama_context, *const u8, usize, sys::llama_seq_id, sys::llama_state_seq_flags) -> usize;
    llama_state_seq_get_data: fn(*mut sys::llama_context, *mut u8, usize, sys::llama_seq_id) -> usize;
    llama_state_seq_set_data: fn(*mut sys::llama_context, *const u8, usize, sys::llama_seq_id) -> usize;
}

// llama-cpp-2 creates its contexts with this (deprecated) name, whose body
// calls llama_init_from_model inside llama.cpp, where no link wraps it.
#[cfg(feature = "llama-cpp-sys-2")]
host_functions! {
    llama_new_context_with_model: fn(*mut sys::llama_model, sys::llama_context_params) -> *mut sys::llama_context;
}

#[cfg(test)]
mod tests {
    /// Names listed in `host_functions!` invocations of `source`.
    fn host_function_names(source: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut inside = false;
        for line in source.lines() {
            let line = line.trim();
            if line == "host_functions! {" {
                inside = true;
            } else if inside && line == "}" {
                inside = false;
            } else if inside {
                if let Some((name, _)) = line.split_once(": fn(") {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        names
    }

    /// The build script's `--wrap` list must name every function we
    /// forward to llama.cpp's own definition (`__real_…`): a name it lacks
    /// fails the program's link; a name too many leaves a call unwrapped.
    #[test]
    fn the_wrap_list_names_every_forwarded_function() {
        let build = include_str!("../../build.rs");
        let list = build
            .split_once("const WRAPPED: &[&str] = &[")
            .and_then(|(_, rest)| rest.split_once("];"))
            .expect("build.rs has WRAPPED")
            .0;
        let mut wrapped: Vec<String> = list
            .split(',')
            .map(|n| n.trim().trim_matches('"').to_string())
            .filter(|n| !n.is_empty())
            .collect();
        wrapped.sort();
        let forwarded = host_function_names(include_str!("real.rs"));
        assert_eq!(wrapped, forwarded);
        assert!(forwarded.len() > 20, "parsed {forwarded:?}");
    }
}
